//! Consumer groups in the partition fold: where each stream group got to, and each
//! queue group's delivery state (leases, attempts, retries, dead letters in progress).
//!
//! Both live in the partition's replicated state, so they survive leader changes and
//! restarts like the data does: a new leader knows every committed offset, every lease
//! and every attempt count its predecessor recorded.
//!
//! **Stream groups** commit one offset per partition ([`StreamCursor`]), fenced by the
//! group's generation: a commit from an older generation than one already recorded here
//! is refused (a member that missed a rebalance cannot move the offset back).
//!
//! **Queue groups** ([`QueueGroup`]): the leader leases messages to members. A group
//! has a cursor per priority lane ([`super::lanes`]): offsets of a lane at or above its
//! cursor were never delivered; below it, an offset with no [`Slot`] is settled (acked,
//! dead-lettered, or never served), and a slot says where an unsettled one stands: leased to a member until a deadline, waiting for its retry time, or
//! being dead-lettered. Every transition is a control entry proposed by the leader with
//! its clock; applying judges it against the state and the entry's time only, so every
//! replica ends in the same place. Attempt counts are part of the slot: a lease adds one,
//! on whichever leader, so a poison message cannot loop forever across failovers.
//!
//! Bounds: a queue group never holds more than [`QUEUE_WINDOW_MAX`] unsettled messages
//! per partition (leasing stops there until some settle), a slot remembers at most [`ATTEMPTS_REMEMBERED`] finished attempts, and
//! reasons, error classes and member names are cut to their byte bounds.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::lanes::{LaneRuns, LANES};

/// Most unsettled messages (leased, waiting for a retry, or being dead-lettered) a
/// queue group holds per partition: leasing new ones stops at the bound (the `window`
/// stall) until some are settled. Bounds the group's memory (a slot each).
pub const QUEUE_WINDOW_MAX: u64 = 200_000;
/// Finished attempts a slot remembers (the oldest are dropped first). Max-deliveries is
/// bounded by the same number, so normally every attempt is kept.
pub const ATTEMPTS_REMEMBERED: usize = 100;
/// Longest reason kept, in bytes (cut at a character boundary).
pub const REASON_BYTES_MAX: usize = 512;
/// Longest error class kept, in bytes.
pub const CLASS_BYTES_MAX: usize = 64;
/// Longest member name kept, in bytes.
pub const MEMBER_BYTES_MAX: usize = 128;

/// `s` cut to at most `max` bytes at a character boundary.
pub fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// A stream group's committed position in this partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCursor {
    /// The next offset the group will read.
    pub offset: u64,
    /// The newest generation that committed here (commits from older ones are refused).
    pub generation: u64,
    /// Partition clock when it was committed.
    pub committed_at_ms: i64,
}

/// How a commit was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommitResult {
    Committed,
    /// The committing member's generation is older than one that committed here.
    StaleGeneration {
        current: u64,
    },
    /// The offset is beyond the partition's end.
    BeyondEnd {
        end: u64,
    },
}

/// How one attempt at a message ended without settling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptOutcome {
    /// The member said it failed (`nack`).
    Nacked,
    /// The lease ran out without an answer.
    Expired,
    /// The member said it can never succeed (`term`).
    Termed,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Nacked => "nacked",
            AttemptOutcome::Expired => "expired",
            AttemptOutcome::Termed => "termed",
        }
    }
}

/// One finished attempt at delivering a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1 for the first delivery.
    pub attempt: u32,
    pub member: String,
    pub delivered_ms: i64,
    pub ended_ms: i64,
    pub outcome: AttemptOutcome,
    /// What the consumer said (empty for an expiry).
    pub reason: String,
    /// The consumer's error class, if it gave one (`timeout`, `validation`, …).
    pub class: String,
}

/// Where an unsettled message stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotState {
    /// Delivered to `member`, which may answer until `deadline_ms` (partition clock
    /// time of the leader that leased it; a leader judges expiry with its own clock).
    Leased { member: String, since_ms: i64, deadline_ms: i64 },
    /// Waiting for its retry: not delivered again before `not_before_ms`. Holds no
    /// member's in-flight slot.
    Waiting { not_before_ms: i64 },
    /// Decided for the dead-letter topic; settled once the dead letter is committed.
    DeadLettering { cause: DeadLetterCause, reason: String, class: String, since_ms: i64 },
    /// Ordered groups: held behind an earlier unsettled message with the same key, not
    /// delivered until that one is acked or dead-lettered. Holds no member's slot.
    Blocked,
}

/// Why a message is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeadLetterCause {
    /// Nacked on the last allowed delivery.
    MaxDeliveries,
    /// Termed by a member.
    Term,
    /// Its lease ran out on the last allowed delivery.
    LeaseExpired,
}

impl DeadLetterCause {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterCause::MaxDeliveries => "max_deliveries",
            DeadLetterCause::Term => "term",
            DeadLetterCause::LeaseExpired => "lease_expired",
        }
    }
}

/// An unsettled message of a queue group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Deliveries so far (the current lease included).
    pub attempts: u32,
    pub first_delivery_ms: i64,
    pub state: SlotState,
    /// Finished attempts, oldest first (at most [`ATTEMPTS_REMEMBERED`]).
    pub history: Vec<AttemptRecord>,
}

/// A lease entry's terms: to `member` until `deadline_ms`, the due offsets in
/// `redeliver` and, per `(lane, from, until)` in `new`, the never-delivered offsets of
/// that lane in `from..until` (`from` must be the group's cursor in the lane). A group
/// leasing for the first time starts every lane at `start`.
#[derive(Debug, Clone, Copy)]
pub struct Lease<'a> {
    pub member: &'a str,
    pub deadline_ms: i64,
    pub start: u64,
    pub new: &'a [(u8, u64, u64)],
    pub redeliver: &'a [u64],
    /// `(offset, not_before_ms)`, ascending: scheduled messages in the new ranges,
    /// which wait (a slot with no attempt yet) while their time is ahead.
    pub deferred: &'a [(u64, i64)],
    /// Ordered groups: `(offset, key hash)`, ascending, of the keyed messages in the
    /// new ranges. At most one message per key is out at a time: a later one waits
    /// `Blocked` until the one before it is settled.
    pub keys: &'a [(u64, u64)],
}

/// What a member asks of one leased message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Settle {
    /// Processed: settle it (accepted from any member, for any attempt, while the
    /// message is not being dead-lettered).
    Ack,
    /// Failed: retry it not before `not_before_ms`, or, when `dead_letter` (the leader
    /// found max-deliveries reached), dead-letter it.
    Nack { not_before_ms: i64, reason: String, class: String, dead_letter: bool },
    /// Still working: the lease lasts until `deadline_ms` (never shortened).
    Extend { deadline_ms: i64 },
    /// Can never succeed: dead-letter it now.
    Term { reason: String, class: String },
    /// Proposed by the leader for a lease that ran out on the last allowed attempt:
    /// dead-letter it (whichever member held it).
    Expire { reason: String },
}

/// How one settle request was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SettleResult {
    /// Recorded.
    Done,
    /// The message was settled already (an ack retried, or acked by another member).
    AlreadySettled,
    /// The offset was never delivered to this group.
    NotDelivered,
    /// The message is not leased to this member at this attempt any more (it expired
    /// and went to a retry or another member); `attempts` is its count now.
    StaleLease { attempts: u32 },
    /// The message is being dead-lettered; an ack or nack no longer changes that.
    DeadLettering,
}

/// A queue group's state in one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueGroup {
    /// Per lane: its offsets at or above were never delivered.
    pub cursors: [u64; LANES],
    /// Unsettled messages (below their lane's cursor).
    pub slots: BTreeMap<u64, Slot>,
    /// Counters since the group first leased here (replicated, so every replica agrees).
    pub delivered_total: u64,
    pub redelivered_total: u64,
    pub acked_total: u64,
    pub dead_lettered_total: u64,
    /// Derived: leased messages per member.
    leased_by: BTreeMap<String, u32>,
    /// Derived: `(time, offset)` of each leased (deadline) or waiting (retry time) slot.
    timers: BTreeSet<(i64, u64)>,
    /// Derived: slots being dead-lettered.
    dead_lettering: BTreeSet<u64>,
    /// Derived: scheduled messages waiting for their first delivery.
    scheduled: u64,
    /// Ordered groups: the key hash of each unsettled keyed message.
    pub keys: BTreeMap<u64, u64>,
    /// Derived: per key, its unsettled messages in offset order (the first is the one
    /// out; the others are `Blocked` behind it).
    by_key: HashMap<u64, VecDeque<u64>>,
    /// Derived: messages `Blocked` behind their key.
    blocked: u64,
}

impl QueueGroup {
    fn new(start: u64) -> QueueGroup {
        QueueGroup { cursors: [start; LANES], ..QueueGroup::default() }
    }

    /// The first offset never delivered, over every lane (`end` when all were).
    pub fn next_undelivered(&self, lanes: &LaneRuns, end: u64) -> u64 {
        let lowest = self.cursors.iter().copied().min().unwrap_or(end);
        if lanes.only_lane_zero(lowest, end) {
            return self.cursors[0].min(end);
        }
        (0..LANES).filter_map(|l| lanes.next_in_lane(l as u8, self.cursors[l], end)).min().unwrap_or(end)
    }

    /// The oldest offset not settled: the oldest unsettled slot, or the first offset
    /// never delivered.
    pub fn floor(&self, lanes: &LaneRuns, end: u64) -> u64 {
        let undelivered = self.next_undelivered(lanes, end);
        self.slots.keys().next().map_or(undelivered, |o| (*o).min(undelivered))
    }

    /// Leased messages held by `member`.
    pub fn leased_by(&self, member: &str) -> u32 {
        self.leased_by.get(member).copied().unwrap_or(0)
    }

    /// Leased messages per member.
    pub fn members(&self) -> impl Iterator<Item = (&str, u32)> {
        self.leased_by.iter().map(|(m, n)| (m.as_str(), *n))
    }

    /// Scheduled messages waiting for their first delivery (counted in `counts`'
    /// waiting too).
    pub fn scheduled(&self) -> u64 {
        self.scheduled
    }

    /// Messages held behind an earlier unsettled message with their key.
    pub fn blocked(&self) -> u64 {
        self.blocked
    }

    /// Keys whose unsettled message keeps failing (waiting for a retry or being
    /// dead-lettered) while later messages of the key wait behind it.
    pub fn parked_keys(&self) -> u64 {
        self.by_key
            .values()
            .filter(|q| q.len() > 1)
            .filter(|q| self.slots.get(&q[0]).is_some_and(|s| s.attempts > 0 && matches!(s.state, SlotState::Waiting { .. } | SlotState::DeadLettering { .. })))
            .count() as u64
    }

    /// Whether later messages of `offset`'s key wait behind it.
    pub fn holds_back_others(&self, offset: u64) -> bool {
        self.keys.get(&offset).and_then(|k| self.by_key.get(k)).is_some_and(|q| q.len() > 1 && q[0] == offset)
    }

    /// Messages leased, waiting for a retry (or their scheduled time, or their key),
    /// and being dead-lettered.
    pub fn counts(&self) -> (u64, u64, u64) {
        let leased: u64 = self.leased_by.values().map(|n| u64::from(*n)).sum();
        let dead = self.dead_lettering.len() as u64;
        (leased, self.slots.len() as u64 - leased - dead, dead)
    }

    /// Offsets whose lease deadline or retry time is at or before `now_ms`, oldest
    /// first, at most `max`: what may be delivered again (or, for an expired lease on
    /// the last attempt, dead-lettered).
    pub fn due(&self, now_ms: i64, max: usize) -> Vec<u64> {
        self.timers.iter().take_while(|(t, _)| *t <= now_ms).take(max).map(|(_, o)| *o).collect()
    }

    /// The earliest lease deadline or retry time, if any.
    pub fn next_due(&self) -> Option<i64> {
        self.timers.iter().next().map(|(t, _)| *t)
    }

    /// Offsets decided for the dead-letter topic and not yet settled.
    pub fn dead_lettering(&self) -> impl Iterator<Item = u64> + '_ {
        self.dead_lettering.iter().copied()
    }

    fn index(&mut self, offset: u64, slot: &Slot) {
        match &slot.state {
            SlotState::Leased { member, deadline_ms, .. } => {
                match self.leased_by.get_mut(member) {
                    Some(n) => *n += 1,
                    None => {
                        self.leased_by.insert(member.clone(), 1);
                    }
                }
                self.timers.insert((*deadline_ms, offset));
            }
            SlotState::Waiting { not_before_ms } => {
                self.timers.insert((*not_before_ms, offset));
                if slot.attempts == 0 {
                    self.scheduled += 1;
                }
            }
            SlotState::DeadLettering { .. } => {
                self.dead_lettering.insert(offset);
            }
            SlotState::Blocked => self.blocked += 1,
        }
    }

    fn unindex(&mut self, offset: u64, slot: &Slot) {
        match &slot.state {
            SlotState::Leased { member, deadline_ms, .. } => {
                if let Some(n) = self.leased_by.get_mut(member) {
                    *n -= 1;
                    if *n == 0 {
                        self.leased_by.remove(member);
                    }
                }
                self.timers.remove(&(*deadline_ms, offset));
            }
            SlotState::Waiting { not_before_ms } => {
                self.timers.remove(&(*not_before_ms, offset));
                if slot.attempts == 0 {
                    self.scheduled -= 1;
                }
            }
            SlotState::DeadLettering { .. } => {
                self.dead_lettering.remove(&offset);
            }
            SlotState::Blocked => self.blocked -= 1,
        }
    }

    /// `offset` was settled for good: if it was its key's message out, the next one of
    /// the key (if any) becomes due now.
    fn release_key(&mut self, offset: u64, now_ms: i64) {
        let Some(key) = self.keys.remove(&offset) else { return };
        let Some(queue) = self.by_key.get_mut(&key) else { return };
        queue.retain(|o| *o != offset);
        let next = queue.front().copied();
        if queue.is_empty() {
            self.by_key.remove(&key);
        }
        if let Some(next) = next {
            if matches!(self.slots.get(&next).map(|s| &s.state), Some(SlotState::Blocked)) {
                let mut slot = self.take(next).expect("looked up above");
                slot.state = SlotState::Waiting { not_before_ms: now_ms };
                self.put(next, slot);
            }
        }
    }

    fn put(&mut self, offset: u64, slot: Slot) {
        self.index(offset, &slot);
        if let Some(old) = self.slots.insert(offset, slot) {
            self.unindex(offset, &old);
        }
    }

    fn take(&mut self, offset: u64) -> Option<Slot> {
        let slot = self.slots.remove(&offset)?;
        self.unindex(offset, &slot);
        Some(slot)
    }

    fn rebuild(&mut self) {
        let slots = std::mem::take(&mut self.slots);
        self.leased_by.clear();
        self.timers.clear();
        self.dead_lettering.clear();
        self.scheduled = 0;
        self.blocked = 0;
        for (offset, slot) in slots {
            self.put(offset, slot);
        }
        self.by_key.clear();
        for (offset, key) in &self.keys {
            self.by_key.entry(*key).or_default().push_back(*offset);
        }
    }

    /// Applies a lease: redelivers the due offsets listed, and delivers new ones per
    /// lane from that lane's cursor (a range not starting there raced another lease and
    /// is ignored), skipping offsets never served, up to the window. Returns
    /// `(offset, attempt)` of every message leased.
    fn lease(&mut self, now_ms: i64, end: u64, served: &dyn Fn(u64) -> bool, lanes: &LaneRuns, lease: &Lease<'_>) -> Vec<(u64, u32)> {
        let Lease { member, deadline_ms, new, redeliver, deferred, keys, .. } = *lease;
        let member = bounded(member, MEMBER_BYTES_MAX);
        let mut out = Vec::new();
        for &offset in redeliver {
            let Some(mut slot) = self.take(offset) else { continue };
            let due = match &slot.state {
                SlotState::Leased { deadline_ms, .. } => *deadline_ms <= now_ms,
                SlotState::Waiting { not_before_ms } => *not_before_ms <= now_ms,
                SlotState::DeadLettering { .. } | SlotState::Blocked => false,
            };
            if !due {
                self.put(offset, slot);
                continue;
            }
            if slot.attempts == 0 {
                // A scheduled message whose time came: its first delivery.
                slot.first_delivery_ms = now_ms;
            } else {
                self.redelivered_total += 1;
            }
            if let SlotState::Leased { member, since_ms, .. } = &slot.state {
                let record = AttemptRecord {
                    attempt: slot.attempts,
                    member: member.clone(),
                    delivered_ms: *since_ms,
                    ended_ms: now_ms,
                    outcome: AttemptOutcome::Expired,
                    reason: String::new(),
                    class: String::new(),
                };
                push_history(&mut slot.history, record);
            }
            slot.attempts += 1;
            slot.state = SlotState::Leased { member: member.clone(), since_ms: now_ms, deadline_ms };
            out.push((offset, slot.attempts));
            self.put(offset, slot);
            self.delivered_total += 1;
        }
        for &(lane, from, until) in new {
            let l = usize::from(lane).min(LANES - 1);
            let cursor = self.cursors[l];
            if from != cursor || until <= cursor {
                continue;
            }
            let until = until.min(end);
            // Where the lane's cursor goes: the range's end, or where the window filled.
            let mut stop = until;
            'segments: for (seg_from, seg_to) in lanes.lane_segments(l as u8, cursor, until) {
                for offset in seg_from..seg_to {
                    if self.slots.len() as u64 >= QUEUE_WINDOW_MAX {
                        stop = offset;
                        break 'segments;
                    }
                    if !served(offset) {
                        continue;
                    }
                    if let Ok(i) = keys.binary_search_by_key(&offset, |(o, _)| *o) {
                        let key = keys[i].1;
                        self.keys.insert(offset, key);
                        let queue = self.by_key.entry(key).or_default();
                        queue.push_back(offset);
                        if queue.len() > 1 {
                            // Its key has a message out: it waits its turn.
                            self.put(offset, Slot { attempts: 0, first_delivery_ms: now_ms, state: SlotState::Blocked, history: Vec::new() });
                            continue;
                        }
                    }
                    if let Ok(i) = deferred.binary_search_by_key(&offset, |(o, _)| *o) {
                        let not_before_ms = deferred[i].1;
                        if not_before_ms > now_ms {
                            // Waits, holding no member's slot; `first_delivery_ms` is
                            // when it is due until it is delivered.
                            let slot = Slot { attempts: 0, first_delivery_ms: not_before_ms, state: SlotState::Waiting { not_before_ms }, history: Vec::new() };
                            self.put(offset, slot);
                            continue;
                        }
                    }
                    let slot = Slot {
                        attempts: 1,
                        first_delivery_ms: now_ms,
                        state: SlotState::Leased { member: member.clone(), since_ms: now_ms, deadline_ms },
                        history: Vec::new(),
                    };
                    self.put(offset, slot);
                    out.push((offset, 1));
                    self.delivered_total += 1;
                }
            }
            self.cursors[l] = cursor.max(stop);
        }
        out
    }

    fn settle(&mut self, now_ms: i64, lanes: &LaneRuns, member: &str, offset: u64, attempt: u32, settle: &Settle) -> SettleResult {
        let Some(slot) = self.slots.get(&offset) else {
            let cursor = self.cursors[usize::from(lanes.lane_of(offset)).min(LANES - 1)];
            return if offset < cursor { SettleResult::AlreadySettled } else { SettleResult::NotDelivered };
        };
        if matches!(slot.state, SlotState::DeadLettering { .. }) {
            return SettleResult::DeadLettering;
        }
        if slot.attempts == 0 {
            // Scheduled, not delivered yet: nobody can have processed it.
            return SettleResult::NotDelivered;
        }
        if let Settle::Ack = settle {
            self.take(offset);
            self.release_key(offset, now_ms);
            self.acked_total += 1;
            return SettleResult::Done;
        }
        let holds = match (&slot.state, settle) {
            // The leader expires whoever held the lease, once it ran out.
            (SlotState::Leased { deadline_ms, .. }, Settle::Expire { .. }) => slot.attempts == attempt && *deadline_ms <= now_ms,
            (SlotState::Leased { member: holder, .. }, _) => holder == member && slot.attempts == attempt,
            _ => false,
        };
        if !holds {
            return SettleResult::StaleLease { attempts: slot.attempts };
        }
        let mut slot = self.take(offset).expect("looked up above");
        let SlotState::Leased { member: holder, since_ms, deadline_ms } = slot.state.clone() else { unreachable!("checked above") };
        let finish = |slot: &mut Slot, outcome: AttemptOutcome, reason: &str, class: &str| {
            let record = AttemptRecord {
                attempt: slot.attempts,
                member: holder.clone(),
                delivered_ms: since_ms,
                ended_ms: now_ms,
                outcome,
                reason: bounded(reason, REASON_BYTES_MAX),
                class: bounded(class, CLASS_BYTES_MAX),
            };
            push_history(&mut slot.history, record);
        };
        slot.state = match settle {
            Settle::Ack => unreachable!("handled above"),
            Settle::Extend { deadline_ms: to } => SlotState::Leased { member: holder.clone(), since_ms, deadline_ms: deadline_ms.max(*to) },
            Settle::Nack { not_before_ms, reason, class, dead_letter } => {
                finish(&mut slot, AttemptOutcome::Nacked, reason, class);
                if *dead_letter {
                    let reason = format!("max deliveries reached ({} attempts); last: {}", slot.attempts, bounded(reason, REASON_BYTES_MAX));
                    SlotState::DeadLettering { cause: DeadLetterCause::MaxDeliveries, reason, class: bounded(class, CLASS_BYTES_MAX), since_ms: now_ms }
                } else {
                    SlotState::Waiting { not_before_ms: (*not_before_ms).max(now_ms) }
                }
            }
            Settle::Term { reason, class } => {
                finish(&mut slot, AttemptOutcome::Termed, reason, class);
                SlotState::DeadLettering {
                    cause: DeadLetterCause::Term,
                    reason: bounded(reason, REASON_BYTES_MAX),
                    class: bounded(class, CLASS_BYTES_MAX),
                    since_ms: now_ms,
                }
            }
            Settle::Expire { reason } => {
                finish(&mut slot, AttemptOutcome::Expired, "", "");
                SlotState::DeadLettering {
                    cause: DeadLetterCause::LeaseExpired,
                    reason: bounded(reason, REASON_BYTES_MAX),
                    class: String::new(),
                    since_ms: now_ms,
                }
            }
        };
        self.put(offset, slot);
        SettleResult::Done
    }

    fn dead_lettered(&mut self, now_ms: i64, offset: u64) -> bool {
        match self.slots.get(&offset) {
            Some(Slot { state: SlotState::DeadLettering { .. }, .. }) => {
                self.take(offset);
                self.release_key(offset, now_ms);
                self.dead_lettered_total += 1;
                true
            }
            _ => false,
        }
    }
}

fn push_history(history: &mut Vec<AttemptRecord>, record: AttemptRecord) {
    if history.len() >= ATTEMPTS_REMEMBERED {
        history.remove(0);
    }
    history.push(record);
}

/// Every consumer group's state in one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerGroups {
    pub streams: BTreeMap<String, StreamCursor>,
    pub queues: BTreeMap<String, QueueGroup>,
}

/// A queue group as snapshotted before lanes (version 2).
#[derive(Serialize, Deserialize)]
struct QueuePartsV2 {
    cursor: u64,
    slots: Vec<(u64, Slot)>,
    delivered_total: u64,
    redelivered_total: u64,
    acked_total: u64,
    dead_lettered_total: u64,
}

/// [`ConsumerGroups`] as snapshotted before lanes (version 2).
#[derive(Serialize, Deserialize, Default)]
pub struct ConsumerPartsV2 {
    streams: Vec<(String, StreamCursor)>,
    queues: Vec<(String, QueuePartsV2)>,
}

/// A queue group as snapshotted (the derived indexes are rebuilt on load).
#[derive(Serialize, Deserialize)]
struct QueueParts {
    cursors: Vec<u64>,
    slots: Vec<(u64, Slot)>,
    delivered_total: u64,
    redelivered_total: u64,
    acked_total: u64,
    dead_lettered_total: u64,
    /// Ordered groups: `(offset, key hash)` of the unsettled keyed messages.
    keys: Vec<(u64, u64)>,
}

/// [`ConsumerGroups`] as snapshotted.
#[derive(Serialize, Deserialize, Default)]
pub struct ConsumerParts {
    streams: Vec<(String, StreamCursor)>,
    queues: Vec<(String, QueueParts)>,
}

impl ConsumerGroups {
    /// Retention cut the partition at `start`: every queue group's messages below it are
    /// gone. Its unsettled ones there (leased, waiting for a retry or for the dead-letter
    /// topic) are dropped, and its never-delivered ones skipped: the group goes on from
    /// `start`. Returns, per group that lost any, how many messages (unsettled ones, and
    /// never-delivered ones counted as offsets, so a batch refused by the fold counts
    /// too). Stream groups need nothing: a position behind the start is answered
    /// `OffsetOutOfRange` with the start when read.
    pub fn retain(&mut self, start: u64) -> Vec<(String, u64)> {
        let mut lost = Vec::new();
        for (name, q) in &mut self.queues {
            let dropped = q.slots.range(..start).count() as u64;
            let skipped: u64 = q.cursors.iter().map(|c| start.saturating_sub(*c)).max().unwrap_or(0);
            if dropped == 0 && skipped == 0 {
                continue;
            }
            q.slots = q.slots.split_off(&start);
            q.keys = q.keys.split_off(&start);
            for c in &mut q.cursors {
                *c = (*c).max(start);
            }
            q.rebuild();
            lost.push((name.clone(), dropped + skipped));
        }
        lost
    }

    /// A commit of stream group `group`'s position; `generation` `None` is an
    /// administrative reset (the coordinator checked the group has no members).
    pub fn commit(&mut self, now_ms: i64, end: u64, group: &str, generation: Option<u64>, offset: u64) -> CommitResult {
        if offset > end {
            return CommitResult::BeyondEnd { end };
        }
        let current = self.streams.get(group).map_or(0, |c| c.generation);
        if let Some(g) = generation {
            if g < current {
                return CommitResult::StaleGeneration { current };
            }
        }
        let generation = generation.unwrap_or(current).max(current);
        self.streams.insert(group.to_string(), StreamCursor { offset, generation, committed_at_ms: now_ms });
        CommitResult::Committed
    }

    /// Applies a lease for queue group `group` (created at `lease.start` on its first).
    pub fn lease(&mut self, now_ms: i64, end: u64, served: &dyn Fn(u64) -> bool, lanes: &LaneRuns, group: &str, lease: &Lease<'_>) -> Vec<(u64, u32)> {
        if !self.queues.contains_key(group) {
            self.queues.insert(group.to_string(), QueueGroup::new(lease.start.min(end)));
        }
        let q = self.queues.get_mut(group).expect("inserted above");
        q.lease(now_ms, end, served, lanes, lease)
    }

    /// Applies settle requests of `member` (`(offset, attempt, what)`), in order.
    pub fn settle(&mut self, now_ms: i64, lanes: &LaneRuns, group: &str, member: &str, settles: &[(u64, u32, Settle)]) -> Vec<SettleResult> {
        let Some(q) = self.queues.get_mut(group) else { return settles.iter().map(|_| SettleResult::NotDelivered).collect() };
        settles.iter().map(|(offset, attempt, s)| q.settle(now_ms, lanes, member, *offset, *attempt, s)).collect()
    }

    /// Settles messages whose dead letters are committed; returns how many were
    /// still being dead-lettered (a repeat of the same entry settles nothing).
    pub fn dead_lettered(&mut self, now_ms: i64, group: &str, offsets: &[u64]) -> u32 {
        let Some(q) = self.queues.get_mut(group) else { return 0 };
        offsets.iter().filter(|o| q.dead_lettered(now_ms, **o)).count() as u32
    }

    pub fn to_parts(&self) -> ConsumerParts {
        ConsumerParts {
            streams: self.streams.iter().map(|(g, c)| (g.clone(), c.clone())).collect(),
            queues: self
                .queues
                .iter()
                .map(|(g, q)| {
                    let parts = QueueParts {
                        cursors: q.cursors.to_vec(),
                        slots: q.slots.iter().map(|(o, s)| (*o, s.clone())).collect(),
                        delivered_total: q.delivered_total,
                        redelivered_total: q.redelivered_total,
                        acked_total: q.acked_total,
                        dead_lettered_total: q.dead_lettered_total,
                        keys: q.keys.iter().map(|(o, k)| (*o, *k)).collect(),
                    };
                    (g.clone(), parts)
                })
                .collect(),
        }
    }

    /// Groups from a version-2 snapshot (one cursor: every lane starts there).
    pub fn from_parts_v2(parts: ConsumerPartsV2) -> ConsumerGroups {
        let queues = parts
            .queues
            .into_iter()
            .map(|(g, p)| {
                let parts = QueueParts {
                    cursors: vec![p.cursor; LANES],
                    slots: p.slots,
                    delivered_total: p.delivered_total,
                    redelivered_total: p.redelivered_total,
                    acked_total: p.acked_total,
                    dead_lettered_total: p.dead_lettered_total,
                    keys: Vec::new(),
                };
                (g, parts)
            })
            .collect();
        ConsumerGroups::from_parts(ConsumerParts { streams: parts.streams, queues })
    }

    pub fn from_parts(parts: ConsumerParts) -> ConsumerGroups {
        let queues = parts
            .queues
            .into_iter()
            .map(|(g, p)| {
                let mut cursors = [p.cursors.iter().copied().min().unwrap_or(0); LANES];
                for (c, v) in cursors.iter_mut().zip(&p.cursors) {
                    *c = *v;
                }
                let mut q = QueueGroup {
                    cursors,
                    slots: p.slots.into_iter().collect(),
                    delivered_total: p.delivered_total,
                    redelivered_total: p.redelivered_total,
                    acked_total: p.acked_total,
                    dead_lettered_total: p.dead_lettered_total,
                    keys: p.keys.into_iter().collect(),
                    ..QueueGroup::default()
                };
                q.rebuild();
                (g, q)
            })
            .collect();
        ConsumerGroups { streams: parts.streams.into_iter().collect(), queues }
    }
}

/// Builds version-2 snapshot parts, for the snapshot compatibility test.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub fn to_parts_v2(parts: &ConsumerParts) -> ConsumerPartsV2 {
        ConsumerPartsV2 {
            streams: parts.streams.clone(),
            queues: parts
                .queues
                .iter()
                .map(|(g, q)| {
                    let v2 = QueuePartsV2 {
                        cursor: q.cursors[0],
                        slots: q.slots.clone(),
                        delivered_total: q.delivered_total,
                        redelivered_total: q.redelivered_total,
                        acked_total: q.acked_total,
                        dead_lettered_total: q.dead_lettered_total,
                    };
                    (g.clone(), v2)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static NO_LANES: std::sync::LazyLock<LaneRuns> = std::sync::LazyLock::new(LaneRuns::default);

    fn all(_: u64) -> bool {
        true
    }

    fn lease_new(g: &mut ConsumerGroups, now: i64, end: u64, member: &str, until: u64) -> Vec<(u64, u32)> {
        let from = g.queues.get("q").map_or(0, |q| q.cursors[0]);
        g.lease(
            now,
            end,
            &all,
            &NO_LANES,
            "q",
            &Lease { member, deadline_ms: now + 30_000, start: from, new: &[(0, from, until)], redeliver: &[], deferred: &[], keys: &[] },
        )
    }

    fn nack(now: i64, retry_at: i64) -> Settle {
        Settle::Nack { not_before_ms: retry_at, reason: format!("failed at {now}"), class: "test".into(), dead_letter: false }
    }

    #[test]
    fn a_lease_delivers_from_the_cursor_and_an_ack_settles() {
        let mut g = ConsumerGroups::default();
        assert_eq!(lease_new(&mut g, 1_000, 10, "a", 3), vec![(0, 1), (1, 1), (2, 1)]);
        let q = &g.queues["q"];
        assert_eq!((q.cursors[0], q.floor(&NO_LANES, u64::MAX), q.leased_by("a")), (3, 0, 3));
        assert_eq!(g.settle(1_100, &NO_LANES, "q", "a", &[(1, 1, Settle::Ack)]), vec![SettleResult::Done]);
        assert_eq!(g.settle(1_100, &NO_LANES, "q", "b", &[(1, 1, Settle::Ack)]), vec![SettleResult::AlreadySettled], "an ack is idempotent");
        assert_eq!(g.settle(1_100, &NO_LANES, "q", "a", &[(7, 1, Settle::Ack)]), vec![SettleResult::NotDelivered]);
        assert_eq!(g.queues["q"].floor(&NO_LANES, u64::MAX), 0, "offset 0 is still leased");
        g.settle(1_100, &NO_LANES, "q", "a", &[(0, 1, Settle::Ack), (2, 1, Settle::Ack)]);
        let q = &g.queues["q"];
        assert_eq!((q.floor(&NO_LANES, u64::MAX), q.leased_by("a"), q.acked_total), (3, 0, 3));
    }

    #[test]
    fn a_lease_never_passes_the_end_of_the_log_or_the_window() {
        let mut g = ConsumerGroups::default();
        assert_eq!(lease_new(&mut g, 0, 2, "a", 100).len(), 2);
        assert_eq!(g.queues["q"].cursors[0], 2);
        let mut g = ConsumerGroups::default();
        let got = lease_new(&mut g, 0, u64::MAX, "a", QUEUE_WINDOW_MAX + 50);
        assert_eq!(got.len() as u64, QUEUE_WINDOW_MAX, "the window bounds what an unsettled offset 0 lets through");
        g.settle(0, &NO_LANES, "q", "a", &[(0, 1, Settle::Ack)]);
        assert_eq!(lease_new(&mut g, 0, u64::MAX, "a", QUEUE_WINDOW_MAX + 50), vec![(QUEUE_WINDOW_MAX, 1)]);
    }

    #[test]
    fn a_lease_that_raced_another_is_refused_for_its_new_part() {
        let mut g = ConsumerGroups::default();
        lease_new(&mut g, 0, 10, "a", 5);
        assert!(
            g.lease(
                0,
                10,
                &all,
                &NO_LANES,
                "q",
                &Lease { member: "b", deadline_ms: 30_000, start: 0, new: &[(0, 0, 5)], redeliver: &[], deferred: &[], keys: &[] }
            )
            .is_empty(),
            "offsets 0..5 were leased to a"
        );
        assert_eq!(g.queues["q"].leased_by("b"), 0);
    }

    #[test]
    fn offsets_never_served_are_skipped_and_count_as_settled() {
        let mut g = ConsumerGroups::default();
        let served = |o: u64| !(2..4).contains(&o);
        assert_eq!(
            g.lease(
                0,
                6,
                &served,
                &NO_LANES,
                "q",
                &Lease { member: "a", deadline_ms: 10, start: 0, new: &[(0, 0, 6)], redeliver: &[], deferred: &[], keys: &[] }
            ),
            vec![(0, 1), (1, 1), (4, 1), (5, 1)]
        );
        assert_eq!(g.settle(0, &NO_LANES, "q", "a", &[(2, 1, Settle::Ack)]), vec![SettleResult::AlreadySettled]);
    }

    #[test]
    fn a_nack_waits_for_its_retry_time_then_redelivers_with_the_next_attempt() {
        let mut g = ConsumerGroups::default();
        lease_new(&mut g, 0, 10, "a", 1);
        assert_eq!(g.settle(100, &NO_LANES, "q", "a", &[(0, 1, nack(100, 1_100))]), vec![SettleResult::Done]);
        let q = &g.queues["q"];
        assert_eq!(q.leased_by("a"), 0, "a waiting message holds no in-flight slot");
        assert!(q.due(1_099, 10).is_empty());
        assert_eq!(q.due(1_100, 10), vec![0]);
        assert!(
            g.lease(
                1_000,
                10,
                &all,
                &NO_LANES,
                "q",
                &Lease { member: "b", deadline_ms: 31_000, start: 1, new: &[(0, 1, 1)], redeliver: &[0], deferred: &[], keys: &[] }
            )
            .is_empty(),
            "not due yet at 1000"
        );
        assert_eq!(
            g.lease(
                1_100,
                10,
                &all,
                &NO_LANES,
                "q",
                &Lease { member: "b", deadline_ms: 31_100, start: 1, new: &[(0, 1, 1)], redeliver: &[0], deferred: &[], keys: &[] }
            ),
            vec![(0, 2)]
        );
        let slot = &g.queues["q"].slots[&0];
        assert_eq!(slot.history.len(), 1);
        assert_eq!((slot.history[0].outcome, slot.history[0].member.as_str(), slot.history[0].reason.as_str()), (AttemptOutcome::Nacked, "a", "failed at 100"));
    }

    #[test]
    fn only_the_current_lease_holder_may_nack_extend_or_term() {
        let mut g = ConsumerGroups::default();
        lease_new(&mut g, 0, 10, "a", 1);
        // a's lease expires and b gets attempt 2
        assert_eq!(
            g.lease(
                30_000,
                10,
                &all,
                &NO_LANES,
                "q",
                &Lease { member: "b", deadline_ms: 60_000, start: 1, new: &[(0, 1, 1)], redeliver: &[0], deferred: &[], keys: &[] }
            ),
            vec![(0, 2)]
        );
        assert_eq!(g.settle(30_001, &NO_LANES, "q", "a", &[(0, 1, nack(30_001, 0))]), vec![SettleResult::StaleLease { attempts: 2 }]);
        assert_eq!(g.settle(30_001, &NO_LANES, "q", "a", &[(0, 1, Settle::Extend { deadline_ms: 99_000 })]), vec![SettleResult::StaleLease { attempts: 2 }]);
        assert_eq!(g.settle(30_001, &NO_LANES, "q", "b", &[(0, 2, Settle::Extend { deadline_ms: 90_000 })]), vec![SettleResult::Done]);
        assert_eq!(g.queues["q"].next_due(), Some(90_000));
        assert_eq!(g.settle(30_001, &NO_LANES, "q", "b", &[(0, 2, Settle::Extend { deadline_ms: 40_000 })]), vec![SettleResult::Done]);
        assert_eq!(g.queues["q"].next_due(), Some(90_000), "an extension never shortens a lease");
        assert_eq!(g.queues["q"].slots[&0].history[0].outcome, AttemptOutcome::Expired);
        assert_eq!(g.settle(30_002, &NO_LANES, "q", "a", &[(0, 1, Settle::Ack)]), vec![SettleResult::Done], "a late ack still settles it");
    }

    #[test]
    fn a_term_or_the_last_nack_dead_letters_and_the_dead_letter_settles_once() {
        let mut g = ConsumerGroups::default();
        lease_new(&mut g, 0, 10, "a", 2);
        g.settle(5, &NO_LANES, "q", "a", &[(0, 1, Settle::Term { reason: "bad schema".into(), class: "validation".into() })]);
        g.settle(5, &NO_LANES, "q", "a", &[(1, 1, Settle::Nack { not_before_ms: 0, reason: "boom".into(), class: String::new(), dead_letter: true })]);
        let q = &g.queues["q"];
        assert_eq!(q.dead_lettering().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(q.counts(), (0, 0, 2));
        assert!(matches!(&q.slots[&1].state, SlotState::DeadLettering { reason, .. } if reason.contains("max deliveries") && reason.contains("boom")));
        assert_eq!(g.settle(6, &NO_LANES, "q", "a", &[(0, 1, Settle::Ack)]), vec![SettleResult::DeadLettering]);
        assert_eq!(g.dead_lettered(10, "q", &[0, 1]), 2);
        assert_eq!(g.dead_lettered(10, "q", &[0, 1]), 0, "a repeated entry settles nothing");
        let q = &g.queues["q"];
        assert_eq!((q.floor(&NO_LANES, u64::MAX), q.dead_lettered_total), (2, 2));
    }

    #[test]
    fn an_expiry_dead_letters_only_a_lease_that_ran_out() {
        let mut g = ConsumerGroups::default();
        lease_new(&mut g, 0, 10, "a", 1);
        let expire = Settle::Expire { reason: "lease expired".into() };
        assert_eq!(g.settle(29_999, &NO_LANES, "q", "a", &[(0, 1, expire.clone())]), vec![SettleResult::StaleLease { attempts: 1 }]);
        assert_eq!(g.settle(30_000, &NO_LANES, "q", "a", &[(0, 1, expire)]), vec![SettleResult::Done]);
        assert_eq!(g.queues["q"].dead_lettering().count(), 1);
    }

    #[test]
    fn a_stream_commit_from_an_older_generation_is_refused() {
        let mut g = ConsumerGroups::default();
        assert_eq!(g.commit(0, 100, "s", Some(3), 50), CommitResult::Committed);
        assert_eq!(g.commit(0, 100, "s", Some(2), 70), CommitResult::StaleGeneration { current: 3 });
        assert_eq!(g.commit(0, 100, "s", Some(3), 40), CommitResult::Committed, "the same generation may seek back");
        assert_eq!(g.commit(0, 100, "s", Some(4), 101), CommitResult::BeyondEnd { end: 100 });
        assert_eq!(g.commit(0, 100, "s", None, 10), CommitResult::Committed);
        assert_eq!(g.streams["s"].generation, 3, "a reset keeps the generation fence");
    }

    #[test]
    fn the_derived_indexes_are_rebuilt_from_a_snapshot() {
        let mut g = ConsumerGroups::default();
        lease_new(&mut g, 0, 10, "a", 4);
        g.settle(1, &NO_LANES, "q", "a", &[(0, 1, nack(1, 500)), (1, 1, Settle::Term { reason: "x".into(), class: String::new() }), (2, 1, Settle::Ack)]);
        g.commit(3, 10, "s", Some(1), 7);
        let back = ConsumerGroups::from_parts(g.to_parts());
        assert_eq!(back, g);
        assert_eq!(back.queues["q"].due(500, 10), vec![0]);
        assert_eq!(back.queues["q"].leased_by("a"), 1);
    }

    #[test]
    fn long_reasons_and_names_are_cut_at_a_character_boundary() {
        assert_eq!(bounded("héllo", 2), "h");
        assert_eq!(bounded("abc", 10), "abc");
        let mut g = ConsumerGroups::default();
        lease_new(&mut g, 0, 10, "a", 1);
        g.settle(1, &NO_LANES, "q", "a", &[(0, 1, Settle::Term { reason: "é".repeat(REASON_BYTES_MAX), class: String::new() })]);
        let SlotState::DeadLettering { reason, .. } = &g.queues["q"].slots[&0].state else { panic!("dead-lettering") };
        assert!(reason.len() <= REASON_BYTES_MAX);
    }

    #[test]
    fn a_scheduled_message_waits_without_an_attempt_then_is_delivered_as_attempt_one() {
        let mut g = ConsumerGroups::default();
        let deferred = [(1u64, 5_000i64)];
        let lease = |g: &mut ConsumerGroups, now: i64, new: &[(u8, u64, u64)], redeliver: &[u64], deferred: &[(u64, i64)]| {
            g.lease(now, 3, &all, &NO_LANES, "q", &Lease { member: "a", deadline_ms: now + 30_000, start: 0, new, redeliver, deferred, keys: &[] })
        };
        assert_eq!(lease(&mut g, 1_000, &[(0, 0, 3)], &[], &deferred), vec![(0, 1), (2, 1)], "offset 1 waits for 5,000");
        let q = &g.queues["q"];
        assert_eq!((q.leased_by("a"), q.scheduled(), q.counts()), (2, 1, (2, 1, 0)), "it holds no member's slot");
        assert_eq!(q.due(4_999, 10), Vec::<u64>::new());
        assert_eq!(q.due(5_000, 10), vec![1]);
        assert_eq!(g.settle(2_000, &NO_LANES, "q", "a", &[(1, 0, Settle::Ack)]), vec![SettleResult::NotDelivered], "nobody can ack it before it is delivered");
        // Too early: the fold judges the time with the entry's clock, not the leader's plan.
        assert!(lease(&mut g, 4_000, &[], &[1], &[]).is_empty());
        assert_eq!(lease(&mut g, 5_000, &[], &[1], &[]), vec![(1, 1)], "its first delivery is attempt 1");
        let q = &g.queues["q"];
        assert_eq!((q.scheduled(), q.redelivered_total, q.delivered_total, q.slots[&1].first_delivery_ms), (0, 0, 3, 5_000));
        // A deferral whose time has come by the entry's time is leased at once.
        let mut g = ConsumerGroups::default();
        assert_eq!(lease(&mut g, 6_000, &[(0, 0, 3)], &[], &deferred), vec![(0, 1), (1, 1), (2, 1)]);
    }

    #[test]
    fn an_ordered_group_has_one_message_per_key_out_and_parks_a_failing_key() {
        let mut g = ConsumerGroups::default();
        let (a, b) = (11u64, 22u64);
        let keys = [(0, a), (1, b), (2, a), (3, b), (4, a)];
        let lease = |g: &mut ConsumerGroups, now: i64, new: &[(u8, u64, u64)], redeliver: &[u64], keys: &[(u64, u64)]| {
            g.lease(now, 6, &all, &NO_LANES, "q", &Lease { member: "m", deadline_ms: now + 30_000, start: 0, new, redeliver, deferred: &[], keys })
        };
        assert_eq!(lease(&mut g, 1_000, &[(0, 0, 6)], &[], &keys), vec![(0, 1), (1, 1), (5, 1)], "one per key; unkeyed 5 is free");
        let q = &g.queues["q"];
        assert_eq!((q.blocked(), q.leased_by("m"), q.due(i64::MAX, 10).len()), (3, 3, 3), "blocked ones hold no slot and are not due");
        // Key a's message acked: the next of a is due now, as a first delivery.
        g.settle(1_100, &NO_LANES, "q", "m", &[(0, 1, Settle::Ack)]);
        assert_eq!(g.queues["q"].due(1_100, 10), vec![2]);
        assert_eq!(lease(&mut g, 1_100, &[], &[2], &[]), vec![(2, 1)]);
        // Key b's message fails: b is parked (3 waits), a keeps flowing.
        g.settle(1_200, &NO_LANES, "q", "m", &[(1, 1, nack(1_200, 5_000))]);
        assert_eq!(g.queues["q"].parked_keys(), 1);
        assert!(g.queues["q"].holds_back_others(1));
        g.settle(1_300, &NO_LANES, "q", "m", &[(2, 1, Settle::Ack)]);
        assert_eq!(lease(&mut g, 1_300, &[], &[4], &[]), vec![(4, 1)], "a's last message");
        assert_eq!(g.settle(1_300, &NO_LANES, "q", "m", &[(3, 0, Settle::Ack)]), vec![SettleResult::NotDelivered], "a blocked message cannot be acked");
        // b's message dead-lettered and committed: 3 is released, in order.
        assert_eq!(lease(&mut g, 5_000, &[], &[1], &[]), vec![(1, 2)]);
        g.settle(5_100, &NO_LANES, "q", "m", &[(1, 2, Settle::Term { reason: "poison".into(), class: String::new() })]);
        assert_eq!(g.queues["q"].parked_keys(), 1, "still parked while it is being dead-lettered");
        let snapshot = ConsumerGroups::from_parts(g.to_parts());
        assert_eq!(snapshot.queues["q"].parked_keys(), 1, "keys survive a snapshot");
        assert_eq!(g.dead_lettered(5_200, "q", &[1]), 1);
        assert_eq!((g.queues["q"].parked_keys(), g.queues["q"].due(5_200, 10)), (0, vec![3]));
    }
}
