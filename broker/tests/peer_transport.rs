//! The peer listener refuses callers it should not serve and survives malformed input.

use std::time::Duration;

use bytes::Bytes;
use keel_broker::peer::wire::{RaftReply, RaftRequest, RaftRpc};
use keel_broker::peer::{peer_caller, GroupRegistry, PeerServer};
use keel_net::CallError;
use keel_protocol::api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLUSTER: &str = "c1";

fn vote_request() -> Bytes {
    let vote = openraft::impls::Vote::new(1, 1);
    let rpc = openraft::raft::VoteRequest { vote, last_log_id: None, leadership_transfer: false };
    Bytes::from(postcard::to_allocvec(&RaftRequest { group: 42, rpc: RaftRpc::Vote(rpc) }).unwrap())
}

#[tokio::test]
async fn a_caller_that_names_another_node_or_cluster_is_refused_at_identify() {
    let server = PeerServer::bind("127.0.0.1:0", 2, CLUSTER, GroupRegistry::default(), keel_broker::peer::liveness::Liveness::new()).await.unwrap();
    let addr = server.local_addr().to_string();
    for (to, cluster) in [(3, CLUSTER), (2, "other-cluster")] {
        let client = peer_caller(1, to, &addr, cluster);
        let err = client.call(api::peer::RAFT, vote_request(), Duration::from_secs(2)).await.unwrap_err();
        match err {
            CallError::Unreachable { reason, .. } => assert!(reason.contains("identify refused"), "{reason}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_rpc_for_a_group_this_node_does_not_host_gets_a_clear_answer() {
    let server = PeerServer::bind("127.0.0.1:0", 2, CLUSTER, GroupRegistry::default(), keel_broker::peer::liveness::Liveness::new()).await.unwrap();
    let client = peer_caller(1, 2, &server.local_addr().to_string(), CLUSTER);
    let answer = client.call(api::peer::RAFT, vote_request(), Duration::from_secs(2)).await.unwrap();
    let reply: RaftReply = postcard::from_bytes(&answer).unwrap();
    assert!(matches!(reply, RaftReply::UnknownGroup(42)), "{reply:?}");
}

#[tokio::test]
async fn a_malformed_frame_closes_that_connection_and_the_server_keeps_serving_others() {
    let server = PeerServer::bind("127.0.0.1:0", 2, CLUSTER, GroupRegistry::default(), keel_broker::peer::liveness::Liveness::new()).await.unwrap();
    let addr = server.local_addr().to_string();
    // A length prefix far above the frame limit, as the very first bytes.
    let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
    raw.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), raw.read_to_end(&mut answer)).await.expect("the server closes the connection").unwrap();
    // Then garbage after a valid-looking length.
    let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
    raw.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), raw.read_to_end(&mut answer)).await.expect("the server closes the connection").unwrap();
    // A well-behaved peer is still served.
    let client = peer_caller(1, 2, &addr, CLUSTER);
    let reply: RaftReply = postcard::from_bytes(&client.call(api::peer::RAFT, vote_request(), Duration::from_secs(2)).await.unwrap()).unwrap();
    assert!(matches!(reply, RaftReply::UnknownGroup(42)));
}

#[tokio::test]
async fn a_call_to_a_node_that_is_down_fails_fast_as_unreachable_and_recovers_when_it_returns() {
    let server = PeerServer::bind("127.0.0.1:0", 2, CLUSTER, GroupRegistry::default(), keel_broker::peer::liveness::Liveness::new()).await.unwrap();
    let addr = server.local_addr().to_string();
    let client = peer_caller(1, 2, &addr, CLUSTER);
    client.call(api::peer::RAFT, vote_request(), Duration::from_secs(2)).await.unwrap();
    server.shutdown();
    let err = client.call(api::peer::RAFT, vote_request(), Duration::from_secs(2)).await.unwrap_err();
    assert!(matches!(err, CallError::Unreachable { .. } | CallError::Disconnected { .. }), "{err:?}");
    let _back = PeerServer::bind(&addr, 2, CLUSTER, GroupRegistry::default(), keel_broker::peer::liveness::Liveness::new()).await.unwrap();
    let mut last = None;
    for _ in 0..20 {
        match client.call(api::peer::RAFT, vote_request(), Duration::from_secs(2)).await {
            Ok(_) => return,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the client did not reconnect: {last:?}");
}
