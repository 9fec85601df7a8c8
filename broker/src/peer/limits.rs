//! Bounds of the peer listener (the calling side's bounds are in `keel_net::limits`).

/// RPCs one server connection processes at once. Full: the connection's reader stops
/// reading until one finishes (TCP backpressure to the sender).
pub const PEER_SERVER_CONCURRENCY_MAX: usize = 256;

/// Answers queued for one server connection's writer. Full: handlers wait.
pub const PEER_SERVER_SEND_QUEUE_CAPACITY: usize = 1024;

/// Peer connections served at once (a cluster needs one per peer, plus reconnects).
/// Full: accepting pauses until one closes.
pub const PEER_CONNECTIONS_MAX: usize = 256;

/// Entry bytes per snapshot-transfer chunk (at least one entry): far below the frame
/// limit, and small enough that a dropped connection costs little to resend.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;

/// How long one snapshot-transfer step (offer, chunk, install) may take before the
/// transfer is abandoned (openraft retries it; the staged entries are kept).
pub const SNAPSHOT_STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// AppendEntries requests of one replication stream (one group, one follower) in
/// flight at once (`super::pipeline`). A follower holds at most twice this many early
/// arrivals of one stream.
pub const APPEND_PIPELINE_DEPTH: usize = 16;

/// How long one pipelined AppendEntries may take: longer than a heartbeat period,
/// since a request waits for the fsyncs of those before it on a slow disk. Leader
/// liveness does not depend on it (heartbeats have their own timeout); on expiry the
/// stream ends and openraft starts a new one from what was acknowledged.
pub const PIPELINED_APPEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Replaced append-stream ids a follower remembers per (group, leader), to refuse late
/// requests of a replaced stream.
pub const RETIRED_STREAMS_KEPT: usize = 8;

/// How often a node beats each peer (`super::liveness`).
pub const PEER_BEAT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a beat may take before it counts as unanswered.
pub const PEER_BEAT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Beats to one peer outstanding at once: a slow answer does not hold back the next
/// beat (the timeout over the interval).
pub const PEER_BEATS_IN_FLIGHT_MAX: usize = (PEER_BEAT_TIMEOUT.as_millis() / PEER_BEAT_INTERVAL.as_millis()) as usize;

/// Beat ticks of this node further apart than this mean it was not running (paused,
/// or starved of CPU): no peer is judged dead on the silence it saw meanwhile
/// (`super::liveness`).
pub const LOCAL_STALL_AFTER: std::time::Duration = std::time::Duration::from_millis(300);

/// A peer not heard from for this long is dead to this node: the quiesced groups it led
/// are woken to elect (`crate::node::quiesce`). Eight beats, above the scheduler and
/// fsync stalls of a shared 2-core machine (the same margin as the election timeout).
pub const PEER_DEAD_AFTER: std::time::Duration = std::time::Duration::from_millis(800);

/// Groups in one quiesce or wake request (a node asks each peer once per round for
/// every group ready to quiesce, up to this many).
pub const QUIESCE_GROUPS_PER_REQUEST_MAX: usize = 4096;

/// How long a quiesce or wake request may take; an unanswered one leaves the groups awake.
pub const QUIESCE_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
