//! Cluster metadata: topics, partitions, replica placement.
//!
//! The metadata Raft group (group [`METADATA_GROUP`], every member a voter) is an
//! ordinary partition log whose records are postcard-encoded [`MetadataCommand`]s: the
//! same log store, network and state machine as any partition. Every node folds the
//! committed records, in log order, into a [`MetadataState`]; the fold is deterministic,
//! so every node derives the same topics, and state is rebuilt from the log on restart.
//! A command that cannot apply (a duplicate topic) is rejected by the fold itself, so
//! two racing proposals resolve the same way everywhere: the first in the log wins.
//!
//! - [`command`]: the commands and their encoding as record batches.
//! - [`state`]: the fold.
//! - [`placement`]: which nodes replicate which partition, leaders spread evenly.
//! - [`jobs`]: the replay and redrive job table (state, checkpoints, audit trail).

pub mod command;
pub mod jobs;
pub mod placement;
pub mod state;

/// The Raft group id of the metadata log. Partition groups get ids from 1 up.
pub const METADATA_GROUP: u64 = 0;

pub use command::MetadataCommand;
pub use state::{MetadataState, PartitionMeta, TopicMeta};
