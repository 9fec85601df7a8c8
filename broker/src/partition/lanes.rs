//! Priority lanes in the partition fold: which offsets belong to which lane.
//!
//! A batch names its lane in its header (`priority`, `0..PRIORITY_LANES_MAX`) and never
//! mixes lanes, so a partition's offsets fall into *runs*: maximal stretches of
//! consecutive batches of one lane. The fold records every batch it applies into
//! [`LaneRuns`]; a queue group keeps a cursor per lane over them, so a lane-9 message
//! stored after a million lane-0 ones is found with a tree lookup, not a scan.
//!
//! Offsets below the first recorded run (a log written before lanes existed) are lane
//! 0. A partition whose producers never set a priority has a single run.
//!
//! Memory is one tree entry per run, so it grows with how often producers switch
//! lanes within a partition, not with the number of messages.

use std::collections::BTreeMap;

use keel_protocol::limits::PRIORITY_LANES_MAX;

/// Number of lanes (cursors per queue group): priorities are `0..LANES`.
pub const LANES: usize = PRIORITY_LANES_MAX as usize;

/// The lane of every recorded offset, as runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneRuns {
    /// Run start → (one past its end, lane). Runs are disjoint and ascending; adjacent
    /// runs have different lanes, or a gap between them.
    runs: BTreeMap<u64, (u64, u8)>,
    /// Derived: per lane above 0, its runs (start → end), so a lane with few messages
    /// is searched without walking the others' runs.
    by_lane: [BTreeMap<u64, u64>; LANES],
}

impl LaneRuns {
    /// Records `count` offsets from `base` in `lane` (a batch just applied).
    pub fn record(&mut self, base: u64, count: u32, lane: u8) {
        let end = base + u64::from(count);
        let lane = lane.min(LANES as u8 - 1);
        if let Some((start, (last_end, last_lane))) = self.runs.iter_mut().next_back() {
            if *last_end == base && *last_lane == lane {
                *last_end = end;
                if lane > 0 {
                    self.by_lane[usize::from(lane)].insert(*start, end);
                }
                return;
            }
        }
        self.runs.insert(base, (end, lane));
        if lane > 0 {
            self.by_lane[usize::from(lane)].insert(base, end);
        }
    }

    /// How many runs are recorded.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Whether any batch of `lane` was recorded (lane 0 always counts).
    pub fn used(&self, lane: u8) -> bool {
        lane == 0 || self.by_lane.get(usize::from(lane)).is_some_and(|r| !r.is_empty())
    }

    /// The lane of `offset` (0 where nothing was recorded).
    pub fn lane_of(&self, offset: u64) -> u8 {
        match self.runs.range(..=offset).next_back() {
            Some((_, (end, lane))) if offset < *end => *lane,
            _ => 0,
        }
    }

    /// Whether any offset in `from..until` is in a lane other than 0 (a partition whose
    /// producers never set a priority answers `false` with one lookup).
    pub fn only_lane_zero(&self, from: u64, until: u64) -> bool {
        self.segments(from, until).all(|(_, _, lane)| lane == 0)
    }

    /// The stretches of `from..until` with their lanes, ascending: `(start, end, lane)`.
    /// Unrecorded stretches are lane 0.
    pub fn segments(&self, from: u64, until: u64) -> impl Iterator<Item = (u64, u64, u8)> + '_ {
        let first = self.runs.range(..=from).next_back().map(|(s, _)| *s).unwrap_or(from);
        let mut at = from;
        let mut runs = self.runs.range(first..until).peekable();
        std::iter::from_fn(move || {
            while at < until {
                match runs.peek() {
                    Some((start, (end, lane))) => {
                        let (start, end, lane) = (**start, *end, *lane);
                        if end <= at {
                            runs.next();
                            continue;
                        }
                        if start > at {
                            // A gap before the next run: lane 0.
                            let to = start.min(until);
                            let seg = (at, to, 0);
                            at = to;
                            return Some(seg);
                        }
                        let to = end.min(until);
                        let seg = (at, to, lane);
                        at = to;
                        runs.next();
                        return Some(seg);
                    }
                    None => {
                        let seg = (at, until, 0);
                        at = until;
                        return Some(seg);
                    }
                }
            }
            None
        })
    }

    /// The stretches of lane `lane` within `from..until`, ascending.
    pub fn lane_segments(&self, lane: u8, from: u64, until: u64) -> Box<dyn Iterator<Item = (u64, u64)> + '_> {
        if lane == 0 {
            return Box::new(self.segments(from, until).filter(|(_, _, l)| *l == 0).map(|(s, e, _)| (s, e)));
        }
        let runs = &self.by_lane[usize::from(lane).min(LANES - 1)];
        let first = runs.range(..=from).next_back().map(|(s, _)| *s).unwrap_or(from);
        Box::new(runs.range(first..until).map(move |(s, e)| ((*s).max(from), (*e).min(until))).filter(|(s, e)| s < e))
    }

    /// The first offset of lane `lane` at or after `from` and below `until`.
    pub fn next_in_lane(&self, lane: u8, from: u64, until: u64) -> Option<u64> {
        self.lane_segments(lane, from, until).next().map(|(s, _)| s)
    }

    pub fn to_parts(&self) -> Vec<(u64, u64, u8)> {
        self.runs.iter().map(|(s, (e, l))| (*s, *e, *l)).collect()
    }

    pub fn from_parts(parts: Vec<(u64, u64, u8)>) -> LaneRuns {
        let mut r = LaneRuns::default();
        for (s, e, l) in parts {
            r.runs.insert(s, (e, l));
            if l > 0 {
                r.by_lane[usize::from(l).min(LANES - 1)].insert(s, e);
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_batches_of_one_lane_make_one_run_and_a_switch_starts_another() {
        let mut r = LaneRuns::default();
        r.record(0, 10, 0);
        r.record(10, 5, 0);
        assert_eq!(r.len(), 1);
        r.record(15, 1, 9);
        r.record(16, 4, 0);
        assert_eq!(r.to_parts(), vec![(0, 15, 0), (15, 16, 9), (16, 20, 0)]);
        assert_eq!((r.lane_of(14), r.lane_of(15), r.lane_of(16), r.lane_of(99)), (0, 9, 0, 0));
    }

    #[test]
    fn segments_cover_the_range_exactly_with_gaps_as_lane_zero() {
        let mut r = LaneRuns::default();
        r.record(100, 10, 3);
        r.record(110, 10, 5);
        let segs: Vec<_> = r.segments(95, 125).collect();
        assert_eq!(segs, vec![(95, 100, 0), (100, 110, 3), (110, 120, 5), (120, 125, 0)]);
        assert_eq!(r.segments(105, 112).collect::<Vec<_>>(), vec![(105, 110, 3), (110, 112, 5)]);
        assert_eq!(r.next_in_lane(5, 0, 1000), Some(110));
        assert_eq!(r.next_in_lane(5, 115, 1000), Some(115));
        assert_eq!(r.next_in_lane(5, 120, 1000), None);
        assert_eq!(r.next_in_lane(0, 100, 1000), Some(120));
        assert!(r.only_lane_zero(0, 100) && !r.only_lane_zero(0, 101));
    }

    #[test]
    fn a_lane_beyond_the_last_is_recorded_as_the_last() {
        let mut r = LaneRuns::default();
        r.record(0, 1, 200);
        assert_eq!(r.lane_of(0), LANES as u8 - 1);
    }
}
