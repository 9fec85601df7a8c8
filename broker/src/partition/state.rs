//! The partition fold: committed log entries, in log order, into a [`PartitionState`].
//!
//! Pure and deterministic: it reads no clock (time comes from control entries), does no
//! I/O and knows nothing of openraft or tokio, so every replica that applies the same
//! entries reaches the same state, and a restart rebuilds it from a snapshot plus the
//! log. Payloads stay in the log; the state holds only what decides how later entries
//! apply and what is served.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::command::{ControlCommand, ControlEntry, PartitionConfig};
use super::consumers::{CommitResult, ConsumerGroups, ConsumerParts, Lease, SettleResult};
use super::message_ids::{IdDigest, MessageIdWindow, WindowParts};
use super::producers::{decide, ProducerStamp, ProducerTable, StoredAt, Verdict};

/// How often, on the partition clock, idle producers are looked for.
pub const PRODUCER_EXPIRY_SCAN_MS: i64 = 60_000;

/// What the fold needs of a record batch (the adapter reads it from the batch bytes).
#[derive(Debug, Clone, Copy)]
pub struct BatchInfo<'a> {
    /// The batch's first offset, assigned when it was appended to the log.
    pub base_offset: u64,
    pub record_count: u32,
    /// Producer fields, for a batch sent with idempotence.
    pub producer: Option<ProducerStamp>,
    /// `(index in the batch, digest)` of each record carrying a message id.
    pub message_ids: &'a [(u32, IdDigest)],
}

/// How a batch in the log was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchOutcome {
    /// Stored and served from `base_offset`.
    Stored { base_offset: u64, record_count: u32 },
    /// A retry of a batch already stored: not served again; the original offsets.
    Duplicate(StoredAt),
    /// Refused for its sequence (a gap, or older than remembered): not served.
    OutOfOrder { expected: i32 },
    /// Refused: a newer epoch of its producer exists. Not served.
    Fenced { current_epoch: i16 },
    /// Refused: some records' message ids were already stored (`(index, offset)`).
    /// Not served; the producer resends the rest.
    DuplicateIds(Vec<(u32, u64)>),
}

/// How a control entry was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlOutcome {
    Applied,
    /// A `RecordSequence` that did not fit its producer's sequence (the verdict).
    SequenceRefused(BatchOutcome),
    /// A `CommitOffset`.
    Committed(CommitResult),
    /// A `QueueLease`: `(offset, attempt)` of every message leased.
    Leased(Vec<(u64, u32)>),
    /// A `QueueSettle`: one result per request, in order.
    Settled(Vec<SettleResult>),
    /// A `QueueDeadLettered`: how many messages it settled.
    DeadLettered(u32),
}

/// A partition's state: everything applying later entries and serving reads depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionState {
    /// One past the last offset applied: the high watermark.
    pub next_offset: u64,
    /// The partition clock: the largest leader time of the control entries applied.
    pub clock_ms: i64,
    /// Settings from the last `Configure` entry (defaults before the first).
    pub config: PartitionConfig,
    /// Whether a `Configure` entry has been applied.
    pub configured: bool,
    pub producers: ProducerTable,
    pub message_ids: MessageIdWindow,
    /// Batches in the log that are never served (duplicates and refusals that reached
    /// the log anyway): base offset → record count. Normally empty: the leader refuses
    /// such batches before proposing them.
    pub skipped: BTreeMap<u64, u32>,
    /// Partition-clock time of the next scan for idle producers.
    pub next_expiry_scan_ms: i64,
    /// Consumer groups: stream offsets, queue leases and attempts.
    pub consumers: ConsumerGroups,
}

impl PartitionState {
    /// Applies an entry that holds no records and changes nothing (blank, membership).
    pub fn apply_empty(&mut self) {}

    /// Applies a record batch appended at `batch.base_offset`.
    pub fn apply_batch(&mut self, batch: &BatchInfo<'_>) -> BatchOutcome {
        assert_eq!(batch.base_offset, self.next_offset, "offsets are contiguous across applied entries");
        assert!(batch.record_count > 0, "a batch holds at least one record");
        self.next_offset = batch.base_offset + u64::from(batch.record_count);
        let refused = match batch.producer.map(|s| decide(self.producers.get(s.producer_id), None, s)) {
            None | Some(Verdict::Append) => None,
            Some(Verdict::Duplicate(stored)) => Some(BatchOutcome::Duplicate(stored)),
            Some(Verdict::Gap { expected } | Verdict::OutOfOrder { expected }) => Some(BatchOutcome::OutOfOrder { expected }),
            Some(Verdict::Fenced { current_epoch }) => Some(BatchOutcome::Fenced { current_epoch }),
        };
        if let Some(outcome) = refused {
            self.skipped.insert(batch.base_offset, batch.record_count);
            return outcome;
        }
        let duplicates = self.duplicate_ids(batch.base_offset, batch.message_ids);
        if !duplicates.is_empty() {
            self.skipped.insert(batch.base_offset, batch.record_count);
            return BatchOutcome::DuplicateIds(duplicates);
        }
        for (index, digest) in batch.message_ids {
            self.message_ids.insert(*digest, batch.base_offset + u64::from(*index), self.clock_ms);
        }
        if let Some(stamp) = batch.producer {
            let stored = StoredAt::Batch { base_offset: batch.base_offset, record_count: batch.record_count };
            self.producers.record(stamp, stored, self.clock_ms);
        }
        BatchOutcome::Stored { base_offset: batch.base_offset, record_count: batch.record_count }
    }

    /// `(index, offset)` of the records whose id is already stored — in the window, or
    /// earlier in the same batch (`offset` then points at that earlier record).
    fn duplicate_ids(&self, base_offset: u64, ids: &[(u32, IdDigest)]) -> Vec<(u32, u64)> {
        let mut duplicates: Vec<(u32, u64)> = ids.iter().filter_map(|(i, d)| self.message_ids.lookup(*d).map(|o| (*i, o))).collect();
        if ids.len() > 1 {
            let mut seen = HashSet::with_capacity(ids.len());
            for (i, d) in ids {
                if !seen.insert(*d) && !duplicates.iter().any(|(j, _)| j == i) {
                    let first = ids.iter().find(|(_, e)| e == d).map(|(j, _)| *j).expect("seen before");
                    duplicates.push((*i, base_offset + u64::from(first)));
                }
            }
        }
        duplicates
    }

    /// Applies a control entry.
    pub fn apply_control(&mut self, entry: &ControlEntry) -> ControlOutcome {
        self.advance_clock(entry.leader_time_ms);
        match &entry.command {
            ControlCommand::Tick => ControlOutcome::Applied,
            ControlCommand::Configure(config) => {
                self.config = config.clone();
                self.configured = true;
                ControlOutcome::Applied
            }
            ControlCommand::RecordSequence { stamp, offsets } => match decide(self.producers.get(stamp.producer_id), None, *stamp) {
                Verdict::Append => {
                    self.producers.record(*stamp, StoredAt::Records(offsets.clone()), self.clock_ms);
                    ControlOutcome::Applied
                }
                Verdict::Duplicate(stored) => ControlOutcome::SequenceRefused(BatchOutcome::Duplicate(stored)),
                Verdict::Gap { expected } | Verdict::OutOfOrder { expected } => ControlOutcome::SequenceRefused(BatchOutcome::OutOfOrder { expected }),
                Verdict::Fenced { current_epoch } => ControlOutcome::SequenceRefused(BatchOutcome::Fenced { current_epoch }),
            },
            ControlCommand::CommitOffset { group, generation, offset } => {
                ControlOutcome::Committed(self.consumers.commit(self.clock_ms, self.next_offset, group, *generation, *offset))
            }
            ControlCommand::QueueLease { group, member, deadline_ms, new_from, new_until, redeliver } => {
                let skipped = &self.skipped;
                let served = |offset: u64| offset_served(skipped, offset);
                let lease = Lease { member, deadline_ms: *deadline_ms, new_from: *new_from, new_until: *new_until, redeliver };
                let leased = self.consumers.lease(self.clock_ms, self.next_offset, &served, group, &lease);
                ControlOutcome::Leased(leased)
            }
            ControlCommand::QueueSettle { group, member, settles } => ControlOutcome::Settled(self.consumers.settle(self.clock_ms, group, member, settles)),
            ControlCommand::QueueDeadLettered { group, offsets } => ControlOutcome::DeadLettered(self.consumers.dead_lettered(group, offsets)),
        }
    }

    /// Moves the partition clock to `leader_time_ms` (never back) and expires what it
    /// passed: message ids beyond the window, and, at most every
    /// `PRODUCER_EXPIRY_SCAN_MS`, idle producers.
    fn advance_clock(&mut self, leader_time_ms: i64) {
        self.clock_ms = self.clock_ms.max(leader_time_ms);
        self.message_ids.expire(self.clock_ms, self.config.dedupe_window_ms);
        if self.clock_ms >= self.next_expiry_scan_ms {
            self.producers.expire(self.clock_ms, self.config.producer_expiry_ms);
            self.next_expiry_scan_ms = self.clock_ms.saturating_add(PRODUCER_EXPIRY_SCAN_MS);
        }
    }

    /// Whether the batch at `base_offset` is served to consumers.
    pub fn is_served(&self, base_offset: u64) -> bool {
        self.skipped.is_empty() || !self.skipped.contains_key(&base_offset)
    }
}

/// Whether the record at `offset` is served: it is not in a batch the fold refused.
fn offset_served(skipped: &BTreeMap<u64, u32>, offset: u64) -> bool {
    skipped.range(..=offset).next_back().is_none_or(|(base, count)| base + u64::from(*count) <= offset)
}

/// Version of the snapshot encoding written by [`PartitionState::encode_snapshot`].
pub const SNAPSHOT_VERSION: u16 = 2;

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("partition snapshot is {0} bytes, too short for its version")]
    Truncated(usize),
    #[error("partition snapshot version {0} is newer than this build reads (up to {SNAPSHOT_VERSION}); upgrade the broker")]
    UnknownVersion(u16),
    #[error("partition snapshot does not decode: {0}")]
    Undecodable(String),
}

#[derive(Serialize, Deserialize)]
struct SnapshotV1 {
    next_offset: u64,
    clock_ms: i64,
    config: PartitionConfig,
    configured: bool,
    producers: ProducerTable,
    message_ids: WindowParts,
    skipped: Vec<(u64, u32)>,
    next_expiry_scan_ms: i64,
}

/// Version 2: version 1 and the consumer groups.
#[derive(Serialize, Deserialize)]
struct SnapshotV2 {
    v1: SnapshotV1,
    consumers: ConsumerParts,
}

impl PartitionState {
    /// The state as snapshot bytes: `version:u16le | postcard(body of that version)`.
    /// A later version adds a new body type; old snapshots keep decoding.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        let v1 = SnapshotV1 {
            next_offset: self.next_offset,
            clock_ms: self.clock_ms,
            config: self.config.clone(),
            configured: self.configured,
            producers: self.producers.clone(),
            message_ids: self.message_ids.to_parts(),
            skipped: self.skipped.iter().map(|(o, c)| (*o, *c)).collect(),
            next_expiry_scan_ms: self.next_expiry_scan_ms,
        };
        let body = SnapshotV2 { v1, consumers: self.consumers.to_parts() };
        let mut out = SNAPSHOT_VERSION.to_le_bytes().to_vec();
        postcard::to_io(&body, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    pub fn decode_snapshot(bytes: &[u8]) -> Result<PartitionState, SnapshotError> {
        let Some((version, body)) = bytes.split_first_chunk::<2>() else { return Err(SnapshotError::Truncated(bytes.len())) };
        let undecodable = |e: postcard::Error| SnapshotError::Undecodable(e.to_string());
        let (s, consumers) = match u16::from_le_bytes(*version) {
            1 => (postcard::from_bytes::<SnapshotV1>(body).map_err(undecodable)?, ConsumerParts::default()),
            2 => {
                let v2: SnapshotV2 = postcard::from_bytes(body).map_err(undecodable)?;
                (v2.v1, v2.consumers)
            }
            other => return Err(SnapshotError::UnknownVersion(other)),
        };
        let message_ids = MessageIdWindow::from_parts(s.message_ids).ok_or_else(|| SnapshotError::Undecodable("message-id window parts disagree".into()))?;
        Ok(PartitionState {
            next_offset: s.next_offset,
            clock_ms: s.clock_ms,
            config: s.config,
            configured: s.configured,
            producers: s.producers,
            message_ids,
            skipped: s.skipped.into_iter().collect(),
            next_expiry_scan_ms: s.next_expiry_scan_ms,
            consumers: ConsumerGroups::from_parts(consumers),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::consumers::Settle;

    fn stamp(sequence: i32) -> Option<ProducerStamp> {
        Some(ProducerStamp { producer_id: 1, epoch: 0, sequence })
    }

    fn tick(state: &mut PartitionState, at: i64) {
        state.apply_control(&ControlEntry { leader_time_ms: at, command: ControlCommand::Tick });
    }

    fn batch(state: &PartitionState, count: u32, producer: Option<ProducerStamp>, ids: &[(u32, IdDigest)]) -> BatchOutcome {
        let mut s = state.clone();
        s.apply_batch(&BatchInfo { base_offset: state.next_offset, record_count: count, producer, message_ids: ids })
    }

    fn apply(state: &mut PartitionState, count: u32, producer: Option<ProducerStamp>, ids: &[(u32, IdDigest)]) -> BatchOutcome {
        state.apply_batch(&BatchInfo { base_offset: state.next_offset, record_count: count, producer, message_ids: ids })
    }

    #[test]
    fn a_retried_batch_that_reaches_the_log_is_skipped_and_answered_with_its_original_offsets() {
        let mut s = PartitionState::default();
        assert_eq!(apply(&mut s, 3, stamp(0), &[]), BatchOutcome::Stored { base_offset: 0, record_count: 3 });
        assert_eq!(apply(&mut s, 3, stamp(0), &[]), BatchOutcome::Duplicate(StoredAt::Batch { base_offset: 0, record_count: 3 }));
        assert_eq!(s.next_offset, 6, "the duplicate's offsets are used up in the log");
        assert!(!s.is_served(3), "but it is never served");
        assert!(s.is_served(0));
        assert_eq!(apply(&mut s, 1, stamp(1), &[]), BatchOutcome::Stored { base_offset: 6, record_count: 1 });
    }

    #[test]
    fn a_gap_or_an_old_epoch_in_the_log_is_refused_and_not_served() {
        let mut s = PartitionState::default();
        apply(&mut s, 1, stamp(0), &[]);
        assert_eq!(apply(&mut s, 1, stamp(2), &[]), BatchOutcome::OutOfOrder { expected: 1 });
        apply(&mut s, 1, Some(ProducerStamp { producer_id: 1, epoch: 1, sequence: 0 }), &[]);
        assert_eq!(apply(&mut s, 1, stamp(1), &[]), BatchOutcome::Fenced { current_epoch: 1 });
        assert_eq!(s.skipped.len(), 2);
    }

    #[test]
    fn a_message_id_is_stored_once_within_the_window_and_again_after_it() {
        let mut s = PartitionState::default();
        s.config.dedupe_window_ms = 1_000;
        tick(&mut s, 10_000);
        assert!(matches!(apply(&mut s, 2, None, &[(0, 1), (1, 2)]), BatchOutcome::Stored { .. }));
        assert_eq!(batch(&s, 1, None, &[(0, 2)]), BatchOutcome::DuplicateIds(vec![(0, 1)]));
        assert_eq!(batch(&s, 2, None, &[(0, 9), (1, 1)]), BatchOutcome::DuplicateIds(vec![(1, 0)]), "one old id refuses the whole batch");
        tick(&mut s, 10_999);
        assert!(matches!(batch(&s, 1, None, &[(0, 2)]), BatchOutcome::DuplicateIds(_)));
        tick(&mut s, 11_000);
        assert_eq!(apply(&mut s, 1, None, &[(0, 2)]), BatchOutcome::Stored { base_offset: 2, record_count: 1 }, "after the window: stored again");
    }

    #[test]
    fn an_id_repeated_inside_one_batch_is_refused_too() {
        let s = PartitionState::default();
        assert_eq!(batch(&s, 3, None, &[(0, 5), (2, 5)]), BatchOutcome::DuplicateIds(vec![(2, 0)]));
    }

    #[test]
    fn a_batch_refused_for_its_ids_does_not_use_up_its_sequence() {
        let mut s = PartitionState::default();
        apply(&mut s, 1, stamp(0), &[(0, 42)]);
        assert!(matches!(apply(&mut s, 2, stamp(1), &[(0, 42), (1, 43)]), BatchOutcome::DuplicateIds(_)));
        assert_eq!(
            apply(&mut s, 1, stamp(1), &[(0, 43)]),
            BatchOutcome::Stored { base_offset: 3, record_count: 1 },
            "the resend without the duplicate keeps sequence 1"
        );
    }

    #[test]
    fn a_recorded_sequence_answers_a_retry_of_an_all_duplicate_batch() {
        let mut s = PartitionState::default();
        let entry = ControlEntry { leader_time_ms: 5, command: ControlCommand::RecordSequence { stamp: stamp(0).unwrap(), offsets: vec![(0, 17)] } };
        assert_eq!(s.apply_control(&entry), ControlOutcome::Applied);
        assert_eq!(apply(&mut s, 1, stamp(0), &[]), BatchOutcome::Duplicate(StoredAt::Records(vec![(0, 17)])));
        assert!(matches!(s.apply_control(&entry), ControlOutcome::SequenceRefused(BatchOutcome::Duplicate(_))));
        assert!(matches!(apply(&mut s, 1, stamp(1), &[]), BatchOutcome::Stored { .. }));
    }

    #[test]
    fn idle_producers_expire_by_the_partition_clock() {
        let mut s = PartitionState::default();
        s.config.producer_expiry_ms = 60_000;
        tick(&mut s, 1_000);
        apply(&mut s, 1, stamp(0), &[]);
        tick(&mut s, 60_000);
        assert!(s.producers.get(1).is_some(), "59 s idle");
        tick(&mut s, 200_000);
        assert!(s.producers.get(1).is_none(), "expired");
        assert_eq!(batch(&s, 1, stamp(1), &[]), BatchOutcome::OutOfOrder { expected: 0 }, "it must start a new epoch at 0");
    }

    #[test]
    fn the_clock_never_goes_back() {
        let mut s = PartitionState::default();
        tick(&mut s, 5_000);
        tick(&mut s, 4_000);
        assert_eq!(s.clock_ms, 5_000);
    }

    #[test]
    fn a_version_1_snapshot_loads_with_no_consumer_groups() {
        let mut s = PartitionState::default();
        apply(&mut s, 3, stamp(0), &[]);
        let v1 = SnapshotV1 {
            next_offset: s.next_offset,
            clock_ms: s.clock_ms,
            config: s.config.clone(),
            configured: s.configured,
            producers: s.producers.clone(),
            message_ids: s.message_ids.to_parts(),
            skipped: Vec::new(),
            next_expiry_scan_ms: s.next_expiry_scan_ms,
        };
        let mut bytes = 1u16.to_le_bytes().to_vec();
        bytes.extend(postcard::to_allocvec(&v1).unwrap());
        assert_eq!(PartitionState::decode_snapshot(&bytes).unwrap(), s);
    }

    #[test]
    fn the_same_entries_give_the_same_state_and_the_snapshot_round_trips() {
        let run = || {
            let mut s = PartitionState::default();
            s.apply_control(&ControlEntry {
                leader_time_ms: 100,
                command: ControlCommand::Configure(PartitionConfig { id_key: [3; 16], ..PartitionConfig::default() }),
            });
            for i in 0..50u32 {
                let id = [(0u32, u128::from(i % 40))];
                let _ = apply(&mut s, 2, stamp(i as i32), &id);
                tick(&mut s, 100 + i64::from(i) * 10);
            }
            let lease =
                ControlCommand::QueueLease { group: "q".into(), member: "m".into(), deadline_ms: 9_000, new_from: 0, new_until: 100, redeliver: vec![] };
            s.apply_control(&ControlEntry { leader_time_ms: 700, command: lease });
            let settles = vec![(0, 1, Settle::Ack), (1, 1, Settle::Term { reason: "bad".into(), class: "schema".into() })];
            s.apply_control(&ControlEntry { leader_time_ms: 701, command: ControlCommand::QueueSettle { group: "q".into(), member: "m".into(), settles } });
            s.apply_control(&ControlEntry {
                leader_time_ms: 702,
                command: ControlCommand::CommitOffset { group: "s".into(), generation: Some(1), offset: 40 },
            });
            s
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert!(!a.skipped.is_empty(), "ids 0..10 repeat");
        let q = &a.consumers.queues["q"];
        assert_eq!(q.cursor, 100);
        assert!(!q.slots.keys().any(|o| !offset_served(&a.skipped, *o)), "offsets of refused batches are never leased");
        let back = PartitionState::decode_snapshot(&a.encode_snapshot()).unwrap();
        assert_eq!(back, a);
        let mut newer = a.encode_snapshot();
        newer[0] = 9;
        newer[1] = 0;
        assert!(matches!(PartitionState::decode_snapshot(&newer), Err(SnapshotError::UnknownVersion(9))));
    }
}
