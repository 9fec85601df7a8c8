//! API keys: what a `Request` frame asks for. A key is never reused; a retired key
//! stays reserved. Client APIs are below 1000; broker-to-broker APIs start at 1000 and
//! are only accepted on the peer listener.

/// Client API keys (client listener). Bodies are in `message`.
pub mod client {
    /// Append one record batch to a partition; answered when it is committed.
    pub const PRODUCE: u16 = 1;
    /// Read committed batches of a partition from an offset (long poll).
    pub const FETCH: u16 = 2;
    /// Brokers, topics, partitions and their leaders.
    pub const METADATA: u16 = 3;
    /// Create a topic.
    pub const CREATE_TOPIC: u16 = 4;
    /// Delete a topic.
    pub const DELETE_TOPIC: u16 = 5;
    /// Nodes, Raft roles, leaders, lag.
    pub const CLUSTER_STATUS: u16 = 6;
    /// The first offset at or after a timestamp.
    pub const LIST_OFFSETS: u16 = 7;
    /// A producer id (and epoch) for idempotent producing. Version 2.
    pub const INIT_PRODUCER: u16 = 8;
    /// Change some of a topic's settings. Version 2.
    pub const ALTER_TOPIC: u16 = 9;
    /// Commit a stream group's offset in a partition. Version 3.
    pub const COMMIT_OFFSET: u16 = 10;
    /// A stream group's committed offset in a partition. Version 3.
    pub const FETCH_OFFSET: u16 = 11;
    /// Lease messages of a partition to a queue-group member (long poll). Version 3.
    pub const QUEUE_FETCH: u16 = 12;
    /// Ack, nack, term or extend leased messages. Version 3.
    pub const QUEUE_SETTLE: u16 = 13;
    /// Read or change a consumer group's settings. Version 3.
    pub const CONFIGURE_GROUP: u16 = 14;
    /// Consumer groups' state in one partition (offsets, leases, counts). Version 3.
    pub const GROUP_STATE: u16 = 15;
    /// Join a stream group (its coordinator assigns partitions). Version 3.
    pub const JOIN_GROUP: u16 = 16;
    /// A stream-group member is alive; says whether the group rebalanced. Version 3.
    pub const HEARTBEAT: u16 = 17;
    /// Leave a stream group. Version 3.
    pub const LEAVE_GROUP: u16 = 18;
    /// A stream group's members and their partitions. Version 3.
    pub const DESCRIBE_MEMBERS: u16 = 19;
    /// Create a replay or redrive job (or resolve one without creating it). Version 4.
    pub const CREATE_JOB: u16 = 20;
    /// Jobs and their progress. Version 4.
    pub const LIST_JOBS: u16 = 21;
    /// Pause, resume or cancel a job. Version 4.
    pub const CONTROL_JOB: u16 = 22;

    /// The protocol version that introduced each key: a connection that negotiated an
    /// older version is answered `UnsupportedVersion` for it.
    pub fn since_version(key: u16) -> u16 {
        match key {
            INIT_PRODUCER | ALTER_TOPIC => crate::message::VERSION_2,
            COMMIT_OFFSET | FETCH_OFFSET | QUEUE_FETCH | QUEUE_SETTLE | CONFIGURE_GROUP | GROUP_STATE | JOIN_GROUP | HEARTBEAT | LEAVE_GROUP
            | DESCRIBE_MEMBERS => crate::message::VERSION_3,
            CREATE_JOB | LIST_JOBS | CONTROL_JOB => crate::message::VERSION_4,
            _ => 1,
        }
    }
}

/// Broker-to-broker API keys (peer listener only).
pub mod peer {
    /// First request on a peer connection: who is calling whom, in which cluster.
    /// The receiver refuses a connection meant for another node or cluster.
    pub const IDENTIFY: u16 = 1000;
    /// A Raft RPC for one group: AppendEntries, Vote, PreVote or a full snapshot.
    pub const RAFT: u16 = 1001;
    /// What the receiver knows of one group (vote, log end, leadership), asked by a
    /// node that found that group's local state empty; see `broker/src/node/rejoin.rs`.
    pub const GROUP_PROBE: u16 = 1002;
    /// One pipelined AppendEntries request: a postcard header, then the entries' bytes
    /// (`broker/src/peer/wire.rs`, `AppendHead`).
    pub const APPEND: u16 = 1003;
    /// A node-pair liveness beat: the caller's epoch, answered with the callee's
    /// (`broker/src/peer/liveness.rs`).
    pub const LIVENESS: u16 = 1004;
    /// A leader asks a follower to stop ticking for these groups (`broker/src/node/quiesce.rs`).
    pub const QUIESCE: u16 = 1005;
    /// Wake these groups (the caller's replica of them stopped).
    pub const WAKE: u16 = 1006;
}

/// Whether `key` belongs to the broker-to-broker range.
pub fn is_peer_api(key: u16) -> bool {
    key >= 1000
}
