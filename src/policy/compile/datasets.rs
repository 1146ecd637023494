//! `[[datasets]]`: what a request is about (matched by path prefix, host and method), where
//! it goes, whose data it is (per request, or per record of a bulk object), its home and the
//! transfer rules that guard it; and the index that finds a request's dataset.
//!
//! Its own file like every section. Datasets are compiled last: they name upstreams and
//! jurisdictions, and take their defaults from `[policy]`, all passed in.

use super::jurisdictions;
use super::place::{Cx, Place};
use super::policy::PolicyTable;
use super::source::Origin;
use super::upstreams::Upstreams;
use super::values::{parse_header, parse_mode, valid_category};
use crate::bulk::{Format, RecordsSpec, SubjectPath};
use crate::policy::model::*;
use crate::policy::raw::{RawDataset, RawMatch, RawRecords, RawSubject};
use http::Method;
use std::collections::HashSet;
use std::sync::Arc;

/// What datasets refer to in the sections compiled before them.
pub(super) struct References<'a> {
    pub policy: &'a PolicyTable,
    pub jurisdictions: &'a Jurisdictions,
    pub upstreams: &'a Upstreams,
}

/// Compiles `[[datasets]]`.
pub(super) fn compile(
    cx: &mut Cx<'_>,
    raw: Vec<(Origin, RawDataset)>,
    refs: &References<'_>,
) -> Vec<Dataset> {
    let mut datasets: Vec<Dataset> = Vec::new();
    let mut names = HashSet::new();
    for (o, d) in raw {
        // A dataset without a name is named by its position among the valid ones.
        let rule = if d.name.is_empty() {
            format!("datasets[{}]", datasets.len())
        } else {
            format!("datasets.{}", d.name)
        };
        let place = Place::item("datasets", o, rule);
        if d.name.is_empty() {
            cx.err(&place.key("name"), "a dataset needs a name");
        } else if !names.insert(d.name.clone()) {
            cx.err(
                &place.key("name"),
                format!("dataset \"{}\" is defined twice", d.name),
            );
            continue;
        }
        if let Some(dataset) = dataset(cx, &place, d, refs) {
            datasets.push(dataset);
        }
    }
    datasets
}

/// One dataset (at `place`); `None` when its upstream or home is not valid (reported).
fn dataset(
    cx: &mut Cx<'_>,
    place: &Place,
    d: RawDataset,
    refs: &References<'_>,
) -> Option<Dataset> {
    let upstream = upstream(cx, place, &d.upstream, refs.upstreams);
    if !valid_category(&d.category) {
        cx.err(&place.field("category"), format!("\"{}\" is not a category (dot-separated lower-case names, e.g. \"user.financial\")", d.category));
    }
    let matcher = matcher(cx, &place.field("match"), &d.matcher);
    let subject = d
        .subject
        .as_ref()
        .and_then(|s| subject(cx, &place.field("subject"), s));
    let home = home(cx, place, d.home.as_deref(), refs);
    let cross_border = transfer_rule(cx, &place.field("cross_border"), d.cross_border.as_deref());
    let third_party = transfer_rule(cx, &place.field("third_party"), d.third_party.as_deref());
    let records = d.records.as_ref().and_then(|rec| {
        if d.subject.is_some() {
            cx.err(
                &place.field("records"),
                "a dataset names its subject either for the whole request (subject) or per record (records), not both",
            );
        }
        records(cx, &place.field("records"), rec)
    });
    if (cross_border == Rule::Consent || third_party == Rule::Consent)
        && d.subject.is_none()
        && d.records.is_none()
    {
        cx.err(&place.missing("subject"), "required when cross_border or third_party is \"consent\": consent is given by a data subject (name it for the request with subject, or per record with records)");
    }
    if d.egress_methods.as_ref().is_some_and(Vec::is_empty) {
        cx.err(
            &place.field("egress_methods"),
            "must name at least one method: with none, every request would skip the transfer rules",
        );
    }
    // Reported here, after the checks above, and not with the rest of `match`: the order
    // in which a dataset's problems are listed is kept as it has always been.
    if d.matcher.methods.as_ref().is_some_and(Vec::is_empty) {
        cx.err(
            &place.field("match").key("methods"),
            "must name at least one method (leave it out to match every method): with none, the dataset matches nothing",
        );
    }
    let egress_methods = match &d.egress_methods {
        None => vec![Method::GET, Method::HEAD],
        Some(ms) => methods(cx, &place.field("egress_methods"), ms),
    };
    let mode = match d.mode.as_deref() {
        None => refs.policy.mode,
        Some(m) => parse_mode(cx, &place.field("mode"), Some(m)).unwrap_or(refs.policy.mode),
    };
    let (upstream, home) = (upstream?, home?);
    let r = |name: &str| -> Arc<str> { place.rule_of(name).into() };
    Some(Dataset {
        name: d.name.as_str().into(),
        host: matcher.host,
        path_prefix: matcher.path_prefix,
        methods: matcher.methods,
        upstream,
        category: d.category.as_str().into(),
        subject,
        records,
        home,
        resident: d.resident.unwrap_or(true),
        cross_border,
        third_party,
        egress_mask: egress_methods
            .iter()
            .filter_map(method_bit)
            .fold(0, |m, b| m | b),
        egress_methods,
        mode,
        rules: DatasetRules {
            matcher: r("match"),
            upstream: r("upstream"),
            home: r("home"),
            cross_border: r("cross_border"),
            third_party: r("third_party"),
            subject: r("subject"),
            egress: r("egress_methods"),
        },
    })
}

/// The index of the upstream `name`; reported unless an upstream of that name is defined
/// (an invalid one has its own error already).
fn upstream(cx: &mut Cx<'_>, place: &Place, name: &str, upstreams: &Upstreams) -> Option<usize> {
    let index = upstreams.index(name);
    if index.is_none() && !upstreams.defined(name) {
        let known: Vec<&str> = upstreams.list.iter().map(|u| &*u.name).collect();
        cx.err(
            &place.field("upstream"),
            format!(
                "no upstream named \"{name}\" (defined: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        );
    }
    index
}

/// `match`, compiled.
struct Matcher {
    path_prefix: String,
    host: Option<String>,
    methods: Option<Vec<Method>>,
}

/// `match = { path_prefix, host, methods }` (at `place`, which names every problem in it).
fn matcher(cx: &mut Cx<'_>, place: &Place, m: &RawMatch) -> Matcher {
    let path_prefix = m.path_prefix.clone().unwrap_or_else(|| "/".into());
    if let Err(e) = check_prefix(&path_prefix) {
        cx.err(&place.key("path_prefix"), e);
    }
    let host = m.host.as_ref().map(|h| h.to_ascii_lowercase());
    if let Some(h) = &host
        && (h.is_empty()
            || h.contains(['/', ' ', ':'])
            || h.strip_prefix("*.").unwrap_or(h).contains('*'))
    {
        cx.err(
            &place.key("host"),
            format!("\"{h}\" is not a host name (no port; a leading \"*.\" matches sub-domains)"),
        );
    }
    let methods = m
        .methods
        .as_ref()
        .map(|ms| methods(cx, &place.key("methods"), ms));
    Matcher {
        path_prefix,
        host,
        methods,
    }
}

/// A list of methods (at `place`), each refused one reported at its element.
fn methods(cx: &mut Cx<'_>, place: &Place, raw: &[String]) -> Vec<Method> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, s)| parse_method(s).map_err(|e| cx.err(&place.index(i), e)).ok())
        .collect()
}

fn parse_method(s: &str) -> Result<Method, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase()) {
        Method::from_bytes(s.as_bytes()).map_err(|e| e.to_string())
    } else {
        Err(format!(
            "\"{s}\" is not an HTTP method (write it in upper case, e.g. \"GET\")"
        ))
    }
}

fn check_prefix(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("path_prefix \"{p}\" must start with \"/\""));
    }
    let normal = crate::policy::path::normalize(p).map(|n| n.into_owned());
    match normal {
        Ok(n) if n == p => Ok(()),
        _ => Err(format!(
            "path_prefix \"{p}\" is not a normalised path (no \"//\", \".\" or \"..\"; characters written as themselves, only %, ?, #, space and control characters percent-encoded, in upper case): requests are matched after normalisation, so it could never match"
        )),
    }
}

/// `subject = { path_segment | header | query }` (at `place`): exactly one of them.
fn subject(cx: &mut Cx<'_>, place: &Place, s: &RawSubject) -> Option<SubjectSource> {
    match (s.path_segment, &s.header, &s.query) {
        (Some(n), None, None) if n >= 1 => Some(SubjectSource::PathSegment(n as usize)),
        (Some(n), None, None) => {
            cx.err(
                &place.key("path_segment"),
                format!("{n} is not a path segment: segments count from 1"),
            );
            None
        }
        (None, Some(h), None) => Some(SubjectSource::Header(parse_header(
            cx,
            &place.key("header"),
            h,
        ))),
        (None, None, Some(q)) if !q.is_empty() => Some(SubjectSource::Query(q.clone())),
        _ => {
            cx.err(place, "give exactly one of path_segment, header or query");
            None
        }
    }
}

/// `home`, or the policy's; reported when neither is written.
fn home(
    cx: &mut Cx<'_>,
    place: &Place,
    raw: Option<&str>,
    refs: &References<'_>,
) -> Option<Jurisdiction> {
    match raw {
        Some(h) => jurisdictions::resolve(cx, refs.jurisdictions, &place.field("home"), h),
        None => {
            if refs.policy.home.is_none() && !refs.policy.home_written {
                cx.err(
                    &place.missing("home"),
                    "no home jurisdiction: set datasets.*.home or policy.home",
                );
            }
            refs.policy.home.clone()
        }
    }
}

/// `cross_border` or `third_party` (at `place`): consent when absent; deny, after reporting
/// why, when it is not one of the three.
fn transfer_rule(cx: &mut Cx<'_>, place: &Place, v: Option<&str>) -> Rule {
    match v {
        None => Rule::Consent,
        Some("deny") => Rule::Deny,
        Some("consent") => Rule::Consent,
        Some("allow") => Rule::Allow,
        Some(other) => {
            cx.err(
                place,
                format!("\"{other}\" is not one of \"deny\", \"consent\", \"allow\""),
            );
            Rule::Deny
        }
    }
}

/// `records = { format, subject }` (at `place`): how a bulk object's records are read and
/// which field of each names its data subject.
fn records(cx: &mut Cx<'_>, place: &Place, rec: &RawRecords) -> Option<Records> {
    let format = match rec.format.as_deref() {
        Some(f) => Format::from_name(f).or_else(|| {
            cx.err(
                &place.key("format"),
                format!("\"{f}\" is not one of \"jsonl\", \"csv\", \"parquet\""),
            );
            None
        }),
        None => {
            cx.err(
                place,
                "format is required: \"jsonl\", \"csv\" or \"parquet\"",
            );
            None
        }
    };
    let subject = match (&rec.subject, format) {
        (None, _) => {
            cx.err(
                place,
                "subject is required: the field of each record that names its data subject",
            );
            None
        }
        (Some(s), Some(f)) => SubjectPath::parse(f, s)
            .map_err(|e| cx.err(&place.key("subject"), e.to_string()))
            .ok(),
        (Some(_), None) => None,
    };
    Some(Records {
        spec: RecordsSpec {
            format: format?,
            subject: subject?,
            subject_text: rec.subject.as_deref()?.into(),
        },
        rule: place.rule().into(),
    })
}

/// The index that finds a request's dataset: datasets by path prefix, the most specific
/// first, and the prefix lengths to probe.
pub(super) fn build_index(datasets: &[Dataset]) -> DatasetIndex {
    let mut by_prefix: FastMap<String, Vec<usize>> = FastMap::default();
    for (i, d) in datasets.iter().enumerate() {
        by_prefix.entry(d.path_prefix.clone()).or_default().push(i);
    }
    for list in by_prefix.values_mut() {
        // Most specific first: an exact host, then a wildcard host (a longer suffix first),
        // then none; then a method constraint; ties keep file order.
        let host_rank = |d: &Dataset| match d.host.as_deref() {
            Some(h) if !h.starts_with("*.") => (0, 0),
            Some(h) => (1, usize::MAX - h.len()),
            None => (2, 0),
        };
        list.sort_by_key(|&i| {
            let d = &datasets[i];
            (host_rank(d), d.methods.is_none(), i)
        });
    }
    let mut lengths: Vec<usize> = by_prefix
        .keys()
        .map(|p| p.len())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    let mut last_bytes = vec![[0u64; 4]; lengths.len()];
    for p in by_prefix.keys() {
        if let (Some(k), Some(&b)) = (
            lengths.iter().position(|&l| l == p.len()),
            p.as_bytes().last(),
        ) {
            last_bytes[k][usize::from(b / 64)] |= 1 << (b % 64);
        }
    }
    DatasetIndex {
        lengths,
        last_bytes,
        by_prefix,
    }
}

#[cfg(test)]
mod tests {
    use super::super::from_str;
    use super::super::testing::{BASE, DATASET_BASE, dataset, diags};
    use crate::bulk::Format;
    use http::Method;

    #[test]
    fn records_compile_and_their_mistakes_are_located() {
        let p = from_str(
            "p.toml",
            &format!(
                "{BASE}{DATASET_BASE}{}",
                dataset(
                    "exports",
                    "match = { path_prefix = '/exports/' }\nrecords = { format = 'parquet', subject = 'user.id' }"
                ),
            ),
        )
        .unwrap();
        let rec = p.datasets[0].records.as_ref().unwrap();
        assert_eq!(rec.spec.format, Format::Parquet);
        assert_eq!(&*rec.rule, "datasets.exports.records");

        let d = diags(&format!(
            "{DATASET_BASE}{}{}{}{}{}",
            dataset(
                "both",
                "match = { path_prefix = '/a/' }\nsubject = { path_segment = 2 }\nrecords = { format = 'jsonl', subject = 'user_id' }"
            ),
            dataset(
                "fmt",
                "match = { path_prefix = '/b/' }\nrecords = { format = 'xml', subject = 'id' }"
            ),
            dataset(
                "ptr",
                "match = { path_prefix = '/c/' }\nrecords = { format = 'jsonl', subject = '/user/~2' }"
            ),
            dataset(
                "none",
                "match = { path_prefix = '/d/' }\nrecords = { format = 'csv' }"
            ),
            dataset(
                "stray",
                "match = { path_prefix = '/e/' }\nrecords = { format = 'csv', subject = 'id', column = 'x' }"
            ),
        ));
        let rules: Vec<&str> = d.iter().map(|d| d.rule.as_str()).collect();
        assert_eq!(
            rules,
            [
                "datasets[4].records.column",
                "datasets.both.records",
                "datasets.fmt.records",
                "datasets.ptr.records",
                "datasets.none.records",
            ],
            "{d:?}"
        );
        assert_eq!(d[0].message, "unknown key");
        assert!(d[1].message.contains("not both"), "{}", d[1]);
        assert!(d[2].message.contains("\"xml\" is not one of"), "{}", d[2]);
        assert!(d[3].message.contains("~0"), "{}", d[3]);
        assert!(d[4].message.contains("subject is required"), "{}", d[4]);
        // Every mistake is on its own line of the file.
        assert!(d.iter().all(|d| d.line.is_some()), "{d:?}");
    }

    #[test]
    fn empty_method_lists_are_errors_not_silent_switches() {
        let d = diags(&format!(
            "{DATASET_BASE}{}{}",
            dataset("a", "match = { path_prefix = '/a/' }\negress_methods = []"),
            dataset("b", "match = { path_prefix = '/b/', methods = [] }"),
        ));
        let rules: Vec<&str> = d.iter().map(|d| d.rule.as_str()).collect();
        assert_eq!(
            rules,
            ["datasets.a.egress_methods", "datasets.b.match"],
            "{d:?}"
        );
        assert!(d[0].message.contains("at least one"), "{}", d[0]);
    }

    #[test]
    fn an_exact_host_outranks_a_wildcard_whatever_the_file_order() {
        let p = from_str(
            "p.toml",
            &format!(
                "{BASE}{DATASET_BASE}{}{}{}{}",
                dataset("any", "match = { path_prefix = '/' }"),
                dataset("wide", "match = { host = '*.example', path_prefix = '/' }"),
                dataset(
                    "narrow",
                    "match = { host = '*.s3.example', path_prefix = '/' }"
                ),
                dataset(
                    "exact",
                    "match = { host = 'pay.s3.example', path_prefix = '/' }"
                ),
            ),
        )
        .unwrap();
        let name = |host: &str| {
            crate::policy::decide::match_dataset(&p, Some(host), &Method::GET, "/u1/x")
                .map(|i| p.datasets[i].name.to_string())
        };
        assert_eq!(name("pay.s3.example").as_deref(), Some("exact"));
        assert_eq!(name("other.s3.example").as_deref(), Some("narrow"));
        assert_eq!(name("x.example").as_deref(), Some("wide"));
        assert_eq!(name("elsewhere.test").as_deref(), Some("any"));
    }

    #[test]
    fn raw_and_escaped_spellings_of_a_prefix_match_the_same_dataset() {
        let p = from_str(
            "p.toml",
            &format!(
                "{BASE}{DATASET_BASE}{}{}",
                dataset("all", "match = { path_prefix = '/' }"),
                dataset("health", "match = { path_prefix = '/santé/v1:export/' }"),
            ),
        )
        .unwrap();
        for raw in [
            "/santé/v1:export/u1",
            "/sant%C3%A9/v1%3Aexport/u1",
            "/sant%c3%a9/v1:export/u1",
        ] {
            let n = crate::policy::path::normalize(raw).unwrap();
            let i = crate::policy::decide::match_dataset(&p, None, &Method::GET, &n);
            assert_eq!(i.map(|i| &*p.datasets[i].name), Some("health"), "{raw}");
        }
        // A prefix has one spelling, the normal one.
        let d = diags(&format!(
            "{DATASET_BASE}{}",
            dataset("health", "match = { path_prefix = '/sant%C3%A9/' }")
        ));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].message.contains("not a normalised path"), "{}", d[0]);
    }
}
