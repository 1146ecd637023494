//! The proxy under test, in process: a policy written into a temp dir (with its own signing
//! key, consent file and decision log), started with `residency_proxy::proxy::start` on
//! `127.0.0.1:0`.

#![allow(dead_code)]

use super::log::DecisionLog;
use residency_proxy::admin::Sidecar;
use residency_proxy::audit::keys::SigningKey;
use residency_proxy::consent::ConsentRecord;
use residency_proxy::proxy::ServeConfig;
use residency_proxy::proxy::snapshot::Overrides;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A policy to start the proxy with. `[policy]`, `[proxy]`, `[consent]` and `[log]` are
/// tables of `key = value` lines (a later line for the same key replaces the earlier one);
/// everything else is TOML text appended as written.
pub struct PolicySpec {
    policy: BTreeMap<String, String>,
    proxy: BTreeMap<String, String>,
    consent: BTreeMap<String, String>,
    log: BTreeMap<String, String>,
    body: String,
    consents: Vec<ConsentRecord>,
    log_path: Option<PathBuf>,
    admin_token: Option<String>,
}

fn set(table: &mut BTreeMap<String, String>, line: &str) {
    let (k, _) = line.split_once('=').expect("a `key = value` line");
    table.insert(k.trim().to_string(), line.to_string());
}

impl Default for PolicySpec {
    fn default() -> Self {
        PolicySpec::new()
    }
}

impl PolicySpec {
    /// Policy `itest`, home CN, enforcing, unmatched and unknown locations denied.
    pub fn new() -> PolicySpec {
        let mut p = PolicySpec {
            policy: BTreeMap::new(),
            proxy: BTreeMap::new(),
            consent: BTreeMap::new(),
            log: BTreeMap::new(),
            body: String::new(),
            consents: Vec::new(),
            log_path: None,
            admin_token: None,
        };
        for line in [
            "name = 'itest'",
            "home = 'CN'",
            "mode = 'enforce'",
            "unmatched = 'deny'",
            "unknown_location = 'deny'",
        ] {
            set(&mut p.policy, line);
        }
        set(&mut p.consent, "accept_methods = ['explicit']");
        set(&mut p.consent, "purpose_header = 'X-Purpose'");
        p
    }

    /// A `key = value` line of `[policy]`.
    pub fn policy(mut self, line: &str) -> Self {
        set(&mut self.policy, line);
        self
    }

    /// A `key = value` line of `[proxy]`.
    pub fn proxy(mut self, line: &str) -> Self {
        set(&mut self.proxy, line);
        self
    }

    /// A `key = value` line of `[consent]`; `store = '…'` replaces the consent file.
    pub fn consent(mut self, line: &str) -> Self {
        set(&mut self.consent, line);
        self
    }

    /// An admin bearer token, written to `admin.token` and named by `[admin].token_file`.
    pub fn admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.into());
        self
    }

    /// A `key = value` line of `[log]`.
    pub fn log(mut self, line: &str) -> Self {
        set(&mut self.log, line);
        self
    }

    /// A `[[networks]]` override placing `cidr` in `country`.
    pub fn network(mut self, cidr: &str, country: &str) -> Self {
        writeln!(
            self.body,
            "[[networks]]\ncidr = '{cidr}'\ncountry = '{country}'\n"
        )
        .unwrap();
        self
    }

    /// An `[[upstreams]]` entry.
    pub fn upstream(mut self, name: &str, url: &str) -> Self {
        writeln!(self.body, "[[upstreams]]\nname = '{name}'\nurl = '{url}'\n").unwrap();
        self
    }

    /// TOML text (recipients, datasets, `[geo]`…), appended as written.
    pub fn toml(mut self, text: &str) -> Self {
        self.body.push_str(text);
        self.body.push('\n');
        self
    }

    /// Writes the decision log at `path` instead of `decisions.jsonl` in the temp dir.
    pub fn log_path(mut self, path: &Path) -> Self {
        self.log_path = Some(path.into());
        self
    }

    /// Where the decision log goes when the state files are in `dir`.
    fn log_file(&self, dir: &Path) -> PathBuf {
        self.log_path
            .clone()
            .unwrap_or_else(|| dir.join("decisions.jsonl"))
    }

    /// Consents in the registry file when the proxy starts.
    pub fn consents(mut self, records: Vec<ConsentRecord>) -> Self {
        self.consents = records;
        self
    }

    /// The policy text, with the state files in `dir`.
    pub fn render(&self, dir: &Path) -> String {
        let mut consent = self.consent.clone();
        if !consent.contains_key("store") {
            set(
                &mut consent,
                &format!("store = 'file:{}'", dir.join("consents.jsonl").display()),
            );
        }
        let mut log = self.log.clone();
        set(
            &mut log,
            &format!("path = '{}'", self.log_file(dir).display()),
        );
        set(
            &mut log,
            &format!("signing_key = '{}'", dir.join("log-signing.key").display()),
        );
        let mut proxy = self.proxy.clone();
        set(&mut proxy, "listen = '127.0.0.1:0'");
        // One worker (one chain, `decisions.jsonl`) unless the test asks for more: the
        // default, one per core, would depend on the machine.
        if !proxy.contains_key("workers") {
            set(&mut proxy, "workers = 1");
        }
        let table = |name: &str, t: &BTreeMap<String, String>| {
            let mut s = format!("[{name}]\n");
            for line in t.values() {
                s.push_str(line);
                s.push('\n');
            }
            s.push('\n');
            s
        };
        // Parallel tests never share a port: the admin listener binds an ephemeral one too.
        let admin = if self.body.contains("[admin]") {
            String::new()
        } else if self.admin_token.is_some() {
            format!(
                "[admin]\nlisten = '127.0.0.1:0'\ntoken_file = '{}'\n\n",
                dir.join("admin.token").display()
            )
        } else {
            "[admin]\nlisten = '127.0.0.1:0'\n\n".to_string()
        };
        format!(
            "{}{}{}{}{}{}",
            table("policy", &self.policy),
            table("proxy", &proxy),
            self.body,
            table("consent", &consent),
            table("log", &log),
            admin
        )
    }

    /// Writes the policy, a fresh signing key and the consent file into a new temp dir and
    /// starts the proxy.
    pub async fn start(self) -> TestProxy {
        self.start_in(tempfile::tempdir().unwrap()).await
    }

    /// Writes the policy (`policy.toml`), a fresh signing key and the consent file into `dir`;
    /// returns the policy's path and text. Files already in `dir` (say a log path made a
    /// symlink) are kept unless the policy needs that name.
    pub fn write_files(&self, dir: &Path) -> (PathBuf, String) {
        std::fs::write(dir.join("log-signing.key"), SigningKey::generate_pem()).unwrap();
        write_consents(&dir.join("consents.jsonl"), &self.consents);
        if let Some(token) = &self.admin_token {
            std::fs::write(dir.join("admin.token"), format!("{token}\n")).unwrap();
        }
        let policy_path = dir.join("policy.toml");
        let text = self.render(dir);
        std::fs::write(&policy_path, &text).unwrap();
        (policy_path, text)
    }

    /// [`PolicySpec::start`] in a temp dir the caller prepared.
    pub async fn start_in(self, dir: tempfile::TempDir) -> TestProxy {
        let (policy_path, text) = self.write_files(dir.path());
        let running = residency_proxy::admin::start(ServeConfig {
            policy_path: policy_path.clone(),
            overrides: Overrides::default(),
        })
        .await
        .unwrap_or_else(|e| panic!("the proxy does not start: {e}\n--- policy ---\n{text}"));
        TestProxy {
            addr: running.addr,
            log: DecisionLog::new(self.log_file(dir.path())),
            policy_path,
            consents_path: dir.path().join("consents.jsonl"),
            running: Some(running),
            dir,
        }
    }
}

/// A proxy running in this process, and its files.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub log: DecisionLog,
    pub policy_path: PathBuf,
    pub consents_path: PathBuf,
    running: Option<Sidecar>,
    pub dir: tempfile::TempDir,
}

impl TestProxy {
    pub fn running(&self) -> &Sidecar {
        self.running.as_ref().expect("the proxy is running")
    }

    /// Drains connections and flushes the log (`RunningProxy::shutdown`).
    pub async fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Rewrites the consent file and waits until the running index holds exactly `records`
    /// for each of their subjects.
    pub async fn set_consents(&self, records: &[ConsentRecord]) {
        write_consents(&self.consents_path, records);
        let index = self.running().shared.consents.clone();
        super::wait_until("the consent file reload", || {
            records.iter().all(|want| {
                let mut expected: Vec<&ConsentRecord> = records
                    .iter()
                    .filter(|r| r.subject == want.subject)
                    .collect();
                expected.sort_by(|a, b| a.id.cmp(&b.id));
                let Some(held) = index.get(&want.subject) else {
                    return false;
                };
                let mut held: Vec<_> = held.iter().collect();
                held.sort_by(|a, b| a.id.cmp(&b.id));
                held.len() == expected.len()
                    && held.iter().zip(&expected).all(|(h, e)| {
                        *h.id == *e.id && h.revoked_at.is_some() == e.revoked_at.is_some()
                    })
            })
        })
        .await;
    }
}

/// The first-party application at home (CN).
pub const APP: &str = "127.0.0.10";
/// A foreign credit bureau (US), a third party.
pub const BUREAU: &str = "127.0.0.20";
/// Where the home store listens (CN).
pub const HOME_IP: &str = "127.0.0.2";
/// Where the store abroad listens (US).
pub const ABROAD_IP: &str = "127.0.0.3";

const PARTIES: &str = r#"
[[recipients]]
id = 'payments-app'
relation = 'first_party'
country = 'CN'
networks = ['127.0.0.10/32']

[[recipients]]
id = 'credit-bureau-us'
relation = 'third_party'
country = 'US'
networks = ['127.0.0.20/32']
"#;

impl PolicySpec {
    /// The cast most tests share: `APP` (`payments-app`, first party, CN), `BUREAU`
    /// (`credit-bureau-us`, third party, US), and the stores at `HOME_IP` (CN) and
    /// `ABROAD_IP` (US).
    pub fn with_parties(self) -> Self {
        self.network("127.0.0.10/32", "CN")
            .network("127.0.0.20/32", "US")
            .network("127.0.0.2/32", "CN")
            .network("127.0.0.3/32", "US")
            .toml(PARTIES)
    }
}

/// A residency-bound dataset `payments` (`/payments/`, category `user.financial`, subject in
/// path segment 2) on `upstream`, with the given cross-border and third-party rules.
pub fn payments_dataset(upstream: &str, cross_border: &str, third_party: &str) -> String {
    format!(
        r#"
[[datasets]]
name = 'payments'
match = {{ path_prefix = '/payments/' }}
upstream = '{upstream}'
category = 'user.financial'
subject = {{ path_segment = 2 }}
cross_border = '{cross_border}'
third_party = '{third_party}'
"#
    )
}

/// The set-up most log tests share: the parties, `cn-store` at `home_url`, `payments` needing
/// consent abroad and for third parties, and a consent of `u1` for `credit-bureau-us`.
pub fn payments_spec(home_url: &str) -> PolicySpec {
    PolicySpec::new()
        .with_parties()
        .upstream("cn-store", home_url)
        .toml(&payments_dataset("cn-store", "consent", "consent"))
        .consents(vec![consent("c-1", "u1", "credit-bureau-us")])
}

/// Writes consent records as JSON lines, atomically (write, then rename).
pub fn write_consents(path: &Path, records: &[ConsentRecord]) {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).unwrap());
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A valid explicit consent of `subject` for `recipient`: purpose `credit_scoring`,
/// category `user.financial`, destination US, granted a minute ago for a year.
pub fn consent(id: &str, subject: &str, recipient: &str) -> ConsentRecord {
    let now = jiff::Timestamp::now();
    ConsentRecord {
        id: id.into(),
        subject: subject.into(),
        recipient: recipient.into(),
        purposes: vec!["credit_scoring".into()],
        categories: vec!["user.financial".into()],
        destinations: vec!["US".into()],
        method: "explicit".into(),
        granted_at: now - jiff::SignedDuration::from_secs(60),
        expires_at: now + jiff::SignedDuration::from_hours(24 * 365),
        revoked_at: None,
        evidence: Some("receipt in the test".into()),
    }
}
