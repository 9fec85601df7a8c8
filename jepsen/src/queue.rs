//! The W2 **queue** workload: producers send unique messages `"{process}-{counter}"`
//! to the queue topic (every 16th a poison message, `…-poison`); queue-group members
//! receive them and ack — nack a poison message always, and any other one time in ten —
//! and a member "crashes" now and then (dropped without closing: its leases run out and
//! its messages go to others). Every delivery (with its attempt number) and every settle
//! (with the broker's answer) is recorded. After the faults, one member drains the
//! group until nothing is left unsettled, and the dead-letter topic is read whole.
//!
//! The checker's queue rows (`checker/queue.rs`) then hold the broker to: every
//! acknowledged message acked or dead-lettered, exactly one of the two and once; no
//! attempt number delivered twice; none above max deliveries.

use std::time::Duration;

use keel_client::consumer::{Consumer, StartAt};
use keel_client::queue::{Delivery, QueueConfig, QueueConsumer};
use keel_client::{Admin, ClientError, Cluster};
use keel_protocol::batch::{parse_deliver_at, DELIVER_AT_HEADER};
use keel_protocol::message::{CreateTopicRequest, SettleOutcome};
use keel_protocol::{ErrorCode, GroupConfigPatch, TopicConfigPatch};

use crate::history::{Actor, DeadLetterOp, DeliverOp, Kind, Op, SettleOp};
use crate::workload::{kind_of, produce_loop, Ctx, PARTITIONS};

/// The W2 topic and its group.
pub const QUEUE_TOPIC: &str = "jepsen-queue";
pub const QUEUE_GROUP: &str = "jepsen-workers";
/// The topic's max deliveries (the checker's bound on attempt numbers).
pub const QUEUE_MAX_DELIVERIES: u32 = 4;
/// Every this many messages of a producer, one is poison (always nacked).
const POISON_EVERY: u64 = 16;
/// Sends one producer keeps unacknowledged at most.
const SENDS_IN_FLIGHT_MAX: usize = 128;
/// Priority lanes of the queue topic; producers pick one at random per message.
const QUEUE_LANES: u32 = 4;
/// One message in this many is scheduled, …
const SCHEDULED_EVERY: u32 = 8;
/// … up to this far ahead (ms).
const SCHEDULED_DELAY_MAX_MS: u64 = 1_500;
/// Unsettled deliveries one member holds at most.
const MEMBER_CREDIT: u32 = 50;
/// A member "crashes" after this many deliveries (drawn per life).
const DELIVERIES_PER_LIFE: std::ops::Range<u32> = 100..400;
/// How long the final drain may take, and how long it must see nothing unsettled.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// Creates the queue topic and sets the group's lease and retry settings (short, so
/// a run sees many expiries and retries); true once both are done.
pub async fn create_queue(cluster: &Cluster) -> bool {
    let admin = Admin::new(cluster.clone());
    let req = CreateTopicRequest {
        name: QUEUE_TOPIC.into(),
        partitions: PARTITIONS,
        replicas: 3,
        config: TopicConfigPatch { max_deliveries: Some(QUEUE_MAX_DELIVERIES), priorities: Some(QUEUE_LANES), ..TopicConfigPatch::default() },
    };
    match admin.create_topic_with(req).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(ErrorCode::TopicAlreadyExists) => {}
        Err(_) => return false,
    }
    let group = GroupConfigPatch { lease_timeout_ms: Some(3_000), retry_base_ms: Some(100), retry_max_ms: Some(1_000), ..GroupConfigPatch::default() };
    admin.configure_group(QUEUE_GROUP, group).await.is_ok()
}

/// One W2 producer at `rate` messages/s until stopped (every `POISON_EVERY`th message
/// is poison).
pub async fn queue_producer(ctx: Ctx, rate: f64, seed: u64) -> Result<(), ClientError> {
    let name = |process: u64, counter: u64| {
        if counter % POISON_EVERY == 5 {
            format!("{process}-{counter}-poison")
        } else {
            format!("{process}-{counter}")
        }
    };
    produce_loop(ctx, QUEUE_TOPIC, rate, seed, SENDS_IN_FLIGHT_MAX, name, Some(queue_shape)).await
}

/// W2's records: a random one of `QUEUE_LANES` priority lanes, and one in
/// `SCHEDULED_EVERY` scheduled up to `SCHEDULED_DELAY_MAX` ahead, so faults meet lane
/// cursors and waiting scheduled messages too.
fn queue_shape(rng: &mut fastrand::Rng) -> (u8, Option<Duration>) {
    let lane = rng.u8(0..QUEUE_LANES as u8);
    let delay = (rng.u32(0..SCHEDULED_EVERY) == 0).then(|| Duration::from_millis(rng.u64(0..SCHEDULED_DELAY_MAX_MS)));
    (lane, delay)
}

fn outcome_name(o: SettleOutcome) -> &'static str {
    match o {
        SettleOutcome::Acked => "acked",
        SettleOutcome::Retrying { .. } => "retrying",
        SettleOutcome::DeadLettering => "dead-lettering",
        SettleOutcome::Extended { .. } => "extended",
        SettleOutcome::AlreadySettled => "already-settled",
        SettleOutcome::NotDelivered => "not-delivered",
        SettleOutcome::StaleLease { .. } => "stale-lease",
        SettleOutcome::AlreadyDeadLettering => "already-dead-lettering",
    }
}

/// Records a delivery and settles it (`nack` for poison, or when `nack` says so),
/// recording the settle.
async fn settle_recorded(ctx: &Ctx, process: u64, member: &str, d: &Delivery, nack: bool) {
    let msg = d.message.value.as_deref().map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
    let deliver = DeliverOp {
        topic: QUEUE_TOPIC.into(),
        partition: d.message.partition,
        offset: d.message.offset,
        msg: msg.clone(),
        attempt: d.attempt,
        member: member.to_string(),
        deliver_at_ms: d.message.headers.iter().find(|(k, _)| k == DELIVER_AT_HEADER).and_then(|(_, v)| v.as_deref()).and_then(parse_deliver_at),
        received_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.as_millis() as i64),
    };
    ctx.recorder.note(Actor::Client(process), Op::Deliver(deliver));
    let nack = nack || msg.ends_with("-poison");
    let verb = if nack { "nack" } else { "ack" };
    let op =
        SettleOp { topic: QUEUE_TOPIC.into(), partition: d.message.partition, offset: d.message.offset, attempt: d.attempt, verb: verb.into(), outcome: None };
    let id = ctx.recorder.invoke(Actor::Client(process), Op::Settle(op.clone()));
    let result = if nack { d.nack(None, "jepsen: this message fails", "test").await } else { d.ack().await };
    match result {
        Ok(o) => ctx.recorder.complete(id, Actor::Client(process), Kind::Ok, Op::Settle(SettleOp { outcome: Some(outcome_name(o).into()), ..op }), None),
        Err(e) => ctx.recorder.complete(id, Actor::Client(process), kind_of(&e), Op::Settle(op), Some(e.to_string())),
    }
}

/// One W2 member slot: a member that acks and nacks until it "crashes" (dropped
/// without closing), then a new one, until stopped.
pub async fn queue_member(ctx: Ctx, seed: u64) -> Result<(), ClientError> {
    let mut rng = fastrand::Rng::with_seed(seed);
    while !ctx.stop.load(std::sync::atomic::Ordering::Relaxed) {
        let process = ctx.process();
        let member = format!("w{process}");
        let config = QueueConfig { member: Some(member.clone()), max_in_flight: MEMBER_CREDIT, poll_wait: Duration::from_secs(1), ..QueueConfig::default() };
        let mut consumer = match QueueConsumer::new(ctx.cluster.clone(), QUEUE_TOPIC, QUEUE_GROUP, config).await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let life = rng.u32(DELIVERIES_PER_LIFE);
        let mut seen = 0u32;
        while seen < life && !ctx.stop.load(std::sync::atomic::Ordering::Relaxed) {
            let batch = match consumer.poll(Duration::from_millis(500)).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(error = %e, "queue member poll failed; starting a new member");
                    break;
                }
            };
            seen += batch.len() as u32;
            let nacks: Vec<bool> = batch.iter().map(|_| rng.u32(0..10) == 0).collect();
            futures::future::join_all(batch.iter().zip(nacks).map(|(d, nack)| settle_recorded(&ctx, process, &member, d, nack))).await;
        }
        if ctx.stop.load(std::sync::atomic::Ordering::Relaxed) {
            consumer.close().await;
        } else {
            drop(consumer); // a crash: its leases run out on the broker
        }
    }
    Ok(())
}

/// Whether the group has nothing left to settle in any partition (every message below
/// the high watermark delivered and settled).
async fn group_settled(cluster: &Cluster) -> bool {
    let Ok(states) = Admin::new(cluster.clone()).group_state(QUEUE_TOPIC, Some(QUEUE_GROUP)).await else { return false };
    states.iter().all(|(_, s)| match s.queues.first() {
        Some(q) => q.floor == s.high_watermark && q.cursor == s.high_watermark,
        None => s.high_watermark == 0,
    })
}

/// After the faults: one member acks everything but poison (nacked until it is
/// dead-lettered) until the group has nothing unsettled, then the dead-letter topic
/// is read and every dead letter recorded.
pub async fn queue_drain(ctx: &Ctx) -> Result<(), String> {
    let process = ctx.process();
    let member = format!("drain{process}");
    let config = QueueConfig { member: Some(member.clone()), max_in_flight: 200, poll_wait: Duration::from_millis(500), ..QueueConfig::default() };
    let mut consumer = QueueConsumer::new(ctx.cluster.clone(), QUEUE_TOPIC, QUEUE_GROUP, config).await.map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
    loop {
        if tokio::time::Instant::now() > deadline {
            consumer.close().await;
            return Err(format!("the queue group still had unsettled messages after {DRAIN_LIMIT:?}"));
        }
        let batch = consumer.poll(Duration::from_millis(500)).await.map_err(|e| e.to_string())?;
        if batch.is_empty() {
            if group_settled(&ctx.cluster).await {
                break;
            }
            continue;
        }
        futures::future::join_all(batch.iter().map(|d| settle_recorded(ctx, process, &member, d, false))).await;
    }
    consumer.close().await;
    read_dead_letters(ctx).await
}

/// Records every dead letter of the queue topic.
async fn read_dead_letters(ctx: &Ctx) -> Result<(), String> {
    let dlq = format!("{QUEUE_TOPIC}.dlq");
    if !ctx.cluster.metadata(true).await.map_err(|e| e.to_string())?.topics.iter().any(|t| t.name == dlq) {
        return Ok(());
    }
    let consumer = Consumer::new(ctx.cluster.clone(), &dlq, StartAt::Earliest).await.map_err(|e| e.to_string())?;
    let mut offset = 0u64;
    loop {
        let f = consumer.fetch_partition(0, offset, Duration::ZERO).await.map_err(|e| e.to_string())?;
        let Some(last) = f.messages.last().map(|m| m.offset) else { break };
        for m in f.messages.iter().filter(|m| m.offset >= offset) {
            let failure: serde_json::Value = m
                .headers
                .iter()
                .find(|(k, _)| k == "keel-dlq")
                .and_then(|(_, v)| serde_json::from_slice(v.as_deref()?).ok())
                .ok_or_else(|| format!("dead letter {} has no failure record", m.offset))?;
            let op = DeadLetterOp {
                topic: failure["source"]["topic"].as_str().unwrap_or_default().to_string(),
                source_partition: failure["source"]["partition"].as_u64().unwrap_or(u64::MAX) as u32,
                source_offset: failure["source"]["offset"].as_u64().unwrap_or(u64::MAX),
                msg: m.value.as_deref().map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default(),
                attempts: failure["attempts"].as_u64().unwrap_or(0) as u32,
                cause: failure["cause"].as_str().unwrap_or_default().to_string(),
                dlq_offset: m.offset,
            };
            ctx.recorder.note(Actor::Runner, Op::DeadLetter(op));
        }
        offset = last + 1;
        if offset >= f.high_watermark {
            break;
        }
    }
    Ok(())
}
