//! The idempotent-producer table of one partition, and the one rule that judges a batch
//! against it.
//!
//! A producer is an id and an epoch (from `InitProducer`); its batches to a partition
//! carry sequence numbers 0, 1, 2, … (one per batch). The table remembers, per producer,
//! its epoch, the last sequence stored and where the last [`BATCHES_REMEMBERED`] batches
//! were stored, so a retry of any of them is answered with its original offsets.
//! [`decide`] is the rule: the leader runs it before proposing (over this table plus its
//! own pending proposals) and every replica runs it again when applying, so a duplicate
//! or a gap that reaches the log anyway is judged the same way everywhere.

use std::collections::{HashMap, VecDeque};

use keel_protocol::limits::PRODUCER_BATCHES_IN_FLIGHT_MAX;
use serde::{Deserialize, Serialize};

/// Batches remembered per producer: a retry of any batch still in flight is recognised.
pub const BATCHES_REMEMBERED: usize = PRODUCER_BATCHES_IN_FLIGHT_MAX;

/// A batch's producer fields, for a batch sent with idempotence (`producer_id >= 0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProducerStamp {
    pub producer_id: i64,
    pub epoch: i16,
    pub sequence: i32,
}

/// Where a batch's records were stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredAt {
    /// At `base_offset ..`, one offset per record.
    Batch { base_offset: u64, record_count: u32 },
    /// Nowhere new: every record carried a message id already stored; `(index, offset)`.
    Records(Vec<(u32, u64)>),
}

/// One remembered batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RememberedBatch {
    pub sequence: i32,
    pub stored: StoredAt,
}

/// What the table knows of one producer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerEntry {
    pub epoch: i16,
    /// Sequence of the last batch stored in this epoch.
    pub last_sequence: i32,
    /// Partition clock (leader time) of its last write; drives expiry.
    pub last_write_ms: i64,
    /// The last batches stored, oldest first, at most [`BATCHES_REMEMBERED`].
    pub batches: VecDeque<RememberedBatch>,
}

/// The judgement of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The next batch expected: store it.
    Append,
    /// A retry of a batch already stored: answer with where it was stored.
    Duplicate(StoredAt),
    /// A sequence ahead of the next one expected: an earlier batch is missing. It may
    /// still be on its way (the leader waits briefly before refusing).
    Gap { expected: i32 },
    /// A sequence behind the expected one that is not remembered, or a new epoch or
    /// unknown producer not starting at 0: refused.
    OutOfOrder { expected: i32 },
    /// An epoch older than the one already seen: a newer instance exists.
    Fenced { current_epoch: i16 },
}

/// The sequence after `s` (sequences run over `0..=i32::MAX` and wrap to 0).
pub fn next_sequence(s: i32) -> i32 {
    if s == i32::MAX {
        0
    } else {
        s + 1
    }
}

/// How far `s` is ahead of `expected` in the wrapping sequence space, if it is ahead by
/// less than half the space (otherwise it is behind).
fn ahead_by(s: i32, expected: i32) -> Option<u32> {
    let distance = (s as u32).wrapping_sub(expected as u32) & (i32::MAX as u32);
    (distance != 0 && distance < (1 << 30)).then_some(distance)
}

/// Judges a batch stamped `stamp` against what the table knows of its producer
/// (`entry`), and — on the leader — the epoch and sequence of its newest batch still
/// pending (`pending_tail`), which then decides the next sequence expected.
pub fn decide(entry: Option<&ProducerEntry>, pending_tail: Option<(i16, i32)>, stamp: ProducerStamp) -> Verdict {
    if let Some(e) = entry {
        if stamp.epoch == e.epoch {
            if let Some(b) = e.batches.iter().find(|b| b.sequence == stamp.sequence) {
                return Verdict::Duplicate(b.stored.clone());
            }
        }
    }
    let tail = pending_tail.or(entry.map(|e| (e.epoch, e.last_sequence)));
    let Some((epoch, last)) = tail else {
        // Unknown producer (new, or expired): its stream starts at 0.
        return if stamp.sequence == 0 { Verdict::Append } else { gap_or_out_of_order(stamp.sequence, 0) };
    };
    if stamp.epoch < epoch {
        return Verdict::Fenced { current_epoch: epoch };
    }
    if stamp.epoch > epoch {
        // A new epoch (the producer renumbered after a failure) starts at 0.
        return if stamp.sequence == 0 { Verdict::Append } else { gap_or_out_of_order(stamp.sequence, 0) };
    }
    let expected = next_sequence(last);
    if stamp.sequence == expected {
        Verdict::Append
    } else {
        gap_or_out_of_order(stamp.sequence, expected)
    }
}

fn gap_or_out_of_order(sequence: i32, expected: i32) -> Verdict {
    match ahead_by(sequence, expected) {
        Some(d) if d as usize <= 2 * BATCHES_REMEMBERED => Verdict::Gap { expected },
        _ => Verdict::OutOfOrder { expected },
    }
}

/// Every producer this partition knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerTable {
    entries: HashMap<i64, ProducerEntry>,
}

impl ProducerTable {
    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.entries.get(&producer_id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records a stored batch (its verdict was `Append`): a new epoch starts afresh.
    pub fn record(&mut self, stamp: ProducerStamp, stored: StoredAt, now_ms: i64) {
        let entry = self.entries.entry(stamp.producer_id).or_insert_with(|| ProducerEntry {
            epoch: stamp.epoch,
            last_sequence: stamp.sequence,
            last_write_ms: now_ms,
            batches: VecDeque::with_capacity(BATCHES_REMEMBERED),
        });
        if entry.epoch != stamp.epoch {
            debug_assert!(stamp.epoch > entry.epoch, "an older epoch is fenced, never recorded");
            entry.epoch = stamp.epoch;
            entry.batches.clear();
        }
        entry.last_sequence = stamp.sequence;
        entry.last_write_ms = entry.last_write_ms.max(now_ms);
        if entry.batches.len() == BATCHES_REMEMBERED {
            entry.batches.pop_front();
        }
        entry.batches.push_back(RememberedBatch { sequence: stamp.sequence, stored });
        debug_assert!(entry.batches.len() <= BATCHES_REMEMBERED);
    }

    /// Whether [`ProducerTable::expire`] at `now_ms` would forget any producer.
    pub fn would_expire(&self, now_ms: i64, expiry_ms: u64) -> bool {
        let cutoff = now_ms.saturating_sub(i64::try_from(expiry_ms).unwrap_or(i64::MAX));
        self.entries.values().any(|e| e.last_write_ms < cutoff)
    }

    /// Forgets producers whose last write is older than `expiry_ms` at `now_ms`;
    /// returns how many. Their next batch must start a new epoch (sequence 0), which
    /// the client does by itself on `OutOfOrderSequence`.
    pub fn expire(&mut self, now_ms: i64, expiry_ms: u64) -> usize {
        let before = self.entries.len();
        let cutoff = now_ms.saturating_sub(i64::try_from(expiry_ms).unwrap_or(i64::MAX));
        self.entries.retain(|_, e| e.last_write_ms >= cutoff);
        before - self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(epoch: i16, sequence: i32) -> ProducerStamp {
        ProducerStamp { producer_id: 7, epoch, sequence }
    }

    fn at(base_offset: u64) -> StoredAt {
        StoredAt::Batch { base_offset, record_count: 10 }
    }

    fn table_with(epoch: i16, sequences: std::ops::Range<i32>) -> ProducerTable {
        let mut t = ProducerTable::default();
        for s in sequences {
            t.record(stamp(epoch, s), at(100 * s as u64), 1);
        }
        t
    }

    #[test]
    fn an_unknown_producer_starts_at_sequence_zero() {
        assert_eq!(decide(None, None, stamp(0, 0)), Verdict::Append);
        assert_eq!(decide(None, None, stamp(3, 0)), Verdict::Append, "any epoch");
        assert_eq!(decide(None, None, stamp(0, 2)), Verdict::Gap { expected: 0 });
        assert_eq!(decide(None, None, stamp(0, 900)), Verdict::OutOfOrder { expected: 0 });
    }

    #[test]
    fn the_next_sequence_is_appended_and_a_gap_is_not() {
        let t = table_with(0, 0..3);
        assert_eq!(decide(t.get(7), None, stamp(0, 3)), Verdict::Append);
        assert_eq!(decide(t.get(7), None, stamp(0, 5)), Verdict::Gap { expected: 3 });
        assert_eq!(decide(t.get(7), None, stamp(0, 3 + 2 * BATCHES_REMEMBERED as i32 + 1)), Verdict::OutOfOrder { expected: 3 });
    }

    #[test]
    fn a_retry_of_any_of_the_last_five_batches_gets_its_original_offsets() {
        let t = table_with(0, 0..8);
        for s in 3..8 {
            assert_eq!(decide(t.get(7), None, stamp(0, s)), Verdict::Duplicate(at(100 * s as u64)), "sequence {s}");
        }
        assert_eq!(decide(t.get(7), None, stamp(0, 2)), Verdict::OutOfOrder { expected: 8 }, "older than remembered: refused, never stored again");
    }

    #[test]
    fn an_older_epoch_is_fenced_and_a_newer_one_restarts_at_zero() {
        let t = table_with(2, 0..3);
        assert_eq!(decide(t.get(7), None, stamp(1, 3)), Verdict::Fenced { current_epoch: 2 });
        assert_eq!(decide(t.get(7), None, stamp(3, 0)), Verdict::Append);
        assert_eq!(decide(t.get(7), None, stamp(3, 3)), Verdict::Gap { expected: 0 });
        let mut t = t;
        t.record(stamp(3, 0), at(5000), 2);
        let e = t.get(7).unwrap();
        assert_eq!((e.epoch, e.last_sequence, e.batches.len()), (3, 0, 1), "a new epoch forgets the old batches");
        assert_eq!(decide(t.get(7), None, stamp(2, 3)), Verdict::Fenced { current_epoch: 3 });
    }

    #[test]
    fn pending_proposals_decide_the_next_sequence_on_the_leader() {
        let t = table_with(0, 0..3);
        assert_eq!(decide(t.get(7), Some((0, 4)), stamp(0, 5)), Verdict::Append, "3 and 4 pending: 5 is next");
        assert_eq!(decide(t.get(7), Some((0, 4)), stamp(0, 3)), Verdict::OutOfOrder { expected: 5 }, "3 pending is not a stored duplicate");
        assert_eq!(decide(t.get(7), Some((0, 4)), stamp(0, 2)), Verdict::Duplicate(at(200)));
        assert_eq!(decide(None, Some((1, 0)), stamp(1, 1)), Verdict::Append);
    }

    #[test]
    fn sequences_wrap_after_i32_max() {
        let mut t = ProducerTable::default();
        t.record(stamp(0, i32::MAX), at(1), 1);
        assert_eq!(decide(t.get(7), None, stamp(0, 0)), Verdict::Append);
        assert_eq!(decide(t.get(7), None, stamp(0, 1)), Verdict::Gap { expected: 0 });
        assert_eq!(decide(t.get(7), None, stamp(0, i32::MAX)), Verdict::Duplicate(at(1)));
    }

    #[test]
    fn idle_producers_expire_and_then_start_over() {
        let mut t = table_with(0, 0..3);
        t.record(ProducerStamp { producer_id: 8, epoch: 0, sequence: 0 }, at(1), 5_000);
        assert_eq!(t.expire(5_000, 2_000), 1, "producer 7 last wrote at 1");
        assert!(t.get(7).is_none());
        assert!(t.get(8).is_some());
        assert_eq!(decide(t.get(7), None, stamp(0, 3)), Verdict::Gap { expected: 0 });
    }
}
