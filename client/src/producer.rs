//! `Producer`: batching, a bounded in-flight window, retries, ordered per partition.
//!
//! `send` hands a record to a background task (the hand-off queue is bounded: a full
//! queue makes `send` wait — backpressure, not memory growth). A keyed record goes to
//! the partition its key hashes to; a record without key or partition goes to its
//! topic's *sticky* partition, which moves on to the next partition each time that
//! partition's batch closes (as Kafka's default partitioner since KIP-480): keyless
//! records spread over partitions batch by batch, in fewer and fuller batches than
//! record by record. The task groups records per partition into batches, closes a batch when it reaches `batch_bytes` or has
//! waited `linger`, and sends it to the partition leader through `Cluster::call_partition`
//! (retries, redirects, breakers). At most `max_in_flight_per_partition` batches per
//! partition are outstanding (1 by default, which keeps order across retries) and at
//! most `max_in_flight` overall.
//!
//! Delivery is at-least-once: a batch whose first attempt landed but whose answer was
//! lost is sent again and stored twice. Idempotent dedupe arrives with its own issue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_protocol::api::client as api;
use keel_protocol::batch::{BatchBuilder, BatchOptions, BuildError, NewRecord};
use keel_protocol::message::{self, ProduceRequest, ProduceResponse};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::cluster::Cluster;
use crate::error::ClientError;

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Close a batch at this size (bytes). A batch never exceeds the topic's
    /// `max_message_bytes` either: a record that would push it over goes to a new batch.
    pub batch_bytes: usize,
    /// Close a batch after it has waited this long for more records.
    pub linger: Duration,
    /// Batches outstanding across all partitions.
    pub max_in_flight: usize,
    /// Batches outstanding per partition; 1 keeps order even when batches are retried.
    pub max_in_flight_per_partition: usize,
    /// Records handed to `send` but not yet in a batch. Full: `send` waits.
    pub queue_records_max: usize,
    /// How long a batch may take, retries included, before its records fail.
    pub delivery_timeout: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            batch_bytes: 256 * 1024,
            linger: Duration::from_millis(5),
            max_in_flight: 64,
            max_in_flight_per_partition: 1,
            queue_records_max: 16 * 1024,
            delivery_timeout: Duration::from_secs(30),
        }
    }
}

/// A record to send.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Records with the same key go to the same partition (FNV-1a hash).
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<(String, Bytes)>,
    /// Milliseconds since the epoch; now if `None`.
    pub timestamp_ms: Option<i64>,
    /// Send to this partition instead of choosing by key.
    pub partition: Option<u32>,
}

impl Record {
    pub fn new(value: impl Into<Bytes>) -> Record {
        Record { value: value.into(), ..Record::default() }
    }

    pub fn with_key(mut self, key: impl Into<Bytes>) -> Record {
        self.key = Some(key.into());
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Record {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Where an acknowledged record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub partition: u32,
    pub offset: u64,
}

/// Resolves when the record is acknowledged (committed) or has failed.
pub struct DeliveryFuture(oneshot::Receiver<Result<Delivery, ClientError>>);

impl DeliveryFuture {
    pub async fn wait(self) -> Result<Delivery, ClientError> {
        self.0.await.unwrap_or(Err(ClientError::Closed("producer")))
    }
}

enum Command {
    Send { topic: String, record: Record, done: oneshot::Sender<Result<Delivery, ClientError>> },
    Flush(oneshot::Sender<()>),
}

/// Sends records to topics.
///
/// ```no_run
/// # async fn demo() -> Result<(), keel_client::ClientError> {
/// use keel_client::producer::{Producer, ProducerConfig, Record};
/// use keel_client::{ClientConfig, Cluster};
/// let producer = Producer::new(Cluster::new(ClientConfig::default())?, ProducerConfig::default());
/// let ack = producer.send("orders", Record::new("payload").with_key("o-17").with_header("trace", "abc")).await?;
/// println!("stored at {:?}", ack.wait().await?);
/// producer.close().await;
/// # Ok(()) }
/// ```
pub struct Producer {
    tx: mpsc::Sender<Command>,
    task: JoinHandle<()>,
}

impl Producer {
    pub fn new(cluster: Cluster, config: ProducerConfig) -> Producer {
        assert!(config.max_in_flight > 0 && config.max_in_flight_per_partition > 0 && config.queue_records_max > 0, "producer bounds must be positive");
        let (tx, rx) = mpsc::channel(config.queue_records_max);
        let task = tokio::spawn(run(cluster, config, rx));
        Producer { tx, task }
    }

    /// Queues a record; waits if the queue is full. The returned future resolves when
    /// the record is acknowledged.
    pub async fn send(&self, topic: &str, record: Record) -> Result<DeliveryFuture, ClientError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Send { topic: topic.to_string(), record, done }).await.map_err(|_| ClientError::Closed("producer"))?;
        Ok(DeliveryFuture(rx))
    }

    /// Sends every queued record now and waits until each is acknowledged or failed.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let (ack, rx) = oneshot::channel();
        self.tx.send(Command::Flush(ack)).await.map_err(|_| ClientError::Closed("producer"))?;
        rx.await.map_err(|_| ClientError::Closed("producer"))
    }

    /// Flushes, then stops the background task.
    pub async fn close(self) {
        let _ = self.flush().await;
        drop(self.tx);
        let _ = self.task.await;
    }
}

/// FNV-1a: stable across versions and platforms, so a key always maps to one partition.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

struct OpenBatch {
    builder: BatchBuilder,
    waiters: Vec<oneshot::Sender<Result<Delivery, ClientError>>>,
    opened: Instant,
}

struct Runner {
    cluster: Cluster,
    config: ProducerConfig,
    open: HashMap<(String, u32), OpenBatch>,
    /// Per topic: the partition keyless records go to until its batch closes.
    sticky: HashMap<String, u32>,
    all: Arc<Semaphore>,
    per_partition: HashMap<(String, u32), Arc<Semaphore>>,
    sends: tokio::task::JoinSet<()>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

async fn run(cluster: Cluster, config: ProducerConfig, mut rx: mpsc::Receiver<Command>) {
    let linger = config.linger;
    let mut r = Runner {
        all: Arc::new(Semaphore::new(config.max_in_flight)),
        cluster,
        config,
        open: HashMap::new(),
        sticky: HashMap::new(),
        per_partition: HashMap::new(),
        sends: tokio::task::JoinSet::new(),
    };
    let mut tick = tokio::time::interval(linger.max(Duration::from_millis(1)));
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Command::Send { topic, record, done }) => r.add(topic, record, done).await,
                Some(Command::Flush(ack)) => {
                    r.seal_all(|_| true).await;
                    while r.sends.join_next().await.is_some() {}
                    let _ = ack.send(());
                }
                None => {
                    r.seal_all(|_| true).await;
                    while r.sends.join_next().await.is_some() {}
                    return;
                }
            },
            _ = tick.tick() => {
                let linger = r.config.linger;
                r.seal_all(|b| b.opened.elapsed() >= linger).await;
            }
            Some(_) = r.sends.join_next(), if !r.sends.is_empty() => {}
        }
    }
}

impl Runner {
    async fn add(&mut self, topic: String, record: Record, done: oneshot::Sender<Result<Delivery, ClientError>>) {
        let (n, max_batch) = match self.cluster.topic_shape(&topic).await {
            Ok(shape) => shape,
            Err(e) => {
                let _ = done.send(Err(e));
                return;
            }
        };
        let partition = match (record.partition, &record.key) {
            (Some(p), _) => p,
            (None, Some(k)) => partition_for_key(k, n),
            (None, None) => {
                // Kept below `n` here, so `seal` can compare it with the partition it
                // closes.
                let stored = self.sticky.get(topic.as_str()).copied();
                let p = stored.unwrap_or(0) % n;
                if stored != Some(p) {
                    self.sticky.insert(topic.clone(), p);
                }
                p
            }
        };
        let key = (topic, partition);
        let timestamp_ms = record.timestamp_ms.unwrap_or_else(now_ms);
        let headers: Vec<(&str, Option<&[u8]>)> = record.headers.iter().map(|(k, v)| (k.as_str(), Some(&v[..]))).collect();
        let new_record = NewRecord { timestamp_ms, key: record.key.as_deref(), value: Some(&record.value), headers: &headers };
        for _ in 0..2 {
            if !self.open.contains_key(&key) {
                // Never build a batch the topic would refuse.
                let size_max = (max_batch as usize).min(keel_protocol::limits::BATCH_SIZE_MAX);
                let builder = match BatchBuilder::new(BatchOptions { size_max, ..BatchOptions::default() }) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = done.send(Err(ClientError::Invalid(format!("topic {}: {e}", key.0))));
                        return;
                    }
                };
                self.open.insert(key.clone(), OpenBatch { builder, waiters: Vec::new(), opened: Instant::now() });
            }
            let batch = self.open.get_mut(&key).expect("inserted above");
            match batch.builder.push(new_record) {
                Ok(()) => {
                    batch.waiters.push(done);
                    if batch.builder.len() >= self.config.batch_bytes {
                        self.seal(&key).await;
                    }
                    return;
                }
                Err(BuildError::BatchFull { .. }) => self.seal(&key).await,
                Err(e) => {
                    let _ = done.send(Err(ClientError::Invalid(e.to_string())));
                    return;
                }
            }
        }
        let _ = done.send(Err(ClientError::Invalid("the record does not fit an empty batch".into())));
    }

    async fn seal_all(&mut self, due: impl Fn(&OpenBatch) -> bool) {
        let keys: Vec<(String, u32)> = self.open.iter().filter(|(_, b)| due(b)).map(|(k, _)| k.clone()).collect();
        for k in keys {
            self.seal(&k).await;
        }
    }

    /// Closes the open batch of `key` and sends it once the in-flight windows allow.
    async fn seal(&mut self, key: &(String, u32)) {
        let Some(batch) = self.open.remove(key) else { return };
        if let Some(sticky) = self.sticky.get_mut(key.0.as_str()) {
            if *sticky == key.1 {
                *sticky = sticky.wrapping_add(1);
            }
        }
        if batch.builder.is_empty() {
            return;
        }
        let part_sem = self.per_partition.entry(key.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.config.max_in_flight_per_partition))).clone();
        // Waiting here is the in-flight bound: the task stops taking records meanwhile.
        let part_permit = part_sem.acquire_owned().await.expect("producer semaphores are never closed");
        let all_permit = self.all.clone().acquire_owned().await.expect("producer semaphores are never closed");
        let bytes = batch.builder.finish().expect("a non-empty batch finishes");
        let (topic, partition) = key.clone();
        let cluster = self.cluster.clone();
        let deadline = Instant::now() + self.config.delivery_timeout;
        self.sends.spawn(async move {
            let req = ProduceRequest { topic: topic.clone(), partition, timeout_ms: 10_000 };
            let payload = message::encode_with_batches(&req, &[bytes]);
            let result = cluster.call_partition(&topic, partition, api::PRODUCE, payload, deadline).await;
            let result = result.and_then(|body| {
                message::decode::<ProduceResponse>(&body)
                    .map_err(|e| ClientError::Malformed { addr: format!("{topic}/{partition} leader"), reason: e.to_string() })
            });
            match result {
                Ok(resp) => {
                    for (i, w) in batch.waiters.into_iter().enumerate() {
                        let _ = w.send(Ok(Delivery { partition, offset: resp.base_offset + i as u64 }));
                    }
                }
                Err(e) => {
                    for w in batch.waiters {
                        let _ = w.send(Err(e.clone()));
                    }
                }
            }
            drop((part_permit, all_permit));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_always_maps_to_the_same_partition_and_keys_spread() {
        assert_eq!(partition_for_key(b"o-17", 3), partition_for_key(b"o-17", 3));
        let mut counts = [0; 3];
        for i in 0..3000 {
            counts[partition_for_key(format!("key-{i}").as_bytes(), 3) as usize] += 1;
        }
        assert!(counts.iter().all(|c| *c > 800), "{counts:?}");
    }
}
