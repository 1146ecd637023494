//! The mutation test of the decision log: a real log from a proxy run, tampered with in many
//! distinct ways, each of which `residency-proxy audit verify --key` must catch, naming the
//! first broken record by file and line; the untouched log passes. Then the same for a log
//! rotated into several files.

use crate::support::binary::Served;
use crate::support::client::{self, full, request};
use crate::support::proxy::{APP, BUREAU, HOME_IP, PolicySpec, TestProxy, payments_spec};
use crate::support::upstream::{Reply as Serve, Upstream};
use residency_proxy::audit::chain::link;
use residency_proxy::audit::checkpoint::signed_bytes;
use residency_proxy::audit::keys::SigningKey;
use residency_proxy::audit::read::verify::canonical_json;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

async fn start(home: &Upstream, tweak: impl FnOnce(PolicySpec) -> PolicySpec) -> TestProxy {
    tweak(payments_spec(&home.url())).start().await
}

/// Sends `n` requests one after the other: domestic reads, consented and refused transfers,
/// a write and an unmatched path, so that the log holds every kind of decision.
async fn traffic(proxy: &TestProxy, n: usize) {
    for i in 0..n {
        let (from, method, target, purpose, want) = match i % 5 {
            0 => (APP, "GET", format!("/payments/u{i}/a.json"), "", 200),
            1 => (
                BUREAU,
                "GET",
                "/payments/u1/a.json".into(),
                "credit_scoring",
                200,
            ),
            2 => (
                BUREAU,
                "GET",
                format!("/payments/u{i}/a.json"),
                "credit_scoring",
                451,
            ),
            3 => (BUREAU, "PUT", format!("/payments/u{i}/a.json"), "", 200),
            _ => (APP, "GET", format!("/nowhere/{i}"), "", 404),
        };
        let mut req = request(method, &target);
        if !purpose.is_empty() {
            req = req.header("x-purpose", purpose);
        }
        let r = client::send(from, proxy.addr, req.body(full("x")).unwrap()).await;
        assert_eq!(r.status, want, "request {i}: {}", r.text());
        // The outcome record is written once the exchange is over: wait for it, so that the
        // log's lines follow a known order.
        proxy.log.outcome(&r.decision_id()).await;
    }
}

/// Writes the public half of the proxy's signing key next to it; returns its path.
fn public_key(proxy: &TestProxy) -> PathBuf {
    let key = SigningKey::load(&proxy.dir.path().join("log-signing.key")).unwrap();
    let path = proxy.dir.path().join("log-signing.pub");
    std::fs::write(&path, key.public_pem()).unwrap();
    path
}

fn verify(path: &Path, key: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_residency-proxy"));
    cmd.args(["audit", "verify"]).arg(path);
    if let Some(k) = key {
        cmd.arg("--key").arg(k);
    }
    cmd.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap()
}

/// A record as the writer writes it: canonical JSON with `hash` last. A forger who wants
/// a tampered line to pass writes it this way too.
fn line(v: &Value) -> String {
    let mut body = v.clone();
    let hash = body.as_object_mut().unwrap().remove("hash");
    let mut bytes = Vec::new();
    canonical_json(&body, &mut bytes);
    match hash {
        Some(h) => {
            bytes.pop();
            format!("{},\"hash\":{h}}}\n", String::from_utf8(bytes).unwrap())
        }
        None => format!("{}\n", String::from_utf8(bytes).unwrap()),
    }
}

/// Recomputes the hash of record `v` from its `prev`, as a forger would.
fn rehash(v: &mut Value) {
    v.as_object_mut().unwrap().remove("hash");
    let mut bytes = Vec::new();
    canonical_json(v, &mut bytes);
    let h = link(v["prev"].as_str().unwrap(), &bytes);
    v["hash"] = h.into();
}

/// Signs checkpoint `v` with `key`, as the writer does (see `audit::checkpoint`).
fn resign(v: &mut Value, key: &SigningKey) {
    let o = v.as_object_mut().unwrap();
    o.remove("hash");
    o.remove("sig");
    o.insert("key".into(), key.fingerprint().into());
    o.insert("public_key".into(), hex::encode(key.public_key()).into());
    let mut canonical = Vec::new();
    canonical_json(v, &mut canonical);
    let mut msg = Vec::new();
    signed_bytes(&canonical, &mut msg);
    v["sig"] = hex::encode(key.sign(&msg)).into();
}

/// Renumbers and relinks every line from `from` on (re-signing checkpoints with `key`, if
/// given): a forger who rewrites the rest of the chain after a change.
fn rechain(lines: &mut [String], from: usize, key: Option<&SigningKey>) {
    for i in from..lines.len() {
        let mut v = parse(&lines[i]);
        let (seq, prev) = match i {
            0 => (1, "0".repeat(64)),
            _ => {
                let p = parse(&lines[i - 1]);
                (
                    p["seq"].as_u64().unwrap() + 1,
                    p["hash"].as_str().unwrap().to_string(),
                )
            }
        };
        v["seq"] = seq.into();
        v["prev"] = prev.into();
        if let (Some(k), "checkpoint") = (key, v["kind"].as_str().unwrap()) {
            resign(&mut v, k);
        }
        rehash(&mut v);
        lines[i] = line(&v);
    }
}

fn indices(lines: &[String], pred: impl Fn(&Value) -> bool) -> Vec<usize> {
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| pred(&parse(l)))
        .map(|(i, _)| i)
        .collect()
}

/// One tampering: a name, the tampered file's bytes, and where and why verify must fail.
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    line: usize,
    why: String,
}

fn case(name: &'static str, lines: &[String], line: usize, why: impl Into<String>) -> Case {
    Case {
        name,
        bytes: lines.concat().into_bytes(),
        line,
        why: why.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tampering_of_a_real_log_is_caught_and_the_untouched_log_passes() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let mut proxy = start(&home, |s| s.log("checkpoint_every = 8")).await;
    traffic(&proxy, 30).await;
    proxy.shutdown().await;
    let pubkey = public_key(&proxy);
    let original = std::fs::read_to_string(&proxy.log.path).unwrap();
    let lines: Vec<String> = original.split_inclusive('\n').map(str::to_string).collect();

    // The untouched log passes, counted as the user sees it.
    let records = indices(&lines, |v| v["kind"] != "checkpoint").len();
    let cps = indices(&lines, |v| v["kind"] == "checkpoint");
    assert!(cps.len() >= 4, "checkpoints at {cps:?}");
    let out = verify(&proxy.log.path, Some(&pubkey));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(&format!(
            "ok: {records} records, {} checkpoints\nsignatures: {} verified with the given key",
            cps.len(),
            cps.len()
        )),
        "{stdout}"
    );

    let last = lines.len() - 1;
    assert_eq!(
        cps.last(),
        Some(&last),
        "the log ends in its final checkpoint"
    );
    assert_eq!(parse(&lines[last])["final"], true);
    let denials = indices(&lines, |v| {
        v["decision"] == "deny" && v["kind"] == "decision"
    });
    // A refused transfer well inside the log, after the second checkpoint.
    let d = *denials.iter().find(|&&i| i > cps[1] + 1).unwrap();
    let outcome = *indices(&lines, |v| v["kind"] == "outcome")
        .iter()
        .find(|&&i| i > d)
        .unwrap();
    let next_cp = *cps.iter().find(|&&c| c > d).unwrap();
    let seq_of = |i: usize| parse(&lines[i])["seq"].as_u64().unwrap();
    let forger = SigningKey::from_pem(SigningKey::generate_pem().as_bytes(), "f".as_ref()).unwrap();

    let mut cases = Vec::new();
    {
        let mut l = lines.clone();
        l[d] = l[d].replace("\"decision\":\"deny\"", "\"decision\":\"allow\"");
        cases.push(case(
            "edit the decision of a record",
            &l,
            d + 1,
            "hash mismatch: record was edited",
        ));
    }
    {
        let mut l = lines.clone();
        let mut v = parse(&l[outcome]);
        v["bytes_out"] = 1.into();
        l[outcome] = line(&v);
        cases.push(case(
            "edit an outcome's bytes",
            &l,
            outcome + 1,
            "hash mismatch",
        ));
    }
    {
        let mut l = lines.clone();
        let mut v = parse(&l[d]);
        v["decision"] = "allow".into();
        rehash(&mut v);
        l[d] = line(&v);
        cases.push(case(
            "edit a record and recompute its hash",
            &l,
            d + 2,
            "prev does not match the previous record's hash",
        ));
    }
    {
        let mut l = lines.clone();
        l.remove(d);
        cases.push(case(
            "drop a line",
            &l,
            d + 1,
            format!("seq {} follows {}", seq_of(d + 1), seq_of(d - 1)),
        ));
    }
    {
        let mut l = lines.clone();
        l.remove(0);
        cases.push(case(
            "drop the first line",
            &l,
            1,
            "seq 2 at the start of the log",
        ));
    }
    {
        let mut l = lines.clone();
        l.swap(d, d + 1);
        cases.push(case(
            "swap two lines",
            &l,
            d + 1,
            format!("seq {} follows {}", seq_of(d + 1), seq_of(d - 1)),
        ));
    }
    {
        let mut l = lines.clone();
        l.insert(d + 1, l[d].clone());
        cases.push(case(
            "replay a line",
            &l,
            d + 2,
            format!("seq {} follows {}", seq_of(d), seq_of(d)),
        ));
    }
    {
        // A forged decision that links properly to the record before it.
        let mut l = lines.clone();
        let mut v = parse(&l[d]);
        v["id"] = "01FORGEDFORGEDFORGEDFORGED".into();
        v["decision"] = "allow".into();
        v["seq"] = (seq_of(d) + 1).into();
        v["prev"] = parse(&l[d])["hash"].clone();
        rehash(&mut v);
        l.insert(d + 1, line(&v));
        cases.push(case(
            "insert a forged record with a recomputed hash",
            &l,
            d + 3,
            format!("seq {} follows {}", seq_of(d + 1), seq_of(d + 1)),
        ));
    }
    {
        // ... and the whole chain after it rewritten: only the signature can tell.
        let mut l = lines.clone();
        let mut v = parse(&l[d]);
        v["id"] = "01FORGEDFORGEDFORGEDFORGED".into();
        l.insert(d + 1, line(&v));
        rechain(&mut l, d + 1, None);
        cases.push(case(
            "insert a forged record and rewrite the chain after it",
            &l,
            next_cp + 2,
            "signature does not verify",
        ));
    }
    {
        let mut l = lines.clone();
        l.remove(d);
        rechain(&mut l, d, None);
        cases.push(case(
            "delete a record and rewrite the chain after it",
            &l,
            next_cp,
            "signature does not verify",
        ));
    }
    {
        let mut l = lines.clone();
        let mut v = parse(&l[d]);
        v["decision"] = "allow".into();
        l[d] = line(&v);
        rechain(&mut l, d, Some(&forger));
        cases.push(case(
            "edit a record, rewrite the chain and re-sign with another key",
            &l,
            next_cp + 1,
            format!(
                "checkpoint signed by {}, not by the given key",
                forger.fingerprint()
            ),
        ));
    }
    {
        let mut l = lines.clone();
        for i in cps.iter().copied() {
            let mut v = parse(&l[i]);
            let o = v.as_object_mut().unwrap();
            o.remove("sig");
            o.insert("key".into(), Value::Null);
            o.insert("public_key".into(), Value::Null);
            l[i] = line(&v);
        }
        rechain(&mut l, 0, None);
        cases.push(case(
            "strip every signature and rewrite the chain",
            &l,
            cps[0] + 1,
            "checkpoint is not signed",
        ));
    }
    {
        let l = lines[..=cps[1]].to_vec();
        cases.push(case(
            "truncate after a checkpoint",
            &l,
            cps[1] + 1,
            format!("open or truncated: the log ends at seq {}", seq_of(cps[1])),
        ));
    }
    {
        let l = lines[..cps[1]].to_vec();
        cases.push(case(
            "truncate before a checkpoint",
            &l,
            cps[1],
            "open or truncated",
        ));
    }
    {
        let mut c = case(
            "truncate in the middle of a record",
            &lines[..d],
            d + 1,
            "incomplete record",
        );
        c.bytes.extend_from_slice(&lines[d].as_bytes()[..40]);
        cases.push(c);
    }
    {
        let mut l = lines.clone();
        l.remove(last);
        cases.push(case(
            "drop the final checkpoint",
            &l,
            last,
            "open or truncated",
        ));
    }
    {
        let mut l = lines.clone();
        l.remove(cps[1]);
        cases.push(case(
            "drop a checkpoint inside the log",
            &l,
            cps[1] + 1,
            "follows",
        ));
    }
    {
        let mut l = lines.clone();
        let mut v = parse(&l[last]);
        v["sig"] = parse(&l[cps[0]])["sig"].clone();
        l[last] = line(&v);
        cases.push(case(
            "replace the final signature",
            &l,
            last + 1,
            "hash mismatch",
        ));
    }
    {
        let mut l = lines.clone();
        let mut v = parse(&l[last]);
        v["sig"] = parse(&l[cps[0]])["sig"].clone();
        rehash(&mut v);
        l[last] = line(&v);
        cases.push(case(
            "replace the final signature and recompute its hash",
            &l,
            last + 1,
            "signature does not verify",
        ));
    }
    {
        let mut l = lines.clone();
        let mut v = parse(&l[cps[1]]);
        v["sig"] = parse(&l[cps[0]])["sig"].clone();
        rehash(&mut v);
        l[cps[1]] = line(&v);
        cases.push(case(
            "replace a signature inside the log and recompute its hash",
            &l,
            cps[1] + 1,
            "signature does not verify",
        ));
    }
    {
        let mut l = lines.clone();
        let mut v = parse(&l[last]);
        v["final"] = false.into();
        rehash(&mut v);
        l[last] = line(&v);
        cases.push(case(
            "unmark the final checkpoint",
            &l,
            last + 1,
            "signature does not verify",
        ));
    }
    {
        let mut l = lines.clone();
        let mut v = parse(&l[d]);
        v["id"] = "01AFTERTHEENDAFTERTHEENDXX".into();
        l.push(line(&v));
        rechain(&mut l, last + 1, None);
        cases.push(case(
            "append a record after the final checkpoint",
            &l,
            last + 2,
            "open or truncated",
        ));
    }
    cases.push(case("empty the file", &[], 0, "the file is empty"));

    let names: std::collections::HashSet<_> = cases.iter().map(|c| c.name).collect();
    assert_eq!(names.len(), cases.len(), "every case is distinct");
    let mut missed = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let dir = proxy.dir.path().join(format!("case-{i}"));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("decisions.jsonl");
        std::fs::write(&path, &c.bytes).unwrap();
        let out = verify(&path, Some(&pubkey));
        let err = text(&out.stderr);
        // No line is at fault in an empty file: it is named alone.
        let want = match c.line {
            0 => format!("{}: ", path.display()),
            n => format!("{}:{n}: ", path.display()),
        };
        if out.status.code() != Some(1) || !err.starts_with(&want) || !err.contains(&c.why) {
            missed.push(format!(
                "{}: exit {:?}, expected {want}…{}…, got stdout {:?} stderr {err:?}",
                c.name,
                out.status.code(),
                c.why,
                text(&out.stdout)
            ));
        }
    }
    assert!(
        missed.is_empty(),
        "{} of {} tamperings not caught as expected:\n{}",
        missed.len(),
        cases.len(),
        missed.join("\n")
    );

    // Without --key, signatures are checked against the key the log carries: a forger who
    // cannot sign edits a record, rewrites the chain after it, and removes the signatures
    // that no longer verify (found by review: this passed as a log written without a key).
    let mut unkeyed = Vec::new();
    let strip = |l: &mut [String], from: usize, key_fields: bool| {
        for i in cps.iter().copied().filter(|&c| c >= from) {
            let mut v = parse(&l[i]);
            let o = v.as_object_mut().unwrap();
            o.remove("sig");
            if key_fields {
                o.insert("key".into(), Value::Null);
                o.insert("public_key".into(), Value::Null);
            }
            l[i] = line(&v);
        }
    };
    let last_signed = *cps.iter().rfind(|&&c| c < d).unwrap();
    for (name, key_fields) in [
        (
            "edit a record, rewrite the chain and strip the signatures after it",
            false,
        ),
        (
            "edit a record, rewrite the chain and strip the signatures and keys after it",
            true,
        ),
    ] {
        let mut l = lines.clone();
        let mut v = parse(&l[d]);
        v["decision"] = "allow".into();
        l[d] = line(&v);
        strip(&mut l, d, key_fields);
        rechain(&mut l, d, None);
        unkeyed.push(case(
            name,
            &l,
            next_cp + 1,
            format!(
                "signature removed: the checkpoint is not signed, but the one at seq {} was",
                seq_of(last_signed)
            ),
        ));
    }
    {
        let mut l = lines.clone();
        strip(&mut l, 0, false);
        rechain(&mut l, 0, None);
        unkeyed.push(case(
            "strip every signature, keep the key, and rewrite the chain",
            &l,
            cps[0] + 1,
            "signature removed: the checkpoint names a signing key but carries no signature",
        ));
    }
    for (i, c) in unkeyed.iter().enumerate() {
        let dir = proxy.dir.path().join(format!("unkeyed-{i}"));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("decisions.jsonl");
        std::fs::write(&path, &c.bytes).unwrap();
        let out = verify(&path, None);
        let err = text(&out.stderr);
        let want = format!("{}:{}: ", path.display(), c.line);
        if out.status.code() != Some(1) || !err.starts_with(&want) || !err.contains(&c.why) {
            missed.push(format!(
                "{} (without --key): exit {:?}, expected {want}…{}…, got stdout {:?} stderr {err:?}",
                c.name,
                out.status.code(),
                c.why,
                text(&out.stdout)
            ));
        }
    }
    assert!(
        missed.is_empty(),
        "tamperings without --key not caught as expected:\n{}",
        missed.join("\n")
    );
    // Every signature and key stripped is indistinguishable from a log written without a
    // key: it verifies, but says loudly that nothing shows who wrote it.
    let stripped = cases
        .iter()
        .position(|c| c.name == "strip every signature and rewrite the chain")
        .unwrap();
    let out = verify(
        &proxy
            .dir
            .path()
            .join(format!("case-{stripped}/decisions.jsonl")),
        None,
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!(
            "NOT SIGNED: none of the {} checkpoints carries a signature",
            cps.len()
        )),
        "{stdout}"
    );

    // Without --key, a log re-signed by a forger's key verifies against the key it carries,
    // and the report names that key: this is what --key is for.
    let forged = cases
        .iter()
        .position(|c| c.name.contains("another key"))
        .unwrap();
    let path = proxy
        .dir
        .path()
        .join(format!("case-{forged}/decisions.jsonl"));
    let out = verify(&path, None);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains(&forger.fingerprint()), "{stdout}");
    assert!(
        stdout.contains("pass --key to check it is yours"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_log_verifies_as_one_chain_and_every_file_is_accounted_for() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    // No timed checkpoints: the count below is exact.
    let mut proxy = start(&home, |s| s.log("checkpoint_interval = '1h'")).await;
    let mut rotated = Vec::new();
    for _ in 0..3 {
        traffic(&proxy, 5).await;
        let to = proxy.running().shared.log.rotate().await.unwrap();
        rotated.push(to.expect("a rotated file"));
    }
    traffic(&proxy, 5).await;
    proxy.shutdown().await;
    let pubkey = public_key(&proxy);
    let active = proxy.log.path.clone();

    let out = verify(&active, Some(&pubkey));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // 20 decisions and 20 outcomes; a checkpoint closing each rotated file, and the final one.
    assert!(
        stdout.starts_with("ok: 40 records, 4 checkpoints\n"),
        "{stdout}"
    );
    assert!(stdout.contains("files: 4"), "{stdout}");

    // Each scenario in a copy of the folder holding only the log.
    let copy = |name: &str| {
        let dir = proxy.dir.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        for f in rotated.iter().chain([&active]) {
            std::fs::copy(f, dir.join(f.file_name().unwrap())).unwrap();
        }
        dir
    };
    let name = |p: &PathBuf| p.file_name().unwrap().to_owned();
    let expect = |dir: &Path, file: &Path, line: usize, why: &str| {
        let out = verify(dir, Some(&pubkey));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{why}: {}", text(&out.stdout));
        assert!(
            err.starts_with(&format!("{}:{line}: ", file.display())),
            "{why}: {err}"
        );
        assert!(err.contains(why), "{why}: {err}");
    };

    let dir = copy("deleted");
    std::fs::remove_file(dir.join(name(&rotated[1]))).unwrap();
    expect(
        &dir,
        &dir.join(name(&rotated[2])),
        1,
        "a record was deleted or reordered",
    );

    let dir = copy("reordered");
    // The second file renamed to sort first.
    let early = dir.join("decisions-00000000000000000000-20000101T000000Z.jsonl");
    std::fs::rename(dir.join(name(&rotated[1])), &early).unwrap();
    expect(&dir, &early, 1, "at the start of the log");

    let dir = copy("cut");
    let f = dir.join(name(&rotated[0]));
    let text0 = std::fs::read_to_string(&f).unwrap();
    let kept: Vec<&str> = text0.split_inclusive('\n').collect();
    std::fs::write(&f, kept[..kept.len() - 1].concat()).unwrap();
    expect(
        &dir,
        &f,
        kept.len() - 1,
        "a rotated file must end with a checkpoint",
    );

    let dir = copy("no-active");
    std::fs::remove_file(dir.join(name(&active))).unwrap();
    let last = dir.join(name(&rotated[2]));
    let n = std::fs::read_to_string(&last).unwrap().lines().count();
    expect(&dir, &last, n, "open or truncated");
}

/// Runs the real binary on `policy` in `dir`, sends three domestic reads, stops it with
/// SIGTERM, and returns the head of the last checkpoint it announced in its own logs.
async fn run_and_stop(policy: &Path, dir: &Path) -> (u64, String) {
    let mut served = Served::start(policy, dir);
    let addr = served.addr("residency-proxy serving", "listen").await;
    for i in 0..3 {
        let r = client::get(APP, addr, &format!("/payments/u{i}/a.json"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    served.signal("TERM");
    let status = served.exit(Duration::from_secs(10)).await.expect("exit");
    assert!(status.success(), "exit {status}");
    let events = served.events();
    let last = events
        .iter()
        .rfind(|e| e["fields"]["message"] == "decision log checkpoint")
        .expect("a checkpoint event");
    let f = &last["fields"];
    assert_eq!(f["log.final_checkpoint"], true, "{last}");
    (
        f["log.seq"].as_u64().unwrap(),
        f["log.hash"].as_str().unwrap().to_string(),
    )
}

/// Found by review: every clean stop leaves a final checkpoint inside the log, and a log
/// cut back to one verifies, signatures and all; so does a log cut anywhere and then
/// continued by a restart. A head from the proxy's own logs, kept elsewhere, catches both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_cut_back_verifies_but_not_against_a_head_from_the_proxy_logs() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    // No timed checkpoints: each run writes the same number of records.
    let (policy, _) = payments_spec(&home.url())
        .log("checkpoint_interval = '1h'")
        .write_files(dir.path());
    let log = dir.path().join("decisions.jsonl");
    let pubkey = {
        let key = SigningKey::load(&dir.path().join("log-signing.key")).unwrap();
        let path = dir.path().join("log-signing.pub");
        std::fs::write(&path, key.public_pem()).unwrap();
        path
    };
    let verify_head = |head: &(u64, String)| {
        Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
            .args(["audit", "verify", "--key"])
            .arg(&pubkey)
            .arg("--head")
            .arg(format!("{}:{}", head.0, head.1))
            .arg(&log)
            .output()
            .unwrap()
    };

    let first = run_and_stop(&policy, dir.path()).await;
    let second = run_and_stop(&policy, dir.path()).await;
    // The event names the log's last record: the final checkpoint of the second run.
    let text0 = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text0.split_inclusive('\n').collect();
    let last = parse(lines.last().unwrap());
    assert_eq!(
        (
            last["seq"].as_u64().unwrap(),
            last["hash"].as_str().unwrap()
        ),
        (second.0, second.1.as_str())
    );
    let out = verify_head(&second);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("heads: 1 recorded outside the log"),
        "{}",
        text(&out.stdout)
    );

    // Cut back to the first run's final checkpoint: the chain and signatures still hold.
    let cut = first.0 as usize;
    assert_eq!(parse(lines[cut - 1])["hash"], first.1.as_str());
    std::fs::write(&log, lines[..cut].concat()).unwrap();
    let out = verify(&log, Some(&pubkey));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = verify_head(&second);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).starts_with(&format!(
            "{}:{cut}: the log ends at seq {}, before seq {}, a head recorded outside the log",
            log.display(),
            first.0,
            second.0
        )),
        "{}",
        text(&out.stderr)
    );

    // A restart carries on from the cut, and signs it: only the head tells.
    run_and_stop(&policy, dir.path()).await;
    let out = verify(&log, Some(&pubkey));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = verify_head(&second);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains(&format!(
            "record seq {} is not the head recorded outside the log",
            second.0
        )),
        "{}",
        text(&out.stderr)
    );
}
