//! Listening followers: an awake partition-group follower that hears its leader does
//! not tick (`crate::peer::quiescence`, "Listening followers").
//!
//! Every `heartbeat_ms` this scans the hosted partition groups: a follower whose last
//! accepted AppendEntries is younger than `LISTEN_FRESH_HEARTBEATS` heartbeats stops its
//! ticker; one listening whose last contact is older than `LISTEN_STALE_HEARTBEATS`
//! starts it again. A follower's ticks only time elections, and openraft times an
//! election from the last contact whether or not the ticker ran meanwhile, so the
//! leader going quiet still starts an election after the election timeout — at most
//! `LISTEN_STALE_HEARTBEATS + 1` heartbeats after the last contact, within the
//! election timeout's minimum of `3 x heartbeat` plus one scan. Leaders keep ticking
//! (their ticks send the heartbeats), and quiesced groups are left to the quiesce
//! driver.
//!
//! Safety does not rest on this: votes, leases and commits are openraft's, unchanged;
//! only when a follower's own election timer runs is decided here.

use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;

use super::limits::{LISTEN_FRESH_HEARTBEATS, LISTEN_STALE_HEARTBEATS};
use super::partition::Partition;
use super::reconcile::HostedPartitions;

/// Runs until aborted.
pub async fn run(hosted: HostedPartitions, heartbeat: Duration) {
    let (fresh, stale) = (heartbeat * LISTEN_FRESH_HEARTBEATS, heartbeat * LISTEN_STALE_HEARTBEATS);
    let mut every = tokio::time::interval(heartbeat);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let partitions: Vec<Arc<Partition>> = hosted.read().expect("hosted lock poisoned").values().cloned().collect();
        let mut listening = 0;
        for p in &partitions {
            if decide(p, fresh, stale) {
                listening += 1;
            }
        }
        crate::metrics::groups_listening(listening);
    }
}

/// Starts or stops the ticker of `p`'s replica here; returns whether it listens now.
fn decide(p: &Partition, fresh: Duration, stale: Duration) -> bool {
    let sleep = &p.group.sleep;
    if sleep.is_quiet() {
        return false;
    }
    let age = sleep.contact_age();
    if sleep.is_listening() {
        if age.is_none_or(|a| a >= stale) {
            sleep.unlisten(&p.group.raft);
            return false;
        }
        return true;
    }
    if age.is_some_and(|a| a < fresh) && p.group.raft.metrics().borrow_watched().state == openraft::ServerState::Follower {
        sleep.listen(&p.group.raft);
        return true;
    }
    false
}
