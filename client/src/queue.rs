//! `QueueConsumer`: a member of a queue group. Partition leaders lease messages to it;
//! it answers each with `ack`, `nack`, `term` or `extend`.
//!
//! **Credit.** The consumer holds at most `max_in_flight` unsettled deliveries: a
//! semaphore of that many permits, one held by each [`Delivery`] until it is acked,
//! nacked or termed (or dropped, when its lease simply runs out on the broker). A
//! fetcher task per partition reserves permits *before* asking its partition's leader
//! for that many messages, so the broker is never asked for more than the credit left;
//! a fetcher reserves at most its share (`max_in_flight / partitions`, at least one), so
//! a quiet partition's long poll never holds the whole credit.
//!
//! **Settling** is batched: verbs queue to one settler task, which sends them per
//! partition in one `QueueSettle` request (up to `settle_batch_max` items) while the
//! previous one is in flight. Each verb's future resolves with the broker's answer,
//! given once the outcome is committed on a majority.
//!
//! **Closing** stops the fetchers after their current fetch (at most `poll_wait`) and
//! nacks, without delay, every delivery fetched but not yet handed to the application,
//! so it is redelivered at once instead of after its lease timeout (the nack counts as
//! an attempt).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_protocol::api::client as api;
use keel_protocol::message::{
    self, QueueFetchRequest, QueueFetchResponse, QueueSettleRequest, QueueSettleResponse, QueueStart, SettleItem, SettleOutcome, SettleVerb,
};
use keel_protocol::ErrorCode;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::cluster::Cluster;
use crate::consumer::{decode_batch, Message};
use crate::error::ClientError;
use crate::retry::Backoff;

/// A queue consumer's settings.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// This member's name within the group (leases are held in it). `None`: a name is
    /// made up (`m-<pid>-<random>`), so two consumers never share one by accident.
    pub member: Option<String>,
    /// Unsettled deliveries this consumer holds at most (its credit).
    pub max_in_flight: u32,
    /// Bytes of batches one fetch asks for at most.
    pub max_bytes: u32,
    /// Where the group starts in a partition it has never consumed.
    pub start: QueueStart,
    /// How long one fetch long-polls an empty partition (also the longest `close` waits).
    pub poll_wait: Duration,
    /// Most settle items sent in one request.
    pub settle_batch_max: usize,
    /// Settle requests in flight at once.
    pub settle_requests_max: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            member: None,
            max_in_flight: 1_000,
            max_bytes: 1024 * 1024,
            start: QueueStart::Earliest,
            poll_wait: Duration::from_secs(2),
            settle_batch_max: 2_000,
            settle_requests_max: 8,
        }
    }
}

/// Settle verbs waiting for the settler, at most (then a verb waits to be queued).
const SETTLE_QUEUE_CAPACITY: usize = 16_384;

struct SettleJob {
    partition: u32,
    item: SettleItem,
    reply: oneshot::Sender<Result<SettleOutcome, ClientError>>,
}

/// One leased message. Holds one unit of the consumer's credit until it is acked,
/// nacked or termed, or dropped (its lease then runs out on the broker and it is
/// delivered again).
pub struct Delivery {
    pub message: Message,
    /// 1 for the first delivery; counted by the broker, across leader changes.
    pub attempt: u32,
    /// When the lease runs out (the partition leader's clock, ms since the epoch)
    /// unless extended.
    pub lease_deadline_ms: i64,
    settle: mpsc::Sender<SettleJob>,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("partition", &self.message.partition).field("offset", &self.message.offset).field("attempt", &self.attempt).finish()
    }
}

impl Delivery {
    /// Processed: never deliver it again.
    pub async fn ack(&self) -> Result<SettleOutcome, ClientError> {
        self.settle(SettleVerb::Ack, true).await
    }

    /// Failed: deliver it again after `delay`, or after the group's backoff when
    /// `None`; on the last allowed attempt it goes to the dead-letter topic instead.
    pub async fn nack(&self, delay: Option<Duration>, reason: &str, class: &str) -> Result<SettleOutcome, ClientError> {
        let delay_ms = delay.map(|d| d.as_millis().min(u128::from(u32::MAX)) as u32);
        self.settle(SettleVerb::Nack { delay_ms, reason: reason.to_string(), class: class.to_string() }, true).await
    }

    /// Can never succeed: dead-letter it now.
    pub async fn term(&self, reason: &str, class: &str) -> Result<SettleOutcome, ClientError> {
        self.settle(SettleVerb::Term { reason: reason.to_string(), class: class.to_string() }, true).await
    }

    /// Still working: the lease runs another `by` (the group's lease timeout when
    /// `None`) from now.
    pub async fn extend(&self, by: Option<Duration>) -> Result<SettleOutcome, ClientError> {
        let ms = by.map(|d| d.as_millis().min(u128::from(u32::MAX)) as u32);
        self.settle(SettleVerb::Extend { ms }, false).await
    }

    async fn settle(&self, verb: SettleVerb, last: bool) -> Result<SettleOutcome, ClientError> {
        let (reply, rx) = oneshot::channel();
        let item = SettleItem { offset: self.message.offset, attempt: self.attempt, verb };
        self.settle.send(SettleJob { partition: self.message.partition, item, reply }).await.map_err(|_| ClientError::Closed("queue consumer"))?;
        let outcome = rx.await.map_err(|_| ClientError::Closed("queue consumer"))??;
        if last {
            self.permit.lock().expect("permit lock poisoned").take();
        }
        Ok(outcome)
    }
}

/// A member of a queue group.
///
/// ```no_run
/// # async fn demo() -> Result<(), keel_client::ClientError> {
/// use keel_client::queue::{QueueConfig, QueueConsumer};
/// use keel_client::{ClientConfig, Cluster};
/// let cluster = Cluster::new(ClientConfig::default())?;
/// let mut consumer = QueueConsumer::new(cluster, "orders", "billing", QueueConfig::default()).await?;
/// for d in consumer.poll(std::time::Duration::from_secs(1)).await? {
///     match d.message.value.as_deref() {
///         Some(b"bad") => d.term("cannot parse", "validation").await?,
///         _ => d.ack().await?,
///     };
/// }
/// consumer.close().await;
/// # Ok(()) }
/// ```
pub struct QueueConsumer {
    topic: String,
    group: String,
    member: String,
    deliveries: mpsc::Receiver<Result<Delivery, ClientError>>,
    stop: watch::Sender<bool>,
    fetchers: Vec<tokio::task::JoinHandle<()>>,
    settler: Option<tokio::task::JoinHandle<()>>,
}

impl QueueConsumer {
    pub async fn new(cluster: Cluster, topic: &str, group: &str, config: QueueConfig) -> Result<QueueConsumer, ClientError> {
        if config.max_in_flight == 0 {
            return Err(ClientError::Invalid("max_in_flight must be at least 1".into()));
        }
        let partitions = cluster.partitions(topic).await?;
        let member = config.member.clone().unwrap_or_else(|| format!("m-{}-{:08x}", std::process::id(), fastrand::u32(..)));
        let credit = Arc::new(Semaphore::new(config.max_in_flight as usize));
        let share = (config.max_in_flight / partitions.max(1)).max(1);
        let (settle_tx, settle_rx) = mpsc::channel(SETTLE_QUEUE_CAPACITY);
        let settler = tokio::spawn(settler(cluster.clone(), topic.to_string(), group.to_string(), member.clone(), config.clone(), settle_rx));
        let (tx, deliveries) = mpsc::channel(config.max_in_flight as usize + partitions as usize);
        let (stop, stopped) = watch::channel(false);
        let fetchers = (0..partitions)
            .map(|p| {
                let f = Fetcher {
                    cluster: cluster.clone(),
                    topic: topic.to_string(),
                    group: group.to_string(),
                    member: member.clone(),
                    partition: p,
                    share,
                    config: config.clone(),
                    credit: credit.clone(),
                    settle: settle_tx.clone(),
                    out: tx.clone(),
                    stopped: stopped.clone(),
                };
                tokio::spawn(f.run())
            })
            .collect();
        Ok(QueueConsumer { topic: topic.to_string(), group: group.to_string(), member, deliveries, stop, fetchers, settler: Some(settler) })
    }

    /// This member's name in the group.
    pub fn member(&self) -> &str {
        &self.member
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Deliveries available now, or the first to arrive within `max_wait`. A fetch
    /// failure that retrying cannot fix (the topic was deleted, a bad group name) is
    /// returned here.
    pub async fn poll(&mut self, max_wait: Duration) -> Result<Vec<Delivery>, ClientError> {
        let mut out = Vec::new();
        let first = match tokio::time::timeout(max_wait, self.deliveries.recv()).await {
            Ok(Some(d)) => d,
            Ok(None) => return Err(ClientError::Closed("queue consumer")),
            Err(_) => return Ok(out),
        };
        out.push(first?);
        while let Ok(d) = self.deliveries.try_recv() {
            out.push(d?);
        }
        Ok(out)
    }

    /// Stops fetching (after each fetcher's current fetch) and nacks, without delay,
    /// what was fetched but not handed out, then waits for outstanding settles.
    pub async fn close(mut self) {
        let _ = self.stop.send(true);
        for f in self.fetchers.drain(..) {
            let _ = f.await;
        }
        self.deliveries.close();
        let mut pending = Vec::new();
        while let Some(d) = self.deliveries.recv().await {
            if let Ok(d) = d {
                pending.push(d);
            }
        }
        futures::future::join_all(pending.iter().map(|d| d.nack(Some(Duration::ZERO), "consumer closed before handing it out", "closed"))).await;
        drop(pending);
        if let Some(s) = self.settler.take() {
            // The settler ends once every sender (deliveries, fetchers) is gone.
            let _ = tokio::time::timeout(Duration::from_secs(10), s).await;
        }
    }
}

impl Drop for QueueConsumer {
    fn drop(&mut self) {
        for f in &self.fetchers {
            f.abort();
        }
    }
}

struct Fetcher {
    cluster: Cluster,
    topic: String,
    group: String,
    member: String,
    partition: u32,
    share: u32,
    config: QueueConfig,
    credit: Arc<Semaphore>,
    settle: mpsc::Sender<SettleJob>,
    out: mpsc::Sender<Result<Delivery, ClientError>>,
    stopped: watch::Receiver<bool>,
}

impl Fetcher {
    async fn run(mut self) {
        let backoff = Backoff { base: self.cluster.config().backoff_base, cap: self.cluster.config().backoff_cap };
        let mut failures = 0u32;
        loop {
            if *self.stopped.borrow() {
                return;
            }
            // Reserve credit before asking: the broker is never asked for more.
            let mut permits = tokio::select! {
                p = self.credit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = self.stopped.changed() => return,
            };
            let more = (self.credit.available_permits() as u32).min(self.share - 1);
            if more > 0 {
                if let Ok(extra) = self.credit.clone().try_acquire_many_owned(more) {
                    permits.merge(extra);
                }
            }
            match self.fetch(permits.num_permits() as u32).await {
                Ok(batch) => {
                    failures = 0;
                    for (message, attempt, deadline) in batch {
                        let Some(permit) = permits.split(1) else { break };
                        let d = Delivery { message, attempt, lease_deadline_ms: deadline, settle: self.settle.clone(), permit: Mutex::new(Some(permit)) };
                        if self.out.send(Ok(d)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) if is_fatal(&e) => {
                    let _ = self.out.send(Err(e)).await;
                    return;
                }
                Err(e) => {
                    tracing::debug!(topic = %self.topic, partition = self.partition, error = %e, "queue fetch failed; retrying");
                    drop(permits);
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.delay(failures)) => {}
                        _ = self.stopped.changed() => return,
                    }
                }
            }
        }
    }

    /// One queue fetch of up to `credit` messages: `(message, attempt, lease deadline)`.
    async fn fetch(&self, credit: u32) -> Result<Vec<(Message, u32, i64)>, ClientError> {
        let req = QueueFetchRequest {
            group: self.group.clone(),
            topic: self.topic.clone(),
            partition: self.partition,
            member: self.member.clone(),
            max_messages: credit,
            max_bytes: self.config.max_bytes,
            max_wait_ms: self.config.poll_wait.as_millis().min(u128::from(u32::MAX)) as u32,
            start: self.config.start,
        };
        let deadline = Instant::now() + self.config.poll_wait + self.cluster.config().request_timeout;
        let request = message::encode(&req);
        let (_, body) = self.cluster.call_partition(&self.topic, self.partition, api::QUEUE_FETCH, &|_| request.clone(), deadline).await?;
        let what = format!("{}/{} leader", self.topic, self.partition);
        let malformed = |reason: String| ClientError::Malformed { addr: what.clone(), reason };
        let (head, batches): (QueueFetchResponse, Bytes) = message::split_with_batches(&body).map_err(|e| malformed(e.to_string()))?;
        let mut records: BTreeMap<u64, Message> = BTreeMap::new();
        for view in message::split_batches(batches).map_err(|e| malformed(e.to_string()))? {
            match decode_batch(&view, self.partition) {
                Ok(messages) => records.extend(messages.into_iter().map(|m| (m.offset, m))),
                Err(u) => {
                    // Brokers validate every record before storing it; a batch that does
                    // not decode is damage. Its leases run out and it is dead-lettered
                    // after max deliveries, where an operator can look at it.
                    tracing::warn!(topic = %self.topic, partition = self.partition, offset = u.offset, reason = %u.reason, "a leased batch does not decode");
                }
            }
        }
        Ok(head.leases.iter().filter_map(|l| records.remove(&l.offset).map(|m| (m, l.attempt, head.lease_deadline_ms))).collect())
    }
}

/// Whether a fetch failure will not go away by retrying.
fn is_fatal(e: &ClientError) -> bool {
    match e {
        ClientError::UnknownTopic(_) | ClientError::Invalid(_) | ClientError::Malformed { .. } => true,
        ClientError::Refused { code, .. } | ClientError::Broker { code, .. } => {
            matches!(
                code,
                ErrorCode::UnknownTopic | ErrorCode::UnknownPartition | ErrorCode::InvalidRequest | ErrorCode::UnsupportedApi | ErrorCode::UnsupportedVersion
            )
        }
        _ => false,
    }
}

/// Sends queued settle verbs, per partition, in batches.
async fn settler(cluster: Cluster, topic: String, group: String, member: String, config: QueueConfig, mut jobs: mpsc::Receiver<SettleJob>) {
    let in_flight = Arc::new(Semaphore::new(config.settle_requests_max.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(first) = jobs.recv().await {
        let mut by_partition: BTreeMap<u32, Vec<SettleJob>> = BTreeMap::new();
        let mut n = 1;
        by_partition.entry(first.partition).or_default().push(first);
        while n < config.settle_batch_max {
            match jobs.try_recv() {
                Ok(job) => {
                    by_partition.entry(job.partition).or_default().push(job);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        for (partition, batch) in by_partition {
            let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
            let (cluster, topic, group, member) = (cluster.clone(), topic.clone(), group.clone(), member.clone());
            tasks.spawn(async move {
                let result = settle_once(&cluster, &topic, &group, &member, partition, &batch).await;
                drop(permit);
                match result {
                    Ok(outcomes) => {
                        for (job, outcome) in batch.into_iter().zip(outcomes) {
                            let _ = job.reply.send(Ok(outcome));
                        }
                    }
                    Err(e) => {
                        for job in batch {
                            let _ = job.reply.send(Err(e.clone()));
                        }
                    }
                }
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

async fn settle_once(
    cluster: &Cluster,
    topic: &str,
    group: &str,
    member: &str,
    partition: u32,
    batch: &[SettleJob],
) -> Result<Vec<SettleOutcome>, ClientError> {
    let req = QueueSettleRequest {
        group: group.to_string(),
        topic: topic.to_string(),
        partition,
        member: member.to_string(),
        items: batch.iter().map(|j| j.item.clone()).collect(),
    };
    let deadline = Instant::now() + cluster.config().request_timeout;
    let request = message::encode(&req);
    let (_, body) = cluster.call_partition(topic, partition, api::QUEUE_SETTLE, &|_| request.clone(), deadline).await?;
    let resp: QueueSettleResponse =
        message::decode(&body).map_err(|e| ClientError::Malformed { addr: format!("{topic}/{partition} leader"), reason: e.to_string() })?;
    if resp.outcomes.len() != batch.len() {
        return Err(ClientError::Malformed {
            addr: format!("{topic}/{partition} leader"),
            reason: format!("{} outcomes for {} settle items", resp.outcomes.len(), batch.len()),
        });
    }
    Ok(resp.outcomes)
}
