//! The metadata fold: committed commands, in log order, into the cluster's state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::command::MetadataCommand;
use super::METADATA_GROUP;

/// One partition of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    pub partition: u32,
    /// The partition's Raft group id (never reused, never `METADATA_GROUP`).
    pub group: u64,
    /// Replica node ids, preferred leader first.
    pub replicas: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub name: String,
    pub partitions: Vec<PartitionMeta>,
    pub max_message_bytes: u32,
    pub retention_ms: u64,
    /// Offset in the metadata log of the command that created it.
    pub created_at_offset: u64,
}

/// Why a committed command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("topic {0:?} does not exist")]
    NoSuchTopic(String),
    #[error("invalid topic: {0}")]
    Invalid(String),
}

/// The cluster's metadata as of `applied_offset`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataState {
    pub topics: BTreeMap<String, TopicMeta>,
    /// The next partition group id to hand out.
    pub next_group: u64,
    /// Offset one past the last metadata record folded in.
    pub applied_offset: u64,
    /// Partitions ever created (drives placement rotation).
    pub partitions_created: u64,
}

/// Longest topic name, in bytes.
pub const TOPIC_NAME_LEN_MAX: usize = 249;

/// Whether `name` is a valid topic name: 1..=249 bytes of `[A-Za-z0-9._-]`.
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= TOPIC_NAME_LEN_MAX && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl MetadataState {
    /// Folds in the command at metadata-log `offset`. Deterministic: every node that
    /// applies the same commands in the same order reaches the same state.
    pub fn apply(&mut self, offset: u64, command: &MetadataCommand) -> Result<(), Rejection> {
        assert!(offset >= self.applied_offset, "metadata commands apply in log order ({offset} after {})", self.applied_offset);
        self.applied_offset = offset + 1;
        match command {
            MetadataCommand::CreateTopic { name, replicas, max_message_bytes, retention_ms } => {
                if !valid_topic_name(name) {
                    return Err(Rejection::Invalid(format!("{name:?} is not 1..={TOPIC_NAME_LEN_MAX} characters of [A-Za-z0-9._-]")));
                }
                if replicas.is_empty() || replicas.iter().any(Vec::is_empty) {
                    return Err(Rejection::Invalid("every partition needs at least one replica".into()));
                }
                if self.topics.contains_key(name) {
                    return Err(Rejection::TopicExists(name.clone()));
                }
                let first_group = self.next_group.max(METADATA_GROUP + 1);
                let partitions = replicas
                    .iter()
                    .enumerate()
                    .map(|(p, r)| PartitionMeta { partition: p as u32, group: first_group + p as u64, replicas: r.clone() })
                    .collect::<Vec<_>>();
                self.next_group = first_group + partitions.len() as u64;
                self.partitions_created += partitions.len() as u64;
                let topic =
                    TopicMeta { name: name.clone(), partitions, max_message_bytes: *max_message_bytes, retention_ms: *retention_ms, created_at_offset: offset };
                self.topics.insert(name.clone(), topic);
                Ok(())
            }
            MetadataCommand::DeleteTopic { name } => self.topics.remove(name).map(|_| ()).ok_or_else(|| Rejection::NoSuchTopic(name.clone())),
        }
    }

    /// The partition groups node `node` replicates, with their topic and partition.
    pub fn groups_of(&self, node: u64) -> Vec<(String, PartitionMeta)> {
        self.topics.values().flat_map(|t| t.partitions.iter().filter(|p| p.replicas.contains(&node)).map(|p| (t.name.clone(), p.clone()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::placement::place;

    fn create(name: &str, partitions: u32) -> MetadataCommand {
        MetadataCommand::CreateTopic { name: name.into(), replicas: place(&[1, 2, 3], partitions, 3, 0), max_message_bytes: 1 << 20, retention_ms: 0 }
    }

    #[test]
    fn the_same_commands_in_the_same_order_give_the_same_state_on_every_node() {
        let log =
            [create("orders", 3), create("orders", 5), create("payments", 2), MetadataCommand::DeleteTopic { name: "orders".into() }, create("orders", 1)];
        let fold = || {
            let mut s = MetadataState::default();
            let outcomes: Vec<bool> = log.iter().enumerate().map(|(i, c)| s.apply(i as u64, c).is_ok()).collect();
            (s, outcomes)
        };
        let (a, outcomes) = fold();
        let (b, _) = fold();
        assert_eq!(a, b);
        assert_eq!(outcomes, vec![true, false, true, true, true], "the duplicate create is rejected by the fold");
        assert_eq!(a.topics["orders"].partitions.len(), 1, "the re-created topic, not the rejected one");
    }

    #[test]
    fn partition_groups_are_never_reused_even_after_a_delete() {
        let mut s = MetadataState::default();
        s.apply(0, &create("a", 3)).unwrap();
        let first: Vec<u64> = s.topics["a"].partitions.iter().map(|p| p.group).collect();
        s.apply(1, &MetadataCommand::DeleteTopic { name: "a".into() }).unwrap();
        s.apply(2, &create("a", 3)).unwrap();
        let second: Vec<u64> = s.topics["a"].partitions.iter().map(|p| p.group).collect();
        assert_eq!(first, vec![1, 2, 3]);
        assert_eq!(second, vec![4, 5, 6]);
        assert!(!first.contains(&METADATA_GROUP));
    }

    #[test]
    fn invalid_topic_names_are_rejected() {
        let mut s = MetadataState::default();
        for bad in ["", "has space", "slash/", &"x".repeat(250)] {
            let cmd = MetadataCommand::CreateTopic { name: bad.to_string(), replicas: vec![vec![1]], max_message_bytes: 1, retention_ms: 0 };
            assert!(matches!(s.apply(s.applied_offset, &cmd), Err(Rejection::Invalid(_))), "{bad:?}");
        }
        assert!(s.topics.is_empty());
    }

    #[test]
    fn commands_round_trip_through_a_record_batch() {
        let cmd = create("orders", 3);
        let mut bytes = cmd.to_batch(7).to_vec();
        keel_protocol::batch::stamp_base_offset(&mut bytes, 41).unwrap();
        let view = keel_protocol::BatchView::validate(bytes::Bytes::from(bytes)).unwrap();
        assert_eq!(MetadataCommand::from_batch(&view).unwrap(), vec![(41, cmd)]);
    }

    #[test]
    fn groups_of_lists_the_partitions_a_node_replicates() {
        let mut s = MetadataState::default();
        let cmd = MetadataCommand::CreateTopic { name: "t".into(), replicas: vec![vec![1, 2], vec![2, 3], vec![3, 1]], max_message_bytes: 1, retention_ms: 0 };
        s.apply(0, &cmd).unwrap();
        let of_1: Vec<u32> = s.groups_of(1).iter().map(|(_, p)| p.partition).collect();
        assert_eq!(of_1, vec![0, 2]);
    }
}
