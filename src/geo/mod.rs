//! Geolocation of addresses: operator CIDR overrides first (longest prefix), then a MaxMind
//! DB (MaxMind `country.iso_code` or DB-IP `country_code` layout). A `Locator` is immutable;
//! reloads build a new one and swap it in whole.
//!
//! [`update`] keeps the database current (`geo update`): it fetches a new one ([`download`]),
//! unwraps it ([`archive`]), checks it as `open` does and more, and replaces the file
//! atomically, which the running proxy's reload then picks up.

pub mod archive;
pub mod download;
pub mod update;

use crate::policy::Policy;
use crate::policy::country::Country;
use crate::policy::decision::Location;
use crate::policy::net::CidrTable;
use serde::Deserialize;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a geolocation database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("cannot read geolocation database {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a usable MaxMind DB: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
}

/// How many data records `open` inspects for a country before it calls the database
/// country-less. Real country and city databases carry one in their first record; the margin
/// tolerates a few leading records that only name a continent.
const PROBE_RECORDS: usize = 1024;

/// The fields of a record that locate it, borrowed from the database buffer so that a lookup
/// allocates nothing. Every other field of the record is skipped by the decoder.
#[derive(Deserialize)]
struct CountryRecord<'a> {
    /// MaxMind GeoIP2/GeoLite2 Country and City: where the address is used. (MaxMind's
    /// `registered_country`, where the network is registered, is deliberately not read: an
    /// address the database cannot place, such as an anycast range, must stay unlocated and
    /// meet `unknown_location`, not count as its registrant's country.)
    #[serde(borrow)]
    country: Option<IsoCode<'a>>,
    /// DB-IP Lite country files: a top-level code.
    #[serde(borrow)]
    country_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct IsoCode<'a> {
    #[serde(borrow)]
    iso_code: Option<&'a str>,
}

impl<'a> CountryRecord<'a> {
    /// The first well-formed code, in order of authority.
    fn country(&self) -> Option<Country> {
        fn nested<'a>(n: &Option<IsoCode<'a>>) -> Option<&'a str> {
            n.as_ref().and_then(|n| n.iso_code)
        }
        [nested(&self.country), self.country_code]
            .into_iter()
            .flatten()
            .find_map(Country::parse_shape)
            // Placeholders some databases use for "somewhere, not known where": unlocated.
            .filter(|c| !matches!(c.as_str(), "ZZ" | "XX" | "EU" | "AP"))
    }
}

/// A MaxMind DB held in memory.
pub struct GeoDb {
    reader: maxminddb::Reader<Vec<u8>>,
    label: Arc<str>,
    path: PathBuf,
}

impl GeoDb {
    /// Reads the whole file into memory and checks that it is a MaxMind DB with country data.
    pub fn open(path: &Path) -> Result<GeoDb, GeoError> {
        // Held in memory rather than mapped: a database replaced on disk while mapped could
        // change under the reader; a reload reads the new file whole and swaps.
        let bytes = std::fs::read(path).map_err(|source| GeoError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        GeoDb::from_bytes(bytes, path)
    }

    /// Same as `open`, from bytes already read; `origin` names the file in errors.
    pub fn from_bytes(bytes: Vec<u8>, origin: &Path) -> Result<GeoDb, GeoError> {
        let invalid = |why: String| GeoError::Invalid {
            path: origin.to_path_buf(),
            why,
        };
        let reader = maxminddb::Reader::from_source(bytes).map_err(|e| invalid(e.to_string()))?;
        let label = label_of(reader.metadata()).map_err(invalid)?;
        check_carries_country(&reader).map_err(invalid)?;
        Ok(GeoDb {
            reader,
            label: label.into(),
            path: origin.to_path_buf(),
        })
    }

    /// `"<database_type> <build date YYYY-MM-DD>"`, e.g. `"GeoLite2-Country 2026-11-25"`.
    pub fn label(&self) -> &Arc<str> {
        &self.label
    }

    /// The file the database was read from (as given to `open` or `from_bytes`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The country of `ip`, if the database has one.
    pub fn country(&self, ip: IpAddr) -> Option<Country> {
        // `::ffff:a.b.c.d` is the IPv4 host: look it up as such, whether or not the database
        // aliases the mapped range. An IPv6 address in an IPv4-only database is an error
        // from the reader, which here means "not located".
        let found = self.reader.lookup(ip.to_canonical()).ok()?;
        let record: CountryRecord<'_> = found.decode().ok()??;
        record.country()
    }
}

/// What a database makes of a network: whether it locates any address of it, and the blocks
/// of it that it does not locate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    pub located: bool,
    pub unlocated: Vec<ipnet::IpNet>,
}

impl GeoDb {
    /// Which addresses of `net` the database gives a country, as [`GeoDb::country`] would
    /// for each (`check` warns about recipient networks that nothing locates). The records
    /// inside `net` are read together with the gaps between them, so that they cover `net`
    /// exactly; a record holding all of `net` stands for `net`.
    pub fn coverage(&self, net: ipnet::IpNet) -> Coverage {
        let nowhere = Coverage {
            located: false,
            unlocated: vec![net],
        };
        let options = maxminddb::WithinOptions::default().include_networks_without_data();
        // The reader takes its own CIDR type, which parses the same notation (the target
        // type is the one `within` names).
        let Ok(cidr) = net.to_string().parse() else {
            return nowhere;
        };
        // An IPv6 network in an IPv4 database: no address of it has a record.
        let Ok(records) = self.reader.within(cidr, options) else {
            return nowhere;
        };
        let mut found = Coverage::default();
        for record in records {
            let Ok(record) = record else {
                return nowhere;
            };
            let country = record
                .decode::<CountryRecord<'_>>()
                .ok()
                .flatten()
                .and_then(|r| r.country());
            if country.is_some() {
                found.located = true;
                continue;
            }
            let block = record
                .network()
                .ok()
                .and_then(|n| n.to_string().parse::<ipnet::IpNet>().ok())
                .filter(|b| net.contains(b))
                .unwrap_or(net);
            found.unlocated.push(block);
        }
        found
    }
}

impl fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeoDb")
            .field("label", &self.label)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The label from the metadata; the build date is the UTC calendar day of `build_epoch`.
fn label_of(meta: &maxminddb::Metadata) -> Result<String, String> {
    let date = i64::try_from(meta.build_epoch)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map(|t| jiff::tz::Offset::UTC.to_datetime(t).date())
        .ok_or_else(|| format!("its build_epoch {} is not a date", meta.build_epoch))?;
    let kind = meta.database_type.trim();
    let kind = if kind.is_empty() { "MaxMind-DB" } else { kind };
    Ok(format!("{kind} {date}"))
}

/// Refuses databases that cannot locate anything: an ASN or anonymous-IP database given by
/// mistake would otherwise leave every address `unknown` without a word.
fn check_carries_country<S: AsRef<[u8]>>(reader: &maxminddb::Reader<S>) -> Result<(), String> {
    let networks = reader
        .networks(maxminddb::WithinOptions::default())
        .map_err(|e| e.to_string())?;
    let mut seen = 0usize;
    for item in networks.take(PROBE_RECORDS) {
        let found = item.map_err(|e| e.to_string())?;
        seen += 1;
        if let Ok(Some(record)) = found.decode::<CountryRecord<'_>>()
            && record.country().is_some()
        {
            return Ok(());
        }
    }
    Err(if seen == 0 {
        "it holds no records".to_string()
    } else {
        format!(
            "none of its first {seen} records carries a country code \
             (country.iso_code or country_code); \
             is it a Country or City database?"
        )
    })
}

/// Locates addresses for one policy snapshot.
pub struct Locator {
    /// Country and index into `Policy::networks` of each operator override.
    overrides: CidrTable<(Country, usize)>,
    db: Option<Arc<GeoDb>>,
}

impl Locator {
    /// Builds the override table from `policy.networks` (longest prefix wins) over `db`.
    pub fn new(policy: &Policy, db: Option<Arc<GeoDb>>) -> Locator {
        let mut overrides = CidrTable::new();
        for (i, n) in policy.networks.iter().enumerate() {
            overrides.insert(n.cidr, (n.country, i));
        }
        Locator { overrides, db }
    }

    /// Where `ip` is: an operator override if one contains it, else the database, else
    /// unknown. IPv4-mapped IPv6 addresses are located as their IPv4 address.
    pub fn locate(&self, ip: IpAddr) -> Location {
        let ip = ip.to_canonical();
        if let Some(&(country, network)) = self.overrides.lookup(ip) {
            return Location::Override { country, network };
        }
        match self.db.as_ref().and_then(|db| db.country(ip)) {
            Some(country) => Location::Database { country },
            None => Location::Unknown,
        }
    }

    /// The database behind the overrides, if the policy names one.
    pub fn database(&self) -> Option<&Arc<GeoDb>> {
        self.db.as_ref()
    }
}

impl fmt::Debug for Locator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locator")
            .field("database", &self.db)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmdb_writer::{IpVersion, Ipv4Aliasing, Value, Writer};
    use std::time::{Duration, UNIX_EPOCH};

    /// 2026-11-25T23:30:00Z: a date taken in any time zone east of UTC would be the 26th.
    const EPOCH: u64 = 1_795_649_400;

    fn writer(kind: &str) -> Writer {
        Writer::builder(kind)
            .build_epoch(UNIX_EPOCH + Duration::from_secs(EPOCH))
            .build()
    }

    fn insert(w: &mut Writer, cidr: &str, v: Value) {
        w.insert_value(cidr.parse::<ipnet::IpNet>().unwrap(), v)
            .unwrap();
    }

    fn iso(code: &str) -> Value {
        Value::map([("iso_code", Value::from(code))])
    }

    fn db_of(w: Writer) -> GeoDb {
        GeoDb::from_bytes(w.to_bytes().unwrap(), Path::new("test.mmdb")).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn c(s: &str) -> Option<Country> {
        Country::parse_shape(s)
    }

    fn maxmind() -> GeoDb {
        let mut w = writer("GeoLite2-Country");
        let rec = |code: &str| {
            Value::map([
                ("country", iso(code)),
                ("continent", Value::map([("code", Value::from("NA"))])),
            ])
        };
        insert(&mut w, "8.8.8.0/24", rec("US"));
        insert(&mut w, "1.1.1.0/24", rec("AU"));
        insert(&mut w, "2001:4860::/32", rec("US"));
        // Only the registration country: an anycast or satellite range.
        insert(
            &mut w,
            "9.9.9.0/24",
            Value::map([("registered_country", iso("CH"))]),
        );
        // A record with no country at all.
        insert(
            &mut w,
            "4.4.4.0/24",
            Value::map([("continent", Value::map([("code", Value::from("EU"))]))]),
        );
        db_of(w)
    }

    #[test]
    fn maxmind_layout_and_no_registered_country_fallback() {
        let db = maxmind();
        assert_eq!(db.country(ip("8.8.8.8")), c("US"));
        assert_eq!(db.country(ip("1.1.1.1")), c("AU"));
        // Where the range is registered says nothing about where the address is.
        assert_eq!(db.country(ip("9.9.9.9")), None);
        assert_eq!(db.country(ip("4.4.4.4")), None);
        assert_eq!(db.country(ip("5.5.5.5")), None, "not in the database");
    }

    #[test]
    fn ipv6_and_mapped_ipv4() {
        let db = maxmind();
        assert_eq!(db.country(ip("2001:4860:4860::8888")), c("US"));
        assert_eq!(db.country(ip("::ffff:1.1.1.1")), c("AU"));
        assert_eq!(db.country(ip("2a00::1")), None);

        // Without the writer's aliases, only canonicalisation finds the IPv4 record.
        let mut w = Writer::builder("GeoLite2-Country")
            .ipv4_aliasing(Ipv4Aliasing::Disabled)
            .build();
        insert(&mut w, "1.1.1.0/24", Value::map([("country", iso("AU"))]));
        assert_eq!(db_of(w).country(ip("::ffff:1.1.1.1")), c("AU"));
    }

    #[test]
    fn dbip_layout() {
        let mut w = writer("DBIP-Country-Lite");
        insert(
            &mut w,
            "1.1.1.0/24",
            Value::map([("country_code", Value::from("au"))]),
        );
        insert(
            &mut w,
            "2.2.2.0/24",
            Value::map([("country_code", Value::from("ZZ"))]),
        );
        let db = db_of(w);
        assert_eq!(db.country(ip("1.1.1.7")), c("AU"));
        assert_eq!(
            db.country(ip("2.2.2.2")),
            None,
            "ZZ: unknown, not a country"
        );
        assert_eq!(&**db.label(), "DBIP-Country-Lite 2026-11-25");
    }

    #[test]
    fn label_is_type_and_utc_build_date() {
        assert_eq!(&**maxmind().label(), "GeoLite2-Country 2026-11-25");
    }

    #[test]
    fn a_malformed_country_is_not_located_and_never_panics() {
        let mut w = writer("GeoLite2-Country");
        insert(
            &mut w,
            "8.8.8.0/24",
            Value::map([("country", iso("USA")), ("registered_country", iso("US"))]),
        );
        // A code of the wrong type makes the record undecodable: not located.
        insert(
            &mut w,
            "8.8.4.0/24",
            Value::map([("country", Value::map([("iso_code", Value::from(7u32))]))]),
        );
        insert(&mut w, "1.1.1.0/24", Value::map([("country", iso("AU"))]));
        let db = db_of(w);
        assert_eq!(db.country(ip("1.1.1.1")), c("AU"));
        assert_eq!(db.country(ip("8.8.8.8")), None);
        assert_eq!(db.country(ip("8.8.4.4")), None);
    }

    #[test]
    fn ipv6_address_in_ipv4_database_is_unknown() {
        let mut w = Writer::builder("GeoLite2-Country")
            .ip_version(IpVersion::V4)
            .build();
        insert(&mut w, "8.8.8.0/24", Value::map([("country", iso("US"))]));
        let db = db_of(w);
        assert_eq!(db.country(ip("8.8.8.8")), c("US"));
        assert_eq!(db.country(ip("::ffff:8.8.8.8")), c("US"));
        assert_eq!(db.country(ip("2001:4860::1")), None);
    }

    #[test]
    fn refuses_garbage_and_country_less_databases() {
        let e = GeoDb::from_bytes(b"not a database".to_vec(), Path::new("/x/country.mmdb"))
            .unwrap_err();
        assert!(matches!(e, GeoError::Invalid { .. }));
        assert!(e.to_string().contains("/x/country.mmdb"), "{e}");

        let mut w = writer("GeoLite2-ASN");
        insert(
            &mut w,
            "8.8.8.0/24",
            Value::map([("autonomous_system_number", Value::from(15169u32))]),
        );
        let e = GeoDb::from_bytes(w.to_bytes().unwrap(), Path::new("asn.mmdb")).unwrap_err();
        assert!(e.to_string().contains("country"), "{e}");

        let e = GeoDb::from_bytes(
            writer("GeoLite2-Country").to_bytes().unwrap(),
            Path::new("empty.mmdb"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no records"), "{e}");
    }

    #[test]
    fn coverage_names_the_blocks_without_a_country() {
        let db = maxmind();
        let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
        let cover = |s: &str| {
            let c = db.coverage(net(s));
            let blocks: Vec<String> = c.unlocated.iter().map(|b| b.to_string()).collect();
            (c.located, blocks)
        };
        assert_eq!(cover("8.8.8.0/24"), (true, vec![]));
        assert_eq!(cover("8.8.8.128/25"), (true, vec![]), "inside a record");
        assert_eq!(cover("8.8.8.0/23"), (true, vec!["8.8.9.0/24".to_string()]));
        let no_record = cover("5.5.5.0/24");
        assert_eq!(no_record, (false, vec!["5.5.5.0/24".to_string()]));
        // A record without a country places nothing.
        assert_eq!(cover("9.9.9.0/24"), (false, vec!["9.9.9.0/24".to_string()]));
        assert_eq!(cover("2001:4860::/32"), (true, vec![]));
        assert!(!cover("2a00::/16").0);
    }

    #[test]
    fn open_names_a_missing_file() {
        let e = GeoDb::open(Path::new("/nonexistent/geo.mmdb")).unwrap_err();
        assert!(matches!(e, GeoError::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/geo.mmdb"), "{e}");
    }

    fn policy() -> Policy {
        crate::policy::compile::from_str(
            "t.toml",
            r#"
[policy]
name = "t"
home = "CN"
[log]
pseudonymize = false
[[networks]]
cidr = "8.8.0.0/16"
country = "CN"
name = "wide"
[[networks]]
cidr = "8.8.8.0/24"
country = "DE"
name = "narrow"
[[upstreams]]
name = "cn-store"
url = "http://127.0.0.1:9000"
"#,
        )
        .unwrap()
    }

    #[test]
    fn override_beats_database_longest_prefix_first() {
        let p = policy();
        let l = Locator::new(&p, Some(Arc::new(maxmind())));
        let narrow = p.networks.iter().position(|n| &*n.name == "narrow");
        let wide = p.networks.iter().position(|n| &*n.name == "wide");
        assert_eq!(
            l.locate(ip("8.8.8.8")),
            Location::Override {
                country: c("DE").unwrap(),
                network: narrow.unwrap()
            }
        );
        assert_eq!(
            l.locate(ip("::ffff:8.8.4.4")),
            Location::Override {
                country: c("CN").unwrap(),
                network: wide.unwrap()
            }
        );
        assert_eq!(
            l.locate(ip("1.1.1.1")),
            Location::Database {
                country: c("AU").unwrap()
            }
        );
        assert_eq!(l.locate(ip("5.5.5.5")), Location::Unknown);
        assert!(l.database().is_some());
    }

    #[test]
    fn without_database_only_overrides_locate() {
        let l = Locator::new(&policy(), None);
        assert_eq!(l.locate(ip("1.1.1.1")), Location::Unknown);
        assert_eq!(l.locate(ip("8.8.8.8")).country(), c("DE"));
        assert!(l.database().is_none());
    }
}
