//! `Consumer` (stream mode): reads every partition of a topic in offset order from a
//! starting position, long-polling for new messages.

use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_protocol::api::client as api;
use keel_protocol::message::{
    self, CommitOffsetRequest, FetchOffsetRequest, FetchOffsetResponse, FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse,
};

use crate::cluster::Cluster;
use crate::error::ClientError;

/// Where a consumer starts in each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Earliest,
    Latest,
    Offset(u64),
    /// The first message at or after this time (ms since the epoch).
    Time(i64),
}

/// One consumed message. Key, value and headers are slices of the fetched batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
    /// The priority lane it was produced to.
    pub priority: u8,
}

/// Reads a topic.
///
/// ```no_run
/// # async fn demo() -> Result<(), keel_client::ClientError> {
/// use keel_client::consumer::{Consumer, StartAt};
/// use keel_client::{ClientConfig, Cluster};
/// let mut consumer = Consumer::new(Cluster::new(ClientConfig::default())?, "orders", StartAt::Earliest).await?;
/// for m in consumer.poll(std::time::Duration::from_secs(1)).await? {
///     println!("{}@{}: {:?}", m.partition, m.offset, m.value);
/// }
/// # Ok(()) }
/// ```
pub struct Consumer {
    cluster: Cluster,
    topic: String,
    /// Next offset to read, per partition (indexed by partition).
    positions: Vec<u64>,
    /// The partitions this consumer reads (all of them unless assigned).
    assigned: Vec<u32>,
    /// Largest fetch response per partition (bytes).
    pub max_bytes: u32,
    /// Skip stored batches that do not decode (logging each) instead of failing the
    /// poll with `ClientError::UndecodableBatch`. Off by default: skipping loses data.
    pub skip_undecodable: bool,
    /// The stream group whose offsets [`Consumer::commit`] commits, and its generation.
    group: Option<(String, u64)>,
    /// Per partition, the position last committed (so an unchanged one is not sent again).
    committed: Vec<Option<u64>>,
    /// Moves past messages retention deleted before they were read, not yet taken
    /// (`take_retention_skips`); bounded by `RETENTION_SKIPS_KEPT`.
    retention_skips: Vec<RetentionSkip>,
}

/// Most retention skips a consumer keeps until they are taken (the oldest are dropped).
pub const RETENTION_SKIPS_KEPT: usize = 1024;

/// A consumer's position moved past messages that retention deleted before it read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSkip {
    pub partition: u32,
    /// The position it was at.
    pub from: u64,
    /// The partition's log start it moved to.
    pub to: u64,
}

impl Consumer {
    pub async fn new(cluster: Cluster, topic: &str, start: StartAt) -> Result<Consumer, ClientError> {
        let partitions = cluster.partitions(topic).await?;
        let mut positions = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let at = match start {
                StartAt::Earliest => 0,
                StartAt::Offset(o) => o,
                StartAt::Latest => list_offset(&cluster, topic, p, i64::MAX).await?,
                StartAt::Time(ts) => list_offset(&cluster, topic, p, ts).await?,
            };
            positions.push(at);
        }
        Ok(Consumer {
            cluster,
            topic: topic.to_string(),
            positions,
            assigned: (0..partitions).collect(),
            max_bytes: 1024 * 1024,
            skip_undecodable: false,
            group: None,
            committed: vec![None; partitions as usize],
            retention_skips: Vec::new(),
        })
    }

    /// This consumer commits as a member of stream group `group` in `generation`
    /// (`GroupConsumer` builds it so), each partition's position last committed being
    /// `committed`.
    pub(crate) fn in_group(mut self, group: &str, generation: u64, committed: &[(u32, u64)]) -> Consumer {
        self.group = Some((group.to_string(), generation));
        for (p, o) in committed {
            if let Some(slot) = self.committed.get_mut(*p as usize) {
                *slot = Some(*o);
            }
        }
        self
    }

    /// The partitions this consumer reads.
    pub fn assigned(&self) -> &[u32] {
        &self.assigned
    }

    /// Commits this consumer's position in every partition whose position moved since
    /// the last commit (the next offset it would read: everything before it was
    /// returned by `poll`). Needs a consumer that belongs to a group
    /// (`GroupConsumer`).
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        let Some((group, generation)) = self.group.clone() else {
            return Err(ClientError::Invalid("this consumer belongs to no group; use a GroupConsumer".into()));
        };
        let mut tasks = tokio::task::JoinSet::new();
        for &p in &self.assigned {
            let offset = self.positions[p as usize];
            if self.committed[p as usize] == Some(offset) {
                continue;
            }
            let req = CommitOffsetRequest { group: group.clone(), topic: self.topic.clone(), partition: p, generation: Some(generation), offset };
            let cluster = self.cluster.clone();
            tasks.spawn(async move {
                let deadline = Instant::now() + cluster.config().request_timeout;
                let request = message::encode(&req);
                let result = cluster.call_partition(&req.topic, p, api::COMMIT_OFFSET, &|_| request.clone(), deadline).await;
                (p, offset, result)
            });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            let (p, offset, result) = joined.map_err(|e| ClientError::Invalid(format!("commit task failed: {e}")))?;
            match result {
                Ok(_) => self.committed[p as usize] = Some(offset),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A consumer of only the listed partitions, each from its own offset.
    pub async fn assign(cluster: Cluster, topic: &str, starts: &[(u32, u64)]) -> Result<Consumer, ClientError> {
        let partitions = cluster.partitions(topic).await?;
        let mut positions = vec![0; partitions as usize];
        let mut assigned = Vec::new();
        for (p, offset) in starts {
            let slot = positions.get_mut(*p as usize).ok_or_else(|| ClientError::Invalid(format!("{topic} has partitions 0..{partitions}, not {p}")))?;
            *slot = *offset;
            assigned.push(*p);
        }
        assigned.sort_unstable();
        assigned.dedup();
        let committed = vec![None; positions.len()];
        Ok(Consumer {
            cluster,
            topic: topic.to_string(),
            positions,
            assigned,
            max_bytes: 1024 * 1024,
            skip_undecodable: false,
            group: None,
            committed,
            retention_skips: Vec::new(),
        })
    }

    /// One fetch of `partition` from `offset`, with what the leader reported (its high
    /// watermark and log start); positions do not move. For tools that track offsets
    /// themselves (the Jepsen harness records every poll).
    pub async fn fetch_partition(&self, partition: u32, offset: u64, max_wait: Duration) -> Result<PartitionFetch, ClientError> {
        let f = fetch(&self.cluster, &self.topic, partition, offset, self.max_bytes, max_wait).await?;
        Ok(PartitionFetch {
            messages: f.messages,
            high_watermark: f.high_watermark,
            log_start_offset: f.log_start_offset,
            undecodable_at: f.undecodable.map(|u| (u.offset, u.next_offset)),
        })
    }

    /// The moves past messages retention deleted before this consumer read them, since
    /// the last call (for telling a user; the consumer has already moved on).
    pub fn take_retention_skips(&mut self) -> Vec<RetentionSkip> {
        std::mem::take(&mut self.retention_skips)
    }

    /// The next offset this consumer will read in each partition.
    pub fn positions(&self) -> &[u64] {
        &self.positions
    }

    /// Moves `partition`'s position to `offset` (forward or back), e.g. past a batch
    /// that does not decode (`ClientError::UndecodableBatch` names where it ends).
    pub fn skip_to(&mut self, partition: u32, offset: u64) -> Result<(), ClientError> {
        let pos = self.positions.get_mut(partition as usize).ok_or_else(|| ClientError::Invalid(format!("{} has no partition {partition}", self.topic)))?;
        *pos = offset;
        Ok(())
    }

    /// Messages available now, or after waiting up to `max_wait` for any to arrive.
    ///
    /// First every partition is fetched without waiting; if any has messages, they are
    /// returned at once (so a caught-up partition's long-poll never holds up the others).
    /// Only when none has any do the fetches long-poll, and the first partition to
    /// answer with messages ends the wait (the other fetches are dropped; every
    /// partition is asked again, without waiting, on the next poll).
    pub async fn poll(&mut self, max_wait: Duration) -> Result<Vec<Message>, ClientError> {
        let out = self.fetch_all(Duration::ZERO).await?;
        if !out.is_empty() || max_wait.is_zero() {
            return Ok(out);
        }
        self.fetch_all(max_wait).await
    }

    /// Fetches every partition with `max_wait`; with a non-zero wait, stops at the
    /// first answer that carries messages.
    async fn fetch_all(&mut self, max_wait: Duration) -> Result<Vec<Message>, ClientError> {
        let mut tasks = tokio::task::JoinSet::new();
        for &p in &self.assigned {
            let offset = self.positions[p as usize];
            let (cluster, topic, max_bytes) = (self.cluster.clone(), self.topic.clone(), self.max_bytes);
            tasks.spawn(async move { (p, fetch(&cluster, &topic, p, offset, max_bytes, max_wait).await) });
        }
        let mut out = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (p, result) = joined.map_err(|e| ClientError::Invalid(format!("fetch task failed: {e}")))?;
            let fetched = match result {
                // Behind the log start: retention deleted these messages; go on from the
                // earliest there is (said once per jump, as a warning).
                Err(e) if e.out_of_range().is_some_and(|r| self.positions[p as usize] < r.log_start_offset) => {
                    let r = e.out_of_range().expect("checked above");
                    tracing::warn!(topic = %self.topic, partition = p, from = self.positions[p as usize], to = r.log_start_offset, "retention deleted messages before this consumer read them; skipping to the log start");
                    Fetched { high_watermark: r.high_watermark, log_start_offset: r.log_start_offset, messages: Vec::new(), undecodable: None }
                }
                other => other?,
            };
            let pos = &mut self.positions[p as usize];
            if *pos < fetched.log_start_offset {
                // Retention removed the earlier messages.
                if self.retention_skips.len() >= RETENTION_SKIPS_KEPT {
                    self.retention_skips.remove(0);
                }
                self.retention_skips.push(RetentionSkip { partition: p, from: *pos, to: fetched.log_start_offset });
                *pos = fetched.log_start_offset;
            }
            let before = out.len();
            for m in fetched.messages {
                if m.offset >= *pos {
                    *pos = m.offset + 1;
                    out.push(m);
                }
            }
            // A batch that does not decode is met once everything before it was
            // returned: then it is the next thing at this position.
            if let Some(bad) = fetched.undecodable {
                if out.len() == before && bad.next_offset > *pos {
                    if !self.skip_undecodable {
                        return Err(ClientError::UndecodableBatch {
                            topic: self.topic.clone(),
                            partition: p,
                            offset: bad.offset,
                            next_offset: bad.next_offset,
                            reason: bad.reason,
                        });
                    }
                    tracing::warn!(topic = %self.topic, partition = p, offset = bad.offset, next = bad.next_offset, reason = %bad.reason, "skipping a stored batch that does not decode");
                    *pos = bad.next_offset;
                }
            }
            if !max_wait.is_zero() && !out.is_empty() {
                break; // dropping `tasks` cancels the fetches still long-polling
            }
        }
        out.sort_by_key(|m| (m.partition, m.offset));
        Ok(out)
    }
}

/// Stream group `group`'s committed offset in one partition, as its leader knows it.
pub async fn fetch_committed(cluster: &Cluster, topic: &str, group: &str, partition: u32) -> Result<FetchOffsetResponse, ClientError> {
    let deadline = Instant::now() + cluster.config().request_timeout;
    let request = message::encode(&FetchOffsetRequest { group: group.to_string(), topic: topic.to_string(), partition });
    let (_, body) = cluster.call_partition(topic, partition, api::FETCH_OFFSET, &|_| request.clone(), deadline).await?;
    message::decode(&body).map_err(|e| ClientError::Malformed { addr: format!("{topic}/{partition} leader"), reason: e.to_string() })
}

pub async fn list_offset(cluster: &Cluster, topic: &str, partition: u32, timestamp_ms: i64) -> Result<u64, ClientError> {
    let deadline = Instant::now() + cluster.config().request_timeout;
    let request = message::encode(&ListOffsetsRequest { topic: topic.to_string(), partition, timestamp_ms });
    let (_, body) = cluster.call_partition(topic, partition, api::LIST_OFFSETS, &|_| request.clone(), deadline).await?;
    let resp: ListOffsetsResponse =
        message::decode(&body).map_err(|e| ClientError::Malformed { addr: format!("{topic}/{partition} leader"), reason: e.to_string() })?;
    Ok(resp.offset)
}

/// A stored batch whose records do not decode.
pub(crate) struct Undecodable {
    pub(crate) offset: u64,
    pub(crate) next_offset: u64,
    pub(crate) reason: String,
}

/// What one fetch of a partition returned (see [`Consumer::fetch_partition`]).
#[derive(Debug, Clone)]
pub struct PartitionFetch {
    pub messages: Vec<Message>,
    /// Messages below this offset were committed when the leader answered.
    pub high_watermark: u64,
    /// The first offset the partition still holds.
    pub log_start_offset: u64,
    /// A stored batch that does not decode, `(offset, next_offset)`: the messages stop
    /// before it.
    pub undecodable_at: Option<(u64, u64)>,
}

/// What one fetch returned: the partition's log start offset, the messages, and the
/// first batch that did not decode (the messages stop before it).
struct Fetched {
    high_watermark: u64,
    log_start_offset: u64,
    messages: Vec<Message>,
    undecodable: Option<Undecodable>,
}

/// One fetch of the messages at or after `offset`.
async fn fetch(cluster: &Cluster, topic: &str, partition: u32, offset: u64, max_bytes: u32, max_wait: Duration) -> Result<Fetched, ClientError> {
    let req = FetchRequest { topic: topic.to_string(), partition, offset, max_bytes, max_wait_ms: max_wait.as_millis().min(u128::from(u32::MAX)) as u32 };
    let deadline = Instant::now() + max_wait + cluster.config().request_timeout;
    let request = message::encode(&req);
    let body = match cluster.call_partition(topic, partition, api::FETCH, &|_| request.clone(), deadline).await {
        Ok((_, b)) => b,
        Err(e) => return Err(e),
    };
    let malformed = |reason: String| ClientError::Malformed { addr: format!("{topic}/{partition} leader"), reason };
    let (head, batches): (FetchResponse, Bytes) = message::split_with_batches(&body).map_err(|e| malformed(e.to_string()))?;
    let mut out = Vec::new();
    for view in message::split_batches(batches).map_err(|e| malformed(e.to_string()))? {
        match decode_batch(&view, partition) {
            Ok(decoded) => out.extend(decoded),
            Err(undecodable) => {
                return Ok(Fetched {
                    high_watermark: head.high_watermark,
                    log_start_offset: head.log_start_offset,
                    messages: out,
                    undecodable: Some(undecodable),
                });
            }
        }
    }
    Ok(Fetched { high_watermark: head.high_watermark, log_start_offset: head.log_start_offset, messages: out, undecodable: None })
}

/// Every record of a fetched batch as a [`Message`] (key, value and headers are slices
/// of the batch), or why the batch does not decode.
pub(crate) fn decode_batch(view: &keel_protocol::BatchView, partition: u32) -> Result<Vec<Message>, Undecodable> {
    let bytes = view.as_bytes().clone();
    let base = view.header().base_offset;
    let mut decoded = Vec::with_capacity(view.header().record_count as usize);
    for record in view.records() {
        let r = record.map_err(|e| Undecodable { offset: base, next_offset: base + u64::from(view.header().record_count), reason: e.to_string() })?;
        decoded.push(Message {
            partition,
            offset: base + u64::from(r.offset_delta),
            timestamp_ms: r.timestamp_ms,
            key: r.key.map(|k| bytes.slice_ref(k)),
            value: r.value.map(|v| bytes.slice_ref(v)),
            headers: r.headers().map(|(k, v)| (k.to_string(), v.map(|v| bytes.slice_ref(v)))).collect(),
            priority: view.header().priority,
        });
    }
    Ok(decoded)
}
