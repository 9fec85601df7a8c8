//! The checker: a history in, a verdict out. Every anomaly row of
//! `shared/notes/jepsen.md` §3 that applies to the log workloads is checked, with its
//! verdict (forbidden, or allowed and counted), and a run that exercised too little
//! (the *vacuity floors*) is invalid even with no anomaly.
//!
//! The queue workload's rows are in [`queue`].
//!
//! Terms: A = sends acknowledged (`ok`), U = sends whose outcome is unknown (`info`, or
//! no completion), F = sends that definitely failed (`fail`), R = every message read
//! anywhere (polls, whatever their completion, and each node's final log dump).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::history::{Actor, Event, Kind, Op, Read, ReplayOp, SendOp, SettleOp};
use crate::workload::{LOG_TOPIC, QUEUE_MAX_DELIVERIES, QUEUE_TOPIC};

/// Whether an anomaly may occur.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Any occurrence makes the run invalid.
    Forbidden,
    /// Allowed by the contract; counted and reported.
    Allowed,
}

/// One anomaly row's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Anomaly {
    pub name: &'static str,
    pub verdict: Verdict,
    pub count: u64,
    /// At most `EXAMPLES_MAX` occurrences, described.
    pub examples: Vec<String>,
}

/// Occurrences described per anomaly.
pub const EXAMPLES_MAX: usize = 8;

/// What a run must at least have done to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Floors {
    pub acked_sends: u64,
    pub faults: u64,
    pub leader_changes: u64,
    /// Nodes whose committed log was dumped at the end (lost-on-node and split-brain
    /// compare those dumps; without them the run did not check either).
    pub dumped_nodes: u64,
    /// Queue messages acked, when the queue workload runs.
    pub queue_acked: u64,
}

impl Default for Floors {
    fn default() -> Self {
        Floors { acked_sends: 100, faults: 1, leader_changes: 1, dumped_nodes: 3, queue_acked: 50 }
    }
}

/// Counts over the whole history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub sends: u64,
    pub acked: u64,
    pub failed: u64,
    pub unknown: u64,
    pub polls: u64,
    pub reads: u64,
    pub distinct_read: u64,
    pub faults: u64,
    pub leader_changes: u64,
    pub dumps: u64,
    /// Acknowledged sends the broker recognised as retries of stored ones (answered
    /// with the original offsets, stored once).
    pub retries_deduplicated: u64,
    /// Messages stored more than once (both duplicate rows): the duplicate rate is this
    /// over `acked`.
    pub duplicates_stored: u64,
    /// The longest time, in milliseconds, between two consecutive acknowledgements of
    /// any send: the run's longest unavailability for writers.
    pub longest_ack_gap_ms: u64,
    /// Queue workload: deliveries received, messages acked (answered `acked`),
    /// messages dead-lettered, deliveries after the first attempt.
    pub queue_delivered: u64,
    pub queue_acked: u64,
    pub queue_dead_lettered: u64,
    pub queue_redelivered: u64,
    /// Replay workload: jobs that ended done, and messages found in their targets.
    pub replays_done: u64,
    pub replayed: u64,
}

/// The checker's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Results {
    /// No forbidden anomaly and every floor met.
    pub valid: bool,
    pub anomalies: Vec<Anomaly>,
    /// Floors not met (each makes the run invalid).
    pub vacuous: Vec<String>,
    pub stats: Stats,
}

impl Results {
    pub fn anomaly(&self, name: &str) -> Option<&Anomaly> {
        self.anomalies.iter().find(|a| a.name == name)
    }

    /// The forbidden anomalies that occurred.
    pub fn forbidden(&self) -> Vec<&Anomaly> {
        self.anomalies.iter().filter(|a| a.verdict == Verdict::Forbidden && a.count > 0).collect()
    }
}

type Partition = (String, u32);
/// One poll as the checker keeps it: from, records, high watermark, completion.
/// One poll: from, records, high watermark, outcome, the log start it reported.
type PollSeen = (u64, Vec<Read>, Option<u64>, Kind, Option<u64>);
/// Each node's final log of a partition: offset → message.
type NodeLog = (u64, BTreeMap<u64, String>);

#[derive(Default)]
struct Row {
    count: u64,
    examples: Vec<String>,
}

impl Row {
    fn add(&mut self, example: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < EXAMPLES_MAX {
            self.examples.push(example());
        }
    }
}

/// Every row, by name.
struct Rows(BTreeMap<&'static str, (Verdict, Row)>);

impl Rows {
    fn row(&mut self, name: &'static str) -> &mut Row {
        &mut self.0.get_mut(name).expect("every row is declared at the start of check").1
    }
}

/// A send and how it ended.
struct SendRecord {
    op: SendOp,
    process: u64,
    /// Position of the invocation in the history.
    invoked_at: u64,
    outcome: Kind,
    /// From the `ok` completion.
    offset: Option<u64>,
    duplicate: bool,
}

/// Checks a history.
pub fn check(events: &[Event], floors: Floors) -> Results {
    let mut stats = Stats::default();
    let mut rows = Rows(BTreeMap::new());
    let mut corrupted = false;
    let mut damage: Vec<(u64, u64)> = Vec::new();
    for (name, verdict) in [
        ("inconsistent-offsets", Verdict::Forbidden),
        ("lost-write", Verdict::Forbidden),
        ("lost-unseen-prefix", Verdict::Forbidden),
        ("lost-unseen-middle", Verdict::Forbidden),
        ("lost-unseen-postfix", Verdict::Forbidden),
        ("lost-on-node", Verdict::Forbidden),
        ("split-brain", Verdict::Forbidden),
        ("unexpected", Verdict::Forbidden),
        ("aborted-read", Verdict::Forbidden),
        ("recovered", Verdict::Allowed),
        // Acknowledged, then deleted by retention before any reader read it.
        ("retained-away", Verdict::Allowed),
        ("duplicate-append", Verdict::Forbidden),
        ("duplicate-append-non-idempotent", Verdict::Allowed),
        ("seq-offset", Verdict::Forbidden),
        ("nonmonotonic-send", Verdict::Forbidden),
        ("nonmonotonic-poll", Verdict::Forbidden),
        ("poll-skip", Verdict::Forbidden),
        ("committed-regression", Verdict::Forbidden),
        // A node that finds its log lost acknowledged entries when no disk was damaged:
        // a false alarm of the ack ledger (or a real loss of synced data).
        ("false-damage", Verdict::Forbidden),
        ("damage-detected", Verdict::Allowed),
    ] {
        rows.0.insert(name, (verdict, Row::default()));
    }
    for (name, verdict) in queue::ROWS.iter().chain(replay::ROWS) {
        rows.0.insert(name, (*verdict, Row::default()));
    }
    let mut replays: Vec<(ReplayOp, bool)> = Vec::new();
    let mut replay_dumps: BTreeMap<Partition, Vec<NodeLog>> = BTreeMap::new();
    let mut queue_seen = queue::QueueSeen::default();
    let mut settle_invokes: HashMap<u64, SettleOp> = HashMap::new();

    // Pair invocations with completions.
    let mut sends: Vec<SendRecord> = Vec::new();
    let mut send_by_id: HashMap<u64, usize> = HashMap::new();
    // (process, partition) → polls in order: (from, records, hw).
    let mut polls: BTreeMap<(u64, Partition), Vec<PollSeen>> = BTreeMap::new();
    // Per partition, the highest log start any poll reported (retention's cut).
    let mut log_start: HashMap<Partition, u64> = HashMap::new();
    let mut poll_invokes: HashMap<u64, u64> = HashMap::new();
    let mut dumps: BTreeMap<Partition, Vec<NodeLog>> = BTreeMap::new();
    let mut leaders: HashMap<Partition, (Option<u64>, u64)> = HashMap::new();
    let mut ack_times: Vec<u64> = Vec::new();
    for e in events {
        let process = match e.actor {
            Actor::Client(p) => p,
            _ => u64::MAX,
        };
        match (&e.op, e.kind) {
            (Op::Send(op), Kind::Invoke) => {
                stats.sends += 1;
                send_by_id.insert(e.id, sends.len());
                sends.push(SendRecord { op: op.clone(), process, invoked_at: e.index, outcome: Kind::Info, offset: None, duplicate: false });
            }
            (Op::Send(op), kind) => {
                if let Some(&i) = send_by_id.get(&e.id) {
                    let s = &mut sends[i];
                    s.outcome = kind;
                    if kind == Kind::Ok {
                        s.offset = op.offset;
                        s.duplicate = op.duplicate;
                        ack_times.push(e.time);
                        stats.retries_deduplicated += u64::from(op.duplicate);
                    }
                }
            }
            (Op::Poll(_), Kind::Invoke) => {
                poll_invokes.insert(e.id, process);
            }
            (Op::Poll(op), kind) => {
                stats.polls += 1;
                stats.reads += op.records.len() as u64;
                let p = poll_invokes.get(&e.id).copied().unwrap_or(process);
                if kind == Kind::Ok {
                    if let Some(start) = op.log_start {
                        let f = log_start.entry((op.topic.clone(), op.partition)).or_insert(0);
                        *f = (*f).max(start);
                    }
                }
                polls.entry((p, (op.topic.clone(), op.partition))).or_default().push((op.from, op.records.clone(), op.high_watermark, kind, op.log_start));
            }
            (Op::Fault(f), _) if f.phase == "start" => {
                stats.faults += 1;
                corrupted |= f.name == "corrupt";
            }
            (Op::Fault(_), _) => {}
            (Op::Leader(l), _) => {
                let key = (l.topic.clone(), l.partition);
                match leaders.get(&key) {
                    Some((prev, term)) if l.leader.is_some() && (*prev != l.leader || *term != l.term) && prev.is_some() => stats.leader_changes += 1,
                    _ => {}
                }
                if l.leader.is_some() {
                    leaders.insert(key, (l.leader, l.term));
                }
            }
            (Op::Damage(d), _) => damage.push((d.node, d.detections)),
            (Op::Deliver(d), _) => queue_seen.deliveries.push(d.clone()),
            (Op::Settle(op), Kind::Invoke) => {
                settle_invokes.insert(e.id, op.clone());
            }
            (Op::Settle(op), kind) => {
                let invoked = settle_invokes.remove(&e.id).unwrap_or_else(|| op.clone());
                queue_seen.settles.push((SettleOp { outcome: op.outcome.clone(), ..invoked }, kind));
            }
            (Op::DeadLetter(d), _) => queue_seen.dead_letters.push(d.clone()),
            (Op::QueueDrained, _) => queue_seen.drained = true,
            // A dead-letter topic holds copies of its source's messages by design; the
            // queue rows check it (from the dead letters read at the end).
            (Op::Dump(d), _) if d.topic.ends_with(".dlq") => stats.dumps += 1,
            // A replay's target holds copies of the W1 topic's messages by design; the
            // replay rows check it.
            (Op::Dump(d), _) if d.topic.contains(".replay-") => {
                stats.dumps += 1;
                let log: BTreeMap<u64, String> = d.records.iter().map(|r| (r.offset, r.msg.clone())).collect();
                replay_dumps.entry((d.topic.clone(), d.partition)).or_default().push((d.node, log));
            }
            (Op::Replay(_), Kind::Invoke | Kind::Info) => {}
            (Op::Replay(op), kind) => replays.push((op.clone(), kind == Kind::Ok)),
            (Op::Dump(d), _) => {
                stats.dumps += 1;
                let log: BTreeMap<u64, String> = d.records.iter().map(|r| (r.offset, r.msg.clone())).collect();
                dumps.entry((d.topic.clone(), d.partition)).or_default().push((d.node, log));
            }
        }
    }

    let acked: Vec<&SendRecord> = sends.iter().filter(|s| s.outcome == Kind::Ok).collect();
    stats.acked = acked.len() as u64;
    stats.failed = sends.iter().filter(|s| s.outcome == Kind::Fail).count() as u64;
    stats.unknown = sends.iter().filter(|s| s.outcome == Kind::Info).count() as u64;
    let invoked: HashSet<&str> = sends.iter().map(|s| s.op.msg.as_str()).collect();
    let failed: HashSet<&str> = sends.iter().filter(|s| s.outcome == Kind::Fail).map(|s| s.op.msg.as_str()).collect();
    let unknown: HashSet<&str> = sends.iter().filter(|s| s.outcome == Kind::Info).map(|s| s.op.msg.as_str()).collect();
    let idempotent: HashSet<&str> = sends.iter().filter(|s| s.op.idempotent).map(|s| s.op.msg.as_str()).collect();

    // Where every message was seen: acks, polls, dumps.
    let mut at_offset: BTreeMap<(Partition, u64), BTreeSet<String>> = BTreeMap::new();
    let mut offsets_of: HashMap<String, BTreeSet<(Partition, u64)>> = HashMap::new();
    let mut note = |part: &Partition, offset: u64, msg: &str| {
        at_offset.entry((part.clone(), offset)).or_default().insert(msg.to_string());
        offsets_of.entry(msg.to_string()).or_default().insert((part.clone(), offset));
    };
    for s in &acked {
        if let (Some(o), false) = (s.offset, s.duplicate) {
            note(&(s.op.topic.clone(), s.op.partition), o, &s.op.msg);
        }
    }
    let mut read: HashSet<String> = HashSet::new();
    let mut max_read: HashMap<Partition, u64> = HashMap::new();
    for ((_, part), list) in &polls {
        for (_, records, _, _, _) in list {
            for r in records {
                note(part, r.offset, &r.msg);
                read.insert(r.msg.clone());
                let m = max_read.entry(part.clone()).or_insert(0);
                *m = (*m).max(r.offset);
            }
        }
    }
    for (part, nodes) in &dumps {
        for (_, log) in nodes {
            for (offset, msg) in log {
                note(part, *offset, msg);
                read.insert(msg.clone());
            }
        }
    }
    stats.distinct_read = read.len() as u64;

    for ((part, offset), msgs) in &at_offset {
        if msgs.len() > 1 {
            rows.row("inconsistent-offsets").add(|| format!("{}/{} offset {offset} holds {msgs:?}", part.0, part.1));
        }
    }
    for (msg, places) in &offsets_of {
        if places.len() > 1 {
            let name = if idempotent.contains(msg.as_str()) { "duplicate-append" } else { "duplicate-append-non-idempotent" };
            rows.row(name).add(|| format!("{msg} stored at {places:?}"));
        }
    }
    for msg in &read {
        if !invoked.contains(msg.as_str()) {
            rows.row("unexpected").add(|| format!("{msg} was read but never sent"));
        }
        if failed.contains(msg.as_str()) {
            rows.row("aborted-read").add(|| format!("{msg} was read though its send failed definitely"));
        }
        if unknown.contains(msg.as_str()) {
            rows.row("recovered").add(|| format!("{msg} (send outcome unknown) was read"));
        }
    }

    // Lost: acknowledged, never read.
    let mut acked_by_process: BTreeMap<u64, Vec<&SendRecord>> = BTreeMap::new();
    for s in &acked {
        acked_by_process.entry(s.process).or_default().push(s);
    }
    for (process, list) in &mut acked_by_process {
        list.sort_by_key(|s| s.invoked_at);
        let seen: Vec<bool> = list.iter().map(|s| read.contains(&s.op.msg)).collect();
        let first_seen = seen.iter().position(|s| *s);
        let last_seen = seen.iter().rposition(|s| *s);
        for (i, s) in list.iter().enumerate() {
            if seen[i] {
                continue;
            }
            let part = (s.op.topic.clone(), s.op.partition);
            if let (Some(o), Some(start)) = (s.offset, log_start.get(&part)) {
                if o < *start {
                    rows.row("retained-away").add(|| {
                        format!("{} at {}/{} offset {o} was deleted by retention (log start {start}) before a reader saw it", s.op.msg, part.0, part.1)
                    });
                    continue;
                }
            }
            let name = match (first_seen, last_seen) {
                (Some(f), _) if i < f => "lost-unseen-prefix",
                (_, Some(l)) if i < l => "lost-unseen-middle",
                _ => "lost-unseen-postfix",
            };
            rows.row(name).add(|| format!("{} (process {process}, {}/{} offset {:?}) was acknowledged and never read", s.op.msg, part.0, part.1, s.offset));
            if let (Some(o), Some(m)) = (s.offset, max_read.get(&part)) {
                if o <= *m && !s.duplicate {
                    rows.row("lost-write").add(|| format!("{} at {}/{} offset {o} is below offsets read ({m}) but never read", s.op.msg, part.0, part.1));
                }
            }
        }
    }

    // Each node's final log: agrees with the others, holds what it should.
    for (part, nodes) in &dumps {
        for (i, (a, log_a)) in nodes.iter().enumerate() {
            for (b, log_b) in &nodes[i + 1..] {
                for (offset, msg) in log_a {
                    if let Some(other) = log_b.get(offset) {
                        if other != msg {
                            rows.row("split-brain").add(|| format!("{}/{} offset {offset}: node {a} has {msg}, node {b} has {other}", part.0, part.1));
                        }
                    }
                }
            }
            let Some(last) = log_a.keys().next_back().copied() else { continue };
            // A node's log starts where its retention purged it.
            let first = log_a.keys().next().copied().unwrap_or(0);
            let held: HashSet<&str> = log_a.values().map(String::as_str).collect();
            for s in acked.iter().filter(|s| s.op.topic == part.0 && s.op.partition == part.1 && !s.duplicate) {
                if let Some(o) = s.offset.filter(|o| *o <= last && *o >= first) {
                    if !held.contains(s.op.msg.as_str()) {
                        rows.row("lost-on-node").add(|| format!("node {a}'s log of {}/{} ends at {last} but lacks {} (offset {o})", part.0, part.1, s.op.msg));
                    }
                }
            }
        }
    }

    // Idempotent sequences: one offset per (producer, epoch, partition, sequence), in
    // sequence order, and no sequence skipped.
    let mut by_stamp: BTreeMap<(i64, i16, Partition), BTreeMap<i32, BTreeSet<u64>>> = BTreeMap::new();
    for s in acked.iter().filter(|s| s.op.stamp.is_some()) {
        let st = s.op.stamp.expect("filtered");
        if let Some(o) = s.offset {
            by_stamp.entry((st.producer_id, st.epoch, (s.op.topic.clone(), s.op.partition))).or_default().entry(st.sequence).or_default().insert(o);
        }
    }
    let stored_msgs: HashSet<&str> = read.iter().map(String::as_str).collect();
    let sent_by_stamp: HashMap<(i64, i16, Partition, i32), Vec<&SendRecord>> = {
        let mut m: HashMap<_, Vec<&SendRecord>> = HashMap::new();
        for s in sends.iter().filter(|s| s.op.stamp.is_some()) {
            let st = s.op.stamp.expect("filtered");
            m.entry((st.producer_id, st.epoch, (s.op.topic.clone(), s.op.partition), st.sequence)).or_default().push(s);
        }
        m
    };
    for ((pid, epoch, part), seqs) in &by_stamp {
        let mut last: Option<(i32, u64)> = None;
        for (seq, offsets) in seqs {
            if offsets.len() > 1 {
                rows.row("seq-offset")
                    .add(|| format!("producer {pid} epoch {epoch} sequence {seq} on {}/{} acknowledged at offsets {offsets:?}", part.0, part.1));
            }
            let offset = *offsets.iter().next().expect("non-empty");
            if let Some((prev_seq, prev_offset)) = last {
                if offset <= prev_offset {
                    rows.row("seq-offset")
                        .add(|| format!("producer {pid} epoch {epoch}: sequence {seq} at offset {offset}, before sequence {prev_seq} at {prev_offset}"));
                }
                for missing in prev_seq + 1..*seq {
                    let stored =
                        sent_by_stamp.get(&(*pid, *epoch, part.clone(), missing)).is_some_and(|v| v.iter().any(|s| stored_msgs.contains(s.op.msg.as_str())));
                    if !stored {
                        rows.row("seq-offset")
                            .add(|| format!("producer {pid} epoch {epoch}: sequence {seq} was stored after {prev_seq} without {missing} (a gap accepted)"));
                    }
                }
            }
            last = Some((*seq, offset));
        }
    }

    // One producer's acknowledged sends to a partition land at increasing offsets, per
    // priority lane (records of different lanes travel in different batches).
    for (process, list) in &acked_by_process {
        let mut last: HashMap<(Partition, u8), (u64, &str)> = HashMap::new();
        for s in list.iter().filter(|s| !s.duplicate) {
            let (Some(o), part) = (s.offset, (s.op.topic.clone(), s.op.partition)) else { continue };
            let lane = s.op.priority;
            if let Some((prev, prev_msg)) = last.get(&(part.clone(), lane)) {
                if o <= *prev {
                    rows.row("nonmonotonic-send")
                        .add(|| format!("process {process}: {} at {}/{} lane {lane} offset {o} after {prev_msg} at {prev}", s.op.msg, part.0, part.1));
                }
            }
            last.insert((part, lane), (o, s.op.msg.as_str()));
        }
    }

    // One reader's polls of a partition: forward only, skipping nothing that exists, and
    // the high watermark never going back.
    for ((process, part), list) in &polls {
        let mut last: Option<u64> = None;
        let mut hw_seen: Option<u64> = None;
        let mut start_seen = 0u64;
        for (_, records, hw, kind, start) in list {
            // Offsets below a log start this reader was told of were deleted by
            // retention: moving past them is not a skip.
            start_seen = start_seen.max(start.unwrap_or(0));
            for r in records {
                if let Some(prev) = last {
                    let from = (prev + 1).max(start_seen);
                    if r.offset <= prev {
                        rows.row("nonmonotonic-poll").add(|| format!("process {process} read {}/{} offset {} after {prev}", part.0, part.1, r.offset));
                    } else if let Some(((_, skipped), msgs)) = at_offset.range((part.clone(), from)..(part.clone(), r.offset.max(from))).next() {
                        rows.row("poll-skip").add(|| {
                            format!("process {process} read {}/{} offset {} after {prev}, skipping offset {skipped} ({msgs:?})", part.0, part.1, r.offset)
                        });
                    }
                }
                last = Some(r.offset);
            }
            if *kind == Kind::Ok {
                if let (Some(h), Some(prev)) = (hw, hw_seen) {
                    if *h < prev {
                        rows.row("committed-regression").add(|| format!("process {process}: {}/{} high watermark {h} after {prev}", part.0, part.1));
                    }
                }
                if hw.is_some() {
                    hw_seen = (*hw).max(hw_seen);
                }
            }
        }
    }

    // The queue workload's rows.
    let queue_acked_sends: Vec<(u32, u64, String)> =
        acked.iter().filter(|s| s.op.topic == QUEUE_TOPIC && !s.duplicate).filter_map(|s| s.offset.map(|o| (s.op.partition, o, s.op.msg.clone()))).collect();
    queue::check(&queue_seen, QUEUE_TOPIC, &queue_acked_sends, QUEUE_MAX_DELIVERIES, &mut rows, &mut stats);
    replay::check(&replays, LOG_TOPIC, &dumps, &replay_dumps, &mut rows, &mut stats);

    // Damage detections: expected only where the nemesis damaged a disk.
    for (node, detections) in damage.iter().filter(|(_, n)| *n > 0) {
        let name = if corrupted { "damage-detected" } else { "false-damage" };
        for _ in 0..*detections {
            rows.row(name).add(|| format!("node {node} found a group's log below what it had acknowledged"));
        }
    }

    ack_times.sort_unstable();
    stats.longest_ack_gap_ms = ack_times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) / 1_000_000;
    stats.duplicates_stored = ["duplicate-append", "duplicate-append-non-idempotent"].iter().map(|n| rows.0.get(n).map_or(0, |(_, r)| r.count)).sum();

    let mut vacuous = Vec::new();
    if stats.acked < floors.acked_sends {
        vacuous.push(format!("{} sends acknowledged, the floor is {}", stats.acked, floors.acked_sends));
    }
    if stats.faults < floors.faults {
        vacuous.push(format!("{} faults injected, the floor is {}", stats.faults, floors.faults));
    }
    if stats.leader_changes < floors.leader_changes {
        vacuous.push(format!("{} leader changes observed, the floor is {}", stats.leader_changes, floors.leader_changes));
    }
    let dumped_nodes = dumps.values().flatten().map(|(node, _)| *node).collect::<std::collections::BTreeSet<_>>().len() as u64;
    if dumped_nodes < floors.dumped_nodes {
        vacuous
            .push(format!("{dumped_nodes} nodes' committed logs dumped, the floor is {} (lost-on-node and split-brain went unchecked)", floors.dumped_nodes));
    }
    if queue_seen.active() || !queue_acked_sends.is_empty() {
        if !queue_seen.drained {
            vacuous.push("the queue workload's final drain did not finish: lost queue messages went unchecked".into());
        }
        if stats.queue_acked < floors.queue_acked {
            vacuous.push(format!("{} queue messages acked, the floor is {}", stats.queue_acked, floors.queue_acked));
        }
        if stats.queue_dead_lettered == 0 || stats.queue_redelivered == 0 {
            vacuous.push(format!(
                "{} dead letters and {} redeliveries: the queue workload must exercise both",
                stats.queue_dead_lettered, stats.queue_redelivered
            ));
        }
    }
    let anomalies: Vec<Anomaly> = rows.0.into_iter().map(|(name, (verdict, r))| Anomaly { name, verdict, count: r.count, examples: r.examples }).collect();
    let valid = vacuous.is_empty() && anomalies.iter().all(|a| a.verdict == Verdict::Allowed || a.count == 0);
    Results { valid, anomalies, vacuous, stats }
}

mod queue;
mod replay;
#[cfg(test)]
mod tests;
