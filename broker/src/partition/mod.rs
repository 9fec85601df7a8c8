//! The partition state machine's logic: a pure, deterministic fold of a partition's
//! committed log (record batches and control entries) into the state that decides how
//! later entries apply and what is served.
//!
//! - [`command`]: control entries (clock ticks, settings, recorded sequences) and the
//!   settings applying depends on ([`PartitionConfig`]).
//! - [`producers`]: the idempotent-producer table and the one rule ([`producers::decide`])
//!   the leader runs before proposing and every replica runs again when applying.
//! - [`message_ids`]: the sliding window of message ids stored, bounded by a budget.
//! - [`lanes`]: which offsets belong to which priority lane (runs of batches).
//! - [`consumers`]: consumer groups — stream groups' committed offsets, queue groups'
//!   leases, attempts, retries and dead letters in progress.
//! - [`state`]: [`PartitionState`] and the fold, with its versioned snapshot encoding.
//!
//! **Architecture invariant:** this module knows nothing of openraft, tokio or I/O and
//! reads no clock; `replication/state_machine.rs` is the adapter that feeds it from the
//! Raft log, and `node/partition.rs` the leader that decides before proposing.

pub mod command;
pub mod consumers;
pub mod lanes;
pub mod message_ids;
pub mod producers;
pub mod retention;
pub mod state;

pub use command::{ControlCommand, ControlEntry, PartitionConfig};
pub use state::{BatchInfo, BatchOutcome, ControlOutcome, PartitionState};
