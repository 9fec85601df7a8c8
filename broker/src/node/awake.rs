//! The awake partition groups among those this node hosts, for the loops that only
//! ever act on awake ones (`super::ticks`, `super::retention`, `super::quiesce`).
//!
//! Most of thousands of hosted groups are quiesced; walking all of them every
//! heartbeat costs a pointer chase per group into memory no other code touches (with
//! an idle 1,000-partition topic, the retention and quiesce loops alone were 1.7 % of a
//! node's samples under load on another topic). The list is taken from all hosted
//! groups again when any group woke since (`quiescence::wakes_so_far`), when the number
//! of hosted groups changed (one was opened or removed), and every `interval`; in
//! between, groups that quiesced are dropped from it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::partition::Partition;
use super::reconcile::HostedPartitions;

pub struct AwakeList {
    awake: Vec<Arc<Partition>>,
    listed: Option<Instant>,
    wakes_listed: u64,
    /// How many groups were hosted then: a group opened since (a new topic's, awake and
    /// about to be written: retention sets its segment size at its first look) lists
    /// them again at once.
    hosted_listed: usize,
    interval: Duration,
}

impl AwakeList {
    /// A list taken again at least every `interval`.
    pub fn new(interval: Duration) -> AwakeList {
        AwakeList { awake: Vec::new(), listed: None, wakes_listed: 0, hosted_listed: 0, interval }
    }

    /// The hosted groups not quiesced here now (taken again from `hosted` when due).
    pub fn refresh(&mut self, hosted: &HostedPartitions) -> &mut Vec<Arc<Partition>> {
        let wakes = crate::peer::quiescence::wakes_so_far();
        let hosted = hosted.read().expect("hosted lock poisoned");
        if wakes != self.wakes_listed || hosted.len() != self.hosted_listed || self.listed.is_none_or(|t| t.elapsed() >= self.interval) {
            self.awake = hosted.values().filter(|p| !p.group.sleep.is_quiet()).cloned().collect();
            self.listed = Some(Instant::now());
            self.wakes_listed = wakes;
            self.hosted_listed = hosted.len();
        } else {
            self.awake.retain(|p| !p.group.sleep.is_quiet());
        }
        &mut self.awake
    }
}
