//! `bundle build|verify|inspect`, `certs init`'s policy-signing key and `check --bundle`, run
//! as an operator would: a policy with an include and a geolocation database bundled and
//! signed, read back, and each kind of bad bundle refused with its reason; a policy that does
//! not compile is never bundled; a sidecar's own file checked with its bundle, each mistake
//! located in the part it is in.

use crate::support::mmdb;
use residency_proxy::audit::keys::SigningKey;
use residency_proxy::bundle::format::{self, FileEntry, Manifest};
use std::path::Path;
use std::process::{Command, Output};

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// The 1-based line of `text` holding `snippet` (exactly once).
fn line(text: &str, snippet: &str) -> usize {
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(snippet))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(hits.len(), 1, "{snippet:?} must be on exactly one line");
    hits[0]
}

const RULES: &str = "include = ['rules/datasets.toml']

[policy]
name = 'cn-pipl'
home = 'CN'

[geo]
database = 'geo/country.mmdb'

[[networks]]
cidr = '127.0.0.2/32'
country = 'CN'

[[upstreams]]
name = 'cn-store'
url = 'http://127.0.0.2:9000'
";

const DATASETS: &str = "[[datasets]]
name = 'payments'
match = { path_prefix = '/payments/' }
upstream = 'cn-store'
category = 'user.financial'
cross_border = 'deny'
third_party = 'deny'
";

/// A sidecar's own file whose rules come from `bundle` (a file source).
const SIDECAR: &str = "[policy.source]
url = 'file:cn.bundle'
key = 'certs/policy-signing.pub'

[proxy]
listen = '127.0.0.1:0'

[log]
path = 'logs/decisions.jsonl'
signing_key = 'certs/log-signing.key'
";

/// A deployment folder: keys from `certs init`, the bundle's policy in `cn/` with an include,
/// and a geolocation database.
fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["certs", "init", "certs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    write(dir.path(), "cn/cn.toml", RULES);
    write(dir.path(), "cn/rules/datasets.toml", DATASETS);
    std::fs::create_dir_all(dir.path().join("geo")).unwrap();
    std::fs::write(
        dir.path().join("geo/country.mmdb"),
        mmdb::maxmind_country_db(&[("127.0.0.0/24", "CN")]),
    )
    .unwrap();
    dir
}

/// `bundle build cn/cn.toml --geo … -o OUT --revision N`, which must succeed.
fn build(dir: &Path, out: &str, revision: &str, key: &str) -> String {
    let o = run(
        dir,
        &[
            "bundle",
            "build",
            "cn/cn.toml",
            "--geo",
            "geo/country.mmdb",
            "--signing-key",
            key,
            "-o",
            out,
            "--revision",
            revision,
            "--builder",
            "ci@build-01",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    stdout(&o)
}

#[test]
fn certs_init_makes_a_policy_signing_key_pair_beside_the_logs() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["certs", "init", "certs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let certs = dir.path().join("certs");
    let key = SigningKey::load(&certs.join("policy-signing.key")).unwrap();
    let log = SigningKey::load(&certs.join("log-signing.key")).unwrap();
    assert_ne!(key.fingerprint(), log.fingerprint(), "one key per job");
    let mode = std::fs::metadata(certs.join("policy-signing.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(certs.join("policy-signing.pub")).unwrap(),
        key.public_pem()
    );
    assert!(
        stdout(&out).contains(&format!(
            "policy-signing key fingerprint: {}",
            key.fingerprint()
        )),
        "{}",
        stdout(&out)
    );
    // Kept on a second run.
    let again = run(dir.path(), &["certs", "init", "certs"]);
    assert!(stdout(&again).contains("kept"), "{}", stdout(&again));
    let same = SigningKey::load(&certs.join("policy-signing.key")).unwrap();
    assert_eq!(same.fingerprint(), key.fingerprint());
}

#[test]
fn a_bundle_is_built_verified_and_inspected() {
    let dir = setup();
    let d = dir.path();
    let key = SigningKey::load(&d.join("certs/policy-signing.key")).unwrap();
    let said = build(d, "cn.bundle", "7", "certs/policy-signing.key");
    assert_eq!(
        said.trim(),
        format!(
            "cn.bundle: revision 7, policy \"cn-pipl\" (3 files, 1 datasets, 1 upstreams, 0 recipients), geolocation GeoLite2-Country {}, signed by {}",
            mmdb::BUILD_DATE,
            key.fingerprint()
        )
    );

    let out = run(
        d,
        &[
            "bundle",
            "verify",
            "cn.bundle",
            "--key",
            "certs/policy-signing.pub",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("cn.bundle: ok: revision 7, 3 files, built "),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains(&format!("by ci@build-01, signed by {}", key.fingerprint())),
        "{}",
        stdout(&out)
    );

    let out = run(d, &["bundle", "inspect", "cn.bundle"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let db = std::fs::read(d.join("geo/country.mmdb")).unwrap();
    for (path, bytes) in [
        ("cn.toml", RULES.as_bytes()),
        ("rules/datasets.toml", DATASETS.as_bytes()),
        ("geo/country.mmdb", &db[..]),
    ] {
        let row = text
            .lines()
            .find(|l| l.trim_start().starts_with(path))
            .unwrap_or_else(|| panic!("no {path} in:\n{text}"));
        assert!(row.contains(&format!(" {} ", bytes.len())), "{row}");
        assert!(
            row.ends_with(&format!("sha256:{}", format::sha256_hex(bytes))),
            "{row}"
        );
    }
    assert!(text.contains("revision     7\n"), "{text}");
    assert!(text.contains("ci@build-01"), "{text}");
    assert!(text.contains(&key.fingerprint()), "{text}");

    let out = run(d, &["bundle", "inspect", "cn.bundle", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["revision"], 7);
    assert_eq!(v["signed"], true);
    assert_eq!(v["allow_rollback"], false);
    assert_eq!(v["policy"], "cn.toml");
    assert_eq!(v["geo"], "geo/country.mmdb");
    assert_eq!(v["signer"], key.fingerprint());
    assert_eq!(v["files"].as_array().unwrap().len(), 3);
    assert_eq!(v["files"][1]["path"], "rules/datasets.toml");
    assert_eq!(v["files"][1]["intact"], true);

    // Without --revision, the build time in seconds: it grows from build to build.
    let before = jiff::Timestamp::now().as_second();
    let out = run(
        d,
        &[
            "bundle",
            "build",
            "cn/cn.toml",
            "--signing-key",
            "certs/policy-signing.key",
            "-o",
            "later.bundle",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The database was not carried: each sidecar reads its own, and is told so.
    assert!(
        stderr(&out).contains("does not carry the geolocation database geo/country.mmdb"),
        "{}",
        stderr(&out)
    );
    let later = format::parse(&std::fs::read(d.join("later.bundle")).unwrap())
        .unwrap()
        .manifest;
    let after = jiff::Timestamp::now().as_second();
    assert!(
        (before..=after).contains(&(later.revision as i64)),
        "{}",
        later.revision
    );
    assert_eq!(later.files.len(), 2);
    assert!(later.geo.is_none());
}

/// `bundle` with its bytes changed by `edit`.
fn damaged(bundle: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = bundle.to_vec();
    edit(&mut b);
    b
}

#[test]
fn each_bad_bundle_is_refused_by_verify_with_its_reason() {
    let dir = setup();
    let d = dir.path();
    build(d, "cn.bundle", "7", "certs/policy-signing.key");
    let good = std::fs::read(d.join("cn.bundle")).unwrap();
    let parsed = format::parse(&good).unwrap();
    let contents: Vec<&[u8]> = parsed.files().map(|(_, c)| c).collect();
    let unsigned = format::encode(parsed.manifest_bytes(), None, &contents);

    std::fs::write(d.join("other.key"), SigningKey::generate_pem()).unwrap();
    build(d, "other.bundle", "8", "other.key");
    let other = SigningKey::load(&d.join("other.key")).unwrap();
    let ours = SigningKey::load(&d.join("certs/policy-signing.key")).unwrap();

    // The last file is the database: its last byte flipped.
    let flipped = damaged(&good, |b| *b.last_mut().unwrap() ^= 0x01);
    let truncated = good[..good.len() - 100].to_vec();
    let cases: [(&str, Vec<u8>, String); 4] = [
        (
            "unsigned.bundle",
            unsigned,
            "unsigned: unsigned: the bundle carries no signature".into(),
        ),
        (
            "other.bundle",
            std::fs::read(d.join("other.bundle")).unwrap(),
            format!(
                "other_key: signed by another key ({}): only bundles signed by {} are accepted",
                other.fingerprint(),
                ours.fingerprint()
            ),
        ),
        (
            "flipped.bundle",
            flipped,
            "corrupt: file geo/country.mmdb does not match its SHA-256 in the manifest".into(),
        ),
        (
            "truncated.bundle",
            truncated,
            format!(
                "corrupt: truncated: the bundle has {} bytes and needs {}",
                good.len() - 100,
                good.len()
            ),
        ),
    ];
    for (name, bytes, says) in cases {
        std::fs::write(d.join(name), &bytes).unwrap();
        let out = run(
            d,
            &[
                "bundle",
                "verify",
                name,
                "--key",
                "certs/policy-signing.pub",
            ],
        );
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with(&format!("{name}: {says}")),
            "{name}: {}",
            stderr(&out)
        );
        assert!(stdout(&out).is_empty(), "{name}");
    }
    // `inspect` names the file that does not match, and exits 1.
    let out = run(d, &["bundle", "inspect", "flipped.bundle"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.contains("geo/country.mmdb") && l.ends_with("DOES NOT MATCH ITS HASH")),
        "{}",
        stdout(&out)
    );
    // Not a bundle at all, and a file that cannot be read (exit 2).
    let out = run(
        d,
        &[
            "bundle",
            "verify",
            "cn/cn.toml",
            "--key",
            "certs/policy-signing.pub",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("corrupt: not a policy bundle"),
        "{}",
        stderr(&out)
    );
    let out = run(
        d,
        &[
            "bundle",
            "verify",
            "missing.bundle",
            "--key",
            "certs/policy-signing.pub",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("missing.bundle"), "{}", stderr(&out));
}

#[test]
fn a_policy_that_does_not_compile_is_never_built() {
    let dir = setup();
    let d = dir.path();
    let datasets = DATASETS.replace("upstream = 'cn-store'", "upstream = 'nowhere'");
    write(d, "cn/rules/datasets.toml", &datasets);
    // A table that belongs in each sidecar's own file is an error too.
    let rules = format!("{RULES}\n[log]\npath = 'logs/decisions.jsonl'\n");
    write(d, "cn/cn.toml", &rules);
    let out = run(
        d,
        &[
            "bundle",
            "build",
            "cn/cn.toml",
            "--signing-key",
            "certs/policy-signing.key",
            "-o",
            "cn.bundle",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let expected = [
        format!(
            "cn/cn.toml:{}: log: `[log]` belongs in the sidecar's own policy file, not in a bundle",
            line(&rules, "[log]")
        ),
        format!(
            "cn/rules/datasets.toml:{}: datasets.payments.upstream: no upstream named \"nowhere\"",
            line(&datasets, "upstream = 'nowhere'")
        ),
    ];
    for e in &expected {
        assert!(err.lines().any(|l| l.starts_with(e)), "no {e} in:\n{err}");
    }
    assert!(err.ends_with("cn/cn.toml: 2 error(s)\n"), "{err}");
    assert!(!d.join("cn.bundle").exists(), "a bundle was written");

    // An include outside the policy's folder cannot be carried.
    write(d, "shared.toml", "[jurisdictions]\nNEAR = ['CN', 'HK']\n");
    write(
        d,
        "cn/cn.toml",
        &RULES.replace(
            "include = ['rules/datasets.toml']",
            "include = ['rules/datasets.toml', '../shared.toml']",
        ),
    );
    write(d, "cn/rules/datasets.toml", DATASETS);
    let out = run(
        d,
        &[
            "bundle",
            "build",
            "cn/cn.toml",
            "--signing-key",
            "certs/policy-signing.key",
            "-o",
            "cn.bundle",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is outside the folder of the policy cn/cn.toml"),
        "{}",
        stderr(&out)
    );
    assert!(!d.join("cn.bundle").exists());
}

/// A bundle of `files` (the policy first) signed by `key`: what another tool, or a person
/// with the key, could publish without `bundle build`'s checks.
fn handmade(key: &SigningKey, revision: u64, files: &[(&str, &str)]) -> Vec<u8> {
    let manifest = Manifest {
        format: format::FORMAT,
        revision,
        built_at: jiff::Timestamp::now(),
        builder: "hand@made".into(),
        allow_rollback: false,
        signer: key.fingerprint(),
        policy: files[0].0.into(),
        geo: None,
        files: files
            .iter()
            .map(|(p, t)| FileEntry {
                path: (*p).into(),
                size: t.len() as u64,
                sha256: format::sha256_hex(t.as_bytes()),
            })
            .collect(),
    };
    let bytes = manifest.to_bytes();
    let contents: Vec<&[u8]> = files.iter().map(|(_, t)| t.as_bytes()).collect();
    format::encode(&bytes, Some(&key.sign(&bytes)), &contents)
}

#[test]
fn check_compiles_a_sidecar_file_with_its_bundle_locating_each_mistake_in_its_part() {
    let dir = setup();
    let d = dir.path();
    std::fs::create_dir_all(d.join("logs")).unwrap();
    write(d, "sidecar.toml", SIDECAR);
    build(d, "cn.bundle", "7", "certs/policy-signing.key");

    let out = run(d, &["check", "sidecar.toml", "--bundle", "cn.bundle"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(
            "sidecar.toml: ok: policy \"cn-pipl\" (1 datasets, 1 upstreams, 0 recipients) sha256:"
        ),
        "{}",
        stdout(&out)
    );
    // Alone, the sidecar's file compiles and says where its rules come from.
    let out = run(d, &["check", "sidecar.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("its rules come from the bundle at file:cn.bundle"),
        "{}",
        stdout(&out)
    );
    // A whole policy given a bundle is a mistake of usage.
    write(
        d,
        "whole.toml",
        &format!("{RULES}{DATASETS}[log]\npseudonymize = false\n")
            .replace("include = ['rules/datasets.toml']\n", ""),
    );
    let out = run(d, &["check", "whole.toml", "--bundle", "cn.bundle"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("this is a whole policy"),
        "{}",
        stderr(&out)
    );

    // A rule in the sidecar's file: located there, naming where it belongs.
    let misplaced =
        format!("{SIDECAR}\n[[upstreams]]\nname = 'eu-store'\nurl = 'http://127.0.0.3:9000'\n");
    write(d, "sidecar.toml", &misplaced);
    let out = run(d, &["check", "sidecar.toml", "--bundle", "cn.bundle"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "sidecar.toml:{}: upstreams: `[[upstreams]]` belongs in the bundle's policy, not in the sidecar's own file: with [policy.source], the rules every sidecar shares come from the bundle\nsidecar.toml: 1 error(s)\n",
            line(&misplaced, "[[upstreams]]")
        )
    );
    write(d, "sidecar.toml", SIDECAR);

    // A bundle whose policy does not compile (made without `bundle build`): located in the
    // bundle, as BUNDLE/PATH.
    let key = SigningKey::load(&d.join("certs/policy-signing.key")).unwrap();
    let datasets = DATASETS.replace("category = 'user.financial'", "category = 'User Financial'");
    let rules = RULES.replace("[geo]\ndatabase = 'geo/country.mmdb'\n", "");
    std::fs::write(
        d.join("bad.bundle"),
        handmade(
            &key,
            8,
            &[("cn.toml", &rules), ("rules/datasets.toml", &datasets)],
        ),
    )
    .unwrap();
    let out = run(d, &["check", "sidecar.toml", "--bundle", "bad.bundle"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let prefix = format!(
        "bad.bundle/rules/datasets.toml:{}: datasets.payments.category: ",
        line(&datasets, "category =")
    );
    assert!(stderr(&out).starts_with(&prefix), "{}", stderr(&out));

    // Signed by another key: refused, unless offline (which checks only the hashes).
    let other =
        SigningKey::from_pem(SigningKey::generate_pem().as_bytes(), Path::new("o")).unwrap();
    std::fs::write(
        d.join("other.bundle"),
        handmade(
            &other,
            9,
            &[("cn.toml", &rules), ("rules/datasets.toml", DATASETS)],
        ),
    )
    .unwrap();
    let out = run(d, &["check", "sidecar.toml", "--bundle", "other.bundle"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("other.bundle: other_key: signed by another key"),
        "{}",
        stderr(&out)
    );
    let out = run(
        d,
        &[
            "check",
            "--offline",
            "sidecar.toml",
            "--bundle",
            "other.bundle",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
