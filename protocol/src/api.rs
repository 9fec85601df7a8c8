//! API keys: what a `Request` frame asks for. A key is never reused; a retired key
//! stays reserved. Client APIs are below 1000; broker-to-broker APIs start at 1000 and
//! are only accepted on the peer listener.

/// Broker-to-broker API keys (peer listener only).
pub mod peer {
    /// First request on a peer connection: who is calling whom, in which cluster.
    /// The receiver refuses a connection meant for another node or cluster.
    pub const IDENTIFY: u16 = 1000;
    /// A Raft RPC for one group: AppendEntries, Vote, PreVote or a full snapshot.
    pub const RAFT: u16 = 1001;
}

/// Whether `key` belongs to the broker-to-broker range.
pub fn is_peer_api(key: u16) -> bool {
    key >= 1000
}
