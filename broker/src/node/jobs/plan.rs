//! What a job writes for a stretch of its source, decided without I/O.
//!
//! **Replay.** A source partition's selected records are written, in order, to the
//! same partition of the target in *copy batches*. A copy batch starts at the first
//! selected record at or after the previous batch's end and takes selected records
//! until it holds `chunk_records` of them, or the next selected record does not fit
//! `chunk_bytes` or belongs to another priority lane (batches never mix lanes), or
//! the range ends. These boundaries depend only on the spec and the source, never on
//! where a runner started: planning from any batch boundary (a checkpoint), or from
//! anywhere between a batch's end and the next selected record, gives the same
//! batches. The first record of each copy batch carries the message id
//! `replay_marker(job, partition, offset of that record)`, so a runner resuming after
//! a crash recognises in the target every batch written after its last checkpoint and
//! does not write it again.
//!
//! **Redrive.** Each selected dead letter becomes a new message of its target
//! partition (the partition it came from, or that index modulo the target's
//! partitions) — its key, value and headers, without the failure record, with
//! `keel-redrive-count` one higher and `keel-redriven-from` naming the dead letter —
//! under the message id `redrive_id(job, dead-letter offset)`. One redriven too often
//! goes whole to the quarantine topic under `quarantine_id`. Ids are per record, so a
//! resumed runner skips exactly the letters it finds written.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use keel_protocol::batch::{DELIVER_AT_HEADER, MESSAGE_ID_HEADER};
use keel_protocol::job::{
    quarantine_id, redrive_count, redrive_id, replay_marker, JobSpec, OffsetRanges, Selection, FAILURE_HEADER, ORIGIN_ID_HEADER, REDRIVEN_FROM_HEADER,
    REDRIVE_COUNT_HEADER,
};
use keel_protocol::{BatchBuilder, BatchOptions, BatchView, BuildError, NewRecord, RecordView};

/// Why a stretch cannot be planned: the job cannot go on as specified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("source offset {offset} does not fit a copy batch: {error} (the target's max_message_bytes is too small for it)")]
    TooLarge { offset: u64, error: String },
    #[error("source offset {offset} cannot be copied: {error}")]
    Invalid { offset: u64, error: String },
    #[error("source batch at offset {offset} does not decode: {error}")]
    Corrupt { offset: u64, error: String },
}

/// One copy batch of a replay.
#[derive(Debug)]
pub struct Chunk {
    /// Source offset of its first record (the one carrying the marker).
    pub first: u64,
    /// The first source offset after the batch's stretch.
    pub end: u64,
    pub records: u32,
    /// Source records of its stretch that the filter left out.
    pub skipped: u64,
    /// The batch to append to the target partition.
    pub batch: Bytes,
}

/// Replay copy batches planned over the source batches at hand.
#[derive(Debug, Default)]
pub struct ReplayPlan {
    /// Whole copy batches, in order.
    pub chunks: Vec<Chunk>,
    /// Where the next plan starts: after the last whole batch, or after records that
    /// were all left out.
    pub next: u64,
    /// Records left out between the last whole batch's end and `next`.
    pub tail_skipped: u64,
}

/// Plans a replay of one partition from `next` (a copy-batch boundary) up to the
/// range's end `until`, over `views` (the source's batches covering `next..`, in
/// order). A copy batch that the batches at hand end in the middle of is left for the
/// next plan, which will have more of the source. `target_lanes` caps the lane the
/// copies are written to (a target with fewer lanes than the source).
pub fn plan_replay(spec: &JobSpec, job: u64, partition: u32, next: u64, until: u64, views: &[BatchView], target_lanes: u8) -> Result<ReplayPlan, PlanError> {
    struct Open {
        first: u64,
        lane: u8,
        records: u32,
        builder: BatchBuilder,
    }
    let mut plan = ReplayPlan { next, ..ReplayPlan::default() };
    let mut open: Option<Open> = None;
    // Records left out since the last whole batch's end.
    let mut skipped = 0u64;
    let mut headers: Vec<(&str, Option<&[u8]>)> = Vec::new();
    let close = |plan: &mut ReplayPlan, open: Open, end: u64, skipped: &mut u64| -> Result<(), PlanError> {
        let batch = open.builder.finish().map_err(|e| PlanError::Invalid { offset: open.first, error: e.to_string() })?;
        plan.chunks.push(Chunk { first: open.first, end, records: open.records, skipped: *skipped, batch });
        plan.next = end;
        *skipped = 0;
        Ok(())
    };
    for view in views {
        let base = view.header().base_offset;
        let lane = view.header().priority;
        for record in view.records() {
            let record = record.map_err(|e| PlanError::Corrupt { offset: base, error: e.to_string() })?;
            let offset = base + u64::from(record.offset_delta);
            if offset < plan.next {
                continue;
            }
            if offset >= until {
                if let Some(o) = open.take() {
                    close(&mut plan, o, until, &mut skipped)?;
                }
                plan.next = until;
                plan.tail_skipped = skipped;
                return Ok(plan);
            }
            if !matches!(spec.select(offset, &record), Selection::Copy(_)) {
                skipped += 1;
                continue;
            }
            if open.as_ref().is_some_and(|o| o.lane != lane) {
                let o = open.take().expect("checked");
                close(&mut plan, o, offset, &mut skipped)?;
            }
            copy_headers(&record, &mut headers);
            if let Some(o) = open.as_mut() {
                match o.builder.push(copy_of(&record, &headers, None)) {
                    Ok(()) => o.records += 1,
                    Err(BuildError::BatchFull { .. }) => {
                        let o = open.take().expect("checked");
                        close(&mut plan, o, offset, &mut skipped)?;
                    }
                    Err(e) => return Err(PlanError::Invalid { offset, error: e.to_string() }),
                }
            }
            if open.is_none() {
                let options =
                    BatchOptions { priority: lane.min(target_lanes.saturating_sub(1)), size_max: spec.chunk_bytes as usize, ..BatchOptions::default() };
                let mut builder = BatchBuilder::new(options).map_err(|e| PlanError::Invalid { offset, error: e.to_string() })?;
                let marker = replay_marker(job, partition, offset);
                builder.push(copy_of(&record, &headers, Some(marker.as_bytes()))).map_err(|e| match e {
                    BuildError::RecordTooLarge { .. } | BuildError::BatchFull { .. } => PlanError::TooLarge { offset, error: e.to_string() },
                    e => PlanError::Invalid { offset, error: e.to_string() },
                })?;
                open = Some(Open { first: offset, lane, records: 1, builder });
            }
            if open.as_ref().is_some_and(|o| o.records >= spec.chunk_records) {
                let o = open.take().expect("checked");
                close(&mut plan, o, offset + 1, &mut skipped)?;
            }
        }
    }
    let data_end = views.last().map_or(0, |last| last.header().base_offset + u64::from(last.header().record_count));
    if data_end >= until {
        // The source at hand reaches the range's end: the open batch ends there.
        if let Some(o) = open.take() {
            close(&mut plan, o, until, &mut skipped)?;
        }
        plan.next = until;
        plan.tail_skipped = skipped;
    } else if open.is_none() && data_end > plan.next {
        // Everything after the last whole batch was left out: move past it.
        plan.next = data_end;
        plan.tail_skipped = skipped;
    }
    Ok(plan)
}

/// The headers of `record`'s copy, into `out`: its own message id moved to
/// `ORIGIN_ID_HEADER` (the copy's id slot is the job's), its delivery time left to
/// `NewRecord::deliver_at_ms`.
fn copy_headers<'v>(record: &RecordView<'v>, out: &mut Vec<(&'v str, Option<&'v [u8]>)>) {
    out.clear();
    for (k, v) in record.headers() {
        match k {
            MESSAGE_ID_HEADER => out.push((ORIGIN_ID_HEADER, v)),
            DELIVER_AT_HEADER => {}
            _ => out.push((k, v)),
        }
    }
}

/// The copy of `record` with `headers` from [`copy_headers`]: same timestamp, key,
/// value and delivery time; the message id `id`.
fn copy_of<'a>(record: &RecordView<'a>, headers: &'a [(&'a str, Option<&'a [u8]>)], id: Option<&'a [u8]>) -> NewRecord<'a> {
    NewRecord { timestamp_ms: record.timestamp_ms, key: record.key, value: record.value, headers, message_id: id, deliver_at_ms: record.deliver_at_ms() }
}

/// Where a redriven record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Destination {
    /// This partition of the job's target.
    Target(u32),
    /// Partition 0 of the quarantine topic.
    Quarantine,
}

/// One record a redrive writes, owned (a refused batch is rebuilt without the records
/// an earlier run already stored).
#[derive(Debug, Clone)]
pub struct Redriven {
    /// The dead letter's offset.
    pub offset: u64,
    pub destination: Destination,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
    pub id: String,
}

impl Redriven {
    fn as_new<'a>(&'a self, headers: &'a [(&'a str, Option<&'a [u8]>)]) -> NewRecord<'a> {
        NewRecord {
            timestamp_ms: self.timestamp_ms,
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            headers,
            message_id: Some(self.id.as_bytes()),
            deliver_at_ms: None,
        }
    }
}

/// The first batch of at most `size_max` bytes from `records` (all for one
/// destination, at least one), and how many records it holds: the runner sends it,
/// then builds the next from the records after it (or, after a refusal, from those the
/// target did not hold yet).
pub fn redrive_batch(records: &[&Redriven], size_max: u32) -> Result<(Bytes, usize), PlanError> {
    let first = records.first().map_or(0, |r| r.offset);
    let options = BatchOptions { size_max: size_max as usize, ..BatchOptions::default() };
    let mut builder = BatchBuilder::new(options).map_err(|e| PlanError::Invalid { offset: first, error: e.to_string() })?;
    let mut n = 0;
    for r in records {
        let headers: Vec<(&str, Option<&[u8]>)> = r.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        match builder.push(r.as_new(&headers)) {
            Ok(()) => n += 1,
            Err(BuildError::BatchFull { .. }) if n > 0 => break,
            Err(e @ (BuildError::RecordTooLarge { .. } | BuildError::BatchFull { .. })) => {
                return Err(PlanError::TooLarge { offset: r.offset, error: e.to_string() })
            }
            Err(e) => return Err(PlanError::Invalid { offset: r.offset, error: e.to_string() }),
        }
    }
    Ok((builder.finish().map_err(|e| PlanError::Invalid { offset: first, error: e.to_string() })?, n))
}

/// A stretch of a redrive.
#[derive(Debug, Default)]
pub struct RedrivePlan {
    /// Records to write, in dead-letter order (those found written already left out).
    pub writes: Vec<Redriven>,
    /// The first dead-letter offset after the stretch.
    pub next: u64,
    pub copied: u64,
    pub skipped: u64,
    pub quarantined: u64,
    /// The dead letters moved in the stretch (redriven or quarantined).
    pub moved: OffsetRanges,
}

/// Plans up to `spec.chunk_records` dead letters of a redrive in `next..until`, over
/// `views`. `written` holds the dead-letter offsets whose copies are in the targets
/// already (found after a failover): counted, not written again. `dead_letter_topic`
/// and `target_partitions` shape the copies; `now_ms` is their timestamp.
pub fn plan_redrive(
    spec: &JobSpec,
    job: u64,
    std::ops::Range { start: next, end: until }: std::ops::Range<u64>,
    views: &[BatchView],
    written: &BTreeSet<u64>,
    target_partitions: u32,
    now_ms: i64,
) -> Result<RedrivePlan, PlanError> {
    let mut plan = RedrivePlan { next, ..RedrivePlan::default() };
    let mut handled = 0u32;
    for view in views {
        let base = view.header().base_offset;
        for record in view.records() {
            let record = record.map_err(|e| PlanError::Corrupt { offset: base, error: e.to_string() })?;
            let offset = base + u64::from(record.offset_delta);
            if offset < plan.next {
                continue;
            }
            if offset >= until || handled >= spec.chunk_records {
                plan.next = offset.min(until);
                return Ok(plan);
            }
            handled += 1;
            plan.next = offset + 1;
            let destination = match spec.select(offset, &record) {
                Selection::Skip => {
                    plan.skipped += 1;
                    continue;
                }
                Selection::Copy(letter) => {
                    plan.copied += 1;
                    let p = letter.map_or(0, |l| l.source.partition);
                    Destination::Target(if p < target_partitions { p } else { p % target_partitions.max(1) })
                }
                Selection::Quarantine(_) => {
                    plan.quarantined += 1;
                    Destination::Quarantine
                }
            };
            plan.moved.insert(offset, offset + 1);
            if written.contains(&offset) {
                continue;
            }
            let redrives = redrive_count(record.headers());
            let mut headers: Vec<(String, Option<Bytes>)> = Vec::new();
            let (id, timestamp_ms) = match destination {
                Destination::Target(_) => {
                    for (k, v) in record.headers() {
                        if k != FAILURE_HEADER && k != REDRIVE_COUNT_HEADER && k != REDRIVEN_FROM_HEADER && k != MESSAGE_ID_HEADER && k != DELIVER_AT_HEADER {
                            headers.push((k.to_string(), v.map(Bytes::copy_from_slice)));
                        }
                    }
                    headers.push((REDRIVE_COUNT_HEADER.to_string(), Some(Bytes::from((redrives + 1).to_string()))));
                    headers.push((REDRIVEN_FROM_HEADER.to_string(), Some(Bytes::from(format!("{}@{offset}", spec.source)))));
                    (redrive_id(job, offset), now_ms)
                }
                Destination::Quarantine => {
                    for (k, v) in record.headers() {
                        if k != MESSAGE_ID_HEADER && k != DELIVER_AT_HEADER {
                            headers.push((k.to_string(), v.map(Bytes::copy_from_slice)));
                        }
                    }
                    (quarantine_id(job, offset), record.timestamp_ms)
                }
            };
            plan.writes.push(Redriven {
                offset,
                destination,
                timestamp_ms,
                key: record.key.map(Bytes::copy_from_slice),
                value: record.value.map(Bytes::copy_from_slice),
                headers,
                id,
            });
        }
    }
    if let Some(last) = views.last() {
        plan.next = plan.next.max((last.header().base_offset + u64::from(last.header().record_count)).min(until));
    }
    Ok(plan)
}

/// The writes of a plan grouped by destination, in order within each.
pub fn by_destination(writes: &[Redriven]) -> BTreeMap<Destination, Vec<&Redriven>> {
    let mut out: BTreeMap<Destination, Vec<&Redriven>> = BTreeMap::new();
    for w in writes {
        out.entry(w.destination).or_default().push(w);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_protocol::batch::stamp_base_offset;
    use keel_protocol::job::{parse_replay_marker, JobFilter, JobKind, PartitionRange, QuarantineRule, RedriveFilter};

    fn spec(chunk_records: u32, chunk_bytes: u32, key: Option<&str>) -> JobSpec {
        JobSpec {
            kind: JobKind::Replay,
            source: "orders".into(),
            target: "orders.recon".into(),
            ranges: vec![PartitionRange { partition: 0, from: 0, until: 1_000 }],
            filter: JobFilter { key: key.map(String::from), headers: vec![] },
            redrive: RedriveFilter::default(),
            quarantine: None,
            exclude: OffsetRanges::default(),
            rate: 0,
            chunk_records,
            chunk_bytes,
            requested_by: "test".into(),
            request_id: String::new(),
        }
    }

    /// A source partition: batches of 1..=7 records, keys `a`/`b`, values of varying
    /// size, some lanes, one record with its own message id.
    fn source() -> Vec<BatchView> {
        let mut out = Vec::new();
        let mut offset = 0u64;
        for b in 0..60u64 {
            let lane = if b % 9 == 4 { 2 } else { 0 };
            let mut builder = BatchBuilder::new(BatchOptions { priority: lane, ..BatchOptions::default() }).unwrap();
            for r in 0..(b % 7 + 1) {
                let key = if (b + r) % 3 == 0 { "a" } else { "b" };
                let value = vec![b as u8; (50 + 37 * ((b * 7 + r) % 11)) as usize];
                let id = format!("own-{offset}");
                let own = (offset == 17).then_some(id.as_bytes());
                builder
                    .push(NewRecord {
                        timestamp_ms: 1_000 + offset as i64,
                        key: Some(key.as_bytes()),
                        value: Some(&value),
                        message_id: own,
                        ..NewRecord::default()
                    })
                    .unwrap();
                offset += 1;
            }
            let n = b % 7 + 1;
            let mut bytes = builder.finish().unwrap().to_vec();
            stamp_base_offset(&mut bytes, offset - n).unwrap();
            out.push(BatchView::validate(Bytes::from(bytes)).unwrap());
        }
        out
    }

    fn end_of(views: &[BatchView]) -> u64 {
        views.last().map_or(0, |v| v.header().base_offset + u64::from(v.header().record_count))
    }

    /// Plans the whole range as a runner does: fetches of `fetch` batches at a time,
    /// restarting from each plan's `next`, and, every `restart_every` chunks, from
    /// scratch at the last boundary (a new runner after a checkpoint).
    /// Returns every batch's (first, end, records) and the records left out in all.
    fn run(spec: &JobSpec, views: &[BatchView], from: u64, until: u64, fetch: usize) -> (Vec<(u64, u64, u32)>, u64) {
        let mut out = Vec::new();
        let mut skipped = 0;
        let mut next = from;
        let mut held: Vec<BatchView> = Vec::new();
        let mut fetched = 0;
        while next < until {
            let more = views.iter().skip(fetched).take(fetch).cloned().collect::<Vec<_>>();
            assert!(!more.is_empty() || !held.is_empty(), "ran out of source before {until}");
            fetched += more.len();
            held.extend(more);
            let plan = plan_replay(spec, 7, 0, next, until, &held, 1).unwrap();
            for c in &plan.chunks {
                out.push((c.first, c.end, c.records));
                skipped += c.skipped;
            }
            skipped += plan.tail_skipped;
            next = plan.next;
            held.retain(|v| v.header().base_offset + u64::from(v.header().record_count) > next);
        }
        (out, skipped)
    }

    #[test]
    fn copy_batches_are_the_same_however_the_source_arrives_and_wherever_a_runner_restarts() {
        let views = source();
        for (records, bytes, key, until) in [(5, 1 << 20, None, 0), (4_096, 2_000, None, 3), (3, 1 << 20, Some("a"), 0), (64, 900, Some("b"), 3)] {
            let until = end_of(&views) - until;
            let spec = spec(records, bytes, key);
            let whole = run(&spec, &views, 0, until, usize::MAX);
            for fetch in [1, 2, 5] {
                assert_eq!(run(&spec, &views, 0, until, fetch), whole, "fetching {fetch} batches at a time ({records} records, {bytes} bytes, {key:?})");
            }
            // A runner restarting at any boundary (a checkpoint) makes the same batches from there.
            let (whole, skipped) = whole;
            for (i, (_, end, _)) in whole.iter().enumerate() {
                let (resumed, _) = run(&spec, &views, *end, until, 3);
                assert_eq!(resumed, whole[i + 1..], "restarted at {end}");
            }
            // Every selected record of the range is copied once; copies and skips add up.
            let copied: u64 = whole.iter().map(|c| u64::from(c.2)).sum();
            let selected = views
                .iter()
                .flat_map(|v| {
                    v.records()
                        .map(|r| (v.header().base_offset + u64::from(r.as_ref().unwrap().offset_delta), r.unwrap().key.map(<[u8]>::to_vec)))
                        .collect::<Vec<_>>()
                })
                .filter(|(o, k)| *o < until && key.is_none_or(|want| k.as_deref() == Some(want.as_bytes())))
                .count() as u64;
            assert_eq!(copied, selected, "every selected record copied once ({records}, {bytes}, {key:?})");
            assert_eq!(copied + skipped, until, "and every other one counted as skipped");
            for w in whole.windows(2) {
                assert!(w[0].1 <= w[1].0, "batches do not overlap: {w:?}");
            }
        }
    }

    #[test]
    fn a_copy_keeps_the_record_and_carries_the_marker_on_its_first_record_and_never_mixes_lanes() {
        let views = source();
        let too_small = plan_replay(&spec(10, 100, None), 7, 0, 0, end_of(&views), &views, 1);
        assert!(matches!(too_small, Err(PlanError::TooLarge { offset: 0, .. })), "{too_small:?}");
        let spec = spec(4_096, 1 << 20, None);
        let plan = plan_replay(&spec, 7, 0, 0, end_of(&views), &views, 10).unwrap();
        let mut lanes = Vec::new();
        for c in &plan.chunks {
            let copy = BatchView::validate(c.batch.clone()).unwrap();
            let records: Vec<_> = copy.records().map(Result::unwrap).collect();
            assert_eq!(records.len() as u32, c.records);
            assert_eq!(parse_replay_marker(records[0].message_id().unwrap(), 7, 0), Some(c.first), "the marker names the first record's source offset");
            assert!(records[1..].iter().all(|r| r.message_id().is_none()));
            let lane = copy.header().priority;
            let source_lanes: BTreeSet<u8> = views
                .iter()
                .filter(|v| v.header().base_offset < c.end && v.header().base_offset + u64::from(v.header().record_count) > c.first)
                .map(|v| v.header().priority)
                .collect();
            assert_eq!(source_lanes, BTreeSet::from([lane]), "one lane per copy batch, the source's");
            lanes.push(lane);
        }
        assert!(lanes.contains(&2) && lanes.contains(&0));
        // The record with its own id keeps it under another header; the rest is the same.
        let copy17 = plan.chunks.iter().find(|c| c.first <= 17 && 17 < c.end).unwrap();
        let view = BatchView::validate(copy17.batch.clone()).unwrap();
        let r = view.records().map(Result::unwrap).nth((17 - copy17.first) as usize).unwrap();
        assert_eq!(r.headers().find(|(k, _)| *k == ORIGIN_ID_HEADER).and_then(|(_, v)| v), Some(&b"own-17"[..]));
        assert_eq!(r.timestamp_ms, 1_017);
        let capped = plan_replay(&spec, 7, 0, 0, end_of(&views), &views, 1).unwrap();
        assert!(capped.chunks.iter().all(|c| BatchView::validate(c.batch.clone()).unwrap().header().priority == 0), "a one-lane target gets lane 0");
    }

    fn letters() -> Vec<BatchView> {
        let mut builder = BatchBuilder::new(BatchOptions::default()).unwrap();
        for i in 0..6u64 {
            let failure = serde_json::json!({"source": {"topic": "orders", "partition": i % 3, "offset": 100 + i}, "group": "billing",
                "reason": if i == 4 { "timeout" } else { "declined" }, "attempts": 5, "dead_lettered_ms": 1_000})
            .to_string();
            let count = i.to_string();
            let mut headers = vec![(FAILURE_HEADER, Some(failure.as_bytes())), ("trace", Some(&b"t-1"[..]))];
            if i >= 2 {
                headers.push((REDRIVE_COUNT_HEADER, Some(count.as_bytes())));
            }
            builder.push(NewRecord { timestamp_ms: 900, key: Some(b"k"), value: Some(b"v"), headers: &headers, ..NewRecord::default() }).unwrap();
        }
        vec![BatchView::validate(builder.finish().unwrap()).unwrap()]
    }

    #[test]
    fn a_redrive_sends_each_letter_home_counts_its_redrives_and_quarantines_the_ones_past_the_limit() {
        let redrive = JobSpec {
            kind: JobKind::Redrive,
            source: "orders.dlq".into(),
            target: "orders".into(),
            quarantine: Some(QuarantineRule { max_redrives: 4, topic: "orders.quarantine".into() }),
            redrive: RedriveFilter { reason: Some("declined".into()), ..RedriveFilter::default() },
            ..spec(100, 1 << 20, None)
        };
        let spec = redrive;
        let plan = plan_redrive(&spec, 9, 0..6, &letters(), &BTreeSet::new(), 2, 5_000).unwrap();
        assert_eq!((plan.next, plan.copied, plan.skipped, plan.quarantined), (6, 4, 1, 1));
        let dest: Vec<(u64, Destination)> = plan.writes.iter().map(|w| (w.offset, w.destination)).collect();
        assert_eq!(
            dest,
            [(0, Destination::Target(0)), (1, Destination::Target(1)), (2, Destination::Target(0)), (3, Destination::Target(0)), (5, Destination::Quarantine)],
            "home partition (2 of a 2-partition target wraps to 0); letter 4 has another reason; letter 5 was redriven 5 times"
        );
        let w = &plan.writes[3];
        let header = |w: &Redriven, k: &str| w.headers.iter().find(|(n, _)| n == k).and_then(|(_, v)| v.clone());
        assert_eq!(header(w, REDRIVE_COUNT_HEADER).as_deref(), Some(&b"4"[..]), "redriven 3 times before: now 4");
        assert_eq!(header(w, REDRIVEN_FROM_HEADER).as_deref(), Some(&b"orders.dlq@3"[..]));
        assert!(header(w, FAILURE_HEADER).is_none() && header(w, "trace").is_some(), "the failure record stays behind, the rest travels");
        assert_eq!((w.id.as_str(), w.timestamp_ms), ("redrive:9:3", 5_000), "a new message");
        assert!(header(&plan.writes[4], FAILURE_HEADER).is_some(), "a quarantined letter keeps its failure record");
        assert_eq!(plan.moved.ranges(), &[(0, 4), (5, 6)]);
        // A resumed runner that found letters 0 and 5 written writes the others only.
        let resumed = plan_redrive(&spec, 9, 0..6, &letters(), &BTreeSet::from([0, 5]), 2, 5_000).unwrap();
        assert_eq!(resumed.writes.iter().map(|w| w.offset).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!((resumed.copied, resumed.quarantined), (4, 1), "found copies still count");
        // Chunks of 2 letters at a time cover the same ground.
        let small = JobSpec { chunk_records: 2, ..spec.clone() };
        let (mut next, mut offsets) = (0, Vec::new());
        while next < 6 {
            let p = plan_redrive(&small, 9, next..6, &letters(), &BTreeSet::new(), 2, 5_000).unwrap();
            offsets.extend(p.writes.iter().map(|w| w.offset));
            next = p.next;
        }
        assert_eq!(offsets, [0, 1, 2, 3, 5]);
        let (batch, n) = redrive_batch(&plan.writes.iter().collect::<Vec<_>>(), 1 << 20).unwrap();
        assert_eq!(n, 5, "all five fit one batch");
        let view = BatchView::validate(batch).unwrap();
        assert_eq!(view.records().map(|r| r.unwrap().message_id().map(<[u8]>::to_vec)).collect::<Vec<_>>()[0].as_deref(), Some(&b"redrive:9:0"[..]));
    }
}
