//! Opening one Raft group of this node (the metadata group or a partition's) over its
//! own directory: `<data_dir>/groups/<group:020>/`.

use std::path::PathBuf;
use std::sync::Arc;

use keel_storage::{AckLedger, Disk, Flusher, Log, LogConfig};
use tokio::sync::watch;

use super::damage::{self, Verdict};
use super::rejoin::{self, Recovery};
use crate::metadata::METADATA_GROUP;
use crate::peer::quiescence::Sleep;
use crate::peer::{GroupNetworkFactory, GroupRaft, GroupRegistry, HostedGroup, PeerPool};
use crate::replication::state_machine::PartitionShared;
use crate::replication::{PartitionLogStore, PartitionStateMachine};

/// What every group of a node shares.
pub struct GroupContext {
    pub node_id: u64,
    pub data_dir: PathBuf,
    /// The disk the data directory is on (`keel_storage::disk::OsDisk` in production).
    pub disk: Arc<dyn Disk>,
    pub pool: Arc<PeerPool>,
    pub registry: GroupRegistry,
    pub flusher: Arc<Flusher>,
    /// What this node acknowledged, per group (`damage`).
    pub ledger: Arc<AckLedger>,
    pub raft_config: Arc<openraft::Config>,
    pub log_config: LogConfig,
    /// The data directory's free space (`disk_space`).
    pub disk_space: Arc<super::disk_space::DiskSpace>,
}

/// A running group on this node.
#[derive(Clone)]
pub struct GroupHandle {
    pub id: u64,
    pub raft: GroupRaft,
    pub log: Arc<Log>,
    /// Committed messages lie below this offset.
    pub high_watermark: watch::Receiver<u64>,
    /// The state machine's state and what it publishes.
    pub shared: Arc<PartitionShared>,
    pub dir: PathBuf,
    /// Whether the group's Raft ticks here (`crate::peer::quiescence`).
    pub sleep: Arc<Sleep>,
}

impl GroupHandle {
    /// The current leader's node id, if known.
    pub fn leader(&self) -> Option<u64> {
        use openraft::async_runtime::watch::WatchReceiver;
        self.raft.metrics().borrow_watched().current_leader
    }

    /// Where to send a client: the current leader, or — for a replica quiesced here —
    /// the leader it quiesced under (a parked follower's Raft metrics can lag: they
    /// are refreshed only when its core runs). A hint; the leader checks.
    pub fn leader_hint(&self) -> Option<u64> {
        self.leader().or_else(|| self.sleep.quiet().map(|q| q.leader))
    }

    /// Why this group's Raft stopped, if it did: a storage error (a write that failed,
    /// `ENOSPC` included), or its task ended without a word (it panicked: the metrics
    /// sender was dropped without a final state).
    pub fn stopped(&self) -> Option<String> {
        use futures::FutureExt;
        use openraft::async_runtime::watch::WatchReceiver;
        let mut metrics = self.raft.metrics();
        if let Err(e) = &metrics.borrow_watched().running_state {
            return Some(e.to_string());
        }
        matches!(metrics.changed().now_or_never(), Some(Err(_))).then(|| "its Raft core ended without reporting why".to_string())
    }

    /// Readies this node's replica for a write or read: records the use (a group in use
    /// does not quiesce) and, if the group was quiesced with this node leading, wakes it
    /// and waits (until `until`) for a quorum to acknowledge this leader after the wake
    /// — its lease ran out while parked, and a leader replaced meanwhile (paused, cut
    /// off) must learn of it before serving. Returns at once when not leading.
    pub async fn awake(&self, until: tokio::time::Instant) {
        let Some(after) = self.sleep.use_now(&self.raft) else { return };
        // A ReadIndex round: heartbeats sent now, answered by a quorum that still takes
        // this node as leader in its term (which renews its lease); a replaced leader
        // learns of the newer term instead and steps down.
        let confirmed = tokio::time::timeout_at(until, self.raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)).await;
        if matches!(confirmed, Ok(Ok(_))) {
            self.sleep.confirmed(after);
        }
    }

    /// The working leader, or — for a quiesced group — the leader it settled on (a
    /// quiesced leader's lease has run out by design; it is not leaderless). For
    /// reports, never for serving.
    pub fn settled_leader(&self) -> Option<u64> {
        self.working_leader().or_else(|| self.sleep.quiet().map(|q| q.leader))
    }

    /// The leader, if there is one that can make progress: as seen by a follower, or —
    /// when this node leads — only while a quorum has acknowledged it within the lease
    /// (a leader cut off from its quorum keeps calling itself leader until it learns of
    /// a higher term).
    pub fn working_leader(&self) -> Option<u64> {
        use openraft::async_runtime::watch::WatchReceiver;
        let m = self.raft.metrics().borrow_watched().clone();
        let lease_ms = self.raft.config().election_timeout_max;
        match m.state {
            openraft::ServerState::Leader => {
                use openraft::Instant as _;
                m.last_quorum_acked.filter(|t| t.elapsed() <= std::time::Duration::from_millis(lease_ms)).map(|_| m.id)
            }
            _ => m.current_leader,
        }
    }
}

pub fn group_dir(data_dir: &std::path::Path, group: u64) -> PathBuf {
    data_dir.join("groups").join(format!("{group:020}"))
}

/// The group's other replicas (id, peer address), and whether to probe them when the
/// group has no local state.
#[derive(Debug, Clone)]
pub struct Peers {
    pub replicas: Vec<(u64, String)>,
    /// If the group has no local state, probe the replicas and refill it if it existed
    /// (see [`super::rejoin`]). False when it cannot have existed here before (created
    /// after this node's state was last intact).
    pub probe_if_empty: bool,
}

/// File in a group's directory while it is being refilled: the index its log must
/// reach before it votes again. Written before the adopted vote, removed once caught up,
/// so a crash during a refill restarts the gate instead of voting with a partial log.
const REFILL_MARKER: &str = "refill.target";

/// How a group's log cuts its segments: its topic's `segment_bytes`, and — when the
/// topic has age retention — a segment age of its `retention_ms`, so that retention by
/// age can delete whole segments. Applied when the log is opened (before any entry can
/// reach it), and again at each retention look at the partition (so a changed topic
/// config takes effect); the metadata log's comes from `cluster.metadata_log` at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentPolicy {
    pub bytes: u64,
    pub age: Option<std::time::Duration>,
}

impl SegmentPolicy {
    pub fn of_topic(config: &keel_protocol::TopicConfig) -> SegmentPolicy {
        SegmentPolicy { bytes: config.segment_bytes, age: (config.retention_ms > 0).then(|| std::time::Duration::from_millis(config.retention_ms)) }
    }

    pub fn apply(&self, log: &Log) {
        log.set_segment_bytes(self.bytes);
        if let Some(age) = self.age {
            log.set_segment_age(age);
        }
    }
}

/// Opens (creating if new) group `group` and registers it with the peer server; its log
/// cuts segments by `segments` from the start (the node's log config if `None`).
/// Returns the recovery it went through, if it found its state lost.
pub async fn open_group(ctx: &GroupContext, group: u64, peers: Peers, segments: Option<SegmentPolicy>) -> Result<(GroupHandle, Option<Recovery>), String> {
    let dir = group_dir(&ctx.data_dir, group);
    let log_config = ctx.log_config.clone();
    let (open_dir, disk) = (dir.clone(), ctx.disk.clone());
    let log = tokio::task::spawn_blocking(move || Log::open_on(disk, &open_dir, log_config))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("opening the log of group {group}: {e}"))?;
    if let Some(policy) = segments {
        policy.apply(&log);
    }
    let log = Arc::new(log);
    for d in log.damage_found_at_open() {
        tracing::error!(group, path = %d.path.display(), position = d.position, reason = %d.reason, "damaged segment bytes were cut off and set aside");
    }
    let mut recovery = None;
    let verdict = damage::judge(&ctx.ledger, group, &log);
    if peers.probe_if_empty || verdict == Verdict::Unknown {
        let replicas = &peers.replicas;
        if rejoin::is_empty(&log) && !replicas.is_empty() {
            if let Some(r) = rejoin::probe_until_decided(&ctx.pool, replicas, group).await {
                if group == METADATA_GROUP {
                    // Before anything else: partition groups created below this offset
                    // may have lived here too, and are probed when opened.
                    rejoin::write_horizon(&*ctx.disk, &ctx.data_dir, r.next_offset)?;
                }
                // The marker before the vote: a crash between them restarts the gate.
                let bytes = r.target_index.to_le_bytes();
                keel_storage::atomic_file::write(&*ctx.disk, &dir, REFILL_MARKER, &bytes).map_err(|e| format!("recording the refill of group {group}: {e}"))?;
                crate::replication::log_store::persist_vote(&*ctx.disk, &dir, &r.vote)
                    .map_err(|e| format!("adopting the leader's vote for group {group}: {e}"))?;
                recovery = Some(r);
            }
        } else if verdict == Verdict::Unknown && !replicas.is_empty() {
            // The ledger cannot vouch for this log: refill it as if its state were lost,
            // keeping the log and the vote it has.
            tracing::error!(group, "the ack ledger holds no readable record for this group; refilling it from the leader before it votes again");
            if let Some(r) = rejoin::probe_until_decided(&ctx.pool, replicas, group).await {
                let bytes = r.target_index.to_le_bytes();
                keel_storage::atomic_file::write(&*ctx.disk, &dir, REFILL_MARKER, &bytes).map_err(|e| format!("recording the refill of group {group}: {e}"))?;
            }
        }
    }
    let floor = match verdict {
        Verdict::Damaged(floor) => Some(floor),
        // Unknown: handled above by the refill marker (or there is no peer to refill from).
        Verdict::Intact | Verdict::Unknown => None,
    };
    if floor.is_some() {
        let last = log.state().last.map(|l| (l.term, l.index));
        let snapshot = crate::replication::state_machine::saved_snapshot_last(&*ctx.disk, &dir).map_err(|e| format!("group {group}: {e}"))?;
        if snapshot.is_some_and(|s| Some((s.leader_id.term, s.index)) > last) {
            tracing::warn!(group, "the state machine snapshot covers entries the damaged log lost; rebuilding the state machine from the log");
            crate::replication::state_machine::discard_saved_snapshot(&*ctx.disk, &dir).map_err(|e| format!("group {group}: discarding the snapshot: {e}"))?;
        }
    }
    let refill_target =
        match keel_storage::atomic_file::read(&*ctx.disk, &dir, REFILL_MARKER).map_err(|e| format!("reading the refill marker of group {group}: {e}"))? {
            Some(bytes) => Some(u64::from_le_bytes(bytes.as_slice().try_into().map_err(|_| format!("group {group}: damaged {REFILL_MARKER}"))?)),
            None => None,
        };
    let sm = if group == METADATA_GROUP {
        PartitionStateMachine::open_metadata(ctx.disk.clone(), dir.clone(), log.clone())
    } else {
        PartitionStateMachine::open(ctx.disk.clone(), dir.clone()).map(|sm| sm.with_log(log.clone()))
    };
    let sm = sm.map_err(|e| format!("opening the state machine of group {group}: {e}"))?;
    let high_watermark = sm.high_watermark();
    let shared = sm.shared();
    let store = PartitionLogStore::new(log.clone(), ctx.flusher.clone()).with_ack_key(group).with_purge_floor(shared.purge_floor());
    let network = GroupNetworkFactory::new(group, ctx.pool.clone(), log.clone());
    // No replica resumes leading without an election (`enable_leader_restore` is off in
    // `replication::config`), a damaged one included.
    let raft = GroupRaft::new(ctx.node_id, ctx.raft_config.clone(), network, store, sm).await.map_err(|e| format!("starting Raft for group {group}: {e}"))?;
    let sleep = Arc::new(Sleep::default());
    let hosted = HostedGroup::new(raft.clone(), log.clone(), sleep.clone());
    if let Some(floor) = floor {
        damage::guard(group, &hosted, floor);
    }
    if let Some(target) = refill_target {
        let (marker_dir, disk) = (dir.clone(), ctx.disk.clone());
        rejoin::gate_until_caught_up(group, &hosted, target, move || {
            // Best effort: a marker that survives only gates the next start briefly
            // (its log already holds the target).
            if let Err(e) = disk
                .remove_file(&marker_dir.join(REFILL_MARKER))
                .map_err(|e| e.to_string())
                .and_then(|()| keel_storage::atomic_file::sync_dir(&*disk, &marker_dir).map_err(|e| e.to_string()))
            {
                tracing::warn!(group, error = %e, "could not remove the refill marker");
            }
        });
    }
    ctx.registry.write().expect("group registry lock poisoned").insert(group, hosted);
    Ok((GroupHandle { id: group, raft, log, high_watermark, shared, dir, sleep }, recovery))
}

/// Initializes `handle`'s group with `members` unless it already has state. Running
/// it on an initialized group is a no-op, so bootstrap can be repeated safely.
pub async fn initialize_if_new(handle: &GroupHandle, members: std::collections::BTreeMap<u64, openraft::BasicNode>) -> Result<(), String> {
    if handle.raft.is_initialized().await.map_err(|e| e.to_string())? {
        return Ok(());
    }
    match handle.raft.initialize(members).await {
        Ok(()) => Ok(()),
        Err(openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
        Err(e) => Err(format!("initializing group {}: {e}", handle.id)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keel_protocol::TopicConfig;
    use keel_storage::{Log, LogConfig};

    use super::SegmentPolicy;

    #[test]
    fn a_topics_segment_policy_is_its_segment_size_and_retention_age_and_sets_them_on_a_log() {
        let config = TopicConfig { segment_bytes: 64 * 1024, retention_ms: 0, ..TopicConfig::default() };
        let policy = SegmentPolicy::of_topic(&config);
        assert_eq!(policy, SegmentPolicy { bytes: 64 * 1024, age: None }, "no age retention: segments roll by size only");
        let aged = SegmentPolicy::of_topic(&TopicConfig { retention_ms: 60_000, ..config.clone() });
        assert_eq!(aged.age, Some(Duration::from_secs(60)), "age retention: segments roll by that age too");

        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        assert_ne!(log.segment_bytes(), 64 * 1024, "the node's default differs from the topic's");
        policy.apply(&log);
        assert_eq!(log.segment_bytes(), 64 * 1024);
    }
}
