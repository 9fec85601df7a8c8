//! Dead letters: the node task that moves messages decided for a dead-letter topic
//! into it, for every partition this node leads.
//!
//! A queue group's message is decided for the dead-letter topic by a replicated entry
//! (a `term`, a nack on the last allowed delivery, a lease that ran out on it); from
//! then it holds its place in the group's window until its dead letter is committed.
//! Every `DEAD_LETTER_SCAN_INTERVAL` this task, for each partition it leads:
//! 1. expires leases that ran out on the last allowed delivery (when no member is
//!    fetching, nothing else would);
//! 2. reads the source records of up to `DEAD_LETTER_BATCH_MAX` decided messages;
//! 3. appends each, whole (key, value, headers), to `<topic>.dlq` partition 0, with its
//!    failure record as the `keel-dlq` header (JSON: source position, group, attempts,
//!    first and last delivery, the cause, and every attempt's member, outcome, reason
//!    and error class) and a message id derived from group, topic, partition and
//!    offset — so a retry after a failure or a leader change is recognised by the
//!    dead-letter topic's dedupe window (a day) and stored once; a batch refused
//!    because some of its letters were stored by an earlier round is sent again
//!    without them (the refusal stored nothing);
//! 4. only then proposes `QueueDeadLettered`, which settles the source messages.
//!
//! The dead-letter topic is created on first use, with the source topic's replica
//! count and one partition. A failure (the dead-letter leader unreachable, an
//! election) is logged and retried on the next round: at-least-once, never lost.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use keel_net::CallError;
use keel_protocol::api::client as api;
use keel_protocol::batch::{DELIVER_AT_HEADER, MESSAGE_ID_HEADER};
use keel_protocol::limits::{BATCH_SIZE_MAX, RECORD_HEADER_COUNT_MAX};
use keel_protocol::message::CreateTopicRequest;
use keel_protocol::{BatchBuilder, BatchOptions, BatchView, ErrorCode, NewRecord, TopicConfigPatch};
use siphasher::sip128::{Hasher128, SipHasher13};

use super::api::ClientService;
use super::internal_client::{InternalClient, Refusal};
use super::limits::{DEAD_LETTER_BATCH_MAX, DEAD_LETTER_REQUEST_TIMEOUT, DEAD_LETTER_SCAN_INTERVAL};
use super::partition::consumers::DeadLetterJob;
use super::partition::Partition;
use crate::metadata::state::TOPIC_NAME_LEN_MAX;
use crate::partition::consumers::SlotState;

/// The header carrying a dead letter's failure record (JSON).
pub use keel_protocol::job::FAILURE_HEADER;
/// Suffix of a topic's dead-letter topic.
pub const DEAD_LETTER_SUFFIX: &str = ".dlq";
/// How long a dead-letter topic remembers the message ids of dead letters, so a retried
/// dead letter is stored once (the longest window a topic may have).
const DEAD_LETTER_DEDUPE_WINDOW_MS: u64 = 24 * 60 * 60 * 1000;
/// Room a dead letter needs beyond its source message: the failure record.
const FAILURE_RECORD_ROOM: u32 = 128 * 1024;

/// The dead-letter topic of `topic`: `<topic>.dlq`, or, when that would be longer than
/// a topic name may be, the name's first bytes, `-`, a hash of the whole name and
/// `.dlq` (so every topic has a dead-letter topic of its own, stable across nodes).
pub fn dead_letter_topic(topic: &str) -> String {
    suffixed_topic(topic, DEAD_LETTER_SUFFIX)
}

/// The quarantine topic of `topic` (where redrives put messages redriven too often):
/// `<topic>.quarantine`, shortened like [`dead_letter_topic`].
pub fn quarantine_topic(topic: &str) -> String {
    suffixed_topic(topic, QUARANTINE_SUFFIX)
}

/// Suffix of a topic's quarantine topic.
pub const QUARANTINE_SUFFIX: &str = ".quarantine";

fn suffixed_topic(topic: &str, suffix: &str) -> String {
    if topic.len() + suffix.len() <= TOPIC_NAME_LEN_MAX {
        return format!("{topic}{suffix}");
    }
    let mut h = SipHasher13::new_with_keys(0x6b65_656c_646c_7133, 0x6b65_656c_646c_7134);
    std::hash::Hasher::write(&mut h, topic.as_bytes());
    let hash = format!("-{:016x}", std::hash::Hasher::finish(&h));
    // Topic names are ASCII, so any byte index is a character boundary.
    let keep = TOPIC_NAME_LEN_MAX - suffix.len() - hash.len();
    format!("{}{hash}{suffix}", &topic[..keep])
}

/// The message id of the dead letter of `topic`/`partition`@`offset` in `group`.
pub fn dead_letter_id(group: &str, topic: &str, partition: u32, offset: u64) -> String {
    let mut h = SipHasher13::new_with_keys(0x6b65_656c_646c_7131, 0x6b65_656c_646c_7132);
    std::hash::Hasher::write(&mut h, group.as_bytes());
    std::hash::Hasher::write(&mut h, &[0]);
    std::hash::Hasher::write(&mut h, topic.as_bytes());
    format!("dlq:{partition}:{offset}:{:032x}", h.finish128().as_u128())
}

/// Runs the dead-letter task until the node stops.
pub async fn run(service: Arc<ClientService>) {
    let writer = Writer { client: InternalClient::new(service.clone(), DEAD_LETTER_REQUEST_TIMEOUT), service };
    let mut tick = tokio::time::interval(DEAD_LETTER_SCAN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        writer.sweep().await;
    }
}

struct Writer {
    service: Arc<ClientService>,
    /// For dead-letter topics led by other nodes.
    client: InternalClient,
}

impl Writer {
    async fn sweep(&self) {
        let partitions: Vec<Arc<Partition>> = self.service.hosted.read().expect("hosted lock poisoned").values().cloned().collect();
        for p in partitions {
            // Only queue groups dead-letter; most partitions have none.
            if p.group.shared.state().consumers.queues.is_empty() || !p.serving_now() {
                continue;
            }
            let Some(max_deliveries) = self.service.metadata.borrow().topics.get(&p.topic).map(|t| t.config.max_deliveries) else { continue };
            if let Err(e) = p.expire_exhausted(max_deliveries, DEAD_LETTER_REQUEST_TIMEOUT).await {
                tracing::debug!(partition = %p.name(), error = %e, "expiring exhausted leases failed; next round retries");
            }
            let jobs = p.dead_letter_jobs(DEAD_LETTER_BATCH_MAX);
            if jobs.is_empty() {
                continue;
            }
            let n = jobs.len();
            if let Err(e) = self.write(&p, jobs).await {
                tracing::warn!(partition = %p.name(), messages = n, error = %e, "dead-lettering failed; the next round retries (nothing is settled until its dead letter is stored)");
            }
        }
    }

    /// Appends the jobs' dead letters, then settles their source messages.
    async fn write(&self, p: &Arc<Partition>, jobs: Vec<DeadLetterJob>) -> Result<(), String> {
        let dlq = dead_letter_topic(&p.topic);
        let max_bytes = self.ensure_topic(&p.topic, &dlq).await?;
        let mut offsets: Vec<u64> = jobs.iter().map(|j| j.offset).collect();
        offsets.sort_unstable();
        offsets.dedup();
        let mut stored = BTreeMap::new();
        p.batches_holding(&offsets, &mut stored).await.map_err(|e| format!("reading the source messages: {e}"))?;
        let views: Vec<BatchView> = stored.into_values().filter_map(|b| BatchView::parse(b).ok()).collect();
        let now = now_ms();
        let mut letters: Vec<Letter> = Vec::with_capacity(jobs.len());
        let mut settled: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut causes: Vec<(String, &'static str)> = Vec::new();
        for job in &jobs {
            let record = views.iter().find_map(|v| {
                let base = v.header().base_offset;
                v.records().filter_map(Result::ok).find(|r| base + u64::from(r.offset_delta) == job.offset)
            });
            let SlotState::DeadLettering { cause, .. } = &job.slot.state else { continue };
            let mut headers: Vec<(String, Option<Bytes>)> = record.as_ref().map_or(Vec::new(), |r| {
                r.headers()
                    .filter(|(k, _)| *k != MESSAGE_ID_HEADER && *k != DELIVER_AT_HEADER)
                    .map(|(k, v)| (k.to_string(), v.map(Bytes::copy_from_slice)))
                    .collect()
            });
            headers.truncate(RECORD_HEADER_COUNT_MAX as usize - 2);
            headers.push((FAILURE_HEADER.to_string(), Some(Bytes::from(failure_record(p, job, record.as_ref(), now)))));
            letters.push(Letter {
                offset: job.offset,
                key: record.as_ref().and_then(|r| r.key).map(Bytes::copy_from_slice),
                value: record.as_ref().and_then(|r| r.value).map(Bytes::copy_from_slice),
                headers,
                id: dead_letter_id(&job.group, &p.topic, p.partition, job.offset),
            });
            settled.entry(job.group.clone()).or_default().push(job.offset);
            causes.push((job.group.clone(), cause.as_str()));
        }
        self.produce_all(&dlq, max_bytes, letters, now).await?;
        for (group, offsets) in settled {
            let n = p
                .dead_lettered(&group, offsets, DEAD_LETTER_REQUEST_TIMEOUT)
                .await
                .map_err(|e| format!("settling dead-lettered messages of group {group}: {e}"))?;
            tracing::info!(partition = %p.name(), group = %group, messages = n, dead_letter_topic = %dlq, "dead-lettered");
        }
        for (group, cause) in causes {
            crate::metrics::dead_lettered(&p.topic, &group, cause);
        }
        Ok(())
    }

    /// Creates the dead-letter topic if it does not exist; returns its largest batch.
    async fn ensure_topic(&self, source: &str, dlq: &str) -> Result<u32, String> {
        let (exists, replicas, source_max) = {
            let state = self.service.metadata.borrow();
            let src = state.topics.get(source).ok_or_else(|| format!("topic {source} was deleted"))?;
            let replicas = src.partitions.first().map_or(1, |p| p.replicas.len()) as u16;
            (state.topics.get(dlq).map(|t| t.config.max_message_bytes), replicas, src.config.max_message_bytes)
        };
        if let Some(max) = exists {
            return Ok(max);
        }
        let max_message_bytes = source_max.saturating_add(FAILURE_RECORD_ROOM).min(BATCH_SIZE_MAX as u32);
        let defaults = &self.service.cluster.topic_defaults.config;
        let window = if defaults.retention_ms > 0 { DEAD_LETTER_DEDUPE_WINDOW_MS.min(defaults.retention_ms) } else { DEAD_LETTER_DEDUPE_WINDOW_MS };
        let config = TopicConfigPatch { max_message_bytes: Some(max_message_bytes), dedupe_window_ms: Some(window), ..TopicConfigPatch::default() };
        let req = CreateTopicRequest { name: dlq.to_string(), partitions: 1, replicas, config };
        match self.client.call_leader(self.service.metadata_group.leader(), api::CREATE_TOPIC, &|v| req.encode(v)).await {
            Ok(_) => {}
            Err(CallError::Refused { code: ErrorCode::TopicAlreadyExists, .. }) => {}
            Err(e) => return Err(format!("creating dead-letter topic {dlq}: {e}")),
        }
        tracing::info!(topic = %source, dead_letter_topic = %dlq, replicas, "created the dead-letter topic");
        // Wait for this node's metadata to show it (the create answered once applied on
        // the metadata leader; here it follows within a heartbeat or two).
        let mut view = self.service.metadata.clone();
        let shown = tokio::time::timeout(DEAD_LETTER_REQUEST_TIMEOUT, view.wait_for(|s| s.topics.contains_key(dlq))).await;
        match shown {
            Ok(Ok(_)) => Ok(max_message_bytes),
            _ => Err(format!("dead-letter topic {dlq} was created but is not in this node's metadata yet")),
        }
    }

    /// Appends every letter to the dead-letter topic's partition 0, in batches of at
    /// most `max_bytes`. A batch refused because some of its letters are stored already
    /// (an earlier round stored them and then failed to settle) is sent again without
    /// them: a refused batch stores nothing, so treating it as done would lose the rest.
    async fn produce_all(&self, dlq: &str, max_bytes: u32, letters: Vec<Letter>, now: i64) -> Result<(), String> {
        let mut rest: &[Letter] = &letters;
        while !rest.is_empty() {
            // As many letters as fit one batch (at least one).
            let mut builder = new_builder(max_bytes)?;
            let mut n = 0;
            for l in rest {
                if builder.push(l.record(now).as_new()).is_err() {
                    break;
                }
                n += 1;
            }
            if n == 0 {
                return Err(format!("the dead letter of offset {} does not fit a batch of {max_bytes} bytes", rest[0].offset));
            }
            let mut chunk: Vec<&Letter> = rest[..n].iter().collect();
            rest = &rest[n..];
            while !chunk.is_empty() {
                let mut b = new_builder(max_bytes)?;
                for l in &chunk {
                    b.push(l.record(now).as_new()).map_err(|e| e.to_string())?;
                }
                match self.client.produce(dlq, 0, b.finish().map_err(|e| e.to_string())?).await {
                    Ok(_) => break,
                    Err(Refusal::Stored(indexes)) => {
                        let stored: std::collections::BTreeSet<usize> = indexes.into_iter().map(|i| i as usize).collect();
                        chunk = chunk.into_iter().enumerate().filter(|(i, _)| !stored.contains(i)).map(|(_, l)| l).collect();
                    }
                    Err(Refusal::Failed(e)) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// A dead letter, ready to append.
struct Letter {
    offset: u64,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Vec<(String, Option<Bytes>)>,
    id: String,
}

impl Letter {
    fn record(&self, now: i64) -> OwnedRecord<'_> {
        OwnedRecord { letter: self, now, headers: self.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect() }
    }
}

/// A letter's record with its header slice (what `NewRecord` borrows).
struct OwnedRecord<'a> {
    letter: &'a Letter,
    now: i64,
    headers: Vec<(&'a str, Option<&'a [u8]>)>,
}

impl OwnedRecord<'_> {
    fn as_new(&self) -> NewRecord<'_> {
        NewRecord {
            timestamp_ms: self.now,
            key: self.letter.key.as_deref(),
            value: self.letter.value.as_deref(),
            headers: &self.headers,
            message_id: Some(self.letter.id.as_bytes()),
            deliver_at_ms: None,
        }
    }
}

fn new_builder(max_bytes: u32) -> Result<BatchBuilder, String> {
    BatchBuilder::new(BatchOptions { size_max: max_bytes as usize, ..BatchOptions::default() }).map_err(|e| e.to_string())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The failure record of one dead letter (JSON).
fn failure_record(p: &Partition, job: &DeadLetterJob, record: Option<&keel_protocol::RecordView<'_>>, now: i64) -> String {
    let SlotState::DeadLettering { cause, reason, class, since_ms } = &job.slot.state else { return String::new() };
    let last_delivery = job.slot.history.last().map_or(job.slot.first_delivery_ms, |a| a.delivered_ms);
    let attempts: Vec<serde_json::Value> = job
        .slot
        .history
        .iter()
        .map(|a| {
            serde_json::json!({"attempt": a.attempt, "member": a.member, "delivered_ms": a.delivered_ms, "ended_ms": a.ended_ms,
                "outcome": a.outcome.as_str(), "reason": a.reason, "class": a.class})
        })
        .collect();
    serde_json::json!({
        "source": {"topic": p.topic, "partition": p.partition, "offset": job.offset,
            "timestamp_ms": record.map(|r| r.timestamp_ms),
            "message_id": record.and_then(|r| r.message_id()).map(String::from_utf8_lossy)},
        "group": job.group,
        "cause": cause.as_str(),
        "reason": reason,
        "class": class,
        "attempts": job.slot.attempts,
        "first_delivery_ms": job.slot.first_delivery_ms,
        "last_delivery_ms": last_delivery,
        "decided_ms": since_ms,
        "dead_lettered_ms": now,
        "history": attempts,
        "source_missing": record.is_none(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_id_depends_on_group_topic_and_position_and_fits_the_id_limit() {
        let a = dead_letter_id("billing", "orders", 1, 7);
        assert_eq!(a, dead_letter_id("billing", "orders", 1, 7));
        assert_ne!(a, dead_letter_id("billing", "orders", 1, 8));
        assert_ne!(a, dead_letter_id("audit", "orders", 1, 7));
        assert_ne!(dead_letter_id("a", "bc", 0, 0), dead_letter_id("ab", "c", 0, 0));
        let long = dead_letter_id(&"g".repeat(128), &"t".repeat(249), u32::MAX, u64::MAX);
        assert!(long.len() <= keel_protocol::limits::MESSAGE_ID_LEN_MAX);
    }

    #[test]
    fn every_valid_topic_name_has_a_valid_dead_letter_topic_of_its_own() {
        use crate::metadata::state::valid_topic_name;
        assert_eq!(dead_letter_topic("orders"), "orders.dlq");
        let fits = "o".repeat(TOPIC_NAME_LEN_MAX - DEAD_LETTER_SUFFIX.len());
        assert_eq!(dead_letter_topic(&fits), format!("{fits}.dlq"));
        let (a, b) = ("a".repeat(TOPIC_NAME_LEN_MAX), format!("{}b", "a".repeat(TOPIC_NAME_LEN_MAX - 1)));
        for name in [&a, &b, &fits] {
            let dlq = dead_letter_topic(name);
            assert!(valid_topic_name(&dlq) && dlq.ends_with(DEAD_LETTER_SUFFIX), "{dlq:?}");
            assert!(valid_topic_name(&dead_letter_topic(&dlq)), "a dead-letter topic has one too");
        }
        assert_ne!(dead_letter_topic(&a), dead_letter_topic(&b), "long names differing only at the end get distinct ones");
        assert_eq!(quarantine_topic("orders"), "orders.quarantine");
        assert!(valid_topic_name(&quarantine_topic(&a)) && quarantine_topic(&a).ends_with(QUARANTINE_SUFFIX));
    }
}
