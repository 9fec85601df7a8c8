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
use super::consumers::{CommitResult, ConsumerGroups, ConsumerParts, ConsumerPartsV2, Lease, SettleResult};
use super::lanes::LaneRuns;
use super::message_ids::{IdDigest, MessageIdWindow, WindowParts};
use super::producers::{decide, ProducerStamp, ProducerTable, StoredAt, Verdict};
use super::retention::{Retained, TimeMarks};

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
    /// The batch's priority lane (its header's `priority`).
    pub lane: u8,
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
    /// A `Retain` that moved the cut: per queue group, the messages it lost (dropped
    /// unsettled, or skipped never delivered).
    Retained(Vec<(String, u64)>),
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
    /// The priority lane of every offset, as runs of batches.
    pub lanes: LaneRuns,
    /// Where retention cut the log (nothing cut: zeros).
    pub retained: Retained,
    /// When offsets were stored, on the partition clock (retention by age).
    pub time_marks: TimeMarks,
}

impl PartitionState {
    /// Applies an entry that holds no records and changes nothing (blank, membership).
    pub fn apply_empty(&mut self) {}

    /// Applies a record batch appended at `batch.base_offset`.
    pub fn apply_batch(&mut self, batch: &BatchInfo<'_>) -> BatchOutcome {
        assert_eq!(batch.base_offset, self.next_offset, "offsets are contiguous across applied entries");
        assert!(batch.record_count > 0, "a batch holds at least one record");
        self.next_offset = batch.base_offset + u64::from(batch.record_count);
        // Refused batches too: their offsets are never served, and recording them keeps
        // the runs contiguous.
        self.lanes.record(batch.base_offset, batch.record_count, batch.lane);
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
        self.time_marks.note(self.next_offset, self.clock_ms);
        match &entry.command {
            ControlCommand::Retain { upto_index, start_offset } => {
                if *upto_index > self.retained.upto_index && *start_offset >= self.retained.start_offset && *start_offset <= self.next_offset {
                    self.retained = Retained { upto_index: *upto_index, start_offset: *start_offset };
                    self.time_marks.forget_below(*start_offset);
                    return ControlOutcome::Retained(self.consumers.retain(*start_offset));
                }
                ControlOutcome::Applied
            }
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
                // Written before lanes: new messages from lane 0 only (all there was).
                let new = [(0u8, *new_from, *new_until)];
                let lease = Lease { member, deadline_ms: *deadline_ms, start: *new_from, new: &new, redeliver, deferred: &[], keys: &[] };
                ControlOutcome::Leased(self.lease(group, &lease))
            }
            ControlCommand::QueueLeaseLanes { group, member, deadline_ms, start, new, redeliver, deferred, keys } => {
                let lease = Lease { member, deadline_ms: *deadline_ms, start: *start, new, redeliver, deferred, keys };
                ControlOutcome::Leased(self.lease(group, &lease))
            }
            ControlCommand::QueueSettle { group, member, settles } => {
                ControlOutcome::Settled(self.consumers.settle(self.clock_ms, &self.lanes, group, member, settles))
            }
            ControlCommand::QueueDeadLettered { group, offsets } => ControlOutcome::DeadLettered(self.consumers.dead_lettered(self.clock_ms, group, offsets)),
        }
    }

    fn lease(&mut self, group: &str, lease: &Lease<'_>) -> Vec<(u64, u32)> {
        let skipped = &self.skipped;
        let served = |offset: u64| offset_served(skipped, offset);
        self.consumers.lease(self.clock_ms, self.next_offset, &served, &self.lanes, group, lease)
    }

    /// Whether moving the partition clock to `to_ms` would expire a message id or an idle
    /// producer — state a produce judged before that move applies is judged on.
    pub fn clock_advance_expires(&self, to_ms: i64) -> bool {
        let to = self.clock_ms.max(to_ms);
        self.message_ids.would_expire(to, self.config.dedupe_window_ms)
            || (to >= self.next_expiry_scan_ms && self.producers.would_expire(to, self.config.producer_expiry_ms))
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
pub const SNAPSHOT_VERSION: u16 = 4;

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
    consumers: ConsumerPartsV2,
}

/// Version 3: version 1, the consumer groups with a cursor per lane, and the lane runs.
#[derive(Serialize, Deserialize)]
struct SnapshotV3 {
    v1: SnapshotV1,
    consumers: ConsumerParts,
    lanes: Vec<(u64, u64, u8)>,
}

/// Version 4: version 3, the retention cut and the time marks.
#[derive(Serialize, Deserialize)]
struct SnapshotV4 {
    v3: SnapshotV3,
    retained: Retained,
    time_marks: Vec<(u64, i64)>,
}

impl PartitionState {
    /// The state as snapshot bytes: `version:u16le | postcard(body of that version)`.
    /// A later version adds a new body type; old snapshots keep decoding.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        let v1 = self.v1_parts();
        let v3 = SnapshotV3 { v1, consumers: self.consumers.to_parts(), lanes: self.lanes.to_parts() };
        let body = SnapshotV4 { v3, retained: self.retained, time_marks: self.time_marks.to_parts() };
        let mut out = SNAPSHOT_VERSION.to_le_bytes().to_vec();
        postcard::to_io(&body, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// The fields version 1 held (every version since carries them first).
    fn v1_parts(&self) -> SnapshotV1 {
        SnapshotV1 {
            next_offset: self.next_offset,
            clock_ms: self.clock_ms,
            config: self.config.clone(),
            configured: self.configured,
            producers: self.producers.clone(),
            message_ids: self.message_ids.to_parts(),
            skipped: self.skipped.iter().map(|(o, c)| (*o, *c)).collect(),
            next_expiry_scan_ms: self.next_expiry_scan_ms,
        }
    }

    pub fn decode_snapshot(bytes: &[u8]) -> Result<PartitionState, SnapshotError> {
        let Some((version, body)) = bytes.split_first_chunk::<2>() else { return Err(SnapshotError::Truncated(bytes.len())) };
        let undecodable = |e: postcard::Error| SnapshotError::Undecodable(e.to_string());
        let none = || (Retained::default(), TimeMarks::default());
        let (s, consumers, lanes, (retained, time_marks)) = match u16::from_le_bytes(*version) {
            1 => (postcard::from_bytes::<SnapshotV1>(body).map_err(undecodable)?, ConsumerGroups::default(), LaneRuns::default(), none()),
            2 => {
                let v2: SnapshotV2 = postcard::from_bytes(body).map_err(undecodable)?;
                (v2.v1, ConsumerGroups::from_parts_v2(v2.consumers), LaneRuns::default(), none())
            }
            3 => {
                let v3: SnapshotV3 = postcard::from_bytes(body).map_err(undecodable)?;
                (v3.v1, ConsumerGroups::from_parts(v3.consumers), LaneRuns::from_parts(v3.lanes), none())
            }
            4 => {
                let v4: SnapshotV4 = postcard::from_bytes(body).map_err(undecodable)?;
                let v3 = v4.v3;
                (v3.v1, ConsumerGroups::from_parts(v3.consumers), LaneRuns::from_parts(v3.lanes), (v4.retained, TimeMarks::from_parts(v4.time_marks)))
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
            consumers,
            lanes,
            retained,
            time_marks,
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
        s.apply_batch(&BatchInfo { base_offset: state.next_offset, record_count: count, producer, message_ids: ids, lane: 0 })
    }

    fn apply(state: &mut PartitionState, count: u32, producer: Option<ProducerStamp>, ids: &[(u32, IdDigest)]) -> BatchOutcome {
        state.apply_batch(&BatchInfo { base_offset: state.next_offset, record_count: count, producer, message_ids: ids, lane: 0 })
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
    fn a_clock_advance_is_known_to_expire_ids_and_producers_exactly_when_it_does() {
        let mut s = PartitionState::default();
        s.config.dedupe_window_ms = 1_000;
        s.config.producer_expiry_ms = 5_000;
        tick(&mut s, 10_000);
        apply(&mut s, 1, None, &[(0, 1)]);
        // The id was first seen at 10_000: a move to 10_999 keeps it, 11_000 forgets it.
        assert!(!s.clock_advance_expires(10_999));
        assert!(s.clock_advance_expires(11_000));
        let mut moved = s.clone();
        tick(&mut moved, 11_000);
        assert_eq!(moved.message_ids.len(), 0, "what the check predicted");

        // A producer last written at 10_000 expires at 15_001 — but only when the
        // producer scan is due, as `advance_clock` does it.
        let mut s = PartitionState::default();
        s.config.producer_expiry_ms = 5_000;
        tick(&mut s, 10_000);
        apply(&mut s, 1, stamp(0), &[]);
        assert!(!s.clock_advance_expires(15_000));
        s.next_expiry_scan_ms = 20_000;
        assert!(!s.clock_advance_expires(15_001), "the scan is not due yet: nothing expires");
        assert!(s.clock_advance_expires(20_000));
        let mut moved = s.clone();
        tick(&mut moved, 20_000);
        assert!(moved.producers.get(1).is_none(), "what the check predicted");
        let mut kept = s.clone();
        tick(&mut kept, 15_001);
        assert!(kept.producers.get(1).is_some());
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
        let v1 = s.v1_parts();
        let mut bytes = 1u16.to_le_bytes().to_vec();
        bytes.extend(postcard::to_allocvec(&v1).unwrap());
        // Lanes came later: an old snapshot's offsets are lane 0, which no runs say too.
        let loaded = PartitionState::decode_snapshot(&bytes).unwrap();
        assert!(loaded.lanes.is_empty() && s.lanes.lane_of(0) == 0);
        assert_eq!(loaded, PartitionState { lanes: LaneRuns::default(), ..s });
    }

    #[test]
    fn a_version_2_snapshot_loads_with_every_lane_at_the_group_s_cursor() {
        let mut s = PartitionState::default();
        apply(&mut s, 10, None, &[]);
        s.apply_control(&ControlEntry {
            leader_time_ms: 1_000,
            command: ControlCommand::QueueLease { group: "q".into(), member: "m".into(), deadline_ms: 9_000, new_from: 0, new_until: 4, redeliver: vec![] },
        });
        let v1 = s.v1_parts();
        let v3 = s.encode_snapshot();
        let parts: SnapshotV3 = postcard::from_bytes(&v3[2..]).unwrap();
        let v2_consumers = crate::partition::consumers::tests_support::to_parts_v2(&parts.consumers);
        let mut bytes = 2u16.to_le_bytes().to_vec();
        bytes.extend(postcard::to_allocvec(&SnapshotV2 { v1, consumers: v2_consumers }).unwrap());
        let loaded = PartitionState::decode_snapshot(&bytes).unwrap();
        let q = &loaded.consumers.queues["q"];
        assert_eq!(q.cursors, [4; crate::partition::lanes::LANES]);
        let live = &s.consumers.queues["q"];
        assert_eq!(q.slots, live.slots);
        assert_eq!(q.next_undelivered(&loaded.lanes, 10), live.next_undelivered(&s.lanes, 10), "the same messages are still to deliver");
    }

    #[test]
    fn a_lane_nine_message_behind_a_lane_zero_backlog_is_leased_first_and_lanes_keep_their_order() {
        let mut s = PartitionState::default();
        let batch = |s: &mut PartitionState, count: u32, lane: u8| {
            let base = s.next_offset;
            s.apply_batch(&BatchInfo { base_offset: base, record_count: count, producer: None, message_ids: &[], lane });
        };
        batch(&mut s, 1_000, 0); // 0..1000, lane 0
        batch(&mut s, 2, 9); // 1000..1002, lane 9
        batch(&mut s, 5, 0); // 1002..1007, lane 0
        batch(&mut s, 1, 9); // 1007, lane 9
        let lease = |s: &mut PartitionState, new: Vec<(u8, u64, u64)>| match s.apply_control(&ControlEntry {
            leader_time_ms: 1_000,
            command: ControlCommand::QueueLeaseLanes {
                group: "q".into(),
                member: "m".into(),
                deadline_ms: 9_000,
                start: 0,
                new,
                redeliver: vec![],
                deferred: vec![],
                keys: vec![],
            },
        }) {
            ControlOutcome::Leased(l) => l.into_iter().map(|(o, _)| o).collect::<Vec<u64>>(),
            other => panic!("{other:?}"),
        };
        assert!(lease(&mut s, vec![]).is_empty(), "the first lease creates the group");
        // Lane 9's range from its cursor (0) to past its second run holds only its 3.
        assert_eq!(lease(&mut s, vec![(9, 0, 1_008)]), vec![1_000, 1_001, 1_007]);
        assert_eq!(lease(&mut s, vec![(0, 0, 3)]), vec![0, 1, 2]);
        assert_eq!(lease(&mut s, vec![(9, 0, 1_008)]), Vec::<u64>::new(), "a range not from the lane's cursor raced another lease");
        let q = &s.consumers.queues["q"];
        assert_eq!((q.cursors[0], q.cursors[9]), (3, 1_008));
        assert_eq!(q.floor(&s.lanes, s.next_offset), 0);
        assert_eq!(q.next_undelivered(&s.lanes, s.next_offset), 3);
        // Acks of lane 9's messages are judged against lane 9's cursor.
        let settled = s.apply_control(&ControlEntry {
            leader_time_ms: 1_001,
            command: ControlCommand::QueueSettle {
                group: "q".into(),
                member: "m".into(),
                settles: vec![(1_007, 1, Settle::Ack), (1_007, 1, Settle::Ack), (1_003, 1, Settle::Ack)],
            },
        });
        assert_eq!(settled, ControlOutcome::Settled(vec![SettleResult::Done, SettleResult::AlreadySettled, SettleResult::NotDelivered]));
        let bytes = s.encode_snapshot();
        assert_eq!(PartitionState::decode_snapshot(&bytes).unwrap(), s, "lanes and lane cursors are in the snapshot");
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
        assert_eq!(q.cursors[0], 100);
        assert!(!q.slots.keys().any(|o| !offset_served(&a.skipped, *o)), "offsets of refused batches are never leased");
        let back = PartitionState::decode_snapshot(&a.encode_snapshot()).unwrap();
        assert_eq!(back, a);
        let mut newer = a.encode_snapshot();
        newer[0] = 9;
        newer[1] = 0;
        assert!(matches!(PartitionState::decode_snapshot(&newer), Err(SnapshotError::UnknownVersion(9))));
    }
}
