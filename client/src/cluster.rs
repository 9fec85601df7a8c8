//! `Cluster`: how the client finds and talks to brokers.
//!
//! It keeps one `keel_net::Caller` and one circuit breaker per broker address, a cached
//! copy of the cluster metadata, and a retry budget. `call_partition` sends a request
//! to a partition's leader and keeps at it — following `NotLeader` redirects,
//! refreshing metadata, backing off with full jitter — until the operation's deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use keel_net::{CallError, Caller};
use keel_protocol::api::client as api;
use keel_protocol::message::{self, MetadataRequest, MetadataResponse, NotLeader, Throttled};
use keel_protocol::ErrorCode;

use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::retry::{Backoff, CircuitBreaker, RetryBudget};

/// How long a topic missing from metadata is looked for before it is called unknown
/// (metadata reaches every broker within a heartbeat or two on a healthy cluster).
pub const METADATA_PROPAGATION_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const METADATA_PROPAGATION_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// A handle on the cluster; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    callers: Mutex<HashMap<String, Arc<Caller>>>,
    breakers: Mutex<HashMap<String, CircuitBreaker>>,
    metadata: Mutex<Option<(Instant, Arc<MetadataResponse>)>>,
    budget: Mutex<RetryBudget>,
}

/// What one attempt ended with.
enum Attempt {
    /// The answer, and the protocol version it is encoded for.
    Done(u16, Bytes),
    /// Try again, at `redirect` if given, after `after` if the broker said when.
    /// `free`: the attempt cost the cluster nothing worth budgeting (nothing was sent —
    /// the broker's circuit is open — or a broker answered that the partition is between
    /// leaders), so retrying it spends no retry budget; it still backs off.
    Retry {
        redirect: Option<String>,
        after: Option<std::time::Duration>,
        free: bool,
        error: ClientError,
    },
    Fail(ClientError),
}

/// A request body for each protocol version (most bodies are the same in every one).
pub type Encode<'a> = &'a (dyn Fn(u16) -> Bytes + Sync);
/// Like [`Encode`], for a payload of a head and tail parts written from their own
/// buffers (a produce request's header, then its batch: not copied into one buffer).
type EncodeParts<'a> = &'a (dyn Fn(u16) -> (Bytes, Vec<Bytes>) + Sync);

impl Cluster {
    pub fn new(config: ClientConfig) -> Result<Cluster, ClientError> {
        if config.bootstrap.is_empty() {
            return Err(ClientError::Invalid("the bootstrap list is empty; pass host:port[,host:port…]".into()));
        }
        let budget = RetryBudget::new(config.retry_budget_ratio, config.retry_budget_max);
        Ok(Cluster {
            inner: Arc::new(Inner { config, callers: Mutex::default(), breakers: Mutex::default(), metadata: Mutex::default(), budget: Mutex::new(budget) }),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    fn caller(&self, addr: &str) -> Arc<Caller> {
        self.inner
            .callers
            .lock()
            .expect("callers lock poisoned")
            .entry(addr.to_string())
            .or_insert_with(|| Arc::new(Caller::new(0, addr.to_string(), None)))
            .clone()
    }

    /// One attempt at `addr`, through its circuit breaker. With `lag_tolerant`, an
    /// unknown topic or partition is retried: the caller knows the topic exists, so the
    /// broker that answered has not yet applied the metadata that created it.
    async fn attempt(&self, addr: &str, api_key: u16, encode: EncodeParts<'_>, what: &str, lag_tolerant: bool) -> Attempt {
        let c = &self.inner.config;
        {
            let mut breakers = self.inner.breakers.lock().expect("breakers lock poisoned");
            let breaker = breakers.entry(addr.to_string()).or_insert_with(|| CircuitBreaker::new(c.breaker_threshold, c.breaker_cool_down));
            if !breaker.allow(Instant::now()) {
                return Attempt::Retry {
                    redirect: None,
                    after: None,
                    free: true,
                    error: ClientError::NoBroker { tried: addr.into(), last: "circuit open after repeated failures".into() },
                };
            }
        }
        let result = self.caller(addr).call_versioned_with_tail(api_key, encode, c.attempt_timeout).await;
        let healthy = !matches!(result, Err(CallError::Unreachable { .. } | CallError::Disconnected { .. } | CallError::Timeout { .. }));
        {
            let mut breakers = self.inner.breakers.lock().expect("breakers lock poisoned");
            if let Some(b) = breakers.get_mut(addr) {
                if healthy {
                    b.on_success();
                } else {
                    b.on_failure(Instant::now());
                }
            }
        }
        let broker = |code, message| ClientError::Broker { what: what.to_string(), code, message };
        match result {
            Ok((version, body)) => Attempt::Done(version, body),
            Err(CallError::Refused { code, message, body, .. }) if code == ErrorCode::NotLeader || code == ErrorCode::LeaderNotAvailable => {
                let redirect = message::decode::<NotLeader>(&body).ok().and_then(|n| n.leader_addr).filter(|a| a != addr);
                Attempt::Retry { redirect, after: None, free: true, error: broker(code, message) }
            }
            Err(CallError::Refused { code: ErrorCode::Throttled, message, body, .. }) => {
                // The broker says how long to wait: honour it instead of the generic backoff.
                let after = message::decode::<Throttled>(&body).ok().map(|t| std::time::Duration::from_millis(u64::from(t.retry_after_ms)));
                Attempt::Retry { redirect: None, after: Some(after.unwrap_or(c.backoff_cap)), free: true, error: broker(ErrorCode::Throttled, message) }
            }
            Err(CallError::Refused { code, message, .. }) if code.is_retriable() => {
                Attempt::Retry { redirect: None, after: None, free: false, error: broker(code, message) }
            }
            Err(CallError::Refused { code: code @ (ErrorCode::UnknownTopic | ErrorCode::UnknownPartition), message, .. }) if lag_tolerant => {
                // The topic exists: this broker has not applied its creation yet.
                Attempt::Retry { redirect: None, after: None, free: true, error: broker(code, message) }
            }
            Err(CallError::Refused { code, message, body, .. }) => {
                Attempt::Fail(ClientError::Refused { what: what.to_string(), code, message, body, after_unknown: false })
            }
            Err(e) => {
                Attempt::Retry { redirect: None, after: None, free: false, error: ClientError::NoBroker { tried: addr.to_string(), last: e.to_string() } }
            }
        }
    }

    /// Sends the request, retrying (backoff with jitter, under the retry budget) on
    /// retriable failures until `deadline`. `targets` gives the addresses to try, in
    /// order of preference; it is re-evaluated before each attempt.
    async fn call_until<F>(&self, what: &str, api_key: u16, encode: EncodeParts<'_>, deadline: Instant, mut targets: F) -> Result<(u16, Bytes), ClientError>
    where
        F: AsyncTargets,
    {
        let lag_tolerant = targets.lag_tolerant();
        let c = self.inner.config.clone();
        let backoff = Backoff { base: c.backoff_base, cap: c.backoff_cap };
        self.inner.budget.lock().expect("budget lock poisoned").deposit();
        let mut redirect: Option<String> = None;
        let mut attempt_no = 0u32;
        let mut rotate = 0usize;
        // Whether an earlier attempt may have taken effect (a lost answer, a timeout).
        let mut unknown = false;
        loop {
            let addr = match redirect.take() {
                Some(a) => a,
                None => {
                    let list = targets.targets(self).await;
                    list[rotate % list.len()].clone()
                }
            };
            let (error, after, free) = match self.attempt(&addr, api_key, encode, what, lag_tolerant).await {
                Attempt::Done(version, body) => return Ok((version, body)),
                Attempt::Fail(ClientError::Refused { what, code, message, body, .. }) => {
                    return Err(ClientError::Refused { what, code, message, body, after_unknown: unknown })
                }
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry { redirect: r, after, free, error } => {
                    if r.is_some() {
                        // A redirect is information, not a failure: follow it at once.
                        redirect = r;
                        if Instant::now() < deadline {
                            continue;
                        }
                    }
                    (error, after, free)
                }
            };
            unknown |= error.outcome() == crate::error::Outcome::Indefinite;
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout { what: what.to_string(), timeout: c.request_timeout, last: error.to_string() });
            }
            if let Some(after) = after {
                // Throttled: the same broker, after the delay it asked for. Not a failure,
                // so it costs no retry budget.
                redirect = Some(addr);
                tracing::debug!(%what, %error, ?after, "throttled");
                tokio::time::sleep(after.min(deadline.saturating_duration_since(Instant::now()))).await;
                continue;
            }
            rotate += 1;
            targets.invalidate(self);
            if !free && !self.inner.budget.lock().expect("budget lock poisoned").withdraw() {
                return Err(ClientError::RetryBudgetExhausted { what: what.to_string(), last: error.to_string() });
            }
            let pause = backoff.delay(attempt_no).min(deadline.saturating_duration_since(Instant::now()));
            attempt_no = attempt_no.saturating_add(1);
            tracing::debug!(%what, %error, ?pause, "retrying");
            tokio::time::sleep(pause).await;
        }
    }

    /// One attempt at one broker, no retries: for per-node questions such as status,
    /// where "did not answer" is the answer.
    pub async fn call_once(&self, addr: &str, api_key: u16, payload: Bytes, timeout: std::time::Duration) -> Result<Bytes, ClientError> {
        self.caller(addr).call(api_key, payload, timeout).await.map_err(|e| match e {
            CallError::Refused { code, message, .. } => ClientError::Broker { what: format!("request to {addr}"), code, message },
            other => ClientError::NoBroker { tried: addr.to_string(), last: other.to_string() },
        })
    }

    /// Sends an admin or metadata request to any broker (following redirects); the
    /// answer comes with the protocol version it is encoded for.
    pub async fn call_any(&self, what: &str, api_key: u16, encode: Encode<'_>) -> Result<(u16, Bytes), ClientError> {
        let deadline = Instant::now() + self.inner.config.request_timeout;
        self.call_until(what, api_key, &|v| (encode(v), Vec::new()), deadline, AnyBroker).await
    }

    /// Sends a request to the leader of `topic`/`partition`, until `deadline`; the
    /// answer comes with the protocol version it is encoded for.
    pub async fn call_partition(&self, topic: &str, partition: u32, api_key: u16, encode: Encode<'_>, deadline: Instant) -> Result<(u16, Bytes), ClientError> {
        let what = format!("{}/{partition}", topic);
        self.call_until(&what, api_key, &|v| (encode(v), Vec::new()), deadline, PartitionLeader { topic: topic.to_string(), partition }).await
    }

    /// Like [`Cluster::call_partition`], for a request of a header (`head`) followed by
    /// record batches, which go to the socket from their own buffers.
    pub async fn call_partition_with_batches(
        &self,
        topic: &str,
        partition: u32,
        api_key: u16,
        head: Bytes,
        batches: Vec<Bytes>,
        deadline: Instant,
    ) -> Result<(u16, Bytes), ClientError> {
        let what = format!("{}/{partition}", topic);
        self.call_until(&what, api_key, &|_| (head.clone(), batches.clone()), deadline, PartitionLeader { topic: topic.to_string(), partition }).await
    }

    /// One attempt at the partition's leader as the cached metadata knows it (or its
    /// first replica): no retry, no redirect. A `NotLeader` answer invalidates the
    /// metadata so the next call goes elsewhere. For callers that classify every attempt
    /// themselves (the Jepsen harness' single-attempt produce).
    pub async fn call_partition_once(&self, topic: &str, partition: u32, api_key: u16, encode: Encode<'_>) -> Result<(u16, Bytes), ClientError> {
        let what = format!("{topic}/{partition}");
        let mut targets = PartitionLeader { topic: topic.to_string(), partition };
        let addr = targets.targets(self).await.into_iter().next().expect("targets are never empty");
        match self.attempt(&addr, api_key, &|v| (encode(v), Vec::new()), &what, false).await {
            Attempt::Done(version, body) => Ok((version, body)),
            Attempt::Fail(e) => Err(e),
            Attempt::Retry { error, .. } => {
                targets.invalidate(self);
                Err(error)
            }
        }
    }

    /// The cluster metadata, from cache unless older than `metadata_max_age` or `refresh`.
    pub async fn metadata(&self, refresh: bool) -> Result<Arc<MetadataResponse>, ClientError> {
        if !refresh {
            if let Some((at, m)) = self.inner.metadata.lock().expect("metadata lock poisoned").as_ref() {
                if at.elapsed() < self.inner.config.metadata_max_age {
                    return Ok(m.clone());
                }
            }
        }
        let request = message::encode(&MetadataRequest::default());
        let (version, body) = self.call_any("metadata", api::METADATA, &|_| request.clone()).await?;
        let m = MetadataResponse::decode(&body, version).map_err(|e| ClientError::Malformed { addr: "a broker".into(), reason: e.to_string() })?;
        let m = Arc::new(m);
        *self.inner.metadata.lock().expect("metadata lock poisoned") = Some((Instant::now(), m.clone()));
        Ok(m)
    }

    fn forget_metadata(&self) {
        *self.inner.metadata.lock().expect("metadata lock poisoned") = None;
    }

    /// Partition count of `topic`. A topic missing from the metadata is looked for
    /// again for up to `METADATA_PROPAGATION_WAIT`: a broker that has not yet applied a
    /// just-created topic answers without it.
    pub async fn partitions(&self, topic: &str) -> Result<u32, ClientError> {
        Ok(self.topic_shape(topic).await?.0)
    }

    /// Partition count and largest accepted batch (bytes) of `topic`, waiting for a
    /// just-created topic as [`Cluster::partitions`] does.
    pub async fn topic_shape(&self, topic: &str) -> Result<(u32, u32), ClientError> {
        let deadline = Instant::now() + METADATA_PROPAGATION_WAIT;
        let mut refresh = false;
        loop {
            let m = self.metadata(refresh).await?;
            if let Some(t) = m.topics.iter().find(|t| t.name == topic) {
                return Ok((t.partitions.len() as u32, t.config.max_message_bytes));
            }
            if Instant::now() >= deadline {
                return Err(ClientError::UnknownTopic(topic.to_string()));
            }
            refresh = true;
            tokio::time::sleep(METADATA_PROPAGATION_POLL).await;
        }
    }
}

/// Where to send the next attempt.
trait AsyncTargets {
    fn targets<'a>(&'a mut self, cluster: &'a Cluster) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<String>> + Send + 'a>>;
    fn invalidate(&mut self, _cluster: &Cluster) {}
    /// Whether an unknown topic or partition is metadata lag (retry) rather than final.
    fn lag_tolerant(&self) -> bool {
        false
    }
}

/// Any broker: the known brokers, else the bootstrap list.
struct AnyBroker;

impl AsyncTargets for AnyBroker {
    fn targets<'a>(&'a mut self, cluster: &'a Cluster) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<String>> + Send + 'a>> {
        Box::pin(async move { cluster.inner.config.bootstrap.clone() })
    }
}

/// The partition's leader as metadata knows it, then its replicas, then bootstrap.
struct PartitionLeader {
    topic: String,
    partition: u32,
}

impl AsyncTargets for PartitionLeader {
    fn targets<'a>(&'a mut self, cluster: &'a Cluster) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<String>> + Send + 'a>> {
        Box::pin(async move {
            let mut out = Vec::new();
            if let Ok(m) = cluster.metadata(false).await {
                let addr_of = |id: u64| m.brokers.iter().find(|b| b.id == id).map(|b| b.addr.clone());
                if let Some(p) = m.topics.iter().find(|t| t.name == self.topic).and_then(|t| t.partitions.get(self.partition as usize)) {
                    out.extend(p.leader.and_then(addr_of));
                    out.extend(p.replicas.iter().filter_map(|r| addr_of(*r)).filter(|a| !out.contains(a)).collect::<Vec<_>>());
                }
            }
            if out.is_empty() {
                out = cluster.inner.config.bootstrap.clone();
            }
            out
        })
    }

    fn invalidate(&mut self, cluster: &Cluster) {
        cluster.forget_metadata();
    }

    fn lag_tolerant(&self) -> bool {
        true
    }
}
