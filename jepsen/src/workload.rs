//! The workloads: client workers that invoke operations and record each with its
//! outcome (`shared/notes/jepsen.md` §1).
//!
//! - **W1 `log`**: idempotent producers (the client library's `Producer`) send unique
//!   messages `"{process}-{counter}"` to chosen partitions; readers poll every partition
//!   from several starting points (earliest, latest at their start, a random offset) and
//!   record each poll with the high watermark the leader reported.
//! - **W3 `idem`**: producers that number their own batches (one record each) and send
//!   each with a single attempt at a time; an attempt whose outcome is unknown is retried
//!   with the **same** bytes, epoch and sequence until it is answered — across faults —
//!   and a producer occasionally starts over with a new id ("crash").
//!
//! - **W2 `queue`** (`crate::queue`): producers to a queue topic and queue-group members
//!   that ack, nack and crash.
//!
//! A send completes `ok` with its offset, `fail` when the broker definitely did not
//! append it, `info` when that is unknown (`ClientError::outcome`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_client::consumer::Consumer;
use keel_client::producer::{Producer, ProducerConfig, Record};
use keel_client::{ClientError, Cluster, Outcome};
use keel_protocol::api::client as api;
use keel_protocol::batch::{BatchBuilder, BatchOptions, NewRecord};
use keel_protocol::message::{self, Duplicate, InitProducerRequest, InitProducerResponse, ProduceRequest, ProduceResponse, ProducerIdentity};
use keel_protocol::ErrorCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::history::{Actor, Kind, Op, PollOp, Read, Recorder, SendOp, Stamp};
pub use crate::queue::{create_queue, queue_drain, queue_member, queue_producer, QUEUE_MAX_DELIVERIES, QUEUE_TOPIC};

/// The W1 topic.
pub const LOG_TOPIC: &str = "jepsen-log";
/// The W3 topic.
pub const IDEM_TOPIC: &str = "jepsen-idem";
/// Partitions of each topic.
pub const PARTITIONS: u32 = 3;

/// Sends one W1 producer keeps unacknowledged at most.
const LOG_SENDS_IN_FLIGHT_MAX: usize = 256;
/// How long a W3 send keeps retrying an unknown outcome before it is recorded `info`.
const IDEM_SEND_DEADLINE: Duration = Duration::from_secs(20);
/// W3: sends between two producer "crashes" (a new producer id).
const IDEM_SENDS_PER_IDENTITY: u64 = 400;
/// Pause between a reader's rounds over the partitions, and a poll's long-poll.
const POLL_WAIT: Duration = Duration::from_millis(100);

/// What every worker shares.
#[derive(Clone)]
pub struct Ctx {
    pub cluster: Cluster,
    pub recorder: Arc<Recorder>,
    pub stop: Arc<AtomicBool>,
    /// Hands out process ids (a worker whose op ended `info` continues as a new one).
    pub processes: Arc<AtomicU64>,
    /// Partitions of the W1 topic (`--log-partitions`); the other topics have `PARTITIONS`.
    pub log_partitions: u32,
}

impl Ctx {
    pub fn process(&self) -> u64 {
        self.processes.fetch_add(1, Ordering::Relaxed)
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// How many partitions `topic` has.
    pub fn partitions(&self, topic: &str) -> u32 {
        if topic == LOG_TOPIC {
            self.log_partitions
        } else {
            PARTITIONS
        }
    }
}

pub fn kind_of(e: &ClientError) -> Kind {
    match e.outcome() {
        Outcome::Definite => Kind::Fail,
        Outcome::Indefinite => Kind::Info,
    }
}

/// Sleeps so that `sent` operations take at least `sent / rate` seconds from `start`.
async fn pace(start: tokio::time::Instant, sent: u64, rate: f64) {
    if rate > 0.0 {
        tokio::time::sleep_until(start + Duration::from_secs_f64(sent as f64 / rate)).await;
    }
}

/// One W1 producer at `rate` messages/s until stopped.
pub async fn log_producer(ctx: Ctx, rate: f64, seed: u64) -> Result<(), ClientError> {
    produce_loop(ctx, LOG_TOPIC, rate, seed, LOG_SENDS_IN_FLIGHT_MAX, |process, counter| format!("{process}-{counter}"), None).await
}

/// How a producer shapes a record beyond its value: its priority lane and, for a
/// scheduled one, its delay.
pub type Shape = fn(&mut fastrand::Rng) -> (u8, Option<Duration>);

/// A producer of unique messages `name(process, counter)` to random partitions of
/// `topic` at `rate` messages/s until stopped, at most `in_flight` unacknowledged;
/// every send recorded; `shape` picks lanes and delays (none: lane 0, no delay).
/// Returns once every send completed.
pub async fn produce_loop(
    ctx: Ctx,
    topic: &'static str,
    rate: f64,
    seed: u64,
    in_flight: usize,
    name: fn(u64, u64) -> String,
    shape: Option<Shape>,
) -> Result<(), ClientError> {
    let process = ctx.process();
    let mut rng = fastrand::Rng::with_seed(seed);
    let producer = Arc::new(Producer::new(ctx.cluster.clone(), ProducerConfig { linger: Duration::from_millis(2), ..ProducerConfig::default() })?);
    let window = Arc::new(Semaphore::new(in_flight));
    let start = tokio::time::Instant::now();
    let mut counter = 0u64;
    while !ctx.stopped() {
        pace(start, counter, rate).await;
        let permit = window.clone().acquire_owned().await.expect("never closed");
        let partition = rng.u32(0..ctx.partitions(topic));
        let msg = name(process, counter);
        counter += 1;
        let (priority, delay) = shape.map_or((0, None), |f| f(&mut rng));
        let mut record = Record { partition: Some(partition), priority, ..Record::new(msg) };
        if let Some(d) = delay {
            record = record.deliver_after(d);
        }
        send_recorded(&ctx, process, &producer, topic, record, permit).await;
    }
    // Every send completes before the worker ends.
    let _ = window.acquire_many(in_flight as u32).await;
    Ok(())
}

/// Sends `record` to `topic` (its partition set) through `producer` (idempotent, no
/// message id),
/// recording the invocation and — from a task of its own — the completion; `permit`
/// is released once the send completes.
async fn send_recorded(ctx: &Ctx, process: u64, producer: &Producer, topic: &str, record: Record, permit: OwnedSemaphorePermit) {
    let partition = record.partition.expect("the loop picks the partition");
    let msg = String::from_utf8_lossy(&record.value).into_owned();
    let op = SendOp { topic: topic.into(), partition, msg, idempotent: true, stamp: None, offset: None, duplicate: false, priority: record.priority };
    let id = ctx.recorder.invoke(Actor::Client(process), Op::Send(op.clone()));
    let ack = match producer.send(topic, record).await {
        Ok(a) => a,
        Err(e) => {
            ctx.recorder.complete(id, Actor::Client(process), kind_of(&e), Op::Send(op), Some(e.to_string()));
            return;
        }
    };
    let recorder = ctx.recorder.clone();
    tokio::spawn(async move {
        match ack.wait().await {
            // No message ids here: a `duplicate` delivery is a recognised retry, and its
            // offset is this message's own.
            Ok(d) => recorder.complete(id, Actor::Client(process), Kind::Ok, Op::Send(SendOp { offset: Some(d.offset), ..op }), None),
            Err(e) => recorder.complete(id, Actor::Client(process), kind_of(&e), Op::Send(op), Some(e.to_string())),
        }
        drop(permit);
    });
}

/// Where a reader starts in each partition.
#[derive(Debug, Clone, Copy)]
pub enum From {
    Earliest,
    /// The high watermark when the reader starts.
    Latest,
    /// A random offset below the high watermark when the reader starts.
    Random(u64),
}

/// One W1 reader: polls every partition of `topic` until stopped, recording each poll.
pub async fn reader(ctx: Ctx, topic: &'static str, from: From) -> Result<(), ClientError> {
    let mut process = ctx.process();
    let partitions = ctx.partitions(topic);
    let consumer = Consumer::assign(ctx.cluster.clone(), topic, &(0..partitions).map(|p| (p, 0)).collect::<Vec<_>>()).await?;
    let mut positions = vec![0u64; partitions as usize];
    for p in 0..partitions {
        positions[p as usize] = match from {
            From::Earliest => 0,
            From::Latest | From::Random(_) => {
                let hw = consumer.fetch_partition(p, 0, Duration::ZERO).await.map(|f| f.high_watermark).unwrap_or(0);
                match from {
                    From::Random(seed) if hw > 0 => fastrand::Rng::with_seed(seed + u64::from(p)).u64(0..hw),
                    _ => hw,
                }
            }
        };
    }
    while !ctx.stopped() {
        for p in 0..partitions {
            if !poll_once(&ctx, &consumer, topic, p, &mut positions[p as usize], &mut process).await {
                tokio::time::sleep(POLL_WAIT).await;
            }
        }
    }
    Ok(())
}

/// One recorded poll of `partition` from `*position`; moves the position past what was
/// read. Returns whether the poll succeeded. A poll ending `info` retires the process.
pub async fn poll_once(ctx: &Ctx, consumer: &Consumer, topic: &str, partition: u32, position: &mut u64, process: &mut u64) -> bool {
    let op = PollOp { topic: topic.into(), partition, from: *position, records: Vec::new(), high_watermark: None, log_start: None };
    let id = ctx.recorder.invoke(Actor::Client(*process), Op::Poll(op.clone()));
    match consumer.fetch_partition(partition, *position, POLL_WAIT).await {
        Ok(f) => {
            let records: Vec<Read> = f
                .messages
                .iter()
                .filter(|m| m.offset >= *position)
                .map(|m| Read { offset: m.offset, msg: m.value.as_deref().map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default() })
                .collect();
            if let Some(last) = records.last() {
                *position = last.offset + 1;
            }
            let done = PollOp { records, high_watermark: Some(f.high_watermark), log_start: Some(f.log_start_offset), ..op };
            ctx.recorder.complete(id, Actor::Client(*process), Kind::Ok, Op::Poll(done), None);
            true
        }
        // Retention deleted what this reader had not read yet: it moves on to the log
        // start, recorded so the checker knows the skip was the start moving.
        Err(e) if e.out_of_range().is_some_and(|r| *position < r.log_start_offset) => {
            let r = e.out_of_range().expect("checked above");
            *position = r.log_start_offset;
            let done = PollOp { high_watermark: Some(r.high_watermark), log_start: Some(r.log_start_offset), ..op };
            ctx.recorder.complete(id, Actor::Client(*process), Kind::Ok, Op::Poll(done), None);
            true
        }
        Err(e) => {
            let kind = kind_of(&e);
            ctx.recorder.complete(id, Actor::Client(*process), kind, Op::Poll(op), Some(e.to_string()));
            if kind == Kind::Info {
                *process = ctx.process();
            }
            false
        }
    }
}

async fn init_producer(cluster: &Cluster) -> Result<ProducerIdentity, ClientError> {
    let body = message::encode(&InitProducerRequest { name: None, current: None });
    let (_, answer) = cluster.call_any("init producer", api::INIT_PRODUCER, &|_| body.clone()).await?;
    message::decode::<InitProducerResponse>(&answer).map(|r| r.producer).map_err(|e| ClientError::Malformed { addr: "a broker".into(), reason: e.to_string() })
}

fn stamped(identity: ProducerIdentity, sequence: i32, msg: &str) -> Bytes {
    let options = BatchOptions { producer_id: identity.producer_id, producer_epoch: identity.epoch, base_sequence: sequence, ..BatchOptions::default() };
    let mut b = BatchBuilder::new(options).expect("default batch options are valid");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    b.push(NewRecord { timestamp_ms: now, value: Some(msg.as_bytes()), ..NewRecord::default() }).expect("a small record fits");
    b.finish().expect("one record")
}

/// One W3 producer, writing to `partition`, at `rate` sends/s until stopped.
pub async fn idem_producer(ctx: Ctx, partition: u32, rate: f64) -> Result<(), ClientError> {
    let process = ctx.process();
    let mut identity = loop {
        match init_producer(&ctx.cluster).await {
            Ok(id) => break id,
            Err(_) if !ctx.stopped() => tokio::time::sleep(Duration::from_millis(500)).await,
            Err(e) => return Err(e),
        }
    };
    let mut sequence = 0i32;
    let mut sent_with_identity = 0u64;
    let start = tokio::time::Instant::now();
    let mut counter = 0u64;
    while !ctx.stopped() {
        pace(start, counter, rate).await;
        if sent_with_identity >= IDEM_SENDS_PER_IDENTITY {
            // A producer "crash": the next instance registers anew.
            if let Ok(fresh) = init_producer(&ctx.cluster).await {
                identity = fresh;
                sequence = 0;
                sent_with_identity = 0;
            }
        }
        let msg = format!("{process}-{counter}");
        counter += 1;
        sent_with_identity += 1;
        let stamp = Stamp { producer_id: identity.producer_id, epoch: identity.epoch, sequence };
        let op =
            SendOp { topic: IDEM_TOPIC.into(), partition, msg: msg.clone(), idempotent: true, stamp: Some(stamp), offset: None, duplicate: false, priority: 0 };
        let id = ctx.recorder.invoke(Actor::Client(process), Op::Send(op.clone()));
        let payload =
            message::encode_with_batches(&ProduceRequest { topic: IDEM_TOPIC.into(), partition, timeout_ms: 5_000 }, &[stamped(identity, sequence, &msg)]);
        let deadline = tokio::time::Instant::now() + IDEM_SEND_DEADLINE;
        let mut unknown: Option<String> = None;
        let outcome = loop {
            match ctx.cluster.call_partition_once(IDEM_TOPIC, partition, api::PRODUCE, &|_| payload.clone()).await {
                Ok((version, body)) => match ProduceResponse::decode(&body, version) {
                    Ok(r) => break Ok(r),
                    Err(e) => unknown = Some(e.to_string()),
                },
                Err(e) if e.outcome() == Outcome::Definite => match e.code() {
                    // Not appended, and it may be next time: the same bytes again.
                    // (An unknown topic is a node behind on the metadata log, e.g. refilled.)
                    Some(
                        ErrorCode::NotLeader
                        | ErrorCode::LeaderNotAvailable
                        | ErrorCode::Throttled
                        | ErrorCode::StorageFull
                        | ErrorCode::UnknownTopic
                        | ErrorCode::UnknownPartition,
                    ) => {}
                    _ if unknown.is_none() => break Err((Kind::Fail, e)),
                    // Refused after an earlier attempt of unknown outcome: that attempt
                    // may have been stored, so this send's outcome stays unknown.
                    _ => break Err((Kind::Info, e)),
                },
                Err(e) => unknown = Some(e.to_string()),
            }
            if ctx.stopped() || tokio::time::Instant::now() >= deadline {
                let last = unknown.clone().unwrap_or_else(|| "no answer".into());
                break Err((Kind::Info, ClientError::Timeout { what: msg.clone(), timeout: IDEM_SEND_DEADLINE, last }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match outcome {
            Ok(r) => {
                // A recognised retry (`Duplicate::Batch`) is stored at its own offset;
                // only a message-id duplicate points at another message.
                let duplicate = matches!(r.duplicate, Duplicate::Records(_));
                ctx.recorder.complete(id, Actor::Client(process), Kind::Ok, Op::Send(SendOp { offset: Some(r.base_offset), duplicate, ..op }), None);
                sequence = if sequence == i32::MAX { 0 } else { sequence + 1 };
            }
            Err((kind, e)) => {
                ctx.recorder.complete(id, Actor::Client(process), kind, Op::Send(op), Some(e.to_string()));
                // The sequence may be broken (unknown outcome) or was refused: start a
                // new epoch from 0, as the client library does.
                identity.epoch = identity.epoch.saturating_add(1);
                sequence = 0;
                if e.code() == Some(ErrorCode::ProducerFenced) || identity.epoch == i16::MAX {
                    if let Ok(fresh) = init_producer(&ctx.cluster).await {
                        identity = fresh;
                    }
                }
            }
        }
    }
    Ok(())
}
