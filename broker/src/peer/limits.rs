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
