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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_protocol::api;
use serde::{Deserialize, Serialize};

use super::limits::{PEER_BEAT_INTERVAL, PEER_BEAT_TIMEOUT, PEER_DEAD_AFTER};
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
}

impl Liveness {
    pub fn new() -> Arc<Liveness> {
        // Distinct per process start: the clock in nanoseconds, mixed with the process id.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Arc::new(Liveness { epoch: nanos ^ (u64::from(std::process::id()) << 48), peers: Mutex::default() })
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

    /// Whether `node` was heard from within `PEER_DEAD_AFTER`.
    pub fn alive(&self, node: u64) -> bool {
        self.last_heard(node).is_some_and(|h| h.at.elapsed() < PEER_DEAD_AFTER)
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
                loop {
                    every.tick().await;
                    if pool.faults.is_blocked(id) {
                        continue;
                    }
                    let caller = pool.caller(id, &addr);
                    if let Ok(answer) = caller.call(api::peer::LIVENESS, payload.clone(), PEER_BEAT_TIMEOUT).await {
                        if let Ok(beat) = postcard::from_bytes::<Beat>(&answer) {
                            liveness.heard(id, beat.epoch);
                        }
                    }
                }
            })
        })
        .collect()
}

/// How long after `PEER_DEAD_AFTER` a survivor that is not a group's designated
/// campaigner wakes it anyway (the designated one may be slow or gone too).
pub const CAMPAIGN_FALLBACK_AFTER: Duration = Duration::from_millis(2 * PEER_DEAD_AFTER.as_millis() as u64);
