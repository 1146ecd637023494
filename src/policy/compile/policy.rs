//! `[policy]`: the policy's name, its home jurisdiction and mode (the defaults of every
//! dataset), what a request matching no dataset gets, and where it then goes.
//!
//! Its own file like every section. It is compiled in two steps because `unmatched_upstream`
//! names an upstream, and its problems are reported after the datasets' (as they always were).

use super::jurisdictions;
use super::place::{Cx, Place};
use super::values::{choice, parse_mode};
use crate::policy::model::{Jurisdictions, Mode, UnknownLocation, Unmatched, Upstream};
use crate::policy::raw::RawPolicy;

/// `[policy]`, compiled but for `unmatched_upstream`.
pub(super) struct PolicyTable {
    place: Place,
    pub name: String,
    /// `None` when not written or not valid.
    pub home: Option<crate::policy::model::Jurisdiction>,
    /// Whether `home` is written: one that is not valid has its own error already.
    pub home_written: bool,
    pub mode: Mode,
    pub unmatched: Unmatched,
    pub unknown_location: UnknownLocation,
    unmatched_upstream: Option<String>,
}

/// Compiles `[policy]` (at `place`) but for `unmatched_upstream`.
pub(super) fn compile(
    cx: &mut Cx<'_>,
    place: Place,
    p: RawPolicy,
    jurisdictions: &Jurisdictions,
) -> PolicyTable {
    let name = match p.name {
        Some(n) if !n.trim().is_empty() => n,
        _ => {
            cx.err(
                &place.missing("name"),
                "required: name the policy (it appears in every decision record)",
            );
            String::new()
        }
    };
    let home = p
        .home
        .as_deref()
        .and_then(|h| jurisdictions::resolve(cx, jurisdictions, &place.field("home"), h));
    let mode = parse_mode(cx, &place.field("mode"), p.mode.as_deref()).unwrap_or(Mode::Enforce);
    let unmatched = choice(
        cx,
        &place.field("unmatched"),
        p.unmatched.as_deref(),
        &[("deny", Unmatched::Deny), ("allow", Unmatched::Allow)],
        Unmatched::Deny,
    );
    let unknown_location = choice(
        cx,
        &place.field("unknown_location"),
        p.unknown_location.as_deref(),
        &[
            ("deny", UnknownLocation::Deny),
            ("foreign", UnknownLocation::Foreign),
        ],
        UnknownLocation::Deny,
    );
    PolicyTable {
        name,
        home_written: p.home.is_some(),
        home,
        mode,
        unmatched,
        unknown_location,
        unmatched_upstream: p.unmatched_upstream,
        place,
    }
}

/// `unmatched_upstream`: the upstream that requests matching no dataset go to, when they are
/// allowed; it may be left out when there is only one upstream.
pub(super) fn unmatched_upstream(
    cx: &mut Cx<'_>,
    table: &PolicyTable,
    upstreams: &[Upstream],
) -> Option<usize> {
    let place = table.place.field("unmatched_upstream");
    let found = match (&table.unmatched_upstream, table.unmatched) {
        (Some(u), _) => {
            let found = upstreams.iter().position(|x| *x.name == **u);
            if found.is_none() {
                cx.err(&place, format!("no upstream named \"{u}\""));
            }
            found
        }
        (None, Unmatched::Allow) => {
            if upstreams.len() == 1 {
                Some(0)
            } else {
                cx.err(&table.place.missing("unmatched_upstream").key("unmatched"), "required when unmatched = \"allow\" and there is not exactly one upstream: name where unmatched requests go");
                None
            }
        }
        (None, Unmatched::Deny) => None,
    };
    if table.unmatched_upstream.is_some() && table.unmatched == Unmatched::Deny {
        cx.err(
            &place,
            "has no effect while unmatched = \"deny\": set unmatched = \"allow\" or remove it",
        );
    }
    found
}

#[cfg(test)]
mod tests {
    use super::super::testing::{BASE, DATASET_BASE};
    use super::super::{PolicyError, from_str};

    #[test]
    fn an_unmatched_upstream_that_can_never_be_used_is_an_error() {
        let text = BASE.replace(
            "home = 'CN'\n",
            "home = 'CN'\nunmatched = 'deny'\nunmatched_upstream = 's'\n",
        );
        let d = match from_str("p.toml", &format!("{text}{DATASET_BASE}")) {
            Err(PolicyError::Invalid(d)) => d,
            other => panic!("{other:?}"),
        };
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].rule, "policy.unmatched_upstream");
        assert!(d[0].message.contains("no effect"), "{}", d[0]);
    }
}
