//! A leader cut off from the majority (both directions of its peer traffic blocked)
//! cannot acknowledge writes; the majority elects a new leader and keeps acknowledging;
//! after the partition heals, every acknowledged record is present and none of the
//! writes attempted on the isolated leader are. And the cut-off leader, whose producer
//! table stopped when it was cut off, never refuses a producer's retry as out of order
//! from that stale table (the producer would store the batch again under a new epoch).

use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_broker::config::local_cluster;
use keel_broker::node::Node;
use keel_client::consumer::{Consumer, StartAt};
use keel_client::producer::{Producer, ProducerConfig, Record};
use keel_client::{Admin, ClientConfig, Cluster};
use keel_net::Caller;
use keel_protocol::api::client as api;
use keel_protocol::batch::{BatchBuilder, BatchOptions, NewRecord};
use keel_protocol::limits::PRODUCER_BATCHES_IN_FLIGHT_MAX;
use keel_protocol::message::{
    self, ClusterStatusResponse, Duplicate, GroupStatus, InitProducerRequest, InitProducerResponse, ProduceRequest, ProduceResponse, ProducerIdentity,
};
use keel_protocol::ErrorCode;

fn batch(value: &str) -> Bytes {
    let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
    b.push(NewRecord { timestamp_ms: 1, value: Some(value.as_bytes()), ..NewRecord::default() }).unwrap();
    b.finish().unwrap()
}

/// A one-record batch stamped with an idempotent producer's identity and sequence.
fn stamped(producer: ProducerIdentity, sequence: i32, value: &str) -> Bytes {
    let options = BatchOptions { producer_id: producer.producer_id, producer_epoch: producer.epoch, base_sequence: sequence, ..BatchOptions::default() };
    let mut b = BatchBuilder::new(options).unwrap();
    b.push(NewRecord { timestamp_ms: 1, value: Some(value.as_bytes()), ..NewRecord::default() }).unwrap();
    b.finish().unwrap()
}

async fn produce_all(cluster: &Cluster, values: impl Iterator<Item = String>) -> Vec<String> {
    let producer = Producer::new(cluster.clone(), ProducerConfig::default()).unwrap();
    let mut acks = Vec::new();
    for v in values {
        acks.push((v.clone(), producer.send("p", Record::new(v)).await.unwrap()));
    }
    producer.flush().await.unwrap();
    let mut acked = Vec::new();
    for (v, a) in acks {
        a.wait().await.unwrap_or_else(|e| panic!("{v} was not acknowledged: {e}"));
        acked.push(v);
    }
    producer.close().await;
    acked
}

/// Sends one batch to partition `p`/0's leader through `cluster` (following redirects).
async fn produce_one(cluster: &Cluster, batch: Bytes) -> ProduceResponse {
    let req = ProduceRequest { topic: "p".into(), partition: 0, timeout_ms: 5_000 };
    let payload = message::encode_with_batches(&req, &[batch]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (version, body) = cluster.call_partition("p", 0, api::PRODUCE, &|_| payload.clone(), deadline).await.unwrap();
    ProduceResponse::decode(&body, version).unwrap()
}

/// Partition `p`'s state on node `id` (`None`: it does not answer, or hosts no replica).
async fn group_status(addr: &str, id: u64) -> Option<GroupStatus> {
    let status = Caller::new(id, addr.to_string(), None).call(api::CLUSTER_STATUS, Bytes::new(), Duration::from_secs(2)).await.ok()?;
    let status: ClusterStatusResponse = message::decode(&status).ok()?;
    status.groups.into_iter().find(|g| g.topic.as_deref() == Some("p"))
}

/// Three in-process nodes hosting topic `p`: one partition, three replicas.
struct Three {
    nodes: Vec<Node>,
    addrs: Vec<String>,
    everyone: Cluster,
    _dir: tempfile::TempDir,
}

impl Three {
    async fn start(name: &str) -> Three {
        // The nodes' logs go to the test's captured output (shown when it fails);
        // `RUST_LOG` chooses what, informational messages of Keel by default.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("keel_broker=info"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        let dir = tempfile::tempdir().unwrap();
        let configs = local_cluster(dir.path(), 3, name);
        let addrs: Vec<String> = (1..=3u64).map(|id| configs[0].cluster.members.iter().find(|m| m.id == id).unwrap().client_addr.clone()).collect();
        let nodes = Node::start_all(configs.clone()).await.unwrap();
        let everyone = Cluster::new(ClientConfig { bootstrap: addrs.clone(), ..ClientConfig::default() }).unwrap();
        Admin::new(everyone.clone()).create_topic("p", 1, 3).await.unwrap();
        Three { nodes, addrs, everyone, _dir: dir }
    }

    fn addr_of(&self, id: u64) -> String {
        self.addrs[id as usize - 1].clone()
    }

    /// A client that knows only the nodes `ids`.
    fn cluster_of(&self, ids: &[u64]) -> Cluster {
        Cluster::new(ClientConfig { bootstrap: ids.iter().map(|id| self.addr_of(*id)).collect(), ..ClientConfig::default() }).unwrap()
    }

    /// Waits until every node's replica holds the first `n` messages. (A node that
    /// started late on a brand-new cluster is refilled like a wiped one and votes only
    /// once caught up; cut off before that, the "majority" would rightly elect nobody.)
    async fn wait_everyone_holds(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for id in 1..=3u64 {
            loop {
                let hw = group_status(&self.addr_of(id), id).await.map_or(0, |g| g.high_watermark);
                if hw >= n {
                    break;
                }
                assert!(Instant::now() < deadline, "node {id} did not hold the first {n} messages (high watermark {hw})");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Cuts the partition's leader off from the other two (both directions of its
    /// peer traffic); returns it and the other two.
    async fn isolate_leader(&self) -> (u64, Vec<u64>) {
        let admin = Admin::new(self.everyone.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        let old_leader = loop {
            if let Some(l) = admin.describe_topic("p").await.unwrap().partitions[0].leader {
                break l;
            }
            assert!(Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let others: Vec<u64> = (1..=3).filter(|id| *id != old_leader).collect();
        for n in &self.nodes {
            if n.id == old_leader {
                n.peer_faults().block(&others);
            } else {
                n.peer_faults().block(&[old_leader]);
            }
        }
        (old_leader, others)
    }

    /// Waits until the majority `others` has elected a leader other than `old_leader`.
    async fn wait_majority_leader(&self, old_leader: u64, others: &[u64]) {
        let majority_admin = Admin::new(self.cluster_of(others));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let leader = majority_admin.describe_topic("p").await.unwrap().partitions[0].leader;
            if leader.is_some_and(|l| l != old_leader) {
                return;
            }
            if Instant::now() >= deadline {
                let mut report = String::new();
                for id in others {
                    report.push_str(&format!("\n  node {id}: {:?}", group_status(&self.addr_of(*id), *id).await));
                }
                panic!("the majority elected no new leader (old leader {old_leader}); the partition on the majority:{report}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn heal(&self) {
        for n in &self.nodes {
            n.peer_faults().heal();
        }
    }

    /// Every message of `p`, read through `everyone`, until `expected` are seen or 20 s pass.
    async fn read_all(&self, expected: usize) -> Vec<String> {
        let mut consumer = Consumer::new(self.everyone.clone(), "p", StartAt::Earliest).await.unwrap();
        let mut seen: Vec<String> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < expected && Instant::now() < deadline {
            for m in consumer.poll(Duration::from_millis(300)).await.unwrap() {
                seen.push(String::from_utf8(m.value.unwrap().to_vec()).unwrap());
            }
        }
        seen
    }

    async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_partitioned_leader_cannot_acknowledge_writes_and_nothing_acknowledged_is_lost() {
    let t = Three::start("partition-test").await;
    let mut acked = produce_all(&t.everyone, (0..100).map(|i| format!("before-{i}"))).await;
    // The cluster is whole before it is partitioned: every node hosts the partition and
    // holds what was acknowledged.
    t.wait_everyone_holds(acked.len() as u64).await;
    let (old_leader, others) = t.isolate_leader().await;

    // Writes sent straight to the isolated leader are never acknowledged.
    let isolated = Caller::new(old_leader, t.addr_of(old_leader), None);
    let mut minority_attempts = Vec::new();
    for i in 0..5 {
        let value = format!("minority-{i}");
        let req = ProduceRequest { topic: "p".into(), partition: 0, timeout_ms: 1500 };
        let result = isolated.call(api::PRODUCE, message::encode_with_batches(&req, &[batch(&value)]), Duration::from_secs(5)).await;
        assert!(result.is_err(), "the isolated leader acknowledged {value}");
        minority_attempts.push(value);
    }

    // The majority elects a new leader and acknowledges writes.
    t.wait_majority_leader(old_leader, &others).await;
    acked.extend(produce_all(&t.cluster_of(&others), (0..100).map(|i| format!("during-{i}"))).await);

    // Heal; the old leader rejoins as a follower and its unacknowledged tail is replaced.
    t.heal();
    acked.extend(produce_all(&t.everyone, (0..50).map(|i| format!("after-{i}"))).await);

    let seen = t.read_all(acked.len()).await;
    for v in &acked {
        assert!(seen.contains(v), "acknowledged {v} was lost");
    }
    for v in &minority_attempts {
        assert!(!seen.contains(v), "{v}, never acknowledged, was committed");
    }
    // The old leader's own log converged: it holds the acknowledged data too.
    t.wait_everyone_holds(acked.len() as u64).await;
    t.shutdown().await;
}

/// The refusal a retry of sequence `sequence` gets from the cut-off leader `id`, sent
/// straight to it: it must not be `OutOfOrderSequence` (nor an acknowledgement).
async fn retry_at_cut_off_leader(t: &Three, id: u64, producer: ProducerIdentity, sequence: i32) -> ErrorCode {
    let isolated = Caller::new(id, t.addr_of(id), None);
    let req = ProduceRequest { topic: "p".into(), partition: 0, timeout_ms: 4_000 };
    let payload = message::encode_with_batches(&req, &[stamped(producer, sequence, &format!("seq-{sequence}"))]);
    match isolated.call(api::PRODUCE, payload, Duration::from_secs(10)).await {
        Ok(_) => panic!("the cut-off leader acknowledged a retry of sequence {sequence}"),
        Err(keel_net::CallError::Refused { code, message, .. }) => {
            assert_ne!(
                code,
                ErrorCode::OutOfOrderSequence,
                "the cut-off leader judged sequence {sequence} on its stale producer table ({message}): the producer would store it again under a new epoch"
            );
            code
        }
        Err(e) => panic!("the cut-off leader did not answer the retry of sequence {sequence}: {e}"),
    }
}

/// A leader cut off from its quorum keeps calling itself leader (it has heard of no
/// newer term) with the producer table of the moment it was cut off. A producer's
/// retry reaching it — after the majority's new leader stored that batch and more —
/// must not be refused as out of order from that table: the producer would give up
/// its sequence and send the batch again under a new epoch, storing it twice (what
/// the Jepsen retention run found with a paused leader). It answers that it cannot
/// lead now, and once healed the retry is recognised with its original offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_never_refuses_a_producers_retry_as_out_of_order_from_its_stale_table() {
    let t = Three::start("stale-table-test").await;
    let body = message::encode(&InitProducerRequest { name: None, current: None });
    let (_, answer) = t.everyone.call_any("init producer", api::INIT_PRODUCER, &|_| body.clone()).await.unwrap();
    let producer = message::decode::<InitProducerResponse>(&answer).unwrap().producer;
    let mut next = 0i32;
    let mut stored_at = Vec::new();
    for _ in 0..3 {
        let r = produce_one(&t.everyone, stamped(producer, next, &format!("seq-{next}"))).await;
        assert_eq!(r.duplicate, Duplicate::None);
        stored_at.push(r.base_offset);
        next += 1;
    }
    t.wait_everyone_holds(3).await;
    let (old_leader, others) = t.isolate_leader().await;
    t.wait_majority_leader(old_leader, &others).await;

    // The majority stores two more batches: the cut-off leader's table still expects
    // sequence 3, so a retry of sequence 4 looks to it like a gap.
    let majority = t.cluster_of(&others);
    for _ in 0..2 {
        stored_at.push(produce_one(&majority, stamped(producer, next, &format!("seq-{next}"))).await.base_offset);
        next += 1;
    }
    let code = retry_at_cut_off_leader(&t, old_leader, producer, next - 1).await;
    eprintln!("a retry of sequence {} within the sequence window: the cut-off leader answered {code:?}", next - 1);
    // And beyond the window of remembered batches: to the stale table, a sequence far
    // ahead of the one it expects.
    for _ in 0..2 * PRODUCER_BATCHES_IN_FLIGHT_MAX + 1 {
        stored_at.push(produce_one(&majority, stamped(producer, next, &format!("seq-{next}"))).await.base_offset);
        next += 1;
    }
    let code = retry_at_cut_off_leader(&t, old_leader, producer, next - 1).await;
    eprintln!("a retry of sequence {} beyond the window: the cut-off leader answered {code:?}", next - 1);

    // Each of the two stale refusals was caught by the check (the counter is the
    // process's: the three nodes share it).
    let metrics = keel_broker::metrics::install().render();
    let not_leading = metrics
        .lines()
        .find(|l| l.starts_with("keel_produce_refusal_checks_total{outcome=\"not_leading\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(not_leading >= 2.0, "keel_produce_refusal_checks_total{{outcome=\"not_leading\"}} is {not_leading}, expected at least 2");

    // Healed, the same retry is recognised with its original offset.
    t.heal();
    let r = produce_one(&t.everyone, stamped(producer, next - 1, &format!("seq-{}", next - 1))).await;
    assert_eq!((r.base_offset, r.duplicate), (*stored_at.last().unwrap(), Duplicate::Batch), "the retry was not recognised");
    let seen = t.read_all(next as usize).await;
    let expected: Vec<String> = (0..next).map(|s| format!("seq-{s}")).collect();
    assert_eq!(seen, expected, "every batch is stored once, in sequence order");
    t.shutdown().await;
}
