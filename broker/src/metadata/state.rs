//! The metadata fold: committed commands, in log order, into the cluster's state.

use std::collections::{BTreeMap, VecDeque};

use keel_protocol::job::JobKind;
use keel_protocol::message::ProducerIdentity;
use keel_protocol::{GroupConfig, TopicConfig};
use serde::{Deserialize, Serialize};

use super::command::MetadataCommand;
use super::jobs::JobTable;
use super::METADATA_GROUP;

/// Most named producers the cluster registers (names are never forgotten, so this
/// bounds the metadata state). Beyond it, registering a new name is refused.
pub const NAMED_PRODUCERS_MAX: usize = 100_000;
/// Most consumer groups with settings of their own (each a few hundred bytes on every
/// node); groups on the defaults are not counted.
pub const CONFIGURED_GROUPS_MAX: usize = 100_000;
/// Rejected commands remembered (offset and reason), so the node that proposed one can
/// tell its client why; the oldest is forgotten first.
pub const RECENT_REJECTIONS_MAX: usize = 256;
/// Most producer ids one `AllocateProducerIds` command may hand out.
pub const PRODUCER_ID_BLOCK_MAX: u64 = 1 << 20;

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
    pub config: TopicConfig,
    /// The secret key its partitions digest message ids with.
    pub id_key: [u8; 16],
    /// Offset in the metadata log of the command that created it.
    pub created_at_offset: u64,
    /// Offset of the command that last changed its config (creation, or an alter).
    pub config_changed_at: u64,
}

/// A named producer's current identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedProducer {
    pub identity: ProducerIdentity,
    /// Offset of the command that registered this identity.
    pub registered_at: u64,
}

/// The last block of producer ids handed to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerIdBlock {
    pub first: i64,
    pub count: u64,
    /// Offset of the command that allocated it.
    pub allocated_at: u64,
}

/// Why a committed command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("topic {0:?} does not exist")]
    NoSuchTopic(String),
    #[error("invalid topic: {0}")]
    Invalid(String),
    #[error("producer {0:?} was registered again by a newer instance")]
    ProducerFenced(String),
    #[error("{0}")]
    LimitReached(String),
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
    /// The next producer id to hand out (ids are never reused).
    pub next_producer_id: i64,
    /// Per node, the last block of producer ids it was given.
    pub producer_blocks: BTreeMap<u64, ProducerIdBlock>,
    pub named_producers: BTreeMap<String, NamedProducer>,
    /// Producer id → name, for the named ones (the partition leader's fence check).
    pub producer_names: BTreeMap<i64, String>,
    /// The last `RECENT_REJECTIONS_MAX` commands the fold refused: (offset, why).
    pub recent_rejections: VecDeque<(u64, Rejection)>,
    /// Consumer groups with settings of their own (the others use the defaults).
    pub group_configs: BTreeMap<String, GroupConfig>,
    /// Replay and redrive jobs.
    pub jobs: JobTable,
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
        let result = self.apply_command(offset, command);
        if let Err(rejection) = &result {
            if self.recent_rejections.len() == RECENT_REJECTIONS_MAX {
                self.recent_rejections.pop_front();
            }
            self.recent_rejections.push_back((offset, rejection.clone()));
        }
        result
    }

    /// Consumer group `group`'s settings: its own, or the defaults.
    pub fn group_config(&self, group: &str) -> GroupConfig {
        self.group_configs.get(group).cloned().unwrap_or_default()
    }

    /// Why the command at `offset` was refused, if it was (and is still remembered).
    pub fn rejection_at(&self, offset: u64) -> Option<&Rejection> {
        self.recent_rejections.iter().find(|(o, _)| *o == offset).map(|(_, r)| r)
    }

    fn apply_command(&mut self, offset: u64, command: &MetadataCommand) -> Result<(), Rejection> {
        match command {
            MetadataCommand::CreateTopic { name, replicas, max_message_bytes, retention_ms } => {
                // Written before topics had a config or an id key: the key is derived
                // from the name (identical everywhere, but not secret).
                let config = TopicConfig { max_message_bytes: *max_message_bytes, retention_ms: *retention_ms, ..TopicConfig::default() };
                let id_key = legacy_id_key(name);
                self.create_topic(offset, name, replicas, config, id_key)
            }
            MetadataCommand::CreateTopicWithConfig { name, replicas, config, id_key } => {
                config.validate().map_err(|e| Rejection::Invalid(e.to_string()))?;
                self.create_topic(offset, name, replicas, config.clone(), *id_key)
            }
            MetadataCommand::DeleteTopic { name } => self.topics.remove(name).map(|_| ()).ok_or_else(|| Rejection::NoSuchTopic(name.clone())),
            MetadataCommand::AlterTopicConfig { name, patch } => {
                let topic = self.topics.get_mut(name).ok_or_else(|| Rejection::NoSuchTopic(name.clone()))?;
                let config = topic.config.patched(patch);
                config.validate().map_err(|e| Rejection::Invalid(e.to_string()))?;
                topic.config = config;
                topic.config_changed_at = offset;
                Ok(())
            }
            MetadataCommand::ConfigureGroup { group, patch } => {
                let config = self.group_config(group).patched(patch);
                config.validate().map_err(|e| Rejection::Invalid(e.to_string()))?;
                if !self.group_configs.contains_key(group) && self.group_configs.len() >= CONFIGURED_GROUPS_MAX {
                    return Err(Rejection::LimitReached(format!("the cluster already has {CONFIGURED_GROUPS_MAX} consumer groups with settings of their own")));
                }
                self.group_configs.insert(group.clone(), config);
                Ok(())
            }
            MetadataCommand::CreateJob { spec, at_ms } => {
                for topic in [&spec.source, &spec.target] {
                    if !self.topics.contains_key(topic) {
                        return Err(Rejection::NoSuchTopic(topic.clone()));
                    }
                }
                let partitions = self.topics[&spec.source].partitions.len() as u32;
                if let Some(r) = spec.ranges.iter().find(|r| r.partition >= partitions) {
                    return Err(Rejection::Invalid(format!("topic {} has partitions 0..{partitions}, not {}", spec.source, r.partition)));
                }
                if self.topics[&spec.target].partitions.len() as u32 <= spec.ranges.iter().map(|r| r.partition).max().unwrap_or(0)
                    && spec.kind == JobKind::Replay
                {
                    return Err(Rejection::Invalid(format!(
                        "a replay writes each partition to the same partition of its target, and {} has fewer partitions than {}",
                        spec.target, spec.source
                    )));
                }
                self.jobs.create(spec, *at_ms, offset).map(|_| ())
            }
            MetadataCommand::JobProgress { id, progress, moved, at_ms } => self.jobs.progress(*id, progress, moved, *at_ms),
            MetadataCommand::JobControl { id, action, at_ms } => self.jobs.control(*id, action, *at_ms),
            MetadataCommand::AllocateProducerIds { node, count } => {
                if *count == 0 || *count > PRODUCER_ID_BLOCK_MAX {
                    return Err(Rejection::Invalid(format!("a producer id block holds 1..={PRODUCER_ID_BLOCK_MAX} ids, not {count}")));
                }
                let first = self.next_producer_id;
                self.next_producer_id = first.checked_add(*count as i64).ok_or_else(|| Rejection::LimitReached("producer ids are exhausted".into()))?;
                self.producer_blocks.insert(*node, ProducerIdBlock { first, count: *count, allocated_at: offset });
                Ok(())
            }
            MetadataCommand::InitNamedProducer { name, current } => {
                let next = match (self.named_producers.get(name), current) {
                    (Some(p), Some(c)) if p.identity != *c => return Err(Rejection::ProducerFenced(name.clone())),
                    (Some(p), _) if p.identity.epoch < i16::MAX => ProducerIdentity { producer_id: p.identity.producer_id, epoch: p.identity.epoch + 1 },
                    // A new name, or one whose epochs are used up: a fresh id.
                    (existing, _) => {
                        if existing.is_none() && self.named_producers.len() >= NAMED_PRODUCERS_MAX {
                            return Err(Rejection::LimitReached(format!("the cluster already has {NAMED_PRODUCERS_MAX} named producers")));
                        }
                        let id = self.next_producer_id;
                        self.next_producer_id += 1;
                        ProducerIdentity { producer_id: id, epoch: 0 }
                    }
                };
                if let Some(old) = self.named_producers.get(name) {
                    self.producer_names.remove(&old.identity.producer_id);
                }
                self.producer_names.insert(next.producer_id, name.clone());
                self.named_producers.insert(name.clone(), NamedProducer { identity: next, registered_at: offset });
                Ok(())
            }
        }
    }

    fn create_topic(&mut self, offset: u64, name: &str, replicas: &[Vec<u64>], config: TopicConfig, id_key: [u8; 16]) -> Result<(), Rejection> {
        if !valid_topic_name(name) {
            return Err(Rejection::Invalid(format!("{name:?} is not 1..={TOPIC_NAME_LEN_MAX} characters of [A-Za-z0-9._-]")));
        }
        if replicas.is_empty() || replicas.iter().any(Vec::is_empty) {
            return Err(Rejection::Invalid("every partition needs at least one replica".into()));
        }
        if self.topics.contains_key(name) {
            return Err(Rejection::TopicExists(name.to_string()));
        }
        let first_group = self.next_group.max(METADATA_GROUP + 1);
        let partitions = replicas
            .iter()
            .enumerate()
            .map(|(p, r)| PartitionMeta { partition: p as u32, group: first_group + p as u64, replicas: r.clone() })
            .collect::<Vec<_>>();
        self.next_group = first_group + partitions.len() as u64;
        self.partitions_created += partitions.len() as u64;
        let topic = TopicMeta { name: name.to_string(), partitions, config, id_key, created_at_offset: offset, config_changed_at: offset };
        self.topics.insert(name.to_string(), topic);
        Ok(())
    }

    /// The epoch a named producer currently holds, if `producer_id` is a named one.
    pub fn named_producer_epoch(&self, producer_id: i64) -> Option<i16> {
        let name = self.producer_names.get(&producer_id)?;
        self.named_producers.get(name).map(|p| p.identity.epoch)
    }

    /// The partition groups node `node` replicates, with their topic and partition.
    pub fn groups_of(&self, node: u64) -> Vec<(String, PartitionMeta)> {
        self.topics.values().flat_map(|t| t.partitions.iter().filter(|p| p.replicas.contains(&node)).map(|p| (t.name.clone(), p.clone()))).collect()
    }
}

/// The message-id key of a topic created before topics had one: derived from its name.
fn legacy_id_key(name: &str) -> [u8; 16] {
    use siphasher::sip128::{Hasher128, SipHasher13};
    use std::hash::Hasher;
    let mut h = SipHasher13::new_with_key(&[0; 16]);
    h.write(name.as_bytes());
    h.finish128().as_u128().to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::placement::place;
    use keel_protocol::TopicConfigPatch;

    fn create(name: &str, partitions: u32) -> MetadataCommand {
        MetadataCommand::CreateTopicWithConfig {
            name: name.into(),
            replicas: place(&[1, 2, 3], partitions, 3, 0),
            config: TopicConfig::default(),
            id_key: [9; 16],
        }
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
            let cmd =
                MetadataCommand::CreateTopicWithConfig { name: bad.to_string(), replicas: vec![vec![1]], config: TopicConfig::default(), id_key: [0; 16] };
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

    /// The first two variants' bodies, as earlier builds wrote them, must keep decoding.
    #[test]
    fn a_create_command_written_before_topic_configs_still_loads() {
        let old = MetadataCommand::CreateTopic { name: "legacy".into(), replicas: vec![vec![1]], max_message_bytes: 4096, retention_ms: 60_000 };
        let bytes = postcard::to_allocvec(&old).unwrap();
        assert_eq!(bytes[0], 0, "CreateTopic is variant 0");
        let back: MetadataCommand = postcard::from_bytes(&bytes).unwrap();
        let mut s = MetadataState::default();
        s.apply(0, &back).unwrap();
        let t = &s.topics["legacy"];
        assert_eq!((t.config.max_message_bytes, t.config.retention_ms), (4096, 60_000));
        assert_eq!(t.config.dedupe_window_ms, TopicConfig::default().dedupe_window_ms, "settings it could not say take their defaults");
    }

    #[test]
    fn an_alter_changes_only_what_it_sets_and_an_invalid_result_is_refused() {
        let mut s = MetadataState::default();
        s.apply(0, &create("t", 1)).unwrap();
        let patch = TopicConfigPatch { dedupe_window_ms: Some(600_000), ..TopicConfigPatch::default() };
        s.apply(1, &MetadataCommand::AlterTopicConfig { name: "t".into(), patch }).unwrap();
        assert_eq!(s.topics["t"].config.dedupe_window_ms, 600_000);
        assert_eq!(s.topics["t"].config_changed_at, 1);
        let bad = TopicConfigPatch { dedupe_window_ms: Some(1), ..TopicConfigPatch::default() };
        assert!(matches!(s.apply(2, &MetadataCommand::AlterTopicConfig { name: "t".into(), patch: bad }), Err(Rejection::Invalid(_))));
        assert_eq!(s.topics["t"].config.dedupe_window_ms, 600_000, "unchanged");
    }

    #[test]
    fn job_commands_fold_into_the_job_table_and_round_trip_through_a_batch() {
        use keel_protocol::job::{JobAction, JobFilter, JobKind, JobSpec, JobState, OffsetRanges, PartitionProgress, PartitionRange};
        let mut s = MetadataState::default();
        s.apply(0, &create("orders", 2)).unwrap();
        let spec = |target: &str, partition: u32| JobSpec {
            kind: JobKind::Replay,
            source: "orders".into(),
            target: target.into(),
            ranges: vec![PartitionRange { partition, from: 0, until: 10 }],
            filter: JobFilter::default(),
            redrive: Default::default(),
            quarantine: None,
            exclude: OffsetRanges::default(),
            rate: 0,
            chunk_records: 10,
            chunk_bytes: 1 << 16,
            requested_by: "ops".into(),
            request_id: String::new(),
        };
        assert!(matches!(s.apply(1, &MetadataCommand::CreateJob { spec: spec("recon", 0), at_ms: 5 }), Err(Rejection::NoSuchTopic(_))));
        s.apply(2, &create("recon", 1)).unwrap();
        assert!(matches!(s.apply(3, &MetadataCommand::CreateJob { spec: spec("recon", 7), at_ms: 5 }), Err(Rejection::Invalid(_))), "no partition 7");
        let refused = s.apply(4, &MetadataCommand::CreateJob { spec: spec("recon", 1), at_ms: 5 });
        assert!(matches!(refused, Err(Rejection::Invalid(ref e)) if e.contains("fewer partitions")), "{refused:?}");
        s.apply(5, &MetadataCommand::DeleteTopic { name: "recon".into() }).unwrap();
        s.apply(6, &create("recon", 2)).unwrap();
        let cmd = MetadataCommand::CreateJob { spec: spec("recon", 1), at_ms: 5 };
        let mut bytes = cmd.to_batch(5).to_vec();
        keel_protocol::batch::stamp_base_offset(&mut bytes, 7).unwrap();
        let view = keel_protocol::BatchView::validate(bytes::Bytes::from(bytes)).unwrap();
        let (offset, back) = MetadataCommand::from_batch(&view).unwrap().remove(0);
        s.apply(offset, &back).unwrap();
        let id = *s.jobs.jobs.keys().next().unwrap();
        assert_eq!(s.jobs.jobs[&id].created_at_offset, 7);
        let progress = PartitionProgress { partition: 1, next: 10, until: 10, copied: 10, skipped: 0, quarantined: 0, targets: vec![] };
        let cmd = MetadataCommand::JobProgress { id, progress, moved: OffsetRanges::default(), at_ms: 6 };
        let mut bytes = cmd.to_batch(6).to_vec();
        keel_protocol::batch::stamp_base_offset(&mut bytes, 8).unwrap();
        let view = keel_protocol::BatchView::validate(bytes::Bytes::from(bytes)).unwrap();
        let (offset, back) = MetadataCommand::from_batch(&view).unwrap().remove(0);
        s.apply(offset, &back).unwrap();
        assert_eq!(s.jobs.jobs[&id].state, JobState::Done);
        assert!(s.apply(9, &MetadataCommand::JobControl { id, action: JobAction::Resume, at_ms: 7 }).is_err());
    }

    #[test]
    fn producer_id_blocks_never_overlap() {
        let mut s = MetadataState::default();
        s.apply(0, &MetadataCommand::AllocateProducerIds { node: 1, count: 100 }).unwrap();
        s.apply(1, &MetadataCommand::AllocateProducerIds { node: 2, count: 100 }).unwrap();
        s.apply(2, &MetadataCommand::AllocateProducerIds { node: 1, count: 100 }).unwrap();
        assert_eq!(s.producer_blocks[&1], ProducerIdBlock { first: 200, count: 100, allocated_at: 2 });
        assert_eq!(s.producer_blocks[&2].first, 100);
    }

    #[test]
    fn re_registering_a_name_bumps_its_epoch_and_a_stale_instance_is_refused() {
        let mut s = MetadataState::default();
        let init = |current| MetadataCommand::InitNamedProducer { name: "billing".into(), current };
        s.apply(0, &init(None)).unwrap();
        let first = s.named_producers["billing"].identity;
        s.apply(1, &init(None)).unwrap();
        let second = s.named_producers["billing"].identity;
        assert_eq!((second.producer_id, second.epoch), (first.producer_id, first.epoch + 1));
        assert_eq!(s.named_producer_epoch(first.producer_id), Some(second.epoch));
        assert!(matches!(s.apply(2, &init(Some(first))), Err(Rejection::ProducerFenced(_))), "the first instance may not take the name back");
        s.apply(3, &init(Some(second))).unwrap();
        assert_eq!(s.named_producers["billing"].identity.epoch, second.epoch + 1);
    }
}
