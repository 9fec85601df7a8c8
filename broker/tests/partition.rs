//! A leader cut off from the majority (both directions of its peer traffic blocked)
//! cannot acknowledge writes; the majority elects a new leader and keeps acknowledging;
//! after the partition heals, every acknowledged record is present and none of the
//! writes attempted on the isolated leader are.

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
use keel_protocol::message::{self, ClusterStatusResponse, GroupStatus, ProduceRequest};

fn batch(value: &str) -> Bytes {
    let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
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

/// Partition `p`'s state on node `id` (`None`: it does not answer, or hosts no replica).
async fn group_status(addr: &str, id: u64) -> Option<GroupStatus> {
    let status = Caller::new(id, addr.to_string(), None).call(api::CLUSTER_STATUS, Bytes::new(), Duration::from_secs(2)).await.ok()?;
    let status: ClusterStatusResponse = message::decode(&status).ok()?;
    status.groups.into_iter().find(|g| g.topic.as_deref() == Some("p"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_partitioned_leader_cannot_acknowledge_writes_and_nothing_acknowledged_is_lost() {
    // The nodes' logs go to the test's captured output (shown when it fails); `RUST_LOG`
    // chooses what, informational messages of Keel by default.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("keel_broker=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let configs = local_cluster(dir.path(), 3, "partition-test");
    let addr_of = |id: u64| configs[0].cluster.members.iter().find(|m| m.id == id).unwrap().client_addr.clone();
    let nodes = Node::start_all(configs.clone()).await.unwrap();
    let everyone = Cluster::new(ClientConfig { bootstrap: (1..=3).map(addr_of).collect(), ..ClientConfig::default() }).unwrap();
    let admin = Admin::new(everyone.clone());
    admin.create_topic("p", 1, 3).await.unwrap();
    let mut acked = produce_all(&everyone, (0..100).map(|i| format!("before-{i}"))).await;

    // The cluster is whole before it is partitioned: every node hosts the partition and
    // holds what was acknowledged. (A node that started late on this brand-new cluster
    // is refilled like a wiped one and votes only once caught up; cut off before that,
    // the "majority" would rightly elect nobody.)
    let deadline = Instant::now() + Duration::from_secs(20);
    for id in 1..=3u64 {
        loop {
            let hw = group_status(&addr_of(id), id).await.map_or(0, |g| g.high_watermark);
            if hw >= acked.len() as u64 {
                break;
            }
            assert!(Instant::now() < deadline, "node {id} did not hold the first {} messages (high watermark {hw})", acked.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Isolate the partition's leader.
    let deadline = Instant::now() + Duration::from_secs(20);
    let old_leader = loop {
        if let Some(l) = admin.describe_topic("p").await.unwrap().partitions[0].leader {
            break l;
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let others: Vec<u64> = (1..=3).filter(|id| *id != old_leader).collect();
    for n in &nodes {
        if n.id == old_leader {
            n.peer_faults().block(&others);
        } else {
            n.peer_faults().block(&[old_leader]);
        }
    }

    // Writes sent straight to the isolated leader are never acknowledged.
    let isolated = Caller::new(old_leader, addr_of(old_leader), None);
    let mut minority_attempts = Vec::new();
    for i in 0..5 {
        let value = format!("minority-{i}");
        let req = ProduceRequest { topic: "p".into(), partition: 0, timeout_ms: 1500 };
        let result = isolated.call(api::PRODUCE, message::encode_with_batches(&req, &[batch(&value)]), Duration::from_secs(5)).await;
        assert!(result.is_err(), "the isolated leader acknowledged {value}");
        minority_attempts.push(value);
    }

    // The majority elects a new leader and acknowledges writes.
    let majority = Cluster::new(ClientConfig { bootstrap: others.iter().map(|id| addr_of(*id)).collect(), ..ClientConfig::default() }).unwrap();
    let majority_admin = Admin::new(majority.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leader = majority_admin.describe_topic("p").await.unwrap().partitions[0].leader;
        if leader.is_some_and(|l| l != old_leader) {
            break;
        }
        if Instant::now() >= deadline {
            let mut report = String::new();
            for id in &others {
                report.push_str(&format!("\n  node {id}: {:?}", group_status(&addr_of(*id), *id).await));
            }
            panic!("the majority elected no new leader (old leader {old_leader}); the partition on the majority:{report}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    acked.extend(produce_all(&majority, (0..100).map(|i| format!("during-{i}"))).await);

    // Heal; the old leader rejoins as a follower and its unacknowledged tail is replaced.
    for n in &nodes {
        n.peer_faults().heal();
    }
    acked.extend(produce_all(&everyone, (0..50).map(|i| format!("after-{i}"))).await);

    let mut consumer = Consumer::new(everyone.clone(), "p", StartAt::Earliest).await.unwrap();
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < acked.len() && Instant::now() < deadline {
        for m in consumer.poll(Duration::from_millis(300)).await.unwrap() {
            seen.push(String::from_utf8(m.value.unwrap().to_vec()).unwrap());
        }
    }
    for v in &acked {
        assert!(seen.contains(v), "acknowledged {v} was lost");
    }
    for v in &minority_attempts {
        assert!(!seen.contains(v), "{v}, never acknowledged, was committed");
    }
    // The old leader's own log converged: it holds the acknowledged data too.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hw = group_status(&addr_of(old_leader), old_leader).await.map_or(0, |g| g.high_watermark);
        if hw >= acked.len() as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "the healed node did not catch up (hw {hw})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in nodes {
        n.shutdown().await;
    }
}
