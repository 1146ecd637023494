//! The invariants of the parsers and the cargo-fuzz targets built on them, shared by the
//! property tests (`tests/suite/properties.rs`, on stable) and `fuzz/` (on nightly), so that
//! both run the same code. Each `check_*` function panics when an input breaks an invariant;
//! each [`Target`] is the whole of one fuzz target, fixture and body.
#![allow(dead_code)]

use http::HeaderMap;
use residency_proxy::audit::LogWriter;
use residency_proxy::audit::read::verify::verify;
use residency_proxy::audit::record::{OutcomeRecord, Record, RequestContext, failure_record};
use residency_proxy::policy::compile::from_str;
use residency_proxy::policy::forwarded::{ClientAddr, client_addr, parse_xff_element};
use residency_proxy::policy::model::LogTarget;
use residency_proxy::policy::net::CidrTable;
use residency_proxy::policy::path::{Ambiguity, normalize, percent_decode};
use residency_proxy::policy::{PolicyError, Reason};
use std::borrow::Cow;
use std::net::IpAddr;
use std::path::Path;

// ---------------------------------------------------------------------------------------
// Path normalisation

/// Whether resolving the literal `.`/`..` segments of `raw` goes above the root. (An
/// escaped dot segment is refused on its own, so literal ones are all that can climb.)
pub fn climbs_above_root(raw: &str) -> bool {
    let mut depth = 0usize;
    for seg in raw[1..].split('/') {
        match seg {
            "" | "." => {}
            ".." if depth == 0 => return true,
            ".." => depth -= 1,
            _ => depth += 1,
        }
    }
    false
}

/// RFC 3986 dot-segment removal plus `//` collapsing, for paths without escapes.
fn resolve_plain(raw: &str) -> String {
    let segs: Vec<&str> = raw[1..].split('/').collect();
    let mut out: Vec<&str> = Vec::new();
    for s in &segs {
        match *s {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let trailing = matches!(segs.last(), Some(&("" | "." | "..")));
    let mut n: String = out.iter().map(|s| format!("/{s}")).collect();
    if trailing || out.is_empty() {
        n.push('/');
    }
    n
}

/// The escapes a normal path keeps: `%`, `?`, `#`, space and control characters.
fn stays_escaped(b: u8) -> bool {
    b <= 0x20 || b == 0x7F || matches!(b, b'%' | b'?' | b'#')
}

/// Every invariant of a path that `normalize` accepted as `n`.
fn assert_normal(raw: &str, n: &str) {
    assert!(n.starts_with('/'), "{raw:?} -> {n:?}: not absolute");
    assert!(!n.contains("//"), "{raw:?} -> {n:?}: contains //");
    assert!(
        n.split('/').skip(1).all(|s| s != "." && s != ".."),
        "{raw:?} -> {n:?}: keeps a dot segment"
    );
    assert!(
        !n.contains(['\\', '\0']),
        "{raw:?} -> {n:?}: backslash or NUL"
    );
    let b = n.as_bytes();
    for (i, _) in n.match_indices('%') {
        let esc = &b[i + 1..(i + 3).min(b.len())];
        assert!(
            esc.len() == 2
                && esc
                    .iter()
                    .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c)),
            "{raw:?} -> {n:?}: escape at {i} is not two upper-case hex digits"
        );
        let v = u8::from_str_radix(std::str::from_utf8(esc).unwrap(), 16).unwrap();
        assert!(
            stays_escaped(v) && !matches!(v, b'/' | b'\\' | 0),
            "{raw:?} -> {n:?}: %{v:02X} should have been decoded or refused"
        );
    }
    assert!(
        percent_decode(n).is_some(),
        "{raw:?} -> {n:?}: decodes to invalid UTF-8"
    );
    assert!(
        !climbs_above_root(raw),
        "{raw:?} climbs above / but was accepted"
    );
    match normalize(n) {
        Ok(Cow::Borrowed(again)) => assert_eq!(again, n, "{raw:?}: not idempotent"),
        other => panic!("{raw:?} -> {n:?}: normalising again gave {other:?}"),
    }
}

/// Normalises `raw` and checks the result; true when it was accepted.
pub fn check_normalize(raw: &str) -> bool {
    let result = normalize(raw);
    if let Ok(n) = &result {
        assert_normal(raw, n);
        if let Cow::Borrowed(b) = n {
            assert_eq!(*b, raw, "a borrowed result must be the input itself");
        }
    }
    if !raw.starts_with('/') {
        assert_eq!(result, Err(Ambiguity::NotAbsolute), "{raw:?}");
        return false;
    }
    let climbs = climbs_above_root(raw);
    if climbs {
        assert!(
            result.is_err(),
            "{raw:?} climbs above / but gave {result:?}"
        );
    }
    if result == Err(Ambiguity::AboveRoot) {
        assert!(climbs, "{raw:?} refused as above root");
    }
    if !raw.contains(['%', '\\', '\0']) && !climbs {
        assert_eq!(
            result.as_deref(),
            Ok(resolve_plain(raw).as_str()),
            "{raw:?}"
        );
    }
    result.is_ok()
}

// ---------------------------------------------------------------------------------------
// Forwarding headers

/// The trusted proxies the forwarding checks use.
pub fn trusted_proxies() -> CidrTable<()> {
    let mut trusted = CidrTable::new();
    trusted.insert("10.0.0.0/8".parse().unwrap(), ());
    trusted.insert("2001:db8:ffff::/48".parse().unwrap(), ());
    trusted
}

/// Socket peers: trusted and not, IPv4, IPv6 and IPv4-mapped IPv6.
pub const PEERS: &[&str] = &[
    "10.0.0.1",
    "::ffff:10.0.0.1",
    "2001:db8:ffff::1",
    "198.51.100.7",
    "::ffff:198.51.100.7",
    "2001:db8::7",
];

/// Finds the client for `peer` and `headers` and checks the answer; true when the client
/// came from a forwarding header.
pub fn check_client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &CidrTable<()>) -> bool {
    let canonical = peer.to_canonical();
    let result = client_addr(peer, headers, trusted);
    // Every element on its own, whatever the peer.
    for v in headers.values() {
        for e in String::from_utf8_lossy(v.as_bytes()).split([',', ';', '=']) {
            if let Some(ip) = parse_xff_element(e) {
                assert_eq!(ip, ip.to_canonical(), "{e:?}");
            }
        }
    }
    if !trusted.contains(canonical) {
        assert_eq!(
            result,
            Ok(ClientAddr {
                ip: canonical,
                via: None
            }),
            "untrusted {peer} with {headers:?}"
        );
        return false;
    }
    let Ok(c) = result else { return false };
    assert_eq!(c.via, (c.ip != canonical).then_some(canonical), "{c:?}");
    if !headers.contains_key("x-forwarded-for") && !headers.contains_key("forwarded") {
        assert_eq!(c.ip, canonical, "no forwarding header, yet {c:?}");
    }
    c.via.is_some()
}

// ---------------------------------------------------------------------------------------
// Policy parsing

/// Compiles `text` and checks its diagnostics; true when it got past TOML and serde (it
/// compiled, or every diagnostic names a rule).
pub fn check_policy(text: &str) -> bool {
    match from_str("p.toml", text) {
        Ok(_) => true,
        Err(PolicyError::Invalid(diags)) => {
            assert!(!diags.is_empty(), "Invalid with no diagnostic: {text:?}");
            let lines = text.lines().count() + 1;
            for d in &diags {
                assert!(
                    !d.message.trim().is_empty(),
                    "empty message {d:?} in {text:?}"
                );
                if let Some(l) = d.line {
                    assert!(
                        (1..=lines).contains(&l),
                        "line {l} of {lines}: {d} in {text:?}"
                    );
                }
            }
            diags.iter().all(|d| !d.rule.is_empty())
        }
        Err(e @ PolicyError::Read { .. }) => panic!("from_str cannot fail to read: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// Log verification

/// Replaces `scratch` with `bytes`. Removed first rather than truncated: ext4 flushes a
/// file truncated to zero when it is closed, which would make each check wait for the disk.
fn rewrite(scratch: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(scratch);
    std::fs::write(scratch, bytes).unwrap();
}

/// Verifies `bytes` written to `scratch`; it may fail, but must not panic.
pub fn check_verify_any(bytes: &[u8], scratch: &Path) {
    rewrite(scratch, bytes);
    let _ = verify(scratch);
}

/// Writes a log to `path` through the real writer, and returns how many records it holds:
/// decision records whose strings need escapes, and outcome records whose durations have
/// more than one JSON spelling.
pub fn write_log(path: &Path) -> u64 {
    // Built as `serve` builds its runtime: the writer starts a checkpoint timer, which panics
    // (inside a task, where only a panic hook sees it) on a runtime without timers.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let policy = from_str(
            "t.toml",
            "[policy]\nname='t'\nhome='CN'\n[log]\npseudonymize=false\n",
        )
        .unwrap();
        let mut settings = policy.log.clone();
        settings.target = LogTarget::File(path.into());
        // A tick would add a checkpoint wherever it fell; none falls within a day, so the
        // log has the same records however slowly the machine writes it.
        settings.checkpoint_interval = std::time::Duration::from_secs(86_400);
        // Not the host's name: every record carries it, and a crash input names a position,
        // which must land on the same field on any machine.
        settings.instance = "fuzz".into();
        let writer = LogWriter::open(&settings, None).unwrap();
        let headers = HeaderMap::new();
        let mut written = 0;
        let paths = ["/p/\"q\"/back\\slash/é/漢", "/ctl/\u{1}\u{1f}/tab\t"];
        for (i, path) in paths.iter().enumerate() {
            let cx = RequestContext {
                id: format!("r{i}").as_str().into(),
                ts: jiff::Timestamp::UNIX_EPOCH,
                method: &http::Method::GET,
                host: Some("store.example"),
                raw_path: path,
                query: None,
                headers: &headers,
                peer: "2001:db8::9".parse().unwrap(),
            };
            let rec = failure_record(&policy, &cx, Reason::NoRoute, "policy.unmatched");
            writer
                .append(Record::Decision(Box::new(rec)))
                .await
                .unwrap();
            written += 1;
        }
        for (i, duration_ms) in [0.0, 12.0, 1e-7].into_iter().enumerate() {
            let outcome = OutcomeRecord {
                instance: None,
                bytes_in: i as u64,
                bytes_out: u64::MAX - i as u64,
                complete: i % 2 == 0,
                detail: None,
                duration_ms,
                error: None,
                id: format!("r{i}").as_str().into(),
                kind: "outcome",
                prev: Default::default(),
                records: None,
                seq: 0,
                status: 404,
                ts: residency_proxy::audit::record::Stamp(jiff::Timestamp::UNIX_EPOCH),
                upstream: None,
                v: 1,
            };
            writer.append(Record::Outcome(outcome)).await.unwrap();
            written += 1;
        }
        writer.close().await;
        written
    })
}

/// Writes `log` with byte `at` replaced by `byte` to `scratch` and checks that it does not
/// verify, unless the bytes are unchanged.
pub fn check_mutation_fails(log: &[u8], at: usize, byte: u8, scratch: &Path) {
    if log[at] == byte {
        return;
    }
    let mut bytes = log.to_vec();
    bytes[at] = byte;
    // Verification stops at the first broken line, so the lines after the changed one
    // cannot make it pass: leave them out to keep the check fast.
    if let Some(end) = bytes[at..].iter().position(|c| *c == b'\n') {
        bytes.truncate(at + end + 1);
    }
    rewrite(scratch, &bytes);
    if let Ok(report) = verify(scratch) {
        let line = log[..at].iter().filter(|c| **c == b'\n').count() + 1;
        panic!(
            "byte {at} (line {line}) changed from {:?} to {:?} and the log still verifies ({report:?})",
            log[at] as char, byte as char
        );
    }
}

// ---------------------------------------------------------------------------------------
// The fuzz targets

/// One cargo-fuzz target whole: the fixture it builds once (`new`) and the body it runs on
/// every input (`run`). A file in `fuzz/fuzz_targets/` only hands libFuzzer's inputs to
/// `run`, and `tests/suite/properties.rs` runs every target on its `seeds` and on generated
/// inputs, so a fixture that stops working fails `cargo test` on stable.
pub trait Target: Sized + Send + Sync + 'static {
    /// Its `[[bin]]` name in `fuzz/Cargo.toml`, and its file in `fuzz/fuzz_targets/`.
    const NAME: &'static str;
    /// Builds the fixture: what every input is checked against.
    fn new() -> Self;
    /// Checks one input; panics when it breaks an invariant.
    fn run(&self, data: &[u8]);
    /// Inputs that reach the interesting side of the body, in the shape `run` reads.
    fn seeds() -> Vec<Vec<u8>>;
}

/// Request paths: any bytes, read as UTF-8 with replacement.
pub struct NormalizePath;

impl Target for NormalizePath {
    const NAME: &'static str = "normalize_path";

    fn new() -> Self {
        NormalizePath
    }

    fn run(&self, data: &[u8]) {
        check_normalize(&String::from_utf8_lossy(data));
    }

    fn seeds() -> Vec<Vec<u8>> {
        let paths: &[&[u8]] = &[
            b"/payments/u123/statement.pdf",
            b"/a/./b/../c//d/",
            b"/a/../../etc/passwd",
            b"/%2e%2E/x",
            b"/a%2Fb%5cc%00",
            b"/%c3%a9/%7E/%41",
            b"/\xff\xfe/\\x",
            b"relative/path",
            b"",
        ];
        paths.iter().map(|p| p.to_vec()).collect()
    }
}

/// Forwarding headers. Input: a byte choosing the socket peer from [`PEERS`], then lines
/// of a byte choosing the header name followed by the header's value.
pub struct Forwarded {
    trusted: CidrTable<()>,
    peers: Vec<IpAddr>,
}

impl Forwarded {
    const NAMES: [&'static str; 3] = ["x-forwarded-for", "forwarded", "x-real-ip"];
}

impl Target for Forwarded {
    const NAME: &'static str = "forwarded";

    fn new() -> Self {
        Forwarded {
            trusted: trusted_proxies(),
            peers: PEERS.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    fn run(&self, data: &[u8]) {
        let Some((&pick, rest)) = data.split_first() else {
            return;
        };
        let mut headers = HeaderMap::new();
        for line in rest.split(|b| *b == b'\n') {
            let Some((&name, value)) = line.split_first() else {
                continue;
            };
            parse_xff_element(&String::from_utf8_lossy(value));
            if let Ok(v) = http::HeaderValue::from_bytes(value) {
                let name = Self::NAMES[usize::from(name) % Self::NAMES.len()];
                headers.append(http::HeaderName::from_static(name), v);
            }
        }
        let peer = self.peers[usize::from(pick) % self.peers.len()];
        check_client_addr(peer, &headers, &self.trusted);
    }

    fn seeds() -> Vec<Vec<u8>> {
        let headers: &[&[u8]] = &[
            b"\x00203.0.113.9, 10.2.2.2",
            b"\x01for=\"[2001:db8::1]:4711\";proto=https, for=10.0.0.9",
            b"\x02198.51.100.7",
            b"\x00::ffff:10.1.1.1\n\x01For=unknown\n\x02 1.1.1.1",
            b"\x00not an address, [::1]:99999",
        ];
        // Each header set from every peer, trusted and not.
        (0..PEERS.len() as u8)
            .flat_map(|peer| {
                headers.iter().map(move |h| {
                    let mut input = vec![peer];
                    input.extend_from_slice(h);
                    input
                })
            })
            .collect()
    }
}

/// Policy files: any text. The shipped policies are the seeds.
pub struct Policy;

impl Target for Policy {
    const NAME: &'static str = "policy";

    fn new() -> Self {
        Policy
    }

    fn run(&self, data: &[u8]) {
        check_policy(&String::from_utf8_lossy(data));
    }

    fn seeds() -> Vec<Vec<u8>> {
        let shipped = [
            include_str!("../../policies/demo.toml"),
            include_str!("../../policies/template.toml"),
            include_str!("../../policies/cn-pipl.toml"),
            include_str!("../../policies/eu-gdpr.toml"),
            include_str!("../../policies/vn-decree53.toml"),
        ];
        let mut seeds: Vec<Vec<u8>> = shipped.iter().map(|p| p.as_bytes().to_vec()).collect();
        seeds.push(b"[policy]\nname = 'x'\nhome = 'UK'\n".to_vec());
        seeds.push(b"[log]\ncheckpoint_every = -1\n[[datasets]]\nname = 7\n".to_vec());
        seeds
    }
}

/// Bulk objects filtered record by record: the first byte picks the format (JSON lines or
/// CSV), the subject field and the compression; the rest is the object. The invariants are
/// `residency_proxy::bulk::fuzz_one`'s: every byte accounted for, output = kept records in
/// order, chunking changes nothing, keeping everything gives the input back, recompressed
/// output decompresses to the same bytes, memory within its bound.
pub struct BulkRecords;

impl Target for BulkRecords {
    const NAME: &'static str = "bulk_records";

    fn new() -> Self {
        BulkRecords
    }

    fn run(&self, data: &[u8]) {
        residency_proxy::bulk::fuzz_bytes(data);
    }

    fn seeds() -> Vec<Vec<u8>> {
        let with = |sel: u8, body: &str| {
            let mut v = vec![sel];
            v.extend_from_slice(body.as_bytes());
            v
        };
        vec![
            with(
                0,
                "{\"id\":\"u1\",\"a\":1}\n{\"id\":7}\n\n{\"x\":\"no subject\"}\nnot json\n{\"id\":\"u\\u0031\"}",
            ),
            with(2, "{\"id\":\"u1\",\"id\":\"u2\"}\r\n{\"id\":null}\n"),
            with(
                1,
                "id,name\r\nu1,\"Ann, \"\"A\"\"\"\r\nu2,\"multi\nline\"\r\n,empty\r\nu3,\"open\n",
            ),
            with(3, "\u{feff}name,id\nBob,u9\nstray\"quote,u8\n"),
            with(16, "{\"id\":\"u1\"}\n"),
            with(33, "id\nu1\nu2\n"),
        ]
    }
}

/// Decision logs: any file contents.
pub struct VerifyLog {
    dir: tempfile::TempDir,
}

impl Target for VerifyLog {
    const NAME: &'static str = "verify_log";

    fn new() -> Self {
        VerifyLog {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn run(&self, data: &[u8]) {
        check_verify_any(data, &self.dir.path().join("any.jsonl"));
    }

    fn seeds() -> Vec<Vec<u8>> {
        let zeros = "0".repeat(64);
        let written = VerifyMutation::new().log;
        vec![
            Vec::new(),
            b"{}\n".to_vec(),
            format!("{{\"seq\":1,\"prev\":\"{zeros}\",\"hash\":\"{zeros}\"}}\n").into_bytes(),
            written[..written.len() / 2].to_vec(),
            written,
        ]
    }
}

/// Decision logs: a log written by the real writer (see [`write_log`]) with one byte
/// changed. Input: two bytes of position, modulo the log's length, and the new byte.
pub struct VerifyMutation {
    dir: tempfile::TempDir,
    /// The log as written; it verifies.
    pub log: Vec<u8>,
}

impl VerifyMutation {
    /// Checks that the log with byte `at` replaced by `byte` does not verify.
    pub fn check(&self, at: usize, byte: u8) {
        check_mutation_fails(&self.log, at, byte, &self.dir.path().join("mutated.jsonl"));
    }
}

impl Target for VerifyMutation {
    const NAME: &'static str = "verify_mutation";

    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("written.jsonl");
        let written = write_log(&path);
        // Every change to a log that does not verify in the first place "fails": the
        // target would pass whatever the verifier did.
        match verify(&path) {
            Ok(report) => assert_eq!(report.records, written, "{report:?}"),
            Err(e) => panic!("the log the fixture wrote does not verify: {e}"),
        }
        let log = std::fs::read(&path).unwrap();
        assert!(
            log.len() <= usize::from(u16::MAX),
            "two bytes of position no longer reach the whole log"
        );
        VerifyMutation { dir, log }
    }

    fn run(&self, data: &[u8]) {
        let [hi, lo, byte, ..] = *data else {
            return;
        };
        self.check(
            usize::from(u16::from_be_bytes([hi, lo])) % self.log.len(),
            byte,
        );
    }

    fn seeds() -> Vec<Vec<u8>> {
        // The first byte, positions spread over the log, and the last byte (modulo wraps).
        vec![
            vec![0, 0, b'x'],
            vec![0, 40, b'0'],
            vec![1, 0, b'E'],
            vec![2, 17, b' '],
            vec![0xff, 0xff, b'\n'],
        ]
    }
}

// ---------------------------------------------------------------------------------------
// Signed policy bundles

/// The key the bundles of the fixture and of its seeds are signed with (one per process).
fn bundle_key() -> &'static residency_proxy::audit::keys::SigningKey {
    use residency_proxy::audit::keys::SigningKey;
    static KEY: std::sync::OnceLock<SigningKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        SigningKey::from_pem(SigningKey::generate_pem().as_bytes(), Path::new("fuzz.key")).unwrap()
    })
}

/// A bundle of `files` (the first is the policy; `geo` names the database among them),
/// signed by the fixture's key or, with `signed` off, unsigned.
pub fn make_bundle(signed: bool, files: &[(&str, &[u8])], geo: Option<&str>) -> Vec<u8> {
    use residency_proxy::bundle::format::{FORMAT, FileEntry, Manifest, encode, sha256_hex};
    let key = bundle_key();
    let manifest = Manifest {
        format: FORMAT,
        revision: 1_765_000_000,
        built_at: "2026-12-01T10:00:00Z".parse().unwrap(),
        builder: "fuzz@localhost".into(),
        allow_rollback: false,
        signer: key.fingerprint(),
        policy: files[0].0.into(),
        geo: geo.map(Into::into),
        files: files
            .iter()
            .map(|(path, bytes)| FileEntry {
                path: (*path).into(),
                size: bytes.len() as u64,
                sha256: sha256_hex(bytes),
            })
            .collect(),
    };
    let bytes = manifest.to_bytes();
    let signature = key.sign(&bytes);
    let contents: Vec<&[u8]> = files.iter().map(|(_, b)| *b).collect();
    encode(&bytes, signed.then_some(&signature[..]), &contents)
}

/// The signed bundles of the seeds: the only inputs that may verify.
fn signed_bundles() -> Vec<Vec<u8>> {
    vec![
        make_bundle(
            true,
            &[
                (
                    "cn.toml",
                    b"include = ['rules/up.toml']\n[policy]\nname = 'cn'\nhome = 'CN'\n",
                ),
                (
                    "rules/up.toml",
                    b"[[upstreams]]\nname = 's'\nurl = 'http://10.0.0.1:9000'\n",
                ),
            ],
            None,
        ),
        make_bundle(
            true,
            &[
                (
                    "cn.toml",
                    b"[policy]\nname = 'cn'\nhome = 'CN'\n[geo]\ndatabase = 'x.mmdb'\n",
                ),
                ("geo/x.mmdb", b"\xab\xcd\xefMaxMind.com"),
            ],
            Some("geo/x.mmdb"),
        ),
    ]
}

/// Parses `data` as a bundle and checks what must hold of it: no panic; what parses encodes
/// back to exactly `data` (nothing is skipped or ignored); a truncated input says how long it
/// is; and only one of `valid` verifies with `public_key`.
pub fn check_bundle(data: &[u8], public_key: &[u8], valid: &[Vec<u8>]) -> bool {
    use residency_proxy::bundle::format::{BundleError, encode, parse};
    let bundle = match parse(data) {
        Ok(b) => b,
        Err(BundleError::Truncated { found, needed }) => {
            assert_eq!(found, data.len() as u64, "{data:?}");
            assert!(
                needed > found,
                "{data:?}: truncated, yet {needed} <= {found}"
            );
            return false;
        }
        Err(_) => return false,
    };
    let contents: Vec<&[u8]> = bundle.files().map(|(_, c)| c).collect();
    assert_eq!(
        encode(bundle.manifest_bytes(), bundle.signature(), &contents),
        data,
        "a parsed bundle does not encode back to its bytes"
    );
    if bundle.verify(public_key).is_ok() {
        assert!(
            valid.iter().any(|v| v == data),
            "a bundle that was not signed verifies: {:?}",
            String::from_utf8_lossy(data)
        );
    }
    true
}

/// Signed policy bundles: any bytes, parsed and verified against the fixture's key.
pub struct PolicyBundle {
    public_key: Vec<u8>,
    valid: Vec<Vec<u8>>,
}

impl Target for PolicyBundle {
    const NAME: &'static str = "bundle";

    fn new() -> Self {
        let valid = signed_bundles();
        let public_key = bundle_key().public_key().to_vec();
        for v in &valid {
            let b = residency_proxy::bundle::format::parse(v).unwrap();
            b.verify(&public_key).expect("the fixture's bundles verify");
        }
        PolicyBundle { public_key, valid }
    }

    fn run(&self, data: &[u8]) {
        check_bundle(data, &self.public_key, &self.valid);
    }

    fn seeds() -> Vec<Vec<u8>> {
        let mut seeds = signed_bundles();
        let good = seeds[0].clone();
        seeds.push(make_bundle(false, &[("p.toml", b"[policy]\n")], None));
        seeds.push(good[..good.len() - 3].to_vec());
        seeds.push([&good[..], b"x"].concat());
        seeds.push(b"RPBUNDLE".to_vec());
        seeds.push(b"PK\x03\x04".to_vec());
        seeds
    }
}
