//! The simulated network: every Raft RPC between replicas of a group goes through one
//! seeded router that delays, drops (the request or the reply), duplicates and cuts
//! messages. Delivery calls the target replica's Raft directly, in this process.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keel_broker::replication::state_machine::PartitionSnapshot;
use keel_broker::replication::{PartitionStateMachine, TypeConfig};
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{BasicNode, Raft};

pub type NodeId = u64;
pub type GroupId = u64;
pub type SimRaft = Raft<TypeConfig, PartitionStateMachine>;
type Vote = openraft::impls::Vote<openraft::impls::leader_id_std::LeaderId<u64, u64>>;
type Snapshot = openraft::Snapshot<openraft::vote::leader_id_std::CommittedLeaderId<u64>, u64, BasicNode, PartitionSnapshot>;

/// How the network misbehaves; the nemesis changes it during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weather {
    /// Per mille of requests lost before delivery, and of replies lost after it.
    pub drop_per_mille: u32,
    /// Per mille of requests delivered a second time, later.
    pub duplicate_per_mille: u32,
    /// One-way delay, uniform in this range (milliseconds).
    pub delay_ms: (u64, u64),
}

impl Weather {
    pub const CALM: Weather = Weather { drop_per_mille: 0, duplicate_per_mille: 0, delay_ms: (1, 5) };
}

/// Message counts of a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub delivered: u64,
    pub dropped: u64,
    pub duplicated: u64,
}

struct State {
    rng: fastrand::Rng,
    /// The replicas that are up, by (node, group).
    rafts: BTreeMap<(NodeId, GroupId), SimRaft>,
    /// Directed links that are cut: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
    weather: Weather,
    stats: NetStats,
    /// Every message, when tracing (`KEEL_SIM_TRACE=1`).
    trace: Option<Vec<String>>,
    start: tokio::time::Instant,
}

/// The router every simulated replica sends through.
pub struct Net {
    state: Mutex<State>,
}

/// What happens to one message, decided when it is sent.
struct Plan {
    delay: Duration,
    reply_delay: Duration,
    drop_request: bool,
    drop_reply: bool,
    duplicate_after: Option<Duration>,
}

impl Net {
    pub fn new(seed: u64) -> Arc<Net> {
        Arc::new(Net {
            state: Mutex::new(State {
                rng: fastrand::Rng::with_seed(seed),
                rafts: BTreeMap::new(),
                cut: BTreeSet::new(),
                weather: Weather::CALM,
                stats: NetStats::default(),
                trace: std::env::var_os("KEEL_SIM_TRACE").map(|_| Vec::new()),
                start: tokio::time::Instant::now(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn attach(&self, node: NodeId, group: GroupId, raft: SimRaft) {
        self.lock().rafts.insert((node, group), raft);
    }

    /// Takes every replica of `node` off the network (it crashed).
    pub fn detach_node(&self, node: NodeId) {
        self.lock().rafts.retain(|(n, _), _| *n != node);
    }

    pub fn set_weather(&self, weather: Weather) {
        self.lock().weather = weather;
    }

    /// Cuts the links from every node of `a` to every node of `b` (one way).
    pub fn cut(&self, a: &[NodeId], b: &[NodeId]) {
        let mut st = self.lock();
        for x in a {
            for y in b {
                if x != y {
                    st.cut.insert((*x, *y));
                }
            }
        }
    }

    pub fn heal(&self) {
        self.lock().cut.clear();
    }

    pub fn stats(&self) -> NetStats {
        self.lock().stats
    }

    fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.lock().cut.contains(&(from, to))
    }

    fn raft(&self, node: NodeId, group: GroupId) -> Option<SimRaft> {
        self.lock().rafts.get(&(node, group)).cloned()
    }

    fn plan(&self) -> Plan {
        let mut st = self.lock();
        let w = st.weather;
        let delay = |rng: &mut fastrand::Rng| Duration::from_millis(rng.u64(w.delay_ms.0..=w.delay_ms.1));
        let d = delay(&mut st.rng);
        let reply_delay = delay(&mut st.rng);
        let drop_request = st.rng.u32(0..1000) < w.drop_per_mille;
        let drop_reply = st.rng.u32(0..1000) < w.drop_per_mille;
        let duplicate_after = (st.rng.u32(0..1000) < w.duplicate_per_mille).then(|| d + delay(&mut st.rng) * 3);
        Plan { delay: d, reply_delay, drop_request, drop_reply, duplicate_after }
    }

    /// Records a message event when tracing.
    fn trace(&self, what: impl FnOnce() -> String) {
        let mut st = self.lock();
        let ms = st.start.elapsed().as_micros();
        if let Some(t) = st.trace.as_mut() {
            t.push(format!("{ms:>10} us  {}", what()));
        }
    }

    /// The message trace, if tracing.
    pub fn take_trace(&self) -> Vec<String> {
        self.lock().trace.take().unwrap_or_default()
    }

    fn count(&self, f: impl FnOnce(&mut NetStats)) {
        f(&mut self.lock().stats);
    }
}

#[derive(Debug)]
struct Lost(String);

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Lost {}

fn unreachable<E: std::error::Error>(why: String) -> RPCError<TypeConfig, E> {
    RPCError::Unreachable(Unreachable::new(&Lost(why)))
}

/// Creates a replica's clients to its peers in one group.
#[derive(Clone)]
pub struct NetFactory {
    pub net: Arc<Net>,
    pub node: NodeId,
    pub group: GroupId,
}

pub struct NetClient {
    net: Arc<Net>,
    from: NodeId,
    to: NodeId,
    group: GroupId,
}

impl RaftNetworkFactory<TypeConfig> for NetFactory {
    type Network = NetClient;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> NetClient {
        NetClient { net: self.net.clone(), from: self.node, to: target, group: self.group }
    }
}

impl NetClient {
    /// Sends one request through the router: delay, maybe lost, maybe duplicated, the
    /// reply delayed and maybe lost. `deliver` runs it on the target replica.
    async fn send<Q, A, F, Fut>(&self, request: Q, deliver: F) -> Result<A, String>
    where
        Q: Clone + Send + 'static,
        A: Send + 'static,
        F: Fn(SimRaft, Q) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<A, String>> + Send + 'static,
    {
        let plan = self.net.plan();
        self.net.trace(|| format!("send {} -> {} group {} {}", self.from, self.to, self.group, std::any::type_name::<Q>().rsplit("::").next().unwrap_or("")));
        tokio::time::sleep(plan.delay).await;
        if plan.drop_request || self.net.is_cut(self.from, self.to) {
            self.net.count(|s| s.dropped += 1);
            return Err(format!("request {} -> {} lost", self.from, self.to));
        }
        let Some(target) = self.net.raft(self.to, self.group) else {
            self.net.count(|s| s.dropped += 1);
            return Err(format!("node {} is down", self.to));
        };
        let deliver = Arc::new(deliver);
        if let Some(after) = plan.duplicate_after {
            let (net, to, group, again, deliver) = (self.net.clone(), self.to, self.group, request.clone(), deliver.clone());
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if let Some(target) = net.raft(to, group) {
                    net.count(|s| s.duplicated += 1);
                    let _ = deliver(target, again).await;
                }
            });
        }
        self.net.count(|s| s.delivered += 1);
        let answer = deliver(target, request).await;
        self.net.trace(|| format!("handled {} -> {} group {}: {}", self.from, self.to, self.group, if answer.is_ok() { "ok" } else { "error" }));
        tokio::time::sleep(plan.reply_delay).await;
        if plan.drop_reply || self.net.is_cut(self.to, self.from) {
            self.net.count(|s| s.dropped += 1);
            return Err(format!("reply {} -> {} lost", self.to, self.from));
        }
        answer
    }
}

impl RaftNetworkV2<TypeConfig> for NetClient {
    type SnapshotData = PartitionSnapshot;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.send(rpc, |raft, rpc| async move { raft.append_entries(rpc).await.map_err(|e| e.to_string()) }).await.map_err(unreachable)
    }

    async fn vote(&mut self, rpc: VoteRequest<TypeConfig>, _option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.send(rpc, |raft, rpc| async move { raft.vote(rpc).await.map_err(|e| e.to_string()) }).await.map_err(unreachable)
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<TypeConfig>, _option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.send(rpc, |raft, rpc| async move { raft.pre_vote(rpc).await.map_err(|e| e.to_string()) }).await.map_err(unreachable)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let (meta, data) = (snapshot.meta, snapshot.snapshot);
        let send = self.send((vote, meta, data), |raft, (vote, meta, data)| async move {
            raft.install_full_snapshot(vote, openraft::Snapshot { meta, snapshot: data }).await.map_err(|e| e.to_string())
        });
        tokio::select! {
            biased;
            closed = cancel => Err(StreamingError::Closed(closed)),
            answer = send => answer.map_err(|why| StreamingError::Unreachable(Unreachable::new(&Lost(why)))),
        }
    }
}
