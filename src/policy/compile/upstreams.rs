//! `[[upstreams]]`: the servers requests are forwarded to, their URL and, for https, the CA
//! and client certificate to use.
//!
//! Its own file like every section; datasets and `[policy]` refer to upstreams by name, so
//! this returns the names it saw as well as the upstreams it compiled.

use super::place::{Cx, Place};
use super::source::Origin;
use crate::policy::model::{ClientCert, Scheme, Upstream};
use crate::policy::raw::RawUpstream;
use std::collections::HashSet;
use std::path::PathBuf;

/// `[[upstreams]]`, compiled.
pub(super) struct Upstreams {
    /// The valid upstreams, in file order: datasets refer to them by index.
    pub list: Vec<Upstream>,
    /// Every name defined, valid or not: a duplicate of an invalid item is still a duplicate,
    /// and a reference to one has its error already.
    names: HashSet<String>,
}

impl Upstreams {
    /// The index of the valid upstream `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|u| *u.name == *name)
    }

    /// Whether an upstream `name` is defined, valid or not.
    pub fn defined(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

/// Compiles `[[upstreams]]`.
pub(super) fn compile(cx: &mut Cx<'_>, raw: Vec<(Origin, RawUpstream)>) -> Upstreams {
    let mut upstreams = Upstreams {
        list: Vec::new(),
        names: HashSet::new(),
    };
    for (o, u) in raw {
        let place = Place::item("upstreams", o, format!("upstreams.{}", u.name));
        if u.name.is_empty() {
            cx.err(&place.key("name"), "an upstream needs a name");
        } else if !upstreams.names.insert(u.name.clone()) {
            cx.err(
                &place.key("name"),
                format!("upstream \"{}\" is defined twice", u.name),
            );
            continue;
        }
        if let Some(up) = upstream(cx, &place, u) {
            upstreams.list.push(up);
        }
    }
    upstreams
}

/// One upstream (at `place`); `None` (after reporting why) when its URL is not usable.
fn upstream(cx: &mut Cx<'_>, place: &Place, u: RawUpstream) -> Option<Upstream> {
    let client_cert = match (u.client_cert, u.client_key) {
        (Some(cert), Some(key)) => Some(ClientCert {
            cert: cert.into(),
            key: key.into(),
        }),
        (None, None) => None,
        (cert, _) => {
            let (have, missing) = if cert.is_some() {
                ("client_cert", "client_key")
            } else {
                ("client_key", "client_cert")
            };
            cx.err(
                &place.missing(missing).key(have),
                format!(
                    "{have} needs {missing}: a client certificate is presented with its private key"
                ),
            );
            None
        }
    };
    let ca = u.ca.map(PathBuf::from);
    let (scheme, host, port) = match parse_upstream_url(&u.url) {
        Ok(url) => url,
        Err(e) => {
            cx.err(&place.field("url"), e);
            return None;
        }
    };
    if scheme == Scheme::Http {
        let tls_keys = [("ca", ca.is_some()), ("client_cert", client_cert.is_some())];
        for (key, _) in tls_keys.iter().filter(|(_, set)| *set) {
            cx.err(
                &place.field(key),
                format!(
                    "{key} applies to https upstreams only; \"{}\" is plain http",
                    u.url
                ),
            );
        }
    }
    Some(Upstream {
        name: u.name.into(),
        scheme,
        host,
        port,
        rule: place.rule().into(),
        ca,
        client_cert,
    })
}

fn parse_upstream_url(s: &str) -> Result<(Scheme, String, u16), String> {
    let uri: http::Uri = s.parse().map_err(|_| format!("\"{s}\" is not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::Http,
        Some("https") => Scheme::Https,
        _ => return Err(format!("\"{s}\": the scheme must be http or https")),
    };
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("\"{s}\" has no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if let Some(pq) = uri.path_and_query()
        && (pq.as_str() != "/" && !pq.as_str().is_empty())
    {
        return Err(format!(
            "\"{s}\": an upstream URL names a server only (no path or query); requests keep their own path"
        ));
    }
    let port = uri.port_u16().unwrap_or(match scheme {
        Scheme::Http => 80,
        Scheme::Https => 443,
    });
    Ok((scheme, host, port))
}

#[cfg(test)]
mod tests {
    use super::super::from_str;
    use super::super::testing::{BASE, diags};
    use std::path::{Path, PathBuf};

    #[test]
    fn upstream_tls_files_compile() {
        let p = from_str(
            "p.toml",
            &format!(
                "{BASE}[[upstreams]]\nname = 's'\nurl = 'https://store.internal'\nca = 'certs/store-ca.crt'\nclient_cert = 'certs/c.crt'\nclient_key = 'certs/c.key'\n"
            ),
        )
        .unwrap();
        let up = &p.upstreams[0];
        assert_eq!(up.port, 443);
        assert_eq!(up.ca.as_deref(), Some(Path::new("certs/store-ca.crt")));
        let cc = up.client_cert.as_ref().unwrap();
        assert_eq!(cc.key, PathBuf::from("certs/c.key"));
    }

    #[test]
    fn tls_keys_on_a_plain_upstream_are_located_errors() {
        let d = diags(
            "[[upstreams]]\nname = 's'\nurl = 'http://store.internal'\nca = 'certs/ca.crt'\n",
        );
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].rule, "upstreams.s.ca");
        assert_eq!(d[0].line, Some(9));
        assert!(d[0].message.contains("https upstreams only"), "{}", d[0]);
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let d = diags(
            "[[upstreams]]\nname = 's'\nurl = 'https://store.internal'\nclient_cert = 'c.crt'\n",
        );
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].rule, "upstreams.s.client_key");
        assert_eq!(d[0].line, Some(9));
    }
}
