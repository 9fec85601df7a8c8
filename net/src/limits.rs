//! Bounds of a connection, each with what happens at the bound.

use std::time::Duration;

/// Frames queued for one connection's writer. Full: the caller waits; nothing is dropped.
pub const SEND_QUEUE_CAPACITY: usize = 1024;

/// Calls awaiting an answer on one connection. Full: new calls wait for a permit.
pub const INFLIGHT_MAX: usize = 4096;

/// Connecting plus handshake must finish within this, or the target counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// After a failed connect, calls fail at once with that failure for this long instead
/// of connecting again: a dead peer is called by every Raft group that replicates to
/// it, and each attempt costs a socket, a connect and a close (at 1,000 partitions,
/// a tenth of the survivors' CPU while they elected new leaders).
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);

/// Payloads at least this large are written from their own buffer (vectored write);
/// smaller ones are copied next to their frame header.
pub const VECTORED_PAYLOAD_MIN: usize = 8 * 1024;

/// Buffers handed to one vectored write (the kernel's IOV_MAX is 1024).
pub const WRITE_SLICES_MAX: usize = 64;

/// A connection's writer stops gathering queued frames into one write once this many
/// bytes are gathered, and writes them out.
pub const WRITE_GATHER_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Longest sent data may stay unacknowledged by the peer's TCP before the kernel closes
/// the connection (TCP_USER_TIMEOUT). A blackholed connection (a network partition)
/// otherwise lingers in retransmission backoff for minutes and, after the network
/// heals, resumes only at the next retransmission — seconds later; closed, it is
/// replaced by a fresh connection on the next call.
pub const TCP_UNACKED_MAX: Duration = Duration::from_secs(3);
