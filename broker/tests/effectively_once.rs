//! Effectively-once publish against real `keel dev` processes: a retried publish is
//! never stored twice.
//!
//! Each test fails if idempotence is broken: (a) 20,000 records with the partition
//! leader killed mid-stream read back exactly once; (b) an answer lost after the append
//! (the broker drops it under the `fault-injection` switch) is resent and stored once,
//! and the resend gets the original offsets — while the same fault without idempotence
//! stores the record twice, which shows the fault is real; (c) a second producer with
//! the same name fences the first; (d) a sequence gap is refused; (e) the producer
//! table and the message-id window survive a kill -9 of the whole cluster.
//!
//! Needs the `fault-injection` feature (`scripts/test-all` enables every feature).

mod dev_cluster;

use std::collections::HashMap;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_client::consumer::{Consumer, Message, StartAt};
use keel_client::producer::{Producer, ProducerConfig, Record};
use keel_client::{Admin, ClientConfig, Cluster};
use keel_protocol::api::client as api;
use keel_protocol::batch::{BatchBuilder, BatchOptions, NewRecord};
use keel_protocol::message::{self, Duplicate, InitProducerRequest, InitProducerResponse, ProduceRequest, ProduceResponse, ProducerIdentity};
use keel_protocol::ErrorCode;

struct Dev {
    dir: tempfile::TempDir,
    process: Child,
    cluster: Cluster,
}

impl Dev {
    fn start(offset: u16) -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let (process, cluster) = Dev::launch(dir.path(), dev_cluster::base_port(offset));
        Dev { dir, process, cluster }
    }

    fn launch(dir: &Path, port: u16) -> (Child, Cluster) {
        let process = dev_cluster::start_dev(dir, port);
        dev_cluster::wait_for_files(dir);
        let cluster = Cluster::new(ClientConfig { bootstrap: dev_cluster::bootstrap_addrs(dir), ..ClientConfig::default() }).unwrap();
        (process, cluster)
    }

    async fn create_topic(&self, name: &str, partitions: u32) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = Admin::new(self.cluster.clone()).create_topic(name, partitions, 3).await {
            assert!(Instant::now() < deadline, "the cluster never accepted topic {name}: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The node leading `topic`/`partition`, waiting for one.
    async fn leader(&self, topic: &str, partition: usize) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(m) = self.cluster.metadata(true).await {
                if let Some(l) = m.topics.iter().find(|t| t.name == topic).and_then(|t| t.partitions.get(partition)).and_then(|p| p.leader) {
                    return l;
                }
            }
            assert!(Instant::now() < deadline, "{topic}/{partition} has no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn admin_of(&self, node: u64) -> String {
        dev_cluster::admin_addr(&dev_cluster::bootstrap_addrs(self.dir.path())[node as usize - 1])
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on the keel dev process this test spawned.
        unsafe { libc::kill(self.process.id() as i32, libc::SIGTERM) };
        assert!(self.process.wait().unwrap().success());
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        // A failing test leaves no processes behind.
        for node in 1..=3 {
            if let Some(pid) = dev_cluster::pid_of(self.dir.path(), node) {
                // SAFETY: kill(2) on a node process this test's keel dev started.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

/// Every message of `topic`, read until `expected` are in or nothing new comes for 3 s.
async fn read_all(cluster: &Cluster, topic: &str, expected: usize) -> Vec<Message> {
    let mut consumer = Consumer::new(cluster.clone(), topic, StartAt::Earliest).await.unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut idle_since = Instant::now();
    while Instant::now() < deadline
        && (out.len() < expected || idle_since.elapsed() < Duration::from_millis(500))
        && idle_since.elapsed() < Duration::from_secs(3)
    {
        let got = consumer.poll(Duration::from_millis(300)).await.unwrap();
        if !got.is_empty() {
            idle_since = Instant::now();
        }
        out.extend(got);
    }
    out
}

fn value_counts(messages: &[Message]) -> HashMap<Bytes, usize> {
    let mut counts = HashMap::new();
    for m in messages {
        *counts.entry(m.value.clone().unwrap()).or_insert(0) += 1;
    }
    counts
}

/// A one-record batch with the given producer stamp (and message id).
fn stamped_batch(producer: ProducerIdentity, sequence: i32, value: &str, message_id: Option<&str>) -> Bytes {
    let options = BatchOptions { producer_id: producer.producer_id, producer_epoch: producer.epoch, base_sequence: sequence, ..BatchOptions::default() };
    let mut b = BatchBuilder::new(options).unwrap();
    b.push(NewRecord { timestamp_ms: 1, value: Some(value.as_bytes()), message_id: message_id.map(str::as_bytes), ..NewRecord::default() }).unwrap();
    b.finish().unwrap()
}

/// Waits until every node has applied the metadata log as far as any node has.
async fn wait_for_metadata_everywhere(cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reports = Admin::new(cluster.clone()).cluster_status(Duration::from_secs(2)).await.unwrap();
        let applied: Vec<Option<u64>> =
            reports.iter().map(|(_, r)| r.as_ref().ok().and_then(|r| r.groups.iter().find(|g| g.topic.is_none()).and_then(|g| g.applied_index))).collect();
        if applied.iter().all(|a| a.is_some() && *a == applied[0]) {
            return;
        }
        assert!(Instant::now() < deadline, "the metadata log did not converge: {applied:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn init_producer(cluster: &Cluster, name: Option<&str>) -> ProducerIdentity {
    let body = message::encode(&InitProducerRequest { name: name.map(str::to_string), current: None });
    let (_, answer) = cluster.call_any("init producer", api::INIT_PRODUCER, &|_| body.clone()).await.unwrap();
    message::decode::<InitProducerResponse>(&answer).unwrap().producer
}

/// Sends one batch to the partition's leader (following redirects); the answer or the
/// refusal's code.
async fn produce_raw(cluster: &Cluster, topic: &str, partition: u32, batch: Bytes) -> Result<ProduceResponse, ErrorCode> {
    let req = ProduceRequest { topic: topic.into(), partition, timeout_ms: 10_000 };
    let payload = message::encode_with_batches(&req, &[batch]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    match cluster.call_partition(topic, partition, api::PRODUCE, &|_| payload.clone(), deadline).await {
        Ok((version, body)) => Ok(ProduceResponse::decode(&body, version).unwrap()),
        Err(e) => Err(e.code().unwrap_or_else(|| panic!("not a broker refusal: {e}"))),
    }
}

/// (a) SIGKILL of a partition leader while 20,000 records are in flight: every record
/// is read back exactly once (without idempotence, the batches committed but not
/// answered at the kill are resent and stored twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_stream_stores_every_record_exactly_once() {
    const N: u64 = 20_000;
    let dev = Dev::start(24_000);
    dev.create_topic("stream", 3).await;
    let victim = dev.leader("stream", 0).await;
    let producer = Arc::new(Producer::new(dev.cluster.clone(), ProducerConfig { linger: Duration::from_millis(1), ..ProducerConfig::default() }).unwrap());
    let acked = Arc::new(AtomicU64::new(0));
    let sender = {
        let (producer, acked) = (producer.clone(), acked.clone());
        tokio::spawn(async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
            let waiter = tokio::spawn(async move {
                while let Some((i, ack)) = rx.recv().await {
                    let ack: keel_client::producer::DeliveryFuture = ack;
                    if let Err(e) = ack.wait().await {
                        panic!("record {i} failed: {e}");
                    }
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            });
            for i in 0..N {
                let ack = producer.send("stream", Record::new(format!("record-{i:05}"))).await.unwrap();
                tx.send((i, ack)).await.unwrap();
            }
            drop(tx);
            waiter.await.unwrap();
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < N / 4 {
        assert!(Instant::now() < deadline, "production stalled before the kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = dev_cluster::pid_of(dev.dir.path(), victim as u32).unwrap();
    // SAFETY: kill(2) on a node process this test's keel dev started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    eprintln!("killed node {victim} (leader of stream/0) after {} acknowledgements", acked.load(Ordering::Relaxed));
    tokio::time::timeout(Duration::from_secs(120), sender).await.expect("production finished").unwrap();
    assert_eq!(acked.load(Ordering::Relaxed), N);

    let messages = read_all(&dev.cluster, "stream", N as usize).await;
    let counts = value_counts(&messages);
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).map(|(v, c)| (String::from_utf8_lossy(v).to_string(), *c)).take(5).collect();
    assert!(twice.is_empty(), "records stored more than once (first 5): {twice:?}");
    assert_eq!(counts.len() as u64, N, "every acknowledged record is read back");
    assert_eq!(messages.len() as u64, N);
    Arc::try_unwrap(producer).ok().unwrap().close().await;
    dev.stop();
}

/// (b) The leader appends and commits a batch but its answer is lost (the connection
/// closes instead): the client resends, the resend is recognised, nothing is stored
/// twice, and the client learns the offsets of the original.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_lost_after_the_append_is_stored_once_and_the_resend_gets_the_original_offsets() {
    let dev = Dev::start(24_400);
    dev.create_topic("lost", 1).await;
    let leader = dev.leader("lost", 0).await;
    let admin = dev.admin_of(leader);
    let producer = Producer::new(dev.cluster.clone(), ProducerConfig::default()).unwrap();
    let first = producer.send("lost", Record::new("before")).await.unwrap().wait().await.unwrap();
    assert_eq!((first.offset, first.duplicate), (0, false));

    assert!(dev_cluster::admin_post(&admin, "/test/faults", r#"{"drop_produce_answers": 1}"#).contains("200"));
    let resent = producer.send("lost", Record::new("answer lost")).await.unwrap().wait().await.unwrap();
    assert!(resent.duplicate, "the resend was recognised as the batch already stored");
    assert_eq!(resent.offset, 1, "the client gets the original offset");
    let after = producer.send("lost", Record::new("after")).await.unwrap().wait().await.unwrap();
    assert_eq!((after.offset, after.duplicate), (2, false), "nothing else was stored");
    producer.close().await;

    // The same lost answer without idempotence: the resend is stored again.
    assert!(dev_cluster::admin_post(&admin, "/test/faults", r#"{"drop_produce_answers": 1}"#).contains("200"));
    let plain = Producer::new(dev.cluster.clone(), ProducerConfig { idempotence: false, ..ProducerConfig::default() }).unwrap();
    plain.send("lost", Record::new("at least once")).await.unwrap().wait().await.unwrap();
    plain.close().await;

    let counts = value_counts(&read_all(&dev.cluster, "lost", 5).await);
    assert_eq!(counts.get(&Bytes::from("answer lost")), Some(&1), "stored once with idempotence");
    assert_eq!(counts.get(&Bytes::from("before")), Some(&1));
    assert_eq!(counts.get(&Bytes::from("after")), Some(&1));
    assert_eq!(counts.get(&Bytes::from("at least once")), Some(&2), "without idempotence the fault stores the record twice");
    dev.stop();
}

/// (c) A second producer registering the same name fences the first: its next write
/// is refused, on a partition the new instance wrote to and on one it has not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_producer_with_the_same_name_fences_the_first() {
    let dev = Dev::start(24_800);
    dev.create_topic("named", 2).await;
    let config = || ProducerConfig { name: Some("billing".into()), ..ProducerConfig::default() };
    let to = |p: u32, v: &str| Record { partition: Some(p), ..Record::new(v.to_string()) };
    let first = Producer::new(dev.cluster.clone(), config()).unwrap();
    first.send("named", to(0, "from the first")).await.unwrap().wait().await.unwrap();

    let second = Producer::new(dev.cluster.clone(), config()).unwrap();
    second.send("named", to(0, "from the second")).await.unwrap().wait().await.unwrap();
    let refused = first.send("named", to(0, "zombie write")).await.unwrap().wait().await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::ProducerFenced), "{refused}");

    // Where the newer instance has not written yet (partition 1), the leader fences the
    // older epoch once its node has applied the registration from the metadata log.
    let old = init_producer(&dev.cluster, Some("billing-probe")).await;
    let newer = init_producer(&dev.cluster, Some("billing-probe")).await;
    assert_eq!((newer.producer_id, newer.epoch), (old.producer_id, old.epoch + 1));
    wait_for_metadata_everywhere(&dev.cluster).await;
    assert_eq!(produce_raw(&dev.cluster, "named", 1, stamped_batch(old, 0, "zombie", None)).await.unwrap_err(), ErrorCode::ProducerFenced);
    second.send("named", to(1, "the second writes on")).await.unwrap().wait().await.unwrap();
    second.close().await;
    let counts = value_counts(&read_all(&dev.cluster, "named", 3).await);
    assert!(!counts.contains_key(&Bytes::from("zombie write")) && !counts.contains_key(&Bytes::from("zombie")));
    dev.stop();
}

/// (d) A batch whose sequence skips one is refused, and nothing is stored; the
/// missing one is then accepted, and a retry of a stored one gets its offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_gap_is_refused() {
    let dev = Dev::start(25_200);
    dev.create_topic("gaps", 1).await;
    let p = init_producer(&dev.cluster, None).await;
    let zero = produce_raw(&dev.cluster, "gaps", 0, stamped_batch(p, 0, "seq 0", None)).await.unwrap();
    assert_eq!((zero.base_offset, &zero.duplicate), (0, &Duplicate::None));
    assert_eq!(produce_raw(&dev.cluster, "gaps", 0, stamped_batch(p, 2, "seq 2", None)).await.unwrap_err(), ErrorCode::OutOfOrderSequence);
    let again = produce_raw(&dev.cluster, "gaps", 0, stamped_batch(p, 0, "seq 0", None)).await.unwrap();
    assert_eq!((again.base_offset, &again.duplicate), (0, &Duplicate::Batch));
    let one = produce_raw(&dev.cluster, "gaps", 0, stamped_batch(p, 1, "seq 1", None)).await.unwrap();
    assert_eq!((one.base_offset, &one.duplicate), (1, &Duplicate::None));
    let stale = ProducerIdentity { epoch: p.epoch + 1, ..p };
    assert_eq!(produce_raw(&dev.cluster, "gaps", 0, stamped_batch(stale, 3, "new epoch, not from 0", None)).await.unwrap_err(), ErrorCode::OutOfOrderSequence);
    let values: Vec<Bytes> = read_all(&dev.cluster, "gaps", 2).await.into_iter().map(|m| m.value.unwrap()).collect();
    assert_eq!(values, vec![Bytes::from("seq 0"), Bytes::from("seq 1")]);
    dev.stop();
}

/// (e) After every node is killed with SIGKILL and the cluster restarts, a resend of a
/// batch stored before is still recognised (answered with its offsets, not stored),
/// the sequence continues where it was, and a message id stored before is still in the
/// window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_table_and_message_ids_survive_a_full_cluster_kill_and_restart() {
    let mut dev = Dev::start(25_600);
    dev.create_topic("durable", 1).await;
    let p = init_producer(&dev.cluster, None).await;
    let mut stored = Vec::new();
    for seq in 0..5 {
        let id = format!("msg-{seq}");
        let r = produce_raw(&dev.cluster, "durable", 0, stamped_batch(p, seq, &format!("v{seq}"), Some(&id))).await.unwrap();
        assert_eq!(r.duplicate, Duplicate::None);
        stored.push(r.base_offset);
    }
    let plain_id =
        produce_raw(&dev.cluster, "durable", 0, stamped_batch(ProducerIdentity { producer_id: -1, epoch: -1 }, -1, "plain", Some("order-42"))).await.unwrap();

    dev_cluster::kill_all_nodes(dev.dir.path());
    dev.process.wait().unwrap(); // keel dev exits once every node is gone
    let (process, cluster) = Dev::launch(dev.dir.path(), dev_cluster::base_port(25_600));
    dev.process = process;
    dev.cluster = cluster;
    dev.leader("durable", 0).await;

    for seq in [4, 2] {
        let id = format!("msg-{seq}");
        let r = produce_raw(&dev.cluster, "durable", 0, stamped_batch(p, seq, &format!("v{seq}"), Some(&id))).await.unwrap();
        assert_eq!((r.base_offset, &r.duplicate), (stored[seq as usize], &Duplicate::Batch), "sequence {seq} after the restart");
    }
    let next = produce_raw(&dev.cluster, "durable", 0, stamped_batch(p, 5, "v5", None)).await.unwrap();
    assert_eq!(next.duplicate, Duplicate::None);
    assert_eq!(produce_raw(&dev.cluster, "durable", 0, stamped_batch(p, 7, "v7", None)).await.unwrap_err(), ErrorCode::OutOfOrderSequence);
    let again = produce_raw(&dev.cluster, "durable", 0, stamped_batch(ProducerIdentity { producer_id: -1, epoch: -1 }, -1, "plain again", Some("order-42")))
        .await
        .unwrap();
    assert_eq!(again.duplicate, Duplicate::Records(vec![(0, plain_id.base_offset)]), "the id is still in the window after the restart");

    let values: Vec<String> = read_all(&dev.cluster, "durable", 7).await.into_iter().map(|m| String::from_utf8(m.value.unwrap().to_vec()).unwrap()).collect();
    assert_eq!(values, vec!["v0", "v1", "v2", "v3", "v4", "plain", "v5"]);
    dev.stop();
}

/// (f) A batch whose every answer is lost until its delivery timeout fails with an
/// unknown outcome — and the producer is not stuck behind the gap it may have left: it
/// starts a new epoch, and the batches after it are stored, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_times_out_for_good_leaves_no_permanent_gap() {
    let dev = Dev::start(26_000);
    dev.create_topic("doubt", 1).await;
    let admin = dev.admin_of(dev.leader("doubt", 0).await);
    let config = ProducerConfig { delivery_timeout: Duration::from_secs(2), linger: Duration::from_millis(1), ..ProducerConfig::default() };
    let producer = Producer::new(dev.cluster.clone(), config).unwrap();
    producer.send("doubt", Record::new("first")).await.unwrap().wait().await.unwrap();

    // Every answer is lost (the batch is stored, its retries are recognised, but no
    // answer reaches the client) until the batch's delivery timeout has passed.
    assert!(dev_cluster::admin_post(&admin, "/test/faults", r#"{"drop_produce_answers": 1000000}"#).contains("200"));
    let in_doubt = producer.send("doubt", Record::new("in doubt")).await.unwrap();
    let err = in_doubt.wait().await.unwrap_err();
    assert!(err.to_string().contains("outcome is unknown"), "reported as unknown, not as failed: {err}");
    assert!(dev_cluster::admin_post(&admin, "/test/faults", r#"{"drop_produce_answers": 0}"#).contains("200"));

    let mut later = Vec::new();
    for i in 0..20 {
        later.push(producer.send("doubt", Record::new(format!("later {i}"))).await.unwrap());
    }
    for ack in later {
        let d = ack.wait().await.expect("batches after the failed one are stored");
        assert!(!d.duplicate);
    }
    producer.close().await;
    let counts = value_counts(&read_all(&dev.cluster, "doubt", 22).await);
    assert_eq!(counts.get(&Bytes::from("in doubt")), Some(&1), "the batch in doubt was stored once (its retries were recognised)");
    assert!((0..20).all(|i| counts.get(&Bytes::from(format!("later {i}"))) == Some(&1)), "{counts:?}");
    dev.stop();
}

/// Overload: with every fsync slowed, four producers push more than a partition may
/// hold pending; the leader answers `Throttled` instead of queueing, the producers wait
/// as told and retry, and every record is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_partition_throttles_producers_and_they_recover() {
    const PER_PRODUCER: usize = 300;
    let dev = Dev::start(26_400);
    dev.create_topic("busy", 1).await;
    dev.leader("busy", 0).await;
    for node in 1..=3 {
        assert!(dev_cluster::admin_post(&dev.admin_of(node), "/test/faults", r#"{"fsync_delay_ms": 150}"#).contains("200"));
    }
    let mut tasks = Vec::new();
    for p in 0..4 {
        let producer = Producer::new(dev.cluster.clone(), ProducerConfig::default()).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..PER_PRODUCER {
                // Large records fill batches fast: the producers' windows, not their
                // CPU, decide how much is in flight.
                acks.push(producer.send("busy", Record::new(format!("p{p}-{i:05}-{}", "x".repeat(32 * 1024)))).await.unwrap());
            }
            for ack in acks {
                ack.wait().await.expect("a throttled record is retried until stored");
            }
            producer.close().await;
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t).await.expect("the producers finish").unwrap();
    }
    let addrs = dev_cluster::bootstrap_addrs(dev.dir.path());
    let throttled = dev_cluster::metric_sum(addrs.iter().map(String::as_str), "keel_produce_throttled_total{");
    assert!(throttled > 0, "the leader throttled producers instead of queueing");
    for node in 1..=3 {
        dev_cluster::admin_post(&dev.admin_of(node), "/test/faults", r#"{"fsync_delay_ms": 0}"#);
    }
    let counts = value_counts(&read_all(&dev.cluster, "busy", 4 * PER_PRODUCER).await);
    assert_eq!(counts.len(), 4 * PER_PRODUCER);
    assert!(counts.values().all(|c| *c == 1), "every record stored once");
    eprintln!("{throttled} produce requests were throttled");
    dev.stop();
}
