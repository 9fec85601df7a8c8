//! The node-wide budget of the logs' tail caches.
//!
//! Each log keeps recently appended entries in memory (`LogConfig::tail_cache_bytes`,
//! 32 MiB by default) so that replication and the state machine read them without
//! touching the file. Per log that is cheap; a node hosting a thousand partitions that
//! are all written now and then would hold up to a thousand times that — 32 GB — since a
//! log evicts only past its own bound. Logs opened with one [`TailCacheShare`] split its
//! bytes instead: a log may cache at most `min(tail_cache_bytes, total / holders)`,
//! where *holders* counts the logs whose cache is not empty right now. A log that has
//! nothing left to serve from memory (its partition went idle: `Log::release_tail_cache`)
//! holds nothing and leaves its share to the busy ones.
//!
//! The bound is on written entries: an entry appended but not yet written to its file
//! stays cached whatever the budget (storage `DESIGN.md`, invariant 3), and that is
//! bounded per log by `PENDING_BYTES_MAX`. So the node's cache holds at most `total`
//! plus, per log, one share's rounding and its unwritten entries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A byte budget shared by every log opened with it (compared by identity).
#[derive(Debug, Clone)]
pub struct TailCacheShare(Arc<Budget>);

#[derive(Debug)]
struct Budget {
    total_bytes: u64,
    /// Logs whose tail cache holds at least one entry.
    holders: AtomicU64,
}

impl TailCacheShare {
    /// A budget of `total_bytes` for all the logs that will share it.
    pub fn new(total_bytes: u64) -> TailCacheShare {
        TailCacheShare(Arc::new(Budget { total_bytes, holders: AtomicU64::new(0) }))
    }

    /// The most one log may cache now, given its own bound `per_log`.
    pub fn limit(&self, per_log: u64) -> u64 {
        let holders = self.0.holders.load(Ordering::Acquire).max(1);
        per_log.min(self.0.total_bytes / holders)
    }

    /// How many logs hold cached entries now.
    pub fn holders(&self) -> u64 {
        self.0.holders.load(Ordering::Acquire)
    }

    pub fn total_bytes(&self) -> u64 {
        self.0.total_bytes
    }

    /// A log's cache went from empty to holding entries (`true`) or back (`false`).
    pub(crate) fn holding(&self, holds: bool) {
        if holds {
            self.0.holders.fetch_add(1, Ordering::AcqRel);
        } else {
            let _ = self.0.holders.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| h.checked_sub(1));
        }
    }
}

impl PartialEq for TailCacheShare {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TailCacheShare {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_split_among_the_logs_holding_entries() {
        let share = TailCacheShare::new(1_000);
        assert_eq!(share.limit(600), 600, "no holder yet: the log's own bound");
        share.holding(true);
        share.holding(true);
        assert_eq!(share.limit(600), 500, "two holders: half each");
        assert_eq!(share.limit(300), 300, "never above the log's own bound");
        share.holding(false);
        assert_eq!(share.limit(600), 600);
        share.holding(false);
        share.holding(false);
        assert_eq!(share.holders(), 0, "never below zero");
        assert_eq!(share, share.clone());
        assert_ne!(share, TailCacheShare::new(1_000), "compared by identity");
    }
}
