//! `Producer`: batching, a bounded in-flight window, retries, ordered per partition,
//! and — on by default — idempotence: a retried batch is never stored twice.
//!
//! `send` hands a record to a background task (the hand-off queue is bounded: a full
//! queue makes `send` wait — backpressure, not memory growth). A keyed record goes to
//! the partition its key hashes to; a record without key or partition goes to its
//! topic's *sticky* partition, which moves on each time that partition's batch closes
//! (as Kafka's default partitioner since KIP-480). The task groups records per
//! partition into batches and closes a batch when it reaches `batch_bytes` or has
//! waited `linger` — or at once when the application's window of unanswered sends is
//! full (the records awaiting an answer are back at their learned peak: nothing more can
//! arrive before an answer, so lingering would only add latency;
//! `close_when_window_full`); each partition's batches then go through that partition's
//! *sender*, which keeps at most `max_in_flight_per_partition` of them outstanding (and
//! the producer at most `max_in_flight`) and delivers their results in order.
//!
//! **Idempotence.** The producer gets an id and epoch from the cluster (`InitProducer`)
//! and numbers its batches to each partition 0, 1, 2, …; the same bytes are resent on
//! every retry, so the leader recognises a batch it already stored and answers with the
//! original offsets. Up to 5 batches are in flight per partition: a batch the leader
//! refuses as out of order (an earlier one had not arrived) is resent, in order, once
//! the earlier ones are answered. A batch that fails for good — its delivery timeout
//! passed, so whether it was stored is unknown — breaks the sequence: the producer then
//! starts a new epoch (for a named producer through `InitProducer`, which fences any
//! other instance of the name), waits until nothing is in flight, and renumbers from 0
//! the batches the leader refused. The failed batch is reported to the application as
//! a timeout (outcome unknown), never resent silently; a message id makes an
//! application resend safe.
//!
//! **Message ids.** A record may carry a message id; the leader stores a message whose
//! id it stored within the topic's dedupe window only once and answers with the
//! original offset ([`Delivery::duplicate`]). A batch in which only some records are
//! duplicates is refused as a whole (one copy of the bytes: the broker never rewrites a
//! batch); the sender then resolves those records and resends the rest under the same
//! sequence number.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use keel_protocol::api::client as api;
use keel_protocol::batch::{restamp_producer, BatchBuilder, BatchOptions, BuildError, NewRecord, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE};
use keel_protocol::limits::PRODUCER_BATCHES_IN_FLIGHT_MAX;
use keel_protocol::message::{
    self, Duplicate, DuplicateMessageIds, InitProducerRequest, InitProducerResponse, ProduceRequest, ProduceResponse, ProducerIdentity,
};
use keel_protocol::{BatchView, ErrorCode};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
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
    /// Close open batches before their `linger` when the producer's records awaiting an
    /// answer are back at their recent peak: an application that bounds what it has
    /// unacknowledged (a window of sends) has then filled that window, so no record can
    /// arrive until an answer does, and lingering would only add latency. The peak is
    /// learned (raised by a new high, lowered when a batch waited out its linger while
    /// the application had stopped sending), so a steady closed loop sends one full
    /// batch per round trip. Off: batches close only at `linger` or `batch_bytes`.
    pub close_when_window_full: bool,
    /// Batches outstanding across all partitions.
    pub max_in_flight: usize,
    /// Batches outstanding per partition: at most `PRODUCER_BATCHES_IN_FLIGHT_MAX` (5)
    /// with idempotence, which keeps order across retries; without idempotence, more
    /// than 1 can reorder batches when one is retried.
    pub max_in_flight_per_partition: usize,
    /// Records handed to `send` but not yet in a batch. Full: `send` waits.
    pub queue_records_max: usize,
    /// How long a batch may take, retries included, before its records fail (with an
    /// unknown outcome).
    pub delivery_timeout: Duration,
    /// Longest the broker may wait for one produce to commit before answering
    /// `RequestTimedOut` (retried, safely with idempotence).
    pub request_timeout: Duration,
    /// Idempotent producing (default on): a retried batch is never stored twice.
    pub idempotence: bool,
    /// A stable producer name (needs idempotence): a new instance with the same name
    /// fences the previous one, whose writes then fail with `ProducerFenced`.
    pub name: Option<String>,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            batch_bytes: 256 * 1024,
            linger: Duration::from_millis(5),
            close_when_window_full: true,
            max_in_flight: 64,
            max_in_flight_per_partition: PRODUCER_BATCHES_IN_FLIGHT_MAX,
            queue_records_max: 16 * 1024,
            delivery_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            idempotence: true,
            name: None,
        }
    }
}

impl ProducerConfig {
    /// Checks the settings against each other and the protocol limits.
    pub fn validate(&self) -> Result<(), ClientError> {
        let invalid = |m: String| Err(ClientError::Invalid(m));
        if self.max_in_flight == 0 || self.max_in_flight_per_partition == 0 || self.queue_records_max == 0 {
            return invalid("producer bounds (max_in_flight, max_in_flight_per_partition, queue_records_max) must be positive".into());
        }
        if self.idempotence && self.max_in_flight_per_partition > PRODUCER_BATCHES_IN_FLIGHT_MAX {
            return invalid(format!(
                "an idempotent producer keeps at most {PRODUCER_BATCHES_IN_FLIGHT_MAX} batches in flight per partition (the leader remembers that many), not {}",
                self.max_in_flight_per_partition
            ));
        }
        if self.name.is_some() && !self.idempotence {
            return invalid("a producer name needs idempotence".into());
        }
        if self.name.as_ref().is_some_and(|n| n.is_empty() || n.len() > 255) {
            return invalid("a producer name is 1..=255 bytes".into());
        }
        Ok(())
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
    /// A message id (1..=256 bytes): within the topic's dedupe window, a message whose
    /// id was already stored in its partition is not stored again. Ids are per
    /// partition, so a resend must reach the same partition (give it the same key).
    pub message_id: Option<Bytes>,
    /// Priority lane (`0..` the topic's `priorities`; 0 by default): queue groups deliver
    /// higher lanes first, by weight. Records of different lanes never share a batch.
    pub priority: u8,
    /// Not before this time (ms since the epoch) to queue groups: scheduled delivery
    /// (at most the broker's `SCHEDULED_DELAY_MAX` ahead). Stream consumers read it
    /// in log order as usual.
    pub deliver_at_ms: Option<i64>,
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

    pub fn with_priority(mut self, lane: u8) -> Record {
        self.priority = lane;
        self
    }

    /// Delivered to queue groups not before `at`.
    pub fn deliver_at(mut self, at: std::time::SystemTime) -> Record {
        self.deliver_at_ms = Some(at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64));
        self
    }

    /// Delivered to queue groups not before `delay` from now.
    pub fn deliver_after(self, delay: Duration) -> Record {
        self.deliver_at(std::time::SystemTime::now() + delay)
    }

    pub fn with_message_id(mut self, id: impl Into<Bytes>) -> Record {
        self.message_id = Some(id.into());
        self
    }
}

/// Where an acknowledged record is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub partition: u32,
    pub offset: u64,
    /// The record had been stored before (a retried batch, or a message id already in
    /// the dedupe window): `offset` is where that copy is, and nothing new was stored.
    pub duplicate: bool,
}

type DeliveryResult = Result<Delivery, ClientError>;

/// Resolves when the record is acknowledged (committed) or has failed.
pub struct DeliveryFuture(oneshot::Receiver<DeliveryResult>);

impl DeliveryFuture {
    pub async fn wait(self) -> DeliveryResult {
        self.0.await.unwrap_or(Err(ClientError::Closed("producer")))
    }
}

enum Command {
    Send { topic: String, record: Record, done: oneshot::Sender<DeliveryResult> },
    Flush(oneshot::Sender<()>),
}

/// Sends records to topics.
///
/// ```no_run
/// # async fn demo() -> Result<(), keel_client::ClientError> {
/// use keel_client::producer::{Producer, ProducerConfig, Record};
/// use keel_client::{ClientConfig, Cluster};
/// let producer = Producer::new(Cluster::new(ClientConfig::default())?, ProducerConfig::default())?;
/// let ack = producer.send("orders", Record::new("payload").with_key("o-17").with_message_id("order-17-created")).await?;
/// println!("stored at {:?}", ack.wait().await?);
/// producer.close().await;
/// # Ok(()) }
/// ```
pub struct Producer {
    tx: mpsc::Sender<Command>,
    task: JoinHandle<()>,
}

impl Producer {
    /// A producer; it registers with the cluster (for idempotence) on its first batch.
    pub fn new(cluster: Cluster, config: ProducerConfig) -> Result<Producer, ClientError> {
        config.validate()?;
        let (tx, rx) = mpsc::channel(config.queue_records_max);
        let task = tokio::spawn(run(cluster, config, rx));
        Ok(Producer { tx, task })
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

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

// ---------------------------------------------------------------------------------
// Identity: one per producer, shared by its partition senders.
// ---------------------------------------------------------------------------------

/// The producer's idempotence identity, as every partition sender should use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdentityState {
    /// Not registered yet.
    Unset,
    Active(ProducerIdentity),
    /// Another instance of this producer's name took over; nothing more is sent.
    Fenced,
}

/// Registers and re-registers the producer; shared by its partition senders.
struct Identity {
    cluster: Cluster,
    name: Option<String>,
    state: tokio::sync::Mutex<IdentityState>,
    /// The latest state, for senders to notice an epoch change made by another one.
    published: tokio::sync::watch::Sender<IdentityState>,
}

impl Identity {
    async fn init(&self, current: Option<ProducerIdentity>) -> Result<ProducerIdentity, ClientError> {
        let body = message::encode(&InitProducerRequest { name: self.name.clone(), current: current.filter(|_| self.name.is_some()) });
        let (_, answer) = self.cluster.call_any("register the producer", api::INIT_PRODUCER, &|_| body.clone()).await?;
        let resp: InitProducerResponse = message::decode(&answer).map_err(|e| ClientError::Malformed { addr: "a broker".into(), reason: e.to_string() })?;
        Ok(resp.producer)
    }

    /// The identity to use, registering on first use.
    async fn get(&self) -> Result<ProducerIdentity, ClientError> {
        let mut state = self.state.lock().await;
        match *state {
            IdentityState::Active(id) => Ok(id),
            IdentityState::Fenced => Err(fenced_error()),
            IdentityState::Unset => {
                let id = self.init(None).await?;
                *state = IdentityState::Active(id);
                self.published.send_replace(*state);
                Ok(id)
            }
        }
    }

    /// Starts a new epoch, unless one newer than `broken` is already in use. An
    /// anonymous producer bumps its epoch itself (its id is its own); a named one asks
    /// the cluster, which refuses if another instance has taken the name.
    async fn bump(&self, broken: ProducerIdentity) -> Result<ProducerIdentity, ClientError> {
        let mut state = self.state.lock().await;
        let current = match *state {
            IdentityState::Fenced => return Err(fenced_error()),
            IdentityState::Active(id) if id != broken => return Ok(id),
            IdentityState::Active(id) => id,
            IdentityState::Unset => return self.init(None).await,
        };
        let next = if self.name.is_none() && current.epoch < i16::MAX {
            ProducerIdentity { producer_id: current.producer_id, epoch: current.epoch + 1 }
        } else {
            match self.init(Some(current)).await {
                Ok(id) => id,
                Err(e) if e.code() == Some(ErrorCode::ProducerFenced) => {
                    *state = IdentityState::Fenced;
                    self.published.send_replace(*state);
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        };
        tracing::info!(producer_id = next.producer_id, epoch = next.epoch, "producer sequence broken by a failed batch: new epoch");
        *state = IdentityState::Active(next);
        self.published.send_replace(*state);
        Ok(next)
    }

    async fn fence(&self) {
        *self.state.lock().await = IdentityState::Fenced;
        self.published.send_replace(IdentityState::Fenced);
    }
}

fn fenced_error() -> ClientError {
    ClientError::Broker {
        what: "produce".into(),
        code: ErrorCode::ProducerFenced,
        message: "another instance of this producer's name registered after this one; stop this instance".into(),
    }
}

// ---------------------------------------------------------------------------------
// The batching task.
// ---------------------------------------------------------------------------------

/// A record handed to the producer, waiting for its batch's answer.
struct Waiter {
    tx: oneshot::Sender<DeliveryResult>,
    /// Set when the record turned out to be stored already (a duplicate message id),
    /// while the rest of its batch is resent.
    resolved: Option<Delivery>,
}

struct OpenBatch {
    builder: BatchBuilder,
    waiters: Vec<Waiter>,
    /// Message ids in this batch: a repeated id starts a new batch, since the broker
    /// refuses a batch that repeats one.
    ids: Vec<Bytes>,
    opened: Instant,
}

/// A closed batch on its way to its partition's sender.
struct Sealed {
    builder: BatchBuilder,
    waiters: Vec<Waiter>,
    deadline: Instant,
    permit: OwnedSemaphorePermit,
}

struct Runner {
    cluster: Cluster,
    config: ProducerConfig,
    identity: Option<Arc<Identity>>,
    /// Open batches per (topic, partition, priority lane).
    open: HashMap<(String, u32, u8), OpenBatch>,
    /// Per topic: the partition keyless records go to until its batch closes.
    sticky: HashMap<String, u32>,
    all: Arc<Semaphore>,
    senders: HashMap<(String, u32), mpsc::Sender<Sealed>>,
    sender_tasks: tokio::task::JoinSet<()>,
    /// Records in batches not answered yet: counted here as a record joins a batch,
    /// uncounted by its partition sender just *before* it answers the batch, so an
    /// application woken by an answer never finds its next send counted on top.
    unresolved: Arc<AtomicUsize>,
    /// The recent peak of `unresolved`: the application's window, as far as it shows
    /// (`ProducerConfig::close_when_window_full`).
    window_peak: usize,
    /// Records that joined a batch so far, and that count at the last linger tick: equal
    /// means the application sent nothing for a whole tick (no clock read per record).
    adds: u64,
    adds_at_tick: u64,
}

async fn run(cluster: Cluster, config: ProducerConfig, mut rx: mpsc::Receiver<Command>) {
    let linger = config.linger;
    let identity = config.idempotence.then(|| {
        Arc::new(Identity {
            cluster: cluster.clone(),
            name: config.name.clone(),
            state: tokio::sync::Mutex::new(IdentityState::Unset),
            published: tokio::sync::watch::channel(IdentityState::Unset).0,
        })
    });
    let mut r = Runner {
        all: Arc::new(Semaphore::new(config.max_in_flight)),
        cluster,
        config,
        identity,
        open: HashMap::new(),
        sticky: HashMap::new(),
        senders: HashMap::new(),
        sender_tasks: tokio::task::JoinSet::new(),
        unresolved: Arc::new(AtomicUsize::new(0)),
        window_peak: 0,
        adds: 0,
        adds_at_tick: 0,
    };
    let mut tick = tokio::time::interval(linger.max(Duration::from_millis(1)));
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Command::Send { topic, record, done }) => r.add(topic, record, done).await,
                Some(Command::Flush(ack)) => {
                    r.seal_all(|_| true).await;
                    r.wait_idle().await;
                    let _ = ack.send(());
                }
                None => {
                    r.seal_all(|_| true).await;
                    r.wait_idle().await;
                    return;
                }
            },
            _ = tick.tick() => r.seal_lingered().await,
        }
    }
}

impl Runner {
    async fn add(&mut self, topic: String, record: Record, done: oneshot::Sender<DeliveryResult>) {
        let (n, max_batch) = match self.cluster.topic_shape(&topic).await {
            Ok(shape) => shape,
            Err(e) => {
                let _ = done.send(Err(e));
                return;
            }
        };
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if p >= n => {
                let _ = done.send(Err(ClientError::Invalid(format!("topic {topic} has partitions 0..{n}, not {p}"))));
                return;
            }
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
        let key = (topic, partition, record.priority);
        if let Some(id) = &record.message_id {
            if self.open.get(&key).is_some_and(|b| b.ids.contains(id)) {
                self.seal(&key).await;
            }
        }
        let timestamp_ms = record.timestamp_ms.unwrap_or_else(now_ms);
        let headers: Vec<(&str, Option<&[u8]>)> = record.headers.iter().map(|(k, v)| (k.as_str(), Some(&v[..]))).collect();
        let new_record = NewRecord {
            timestamp_ms,
            key: record.key.as_deref(),
            value: Some(&record.value),
            headers: &headers,
            message_id: record.message_id.as_deref(),
            deliver_at_ms: record.deliver_at_ms,
        };
        for _ in 0..2 {
            if !self.open.contains_key(&key) {
                // Never build a batch the topic would refuse.
                let size_max = (max_batch as usize).min(keel_protocol::limits::BATCH_SIZE_MAX);
                let builder = match BatchBuilder::new(BatchOptions { size_max, priority: key.2, ..BatchOptions::default() }) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = done.send(Err(ClientError::Invalid(format!("topic {}: {e}", key.0))));
                        return;
                    }
                };
                self.open.insert(key.clone(), OpenBatch { builder, waiters: Vec::new(), ids: Vec::new(), opened: Instant::now() });
            }
            let batch = self.open.get_mut(&key).expect("inserted above");
            match batch.builder.push(new_record) {
                Ok(()) => {
                    batch.waiters.push(Waiter { tx: done, resolved: None });
                    if let Some(id) = &record.message_id {
                        batch.ids.push(id.clone());
                    }
                    let batch_full = batch.builder.len() >= self.config.batch_bytes;
                    let window_full = self.note_added();
                    if window_full {
                        self.seal_all(|_| true).await;
                    } else if batch_full {
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

    /// Counts a record that joined a batch; true if the application's window is full
    /// now — the records awaiting an answer are back at their peak (reached from below:
    /// a new high only raises the peak), so nothing more can arrive before an answer.
    fn note_added(&mut self) -> bool {
        self.adds += 1;
        let n = self.unresolved.fetch_add(1, Ordering::AcqRel) + 1;
        if n > self.window_peak {
            self.window_peak = n;
            return false;
        }
        self.config.close_when_window_full && n == self.window_peak
    }

    /// Closes the batches that have waited out their linger. If one did while the
    /// application had stopped sending (nothing added for a whole tick, which is at
    /// least a linger), its window is smaller than the peak learned: the peak comes
    /// down to what is outstanding now.
    async fn seal_lingered(&mut self) {
        let linger = self.config.linger;
        let stalled = self.adds == self.adds_at_tick;
        self.adds_at_tick = self.adds;
        if !self.open.values().any(|b| b.opened.elapsed() >= linger) {
            return;
        }
        if stalled {
            self.window_peak = self.unresolved.load(Ordering::Acquire);
        }
        self.seal_all(|b| b.opened.elapsed() >= linger).await;
    }

    async fn seal_all(&mut self, due: impl Fn(&OpenBatch) -> bool) {
        let keys: Vec<(String, u32, u8)> = self.open.iter().filter(|(_, b)| due(b)).map(|(k, _)| k.clone()).collect();
        for k in keys {
            self.seal(&k).await;
        }
    }

    /// Waits until every batch handed to a sender has been answered.
    async fn wait_idle(&mut self) {
        let all = self.config.max_in_flight as u32;
        drop(self.all.acquire_many(all).await.expect("producer semaphores are never closed"));
        while self.sender_tasks.try_join_next().is_some() {}
    }

    /// Closes the open batch of `key` and hands it to the partition's sender (waiting,
    /// when the producer's window is full: the task then stops taking records).
    async fn seal(&mut self, open_key: &(String, u32, u8)) {
        let Some(batch) = self.open.remove(open_key) else { return };
        let key = &(open_key.0.clone(), open_key.1);
        if let Some(sticky) = self.sticky.get_mut(key.0.as_str()) {
            if *sticky == key.1 {
                *sticky = sticky.wrapping_add(1);
            }
        }
        if batch.builder.is_empty() {
            return;
        }
        let permit = self.all.clone().acquire_owned().await.expect("producer semaphores are never closed");
        let sealed = Sealed { builder: batch.builder, waiters: batch.waiters, deadline: Instant::now() + self.config.delivery_timeout, permit };
        let tx = match self.senders.get(key) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(1);
                let sender = PartitionSender {
                    cluster: self.cluster.clone(),
                    topic: key.0.clone(),
                    partition: key.1,
                    window: self.config.max_in_flight_per_partition,
                    unresolved: self.unresolved.clone(),
                    request_timeout: self.config.request_timeout,
                    identity: self.identity.clone(),
                    epoch_in_use: None,
                    next_sequence: 0,
                    slots: VecDeque::new(),
                    next_slot: 0,
                    needs_new_epoch: false,
                };
                self.sender_tasks.spawn(sender.run(rx));
                self.senders.insert(key.clone(), tx.clone());
                tx
            }
        };
        if let Err(mpsc::error::SendError(sealed)) = tx.send(sealed).await {
            self.unresolved.fetch_sub(sealed.waiters.len(), Ordering::AcqRel);
            for w in sealed.waiters {
                let _ = w.tx.send(Err(ClientError::Closed("partition sender")));
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// The partition sender: the in-flight window, ordering, retries and renumbering.
// ---------------------------------------------------------------------------------

#[derive(Debug)]
enum SlotState {
    /// An attempt is outstanding.
    InFlight,
    /// Answered: stored (or a duplicate), ready to deliver in order.
    Done(ProduceResponse),
    /// Refused in a way a resend can fix (out of order behind an earlier batch, or
    /// fenced by this producer's own new epoch): resend once it is the oldest.
    Resend,
    /// Failed for good; `in_doubt` if it may have been stored (its deadline passed).
    Failed(ClientError),
}

struct Slot {
    id: u64,
    bytes: Bytes,
    /// The identity and sequence stamped in `bytes` (`None` without idempotence).
    stamp: Option<(ProducerIdentity, i32)>,
    waiters: Vec<Waiter>,
    deadline: Instant,
    state: SlotState,
    _permit: OwnedSemaphorePermit,
}

struct PartitionSender {
    cluster: Cluster,
    topic: String,
    partition: u32,
    window: usize,
    /// The producer's count of records not answered yet (`Runner::unresolved`).
    unresolved: Arc<AtomicUsize>,
    request_timeout: Duration,
    identity: Option<Arc<Identity>>,
    /// The identity this partition's sequence numbers belong to.
    epoch_in_use: Option<ProducerIdentity>,
    next_sequence: i32,
    /// Batches in sequence order, oldest first: in flight, or answered but not yet
    /// delivered because an older one is still out.
    slots: VecDeque<Slot>,
    next_slot: u64,
    /// A batch failed for good (or the leader reported a gap nothing in flight can
    /// fill): the sequence is broken and must restart under a new epoch.
    needs_new_epoch: bool,
}

type AttemptFuture = futures::future::BoxFuture<'static, (u64, Result<ProduceResponse, ClientError>)>;

impl PartitionSender {
    async fn run(mut self, mut rx: mpsc::Receiver<Sealed>) {
        let mut attempts: FuturesUnordered<AttemptFuture> = FuturesUnordered::new();
        let mut identity_changes = self.identity.as_ref().map(|i| i.published.subscribe());
        let mut open = true;
        loop {
            let switching = self.switch_pending();
            tokio::select! {
                sealed = rx.recv(), if open && !switching && self.slots.len() < self.window => match sealed {
                    Some(sealed) => self.admit(sealed, &mut attempts).await,
                    None => open = false,
                },
                Some((slot, result)) = attempts.next(), if !attempts.is_empty() => self.answered(slot, result).await,
                changed = async { identity_changes.as_mut().expect("guarded").changed().await }, if identity_changes.is_some() => {
                    if changed.is_err() {
                        identity_changes = None;
                    }
                }
            }
            self.progress(&mut attempts).await;
            if !open && self.slots.is_empty() {
                return;
            }
        }
    }

    /// Whether the producer moved to a new epoch this partition has not switched to yet.
    fn switch_pending(&self) -> bool {
        let Some(identity) = &self.identity else { return false };
        match (*identity.published.borrow(), self.epoch_in_use) {
            (IdentityState::Active(now), Some(used)) => now != used || self.needs_new_epoch,
            (IdentityState::Fenced, _) => false,
            _ => self.needs_new_epoch,
        }
    }

    /// Numbers a sealed batch and sends it.
    async fn admit(&mut self, sealed: Sealed, attempts: &mut FuturesUnordered<AttemptFuture>) {
        let Sealed { mut builder, waiters, deadline, permit } = sealed;
        let mut stamp = None;
        if let Some(identity) = &self.identity {
            match identity.get().await {
                Ok(id) => {
                    if self.epoch_in_use != Some(id) {
                        self.epoch_in_use = Some(id);
                        self.next_sequence = 0;
                    }
                    let sequence = self.next_sequence;
                    self.next_sequence = if sequence == i32::MAX { 0 } else { sequence + 1 };
                    builder.set_producer(id.producer_id, id.epoch, sequence);
                    stamp = Some((id, sequence));
                }
                Err(e) => {
                    self.unresolved.fetch_sub(waiters.len(), Ordering::AcqRel);
                    for w in waiters {
                        let _ = w.tx.send(Err(e.clone()));
                    }
                    return;
                }
            }
        } else {
            builder.set_producer(NO_PRODUCER_ID, NO_PRODUCER_EPOCH, NO_SEQUENCE);
        }
        let bytes = builder.finish().expect("a sealed batch is not empty");
        let id = self.next_slot;
        self.next_slot += 1;
        attempts.push(self.attempt(id, bytes.clone(), deadline));
        self.slots.push_back(Slot { id, bytes, stamp, waiters, deadline, state: SlotState::InFlight, _permit: permit });
    }

    fn attempt(&self, slot: u64, bytes: Bytes, deadline: Instant) -> AttemptFuture {
        let (cluster, topic, partition) = (self.cluster.clone(), self.topic.clone(), self.partition);
        let timeout_ms = self.request_timeout.as_millis().min(u128::from(u32::MAX)) as u32;
        Box::pin(async move {
            let req = ProduceRequest { topic: topic.clone(), partition, timeout_ms };
            // The batch follows the header from its own buffer, not copied after it.
            let head = message::encode_batches_head(&req);
            let result = cluster.call_partition_with_batches(&topic, partition, api::PRODUCE, head, vec![bytes], deadline).await.and_then(|(version, body)| {
                ProduceResponse::decode(&body, version)
                    .map_err(|e| ClientError::Malformed { addr: format!("{topic}/{partition} leader"), reason: e.to_string() })
            });
            (slot, result)
        })
    }

    /// Records an attempt's answer on its slot.
    async fn answered(&mut self, slot_id: u64, result: Result<ProduceResponse, ClientError>) {
        let Some(index) = self.slots.iter().position(|s| s.id == slot_id) else { return };
        let is_oldest = index == 0;
        let stamp = self.slots[index].stamp;
        let state = match result {
            Ok(resp) => SlotState::Done(resp),
            Err(e) if e.code() == Some(ErrorCode::DuplicateMessageIds) => match self.strip_duplicates(index, &e) {
                Some(()) => SlotState::Resend,
                None => SlotState::Failed(e),
            },
            Err(e) if stamp.is_none() => SlotState::Failed(e),
            Err(e) => match e.code() {
                Some(ErrorCode::OutOfOrderSequence) => {
                    if is_oldest {
                        // Nothing older is outstanding that could fill the gap: the
                        // leader lost track of this producer (it expired) or an earlier
                        // batch failed. Only a new epoch restarts the sequence.
                        self.needs_new_epoch = true;
                    }
                    SlotState::Resend
                }
                Some(ErrorCode::ProducerFenced) => {
                    let own_newer_epoch = match (stamp, self.identity.as_ref().map(|i| *i.published.borrow())) {
                        (Some((used, _)), Some(IdentityState::Active(now))) => now.epoch > used.epoch && now.producer_id == used.producer_id,
                        _ => false,
                    };
                    if own_newer_epoch {
                        SlotState::Resend
                    } else {
                        if let Some(identity) = &self.identity {
                            identity.fence().await;
                        }
                        SlotState::Failed(e)
                    }
                }
                _ => SlotState::Failed(e),
            },
        };
        self.slots[index].state = state;
    }

    /// For a batch refused because some records' message ids were already stored:
    /// resolves those records with their offsets and rebuilds the batch without them
    /// (same producer fields, so the resend keeps its sequence number).
    fn strip_duplicates(&mut self, index: usize, e: &ClientError) -> Option<()> {
        let ClientError::Refused { body, .. } = e else { return None };
        let dups: DuplicateMessageIds = message::decode(body).ok()?;
        let slot = &mut self.slots[index];
        let view = BatchView::parse(slot.bytes.clone()).ok()?;
        let skip: Vec<u32> = dups.records.iter().map(|(i, _)| *i).collect();
        if skip.is_empty() || skip.len() >= view.header().record_count as usize {
            return None;
        }
        let rebuilt = view.rebuild_without(&skip).ok()?;
        let mut pending = slot.waiters.iter_mut().filter(|w| w.resolved.is_none()).collect::<Vec<_>>();
        for (i, offset) in &dups.records {
            let w = pending.get_mut(*i as usize)?;
            w.resolved = Some(Delivery { partition: self.partition, offset: *offset, duplicate: true });
        }
        slot.bytes = rebuilt;
        Some(())
    }

    /// Delivers answered batches in order, resends what can be resent, and moves to a
    /// new epoch when the sequence broke.
    async fn progress(&mut self, attempts: &mut FuturesUnordered<AttemptFuture>) {
        loop {
            // Deliver from the front, in order.
            let mut answered = Vec::new();
            while let Some(front) = self.slots.front() {
                match &front.state {
                    SlotState::Done(_) | SlotState::Failed(_) => {
                        let slot = self.slots.pop_front().expect("front exists");
                        if matches!(slot.state, SlotState::Failed(_)) && slot.stamp.is_some() {
                            // Its sequence number may or may not be stored: whatever
                            // follows can only be stored under a new epoch.
                            self.needs_new_epoch = true;
                        }
                        answered.push(slot);
                    }
                    _ => break,
                }
            }
            if !answered.is_empty() {
                // Uncounted all at once before any answer goes out: an application
                // refilling its window as answers arrive must not find it full halfway.
                self.unresolved.fetch_sub(answered.iter().map(|s| s.waiters.len()).sum(), Ordering::AcqRel);
                for slot in answered {
                    self.deliver(slot);
                }
            }
            let Some(front) = self.slots.front() else {
                // Nothing outstanding: a pending switch to a new epoch costs nothing now.
                if self.switch_pending() {
                    let _ = self.switch_epoch().await;
                }
                return;
            };
            if !matches!(front.state, SlotState::Resend) {
                return;
            }
            if !self.switch_pending() {
                // Refused only because an older batch had not arrived yet: resend the
                // refused batches, oldest first, with their numbers unchanged.
                let resend: Vec<(u64, Bytes, Instant)> = self
                    .slots
                    .iter_mut()
                    .filter(|s| matches!(s.state, SlotState::Resend))
                    .map(|s| {
                        s.state = SlotState::InFlight;
                        (s.id, s.bytes.clone(), s.deadline)
                    })
                    .collect();
                for (id, bytes, deadline) in resend {
                    attempts.push(self.attempt(id, bytes, deadline));
                }
                return;
            }
            // The sequence must restart under a new epoch: once nothing is in flight
            // (an outstanding batch could still be stored under the old numbers).
            if self.slots.iter().any(|s| matches!(s.state, SlotState::InFlight)) {
                return;
            }
            let next = match self.switch_epoch().await {
                Ok(id) => id,
                Err(e) => {
                    for s in self.slots.iter_mut().filter(|s| matches!(s.state, SlotState::Resend)) {
                        s.state = SlotState::Failed(e.clone());
                    }
                    continue;
                }
            };
            let mut resend = Vec::new();
            for s in self.slots.iter_mut() {
                debug_assert!(matches!(s.state, SlotState::Resend | SlotState::Done(_)), "nothing is in flight");
                if !matches!(s.state, SlotState::Resend) {
                    continue;
                }
                let sequence = self.next_sequence;
                self.next_sequence += 1;
                let mut bytes = BytesMut::from(&s.bytes[..]);
                restamp_producer(&mut bytes, next.producer_id, next.epoch, sequence).expect("our own batch has a header");
                s.bytes = bytes.freeze();
                s.stamp = Some((next, sequence));
                s.state = SlotState::InFlight;
                resend.push((s.id, s.bytes.clone(), s.deadline));
            }
            for (id, bytes, deadline) in resend {
                attempts.push(self.attempt(id, bytes, deadline));
            }
            return;
        }
    }

    /// Moves this partition's sequence to the producer's newest epoch — starting one if
    /// this partition's sequence broke and no other partition has yet — from 0.
    async fn switch_epoch(&mut self) -> Result<ProducerIdentity, ClientError> {
        let identity = self.identity.clone().expect("only idempotent producers switch epochs");
        let next = match self.epoch_in_use {
            Some(broken) => identity.bump(broken).await?,
            None => identity.get().await?,
        };
        self.epoch_in_use = Some(next);
        self.needs_new_epoch = false;
        self.next_sequence = 0;
        Ok(next)
    }

    fn deliver(&self, slot: Slot) {
        let partition = self.partition;
        match slot.state {
            SlotState::Done(resp) => {
                let mut next = 0u32;
                for w in slot.waiters {
                    let delivery = w.resolved.unwrap_or_else(|| {
                        let i = next;
                        next += 1;
                        match &resp.duplicate {
                            Duplicate::None => Delivery { partition, offset: resp.base_offset + u64::from(i), duplicate: false },
                            Duplicate::Batch => Delivery { partition, offset: resp.base_offset + u64::from(i), duplicate: true },
                            Duplicate::Records(records) => {
                                let offset = records.iter().find(|(j, _)| *j == i).map_or(resp.base_offset + u64::from(i), |(_, o)| *o);
                                Delivery { partition, offset, duplicate: true }
                            }
                        }
                    });
                    let _ = w.tx.send(Ok(delivery));
                }
            }
            SlotState::Failed(e) => {
                for w in slot.waiters {
                    let _ = w.tx.send(match w.resolved {
                        Some(d) => Ok(d),
                        None => Err(e.clone()),
                    });
                }
            }
            SlotState::InFlight | SlotState::Resend => unreachable!("only answered slots are delivered"),
        }
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

    #[test]
    fn an_idempotent_producer_refuses_more_than_five_batches_in_flight_per_partition() {
        let config = ProducerConfig { max_in_flight_per_partition: 6, ..ProducerConfig::default() };
        assert!(config.validate().is_err());
        let config = ProducerConfig { max_in_flight_per_partition: 6, idempotence: false, ..ProducerConfig::default() };
        assert!(config.validate().is_ok());
        let config = ProducerConfig { name: Some("billing".into()), idempotence: false, ..ProducerConfig::default() };
        assert!(config.validate().is_err(), "a name needs idempotence");
    }
}
