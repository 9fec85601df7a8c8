//! Failover with real processes: a producer writes through the Rust client to a
//! `keel dev` cluster, the partition's leader process is killed with SIGKILL, the
//! producer keeps going (its retries find the new leader), and every acknowledged
//! record — before and after the kill — is read back byte for byte.

mod dev_cluster;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use keel_client::consumer::{Consumer, StartAt};
use keel_client::producer::{Producer, ProducerConfig, Record};
use keel_client::Cluster;

const TOPIC: &str = "failover";
const PER_PHASE: u32 = 3000;

/// A value that names its record and carries bytes a corruption would change.
fn value(i: u32) -> Vec<u8> {
    let mut v = format!("record-{i:06}:").into_bytes();
    v.extend((0..200u32).map(|k| (i.wrapping_mul(31).wrapping_add(k * 7) % 251) as u8));
    v
}

/// Sends `range` and returns the values acknowledged (all of them, or the test fails).
async fn produce(producer: &Producer, range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
    let mut pending = Vec::new();
    for i in range {
        pending.push((i, producer.send(TOPIC, Record::new(value(i))).await.unwrap()));
    }
    let mut acked = Vec::new();
    for (i, ack) in pending {
        match ack.wait().await {
            Ok(_) => acked.push(value(i)),
            Err(e) => panic!("record {i} was not acknowledged: {e}"),
        }
    }
    acked
}

async fn leader_of_partition_0(cluster: &Cluster, not: Option<u64>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(m) = cluster.metadata(true).await {
            let leader = m.topics.iter().find(|t| t.name == TOPIC).and_then(|t| t.partitions.first()).and_then(|p| p.leader);
            if let Some(l) = leader.filter(|l| Some(*l) != not) {
                return l;
            }
        }
        assert!(Instant::now() < deadline, "partition 0 has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producing_resumes_after_the_leader_is_killed_and_every_acknowledged_record_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = dev_cluster::KillNodesOnDrop(dir.path());
    let mut dev = dev_cluster::start_dev(dir.path(), dev_cluster::base_port(29_000));
    dev_cluster::wait_for_files(dir.path());
    let cluster = dev_cluster::cluster_with_topic(dir.path(), TOPIC, 1).await;
    let producer = Producer::new(cluster.clone(), ProducerConfig::default()).unwrap();

    let mut acked = produce(&producer, 0..PER_PHASE).await;
    let old = leader_of_partition_0(&cluster, None).await;
    let pid = dev_cluster::pid_of(dir.path(), old as u32).expect("the leader's pid file");
    // SAFETY: kill(2) on a node process this test's keel dev started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };

    // The same producer keeps sending: every record is acknowledged, by a new leader.
    let killed_at = Instant::now();
    acked.extend(produce(&producer, PER_PHASE..2 * PER_PHASE).await);
    let resumed_within = killed_at.elapsed();
    let new = leader_of_partition_0(&cluster, Some(old)).await;
    assert_ne!(new, old);
    eprintln!("node {old} killed; {PER_PHASE} more records acknowledged by node {new} within {resumed_within:?}");

    // Read everything back from the survivors.
    let mut consumer = Consumer::new(cluster.clone(), TOPIC, StartAt::Earliest).await.unwrap();
    let want: HashSet<Vec<u8>> = acked.into_iter().collect();
    let mut got: HashSet<Vec<u8>> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !want.is_subset(&got) {
        assert!(Instant::now() < deadline, "only {} of {} acknowledged records read back", want.intersection(&got).count(), want.len());
        for m in consumer.poll(Duration::from_millis(500)).await.unwrap() {
            got.insert(m.value.expect("every record has a value").to_vec());
        }
    }
    for v in &got {
        let i: u32 = std::str::from_utf8(&v[7..13]).ok().and_then(|s| s.parse().ok()).expect("a sent record's name");
        assert_eq!(v, &value(i), "record {i} is read back exactly as sent");
    }
    assert_eq!(want.len(), 2 * PER_PHASE as usize);

    producer.close().await;
    // SAFETY: kill(2) on the keel dev process this test spawned.
    unsafe { libc::kill(dev.id() as i32, libc::SIGTERM) };
    assert!(dev.wait().unwrap().success());
}
