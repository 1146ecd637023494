//! `certs init DIR`: the keys a deployment needs, created once and kept: the Ed25519
//! log-signing key pair and the admin bearer token. Private files are written mode 0600 and
//! existing files are kept unless `--force`.

use super::{CliResult, Exit, fail};
use crate::audit::keys::SigningKey;
use clap::Subcommand;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create the log-signing key pair (`log-signing.key`, `log-signing.pub`) and an admin
    /// token (`admin.token`) in DIR.
    Init {
        dir: PathBuf,
        /// Replace files that already exist.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(cmd: CertsCommand) -> CliResult {
    match cmd {
        CertsCommand::Init { dir, force } => init(&dir, force),
    }
}

fn init(dir: &Path, force: bool) -> CliResult {
    std::fs::create_dir_all(dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    let key_path = dir.join("log-signing.key");
    if write_file(
        &key_path,
        SigningKey::generate_pem().as_bytes(),
        0o600,
        force,
    )? {
        println!("created {}", key_path.display());
    } else {
        println!("kept    {}", key_path.display());
    }
    let key = SigningKey::load(&key_path)?;
    let pub_path = dir.join("log-signing.pub");
    let pub_pem = key.public_pem();
    let same = std::fs::read_to_string(&pub_path).is_ok_and(|p| p == pub_pem);
    if !same {
        // The public key always follows the private key kept on disk.
        write_file(&pub_path, pub_pem.as_bytes(), 0o644, true)?;
        println!("created {}", pub_path.display());
    } else {
        println!("kept    {}", pub_path.display());
    }
    let token_path = dir.join("admin.token");
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| fail("the system random generator failed"))?;
    if write_file(
        &token_path,
        format!("{}\n", hex::encode(raw)).as_bytes(),
        0o600,
        force,
    )? {
        println!("created {}", token_path.display());
    } else {
        println!("kept    {}", token_path.display());
    }
    println!("log-signing key fingerprint: {}", key.fingerprint());
    Ok(Exit::Ok)
}

/// Writes `bytes` with `mode`; returns false (and writes nothing) when the file exists and
/// `force` is off.
fn write_file(path: &Path, bytes: &[u8], mode: u32, force: bool) -> Result<bool, super::CliError> {
    if path.exists() && !force {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp");
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
