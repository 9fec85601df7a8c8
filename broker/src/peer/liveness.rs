//! Node-pair liveness: one beat per peer every `PEER_BEAT_INTERVAL`, for all the groups
//! the pair shares, instead of a heartbeat per group.
//!
//! Each node calls every peer's `peer::LIVENESS` API with its *epoch* (a number drawn
//! at process start, so a restart is seen as a new incarnation even if it was quick)
//! and records the answer's epoch; the callee records the caller's too. A peer not heard
//! from for `PEER_DEAD_AFTER` is dead to this node. This is only ever used to decide
//! *when* to wake groups or campaign (`crate::node::quiesce`), never whether something
//! is safe: a paused process that resumes still hears its peers, so no lease or read is
//! derived from it.
//!
//! A false "dead" is not harmless either: it wakes every group the peer led and starts
//! elections in them, which loads every node more, which delays more beats — under a
//! saturating load over 1,000 partitions that loop kept re-electing groups. So beats
//! travel on a connection of their own (`PeerPool::beat_caller`), a slow answer does not
//! hold back the next beat (up to `PEER_BEATS_IN_FLIGHT_MAX` outstanding), and this
//! node judges no peer while it was not running itself: when its own beat ticks come
//! more than `LOCAL_STALL_AFTER` apart (the process was paused, or starved of CPU),
//! every peer gets a fresh `PEER_DEAD_AFTER` from the end of that stall.
//!
//! A peer whose address *refuses* a beat's connection is dead at once, without waiting
//! out `PEER_DEAD_AFTER`: nothing listens there, so its process is gone (killed,
//! crashed, or restarting — a restart is a new epoch anyway). That is how most nodes
//! die, and it cannot be mistaken for overload: a live but starved or paused process
//! still holds its listening socket, and a network partition drops packets rather
//! than refusing them, so those are still judged by silence. After a SIGKILL this
//! notices within two beats (the beat in flight fails as its connection closes, the
//! next one's reconnect is refused) instead of eight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_protocol::api;
use serde::{Deserialize, Serialize};

use super::limits::{LOCAL_STALL_AFTER, PEER_BEATS_IN_FLIGHT_MAX, PEER_BEAT_INTERVAL, PEER_BEAT_TIMEOUT, PEER_DEAD_AFTER};
use super::pool::PeerPool;

/// The beat (api `peer::LIVENESS`), and its answer: the sender's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    pub epoch: u64,
}

/// What this node last heard from a peer.
#[derive(Debug, Clone, Copy)]
pub struct Heard {
    pub at: Instant,
    pub epoch: u64,
}

/// This node's view of its peers' liveness.
#[derive(Debug)]
pub struct Liveness {
    epoch: u64,
    peers: Mutex<HashMap<u64, Heard>>,
    /// When each peer's address last refused a beat's connection.
    refused: Mutex<HashMap<u64, Instant>>,
    clock: Mutex<LocalClock>,
}

/// This node's own beat ticks, to notice when it was not running.
#[derive(Debug, Clone, Copy)]
struct LocalClock {
    last_tick: Instant,
    /// The end of the last local stall: no peer is judged dead on silence older than it.
    judged_from: Instant,
}

impl Liveness {
    pub fn new() -> Arc<Liveness> {
        // Distinct per process start: the clock in nanoseconds, mixed with the process id.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let now = Instant::now();
        Arc::new(Liveness {
            epoch: nanos ^ (u64::from(std::process::id()) << 48),
            peers: Mutex::default(),
            refused: Mutex::default(),
            clock: Mutex::new(LocalClock { last_tick: now, judged_from: now }),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A beat from (or the answer of) `node` in incarnation `epoch`.
    pub fn heard(&self, node: u64, epoch: u64) {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).insert(node, Heard { at: Instant::now(), epoch });
    }

    /// What was last heard from `node`, if anything.
    pub fn last_heard(&self, node: u64) -> Option<Heard> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).get(&node).copied()
    }

    /// `node`'s address refused a beat's connection: its process is not running.
    pub fn refused(&self, node: u64) {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).insert(node, Instant::now());
    }

    /// Whether `node`'s address refused a connection since it was last heard from: its
    /// process is gone, as opposed to merely silent.
    pub fn refused_since_heard(&self, node: u64) -> bool {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner()).get(&node).copied();
        refused.is_some_and(|r| self.last_heard(node).is_none_or(|h| r >= h.at))
    }

    /// Whether `node` was heard from within `PEER_DEAD_AFTER` — counted from the end of
    /// this node's last stall if that is later — and its address has not refused a
    /// connection since.
    pub fn alive(&self, node: u64) -> bool {
        let judged_from = self.clock.lock().unwrap_or_else(|p| p.into_inner()).judged_from;
        self.last_heard(node).is_some_and(|h| h.at.max(judged_from).elapsed() < PEER_DEAD_AFTER) && !self.refused_since_heard(node)
    }

    /// One of this node's beat ticks, at `now`: a gap above `LOCAL_STALL_AFTER` since the
    /// previous one was a stall of this node. Returns whether it was.
    pub fn local_tick(&self, now: Instant) -> bool {
        let mut clock = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        let stalled = now.saturating_duration_since(clock.last_tick) > LOCAL_STALL_AFTER;
        if stalled {
            clock.judged_from = clock.judged_from.max(now);
        }
        clock.last_tick = clock.last_tick.max(now);
        stalled
    }
}

/// Beats `peers` (id, peer address) until the returned tasks are aborted.
pub fn spawn_beats(pool: Arc<PeerPool>, liveness: Arc<Liveness>, peers: Vec<(u64, String)>) -> Vec<tokio::task::JoinHandle<()>> {
    peers
        .into_iter()
        .map(|(id, addr)| {
            let (pool, liveness) = (pool.clone(), liveness.clone());
            tokio::spawn(async move {
                let payload = Bytes::from(postcard::to_allocvec(&Beat { epoch: liveness.epoch() }).expect("a beat encodes"));
                let mut every = tokio::time::interval(PEER_BEAT_INTERVAL);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut outstanding = tokio::task::JoinSet::new();
                loop {
                    every.tick().await;
                    if liveness.local_tick(Instant::now()) {
                        tracing::info!(peer = id, "this node's beats were held up (paused or starved of CPU): peers get a fresh grace period");
                    }
                    while outstanding.try_join_next().is_some() {}
                    if pool.faults.is_blocked(id) || outstanding.len() >= PEER_BEATS_IN_FLIGHT_MAX {
                        continue;
                    }
                    let (caller, payload, liveness) = (pool.beat_caller(id, &addr), payload.clone(), liveness.clone());
                    outstanding.spawn(async move {
                        match caller.call(api::peer::LIVENESS, payload, PEER_BEAT_TIMEOUT).await {
                            Ok(answer) => {
                                if let Ok(beat) = postcard::from_bytes::<Beat>(&answer) {
                                    liveness.heard(id, beat.epoch);
                                }
                            }
                            Err(keel_net::CallError::Unreachable { refused: true, .. }) => liveness.refused(id),
                            Err(_) => {}
                        }
                    });
                }
            })
        })
        .collect()
}

/// How long after `PEER_DEAD_AFTER` a survivor that is not a group's designated
/// campaigner wakes it anyway (the designated one may be slow or gone too).
pub const CAMPAIGN_FALLBACK_AFTER: Duration = Duration::from_millis(2 * PEER_DEAD_AFTER.as_millis() as u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_silent_past_the_dead_time_is_dead() {
        let l = Liveness::new();
        let start = Instant::now();
        l.clock.lock().unwrap().judged_from = start - 10 * PEER_DEAD_AFTER;
        assert!(!l.alive(2), "never heard: not alive");
        l.peers.lock().unwrap().insert(2, Heard { at: start - PEER_DEAD_AFTER - Duration::from_millis(1), epoch: 7 });
        assert!(!l.alive(2));
        l.heard(2, 7);
        assert!(l.alive(2));
    }

    #[test]
    fn a_peer_whose_address_refuses_a_connection_is_dead_at_once_until_heard_again() {
        let l = Liveness::new();
        l.heard(2, 7);
        l.heard(3, 9);
        assert!(l.alive(2) && l.alive(3));
        std::thread::sleep(Duration::from_millis(1));
        l.refused(2);
        assert!(!l.alive(2), "refused: dead without waiting out PEER_DEAD_AFTER");
        assert!(l.alive(3), "only the refusing peer");
        std::thread::sleep(Duration::from_millis(1));
        l.heard(2, 8);
        assert!(l.alive(2), "answered a beat since (restarted): alive");
    }

    #[test]
    fn a_local_stall_gives_every_peer_a_fresh_grace_period() {
        let l = Liveness::new();
        let base = Instant::now();
        l.clock.lock().unwrap().judged_from = base - 10 * PEER_DEAD_AFTER;
        // Heard long ago; this node's ticks were regular until now: dead.
        l.peers.lock().unwrap().insert(2, Heard { at: base - 2 * PEER_DEAD_AFTER, epoch: 7 });
        assert!(!l.local_tick(base));
        assert!(!l.alive(2));
        // This node did not tick for longer than LOCAL_STALL_AFTER (paused, starved):
        // the silence it saw says nothing about the peer.
        let resumed = base + LOCAL_STALL_AFTER + Duration::from_millis(50);
        assert!(l.local_tick(resumed), "the gap is a stall");
        assert!(l.alive(2), "judged from the end of the stall, not from the last beat");
        // Regular ticks afterwards change nothing; the peer is dead again once it stays
        // silent for PEER_DEAD_AFTER after the stall (checked against the stored bound).
        assert!(!l.local_tick(resumed + PEER_BEAT_INTERVAL));
        assert_eq!(l.clock.lock().unwrap().judged_from, resumed);
    }
}
