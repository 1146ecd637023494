//! What a policy that cannot be loaded reports: one `Diagnostic` per problem (file, line,
//! rule path, message) and the `PolicyError` that carries them all.
//!
//! Apart from the compiler because it is its output, shared by everything that prints a
//! policy's problems (`check`, `serve`, reloads), and depends on nothing else in it.

use std::fmt;
use std::path::PathBuf;

/// One problem in a policy, located as precisely as the source allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// The rule path, e.g. `datasets.payments.upstream`.
    pub rule: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: ", self.file.display(), l)?,
            None => write!(f, "{}: ", self.file.display())?,
        }
        if !self.rule.is_empty() {
            write!(f, "{}: ", self.rule)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} error(s) in policy:\n{}", .0.len(), render(.0))]
    Invalid(Vec<Diagnostic>),
}

fn render(d: &[Diagnostic]) -> String {
    d.iter()
        .map(|d| format!("  {d}"))
        .collect::<Vec<_>>()
        .join("\n")
}
