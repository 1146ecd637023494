//! `residency-proxy check` run as an operator would: every error of a policy, in its own
//! file and included files, printed as `file:line: rule: message`, exit 1; every file the
//! policy names opened as `serve` opens it (`--offline` skips them); warnings that leave the
//! exit status alone; exit 0 for a good policy; exit 2 for a file that cannot be read.

use std::path::Path;
use std::process::{Command, Output};

fn check(dir: &Path, files: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
        .current_dir(dir)
        .arg("check")
        .args(files)
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
    std::fs::write(dir.join(name), text).unwrap();
}

/// The 1-based line of `text` holding `snippet`, which must occur exactly once.
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

/// One error `check` must print: `file:line: rule: …fragment…`.
struct Expected<'a> {
    file: &'a str,
    line: usize,
    rule: &'a str,
    fragment: &'a str,
}

/// Asserts that the error lines of `out` are exactly `expected` (in any order), followed by
/// the count for `entry`.
fn assert_errors(out: &Output, entry: &str, expected: &[Expected<'_>]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let mut lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.pop(),
        Some(format!("{entry}: {} error(s)", expected.len()).as_str()),
        "{err}"
    );
    for e in expected {
        let prefix = format!("{}:{}: {}: ", e.file, e.line, e.rule);
        let found = lines
            .iter()
            .position(|l| l.starts_with(&prefix) && l.contains(e.fragment));
        match found {
            Some(i) => {
                lines.remove(i);
            }
            None => panic!("no error `{prefix}…{}…` in:\n{err}", e.fragment),
        }
    }
    assert!(lines.is_empty(), "unexpected errors {lines:#?} in:\n{err}");
}

const MINIMAL: &str = "[policy]\nname = \"p\"\nhome = \"CN\"\n\n[log]\npseudonymize = false\n";

#[test]
fn the_demo_policy_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The demo's key and consent file are written by `demo`, not kept in the repository.
    let out = check(root, &["--offline", "policies/demo.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("policies/demo.toml: ok: policy \"demo-payments\" (4 datasets"),
        "{stdout}"
    );
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

const BROKEN: &str = r#"include = ["other.toml"]
verbose = true

[policy]
name = "broken"
home = "CN"
mode = "enforse"
colour = "blue"

[proxy]
listen = "127.0.0.1:8080"
connect_timeout = "5 parsecs"
trusted_proxies = ["10.0.0.0/8", "10.0.0.0/33"]

[jurisdictions]
EU = ["FR", "DE",
      "UK"]

[[networks]]
cidr = "10.20.0.0/16"
country = "China"

[[networks]]
cidr = "10.30.0.0/40"
country = "CN"
name = "bad-net"

[[upstreams]]
name = "cn-store"
url = "http://127.0.0.2:9000"

[[recipients]]
id = "bureau"
relation = "third_party"
country = "US"
identities = ["spiffe://partners/bureau", "spiffe://partners/*"]

[[datasets]]
name = "payments"
match = { path_prefix = "/payments//" }
upstream = "cn-stor"
category = "user.financial"
subject = { path_segment = 2, colour = "red" }
mode = "enforced"

[[datasets]]
name = "payments"
match = { path_prefix = "/payments2/" }
upstream = "cn-store"
category = "user.financial"
subject = { path_segment = 2 }
tier = 3

[consent]
accept_methods = ["explicit", "pre_ticked"]

[log]
pseudonymize = true
checkpoint_every = 100
"#;

const OTHER: &str = r#"# Storage abroad, included by broken.toml.
[[upstreams]]
name = "us-store"
url = "ftp://127.0.0.3"

[[datasets]]
name = "rates"
match = { path_prefix = "/rates/./x" }
upstream = "us-store"
category = "system.operations"
resident = false
cross_border = "allow"
third_party = "maybe"

[geo]
databse = "x.mmdb"
"#;

#[test]
fn a_broken_policy_reports_every_error_with_file_line_and_rule() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "broken.toml", BROKEN);
    write(dir.path(), "other.toml", OTHER);
    let out = check(dir.path(), &["broken.toml"]);
    let b = |snippet, rule, fragment| Expected {
        file: "broken.toml",
        line: line(BROKEN, snippet),
        rule,
        fragment,
    };
    let o = |snippet, rule, fragment| Expected {
        file: "other.toml",
        line: line(OTHER, snippet),
        rule,
        fragment,
    };
    assert_errors(
        &out,
        "broken.toml",
        &[
            // Unknown keys at every depth, in both files.
            b("verbose", "verbose", "unknown key"),
            b("colour = \"blue\"", "policy.colour", "unknown key"),
            b(
                "colour = \"red\"",
                "datasets[0].subject.colour",
                "unknown key",
            ),
            b("tier", "datasets[1].tier", "unknown key"),
            o("databse", "geo.databse", "unknown key"),
            b(
                "enforse",
                "policy.mode",
                "\"enforse\" is not one of \"enforce\", \"audit\"",
            ),
            b(
                "parsecs",
                "proxy.connect_timeout",
                "\"5 parsecs\" is not a duration",
            ),
            b(
                "/33",
                "proxy.trusted_proxies",
                "\"10.0.0.0/33\" is not a network",
            ),
            b(
                "\"UK\"",
                "jurisdictions.EU",
                "\"UK\" is not an ISO 3166-1 alpha-2 country code",
            ),
            b(
                "China",
                "networks.10.20.0.0/16",
                "\"China\" is not an ISO 3166-1 alpha-2",
            ),
            b(
                "/40",
                "networks.bad-net",
                "\"10.30.0.0/40\" is not a network",
            ),
            b("partners/*", "recipients.bureau.identities", "no wildcards"),
            b(
                "/payments//",
                "datasets.payments.match",
                "is not a normalised path",
            ),
            b(
                "cn-stor\"",
                "datasets.payments.upstream",
                "no upstream named \"cn-stor\" (defined: cn-store)",
            ),
            b(
                "enforced",
                "datasets.payments.mode",
                "\"enforced\" is not one of",
            ),
            b(
                "/payments2/",
                "datasets.payments",
                "dataset \"payments\" is defined twice",
            )
            .at(line(BROKEN, "/payments2/") - 1),
            b(
                "pre_ticked",
                "consent.accept_methods",
                "\"pre_ticked\" is not consent",
            ),
            b(
                "[log]",
                "log.signing_key",
                "required while log.pseudonymize is on",
            ),
            o(
                "ftp://",
                "upstreams.us-store.url",
                "the scheme must be http or https",
            ),
            o(
                "/rates/./x",
                "datasets.rates.match",
                "is not a normalised path",
            ),
            o(
                "maybe",
                "datasets.rates.third_party",
                "\"maybe\" is not one of",
            ),
        ],
    );
}

impl Expected<'_> {
    /// The same error on another line (when the snippet that finds the line is not on it).
    fn at(self, line: usize) -> Self {
        Expected { line, ..self }
    }
}

#[test]
fn an_include_cycle_is_reported_where_it_closes() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.toml",
        &format!("include = [\"b.toml\"]\n{MINIMAL}"),
    );
    write(dir.path(), "b.toml", "# b\n\ninclude = [\"a.toml\"]\n");
    let out = check(dir.path(), &["a.toml"]);
    assert_errors(
        &out,
        "a.toml",
        &[Expected {
            file: "b.toml",
            line: 3,
            rule: "include",
            fragment: "\"a.toml\" includes itself (cycle through a.toml)",
        }],
    );
}

#[test]
fn a_toml_syntax_error_reports_its_line_and_nothing_it_hides() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "p.toml",
        "[policy]\nname = \"p\"\n\nhome = \"CN\n[log]\n",
    );
    let out = check(dir.path(), &["p.toml"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("p.toml:4: "), "{err}");
    assert!(err.ends_with("p.toml: 1 error(s)\n"), "{err}");
}

#[test]
fn a_value_of_the_wrong_type_reports_its_line_and_path() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "p.toml",
        &format!("{MINIMAL}checkpoint_every = \"often\"\n"),
    );
    let out = check(dir.path(), &["p.toml"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("p.toml:7: log.checkpoint_every: invalid type: string \"often\""),
        "{err}"
    );
    assert!(err.ends_with("p.toml: 1 error(s)\n"), "{err}");
}

#[test]
fn an_unreadable_file_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = check(dir.path(), &["missing.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot read policy file missing.toml"),
        "{}",
        stderr(&out)
    );
    // A directory, and an include that names a missing file.
    std::fs::create_dir(dir.path().join("policy.d")).unwrap();
    assert_eq!(check(dir.path(), &["policy.d"]).status.code(), Some(2));
    write(
        dir.path(),
        "p.toml",
        &format!("include = [\"gone.toml\"]\n{MINIMAL}"),
    );
    let out = check(dir.path(), &["p.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("gone.toml"), "{}", stderr(&out));
    // The files after an unreadable one are still checked, and every unreadable one named.
    write(dir.path(), "good.toml", MINIMAL);
    let out = check(dir.path(), &["missing.toml", "good.toml", "other.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("missing.toml") && err.contains("other.toml"),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("good.toml: ok"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn every_file_is_checked_and_any_error_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "good.toml", MINIMAL);
    write(dir.path(), "bad.toml", &MINIMAL.replace("\"CN\"", "\"XX\""));
    let out = check(dir.path(), &["bad.toml", "good.toml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("good.toml: ok: policy \"p\""),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr(&out).starts_with("bad.toml:3: policy.home: \"XX\" is neither"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_help_says_what_is_checked_and_what_the_exit_codes_mean() {
    let out = Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
        .args(["check", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "FILE:LINE: RULE: MESSAGE",
        "--offline",
        "signing_key",
        "warning:",
        "include",
        "Exit status",
        "0 ",
        "1 ",
        "2 ",
    ] {
        assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
    }
}

/// A deployment as `serve` would find it: `certs init` output, copies of its CA and server
/// pair for the upstream's own trust anchor and client certificate (so that each setting names
/// a file of its own), a geolocation database and a consent file.
const DEPLOYED: &str = r#"[policy]
name = "deployed"
home = "CN"

[geo]
database = "geo/country.mmdb"

[[networks]]
cidr = "127.0.0.2/32"
country = "CN"

[[upstreams]]
name = "cn-store"
url = "https://127.0.0.2:9443"
ca = "certs/upstream-ca.crt"
client_cert = "certs/upstream-client.crt"
client_key = "certs/upstream-client.key"

[[recipients]]
id = "app"
relation = "first_party"
country = "CN"
networks = ["10.1.0.0/16"]

[consent]
store = "file:data/consents.jsonl"

[log]
path = "logs/decisions.jsonl"
signing_key = "certs/log-signing.key"

[admin]
token_file = "certs/admin.token"

[tls]
cert = "certs/server.crt"
key = "certs/server.key"
client_ca = "certs/ca.crt"
"#;

const CONSENT_LINE: &str = r#"{"id":"c1","subject":"u1","recipient":"app","purposes":["p"],"categories":["user"],"destinations":["CN"],"method":"explicit","granted_at":"2026-01-01T00:00:00Z","expires_at":"2027-01-01T00:00:00Z"}"#;

fn deploy(dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_residency-proxy"))
        .args(["certs", "init", dir.join("certs").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let certs = dir.join("certs");
    for (from, to) in [
        ("ca.crt", "upstream-ca.crt"),
        ("server.crt", "upstream-client.crt"),
        ("server.key", "upstream-client.key"),
    ] {
        std::fs::copy(certs.join(from), certs.join(to)).unwrap();
    }
    std::fs::create_dir(dir.join("geo")).unwrap();
    std::fs::write(
        dir.join("geo/country.mmdb"),
        crate::support::mmdb::maxmind_country_db(&[("10.1.0.0/16", "CN")]),
    )
    .unwrap();
    std::fs::create_dir(dir.join("data")).unwrap();
    write(dir, "data/consents.jsonl", &format!("{CONSENT_LINE}\n"));
    write(dir, "policy.toml", DEPLOYED);
}

/// The settings of `DEPLOYED` that name a file, with the file and a snippet of their line.
const NAMED_FILES: [(&str, &str, &str); 10] = [
    ("certs/log-signing.key", "log.signing_key", "signing_key ="),
    (
        "certs/server.crt",
        "tls.cert",
        "cert = \"certs/server.crt\"",
    ),
    ("certs/server.key", "tls.key", "key = \"certs/server.key\""),
    ("certs/ca.crt", "tls.client_ca", "client_ca ="),
    (
        "certs/upstream-ca.crt",
        "upstreams.cn-store.ca",
        "ca = \"certs/upstream-ca",
    ),
    (
        "certs/upstream-client.crt",
        "upstreams.cn-store.client_cert",
        "client_cert =",
    ),
    (
        "certs/upstream-client.key",
        "upstreams.cn-store.client_key",
        "client_key =",
    ),
    ("geo/country.mmdb", "geo.database", "database ="),
    ("data/consents.jsonl", "consent.store", "store ="),
    ("certs/admin.token", "admin.token_file", "token_file ="),
];

#[test]
fn a_complete_deployment_passes_and_each_missing_file_fails_with_its_rule() {
    let dir = tempfile::tempdir().unwrap();
    deploy(dir.path());
    let out = check(dir.path(), &["policy.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("policy.toml: ok: policy \"deployed\""));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));

    for (file, rule, snippet) in NAMED_FILES {
        let path = dir.path().join(file);
        let aside = dir.path().join("aside");
        std::fs::rename(&path, &aside).unwrap();
        let out = check(dir.path(), &["policy.toml"]);
        assert_errors(
            &out,
            "policy.toml",
            &[Expected {
                file: "policy.toml",
                line: line(DEPLOYED, snippet),
                rule,
                fragment: file,
            }],
        );
        assert!(
            stderr(&out).contains("No such file"),
            "{file}: {}",
            stderr(&out)
        );
        std::fs::rename(&aside, &path).unwrap();
    }

    // Without any of them, the policy itself is still valid: what CI can check.
    for (file, _, _) in NAMED_FILES {
        std::fs::remove_file(dir.path().join(file)).unwrap();
    }
    let out = check(dir.path(), &["--offline", "policy.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("policy.toml: ok: policy \"deployed\""));
    // The database is not read, so the recipient's network is not judged either.
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[test]
fn a_named_file_that_does_not_parse_fails_check() {
    let dir = tempfile::tempdir().unwrap();
    deploy(dir.path());
    let certs = dir.path().join("certs");
    let broken: [(&str, &[u8], &str, &str, &str); 6] = [
        (
            "certs/log-signing.key",
            b"not a key",
            "log.signing_key",
            "signing_key =",
            "is not a PKCS#8 PEM private key",
        ),
        (
            "certs/server.crt",
            b"-----BEGIN NOTHING-----\n",
            "tls.cert",
            "cert = \"certs/server.crt\"",
            "holds no usable PEM item",
        ),
        (
            "geo/country.mmdb",
            b"not a database",
            "geo.database",
            "database =",
            "is not a usable MaxMind DB",
        ),
        (
            "certs/admin.token",
            b"\n",
            "admin.token_file",
            "token_file =",
            "is empty",
        ),
        // A key that is not the certificate's: both files read, the pair does not hold.
        (
            "certs/server.key",
            &std::fs::read(certs.join("ca.key")).unwrap(),
            "tls.key",
            "key = \"certs/server.key\"",
            "cannot be used together",
        ),
        (
            "certs/upstream-client.key",
            &std::fs::read(certs.join("ca.key")).unwrap(),
            "upstreams.cn-store.client_key",
            "client_key =",
            "cannot be used together",
        ),
    ];
    for (file, bytes, rule, snippet, fragment) in broken {
        let path = dir.path().join(file);
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let out = check(dir.path(), &["policy.toml"]);
        assert_errors(
            &out,
            "policy.toml",
            &[Expected {
                file: "policy.toml",
                line: line(DEPLOYED, snippet),
                rule,
                fragment,
            }],
        );
        std::fs::write(&path, good).unwrap();
    }
}

#[test]
fn a_decision_log_that_cannot_be_created_fails_check() {
    let dir = tempfile::tempdir().unwrap();
    deploy(dir.path());
    // `logs` is a file, so serve could not create logs/decisions.jsonl.
    write(dir.path(), "logs", "");
    let out = check(dir.path(), &["policy.toml"]);
    assert_errors(
        &out,
        "policy.toml",
        &[Expected {
            file: "policy.toml",
            line: line(DEPLOYED, "path = \"logs/"),
            rule: "log.path",
            fragment: "logs is not a folder",
        }],
    );
}

#[test]
fn malformed_consent_lines_are_warnings_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    deploy(dir.path());
    write(
        dir.path(),
        "data/consents.jsonl",
        &format!("{CONSENT_LINE}\n{{\"id\": \"c2\"\n"),
    );
    let out = check(dir.path(), &["policy.toml"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.starts_with("warning: data/consents.jsonl:2: skipped: "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn uk_is_refused_with_the_iso_code_gb() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[policy]\nname = \"p\"\nhome = \"UK\"\n\n[log]\npseudonymize = false\n";
    write(dir.path(), "p.toml", text);
    let out = check(dir.path(), &["--offline", "p.toml"]);
    assert_errors(
        &out,
        "p.toml",
        &[Expected {
            file: "p.toml",
            line: 3,
            rule: "policy.home",
            fragment: "\"UK\" is neither a declared jurisdiction nor an ISO 3166-1 alpha-2 country code; the ISO code for the United Kingdom is GB",
        }],
    );
}

/// A recipient whose network nothing locates is refused `location_unknown` on every request
/// under `unknown_location = "deny"`: valid, but worth a warning.
#[test]
fn a_recipient_network_nothing_locates_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{MINIMAL}\n[[networks]]\ncidr = \"10.0.1.0/24\"\ncountry = \"CN\"\n\n\
         [[recipients]]\nid = \"app\"\nrelation = \"first_party\"\ncountry = \"CN\"\n\
         networks = [\"127.0.0.10/32\",\n  \"10.0.0.0/16\",\n  \"10.0.1.0/24\"]\n"
    );
    write(dir.path(), "p.toml", &text);
    for args in [&["p.toml"][..], &["--offline", "p.toml"]] {
        let out = check(dir.path(), args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(stdout(&out).starts_with("p.toml: ok: "), "{}", stdout(&out));
        let warnings: Vec<&str> = err.lines().collect();
        assert_eq!(
            warnings,
            [
                format!(
                    "warning: p.toml:{}: recipients.app.networks: recipient \"app\": network \
                     127.0.0.10/32 is located by no [[networks]] override (and the policy has no \
                     geolocation database); with unknown_location = \"deny\", requests from there \
                     are refused location_unknown",
                    line(&text, "127.0.0.10/32")
                ),
                // 10.0.0.0/16 without the override's 10.0.1.0/24: eight blocks.
                format!(
                    "warning: p.toml:{}: recipients.app.networks: recipient \"app\": part of \
                     network 10.0.0.0/16 (10.0.0.0/24 and 7 more block(s)) is located by no \
                     [[networks]] override (and the policy has no geolocation database); with \
                     unknown_location = \"deny\", requests from there are refused \
                     location_unknown",
                    line(&text, "\"10.0.0.0/16\"")
                ),
            ],
            "{err}"
        );
    }
}

#[test]
fn the_geolocation_database_locates_recipient_networks_too() {
    let dir = tempfile::tempdir().unwrap();
    deploy(dir.path());
    // Half of 10.1.0.0/15 is in the database (10.1.0.0/16), half nowhere.
    write(
        dir.path(),
        "policy.toml",
        &DEPLOYED.replace("\"10.1.0.0/16\"", "\"10.1.0.0/16\", \"10.0.0.0/15\""),
    );
    let out = check(dir.path(), &["policy.toml"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(
        err,
        format!(
            "warning: policy.toml:{}: recipients.app.networks: recipient \"app\": part of network \
             10.0.0.0/15 (10.0.0.0/16) is located by no [[networks]] override nor the geolocation \
             database; with unknown_location = \"deny\", requests from there are refused \
             location_unknown\n",
            line(DEPLOYED, "10.1.0.0/16")
        )
    );
}

// Regressions: each of these once crashed `check` or sent it astray.

/// `"18446744073709551615h"` overflowed the conversion to seconds and panicked.
#[test]
fn regression_a_duration_too_long_for_u64_crashed_check() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "p.toml",
        &format!("{MINIMAL}\n[proxy]\nconnect_timeout = \"18446744073709551615h\"\n"),
    );
    let out = check(dir.path(), &["p.toml"]);
    assert_errors(
        &out,
        "p.toml",
        &[Expected {
            file: "p.toml",
            line: 9,
            rule: "proxy.connect_timeout",
            fragment: "\"18446744073709551615h\" is too long a duration",
        }],
    );
}

/// A recipient naming the same identity (or network) twice indexed past the recipients
/// compiled so far.
#[test]
fn regression_a_recipient_listing_an_identity_twice_crashed_check() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{MINIMAL}\n[[recipients]]\nid = \"r\"\nrelation = \"third_party\"\n\
         identities = [\"spiffe://x/r\",\n  \"spiffe://x/r\"]\nnetworks = [\"10.0.0.0/8\",\n\n  \"10.0.0.0/8\"]\n"
    );
    write(dir.path(), "p.toml", &text);
    let out = check(dir.path(), &["p.toml"]);
    assert_errors(
        &out,
        "p.toml",
        &[
            Expected {
                file: "p.toml",
                line: 12,
                rule: "recipients.r.identities",
                fragment: "identity \"spiffe://x/r\" already belongs to this recipient: it is listed twice",
            },
            Expected {
                file: "p.toml",
                line: 15,
                rule: "recipients.r.networks",
                fragment: "network 10.0.0.0/8 already belongs to this recipient",
            },
        ],
    );
}

/// A duplicate of a dataset that had failed to compile was not reported, because only
/// compiled datasets were compared.
#[test]
fn regression_a_duplicate_of_an_invalid_dataset_was_not_reported() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = "\n[[datasets]]\nname = \"d\"\nmatch = { path_prefix = \"/d/\" }\n\
                   upstream = \"u\"\ncategory = \"c\"\nresident = false\ncross_border = \"allow\"\nthird_party = \"allow\"\n";
    write(
        dir.path(),
        "p.toml",
        &format!("{MINIMAL}{dataset}{dataset}"),
    );
    let out = check(dir.path(), &["p.toml"]);
    assert_errors(
        &out,
        "p.toml",
        &[
            Expected {
                file: "p.toml",
                line: 11,
                rule: "datasets.d.upstream",
                fragment: "no upstream named \"u\" (defined: none)",
            },
            Expected {
                file: "p.toml",
                line: 18,
                rule: "datasets.d",
                fragment: "dataset \"d\" is defined twice",
            },
        ],
    );
}

/// Files that all include each other were loaded once per path through them: factorially
/// often (seven files took seconds and printed thousands of errors; ten never finished).
#[test]
fn regression_files_including_each_other_were_loaded_factorially() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..10).map(|i| format!("f{i}.toml")).collect();
    let include = format!("include = {names:?}\n");
    for n in &names {
        write(dir.path(), n, &include);
    }
    write(dir.path(), "f0.toml", &format!("{include}{MINIMAL}"));
    let out = check(dir.path(), &["f0.toml"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // f0 includes f1..f9 once each; every other include is refused, once, where it stands.
    let cycles = err.matches("includes itself").count();
    let repeats = err.matches("is already included").count();
    assert_eq!(cycles + repeats, err.lines().count() - 1, "{err}");
    assert_eq!(cycles + repeats, 10 * 10 - 9, "{err}");
}

/// A cycle spelled through different paths (`sub/../a.toml`) never met the same path twice,
/// and recursed until the path was too long to open.
#[test]
fn regression_a_cycle_through_respelled_paths_did_not_stop() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    write(dir.path(), "a.toml", "include = [\"sub/../a.toml\"]\n");
    let out = check(dir.path(), &["a.toml"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("include: \"sub/../a.toml\" is nested more than 16 includes deep"),
        "{err}"
    );
}
