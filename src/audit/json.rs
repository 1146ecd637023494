//! The canonical JSON of the two records every request writes (decision and outcome), written
//! field by field instead of through serde: key names are literals, values known to need no
//! escaping (hex digests, ids, timestamps, numbers, country codes) are copied as they are, and
//! strings that could hold anything are scanned for escapes a block at a time. The output is
//! byte for byte what serde_json writes for the same record (the derived `Serialize` stays as
//! the reference; `tests::matches_serde_json` holds the two together), since `audit verify`
//! hashes the form serde_json writes.

use super::record::{DecisionRecord, OutcomeRecord, STAMP_LEN, Stamp, rfc3339_micros};
use crate::policy::country::Country;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

/// Appends JSON values to a buffer.
struct Out<'a>(&'a mut Vec<u8>);

impl Out<'_> {
    /// A literal: punctuation and key names.
    fn raw(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    /// A string that needs no escaping (ASCII letters, digits and punctuation other than `"`
    /// and `\`), quoted: the names the code itself gives (verdicts, reasons, kinds, country
    /// codes) and timestamps.
    fn plain(&mut self, s: &str) {
        debug_assert!(!needs_escape(s.as_bytes()), "{s:?}");
        self.0.reserve(s.len() + 2);
        self.0.push(b'"');
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(b'"');
    }

    /// Any string, quoted and escaped as serde_json escapes it.
    fn str(&mut self, s: &str) {
        if needs_escape(s.as_bytes()) {
            serde_json::to_writer(&mut *self.0, s).expect("writing to a Vec cannot fail");
        } else {
            self.plain(s);
        }
    }

    /// A field left out when absent (`skip_serializing_if = "Option::is_none"`): `member`
    /// is the comma, name and colon, as `",\"why\":"`.
    fn present(&mut self, member: &str, s: Option<&str>) {
        if let Some(s) = s {
            self.raw(member);
            self.str(s);
        }
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.raw("null"),
        }
    }

    fn country(&mut self, c: Option<Country>) {
        match c {
            Some(c) => self.plain(c.as_str()),
            None => self.raw("null"),
        }
    }

    fn bool(&mut self, b: bool) {
        self.raw(if b { "true" } else { "false" });
    }

    fn u64(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.0.extend_from_slice(&digits[at..]);
    }

    fn ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                self.0.push(b'"');
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.0.push(b'.');
                    }
                    self.u64(u64::from(octet));
                }
                self.0.push(b'"');
            }
            // Displayed addresses hold no character that JSON escapes.
            IpAddr::V6(v6) => write!(self.0, "\"{v6}\"").expect("writing to a Vec cannot fail"),
        }
    }

    fn opt_ip(&mut self, ip: Option<IpAddr>) {
        match ip {
            Some(ip) => self.ip(ip),
            None => self.raw("null"),
        }
    }

    fn socket(&mut self, addr: SocketAddr) {
        match addr {
            SocketAddr::V4(v4) => {
                self.ip(IpAddr::V4(*v4.ip()));
                // The closing quote moves after the port.
                self.0.pop();
                self.0.push(b':');
                self.u64(u64::from(v4.port()));
                self.0.push(b'"');
            }
            SocketAddr::V6(v6) => write!(self.0, "\"{v6}\"").expect("writing to a Vec cannot fail"),
        }
    }

    /// A record's timestamp, without a pass through serde.
    fn stamp(&mut self, ts: Stamp) {
        let mut buf = [0u8; STAMP_LEN];
        match rfc3339_micros(ts.0, &mut buf) {
            Some(text) => self.plain(text),
            None => self.serde(&ts),
        }
    }

    /// A value through serde_json itself (numbers with a fraction, the rare types).
    fn serde<T: serde::Serialize + ?Sized>(&mut self, value: &T) {
        serde_json::to_writer(&mut *self.0, value).expect("records serialise to JSON");
    }
}

/// Whether `bytes` hold a byte that JSON escapes (`"`, `\`, or a control character below
/// 0x20). The blocks are checked without an early exit so that the loop vectorises.
fn needs_escape(bytes: &[u8]) -> bool {
    let flag = |b: &u8| *b < 0x20 || *b == b'"' || *b == b'\\';
    let mut blocks = bytes.chunks_exact(16);
    for block in &mut blocks {
        if block.iter().fold(false, |any, b| any | flag(b)) {
            return true;
        }
    }
    blocks.remainder().iter().any(flag)
}

impl DecisionRecord {
    /// Appends the canonical form (fields in name order, no `hash`) to `out`.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = Out(out);
        o.raw("{\"category\":");
        o.opt_str(self.category.as_deref());
        let c = &self.client;
        o.raw(",\"client\":{\"country\":");
        o.country(c.country);
        o.raw(",\"identity\":");
        o.opt_str(c.identity.as_deref());
        o.raw(",\"ip\":");
        o.opt_ip(c.ip);
        o.raw(",\"source\":");
        o.plain(c.source);
        o.raw(",\"via\":");
        o.opt_ip(c.via);
        o.raw("},\"consent\":");
        match &self.consent {
            None => o.raw("null"),
            Some(consent) => {
                o.raw("{\"id\":");
                o.str(&consent.id);
                o.present(",\"method\":", consent.method.as_deref());
                o.raw(",\"result\":");
                o.plain(consent.result);
                o.present(",\"why\":", consent.why.as_deref());
                o.raw("}");
            }
        }
        o.raw(",\"dataset\":");
        o.opt_str(self.dataset.as_deref());
        o.raw(",\"decision\":");
        o.plain(self.decision);
        o.raw(",\"enforced\":");
        o.bool(self.enforced);
        o.raw(",\"geo_db\":");
        o.opt_str(self.geo_db.as_deref());
        o.raw(",\"id\":");
        o.str(self.id.as_str());
        o.present(",\"instance\":", self.instance.as_deref());
        o.raw(",\"kind\":");
        o.plain(self.kind);
        o.raw(",\"policy\":");
        o.str(&self.policy);
        if let Some(revision) = self.policy_revision {
            o.raw(",\"policy_revision\":");
            o.u64(revision);
        }
        o.raw(",\"prev\":");
        o.str(self.prev.as_str());
        o.raw(",\"purpose\":");
        o.opt_str(self.purpose.as_deref());
        o.raw(",\"reason\":");
        o.plain(self.reason.as_str());
        let r = &self.recipient;
        o.raw(",\"recipient\":{\"country\":");
        o.country(r.country);
        o.raw(",\"id\":");
        o.opt_str(r.id.as_deref());
        o.raw(",\"relation\":");
        o.plain(r.relation.as_str());
        let q = &self.request;
        o.raw("},\"request\":{\"headers\":{");
        for (i, (name, value)) in q.headers.iter().enumerate() {
            if i > 0 {
                o.raw(",");
            }
            o.str(name.as_str());
            o.raw(":");
            o.str(value);
        }
        o.raw("},\"host\":");
        o.opt_str(q.host.as_deref());
        o.raw(",\"method\":");
        o.str(q.method.as_str());
        o.raw(",\"path\":");
        o.str(&q.path);
        o.raw(",\"query\":");
        o.opt_str(q.query.as_deref());
        o.raw("},\"rule\":");
        o.str(&self.rule);
        o.raw(",\"seq\":");
        o.u64(self.seq);
        o.raw(",\"status\":");
        match self.status {
            Some(s) => o.u64(u64::from(s)),
            None => o.raw("null"),
        }
        o.raw(",\"subject\":");
        o.opt_str(self.subject.as_deref());
        if let Some(t) = &self.trace {
            o.raw(",\"trace\":{\"span_id\":");
            o.plain(t.span_id());
            o.raw(",\"trace_id\":");
            o.plain(t.trace_id());
            o.raw("}");
        }
        o.raw(",\"ts\":");
        o.stamp(self.ts);
        o.raw(",\"upstream\":");
        match &self.upstream {
            None => o.raw("null"),
            Some(u) => {
                o.raw("{\"addr\":");
                o.socket(u.addr);
                o.raw(",\"country\":");
                o.country(u.country);
                o.raw(",\"name\":");
                o.str(&u.name);
                o.raw("}");
            }
        }
        o.raw(",\"v\":");
        o.u64(u64::from(self.v));
        o.raw("}");
    }
}

impl OutcomeRecord {
    /// Appends the canonical form (fields in name order, no `hash`) to `out`.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = Out(out);
        o.raw("{\"bytes_in\":");
        o.u64(self.bytes_in);
        o.raw(",\"bytes_out\":");
        o.u64(self.bytes_out);
        o.raw(",\"complete\":");
        o.bool(self.complete);
        o.present(",\"detail\":", self.detail.as_deref());
        o.raw(",\"duration_ms\":");
        o.serde(&self.duration_ms);
        o.raw(",\"error\":");
        match self.error {
            Some(e) => o.plain(e.as_str()),
            None => o.raw("null"),
        }
        o.raw(",\"id\":");
        o.str(self.id.as_str());
        o.present(",\"instance\":", self.instance.as_deref());
        o.raw(",\"kind\":");
        o.plain(self.kind);
        o.raw(",\"prev\":");
        o.str(self.prev.as_str());
        if let Some(r) = &self.records {
            o.raw(",\"records\":");
            o.serde(r);
        }
        o.raw(",\"seq\":");
        o.u64(self.seq);
        o.raw(",\"status\":");
        o.u64(u64::from(self.status));
        o.raw(",\"ts\":");
        o.stamp(self.ts);
        o.raw(",\"upstream\":");
        match self.upstream {
            Some(addr) => o.socket(addr),
            None => o.raw("null"),
        }
        o.raw(",\"v\":");
        o.u64(u64::from(self.v));
        o.raw("}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{
        ClientRec, ConsentRec, Headers, Link, RecipientRec, RequestRec, Stamp, UpstreamRec,
    };
    use crate::policy::decision::Reason;
    use crate::policy::model::Relation;
    use std::sync::Arc;

    /// Strings a request can carry: quotes, backslashes, every control character, DEL,
    /// non-ASCII, and lengths on both sides of the 16-byte blocks.
    fn nasty(i: usize) -> String {
        let pool = [
            "",
            "plain",
            "with \"quotes\"",
            "back\\slash",
            "tab\there",
            "new\nline\r\n",
            "\u{7f}del",
            "é漢字🙂",
            "exactly sixteen!",
            "fifteen chars..",
            "seventeen chars..",
            "/payments/u1/2026-01.json?x=1&y=%22",
        ];
        let mut s = pool[i % pool.len()].to_string();
        // A control character somewhere, for one case in three.
        if i % 3 == 0 {
            s.insert(s.len() / 2, char::from((i % 32) as u8));
        }
        s
    }

    fn decision(i: usize) -> DecisionRecord {
        let opt = |k: usize| (i / k % 2 == 0).then(|| nasty(i + k));
        let ip = |k: usize| -> IpAddr {
            if (i + k) % 2 == 0 {
                format!("{}.{}.0.{}", i % 256, k, (i * 7) % 256)
                    .parse()
                    .unwrap()
            } else {
                format!("2001:db8::{:x}", i + k).parse().unwrap()
            }
        };
        let mut headers = Headers::default();
        for k in 0..(i % 3) {
            headers.insert(
                &http::HeaderName::from_bytes(format!("x-h{k}").as_bytes()).unwrap(),
                nasty(i + k),
            );
        }
        DecisionRecord {
            instance: (i % 2 == 0).then(|| Arc::from(nasty(i + 7).as_str())),
            category: opt(2).map(Arc::from),
            client: ClientRec {
                country: Country::parse(["CN", "US", "DE"][i % 3]),
                identity: opt(3),
                ip: (i % 5 != 0).then(|| ip(1)),
                source: "override",
                via: (i % 4 == 0).then(|| ip(2)),
            },
            consent: (i % 2 == 0).then(|| ConsentRec {
                id: nasty(i + 4).into(),
                method: (i % 4 == 0).then(|| Arc::from(nasty(i + 11).as_str())),
                result: "valid",
                why: opt(5),
            }),
            dataset: opt(6).map(Arc::from),
            decision: ["allow", "deny", "error"][i % 3],
            enforced: i % 2 == 1,
            geo_db: opt(7).map(Arc::from),
            id: crate::audit::id::DecisionId::new(jiff::Timestamp::now()),
            kind: "decision",
            policy: Arc::from(format!("sha256:{}", "ab".repeat(32))),
            policy_revision: [None, Some(0), Some(7), Some(u64::MAX)][i % 4],
            prev: Link::from("cd".repeat(32).as_str()),
            purpose: opt(8),
            reason: Reason::ALL[i % Reason::ALL.len()],
            recipient: RecipientRec {
                country: (i % 3 == 0).then(|| Country::parse("US")).flatten(),
                id: opt(9).map(Arc::from),
                relation: if i % 2 == 0 {
                    Relation::ThirdParty
                } else {
                    Relation::FirstParty
                },
            },
            request: RequestRec {
                headers,
                host: opt(10),
                method: [http::Method::GET, http::Method::PUT, http::Method::DELETE][i % 3].clone(),
                path: nasty(i + 11),
                query: opt(12),
            },
            rule: nasty(i + 13),
            seq: [0, 1, 9, 10, 99_999, u64::MAX][i % 6],
            status: (i % 2 == 0).then_some([200, 451, 503][i % 3]),
            subject: opt(14),
            trace: (i % 3 != 0).then(|| {
                let header = format!("00-{:032x}-{:016x}-{:02x}", i + 1, i * 7919 + 1, i % 256);
                crate::audit::trace::TraceParent::parse(header.as_bytes()).unwrap()
            }),
            ts: Stamp(jiff::Timestamp::from_microsecond(i as i64 * 1_234_567_891).unwrap()),
            upstream: (i % 3 != 1).then(|| UpstreamRec {
                addr: SocketAddr::new(ip(15), (i * 131 % 65_536) as u16),
                country: Country::parse("CN"),
                name: Arc::from(nasty(i + 16)),
            }),
            v: 1,
        }
    }

    fn outcome(i: usize) -> OutcomeRecord {
        OutcomeRecord {
            instance: (i % 3 == 0).then(|| Arc::from(nasty(i + 3).as_str())),
            bytes_in: i as u64 * 1_000_003,
            bytes_out: u64::MAX - i as u64,
            complete: i % 2 == 0,
            detail: (i % 3 == 0).then(|| nasty(i)),
            duration_ms: [0.0, 12.0, 1e-7, 0.1, 1.839, 1e21, 123_456.789][i % 7],
            error: (i % 4 == 0).then(|| Reason::ALL[i % Reason::ALL.len()]),
            id: crate::audit::id::DecisionId::new(jiff::Timestamp::now()),
            kind: "outcome",
            prev: Link::from("ef".repeat(32).as_str()),
            records: (i % 5 == 1).then(|| {
                Box::new(crate::audit::record::RecordCounts {
                    dropped: [("consent_missing", i as u64), ("no_subject", 1)].into(),
                    kept: i as u64 * 7,
                    kept_bytes: i as u64 * 1_001,
                    would_drop: if i % 2 == 0 {
                        [("unparsable", 2)].into()
                    } else {
                        Default::default()
                    },
                })
            }),
            seq: i as u64,
            status: [0, 200, 404, 503][i % 4],
            ts: Stamp(jiff::Timestamp::from_microsecond(i as i64 * 987_654_321).unwrap()),
            upstream: (i % 2 == 0).then(|| {
                if i % 4 == 0 {
                    "127.0.0.2:18080".parse().unwrap()
                } else {
                    "[2001:db8::1]:443".parse().unwrap()
                }
            }),
            v: 1,
        }
    }

    #[test]
    fn matches_serde_json() {
        for i in 0..2_000 {
            let d = decision(i);
            let mut ours = Vec::new();
            d.write_json(&mut ours);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&d).unwrap(),
                "decision {i}"
            );
            let o = outcome(i);
            let mut ours = Vec::new();
            o.write_json(&mut ours);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&o).unwrap(),
                "outcome {i}"
            );
        }
    }

    #[test]
    fn escapes_are_found_in_every_position() {
        for len in 0..40 {
            for at in 0..len {
                for bad in [b'"', b'\\', 0u8, 0x1f] {
                    let mut s = vec![b'a'; len];
                    s[at] = bad;
                    assert!(needs_escape(&s), "{len} {at} {bad}");
                }
            }
            assert!(!needs_escape(&vec![b'a'; len]));
        }
        assert!(!needs_escape("\u{7f}é漢".as_bytes()));
    }
}
