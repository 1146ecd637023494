//! `[log]` and `[log.ship]`: where decision records are written and how durably, what happens
//! when they cannot be, signing and checkpoints, pseudonyms and masked headers, the instance
//! name of the chain, rotation, and shipping sealed files to object storage.
//!
//! Its own file like every section; `[log.ship]` is here because it is checked against the
//! log's own settings (a file target, the rotation size).

use super::place::{Cx, Place};
use super::values::{
    Bounds, POSITIVE, choice, duration, duration_or, parse_header, parse_size, store_credentials,
    store_endpoint,
};
use crate::policy::model::{Durability, LogSettings, LogTarget, OnFailure, ShipSettings};
use crate::policy::raw::{RawLog, RawShip, RawSize};
use http::HeaderName;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Headers masked in every record, whatever the policy adds.
const DEFAULT_MASK: [&str; 3] = ["authorization", "x-amz-security-token", "cookie"];

/// Files are sealed at most once a second.
const ROTATE_INTERVAL: Bounds = Bounds {
    min: Duration::from_secs(1),
    max: Duration::MAX,
    refusal: "must be at least 1s",
};

/// Compiles `[log]` (at `place`), with its `[log.ship]`.
pub(super) fn compile(cx: &mut Cx<'_>, place: &Place, l: RawLog) -> LogSettings {
    let target = target(cx, place, l.path.as_deref());
    let durability = choice(
        cx,
        &place.field("durability"),
        l.durability.as_deref(),
        &[("write", Durability::Write), ("fsync", Durability::Fsync)],
        Durability::Write,
    );
    let on_failure = choice(
        cx,
        &place.field("on_failure"),
        l.on_failure.as_deref(),
        &[("deny", OnFailure::Deny), ("allow", OnFailure::Allow)],
        OnFailure::Deny,
    );
    let pseudonymize = l.pseudonymize.unwrap_or(true);
    let signing_key = l.signing_key.map(PathBuf::from);
    if pseudonymize && signing_key.is_none() {
        cx.err(&place.missing("signing_key"), "required while log.pseudonymize is on (the default): the pseudonym key is derived from it (create one with `residency-proxy certs init DIR`)");
    }
    let checkpoint_every = l.checkpoint_every.unwrap_or(1000);
    if checkpoint_every == 0 {
        cx.err(&place.field("checkpoint_every"), "must be at least 1");
    }
    let checkpoint_interval = duration_or(
        cx,
        &place.field("checkpoint_interval"),
        l.checkpoint_interval.as_deref(),
        &POSITIVE,
        Duration::from_secs(10),
    );
    let mask_headers = mask_headers(cx, place, l.mask_headers.as_deref());
    let instance = match l.instance.as_deref() {
        None => default_instance(),
        Some(name) => {
            if let Err(why) = check_instance(name) {
                cx.err(&place.field("instance"), why);
            }
            Arc::from(name)
        }
    };
    let ship = l.ship.map(|raw| {
        let ship = ship(cx, &place.field("ship"), raw);
        if matches!(target, LogTarget::Stdout) {
            cx.err(
                &place.field("ship"),
                "needs log.path to be a file: only sealed files ship, and standard output is never sealed",
            );
        }
        ship
    });
    // Shipping seals files on a schedule by default, so that a quiet sidecar ships too.
    let rotate_interval = match l.rotate_interval.as_deref() {
        None => ship.as_ref().map(|_| Duration::from_secs(300)),
        Some(t) => duration(cx, &place.field("rotate_interval"), t, &ROTATE_INTERVAL),
    };
    let rotate_bytes = l.rotate_bytes.unwrap_or(100 * 1024 * 1024);
    let ship = ship.flatten();
    if let Some(sh) = &ship
        && sh.spool_max_bytes <= rotate_bytes
    {
        cx.err(
            &place.field("ship").field("spool_max_bytes"),
            format!(
                "{} is not more than log.rotate_bytes ({rotate_bytes}): every file sealed by size would fill the spool, and the log would refuse records until it shipped; give it room for several files",
                sh.spool_max_bytes
            ),
        );
    }
    LogSettings {
        instance,
        instance_given: l.instance.is_some(),
        rotate_interval,
        ship,
        target,
        durability,
        on_failure,
        signing_key,
        checkpoint_every: checkpoint_every.max(1),
        checkpoint_interval,
        rotate_bytes,
        pseudonymize,
        mask_headers,
    }
}

/// `path`: a file (the default), or `-` for standard output.
fn target(cx: &mut Cx<'_>, place: &Place, path: Option<&str>) -> LogTarget {
    match path {
        None => LogTarget::File(PathBuf::from("logs/decisions.jsonl")),
        Some("-") => LogTarget::Stdout,
        Some("") => {
            cx.err(
                &place.field("path"),
                "must be a file path or \"-\" for standard output",
            );
            LogTarget::Stdout
        }
        Some(p) => LogTarget::File(PathBuf::from(p)),
    }
}

/// `mask_headers`, added to the headers always masked.
fn mask_headers(cx: &mut Cx<'_>, place: &Place, raw: Option<&[String]>) -> Vec<HeaderName> {
    let mut mask: Vec<HeaderName> = DEFAULT_MASK
        .iter()
        .map(|h| HeaderName::from_static(h))
        .collect();
    for (i, h) in raw.into_iter().flatten().enumerate() {
        let hn = parse_header(cx, &place.field("mask_headers").index(i), h);
        if !mask.contains(&hn) {
            mask.push(hn);
        }
    }
    mask
}

/// The host name, as a chain name: `[log] instance` when not given.
fn default_instance() -> Arc<str> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = host
        .trim()
        .chars()
        .map(|c| if instance_char(c) { c } else { '-' })
        .take(INSTANCE_MAX)
        .collect();
    if name.is_empty() {
        Arc::from("residency-proxy")
    } else if like_a_workers_chain(&name) {
        // A host named `node-w1` would collide with host `node`'s worker 1.
        Arc::from(format!("{name}-0"))
    } else {
        Arc::from(name)
    }
}

/// Whether `name` ends as worker K's chain of another instance is named (`NAME-wK`).
fn like_a_workers_chain(name: &str) -> bool {
    name.rsplit_once("-w").is_some_and(|(stem, k)| {
        !stem.is_empty() && !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit())
    })
}

const INSTANCE_MAX: usize = 128;

fn instance_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// An instance names a folder of object storage and appears in every record: letters,
/// digits, `-`, `_` and `.`, not starting with a dot.
fn check_instance(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > INSTANCE_MAX {
        return Err(format!("must be 1 to {INSTANCE_MAX} characters"));
    }
    if name.starts_with('.') || !name.chars().all(instance_char) {
        return Err(format!(
            "\"{name}\" may hold only letters, digits, '-', '_' and '.', and not start with '.' (it names a folder in object storage)"
        ));
    }
    if like_a_workers_chain(name) {
        return Err(format!(
            "\"{name}\" ends as a worker's chain is named (INSTANCE-wK: worker K of a sidecar with several workers); choose a name that does not end in -w and digits"
        ));
    }
    Ok(())
}

/// `[log.ship]` (at `place`); `None` (after reporting why) when it cannot be used.
fn ship(cx: &mut Cx<'_>, place: &Place, raw: RawShip) -> Option<ShipSettings> {
    let before = cx.reported();
    let url = match raw.url.as_deref() {
        None => {
            cx.err(
                &place.missing("url"),
                "is required: where sealed files go, e.g. \"s3://decision-logs/shanghai/\"",
            );
            None
        }
        Some(text) => ship_url(cx, &place.field("url"), text),
    };
    let endpoint = raw
        .endpoint
        .as_deref()
        .and_then(|text| store_endpoint(cx, &place.field("endpoint"), text));
    let credentials =
        store_credentials(cx, &place.field("credentials"), raw.credentials.as_deref());
    let spool = place.field("spool_max_bytes");
    let spool_max_bytes = match raw.spool_max_bytes {
        None => 2 << 30,
        Some(RawSize::Bytes(n)) => n,
        Some(RawSize::Text(t)) => parse_size(&t).unwrap_or_else(|why| {
            cx.err(&spool, why);
            0
        }),
    };
    if spool_max_bytes == 0 && cx.reported() == before {
        cx.err(&spool, "must be more than 0");
    }
    if cx.reported() > before {
        return None;
    }
    Some(ShipSettings {
        url: url?,
        endpoint,
        region: raw.region,
        credentials,
        spool_max_bytes,
    })
}

/// `[log.ship] url`: where sealed files go, in object storage or a directory.
fn ship_url(cx: &mut Cx<'_>, place: &Place, text: &str) -> Option<url::Url> {
    match url::Url::parse(text) {
        Ok(u) if matches!(u.scheme(), "s3" | "gs" | "az" | "file") => Some(u),
        Ok(u) => {
            cx.err(
                place,
                format!(
                    "\"{text}\": scheme {}: is not one of s3://, gs://, az://, file://",
                    u.scheme()
                ),
            );
            None
        }
        Err(e) => {
            cx.err(place, format!("\"{text}\" is not a URL: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::from_str;
    use super::super::testing::{BASE, diags};
    use super::parse_size;
    use crate::policy::model::ShipCredentials;
    use std::time::Duration;

    #[test]
    fn shipping_settings_compile_and_their_mistakes_are_located() {
        let p = from_str(
            "p.toml",
            &format!(
                "{BASE}instance = 'payments-0'\n[log.ship]\nurl = 's3://logs/sh/'\nendpoint = 'http://10.20.0.9:9000'\nspool_max_bytes = '2GiB'\n"
            ),
        )
        .unwrap();
        assert_eq!(&*p.log.instance, "payments-0");
        // Shipping seals every 5 minutes unless told otherwise.
        assert_eq!(p.log.rotate_interval, Some(Duration::from_secs(300)));
        let ship = p.log.ship.unwrap();
        assert_eq!(
            (ship.url.as_str(), ship.spool_max_bytes),
            ("s3://logs/sh/", 2 << 30)
        );
        assert_eq!(ship.credentials, ShipCredentials::Env);

        for (extra, rule, says) in [
            (
                "instance = '../x'\n",
                "log.instance",
                "may hold only letters",
            ),
            (
                "instance = 'payments-w1'\n",
                "log.instance",
                "ends as a worker's chain is named",
            ),
            (
                "rotate_interval = '10ms'\n",
                "log.rotate_interval",
                "at least 1s",
            ),
            (
                "[log.ship]\nurl = 'ftp://x/'\n",
                "log.ship.url",
                "is not one of s3://",
            ),
            (
                "[log.ship]\nendpoint = 'http://x'\n",
                "log.ship.url",
                "is required",
            ),
            (
                "[log.ship]\nurl = 's3://x/'\nspool_max_bytes = '2 parsecs'\n",
                "log.ship.spool_max_bytes",
                "is not a size",
            ),
            (
                "rotate_bytes = 1000\n[log.ship]\nurl = 's3://x/'\nspool_max_bytes = 1000\n",
                "log.ship.spool_max_bytes",
                "is not more than log.rotate_bytes",
            ),
        ] {
            let d = diags(extra);
            assert!(
                d.iter().any(|d| d.rule == rule && d.message.contains(says)),
                "{extra}: {d:?}"
            );
        }
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("99999999999TiB").is_err());
    }
}
