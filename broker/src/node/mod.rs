//! A running broker node: the metadata group, the partition groups the metadata gives
//! it, the peer listener and the client listener.
//!
//! - [`group`]: opening a Raft group over its directory.
//! - [`reconcile`]: opening (and as preferred leader, initializing) the partition groups
//!   this node replicates; stopping and deleting removed ones.
//! - [`rejoin`]: starting a group with no local state — new, or lost with a wiped disk.
//! - [`partition`]: a hosted partition: append (deciding before proposing), committed
//!   reads, leader checks.
//! - [`api`]: the client API, one file per API behind a dispatch table.
//! - [`admin`]: the admin HTTP listener (`/health/live`, `/health/ready`, `/metrics`).
//! - [`quiesce`]: idle partition groups stop ticking; node-pair liveness wakes them.
//! - [`gauges`]: sampling every hosted group into the metrics.
//! - [`faults`]: test-only fault switches.
//! - [`limits`]: every bound of the above.

pub mod admin;
pub mod api;
pub mod awake;
pub mod coordinator;
pub mod damage;
pub mod dead_letters;
pub mod disk_space;
pub mod faults;
pub mod gauges;
pub mod group;
pub mod internal_client;
pub mod jobs;
pub mod limits;
pub mod malloc;
pub mod open_files;
pub mod partition;
pub mod quiesce;
pub mod reconcile;
pub mod rejoin;
pub mod retention;
pub mod ticks;

use std::collections::BTreeMap;
use std::sync::Arc;

use keel_net::{Listener, ServeOptions};
use keel_storage::{Flusher, LogConfig, TailCacheShare};
use openraft::BasicNode;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::metadata::{MetadataState, METADATA_GROUP};
use crate::peer::{GroupRegistry, PeerPool, PeerServer};
use crate::replication::config::raft_config_with_timing;
use group::{initialize_if_new, open_group, GroupContext, GroupHandle, Peers, SegmentPolicy};
use limits::{CLIENT_CONCURRENCY_MAX, CLIENT_CONNECTIONS_MAX, CLIENT_SEND_QUEUE_CAPACITY};
use reconcile::HostedPartitions;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr} ({what}): {source}; is another process using it?")]
    Listen { what: &'static str, addr: String, source: std::io::Error },
    #[error("cannot start: {0}")]
    Start(String),
}

/// A running node. `shutdown` stops it cleanly; dropping it stops its listeners.
pub struct Node {
    pub id: u64,
    config: Config,
    metadata_group: GroupHandle,
    metadata: watch::Receiver<Arc<MetadataState>>,
    hosted: HostedPartitions,
    registry: GroupRegistry,
    client_listener: Listener,
    peer_server: PeerServer,
    tasks: Vec<JoinHandle<()>>,
    faults: Arc<crate::peer::PeerFaults>,
    node_faults: Arc<faults::NodeFaults>,
    _flusher: Arc<Flusher>,
}

impl Node {
    /// Starts node `config.node.id`: opens its data, binds its listeners, joins (or on
    /// first start, as the lowest member id, bootstraps) the metadata group.
    pub async fn start(config: Config) -> Result<Node, NodeError> {
        config.validate()?;
        let me = config.this_member().expect("validate checks that node.id is a member").clone();
        let fsync = config.fsync_policy()?;
        let raft = &config.cluster.raft;
        let raft_config = raft_config_with_timing(&config.cluster.name, raft.heartbeat_ms, raft.election_timeout_min_ms, raft.election_timeout_max_ms)
            .map_err(|e| NodeError::Start(format!("Raft timing rejected: {e}")))?;
        let disk = faults::disk_from_env().map_err(NodeError::Start)?;
        disk.create_dir_all(&config.node.data_dir).map_err(|e| NodeError::Start(format!("cannot create data dir {}: {e}", config.node.data_dir.display())))?;
        let registry = GroupRegistry::default();
        let liveness = crate::peer::liveness::Liveness::new();
        // A group not opened yet "holds state" here if it ever took part in an election
        // (its vote file): at a cluster's first start no group has one, so wiped-node
        // probes between starting nodes do not wait on each other.
        let groups_on_disk: crate::peer::server::GroupOnDisk = {
            let (data_dir, disk) = (config.node.data_dir.clone(), disk.clone());
            Arc::new(move |g| crate::replication::log_store::has_vote(&*disk, &group::group_dir(&data_dir, g)))
        };
        let peer_server = PeerServer::bind_with_disk(&me.peer_addr, me.id, &config.cluster.name, registry.clone(), liveness.clone(), groups_on_disk)
            .await
            .map_err(|source| NodeError::Listen { what: "peer", addr: me.peer_addr.clone(), source })?;
        let ledger = Arc::new(
            keel_storage::AckLedger::open(disk.clone(), &config.node.data_dir)
                .map_err(|e| NodeError::Start(format!("opening the ack ledger in {}: {e}", config.node.data_dir.display())))?,
        );
        let flusher = Arc::new(
            Flusher::spawn_with_ledger(
                &format!("keel-flusher-{}", me.id),
                keel_storage::limits::FLUSH_QUEUE_CAPACITY_DEFAULT,
                keel_storage::limits::FLUSH_LANES_DEFAULT,
                Some(ledger.clone()),
            )
            .map_err(|e| NodeError::Start(e.to_string()))?,
        );
        let pool = PeerPool::new(me.id, config.cluster.name.clone());
        let peer_faults = pool.faults.clone();
        let ctx = Arc::new(GroupContext {
            node_id: me.id,
            data_dir: config.node.data_dir.clone(),
            disk: disk.clone(),
            pool,
            registry: registry.clone(),
            flusher: flusher.clone(),
            ledger,
            raft_config: Arc::new(raft_config),
            log_config: LogConfig {
                fsync,
                tail_cache_share: Some(TailCacheShare::new(limits::TAIL_CACHE_NODE_BYTES)),
                drop_synced_pages: !config.node.keep_synced_pages,
                ..LogConfig::default()
            },
            disk_space: disk_space::DiskSpace::new(config.node.data_dir.clone(), config.node.min_free_bytes),
        });
        // A node with no metadata state asks its peers whether the cluster already
        // exists (its data may have been wiped) before it starts the metadata group.
        let peers = rejoin::other_peers(&config.cluster.members, None, me.id);
        faults::metadata_open_delay().await;
        let (metadata_group, recovery) = open_group(
            &ctx,
            METADATA_GROUP,
            Peers { replicas: peers, probe_if_empty: true },
            Some(SegmentPolicy { bytes: config.cluster.metadata_log.segment_bytes, age: None }),
        )
        .await
        .map_err(NodeError::Start)?;
        let refill_horizon = rejoin::read_horizon(&*disk, &config.node.data_dir).map_err(NodeError::Start)?;
        let lowest = config.cluster.members.iter().map(|m| m.id).min().expect("validate checks members is non-empty");
        if me.id == lowest && recovery.is_none() {
            let members: BTreeMap<u64, BasicNode> = config.cluster.members.iter().map(|m| (m.id, BasicNode::new(&m.peer_addr))).collect();
            initialize_if_new(&metadata_group, members).await.map_err(NodeError::Start)?;
        }
        let metrics = crate::metrics::install();
        // Sabotage (test builds only, and only if KEEL_SABOTAGE names a mode): applied now.
        let _ = crate::sabotage::mode();
        let metadata = metadata_group.shared.metadata().expect("the metadata group's state machine folds the metadata");
        let hosted = HostedPartitions::default();
        let faults = Arc::new(faults::NodeFaults::default());
        let mut tasks = vec![
            tokio::spawn(reconcile::run(ctx.clone(), config.cluster.clone(), refill_horizon, metadata.clone(), hosted.clone())),
            tokio::spawn(gauges::run(metadata_group.clone(), hosted.clone())),
            tokio::spawn(retention::run(hosted.clone(), metadata_group.clone(), config.cluster.metadata_log)),
            tokio::spawn(disk_space::run(ctx.disk_space.clone(), hosted.clone(), me.id)),
        ];
        let peers = rejoin::other_peers(&config.cluster.members, None, me.id);
        tasks.extend(crate::peer::liveness::spawn_beats(ctx.pool.clone(), liveness.clone(), peers.clone()));
        let quiesce_after = (raft.quiesce_after_ms > 0).then(|| std::time::Duration::from_millis(raft.quiesce_after_ms));
        tasks.push(tokio::spawn(ticks::run(hosted.clone(), std::time::Duration::from_millis(raft.heartbeat_ms))));
        tasks.push(tokio::spawn(quiesce::run(quiesce::Driver {
            node_id: me.id,
            hosted: hosted.clone(),
            pool: ctx.pool.clone(),
            liveness,
            peers,
            quiesce_after,
            campaigns: Arc::new(tokio::sync::Semaphore::new(limits::CAMPAIGNS_IN_FLIGHT_MAX)),
        })));
        let service = Arc::new(api::ClientService {
            node_id: me.id,
            cluster: config.cluster.clone(),
            metadata_group: metadata_group.clone(),
            metadata: metadata.clone(),
            hosted: hosted.clone(),
            producer_ids: tokio::sync::Mutex::new((0, 0)),
            faults: faults.clone(),
            coordinator: Arc::new(coordinator::Coordinator::default()),
        });
        tasks.push(tokio::spawn(api::consumer_groups::expire_sessions(service.clone())));
        tasks.push(tokio::spawn(dead_letters::run(service.clone())));
        tasks.push(tokio::spawn(jobs::run(service.clone())));
        let options =
            ServeOptions { concurrency_max: CLIENT_CONCURRENCY_MAX, send_queue_capacity: CLIENT_SEND_QUEUE_CAPACITY, connections_max: CLIENT_CONNECTIONS_MAX };
        let client_listener = keel_net::listen(&me.client_addr, service, options).await.map_err(|source| NodeError::Listen {
            what: "client",
            addr: me.client_addr.clone(),
            source,
        })?;
        let admin_listener =
            tokio::net::TcpListener::bind(&me.admin_addr).await.map_err(|source| NodeError::Listen { what: "admin", addr: me.admin_addr.clone(), source })?;
        let admin_state = Arc::new(admin::AdminState {
            metadata_group: metadata_group.clone(),
            hosted: hosted.clone(),
            data_dir: config.node.data_dir.clone(),
            disk_space: ctx.disk_space.clone(),
            metrics,
            faults: node_faults_for_admin(&faults),
        });
        tasks.push(admin::serve(admin_listener, admin_state));
        tracing::info!(node = me.id, client = %me.client_addr, peer = %me.peer_addr, "node started");
        Ok(Node {
            id: me.id,
            config,
            metadata_group,
            metadata,
            hosted,
            registry,
            client_listener,
            peer_server,
            tasks,
            faults: peer_faults,
            node_faults: faults,
            _flusher: flusher,
        })
    }

    /// Starts several nodes of one cluster in this process, concurrently: a node
    /// with no state waits until its peers answer (see [`rejoin`]), so starting them
    /// one after another would wait forever.
    pub async fn start_all(configs: Vec<Config>) -> Result<Vec<Node>, NodeError> {
        futures::future::try_join_all(configs.into_iter().map(Node::start)).await
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The client listener's address.
    pub fn client_addr(&self) -> std::net::SocketAddr {
        self.client_listener.local_addr()
    }

    pub fn peer_addr(&self) -> std::net::SocketAddr {
        self.peer_server.local_addr()
    }

    /// Fault injection: the peers this node may not exchange Raft traffic with.
    pub fn peer_faults(&self) -> &Arc<crate::peer::PeerFaults> {
        &self.faults
    }

    /// Fault injection: this node's test-only faults.
    pub fn node_faults(&self) -> &Arc<faults::NodeFaults> {
        &self.node_faults
    }

    /// The partition hosted here for `group`, if any.
    pub fn partition(&self, group: u64) -> Option<Arc<partition::Partition>> {
        self.hosted.read().expect("hosted lock poisoned").get(&group).cloned()
    }

    /// The latest metadata this node has folded in.
    pub fn metadata(&self) -> Arc<MetadataState> {
        self.metadata.borrow().clone()
    }

    /// Stops accepting, stops every Raft group (flushing their logs), then returns.
    pub async fn shutdown(self) {
        drop(self.client_listener);
        for t in &self.tasks {
            t.abort();
        }
        let partitions: Vec<Arc<partition::Partition>> = self.hosted.write().expect("hosted lock poisoned").drain().map(|(_, p)| p).collect();
        for p in partitions {
            let _ = p.group.raft.shutdown().await;
        }
        let _ = self.metadata_group.raft.shutdown().await;
        self.registry.write().expect("group registry lock poisoned").clear();
        drop(self.peer_server);
    }
}

/// The faults the admin listener may switch (only with the `fault-injection` feature).
fn node_faults_for_admin(faults: &Arc<faults::NodeFaults>) -> Option<Arc<faults::NodeFaults>> {
    cfg!(feature = "fault-injection").then(|| faults.clone())
}
