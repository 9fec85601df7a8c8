//! The Keel Rust client.
//!
//! # Layout
//! - [`cluster`]: finding brokers and partition leaders; retries, redirects, breakers.
//! - [`producer`]: batching, bounded in-flight window, ordered per partition.
//! - [`consumer`]: stream consumption from an offset or a time, long-poll.
//! - [`group`]: a stream-group member: assigned partitions, heartbeats, rebalances, commits.
//! - [`queue`]: a queue-group member: leased deliveries, ack / nack / term / extend, credit.
//! - [`admin`]: topics, consumer groups' settings and offsets, replay and redrive jobs
//!   (their types are [`job`], the protocol's).
//! - [`retry`]: backoff with full jitter, retry budget, circuit breaker.
//! - [`config`]: every client setting and default.
//! - [`error`]: what can fail, and what to do about it.
//!
//! **Architecture invariant:** the client depends on `protocol` and `net` only; it
//! never imports the broker or storage.

pub mod admin;
pub mod cluster;
pub mod config;
pub mod consumer;
pub mod error;
pub mod group;
pub mod producer;
pub mod queue;
pub mod retry;

pub use admin::{Admin, JobCreated};
pub use cluster::Cluster;
pub use config::ClientConfig;
pub use error::{ClientError, Outcome};
/// Replay and redrive jobs: requests, specs, progress (see [`Admin::create_job`]).
pub use keel_protocol::job;
