//! What the compiler's tests share: a minimal valid policy to add a section to, and the
//! diagnostics of such a policy. Test-only.

use super::{Diagnostic, PolicyError, from_str};

/// A policy that compiles: a name, a home, and a log that needs no signing key.
pub(super) const BASE: &str = "[policy]\nname = 't'\nhome = 'CN'\n[log]\npseudonymize = false\n";

/// An upstream and a network for datasets to use.
pub(super) const DATASET_BASE: &str = "[[upstreams]]\nname = 's'\nurl = 'http://127.0.0.2:9000'\n[[networks]]\ncidr = '127.0.0.0/8'\ncountry = 'CN'\n";

/// The diagnostics of `BASE` followed by `extra`, in the order they are reported (none when
/// it compiles).
pub(super) fn diags(extra: &str) -> Vec<Diagnostic> {
    match from_str("p.toml", &format!("{BASE}{extra}")) {
        Ok(_) => Vec::new(),
        Err(PolicyError::Invalid(d)) => d,
        Err(e) => panic!("{e}"),
    }
}

/// A dataset named `name` on upstream `s` that allows every transfer, plus `fields`.
pub(super) fn dataset(name: &str, fields: &str) -> String {
    format!(
        "[[datasets]]\nname = '{name}'\nupstream = 's'\ncategory = 'system.operations'\ncross_border = 'allow'\nthird_party = 'allow'\n{fields}\n"
    )
}
