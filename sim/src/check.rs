//! The safety invariants, checked incrementally after every step of a run:
//! - committed prefixes agree: an entry some replica applied at (group, index) is the
//!   same on every replica that ever applies that index, across restarts;
//! - offsets are never reused: each entry's base offset is the previous entry's base
//!   offset plus its record count;
//! - every write is stored at most once, and an acknowledged write is the entry at the
//!   index and offset it was acknowledged with (at the end: present on every replica).

use std::collections::BTreeMap;

use keel_broker::replication::log_store::KIND_BATCH;
use keel_storage::Entry;

use crate::network::{GroupId, NodeId};
use crate::world::{World, NODES};

/// What identifies an applied entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sig {
    pub term: u64,
    pub kind: u8,
    pub base_offset: u64,
    pub record_count: u32,
    /// The write this batch carries (its record's timestamp), for batches.
    pub write: Option<u64>,
    pub crc: u32,
}

impl Sig {
    fn of(e: &Entry) -> Sig {
        let write = (e.meta.kind == KIND_BATCH).then_some(e.meta.max_timestamp_ms as u64);
        Sig {
            term: e.meta.id.term,
            kind: e.meta.kind,
            base_offset: e.meta.base_offset,
            record_count: e.meta.record_count,
            write,
            crc: crc32c::crc32c(&e.payload),
        }
    }
}

/// An acknowledged write: where the leader said it was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub write: u64,
    pub group: GroupId,
    pub index: u64,
    pub offset: u64,
}

#[derive(Default)]
pub struct Checker {
    committed: BTreeMap<(GroupId, u64), Sig>,
    /// Where each write was seen committed.
    writes: BTreeMap<u64, (GroupId, u64)>,
    /// Per replica: (incarnation, next index to check).
    cursor: BTreeMap<(NodeId, GroupId), (u64, u64)>,
    pub acks: Vec<Ack>,
}

impl Checker {
    /// Checks everything the live replicas applied since the last check.
    pub fn check(&mut self, world: &World) -> Result<(), String> {
        for node in NODES {
            for &group in &world.groups {
                let Some(r) = world.replica(node, group) else { continue };
                let incarnation = world.incarnation(node);
                let Some(applied) = r.applied.borrow().map(|l| l.index) else { continue };
                let cursor = self.cursor.entry((node, group)).or_insert((incarnation, 0));
                if cursor.0 != incarnation {
                    *cursor = (incarnation, 0);
                }
                let from = cursor.1;
                if applied < from {
                    continue;
                }
                let entries = r
                    .log
                    .read(from..applied + 1, u64::MAX)
                    .map_err(|e| format!("node {node} group {group}: reading applied entries {from}..={applied}: {e}"))?;
                let mut expect = from;
                for e in &entries {
                    let index = e.meta.id.index;
                    if index != expect {
                        return Err(format!("node {node} group {group}: applied up to {applied} but its log has no entry {expect} (next is {index})"));
                    }
                    self.observe(node, group, index, Sig::of(e))?;
                    expect += 1;
                }
                if expect <= applied {
                    return Err(format!("node {node} group {group}: applied up to {applied} but its log ends before {expect}"));
                }
                self.cursor.insert((node, group), (incarnation, expect));
            }
        }
        for a in &self.acks {
            if let Some(sig) = self.committed.get(&(a.group, a.index)) {
                if sig.write != Some(a.write) || sig.base_offset != a.offset {
                    return Err(format!(
                        "acknowledged write {} (group {}, index {}, offset {}) was lost: the committed entry there is {:?}",
                        a.write, a.group, a.index, a.offset, sig
                    ));
                }
            }
        }
        Ok(())
    }

    fn observe(&mut self, node: NodeId, group: GroupId, index: u64, sig: Sig) -> Result<(), String> {
        if let Some(seen) = self.committed.get(&(group, index)) {
            if *seen != sig {
                return Err(format!("committed entries diverge: group {group} index {index}: node {node} applied {sig:?}, earlier {seen:?}"));
            }
            return Ok(());
        }
        if let Some(prev) = index.checked_sub(1).and_then(|p| self.committed.get(&(group, p))) {
            let expected = prev.base_offset + u64::from(prev.record_count);
            if sig.base_offset != expected {
                return Err(format!(
                    "offsets reused or skipped: group {group} index {index} has base offset {} after {prev:?} (expected {expected})",
                    sig.base_offset
                ));
            }
        }
        if let Some(w) = sig.write {
            if let Some((g, i)) = self.writes.insert(w, (group, index)) {
                return Err(format!("write {w} stored twice: group {g} index {i} and group {group} index {index}"));
            }
        }
        self.committed.insert((group, index), sig);
        Ok(())
    }

    /// At the end: every acknowledged write was seen committed where it was acknowledged.
    pub fn check_all_acked_present(&self) -> Result<(), String> {
        for a in &self.acks {
            if !self.committed.contains_key(&(a.group, a.index)) {
                return Err(format!("acknowledged write {} (group {}, index {}) is on no replica after healing", a.write, a.group, a.index));
            }
        }
        Ok(())
    }

    /// A digest of what was committed, for comparing two runs of one seed.
    pub fn digest(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for ((g, i), s) in &self.committed {
            for v in [*g, *i, s.term, s.base_offset, u64::from(s.crc), s.write.unwrap_or(u64::MAX)] {
                h = (h ^ v).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    pub fn committed_entries(&self) -> usize {
        self.committed.len()
    }
}
