//! `[jurisdictions]`: named sets of countries, and resolving a name (`EU`, or a country code
//! as a jurisdiction of itself) where `[policy]` and the datasets name a home.
//!
//! Its own file because it is compiled first: `[policy]` and `[[datasets]]` refer to it.

use super::place::{Cx, Place};
use super::values::country;
use crate::policy::country::{Country, CountrySet, iso_hint};
use crate::policy::model::{Jurisdiction, Jurisdictions};

/// Compiles the `[jurisdictions]` of every file (`file`, name, country codes), in load order.
pub(super) fn compile(cx: &mut Cx<'_>, raw: &[(usize, String, Vec<String>)]) -> Jurisdictions {
    let mut jurisdictions = Jurisdictions::default();
    for (file, name, codes) in raw {
        let place = Place::table(*file, "jurisdictions").field(name);
        if name.is_empty() {
            cx.err(&place, "a jurisdiction needs a name");
            continue;
        }
        if jurisdictions.named.contains_key(name) {
            cx.err(&place, format!("jurisdiction \"{name}\" is defined twice"));
            continue;
        }
        if Country::parse(name).is_some() {
            cx.err(&place, format!("\"{name}\" is a country code, which is already a jurisdiction of itself; choose another name"));
            continue;
        }
        let mut set = CountrySet::new();
        for (i, c) in codes.iter().enumerate() {
            if let Some(c) = country(cx, &place.index(i), c) {
                set.insert(c);
            }
        }
        if codes.is_empty() {
            cx.err(&place, "a jurisdiction must list at least one country");
        }
        jurisdictions.named.insert(name.clone(), set);
    }
    jurisdictions
}

/// The jurisdiction `name` written at `place`: a declared one or a country code; `None`
/// (after reporting why) when it is neither.
pub(super) fn resolve(
    cx: &mut Cx<'_>,
    jurisdictions: &Jurisdictions,
    place: &Place,
    name: &str,
) -> Option<Jurisdiction> {
    let j = jurisdictions.resolve(name);
    if j.is_none() {
        cx.err(place, format!("\"{name}\" is neither a declared jurisdiction nor an ISO 3166-1 alpha-2 country code{}", iso_hint(name)));
    }
    j
}
