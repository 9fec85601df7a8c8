//! openraft settings for partition groups, in one place. Timing sits between the
//! "Loopback / CI" and "LAN, aggressive" columns of `shared/notes/openraft.md` §5:
//! 50 / 300 / 600 ms measured 1.0–1.15 s failover gaps with `keel-bench --failover`
//! (release, 3 nodes on 2 cores), with no spurious elections under full produce load
//! (terms stayed at 1). 100 / 500 / 1000 gave 1.6 s.

use openraft::{Config, SnapshotPolicy};

/// Leader heartbeat period. Elections start after 6–12 missed heartbeats, above the
/// fsync and scheduler stalls seen on a shared 2-core machine.
pub const HEARTBEAT_INTERVAL_MS: u64 = 50;
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 300;
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 600;
/// A partition group idle this long stops ticking (`node/quiesce.rs`). Staying awake
/// costs a heartbeat round to every follower each `HEARTBEAT_INTERVAL_MS`; waking costs
/// one confirmation round (and its latency, once) before the next write or read, and a
/// quiesce request (batched per peer). Two heartbeats, the least the configuration
/// allows: with writes spread over 1,000 partitions, 2 s kept ~300 groups awake between
/// their writes (~40 heartbeat rounds per write), 300 ms four heartbeat rounds per
/// write, 100 ms 1.4–1.9 and 15–18 % more throughput (README, "Many partitions"). A
/// partition written more often than every ~100 ms stays awake.
pub const QUIESCE_AFTER_MS: u64 = 100;
/// Entries per AppendEntries RPC; our entries are whole batches, and reads are also
/// capped at `REPLICATION_READ_BYTES_MAX`.
pub const MAX_PAYLOAD_ENTRIES: u64 = 256;
/// Client writes merged into one log append (group commit at the Raft layer).
pub const API_BATCH_CAPACITY: u64 = 256;
/// Snapshots hold only state-machine state and are cheap; retention, not snapshots,
/// decides what the log loses, so openraft never purges on its own.
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 50_000;
pub const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 5_000;

/// The validated openraft configuration for a partition group, default timing.
pub fn partition_raft_config(cluster_name: &str) -> Result<Config, openraft::ConfigError> {
    raft_config_with_timing(cluster_name, HEARTBEAT_INTERVAL_MS, ELECTION_TIMEOUT_MIN_MS, ELECTION_TIMEOUT_MAX_MS)
}

/// The validated openraft configuration with the given timing (milliseconds).
pub fn raft_config_with_timing(cluster_name: &str, heartbeat_ms: u64, election_min_ms: u64, election_max_ms: u64) -> Result<Config, openraft::ConfigError> {
    Config {
        cluster_name: cluster_name.to_string(),
        heartbeat_interval: heartbeat_ms,
        election_timeout_min: election_min_ms,
        election_timeout_max: election_max_ms,
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        max_append_entries: Some(MAX_PAYLOAD_ENTRIES),
        api_batch_capacity: API_BATCH_CAPACITY,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY_ENTRIES),
        max_in_snapshot_log_to_keep: u64::MAX,
        install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT_MS,
        enable_pre_vote: Some(true),
        // A follower's log can go backwards: a damaged disk (`node/damage.rs`) or a
        // wiped one (`node/rejoin.rs`), both kept out of elections until refilled. The
        // leader then restarts its search for where they agree (without lowering any
        // quorum-accepted value) instead of panicking (debug) or stalling (release).
        allow_log_reversion: Some(true),
        // A restarted leader must win an election in a new term. Restoring leadership in
        // its old term is unsafe here: a leader's appends count toward commit once a
        // quorum of followers has them durable, before its own flush, so a crash can
        // take entries from the leader's log that followers hold; leading on in the same
        // term, it would write different entries under the same log ids, which followers
        // take as matching (found by keel-sim: committed entries diverged).
        enable_leader_restore: Some(false),
        ..Config::default()
    }
    .validate()
}
