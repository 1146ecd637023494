//! Bulk objects offline, run as the real binary: `explain --body` puts an object through the
//! proxy's own filter and counts the records kept and dropped by reason (JSON lines, CSV,
//! gzip and zstd, audit mode; consents from a file, a SQLite registry and a PostgreSQL one),
//! refuses a body for a request that is not filtered, and `test` checks a case's body
//! against expected counts, naming the count that differs.

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_residency-proxy"));
    c.env_remove("RESIDENCY_CONSENT_STORE");
    c
}

/// A policy at home in CN: a foreign bureau (127.0.0.20, US), the platform's own app
/// (127.0.0.10, CN), exports of JSON lines and of CSV, the same JSON lines in audit mode, and
/// a dataset naming one subject per request. `STORE` is the consent store line.
const POLICY: &str = r#"
[policy]
name = "bulk-explain"
home = "CN"
[log]
pseudonymize = false
STORE
[[networks]]
cidr = "127.0.0.2/32"
country = "CN"
[[networks]]
cidr = "127.0.0.10/32"
country = "CN"
[[networks]]
cidr = "127.0.0.20/32"
country = "US"
[[upstreams]]
name = "cn-store"
url = "http://127.0.0.2:9000"
[[recipients]]
id = "platform-app"
relation = "first_party"
country = "CN"
networks = ["127.0.0.10/32"]
[[recipients]]
id = "credit-bureau-us"
relation = "third_party"
country = "US"
networks = ["127.0.0.20/32"]
[[datasets]]
name = "spending-exports"
match = { path_prefix = "/exports/spending/" }
upstream = "cn-store"
category = "user.financial"
records = { format = "jsonl", subject = "user_id" }
[[datasets]]
name = "spending-csv"
match = { path_prefix = "/exports/csv/" }
upstream = "cn-store"
category = "user.financial"
records = { format = "csv", subject = "user_id" }
[[datasets]]
name = "spending-parquet"
match = { path_prefix = "/exports/parquet/" }
upstream = "cn-store"
category = "user.financial"
records = { format = "parquet", subject = "user.id" }
[[datasets]]
name = "spending-trial"
match = { path_prefix = "/exports/trial/" }
upstream = "cn-store"
category = "user.financial"
records = { format = "jsonl", subject = "user_id" }
mode = "audit"
[[datasets]]
name = "payments"
match = { path_prefix = "/payments/" }
upstream = "cn-store"
category = "user.financial"
subject = { path_segment = 2 }
"#;

/// The consents in force on 2026-06-01: one state each of what step 8 checks.
fn consents() -> String {
    let line = |id: &str, subject: &str, extra: &str| {
        format!(
            r#"{{"id":"{id}","subject":"{subject}","recipient":"credit-bureau-us","purposes":["credit_scoring"],"categories":["user.financial"],"destinations":["US"],"method":"explicit","granted_at":"2026-01-01T00:00:00Z","expires_at":"2027-01-01T00:00:00Z"{extra}}}"#
        )
    };
    [
        line("c-ok", "u-ok", ""),
        line("c-ok2", "u-ok2", ""),
        line("c-rev", "u-rev", r#","revoked_at":"2026-03-01T00:00:00Z""#),
        line("c-exp", "u-exp", "").replace("2027-01-01T00:00:00Z", "2026-05-01T00:00:00Z"),
        line("c-tick", "u-tick", "").replace("explicit", "pre_ticked"),
        line("c-de", "u-de", "").replace(r#"["US"]"#, r#"["DE"]"#),
        line("c-mkt", "u-mkt", "").replace("credit_scoring", "marketing"),
    ]
    .join("\n")
        + "\n"
}

/// The month's purchases: which of them leave, and why the others do not.
const JSONL: &[(&str, &str)] = &[
    (r#"{"user_id":"u-ok","amount":1}"#, "kept"),
    (r#"{"user_id":"u-rev","amount":2}"#, "consent_revoked"),
    (r#"{"user_id":"u-none","amount":3}"#, "consent_missing"),
    (r#"{"user_id":"u-ok2","amount":4}"#, "kept"),
    (r#"{"user_id":"u-exp","amount":5}"#, "consent_expired"),
    (
        r#"{"user_id":"u-tick","amount":6}"#,
        "consent_method_invalid",
    ),
    (r#"{"user_id":"u-de","amount":7}"#, "consent_scope_mismatch"),
    (
        r#"{"user_id":"u-mkt","amount":8}"#,
        "consent_scope_mismatch",
    ),
    (r#"{"amount":9}"#, "no_subject"),
    (r#"{"user_id":null,"amount":10}"#, "no_subject"),
    (r#"{"user_id":"u-ok","amount":11"#, "unparsable"),
    (r#"{"user_id":"u-ok","amount":12}"#, "kept"),
    (r#"{"user_id":"u-none","amount":13}"#, "consent_missing"),
];

fn jsonl_body() -> String {
    JSONL.iter().map(|(l, _)| format!("{l}\n")).collect()
}

fn jsonl_kept() -> String {
    JSONL
        .iter()
        .filter(|(_, fate)| *fate == "kept")
        .map(|(l, _)| format!("{l}\n"))
        .collect()
}

/// What the JSON-lines body must give: records dropped by reason.
fn jsonl_dropped() -> Value {
    serde_json::json!({
        "consent_expired": 1,
        "consent_method_invalid": 1,
        "consent_missing": 2,
        "consent_revoked": 1,
        "consent_scope_mismatch": 2,
        "no_subject": 2,
        "unparsable": 1,
    })
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// The policy with `store` as its consent store line, and the consents as a file.
    fn new(store: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("policy.toml"),
            POLICY.replace("STORE", store),
        )
        .unwrap();
        std::fs::write(dir.path().join("consents.jsonl"), consents()).unwrap();
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// `explain` of the bureau asking for `path` for credit scoring on 2026-06-01, with the
    /// consents file unless `registry`, and `extra` arguments.
    fn explain(&self, path: &str, registry: bool, extra: &[&str]) -> Output {
        let mut c = bin();
        c.current_dir(self.dir.path())
            .args(["explain", "--policy", "policy.toml", "--path", path])
            .args(["--client-ip", "127.0.0.20", "--purpose", "credit_scoring"])
            .args(["--now", "2026-06-01T00:00:00Z"]);
        if !registry {
            c.args(["--consents", "consents.jsonl"]);
        }
        c.args(extra).output().unwrap()
    }

    /// `explain --json`'s `body`, asserting success.
    fn body_json(&self, path: &str, registry: bool, extra: &[&str]) -> (Value, String) {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        let out = self.explain(path, registry, &args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "{}{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["record"]["reason"], "consent_filtered", "{v}");
        (v["body"].clone(), stderr)
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn gunzip(bytes: &[u8]) -> String {
    let mut s = String::new();
    std::io::Read::read_to_string(&mut flate2::read::MultiGzDecoder::new(bytes), &mut s).unwrap();
    s
}

/// The JSON-lines body's counts, whatever the store they were read from.
fn assert_jsonl_counts(body: &Value) {
    assert_eq!(body["records"], 13, "{body}");
    assert_eq!(body["kept"], 3, "{body}");
    assert_eq!(body["dropped"], jsonl_dropped(), "{body}");
    assert_eq!(body["subjects_kept"], 2, "{body}");
    assert_eq!(body["would_drop"], serde_json::json!({}), "{body}");
}

#[test]
fn explain_body_counts_each_jsonl_record_by_its_subjects_consent() {
    let f = Fixture::new("");
    let body = f.write("2026-11.jsonl", jsonl_body().as_bytes());
    let (b, _) = f.body_json(
        "/exports/spending/2026-11.jsonl",
        false,
        &["--body", body.to_str().unwrap(), "--out", "leaves.jsonl"],
    );
    assert_jsonl_counts(&b);
    assert_eq!(b["kept_bytes"], jsonl_kept().len(), "{b}");
    assert_eq!(b["format"], "jsonl");
    assert_eq!(b["compression"], "identity");
    // What would leave, exactly: the consented users' records, in order.
    assert_eq!(
        std::fs::read_to_string(f.path("leaves.jsonl")).unwrap(),
        jsonl_kept()
    );

    // The text output says the same, a line per reason.
    let out = f.explain(
        "/exports/spending/2026-11.jsonl",
        false,
        &["--body", body.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("records:  13 read, 3 kept, 10 dropped"),
        "{text}"
    );
    assert!(
        text.contains("2 distinct subjects under a consent"),
        "{text}"
    );
    for (reason, n) in jsonl_dropped().as_object().unwrap() {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("dropped {reason} ")))
            .unwrap_or_else(|| panic!("no line for {reason}:\n{text}"));
        assert!(line.trim_end().ends_with(&format!(" {n}")), "{line}");
    }
}

#[test]
fn explain_body_filters_csv_keeping_its_header_quotes_and_line_ends() {
    let f = Fixture::new("");
    let header = "user_id,merchant,amount\r\n";
    let kept1 = "u-ok,\"Metro, Shanghai\",1\r\n";
    let kept2 = "\"u-ok2\",\"a \"\"quoted\"\" note\nover two lines\",3\r\n";
    let csv = [
        header,
        kept1,
        "u-none,Didi,2\r\n",
        kept2,
        "u-tick,JD,4\r\n",
        ",Railway,5\r\n",
        "u-ok,too,many,fields\r\n",
        "u-rev,\"Apple\",6\r\n",
    ]
    .concat();
    let body = f.write("2026-11.csv", csv.as_bytes());
    let (b, _) = f.body_json(
        "/exports/csv/2026-11.csv",
        false,
        &["--body", body.to_str().unwrap(), "--out", "leaves.csv"],
    );
    assert_eq!(b["format"], "csv");
    assert_eq!(b["records"], 7, "{b}");
    assert_eq!(b["kept"], 2, "{b}");
    assert_eq!(
        b["dropped"],
        serde_json::json!({
            "consent_method_invalid": 1,
            "consent_missing": 1,
            "consent_revoked": 1,
            "no_subject": 1,
            "unparsable": 1,
        }),
        "{b}"
    );
    assert_eq!(b["subjects_kept"], 2, "{b}");
    assert_eq!(
        std::fs::read_to_string(f.path("leaves.csv")).unwrap(),
        [header, kept1, kept2].concat()
    );
}

#[test]
fn explain_body_decompresses_as_the_proxy_tells_from_the_key_or_content_encoding() {
    let f = Fixture::new("");
    let gz = f.write("2026-11.jsonl.gz", &gzip(jsonl_body().as_bytes()));
    let gz = gz.to_str().unwrap();

    // A key ending .gz.
    let (b, _) = f.body_json(
        "/exports/spending/2026-11.jsonl.gz",
        false,
        &["--body", gz, "--out", "leaves.jsonl.gz"],
    );
    assert_jsonl_counts(&b);
    assert_eq!(b["compression"], "gzip");
    // The filtered object is compressed as the object was.
    let out = std::fs::read(f.path("leaves.jsonl.gz")).unwrap();
    assert_eq!(b["bytes_out"], out.len());
    assert_eq!(gunzip(&out), jsonl_kept());

    // A Content-Encoding under a plain key.
    let (b, _) = f.body_json(
        "/exports/spending/2026-11.jsonl",
        false,
        &["--body", gz, "--header", "Content-Encoding: gzip"],
    );
    assert_jsonl_counts(&b);

    // zstd, by its key.
    let zst = zstd::encode_all(jsonl_body().as_bytes(), 3).unwrap();
    let zst = f.write("2026-11.jsonl.zst", &zst);
    let (b, _) = f.body_json(
        "/exports/spending/2026-11.jsonl.zst",
        false,
        &["--body", zst.to_str().unwrap()],
    );
    assert_jsonl_counts(&b);
    assert_eq!(b["compression"], "zstd");

    // Nothing tells the proxy: it reads the bytes as they are, and nothing leaves; explain
    // says how to tell it.
    let (b, stderr) = f.body_json("/exports/spending/2026-11.jsonl", false, &["--body", gz]);
    assert_eq!(b["kept"], 0, "{b}");
    assert_eq!(b["compression"], "identity");
    assert!(
        stderr.contains("gzip-compressed") && stderr.contains("Content-Encoding: gzip"),
        "{stderr}"
    );

    // An encoding the filter cannot undo is refused.
    let out = f.explain(
        "/exports/spending/2026-11.jsonl",
        false,
        &["--body", gz, "--header", "Content-Encoding: br"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"br\""));
}

/// A Parquet object of `groups` row groups, each row a purchase of the subject named.
fn parquet(groups: &[&[&str]]) -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = parquet::schema::parser::parse_message_type(
        "message purchase { required group user { required binary id (UTF8); } required int64 amount; }",
    )
    .unwrap();
    let props = WriterProperties::builder().build();
    let mut w = SerializedFileWriter::new(Vec::new(), schema.into(), props.into()).unwrap();
    for (k, subjects) in groups.iter().enumerate() {
        let mut rg = w.next_row_group().unwrap();
        let mut c = rg.next_column().unwrap().unwrap();
        let ids: Vec<ByteArray> = subjects.iter().map(|s| ByteArray::from(*s)).collect();
        c.typed::<ByteArrayType>()
            .write_batch(&ids, None, None)
            .unwrap();
        c.close().unwrap();
        let mut c = rg.next_column().unwrap().unwrap();
        let amounts: Vec<i64> = (0..subjects.len() as i64)
            .map(|i| 100 * k as i64 + i)
            .collect();
        c.typed::<Int64Type>()
            .write_batch(&amounts, None, None)
            .unwrap();
        c.close().unwrap();
        rg.close().unwrap();
    }
    w.into_inner().unwrap()
}

#[test]
fn explain_body_filters_parquet_row_groups() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = Fixture::new("");
    let object = parquet(&[
        &["u-ok", "u-none", "u-ok2"],
        &["u-tick", "u-ok"],
        &["u-rev"],
    ]);
    let body = f.write("2026-11.parquet", &object);
    let (b, _) = f.body_json(
        "/exports/parquet/2026-11.parquet",
        false,
        &["--body", body.to_str().unwrap(), "--out", "leaves.parquet"],
    );
    assert_eq!(b["format"], "parquet");
    assert_eq!(b["records"], 6, "{b}");
    assert_eq!(b["kept"], 3, "{b}");
    assert_eq!(
        b["dropped"],
        serde_json::json!({"consent_method_invalid": 1, "consent_missing": 1, "consent_revoked": 1}),
        "{b}"
    );
    assert_eq!(b["subjects_kept"], 2, "{b}");
    // What would leave is a Parquet file of the kept rows; a row group with none is left out.
    let out = bytes::Bytes::from(std::fs::read(f.path("leaves.parquet")).unwrap());
    let reader = SerializedFileReader::new(out).unwrap();
    assert_eq!(reader.metadata().file_metadata().num_rows(), 3);
    assert_eq!(reader.metadata().num_row_groups(), 2);
}

#[test]
fn explain_body_in_audit_mode_drops_nothing_and_counts_would_drops() {
    let f = Fixture::new("");
    let input = jsonl_body();
    let body = f.write("2026-11.jsonl", input.as_bytes());
    let (b, _) = f.body_json(
        "/exports/trial/2026-11.jsonl",
        false,
        &["--body", body.to_str().unwrap(), "--out", "leaves.jsonl"],
    );
    assert_eq!(b["audit"], true, "{b}");
    assert_eq!(b["kept"], 13, "{b}");
    assert_eq!(b["dropped"], serde_json::json!({}), "{b}");
    assert_eq!(b["would_drop"], jsonl_dropped(), "{b}");
    assert_eq!(b["subjects_kept"], 2, "{b}");
    // u-rev, u-none, u-exp, u-tick, u-de, u-mkt leave without a consent.
    assert_eq!(b["subjects_would_drop"], 6, "{b}");
    assert_eq!(
        std::fs::read_to_string(f.path("leaves.jsonl")).unwrap(),
        input
    );
}

#[test]
fn explain_body_for_a_request_that_is_not_filtered_exits_2_naming_its_decision() {
    let f = Fixture::new("");
    let body = f.write("2026-11.jsonl", jsonl_body().as_bytes());
    let body = body.to_str().unwrap();
    // One subject's records, without consent: refused whole.
    let out = f.explain("/payments/u-none/2026-11.json", false, &["--body", body]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("decided deny consent_missing")
            && stderr.contains("datasets.payments.cross_border")
            && stderr.contains("nothing would leave"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // The platform reading its own export at home: it leaves whole, nothing to filter.
    let out = bin()
        .current_dir(f.dir.path())
        .args(["explain", "--policy", "policy.toml"])
        .args(["--path", "/exports/spending/2026-11.jsonl"])
        .args(["--client-ip", "127.0.0.10", "--body", body])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("decided allow domestic") && stderr.contains("would leave whole"),
        "{stderr}"
    );
}

/// The consents imported into `store` with the real `consent import`.
fn import(f: &Fixture, store: &str) {
    let out = bin()
        .args(["consent", "import", "--store", store])
        .arg(f.path("consents.jsonl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn explain_body_reads_the_subjects_from_a_sqlite_registry() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("consents.db");
    let store = format!("sqlite:{}", db.display());
    let f = Fixture::new(&format!("[consent]\nstore = \"{store}\""));
    import(&f, &store);
    let body = f.write("2026-11.jsonl", jsonl_body().as_bytes());
    let (b, _) = f.body_json(
        "/exports/spending/2026-11.jsonl",
        true,
        &["--body", body.to_str().unwrap()],
    );
    assert_jsonl_counts(&b);

    // A registry that is not there is an error, not a body of consent_missing drops (and
    // explain creates no file).
    let gone = dir.path().join("gone.db");
    let f = Fixture::new(&format!("[consent]\nstore = \"sqlite:{}\"", gone.display()));
    let body = f.write("2026-11.jsonl", jsonl_body().as_bytes());
    let out = f.explain(
        "/exports/spending/2026-11.jsonl",
        true,
        &["--body", body.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("consent store"), "{stderr}");
    assert!(!gone.exists());
}

#[tokio::test]
async fn explain_body_reads_the_subjects_from_a_postgres_registry() {
    let Some(server) = crate::support::registry::postgres_url(
        "explain_body_reads_the_subjects_from_a_postgres_registry",
    ) else {
        return;
    };
    let url = crate::support::registry::fresh_database(&server).await;
    let f = Fixture::new(&format!("[consent]\nstore = \"{url}\""));
    let (store, body) = (
        url.clone(),
        f.write("2026-11.jsonl", jsonl_body().as_bytes()),
    );
    let b = tokio::task::spawn_blocking(move || {
        import(&f, &store);
        f.body_json(
            "/exports/spending/2026-11.jsonl",
            true,
            &["--body", body.to_str().unwrap()],
        )
        .0
    })
    .await
    .unwrap();
    assert_jsonl_counts(&b);
}

/// A suite of one JSON-lines case and one CSV case with their bodies beside it; `counts` is
/// the JSON-lines case's `expect.records`.
fn suite(dir: &Path, counts: &str) -> PathBuf {
    std::fs::write(dir.join("policy.toml"), POLICY.replace("STORE", "")).unwrap();
    std::fs::create_dir_all(dir.join("tests/bodies")).unwrap();
    std::fs::write(
        dir.join("tests/bodies/2026-11.jsonl.gz"),
        gzip(jsonl_body().as_bytes()),
    )
    .unwrap();
    std::fs::write(
        dir.join("tests/bodies/2026-11.csv"),
        "user_id,amount\nu-ok,1\nu-none,2\n",
    )
    .unwrap();
    let consents: String = consents()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let mut t = String::from("[[consents]]\n");
            for (k, v) in v.as_object().unwrap() {
                t += &format!("{k} = {v}\n");
            }
            t
        })
        .collect();
    let text = format!(
        r#"policy = "../policy.toml"
now = "2026-06-01T00:00:00Z"

{consents}
[[cases]]
name = "the bureau gets the consented users' purchases"
request = {{ path = "/exports/spending/2026-11.jsonl.gz", client_ip = "127.0.0.20", purpose = "credit_scoring" }}
consents = ["c-ok", "c-ok2", "c-rev", "c-exp", "c-tick", "c-de", "c-mkt"]
body = "bodies/2026-11.jsonl.gz"
[cases.expect]
decision = "allow"
reason = "consent_filtered"
records = {counts}

[[cases]]
name = "a CSV export keeps only the consented rows"
request = {{ path = "/exports/csv/2026-11.csv", client_ip = "127.0.0.20", purpose = "credit_scoring" }}
consents = ["c-ok"]
body = "bodies/2026-11.csv"
expect = {{ decision = "allow", reason = "consent_filtered", records = {{ kept = 1, consent_missing = 1, dropped = 1 }} }}
"#
    );
    let path = dir.join("tests/suite.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn test_cmd(suite: &Path) -> (Option<i32>, String) {
    let out = bin().arg("test").arg(suite).output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn test_checks_a_case_body_against_its_expected_counts() {
    let dir = tempfile::tempdir().unwrap();
    let exact = "{ kept = 3, dropped = 10, subjects = 2, consent_missing = 2, consent_revoked = 1, \
        consent_expired = 1, consent_method_invalid = 1, consent_scope_mismatch = 2, \
        no_subject = 2, unparsable = 1 }";
    let (code, text) = test_cmd(&suite(dir.path(), exact));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("2 passed, 0 failed"), "{text}");

    // One count wrong: the case fails, naming the count with both numbers.
    let wrong = "{ kept = 3, consent_missing = 3, unparsable = 1 }";
    let (code, text) = test_cmd(&suite(dir.path(), wrong));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("1 passed, 1 failed"), "{text}");
    assert!(
        text.contains("differs:  records.consent_missing (expected 3, got 2)"),
        "{text}"
    );
    assert!(
        text.contains("records:  13 read: kept 3 (2 subjects), dropped 10"),
        "{text}"
    );

    // A reason that does not exist is an error of the suite, at its line.
    let typo = "{ kept = 3, consent_mising = 2 }";
    let (code, text) = test_cmd(&suite(dir.path(), typo));
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("suite.toml:") && text.contains("consent_mising"),
        "{text}"
    );
}
