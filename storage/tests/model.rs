//! Model-based property test: random appends, flushes, truncations, purges, clean
//! reopens, crashes and (on the in-memory disk) power cuts against a model of what the
//! log must hold.
//!
//! Segments are tiny (4 KiB) and the tail cache is 1 KiB, so rolls, sealed-segment
//! index files and reads from disk all happen within a few operations.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use keel_storage::disk::MemoryDisk;
use keel_storage::{Disk, Entry, EntryMeta, Log, LogConfig, LogId};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Append this many entries with these payload sizes and record counts.
    Append(Vec<(usize, u32)>, bool),
    Flush,
    /// Keep this fraction (per mille) of the entries above the purge point.
    Truncate(u16),
    /// Purge this fraction (per mille) of the entries.
    Purge(u16),
    Reopen,
    /// Drop without flushing: only durable entries may survive.
    Crash,
    /// Cut the power (in-memory disk only), letting this fraction (per mille) of each
    /// file's unsynced appended bytes reach the disk anyway (a torn write).
    PowerLoss(u16),
    /// Read a sub-range with a byte budget.
    Read(u16, u16, u16),
    /// Look up the entry holding an offset.
    FindOffset(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (proptest::collection::vec((0usize..700, 0u32..4), 1..6), any::<bool>()).prop_map(|(v, t)| Op::Append(v, t)),
        3 => Just(Op::Flush),
        1 => (0u16..1000).prop_map(Op::Truncate),
        1 => (0u16..1000).prop_map(Op::Purge),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        1 => prop_oneof![Just(0u16), 0u16..1000].prop_map(Op::PowerLoss),
        2 => (0u16..1000, 0u16..1000, 0u16..2000).prop_map(|(a, b, c)| Op::Read(a, b, c)),
        1 => (0u16..1000).prop_map(Op::FindOffset),
    ]
}

#[derive(Debug, Default)]
struct Model {
    entries: Vec<Entry>,
    purged: Option<LogId>,
    /// Offset of the first message after the purge point.
    start_offset: u64,
    term: u64,
    counter: u8,
}

impl Model {
    fn next_index(&self) -> u64 {
        self.entries.last().map(|e| e.meta.id.index + 1).or(self.purged.map(|p| p.index + 1)).unwrap_or(1)
    }
    fn next_offset(&self) -> u64 {
        self.entries.last().map_or(self.start_offset, |e| e.meta.end_offset())
    }
}

fn config() -> LogConfig {
    LogConfig { segment_bytes: 4096, index_interval_bytes: 256, tail_cache_bytes: 1024, ..LogConfig::default() }
}

fn check(log: &Log, model: &Model) -> Result<(), TestCaseError> {
    let st = log.state();
    prop_assert_eq!(st.last, model.entries.last().map(|e| e.meta.id).or(model.purged));
    prop_assert_eq!(st.purged, model.purged);
    prop_assert_eq!(st.next_offset, model.next_offset());
    if !model.entries.is_empty() || model.purged.is_some() {
        prop_assert_eq!(st.next_index, model.next_index());
    }
    let all = log.read(0..u64::MAX, u64::MAX).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(all.len(), model.entries.len());
    for (got, want) in all.iter().zip(&model.entries) {
        prop_assert_eq!(got, want);
    }
    Ok(())
}

/// Runs `ops` on the OS disk (`memory: None`; power cuts are skipped) or on an
/// in-memory disk that can lose power.
fn run(ops: Vec<Op>, memory: Option<MemoryDisk>) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let (disk, dir): (Arc<dyn Disk>, &Path) = match &memory {
        Some(m) => (Arc::new(m.clone()), Path::new("/data/log")),
        None => (keel_storage::disk::os(), tmp.path()),
    };
    let open = || Log::open_on(disk.clone(), dir, config()).map_err(|e| TestCaseError::fail(e.to_string()));
    let mut log = Some(open()?);
    let mut model = Model { term: 1, ..Model::default() };
    for op in ops {
        let l = log.as_ref().unwrap();
        match op {
            Op::Append(specs, bump_term) => {
                if bump_term {
                    model.term += 1;
                }
                let mut batch = Vec::new();
                let mut offset = model.next_offset();
                for (index, (size, count)) in (model.next_index()..).zip(specs) {
                    model.counter = model.counter.wrapping_add(1);
                    let payload = Bytes::from(vec![model.counter; size]);
                    let meta = EntryMeta {
                        id: LogId { term: model.term, index },
                        kind: model.counter % 3,
                        base_offset: offset,
                        record_count: count,
                        max_timestamp_ms: 1_000 + index as i64,
                    };
                    batch.push(Entry { meta, payload });
                    offset += u64::from(count);
                }
                l.append(batch.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                model.entries.extend(batch);
            }
            Op::Flush => {
                let end = l.flush().map_err(|e| TestCaseError::fail(e.to_string()))?;
                if !model.entries.is_empty() || model.purged.is_some() {
                    prop_assert_eq!(end, model.next_index());
                }
            }
            Op::Truncate(per_mille) => {
                let keep_n = model.entries.len() * per_mille as usize / 1000;
                let keep = if keep_n == 0 { model.purged.map(|p| p.index) } else { Some(model.entries[keep_n - 1].meta.id.index) };
                if keep.is_none() && model.entries.is_empty() {
                    continue;
                }
                l.truncate_after(keep).map_err(|e| TestCaseError::fail(e.to_string()))?;
                model.entries.truncate(keep_n);
            }
            Op::Purge(per_mille) => {
                let n = model.entries.len() * per_mille as usize / 1000;
                if n == 0 {
                    continue;
                }
                let upto = model.entries[n - 1].meta.id;
                l.purge_upto(upto).map_err(|e| TestCaseError::fail(e.to_string()))?;
                model.start_offset = model.entries.get(n).map_or(model.next_offset(), |e| e.meta.base_offset);
                model.entries.drain(..n);
                model.purged = Some(upto);
            }
            Op::Reopen => {
                l.flush().map_err(|e| TestCaseError::fail(e.to_string()))?;
                drop(log.take());
                log = Some(open()?);
            }
            Op::Crash => {
                let durable_end = l.state().durable_end;
                drop(log.take());
                model.entries.retain(|e| e.meta.id.index < durable_end);
                log = Some(open()?);
            }
            Op::PowerLoss(torn_per_mille) => {
                let Some(memory) = &memory else { continue };
                let durable_end = l.state().durable_end;
                drop(log.take());
                memory.power_loss_keeping(|_, appended| appended * u64::from(torn_per_mille) / 1000);
                let reopened = open()?;
                // Everything reported durable is there, unchanged; beyond it, at most a
                // prefix of what was appended (torn writes that happened to land).
                let recovered = reopened.read(0..u64::MAX, u64::MAX).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let durable = model.entries.iter().filter(|e| e.meta.id.index < durable_end).count();
                prop_assert!(recovered.len() >= durable, "{} entries recovered, {} were durable", recovered.len(), durable);
                prop_assert!(recovered.len() <= model.entries.len());
                for (got, want) in recovered.iter().zip(&model.entries) {
                    prop_assert_eq!(got, want);
                }
                model.entries.truncate(recovered.len());
                log = Some(reopened);
            }
            Op::Read(a, b, budget) => {
                if model.entries.is_empty() {
                    continue;
                }
                let n = model.entries.len();
                let (lo, hi) = ((a as usize * n / 1000).min(n - 1), (b as usize * n / 1000).min(n - 1));
                let (lo, hi) = (lo.min(hi), lo.max(hi));
                let first = model.entries[lo].meta.id.index;
                let last = model.entries[hi].meta.id.index;
                let got = l.read(first..last + 1, u64::from(budget)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(!got.is_empty(), "a non-empty range returns at least one entry");
                prop_assert!(got.len() <= hi - lo + 1);
                for (g, w) in got.iter().zip(&model.entries[lo..]) {
                    prop_assert_eq!(g, w);
                }
                let payload: usize = got.iter().map(|e| e.payload.len()).sum();
                let without_last = payload - got.last().unwrap().payload.len();
                prop_assert!(without_last < budget as usize || got.len() == 1, "stops once the budget is spent");
            }
            Op::FindOffset(per_mille) => {
                let span = model.next_offset() - model.start_offset + 2;
                let offset = model.start_offset + span * u64::from(per_mille) / 1000;
                let want = model.entries.iter().find(|e| e.meta.record_count > 0 && e.meta.end_offset() > offset).map(|e| e.meta.id.index);
                let got = l.index_for_offset(offset).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(got, want, "offset {}", offset);
            }
        }
        check(log.as_ref().unwrap(), &model)?;
    }
    Ok(())
}

proptest! {
    // 64 cases in CI; set PROPTEST_CASES for a longer run.
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64), ..ProptestConfig::default() })]
    #[test]
    fn log_matches_model_under_random_append_truncate_purge_reopen_and_crash(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, None)?;
    }

    #[test]
    fn on_a_disk_that_loses_power_every_durable_entry_survives_and_nothing_else_appears(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, Some(MemoryDisk::new()))?;
    }
}
