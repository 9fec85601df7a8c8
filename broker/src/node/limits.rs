//! Bounds of the node runtime and its client listener.

use std::time::Duration;

/// Client connections served at once. Full: accepting pauses until one closes.
pub const CLIENT_CONNECTIONS_MAX: usize = 1024;
/// Requests one client connection processes at once. Full: its reader pauses.
pub const CLIENT_CONCURRENCY_MAX: usize = 1024;
/// Answers queued for one client connection's writer.
pub const CLIENT_SEND_QUEUE_CAPACITY: usize = 1024;
/// Partitions one topic may have.
pub const TOPIC_PARTITIONS_MAX: u32 = 1024;
/// Longest a produce may wait for its commit, whatever the client asks.
pub const PRODUCE_TIMEOUT_MAX: Duration = Duration::from_secs(60);
/// Longest a fetch may long-poll, whatever the client asks.
pub const FETCH_WAIT_MAX: Duration = Duration::from_secs(30);
/// Largest fetch response body, whatever the client asks (at least one batch is sent).
pub const FETCH_BYTES_MAX: u32 = 16 * 1024 * 1024 - 64 * 1024;
/// How long an admin request waits for its metadata command to be folded in locally.
pub const METADATA_APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of the metadata log read at once by offline inspection (`keel dump`).
pub const METADATA_READ_BYTES: u64 = 1024 * 1024;
/// Default size of a metadata log segment (`cluster.metadata_log.segment_bytes`).
pub const METADATA_SEGMENT_BYTES_DEFAULT: u64 = 1024 * 1024;
/// Default bytes of metadata log kept behind its snapshot
/// (`cluster.metadata_log.retained_bytes`): a node this little behind catches up from
/// the log, one further behind is sent the snapshot.
pub const METADATA_RETAINED_BYTES_DEFAULT: u64 = 4 * 1024 * 1024;

const _: () = assert!((FETCH_BYTES_MAX as usize) < keel_protocol::limits::FRAME_BODY_SIZE_MAX);

/// How long one probe of a replica waits for its answer (see `rejoin`).
pub const REJOIN_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between probe rounds while a group with no local state cannot decide.
pub const REJOIN_PROBE_RETRY: Duration = Duration::from_millis(200);
/// How often a node still waiting to decide says so in its log.
pub const REJOIN_PROBE_LOG_EVERY: Duration = Duration::from_secs(5);
/// How often a refilling group checks whether its log has caught up.
pub const REJOIN_CATCH_UP_POLL: Duration = Duration::from_millis(50);

/// Bytes of appends one partition may have proposed but not yet applied. Beyond it a
/// produce is answered `Throttled` (the producer waits `THROTTLE_RETRY_AFTER_MS`)
/// instead of queueing: this bounds the memory overload can take, per partition. One
/// group commit absorbs what arrives during an fsync; 4 MiB is 40 ms of 100 MB/s, and
/// more than four producers' default windows of 256 KiB batches only when the disk
/// falls behind.
pub const PARTITION_PENDING_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Appends one partition may have proposed but not yet applied (see above).
pub const PARTITION_PENDING_BATCHES_MAX: usize = 64;
/// Bytes of recently written entries all of a node's logs keep in memory together
/// (`keel_storage::TailCacheShare`): each log caches at most its own 32 MiB and at most
/// this split among the logs holding any (a quiesced partition holds none). Without it
/// a node with 1,000 partitions written now and then grew by every byte written, up to
/// 32 GB.
pub const TAIL_CACHE_NODE_BYTES: u64 = 256 * 1024 * 1024;
/// How long a throttled producer is told to wait before retrying, in milliseconds.
pub const THROTTLE_RETRY_AFTER_MS: u32 = 50;
/// How long a batch whose sequence is ahead of the next one expected waits for the
/// missing batch (requests on one connection are served concurrently, so they can
/// arrive in another order) before it is refused as out of order.
pub const SEQUENCE_GAP_WAIT: Duration = Duration::from_millis(200);
/// How long a new leader may take to apply an entry of its own term before a produce
/// is answered `LeaderNotAvailable` (retried by the client).
pub const LEADER_GATE_WAIT: Duration = Duration::from_secs(2);
/// The partition clock advances at least this often while a leader takes writes (a
/// clock tick entry); message ids and idle producers expire by it.
pub const CLOCK_TICK_INTERVAL: Duration = Duration::from_secs(1);
/// A partition clock this far behind the leader's own is stale (the partition was
/// idle): an idempotent or message-id produce first waits for a tick to apply, so ids
/// and producers that expired meanwhile are gone before it is judged.
pub const CLOCK_STALE_MS: i64 = 2_000;
/// Producer ids a node asks the metadata log for at once, for the anonymous producers
/// it registers.
pub const PRODUCER_ID_BLOCK: u64 = 1024;
/// Idempotent producers one partition remembers (about 300 bytes each, until they are
/// idle for the topic's `producer_expiry_ms`). A producer the partition does not know
/// is answered `Throttled` while the table is full; known ones are never evicted.
pub const PARTITION_PRODUCERS_MAX: usize = 100_000;
/// How long a producer refused for a full producer table is told to wait.
pub const PRODUCERS_FULL_RETRY_AFTER_MS: u32 = 1_000;
/// Longest a consumer-group request (commit, settle) waits for its entry to commit.
pub const CONSUMER_REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(30);
/// How long a queue fetch may take to commit its lease once it has something to lease,
/// beyond its long-poll wait.
pub const QUEUE_PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Due offsets (retries, expired leases) one queue fetch looks at.
pub const QUEUE_REDELIVER_SCAN_MAX: usize = 10_000;
/// How often the dead-letter task looks for messages decided for a dead-letter topic
/// (and for leases that ran out on the last allowed delivery).
pub const DEAD_LETTER_SCAN_INTERVAL: Duration = Duration::from_millis(200);
/// Messages one partition dead-letters per round.
pub const DEAD_LETTER_BATCH_MAX: usize = 500;
/// How long one dead-letter step (create the topic, append, settle) may take.
pub const DEAD_LETTER_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of log a queue fetch reads at a time while it covers the range it leases.
pub const QUEUE_READ_CHUNK_BYTES: u64 = 128 * 1024;
/// Furthest ahead a produced record may schedule its delivery to queue groups (its
/// `keel-deliver-at`), from the leader's clock. A scheduled message waits as a slot of
/// each queue group that reaches it, inside the group's window (`QUEUE_WINDOW_MAX`).
pub const SCHEDULED_DELAY_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Stream groups with live members the coordinator tracks at most (beyond, a join of a
/// new group is refused).
pub const COORDINATOR_GROUPS_MAX: usize = 10_000;
/// Members one stream group may have.
pub const GROUP_MEMBERS_MAX: usize = 1_000;
/// Bounds of a member's session timeout.
pub const SESSION_TIMEOUT_MIN: Duration = Duration::from_millis(500);
pub const SESSION_TIMEOUT_MAX: Duration = Duration::from_secs(300);
/// How often the coordinator removes members whose session ran out.
pub const SESSION_EXPIRY_SCAN: Duration = Duration::from_millis(100);
/// How often, at most, a partition says in its log that queue delivery stalled (the
/// stall metric counts every one).
pub const STALL_LOG_EVERY_MS: i64 = 10_000;
/// How often the job supervisor (on the metadata leader) starts runners for running
/// jobs, stops those of jobs paused or cancelled, and updates the job gauges.
pub const JOB_SCAN_INTERVAL: Duration = Duration::from_millis(200);
/// How long one step of a job (a fetch, a produce, a checkpoint) may take.
pub const JOB_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of source one fetch of a job reads.
pub const JOB_FETCH_BYTES: u32 = 1 << 20;
/// How often a running job records its progress in the metadata log (and always at
/// the end of a partition's range).
pub const JOB_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);
/// Backoff between a job's failed steps: from the first to the last, doubling.
pub const JOB_RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const JOB_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A job partition that fails every step for this long is given up: the job is marked
/// failed with the last error (resume it with `keel job resume` once fixed).
pub const JOB_STALL_TIMEOUT: Duration = Duration::from_secs(300);

/// How often a partition whose log grew has its retention judged (and its log purged to
/// the applied cut). Between two rounds a partition can outgrow its byte bound by what
/// it takes in.
pub const RETENTION_CHECK_INTERVAL: Duration = Duration::from_millis(50);
/// How often a partition whose log did not grow has its retention judged (messages age
/// out of idle partitions too).
pub const RETENTION_IDLE_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How often retention lists the awake groups among all hosted ones anew (between
/// lists, and between idle sweeps, it looks only at those: `super::awake`); a wake
/// lists them again at once.
pub const RETENTION_LIST_INTERVAL: Duration = Duration::from_millis(500);

/// How long a producer throttled by a partition at its byte retention bound waits
/// before retrying (retention frees a segment within a few check intervals).
pub const RETENTION_THROTTLE_RETRY_AFTER_MS: u32 = 20;

/// How often a node reads its data directory's free space (`disk_space.rs`; one
/// `statvfs`). What a node writes between two reads goes past `node.min_free_bytes`
/// before it refuses: at 250 ms, three nodes writing ~45 MB/s into one tmpfs overshot a
/// 24 MiB reserve by 13 to over 24 MiB in `tests/disk_full.rs`; at 50 ms each check
/// lets about 2 MB through.
pub const DISK_CHECK_INTERVAL: Duration = Duration::from_millis(50);
/// A full node takes new data again once this much more than `node.min_free_bytes` is
/// free (at most the minimum again), so it does not flap at the line.
pub const DISK_FULL_HYSTERESIS: u64 = 16 * 1024 * 1024;
/// A full node hands each partition's leadership away at most this often.
pub const DISK_FULL_STEP_DOWN_INTERVAL: Duration = Duration::from_secs(5);
/// How often the reconciler looks for partition groups a storage error stopped.
pub const GROUP_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A stopped group is reopened only with at least this much free (and the node not
/// full): room to recover its log and take writes again.
pub const GROUP_REOPEN_FREE_BYTES_MIN: u64 = 16 * 1024 * 1024;
/// A group is reopened at most this often (a storage error that is not a full disk
/// would otherwise stop it again at once).
pub const GROUP_REOPEN_BACKOFF: Duration = Duration::from_secs(10);

/// An awake follower whose last contact with its leader is younger than this many
/// heartbeats stops ticking (`super::ticks`).
pub const LISTEN_FRESH_HEARTBEATS: u32 = 2;
/// A listening follower whose last contact is this many heartbeats old ticks again
/// (and so times its election from that contact, as it always does).
pub const LISTEN_STALE_HEARTBEATS: u32 = 3;

/// How often `super::ticks` lists the awake groups among all hosted ones (between
/// lists it drives only those).
pub const TICKS_LIST_INTERVAL: Duration = Duration::from_millis(500);

/// How often the quiesce driver checks peers' liveness and deferred wakes
/// (`super::quiesce`): a lost leader's groups wake within this of `PEER_DEAD_AFTER`.
pub const QUIESCE_SCAN_INTERVAL: Duration = Duration::from_millis(50);

/// How often the quiesce driver looks for idle groups to quiesce: a group asks to park
/// within this of being idle for `quiesce_after_ms`.
pub const QUIESCE_ROUND_INTERVAL: Duration = Duration::from_millis(50);

/// A group used *sporadically* — its latest write or read came at least this many
/// `quiesce_after_ms` after the one before it (a partition of a wide topic, written
/// every second or so) — quiesces once idle for `QUIESCE_SPORADIC_IDLE` rather than
/// `quiesce_after_ms` (`super::quiesce::candidate`): waiting out the full time cost
/// each such write one or two heartbeat rounds that nothing needed (it will most
/// likely not be written again before then). A group written in a stream keeps the
/// full time, so it is not parked and woken between batches.
pub const QUIESCE_SPORADIC_GAP_FACTOR: u32 = 5;
/// How long a sporadically used group stays idle before it quiesces (at most
/// `quiesce_after_ms`): under a heartbeat, so that it parks before its first one.
pub const QUIESCE_SPORADIC_IDLE: Duration = Duration::from_millis(10);

/// How often the quiesce driver lists the hosted groups anew (for peer loss and return:
/// a group created since waits for the next list) and its awake candidates at the
/// latest (`super::awake`: also at once after a wake or a change in the hosted count),
/// tells other replicas about groups stopped here, and sets the quiesced/awake gauges.
pub const QUIESCE_LIST_INTERVAL: Duration = Duration::from_millis(500);

/// How often, at most, a node asks the other replicas of a group whose Raft stopped
/// here to wake it.
pub const STOPPED_GROUP_WAKE_EVERY: Duration = Duration::from_secs(5);
/// How often the quiesce driver looks for groups whose Raft stopped here (a storage
/// error; rare, and each look reads every group's Raft metrics).
pub const STOPPED_SCAN_INTERVAL: Duration = Duration::from_secs(2);

/// A designated survivor retries its pre-vote this often until the group has a leader
/// (`super::quiesce::campaign`): the other survivor may veto the first while it still
/// counts the lost node alive (its beats are checked on its own clock).
pub const CAMPAIGN_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Pre-votes a designated survivor sends for one group before leaving it to its own
/// election timers.
pub const CAMPAIGN_ATTEMPTS_MAX: u32 = 20;

/// Campaign attempts (pre-vote rounds) one node has in flight at once: a node that lost
/// a peer leading hundreds of groups spreads their elections instead of stampeding.
pub const CAMPAIGNS_IN_FLIGHT_MAX: usize = 64;

/// glibc malloc's mmap threshold on a serving node (`super::malloc`): allocations
/// below it come from the heap and are reused after being freed. 32 MiB is the largest
/// glibc accepts on 64-bit; larger blocks (none on the data path: frames are at most
/// `FRAME_BODY_SIZE_MAX`, 16 MiB) are still mapped and unmapped one by one.
pub const MALLOC_MMAP_THRESHOLD_BYTES: usize = 32 * 1024 * 1024;
/// Free memory at the top of glibc's main heap above which it is returned to the
/// kernel (`super::malloc`). The per-thread arenas (64 MiB heaps) stay below it, so
/// their freed memory is kept for reuse: resident memory stays at its peak.
pub const MALLOC_TRIM_THRESHOLD_BYTES: usize = 256 * 1024 * 1024;
