//! The admin bearer token (`[admin].token_file`): held by the proxy, which reads it at
//! start-up and again on every reload, and checked by the admin listener.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read admin token file {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin token file {} is empty", path.display())]
    Empty { path: PathBuf },
}

/// The admin bearer token, kept as its SHA-256 digest. A request's token is hashed and the
/// two digests compared in constant time: comparing the tokens themselves would end early
/// on a length mismatch, telling a caller how long the token is.
pub struct AdminToken([u8; 32]);

impl AdminToken {
    pub fn new(token: &[u8]) -> AdminToken {
        AdminToken(sha256(token))
    }

    /// Whether `given` is the token.
    pub fn matches(&self, given: &[u8]) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(&sha256(given), &self.0).is_ok()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    d.as_ref().try_into().expect("SHA-256 digests are 32 bytes")
}

/// Reads the bearer token (surrounding white space ignored).
pub fn read_token(path: &Path) -> Result<AdminToken, TokenError> {
    let raw = std::fs::read(path).map_err(|source| TokenError::Unreadable {
        path: path.into(),
        source,
    })?;
    let token = raw.trim_ascii();
    if token.is_empty() {
        return Err(TokenError::Empty { path: path.into() });
    }
    Ok(AdminToken::new(token))
}
