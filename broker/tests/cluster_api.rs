//! Three `Node`s in one process, driven only through the client API over TCP: create a
//! topic through the metadata log, produce to every partition through its leader, fetch
//! everything back in order, long-poll for new data, and get clear errors.

use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_broker::node::Node;
use keel_net::{CallError, Caller};
use keel_protocol::api::client as api;
use keel_protocol::batch::{BatchBuilder, BatchOptions, NewRecord};
use keel_protocol::message::{self, *};
use keel_protocol::ErrorCode;

/// Calls `api_key` on `addr`, following `NotLeader` / `LeaderNotAvailable` answers.
async fn call_leader(addr: &str, api_key: u16, payload: Bytes) -> Result<Bytes, (ErrorCode, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut target = addr.to_string();
    loop {
        let caller = Caller::new(0, target.clone(), None);
        match caller.call(api_key, payload.clone(), Duration::from_secs(10)).await {
            Ok(body) => return Ok(body),
            Err(CallError::Refused { code: code @ (ErrorCode::NotLeader | ErrorCode::LeaderNotAvailable), message, body, .. }) => {
                assert!(Instant::now() < deadline, "no leader within 20 s: {code} {message}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(addr) = message::decode::<NotLeader>(&body).ok().and_then(|n| n.leader_addr) {
                    target = addr;
                }
            }
            Err(CallError::Refused { code, message, .. }) => return Err((code, message)),
            Err(e) => {
                assert!(Instant::now() < deadline, "call failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn batch(values: &[String]) -> Bytes {
    let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
    for v in values {
        b.push(NewRecord { timestamp_ms: 1_700_000_000_000, key: None, value: Some(v.as_bytes()), headers: &[], message_id: None, deliver_at_ms: None })
            .unwrap();
    }
    b.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_created_through_the_metadata_log_and_every_partition_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let configs = keel_broker::config::local_cluster(dir.path(), 3, "api-test");
    let nodes = Node::start_all(configs.clone()).await.unwrap();
    let addr = configs[1].this_member().unwrap().client_addr.clone();

    // Create a topic (whichever node we ask, the request reaches the metadata leader).
    let create = CreateTopicRequest { name: "orders".into(), partitions: 3, replicas: 3, config: Default::default() };
    call_leader(&addr, api::CREATE_TOPIC, create.encode(keel_protocol::limits::PROTOCOL_VERSION_MAX)).await.unwrap();
    let again = call_leader(&addr, api::CREATE_TOPIC, create.encode(keel_protocol::limits::PROTOCOL_VERSION_MAX)).await.unwrap_err();
    assert_eq!(again.0, ErrorCode::TopicAlreadyExists, "{}", again.1);

    // Every node folds the same metadata; wait until every partition has a leader.
    let deadline = Instant::now() + Duration::from_secs(20);
    let meta = loop {
        let body = call_leader(&addr, api::METADATA, message::encode(&MetadataRequest::default())).await.unwrap();
        let meta = MetadataResponse::decode(&body, keel_protocol::limits::PROTOCOL_VERSION_MAX).unwrap();
        if meta.topics.len() == 1 && meta.topics[0].partitions.iter().all(|p| p.leader.is_some()) {
            break meta;
        }
        assert!(Instant::now() < deadline, "partitions got no leaders: {meta:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let leaders: Vec<u64> = meta.topics[0].partitions.iter().map(|p| p.leader.unwrap()).collect();
    assert_eq!(meta.brokers.len(), 3);
    for n in &nodes {
        assert_eq!(n.metadata().topics["orders"].partitions.len(), 3, "node {} folded the topic", n.id);
    }

    // Produce 20 batches of 5 to each partition, through whichever node answers.
    for p in 0..3u32 {
        let mut expect = 0u64;
        for b in 0..20 {
            let values: Vec<String> = (0..5).map(|r| format!("p{p}-b{b}-r{r}")).collect();
            let req = ProduceRequest { topic: "orders".into(), partition: p, timeout_ms: 10_000 };
            let body = call_leader(&addr, api::PRODUCE, message::encode_with_batches(&req, &[batch(&values)])).await.unwrap();
            let resp = ProduceResponse::decode(&body, keel_protocol::limits::PROTOCOL_VERSION_MAX).unwrap();
            assert_eq!((resp.base_offset, resp.record_count), (expect, 5));
            expect += 5;
        }
    }

    // Fetch everything back, in order, from each partition's leader.
    for p in 0..3u32 {
        let mut offset = 0u64;
        let mut values = Vec::new();
        while offset < 100 {
            let req = FetchRequest { topic: "orders".into(), partition: p, offset, max_bytes: 1024, max_wait_ms: 1000 };
            let body = call_leader(&addr, api::FETCH, message::encode(&req)).await.unwrap();
            let (head, batches): (FetchResponse, Bytes) = message::split_with_batches(&body).unwrap();
            assert_eq!(head.high_watermark, 100);
            for view in message::split_batches(batches).unwrap() {
                for r in view.records() {
                    let r = r.unwrap();
                    let at = view.header().base_offset + u64::from(r.offset_delta);
                    if at >= offset {
                        values.push(String::from_utf8(r.value.unwrap().to_vec()).unwrap());
                        offset = at + 1;
                    }
                }
            }
        }
        let want: Vec<String> = (0..20).flat_map(|b| (0..5).map(move |r| format!("p{p}-b{b}-r{r}"))).collect();
        assert_eq!(values, want, "partition {p} (leader {}) returns exactly what was produced", leaders[p as usize]);
    }

    // A fetch at the end long-polls until a new batch commits.
    let waiter = {
        let addr = addr.clone();
        tokio::spawn(async move {
            let req = FetchRequest { topic: "orders".into(), partition: 0, offset: 100, max_bytes: 1024, max_wait_ms: 10_000 };
            let started = Instant::now();
            let body = call_leader(&addr, api::FETCH, message::encode(&req)).await.unwrap();
            let (head, batches): (FetchResponse, Bytes) = message::split_with_batches(&body).unwrap();
            (head.high_watermark, message::split_batches(batches).unwrap().len(), started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let req = ProduceRequest { topic: "orders".into(), partition: 0, timeout_ms: 10_000 };
    call_leader(&addr, api::PRODUCE, message::encode_with_batches(&req, &[batch(&["late".to_string()])])).await.unwrap();
    let (hw, batches, waited) = waiter.await.unwrap();
    assert_eq!((hw, batches), (101, 1), "the long poll returned the new batch");
    assert!(waited < Duration::from_secs(10), "it returned on the commit, not the timeout");

    // Clear errors.
    let unknown =
        call_leader(&addr, api::FETCH, message::encode(&FetchRequest { topic: "nope".into(), partition: 0, offset: 0, max_bytes: 1, max_wait_ms: 0 }))
            .await
            .unwrap_err();
    assert_eq!(unknown.0, ErrorCode::UnknownTopic, "{}", unknown.1);
    let mut corrupt = batch(&["x".to_string()]).to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    let req = ProduceRequest { topic: "orders".into(), partition: 1, timeout_ms: 1000 };
    let bad = call_leader(&addr, api::PRODUCE, message::encode_with_batches(&req, &[Bytes::from(corrupt)])).await.unwrap_err();
    assert_eq!(bad.0, ErrorCode::CorruptBatch, "{}", bad.1);

    for n in nodes {
        n.shutdown().await;
    }
}
