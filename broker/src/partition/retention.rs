//! Retention in the partition fold: where the log starts, and when its messages were
//! stored.
//!
//! The leader decides a retention cut from the topic's settings and proposes it as a
//! `Retain` control entry; every replica applies it at the same log position, so every
//! replica agrees on where the partition starts, and each then purges its own log
//! there once a snapshot covers the cut (`node/retention.rs`). Retention by age judges
//! messages by the partition clock — leader time carried by control entries — never by
//! producers' timestamps: [`TimeMarks`] remembers, for offsets, when the clock passed
//! them.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Most time marks a partition keeps; when full, every other mark is dropped (coarser,
/// never wrong: a mark only ever says "stored before this time").
pub const TIME_MARKS_MAX: usize = 4_096;
/// Least partition-clock time between two marks.
pub const TIME_MARK_SPACING_MS: i64 = 1_000;

/// The applied retention cut: Raft entries up to `upto_index` may be deleted, and the
/// partition's messages start at `start_offset`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retained {
    pub upto_index: u64,
    pub start_offset: u64,
}

/// `(offset, clock_ms)` pairs, increasing in both: when the partition clock reached
/// `clock_ms`, every offset below `offset` had been stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimeMarks {
    marks: VecDeque<(u64, i64)>,
}

impl TimeMarks {
    /// Notes that at partition time `clock_ms` the next offset was `next_offset`.
    pub fn note(&mut self, next_offset: u64, clock_ms: i64) {
        if let Some(&(offset, at)) = self.marks.back() {
            if offset == next_offset || clock_ms < at.saturating_add(TIME_MARK_SPACING_MS) {
                return;
            }
        }
        if self.marks.len() >= TIME_MARKS_MAX {
            let kept: VecDeque<(u64, i64)> = self.marks.iter().copied().enumerate().filter(|(i, _)| i % 2 == 1).map(|(_, m)| m).collect();
            self.marks = kept;
        }
        self.marks.push_back((next_offset, clock_ms));
    }

    /// A time by which every offset below `end_offset` had been stored, if known: the
    /// earliest mark at or past it.
    pub fn stored_by(&self, end_offset: u64) -> Option<i64> {
        let i = self.marks.partition_point(|(o, _)| *o < end_offset);
        self.marks.get(i).map(|(_, t)| *t)
    }

    /// Forgets marks of offsets retention removed (the last one below `start` is kept
    /// out too: every offset below it is gone).
    pub fn forget_below(&mut self, start: u64) {
        while self.marks.front().is_some_and(|(o, _)| *o <= start) {
            self.marks.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.marks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }

    pub fn to_parts(&self) -> Vec<(u64, i64)> {
        self.marks.iter().copied().collect()
    }

    pub fn from_parts(parts: Vec<(u64, i64)>) -> TimeMarks {
        TimeMarks { marks: parts.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_says_when_every_earlier_offset_was_stored() {
        let mut m = TimeMarks::default();
        m.note(10, 1_000);
        m.note(10, 5_000); // nothing new stored: no mark
        m.note(20, 1_500); // too soon after the last
        m.note(30, 2_000);
        assert_eq!(m.stored_by(5), Some(1_000));
        assert_eq!(m.stored_by(10), Some(1_000));
        assert_eq!(m.stored_by(11), Some(2_000), "offset 10..30 were stored by 2,000");
        assert_eq!(m.stored_by(31), None, "not known yet");
        m.forget_below(10);
        assert_eq!(m.to_parts(), vec![(30, 2_000)]);
    }

    #[test]
    fn a_full_set_of_marks_thins_out_but_stays_ordered() {
        let mut m = TimeMarks::default();
        for i in 0..(TIME_MARKS_MAX as u64 * 3) {
            m.note(i + 1, i as i64 * TIME_MARK_SPACING_MS);
        }
        assert!(m.len() <= TIME_MARKS_MAX);
        let parts = m.to_parts();
        assert!(parts.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1));
        assert_eq!(parts.last().unwrap().0, TIME_MARKS_MAX as u64 * 3, "the newest mark is kept");
    }
}
