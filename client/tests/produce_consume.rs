//! The client against three in-process brokers: Admin creates a topic; the Producer
//! sends keyed records (batching, ordering per partition); the Consumer reads them back
//! from earliest, from latest and from a time; a leader dies mid-stream and every
//! acknowledged record is still read back; a closed loop of sends is not held back by
//! the linger once its window is full.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use keel_broker::config::local_cluster;
use keel_broker::node::Node;
use keel_client::consumer::{Consumer, StartAt};
use keel_client::producer::{Producer, ProducerConfig, Record};
use keel_client::{Admin, ClientConfig, Cluster};

async fn start(dir: &std::path::Path) -> (Vec<Node>, Cluster) {
    let configs = local_cluster(dir, 3, "client-test");
    let bootstrap: Vec<String> = configs[0].cluster.members.iter().map(|m| m.client_addr.clone()).collect();
    let nodes = Node::start_all(configs).await.unwrap();
    let cluster = Cluster::new(ClientConfig { bootstrap, ..ClientConfig::default() }).unwrap();
    (nodes, cluster)
}

async fn consume_all(cluster: &Cluster, topic: &str, start: StartAt, want: usize) -> Vec<keel_client::consumer::Message> {
    let mut consumer = Consumer::new(cluster.clone(), topic, start).await.unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < want {
        assert!(Instant::now() < deadline, "consumed {} of {want}", got.len());
        got.extend(consumer.poll(Duration::from_millis(500)).await.unwrap());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produced_records_are_consumed_in_order_per_key_from_earliest_latest_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, cluster) = start(dir.path()).await;
    let admin = Admin::new(cluster.clone());
    admin.create_topic("events", 3, 3).await.unwrap();
    assert_eq!(admin.describe_topic("events").await.unwrap().partitions.len(), 3);

    let producer = Producer::new(cluster.clone(), ProducerConfig::default()).unwrap();
    let mut acks = Vec::new();
    for i in 0..3000u32 {
        let key = format!("k{}", i % 30);
        let record = Record::new(format!("{key}:{i}")).with_key(key).with_header("seq", i.to_string());
        acks.push(producer.send("events", record).await.unwrap());
    }
    producer.flush().await.unwrap();
    let mut deliveries = Vec::new();
    for a in acks {
        deliveries.push(a.wait().await.unwrap());
    }
    let got = consume_all(&cluster, "events", StartAt::Earliest, 3000).await;
    assert_eq!(got.len(), 3000, "exactly what was produced");
    // Per key, values come back in send order; offsets match the acknowledgements.
    let mut last_seq: HashMap<String, u32> = HashMap::new();
    for m in &got {
        let value = String::from_utf8(m.value.clone().unwrap().to_vec()).unwrap();
        let (key, seq) = value.split_once(':').unwrap();
        let seq: u32 = seq.parse().unwrap();
        assert_eq!(m.key.as_deref(), Some(key.as_bytes()));
        assert_eq!(m.headers[0].0, "seq");
        if let Some(prev) = last_seq.insert(key.to_string(), seq) {
            assert!(seq > prev, "key {key}: {seq} after {prev}");
        }
        assert_eq!(deliveries[seq as usize].partition, m.partition);
        assert_eq!(deliveries[seq as usize].offset, m.offset);
    }

    // From latest: only what is produced afterwards.
    let mut latest = Consumer::new(cluster.clone(), "events", StartAt::Latest).await.unwrap();
    let later = Producer::new(cluster.clone(), ProducerConfig::default()).unwrap();
    let ack = later.send("events", Record::new("after").with_key("k1")).await.unwrap();
    later.flush().await.unwrap();
    let d = ack.wait().await.unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.is_empty() && Instant::now() < deadline {
        seen = latest.poll(Duration::from_millis(500)).await.unwrap();
    }
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].partition, seen[0].offset, seen[0].value.as_deref()), (d.partition, d.offset, Some(&b"after"[..])));

    // From a time: records stamped at or after it.
    let timed = Producer::new(cluster.clone(), ProducerConfig::default()).unwrap();
    let missing = timed.send("clock", Record::new("too early")).await.unwrap().wait().await.unwrap_err();
    assert!(matches!(missing, keel_client::ClientError::UnknownTopic(ref t) if t == "clock"), "{missing}");
    admin.create_topic("clock", 1, 3).await.unwrap();
    for (i, ts) in [1_000i64, 2_000, 3_000].iter().enumerate() {
        let mut r = Record::new(format!("t{i}"));
        r.timestamp_ms = Some(*ts);
        timed.send("clock", r).await.unwrap().wait().await.unwrap();
    }
    let from_time = consume_all(&cluster, "clock", StartAt::Time(2_000), 2).await;
    let values: Vec<&[u8]> = from_time.iter().map(|m| m.value.as_deref().unwrap()).collect();
    assert_eq!(values, vec![&b"t1"[..], &b"t2"[..]]);

    // A topic that accepts only small batches: the producer's batches (256 KiB by
    // default) are cut at the topic's limit instead of being refused.
    let config = keel_protocol::TopicConfigPatch { max_message_bytes: Some(8 * 1024), ..Default::default() };
    let small = keel_protocol::message::CreateTopicRequest { name: "small".into(), partitions: 1, replicas: 3, config };
    admin.create_topic_with(small).await.unwrap();
    let limited = Producer::new(cluster.clone(), ProducerConfig::default()).unwrap();
    let mut acks = Vec::new();
    for i in 0..200 {
        acks.push(limited.send("small", Record::new(format!("{i:0>1000}"))).await.unwrap());
    }
    for ack in acks {
        ack.wait().await.expect("every record fits a batch under the topic's limit");
    }
    assert_eq!(consume_all(&cluster, "small", StartAt::Earliest, 200).await.len(), 200);

    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_leader_dies_mid_stream_every_acknowledged_record_is_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, cluster) = start(dir.path()).await;
    let admin = Admin::new(cluster.clone());
    admin.create_topic("orders", 1, 3).await.unwrap();
    let producer = Producer::new(cluster.clone(), ProducerConfig::default()).unwrap();
    let mut acked = Vec::new();
    let mut killed = false;
    for i in 0..600u32 {
        if i == 300 && !killed {
            let leader = admin.describe_topic("orders").await.unwrap().partitions[0].leader.unwrap();
            let pos = nodes.iter().position(|n| n.id == leader).unwrap();
            nodes.remove(pos).shutdown().await;
            killed = true;
        }
        let ack = producer.send("orders", Record::new(i.to_string())).await.unwrap();
        if i % 50 == 49 {
            producer.flush().await.unwrap();
        }
        acked.push((i, ack));
    }
    producer.flush().await.unwrap();
    let mut ok = Vec::new();
    for (i, ack) in acked {
        if ack.wait().await.is_ok() {
            ok.push(i);
        }
    }
    assert!(ok.len() >= 550, "writes continue after the failover ({} of 600 acknowledged)", ok.len());
    let got = consume_all(&cluster, "orders", StartAt::Earliest, ok.len()).await;
    let values: std::collections::HashSet<u32> = got.iter().map(|m| std::str::from_utf8(m.value.as_deref().unwrap()).unwrap().parse().unwrap()).collect();
    for i in &ok {
        assert!(values.contains(i), "acknowledged record {i} was lost");
    }
    for n in nodes {
        n.shutdown().await;
    }
}

/// Sends `n` records and waits (at most `limit`) until every one is answered; the time
/// that took, or `None` if the limit passed first.
async fn round(producer: &Producer, n: usize, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut acks = Vec::new();
    for i in 0..n {
        acks.push(producer.send("window", Record::new(i.to_string())).await.unwrap());
    }
    let all = async {
        for ack in acks {
            ack.wait().await.unwrap();
        }
    };
    tokio::time::timeout(limit, all).await.ok().map(|()| started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_window_of_sends_closes_the_batch_without_waiting_out_the_linger() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, cluster) = start(dir.path()).await;
    Admin::new(cluster.clone()).create_topic("window", 1, 3).await.unwrap();
    let linger = Duration::from_secs(3);
    let config = |close_when_window_full| ProducerConfig { linger, close_when_window_full, ..ProducerConfig::default() };

    let producer = Producer::new(cluster.clone(), config(true)).unwrap();
    // The first window of 16 teaches the producer the window (each send a new high, so
    // nothing closes early); a flush sends it.
    let acks: Vec<_> = send_window(&producer, 16).await;
    producer.flush().await.unwrap();
    for ack in acks {
        ack.wait().await.unwrap();
    }
    // From then on a window of 16 is answered well inside the linger, round after round.
    for r in 0..3 {
        let took = round(&producer, 16, linger - Duration::from_millis(500)).await;
        assert!(took.is_some(), "round {r}: a full window waited for the {linger:?} linger");
    }
    // The application's window shrinks to 8: the first such round waits out the linger
    // (8 never reaches the learned peak of 16), after which the peak comes down.
    let took = round(&producer, 8, Duration::from_secs(30)).await.expect("the linger closes the batch");
    assert!(took >= linger - Duration::from_millis(100), "a window below the peak closed early ({took:?})");
    for r in 0..3 {
        let took = round(&producer, 8, linger - Duration::from_millis(500)).await;
        assert!(took.is_some(), "round {r} of 8: the peak did not come down to the smaller window");
    }
    producer.close().await;

    // The control: with the option off, the same full window waits for the linger.
    let fixed = Producer::new(cluster.clone(), config(false)).unwrap();
    let acks: Vec<_> = send_window(&fixed, 16).await;
    fixed.flush().await.unwrap();
    for ack in acks {
        ack.wait().await.unwrap();
    }
    assert!(round(&fixed, 16, Duration::from_secs(1)).await.is_none(), "without the option a batch closes only at its linger");
    fixed.close().await;
    for n in nodes {
        n.shutdown().await;
    }
}

/// Sends `n` records to "window" and returns their acknowledgement futures.
async fn send_window(producer: &Producer, n: usize) -> Vec<keel_client::producer::DeliveryFuture> {
    let mut acks = Vec::new();
    for i in 0..n {
        acks.push(producer.send("window", Record::new(format!("first-{i}"))).await.unwrap());
    }
    acks
}
