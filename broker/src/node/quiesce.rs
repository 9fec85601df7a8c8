//! The quiesce driver: idle partition groups stop ticking, and node-pair liveness
//! decides when they must wake (the design is `shared/notes/multiraft-scale.md` §5).
//!
//! **Quiescing (leader-driven).** A partition group this node leads quiesces once it has
//! had no write or read here for `cluster.raft.quiesce_after_ms` — or only
//! `QUIESCE_SPORADIC_IDLE` when it is used sporadically (its latest use came
//! `QUIESCE_SPORADIC_GAP_FACTOR` times that long after the one before) — and its log is fully
//! committed, applied, and matched by every voter whose node it hears from (a voter on
//! a dead node is caught up when it is heard again). The leader asks each follower whose
//! node it hears from (one request per peer for all such groups); a follower parks its
//! Raft if the caller leads it in the asked term and its log ends, committed, at the
//! leader's last id (`peer::server::handle_quiesce`). When every asked follower agreed
//! — a majority counting the leader, at least — and the group was not used meanwhile,
//! the leader parks too. A refusal or a lost answer leaves the group awake (a parked
//! follower of a working leader is harmless: it just does not campaign).
//!
//! **Waking.** A write or read on the leader (`GroupHandle::awake`: heartbeat at once,
//! then serve only after a quorum acknowledged it after the wake); entries or another
//! term reaching a follower, a vote request, a pre-vote reaching the quiesced leader
//! (`peer::server`); and here:
//! - the node of a quiesced group's leader is seen dead or restarted (no beat for
//!   `PEER_DEAD_AFTER`, a refused connection, or a new epoch): one *designated* survivor per group (chosen by
//!   group id among the replicas still heard from) wakes and campaigns at once (with a
//!   pre-vote, retried until the group has a leader: [`campaign`]); the others wake
//!   after `CAMPAIGN_FALLBACK_AFTER` if the group still has no other leader — elections
//!   spread over the survivors rather than all at once;
//! - a peer comes back (or restarted): the groups this node leads with it wake, so it
//!   hears from its leader and catches up;
//! - a group of this node stopped (a storage error): its replicas elsewhere are asked to
//!   wake, since a parked follower would wait for a leader that is gone.
//!
//! Pre-votes for quiesced groups are vetoed while the leader's node is heard from
//! (`peer::server::vetoes_pre_vote`): a restarted or cut-off node does not depose a
//! working leader.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_protocol::api;
use openraft::async_runtime::watch::WatchReceiver;

use super::awake::AwakeList;
use super::limits::{
    CAMPAIGN_ATTEMPTS_MAX, CAMPAIGN_RETRY_INTERVAL, QUIESCE_LIST_INTERVAL, QUIESCE_ROUND_INTERVAL, QUIESCE_SCAN_INTERVAL, QUIESCE_SPORADIC_GAP_FACTOR,
    QUIESCE_SPORADIC_IDLE, STOPPED_GROUP_WAKE_EVERY, STOPPED_SCAN_INTERVAL,
};
use super::partition::Partition;
use super::reconcile::HostedPartitions;
use crate::peer::limits::{QUIESCE_GROUPS_PER_REQUEST_MAX, QUIESCE_REQUEST_TIMEOUT};
use crate::peer::liveness::{Liveness, CAMPAIGN_FALLBACK_AFTER};
use crate::peer::quiescence::{Idle, Quiet, WakeReason};
use crate::peer::wire::{QuiesceAsk, QuiesceRequest, WakeRequest};
use crate::peer::PeerPool;

/// What the driver needs of its node.
pub struct Driver {
    pub node_id: u64,
    pub hosted: HostedPartitions,
    pub pool: Arc<PeerPool>,
    pub liveness: Arc<Liveness>,
    /// The other members: (id, peer address).
    pub peers: Vec<(u64, String)>,
    /// Idle time before a group quiesces; `None`: groups never quiesce.
    pub quiesce_after: Option<Duration>,
    /// Bounds this node's concurrent campaign attempts (`CAMPAIGNS_IN_FLIGHT_MAX`).
    pub campaigns: Arc<tokio::sync::Semaphore>,
}

/// A peer as the driver last saw it.
#[derive(Debug, Clone, Copy, Default)]
struct PeerView {
    alive: bool,
    epoch: Option<u64>,
}

/// A group ready to quiesce, waiting for its followers' answers.
struct Candidate {
    partition: Arc<Partition>,
    quiet: Quiet,
    uses: u64,
    asked: Vec<u64>,
}

/// Runs until aborted.
pub async fn run(driver: Driver) {
    let mut views: HashMap<u64, PeerView> = driver.peers.iter().map(|(id, _)| (*id, PeerView::default())).collect();
    // Groups a non-designated survivor wakes later if no other leader appeared:
    // group -> (when, the lost leader).
    let mut deferred: HashMap<u64, (Instant, u64)> = HashMap::new();
    // Groups not to ask again before then (a follower refused, or did not answer).
    let mut not_before: HashMap<u64, Instant> = HashMap::new();
    let mut stopped_told: HashMap<u64, Instant> = HashMap::new();
    let mut stopped_scan: Option<Instant> = None;
    let mut last_round = Instant::now();
    // The hosted groups as last listed (every `QUIESCE_LIST_INTERVAL`, and whenever a
    // peer was lost or came back), and when.
    let mut partitions: Vec<Arc<Partition>> = Vec::new();
    let mut listed_at: Option<Instant> = None;
    let mut awake = AwakeList::new(QUIESCE_LIST_INTERVAL);
    let mut every = tokio::time::interval(QUIESCE_SCAN_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let (lost, returned) = peer_changes(&driver, &mut views);
        if lost.is_empty() && returned.is_empty() && deferred.is_empty() && last_round.elapsed() < QUIESCE_ROUND_INTERVAL {
            // Nothing to do this scan: the partitions are not even looked at.
            continue;
        }
        let list_due = !lost.is_empty() || !returned.is_empty() || listed_at.is_none_or(|t| t.elapsed() >= QUIESCE_LIST_INTERVAL);
        if list_due {
            partitions = driver.hosted.read().expect("hosted lock poisoned").values().cloned().collect();
            listed_at = Some(Instant::now());
        }
        for &node in &lost {
            tracing::info!(node, "peer node lost (no beat, connection refused, or restarted): waking the quiesced groups it led");
            crate::metrics::peer_lost();
            leader_lost(&driver, &partitions, node, &mut deferred);
        }
        for &node in &returned {
            tracing::info!(node, "peer node heard from (first, again, or restarted): waking the quiesced groups this node leads with it");
            for p in partitions.iter().filter(|p| p.replicas.contains(&node)) {
                if p.group.sleep.quiet().is_some_and(|q| q.leader == driver.node_id) {
                    p.group.sleep.wake(&p.group.raft, WakeReason::PeerReturned);
                }
            }
        }
        wake_deferred(&partitions, &mut deferred);
        if last_round.elapsed() < QUIESCE_ROUND_INTERVAL {
            continue;
        }
        last_round = Instant::now();
        if stopped_scan.is_none_or(|t| t.elapsed() >= STOPPED_SCAN_INTERVAL) {
            stopped_scan = Some(Instant::now());
            tell_stopped(&driver, &partitions, &mut stopped_told).await;
        }
        if list_due {
            let quiesced = partitions.iter().filter(|p| p.group.sleep.is_quiet()).count();
            crate::metrics::groups_quiescence(quiesced, partitions.len() - quiesced);
        }
        if let Some(after) = driver.quiesce_after {
            not_before.retain(|_, t| *t > last_round);
            // Only awake groups can be candidates: the quiesced ones are not walked.
            let candidates: Vec<Candidate> = awake.refresh(&driver.hosted).iter().filter_map(|p| candidate(&driver, p, after, &not_before)).collect();
            if !candidates.is_empty() {
                quiesce(&driver, candidates, after, &mut not_before).await;
            }
        }
    }
}

/// Peers seen dead or restarted since the last scan, and peers seen back (or new).
fn peer_changes(driver: &Driver, views: &mut HashMap<u64, PeerView>) -> (Vec<u64>, Vec<u64>) {
    let (mut lost, mut returned) = (Vec::new(), Vec::new());
    for (&node, view) in views.iter_mut() {
        let alive = driver.liveness.alive(node);
        let epoch = driver.liveness.last_heard(node).map(|h| h.epoch);
        let restarted = matches!((view.epoch, epoch), (Some(a), Some(b)) if a != b);
        if (view.alive && !alive) || restarted {
            lost.push(node);
        }
        if alive && (!view.alive || restarted) {
            returned.push(node);
        }
        *view = PeerView { alive, epoch: epoch.or(view.epoch) };
    }
    (lost, returned)
}

/// The node of `lost` is dead or restarted: for each quiesced group it led, the
/// designated survivor campaigns now; the others wake later unless a leader appears.
/// Awake groups are left to their own election timers when the loss was judged by
/// silence: a lost beat under overload must not start elections in groups whose leader
/// is heard (tried: at 1,000 partitions a campaign per awake group kept them from
/// converging while they were created). When `lost`'s address refused a connection its
/// process is gone — no overload looks like that — so the designated survivor
/// campaigns in the awake groups it led too (as soon as the other replicas' leases of
/// the dead leader run out, rather than at a random election timeout after that).
fn leader_lost(driver: &Driver, partitions: &[Arc<Partition>], lost: u64, deferred: &mut HashMap<u64, (Instant, u64)>) {
    if lost == driver.node_id {
        return;
    }
    let gone = driver.liveness.refused_since_heard(lost);
    for p in partitions {
        let quiet = match p.group.sleep.quiet() {
            Some(q) if q.leader == lost => true,
            None if gone && p.group.raft.metrics().borrow_watched().current_leader == Some(lost) => false,
            _ => continue,
        };
        let mut live: Vec<u64> = p.replicas.iter().copied().filter(|&r| r != lost && (r == driver.node_id || driver.liveness.alive(r))).collect();
        live.sort_unstable();
        let designated = live[(p.group.id % live.len() as u64) as usize];
        if designated == driver.node_id {
            if quiet {
                p.group.sleep.wake(&p.group.raft, WakeReason::LeaderLost);
            }
            crate::metrics::campaign_started();
            let (raft, campaigns) = (p.group.raft.clone(), driver.campaigns.clone());
            tokio::spawn(campaign(raft, lost, campaigns));
        } else if quiet {
            deferred.insert(p.group.id, (Instant::now() + CAMPAIGN_FALLBACK_AFTER, lost));
        }
    }
}

/// The designated survivor's campaign for a group whose leader's node `lost` is gone:
/// a pre-vote now, and again every `CAMPAIGN_RETRY_INTERVAL` until the group has
/// another leader (the other survivor may not have seen the loss yet and veto the first
/// ones), at most `CAMPAIGN_ATTEMPTS_MAX` times, `CAMPAIGNS_IN_FLIGHT_MAX` at once per
/// node. After that the group's own election timers take over.
async fn campaign(raft: crate::peer::GroupRaft, lost: u64, campaigns: Arc<tokio::sync::Semaphore>) {
    for _ in 0..CAMPAIGN_ATTEMPTS_MAX {
        let (led, campaigning) = {
            let m = raft.metrics();
            let m = m.borrow_watched();
            (m.running_state.is_err() || m.current_leader.is_some_and(|l| l != lost), m.state != openraft::ServerState::Follower)
        };
        if led {
            return;
        }
        // An election under way (this node a candidate) is left to finish: a new
        // pre-vote would abandon it.
        if !campaigning {
            let Ok(_permit) = campaigns.acquire().await else { return };
            if raft.trigger().elect(true).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(CAMPAIGN_RETRY_INTERVAL).await;
    }
}

/// Wakes the deferred groups whose time came and that are still parked under the
/// leader that was lost.
fn wake_deferred(partitions: &[Arc<Partition>], deferred: &mut HashMap<u64, (Instant, u64)>) {
    if deferred.is_empty() {
        return;
    }
    let now = Instant::now();
    let due: Vec<(u64, u64)> = deferred.iter().filter(|(_, (at, _))| *at <= now).map(|(g, (_, l))| (*g, *l)).collect();
    for (group, lost) in due {
        deferred.remove(&group);
        if let Some(p) = partitions.iter().find(|p| p.group.id == group) {
            if p.group.sleep.quiet().is_some_and(|q| q.leader == lost) {
                p.group.sleep.wake(&p.group.raft, WakeReason::LeaderLost);
            }
        }
    }
}

/// Asks the other replicas of groups whose Raft stopped here to wake them (at most
/// every `STOPPED_GROUP_WAKE_EVERY` per group).
async fn tell_stopped(driver: &Driver, partitions: &[Arc<Partition>], told: &mut HashMap<u64, Instant>) {
    let mut by_peer: HashMap<u64, Vec<u64>> = HashMap::new();
    for p in partitions {
        if told.get(&p.group.id).is_some_and(|t| t.elapsed() < STOPPED_GROUP_WAKE_EVERY) || p.group.stopped().is_none() {
            continue;
        }
        told.insert(p.group.id, Instant::now());
        for &r in p.replicas.iter().filter(|&&r| r != driver.node_id) {
            by_peer.entry(r).or_default().push(p.group.id);
        }
    }
    told.retain(|_, t| t.elapsed() < STOPPED_GROUP_WAKE_EVERY);
    for (peer, groups) in by_peer {
        let Some((_, addr)) = driver.peers.iter().find(|(id, _)| *id == peer) else { continue };
        let payload = Bytes::from(postcard::to_allocvec(&WakeRequest { groups }).expect("a wake request encodes"));
        let caller = driver.pool.caller(peer, addr);
        tokio::spawn(async move {
            let _ = caller.call(api::peer::WAKE, payload, QUIESCE_REQUEST_TIMEOUT).await;
        });
    }
}

/// `p` if this node leads it, it has been idle for `after`, and everything it holds is
/// committed, applied and on every voter whose node this node hears from (a majority
/// at least). A voter on a dead node does not keep the group awake: its leader would
/// heartbeat it in vain for as long as it is down (at 1,000 partitions with a node
/// down, every group ends up awake and the two survivors' cores busy); it is caught up
/// when its node is heard from again, which wakes the groups this node leads with it.
fn candidate(driver: &Driver, p: &Arc<Partition>, after: Duration, not_before: &HashMap<u64, Instant>) -> Option<Candidate> {
    let sleep = &p.group.sleep;
    if sleep.is_quiet() || not_before.contains_key(&p.group.id) {
        return None;
    }
    let idle = sleep.idle();
    if idle.since_use < idle_needed(&idle, after) {
        return None;
    }
    let uses = idle.uses;
    let m = p.group.raft.metrics();
    let m = m.borrow_watched();
    let me = driver.node_id;
    let pair = |l: &crate::replication::types::RaftLogId| (l.leader_id.term, l.index);
    let committed = m.local_committed.as_ref().map(pair);
    let settled = m.running_state.is_ok()
        && m.state == openraft::ServerState::Leader
        && m.current_leader == Some(me)
        && m.vote.is_committed()
        && committed.is_some()
        && m.last_applied.as_ref().map(pair) == committed
        && m.last_log_index == committed.map(|(_, i)| i)
        && m.membership_config
            .membership()
            .voter_ids()
            .all(|v| v == me || !driver.liveness.alive(v) || m.replication.as_ref().and_then(|r| r.get(&v)).is_some_and(|l| l.as_ref().map(pair) == committed));
    if !settled {
        return None;
    }
    let asked: Vec<u64> = p.replicas.iter().copied().filter(|&r| r != me && driver.liveness.alive(r)).collect();
    // A majority (the leader counting) must agree: a parked group needs its quorum to
    // be reachable to be woken and written to, as any group does.
    if (asked.len() + 1) * 2 <= p.replicas.len() {
        return None;
    }
    Some(Candidate { partition: p.clone(), quiet: Quiet { term: m.current_term, leader: me, last: committed }, uses, asked })
}

/// How long a group must go unused before it quiesces: `after`, or only
/// `QUIESCE_SPORADIC_IDLE` if its latest use came long after the one before.
fn idle_needed(idle: &Idle, after: Duration) -> Duration {
    if idle.use_gap >= after * QUIESCE_SPORADIC_GAP_FACTOR {
        QUIESCE_SPORADIC_IDLE.min(after)
    } else {
        after
    }
}

/// Asks the followers of `candidates` (one request per peer) and parks the leader of
/// each group whose asked followers all agreed.
async fn quiesce(driver: &Driver, candidates: Vec<Candidate>, after: Duration, not_before: &mut HashMap<u64, Instant>) {
    let mut by_peer: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, c) in candidates.iter().enumerate() {
        for &f in &c.asked {
            by_peer.entry(f).or_default().push(i);
        }
    }
    let requests = by_peer.into_iter().filter_map(|(peer, mut idx)| {
        idx.truncate(QUIESCE_GROUPS_PER_REQUEST_MAX);
        let (_, addr) = driver.peers.iter().find(|(id, _)| *id == peer)?;
        let asks = idx
            .iter()
            .map(|&i| QuiesceAsk { group: candidates[i].partition.group.id, term: candidates[i].quiet.term, last: candidates[i].quiet.last })
            .collect();
        let payload = Bytes::from(postcard::to_allocvec(&QuiesceRequest { asks }).expect("a quiesce request encodes"));
        let caller = driver.pool.caller(peer, addr);
        Some(async move {
            let answers = match caller.call(api::peer::QUIESCE, payload, QUIESCE_REQUEST_TIMEOUT).await {
                Ok(bytes) => postcard::from_bytes::<Vec<bool>>(&bytes).ok().filter(|a| a.len() == idx.len()),
                Err(_) => None,
            };
            (peer, idx, answers)
        })
    });
    let answers = futures::future::join_all(requests).await;
    let mut agreed: HashMap<usize, usize> = HashMap::new();
    let (mut yes, mut no, mut lost) = (0u64, 0u64, 0u64);
    for (_, idx, answer) in answers {
        match answer {
            Some(a) => {
                for (i, ok) in idx.into_iter().zip(a) {
                    if ok {
                        yes += 1;
                        *agreed.entry(i).or_default() += 1;
                    } else {
                        no += 1;
                    }
                }
            }
            None => lost += idx.len() as u64,
        }
    }
    crate::metrics::quiesce_requests(yes, no, lost);
    for (i, c) in candidates.into_iter().enumerate() {
        let all = agreed.get(&i).copied().unwrap_or(0) == c.asked.len();
        if all && c.partition.group.sleep.park_leader(&c.partition.group.raft, c.quiet, c.uses) {
            // Its followers released theirs when they agreed (`peer::server`).
            c.partition.group.log.release_tail_cache();
        } else {
            not_before.insert(c.partition.group.id, Instant::now() + after);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{idle_needed, Idle, QUIESCE_SPORADIC_GAP_FACTOR, QUIESCE_SPORADIC_IDLE};

    #[test]
    fn a_sporadically_written_group_quiesces_sooner_than_one_written_in_a_stream() {
        let after = Duration::from_millis(100);
        let idle = |gap_ms: u64| Idle { since_use: Duration::ZERO, use_gap: Duration::from_millis(gap_ms), uses: 2 };
        // Written every few milliseconds: the full quiesce time, so it is not parked
        // and woken between batches.
        assert_eq!(idle_needed(&idle(3), after), after);
        // Just short of sporadic.
        assert_eq!(idle_needed(&idle(100 * u64::from(QUIESCE_SPORADIC_GAP_FACTOR) - 1), after), after);
        // Written once after a long gap (a wide topic's partition): parks before its
        // first heartbeat.
        assert_eq!(idle_needed(&idle(100 * u64::from(QUIESCE_SPORADIC_GAP_FACTOR)), after), QUIESCE_SPORADIC_IDLE);
        assert_eq!(idle_needed(&idle(60_000), after), QUIESCE_SPORADIC_IDLE);
        // Never longer than the configured time.
        let short = Duration::from_millis(5);
        assert_eq!(idle_needed(&idle(60_000), short), short);
        // Never used: the configured time.
        assert_eq!(idle_needed(&Idle { since_use: Duration::ZERO, use_gap: Duration::ZERO, uses: 0 }, after), after);
    }
}
