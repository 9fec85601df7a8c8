//! `PeerPool`: the callers of one node to all its peers, created on first use. Every
//! connection identifies itself (cluster, from, to) before carrying Raft RPCs.
//!
//! Two connections per peer: one for Raft and the other peer APIs, and one only for
//! node-pair liveness beats (`super::liveness`), so that a beat never queues behind
//! AppendEntries frames or waits for a request slot the Raft traffic holds (a peer
//! server reads at most `PEER_SERVER_CONCURRENCY_MAX` requests of one connection at
//! once): under load, beats stuck there made live peers look dead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use keel_net::{Caller, Identification};
use keel_protocol::api;

use super::faults::PeerFaults;
use super::wire::Identify;

/// A caller from node `self_id` of `cluster` to node `target` at `addr`.
pub fn peer_caller(self_id: u64, target: u64, addr: &str, cluster: &str) -> Caller {
    let identify = Identify { cluster: cluster.to_string(), from: self_id, to: target };
    let payload = Bytes::from(postcard::to_allocvec(&identify).expect("Identify encodes"));
    Caller::new(target, addr.to_string(), Some(Identification { api_key: api::peer::IDENTIFY, payload }))
}

/// The callers of one node to its peers.
pub struct PeerPool {
    self_id: u64,
    cluster: String,
    callers: Mutex<HashMap<u64, (String, Arc<Caller>)>>,
    /// The beat connections (see the module docs).
    beat_callers: Mutex<HashMap<u64, (String, Arc<Caller>)>>,
    /// Peers this node may not call (fault injection; empty normally).
    pub faults: Arc<PeerFaults>,
}

impl PeerPool {
    pub fn new(self_id: u64, cluster: impl Into<String>) -> Arc<PeerPool> {
        Arc::new(PeerPool {
            self_id,
            cluster: cluster.into(),
            callers: Mutex::new(HashMap::new()),
            beat_callers: Mutex::new(HashMap::new()),
            faults: Arc::default(),
        })
    }

    /// The caller for `target` at `addr`; a changed address replaces the caller.
    pub fn caller(&self, target: u64, addr: &str) -> Arc<Caller> {
        self.caller_in(&self.callers, target, addr)
    }

    /// The caller carrying only liveness beats to `target` at `addr`.
    pub fn beat_caller(&self, target: u64, addr: &str) -> Arc<Caller> {
        self.caller_in(&self.beat_callers, target, addr)
    }

    fn caller_in(&self, callers: &Mutex<HashMap<u64, (String, Arc<Caller>)>>, target: u64, addr: &str) -> Arc<Caller> {
        let mut callers = callers.lock().expect("peer pool lock poisoned");
        match callers.get(&target) {
            Some((known, c)) if known == addr => c.clone(),
            _ => {
                let c = Arc::new(peer_caller(self.self_id, target, addr, &self.cluster));
                callers.insert(target, (addr.to_string(), c.clone()));
                c
            }
        }
    }
}
