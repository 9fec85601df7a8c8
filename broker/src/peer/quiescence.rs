//! Quiescence of one partition group on this node: whether its Raft ticks.
//!
//! An idle group costs its ticker (a wakeup every `heartbeat/5`) and, on the leader, a
//! heartbeat per follower every `heartbeat_ms`. A *quiesced* group does neither: its
//! Raft's ticker is parked (`runtime_config().tick(false)`), on the leader and on every
//! follower that agreed. Who decides and when is `crate::node::quiesce`; this is the
//! per-group state both the node's driver and the peer listener act on.
//!
//! **Safety does not rest on this.** A parked Raft still answers every RPC; a parked
//! follower merely never campaigns on its own (liveness is the node's job: its leader's
//! node seen dead wakes it), and a parked leader's quorum lease runs out, so it serves
//! nothing until a fresh quorum round after waking (`GroupHandle::awake`).
//!
//! Wakes, each counted by reason (`keel_group_wakes_total`):
//! - `use`: a write or read on the leader (it heartbeats at once and waits for a quorum);
//! - `entries`: a follower received entries, or a message of another term;
//! - `vote`: a vote request (an election is on);
//! - `prevote`: a pre-vote reached a quiesced leader (a node that does not hear it);
//! - `leader_lost`: the node of the group's leader was seen dead or restarted;
//! - `peer_returned`: a replica's node came back (it may have missed the group's leader);
//! - `asked`: a peer asked (its replica of the group stopped);
//! - `transfer`: leadership is being handed off.
//!
//! **Awake groups tick less.** `crate::node::ticks` stops the ticker of an awake
//! leader (it heartbeats it from a node-wide loop instead) and of an awake follower
//! whose last accepted AppendEntries ([`Sleep::contact`]) is recent ([`Sleep::listen`]),
//! and starts a follower's again as soon as that contact grows stale
//! ([`Sleep::unlisten`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::server::GroupRaft;

/// Why a group woke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeReason {
    Use,
    Entries,
    Vote,
    PreVote,
    LeaderLost,
    PeerReturned,
    Asked,
    Transfer,
}

impl WakeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            WakeReason::Use => "use",
            WakeReason::Entries => "entries",
            WakeReason::Vote => "vote",
            WakeReason::PreVote => "prevote",
            WakeReason::LeaderLost => "leader_lost",
            WakeReason::PeerReturned => "peer_returned",
            WakeReason::Asked => "asked",
            WakeReason::Transfer => "transfer",
        }
    }
}

/// What a quiesced group settled on: the leader, its term, and the last log id
/// `(term, index)` every replica that agreed holds and has committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quiet {
    pub term: u64,
    pub leader: u64,
    pub last: Option<(u64, u64)>,
}

#[derive(Debug)]
struct Inner {
    quiet: Option<Quiet>,
    /// Incremented by every use (write or read on this node).
    uses: u64,
    last_use: Instant,
    /// Time between the latest use and the one before it (zero before the first).
    use_gap: Duration,
    /// Set when a quiesced leader woke: reads and writes wait for a quorum
    /// acknowledgement sent after this instant.
    confirm_after: Option<Instant>,
    /// Whether the ticker is off because this awake replica is driven by the node
    /// (a leader heartbeated from there, a follower that hears its leader).
    listening: bool,
}

/// How idle a group is here ([`Sleep::idle`]).
#[derive(Debug, Clone, Copy)]
pub struct Idle {
    /// Time since the last write or read here.
    pub since_use: Duration,
    /// Time between that use and the one before it: long for a partition written now
    /// and then (one of a wide topic's), short for one written in a stream.
    pub use_gap: Duration,
    /// Uses so far.
    pub uses: u64,
}

/// One group's quiescence state on this node.
#[derive(Debug)]
pub struct Sleep {
    inner: Mutex<Inner>,
    /// Whether `inner.quiet` is set, readable without the lock (scans over thousands
    /// of groups).
    parked: AtomicBool,
    /// `inner.listening`, readable without the lock.
    listening: AtomicBool,
    /// How many times this replica parked (a parked replica with the same count as
    /// before has not woken in between).
    parks: AtomicU64,
    /// When this replica last accepted an AppendEntries: microseconds since
    /// [`clock_base`] (0: never).
    contact_us: AtomicU64,
}

/// Wakes so far, of every group in this process (every node of it, in a multi-node
/// test: one node's wake then only makes another list early): the tick driver (`crate::node::ticks`)
/// lists the awake groups again when this moved, so a woken group's own ticker runs for
/// at most one heartbeat before the node drives it.
static WAKES: AtomicU64 = AtomicU64::new(0);

/// How many groups woke in this process so far.
pub fn wakes_so_far() -> u64 {
    WAKES.load(Ordering::Acquire)
}

fn woke(reason: WakeReason) {
    WAKES.fetch_add(1, Ordering::AcqRel);
    crate::metrics::group_woke(reason);
}

/// The base of [`Sleep::contact`]'s clock.
fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

impl Default for Sleep {
    fn default() -> Self {
        Sleep {
            inner: Mutex::new(Inner { quiet: None, uses: 0, last_use: Instant::now(), use_gap: Duration::ZERO, confirm_after: None, listening: false }),
            parked: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            parks: AtomicU64::new(0),
            contact_us: AtomicU64::new(0),
        }
    }
}

impl Sleep {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the group settled on, if it is quiesced here.
    pub fn quiet(&self) -> Option<Quiet> {
        if !self.is_quiet() {
            return None;
        }
        self.lock().quiet
    }

    /// Whether the group is quiesced here (without taking the lock).
    pub fn is_quiet(&self) -> bool {
        self.parked.load(Ordering::Acquire)
    }

    /// If the group is quiesced here, which parking of this replica it is (unchanged
    /// while it stays parked; a wake and a new park give another number).
    pub fn parking(&self) -> Option<u64> {
        let n = self.parks.load(Ordering::Acquire);
        self.is_quiet().then_some(n).filter(|&n| n == self.parks.load(Ordering::Acquire))
    }

    fn set_quiet(&self, i: &mut Inner, quiet: Option<Quiet>) {
        i.quiet = quiet;
        if quiet.is_some() {
            self.parks.fetch_add(1, Ordering::AcqRel);
        }
        self.parked.store(quiet.is_some(), Ordering::Release);
        // Parking stops the ticker and waking starts it, whatever listening did.
        self.set_listening(i, false);
    }

    fn set_listening(&self, i: &mut Inner, listening: bool) {
        i.listening = listening;
        self.listening.store(listening, Ordering::Release);
    }

    /// This replica accepted an AppendEntries (heartbeat or entries) just now.
    pub fn contact(&self) {
        let us = clock_base().elapsed().as_micros() as u64;
        self.contact_us.store(us.max(1), Ordering::Release);
    }

    /// Time since the last [`Sleep::contact`]; `None` if there was none.
    pub fn contact_age(&self) -> Option<Duration> {
        match self.contact_us.load(Ordering::Acquire) {
            0 => None,
            us => Some(clock_base().elapsed().saturating_sub(Duration::from_micros(us))),
        }
    }

    /// Whether the ticker is off because the node drives this awake replica.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// An awake replica the node drives stops ticking (a leader heartbeated by the node,
    /// a follower that hears its leader). No-op when quiesced or already listening.
    pub fn listen(&self, raft: &GroupRaft) {
        let mut i = self.lock();
        if i.quiet.is_some() || i.listening {
            return;
        }
        self.set_listening(&mut i, true);
        raft.runtime_config().tick(false);
    }

    /// The replica ticks again (a follower whose leader's contact grew stale times an
    /// election from that last contact). No-op when not listening.
    pub fn unlisten(&self, raft: &GroupRaft) {
        let mut i = self.lock();
        if !i.listening {
            return;
        }
        self.set_listening(&mut i, false);
        if i.quiet.is_none() {
            raft.runtime_config().tick(true);
        }
    }

    /// How long since the last use here, the time between that use and the one before
    /// it, and the use count (a quiesce decision passes it back to
    /// [`Sleep::park_leader`], which refuses if a use came in between).
    pub fn idle(&self) -> Idle {
        let i = self.lock();
        Idle { since_use: i.last_use.elapsed(), use_gap: i.use_gap, uses: i.uses }
    }

    /// Records a write or read on this node; wakes the group if it is quiesced with this
    /// node as its leader (a quiesced follower stays parked: the request is sent on to
    /// the leader, and a follower ticking alone would campaign against a parked leader).
    /// Returns the instant after which a quorum acknowledgement is needed before
    /// serving, while one is outstanding.
    pub fn use_now(&self, raft: &GroupRaft) -> Option<Instant> {
        let mut i = self.lock();
        let now = Instant::now();
        i.uses += 1;
        i.use_gap = now.saturating_duration_since(i.last_use);
        i.last_use = now;
        if i.quiet.is_some_and(|q| q.leader == raft_id(raft)) {
            self.set_quiet(&mut i, None);
            i.confirm_after = Some(Instant::now());
            // Its ticker stays off: the caller heartbeats at once (`GroupHandle::awake`'s
            // ReadIndex round) and the node's tick driver from its next scan on, as it
            // does every awake leader (`crate::node::ticks`). Started here, the ticker
            // ran until that scan — five ticks, and one more heartbeat — for every
            // batch written to a quiesced partition.
            self.set_listening(&mut i, true);
            woke(WakeReason::Use);
        }
        i.confirm_after
    }

    /// A follower's AppendEntries from its leader woke the group (`peer::server`, which
    /// records that [`Sleep::contact`] first): it listens at once rather than ticking
    /// until the node's next tick scan (it has just heard its leader; the scan starts
    /// its ticker once that contact grows stale, as for any listening follower).
    /// Returns whether the group was quiesced.
    pub fn wake_by_entries(&self) -> bool {
        let mut i = self.lock();
        if i.quiet.is_none() {
            return false;
        }
        self.set_quiet(&mut i, None);
        self.set_listening(&mut i, true);
        woke(WakeReason::Entries);
        true
    }

    /// A quorum acknowledged this leader after `after`: nothing more to wait for.
    pub fn confirmed(&self, after: Instant) {
        let mut i = self.lock();
        if i.confirm_after == Some(after) {
            i.confirm_after = None;
        }
    }

    /// Wakes the group if it is quiesced; returns whether it was. A leader heartbeats at
    /// once.
    pub fn wake(&self, raft: &GroupRaft, reason: WakeReason) -> bool {
        let mut i = self.lock();
        let Some(q) = i.quiet else { return false };
        self.set_quiet(&mut i, None);
        let leads = q.leader == raft_id(raft);
        if leads {
            i.confirm_after = Some(Instant::now());
        }
        start_ticking(raft, leads);
        woke(reason);
        true
    }

    /// A follower agreed to quiesce under `quiet`: stop ticking.
    pub fn park_follower(&self, raft: &GroupRaft, quiet: Quiet) {
        let mut i = self.lock();
        self.set_quiet(&mut i, Some(quiet));
        raft.runtime_config().tick(false);
    }

    /// The leader quiesces, unless the group was used since the decision (`uses` as
    /// [`Sleep::idle`] returned it). Returns whether it did.
    pub fn park_leader(&self, raft: &GroupRaft, quiet: Quiet, uses: u64) -> bool {
        let mut i = self.lock();
        if i.uses != uses || i.quiet.is_some() {
            return false;
        }
        self.set_quiet(&mut i, Some(quiet));
        raft.runtime_config().tick(false);
        true
    }
}

fn raft_id(raft: &GroupRaft) -> u64 {
    use openraft::async_runtime::watch::WatchReceiver;
    raft.metrics().borrow_watched().id
}

/// Resumes the ticker; a leader also heartbeats now rather than at its next tick.
fn start_ticking(raft: &GroupRaft, heartbeat: bool) {
    raft.runtime_config().tick(true);
    if heartbeat {
        let raft = raft.clone();
        tokio::spawn(async move {
            let _ = raft.trigger().heartbeat().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &Sleep, quiet: Option<Quiet>) {
        let mut i = s.lock();
        s.set_quiet(&mut i, quiet);
    }

    #[test]
    fn a_follower_woken_by_its_leaders_entries_listens_without_ticking() {
        let s = Sleep::default();
        assert!(!s.wake_by_entries(), "an awake replica is not woken again");
        let q = Quiet { term: 1, leader: 2, last: Some((1, 5)) };
        set(&s, Some(q));
        assert!(s.is_quiet());
        assert!(s.wake_by_entries(), "a parked replica wakes");
        assert!(!s.is_quiet(), "awake after the wake");
        // Listening: its ticker stays off, and the tick scan starts it once the contact
        // the peer server recorded grows stale.
        assert!(s.is_listening(), "woken into listening, not ticking");
    }

    #[test]
    fn a_replica_woken_and_parked_again_is_in_another_parking() {
        let s = Sleep::default();
        assert_eq!(s.parking(), None, "awake: no parking");
        let q = Quiet { term: 1, leader: 1, last: Some((1, 5)) };
        set(&s, Some(q));
        let first = s.parking().expect("parked");
        assert_eq!(s.parking(), Some(first), "the same parking while it stays parked");
        set(&s, None);
        assert_eq!(s.parking(), None);
        set(&s, Some(q));
        let second = s.parking().expect("parked again");
        assert_ne!(second, first, "a wake in between gives another parking");
    }
}
