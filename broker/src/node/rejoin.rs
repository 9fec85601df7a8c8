//! Starting a group whose local state is empty: a brand-new group, or one this node
//! held before its data directory was wiped (a lost disk, an operator's `rm -rf`).
//!
//! A replica that lost its state must not simply start empty:
//! - **Votes.** It may have voted in the current term before; voting again could elect
//!   two leaders in one term. And with an empty log it would vote for any candidate,
//!   so a candidate lacking committed entries could win with its help and overwrite
//!   them on the others.
//! - **Progress.** The leader remembers how far the replica's log matched and would
//!   never resend those entries (openraft refuses a follower's log going backwards).
//!
//! So before such a group starts, the node probes every other replica
//! (`peer::GROUP_PROBE`) and [`decide`]s:
//! - A replica answers as the committed leader with a non-empty log → **recover**: adopt
//!   the leader's vote (so this node cannot vote again in that term; it cannot have
//!   voted in a later one, since every candidate records its term before asking and
//!   every other replica reported a term no higher), refuse to vote until the local log
//!   reaches the leader's last index at probe time (which holds every entry committed
//!   before the wipe), and let the leader (which received `state_lost`) replicate from
//!   the beginning of its log.
//! - Every other replica answers and none has ever seen a leader (no committed vote,
//!   and no entry past the initial membership: a leader's term starts with a blank
//!   entry) → **fresh**: nobody can have acknowledged anything, start as usual (first
//!   start of a cluster or a group).
//! - Otherwise (a replica is unreachable, or an election is under way) → **wait** and
//!   probe again. A wiped node is refilled only while its group has a leader; with two
//!   of three replicas gone the remaining data must not be overruled by an empty one.
//!
//! Entries reach the refilled node through ordinary replication from the start of the
//! leader's log; where retention purged it, the leader sends a snapshot with its
//! retained entries first (`peer/snapshot.rs`), and the gate lifts once the installed
//! log plus what follows it reaches the target.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use keel_protocol::api;
use openraft::async_runtime::watch::WatchReceiver;

use super::limits::{REJOIN_CATCH_UP_POLL, REJOIN_PROBE_LOG_EVERY, REJOIN_PROBE_RETRY, REJOIN_PROBE_TIMEOUT};
use crate::peer::wire::{GroupId, GroupProbe, GroupProbeReply, GroupProbeState, Vote};
use crate::peer::{HostedGroup, PeerPool};

/// What to do with a group whose local state is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start as usual.
    Fresh,
    /// Refill from the leader (see the module docs).
    Recover(Recovery),
    /// Not decidable yet; the reason says what is missing.
    Wait(String),
}

/// How a group that lost its state restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The leader's committed vote, adopted before the group starts.
    pub vote: Vote,
    /// The node votes again once its log holds this index.
    pub target_index: u64,
    /// The leader's next offset at probe time: everything below it may have existed
    /// before the state was lost (for the metadata group: topics created below it).
    pub next_offset: u64,
}

/// Decides from the answers of every other replica (`None`: unreachable).
pub fn decide(answers: &BTreeMap<u64, Option<GroupProbeReply>>) -> Decision {
    let states = || answers.values().flatten().filter_map(|r| if let GroupProbeReply::State(s) = r { Some(s) } else { None });
    if let Some(GroupProbeState { vote, last_log_index: Some(last), next_offset, .. }) = states().find(|s| s.leader) {
        return Decision::Recover(Recovery { vote: *vote, target_index: *last, next_offset: *next_offset });
    }
    let unreachable: Vec<u64> = answers.iter().filter(|(_, a)| a.is_none()).map(|(id, _)| *id).collect();
    if !unreachable.is_empty() {
        return Decision::Wait(format!("nodes {unreachable:?} do not answer, and no reachable replica leads the group"));
    }
    // A replica that is starting and has not reopened the group may hold entries
    // committed before the wipe: without its state, "nobody had a leader" is unknown.
    // (Found by keel-jepsen over 300 partitions: a restarted node slow to reopen its
    // groups answered as if it had none, the wiped one started fresh and voted for a
    // candidate lacking two committed entries, which were overwritten.)
    let starting: Vec<u64> = answers.iter().filter(|(_, a)| matches!(a, Some(GroupProbeReply::NotOpenYet))).map(|(id, _)| *id).collect();
    if !starting.is_empty() {
        return Decision::Wait(format!("nodes {starting:?} hold the group but have not opened it yet"));
    }
    // Evidence that the group had a leader: a replica's committed vote, or entries past
    // the initial membership (index 0) — every leader's term starts with a blank entry.
    // The committed vote alone is not enough: that flag is written without fsync
    // (`replication::log_store`), so a replica restarted by a crash reads its vote back
    // uncommitted. (Found by keel-jepsen over 300 partitions: right after a
    // partition-kill, the wiped node found one replica just restarted and the other
    // campaigning, neither with a committed vote, started fresh, and voted in a
    // candidate lacking 600 acknowledged records, which were overwritten.) Its log is
    // durable evidence: anything acknowledged is on a majority, so on one of the others.
    if states().any(|s| s.vote.is_committed() || s.last_log_index.is_some_and(|i| i > 0)) {
        return Decision::Wait("the group had a leader but none answers now (an election is under way)".into());
    }
    Decision::Fresh
}

/// Asks one replica about `group`.
async fn probe(pool: &PeerPool, target: u64, addr: &str, group: GroupId) -> Option<GroupProbeReply> {
    if pool.faults.is_blocked(target) {
        return None;
    }
    let payload = postcard::to_allocvec(&GroupProbe { group, state_lost: true }).expect("a probe encodes");
    match pool.caller(target, addr).call(api::peer::GROUP_PROBE, Bytes::from(payload), REJOIN_PROBE_TIMEOUT).await {
        Ok(bytes) => match postcard::from_bytes(&bytes) {
            Ok(reply) => Some(reply),
            Err(e) => {
                tracing::warn!(group, node = target, error = %e, "undecodable probe reply");
                None
            }
        },
        Err(e) => {
            tracing::debug!(group, node = target, error = %e, "probe failed");
            None
        }
    }
}

/// Probes `peers` (id → peer address; not this node) until [`decide`] can decide:
/// `Some` to recover, `None` to start fresh.
pub async fn probe_until_decided(pool: &PeerPool, peers: &[(u64, String)], group: GroupId) -> Option<Recovery> {
    let mut logged = Instant::now();
    loop {
        let mut answers = BTreeMap::new();
        for (id, addr) in peers {
            answers.insert(*id, probe(pool, *id, addr, group).await);
        }
        match decide(&answers) {
            Decision::Wait(why) => {
                if logged.elapsed() >= REJOIN_PROBE_LOG_EVERY {
                    tracing::warn!(group, reason = %why, "group has no local state; waiting to learn whether it existed here before");
                    logged = Instant::now();
                }
                tokio::time::sleep(REJOIN_PROBE_RETRY).await;
            }
            Decision::Recover(r) => return Some(r),
            Decision::Fresh => return None,
        }
    }
}

/// Keeps `group` from voting or campaigning until its log holds `target_index`
/// durably, then lets it take part in elections again.
/// `on_caught_up` runs once it has (not if the group stops first).
pub fn gate_until_caught_up(
    group_id: GroupId,
    group: &HostedGroup,
    target_index: u64,
    on_caught_up: impl FnOnce() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    group.recovering.store(true, Ordering::Release);
    group.raft.runtime_config().elect(false);
    let group = group.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let mut logged = Instant::now();
        tracing::info!(group = group_id, target_index, "refilling a group whose local state was lost; not voting until caught up");
        loop {
            let durable_end = group.log.state().durable_end;
            if durable_end > target_index {
                break;
            }
            let (stopped, leader) = {
                let m = group.raft.metrics();
                let m = m.borrow_watched();
                (m.running_state.is_err(), m.current_leader)
            };
            if stopped {
                return;
            }
            if logged.elapsed() >= REJOIN_PROBE_LOG_EVERY {
                tracing::warn!(
                    group = group_id,
                    target_index,
                    durable_end,
                    ?leader,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "still refilling: the log has not reached the target yet"
                );
                logged = Instant::now();
            }
            tokio::time::sleep(REJOIN_CATCH_UP_POLL).await;
        }
        on_caught_up();
        group.recovering.store(false, Ordering::Release);
        group.raft.runtime_config().elect(true);
        tracing::info!(group = group_id, target_index, elapsed_ms = started.elapsed().as_millis() as u64, "group refilled; voting again");
    })
}

/// File in the data directory: the metadata offset below which partition groups may
/// have existed on this node before it lost its state (written when the metadata group
/// is refilled; kept, as it only matters for groups that still have no state).
const HORIZON_FILE: &str = "refill.horizon";

/// Records the refill horizon durably (see [`HORIZON_FILE`]).
pub fn write_horizon(disk: &dyn keel_storage::Disk, data_dir: &std::path::Path, next_offset: u64) -> Result<(), String> {
    keel_storage::atomic_file::write(disk, data_dir, HORIZON_FILE, &next_offset.to_le_bytes()).map_err(|e| format!("recording the refill horizon: {e}"))
}

/// The refill horizon, if this node's metadata was ever refilled.
pub fn read_horizon(disk: &dyn keel_storage::Disk, data_dir: &std::path::Path) -> Result<Option<u64>, String> {
    match keel_storage::atomic_file::read(disk, data_dir, HORIZON_FILE).map_err(|e| format!("reading the refill horizon: {e}"))? {
        None => Ok(None),
        Some(bytes) => {
            bytes.as_slice().try_into().map(|b| Some(u64::from_le_bytes(b))).map_err(|_| format!("damaged {HORIZON_FILE} in {}", data_dir.display()))
        }
    }
}

/// Whether a group directory holds no state: no log entry, nothing purged, no vote.
pub fn is_empty(log: &keel_storage::Log) -> bool {
    let st = log.state();
    st.last.is_none() && st.purged.is_none() && !crate::replication::log_store::has_vote(&**log.disk(), log.dir())
}

/// The peers of `members` other than `me`, as (id, peer address).
pub fn other_peers(members: &[crate::config::MemberConfig], replicas: Option<&[u64]>, me: u64) -> Vec<(u64, String)> {
    members.iter().filter(|m| m.id != me && replicas.is_none_or(|r| r.contains(&m.id))).map(|m| (m.id, m.peer_addr.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(term: u64, voted_for: u64, committed: bool, leader: bool, last: Option<u64>) -> Option<GroupProbeReply> {
        let vote = if committed { Vote::new_committed(term, voted_for) } else { Vote::new(term, voted_for) };
        Some(GroupProbeReply::State(GroupProbeState { vote, last_log_index: last, leader, next_offset: 10 }))
    }

    #[test]
    fn a_leader_with_a_log_means_recover_with_its_vote_and_last_index() {
        let answers = BTreeMap::from([(2, state(4, 2, true, true, Some(17))), (3, None)]);
        let Decision::Recover(r) = decide(&answers) else { panic!("expected recover") };
        assert_eq!((r.vote, r.target_index, r.next_offset), (Vote::new_committed(4, 2), 17, 10));
    }

    #[test]
    fn first_start_everyone_answering_without_a_leader_ever_is_fresh() {
        let answers = BTreeMap::from([(2, Some(GroupProbeReply::Unknown)), (3, state(1, 3, false, false, Some(0)))]);
        assert_eq!(decide(&answers), Decision::Fresh);
    }

    #[test]
    fn a_replica_holding_the_group_unopened_means_wait_even_if_the_other_never_saw_a_leader() {
        let answers = BTreeMap::from([(2, Some(GroupProbeReply::NotOpenYet)), (3, state(2, 3, false, false, Some(1)))]);
        assert!(matches!(decide(&answers), Decision::Wait(_)));
    }

    #[test]
    fn an_unreachable_replica_without_a_leader_answering_means_wait() {
        let answers = BTreeMap::from([(2, Some(GroupProbeReply::Unknown)), (3, None)]);
        assert!(matches!(decide(&answers), Decision::Wait(_)));
    }

    #[test]
    fn a_committed_vote_without_a_leader_means_an_election_and_wait() {
        // Node 2 followed leader 3, which is now a follower in a new election.
        let answers = BTreeMap::from([(2, state(5, 3, true, false, Some(9))), (3, state(6, 3, false, false, Some(9)))]);
        assert!(matches!(decide(&answers), Decision::Wait(_)));
    }

    #[test]
    fn entries_past_the_initial_membership_without_a_committed_vote_mean_wait() {
        // Node 2 just restarted after a crash: its vote reads back uncommitted (the flag
        // is not fsynced), but its log holds entries of a leader's term. Node 3 campaigns.
        let answers = BTreeMap::from([(2, state(5, 3, false, false, Some(9))), (3, state(6, 3, false, false, Some(9)))]);
        assert!(matches!(decide(&answers), Decision::Wait(_)), "{:?}", decide(&answers));
        let one = BTreeMap::from([(2, state(5, 3, false, false, Some(1))), (3, Some(GroupProbeReply::Unknown))]);
        assert!(matches!(decide(&one), Decision::Wait(_)), "one replica with a leader's blank entry is enough");
    }
}
