//! The in-memory consent index the hot path reads: subject -> that subject's consents.
//! Lookups never wait on a lock shared by all requests; stores keep it current.
//!
//! Readers go through a `papaya` map (lock-free reads) and get the subject's consents as one
//! immutable `Arc<[Consent]>`. Writers never edit a slice in place: they build the subject's
//! new slice and swap it in, so a reader sees a subject either wholly before or wholly after a
//! change. Writers are serialised by a mutex that readers never touch; it also guards the
//! interner, so that what many consents share is held once: strings (recipients, purposes,
//! categories, destinations, methods), whole lists, and whole sets of terms ([`Scope`]).
//!
//! Memory, for orientation: a consent costs 56 bytes inline in its subject's slice, plus its
//! id; a subject adds its map entry, key and slice header. Measured with one million
//! consents, one per subject (`cargo bench --bench registry`): 215 bytes per consent of
//! resident memory, down from 294 with only strings and lists interned and about 410 with
//! only strings.
//!
//! The index also carries its [`Freshness`]: the store that feeds it says when it last
//! confirmed the content, and the proxy refuses to grant on an index gone stale.

use super::freshness::Freshness;
use super::record::{Consent, ConsentRecord, FieldError, Scope, micros};
use compact_str::CompactString;
use foldhash::fast::RandomState;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A subject's consents as the map holds them. Most subjects have one: it sits in the map
/// entry itself, next to the (inline) subject key, so a lookup touches one entry and no other
/// allocation.
#[derive(Clone, Debug)]
enum Held {
    One(Consent),
    Many(Arc<[Consent]>),
}

impl Held {
    fn of(mut consents: Vec<Consent>) -> Held {
        if consents.len() == 1 {
            Held::One(consents.pop().expect("one consent"))
        } else {
            Held::Many(consents.into())
        }
    }

    fn as_slice(&self) -> &[Consent] {
        match self {
            Held::One(c) => std::slice::from_ref(c),
            Held::Many(cs) => cs,
        }
    }
}

/// Subject -> consents, safe to read from every request while a store updates it.
pub struct ConsentIndex {
    map: papaya::HashMap<CompactString, Held, RandomState>,
    /// Held by writers only, for the whole of an update.
    writer: Mutex<Interner>,
    /// Consents held; changed only under `writer`.
    count: AtomicUsize,
    freshness: Freshness,
}

/// One `Arc<str>` per distinct shared string, one `Arc<[Arc<str>]>` per distinct list, one
/// `Arc<Scope>` per distinct set of terms.
#[derive(Default)]
struct Interner {
    strings: HashSet<Arc<str>, RandomState>,
    lists: HashSet<Arc<[Arc<str>]>, RandomState>,
    scopes: HashSet<Arc<Scope>, RandomState>,
    /// Scratch space for building a list key without allocating per lookup.
    scratch: Vec<Arc<str>>,
}

impl Interner {
    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(held) = self.strings.get(s) {
            return held.clone();
        }
        let new: Arc<str> = s.into();
        self.strings.insert(new.clone());
        new
    }

    fn list(&mut self, items: &[String]) -> Arc<[Arc<str>]> {
        let mut key = std::mem::take(&mut self.scratch);
        key.clear();
        for s in items {
            let held = self.intern(s);
            key.push(held);
        }
        let list = match self.lists.get(key.as_slice()) {
            Some(held) => held.clone(),
            None => {
                let new: Arc<[Arc<str>]> = key.as_slice().into();
                self.lists.insert(new.clone());
                new
            }
        };
        key.clear();
        self.scratch = key;
        list
    }

    /// The in-memory form of `record`, sharing what earlier consents already hold.
    fn consent(&mut self, r: &ConsentRecord) -> Consent {
        let scope = Scope {
            recipient: self.intern(&r.recipient),
            purposes: self.list(&r.purposes),
            categories: self.list(&r.categories),
            destinations: self.list(&r.destinations),
            method: self.intern(&r.method),
        };
        let scope = match self.scopes.get(&scope) {
            Some(held) => held.clone(),
            None => {
                let new = Arc::new(scope);
                self.scopes.insert(new.clone());
                new
            }
        };
        Consent {
            id: r.id.as_str().into(),
            scope,
            granted_at: micros(r.granted_at),
            expires_at: micros(r.expires_at),
            revoked_at: r.revoked_at.map(micros),
        }
    }

    /// Forgets scopes, lists and strings no consent uses any more. Under the writer lock
    /// nobody can obtain a new reference except through the interner, so a count of one means
    /// unused (scopes go first, then lists: each holds references to the next).
    fn prune(&mut self) {
        self.scopes.retain(|s| Arc::strong_count(s) > 1);
        self.lists.retain(|l| Arc::strong_count(l) > 1);
        self.strings.retain(|s| Arc::strong_count(s) > 1);
    }
}

impl ConsentIndex {
    pub fn new() -> ConsentIndex {
        ConsentIndex {
            // Blocking resizes: writers (stores, off the request path) finish a resize before going
            // on, so readers never search two tables.
            map: papaya::HashMap::builder()
                .hasher(RandomState::default())
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
            writer: Mutex::new(Interner::default()),
            count: AtomicUsize::new(0),
            freshness: Freshness::default(),
        }
    }

    /// How current the content is; untracked (never stale) unless a store tracks it.
    pub fn freshness(&self) -> &Freshness {
        &self.freshness
    }

    /// The consents of `subject`, if any.
    /// Calls `f` with the consents of `subject` read in place: the hot path's lookup, which
    /// touches no reference count.
    pub fn with<R>(&self, subject: &str, f: impl FnOnce(Option<&[Consent]>) -> R) -> R {
        let map = self.map.pin();
        f(map.get(subject).map(Held::as_slice))
    }

    /// A copy of the consents of `subject` (tools and tests; the hot path uses `with`).
    pub fn get(&self, subject: &str) -> Option<Arc<[Consent]>> {
        self.map.pin().get(subject).map(|h| h.as_slice().into())
    }

    /// Inserts a consent, or replaces the one with the same id (a revocation is an update).
    ///
    /// A record that fails [`ConsentRecord::validate`] is refused, and the consent with its
    /// id is withdrawn: the latest word on a consent, if unreadable, grants nothing (as
    /// `replace_all` and the file store treat it).
    /// Ids are matched within the record's subject: a store must not move a consent id from
    /// one subject to another with `upsert` (the old subject would keep it); `replace_all`
    /// does not have this limit.
    pub fn upsert(&self, record: &ConsentRecord) -> Result<(), FieldError> {
        if let Err(e) = record.validate() {
            self.remove(&record.subject, &record.id);
            return Err(e);
        }
        let mut interner = self.lock_writer();
        let mut consent = Some(interner.consent(record));
        let map = self.map.pin();
        let old: &[Consent] = map.get(record.subject.as_str()).map_or(&[], Held::as_slice);
        let mut new: Vec<Consent> = Vec::with_capacity(old.len() + 1);
        for c in old {
            match consent.take_if(|n| n.id == c.id) {
                Some(replacement) => new.push(replacement),
                None => new.push(c.clone()),
            }
        }
        if let Some(added) = consent {
            new.push(added);
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        map.insert(record.subject.as_str().into(), Held::of(new));
        Ok(())
    }

    /// Withdraws the consent `id` of `subject`, if the index holds it: a store does when the
    /// latest word on a consent cannot be read.
    pub fn remove(&self, subject: &str, id: &str) {
        let _writer = self.lock_writer();
        let map = self.map.pin();
        let Some(old) = map.get(subject).map(Held::as_slice) else {
            return;
        };
        if !old.iter().any(|c| c.id == id) {
            return;
        }
        let kept: Vec<Consent> = old.iter().filter(|c| c.id != id).cloned().collect();
        self.count.fetch_sub(1, Ordering::Relaxed);
        if kept.is_empty() {
            map.remove(subject);
        } else {
            map.insert(subject.into(), Held::of(kept));
        }
    }

    /// Replaces the whole content; readers see each subject either before or after.
    ///
    /// Subjects absent from `records` disappear; a subject present before and after is never
    /// missing in between. When several records share an id, the last one wins. Records that
    /// fail [`ConsentRecord::validate`] are left out; their number is returned.
    pub fn replace_all(&self, records: &[ConsentRecord]) -> usize {
        let mut interner = self.lock_writer();

        // The winner of each id is its last valid record.
        let mut winner: std::collections::HashMap<&str, usize, RandomState> =
            std::collections::HashMap::with_capacity_and_hasher(
                records.len(),
                RandomState::default(),
            );
        let mut rejected = 0;
        for (i, r) in records.iter().enumerate() {
            if r.validate().is_ok() {
                winner.insert(r.id.as_str(), i);
            } else {
                rejected += 1;
            }
        }
        // Winners grouped by subject (a stable sort keeps their order within a subject), so
        // each subject's slice is built in one go without a second copy of every consent.
        let mut order: Vec<usize> = winner.into_values().collect();
        order.sort_unstable();
        order.sort_by(|&a, &b| records[a].subject.cmp(&records[b].subject));

        let map = self.map.pin();
        let mut total = 0;
        for run in order.chunk_by(|&a, &b| records[a].subject == records[b].subject) {
            let held: Vec<Consent> = run.iter().map(|&i| interner.consent(&records[i])).collect();
            total += held.len();
            map.insert(records[run[0]].subject.as_str().into(), Held::of(held));
        }
        map.retain(|subject, _| {
            order
                .binary_search_by(|&i| records[i].subject.as_str().cmp(subject))
                .is_ok()
        });
        self.count.store(total, Ordering::Relaxed);
        interner.prune();
        rejected
    }

    /// Number of consents held.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of subjects with at least one consent.
    pub fn subjects(&self) -> usize {
        self.map.len()
    }

    /// A panic in another writer leaves the index consistent (every change is one map
    /// insert), so a poisoned lock is taken over rather than propagated.
    fn lock_writer(&self) -> MutexGuard<'_, Interner> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn interned(&self) -> (usize, usize, usize) {
        let i = self.lock_writer();
        (i.strings.len(), i.lists.len(), i.scopes.len())
    }
}

impl Default for ConsentIndex {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, subject: &str, purpose: &str) -> ConsentRecord {
        ConsentRecord {
            id: id.into(),
            subject: subject.into(),
            recipient: "credit-bureau-us".into(),
            purposes: vec![purpose.into()],
            categories: vec!["user.financial".into()],
            destinations: vec!["US".into()],
            method: "explicit".into(),
            granted_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            expires_at: "2027-01-01T00:00:00Z".parse().unwrap(),
            revoked_at: None,
            evidence: None,
        }
    }

    fn ids(index: &ConsentIndex, subject: &str) -> Vec<String> {
        index
            .get(subject)
            .map(|s| s.iter().map(|c| c.id.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn upsert_replaces_the_consent_with_the_same_id() {
        let index = ConsentIndex::new();
        index.upsert(&record("c1", "u1", "scoring")).unwrap();
        index.upsert(&record("c2", "u1", "scoring")).unwrap();
        let mut revoked = record("c1", "u1", "scoring");
        revoked.revoked_at = Some("2026-06-01T00:00:00Z".parse().unwrap());
        index.upsert(&revoked).unwrap();

        assert_eq!(ids(&index, "u1"), ["c1", "c2"]);
        let held = index.get("u1").unwrap();
        assert!(held[0].revoked_at.is_some(), "the revocation replaced c1");
        assert!(held[1].revoked_at.is_none());
        assert_eq!((index.len(), index.subjects()), (2, 1));
    }

    #[test]
    fn an_invalid_update_is_refused_and_withdraws_the_consent() {
        let index = ConsentIndex::new();
        index.upsert(&record("c1", "u1", "scoring")).unwrap();
        index.upsert(&record("c2", "u1", "scoring")).unwrap();
        let mut bad = record("c1", "u1", "scoring");
        bad.recipient = "*".into();
        assert_eq!(index.upsert(&bad).unwrap_err().field, "recipient");
        // Keeping the earlier state would let an update the proxy cannot read (a revocation
        // among them) go unapplied while the old terms keep granting.
        assert_eq!(ids(&index, "u1"), ["c2"]);
        assert_eq!(index.len(), 1);
        index.upsert(&record("c3", "u2", "scoring")).unwrap();
        let mut bad = record("c3", "u2", "scoring");
        bad.purposes.clear();
        assert!(index.upsert(&bad).is_err());
        assert!(index.get("u2").is_none());
        assert_eq!((index.len(), index.subjects()), (1, 1));
    }

    #[test]
    fn a_revocation_dated_before_the_grant_is_applied() {
        let index = ConsentIndex::new();
        let mut future = record("c1", "u1", "scoring");
        future.granted_at = "2026-12-01T00:00:00Z".parse().unwrap();
        index.upsert(&future).unwrap();
        future.revoked_at = Some("2026-11-28T00:00:00Z".parse().unwrap());
        index.upsert(&future).unwrap();
        assert!(index.get("u1").unwrap()[0].revoked_at.is_some());
    }

    #[test]
    fn replace_all_removes_absent_subjects_and_keeps_the_last_of_an_id() {
        let index = ConsentIndex::new();
        index.upsert(&record("c1", "gone", "scoring")).unwrap();
        index.upsert(&record("c2", "kept", "scoring")).unwrap();

        let mut bad = record("c9", "new", "scoring");
        bad.purposes.clear();
        let rejected = index.replace_all(&[
            record("c2", "kept", "scoring"),
            record("c3", "new", "old-purpose"),
            bad,
            record("c3", "new", "marketing"),
        ]);

        assert_eq!(rejected, 1);
        assert!(index.get("gone").is_none());
        assert_eq!(ids(&index, "kept"), ["c2"]);
        let new = index.get("new").unwrap();
        assert_eq!(new.len(), 1);
        assert_eq!(&*new[0].scope.purposes[0], "marketing");
        assert_eq!((index.len(), index.subjects()), (2, 2));

        index.replace_all(&[]);
        assert!(index.is_empty());
        assert_eq!(index.subjects(), 0);
    }

    #[test]
    fn shared_strings_are_held_once() {
        let index = ConsentIndex::new();
        index.upsert(&record("c1", "u1", "scoring")).unwrap();
        index.replace_all(&[
            record("c1", "u1", "scoring"),
            record("c2", "u2", "scoring"),
            record("c3", "u2", "fraud"),
        ]);
        index.upsert(&record("c4", "u3", "scoring")).unwrap();

        let a = &index.get("u1").unwrap()[0];
        let b = &index.get("u2").unwrap()[0];
        let c = &index.get("u3").unwrap()[0];
        // a and c share their terms; b differs from a only by its purpose.
        assert!(Arc::ptr_eq(&a.scope, &c.scope), "whole scopes are shared");
        let (x, y) = (&a.scope, &b.scope);
        assert!(Arc::ptr_eq(&x.recipient, &y.recipient));
        assert!(Arc::ptr_eq(&x.categories, &y.categories));
        assert!(Arc::ptr_eq(&x.destinations, &y.destinations));
        assert!(Arc::ptr_eq(&x.method, &y.method));
        // Strings: recipient, 2 purposes, category, destination, method; lists: 2 purpose
        // lists, one category list, one destination list; scopes: "scoring" and "fraud".
        assert_eq!(index.interned(), (6, 4, 2));
    }

    #[test]
    fn readers_see_whole_slices_while_replace_all_runs() {
        let index = ConsentIndex::new();
        let set = |tag: &str, n: usize| -> Vec<ConsentRecord> {
            let mut v: Vec<_> = (0..n)
                .map(|i| record(&format!("{tag}-{i}"), "steady", tag))
                .collect();
            v.extend((0..50).map(|i| record(&format!("{tag}-o{i}"), &format!("o{i}"), tag)));
            v
        };
        let (old, new) = (set("old", 3), set("new", 5));
        index.replace_all(&old);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut seen = 0usize;
                        while !stop.load(Ordering::Relaxed) {
                            let slice = index.get("steady").expect("a kept subject never vanishes");
                            let tag = &*slice[0].scope.purposes[0];
                            let whole = match tag {
                                "old" => slice.len() == 3,
                                "new" => slice.len() == 5,
                                _ => false,
                            };
                            assert!(whole, "partial slice: {} consents", slice.len());
                            assert!(slice.iter().all(|c| &*c.scope.purposes[0] == tag));
                            seen += 1;
                        }
                        seen
                    })
                })
                .collect();
            for round in 0..200 {
                index.replace_all(if round % 2 == 0 { &new } else { &old });
            }
            stop.store(true, Ordering::Relaxed);
            for r in readers {
                assert!(r.join().unwrap() > 0);
            }
        });
        assert_eq!(index.len(), 53);
    }
}
