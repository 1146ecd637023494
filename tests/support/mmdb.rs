//! Small MaxMind DB files for tests, in the two layouts the proxy reads: MaxMind
//! GeoIP2/GeoLite2 (`country.iso_code`) and DB-IP Lite (`country_code`).

use mmdb_writer::{Value, Writer};
use std::time::{Duration, UNIX_EPOCH};

/// Build time of every generated database: 2026-11-25T23:30:00Z, late in the UTC day so a
/// label computed in local time instead of UTC would show the 26th.
#[allow(dead_code)]
pub const BUILD_EPOCH: u64 = 1_795_649_400;

/// The UTC date of `BUILD_EPOCH`, as database labels show it.
#[allow(dead_code)]
pub const BUILD_DATE: &str = "2026-11-25";

/// A database of type `database_type` holding `record` at each CIDR. Reserved ranges
/// (10.0.0.0/8, 2001:db8::/32, …) are writable, as in `mmdb-writer`'s default.
#[allow(dead_code)]
pub fn database(database_type: &str, entries: &[(&str, Value)]) -> Vec<u8> {
    let mut w = Writer::builder(database_type)
        .build_epoch(UNIX_EPOCH + Duration::from_secs(BUILD_EPOCH))
        .build();
    for (cidr, record) in entries {
        let net: ipnet::IpNet = cidr.parse().expect("a CIDR");
        w.insert_value(net, record.clone())
            .expect("insertable network");
    }
    w.to_bytes().expect("a database")
}

/// A `GeoLite2-Country` database: `{"country": {"iso_code": CODE}, "registered_country": …}`.
#[allow(dead_code)]
pub fn maxmind_country_db(entries: &[(&str, &str)]) -> Vec<u8> {
    let records: Vec<(&str, Value)> = entries
        .iter()
        .map(|(cidr, code)| {
            let iso = Value::map([("iso_code", Value::from(*code))]);
            let record = Value::map([("country", iso.clone()), ("registered_country", iso)]);
            (*cidr, record)
        })
        .collect();
    database("GeoLite2-Country", &records)
}

/// A `DBIP-Country-Lite` database: `{"country_code": CODE}`.
#[allow(dead_code)]
pub fn dbip_country_db(entries: &[(&str, &str)]) -> Vec<u8> {
    let records: Vec<(&str, Value)> = entries
        .iter()
        .map(|(cidr, code)| (*cidr, Value::map([("country_code", Value::from(*code))])))
        .collect();
    database("DBIP-Country-Lite", &records)
}
