//! Country codes (ISO 3166-1 alpha-2) and sets of them, the currency of every location decision.

use std::fmt;

/// Every ISO 3166-1 alpha-2 code assigned today; a code outside this list is a typo
/// (`UK` for `GB`, `EL` for `GR`) and is refused when a policy is compiled.
const ASSIGNED: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV \
BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR \
GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG \
KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX \
MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG \
SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG \
VI VN VU WF WS YE YT ZA ZM ZW";

/// Spellings met in practice that ISO 3166-1 does not assign, with the code it does assign
/// and the country: `UK` is the United Kingdom's usual abbreviation, `EL` the code the EU's
/// institutions use for Greece.
const NOT_ISO: [(&str, &str, &str); 2] =
    [("UK", "GB", "the United Kingdom"), ("EL", "GR", "Greece")];

/// What to add to the refusal of `code` as a country code: for a well-known spelling that
/// ISO does not assign, the code to write instead (`"; the ISO code for the United Kingdom
/// is GB"`); otherwise nothing.
pub fn iso_hint(code: &str) -> String {
    NOT_ISO
        .iter()
        .find(|(spelling, _, _)| spelling.eq_ignore_ascii_case(code.trim()))
        .map(|(_, iso, country)| format!("; the ISO code for {country} is {iso}"))
        .unwrap_or_default()
}

/// A two-letter country code, stored upper-case. `Copy`, two bytes, no allocation.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Country([u8; 2]);

impl Country {
    /// Parses a code case-insensitively; `None` unless the code is assigned by ISO 3166-1.
    pub fn parse(code: &str) -> Option<Country> {
        let c = Self::parse_shape(code)?;
        ASSIGNED
            .split(' ')
            .any(|a| a.as_bytes() == c.0)
            .then_some(c)
    }

    /// Parses any two ASCII letters (geolocation databases may carry codes such as `EU` or
    /// `XK` that ISO has not assigned; they are still countries for location purposes).
    pub fn parse_shape(code: &str) -> Option<Country> {
        let b = code.as_bytes();
        if b.len() == 2 && b[0].is_ascii_alphabetic() && b[1].is_ascii_alphabetic() {
            Some(Country([
                b[0].to_ascii_uppercase(),
                b[1].to_ascii_uppercase(),
            ]))
        } else {
            None
        }
    }

    pub fn as_str(&self) -> &str {
        // Both bytes are ASCII letters by construction.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }

    fn index(self) -> usize {
        (self.0[0] - b'A') as usize * 26 + (self.0[1] - b'A') as usize
    }

    fn from_index(i: usize) -> Country {
        Country([b'A' + (i / 26) as u8, b'A' + (i % 26) as u8])
    }
}

impl fmt::Display for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Country {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

const WORDS: usize = (26 * 26usize).div_ceil(64);

/// A set of countries as a fixed bitmap: membership is one shift and one mask.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct CountrySet {
    bits: [u64; WORDS],
}

impl CountrySet {
    pub fn new() -> CountrySet {
        CountrySet::default()
    }

    pub fn of(countries: impl IntoIterator<Item = Country>) -> CountrySet {
        let mut s = CountrySet::new();
        for c in countries {
            s.insert(c);
        }
        s
    }

    pub fn insert(&mut self, c: Country) {
        let i = c.index();
        self.bits[i / 64] |= 1 << (i % 64);
    }

    pub fn contains(&self, c: Country) -> bool {
        let i = c.index();
        self.bits[i / 64] & (1 << (i % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    pub fn iter(&self) -> impl Iterator<Item = Country> + '_ {
        (0..26 * 26)
            .filter(|i| self.bits[i / 64] & (1 << (i % 64)) != 0)
            .map(Country::from_index)
    }
}

impl fmt::Debug for CountrySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_assigned_codes_only() {
        assert_eq!(Country::parse("cn").unwrap().as_str(), "CN");
        assert!(
            Country::parse("UK").is_none(),
            "UK is not ISO 3166-1; GB is"
        );
        assert!(Country::parse("C").is_none());
        assert!(Country::parse("C1").is_none());
        assert!(Country::parse_shape("XK").is_some());
    }

    #[test]
    fn well_known_non_iso_spellings_name_the_iso_code() {
        assert_eq!(
            iso_hint("UK"),
            "; the ISO code for the United Kingdom is GB"
        );
        assert_eq!(iso_hint("el"), "; the ISO code for Greece is GR");
        assert_eq!(iso_hint("XX"), "");
        for (spelling, iso, _) in NOT_ISO {
            assert!(Country::parse(spelling).is_none(), "{spelling} is assigned");
            assert!(Country::parse(iso).is_some(), "{iso} is not assigned");
        }
    }

    #[test]
    fn set_membership() {
        let s = CountrySet::of([Country::parse("DE").unwrap(), Country::parse("ZW").unwrap()]);
        assert!(s.contains(Country::parse("ZW").unwrap()));
        assert!(!s.contains(Country::parse("US").unwrap()));
        assert_eq!(
            s.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            ["DE", "ZW"]
        );
    }
}
