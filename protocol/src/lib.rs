//! Keel's wire protocol, sans-IO: bytes in, typed values or typed errors out.
//!
//! # Layout
//! - [`limits`]: every size and count bound, with what the peer sees past it.
//! - [`api`]: API keys carried by request frames.
//! - [`error`]: stable wire [`ErrorCode`]s and the [`DecodeError`] of every decoder.
//! - [`frame`]: length-delimited frames, the version handshake, request/response envelopes.
//! - [`batch`]: the record-batch format (`FORMAT.md`), built once by a producer and
//!   validated, never re-encoded, by the broker.
//! - [`message`]: bodies of the client APIs; batches travel as slices, never re-encoded.
//! - [`job`]: replay and redrive jobs — spec, filter, state, progress.
//! - [`topic_config`]: a topic's and a consumer group's settings, declared once,
//!   carried as JSON inside bodies.
//! - [`varint`]: the zigzag varints used inside batches.
//! - `codec` (feature `codec`): a tokio-util codec over [`frame`].
//!
//! **Architecture invariant:** this crate performs no I/O and, outside the optional
//! `codec` module, names no tokio type. It knows nothing of storage, Raft or the broker.

pub mod api;
pub mod batch;
#[cfg(feature = "codec")]
pub mod codec;
pub mod error;
pub mod frame;
pub mod job;
pub mod limits;
pub mod message;
pub mod topic_config;
pub mod varint;

pub use batch::{BatchBuilder, BatchHeader, BatchOptions, BatchView, BuildError, NewRecord, RecordView};
pub use error::{DecodeError, ErrorCode};
pub use frame::Frame;
pub use topic_config::{GroupConfig, GroupConfigPatch, TopicConfig, TopicConfigPatch};
