//! The in-memory consent index the hot path reads: subject -> that subject's consents.
//! Lookups never wait on a lock shared by all requests; stores keep it current.

use super::record::{Consent, ConsentRecord};
use std::sync::Arc;

/// Subject -> consents, safe to read from every request while a store updates it.
pub struct ConsentIndex {
    _todo: (),
}

impl ConsentIndex {
    pub fn new() -> ConsentIndex {
        todo!()
    }

    /// The consents of `subject`, if any.
    pub fn get(&self, subject: &str) -> Option<Arc<[Consent]>> {
        let _ = subject;
        todo!()
    }

    /// Inserts a consent, or replaces the one with the same id (a revocation is an update).
    pub fn upsert(&self, record: &ConsentRecord) {
        let _ = record;
        todo!()
    }

    /// Replaces the whole content; readers see each subject either before or after.
    pub fn replace_all(&self, records: &[ConsentRecord]) {
        let _ = records;
        todo!()
    }

    /// Number of consents held.
    pub fn len(&self) -> usize {
        todo!()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for ConsentIndex {
    fn default() -> Self {
        Self::new()
    }
}
