//! A partition hosted on this node: the one place that appends to it, reads its
//! committed data, and checks leadership.
//!
//! **Appending (leader).** A produced batch is judged *before* it is proposed, over the
//! applied state (`crate::partition`) plus this leader's own pending proposals (the
//! *overlay*): a retry of a stored batch is answered with its original offsets and not
//! appended; a retry of a pending one waits for that one's outcome; a sequence gap waits
//! briefly for the missing batch (requests on one connection are served concurrently
//! and may arrive out of order), then is refused; a batch whose message ids are all
//! stored already is answered with their offsets; one where only some are is refused
//! (the producer resends the rest). A refusal judged on the producer table (out of
//! order, fenced) is answered only after a ReadIndex round confirms that this node
//! still leads with a current table (`confirm_current`): a replaced leader that has
//! not heard so would judge on a stale one. Applying repeats the producer and id
//! checks, so replicas agree even if a duplicate slips through. Control entries (the partition
//! clock, the topic's settings) are proposed ahead of the batch that needs them.
//!
//! The overlay belongs to one term: a new term starts with an empty one, and the leader
//! takes writes only once it has applied an entry of its own term, so everything
//! earlier leaders committed is in the applied state by then. Pending appends are
//! bounded (bytes and count); beyond the bounds the answer is `Throttled`.
//!
//! **Reading.** Only a leader that has applied an entry of its own term and whose quorum
//! acknowledged it within the lease serves fetches, only committed batches, and never
//! control entries or batches the fold refused.

pub mod consumers;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_protocol::message::Duplicate;
use keel_protocol::BatchView;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::impls::ProgressResponder;
use openraft::raft::ReadPolicy;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

use super::group::GroupHandle;
use super::limits::{
    CLOCK_STALE_MS, CLOCK_TICK_INTERVAL, LEADER_GATE_WAIT, PARTITION_PENDING_BATCHES_MAX, PARTITION_PENDING_BYTES_MAX, PARTITION_PRODUCERS_MAX,
    PRODUCERS_FULL_RETRY_AFTER_MS, RETENTION_THROTTLE_RETRY_AFTER_MS, SEQUENCE_GAP_WAIT, THROTTLE_RETRY_AFTER_MS,
};
use crate::metadata::MetadataState;
use crate::partition::message_ids::{digest, DigestMap, DigestSet, IdDigest};
use crate::partition::producers::{self, ProducerStamp, StoredAt, Verdict, BATCHES_REMEMBERED};
use crate::partition::{BatchOutcome, ControlCommand, ControlEntry, ControlOutcome, PartitionConfig};
use crate::replication::log_store::KIND_BATCH;
use crate::replication::{ApplyReply, EntryData};

/// Why an append or a read failed. Converted to a wire code once, in `node/api`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PartitionError {
    #[error("this node does not lead the partition")]
    NotLeader { leader: Option<u64> },
    #[error("this node's leadership is not ready (no write of its own term applied yet, or no quorum within the lease)")]
    LeaderNotReady,
    #[error("{detail}; retry in {retry_after_ms} ms")]
    Throttled { retry_after_ms: u32, reason: ThrottleReason, detail: String },
    #[error("batch sequence {got} is out of order: the next expected is {expected}")]
    OutOfOrderSequence { expected: i32, got: i32 },
    #[error("producer epoch {epoch} is fenced: epoch {current} has been registered")]
    ProducerFenced { epoch: i16, current: i16 },
    #[error("{} records carry message ids already stored", .0.len())]
    DuplicateMessageIds(Vec<(u32, u64)>),
    #[error("{0}")]
    InvalidBatch(String),
    #[error("the write did not commit in time; its outcome is unknown")]
    TimedOut,
    /// The write was handed to Raft, then this node's leadership ended before it was
    /// answered: it may still commit under the next leader.
    #[error("leadership moved before the write was answered; its outcome is unknown")]
    OutcomeUnknown { leader: Option<u64> },
    #[error("offset {offset} is outside {start}..={end}")]
    OffsetOutOfRange { offset: u64, start: u64, end: u64 },
    #[error("the partition's topic was deleted")]
    Deleted,
    #[error("group {group:?} generation {generation} is stale: generation {current} has committed here; rejoin the group")]
    StaleGeneration { group: String, generation: u64, current: u64 },
    /// The node's disk is at its free-space minimum (`node/disk_space.rs`); nothing was
    /// proposed.
    #[error("{0}")]
    StorageFull(String),
    #[error("storage failed: {0}")]
    Storage(String),
}

/// Which bound a throttled produce hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleReason {
    /// The partition's pending appends (`PARTITION_PENDING_BYTES_MAX`, `…_BATCHES_MAX`).
    Pending,
    /// The partition's message-id budget (`dedupe_ids_max`).
    MessageIds,
    /// A producer's pending batches (`BATCHES_REMEMBERED`).
    ProducerWindow,
    /// The partition's producer table is full (`PARTITION_PRODUCERS_MAX`): a producer it
    /// does not know waits until idle ones expire.
    Producers,
    /// The partition's log holds more than `retention_bytes` plus half a segment:
    /// producers wait while retention deletes the oldest segments (the byte bound holds
    /// under any write rate).
    Retention,
}

impl ThrottleReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ThrottleReason::Pending => "pending",
            ThrottleReason::MessageIds => "message_ids",
            ThrottleReason::ProducerWindow => "producer_window",
            ThrottleReason::Producers => "producers",
            ThrottleReason::Retention => "retention",
        }
    }
}

/// Where an appended batch is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: u64,
    pub record_count: u32,
    pub duplicate: Duplicate,
}

/// Committed batches read from a partition.
#[derive(Debug, Clone)]
pub struct Read {
    pub high_watermark: u64,
    pub log_start_offset: u64,
    pub batches: Vec<Bytes>,
}

/// One pending proposal in the overlay.
#[derive(Debug)]
struct Pending {
    bytes: u64,
    stamp: Option<ProducerStamp>,
    ids: Vec<IdDigest>,
}

/// The leader's overlay: its proposals not yet applied, in this term.
#[derive(Debug, Default)]
struct Writer {
    term: u64,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// Per producer, its pending batches' (epoch, sequence, proposal), in order.
    by_producer: HashMap<i64, VecDeque<(i16, i32, u64)>>,
    /// Message ids in pending batches.
    ids: DigestMap<u64>,
    bytes: u64,
    /// The settings proposed in this term (so they are proposed once).
    configured: Option<PartitionConfig>,
    /// When this term's last control entry was proposed, and the time it carried.
    last_tick: Option<Instant>,
    last_time_ms: i64,
    /// A clock tick proposed to refresh a stale partition clock, until it applies.
    clock_refresh: Option<u64>,
    /// Sabotage `ack-before-commit` only: the offset the next proposed batch will get.
    predicted_next_offset: Option<u64>,
}

impl Writer {
    fn reset(&mut self, term: u64) {
        let next_id = self.next_id;
        *self = Writer { term, next_id, ..Writer::default() };
    }

    fn complete(&mut self, id: u64) {
        if self.clock_refresh == Some(id) {
            self.clock_refresh = None;
        }
        let Some(p) = self.pending.remove(&id) else { return };
        self.bytes -= p.bytes;
        if let Some(s) = p.stamp {
            if let Some(q) = self.by_producer.get_mut(&s.producer_id) {
                q.retain(|(_, _, pid)| *pid != id);
                if q.is_empty() {
                    self.by_producer.remove(&s.producer_id);
                }
            }
        }
        for d in p.ids {
            if self.ids.get(&d) == Some(&id) {
                self.ids.remove(&d);
            }
        }
    }
}

/// What to do with a batch, judged over the applied state and the overlay.
enum Decision {
    Propose,
    Answer(Appended),
    /// Every record's id is stored already, and the batch has a sequence number: record
    /// the sequence (a control entry) so a retry is recognised, then answer these.
    ProposeSequence(ProducerStamp, Vec<(u32, u64)>),
    /// Something it depends on is pending: decide again when the overlay changes.
    Wait,
    /// A sequence gap that an in-flight batch may fill.
    WaitGap(i32),
}

/// A partition's view of its topic's metadata.
struct TopicView {
    config: keel_protocol::TopicConfig,
    id_key: [u8; 16],
}

/// A partition hosted on this node.
pub struct Partition {
    pub topic: String,
    pub partition: u32,
    pub replicas: Vec<u64>,
    pub group: GroupHandle,
    node_id: u64,
    metadata: watch::Receiver<Arc<MetadataState>>,
    /// The node's free space: produces are refused while it is full.
    disk_space: Arc<super::disk_space::DiskSpace>,
    writer: tokio::sync::Mutex<Writer>,
    /// Notified whenever the overlay changes (a proposal added or completed).
    progress: Notify,
    /// When the message-id budget last throttled a produce here and said so in the log
    /// (ms since the epoch); the warning repeats at most every `BUDGET_WARNING_EVERY_MS`.
    budget_warned_at_ms: std::sync::atomic::AtomicI64,
    /// Per queue group, the lock serialising its leases here (`consumers.rs`).
    lease_locks: consumers::LeaseLocks,
    /// Notified when a settle may have made a message due sooner than a waiting queue
    /// fetch planned for.
    queue_activity: Notify,
    /// When a queue stall was last said in the log (ms since the epoch).
    stall_logged_at_ms: std::sync::atomic::AtomicI64,
    /// Sabotage `forget-delivery-counts` only: per (group, offset), deliveries counted by
    /// this leader in the term it leads.
    sabotage_attempts: std::sync::Mutex<SabotageAttempts>,
}

/// Sabotage `forget-delivery-counts`: the term, and per (group, offset) the deliveries
/// this leader counted in it.
type SabotageAttempts = (u64, HashMap<(String, u64), u32>);

/// How often, at most, a partition logs that its message-id budget throttles produces.
const BUDGET_WARNING_EVERY_MS: i64 = 10_000;

/// This node's wall clock, in milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Partition {
    pub fn new(
        topic: String,
        partition: u32,
        replicas: Vec<u64>,
        group: GroupHandle,
        node_id: u64,
        metadata: watch::Receiver<Arc<MetadataState>>,
        disk_space: Arc<super::disk_space::DiskSpace>,
    ) -> Partition {
        Partition {
            topic,
            partition,
            replicas,
            group,
            node_id,
            metadata,
            disk_space,
            writer: tokio::sync::Mutex::new(Writer::default()),
            progress: Notify::new(),
            budget_warned_at_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
            lease_locks: consumers::LeaseLocks::default(),
            queue_activity: Notify::new(),
            stall_logged_at_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
            sabotage_attempts: std::sync::Mutex::default(),
        }
    }

    /// `topic/partition`, for messages.
    pub fn name(&self) -> String {
        format!("{}/{}", self.topic, self.partition)
    }

    /// What this partition needs of its topic's metadata — not the whole `TopicMeta`,
    /// whose partition list a topic of thousands of partitions would copy on every call.
    fn topic_meta(&self) -> Result<TopicView, PartitionError> {
        let state = self.metadata.borrow();
        match state.topics.get(&self.topic) {
            Some(t) if t.partitions.get(self.partition as usize).is_some_and(|p| p.group == self.group.id) => {
                Ok(TopicView { config: t.config.clone(), id_key: t.id_key })
            }
            _ => Err(PartitionError::Deleted),
        }
    }

    /// The term this node leads in, once it has applied an entry of that term (waiting
    /// up to `LEADER_GATE_WAIT` for it).
    async fn ready_term(&self, deadline: Instant) -> Result<u64, PartitionError> {
        let mut applied = self.group.shared.applied();
        let gate = deadline.min(Instant::now() + LEADER_GATE_WAIT);
        self.group.awake(gate).await;
        loop {
            let (state, term, leader) = {
                let m = self.group.raft.metrics();
                let m = m.borrow_watched();
                (m.state, m.current_term, m.current_leader)
            };
            if state != openraft::ServerState::Leader {
                return Err(PartitionError::NotLeader { leader: leader.filter(|l| *l != self.node_id) });
            }
            if applied.borrow_and_update().is_some_and(|l| l.leader_id.term == term) {
                return Ok(term);
            }
            match tokio::time::timeout_at(gate, applied.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(PartitionError::NotLeader { leader: None }),
                Err(_) => return Err(PartitionError::LeaderNotReady),
            }
        }
    }

    /// Walks every record of a produced batch — the check that any consumer can decode
    /// it — and returns the digests of its message ids under the topic's key, `(index,
    /// digest)` per record carrying one. An id repeated within the batch is refused (the
    /// producer client never builds one).
    pub fn check_records(&self, view: &BatchView) -> Result<Vec<(u32, IdDigest)>, PartitionError> {
        let key = self.topic_meta()?.id_key;
        let mut out = Vec::new();
        for id in view.message_ids() {
            let (i, id) = id.map_err(|e| PartitionError::InvalidBatch(e.to_string()))?;
            out.push((i, digest(&key, id)));
        }
        if out.len() > 1 {
            let mut seen = DigestSet::with_capacity_and_hasher(out.len(), Default::default());
            if let Some((i, _)) = out.iter().find(|(_, d)| !seen.insert(*d)) {
                return Err(PartitionError::InvalidBatch(format!(
                    "record {i} repeats the message id of an earlier record in the same batch; send it in its own batch"
                )));
            }
        }
        Ok(out)
    }

    /// Appends a produced batch whose records [`Partition::check_records`] checked,
    /// with the message-id digests it returned.
    pub async fn append(self: &Arc<Self>, view: BatchView, ids: Vec<(u32, IdDigest)>, timeout: Duration) -> Result<Appended, PartitionError> {
        let deadline = Instant::now() + timeout;
        let h = *view.header();
        let stamp = (h.producer_id >= 0).then_some(ProducerStamp { producer_id: h.producer_id, epoch: h.producer_epoch, sequence: h.base_sequence });
        let topic = self.topic_meta()?;
        if let Some(s) = stamp {
            // A named producer's newer instance may not have written here yet: the
            // metadata knows its epoch.
            if let Some(current) = self.metadata.borrow().named_producer_epoch(s.producer_id) {
                if s.epoch < current {
                    return Err(PartitionError::ProducerFenced { epoch: s.epoch, current });
                }
            }
        }
        if let Some(why) = self.disk_space.refusal() {
            return Err(PartitionError::StorageFull(format!("node {}: {why}", self.node_id)));
        }
        if let Some(why) = self.group.stopped() {
            // Reopened by the reconciler once the disk has room (`node/reconcile.rs`).
            let free = self.disk_space.free();
            let msg = format!(
                "node {}: {} stopped after a storage error ({why}); the data directory has {free} bytes free, and the partition reopens by itself once at least {} are",
                self.node_id,
                self.name(),
                super::limits::GROUP_REOPEN_FREE_BYTES_MIN
            );
            return Err(if free < super::limits::GROUP_REOPEN_FREE_BYTES_MIN { PartitionError::StorageFull(msg) } else { PartitionError::Storage(msg) });
        }
        let len = view.as_bytes().len() as u64;
        // Moved into the proposal, so the log store holds the batch's only reference and
        // stamps its offset in place (`log_store::stamp`).
        let mut view = Some(view);
        let mut gap_deadline: Option<Instant> = None;
        // Whether this call confirmed, with a quorum, that this node leads with a
        // current table (`confirm_current`): done once, before any refusal judged on it.
        let mut confirmed = false;
        loop {
            let term = self.ready_term(deadline).await?;
            let mut w = self.writer.lock().await;
            if w.term != term {
                w.reset(term);
            }
            // Registered before the overlay lock is released: no change is missed.
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if (stamp.is_some() || !ids.is_empty()) && self.clock_is_stale() && self.clock_advance_expires() {
                // Ids and producers that expired while the partition was idle must be
                // gone before this batch is judged: advance the clock first. (When the
                // advance expires nothing, the tick `prepare` proposes ahead of the batch
                // changes nothing the batch is judged on, and it need not wait.)
                if w.clock_refresh.is_none() {
                    let entry = self.control_entry(&mut w, ControlCommand::Tick);
                    let (id, _) = self.propose(&mut w, term, EntryData::control(&entry), None, Vec::new(), 0).await?;
                    w.clock_refresh = Some(id);
                }
                drop(w);
                tokio::time::timeout_at(deadline, notified).await.map_err(|_| PartitionError::TimedOut)?;
                continue;
            }
            let decision = match self.decide(&w, stamp, &ids, h.record_count) {
                Err(PartitionError::OutOfOrderSequence { .. } | PartitionError::ProducerFenced { .. }) if !confirmed => {
                    drop(w);
                    self.confirm_current(deadline).await?;
                    confirmed = true;
                    continue;
                }
                other => other?,
            };
            let proposal = match decision {
                Decision::Answer(a) => return Ok(a),
                Decision::Wait => {
                    drop(w);
                    tokio::time::timeout_at(deadline, notified).await.map_err(|_| PartitionError::TimedOut)?;
                    continue;
                }
                Decision::WaitGap(expected) => {
                    let gap_until = *gap_deadline.get_or_insert_with(|| Instant::now() + SEQUENCE_GAP_WAIT);
                    if Instant::now() >= gap_until {
                        if !confirmed {
                            drop(w);
                            self.confirm_current(deadline).await?;
                            confirmed = true;
                            continue;
                        }
                        return Err(PartitionError::OutOfOrderSequence { expected, got: h.base_sequence });
                    }
                    drop(w);
                    let _ = tokio::time::timeout_at(gap_until.min(deadline), notified).await;
                    continue;
                }
                Decision::ProposeSequence(stamp, offsets) => {
                    let entry = self.control_entry(&mut w, ControlCommand::RecordSequence { stamp, offsets: offsets.clone() });
                    let (_, rx) = self.propose(&mut w, term, EntryData::control(&entry), Some(stamp), Vec::new(), 0).await?;
                    drop(w);
                    return match self.outcome(rx, deadline).await? {
                        ApplyReply::Control(ControlOutcome::Applied) => {
                            Ok(Appended { base_offset: offsets[0].1, record_count: h.record_count, duplicate: Duplicate::Records(offsets) })
                        }
                        ApplyReply::Control(ControlOutcome::SequenceRefused(outcome)) => batch_result(outcome, Some(stamp)),
                        other => Err(PartitionError::Storage(format!("a recorded sequence was applied as {other:?}"))),
                    };
                }
                Decision::Propose => {
                    let Some(view) = view.take() else {
                        return Err(PartitionError::Storage(format!("{}: a batch was about to be proposed twice", self.name())));
                    };
                    EntryData::batch(view.into_bytes())
                }
            };
            if w.pending.len() >= PARTITION_PENDING_BATCHES_MAX || w.bytes + len > PARTITION_PENDING_BYTES_MAX {
                return Err(PartitionError::Throttled {
                    retry_after_ms: THROTTLE_RETRY_AFTER_MS,
                    reason: ThrottleReason::Pending,
                    detail: format!("{} has {} appends ({} bytes) waiting to commit", self.name(), w.pending.len(), w.bytes),
                });
            }
            if topic.config.retention_bytes > 0 {
                // The leader stops at the bound plus half a segment (counting what is
                // pending), leaving the other half for its followers, whose purges follow
                // its own by a few milliseconds. Progress is guaranteed: above this line
                // there is always a sealed segment retention can cut.
                let (r, seg) = (topic.config.retention_bytes, topic.config.segment_bytes);
                let held = self.group.log.segment_bytes_total().saturating_add(w.bytes);
                let limit = r.saturating_add(seg / 2).max(seg);
                if held.saturating_add(len) > limit {
                    return Err(PartitionError::Throttled {
                        retry_after_ms: RETENTION_THROTTLE_RETRY_AFTER_MS,
                        reason: ThrottleReason::Retention,
                        detail: format!(
                            "{} holds {held} bytes, at its retention_bytes ({r}) plus half a segment, until retention deletes its oldest segments",
                            self.name()
                        ),
                    });
                }
            }
            self.prepare(&mut w, term, &topic).await?;
            let digests = ids.iter().map(|(_, d)| *d).collect();
            let predicted = *w.predicted_next_offset.get_or_insert_with(|| self.group.log.next_offset());
            let (_, rx) = self.propose(&mut w, term, proposal, stamp, digests, len).await?;
            w.predicted_next_offset = Some(predicted + u64::from(h.record_count));
            drop(w);
            if crate::sabotage::active(crate::sabotage::Sabotage::AckBeforeCommit) {
                // Sabotage: answered before a quorum has the batch.
                return Ok(Appended { base_offset: predicted, record_count: h.record_count, duplicate: Duplicate::None });
            }
            return match self.outcome(rx, deadline).await? {
                ApplyReply::Batch(outcome) => batch_result(outcome, stamp),
                other => Err(PartitionError::Storage(format!("a batch was applied as {other:?}"))),
            };
        }
    }

    /// Confirms that this node still leads and that its applied state holds everything
    /// committed (a ReadIndex round: a quorum acknowledges this leader in its term, and
    /// the state machine applies up to the commit index of that moment). Asked before
    /// a refusal judged on the producer table is answered: a leader replaced without
    /// knowing it (paused, cut off) still passes `ready_term`, and its table misses
    /// whatever its successors stored — an "out of order" from it would make the
    /// producer give up the sequence and store the batch again under a new epoch.
    async fn confirm_current(&self, deadline: Instant) -> Result<(), PartitionError> {
        let until = deadline.min(Instant::now() + LEADER_GATE_WAIT);
        // A sporadically used group may have quiesced during a sequence-gap wait (it
        // parks 10 ms after a use): woken first, so the round below is heard.
        self.group.awake(until).await;
        let result = match tokio::time::timeout_at(until, self.group.raft.ensure_linearizable(ReadPolicy::ReadIndex)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                Err(PartitionError::NotLeader { leader: f.leader_id.filter(|l| *l != self.node_id) })
            }
            Ok(Err(_)) | Err(_) => Err(PartitionError::LeaderNotReady),
        };
        crate::metrics::produce_refusal_check(if result.is_ok() { "confirmed" } else { "not_leading" });
        if let Err(e) = &result {
            tracing::info!(partition = %self.name(), error = %e, "a refusal judged on the producer table was not confirmed: this node no longer leads with a current table");
        }
        result
    }

    fn decide(&self, w: &Writer, stamp: Option<ProducerStamp>, ids: &[(u32, IdDigest)], record_count: u32) -> Result<Decision, PartitionError> {
        let st = self.group.shared.state();
        let stamp = stamp.filter(|_| !crate::sabotage::active(crate::sabotage::Sabotage::SkipDedupe));
        if let Some(s) = stamp {
            let pending = w.by_producer.get(&s.producer_id);
            if pending.is_some_and(|q| q.iter().any(|(e, q, _)| *e == s.epoch && *q == s.sequence)) {
                return Ok(Decision::Wait);
            }
            let tail = pending.and_then(|q| q.back()).map(|(e, q, _)| (*e, *q));
            match producers::decide(st.producers.get(s.producer_id), tail, s) {
                Verdict::Append => {}
                Verdict::Duplicate(StoredAt::Batch { base_offset, record_count }) => {
                    return Ok(Decision::Answer(Appended { base_offset, record_count, duplicate: Duplicate::Batch }));
                }
                Verdict::Duplicate(StoredAt::Records(offsets)) => {
                    let base_offset = offsets.first().map_or(0, |(_, o)| *o);
                    return Ok(Decision::Answer(Appended { base_offset, record_count, duplicate: Duplicate::Records(offsets) }));
                }
                Verdict::Gap { expected } => return Ok(Decision::WaitGap(expected)),
                Verdict::OutOfOrder { expected } => return Err(PartitionError::OutOfOrderSequence { expected, got: s.sequence }),
                Verdict::Fenced { current_epoch } => return Err(PartitionError::ProducerFenced { epoch: s.epoch, current: current_epoch }),
            }
            if pending.is_none() && st.producers.get(s.producer_id).is_none() && st.producers.len() >= PARTITION_PRODUCERS_MAX {
                return Err(PartitionError::Throttled {
                    retry_after_ms: PRODUCERS_FULL_RETRY_AFTER_MS,
                    reason: ThrottleReason::Producers,
                    detail: format!(
                        "{} already remembers {PARTITION_PRODUCERS_MAX} idempotent producers; a new one waits until idle ones expire (topic setting producer_expiry_ms)",
                        self.name()
                    ),
                });
            }
            if pending.is_some_and(|q| q.len() >= BATCHES_REMEMBERED) {
                return Err(PartitionError::Throttled {
                    retry_after_ms: THROTTLE_RETRY_AFTER_MS,
                    reason: ThrottleReason::ProducerWindow,
                    detail: format!("producer {} already has {BATCHES_REMEMBERED} batches pending on {}", s.producer_id, self.name()),
                });
            }
        }
        if ids.is_empty() {
            return Ok(Decision::Propose);
        }
        if ids.iter().any(|(_, d)| w.ids.contains_key(d)) {
            return Ok(Decision::Wait);
        }
        let duplicates: Vec<(u32, u64)> = ids.iter().filter_map(|(i, d)| st.message_ids.lookup(*d).map(|o| (*i, o))).collect();
        if !duplicates.is_empty() {
            if duplicates.len() < record_count as usize {
                return Err(PartitionError::DuplicateMessageIds(duplicates));
            }
            let base_offset = duplicates[0].1;
            return Ok(match stamp {
                Some(s) => Decision::ProposeSequence(s, duplicates),
                None => Decision::Answer(Appended { base_offset, record_count, duplicate: Duplicate::Records(duplicates) }),
            });
        }
        let budget = st.config.dedupe_ids_max;
        let held = st.message_ids.len() as u64 + w.ids.len() as u64;
        if held + ids.len() as u64 > budget {
            let now = now_ms();
            let last = self.budget_warned_at_ms.load(std::sync::atomic::Ordering::Relaxed);
            if now.saturating_sub(last) >= BUDGET_WARNING_EVERY_MS
                && self.budget_warned_at_ms.compare_exchange(last, now, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed).is_ok()
            {
                tracing::warn!(
                    partition = %self.name(),
                    held,
                    budget,
                    window_ms = st.config.dedupe_window_ms,
                    "the message-id window is full: publishes carrying message ids are throttled until old ids expire (raise dedupe_ids_max or shorten dedupe_window_ms)"
                );
            }
            let wait_ms = st.message_ids.oldest_expires_at(st.config.dedupe_window_ms).map_or(1_000, |t| t.saturating_sub(st.clock_ms)).clamp(100, 5_000);
            return Err(PartitionError::Throttled {
                retry_after_ms: wait_ms as u32,
                reason: ThrottleReason::MessageIds,
                detail: format!(
                    "{} holds {held} message ids, its dedupe_ids_max is {budget}; publishes with ids wait for old ids to leave the window",
                    self.name()
                ),
            });
        }
        Ok(Decision::Propose)
    }

    /// Whether the applied partition clock lags this leader's clock by more than
    /// `CLOCK_STALE_MS` (no control entry applied lately: the partition was idle).
    fn clock_is_stale(&self) -> bool {
        now_ms().saturating_sub(self.group.shared.state().clock_ms) > CLOCK_STALE_MS
    }

    /// Whether moving the partition clock to now — and on for as long as a clock may
    /// lag before it counts as stale — would expire an id or a producer.
    fn clock_advance_expires(&self) -> bool {
        self.group.shared.state().clock_advance_expires(now_ms().saturating_add(CLOCK_STALE_MS))
    }

    /// A control entry stamped with this leader's time, never below the partition clock
    /// or this term's earlier control entries.
    fn control_entry(&self, w: &mut Writer, command: ControlCommand) -> ControlEntry {
        let clock = self.group.shared.state().clock_ms;
        let leader_time_ms = now_ms().max(clock).max(w.last_time_ms);
        w.last_time_ms = leader_time_ms;
        w.last_tick = Some(Instant::now());
        ControlEntry { leader_time_ms, command }
    }

    /// The partition's first offset: retention's applied cut, or where this replica's
    /// log starts if that is later.
    pub fn log_start_offset(&self) -> u64 {
        let retained = self.group.shared.state().retained.start_offset;
        self.group.log.state().start_offset.max(retained)
    }

    /// The topic's settings, if the topic still holds this partition.
    pub fn topic_config(&self) -> Option<keel_protocol::TopicConfig> {
        self.topic_meta().ok().map(|t| t.config)
    }

    /// Proposes a retention cut if the topic's retention lets whole segments go, or a
    /// clock tick if a segment's age is not known yet (see `node/retention.rs`).
    pub async fn propose_retention(&self, config: &keel_protocol::TopicConfig) -> Result<(), PartitionError> {
        let judge = || {
            let st = self.group.shared.state();
            let extents = self.group.log.segment_extents();
            super::retention::cut(&extents, st.retained, &st.time_marks, config.retention_ms, config.retention_bytes, now_ms())
        };
        // Judged first without waking the group: a quiesced partition with nothing to
        // cut stays quiesced.
        match judge() {
            super::retention::Judgement::Keep => return Ok(()),
            super::retention::Judgement::NeedsTime if !self.clock_is_stale() => return Ok(()),
            _ => {}
        }
        let term = self.ready_term(Instant::now() + LEADER_GATE_WAIT).await?;
        let judgement = judge();
        let command = match judgement {
            super::retention::Judgement::Keep => return Ok(()),
            super::retention::Judgement::NeedsTime if !self.clock_is_stale() => return Ok(()),
            super::retention::Judgement::NeedsTime => ControlCommand::Tick,
            super::retention::Judgement::Cut(r) => {
                tracing::info!(partition = %self.name(), upto_index = r.upto_index, start_offset = r.start_offset, "retention: the partition now starts at offset {}", r.start_offset);
                ControlCommand::Retain { upto_index: r.upto_index, start_offset: r.start_offset }
            }
        };
        let mut w = self.writer.lock().await;
        let entry = self.control_entry(&mut w, command);
        let (responder, rx) = ProgressResponder::complete_only();
        self.group.raft.write(EntryData::control(&entry)).with_leader(term).responder(responder).await.map_err(|e| PartitionError::Storage(e.to_string()))?;
        drop(w);
        let Ok(Ok(Ok(reply))) = tokio::time::timeout(LEADER_GATE_WAIT, rx).await else { return Ok(()) };
        if let ApplyReply::Control(ControlOutcome::Retained(lost)) = reply.data {
            for (group, messages) in lost {
                tracing::warn!(partition = %self.name(), consumer_group = %group, messages, "retention deleted messages this queue group had not settled; the group goes on from the new start");
                crate::metrics::queue_expired(&self.topic, &group, messages);
            }
        }
        Ok(())
    }

    /// Proposes what the next batch depends on: the topic's settings if the partition's
    /// differ, and otherwise a clock tick if the last is older than `CLOCK_TICK_INTERVAL`.
    async fn prepare(&self, w: &mut Writer, term: u64, topic: &TopicView) -> Result<(), PartitionError> {
        let desired = PartitionConfig::from_topic(&topic.config, topic.id_key);
        let applied_matches = {
            let st = self.group.shared.state();
            st.configured && st.config == desired
        };
        let command = if !applied_matches && w.configured.as_ref() != Some(&desired) {
            w.configured = Some(desired.clone());
            ControlCommand::Configure(desired)
        } else if w.last_tick.is_none_or(|t| t.elapsed() >= CLOCK_TICK_INTERVAL) {
            ControlCommand::Tick
        } else {
            return Ok(());
        };
        let entry = self.control_entry(w, command);
        self.group.raft.write(EntryData::control(&entry)).with_leader(term).await.map_err(|e| PartitionError::Storage(e.to_string()))
    }

    /// Proposes `data` in `term` (refused if the term has moved on) and adds it to the
    /// overlay; returns its overlay id and a channel that yields its outcome. A task
    /// completes the overlay entry even if the caller gives up waiting.
    async fn propose(
        self: &Arc<Self>,
        w: &mut Writer,
        term: u64,
        data: EntryData,
        stamp: Option<ProducerStamp>,
        ids: Vec<IdDigest>,
        len: u64,
    ) -> Result<(u64, oneshot::Receiver<Result<ApplyReply, PartitionError>>), PartitionError> {
        let (responder, rx) = ProgressResponder::complete_only();
        self.group.raft.write(data).with_leader(term).responder(responder).await.map_err(|e| PartitionError::Storage(e.to_string()))?;
        let id = w.next_id;
        w.next_id += 1;
        if let Some(s) = stamp {
            w.by_producer.entry(s.producer_id).or_default().push_back((s.epoch, s.sequence, id));
        }
        for d in &ids {
            w.ids.insert(*d, id);
        }
        w.bytes += len;
        w.pending.insert(id, Pending { bytes: len, stamp, ids });
        self.progress.notify_waiters();
        let (tx, out) = oneshot::channel();
        let me = self.clone();
        tokio::spawn(async move {
            let result = match rx.await {
                Ok(Ok(resp)) => Ok(resp.data),
                // Refused before the append or lost with the leadership: either way the
                // entry may be in the next leader's log. Only a retry can tell.
                Ok(Err(ClientWriteError::ForwardToLeader(f))) => Err(PartitionError::OutcomeUnknown { leader: f.leader_id }),
                Ok(Err(e)) => Err(PartitionError::Storage(e.to_string())),
                Err(_) => Err(PartitionError::OutcomeUnknown { leader: None }),
            };
            me.writer.lock().await.complete(id);
            me.progress.notify_waiters();
            let _ = tx.send(result);
        });
        Ok((id, out))
    }

    async fn outcome(&self, rx: oneshot::Receiver<Result<ApplyReply, PartitionError>>, deadline: Instant) -> Result<ApplyReply, PartitionError> {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PartitionError::OutcomeUnknown { leader: None }),
            Err(_) => Err(PartitionError::TimedOut),
        }
    }

    /// Whether this node leads the partition with a quorum heard within the lease.
    fn check_serving_leader(&self) -> Result<(), PartitionError> {
        let leader = self.group.leader();
        if leader != Some(self.node_id) {
            return Err(PartitionError::NotLeader { leader });
        }
        // A leader cut off from its quorum keeps calling itself leader until it hears
        // of a newer term, and would serve a stale end of the log.
        if self.group.working_leader() != Some(self.node_id) {
            return Err(PartitionError::LeaderNotReady);
        }
        Ok(())
    }

    /// Committed batches from the one holding `offset`, up to about `max_bytes`
    /// (at least one batch), waiting up to `max_wait` for one if none is there yet.
    pub async fn read(&self, offset: u64, max_bytes: u64, max_wait: Duration) -> Result<Read, PartitionError> {
        if crate::sabotage::active(crate::sabotage::Sabotage::ReadBeyondHighWatermark) {
            return self.read_uncommitted(offset, max_bytes).await;
        }
        // A new leader serves only once it has applied an entry of its own term: before,
        // its high watermark can be below what the previous leader already served.
        self.ready_term(Instant::now() + LEADER_GATE_WAIT).await?;
        self.check_serving_leader()?;
        let mut hw = self.group.high_watermark.clone();
        let deadline = Instant::now() + max_wait;
        let committed = loop {
            let committed = *hw.borrow_and_update();
            if offset < committed {
                break committed;
            }
            if offset > committed {
                return Err(PartitionError::OffsetOutOfRange { offset, start: self.log_start_offset(), end: committed });
            }
            tokio::select! {
                changed = hw.changed() => if changed.is_err() { return Err(PartitionError::NotLeader { leader: None }) },
                _ = tokio::time::sleep_until(deadline) => break committed,
            }
        };
        let start = self.log_start_offset();
        if offset < start {
            return Err(PartitionError::OffsetOutOfRange { offset, start, end: committed });
        }
        let entries = self.entries_from(offset, max_bytes).await?;
        let batches = {
            let st = self.group.shared.state();
            entries
                .into_iter()
                .filter(|e| e.meta.kind == KIND_BATCH && e.meta.end_offset() <= committed && st.is_served(e.meta.base_offset))
                .map(|e| e.payload)
                .collect()
        };
        Ok(Read { high_watermark: committed, log_start_offset: start, batches })
    }

    /// The log's entries from the one holding `offset`, up to about `max_bytes`
    /// (committed or not: callers filter), read off the async workers.
    async fn entries_from(&self, offset: u64, max_bytes: u64) -> Result<Vec<keel_storage::Entry>, PartitionError> {
        let log = self.group.log.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<keel_storage::Entry>, keel_storage::StorageError> {
            let Some(index) = log.index_for_offset(offset)? else { return Ok(Vec::new()) };
            log.read(index..u64::MAX, max_bytes)
        })
        .await
        .map_err(|e| PartitionError::Storage(format!("read task failed: {e}")))?
        .map_err(|e| PartitionError::Storage(e.to_string()))
    }

    /// Sabotage `read-beyond-hw`: whatever this node's log holds, committed or not, and
    /// whether or not it still leads.
    async fn read_uncommitted(&self, offset: u64, max_bytes: u64) -> Result<Read, PartitionError> {
        if self.group.leader() != Some(self.node_id) {
            return Err(PartitionError::NotLeader { leader: self.group.leader() });
        }
        let end = self.group.log.next_offset();
        let entries = self.entries_from(offset, max_bytes).await?;
        let batches = entries.into_iter().filter(|e| e.meta.kind == KIND_BATCH).map(|e| e.payload).collect();
        Ok(Read { high_watermark: end, log_start_offset: self.log_start_offset(), batches })
    }

    /// The first offset whose batch's newest message is at or after `timestamp_ms`, or
    /// the high watermark if there is none.
    pub async fn offset_for_time(&self, timestamp_ms: i64) -> Result<u64, PartitionError> {
        // Answered by the working leader only, like a read: a follower (or a node being
        // refilled after a wipe) would answer from a high watermark behind the log's.
        self.ready_term(Instant::now() + LEADER_GATE_WAIT).await?;
        self.check_serving_leader()?;
        let committed = *self.group.high_watermark.borrow();
        let start = self.log_start_offset().min(committed);
        if timestamp_ms == i64::MIN {
            return Ok(start);
        }
        let log = self.group.log.clone();
        let found = tokio::task::spawn_blocking(move || -> Result<Option<u64>, keel_storage::StorageError> {
            let Some(index) = log.index_for_timestamp(timestamp_ms)? else { return Ok(None) };
            Ok(log.read(index..index + 1, 0)?.first().map(|e| e.meta.base_offset))
        })
        .await
        .map_err(|e| PartitionError::Storage(format!("offset lookup failed: {e}")))?
        .map_err(|e| PartitionError::Storage(e.to_string()))?;
        Ok(found.filter(|o| *o < committed).unwrap_or(committed).max(start))
    }
}

fn batch_result(outcome: BatchOutcome, stamp: Option<ProducerStamp>) -> Result<Appended, PartitionError> {
    let (epoch, sequence) = stamp.map_or((-1, -1), |s| (s.epoch, s.sequence));
    match outcome {
        BatchOutcome::Stored { base_offset, record_count } => Ok(Appended { base_offset, record_count, duplicate: Duplicate::None }),
        BatchOutcome::Duplicate(StoredAt::Batch { base_offset, record_count }) => Ok(Appended { base_offset, record_count, duplicate: Duplicate::Batch }),
        BatchOutcome::Duplicate(StoredAt::Records(offsets)) => {
            Ok(Appended { base_offset: offsets.first().map_or(0, |(_, o)| *o), record_count: offsets.len() as u32, duplicate: Duplicate::Records(offsets) })
        }
        BatchOutcome::OutOfOrder { expected } => Err(PartitionError::OutOfOrderSequence { expected, got: sequence }),
        BatchOutcome::Fenced { current_epoch } => Err(PartitionError::ProducerFenced { epoch, current: current_epoch }),
        BatchOutcome::DuplicateIds(offsets) => Err(PartitionError::DuplicateMessageIds(offsets)),
    }
}
