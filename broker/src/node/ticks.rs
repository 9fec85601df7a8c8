//! Awake partition groups do not tick either: this node drives them.
//!
//! openraft ticks every `heartbeat × 13/64` (10 ms at the default 50 ms heartbeat) on
//! every replica, quiesced or not; a leader's ticks only send its heartbeats, a
//! follower's only time its election. Over hundreds of awake groups those wakeups were
//! most of a node's CPU (a 1,000-partition topic under load). So every `heartbeat_ms`
//! this scans the hosted partition groups that are not quiesced:
//! - a **leader** stops its ticker and is sent its heartbeat from here (all leaders'
//!   heartbeat requests at once, `trigger().heartbeat()`): one core message per
//!   heartbeat instead of five ticks — and none when every other replica answered a
//!   request sent within the last heartbeat: an answered AppendEntries is a heartbeat
//!   to openraft (it extends the leader's lease as a heartbeat's answer does, and the
//!   follower takes it as contact), so a group under writes sends no heartbeat RPCs at
//!   all, and one that stops being written is heartbeated from the next scan on;
//! - a **follower** whose last accepted AppendEntries (`Sleep::contact`) is younger than
//!   `LISTEN_FRESH_HEARTBEATS` heartbeats stops its ticker (it *listens*); once that
//!   contact is `LISTEN_STALE_HEARTBEATS` old it ticks again, and openraft times the
//!   election from that same last contact as it always does — the leader going quiet
//!   still starts an election after the election timeout (within one more scan when
//!   the timeout is at its minimum of `3 × heartbeat`);
//! - anything else (a candidate, a follower without a leader) ticks.
//!
//! The awake groups are listed from all hosted ones every `TICKS_LIST_INTERVAL`, and at
//! the next scan after any group woke (`quiescence::wakes_so_far` moved). A group woken
//! by a write starts no ticker (its leader is heartbeated by its wake's ReadIndex round,
//! its followers listen from the AppendEntries that woke them: `Sleep::use_now`,
//! `Sleep::wake_by_entries`); one woken otherwise ticks on its own for at most one
//! heartbeat. Listed
//! only every `TICKS_LIST_INTERVAL` before, a group written every few seconds — a
//! partition of a wide topic, woken by each batch and quiesced 300 ms later — ticked
//! every 10 ms for its whole time awake (7 % of a node's CPU on a 1,000-partition topic).
//! Quiesced groups are the quiesce driver's (`super::quiesce`); the metadata group is
//! not a partition and ticks on its own.
//!
//! Safety does not rest on this: votes, leases and commits are openraft's, unchanged;
//! only when a follower's election timer runs and when a leader heartbeats is decided
//! here, both as openraft's ticker would.

use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;

use super::awake::AwakeList;
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
    /// Leads without ticking, and every other replica answered a request sent within
    /// the last heartbeat: no heartbeat needed this round.
    LeadReplicating,
    /// Follows without ticking: hears its leader.
    Listen,
}

/// Runs until aborted.
pub async fn run(hosted: HostedPartitions, heartbeat: Duration) {
    let (fresh, stale) = (heartbeat * LISTEN_FRESH_HEARTBEATS, heartbeat * LISTEN_STALE_HEARTBEATS);
    let mut every = tokio::time::interval(heartbeat);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The awake groups (most of thousands are quiesced; one woken otherwise than by a
    // write ticks on its own until listed).
    let mut awake = AwakeList::new(TICKS_LIST_INTERVAL);
    loop {
        every.tick().await;
        let awake = awake.refresh(&hosted);
        let mut leaders = Vec::new();
        let mut tickless = 0;
        let mut replicating = 0;
        awake.retain(|p| match decide(p, heartbeat, fresh, stale) {
            Drive::Lead => {
                tickless += 1;
                leaders.push(p.group.raft.clone());
                true
            }
            Drive::LeadReplicating => {
                tickless += 1;
                replicating += 1;
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
        crate::metrics::leader_heartbeats(leaders.len() as u64, replicating);
        // Every request is sent on the first poll; a slow core does not hold back the
        // next round (its answer is just not waited for).
        let heartbeats = futures::future::join_all(leaders.iter().map(|raft| async move { raft.trigger().heartbeat().await }));
        let _ = tokio::time::timeout(heartbeat, heartbeats).await;
    }
}

/// Starts or stops the ticker of `p`'s replica here.
fn decide(p: &Partition, heartbeat: Duration, fresh: Duration, stale: Duration) -> Drive {
    let sleep = &p.group.sleep;
    if sleep.is_quiet() {
        return Drive::Quiet;
    }
    let (state, answered) = {
        let m = p.group.raft.metrics();
        let m = m.borrow_watched();
        (m.state, m.state == openraft::ServerState::Leader && all_answered_within(&m, heartbeat))
    };
    match state {
        openraft::ServerState::Leader => {
            sleep.listen(&p.group.raft);
            if answered {
                Drive::LeadReplicating
            } else {
                Drive::Lead
            }
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

/// Whether every replica but the leader answered a request (AppendEntries or heartbeat)
/// that the leader sent less than `within` ago — openraft's own per-replica record of
/// the last acknowledged sending time, the clock its lease is computed from.
fn all_answered_within(m: &openraft::RaftMetrics<crate::replication::types::TypeConfig>, within: Duration) -> bool {
    use openraft::Instant as _;
    m.heartbeat
        .as_ref()
        .is_some_and(|acked| acked.len() > 1 && acked.iter().all(|(id, sent)| *id == m.id || sent.as_ref().is_some_and(|t| t.elapsed() < within)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use openraft::metrics::SerdeInstant;
    use openraft::rt::AsyncRuntime;
    use openraft::Instant as _;

    use super::all_answered_within;
    use crate::replication::types::TypeConfig;

    fn metrics(acked: &[(u64, Option<Duration>)]) -> openraft::RaftMetrics<TypeConfig> {
        let now = <crate::replication::runtime::KeelRuntime as AsyncRuntime>::Instant::now();
        let mut m = openraft::RaftMetrics::<TypeConfig>::new_initial(1);
        m.heartbeat = Some(acked.iter().map(|(id, ago)| (*id, ago.map(|a| SerdeInstant::new(now - a)))).collect::<BTreeMap<_, _>>());
        m
    }

    #[test]
    fn a_leader_skips_its_heartbeat_only_while_every_follower_answered_within_one() {
        let hb = Duration::from_millis(50);
        let ms = Duration::from_millis;
        // The leader's own entry (id 1) does not count, however old.
        assert!(all_answered_within(&metrics(&[(1, Some(ms(5_000))), (2, Some(ms(10))), (3, Some(ms(20)))]), hb));
        // One follower's last answered request is older than a heartbeat: heartbeat it.
        assert!(!all_answered_within(&metrics(&[(1, None), (2, Some(ms(10))), (3, Some(ms(80)))]), hb));
        // A follower that never answered.
        assert!(!all_answered_within(&metrics(&[(1, None), (2, Some(ms(10))), (3, None)]), hb));
        // No record at all (not a leader), or a leader alone: nothing to skip.
        assert!(!all_answered_within(&openraft::RaftMetrics::<TypeConfig>::new_initial(1), hb));
        assert!(!all_answered_within(&metrics(&[(1, Some(ms(1)))]), hb));
    }
}
