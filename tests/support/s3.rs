//! A real S3-compatible server for the shipping tests: moto's server (`python3 -m
//! moto.server`, installed by `.ci/run`), on a loopback address the policy locates, with
//! buckets made over plain HTTP. Objects are read, deleted and replaced through the
//! project's own `audit::store`, as an operator's tools would.

#![allow(dead_code)]

use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use residency_proxy::audit::store::{self, Location, StoreOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Credentials moto accepts (any), given to the proxy and the CLI.
pub const KEY_ID: &str = "test";
pub const SECRET: &str = "test";

/// A running moto server; killed when dropped.
pub struct S3Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// Holds the credentials file the tests' own store handles read.
    dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts moto on `ip` (a free port) and waits until it answers.
    pub fn start(ip: &str) -> S3Server {
        let port = TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        S3Server::credentials_file(dir.path());
        let mut server = S3Server {
            child: None,
            addr: SocketAddr::new(ip.parse().unwrap(), port),
            dir,
        };
        server.restart();
        server
    }

    /// Starts the server again on the same address (empty: moto keeps objects in memory).
    pub fn restart(&mut self) {
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H"])
            .arg(self.addr.ip().to_string())
            .arg("-p")
            .arg(self.addr.port().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 -m moto.server (pip install 'moto[server]'; .ci/run does)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err() {
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none(),
                "moto.server exited at start-up ({exited:?}): is the moto[server] package installed?"
            );
            assert!(Instant::now() < deadline, "moto.server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server: the store is unreachable until [`S3Server::restart`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates a bucket (moto checks no signature).
    pub fn create_bucket(&self, name: &str) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    /// The location `url` (`s3://bucket/prefix/`) on this server, as the CLI opens it.
    pub fn location(&self, url: &str) -> Location {
        let opts = StoreOptions {
            endpoint: Some(url::Url::parse(&self.endpoint()).unwrap()),
            region: Some("cn-north-1".into()),
            credentials_file: Some(self.dir.path().join("s3-credentials")),
        };
        store::open(&url::Url::parse(url).unwrap(), &opts).unwrap()
    }

    /// Writes an AWS credentials file for a policy's `credentials = '…'`.
    pub fn credentials_file(dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("s3-credentials");
        std::fs::write(
            &path,
            format!("[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"),
        )
        .unwrap();
        path
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every object under `loc`'s prefix, as `INSTANCE/NAME`.
pub async fn keys(loc: &Location) -> Vec<String> {
    let listing = store::list(loc).await.unwrap();
    let mut out = Vec::new();
    for (instance, segments) in listing.instances {
        for s in segments {
            out.push(format!("{instance}/{}", s.name));
        }
    }
    out
}

/// The object `INSTANCE/NAME` under `loc`'s prefix.
pub fn object(loc: &Location, key: &str) -> ObjectPath {
    let mut p = loc.prefix.clone();
    for part in key.split('/') {
        p = p.join(part);
    }
    p
}

/// An object's records, decompressed.
pub async fn read(loc: &Location, key: &str) -> Vec<u8> {
    store::fetch(loc, &object(loc, key)).await.unwrap()
}

/// Replaces an object with `content`, compressed (plain put: what someone with write
/// access to the bucket could do).
pub async fn overwrite(loc: &Location, key: &str, content: &[u8]) {
    let compressed = zstd::encode_all(content, 1).unwrap();
    loc.store
        .put(&object(loc, key), compressed.into())
        .await
        .unwrap();
}

pub async fn delete(loc: &Location, key: &str) {
    loc.store.delete(&object(loc, key)).await.unwrap();
}
