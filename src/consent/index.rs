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
//!
//! Two modes. *Complete* (`file:` stores, and `[consent] preload = true`): the index holds the
//! whole registry, and a subject it does not hold has no consent. *Cache* (database stores by
//! default, SPEC section 4.1): the index holds the subjects looked up lately, with their
//! consents or the fact that they have none, within a byte budget; a subject it does not
//! hold is a miss, which [`super::cache::Loader`] fills from the store. A fill is announced
//! by a pending entry, so that concurrent misses of one subject share one query, and a change
//! notified while the query runs marks it dirty: its answer, possibly older than the change,
//! is then not kept. Eviction is CLOCK: entries sit in a ring in the order they were filled,
//! a lookup sets the entry's `used` bit (a relaxed store, only when it was clear), and the
//! hand gives a used entry a second round and evicts an unused one.

use super::freshness::Freshness;
use super::record::{Consent, ConsentRecord, FieldError, Scope, micros};
use compact_str::CompactString;
use foldhash::fast::RandomState;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::watch;

/// A subject's consents as the map holds them. Most subjects have one: it sits in the map
/// entry itself, next to the (inline) subject key, so a lookup touches one entry and no other
/// allocation.
#[derive(Clone, Debug)]
enum Held {
    /// Cache mode: the store holds no consent of this subject (a negative entry).
    None,
    One(Consent),
    Many(Arc<[Consent]>),
    /// Cache mode: a query for this subject is under way.
    Pending(Arc<Pending>),
}

impl Held {
    fn of(mut consents: Vec<Consent>) -> Held {
        match consents.len() {
            0 => Held::None,
            1 => Held::One(consents.pop().expect("one consent")),
            _ => Held::Many(consents.into()),
        }
    }

    fn as_slice(&self) -> &[Consent] {
        match self {
            Held::One(c) => std::slice::from_ref(c),
            Held::Many(cs) => cs,
            Held::None | Held::Pending(_) => &[],
        }
    }

    /// Bytes this entry costs, for the cache's budget: the map's slot and entry, the ring's
    /// copy of the key, key bytes past what `CompactString` holds inline, the consents and
    /// their ids. Interned terms are shared by many entries and not counted.
    fn bytes(&self, subject: &str) -> usize {
        /// The map's table slot, its boxed entry, the ring's key and allocator rounding:
        /// measured as a whole (`benches/consent_scale`: resident memory grew 1.31 MiB per
        /// MiB counted with 64 bytes here, so 120 makes the budget the memory it costs).
        const ENTRY: usize =
            120 + std::mem::size_of::<Entry>() + 2 * std::mem::size_of::<CompactString>();
        let key = if subject.len() > 24 {
            2 * subject.len()
        } else {
            0
        };
        let ids = |cs: &[Consent]| {
            cs.iter()
                .map(|c| if c.id.len() > 24 { c.id.len() } else { 0 })
                .sum::<usize>()
        };
        ENTRY
            + key
            + match self {
                Held::Many(cs) => 16 + cs.len() * std::mem::size_of::<Consent>() + ids(cs),
                Held::One(c) => ids(std::slice::from_ref(c)),
                Held::None | Held::Pending(_) => 0,
            }
    }
}

/// A map entry: what is held, and (cache mode) whether a lookup used it since the clock
/// hand last passed.
#[derive(Debug)]
struct Entry {
    held: Held,
    used: AtomicBool,
}

impl Entry {
    fn new(held: Held) -> Entry {
        Entry {
            held,
            used: AtomicBool::new(false),
        }
    }

    /// An entry about to be read: its bit is set.
    fn used(held: Held) -> Entry {
        Entry {
            held,
            used: AtomicBool::new(true),
        }
    }
}

/// A fill under way: the query's answer is announced on `done`; a change to the subject
/// notified meanwhile sets `dirty`, and the answer is then not kept.
#[derive(Debug)]
pub struct Pending {
    dirty: AtomicBool,
    done: watch::Sender<Option<Result<(), String>>>,
}

impl Pending {
    fn new() -> Arc<Pending> {
        Arc::new(Pending {
            dirty: AtomicBool::new(false),
            done: watch::Sender::new(None),
        })
    }

    /// Waits for the query's end: `Ok` when it answered (the subject is then cached, unless a
    /// change made the answer doubtful: look again), or the store's failure.
    pub async fn wait(&self) -> Result<(), String> {
        let mut rx = self.done.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(r) => r.clone().expect("waited for an answer"),
            Err(_) => Err("the consent lookup was abandoned".into()),
        }
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// The subject's consents.
    Found(&'a [Consent]),
    /// The subject has no consent.
    NotFound,
    /// Cache mode: the subject is not cached (or its fill is under way).
    Miss,
}

/// What a miss should do: the subject may have been filled meanwhile, another request's
/// query may be under way (join it), or this caller starts the query.
pub enum Fill {
    Cached,
    Join(Arc<Pending>),
    Lead(Arc<Pending>),
}

/// What a store's change feed does with a change: apply the consent's new state to a
/// complete index, or forget the subject in a cache.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FeedMode {
    Preload,
    Invalidate,
}

/// The cache's counters, read by the metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub invalidations: AtomicU64,
    /// Bytes held, by [`Held::bytes`].
    pub bytes: AtomicUsize,
    /// How old the newest change was when the feed read it (PostgreSQL), microseconds.
    pub feed_lag_micros: AtomicU64,
}

/// Subject -> consents, safe to read from every request while a store updates it.
pub struct ConsentIndex {
    map: papaya::HashMap<CompactString, Entry, RandomState>,
    /// Held by writers only, for the whole of an update.
    writer: Mutex<Interner>,
    /// Consents held; changed only under `writer`.
    count: AtomicUsize,
    freshness: Freshness,
    /// Cache mode: the byte budget. `None`: the index is complete.
    budget: Option<usize>,
    stats: CacheStats,
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
    /// Cache mode: subjects in the order they were filled, the CLOCK ring. A key may be
    /// stale (evicted or invalidated since); the hand skips those.
    ring: VecDeque<CompactString>,
    /// Cache mode: evictions since the interner was last pruned.
    evicted: usize,
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
    /// A complete index: it holds the whole registry.
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
            budget: None,
            stats: CacheStats::default(),
        }
    }

    /// A cache of the subjects looked up, within `max_bytes` (see the module doc).
    pub fn cache(max_bytes: usize) -> ConsentIndex {
        ConsentIndex {
            budget: Some(max_bytes),
            ..ConsentIndex::new()
        }
    }

    /// Whether this index is a cache (a subject it does not hold is a miss).
    pub fn is_cache(&self) -> bool {
        self.budget.is_some()
    }

    /// What the feed of this index's store does with a change.
    pub fn feed_mode(&self) -> FeedMode {
        match self.budget {
            Some(_) => FeedMode::Invalidate,
            None => FeedMode::Preload,
        }
    }

    /// The cache's counters (all zero for a complete index).
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// How current the content is; untracked (never stale) unless a store tracks it.
    pub fn freshness(&self) -> &Freshness {
        &self.freshness
    }

    /// Calls `f` with what the index holds of `subject`, read in place: the hot path's
    /// lookup, which touches no reference count and allocates nothing.
    ///
    /// `count`: whether the lookup counts as a hit or a miss in [`CacheStats`] (a request
    /// decided again once its miss is filled is not counted twice).
    pub fn lookup<R>(&self, subject: &str, count: bool, f: impl FnOnce(Lookup<'_>) -> R) -> R {
        let map = self.map.pin();
        let found = self.found(map.get(subject));
        if count && self.budget.is_some() {
            let counter = match found {
                Lookup::Miss => &self.stats.misses,
                _ => &self.stats.hits,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        f(found)
    }

    /// [`lookup`](Self::lookup) of many subjects under one pin of the map (a bulk object's
    /// batch): `f` gets each subject's index in `subjects` and what the index holds.
    pub fn lookup_each<'s>(
        &self,
        subjects: impl IntoIterator<Item = &'s str>,
        count: bool,
        mut f: impl FnMut(usize, Lookup<'_>),
    ) {
        let map = self.map.pin();
        let (mut hits, mut misses) = (0, 0);
        for (i, subject) in subjects.into_iter().enumerate() {
            let found = self.found(map.get(subject));
            match found {
                Lookup::Miss => misses += 1,
                _ => hits += 1,
            }
            f(i, found);
        }
        if count && self.budget.is_some() {
            self.stats.hits.fetch_add(hits, Ordering::Relaxed);
            self.stats.misses.fetch_add(misses, Ordering::Relaxed);
        }
    }

    /// What an entry (or its absence) means to a lookup; a cache entry read is marked used.
    fn found<'e>(&self, entry: Option<&'e Entry>) -> Lookup<'e> {
        if self.budget.is_none() {
            return match entry {
                Some(e) => Lookup::Found(e.held.as_slice()),
                None => Lookup::NotFound,
            };
        }
        match entry {
            Some(e) if !matches!(e.held, Held::Pending(_)) => {
                // Only a clear bit is written: a hot entry's cache line stays shared.
                if !e.used.load(Ordering::Relaxed) {
                    e.used.store(true, Ordering::Relaxed);
                }
                match &e.held {
                    Held::None => Lookup::NotFound,
                    held => Lookup::Found(held.as_slice()),
                }
            }
            _ => Lookup::Miss,
        }
    }

    /// Calls `f` with the consents of `subject`, if held (a miss reads as `None`).
    pub fn with<R>(&self, subject: &str, f: impl FnOnce(Option<&[Consent]>) -> R) -> R {
        let map = self.map.pin();
        f(map.get(subject).and_then(|e| match e.held {
            Held::One(_) | Held::Many(_) => Some(e.held.as_slice()),
            Held::None | Held::Pending(_) => None,
        }))
    }

    /// A copy of the consents of `subject` (tools and tests; the hot path uses `lookup`).
    pub fn get(&self, subject: &str) -> Option<Arc<[Consent]>> {
        self.with(subject, |found| found.map(Into::into))
    }

    /// Whether the cache holds an answer for `subject` (its consents, or that it has none).
    pub fn is_cached(&self, subject: &str) -> bool {
        self.map
            .pin()
            .get(subject)
            .is_some_and(|e| !matches!(e.held, Held::Pending(_)))
    }

    /// Cache mode: what a miss of `subject` should do (see [`Fill`]). A `Lead` caller must
    /// end the fill with [`finish_fill`](Self::finish_fill), whatever happens.
    pub fn begin_fill(&self, subject: &str) -> Fill {
        let _writer = self.lock_writer();
        let map = self.map.pin();
        match map.get(subject).map(|e| &e.held) {
            Some(Held::Pending(p)) => Fill::Join(p.clone()),
            Some(_) => Fill::Cached,
            None => {
                let p = Pending::new();
                map.insert(subject.into(), Entry::new(Held::Pending(p.clone())));
                Fill::Lead(p)
            }
        }
    }

    /// Ends the fill `pending` of `subject` with the store's answer (its consents' current
    /// states) or its failure. The answer is kept unless a change to the subject was notified
    /// while the query ran; records that fail validation grant nothing and are left out.
    /// Returns whether the answer was kept.
    pub fn finish_fill(
        &self,
        subject: &str,
        pending: &Arc<Pending>,
        answer: Result<Vec<ConsentRecord>, String>,
    ) -> bool {
        let mut interner = self.lock_writer();
        let map = self.map.pin();
        let ours = matches!(map.get(subject).map(|e| &e.held), Some(Held::Pending(p)) if Arc::ptr_eq(p, pending));
        let outcome = match answer {
            Ok(records) if ours && !pending.dirty.load(Ordering::Acquire) => {
                let consents: Vec<Consent> = records
                    .iter()
                    .filter(|r| match r.validate() {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(consent.id = %r.id, error = %e, "invalid consent in the registry ignored; it grants nothing");
                            false
                        }
                    })
                    .map(|r| interner.consent(r))
                    .collect();
                let n = consents.len();
                let held = Held::of(consents);
                self.stats
                    .bytes
                    .fetch_add(held.bytes(subject), Ordering::Relaxed);
                // Filled because a request asked for it, which reads it next: it starts
                // with its bit set, or the hand, clearing the bits of older entries and
                // moving them behind it, would evict a batch's fills before they are read.
                map.insert(subject.into(), Entry::used(held));
                self.count.fetch_add(n, Ordering::Relaxed);
                interner.ring.push_back(subject.into());
                self.evict(&mut interner, &map);
                (true, Ok(()))
            }
            Ok(_) => {
                if ours {
                    map.remove(subject);
                }
                (false, Ok(()))
            }
            Err(e) => {
                if ours {
                    map.remove(subject);
                }
                (false, Err(e))
            }
        };
        let (kept, outcome) = outcome;
        pending.done.send_replace(Some(outcome));
        kept
    }

    /// Cache mode: forgets what is cached of `subject` (a change to it was notified). A fill
    /// under way is marked dirty. Returns whether anything was held.
    pub fn invalidate(&self, subject: &str) -> bool {
        let mut interner = self.lock_writer();
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        let map = self.map.pin();
        self.drop_entry(&mut interner, &map, subject, true)
    }

    /// Cache mode: forgets every cached subject and marks every fill under way dirty (the
    /// feed cannot tell what changed).
    pub fn invalidate_all(&self) {
        let mut interner = self.lock_writer();
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        let map = self.map.pin();
        let keys: Vec<CompactString> = map.keys().cloned().collect();
        for k in &keys {
            self.drop_entry(&mut interner, &map, k, true);
        }
        interner.ring.clear();
        interner.prune();
    }

    /// Removes the cached answer for `subject`; a pending fill is marked dirty when `dirty`.
    fn drop_entry(
        &self,
        _writer: &mut Interner,
        map: &papaya::HashMapRef<'_, CompactString, Entry, RandomState, impl papaya::Guard>,
        subject: &str,
        dirty: bool,
    ) -> bool {
        match map.get(subject).map(|e| &e.held) {
            None => false,
            Some(Held::Pending(p)) => {
                if dirty {
                    p.dirty.store(true, Ordering::Release);
                }
                false
            }
            Some(held) => {
                let n = held.as_slice().len();
                self.stats
                    .bytes
                    .fetch_sub(held.bytes(subject), Ordering::Relaxed);
                self.count.fetch_sub(n, Ordering::Relaxed);
                map.remove(subject);
                true
            }
        }
    }

    /// Runs the CLOCK hand until the cache is within its budget.
    fn evict(
        &self,
        interner: &mut Interner,
        map: &papaya::HashMapRef<'_, CompactString, Entry, RandomState, impl papaya::Guard>,
    ) {
        let Some(budget) = self.budget else { return };
        // Each key is looked at at most twice per call: once to clear its bit, once to evict.
        let mut steps = 2 * interner.ring.len();
        while self.stats.bytes.load(Ordering::Relaxed) > budget && steps > 0 {
            steps -= 1;
            let Some(key) = interner.ring.pop_front() else {
                break;
            };
            let Some(entry) = map.get(key.as_str()) else {
                continue;
            };
            if matches!(entry.held, Held::Pending(_)) {
                continue;
            }
            if entry.used.swap(false, Ordering::Relaxed) {
                interner.ring.push_back(key);
                continue;
            }
            self.drop_entry(interner, map, &key, false);
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            interner.evicted += 1;
        }
        // Stale keys (invalidated, then filled again) would make the ring outgrow the map.
        if interner.ring.len() > 2 * map.len() + 1024 {
            let mut seen = HashSet::with_capacity_and_hasher(map.len(), RandomState::default());
            interner
                .ring
                .retain(|k| map.get(k.as_str()).is_some() && seen.insert(k.clone()));
        }
        // Terms only evicted entries used would otherwise stay interned for ever.
        if interner.evicted > 4096 && interner.evicted > map.len() / 4 {
            interner.prune();
            interner.evicted = 0;
        }
    }

    /// Inserts a consent, or replaces the one with the same id (a revocation is an update).
    ///
    /// A record that fails [`ConsentRecord::validate`] is refused, and the consent with its
    /// id is withdrawn: the latest word on a consent, if unreadable, grants nothing (as
    /// `replace_all` and the file store treat it).
    /// Ids are matched within the record's subject: a store must not move a consent id from
    /// one subject to another with `upsert` (the old subject would keep it); `replace_all`
    /// does not have this limit.
    ///
    /// In cache mode the subject is invalidated instead: its next lookup reads the store.
    pub fn upsert(&self, record: &ConsentRecord) -> Result<(), FieldError> {
        if self.is_cache() {
            self.invalidate(&record.subject);
            return record.validate();
        }
        if let Err(e) = record.validate() {
            self.remove(&record.subject, &record.id);
            return Err(e);
        }
        let mut interner = self.lock_writer();
        let mut consent = Some(interner.consent(record));
        let map = self.map.pin();
        let old: &[Consent] = map
            .get(record.subject.as_str())
            .map_or(&[], |e| e.held.as_slice());
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
        map.insert(record.subject.as_str().into(), Entry::new(Held::of(new)));
        Ok(())
    }

    /// Withdraws the consent `id` of `subject`, if the index holds it: a store does when the
    /// latest word on a consent cannot be read.
    pub fn remove(&self, subject: &str, id: &str) {
        if self.is_cache() {
            self.invalidate(subject);
            return;
        }
        let _writer = self.lock_writer();
        let map = self.map.pin();
        let Some(old) = map.get(subject).map(|e| e.held.as_slice()) else {
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
            map.insert(subject.into(), Entry::new(Held::of(kept)));
        }
    }

    /// Replaces the whole content; readers see each subject either before or after.
    ///
    /// Subjects absent from `records` disappear; a subject present before and after is never
    /// missing in between. When several records share an id, the last one wins. Records that
    /// fail [`ConsentRecord::validate`] are left out; their number is returned. Complete
    /// mode only: a cache is never loaded whole.
    pub fn replace_all(&self, records: &[ConsentRecord]) -> usize {
        debug_assert!(!self.is_cache(), "a cache is never loaded whole");
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
            map.insert(
                records[run[0]].subject.as_str().into(),
                Entry::new(Held::of(held)),
            );
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

    fn lead(index: &ConsentIndex, subject: &str) -> Arc<Pending> {
        match index.begin_fill(subject) {
            Fill::Lead(p) => p,
            _ => panic!("{subject}: expected to lead the fill"),
        }
    }

    fn looked_up(index: &ConsentIndex, subject: &str) -> String {
        index.lookup(subject, true, |l| match l {
            Lookup::Found(cs) => cs
                .iter()
                .map(|c| c.id.to_string())
                .collect::<Vec<_>>()
                .join(","),
            Lookup::NotFound => "none".into(),
            Lookup::Miss => "miss".into(),
        })
    }

    #[test]
    fn a_cache_answers_a_miss_once_filled_and_remembers_a_subject_without_consent() {
        let index = ConsentIndex::cache(1 << 20);
        assert_eq!(looked_up(&index, "u1"), "miss");
        let p = lead(&index, "u1");
        // Concurrent misses join the query under way, and still miss until it answers.
        assert!(matches!(index.begin_fill("u1"), Fill::Join(q) if Arc::ptr_eq(&p, &q)));
        assert_eq!(looked_up(&index, "u1"), "miss");
        index.finish_fill("u1", &p, Ok(vec![record("c1", "u1", "scoring")]));
        assert_eq!(looked_up(&index, "u1"), "c1");
        assert!(matches!(index.begin_fill("u1"), Fill::Cached));

        let p = lead(&index, "u2");
        index.finish_fill("u2", &p, Ok(vec![]));
        assert_eq!(looked_up(&index, "u2"), "none");
        let stats = index.stats();
        assert_eq!(stats.misses.load(Ordering::Relaxed), 2);
        assert_eq!(stats.hits.load(Ordering::Relaxed), 2);
        assert!(stats.bytes.load(Ordering::Relaxed) > 0);

        // A failed query caches nothing: the next lookup misses again.
        let p = lead(&index, "u3");
        index.finish_fill("u3", &p, Err("connection refused".into()));
        assert_eq!(looked_up(&index, "u3"), "miss");
        assert!(matches!(index.begin_fill("u3"), Fill::Lead(_)));
    }

    #[test]
    fn a_change_notified_during_a_fill_keeps_its_answer_out_of_the_cache() {
        let index = ConsentIndex::cache(1 << 20);
        let p = lead(&index, "u1");
        // The query may have read the consent before its revocation committed.
        assert!(!index.invalidate("u1"));
        index.finish_fill("u1", &p, Ok(vec![record("c1", "u1", "scoring")]));
        assert_eq!(looked_up(&index, "u1"), "miss");

        let p = lead(&index, "u1");
        index.finish_fill("u1", &p, Ok(vec![record("c1", "u1", "scoring")]));
        assert!(index.invalidate("u1"));
        assert_eq!(looked_up(&index, "u1"), "miss");
        assert_eq!(index.stats().bytes.load(Ordering::Relaxed), 0);
        assert_eq!(index.len(), 0);

        let p = lead(&index, "u2");
        index.finish_fill("u2", &p, Ok(vec![]));
        let q = lead(&index, "u3");
        index.invalidate_all();
        index.finish_fill("u3", &q, Ok(vec![]));
        assert_eq!(looked_up(&index, "u2"), "miss");
        assert_eq!(looked_up(&index, "u3"), "miss");
    }

    #[test]
    fn a_cache_stays_within_its_budget_and_keeps_what_is_used() {
        let one = {
            let index = ConsentIndex::cache(usize::MAX);
            let p = lead(&index, "s0");
            index.finish_fill("s0", &p, Ok(vec![record("c0", "s0", "scoring")]));
            index.stats().bytes.load(Ordering::Relaxed)
        };
        let index = ConsentIndex::cache(100 * one);
        let fill = |i: usize| {
            let s = format!("s{i}");
            let p = lead(&index, &s);
            index.finish_fill(&s, &p, Ok(vec![record(&format!("c{i}"), &s, "scoring")]));
        };
        for i in 0..100 {
            fill(i);
        }
        assert_eq!(index.subjects(), 100);
        // s7 is in use; the next fills evict others, not it.
        for _ in 0..3 {
            assert_eq!(looked_up(&index, "s7"), "c7");
        }
        for i in 100..150 {
            fill(i);
            looked_up(&index, "s7");
        }
        let bytes = index.stats().bytes.load(Ordering::Relaxed);
        assert!(bytes <= 100 * one, "{bytes} over the budget");
        assert_eq!(looked_up(&index, "s7"), "c7");
        assert_eq!(looked_up(&index, "s149"), "c149");
        assert_eq!(looked_up(&index, "s0"), "miss");
        assert!(index.stats().evictions.load(Ordering::Relaxed) >= 50);
        assert_eq!(index.len(), index.subjects());
    }

    #[test]
    fn in_a_cache_an_update_invalidates_the_subject() {
        let index = ConsentIndex::cache(1 << 20);
        let p = lead(&index, "u1");
        index.finish_fill("u1", &p, Ok(vec![record("c1", "u1", "scoring")]));
        index.upsert(&record("c2", "u1", "scoring")).unwrap();
        assert_eq!(looked_up(&index, "u1"), "miss");
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
