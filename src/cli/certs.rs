//! `certs init DIR`: what a deployment needs, created once and kept: a development CA, the
//! proxy's server certificate, a client certificate per recipient identity, the Ed25519
//! log-signing and policy-signing key pairs and the admin bearer token. Private keys are written mode 0600 and
//! existing files are kept unless `--force`.

use super::{CliError, CliResult, Exit, fail};
use crate::audit::keys::SigningKey;
use crate::tls::dev::{DevCa, Issued, Validity};
use clap::Subcommand;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Leaf certificates are valid for a year; the CA for ten.
const LEAF_DAYS: i64 = 365;

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create in DIR: a development CA (ca.crt, ca.key), a server certificate (server.crt,
    /// server.key; SANs localhost, 127.0.0.1, ::1 and each --san), a client certificate per
    /// recipient identity, named after the identity (client-NAME.crt, client-NAME.key), the
    /// log-signing key pair (log-signing.key, log-signing.pub), the policy-signing key pair
    /// that signs bundles (policy-signing.key, policy-signing.pub) and an admin token
    /// (admin.token).
    #[command(
        after_help = "Identities come from the [[recipients]] of --policy and from each --identity. \
An identity with a scheme (spiffe://…) becomes a URI SAN, anything else a DNS SAN.\n\
Client files are named after the identity: every run of characters other than letters, digits, \
'.' and '_' becomes one '-' (spiffe://partners/bureau: client-spiffe-partners-bureau.crt and .key). \
clients.txt lists each NAME with its identity; an identity whose NAME is taken gets NAME-2.\n\
Existing files are kept unless --force; certificates are reissued when the CA is new, \
since they would not chain to it otherwise."
    )]
    Init {
        dir: PathBuf,
        /// A policy whose recipients' identities each get a client certificate.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// An identity (URI such as spiffe://partners/bureau, or a DNS name) to issue a
        /// client certificate for; repeatable.
        #[arg(long, value_name = "ID")]
        identity: Vec<String>,
        /// A further name or address for the server certificate; repeatable.
        #[arg(long, value_name = "NAME")]
        san: Vec<String>,
        /// Replace files that already exist.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(cmd: CertsCommand) -> CliResult {
    match cmd {
        CertsCommand::Init {
            dir,
            policy,
            identity,
            san,
            force,
        } => {
            let mut identities = Vec::new();
            if let Some(p) = &policy {
                let policy = super::load_policy(p)?;
                for r in &policy.recipients {
                    identities.extend(r.identities.iter().cloned());
                }
            }
            identities.extend(identity);
            let mut seen = std::collections::HashSet::new();
            identities.retain(|i| seen.insert(i.clone()));
            init(&dir, &identities, &san, force)
        }
    }
}

fn report(created: bool, path: &Path) {
    println!(
        "{} {}",
        if created { "created" } else { "kept   " },
        path.display()
    );
}

fn init(dir: &Path, identities: &[String], sans: &[String], force: bool) -> CliResult {
    std::fs::create_dir_all(dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    let key = signing_key(dir, force)?;
    // Bundles get a key of their own: whoever may publish rules need not be able to sign
    // the decision log, nor the other way round.
    let policy_key = signing_key_pair(&dir.join("policy-signing.key"), force)?;
    report(policy_key.key_created, &policy_key.key_path);
    report(policy_key.public_written, &policy_key.public_path);
    admin_token(dir, force)?;

    let (ca, ca_is_new) = ca(dir, force)?;
    // A certificate issued by a previous CA would not chain to a new one.
    let reissue = force || ca_is_new;
    let server = dir.join("server");
    leaf(&server, reissue, || {
        ca.server(sans, Validity::days(LEAF_DAYS))
    })?;

    let mut clients = read_clients(&dir.join("clients.txt"))?;
    for id in identities {
        let name = match clients.iter().find(|(_, v)| *v == id) {
            Some((n, _)) => n.clone(),
            None => {
                let base = file_safe(id);
                let mut n = base.clone();
                let mut i = 2;
                while clients.contains_key(&n) {
                    n = format!("{base}-{i}");
                    i += 1;
                }
                clients.insert(n.clone(), id.clone());
                n
            }
        };
        leaf(&dir.join(format!("client-{name}")), reissue, || {
            ca.client(id, Validity::days(LEAF_DAYS))
        })?;
    }
    if !identities.is_empty() {
        let mut text =
            String::from("# client-NAME.crt / client-NAME.key  ->  identity (certificate SAN)\n");
        for (n, id) in &clients {
            text.push_str(&format!("{n} {id}\n"));
        }
        let path = dir.join("clients.txt");
        write_file(&path, text.as_bytes(), 0o644, true)?;
        report(true, &path);
    }
    println!("log-signing key fingerprint: {}", key.fingerprint());
    println!(
        "policy-signing key fingerprint: {}",
        policy_key.key.fingerprint()
    );
    Ok(Exit::Ok)
}

fn signing_key(dir: &Path, force: bool) -> Result<SigningKey, CliError> {
    let pair = signing_key_pair(&dir.join("log-signing.key"), force)?;
    report(pair.key_created, &pair.key_path);
    report(pair.public_written, &pair.public_path);
    Ok(pair.key)
}

/// The log-signing key on disk and its public half beside it.
pub struct SigningKeyFiles {
    pub key: SigningKey,
    pub key_path: PathBuf,
    /// `<key>.pub`, what `audit verify --key` takes.
    pub public_path: PathBuf,
    pub key_created: bool,
    pub public_written: bool,
}

/// Creates an Ed25519 log-signing key at `key_path` unless one is there (or `force`), and
/// writes its public half to the `.pub` file beside it whenever that does not match.
pub fn signing_key_pair(key_path: &Path, force: bool) -> Result<SigningKeyFiles, CliError> {
    let key_created = write_file(
        key_path,
        SigningKey::generate_pem().as_bytes(),
        0o600,
        force,
    )?;
    let key = SigningKey::load(key_path)?;
    let public_path = key_path.with_extension("pub");
    let pub_pem = key.public_pem();
    let same = std::fs::read_to_string(&public_path).is_ok_and(|p| p == pub_pem);
    if !same {
        // The public key always follows the private key kept on disk.
        write_file(&public_path, pub_pem.as_bytes(), 0o644, true)?;
    }
    Ok(SigningKeyFiles {
        key,
        key_path: key_path.to_path_buf(),
        public_path,
        key_created,
        public_written: !same,
    })
}

fn admin_token(dir: &Path, force: bool) -> Result<(), CliError> {
    let token_path = dir.join("admin.token");
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| fail("the system random generator failed"))?;
    let created = write_file(
        &token_path,
        format!("{}\n", hex::encode(raw)).as_bytes(),
        0o600,
        force,
    )?;
    report(created, &token_path);
    Ok(())
}

/// The CA kept in DIR, or a new one; the flag says whether it is new.
fn ca(dir: &Path, force: bool) -> Result<(DevCa, bool), CliError> {
    let crt = dir.join("ca.crt");
    let key = dir.join("ca.key");
    if !force && (crt.exists() || key.exists()) {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| {
                fail(format!(
                    "cannot read {}: {e} (ca.crt and ca.key belong together; use --force to create a new CA)",
                    p.display()
                ))
            })
        };
        let ca = DevCa::from_pem(&read(&crt)?, &read(&key)?)?;
        report(false, &crt);
        report(false, &key);
        return Ok((ca, false));
    }
    let ca = DevCa::generate()?;
    write_file(&key, ca.key_pem.as_bytes(), 0o600, true)?;
    write_file(&crt, ca.cert_pem.as_bytes(), 0o644, true)?;
    report(true, &crt);
    report(true, &key);
    Ok((ca, true))
}

/// Writes `BASE.crt` and `BASE.key` from `issue`, unless both exist and `reissue` is off.
fn leaf(
    base: &Path,
    reissue: bool,
    issue: impl FnOnce() -> Result<Issued, crate::tls::TlsError>,
) -> Result<(), CliError> {
    // Not `with_extension`: it would cut a name that has a dot (client-bureau.example).
    let crt = PathBuf::from(format!("{}.crt", base.display()));
    let key = PathBuf::from(format!("{}.key", base.display()));
    if !reissue && crt.exists() && key.exists() {
        report(false, &crt);
        report(false, &key);
        return Ok(());
    }
    let issued = issue()?;
    write_file(&key, issued.key_pem.as_bytes(), 0o600, true)?;
    write_file(&crt, issued.cert_pem.as_bytes(), 0o644, true)?;
    report(true, &crt);
    report(true, &key);
    Ok(())
}

/// `clients.txt` as written by an earlier run: file name part -> identity.
fn read_clients(path: &Path) -> Result<BTreeMap<String, String>, CliError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(fail(format!("cannot read {}: {e}", path.display()))),
    };
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, id)| (n.to_string(), id.trim().to_string()))
        .collect())
}

/// An identity made into a file name part: letters, digits, `.` and `_` kept, every other
/// run of characters one `-` (`spiffe://partners/bureau` -> `spiffe-partners-bureau`).
pub fn file_safe(identity: &str) -> String {
    let mut out = String::with_capacity(identity.len());
    for c in identity.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_matches(|c| c == '-' || c == '.');
    if trimmed.is_empty() {
        "identity".into()
    } else {
        trimmed.to_string()
    }
}

/// Writes `bytes` with `mode`; returns false (and writes nothing) when the file exists and
/// `force` is off.
fn write_file(path: &Path, bytes: &[u8], mode: u32, force: bool) -> Result<bool, CliError> {
    if path.exists() && !force {
        return Ok(false);
    }
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| fail(format!("cannot write {}: {e}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| fail(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::file_safe;

    #[test]
    fn identities_become_file_names() {
        assert_eq!(
            file_safe("spiffe://partners/credit-bureau-us"),
            "spiffe-partners-credit-bureau-us"
        );
        assert_eq!(file_safe("bureau.example"), "bureau.example");
        assert_eq!(file_safe("../../etc/passwd"), "etc-passwd");
        assert_eq!(file_safe("://"), "identity");
    }
}
