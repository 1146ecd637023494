//! The invariants of the parsers, shared by the property tests (`tests/properties.rs`, on
//! stable) and the cargo-fuzz targets (`fuzz/`, on nightly), so that both check the same
//! things. Each `check_*` function panics when an input breaks an invariant.
#![allow(dead_code)]

use http::HeaderMap;
use residency_proxy::audit::LogWriter;
use residency_proxy::audit::record::{OutcomeRecord, Record, RequestContext, failure_record};
use residency_proxy::audit::verify::verify;
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
    let runtime = tokio::runtime::Builder::new_current_thread()
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
