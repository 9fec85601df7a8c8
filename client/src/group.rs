//! `GroupConsumer`: a member of a stream group. The group's coordinator assigns it
//! partitions; it reads them in offset order from the group's committed offsets and
//! commits how far it got.
//!
//! A background task heartbeats the coordinator every `heartbeat_interval` (a fifth of
//! the session timeout, at most a second). When the group rebalances — a member joined,
//! left or timed out — the next `poll` commits this member's positions (with
//! `auto_commit`), joins again, and continues on its new partitions from their committed
//! offsets. A member that stops heartbeating for the session timeout loses its
//! partitions to the others; a commit it makes after that is refused (`StaleGeneration`)
//! once the partition's new owner has committed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_protocol::api::client as api;
use keel_protocol::message::{self, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest};
use keel_protocol::ErrorCode;

use crate::cluster::Cluster;
use crate::consumer::{fetch_committed, Consumer, Message, StartAt};
use crate::error::ClientError;

/// A stream-group member's settings.
#[derive(Debug, Clone)]
pub struct StreamGroupConfig {
    /// The coordinator removes a member not heard from for this long.
    pub session_timeout: Duration,
    /// Commit positions before rejoining after a rebalance and on `close`.
    pub auto_commit: bool,
    /// Where to start in a partition the group never committed in.
    pub start: StartAt,
}

impl Default for StreamGroupConfig {
    fn default() -> Self {
        StreamGroupConfig { session_timeout: Duration::from_secs(10), auto_commit: true, start: StartAt::Earliest }
    }
}

#[derive(Debug, Clone, Default)]
struct Membership {
    member: Option<String>,
    generation: u64,
}

/// A member of a stream group.
///
/// ```no_run
/// # async fn demo() -> Result<(), keel_client::ClientError> {
/// use keel_client::group::{GroupConsumer, StreamGroupConfig};
/// use keel_client::{ClientConfig, Cluster};
/// let cluster = Cluster::new(ClientConfig::default())?;
/// let mut member = GroupConsumer::join(cluster, "orders", "audit", StreamGroupConfig::default()).await?;
/// for m in member.poll(std::time::Duration::from_secs(1)).await? {
///     println!("{}@{}", m.partition, m.offset);
/// }
/// member.commit().await?;
/// member.close().await?;
/// # Ok(()) }
/// ```
pub struct GroupConsumer {
    cluster: Cluster,
    topic: String,
    group: String,
    config: StreamGroupConfig,
    membership: Arc<Mutex<Membership>>,
    rebalance: Arc<AtomicBool>,
    inner: Consumer,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl GroupConsumer {
    /// Joins `group` to consume `topic` and positions on the assigned partitions.
    pub async fn join(cluster: Cluster, topic: &str, group: &str, config: StreamGroupConfig) -> Result<GroupConsumer, ClientError> {
        let membership = Arc::new(Mutex::new(Membership::default()));
        let rebalance = Arc::new(AtomicBool::new(false));
        let (inner, interval) = join_once(&cluster, topic, group, &config, &membership).await?;
        let heartbeat = tokio::spawn(heartbeats(cluster.clone(), group.to_string(), membership.clone(), rebalance.clone(), interval));
        Ok(GroupConsumer { cluster, topic: topic.to_string(), group: group.to_string(), config, membership, rebalance, inner, heartbeat })
    }

    /// This member's id and generation.
    pub fn membership(&self) -> (Option<String>, u64) {
        let m = self.membership.lock().expect("membership lock poisoned");
        (m.member.clone(), m.generation)
    }

    /// The partitions this member reads now.
    pub fn assignment(&self) -> &[u32] {
        self.inner.assigned()
    }

    /// Moves past messages retention deleted before this member read them, since the
    /// last call.
    pub fn take_retention_skips(&mut self) -> Vec<crate::consumer::RetentionSkip> {
        self.inner.take_retention_skips()
    }

    /// The next offset this member will read, per partition of the topic (only the
    /// assigned ones move).
    pub fn positions(&self) -> &[u64] {
        self.inner.positions()
    }

    /// Moves `partition`'s position (e.g. back to messages not processed before a
    /// commit, or to an offset found by time).
    pub fn seek(&mut self, partition: u32, offset: u64) -> Result<(), ClientError> {
        self.inner.skip_to(partition, offset)
    }

    /// Messages of the assigned partitions, waiting up to `max_wait`. After a
    /// rebalance it first commits (with `auto_commit`) and joins again.
    pub async fn poll(&mut self, max_wait: Duration) -> Result<Vec<Message>, ClientError> {
        if self.rebalance.swap(false, Ordering::AcqRel) {
            self.rejoin().await?;
        }
        if self.inner.assigned().is_empty() {
            tokio::time::sleep(max_wait).await;
            return Ok(Vec::new());
        }
        self.inner.poll(max_wait).await
    }

    /// Commits the positions of the assigned partitions. `StaleGeneration` means the
    /// group rebalanced: the next `poll` joins again.
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        let result = self.inner.commit().await;
        if let Err(e) = &result {
            if matches!(e.code(), Some(ErrorCode::StaleGeneration)) {
                self.rebalance.store(true, Ordering::Release);
            }
        }
        result
    }

    async fn rejoin(&mut self) -> Result<(), ClientError> {
        if self.config.auto_commit {
            if let Err(e) = self.inner.commit().await {
                tracing::warn!(group = %self.group, error = %e, "commit before rejoining failed; the partitions' next owners start from the last commit");
            }
        }
        let (inner, _) = join_once(&self.cluster, &self.topic, &self.group, &self.config, &self.membership).await?;
        self.inner = inner;
        Ok(())
    }

    /// Commits (with `auto_commit`) and leaves the group, so its partitions are
    /// reassigned at once.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.heartbeat.abort();
        let committed = if self.config.auto_commit { self.inner.commit().await } else { Ok(()) };
        let member = self.membership.lock().expect("membership lock poisoned").member.clone();
        if let Some(member) = member {
            let body = message::encode(&LeaveGroupRequest { group: self.group.clone(), member });
            let _ = self.cluster.call_any(&format!("leave group {}", self.group), api::LEAVE_GROUP, &|_| body.clone()).await;
        }
        committed
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// Joins (or rejoins) and builds the consumer of the assigned partitions from their
/// committed offsets; returns it and the heartbeat interval.
async fn join_once(
    cluster: &Cluster,
    topic: &str,
    group: &str,
    config: &StreamGroupConfig,
    membership: &Mutex<Membership>,
) -> Result<(Consumer, Duration), ClientError> {
    let member = membership.lock().expect("membership lock poisoned").member.clone();
    let req = JoinGroupRequest {
        group: group.to_string(),
        topics: vec![topic.to_string()],
        member,
        session_timeout_ms: config.session_timeout.as_millis().min(u128::from(u32::MAX)) as u32,
    };
    let body = message::encode(&req);
    let (_, answer) = cluster.call_any(&format!("join group {group}"), api::JOIN_GROUP, &|_| body.clone()).await?;
    let joined: JoinGroupResponse =
        message::decode(&answer).map_err(|e| ClientError::Malformed { addr: "the group coordinator".into(), reason: e.to_string() })?;
    let partitions: Vec<u32> = joined.assignment.iter().filter(|(t, _)| t == topic).flat_map(|(_, p)| p.iter().copied()).collect();
    let mut starts = Vec::with_capacity(partitions.len());
    let mut committed = Vec::new();
    for p in &partitions {
        let c = fetch_committed(cluster, topic, group, *p).await?;
        let at = match c.committed {
            Some(o) => {
                committed.push((*p, o.offset));
                o.offset.max(c.log_start_offset)
            }
            None => match config.start {
                StartAt::Earliest => c.log_start_offset,
                StartAt::Latest => c.high_watermark,
                StartAt::Offset(o) => o,
                StartAt::Time(ts) => crate::consumer::list_offset(cluster, topic, *p, ts).await?,
            },
        };
        starts.push((*p, at));
    }
    let consumer = Consumer::assign(cluster.clone(), topic, &starts).await?.in_group(group, joined.generation, &committed);
    *membership.lock().expect("membership lock poisoned") = Membership { member: Some(joined.member.clone()), generation: joined.generation };
    tracing::debug!(group, member = %joined.member, generation = joined.generation, ?partitions, "joined stream group");
    Ok((consumer, Duration::from_millis(u64::from(joined.heartbeat_interval_ms.max(50)))))
}

/// Heartbeats until aborted; raises `rebalance` when the group moved on.
async fn heartbeats(cluster: Cluster, group: String, membership: Arc<Mutex<Membership>>, rebalance: Arc<AtomicBool>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Membership { member: Some(member), generation } = membership.lock().expect("membership lock poisoned").clone() else { continue };
        let body = message::encode(&HeartbeatRequest { group: group.clone(), member, generation });
        match cluster.call_any(&format!("heartbeat to group {group}"), api::HEARTBEAT, &|_| body.clone()).await {
            Ok((_, answer)) => {
                if message::decode::<HeartbeatResponse>(&answer).is_ok_and(|h| h.rebalance) {
                    rebalance.store(true, Ordering::Release);
                }
            }
            Err(e) if e.code() == Some(ErrorCode::UnknownMember) => rebalance.store(true, Ordering::Release),
            Err(e) => tracing::debug!(group = %group, error = %e, "heartbeat failed; retrying"),
        }
    }
}
