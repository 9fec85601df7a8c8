//! Awake partition groups do not tick either: this node drives them.
//!
//! openraft ticks every `heartbeat × 13/64` (10 ms at the default 50 ms heartbeat) on
//! every replica, quiesced or not; a leader's ticks only send its heartbeats, a
//! follower's only time its election. Over hundreds of awake groups those wakeups were
//! most of a node's CPU (a 1,000-partition topic under load). So every `heartbeat_ms`
//! this scans the hosted partition groups that are not quiesced:
//! - a **leader** stops its ticker and is sent its heartbeat from here (all leaders'
//!   heartbeat requests at once, `trigger().heartbeat()`): one core message per
//!   heartbeat instead of five ticks;
//! - a **follower** whose last accepted AppendEntries (`Sleep::contact`) is younger than
//!   `LISTEN_FRESH_HEARTBEATS` heartbeats stops its ticker (it *listens*); once that
//!   contact is `LISTEN_STALE_HEARTBEATS` old it ticks again, and openraft times the
//!   election from that same last contact as it always does — the leader going quiet
//!   still starts an election after the election timeout (within one more scan when
//!   the timeout is at its minimum of `3 × heartbeat`);
//! - anything else (a candidate, a follower without a leader) ticks.
//!
//! The awake groups are listed from all hosted ones every `TICKS_LIST_INTERVAL`: a
//! group woken meanwhile ticks on its own until then, as it did before this existed.
//! Quiesced groups are the quiesce driver's (`super::quiesce`); the metadata group is
//! not a partition and ticks on its own.
//!
//! Safety does not rest on this: votes, leases and commits are openraft's, unchanged;
//! only when a follower's election timer runs and when a leader heartbeats is decided
//! here, both as openraft's ticker would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::watch::WatchReceiver;

use super::limits::{LISTEN_FRESH_HEARTBEATS, LISTEN_STALE_HEARTBEATS, TICKS_LIST_INTERVAL};
use super::partition::Partition;
use super::reconcile::HostedPartitions;

/// What one group's replica here does until the next scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drive {
    /// Quiesced: the quiesce driver's.
    Quiet,
    /// Its own ticker runs.
    Tick,
    /// Leads without ticking: heartbeated from here.
    Lead,
    /// Follows without ticking: hears its leader.
    Listen,
}

/// Runs until aborted.
pub async fn run(hosted: HostedPartitions, heartbeat: Duration) {
    let (fresh, stale) = (heartbeat * LISTEN_FRESH_HEARTBEATS, heartbeat * LISTEN_STALE_HEARTBEATS);
    let mut every = tokio::time::interval(heartbeat);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The awake groups, listed from all hosted ones every `TICKS_LIST_INTERVAL` (most
    // of thousands are quiesced; one woken meanwhile ticks on its own until listed).
    let mut awake: Vec<Arc<Partition>> = Vec::new();
    let mut listed: Option<Instant> = None;
    loop {
        every.tick().await;
        if listed.is_none_or(|t| t.elapsed() >= TICKS_LIST_INTERVAL) {
            awake = hosted.read().expect("hosted lock poisoned").values().filter(|p| !p.group.sleep.is_quiet()).cloned().collect();
            listed = Some(Instant::now());
        }
        let mut leaders = Vec::new();
        let mut tickless = 0;
        awake.retain(|p| match decide(p, fresh, stale) {
            Drive::Lead => {
                tickless += 1;
                leaders.push(p.group.raft.clone());
                true
            }
            Drive::Listen => {
                tickless += 1;
                true
            }
            Drive::Tick => true,
            Drive::Quiet => false,
        });
        crate::metrics::groups_tickless(tickless);
        // Every request is sent on the first poll; a slow core does not hold back the
        // next round (its answer is just not waited for).
        let heartbeats = futures::future::join_all(leaders.iter().map(|raft| async move { raft.trigger().heartbeat().await }));
        let _ = tokio::time::timeout(heartbeat, heartbeats).await;
    }
}

/// Starts or stops the ticker of `p`'s replica here.
fn decide(p: &Partition, fresh: Duration, stale: Duration) -> Drive {
    let sleep = &p.group.sleep;
    if sleep.is_quiet() {
        return Drive::Quiet;
    }
    let state = p.group.raft.metrics().borrow_watched().state;
    match state {
        openraft::ServerState::Leader => {
            sleep.listen(&p.group.raft);
            Drive::Lead
        }
        openraft::ServerState::Follower => {
            let age = sleep.contact_age();
            let keep = if sleep.is_listening() { age.is_some_and(|a| a < stale) } else { age.is_some_and(|a| a < fresh) };
            if keep {
                sleep.listen(&p.group.raft);
                Drive::Listen
            } else {
                sleep.unlisten(&p.group.raft);
                Drive::Tick
            }
        }
        _ => {
            sleep.unlisten(&p.group.raft);
            Drive::Tick
        }
    }
}
