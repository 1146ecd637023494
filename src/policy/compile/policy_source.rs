//! `[policy.source]`: where a sidecar fetches the signed bundle its rules come from (`s3://`,
//! `https://` or `file:`), how to reach an object store (as `[log.ship]` does), the only key
//! whose bundles are accepted, how often to look, and where the last verified one is kept.
//!
//! Its own file like every section. It takes the compiled `[log]` because the kept bundle lives
//! beside the decision log unless told otherwise.

use super::place::{Cx, Place};
use super::values::{Bounds, duration_or, store_credentials, store_endpoint};
use crate::policy::model::{LogSettings, LogTarget, PolicySource, ShipCredentials, SourceUrl};
use crate::policy::raw::RawPolicySource;
use std::path::PathBuf;
use std::time::Duration;

/// What the kept bundle is called beside the decision log.
pub const CACHE_NAME: &str = "policy.bundle";

/// A source is looked at at most once a second.
const POLL_INTERVAL: Bounds = Bounds {
    min: Duration::from_secs(1),
    max: Duration::MAX,
    refusal: "must be at least 1s",
};

/// Compiles `[policy.source]` (at `place`); `None` (after reporting why) when it cannot be used.
pub(super) fn compile(
    cx: &mut Cx<'_>,
    place: &Place,
    raw: RawPolicySource,
    log: &LogSettings,
) -> Option<PolicySource> {
    let before = cx.reported();
    let url = match raw.url.as_deref() {
        None => {
            cx.err(
                &place.missing("url"),
                "is required: where the bundle is, e.g. \"s3://policies/cn-pipl.bundle\", \"https://policies.internal/cn-pipl.bundle\" or \"file:/etc/residency/cn-pipl.bundle\"",
            );
            None
        }
        Some(text) => source_url(cx, &place.field("url"), text),
    };
    let is_s3 = matches!(url, Some(SourceUrl::S3(_)));
    // The object store's settings mean nothing to a web server or a file.
    for (name, written) in [
        ("endpoint", raw.endpoint.is_some()),
        ("region", raw.region.is_some()),
        ("credentials", raw.credentials.is_some()),
    ] {
        if written && url.is_some() && !is_s3 {
            cx.err(&place.field(name), "applies to an s3:// url only");
        }
    }
    let endpoint = raw
        .endpoint
        .as_deref()
        .and_then(|text| store_endpoint(cx, &place.field("endpoint"), text));
    let credentials =
        store_credentials(cx, &place.field("credentials"), raw.credentials.as_deref());
    let key = match raw.key.as_deref() {
        None | Some("") => {
            cx.err(
                &place.missing("key"),
                "is required: the public key of the only signer whose bundles are accepted (`residency-proxy certs init DIR` makes policy-signing.pub)",
            );
            None
        }
        Some(path) => Some(PathBuf::from(path)),
    };
    let poll_interval = duration_or(
        cx,
        &place.field("poll_interval"),
        raw.poll_interval.as_deref(),
        &POLL_INTERVAL,
        Duration::from_secs(30),
    );
    let cache = match (raw.cache.as_deref(), &log.target) {
        (Some(""), _) => {
            cx.err(&place.field("cache"), "must be a file path");
            None
        }
        (Some(path), _) => Some(PathBuf::from(path)),
        (None, LogTarget::File(log)) => Some(
            log.parent()
                .map_or_else(|| PathBuf::from(CACHE_NAME), |dir| dir.join(CACHE_NAME)),
        ),
        (None, LogTarget::Stdout) => {
            cx.err(
                &place.missing("cache"),
                "is required while log.path is standard output: the last verified bundle is kept beside the decision log otherwise",
            );
            None
        }
    };
    if cx.reported() > before {
        return None;
    }
    Some(PolicySource {
        url: url?,
        endpoint,
        region: raw.region,
        credentials: if is_s3 {
            credentials
        } else {
            ShipCredentials::Env
        },
        key: key?,
        poll_interval,
        cache: cache?,
    })
}

/// `url`: `s3://BUCKET/KEY`, `https://HOST/PATH` (or `http://`), or `file:PATH`.
fn source_url(cx: &mut Cx<'_>, place: &Place, text: &str) -> Option<SourceUrl> {
    if let Some(rest) = text.strip_prefix("file:") {
        // `file:PATH` names a path as written (relative ones from the working folder);
        // `file:///abs` is read as the URL it is.
        let path = if rest.starts_with("//") {
            url::Url::parse(text)
                .ok()
                .and_then(|u| u.to_file_path().ok())
        } else {
            (!rest.is_empty()).then(|| PathBuf::from(rest))
        };
        if path.is_none() {
            cx.err(place, format!("\"{text}\" does not name a file"));
        }
        return path.map(SourceUrl::File);
    }
    let parsed = match url::Url::parse(text) {
        Ok(u) => u,
        Err(e) => {
            cx.err(place, format!("\"{text}\" is not a URL: {e}"));
            return None;
        }
    };
    match parsed.scheme() {
        "s3" => {
            let bucket = parsed.host_str().is_some_and(|h| !h.is_empty());
            let key = parsed.path().trim_start_matches('/');
            if !bucket || key.is_empty() || key.ends_with('/') {
                cx.err(
                    place,
                    format!("\"{text}\" must name a bundle object: s3://BUCKET/KEY"),
                );
                return None;
            }
            Some(SourceUrl::S3(parsed))
        }
        "https" | "http" if parsed.host_str().is_some() => Some(SourceUrl::Http(parsed)),
        scheme => {
            cx.err(
                place,
                format!(
                    "\"{text}\": scheme {scheme}: is not one of s3://, https://, http://, file:"
                ),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::diags;
    use super::super::{PolicyError, PolicyFile, load_file};
    use crate::policy::model::{ShipCredentials, SourceUrl};
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    fn sidecar(text: &str) -> Result<PolicyFile, PolicyError> {
        let owned = text.to_string();
        load_file(Path::new("sidecar.toml"), move |_| Ok(owned.clone()))
    }

    #[test]
    fn a_source_compiles_with_its_defaults_beside_the_log() {
        let file = sidecar(
            "[policy.source]\nurl = 's3://policies/cn.bundle'\nendpoint = 'http://10.20.0.9:9000'\nkey = 'certs/policy-signing.pub'\n[log]\npath = 'var/logs/decisions.jsonl'\npseudonymize = false\n",
        )
        .unwrap();
        let PolicyFile::Sidecar(s) = file else {
            panic!("not a sidecar")
        };
        let src = &s.source;
        assert!(matches!(&src.url, SourceUrl::S3(u) if u.as_str() == "s3://policies/cn.bundle"));
        assert_eq!(src.poll_interval, Duration::from_secs(30));
        assert_eq!(src.cache, PathBuf::from("var/logs/policy.bundle"));
        assert_eq!(src.credentials, ShipCredentials::Env);
        assert_eq!(src.key, PathBuf::from("certs/policy-signing.pub"));
    }

    #[test]
    fn file_urls_name_paths_as_written() {
        for (url, path) in [
            ("file:bundles/cn.bundle", "bundles/cn.bundle"),
            ("file:/etc/cn.bundle", "/etc/cn.bundle"),
            ("file:///etc/cn.bundle", "/etc/cn.bundle"),
        ] {
            let PolicyFile::Sidecar(s) = sidecar(&format!(
                "[policy.source]\nurl = '{url}'\nkey = 'k.pub'\ncache = 'c.bundle'\n[log]\npseudonymize = false\n"
            ))
            .unwrap() else {
                panic!("not a sidecar")
            };
            assert_eq!(s.source.url, SourceUrl::File(PathBuf::from(path)), "{url}");
        }
    }

    #[test]
    fn mistakes_in_a_source_are_located() {
        let cases = [
            (
                "url = 'ftp://x/y'\nkey = 'k'\n",
                "policy.source.url",
                "is not one of s3://",
            ),
            (
                "url = 's3://bucket/'\nkey = 'k'\n",
                "policy.source.url",
                "must name a bundle object",
            ),
            ("key = 'k'\n", "policy.source.url", "is required"),
            (
                "url = 'file:x.bundle'\n",
                "policy.source.key",
                "is required",
            ),
            (
                "url = 'file:x.bundle'\nkey = 'k'\nendpoint = 'http://h:9000'\n",
                "policy.source.endpoint",
                "applies to an s3:// url only",
            ),
            (
                "url = 'file:x.bundle'\nkey = 'k'\npoll_interval = '10ms'\n",
                "policy.source.poll_interval",
                "at least 1s",
            ),
        ];
        for (fields, rule, says) in cases {
            let d = match sidecar(&format!(
                "[log]\npseudonymize = false\n[policy.source]\n{fields}"
            )) {
                Err(PolicyError::Invalid(d)) => d,
                other => panic!("{fields}: {:?}", other.map(|_| ())),
            };
            assert!(
                d.iter()
                    .any(|d| d.rule == rule && d.message.contains(says) && d.line.is_some()),
                "{fields}: {d:?}"
            );
        }
        // Standard output holds no bundle.
        let d = match sidecar(
            "[log]\npath = '-'\npseudonymize = false\n[policy.source]\nurl = 'file:x'\nkey = 'k'\n",
        ) {
            Err(PolicyError::Invalid(d)) => d,
            other => panic!("{:?}", other.map(|_| ())),
        };
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].rule, "policy.source.cache");
        // A whole policy never reads [policy.source] in an included file.
        assert!(diags("").is_empty());
    }
}
