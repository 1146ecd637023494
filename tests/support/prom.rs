//! A strict reader of the exposition `/metrics` writes (OpenMetrics 1.0 text, the Prometheus
//! text format's successor), so that a test fails on anything a Prometheus server would
//! refuse or misread: bad names or escapes, a sample before its `# TYPE`, a family split in
//! two, a duplicate series, histogram buckets that are not cumulative or disagree with
//! `_count`, an exposition that does not end in `# EOF`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

/// One sample line.
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug)]
pub struct Exposition {
    /// Family name -> type.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

fn metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Splits `{a="x",b="y"} rest` into the labels and `rest`.
fn labels(line: &str, n: usize) -> (BTreeMap<String, String>, &str) {
    let mut out = BTreeMap::new();
    let mut rest = line;
    loop {
        rest = rest.trim_start_matches(' ');
        if let Some(r) = rest.strip_prefix('}') {
            return (out, r);
        }
        let eq = rest
            .find('=')
            .unwrap_or_else(|| panic!("line {n}: a label without `=`"));
        let name = rest[..eq].trim();
        assert!(label_name(name), "line {n}: bad label name {name:?}");
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .unwrap_or_else(|| panic!("line {n}: label {name} has no quoted value"));
        let mut v = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => v.push('\\'),
                    Some((_, '"')) => v.push('"'),
                    Some((_, 'n')) => v.push('\n'),
                    other => panic!("line {n}: bad escape {other:?} in label {name}"),
                },
                Some((i, '"')) => break i,
                Some((_, '\n')) | None => panic!("line {n}: unterminated value of label {name}"),
                Some((_, c)) => v.push(c),
            }
        };
        assert!(
            out.insert(name.to_string(), v).is_none(),
            "line {n}: label {name} given twice"
        );
        rest = &rest[end + 1..];
        match rest.strip_prefix(',') {
            Some(r) => rest = r,
            None => assert!(
                rest.starts_with('}'),
                "line {n}: no `,` or `}}` after label {name}"
            ),
        }
    }
}

/// The family a sample name belongs to, given the declared types.
fn family<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types
                .get(base)
                .is_some_and(|t| t == "histogram" || t == "summary")
        {
            return Some(base);
        }
    }
    // OpenMetrics: a counter family `x` has the sample `x_total`.
    if let Some(base) = name.strip_suffix("_total")
        && types.get(base).is_some_and(|t| t == "counter")
    {
        return Some(base);
    }
    None
}

/// Parses `text`, panicking with the line number at the first violation.
pub fn parse(text: &str) -> Exposition {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series = BTreeSet::new();
    assert!(
        text.ends_with("\n# EOF\n"),
        "an OpenMetrics exposition ends with `# EOF` and a line feed"
    );
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut parts = c.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("TYPE") => {
                    let name = parts.next().unwrap_or_default();
                    let t = parts.next().unwrap_or_default();
                    assert!(metric_name(name), "line {n}: bad metric name {name:?}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "line {n}: bad type {t:?}"
                    );
                    assert!(
                        types.insert(name.to_string(), t.to_string()).is_none(),
                        "line {n}: second TYPE for {name}"
                    );
                }
                Some("HELP") => {
                    let name = parts.next().unwrap_or_default();
                    assert!(metric_name(name), "line {n}: bad metric name {name:?}");
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        assert!(metric_name(name), "line {n}: bad metric name {name:?}");
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(r) => labels(r, n),
            None => (BTreeMap::new(), &line[name_end..]),
        };
        let mut fields = rest.split_whitespace();
        let v = fields
            .next()
            .and_then(value)
            .unwrap_or_else(|| panic!("line {n}: no value: {line}"));
        if let Some(ts) = fields.next() {
            assert!(ts.parse::<i64>().is_ok(), "line {n}: bad timestamp {ts}");
        }
        assert!(fields.next().is_none(), "line {n}: trailing text: {line}");
        let fam = family(name, &types)
            .unwrap_or_else(|| panic!("line {n}: sample {name} before its # TYPE"))
            .to_string();
        if current.as_deref() != Some(fam.as_str()) {
            assert!(
                !finished.contains(&fam),
                "line {n}: the samples of {fam} are not together"
            );
            if let Some(prev) = current.replace(fam.clone()) {
                finished.insert(prev);
            }
        }
        assert!(
            series.insert(format!("{name}{labels:?}")),
            "line {n}: duplicate series {name}{labels:?}"
        );
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value: v,
        });
    }
    let exp = Exposition { types, samples };
    exp.check_histograms();
    exp
}

impl Exposition {
    fn check_histograms(&self) {
        for (fam, t) in &self.types {
            if t != "histogram" {
                continue;
            }
            let bucket = format!("{fam}_bucket");
            let mut by_series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            for s in self.samples.iter().filter(|s| s.name == bucket) {
                let mut rest = s.labels.clone();
                let le = rest
                    .remove("le")
                    .unwrap_or_else(|| panic!("{bucket} without le"));
                by_series
                    .entry(format!("{rest:?}"))
                    .or_default()
                    .push((value(&le).expect("le is a number"), s.value));
            }
            assert!(!by_series.is_empty(), "histogram {fam} has no buckets");
            for (rest, buckets) in by_series {
                assert!(
                    buckets
                        .windows(2)
                        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                    "{fam}{rest}: buckets not ordered and cumulative: {buckets:?}"
                );
                let (le, inf) = *buckets.last().unwrap();
                assert!(le.is_infinite(), "{fam}{rest}: no +Inf bucket");
                let count = self
                    .samples
                    .iter()
                    .find(|s| s.name == format!("{fam}_count") && format!("{:?}", s.labels) == rest)
                    .unwrap_or_else(|| panic!("{fam}{rest}: no _count"));
                assert_eq!(count.value, inf, "{fam}{rest}: _count differs from +Inf");
            }
        }
    }

    /// The value of the series with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// The sum over every series of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }
}
