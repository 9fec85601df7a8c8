//! The replay rows (workload W4 `replay`): a replay job that ended `done` left in each
//! target partition exactly the messages of its source range — every one, once, in
//! order — whatever faults it lived through. The source and target contents are the
//! nodes' final logs (the longest of the three, which the other rows check agree).

use std::collections::{BTreeMap, HashMap};

use super::{NodeLog, Partition, Rows, Stats, Verdict};
use crate::history::ReplayOp;

/// Every replay row and its verdict.
pub(super) const ROWS: &[(&str, Verdict)] = &[
    ("replay-lost", Verdict::Forbidden),
    ("replay-duplicated", Verdict::Forbidden),
    ("replay-reordered", Verdict::Forbidden),
    ("replay-extra", Verdict::Forbidden),
    // A job that did not end `done` in the healed cluster within the limit.
    ("replay-unfinished", Verdict::Forbidden),
    // A create that kept failing through the faults (no job to check).
    ("replay-not-created", Verdict::Allowed),
];

/// The longest of the nodes' final logs of `part`, as messages in offset order.
fn longest(logs: Option<&Vec<NodeLog>>) -> Option<&BTreeMap<u64, String>> {
    logs?.iter().map(|(_, log)| log).max_by_key(|log| log.len())
}

/// Checks every replay job: `replays` are their completions (`None` state: never
/// created), `source` the W1 topic's final logs, `targets` the target topics'.
pub(super) fn check(
    replays: &[(ReplayOp, bool)],
    source_topic: &str,
    source: &BTreeMap<Partition, Vec<NodeLog>>,
    targets: &BTreeMap<Partition, Vec<NodeLog>>,
    rows: &mut Rows,
    stats: &mut Stats,
) {
    for (op, created) in replays {
        if !created {
            rows.row("replay-not-created").add(|| format!("replay into {} was never created", op.target));
            continue;
        }
        if op.state.as_deref() != Some("done") {
            rows.row("replay-unfinished").add(|| format!("replay job {:?} into {} ended {:?}", op.job, op.target, op.state));
            continue;
        }
        stats.replays_done += 1;
        for &(partition, from, until) in &op.ranges {
            let want: Vec<&String> =
                longest(source.get(&(source_topic.to_string(), partition))).map_or(Vec::new(), |log| log.range(from..until).map(|(_, m)| m).collect());
            let got: Vec<&String> = longest(targets.get(&(op.target.clone(), partition))).map_or(Vec::new(), |log| log.values().collect());
            stats.replayed += got.len() as u64;
            let where_ = |m: &str| format!("{} partition {partition} (source {from}..{until}): {m}", op.target);
            let mut copies: HashMap<&str, u32> = HashMap::new();
            for m in &got {
                *copies.entry(m.as_str()).or_default() += 1;
            }
            let wanted: HashMap<&str, ()> = want.iter().map(|m| (m.as_str(), ())).collect();
            for m in &want {
                if !copies.contains_key(m.as_str()) {
                    rows.row("replay-lost").add(|| where_(m));
                }
            }
            for (m, n) in &copies {
                if *n > 1 {
                    rows.row("replay-duplicated").add(|| where_(&format!("{m} × {n}")));
                }
                if !wanted.contains_key(m) {
                    rows.row("replay-extra").add(|| where_(m));
                }
            }
            let mut seen = std::collections::HashSet::new();
            let first_copies: Vec<&String> = got.iter().copied().filter(|m| seen.insert(m.as_str())).collect();
            let kept: Vec<&String> = want.iter().copied().filter(|m| copies.contains_key(m.as_str())).collect();
            if first_copies.iter().filter(|m| wanted.contains_key(m.as_str())).copied().collect::<Vec<_>>() != kept {
                rows.row("replay-reordered").add(|| where_("the target's order differs from the source's"));
            }
        }
    }
}
