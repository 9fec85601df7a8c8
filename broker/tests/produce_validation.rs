//! Three in-process nodes, used through the Rust client: what a produce must pass before
//! anything is stored, message-id dedupe as a producer sees it, and what a consumer does
//! about a stored batch that does not decode.

use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_broker::node::Node;
use keel_broker::replication::EntryData;
use keel_client::consumer::{Consumer, Message, StartAt};
use keel_client::producer::{Producer, ProducerConfig, Record};
use keel_client::{Admin, ClientConfig, ClientError, Cluster};
use keel_protocol::api::client as api;
use keel_protocol::batch::{field, BatchBuilder, BatchOptions, NewRecord};
use keel_protocol::message::{self, CreateTopicRequest, ProduceRequest};
use keel_protocol::{ErrorCode, TopicConfigPatch};
use openraft::async_runtime::watch::WatchReceiver;

async fn cluster(dir: &std::path::Path, name: &str) -> (Vec<Node>, Cluster) {
    let configs = keel_broker::config::local_cluster(dir, 3, name);
    let nodes = Node::start_all(configs.clone()).await.unwrap();
    let bootstrap = configs.iter().map(|c| c.this_member().unwrap().client_addr.clone()).collect();
    (nodes, Cluster::new(ClientConfig { bootstrap, ..ClientConfig::default() }).unwrap())
}

async fn create(cluster: &Cluster, name: &str, config: TopicConfigPatch) {
    let req = CreateTopicRequest { name: name.into(), partitions: 1, replicas: 3, config };
    Admin::new(cluster.clone()).create_topic_with(req).await.unwrap();
}

async fn produce_raw(cluster: &Cluster, topic: &str, batch: Bytes) -> Result<(), ClientError> {
    let payload = message::encode_with_batches(&ProduceRequest { topic: topic.into(), partition: 0, timeout_ms: 5_000 }, &[batch]);
    cluster.call_partition(topic, 0, api::PRODUCE, &|_| payload.clone(), std::time::Instant::now() + Duration::from_secs(20)).await.map(|_| ())
}

fn one_record_batch(options: BatchOptions) -> Vec<u8> {
    let mut b = BatchBuilder::new(options).unwrap();
    b.push(NewRecord { timestamp_ms: 1, value: Some(b"x"), ..NewRecord::default() }).unwrap();
    b.finish().unwrap().to_vec()
}

fn reseal(buf: &mut [u8]) {
    let crc = crc32c::crc32c(&buf[field::CRC_COVERS_FROM..]);
    buf[field::CRC..field::CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

async fn read(cluster: &Cluster, topic: &str, want: usize) -> Vec<Message> {
    let mut consumer = Consumer::new(cluster.clone(), topic, StartAt::Earliest).await.unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < want && Instant::now() < deadline {
        out.extend(consumer.poll(Duration::from_millis(200)).await.unwrap());
    }
    out
}

/// The bug this replaces: a hand-built batch with a reserved record attribute set was
/// acknowledged, and from then on every consumer of the partition failed. Now every
/// record is decoded before anything is proposed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_a_consumer_could_not_decode_is_refused_naming_the_byte_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, cluster) = cluster(dir.path(), "validate").await;
    create(&cluster, "v", TopicConfigPatch::default()).await;

    let mut reserved = one_record_batch(BatchOptions::default());
    let attribute_at = keel_protocol::batch::BATCH_HEADER_LEN + 1; // after the record's one-byte length
    reserved[attribute_at] = 0x40;
    reseal(&mut reserved);
    let err = produce_raw(&cluster, "v", Bytes::from(reserved)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidBatch), "{err}");
    assert!(err.to_string().contains(&format!("at byte {attribute_at}")), "the refusal names the byte: {err}");

    let mut control = one_record_batch(BatchOptions::default());
    control[field::ATTRIBUTES] |= 0b1000;
    reseal(&mut control);
    let err = produce_raw(&cluster, "v", Bytes::from(control)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidBatch));
    assert!(err.to_string().contains("control"), "{err}");

    let half = one_record_batch(BatchOptions { producer_id: 3, ..BatchOptions::default() });
    let err = produce_raw(&cluster, "v", Bytes::from(half)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidBatch), "a producer id without epoch and sequence: {err}");

    produce_raw(&cluster, "v", Bytes::from(one_record_batch(BatchOptions::default()))).await.unwrap();
    let got = read(&cluster, "v", 1).await;
    assert_eq!(got.len(), 1, "only the valid batch was stored");
    assert_eq!(got[0].offset, 0);
    for n in nodes {
        n.shutdown().await;
    }
}

/// Within the window, a message whose id is stored is not stored again and the producer
/// learns where it is; a batch mixing old and new ids is refused whole and the client
/// resends the new ones. After the window, the id is stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ids_are_stored_once_within_the_window_and_again_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, cluster) = cluster(dir.path(), "dedupe").await;
    create(&cluster, "ids", TopicConfigPatch { dedupe_window_ms: Some(1_500), ..TopicConfigPatch::default() }).await;
    let producer = Producer::new(cluster.clone(), ProducerConfig { linger: Duration::from_millis(50), ..ProducerConfig::default() }).unwrap();
    let send = |value: &'static str, id: &'static str| {
        let producer = &producer;
        async move { producer.send("ids", Record::new(value).with_message_id(id)).await.unwrap() }
    };
    // One batch (linger): a, b.
    let (a, b) = (send("a", "id-a").await, send("b", "id-b").await);
    let (a, b) = (a.wait().await.unwrap(), b.wait().await.unwrap());
    assert_eq!((a.offset, a.duplicate, b.offset, b.duplicate), (0, false, 1, false));
    // The same id again, and a batch mixing an old id (b) with a new one (c).
    let (a2, b2, c) = (send("a again", "id-a").await, send("b again", "id-b").await, send("c", "id-c").await);
    let (a2, b2, c) = (a2.wait().await.unwrap(), b2.wait().await.unwrap(), c.wait().await.unwrap());
    assert_eq!((a2.offset, a2.duplicate), (0, true), "the first send's offset");
    assert_eq!((b2.offset, b2.duplicate), (1, true));
    assert_eq!((c.offset, c.duplicate), (2, false), "the new record of the mixed batch is stored, once");

    // After the window (measured on the partition clock, up to about 2 s more) the id
    // is a new message.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let later = send("a, later", "id-a").await.wait().await.unwrap();
    assert_eq!((later.offset, later.duplicate), (3, false));
    producer.close().await;

    let values: Vec<Bytes> = read(&cluster, "ids", 4).await.into_iter().map(|m| m.value.unwrap()).collect();
    assert_eq!(values, vec![Bytes::from("a"), Bytes::from("b"), Bytes::from("c"), Bytes::from("a, later")]);
    for n in nodes {
        n.shutdown().await;
    }
}

/// A batch that does not decode can only be in a log written before brokers validated
/// records (here it is appended below the API, straight into the Raft group). A consumer
/// reaching it gets an error naming topic, partition and offsets, reads nothing past it
/// by accident, and can skip it explicitly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stops_at_a_stored_batch_that_does_not_decode_and_can_skip_it() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, cluster) = cluster(dir.path(), "undecodable").await;
    create(&cluster, "old", TopicConfigPatch::default()).await;
    produce_raw(&cluster, "old", Bytes::from(one_record_batch(BatchOptions::default()))).await.unwrap();
    let group = nodes[0].metadata().topics["old"].partitions[0].group;
    let mut bad = one_record_batch(BatchOptions::default());
    bad[keel_protocol::batch::BATCH_HEADER_LEN + 1] = 0x40;
    reseal(&mut bad);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leader = nodes.iter().filter_map(|n| n.partition(group)).find(|p| p.group.leader() == Some(p.group.raft.metrics().borrow_watched().id));
        if let Some(p) = leader {
            p.group.raft.client_write(EntryData::batch(Bytes::from(bad.clone()))).await.unwrap();
            break;
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    produce_raw(&cluster, "old", Bytes::from(one_record_batch(BatchOptions::default()))).await.unwrap();

    let mut consumer = Consumer::new(cluster.clone(), "old", StartAt::Earliest).await.unwrap();
    let mut got = Vec::new();
    let err = loop {
        match consumer.poll(Duration::from_millis(200)).await {
            Ok(m) => got.extend(m),
            Err(e) => break e,
        }
        assert!(Instant::now() < deadline + Duration::from_secs(10), "the consumer never reached the bad batch");
    };
    assert_eq!(got.len(), 1, "the record before the bad batch is delivered first");
    let ClientError::UndecodableBatch { ref topic, partition, offset, next_offset, .. } = err else { panic!("{err}") };
    assert_eq!((topic.as_str(), partition, offset, next_offset), ("old", 0, 1, 2), "{err}");
    assert!(err.to_string().contains("old/0") && err.to_string().contains("offsets 1..2"), "{err}");
    consumer.skip_to(0, next_offset).unwrap();
    let after = consumer.poll(Duration::from_secs(2)).await.unwrap();
    assert_eq!(after.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![2], "reading goes on past the skipped batch");
    for n in nodes {
        n.shutdown().await;
    }
}
