//! A sidecar's bundle source, against a `file:` URL and a real S3-compatible server (moto):
//! the first bundle goes live, a new one within `poll_interval`; each bad bundle (unsigned,
//! another key, a changed byte, truncated, an older revision, one that does not compile) is
//! refused with its reason while the live one keeps serving; a bundle built to allow rollback
//! replaces a newer one; a restart while the source is unreachable comes up on the bundle kept
//! on the volume; a source abroad is refused, at start-up and when first fetched.

use crate::support::s3::S3Server;
use object_store::ObjectStoreExt;
use residency_proxy::audit::keys::SigningKey;
use residency_proxy::bundle::build::{BuildOptions, build};
use residency_proxy::bundle::format::{self, FileEntry, Manifest};
use residency_proxy::bundle::source::{Compile, Source, SourceError, SourceHandle, Status};
use residency_proxy::bundle::{Reason, keep};
use residency_proxy::policy::compile::{PolicyFile, Sidecar, load_file, merge};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where the store listens: located at home (CN) by the bundle's policy.
const STORE_IP: &str = "127.0.0.44";
/// Located abroad (US) by the bundle's policy.
const ABROAD_IP: &str = "127.0.0.45";
const POLL: Duration = Duration::from_secs(1);

/// The bundle's policy: `name` (a new revision may change it), home CN, the two store
/// addresses located, one upstream.
fn rules(name: &str) -> String {
    format!(
        "[policy]\nname = '{name}'\nhome = 'CN'\n\n[[networks]]\ncidr = '{STORE_IP}/32'\ncountry = 'CN'\n\n[[networks]]\ncidr = '{ABROAD_IP}/32'\ncountry = 'US'\n\n[[upstreams]]\nname = 'cn-store'\nurl = 'http://127.0.0.2:9000'\n"
    )
}

/// A sidecar's folder: its signing key and public key, and the bundle's policy in `rules/`.
struct Fleet {
    dir: tempfile::TempDir,
    key: SigningKey,
}

impl Fleet {
    fn new() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let pem = SigningKey::generate_pem();
        std::fs::write(dir.path().join("policy-signing.key"), &pem).unwrap();
        let key = SigningKey::load(&dir.path().join("policy-signing.key")).unwrap();
        std::fs::write(dir.path().join("policy-signing.pub"), key.public_pem()).unwrap();
        std::fs::create_dir_all(dir.path().join("rules")).unwrap();
        Fleet { dir, key }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `bundle build` of a policy named `name` as `revision`.
    fn bundle(&self, name: &str, revision: u64, allow_rollback: bool) -> Vec<u8> {
        self.bundle_by(&self.key, name, revision, allow_rollback)
    }

    fn bundle_by(
        &self,
        key: &SigningKey,
        name: &str,
        revision: u64,
        allow_rollback: bool,
    ) -> Vec<u8> {
        let policy = self.path("rules/cn.toml");
        std::fs::write(&policy, rules(name)).unwrap();
        build(&BuildOptions {
            policy: &policy,
            geo: None,
            signing_key: key,
            revision,
            built_at: jiff::Timestamp::now(),
            builder: "ci@build".into(),
            allow_rollback,
        })
        .unwrap()
        .bytes
    }

    /// A signed bundle whose policy does not compile (made without `bundle build`).
    fn broken(&self, revision: u64) -> Vec<u8> {
        let text = rules("cn").replace("home = 'CN'", "home = 'Mars'");
        let manifest = Manifest {
            format: format::FORMAT,
            revision,
            built_at: jiff::Timestamp::now(),
            builder: "hand@made".into(),
            allow_rollback: false,
            signer: self.key.fingerprint(),
            policy: "cn.toml".into(),
            geo: None,
            files: vec![FileEntry {
                path: "cn.toml".into(),
                size: text.len() as u64,
                sha256: format::sha256_hex(text.as_bytes()),
            }],
        };
        let bytes = manifest.to_bytes();
        format::encode(&bytes, Some(&self.key.sign(&bytes)), &[text.as_bytes()])
    }

    /// The sidecar's own file with `source` (the keys of `[policy.source]` but `key`, `cache`
    /// and `poll_interval`), compiled.
    fn sidecar(&self, source: &str) -> Sidecar {
        let text = format!(
            "[policy.source]\n{source}\nkey = '{}'\ncache = '{}'\npoll_interval = '1s'\n\n[log]\npath = '{}'\npseudonymize = false\n",
            self.path("policy-signing.pub").display(),
            self.path("kept/policy.bundle").display(),
            self.path("logs/decisions.jsonl").display(),
        );
        let path = self.path("sidecar.toml");
        std::fs::write(&path, text).unwrap();
        match load_file(&path, |p| std::fs::read_to_string(p)).unwrap() {
            PolicyFile::Sidecar(s) => *s,
            PolicyFile::Whole(_) => panic!("not a sidecar's file"),
        }
    }
}

/// What the proxy will hand the source: its own file merged with each bundle.
fn compile(sidecar: &Sidecar) -> Compile {
    let sidecar = sidecar.clone();
    Arc::new(move |b| merge(&sidecar, &b.rules()))
}

async fn start(sidecar: &Sidecar) -> SourceHandle {
    Source::open(sidecar.source.clone(), compile(sidecar))
        .await
        .unwrap()
        .start()
}

fn live_revision(h: &SourceHandle) -> Option<u64> {
    h.bundles.borrow().as_ref().map(|b| b.revision())
}

/// Waits, at most `poll_interval` + 2 s (what a fleet must reach), for revision `rev` to go
/// live.
async fn live_within_a_poll(h: &mut SourceHandle, rev: u64) {
    let deadline = tokio::time::Instant::now() + POLL + Duration::from_secs(2);
    while live_revision(h) != Some(rev) {
        tokio::time::timeout_at(deadline, h.bundles.changed())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "revision {rev} not live within poll_interval + 2 s: {:?}",
                    h.status()
                )
            })
            .unwrap();
    }
}

/// Waits (at most 10 s) until the status satisfies `cond`.
async fn status_until(h: &SourceHandle, what: &str, cond: impl Fn(&Status) -> bool) -> Status {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = h.status();
        if cond(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the source has answered two more polls than at `before`.
async fn two_more_polls(h: &SourceHandle, before: &Status) -> Status {
    let then = before.last_poll.expect("polled before");
    status_until(h, "two more polls", |s| {
        s.last_poll.unwrap() > then + POLL + Duration::from_millis(500)
    })
    .await
}

/// Publishes `bundle` at `path`, replacing what is there whole (as a deploy job would).
fn publish(path: &Path, bundle: &[u8]) {
    keep::write_atomic(path, bundle).unwrap();
}

/// Publishes a bad bundle and waits for its refusal: the reason, once, and the live revision
/// unchanged.
async fn refused(
    h: &SourceHandle,
    publish_it: impl AsyncFnOnce(),
    reason: Reason,
    says: &str,
    live: u64,
) {
    let before = h.status().failures.get(&reason).copied().unwrap_or(0);
    publish_it().await;
    let s = status_until(h, reason.as_str(), |s| {
        s.failures.get(&reason).copied().unwrap_or(0) > before
    })
    .await;
    let refusal = s.refused.as_ref().expect("the refused bundle is shown");
    assert_eq!(refusal.reason, reason, "{s:?}");
    assert!(
        refusal.message.contains(says),
        "{reason}: {}",
        refusal.message
    );
    assert_eq!(s.live.as_ref().map(|l| l.revision), Some(live), "{s:?}");
    assert_eq!(live_revision(h), Some(live));
}

/// A bundle that went live but could not be kept on the volume (here its place is taken by a
/// folder) is kept at a later poll once it can be, although the source has not changed: the
/// source's unchanged answer must not hide a bundle the sidecar has not settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_bundle_that_could_not_be_kept_is_kept_once_the_volume_allows() {
    let fleet = Fleet::new();
    let published = fleet.path("published/cn.bundle");
    publish(&published, &fleet.bundle("cn", 1, false));
    let kept = fleet.path("kept/policy.bundle");
    std::fs::create_dir_all(kept.join("in-the-way")).unwrap();
    let sidecar = fleet.sidecar(&format!("url = 'file:{}'", published.display()));
    let mut h = start(&sidecar).await;
    live_within_a_poll(&mut h, 1).await;
    status_until(&h, "the keep failure", |s| {
        s.failures.get(&Reason::KeepFailed).copied().unwrap_or(0) > 0
    })
    .await;
    std::fs::remove_dir_all(&kept).unwrap();
    let deadline = tokio::time::Instant::now() + POLL + Duration::from_secs(3);
    while std::fs::read(&kept).ok() != Some(std::fs::read(&published).unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the live bundle was never kept: {:?}",
            h.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(live_revision(&h), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_source_takes_new_bundles_refuses_bad_ones_and_restarts_on_the_kept_one() {
    let fleet = Fleet::new();
    let published = fleet.path("published/cn.bundle");
    publish(&published, &fleet.bundle("cn", 1, false));
    let sidecar = fleet.sidecar(&format!("url = 'file:{}'", published.display()));
    let mut h = start(&sidecar).await;
    // Nothing kept: unready until the first poll, which is at once.
    live_within_a_poll(&mut h, 1).await;
    let first = h.bundles.borrow().clone().unwrap();
    assert_eq!(
        first.label,
        PathBuf::from(format!("file:{}", published.display()))
    );
    assert_eq!(merge(&sidecar, &first.rules()).unwrap().name, "cn");

    publish(&published, &fleet.bundle("cn-r2", 2, false));
    live_within_a_poll(&mut h, 2).await;
    // An unchanged file is not read again.
    let before = h.status();
    let after = two_more_polls(&h, &before).await;
    assert_eq!(after.downloads, before.downloads);
    assert_eq!(
        merge(&sidecar, &h.bundles.borrow().as_ref().unwrap().rules())
            .unwrap()
            .name,
        "cn-r2"
    );
    // Kept on the volume as served.
    assert_eq!(
        std::fs::read(fleet.path("kept/policy.bundle")).unwrap(),
        std::fs::read(&published).unwrap()
    );

    let good = fleet.bundle("cn-r3", 3, false);
    let parsed = format::parse(&good).unwrap();
    let contents: Vec<&[u8]> = parsed.files().map(|(_, c)| c).collect();
    let unsigned = format::encode(parsed.manifest_bytes(), None, &contents);
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let truncated = good[..good.len() - 10].to_vec();
    let other =
        SigningKey::from_pem(SigningKey::generate_pem().as_bytes(), Path::new("o")).unwrap();
    let cases = [
        (unsigned, Reason::Unsigned, "no signature"),
        (
            fleet.bundle_by(&other, "cn", 3, false),
            Reason::OtherKey,
            "signed by another key",
        ),
        (
            flipped,
            Reason::Corrupt,
            "file cn.toml does not match its SHA-256",
        ),
        (truncated, Reason::Corrupt, "truncated"),
        (
            fleet.bundle("cn-old", 1, false),
            Reason::OlderRevision,
            "revision 1 is not newer than the live revision 2",
        ),
        (fleet.broken(4), Reason::DoesNotCompile, "\"Mars\""),
    ];
    for (bytes, reason, says) in cases {
        refused(&h, async || publish(&published, &bytes), reason, says, 2).await;
    }
    // A bundle refused stays refused: the next polls neither count nor log it again.
    let after = two_more_polls(&h, &h.status()).await;
    assert_eq!(after.failures.get(&Reason::DoesNotCompile), Some(&1));

    // A good one after the bad ones, then a rollback the bundle allows.
    publish(&published, &fleet.bundle("cn-r5", 5, false));
    live_within_a_poll(&mut h, 5).await;
    assert!(h.status().refused.is_none());
    publish(&published, &fleet.bundle("cn-back", 4, true));
    live_within_a_poll(&mut h, 4).await;
    h.stop();

    // The source goes away; a restart comes up on the kept bundle, and says the source is
    // unreachable.
    std::fs::remove_file(&published).unwrap();
    let h = start(&sidecar).await;
    assert_eq!(live_revision(&h), Some(4), "not up on the kept bundle");
    let s = status_until(&h, "the unreachable source", |s| {
        s.failures.contains_key(&Reason::Unreachable)
    })
    .await;
    let live = s.live.unwrap();
    assert_eq!((live.revision, live.from_kept), (4, true));
    assert!(s.last_poll.is_none());
    assert!(s.last_failure.unwrap().message.contains("cannot read"),);
    h.stop();

    // A kept bundle that no longer verifies (the key was rotated) is not served.
    let rotated =
        SigningKey::from_pem(SigningKey::generate_pem().as_bytes(), Path::new("r")).unwrap();
    std::fs::write(fleet.path("policy-signing.pub"), rotated.public_pem()).unwrap();
    let h = start(&sidecar).await;
    assert_eq!(live_revision(&h), None);
    assert_eq!(h.status().refused.unwrap().reason, Reason::OtherKey);
}

/// An object store location for the tests' own writes.
async fn put(store: &S3Server, url: &str, bytes: &[u8]) {
    let loc = store.location(url);
    loc.store
        .put(&loc.prefix, bytes.to_vec().into())
        .await
        .unwrap();
}

fn s3_source(store: &S3Server, dir: &Path) -> String {
    let creds = S3Server::credentials_file(dir);
    format!(
        "url = 's3://policies/cn-pipl.bundle'\nendpoint = '{}'\nregion = 'cn-north-1'\ncredentials = '{}'",
        store.endpoint(),
        creds.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_source_is_polled_and_a_restart_with_the_store_down_comes_up_on_the_kept_bundle() {
    let mut store = S3Server::start(STORE_IP);
    store.create_bucket("policies");
    let url = "s3://policies/cn-pipl.bundle";
    let fleet = Fleet::new();
    let sidecar = fleet.sidecar(&s3_source(&store, fleet.dir.path()));
    put(&store, url, &fleet.bundle("cn", 1, false)).await;
    let mut h = start(&sidecar).await;
    live_within_a_poll(&mut h, 1).await;

    put(&store, url, &fleet.bundle("cn-r2", 2, false)).await;
    live_within_a_poll(&mut h, 2).await;
    let before = h.status();
    // Unchanged: asked with If-None-Match, answered "not modified", nothing downloaded, and
    // the source still counts as polled.
    let s = two_more_polls(&h, &before).await;
    assert_eq!(s.downloads, before.downloads, "{s:?}");
    assert!(s.failures.is_empty(), "{s:?}");

    let mut flipped = fleet.bundle("cn-r3", 3, false);
    *flipped.last_mut().unwrap() ^= 1;
    refused(
        &h,
        async || put(&store, url, &flipped).await,
        Reason::Corrupt,
        "does not match its SHA-256",
        2,
    )
    .await;

    // The store goes down: the live bundle keeps serving, and the failure is said.
    store.kill();
    let s = status_until(&h, "the store down", |s| {
        s.failures.contains_key(&Reason::Unreachable)
    })
    .await;
    assert_eq!(s.live.unwrap().revision, 2);
    h.stop();
    let h = start(&sidecar).await;
    assert_eq!(live_revision(&h), Some(2), "not up on the kept bundle");
    status_until(&h, "the store still down", |s| {
        s.failures.contains_key(&Reason::Unreachable)
    })
    .await;
    assert!(h.status().live.unwrap().from_kept);
    h.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_abroad_is_refused_at_start_up_and_when_first_fetched() {
    let store = S3Server::start(ABROAD_IP);
    store.create_bucket("policies");
    let url = "s3://policies/cn-pipl.bundle";
    let fleet = Fleet::new();
    let sidecar = fleet.sidecar(&s3_source(&store, fleet.dir.path()));
    let bundle = fleet.bundle("cn", 1, false);

    // Nothing kept: the first bundle is fetched, and its own policy puts the source abroad.
    put(&store, url, &bundle).await;
    let h = start(&sidecar).await;
    let s = status_until(&h, "the source refused", |s| s.refused.is_some()).await;
    let refusal = s.refused.unwrap();
    assert_eq!(refusal.reason, Reason::SourceAbroad);
    assert!(
        refusal.message.contains(&format!(
            "the policy source {ABROAD_IP} resolves to {ABROAD_IP} located in US, outside the home jurisdiction CN"
        )),
        "{}",
        refusal.message
    );
    assert_eq!(live_revision(&h), None);
    assert!(s.live.is_none());
    h.stop();
    assert!(!fleet.path("kept/policy.bundle").exists());

    // Kept from before (the source moved abroad since): refused before anything is fetched.
    publish(&fleet.path("kept/policy.bundle"), &bundle);
    drop(store);
    let err = Source::open(sidecar.source.clone(), compile(&sidecar))
        .await
        .err()
        .expect("a source abroad refuses start-up");
    assert!(matches!(err, SourceError::Abroad(_)), "{err}");
    assert!(err.to_string().contains("located in US"), "{err}");
}
