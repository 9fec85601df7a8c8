//! Bounds of a connection, each with what happens at the bound.

use std::time::Duration;

/// Frames queued for one connection's writer. Full: the caller waits; nothing is dropped.
pub const SEND_QUEUE_CAPACITY: usize = 1024;

/// Calls awaiting an answer on one connection. Full: new calls wait for a permit.
pub const INFLIGHT_MAX: usize = 4096;

/// Connecting plus handshake must finish within this, or the target counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
