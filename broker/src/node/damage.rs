//! A group whose log lost entries this node had acknowledged.
//!
//! Raft assumes that what a replica acknowledged stays on its disk. When it does not —
//! a segment tail truncated or bit-flipped while the node was down — the replica looks
//! merely behind, votes for a lagging candidate, and that candidate, once elected,
//! truncates the last intact copy: acknowledged writes are lost (Jepsen, NATS 2.12.1).
//! Keel's node keeps an ack ledger (`keel_storage::ledger`) of the highest log id it
//! reported durable per group, written only after the data is durable and synced before
//! anyone is told. When a group opens:
//!
//! - recovered last id `>=` its record (or nothing recorded): intact — a crash only ever
//!   loses what was never reported;
//! - recovered last id `<` its record `W`: **damaged**. Until its log reaches `W` again
//!   the node grants a (pre-)vote only to a candidate whose log reaches `W` (it votes as
//!   if the lost entries were still there), does not campaign, and does not resume a
//!   leadership it held. A leader that finds its log shorter than it was restarts its
//!   search for where they agree and resends (`allow_log_reversion`,
//!   `replication/config.rs`). Any quorum that elects a
//!   leader then meets every quorum that committed an entry in a voter that either holds
//!   it or refuses candidates without it, so leader completeness holds however many
//!   replicas are damaged; with too many, the group waits for a copy rather than lose
//!   data;
//! - no valid record but the ledger is damaged: **unknown**. The group is refilled as if
//!   its state were lost (`rejoin`): no vote at all until it has caught up with the
//!   leader's log as of the first probe.

use std::time::Instant;

use keel_storage::{AckLedger, Acked, Log, LogId};
use openraft::async_runtime::watch::WatchReceiver;

use super::limits::REJOIN_CATCH_UP_POLL;
use crate::peer::wire::GroupId;
use crate::peer::HostedGroup;

/// What the ack ledger says of a group's log as opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The log holds everything this node acknowledged.
    Intact,
    /// The log lost acknowledged entries; it must reach this id again.
    Damaged(LogId),
    /// The ledger cannot say (it is damaged itself).
    Unknown,
}

/// Compares the log with the ledger's record of what this node acknowledged.
pub fn judge(ledger: &AckLedger, group: GroupId, log: &Log) -> Verdict {
    if crate::sabotage::active(crate::sabotage::Sabotage::IgnoreLedger) {
        return Verdict::Intact;
    }
    let last = log.state().last;
    match ledger.acked(group) {
        Acked::Never => Verdict::Intact,
        Acked::Upto(w) if last.is_some_and(|l| l >= w) => Verdict::Intact,
        Acked::Upto(w) => Verdict::Damaged(w),
        Acked::Unknown => Verdict::Unknown,
    }
}

/// Keeps a damaged group out of elections until its log durably reaches `floor` again
/// (see the module docs). Returns the task that lifts the guard.
pub fn guard(group_id: GroupId, group: &HostedGroup, floor: LogId) -> tokio::task::JoinHandle<()> {
    *group.vote_floor.lock().expect("vote floor lock poisoned") = Some(floor);
    group.raft.runtime_config().elect(false);
    crate::metrics::record_group_damage(group_id, true);
    let group = group.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        tracing::error!(
            group = group_id,
            lost_after = ?group.log.state().last,
            acknowledged = ?floor,
            "this replica's log lost entries it acknowledged (a damaged disk, not a crash); it votes only for candidates holding them and waits to be refilled"
        );
        loop {
            if group.log.durable_last().is_some_and(|l| l >= floor) {
                break;
            }
            if group.raft.metrics().borrow_watched().running_state.is_err() {
                crate::metrics::record_group_damage(group_id, false);
                return;
            }
            tokio::time::sleep(REJOIN_CATCH_UP_POLL).await;
        }
        *group.vote_floor.lock().expect("vote floor lock poisoned") = None;
        group.raft.runtime_config().elect(true);
        crate::metrics::record_group_damage(group_id, false);
        tracing::info!(
            group = group_id,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "damaged replica refilled past what it had acknowledged; voting again"
        );
    })
}
