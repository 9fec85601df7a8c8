//! Broker configuration: typed, defaulted, validated, in one place.
//!
//! [`ClusterConfig`] holds what every node of a cluster must agree on (members, Raft
//! timing, topic defaults, durability); [`NodeConfig`] what is this node's own (id,
//! data directory, listen addresses). Sources, later overriding earlier: built-in
//! defaults, a TOML file (`keel.example.toml` documents every field), `KEEL_*`
//! environment variables, command-line flags. `validate` checks values against each
//! other and against the protocol and storage limits and names the field at fault.

use std::path::PathBuf;

use keel_protocol::{TopicConfig, TopicConfigPatch};
use serde::{Deserialize, Deserializer, Serialize};

/// Everything a broker needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub cluster: ClusterConfig,
}

/// This node's own settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id; must be one of `cluster.members`.
    pub id: u64,
    /// Where logs, Raft state and snapshots live.
    pub data_dir: PathBuf,
    /// Async runtime worker threads; 0 means one per CPU core. `keel dev` gives each
    /// of its nodes an equal share of the cores, since they share one machine.
    pub worker_threads: usize,
    /// Free bytes the data directory's file system must keep: below, the node refuses
    /// new data (`StorageFull`) and hands its leaderships away until space is freed
    /// (`node/disk_space.rs`); 0 turns the check off. It must exceed what can be in
    /// flight when the line is crossed (about 64 MiB per partition led at most).
    pub min_free_bytes: u64,
    /// Keep synced segment bytes in the OS page cache (default false: they are dropped
    /// after each sync — `keel_storage::LogConfig::drop_synced_pages` — since recent
    /// entries are served from the tail cache). Keeping them makes reads past the tail
    /// cache (replays, far-behind consumers) come from memory while it lasts, at the cost
    /// of appends growing the page cache.
    pub keep_synced_pages: bool,
}

/// Default `node.min_free_bytes`.
pub const MIN_FREE_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;

/// Most async runtime worker threads a node may ask for.
pub const WORKER_THREADS_MAX: usize = 1024;

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig { id: 1, data_dir: PathBuf::from("keel-data/node1"), worker_threads: 0, min_free_bytes: MIN_FREE_BYTES_DEFAULT, keep_synced_pages: false }
    }
}

/// One member of the cluster's initial (bootstrap) membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    pub id: u64,
    /// Client listener (producers, consumers, admin commands).
    pub client_addr: String,
    /// Peer listener (Raft traffic between brokers).
    pub peer_addr: String,
    /// Admin HTTP listener (`/health/live`, `/health/ready`, `/metrics`).
    pub admin_addr: String,
}

/// Settings every node of the cluster must share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster name; peers from another cluster are refused.
    pub name: String,
    /// Initial members. Bootstrapping an already initialized cluster is a no-op.
    pub members: Vec<MemberConfig>,
    pub raft: RaftTiming,
    pub topic_defaults: TopicDefaults,
    /// `"always"` (an acknowledged write is fsynced on a majority) or `"interval:<ms>"`
    /// (acknowledged after write(2); a machine crash can lose the last interval).
    pub fsync: String,
    pub metadata_log: MetadataLogConfig,
}

/// How much of the metadata log is kept. Like a topic's byte retention, through Raft:
/// once the log holds more than `retained_bytes` in whole sealed segments, the metadata
/// leader cuts the oldest, every node snapshots the metadata state and purges them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetadataLogConfig {
    /// Size at which a metadata log segment is closed (whole segments are purged).
    pub segment_bytes: u64,
    /// Bytes of log kept; the metadata log holds at most this plus one segment.
    pub retained_bytes: u64,
}

impl Default for MetadataLogConfig {
    fn default() -> Self {
        use crate::node::limits::{METADATA_RETAINED_BYTES_DEFAULT, METADATA_SEGMENT_BYTES_DEFAULT};
        MetadataLogConfig { segment_bytes: METADATA_SEGMENT_BYTES_DEFAULT, retained_bytes: METADATA_RETAINED_BYTES_DEFAULT }
    }
}

/// Raft timing, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// A partition group idle this long (no write or read) stops ticking and
    /// heartbeating (`node/quiesce.rs`; a sporadically used one sooner:
    /// `node::limits::QUIESCE_SPORADIC_IDLE`); 0: never.
    pub quiesce_after_ms: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        use crate::replication::config::{ELECTION_TIMEOUT_MAX_MS, ELECTION_TIMEOUT_MIN_MS, HEARTBEAT_INTERVAL_MS, QUIESCE_AFTER_MS};
        RaftTiming {
            heartbeat_ms: HEARTBEAT_INTERVAL_MS,
            election_timeout_min_ms: ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max_ms: ELECTION_TIMEOUT_MAX_MS,
            quiesce_after_ms: QUIESCE_AFTER_MS,
        }
    }
}

/// Defaults for `keel topic create` when a flag or setting is omitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicDefaults {
    pub partitions: u32,
    pub replicas: u16,
    /// Every topic setting (`keel_protocol::TopicConfig`); a setting the file leaves
    /// out takes its built-in default, an unknown one is an error.
    #[serde(deserialize_with = "strict_topic_config")]
    pub config: TopicConfig,
}

impl Default for TopicDefaults {
    fn default() -> Self {
        TopicDefaults { partitions: 3, replicas: 3, config: TopicConfig::default() }
    }
}

/// A topic config from the file, refusing unknown settings (a typo must not be
/// silently ignored, as the lenient JSON form does for settings of newer builds).
fn strict_topic_config<'de, D: Deserializer<'de>>(d: D) -> Result<TopicConfig, D::Error> {
    Ok(TopicConfig::default().patched(&TopicConfigPatch::deserialize(d)?))
}

/// The default base port of `keel dev`: node N listens on client `P + N - 1`, peer
/// `P + 100 + N - 1`, admin `P + 200 + N - 1`.
pub const DEV_BASE_PORT: u16 = 9092;

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig::dev(3, DEV_BASE_PORT)
    }
}

impl ClusterConfig {
    /// The embedded configuration of `keel dev`: `nodes` nodes on loopback.
    pub fn dev(nodes: u16, base_port: u16) -> ClusterConfig {
        let members = (0..nodes)
            .map(|i| MemberConfig {
                id: u64::from(i) + 1,
                client_addr: format!("127.0.0.1:{}", base_port + i),
                peer_addr: format!("127.0.0.1:{}", base_port + 100 + i),
                admin_addr: format!("127.0.0.1:{}", base_port + 200 + i),
            })
            .collect();
        // Fewer nodes than the default replica count: default to one replica per node.
        let defaults = TopicDefaults::default();
        let topic_defaults = TopicDefaults { replicas: defaults.replicas.min(nodes.max(1)), ..defaults };
        ClusterConfig {
            name: "keel-dev".into(),
            members,
            raft: RaftTiming::default(),
            topic_defaults,
            fsync: "always".into(),
            metadata_log: MetadataLogConfig::default(),
        }
    }
}

/// A configuration value that is missing, malformed or inconsistent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("environment variable {var}={value:?} is not valid: {reason}")]
    Env { var: &'static str, value: String, reason: String },
    #[error("invalid configuration: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Parses a numeric `KEEL_*` override.
fn env_u64(var: &'static str, value: &str) -> Result<u64, ConfigError> {
    value.parse().map_err(|e: std::num::ParseIntError| ConfigError::Env { var, value: value.to_string(), reason: e.to_string() })
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { field, reason: reason.into() })
}

impl Config {
    /// Parses TOML text (missing fields take their defaults, unknown fields are errors).
    pub fn from_toml(text: &str, origin: &std::path::Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_path_buf(), reason: e.to_string() })
    }

    /// Reads a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::from_toml(&text, path)
    }

    /// Applies `KEEL_*` overrides from `vars` (pass `std::env::vars()`).
    pub fn apply_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) -> Result<(), ConfigError> {
        for (key, value) in vars {
            match key.as_str() {
                "KEEL_NODE_ID" => {
                    self.node.id = value.parse().map_err(|e: std::num::ParseIntError| ConfigError::Env {
                        var: "KEEL_NODE_ID",
                        value: value.clone(),
                        reason: e.to_string(),
                    })?
                }
                "KEEL_DATA_DIR" => self.node.data_dir = PathBuf::from(value),
                "KEEL_KEEP_SYNCED_PAGES" => {
                    self.node.keep_synced_pages = match value.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(ConfigError::Env { var: "KEEL_KEEP_SYNCED_PAGES", value: value.clone(), reason: "use true or false".into() }),
                    }
                }
                "KEEL_MIN_FREE_BYTES" => {
                    self.node.min_free_bytes = value.parse().map_err(|e: std::num::ParseIntError| ConfigError::Env {
                        var: "KEEL_MIN_FREE_BYTES",
                        value: value.clone(),
                        reason: e.to_string(),
                    })?
                }
                "KEEL_METADATA_SEGMENT_BYTES" => self.cluster.metadata_log.segment_bytes = env_u64("KEEL_METADATA_SEGMENT_BYTES", &value)?,
                "KEEL_METADATA_RETAINED_BYTES" => self.cluster.metadata_log.retained_bytes = env_u64("KEEL_METADATA_RETAINED_BYTES", &value)?,
                "KEEL_QUIESCE_AFTER_MS" => self.cluster.raft.quiesce_after_ms = env_u64("KEEL_QUIESCE_AFTER_MS", &value)?,
                "KEEL_HEARTBEAT_MS" => self.cluster.raft.heartbeat_ms = env_u64("KEEL_HEARTBEAT_MS", &value)?,
                "KEEL_ELECTION_TIMEOUT_MIN_MS" => self.cluster.raft.election_timeout_min_ms = env_u64("KEEL_ELECTION_TIMEOUT_MIN_MS", &value)?,
                "KEEL_ELECTION_TIMEOUT_MAX_MS" => self.cluster.raft.election_timeout_max_ms = env_u64("KEEL_ELECTION_TIMEOUT_MAX_MS", &value)?,
                "KEEL_CLUSTER_NAME" => self.cluster.name = value,
                "KEEL_FSYNC" => self.cluster.fsync = value,
                _ => {}
            }
        }
        Ok(())
    }

    /// This node's member entry.
    pub fn this_member(&self) -> Option<&MemberConfig> {
        self.cluster.members.iter().find(|m| m.id == self.node.id)
    }

    /// The storage fsync policy named by `cluster.fsync`.
    pub fn fsync_policy(&self) -> Result<keel_storage::FsyncPolicy, ConfigError> {
        match self.cluster.fsync.as_str() {
            "always" => Ok(keel_storage::FsyncPolicy::Always),
            other => match other.strip_prefix("interval:").and_then(|ms| ms.parse::<u64>().ok()) {
                Some(ms) if ms > 0 => Ok(keel_storage::FsyncPolicy::Interval(std::time::Duration::from_millis(ms))),
                _ => Err(ConfigError::Invalid { field: "cluster.fsync", reason: format!("{other:?}: use \"always\" or \"interval:<milliseconds>\"") }),
            },
        }
    }

    /// Checks every value against the others and against the limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.worker_threads > WORKER_THREADS_MAX {
            return invalid("node.worker_threads", format!("at most {WORKER_THREADS_MAX} (0 means one per core)"));
        }
        let c = &self.cluster;
        if c.name.is_empty() {
            return invalid("cluster.name", "must not be empty");
        }
        if c.members.is_empty() {
            return invalid("cluster.members", "at least one member is needed");
        }
        let mut ids: Vec<u64> = c.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return invalid("cluster.members", "member ids must be unique");
        }
        if ids.contains(&0) {
            return invalid("cluster.members", "member id 0 is reserved");
        }
        let mut addrs: Vec<&str> = c.members.iter().flat_map(|m| [m.client_addr.as_str(), m.peer_addr.as_str(), m.admin_addr.as_str()]).collect();
        addrs.sort_unstable();
        if addrs.windows(2).any(|w| w[0] == w[1]) {
            return invalid("cluster.members", "every listen address must be distinct");
        }
        if self.this_member().is_none() {
            return invalid("node.id", format!("{} is not among cluster.members ({ids:?})", self.node.id));
        }
        let r = c.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms < 3 * r.heartbeat_ms {
            return invalid("cluster.raft", "election_timeout_min_ms must be at least 3 x heartbeat_ms (a few missed heartbeats)");
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return invalid("cluster.raft", "election_timeout_max_ms must exceed election_timeout_min_ms");
        }
        if r.quiesce_after_ms != 0 && r.quiesce_after_ms < 2 * r.heartbeat_ms {
            return invalid("cluster.raft.quiesce_after_ms", "0 (never quiesce) or at least 2 x heartbeat_ms");
        }
        let t = &c.topic_defaults;
        if t.partitions == 0 {
            return invalid("cluster.topic_defaults.partitions", "at least 1");
        }
        if t.replicas == 0 || usize::from(t.replicas) > c.members.len() {
            return invalid("cluster.topic_defaults.replicas", format!("{} must be in 1..={} (the member count)", t.replicas, c.members.len()));
        }
        if let Err(e) = t.config.validate() {
            return invalid("cluster.topic_defaults.config", e.to_string());
        }
        let m = c.metadata_log;
        let (min, max) = (keel_storage::limits::SEGMENT_BYTES_MIN, keel_storage::limits::SEGMENT_BYTES_MAX);
        if !(min..=max).contains(&m.segment_bytes) {
            return invalid("cluster.metadata_log.segment_bytes", format!("{} must be in {min}..={max}", m.segment_bytes));
        }
        if m.retained_bytes < m.segment_bytes {
            return invalid("cluster.metadata_log.retained_bytes", format!("{} must be at least segment_bytes ({})", m.retained_bytes, m.segment_bytes));
        }
        self.fsync_policy()?;
        Ok(())
    }
}

/// Configs for a cluster of `nodes` on free loopback ports with data under `dir/nodeN`
/// (for tests and tools that start nodes in one process). The ports are free when
/// chosen; another process could take one before the nodes bind.
///
/// They come from `LOCAL_CLUSTER_PORTS`, below Linux's ephemeral range (32768 and up,
/// `ip_local_port_range`), never from the kernel's port 0: a port it hands out is
/// ephemeral, and between this choosing it and the node binding it, any outgoing
/// connection (the nodes' own, to each other) can get it as its local port — a node
/// then fails with "address in use". Each process starts at its own place in the range
/// and moves on with every call.
pub fn local_cluster(dir: &std::path::Path, nodes: u16, name: &str) -> Vec<Config> {
    let ports = free_local_ports(3 * usize::from(nodes));
    let mut cluster = ClusterConfig::dev(nodes, 0);
    let n = usize::from(nodes);
    for (i, m) in cluster.members.iter_mut().enumerate() {
        m.client_addr = format!("127.0.0.1:{}", ports[i]);
        m.peer_addr = format!("127.0.0.1:{}", ports[n + i]);
        m.admin_addr = format!("127.0.0.1:{}", ports[2 * n + i]);
    }
    cluster.name = name.to_string();
    (1..=u64::from(nodes))
        .map(|id| Config { node: NodeConfig { id, data_dir: dir.join(format!("node{id}")), ..NodeConfig::default() }, cluster: cluster.clone() })
        .collect()
}

/// The loopback ports `local_cluster` chooses from (below the ephemeral range, and
/// below the ports the broker's process-based tests use).
const LOCAL_CLUSTER_PORTS: std::ops::Range<u16> = 10_000..19_000;

/// `count` loopback ports of `LOCAL_CLUSTER_PORTS`, each free (bound) when chosen.
fn free_local_ports(count: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(LOCAL_CLUSTER_PORTS.end - LOCAL_CLUSTER_PORTS.start);
    let _ = NEXT.compare_exchange(u32::MAX, (std::process::id().wrapping_mul(97)) % span, Ordering::AcqRel, Ordering::Acquire);
    let mut held = Vec::with_capacity(count);
    for _ in 0..span {
        if held.len() == count {
            break;
        }
        let port = LOCAL_CLUSTER_PORTS.start + (NEXT.fetch_add(1, Ordering::AcqRel) % span) as u16;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
        }
    }
    assert_eq!(held.len(), count, "could not find {count} free loopback ports in {LOCAL_CLUSTER_PORTS:?}");
    held.iter().map(|l| l.local_addr().expect("a bound listener has an address").port()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_dev_config_is_valid_for_every_node() {
        for id in 1..=3 {
            let c = Config {
                node: NodeConfig { id, data_dir: format!("keel-data/node{id}").into(), ..NodeConfig::default() },
                cluster: ClusterConfig::dev(3, DEV_BASE_PORT),
            };
            c.validate().unwrap();
        }
    }

    /// `keel.example.toml` documents every field with its default; parsing it must give
    /// exactly the defaults, so the file cannot drift from the code.
    #[test]
    fn the_annotated_example_config_equals_the_defaults() {
        let text = include_str!("../keel.example.toml");
        let parsed = Config::from_toml(text, std::path::Path::new("keel.example.toml")).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn unknown_fields_are_refused_with_the_file_named() {
        let err = Config::from_toml("[node]\nid = 1\nbogus = 2\n", std::path::Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("x.toml") && err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn environment_overrides_apply_and_bad_values_name_the_variable() {
        let mut c = Config::default();
        c.apply_env([("KEEL_NODE_ID".to_string(), "2".to_string()), ("KEEL_DATA_DIR".to_string(), "/tmp/x".to_string())]).unwrap();
        assert_eq!((c.node.id, c.node.data_dir.to_str()), (2, Some("/tmp/x")));
        let err = c.apply_env([("KEEL_NODE_ID".to_string(), "two".to_string())]).unwrap_err();
        assert!(err.to_string().contains("KEEL_NODE_ID"), "{err}");
        assert!(!c.node.keep_synced_pages, "synced pages are dropped by default");
        c.apply_env([("KEEL_KEEP_SYNCED_PAGES".to_string(), "true".to_string())]).unwrap();
        assert!(c.node.keep_synced_pages);
        let err = c.apply_env([("KEEL_KEEP_SYNCED_PAGES".to_string(), "yes".to_string())]).unwrap_err();
        assert!(err.to_string().contains("KEEL_KEEP_SYNCED_PAGES"), "{err}");
    }

    #[test]
    fn validation_names_the_field_at_fault() {
        type Breaker = fn(&mut Config);
        let cases: [(&str, Breaker); 9] = [
            ("node.id", |c| c.node.id = 9),
            ("cluster.members", |c| c.cluster.members[1].id = 1),
            ("cluster.members", |c| c.cluster.members[1].peer_addr = c.cluster.members[0].peer_addr.clone()),
            ("cluster.raft", |c| c.cluster.raft.election_timeout_min_ms = 100),
            ("cluster.raft", |c| c.cluster.raft.election_timeout_max_ms = c.cluster.raft.election_timeout_min_ms),
            ("cluster.raft.quiesce_after_ms", |c| c.cluster.raft.quiesce_after_ms = 2 * c.cluster.raft.heartbeat_ms - 1),
            ("cluster.topic_defaults.replicas", |c| c.cluster.topic_defaults.replicas = 4),
            ("cluster.topic_defaults.config", |c| c.cluster.topic_defaults.config.max_message_bytes = u32::MAX),
            ("cluster.fsync", |c| c.cluster.fsync = "sometimes".into()),
        ];
        for (field, break_it) in cases {
            let mut c = Config::default();
            break_it(&mut c);
            match c.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected {field} to be refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn an_unknown_topic_setting_in_the_file_is_refused() {
        let err = Config::from_toml("[cluster.topic_defaults.config]\ndedupe_windw_ms = 5\n", std::path::Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("dedupe_windw_ms"), "{err}");
    }

    #[test]
    fn fsync_interval_parses_to_the_storage_policy() {
        let mut c = Config::default();
        c.cluster.fsync = "interval:250".into();
        assert_eq!(c.fsync_policy().unwrap(), keel_storage::FsyncPolicy::Interval(std::time::Duration::from_millis(250)));
    }
}
