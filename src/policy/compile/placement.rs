//! Where each table belongs when a policy is split between a sidecar's own file and a signed
//! bundle: the sidecar keeps what differs per sidecar (`[proxy]`, `[admin]`, `[tls]`, `[log]`,
//! `[consent]`, `[policy.source]`), the bundle carries the rules every sidecar shares
//! (`[policy]`'s rules, `[jurisdictions]`, `[geo]`, `[[networks]]`, `[[upstreams]]`,
//! `[[recipients]]`, `[[datasets]]`). A table in the wrong part is taken out of the file before
//! it is merged, and reported as belonging to the other part.
//!
//! Apart from `source` because it judges tables, which that file never does; it knows only the
//! raw policy and returns what it took out, so that `source` (which knows lines) reports it.

use crate::policy::raw::RawFile;

/// Which part of a policy a file is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Side {
    /// A policy read whole from disk: any table may be in any of its files, but for
    /// `[policy.source]`, which makes the entry file a sidecar's own.
    Whole,
    /// A sidecar's own file (its entry has `[policy.source]`) or a file it includes.
    Sidecar,
    /// A file of a bundle.
    Bundle,
}

/// A table (or a key of `[policy]`) taken out of a file: where it is written (its keys from
/// the top), its rule path, and where it belongs.
pub(super) struct Misplaced {
    pub at: Vec<&'static str>,
    pub rule: &'static str,
    pub message: String,
}

const IN_BUNDLE: &str = "belongs in the bundle's policy, not in the sidecar's own file: with [policy.source], the rules every sidecar shares come from the bundle";
const IN_SIDECAR: &str =
    "belongs in the sidecar's own policy file, not in a bundle: each sidecar keeps its own";

/// Takes out of `raw` what does not belong on `side` (`entry`: the file is the one given,
/// not an included one), and says where each belongs.
pub(super) fn take_misplaced(side: Side, entry: bool, raw: &mut RawFile) -> Vec<Misplaced> {
    let mut out = Vec::new();
    match side {
        Side::Whole => {
            // The entry file of a whole policy has no [policy.source] (it would be a
            // sidecar's): an included file cannot make the policy it is part of a sidecar's.
            if !entry && take_source(raw) {
                out.push(Misplaced {
                    at: vec!["policy", "source"],
                    rule: "policy.source",
                    message: "belongs in the sidecar's own policy file (the one the proxy is given), not in an included file".into(),
                });
            }
        }
        Side::Sidecar => rules_out_of_sidecar(raw, &mut out),
        Side::Bundle => local_out_of_bundle(raw, &mut out),
    }
    out
}

/// Takes `[policy.source]` out, and `[policy]` with it when that was all it held.
fn take_source(raw: &mut RawFile) -> bool {
    let taken = raw.policy.as_mut().and_then(|p| p.source.take()).is_some();
    if taken && raw.policy.as_ref().is_some_and(|p| !p.has_rules()) {
        raw.policy = None;
    }
    taken
}

fn rules_out_of_sidecar(raw: &mut RawFile, out: &mut Vec<Misplaced>) {
    let mut put = |at: Vec<&'static str>, rule: &'static str, what: String| {
        out.push(Misplaced {
            at,
            rule,
            message: format!("{what} {IN_BUNDLE}"),
        });
    };
    if let Some(p) = &mut raw.policy {
        // Each rule of [policy] on its own: the table itself holds [policy.source] here.
        let keys: [(&'static str, &'static str, bool); 6] = [
            ("name", "policy.name", p.name.take().is_some()),
            ("home", "policy.home", p.home.take().is_some()),
            ("mode", "policy.mode", p.mode.take().is_some()),
            (
                "unmatched",
                "policy.unmatched",
                p.unmatched.take().is_some(),
            ),
            (
                "unknown_location",
                "policy.unknown_location",
                p.unknown_location.take().is_some(),
            ),
            (
                "unmatched_upstream",
                "policy.unmatched_upstream",
                p.unmatched_upstream.take().is_some(),
            ),
        ];
        for (key, rule, written) in keys {
            if written {
                put(vec!["policy", key], rule, format!("`{rule}`"));
            }
        }
    }
    if raw.jurisdictions.take().is_some() {
        put(
            vec!["jurisdictions"],
            "jurisdictions",
            "`[jurisdictions]`".into(),
        );
    }
    if raw.geo.take().is_some() {
        put(vec!["geo"], "geo", "`[geo]`".into());
    }
    let arrays = [
        ("networks", !std::mem::take(&mut raw.networks).is_empty()),
        ("upstreams", !std::mem::take(&mut raw.upstreams).is_empty()),
        (
            "recipients",
            !std::mem::take(&mut raw.recipients).is_empty(),
        ),
        ("datasets", !std::mem::take(&mut raw.datasets).is_empty()),
    ];
    for (name, written) in arrays {
        if written {
            put(vec![name], name, format!("`[[{name}]]`"));
        }
    }
}

fn local_out_of_bundle(raw: &mut RawFile, out: &mut Vec<Misplaced>) {
    let mut put = |at: Vec<&'static str>, rule: &'static str| {
        out.push(Misplaced {
            at,
            rule,
            message: format!("`[{rule}]` {IN_SIDECAR}"),
        });
    };
    if take_source(raw) {
        put(vec!["policy", "source"], "policy.source");
    }
    let tables = [
        ("proxy", raw.proxy.take().is_some()),
        ("admin", raw.admin.take().is_some()),
        ("tls", raw.tls.take().is_some()),
        ("log", raw.log.take().is_some()),
        ("consent", raw.consent.take().is_some()),
    ];
    for (name, written) in tables {
        if written {
            put(vec![name], name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BundleRules, PolicyError, PolicyFile, Sidecar, load_file, load_rules};
    use super::super::{Diagnostic, merge};
    use std::path::{Path, PathBuf};

    const SIDECAR: &str =
        "[policy.source]\nurl = 'file:cn.bundle'\nkey = 'k.pub'\n\n[log]\npseudonymize = false\n";
    const RULES: &str = "[policy]\nname = 'cn'\nhome = 'CN'\n\n[[upstreams]]\nname = 's'\nurl = 'http://127.0.0.2:9000'\n";

    fn sidecar(text: &str) -> Result<Sidecar, PolicyError> {
        let owned = text.to_string();
        match load_file(Path::new("sidecar.toml"), move |_| Ok(owned.clone()))? {
            PolicyFile::Sidecar(s) => Ok(*s),
            PolicyFile::Whole(_) => panic!("not a sidecar"),
        }
    }

    fn merged(
        sidecar_text: &str,
        files: &[(&str, &str)],
    ) -> Result<crate::policy::Policy, PolicyError> {
        let s = sidecar(sidecar_text)?;
        let files: Vec<(String, String)> = files
            .iter()
            .map(|(p, t)| ((*p).to_string(), (*t).to_string()))
            .collect();
        let label = PathBuf::from("s3://policies/cn.bundle");
        merge(
            &s,
            &BundleRules {
                label: &label,
                entry: &files[0].0,
                files: &files,
                geo_database: Some(Path::new("logs/policy.bundle.d/geo-1.mmdb")),
                revision: 42,
            },
        )
    }

    fn invalid(r: Result<impl Sized, PolicyError>) -> Vec<Diagnostic> {
        match r {
            Err(PolicyError::Invalid(d)) => d,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("compiled"),
        }
    }

    #[test]
    fn a_sidecar_and_a_bundle_compile_into_one_policy() {
        let p = merged(
            SIDECAR,
            &[
                ("cn.toml", &format!("include = ['rules/geo.toml']\n{RULES}")),
                ("rules/geo.toml", "[geo]\ndatabase = 'geo/country.mmdb'\n"),
            ],
        )
        .unwrap();
        assert_eq!(p.name, "cn");
        assert_eq!(p.revision, Some(42));
        assert_eq!(p.upstreams.len(), 1);
        assert!(p.source.is_some());
        // The database the bundle carries replaces the one the policy names.
        assert_eq!(
            p.geo_database.as_deref(),
            Some(Path::new("logs/policy.bundle.d/geo-1.mmdb"))
        );
        let sources: Vec<String> = p.sources.iter().map(|s| s.display().to_string()).collect();
        assert_eq!(
            sources,
            [
                "sidecar.toml",
                "s3://policies/cn.bundle/cn.toml",
                "s3://policies/cn.bundle/rules/geo.toml"
            ]
        );
    }

    #[test]
    fn a_rule_in_the_sidecar_is_an_error_at_its_line_naming_the_bundle() {
        let text = format!(
            "{SIDECAR}\n[policy]\nhome = 'CN'\n\n[[datasets]]\nname = 'x'\nmatch = {{ path_prefix = '/x/' }}\nupstream = 's'\ncategory = 'c'\n"
        );
        let d = invalid(sidecar(&text));
        let at = |rule: &str| {
            d.iter()
                .find(|d| d.rule == rule)
                .unwrap_or_else(|| panic!("{rule}: {d:?}"))
        };
        let home = at("policy.home");
        assert_eq!(
            (home.file.to_str(), home.line),
            (Some("sidecar.toml"), Some(9))
        );
        assert!(
            home.message.contains("belongs in the bundle's policy"),
            "{home}"
        );
        let ds = at("datasets");
        assert_eq!(ds.line, Some(11), "{ds}");
        assert!(
            ds.message.starts_with(
                "`[[datasets]]` belongs in the bundle's policy, not in the sidecar's own file"
            ),
            "{ds}"
        );
        assert_eq!(d.len(), 2, "{d:?}");
    }

    #[test]
    fn a_sidecar_setting_in_the_bundle_is_an_error_in_the_bundle_file() {
        let d = invalid(merged(
            SIDECAR,
            &[
                ("cn.toml", &format!("include = ['more.toml']\n{RULES}")),
                (
                    "more.toml",
                    "[proxy]\nlisten = '0.0.0.0:8080'\n\n[log]\npath = 'x.jsonl'\n",
                ),
            ],
        ));
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(
            d[0].to_string(),
            "s3://policies/cn.bundle/more.toml:1: proxy: `[proxy]` belongs in the sidecar's own policy file, not in a bundle: each sidecar keeps its own"
        );
        assert_eq!(d[1].file, Path::new("s3://policies/cn.bundle/more.toml"));
        assert_eq!((d[1].line, d[1].rule.as_str()), (Some(4), "log"));
        // Compiled on its own (`bundle build`), the same.
        let more = "[log]\npath = 'x.jsonl'\n";
        let d = invalid(load_rules(Path::new("cn.toml"), |p| {
            Ok(if p.ends_with("more.toml") {
                more.into()
            } else {
                format!("include = ['more.toml']\n{RULES}")
            })
        }));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].message
                .starts_with("`[log]` belongs in the sidecar's own policy file"),
            "{}",
            d[0]
        );
    }

    #[test]
    fn a_bundle_without_its_policy_table_is_reported_in_the_bundle() {
        let d = invalid(merged(
            SIDECAR,
            &[(
                "cn.toml",
                "[[upstreams]]\nname = 's'\nurl = 'http://127.0.0.2:9000'\n",
            )],
        ));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            (d[0].file.to_str(), d[0].rule.as_str()),
            (Some("s3://policies/cn.bundle/cn.toml"), "policy.name")
        );
        // A source in an included file of a whole policy cannot make it a sidecar's.
        let d = invalid(load_file(Path::new("p.toml"), |p| {
            Ok(if p.ends_with("inc.toml") {
                "[policy.source]\nurl = 'file:x'\nkey = 'k'\n".into()
            } else {
                format!("include = ['inc.toml']\n{RULES}[log]\npseudonymize = false\n")
            })
        }));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            (d[0].file.to_str(), d[0].line, d[0].rule.as_str()),
            (Some("inc.toml"), Some(1), "policy.source")
        );
    }

    #[test]
    fn a_sidecar_file_alone_is_not_a_whole_policy() {
        let owned = SIDECAR.to_string();
        let d = invalid(super::super::load(Path::new("sidecar.toml"), move |_| {
            Ok(owned.clone())
        }));
        assert_eq!((d[0].rule.as_str(), d[0].line), ("policy.source", Some(1)));
        assert!(d[0].message.contains("--bundle"), "{}", d[0]);
    }
}
