//! The Keel broker.
//!
//! # Layout
//! - [`config`]: typed configuration (cluster-wide vs per-node), TOML + `KEEL_*`
//!   overrides, validation; `keel.example.toml` documents every field.
//! - [`metadata`]: topics and placement as a deterministic fold of the metadata log.
//! - [`peer`]: the broker-to-broker transport carrying every group's Raft RPCs.
//! - [`replication`]: openraft over the storage crate — the partition log *is* the Raft
//!   log ([`replication::PartitionLogStore`]), and a light partition state machine
//!   ([`replication::PartitionStateMachine`]) publishes the high watermark.
//!
//! The server, networking, metadata group and the `keel` binary arrive with the
//! cluster issue; this crate holds only what is built and tested today.
//!
//! **Architecture invariant:** the broker depends on `keel-storage` and
//! `keel-protocol`; neither depends on the broker. Storage errors reach openraft as
//! `io::Error` and are fatal to the Raft group, never retried.

pub mod config;
pub mod inspect;
pub mod metadata;
pub mod metrics;
pub mod node;
pub mod partition;
pub mod peer;
pub mod replication;
pub mod sabotage;
