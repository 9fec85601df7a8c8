//! The queue rows (workload W2 `queue`): every acknowledged message is acked by a
//! member or dead-lettered — exactly one of the two, once — and the attempt numbers the
//! broker gives a message never repeat and never pass max deliveries, across faults.
//!
//! A message whose ack ended with an unknown outcome (`info`) may be settled by that ack,
//! so it is never counted lost. Acked means a settle answered `acked`: the broker says it recorded *this* ack, so
//! two such answers for one message mean an ack was answered without being recorded
//! (the second should have been `already-settled`). An attempt number delivered twice
//! means a delivery count was forgotten (a leader that did not know the count). A
//! scheduled message received before its `keel-deliver-at` time was delivered early
//! (the member and the nodes share one clock).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{Rows, Stats, Verdict};
use crate::history::{DeadLetterOp, DeliverOp, Kind, SettleOp};

/// Every queue row and its verdict.
pub(super) const ROWS: &[(&str, Verdict)] = &[
    ("queue-lost", Verdict::Forbidden),
    ("queue-double-ack", Verdict::Forbidden),
    ("queue-acked-and-dead-lettered", Verdict::Forbidden),
    ("queue-dead-lettered-twice", Verdict::Forbidden),
    ("queue-attempt-repeated", Verdict::Forbidden),
    ("queue-attempts-over-max", Verdict::Forbidden),
    ("queue-delivered-early", Verdict::Forbidden),
    ("queue-redelivered", Verdict::Allowed),
];

/// What the history says about the queue workload.
#[derive(Default)]
pub(super) struct QueueSeen {
    pub deliveries: Vec<DeliverOp>,
    /// Settle completions.
    pub settles: Vec<(SettleOp, Kind)>,
    pub dead_letters: Vec<DeadLetterOp>,
    pub drained: bool,
}

impl QueueSeen {
    /// Whether the queue workload ran at all.
    pub fn active(&self) -> bool {
        !self.deliveries.is_empty() || !self.dead_letters.is_empty() || self.drained
    }
}

/// Applies the queue rows. `acked_sends` are the acknowledged sends to `topic`:
/// `(partition, offset, msg)`. `max_deliveries` is the topic's setting.
pub(super) fn check(seen: &QueueSeen, topic: &str, acked_sends: &[(u32, u64, String)], max_deliveries: u32, rows: &mut Rows, stats: &mut Stats) {
    type Key = (u32, u64);
    let mut attempts: HashMap<Key, BTreeSet<u32>> = HashMap::new();
    for d in seen.deliveries.iter().filter(|d| d.topic == topic) {
        stats.queue_delivered += 1;
        let key = (d.partition, d.offset);
        if !attempts.entry(key).or_default().insert(d.attempt) {
            rows.row("queue-attempt-repeated")
                .add(|| format!("{topic}/{}@{} ({}): attempt {} delivered again, to {}", d.partition, d.offset, d.msg, d.attempt, d.member));
        }
        if d.attempt > max_deliveries {
            rows.row("queue-attempts-over-max")
                .add(|| format!("{topic}/{}@{}: attempt {} > max deliveries {max_deliveries}", d.partition, d.offset, d.attempt));
        }
        if let Some(at) = d.deliver_at_ms.filter(|at| d.received_ms < *at) {
            rows.row("queue-delivered-early").add(|| {
                format!(
                    "{topic}/{}@{} ({}): attempt {} received at {}, {} ms before its time {at}",
                    d.partition,
                    d.offset,
                    d.msg,
                    d.attempt,
                    d.received_ms,
                    at - d.received_ms
                )
            });
        }
        if d.attempt > 1 {
            stats.queue_redelivered += 1;
            rows.row("queue-redelivered").add(|| format!("{topic}/{}@{} attempt {}", d.partition, d.offset, d.attempt));
        }
    }
    let mut acked: BTreeMap<Key, u32> = BTreeMap::new();
    let mut settled: BTreeSet<Key> = BTreeSet::new();
    // An ack whose answer was lost may have been recorded: the message may be settled.
    let mut maybe_settled: BTreeSet<Key> = BTreeSet::new();
    for (s, kind) in seen.settles.iter().filter(|(s, _)| s.topic == topic) {
        if s.verb == "ack" && *kind == Kind::Info {
            maybe_settled.insert((s.partition, s.offset));
        }
        if *kind != Kind::Ok || s.verb != "ack" {
            continue;
        }
        match s.outcome.as_deref() {
            Some("acked") => {
                *acked.entry((s.partition, s.offset)).or_default() += 1;
                settled.insert((s.partition, s.offset));
            }
            Some("already-settled") => {
                settled.insert((s.partition, s.offset));
            }
            _ => {}
        }
    }
    stats.queue_acked = acked.len() as u64;
    for ((p, o), n) in &acked {
        if *n > 1 {
            rows.row("queue-double-ack").add(|| format!("{topic}/{p}@{o}: {n} acks answered `acked`"));
        }
    }
    let mut dead: BTreeMap<Key, u32> = BTreeMap::new();
    for d in seen.dead_letters.iter().filter(|d| d.topic == topic) {
        *dead.entry((d.source_partition, d.source_offset)).or_default() += 1;
    }
    stats.queue_dead_lettered = dead.len() as u64;
    for ((p, o), n) in &dead {
        if *n > 1 {
            rows.row("queue-dead-lettered-twice").add(|| format!("{topic}/{p}@{o}: {n} dead letters"));
        }
        if acked.contains_key(&(*p, *o)) {
            rows.row("queue-acked-and-dead-lettered").add(|| format!("{topic}/{p}@{o}: acked and dead-lettered"));
        }
    }
    if seen.drained {
        for (p, o, msg) in acked_sends {
            if !settled.contains(&(*p, *o)) && !dead.contains_key(&(*p, *o)) && !maybe_settled.contains(&(*p, *o)) {
                rows.row("queue-lost").add(|| format!("{topic}/{p}@{o} ({msg}): acknowledged, never acked nor dead-lettered"));
            }
        }
    }
}
