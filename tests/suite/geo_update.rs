//! `geo update` through the real binary, against a download server on 127.0.0.1:0 serving
//! real-format databases (written by `mmdb-writer`) bare, gzipped, and as GeoLite2's `.tar.gz`
//! behind an account and licence key; refusals (a truncated file, a cut transfer, a page that
//! is not a database, an older build) leave the current file as it was; and a running proxy
//! decides by the new database once `geo update` has replaced it.

use crate::support::client;
use crate::support::proxy::{APP, PolicySpec, payments_dataset};
use crate::support::tls::{H1_ONLY, Pki};
use crate::support::upstream::{Reply as Serve, Upstream};
use flate2::Compression;
use flate2::write::GzEncoder;
use mmdb_writer::{Value, Writer};
use rustls::ServerConfig;
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// 2026-11-25T23:30:00Z, and the month before.
const NOV: u64 = 1_795_649_400;
const OCT: u64 = NOV - 28 * 86_400;

/// A GeoLite2-Country database built at `epoch`, placing each CIDR in its country.
fn geolite2(epoch: u64, entries: &[(&str, &str)]) -> Vec<u8> {
    let mut w = Writer::builder("GeoLite2-Country")
        .build_epoch(UNIX_EPOCH + Duration::from_secs(epoch))
        .build();
    for (cidr, code) in entries {
        let iso = Value::map([("iso_code", Value::from(*code))]);
        w.insert_value(
            cidr.parse::<ipnet::IpNet>().unwrap(),
            Value::map([("country", iso)]),
        )
        .unwrap();
    }
    w.to_bytes().unwrap()
}

/// A DB-IP Lite country database built at `epoch`.
fn dbip(epoch: u64, entries: &[(&str, &str)]) -> Vec<u8> {
    let mut w = Writer::builder("DBIP-Country-Lite")
        .build_epoch(UNIX_EPOCH + Duration::from_secs(epoch))
        .build();
    for (cidr, code) in entries {
        w.insert_value(
            cidr.parse::<ipnet::IpNet>().unwrap(),
            Value::map([("country_code", Value::from(*code))]),
        )
        .unwrap();
    }
    w.to_bytes().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A ustar archive as GeoLite2 ships it: a folder, the database, its licence files.
fn geolite2_tar(database: &[u8]) -> Vec<u8> {
    fn header(name: &str, size: usize, kind: u8) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"15011426500");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }
    let dir = "GeoLite2-Country_20261125";
    let mut out = header(&format!("{dir}/"), 0, b'5').to_vec();
    let files: [(&str, &[u8]); 3] = [
        (
            "COPYRIGHT.txt",
            b"Database and Contents Copyright (c) 2026 MaxMind, Inc.",
        ),
        ("GeoLite2-Country.mmdb", database),
        (
            "LICENSE.txt",
            b"Use of this MaxMind product is governed by the GeoLite2 EULA.",
        ),
    ];
    for (name, data) in files {
        out.extend_from_slice(&header(&format!("{dir}/{name}"), data.len(), b'0'));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// What the download server answers on a path.
#[derive(Clone)]
enum Route {
    /// `200` with the body. With `announce`, the Content-Length says that many bytes and the
    /// connection closes after the body: a transfer cut short. With `auth`, only a request
    /// carrying that basic authorization gets it, others `401`.
    File {
        body: Vec<u8>,
        announce: Option<usize>,
        auth: Option<String>,
    },
    /// `302` to `to`; with `auth`, only for a request carrying that basic authorization.
    Redirect { to: String, auth: Option<String> },
}

fn file(body: Vec<u8>) -> Route {
    Route::File {
        body,
        announce: None,
        auth: None,
    }
}

/// A request the server received: its target and its Authorization header.
#[derive(Clone, Debug)]
struct Received {
    target: String,
    authorization: Option<String>,
}

/// A download server on 127.0.0.1:0, plain or TLS, speaking just enough HTTP/1.1.
struct Downloads {
    addr: std::net::SocketAddr,
    tls: bool,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Downloads {
    async fn start(tls: Option<Arc<ServerConfig>>) -> Downloads {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let (r, seen) = (routes.clone(), received.clone());
        let is_tls = tls.is_some();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, seen, tls) = (r.clone(), seen.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => answer(stream, &r, &seen).await,
                        Some(tls) => {
                            if let Ok(s) = tokio_rustls::TlsAcceptor::from(tls).accept(stream).await
                            {
                                answer(s, &r, &seen).await;
                            }
                        }
                    }
                });
            }
        });
        Downloads {
            addr,
            tls: is_tls,
            routes,
            received,
            task,
        }
    }

    fn serve(&self, path: &str, route: Route) {
        self.routes.lock().unwrap().insert(path.to_string(), route);
    }

    fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        // A name for TLS (the test certificate names localhost), the address otherwise.
        let host = if self.tls {
            format!("localhost:{}", self.addr.port())
        } else {
            self.addr.to_string()
        };
        format!("{scheme}://{host}{path}")
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Downloads {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    routes: &Mutex<HashMap<String, Route>>,
    received: &Mutex<Vec<Received>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let authorization = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("authorization")
            .then(|| v.trim().to_string())
    });
    received.lock().unwrap().push(Received {
        target: target.clone(),
        authorization: authorization.clone(),
    });
    let route = routes.lock().unwrap().get(&target).cloned();
    let needed = match &route {
        Some(Route::File { auth, .. } | Route::Redirect { auth, .. }) => auth.clone(),
        None => None,
    };
    let refused = needed.is_some_and(|a| {
        authorization.as_deref() != Some(format!("Basic {}", base64(&a)).as_str())
    });
    let (status, location, body, announce) = match route {
        _ if refused => (
            "401 Unauthorized",
            None,
            b"invalid credentials".to_vec(),
            None,
        ),
        None => ("404 Not Found", None, b"no such file".to_vec(), None),
        Some(Route::Redirect { to, .. }) => ("302 Found", Some(to), Vec::new(), None),
        Some(Route::File { body, announce, .. }) => ("200 OK", None, body, announce),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n",
        announce.unwrap_or(body.len())
    );
    if let Some(to) = location {
        response.push_str(&format!("Location: {to}\r\n"));
    }
    response.push_str("\r\n");
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
}

fn base64(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in s.as_bytes().chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= c.len() {
                char::from(A[(n >> (18 - 6 * i)) as usize & 63])
            } else {
                '='
            });
        }
    }
    out
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `residency-proxy geo update --source SOURCE --out OUT [extra…]`, with `env` set and no
/// licence key inherited from the machine running the tests.
async fn geo_update(source: &str, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_residency-proxy"));
    cmd.args(["geo", "update", "--source", source, "--out"])
        .arg(out)
        .args(extra)
        .env_remove("GEOIPUPDATE_ACCOUNT_ID")
        .env_remove("GEOIPUPDATE_LICENSE_KEY")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// The files in `dir`, to show that a refusal leaves no partial file behind.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn country_db(dir: &Path) -> PathBuf {
    dir.join("country.mmdb")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbip_lite_gzipped_and_plain_databases_are_fetched_and_installed() {
    let server = Downloads::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let out = country_db(dir.path());

    // No file yet: the first download creates it.
    let october = dbip(OCT, &[("1.1.1.0/24", "AU")]);
    server.serve(
        "/free/dbip-country-lite-2026-10.mmdb.gz",
        file(gzip(&october)),
    );
    let run = geo_update(
        &server.url("/free/dbip-country-lite-2026-10.mmdb.gz"),
        &out,
        &[],
        &[],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), october);
    assert!(
        run.stdout
            .contains("updated to DBIP-Country-Lite 2026-10-28 (new file)"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("(gzip)"), "{}", run.stdout);

    // A newer month, not compressed, replaces it.
    let november = dbip(NOV, &[("1.1.1.0/24", "AU"), ("8.8.8.0/24", "US")]);
    server.serve(
        "/free/dbip-country-lite-2026-11.mmdb",
        file(november.clone()),
    );
    let url = server.url("/free/dbip-country-lite-2026-11.mmdb");
    let run = geo_update(&url, &out, &[], &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), november);
    assert_eq!(
        run.stdout.trim(),
        format!(
            "{}: updated to DBIP-Country-Lite 2026-11-25 (was DBIP-Country-Lite 2026-10-28); 2 networks, 2 located; from {url}",
            out.display()
        )
    );
    assert_eq!(names_in(dir.path()), ["country.mmdb"]);

    // The same file again: nothing is written, so no proxy reloads it for nothing.
    let before = std::fs::metadata(&out).unwrap();
    let run = geo_update(&url, &out, &[], &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("already DBIP-Country-Lite 2026-11-25, unchanged"),
        "{}",
        run.stdout
    );
    let after = std::fs::metadata(&out).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (before.ino(), before.mtime_nsec()),
        (after.ino(), after.mtime_nsec())
    );

    // `geo lookup` reads the installed file as the proxy does.
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[policy]\nname = 't'\nhome = 'CN'\n[geo]\ndatabase = '{}'\n[log]\npseudonymize = false\n[[upstreams]]\nname = 'u'\nurl = 'http://127.0.0.1:9000'\n",
            out.display()
        ),
    )
    .unwrap();
    let lookup = std::process::Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
        .args(["geo", "lookup", "8.8.8.8", "--policy"])
        .arg(&policy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&lookup.stdout);
    assert!(
        text.contains("US") && text.contains("DBIP-Country-Lite 2026-11-25"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geolite2_tar_gz_with_an_account_and_licence_key_through_a_redirect() {
    // MaxMind's download answers with a redirect to its storage, which must not see the key.
    let maxmind = Downloads::start(None).await;
    let storage = Downloads::start(None).await;
    let database = geolite2(NOV, &[("8.8.8.0/24", "US"), ("2001:4860::/32", "US")]);
    storage.serve(
        "/geoip-databases/GeoLite2-Country_20261125.tar.gz?X-Amz-Signature=abc",
        file(gzip(&geolite2_tar(&database))),
    );
    let download = "/geoip/databases/GeoLite2-Country/download?suffix=tar.gz";
    maxmind.serve(
        download,
        Route::Redirect {
            to: storage
                .url("/geoip-databases/GeoLite2-Country_20261125.tar.gz?X-Amz-Signature=abc"),
            auth: Some("123456:k3y".into()),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let out = country_db(dir.path());
    let url = maxmind.url(download);

    // Without the key the answer is 401, said as such (exit 2: nothing was checked).
    let run = geo_update(&url, &out, &[], &[]).await;
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(
        run.stderr
            .contains("answered 401 Unauthorized: it needs an account id and licence key"),
        "{}",
        run.stderr
    );
    let run = geo_update(
        &url,
        &out,
        &[],
        &[
            ("GEOIPUPDATE_ACCOUNT_ID", "123456"),
            ("GEOIPUPDATE_LICENSE_KEY", "wrong"),
        ],
    )
    .await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("the account id and licence key were refused"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("wrong"),
        "the key is shown: {}",
        run.stderr
    );
    assert!(!out.exists());

    // With the key, the redirect is followed, without the key.
    let run = geo_update(
        &url,
        &out,
        &["--account-id", "123456"],
        &[("GEOIPUPDATE_LICENSE_KEY", "k3y")],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), database);
    assert!(
        run.stdout
            .contains("(gzip, tar member GeoLite2-Country_20261125/GeoLite2-Country.mmdb)"),
        "{}",
        run.stdout
    );
    let sent = maxmind.received().last().unwrap().clone();
    assert_eq!(
        sent.authorization.as_deref(),
        Some(format!("Basic {}", base64("123456:k3y")).as_str())
    );
    let followed = storage.received();
    assert_eq!(followed.len(), 1, "{followed:?}");
    assert_eq!(
        followed[0].target, "/geoip-databases/GeoLite2-Country_20261125.tar.gz?X-Amz-Signature=abc",
        "the signed URL, query and all"
    );
    assert_eq!(sent.target, download);
    assert_eq!(
        followed[0].authorization, None,
        "the key went to the storage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_licence_key_is_not_sent_over_plain_http_to_another_host_and_https_is_verified() {
    let pki = Pki::new();
    let tls = pki.upstream_config("downloads", &["localhost"], H1_ONLY, false);
    let server = Downloads::start(Some(tls)).await;
    let database = geolite2(NOV, &[("8.8.8.0/24", "US")]);
    server.serve("/GeoLite2-Country.mmdb", file(database.clone()));
    let dir = tempfile::tempdir().unwrap();
    let out = country_db(dir.path());
    let url = server.url("/GeoLite2-Country.mmdb");

    // A certificate nobody vouches for is refused.
    let run = geo_update(&url, &out, &[], &[]).await;
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(run.stderr.contains("TLS with localhost"), "{}", run.stderr);
    assert!(!out.exists());

    // Trusting the CA (as a host's trust store would), it is fetched.
    let ca = pki.path("ca.crt");
    let run = geo_update(&url, &out, &[], &[("SSL_CERT_FILE", ca.to_str().unwrap())]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), database);

    // A key is never sent in the clear (loopback aside, for a local mirror).
    let run = geo_update(
        "http://downloads.example:8080/GeoLite2-Country.mmdb",
        &out,
        &["--account-id", "1", "--license-key", "k"],
        &[],
    )
    .await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("not sent over plain http"),
        "{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_broken_and_older_downloads_are_refused_and_the_file_is_untouched() {
    let server = Downloads::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let out = country_db(dir.path());
    let current = geolite2(NOV, &[("8.8.8.0/24", "US")]);
    std::fs::write(&out, &current).unwrap();
    let installed = std::fs::metadata(&out).unwrap();

    let newer = geolite2(NOV + 7 * 86_400, &[("8.8.8.0/24", "DE")]);
    let older = geolite2(OCT, &[("8.8.8.0/24", "DE")]);
    let gz = gzip(&newer);
    let cases: [(&str, Route, &str); 6] = [
        (
            "/truncated.mmdb",
            file(newer[..newer.len() * 2 / 3].to_vec()),
            "is not a MaxMind DB",
        ),
        (
            "/cut.mmdb",
            Route::File {
                body: newer[..newer.len() / 2].to_vec(),
                announce: Some(newer.len()),
                auth: None,
            },
            &format!("ended after {} of {} bytes", newer.len() / 2, newer.len()),
        ),
        (
            "/truncated.mmdb.gz",
            file(gz[..gz.len() - 10].to_vec()),
            "is not a complete gzip stream",
        ),
        (
            "/error-page",
            file(b"<html><body>Rate limit exceeded</body></html>".to_vec()),
            "is not a MaxMind DB",
        ),
        (
            "/asn.mmdb",
            file({
                let mut w = Writer::builder("GeoLite2-ASN")
                    .build_epoch(UNIX_EPOCH + Duration::from_secs(NOV + 86_400))
                    .build();
                w.insert_value(
                    "8.8.8.0/24".parse::<ipnet::IpNet>().unwrap(),
                    Value::map([("autonomous_system_number", Value::from(15169u32))]),
                )
                .unwrap();
                w.to_bytes().unwrap()
            }),
            "is it a Country or City database?",
        ),
        (
            "/older.mmdb",
            file(older),
            "is GeoLite2-Country 2026-10-28, older than",
        ),
    ];
    for (path, route, why) in cases {
        server.serve(path, route);
        let url = server.url(path);
        let run = geo_update(&url, &out, &[], &[]).await;
        assert_eq!(run.code, 1, "{path}: {}{}", run.stdout, run.stderr);
        assert!(run.stdout.is_empty(), "{path}: {}", run.stdout);
        let said = run.stderr.trim();
        assert_eq!(said.lines().count(), 1, "{path}: one sentence: {said}");
        assert!(said.starts_with("geo update: refused: "), "{path}: {said}");
        assert!(said.contains(why), "{path}: {said}");
        assert!(
            said.ends_with(&format!("{} is unchanged", out.display())),
            "{path}: {said}"
        );
        // The current file, byte for byte and inode for inode; nothing left beside it.
        assert_eq!(std::fs::read(&out).unwrap(), current, "{path}");
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::metadata(&out).unwrap();
        assert_eq!(
            (now.ino(), now.mtime_nsec()),
            (installed.ino(), installed.mtime_nsec()),
            "{path}"
        );
        assert_eq!(names_in(dir.path()), ["country.mmdb"], "{path}");
    }

    // A source that does not answer is not a refusal: exit 2, the file kept too.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = format!("http://{}/x.mmdb", closed.local_addr().unwrap());
    drop(closed);
    let run = geo_update(&gone, &out, &[], &[]).await;
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(
        run.stderr.starts_with("error: cannot download"),
        "{}",
        run.stderr
    );
    let run = geo_update(&server.url("/missing.mmdb"), &out, &[], &[]).await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("answered 404 Not Found"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read(&out).unwrap(), current);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_proxy_decides_by_the_database_geo_update_installs() {
    // Only the database places the store: at home (CN) in the current month's file, abroad
    // (US) in the next one.
    let store_ip = "127.0.0.5";
    let store = Upstream::start(store_ip, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("geo").join("country.mmdb");
    std::fs::create_dir(db.parent().unwrap()).unwrap();
    std::fs::write(&db, geolite2(OCT, &[("127.0.0.5/32", "CN")])).unwrap();
    let proxy = PolicySpec::new()
        .network("127.0.0.10/32", "CN")
        .upstream("store", &store.url())
        .toml(&format!("[geo]\ndatabase = '{}'\n", db.display()))
        .toml(&payments_dataset("store", "consent", "allow"))
        .start_in(dir)
        .await;
    let get = || client::get(APP, proxy.addr, "/payments/u1/a.json", &[]);
    assert_eq!(get().await.status, 200);

    let server = Downloads::start(None).await;
    server.serve(
        "/country.mmdb.gz",
        file(gzip(&geolite2(NOV, &[("127.0.0.5/32", "US")]))),
    );
    let run = geo_update(&server.url("/country.mmdb.gz"), &db, &[], &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);

    // The proxy examines the file every second and reloads once it has held still for one
    // more: well within 15 s it decides by the new database, and no request in between
    // saw anything but a whole database.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let refused = loop {
        let r = get().await;
        if r.status == 451 {
            break r;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy still locates by the old database"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.json()["error"], "upstream_outside_jurisdiction");
    let id = refused.decision_id();
    assert_eq!(
        proxy.log.decision(&id)["geo_db"],
        "GeoLite2-Country 2026-11-25"
    );
    let reached = store.requests();
    assert_eq!(get().await.status, 451);
    assert_eq!(
        store.requests(),
        reached,
        "a request reached the store abroad"
    );
}
