//! Every metric the broker exports, in one place: names, units, labels, and the
//! functions that record them. Served as Prometheus text on the admin listener's
//! `/metrics` (metrics + metrics-exporter-prometheus).
//!
//! Naming: `keel_` prefix, base units (`_seconds`, `_bytes`), `_total` for counters.
//!
//! **Label cardinality** is bounded by what the cluster holds, never by traffic:
//! `topic` (one value per topic), `group` (one per Raft group hosted on this node: the
//! metadata group and its partitions), `consumer_group` (one per consumer group that
//! consumed here), `reason`, `outcome`, `kind` and `state` (the fixed sets listed below), `job` (see below). There is no per-producer, per-client, per-offset or per-message label.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `keel_produce_messages_total` | counter | topic | records stored by produce requests this node led (duplicates not counted) |
//! | `keel_produce_bytes_total` | counter | topic | batch bytes stored by those requests |
//! | `keel_produce_requests_total` | counter | topic, outcome | produce requests answered: `stored`, `duplicate`, `refused`, `throttled`, `not_leader`, `storage_full` (the node is below `node.min_free_bytes`), `unknown` (outcome unknown: timed out or leadership lost), `failed` |
//! | `keel_produce_duplicates_total` | counter | reason | records not stored again: `sequence` (a retried batch), `message_id` (an id in the dedupe window) |
//! | `keel_produce_throttled_total` | counter | reason | produces answered `Throttled`: `pending` (the partition's append bounds), `message_ids` (the id budget), `producer_window` (a producer's 5 pending batches), `producers` (the partition's producer table is full) |
//! | `keel_produce_refusal_checks_total` | counter | outcome | ReadIndex rounds a leader ran before refusing a batch on its producer table (`OutOfOrderSequence`, `ProducerFenced`): `confirmed` (it leads with a current table and judges again), `not_leading` (replaced or cut off: answered `NotLeader` / `LeaderNotAvailable` instead of a stale refusal) |
//! | `keel_produce_ack_seconds` | histogram | — | from a produce request's arrival to its answer, for stored batches |
//! | `keel_fsync_seconds` | histogram | — | each segment `fdatasync` |
//! | `keel_raft_term` | gauge | group | the group's current term on this node |
//! | `keel_raft_leader_changes_total` | counter | group | leader changes seen by this node (sampled every `SAMPLE_INTERVAL`) |
//! | `keel_raft_is_leader` | gauge | group | 1 if this node leads the group |
//! | `keel_under_replicated_partitions` | gauge | — | partitions this node leads with a replica more than `UNDER_REPLICATED_LAG_ENTRIES` behind (or unknown) |
//! | `keel_message_ids_held` | gauge | group | message ids in the partition's dedupe window |
//! | `keel_message_id_window_bytes` | gauge | group | memory the partition's dedupe window holds (estimate) |
//! | `keel_producers_held` | gauge | group | idempotent producers the partition remembers |
//! | `keel_group_damage_detected_total` | counter | — | groups found, when opened, to have lost entries this node acknowledged (ack ledger above the log) |
//! | `keel_groups_damaged` | gauge | — | such groups still waiting to be refilled (voting only for candidates holding what they lost) |
//! | `keel_ack_ledger_sync_seconds` | histogram | — | each ack ledger `fdatasync` (one per flush round that recorded something) |
//! | `keel_queue_delivered_total` | counter | topic, consumer_group, lane | messages leased to queue-group members by partitions this node led (redeliveries included), per priority lane |
//! | `keel_queue_lane_backlog_messages` | gauge | group, consumer_group, lane | on the leader: messages of the lane the queue group has not been delivered yet (every lane the partition has held messages of) |
//! | `keel_queue_redelivered_total` | counter | topic, consumer_group | of those, deliveries after the first (attempt ≥ 2) |
//! | `keel_queue_settled_total` | counter | topic, consumer_group, outcome | settle requests recorded: `acked`, `retrying`, `dead_lettering`, `extended`; and not: `already_settled`, `stale_lease`, `not_delivered`, `already_dead_lettering` |
//! | `keel_dead_lettered_total` | counter | topic, consumer_group, reason | messages moved to the dead-letter topic: `max_deliveries` (nacked on the last allowed delivery), `term`, `lease_expired` (its lease ran out on the last allowed delivery) |
//! | `keel_consumer_lag_messages` | gauge | group, consumer_group | on the partition's leader: messages of the partition the consumer group has not settled (stream: high watermark − committed offset; queue: high watermark − oldest unsettled offset) |
//! | `keel_queue_unacked` | gauge | group, consumer_group | on the leader: messages leased to the queue group's members, not yet settled |
//! | `keel_queue_waiting_retry` | gauge | group, consumer_group | on the leader: nacked messages waiting for their retry time |
//! | `keel_queue_parked_keys` | gauge | group, consumer_group | on the leader, ordered groups: keys whose message keeps failing (waiting for a retry or being dead-lettered) while later messages of the key wait behind it |
//! | `keel_queue_scheduled_messages` | gauge | group, consumer_group | on the leader: messages waiting for their first delivery — scheduled ones (`keel-deliver-at`) the group reached whose time has not come, and (for a moment) ordered ones just released from behind their key |
//! | `keel_queue_oldest_unsettled_age_seconds` | gauge | group, consumer_group | on the leader: since the first delivery of the queue group's oldest unsettled message (0 when none) |
//! | `keel_consumer_lag_seconds` | gauge | group, consumer_group | on the leader: age of the oldest message the consumer group has not settled (stream: the one at the committed offset; queue: the oldest unsettled, delivered or not), by its batch's newest timestamp; 0 when caught up |
//! | `keel_dead_letter_depth_messages` | gauge | topic | on the leader of a dead-letter topic (`*.dlq`): messages it holds |
//! | `keel_dead_letter_oldest_age_seconds` | gauge | topic | on the leader of a dead-letter topic: age of its oldest dead letter, by its batch's timestamp; 0 when empty |
//! | `keel_queue_stalls_total` | counter | topic, consumer_group, reason | queue fetches that leased less than the member's credit because of a bound: `max_unacked` (the member holds its group's max-unacked leases here), `window` (the group holds `QUEUE_WINDOW_MAX` unsettled messages in the partition), `lease_expired` (a member's lease ran out unsettled; the message is delivered again), `key_parked` (ordered groups: a nacked message holds its key's later messages back) |
//! | `keel_job_messages_total` | counter | kind, outcome | source records replay and redrive jobs run on this node handled: `copied`, `skipped` (filtered out, or a dead letter redriven before), `quarantined` (redriven too often); copies found already written after a failover count as `copied` once |
//! | `keel_job_progress_ratio` | gauge | job | on the metadata leader: the share of a running or paused job's source range handled (1 when it ends) |
//! | `keel_disk_free_bytes` | gauge | — | free bytes on the data directory's file system (read every `DISK_CHECK_INTERVAL`) |
//! | `keel_disk_full` | gauge | — | 1 while the node refuses new data for lack of space (below `node.min_free_bytes`) |
//! | `keel_queue_expired_total` | counter | topic, consumer_group | messages retention deleted before the queue group settled them (leased, waiting for a retry or never delivered): dropped, the group goes on from the new log start |
//! | `keel_snapshot_bytes_total` | counter | direction | entry bytes of snapshot transfers (the log sent with a snapshot): `sent` by this node as leader, `received` (staged) as follower |
//! | `keel_snapshots_installed_total` | counter | with_log | snapshot transfers this node completed as follower: `true` with a staged log installed in place of its own, `false` when its log already held the snapshot's last entry |
//! | `keel_retention_purged_segments_total` | counter | — | segment files retention deleted on this node |
//! | `keel_log_start_offset` | gauge | group | the partition's first retained offset (the fold's retention cut) |
//! | `keel_replication_appends_sent_total` | counter | pipelined | AppendEntries requests this node sent as leader on replication streams: `pipelined="true"` when earlier requests of the same stream were still unanswered (`peer/pipeline.rs`) |
//! | `keel_append_streams_opened_total` | counter | — | replication streams this node opened as follower (one per leader's replication session; a jump means sessions keep restarting) |
//! | `keel_offset_stamps_total` | counter | how | batches whose base offset the log store wrote: `already` (it held it: a follower's copy of the leader's stamped batch), `in_place` (the batch's buffer had no other owner), `copied` (shared with the request frame: stamped on a copy) |
//! | `keel_groups_quiesced` | gauge | — | partition groups whose Raft is parked on this node (no ticks, no heartbeats; `node/quiesce.rs`) |
//! | `keel_groups_awake` | gauge | — | partition groups hosted here that tick |
//! | `keel_group_wakes_total` | counter | reason | quiesced groups woken here: `use` (a write or read on the leader), `entries` (a follower received entries or another term), `vote`, `prevote` (a pre-vote reached the quiesced leader), `leader_lost` (the leader's node seen dead or restarted), `peer_returned`, `asked` (a peer's replica stopped), `transfer` |
//! | `keel_quiesce_requests_total` | counter | outcome | groups this node asked a follower to quiesce: `agreed`, `refused`, `unanswered` |
//! | `keel_pre_votes_vetoed_total` | counter | — | pre-votes refused for quiesced groups (this node leads, or hears the leader's node) |
//! | `keel_peers_lost_total` | counter | — | times a peer was seen dead (no beat for `PEER_DEAD_AFTER`, or its address refused a connection) or restarted (new epoch) |
//! | `keel_campaigns_started_total` | counter | — | elections this node started as the designated campaigner of a group whose leader's node was lost |
//! | `keel_jobs` | gauge | state | on the metadata leader: jobs the cluster remembers, by state (`running`, `paused`, `done`, `cancelled`, `failed`) |
//!
//! The consumer and dead-letter gauges are set by the partition's leader; a node that
//! stops leading sets the ones it reported to 0, so a sum over nodes counts each once.
//!
//! Job ids label only `keel_job_progress_ratio`; at most `JOBS_ACTIVE_MAX` are active
//! at once and finished ones keep their last value (1) until the process restarts.
//!

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::node::partition::{Appended, PartitionError};

pub const PRODUCE_MESSAGES: &str = "keel_produce_messages_total";
pub const PRODUCE_BYTES: &str = "keel_produce_bytes_total";
pub const PRODUCE_REQUESTS: &str = "keel_produce_requests_total";
pub const PRODUCE_DUPLICATES: &str = "keel_produce_duplicates_total";
pub const PRODUCE_THROTTLED: &str = "keel_produce_throttled_total";
pub const PRODUCE_REFUSAL_CHECKS: &str = "keel_produce_refusal_checks_total";
pub const PRODUCE_ACK_SECONDS: &str = "keel_produce_ack_seconds";
pub const FSYNC_SECONDS: &str = "keel_fsync_seconds";
pub const RAFT_TERM: &str = "keel_raft_term";
pub const RAFT_LEADER_CHANGES: &str = "keel_raft_leader_changes_total";
pub const RAFT_IS_LEADER: &str = "keel_raft_is_leader";
pub const UNDER_REPLICATED_PARTITIONS: &str = "keel_under_replicated_partitions";
pub const MESSAGE_IDS_HELD: &str = "keel_message_ids_held";
pub const PRODUCERS_HELD: &str = "keel_producers_held";
pub const MESSAGE_ID_WINDOW_BYTES: &str = "keel_message_id_window_bytes";
pub const GROUP_DAMAGE_DETECTED: &str = "keel_group_damage_detected_total";
pub const GROUPS_DAMAGED: &str = "keel_groups_damaged";
pub const ACK_LEDGER_SYNC_SECONDS: &str = "keel_ack_ledger_sync_seconds";
pub const QUEUE_DELIVERED: &str = "keel_queue_delivered_total";
pub const QUEUE_LANE_BACKLOG: &str = "keel_queue_lane_backlog_messages";
pub const QUEUE_REDELIVERED: &str = "keel_queue_redelivered_total";
pub const QUEUE_SETTLED: &str = "keel_queue_settled_total";
pub const QUEUE_STALLS: &str = "keel_queue_stalls_total";
pub const DEAD_LETTERED: &str = "keel_dead_lettered_total";
pub const CONSUMER_LAG: &str = "keel_consumer_lag_messages";
pub const QUEUE_UNACKED: &str = "keel_queue_unacked";
pub const QUEUE_WAITING_RETRY: &str = "keel_queue_waiting_retry";
pub const QUEUE_SCHEDULED: &str = "keel_queue_scheduled_messages";
pub const QUEUE_PARKED_KEYS: &str = "keel_queue_parked_keys";
pub const QUEUE_OLDEST_UNSETTLED_AGE: &str = "keel_queue_oldest_unsettled_age_seconds";
pub const DEAD_LETTER_DEPTH: &str = "keel_dead_letter_depth_messages";
pub const CONSUMER_LAG_AGE: &str = "keel_consumer_lag_seconds";
pub const DEAD_LETTER_OLDEST_AGE: &str = "keel_dead_letter_oldest_age_seconds";
pub const JOB_MESSAGES: &str = "keel_job_messages_total";
pub const JOB_PROGRESS: &str = "keel_job_progress_ratio";
pub const JOBS: &str = "keel_jobs";

/// How often group gauges (term, leadership, under-replication, dedupe state) are sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// A replica further behind its leader than this many log entries counts as lagging.
pub const UNDER_REPLICATED_LAG_ENTRIES: u64 = 1000;

/// Latency buckets (seconds) for acknowledgements and fsyncs: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's metrics recorder (once; later calls return the same handle)
/// and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .expect("the latency buckets are not empty")
                .install_recorder()
                .unwrap_or_else(|e| panic!("installing the metrics recorder: {e}"));
            describe();
            keel_storage::observe::set_fsync_observer(|took| histogram!(FSYNC_SECONDS).record(took.as_secs_f64()));
            keel_storage::observe::set_ledger_sync_observer(|took| histogram!(ACK_LEDGER_SYNC_SECONDS).record(took.as_secs_f64()));
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(PRODUCE_MESSAGES, Unit::Count, "Records stored by produce requests this node led (duplicates not counted).");
    describe_counter!(PRODUCE_BYTES, Unit::Bytes, "Batch bytes stored by produce requests this node led.");
    describe_counter!(PRODUCE_REQUESTS, Unit::Count, "Produce requests answered, by outcome.");
    describe_counter!(PRODUCE_DUPLICATES, Unit::Count, "Records not stored again because they were stored before, by reason.");
    describe_counter!(PRODUCE_THROTTLED, Unit::Count, "Produce requests answered Throttled, by reason.");
    describe_counter!(
        PRODUCE_REFUSAL_CHECKS,
        Unit::Count,
        "ReadIndex rounds run before refusing a batch on the producer table, by outcome (confirmed, not_leading)."
    );
    describe_histogram!(PRODUCE_ACK_SECONDS, Unit::Seconds, "Time from a produce request's arrival to its answer, for stored batches.");
    describe_histogram!(FSYNC_SECONDS, Unit::Seconds, "Duration of each segment fdatasync.");
    describe_gauge!(RAFT_TERM, Unit::Count, "The Raft group's current term on this node.");
    describe_counter!(RAFT_LEADER_CHANGES, Unit::Count, "Leader changes of the Raft group seen by this node.");
    describe_gauge!(RAFT_IS_LEADER, Unit::Count, "1 if this node leads the Raft group.");
    describe_gauge!(UNDER_REPLICATED_PARTITIONS, Unit::Count, "Partitions led here with a lagging or unknown replica.");
    describe_gauge!(MESSAGE_IDS_HELD, Unit::Count, "Message ids in the partition's dedupe window.");
    describe_gauge!(PRODUCERS_HELD, Unit::Count, "Idempotent producers the partition remembers.");
    describe_gauge!(MESSAGE_ID_WINDOW_BYTES, Unit::Bytes, "Memory held by the partition's message-id window (estimate).");
    describe_counter!(GROUP_DAMAGE_DETECTED, Unit::Count, "Groups found at open to have lost entries this node acknowledged.");
    describe_gauge!(GROUPS_DAMAGED, Unit::Count, "Damaged groups still waiting to be refilled by their peers.");
    describe_histogram!(ACK_LEDGER_SYNC_SECONDS, Unit::Seconds, "Duration of each ack ledger fdatasync.");
    describe_counter!(QUEUE_DELIVERED, Unit::Count, "Messages leased to queue-group members (redeliveries included).");
    describe_counter!(QUEUE_REDELIVERED, Unit::Count, "Queue deliveries after the first attempt.");
    describe_counter!(QUEUE_SETTLED, Unit::Count, "Queue settle requests, by outcome.");
    describe_counter!(QUEUE_STALLS, Unit::Count, "Queue fetches held back by a bound, by reason.");
    describe_counter!(DEAD_LETTERED, Unit::Count, "Messages moved to the dead-letter topic, by reason.");
    describe_gauge!(CONSUMER_LAG, Unit::Count, "Messages of the partition the consumer group has not settled (on the partition's leader).");
    describe_gauge!(QUEUE_UNACKED, Unit::Count, "Messages leased to the queue group's members, not yet settled.");
    describe_gauge!(QUEUE_WAITING_RETRY, Unit::Count, "Nacked messages waiting for their retry time.");
    describe_gauge!(QUEUE_OLDEST_UNSETTLED_AGE, Unit::Seconds, "Time since the first delivery of the queue group's oldest unsettled message.");
    describe_gauge!(DEAD_LETTER_DEPTH, Unit::Count, "Messages held by a dead-letter topic (on its leader).");
    describe_counter!(JOB_MESSAGES, Unit::Count, "Source records replay and redrive jobs handled here, by kind and outcome.");
    describe_gauge!(JOB_PROGRESS, Unit::Count, "Share of an active job's source range handled (on the metadata leader).");
    describe_gauge!(JOBS, Unit::Count, "Jobs the cluster remembers, by state (on the metadata leader).");
    describe_counter!(
        REPLICATION_APPENDS_SENT,
        Unit::Count,
        "AppendEntries requests sent on replication streams; pipelined=true when earlier ones were unanswered."
    );
    describe_counter!(APPEND_STREAMS_OPENED, Unit::Count, "Replication streams opened on this node as follower.");
    describe_counter!(GROUPS_REOPENED, Unit::Count, "Partition groups reopened from disk after a storage error (a full disk) stopped them.");
    describe_gauge!(APPEND_STREAMS_OPEN, Unit::Count, "Replication streams this node holds open as follower (one per group and leader at most).");
    describe_counter!(OFFSET_STAMPS, Unit::Count, "Batches whose base offset the log store wrote: already held, in place, or on a copy.");
    describe_gauge!(GROUPS_QUIESCED, Unit::Count, "Partition groups whose Raft is parked on this node (no ticks, no heartbeats).");
    describe_gauge!(GROUPS_AWAKE, Unit::Count, "Partition groups hosted on this node that are not quiesced (tickless ones included: keel_groups_tickless).");
    describe_gauge!(
        GROUPS_TICKLESS,
        Unit::Count,
        "Awake partition groups on this node whose Raft does not tick: leaders heartbeated by the node, followers that hear their leader."
    );
    describe_counter!(
        LEADER_HEARTBEATS,
        Unit::Count,
        "Heartbeat rounds of awake leaders on this node, by outcome: sent, or skipped because every follower answered a replication request within the heartbeat."
    );
    describe_counter!(GROUP_WAKES, Unit::Count, "Quiesced groups woken on this node, by reason.");
    describe_counter!(QUIESCE_REQUESTS, Unit::Count, "Groups this node asked a follower to quiesce, by outcome.");
    describe_counter!(PRE_VOTES_VETOED, Unit::Count, "Pre-votes refused for quiesced groups.");
    describe_counter!(PEERS_LOST, Unit::Count, "Times a peer was seen dead or restarted.");
    describe_counter!(CAMPAIGNS_STARTED, Unit::Count, "Elections started as the designated campaigner of a group whose leader's node was lost.");
    describe_gauge!(
        TAIL_CACHE_HOLDERS,
        Unit::Count,
        "Logs on this node holding recently written entries in memory; each may cache at most keel_tail_cache_budget_bytes split among them (and 32 MiB)."
    );
    describe_gauge!(TAIL_CACHE_BUDGET, Unit::Bytes, "The node-wide budget of the logs' in-memory tail caches.");
}

pub const GROUPS_QUIESCED: &str = "keel_groups_quiesced";
pub const GROUPS_AWAKE: &str = "keel_groups_awake";
pub const GROUPS_TICKLESS: &str = "keel_groups_tickless";
pub const GROUP_WAKES: &str = "keel_group_wakes_total";
pub const LEADER_HEARTBEATS: &str = "keel_leader_heartbeats_total";
pub const QUIESCE_REQUESTS: &str = "keel_quiesce_requests_total";
pub const PRE_VOTES_VETOED: &str = "keel_pre_votes_vetoed_total";
pub const PEERS_LOST: &str = "keel_peers_lost_total";
pub const CAMPAIGNS_STARTED: &str = "keel_campaigns_started_total";
pub const TAIL_CACHE_HOLDERS: &str = "keel_tail_cache_holders";
pub const TAIL_CACHE_BUDGET: &str = "keel_tail_cache_budget_bytes";

/// The logs sharing the node's tail-cache budget: how many hold entries, of how much.
pub fn tail_cache(holders: u64, budget_bytes: u64) {
    gauge!(TAIL_CACHE_HOLDERS).set(holders as f64);
    gauge!(TAIL_CACHE_BUDGET).set(budget_bytes as f64);
}

/// A quiesced group woke.
pub fn group_woke(reason: crate::peer::quiescence::WakeReason) {
    counter!(GROUP_WAKES, "reason" => reason.as_str()).increment(1);
}

/// Partition groups parked and ticking on this node.
pub fn groups_quiescence(quiesced: usize, awake: usize) {
    gauge!(GROUPS_QUIESCED).set(quiesced as f64);
    gauge!(GROUPS_AWAKE).set(awake as f64);
}

pub fn groups_tickless(tickless: usize) {
    gauge!(GROUPS_TICKLESS).set(tickless as f64);
}

/// One heartbeat scan of the awake leaders: `sent` heartbeated, `skipped` replicating.
pub fn leader_heartbeats(sent: u64, skipped: u64) {
    counter!(LEADER_HEARTBEATS, "outcome" => "sent").increment(sent);
    counter!(LEADER_HEARTBEATS, "outcome" => "skipped").increment(skipped);
}

/// Outcomes of quiesce asks to one follower.
pub fn quiesce_requests(agreed: u64, refused: u64, unanswered: u64) {
    counter!(QUIESCE_REQUESTS, "outcome" => "agreed").increment(agreed);
    counter!(QUIESCE_REQUESTS, "outcome" => "refused").increment(refused);
    counter!(QUIESCE_REQUESTS, "outcome" => "unanswered").increment(unanswered);
}

/// A leader's check before refusing a batch on its producer table: `confirmed` or
/// `not_leading`.
pub fn produce_refusal_check(outcome: &'static str) {
    counter!(PRODUCE_REFUSAL_CHECKS, "outcome" => outcome).increment(1);
}

pub fn pre_vote_vetoed() {
    counter!(PRE_VOTES_VETOED).increment(1);
}

pub fn peer_lost() {
    counter!(PEERS_LOST).increment(1);
}

pub fn campaign_started() {
    counter!(CAMPAIGNS_STARTED).increment(1);
}

/// Source records a job handled: `copied`, `skipped`, `quarantined`.
pub const SNAPSHOT_BYTES: &str = "keel_snapshot_bytes_total";
pub const SNAPSHOTS_INSTALLED: &str = "keel_snapshots_installed_total";
pub const RETENTION_PURGED_SEGMENTS: &str = "keel_retention_purged_segments_total";
pub const LOG_START_OFFSET: &str = "keel_log_start_offset";

/// Entry bytes a snapshot transfer moved (`direction`: `sent` or `received`).
pub fn snapshot_bytes(direction: &'static str, bytes: u64) {
    counter!(SNAPSHOT_BYTES, "direction" => direction).increment(bytes);
}

pub const QUEUE_EXPIRED: &str = "keel_queue_expired_total";

pub const REPLICATION_APPENDS_SENT: &str = "keel_replication_appends_sent_total";
pub const APPEND_STREAMS_OPENED: &str = "keel_append_streams_opened_total";
pub const APPEND_STREAMS_OPEN: &str = "keel_append_streams_open";

/// One AppendEntries sent on a replication stream, `pipelined` if earlier ones of the
/// stream were unanswered.
pub fn replication_append_sent(pipelined: bool) {
    counter!(REPLICATION_APPENDS_SENT, "pipelined" => if pipelined { "true" } else { "false" }).increment(1);
}

pub const OFFSET_STAMPS: &str = "keel_offset_stamps_total";

/// A batch's base offset written by the log store (`already`, `in_place`, `copied`).
pub fn offset_stamp(how: &'static str) {
    counter!(OFFSET_STAMPS, "how" => how).increment(1);
}

/// A replication stream opened on this node as follower; `open` are now held.
pub fn append_stream_opened(open: usize) {
    counter!(APPEND_STREAMS_OPENED).increment(1);
    gauge!(APPEND_STREAMS_OPEN).set(open as f64);
}

pub const DISK_FREE_BYTES: &str = "keel_disk_free_bytes";
pub const GROUPS_REOPENED: &str = "keel_groups_reopened_total";

/// A partition group a storage error stopped was reopened from disk.
pub fn group_reopened() {
    counter!(GROUPS_REOPENED).increment(1);
}
pub const DISK_FULL: &str = "keel_disk_full";

/// The data directory's free space, and whether the node refuses data for lack of it.
pub fn disk_space(free: u64, full: bool) {
    gauge!(DISK_FREE_BYTES).set(free as f64);
    gauge!(DISK_FULL).set(if full { 1.0 } else { 0.0 });
}

/// Messages retention deleted before a queue group settled them.
pub fn queue_expired(topic: &str, consumer_group: &str, messages: u64) {
    counter!(QUEUE_EXPIRED, "topic" => topic.to_string(), "consumer_group" => consumer_group.to_string()).increment(messages);
}

/// A snapshot transfer this node completed as follower.
pub fn snapshot_installed(with_log: bool) {
    counter!(SNAPSHOTS_INSTALLED, "with_log" => if with_log { "true" } else { "false" }).increment(1);
}

/// Segment files retention deleted, and the partition's log start.
pub fn retention(group: u64, purged_segments: u64, start_offset: u64) {
    counter!(RETENTION_PURGED_SEGMENTS).increment(purged_segments);
    gauge!(LOG_START_OFFSET, "group" => group.to_string()).set(start_offset as f64);
}

pub fn job_messages(kind: &'static str, copied: u64, skipped: u64, quarantined: u64) {
    for (outcome, n) in [("copied", copied), ("skipped", skipped), ("quarantined", quarantined)] {
        if n > 0 {
            counter!(JOB_MESSAGES, "kind" => kind, "outcome" => outcome).increment(n);
        }
    }
}

/// The metadata leader's view of the job table: per-state counts and active jobs' progress.
pub fn jobs(by_state: &[(&'static str, usize)], progress: &[(u64, f64)]) {
    for (state, n) in by_state {
        gauge!(JOBS, "state" => *state).set(*n as f64);
    }
    for (job, ratio) in progress {
        gauge!(JOB_PROGRESS, "job" => job.to_string()).set(*ratio);
    }
}

/// Messages leased to a queue group's member: `delivered` in all, `redelivered` of
/// them after a first attempt.
pub fn queue_delivered(topic: &str, consumer_group: &str, per_lane: &[u64], redelivered: u64) {
    for (lane, n) in per_lane.iter().enumerate().filter(|(_, n)| **n > 0) {
        counter!(QUEUE_DELIVERED, "topic" => topic.to_string(), "consumer_group" => consumer_group.to_string(), "lane" => lane.to_string()).increment(*n);
    }
    if redelivered > 0 {
        counter!(QUEUE_REDELIVERED, "topic" => topic.to_string(), "consumer_group" => consumer_group.to_string()).increment(redelivered);
    }
}

/// A message moved to its dead-letter topic, for `reason` (`DeadLetterCause::as_str`).
pub fn dead_lettered(topic: &str, consumer_group: &str, reason: &'static str) {
    counter!(DEAD_LETTERED, "topic" => topic.to_string(), "consumer_group" => consumer_group.to_string(), "reason" => reason).increment(1);
}

/// A queue fetch held back by a bound (`max_unacked` or `window`).
pub fn queue_stall(topic: &str, consumer_group: &str, reason: &'static str) {
    counter!(QUEUE_STALLS, "topic" => topic.to_string(), "consumer_group" => consumer_group.to_string(), "reason" => reason).increment(1);
}

/// The outcomes of one settle request.
pub fn queue_settled(topic: &str, consumer_group: &str, outcomes: &[keel_protocol::message::SettleOutcome]) {
    use keel_protocol::message::SettleOutcome as O;
    let mut counts = [0u64; 8];
    for o in outcomes {
        let i = match o {
            O::Acked => 0,
            O::Retrying { .. } => 1,
            O::DeadLettering => 2,
            O::Extended { .. } => 3,
            O::AlreadySettled => 4,
            O::StaleLease { .. } => 5,
            O::NotDelivered => 6,
            O::AlreadyDeadLettering => 7,
        };
        counts[i] += 1;
    }
    const NAMES: [&str; 8] = ["acked", "retrying", "dead_lettering", "extended", "already_settled", "stale_lease", "not_delivered", "already_dead_lettering"];
    for (name, n) in NAMES.iter().zip(counts) {
        if n > 0 {
            counter!(QUEUE_SETTLED, "topic" => topic.to_string(), "consumer_group" => consumer_group.to_string(), "outcome" => *name).increment(n);
        }
    }
}

/// Records one produce request's outcome.
pub fn record_produce(topic: &str, result: &Result<Appended, PartitionError>, records: u64, bytes: u64, took: Duration) {
    use keel_protocol::message::Duplicate;
    let topic = topic.to_string();
    let outcome = match result {
        Ok(Appended { duplicate: Duplicate::None, .. }) => {
            counter!(PRODUCE_MESSAGES, "topic" => topic.clone()).increment(records);
            counter!(PRODUCE_BYTES, "topic" => topic.clone()).increment(bytes);
            histogram!(PRODUCE_ACK_SECONDS).record(took.as_secs_f64());
            "stored"
        }
        Ok(Appended { duplicate: Duplicate::Batch, .. }) => {
            counter!(PRODUCE_DUPLICATES, "reason" => "sequence").increment(records);
            "duplicate"
        }
        Ok(Appended { duplicate: Duplicate::Records(r), .. }) => {
            counter!(PRODUCE_DUPLICATES, "reason" => "message_id").increment(r.len() as u64);
            "duplicate"
        }
        Err(PartitionError::Throttled { reason, .. }) => {
            counter!(PRODUCE_THROTTLED, "reason" => reason.as_str()).increment(1);
            "throttled"
        }
        Err(PartitionError::StorageFull(_)) => "storage_full",
        Err(PartitionError::DuplicateMessageIds(r)) => {
            counter!(PRODUCE_DUPLICATES, "reason" => "message_id").increment(r.len() as u64);
            "refused"
        }
        Err(PartitionError::OutOfOrderSequence { .. } | PartitionError::ProducerFenced { .. } | PartitionError::InvalidBatch(_)) => "refused",
        Err(PartitionError::NotLeader { .. } | PartitionError::LeaderNotReady) => "not_leader",
        Err(PartitionError::TimedOut | PartitionError::OutcomeUnknown { .. }) => "unknown",
        Err(_) => "failed",
    };
    counter!(PRODUCE_REQUESTS, "topic" => topic, "outcome" => outcome).increment(1);
}

/// A group found damaged (`damaged`), or refilled or stopped (`!damaged`).
pub fn record_group_damage(group: u64, damaged: bool) {
    if damaged {
        counter!(GROUP_DAMAGE_DETECTED).increment(1);
        gauge!(GROUPS_DAMAGED).increment(1.0);
    } else {
        gauge!(GROUPS_DAMAGED).decrement(1.0);
    }
    tracing::debug!(group, damaged, "group damage gauge updated");
}

/// One group's sampled Raft view, for [`record_group`].
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSample {
    pub group: u64,
    pub term: u64,
    pub leader: Option<u64>,
    pub is_leader: bool,
    pub leader_changed: bool,
    /// For a partition this node leads: whether a replica lags.
    pub under_replicated: bool,
    pub message_ids: Option<u64>,
    pub message_id_bytes: Option<u64>,
    pub producers: Option<u64>,
}

/// Records the group gauges of one sampling round. `previous` holds each group's sample
/// of the round before: a gauge is set only when its value changed (a node hosting
/// thousands of mostly idle groups would otherwise look up and set every one of them
/// every round).
pub fn record_groups(samples: &[GroupSample], previous: &std::collections::HashMap<u64, GroupSample>) {
    let mut under = 0u64;
    for s in samples {
        under += u64::from(s.under_replicated);
        let before = previous.get(&s.group);
        let changed = |f: fn(&GroupSample) -> Option<u64>| before.is_none_or(|b| f(b) != f(s));
        let group = || s.group.to_string();
        if changed(|x| Some(x.term)) {
            gauge!(RAFT_TERM, "group" => group()).set(s.term as f64);
        }
        if changed(|x| Some(u64::from(x.is_leader))) {
            gauge!(RAFT_IS_LEADER, "group" => group()).set(if s.is_leader { 1.0 } else { 0.0 });
        }
        if s.leader_changed {
            counter!(RAFT_LEADER_CHANGES, "group" => group()).increment(1);
        }
        if let Some(n) = s.message_ids.filter(|_| changed(|x| x.message_ids)) {
            gauge!(MESSAGE_IDS_HELD, "group" => group()).set(n as f64);
        }
        if let Some(n) = s.message_id_bytes.filter(|_| changed(|x| x.message_id_bytes)) {
            gauge!(MESSAGE_ID_WINDOW_BYTES, "group" => group()).set(n as f64);
        }
        if let Some(n) = s.producers.filter(|_| changed(|x| x.producers)) {
            gauge!(PRODUCERS_HELD, "group" => group()).set(n as f64);
        }
    }
    gauge!(UNDER_REPLICATED_PARTITIONS).set(under as f64);
}

/// One consumer group's (or dead-letter topic's) view in one partition this node leads.
pub struct ConsumerSample {
    pub group: u64,
    pub topic: String,
    /// Empty for a dead-letter topic's depth sample.
    pub consumer_group: String,
    pub lag: u64,
    pub leased: Option<u64>,
    /// Waiting for a retry (scheduled messages not included).
    pub waiting: Option<u64>,
    pub scheduled: Option<u64>,
    pub parked_keys: Option<u64>,
    pub oldest_unsettled_age_ms: Option<u64>,
    /// The oldest offset not consumed (stream: committed; queue: floor; dead-letter
    /// topic: log start) when behind: the message whose age is the lag age.
    pub behind_from: Option<u64>,
    /// Age of the message at `behind_from` (0 when caught up); filled in by the sampler.
    pub lag_age_ms: Option<u64>,
    /// Queue groups: messages not yet delivered, per lane that has any.
    pub lane_backlog: Vec<(u8, u64)>,
}

/// Zeroes the gauges of a consumer group (or, with an empty `consumer_group`, of a
/// dead-letter topic) this node sampled last round and no longer does (it stopped
/// leading the partition, or the group is gone), so sums across nodes stay right.
pub fn zero_consumer(group: u64, topic: &str, consumer_group: &str, lanes: &[u8]) {
    if consumer_group.is_empty() {
        gauge!(DEAD_LETTER_DEPTH, "topic" => topic.to_string()).set(0.0);
        gauge!(DEAD_LETTER_OLDEST_AGE, "topic" => topic.to_string()).set(0.0);
        return;
    }
    let labels = [("group", group.to_string()), ("consumer_group", consumer_group.to_string())];
    for name in [CONSUMER_LAG, QUEUE_UNACKED, QUEUE_WAITING_RETRY, QUEUE_SCHEDULED, QUEUE_PARKED_KEYS, QUEUE_OLDEST_UNSETTLED_AGE, CONSUMER_LAG_AGE] {
        gauge!(name, &labels).set(0.0);
    }
    for lane in lanes {
        gauge!(QUEUE_LANE_BACKLOG, "group" => group.to_string(), "consumer_group" => consumer_group.to_string(), "lane" => lane.to_string()).set(0.0);
    }
}

/// Records the consumer-group gauges of one sampling round.
pub fn record_consumers(samples: &[ConsumerSample]) {
    for s in samples {
        if s.consumer_group.is_empty() {
            gauge!(DEAD_LETTER_DEPTH, "topic" => s.topic.clone()).set(s.lag as f64);
            if let Some(ms) = s.lag_age_ms {
                gauge!(DEAD_LETTER_OLDEST_AGE, "topic" => s.topic.clone()).set(ms as f64 / 1000.0);
            }
            continue;
        }
        let labels = [("group", s.group.to_string()), ("consumer_group", s.consumer_group.clone())];
        gauge!(CONSUMER_LAG, &labels).set(s.lag as f64);
        if let Some(n) = s.leased {
            gauge!(QUEUE_UNACKED, &labels).set(n as f64);
        }
        if let Some(n) = s.waiting {
            gauge!(QUEUE_WAITING_RETRY, &labels).set(n as f64);
        }
        if let Some(n) = s.scheduled {
            gauge!(QUEUE_SCHEDULED, &labels).set(n as f64);
        }
        if let Some(n) = s.parked_keys {
            gauge!(QUEUE_PARKED_KEYS, &labels).set(n as f64);
        }
        if let Some(ms) = s.oldest_unsettled_age_ms {
            gauge!(QUEUE_OLDEST_UNSETTLED_AGE, &labels).set(ms as f64 / 1000.0);
        }
        if let Some(ms) = s.lag_age_ms {
            gauge!(CONSUMER_LAG_AGE, &labels).set(ms as f64 / 1000.0);
        }
        for (lane, n) in &s.lane_backlog {
            gauge!(QUEUE_LANE_BACKLOG, "group" => s.group.to_string(), "consumer_group" => s.consumer_group.clone(), "lane" => lane.to_string()).set(*n as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(group: u64, term: u64, is_leader: bool) -> GroupSample {
        GroupSample {
            group,
            term,
            leader: Some(1),
            is_leader,
            leader_changed: false,
            under_replicated: false,
            message_ids: Some(0),
            message_id_bytes: Some(0),
            producers: Some(0),
        }
    }

    #[test]
    fn group_gauges_are_set_when_new_or_changed_and_not_again_when_unchanged() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let line = |text: &str, name: &str| text.lines().find(|l| l.starts_with(name)).map(str::to_string);
        metrics::with_local_recorder(&recorder, || {
            let none = std::collections::HashMap::new();
            record_groups(&[sample(7, 3, true)], &none);
            let text = handle.render();
            assert_eq!(line(&text, "keel_raft_term{group=\"7\"}").as_deref(), Some("keel_raft_term{group=\"7\"} 3"));
            assert_eq!(line(&text, "keel_raft_is_leader{group=\"7\"}").as_deref(), Some("keel_raft_is_leader{group=\"7\"} 1"));
            // The round before says term 4 already: unchanged, so not set (the recorder
            // still holds 3, which proves the set was skipped).
            let before: std::collections::HashMap<u64, GroupSample> = [(7, sample(7, 4, true))].into();
            record_groups(&[sample(7, 4, true)], &before);
            assert_eq!(line(&handle.render(), "keel_raft_term{group=\"7\"}").as_deref(), Some("keel_raft_term{group=\"7\"} 3"));
            // Changed since the round before: set.
            record_groups(&[sample(7, 5, false)], &before);
            let text = handle.render();
            assert_eq!(line(&text, "keel_raft_term{group=\"7\"}").as_deref(), Some("keel_raft_term{group=\"7\"} 5"));
            assert_eq!(line(&text, "keel_raft_is_leader{group=\"7\"}").as_deref(), Some("keel_raft_is_leader{group=\"7\"} 0"));
        });
    }
}
