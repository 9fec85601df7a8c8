//! The history of a run: every operation a client invoked and how it completed, every
//! fault the nemesis injected, what the runner observed (leaders) and each node's log at
//! the end. One JSON object per line (`history.jsonl`), written by one writer, in the
//! order events happened (`index`, and `time` in ns from one monotonic clock).
//!
//! Every `invoke` gets exactly one completion with the same `id`: `ok`, `fail` (the
//! operation **definitely** did not take effect) or `info` (it may or may not have: a
//! timeout, a lost connection, an error the client cannot classify). Reads count
//! whatever their completion. A client op's completion may carry results (an offset, the
//! records read).

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// How an event relates to its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// Who acted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Actor {
    /// A client worker (a producer or consumer session); a worker whose op ended `info`
    /// retires and continues as a new process.
    Client(u64),
    Nemesis,
    Runner,
}

/// An idempotent producer's stamp on a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub producer_id: i64,
    pub epoch: i16,
    pub sequence: i32,
}

/// One message sent: invoked with `offset: None`; an `ok` completion carries where it
/// was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendOp {
    pub topic: String,
    pub partition: u32,
    /// Globally unique: `"{process}-{counter}"`.
    pub msg: String,
    /// Sent by an idempotent producer (duplicates of it are then forbidden).
    pub idempotent: bool,
    /// For sends that control their own sequence (the W3 workload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<Stamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The broker answered with the offset of another message stored before under the
    /// same message id (so `offset` does not hold this `msg`). A recognised retry of the
    /// same batch is not this: its offset is the message's own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// The record's priority lane: order is promised per partition and lane.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: u8,
}

/// A message read: where, and what.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Read {
    pub offset: u64,
    pub msg: String,
}

/// One fetch of a partition from `from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollOp {
    pub topic: String,
    pub partition: u32,
    pub from: u64,
    #[serde(default)]
    pub records: Vec<Read>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_watermark: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_start: Option<u64>,
}

/// A fault starting or ending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultOp {
    /// The nemesis: `partition-one`, `kill`, `pause`, `power-loss`, …
    pub name: String,
    /// `start` or `stop`.
    pub phase: String,
    /// The nodes it hits, and anything else that describes it.
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// The leader the runner saw for a partition (sampled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderOp {
    pub topic: String,
    pub partition: u32,
    pub leader: Option<u64>,
    pub term: u64,
}

/// A node's committed log of one partition, dumped from its data directory at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpOp {
    pub node: u64,
    pub topic: String,
    pub partition: u32,
    pub records: Vec<Read>,
}

/// How often a node found, when opening a group, that its log had lost entries it
/// acknowledged (counted from its log at the end of the run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamageOp {
    pub node: u64,
    pub detections: u64,
}

/// A queue-group delivery a member received (the W2 `queue` workload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverOp {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub msg: String,
    /// The attempt number the broker gave it.
    pub attempt: u32,
    pub member: String,
    /// A scheduled message's not-before time (its `keel-deliver-at`), ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliver_at_ms: Option<i64>,
    /// When the member got it (wall clock, ms since the epoch; the nodes share it).
    #[serde(default)]
    pub received_ms: i64,
}

/// A member's answer about one delivery: `verb` is `ack` or `nack`; an `ok` completion
/// carries the broker's outcome (`acked`, `already-settled`, `retrying`,
/// `dead-lettering`, `stale-lease`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleOp {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub attempt: u32,
    pub verb: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// One dead letter found in the dead-letter topic at the end of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterOp {
    pub topic: String,
    pub source_partition: u32,
    pub source_offset: u64,
    pub msg: String,
    pub attempts: u32,
    pub cause: String,
    pub dlq_offset: u64,
}

/// What an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", content = "value", rename_all = "lowercase")]
pub enum Op {
    Send(SendOp),
    Poll(PollOp),
    Fault(FaultOp),
    Leader(LeaderOp),
    Dump(DumpOp),
    Damage(DamageOp),
    Deliver(DeliverOp),
    Settle(SettleOp),
    #[serde(rename = "deadletter")]
    DeadLetter(DeadLetterOp),
    /// The queue workload's final drain ended with nothing left to deliver (the
    /// queue rows are only meaningful then).
    #[serde(rename = "queuedrained")]
    QueueDrained,
    /// A replay job of the W1 topic (workload W4): created (`invoke`), and how it ended
    /// once the cluster was healed (`ok` with its final state and resolved ranges).
    Replay(ReplayOp),
}

/// A replay job of the W1 topic into `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayOp {
    pub target: String,
    #[serde(default)]
    pub job: Option<u64>,
    /// Its final state (`done`, `failed`, …), on the completion.
    #[serde(default)]
    pub state: Option<String>,
    /// The source ranges it copied: (partition, from, until).
    #[serde(default)]
    pub ranges: Vec<(u32, u64, u64)>,
}

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub index: u64,
    /// Nanoseconds since the run started.
    pub time: u64,
    /// Pairs an `invoke` with its completion.
    pub id: u64,
    pub actor: Actor,
    #[serde(rename = "type")]
    pub kind: Kind,
    #[serde(flatten)]
    pub op: Op,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Appends events to `history.jsonl` (and keeps them for the checker).
pub struct Recorder {
    started: Instant,
    inner: Mutex<RecorderInner>,
}

struct RecorderInner {
    next_index: u64,
    next_id: u64,
    file: Option<std::io::BufWriter<std::fs::File>>,
    events: Vec<Event>,
}

impl Recorder {
    /// A recorder writing to `path` (or only in memory with `None`).
    pub fn create(path: Option<&Path>) -> std::io::Result<Recorder> {
        let file = match path {
            Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p)?)),
            None => None,
        };
        Ok(Recorder { started: Instant::now(), inner: Mutex::new(RecorderInner { next_index: 0, next_id: 0, file, events: Vec::new() }) })
    }

    fn push(&self, id: u64, actor: Actor, kind: Kind, op: Op, error: Option<String>) {
        let time = self.started.elapsed().as_nanos() as u64;
        let mut inner = self.inner.lock().expect("recorder lock poisoned");
        let event = Event { index: inner.next_index, time, id, actor, kind, op, error };
        inner.next_index += 1;
        if let Some(f) = inner.file.as_mut() {
            // A history that cannot be written makes the run worthless: stop loudly.
            serde_json::to_writer(&mut *f, &event).expect("writing history.jsonl");
            f.write_all(b"\n").expect("writing history.jsonl");
        }
        inner.events.push(event);
    }

    /// Records an invocation; returns the id its completion must carry.
    pub fn invoke(&self, actor: Actor, op: Op) -> u64 {
        let id = {
            let mut inner = self.inner.lock().expect("recorder lock poisoned");
            inner.next_id += 1;
            inner.next_id
        };
        self.push(id, actor, Kind::Invoke, op, None);
        id
    }

    /// Records the completion of invocation `id`.
    pub fn complete(&self, id: u64, actor: Actor, kind: Kind, op: Op, error: Option<String>) {
        assert_ne!(kind, Kind::Invoke, "a completion is ok, fail or info");
        self.push(id, actor, kind, op, error);
    }

    /// Records something that has no completion (a fault phase, an observation).
    pub fn note(&self, actor: Actor, op: Op) {
        let id = {
            let mut inner = self.inner.lock().expect("recorder lock poisoned");
            inner.next_id += 1;
            inner.next_id
        };
        self.push(id, actor, Kind::Info, op, None);
    }

    /// Nanoseconds since the run started.
    pub fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// Flushes the file and returns every event recorded.
    pub fn finish(&self) -> std::io::Result<Vec<Event>> {
        let mut inner = self.inner.lock().expect("recorder lock poisoned");
        if let Some(f) = inner.file.as_mut() {
            f.flush()?;
        }
        Ok(inner.events.clone())
    }
}

/// Reads a `history.jsonl`.
pub fn read(path: &Path) -> std::io::Result<Vec<Event>> {
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut out = Vec::new();
    for (n, line) in file.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("line {}: {e}", n + 1)))?);
    }
    Ok(out)
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        let r = Recorder::create(Some(&path)).unwrap();
        let send = SendOp { topic: "t".into(), partition: 1, msg: "3-42".into(), idempotent: true, stamp: None, offset: None, duplicate: false, priority: 0 };
        let id = r.invoke(Actor::Client(3), Op::Send(send.clone()));
        r.complete(id, Actor::Client(3), Kind::Ok, Op::Send(SendOp { offset: Some(977), ..send }), None);
        r.note(Actor::Nemesis, Op::Fault(FaultOp { name: "kill".into(), phase: "start".into(), detail: serde_json::json!({"nodes": [2]}) }));
        let recorded = r.finish().unwrap();
        assert_eq!(read(&path).unwrap(), recorded);
        let line = std::fs::read_to_string(&path).unwrap();
        assert!(line.starts_with(r#"{"index":0,"#) && line.contains(r#""type":"invoke","f":"send","value":{"#), "{line}");
    }
}
