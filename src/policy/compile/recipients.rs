//! `[[recipients]]`: who receives data (first or third party, in which country), and the
//! certificate identities and networks by which a request is recognised as theirs.
//!
//! Its own file like every section. An identity or a network belongs to one recipient only;
//! the lookup tables that say whose it is are built here, where that is checked.

use super::place::{Cx, Place};
use super::source::Origin;
use super::values::{country, parse_net};
use crate::policy::model::{FastMap, Recipient, Relation};
use crate::policy::net::CidrTable;
use crate::policy::raw::RawRecipient;

/// `[[recipients]]`, compiled, with the tables that find one.
pub(super) struct Recipients {
    pub list: Vec<Recipient>,
    /// Identity -> index in `list`.
    pub by_identity: FastMap<String, usize>,
    /// Network -> index in `list`.
    pub by_network: CidrTable<usize>,
}

/// Compiles `[[recipients]]`.
pub(super) fn compile(cx: &mut Cx<'_>, raw: Vec<(Origin, RawRecipient)>) -> Recipients {
    let mut recipients = Recipients {
        list: Vec::new(),
        by_identity: FastMap::default(),
        by_network: CidrTable::new(),
    };
    for (o, r) in raw {
        let place = Place::item("recipients", o, format!("recipients.{}", r.id));
        if r.id.is_empty() || r.id.contains('*') {
            cx.err(
                &place.key("id"),
                "a recipient needs an id, and ids are never wildcards",
            );
        }
        if recipients.list.iter().any(|x| *x.id == *r.id) {
            cx.err(
                &place.key("id"),
                format!("recipient \"{}\" is defined twice", r.id),
            );
            continue;
        }
        let recipient = recipient(cx, &place, r, &mut recipients);
        recipients.list.push(recipient);
    }
    recipients
}

/// One recipient (at `place`), its identities and networks entered in `tables` under the
/// index it will have.
fn recipient(
    cx: &mut Cx<'_>,
    place: &Place,
    r: RawRecipient,
    tables: &mut Recipients,
) -> Recipient {
    let relation = match r.relation.as_str() {
        "first_party" => Relation::FirstParty,
        "third_party" => Relation::ThirdParty,
        other => {
            cx.err(
                &place.field("relation"),
                format!("\"{other}\" is not one of \"first_party\", \"third_party\""),
            );
            Relation::ThirdParty
        }
    };
    let country = r
        .country
        .as_deref()
        .and_then(|c| country(cx, &place.field("country"), c));
    let idx = tables.list.len();
    // Whom a repeated identity or network already belongs to: this very recipient (not yet
    // in the list) when it lists the same one twice.
    let list = &tables.list;
    let owner = |prev: usize| match list.get(prev) {
        Some(other) if prev != idx => format!("recipient \"{}\"", other.id),
        _ => "this recipient: it is listed twice".to_string(),
    };
    for (i, id) in r.identities.iter().enumerate() {
        let at = place.field("identities").index(i);
        if id.is_empty() || id.contains('*') {
            cx.err(
                &at,
                format!(
                    "\"{id}\" is not an identity (a certificate SAN: URI or DNS name, no wildcards)"
                ),
            );
        } else if let Some(prev) = tables.by_identity.insert(id.clone(), idx) {
            cx.err(
                &at,
                format!("identity \"{id}\" already belongs to {}", owner(prev)),
            );
        }
    }
    let mut nets = Vec::new();
    for (i, n) in r.networks.iter().enumerate() {
        let at = place.field("networks").index(i);
        match parse_net(n) {
            Ok(net) => {
                if let Some(prev) = tables.by_network.insert(net, idx) {
                    cx.err(
                        &at,
                        format!("network {net} already belongs to {}", owner(prev)),
                    );
                }
                nets.push(net);
            }
            Err(e) => cx.err(&at, e),
        }
    }
    if r.identities.is_empty() && r.networks.is_empty() {
        cx.err(
            place,
            "a recipient needs identities or networks, or nothing can ever match it",
        );
    }
    Recipient {
        id: r.id.into(),
        relation,
        country,
        identities: r.identities,
        networks: nets,
    }
}
