//! Bounds of the peer transport, each with what happens at the bound.

use std::time::Duration;

/// Frames queued for one peer connection's writer. Full: the caller waits (openraft's
/// replication for that peer slows down); nothing is dropped.
pub const PEER_SEND_QUEUE_CAPACITY: usize = 1024;

/// Calls awaiting an answer on one connection. Full: new calls wait for a permit.
pub const PEER_INFLIGHT_MAX: usize = 4096;

/// RPCs one server connection processes at once. Full: the connection's reader stops
/// reading until one finishes (TCP backpressure to the sender).
pub const PEER_SERVER_CONCURRENCY_MAX: usize = 256;

/// Connecting plus handshake must finish within this, or the peer counts as unreachable.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Timeout of a call when openraft gives none.
pub const PEER_CALL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
