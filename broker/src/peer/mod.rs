//! The peer transport: how brokers carry Raft RPCs for every group to each other.
//!
//! One TCP connection per ordered node pair (A's requests to B and B's answers) carries
//! the RPCs of *all* Raft groups, each tagged with its group id and multiplexed by
//! correlation id: many groups cost one connection, not one each, and a slow snapshot
//! for one group does not hold up another group's heartbeat behind a round trip.
//!
//! - [`wire`]: the messages (postcard) inside `Request`/`Response` frames.
//! - [`pool`]: `PeerPool`, one `keel_net::Caller` per target node, each identifying
//!   itself (cluster, from, to) on every new connection.
//! - [`server`]: the peer listener: verifies who connects, dispatches each RPC to the
//!   group's Raft, answers on the same connection.
//! - [`network`]: openraft's `RaftNetworkFactory` / `RaftNetworkV2` over the `PeerPool`'s callers.
//! - [`pipeline`]: AppendEntries sent without waiting for earlier answers, handed to
//!   the follower's Raft in order.
//! - [`snapshot`]: a snapshot with the leader's retained log entries, in chunks, to a
//!   staged log on the follower; resumable; installed in place of its log.
//! - [`liveness`]: one beat per node pair (not per group) and who was heard from when.
//! - [`quiescence`]: whether a group's Raft ticks here; parked and woken by the node's
//!   quiesce driver (`crate::node::quiesce`) and by what this listener receives.
//! - [`faults`]: blocking peers, for partition tests.
//! - [`limits`]: every bound of the transport.

pub mod faults;
pub mod limits;
pub mod liveness;
pub mod network;
pub mod pipeline;
pub mod pool;
pub mod quiescence;
pub mod server;
pub mod snapshot;
pub mod wire;

pub use faults::PeerFaults;
pub use network::GroupNetworkFactory;
pub use pool::{peer_caller, PeerPool};
pub use server::{GroupRaft, GroupRegistry, HostedGroup, PeerServer};
