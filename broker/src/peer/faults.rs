//! Fault injection for the peer transport: the peers this node may not exchange Raft
//! traffic with. Empty in normal operation. Tests and the Jepsen-style harness block
//! both directions (A blocks B and B blocks A) to partition the network without root
//! privileges; a blocked call fails as `Unreachable` before anything is sent, exactly as
//! if the peer's packets were dropped.

use std::collections::HashSet;
use std::sync::RwLock;

/// The set of blocked peers of one node.
#[derive(Debug, Default)]
pub struct PeerFaults {
    blocked: RwLock<HashSet<u64>>,
}

impl PeerFaults {
    /// From now on, calls to these peers fail as unreachable.
    pub fn block(&self, peers: &[u64]) {
        self.blocked.write().expect("faults lock poisoned").extend(peers.iter().copied());
    }

    /// Removes every block.
    pub fn heal(&self) {
        self.blocked.write().expect("faults lock poisoned").clear();
    }

    pub fn is_blocked(&self, peer: u64) -> bool {
        self.blocked.read().expect("faults lock poisoned").contains(&peer)
    }
}
