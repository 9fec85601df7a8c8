//! Retention through Raft: what prefix of each partition's log goes, decided once and
//! applied on every replica.
//!
//! Every `RETENTION_CHECK_INTERVAL`, for every partition this node hosts:
//! 1. the active segment size follows the topic's `segment_bytes`, and its age at most
//!    the topic's `retention_ms` (a segment rolls at the first append past either; set
//!    when the log was opened, `group::SegmentPolicy`, and again here for a changed
//!    config);
//! 2. **as leader**, [`cut`] judges the whole sealed segments after the current cut by
//!    the topic's `retention_bytes` (oldest first while the partition holds more) and
//!    `retention_ms` (segments whose messages the partition clock says were all stored
//!    before now − retention), and proposes a `Retain` control entry with the new cut
//!    (the last entry to go and the first offset to keep). If an aged segment's time is
//!    not known yet (nothing was applied after its last message), it proposes a clock
//!    tick instead, which records it;
//! 3. **on every replica**, once the applied cut is past its log's start: takes a
//!    snapshot (openraft purges only what a snapshot covers; a fresh one also keeps
//!    what a lagging follower is sent after it small), then asks openraft to purge up
//!    to the cut. Openraft purges once
//!    no replication reads those entries; a follower that needed them is then sent the
//!    snapshot with the leader's retained log (`peer/snapshot.rs`).
//!
//! The log store deletes only below the applied cut (`PartitionShared::purge_floor`),
//! so nothing but this path deletes a partition's data. Consumers behind the new start
//! get `OffsetOutOfRange` naming it.
//!
//! The metadata log goes the same way, by `cluster.metadata_log`: its segments roll at
//! `segment_bytes`, its leader cuts the oldest sealed ones while more than
//! `retained_bytes` remain, and every node snapshots (the snapshot carries the metadata
//! state, `replication::state_machine`) and purges.

use std::sync::Arc;
use std::time::Duration;

use keel_storage::SegmentExtent;
use openraft::async_runtime::watch::WatchReceiver;

use super::awake::AwakeList;
use super::group::{GroupHandle, SegmentPolicy};
use super::limits::{RETENTION_CHECK_INTERVAL, RETENTION_IDLE_CHECK_INTERVAL, RETENTION_LIST_INTERVAL};
use super::partition::Partition;
use super::reconcile::HostedPartitions;
use crate::config::MetadataLogConfig;
use crate::partition::retention::{Retained, TimeMarks};
use crate::partition::{ControlCommand, ControlEntry};
use crate::replication::types::EntryData;

/// What retention asks of a partition now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// Nothing to cut.
    Keep,
    /// Cut up to this entry; the partition starts at this offset.
    Cut(Retained),
    /// A sealed segment may be old enough but no time is known for its last message, or
    /// the only segment (active) aged out: a clock tick records the time, and rolls the
    /// active segment.
    NeedsTime,
}

/// Judges `extents` (a log's segments, oldest first) after the applied cut `retained`
/// under the topic's retention (0: no bound of that kind), at leader time `now_ms`.
pub fn cut(extents: &[SegmentExtent], retained: Retained, marks: &TimeMarks, retention_ms: u64, retention_bytes: u64, now_ms: i64) -> Judgement {
    let live: Vec<&SegmentExtent> = extents.iter().filter(|s| s.last_index.is_some_and(|l| l > retained.upto_index)).collect();
    let mut remaining: u64 = live.iter().map(|s| s.bytes).sum();
    let oldest_kept = now_ms.saturating_sub(i64::try_from(retention_ms).unwrap_or(i64::MAX));
    let mut cut = None;
    for s in live.iter().filter(|s| s.sealed) {
        let too_big = retention_bytes > 0 && remaining > retention_bytes;
        let stored_by = marks.stored_by(s.end_offset);
        let too_old = retention_ms > 0 && stored_by.is_some_and(|t| t < oldest_kept);
        if !(too_big || too_old) {
            if cut.is_none() && retention_ms > 0 && stored_by.is_none() {
                return Judgement::NeedsTime;
            }
            break;
        }
        remaining -= s.bytes;
        cut = Some(Retained { upto_index: s.last_index.expect("live segments hold an entry"), start_offset: s.end_offset });
    }
    if cut.is_none() && retention_ms > 0 {
        // A quiet partition: its active segment's messages aged out (or their time is not
        // known yet), but it only rolls at an append. A clock tick appends (and records
        // the time); the segment rolls then, since its age is bounded by the retention.
        if let Some(active) = live.last().filter(|s| !s.sealed) {
            let stored_by = marks.stored_by(active.end_offset);
            let holds_messages = active.end_offset > retained.start_offset && live.len() == 1;
            if holds_messages && stored_by.is_none_or(|t| t < oldest_kept) {
                return Judgement::NeedsTime;
            }
        }
    }
    cut.map_or(Judgement::Keep, Judgement::Cut)
}

/// Runs until the node stops. A partition is looked at every `RETENTION_CHECK_INTERVAL`
/// if its log grew (or retention has a purge to finish), and at least every
/// `RETENTION_IDLE_CHECK_INTERVAL` (age retention of an idle partition); the metadata
/// log whenever it grew or has a purge to finish.
pub async fn run(hosted: HostedPartitions, metadata: GroupHandle, metadata_log: MetadataLogConfig) {
    let mut tick = tokio::time::interval(RETENTION_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Per group: the log's next index when last looked at, and when.
    let mut seen: std::collections::HashMap<u64, (u64, tokio::time::Instant)> = std::collections::HashMap::new();
    let mut metadata_seen = None;
    // Quiesced groups are looked at only in a sweep every `RETENTION_IDLE_CHECK_INTERVAL`.
    let mut idle_sweep: Option<tokio::time::Instant> = None;
    let mut awake = AwakeList::new(RETENTION_LIST_INTERVAL);
    loop {
        tick.tick().await;
        let sweep = idle_sweep.is_none_or(|t| t.elapsed() >= RETENTION_IDLE_CHECK_INTERVAL);
        if sweep {
            idle_sweep = Some(tokio::time::Instant::now());
        }
        let next_index = metadata.log.state().next_index;
        if metadata_seen != Some(next_index) || purge_pending(&metadata) {
            metadata_seen = Some(next_index);
            if let Err(e) = metadata_step(&metadata, metadata_log).await {
                tracing::debug!(error = %e, "metadata log retention step did not complete; retrying next round");
                metadata_seen = None;
            }
        }
        // Judged under the read lock, without cloning every partition each round (a
        // node may host thousands, mostly quiesced): only the due ones are taken out.
        let due: Vec<Arc<Partition>> = if sweep {
            let hosted = hosted.read().expect("hosted lock poisoned");
            if seen.len() > hosted.len() {
                seen.retain(|g, _| hosted.contains_key(g));
            }
            hosted.values().filter(|p| is_due(p, &seen)).cloned().collect()
        } else {
            // Between sweeps only awake groups can be due: not walked one by one.
            awake.refresh(&hosted).iter().filter(|p| is_due(p, &seen)).cloned().collect()
        };
        for p in due {
            let next_index = p.group.log.state().next_index;
            seen.insert(p.group.id, (next_index, tokio::time::Instant::now()));
            if let Err(e) = step(&p).await {
                tracing::debug!(partition = %p.name(), error = %e, "retention step did not complete; retrying next round");
            }
        }
    }
}

/// Whether `p` is due for a retention step, given when it was last looked at (`seen`).
fn is_due(p: &Partition, seen: &std::collections::HashMap<u64, (u64, tokio::time::Instant)>) -> bool {
    match seen.get(&p.group.id) {
        None => true,
        // A quiesced group takes no writes and applies nothing (a cut applied
        // before it quiesced was seen then): only age retention can be due.
        Some((_, at)) if p.group.sleep.is_quiet() => at.elapsed() >= RETENTION_IDLE_CHECK_INTERVAL,
        Some((n, at)) => *n != p.group.log.state().next_index || purge_pending(&p.group) || at.elapsed() >= RETENTION_IDLE_CHECK_INTERVAL,
    }
}

/// Whether the applied cut is past the start of `group`'s log.
fn purge_pending(group: &GroupHandle) -> bool {
    group.shared.state().retained.upto_index >= group.log.state().first_index
}

/// One round of the metadata log's retention (see the module docs).
async fn metadata_step(group: &GroupHandle, policy: MetadataLogConfig) -> Result<(), String> {
    if group.raft.metrics().borrow_watched().state == openraft::ServerState::Leader {
        let (judgement, clock_ms) = {
            let st = group.shared.state();
            (cut(&group.log.segment_extents(), st.retained, &st.time_marks, 0, policy.retained_bytes, 0), st.clock_ms)
        };
        if let Judgement::Cut(r) = judgement {
            tracing::info!(upto_index = r.upto_index, "metadata log retention: cutting entries up to {}", r.upto_index);
            let entry = ControlEntry {
                leader_time_ms: super::partition::now_ms().max(clock_ms),
                command: ControlCommand::Retain { upto_index: r.upto_index, start_offset: r.start_offset },
            };
            // Bounded: a leader that lost its quorum must not hold up partitions' retention.
            match tokio::time::timeout(SNAPSHOT_WAIT, group.raft.client_write(EntryData::control(&entry))).await {
                Ok(written) => written.map(|_| ()).map_err(|e| format!("proposing the cut: {e}"))?,
                Err(_) => return Err(format!("the cut was not committed within {SNAPSHOT_WAIT:?}")),
            }
        }
    }
    purge_to_cut(group, "the metadata log").await
}

/// One round of retention for one partition (see the module docs).
async fn step(p: &Partition) -> Result<(), String> {
    let Some(config) = p.topic_config() else { return Ok(()) };
    // Set when the log was opened; applied again for a topic whose config changed.
    SegmentPolicy::of_topic(&config).apply(&p.group.log);
    if (config.retention_ms > 0 || config.retention_bytes > 0) && p.serving_now() {
        p.propose_retention(&config).await.map_err(|e| e.to_string())?;
    }
    purge_to_cut(&p.group, &p.name()).await
}

/// Purges this replica's log of `group` (named `name` in logs) up to the applied cut,
/// snapshotting first if needed.
async fn purge_to_cut(group: &GroupHandle, name: &str) -> Result<(), String> {
    let retained = group.shared.state().retained;
    if retained.upto_index == 0 {
        return Ok(());
    }
    let log_state = group.log.state();
    if log_state.first_index > retained.upto_index {
        return Ok(());
    }
    // A fresh snapshot with every purge, even if an older one covers the cut: it is what
    // a follower behind the new start is sent, with the retained log up to it, and the
    // fresher it is the less follows it by ordinary replication.
    let snapshot = group.raft.metrics().borrow_watched().snapshot;
    let applied = group.shared.applied().borrow().map(|l| l.index);
    if snapshot.is_none_or(|s| Some(s.index) < applied) {
        group.raft.trigger().snapshot().await.map_err(|e| format!("triggering a snapshot: {e}"))?;
        let covered = group
            .raft
            .wait(Some(SNAPSHOT_WAIT))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= retained.upto_index), "a snapshot covering the retention cut")
            .await;
        if covered.is_err() {
            return Err(format!("no snapshot covers entry {} yet", retained.upto_index));
        }
    }
    let before = group.log.segment_extents().len() as u64;
    group.raft.trigger().purge_log(retained.upto_index).await.map_err(|e| format!("purging: {e}"))?;
    let purged = group.raft.wait(Some(SNAPSHOT_WAIT)).metrics(|m| m.purged.is_some_and(|l| l.index >= retained.upto_index), "the purge").await;
    let after = group.log.segment_extents().len() as u64;
    crate::metrics::retention(group.id, before.saturating_sub(after), retained.start_offset);
    if purged.is_ok() {
        tracing::debug!(
            log = name,
            upto = retained.upto_index,
            start_offset = retained.start_offset,
            segments = before.saturating_sub(after),
            "retention purged the log"
        );
    }
    Ok(())
}

/// How long a retention round waits for a snapshot or a purge it asked for.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(first: u64, last: u64, end_offset: u64, bytes: u64, sealed: bool) -> SegmentExtent {
        SegmentExtent { first_index: first, last_index: Some(last), end_offset, bytes, sealed }
    }

    fn log() -> Vec<SegmentExtent> {
        vec![seg(0, 9, 100, 10, true), seg(10, 19, 200, 10, true), seg(20, 29, 300, 10, true), seg(30, 35, 360, 6, false)]
    }

    #[test]
    fn byte_retention_cuts_whole_sealed_segments_oldest_first_while_over_the_bound() {
        let none = TimeMarks::default();
        // 36 bytes in all: the oldest go while more than the bound remains.
        assert_eq!(cut(&log(), Retained::default(), &none, 0, 16, 0), Judgement::Cut(Retained { upto_index: 19, start_offset: 200 }));
        assert_eq!(cut(&log(), Retained::default(), &none, 0, 26, 0), Judgement::Cut(Retained { upto_index: 9, start_offset: 100 }));
        assert_eq!(cut(&log(), Retained::default(), &none, 0, 36, 0), Judgement::Keep);
        // The active segment never goes, whatever the bound.
        assert_eq!(cut(&log(), Retained::default(), &none, 0, 1, 0), Judgement::Cut(Retained { upto_index: 29, start_offset: 300 }));
        // Segments at or below the applied cut are not counted again.
        assert_eq!(cut(&log(), Retained { upto_index: 19, start_offset: 200 }, &none, 0, 16, 0), Judgement::Keep);
    }

    #[test]
    fn age_retention_goes_by_when_the_partition_clock_saw_a_segment_complete() {
        let mut marks = TimeMarks::default();
        marks.note(100, 1_000); // segment 0..=9 (offsets < 100) stored by t=1,000
        marks.note(250, 5_000); // segment 10..=19 (offsets < 200) stored by t=5,000
        assert_eq!(cut(&log(), Retained::default(), &marks, 10_000, 0, 12_000), Judgement::Cut(Retained { upto_index: 9, start_offset: 100 }));
        assert_eq!(cut(&log(), Retained::default(), &marks, 10_000, 0, 16_000), Judgement::Cut(Retained { upto_index: 19, start_offset: 200 }));
        // Segment 20..=29 has no time yet: a tick would give it one.
        assert_eq!(cut(&log(), Retained { upto_index: 19, start_offset: 200 }, &marks, 10_000, 0, 99_000), Judgement::NeedsTime);
        assert_eq!(cut(&log(), Retained::default(), &marks, 10_000, 0, 5_000), Judgement::Keep);
    }

    #[test]
    fn a_quiet_partitions_aged_out_active_segment_asks_for_a_tick_that_rolls_it() {
        let only_active = vec![seg(0, 9, 100, 10, false)];
        let mut marks = TimeMarks::default();
        assert_eq!(cut(&only_active, Retained::default(), &marks, 10_000, 0, 1_000), Judgement::NeedsTime, "its time is not known yet");
        marks.note(100, 1_000);
        assert_eq!(cut(&only_active, Retained::default(), &marks, 10_000, 0, 5_000), Judgement::Keep, "not old yet");
        assert_eq!(cut(&only_active, Retained::default(), &marks, 10_000, 0, 12_000), Judgement::NeedsTime, "old: a tick rolls it");
        let emptied = vec![seg(10, 12, 100, 3, false)];
        assert_eq!(cut(&emptied, Retained { upto_index: 9, start_offset: 100 }, &marks, 10_000, 0, 99_000), Judgement::Keep, "no messages left to age out");
    }
}
