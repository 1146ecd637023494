//! The checks that several sections share: durations (and their bounds), sizes, words from a
//! closed set, the mode, header names, networks, country codes and categories. Each one
//! either returns the value or reports why not at the setting's `Place`, so that a mistake
//! reads the same whichever section it is in.
//!
//! `parse_duration`, `parse_size` and `valid_category` are also used outside the policy
//! (the consent records, the command line).

use super::place::{Cx, Place};
use crate::policy::country::{Country, iso_hint};
use crate::policy::model::{Mode, ShipCredentials};
use http::HeaderName;
use ipnet::IpNet;
use std::time::Duration;

/// Parses durations written as `250ms`, `10s`, `5m` or `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("\"{s}\" is not a duration (write e.g. \"500ms\", \"10s\", \"5m\")")
    })?;
    let secs = |per: u64| {
        n.checked_mul(per)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("\"{s}\" is too long a duration"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(format!(
            "\"{s}\" is not a duration: the unit must be ms, s, m or h"
        )),
    }
}

/// The durations a setting accepts, and the sentence that refuses the others.
pub(super) struct Bounds {
    pub min: Duration,
    pub max: Duration,
    pub refusal: &'static str,
}

/// Any duration, zero included.
pub(super) const ANY: Bounds = Bounds {
    min: Duration::ZERO,
    max: Duration::MAX,
    refusal: "",
};

/// Any duration but zero: a timeout or an interval of zero would never wait or would spin.
pub(super) const POSITIVE: Bounds = Bounds {
    min: Duration::from_nanos(1),
    max: Duration::MAX,
    refusal: "must be greater than zero",
};

/// The duration `text` written at `place`; `None` (after reporting why) when it is not a
/// duration or is out of `bounds`.
pub(super) fn duration(
    cx: &mut Cx<'_>,
    place: &Place,
    text: &str,
    bounds: &Bounds,
) -> Option<Duration> {
    match parse_duration(text) {
        Ok(d) if bounds.min <= d && d <= bounds.max => Some(d),
        Ok(_) => {
            cx.err(place, bounds.refusal);
            None
        }
        Err(e) => {
            cx.err(place, e);
            None
        }
    }
}

/// The duration written at `place`, or `default` when it is absent or refused (after
/// reporting why, so that compiling goes on).
pub(super) fn duration_or(
    cx: &mut Cx<'_>,
    place: &Place,
    text: Option<&str>,
    bounds: &Bounds,
    default: Duration,
) -> Duration {
    text.and_then(|t| duration(cx, place, t, bounds))
        .unwrap_or(default)
}

/// Parses sizes written as `1048576`, `512KiB`, `500MB`, `2GiB` (binary and decimal units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("\"{s}\" is not a size (write e.g. \"512MiB\", \"2GiB\", \"500MB\")");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(bad)
}

/// One of a closed set of words, or the default when absent; anything else is an error
/// naming the choices (and the default is used to go on compiling).
pub(super) fn choice<T: Copy>(
    cx: &mut Cx<'_>,
    place: &Place,
    value: Option<&str>,
    options: &[(&str, T)],
    default: T,
) -> T {
    let Some(v) = value else { return default };
    if let Some((_, t)) = options.iter().find(|(w, _)| *w == v) {
        return *t;
    }
    let names: Vec<String> = options.iter().map(|(w, _)| format!("\"{w}\"")).collect();
    cx.err(place, format!("\"{v}\" is not one of {}", names.join(", ")));
    default
}

/// `mode`, in `[policy]` and on a dataset: enforce when absent, `None` when refused.
pub(super) fn parse_mode(cx: &mut Cx<'_>, place: &Place, v: Option<&str>) -> Option<Mode> {
    match v {
        None | Some("enforce") => Some(Mode::Enforce),
        Some("audit") => Some(Mode::Audit),
        Some(o) => {
            cx.err(
                place,
                format!("\"{o}\" is not one of \"enforce\", \"audit\""),
            );
            None
        }
    }
}

/// A header name, in any case (it is kept in lower case).
pub(super) fn parse_header(cx: &mut Cx<'_>, place: &Place, v: &str) -> HeaderName {
    HeaderName::from_bytes(v.to_ascii_lowercase().as_bytes()).unwrap_or_else(|_| {
        cx.err(place, format!("\"{v}\" is not an HTTP header name"));
        HeaderName::from_static("x-invalid")
    })
}

/// A network in CIDR notation, or one address.
pub(super) fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        // `10.20.5.0/16` written for `/24` would silently cover 256 times the addresses.
        if n.trunc() != n {
            return Err(format!(
                "\"{s}\" has bits set past its prefix length: write the network \"{}\", or a longer prefix",
                n.trunc()
            ));
        }
        return Ok(n);
    }
    s.parse::<std::net::IpAddr>().map(IpNet::from).map_err(|_| {
        format!("\"{s}\" is not a network (CIDR such as \"10.0.0.0/8\") or an address")
    })
}

/// An ISO 3166-1 alpha-2 country code; `None` (after reporting why, with a hint for a
/// common mistake such as `UK`) when `code` is not one.
pub(super) fn country(cx: &mut Cx<'_>, place: &Place, code: &str) -> Option<Country> {
    let parsed = Country::parse(code);
    if parsed.is_none() {
        cx.err(
            place,
            format!(
                "\"{code}\" is not an ISO 3166-1 alpha-2 country code{}",
                iso_hint(code)
            ),
        );
    }
    parsed
}

/// An object store's `endpoint` (`[log.ship]`, `[policy.source]`): an http(s) URL with a host.
pub(super) fn store_endpoint(cx: &mut Cx<'_>, place: &Place, text: &str) -> Option<url::Url> {
    match url::Url::parse(text) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Some(u),
        _ => {
            cx.err(
                place,
                format!("\"{text}\" is not an http:// or https:// URL with a host"),
            );
            None
        }
    }
}

/// An object store's `credentials`: `"env"` (the default) or an AWS-style credentials file.
pub(super) fn store_credentials(
    cx: &mut Cx<'_>,
    place: &Place,
    text: Option<&str>,
) -> ShipCredentials {
    match text {
        None | Some("env") => ShipCredentials::Env,
        Some("") => {
            cx.err(place, "must be \"env\" or the path of a credentials file");
            ShipCredentials::Env
        }
        Some(path) => ShipCredentials::File(std::path::PathBuf::from(path)),
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A fideslang-style category: dot-separated lower-case segments.
pub fn valid_category(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(is_token)
}
