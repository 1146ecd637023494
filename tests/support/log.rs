//! Reading the decision log the proxy wrote: JSON lines, looked up by decision id.

#![allow(dead_code)]

use serde_json::Value;
use std::path::PathBuf;

/// The decision log of one test proxy.
pub struct DecisionLog {
    pub path: PathBuf,
}

impl DecisionLog {
    pub fn new(path: PathBuf) -> DecisionLog {
        DecisionLog { path }
    }

    /// Every complete record written so far (a line still being written is skipped).
    pub fn records(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Records of `kind` (`decision`, `outcome`, `checkpoint`).
    pub fn of_kind(&self, kind: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["kind"] == kind)
            .collect()
    }

    fn find(&self, kind: &str, id: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["kind"] == kind && r["id"] == id)
            .collect()
    }

    /// The decision record of `id`; it is written before the answer, so it must be there.
    pub fn decision(&self, id: &str) -> Value {
        let mut found = self.find("decision", id);
        assert_eq!(found.len(), 1, "decision records for {id}: {found:?}");
        found.remove(0)
    }

    /// The outcome record of `id`, waiting (at most 10 s) for it: it is written when the
    /// exchange ends, after the client may already have its answer.
    pub async fn outcome(&self, id: &str) -> Value {
        let mut found = Vec::new();
        super::wait_until(&format!("the outcome record of {id}"), || {
            found = self.find("outcome", id);
            !found.is_empty()
        })
        .await;
        assert_eq!(found.len(), 1, "outcome records for {id}: {found:?}");
        found.remove(0)
    }
}
