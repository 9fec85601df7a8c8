//! Keel's connection machinery, shared by the broker's peer transport and the client
//! library so neither writes it twice.
//!
//! **Charter:** this crate holds only what it takes to speak Keel frames over TCP —
//! calling ([`caller`]: connect, version handshake, an optional identification request,
//! multiplexed calls by correlation id with timeouts, reconnect on the next call after a
//! failure) and serving ([`server`]: accept, handshake, identification check, bounded
//! concurrent dispatch to a `Service`, one coalescing writer per connection). It knows
//! no API's body, no Raft, no storage. Anything else belongs in the crate that uses it.
//!
//! **Architecture invariant:** `net` depends only on `protocol`; `broker` and `client`
//! depend on `net`, never the other way.

pub mod caller;
mod frame_writer;
pub mod limits;
pub mod server;
mod socket;

pub use caller::{CallError, Caller, Identification};
pub use server::{listen, Listener, Reply, ServeOptions, Service};
