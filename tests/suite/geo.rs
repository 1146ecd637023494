//! `geo lookup` through the real binary: a policy and a generated MaxMind DB in a temp dir.

use crate::support::mmdb::{self, BUILD_DATE};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A policy with home CN, the `shanghai-dc` override and `database` (if any) as its
/// `[geo]` database; `extra` is appended verbatim.
fn write_policy(dir: &Path, database: Option<&Path>, extra: &str) -> PathBuf {
    let geo = match database {
        Some(p) => format!("[geo]\ndatabase = {:?}\n", p.display().to_string()),
        None => String::new(),
    };
    let text = format!(
        r#"[policy]
name = "t"
home = "CN"
{geo}
[log]
pseudonymize = false

[[networks]]
cidr = "10.20.0.0/16"
country = "CN"
name = "shanghai-dc"

[[upstreams]]
name = "cn-store"
url = "http://127.0.0.1:9000"
{extra}"#
    );
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A temp dir holding `country.mmdb` (when `db` is given) and a policy that uses it.
struct Setup {
    _dir: tempfile::TempDir,
    policy: PathBuf,
    db: PathBuf,
}

fn setup(db: Option<&[u8]>, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("country.mmdb");
    if let Some(bytes) = db {
        std::fs::write(&path, bytes).unwrap();
    }
    let policy = write_policy(dir.path(), db.map(|_| path.as_path()), extra);
    Setup {
        _dir: dir,
        policy,
        db: path,
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn lookup(policy: &Path, ips: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
        .args(["geo", "lookup"])
        .args(ips)
        .arg("--policy")
        .arg(policy)
        .output()
        .unwrap();
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// The columns of the output line for `ip`: address, country, source, jurisdictions, home.
fn columns(run: &Run, ip: &str) -> Vec<String> {
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    let line = run
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(ip))
        .unwrap_or_else(|| panic!("no line for {ip} in:\n{}", run.stdout));
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn maxmind_database_locates_ipv4_and_ipv6_with_its_build_date() {
    let t = setup(
        Some(&mmdb::maxmind_country_db(&[
            ("8.8.8.0/24", "US"),
            ("1.1.1.0/24", "AU"),
            ("2001:4860::/32", "US"),
        ])),
        "",
    );
    let run = lookup(&t.policy, &["8.8.8.8", "2001:4860:4860::8888", "1.1.1.1"]);
    let label = format!("database (GeoLite2-Country {BUILD_DATE})");
    assert_eq!(
        columns(&run, "8.8.8.8"),
        [
            "8.8.8.8",
            "US",
            &label,
            "jurisdictions: US",
            "home CN: outside"
        ]
    );
    assert_eq!(columns(&run, "2001:4860:4860::8888")[1..3], ["US", &label]);
    assert_eq!(columns(&run, "1.1.1.1")[1], "AU");
    assert_eq!(run.stdout.lines().count(), 3);
}

#[test]
fn dbip_lite_layout_is_read() {
    let t = setup(Some(&mmdb::dbip_country_db(&[("1.1.1.0/24", "AU")])), "");
    let run = lookup(&t.policy, &["1.1.1.1"]);
    assert_eq!(
        columns(&run, "1.1.1.1")[1..3],
        ["AU", &format!("database (DBIP-Country-Lite {BUILD_DATE})")]
    );
}

#[test]
fn override_beats_the_database_and_is_at_home() {
    // The database puts the data centre in the US; the operator knows better.
    let t = setup(Some(&mmdb::maxmind_country_db(&[("10.0.0.0/8", "US")])), "");
    let run = lookup(&t.policy, &["10.20.0.5", "::ffff:10.20.0.6", "10.21.0.5"]);
    assert_eq!(
        columns(&run, "10.20.0.5"),
        [
            "10.20.0.5",
            "CN",
            "override shanghai-dc (10.20.0.0/16)",
            "jurisdictions: CN",
            "home CN: inside"
        ]
    );
    assert_eq!(columns(&run, "::ffff:10.20.0.6")[1], "CN");
    assert_eq!(columns(&run, "10.21.0.5")[1], "US");
}

#[test]
fn address_in_neither_is_unknown() {
    let t = setup(Some(&mmdb::maxmind_country_db(&[("8.8.8.0/24", "US")])), "");
    let run = lookup(&t.policy, &["5.5.5.5", "2a00::1"]);
    for ip in ["5.5.5.5", "2a00::1"] {
        let cols = columns(&run, ip);
        assert_eq!(cols[1..4], ["unknown", "none", "jurisdictions: -"]);
        assert!(cols[4].starts_with("home CN: unknown"), "{cols:?}");
    }
}

#[test]
fn without_a_database_only_overrides_locate() {
    let t = setup(None, "");
    let run = lookup(&t.policy, &["8.8.8.8", "10.20.1.1"]);
    assert_eq!(
        columns(&run, "8.8.8.8")[1..3],
        ["unknown", "none (no [geo] database)"]
    );
    assert_eq!(columns(&run, "10.20.1.1")[1], "CN");
}

#[test]
fn named_jurisdictions_containing_the_country_are_listed() {
    let t = setup(
        Some(&mmdb::maxmind_country_db(&[("2.16.0.0/13", "DE")])),
        "\n[jurisdictions]\nEU = [\"DE\", \"FR\"]\nDACH = [\"DE\", \"AT\", \"CH\"]\nAPAC = [\"CN\", \"JP\"]\n",
    );
    let run = lookup(&t.policy, &["2.16.1.1"]);
    assert_eq!(columns(&run, "2.16.1.1")[3], "jurisdictions: DE, DACH, EU");
}

#[test]
fn columns_line_up_across_addresses() {
    let t = setup(
        Some(&mmdb::maxmind_country_db(&[
            ("8.8.8.0/24", "US"),
            ("2001:4860::/32", "US"),
        ])),
        "",
    );
    let run = lookup(&t.policy, &["8.8.8.8", "2001:4860:4860::8888", "10.20.0.1"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let starts: Vec<Option<usize>> = run
        .stdout
        .lines()
        .map(|l| l.find("jurisdictions:"))
        .collect();
    assert_eq!(starts.len(), 3);
    assert!(
        starts.iter().all(|s| s.is_some() && *s == starts[0]),
        "{}",
        run.stdout
    );
}

#[test]
fn corrupt_database_is_refused_naming_the_file() {
    let mut bytes = mmdb::maxmind_country_db(&[("8.8.8.0/24", "US")]);
    // Cut off the metadata section, which sits at the end of the file.
    bytes.truncate(bytes.len() / 2);
    let t = setup(Some(&bytes), "");
    let run = lookup(&t.policy, &["8.8.8.8"]);
    assert_eq!(run.code, 2, "stdout: {}", run.stdout);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr.contains(&t.db.display().to_string()),
        "{}",
        run.stderr
    );
}

#[test]
fn missing_database_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("absent.mmdb");
    let policy = write_policy(dir.path(), Some(&db), "");
    let run = lookup(&policy, &["8.8.8.8"]);
    assert_eq!(run.code, 2, "stdout: {}", run.stdout);
    assert!(run.stderr.contains("absent.mmdb"), "{}", run.stderr);
}
