//! Quiescence with real processes (`node/quiesce.rs`): idle partition groups stop
//! ticking on every replica; a produce wakes them; and a node that leads quiesced
//! groups and is paused (SIGSTOP) past the liveness timeout is replaced — its groups
//! elect new leaders from the survivors — and, resumed, serves nothing stale: the
//! classic failure of a sleeping leader. While it is down, the survivors' groups still
//! quiesce.

mod dev_cluster;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use keel_client::consumer::{Consumer, StartAt};
use keel_client::producer::{Producer, ProducerConfig, Record};
use keel_client::{ClientConfig, Cluster};
use keel_protocol::api::client as api;
use keel_protocol::message::{self, FetchRequest, FetchResponse};

const TOPIC: &str = "quiet";
const PARTITIONS: u32 = 12;

fn value(round: u32, partition: u32) -> Vec<u8> {
    format!("round-{round}-partition-{partition}").into_bytes()
}

/// One record to every partition; every one must be acknowledged.
async fn produce_round(producer: &Producer, round: u32) {
    let mut pending = Vec::new();
    for p in 0..PARTITIONS {
        let record = Record { partition: Some(p), ..Record::new(value(round, p)) };
        pending.push(producer.send(TOPIC, record).await.unwrap());
    }
    for (p, ack) in pending.into_iter().enumerate() {
        if let Err(e) = ack.wait().await {
            panic!("round {round}, partition {p}: not acknowledged: {e}");
        }
    }
}

/// Waits until every replica of every partition on the nodes at `addrs` is quiesced
/// (their `keel_groups_quiesced` add up to `addrs.len()` × `PARTITIONS`); returns how
/// long it took.
async fn wait_all_quiesced(addrs: &[String], within: Duration) -> Duration {
    let start = Instant::now();
    let replicas = addrs.len() as u64 * u64::from(PARTITIONS);
    loop {
        let quiesced = dev_cluster::metric_sum(addrs.iter().map(String::as_str), "keel_groups_quiesced ");
        if quiesced == replicas {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "only {quiesced} of {replicas} partition replicas on {addrs:?} quiesced within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_quiesce_wake_on_use_and_a_paused_quiesced_leader_is_replaced_and_serves_nothing_stale() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = dev_cluster::KillNodesOnDrop(dir.path());
    let mut dev = dev_cluster::start_dev(dir.path(), dev_cluster::base_port(30_500));
    dev_cluster::wait_for_files(dir.path());
    let addrs = dev_cluster::bootstrap_addrs(dir.path());
    let cluster = dev_cluster::cluster_with_topic(dir.path(), TOPIC, PARTITIONS).await;
    let producer = Producer::new(cluster.clone(), ProducerConfig::default()).unwrap();
    produce_round(&producer, 0).await;
    let took = wait_all_quiesced(&addrs, Duration::from_secs(30)).await;
    eprintln!("all {} partition replicas quiesced {took:?} after the first round", 3 * PARTITIONS);

    // A write wakes a quiesced leader, which serves it after a fresh quorum round.
    let woken_by_use = || dev_cluster::metric_sum(addrs.iter().map(String::as_str), "keel_group_wakes_total{reason=\"use\"} ");
    let before = woken_by_use();
    produce_round(&producer, 1).await;
    assert!(woken_by_use() >= before + u64::from(PARTITIONS), "every partition's leader woke to write");
    wait_all_quiesced(&addrs, Duration::from_secs(30)).await;

    // Quiesced replicas keep none of their written entries in memory: on each node only
    // the metadata log still holds a share of the tail-cache budget (gauges are sampled
    // every second).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let holders = dev_cluster::metric_sum(addrs.iter().map(String::as_str), "keel_tail_cache_holders ");
        if holders <= addrs.len() as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "{holders} logs on {} nodes still cache entries with every partition quiesced", addrs.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Pause the node leading partition 0 (quiesced, with others) past the liveness
    // timeout: the survivors elect new leaders for its groups, and take writes.
    let metadata = cluster.metadata(true).await.unwrap();
    let topic = metadata.topics.iter().find(|t| t.name == TOPIC).unwrap();
    let paused = topic.partitions[0].leader.expect("partition 0 has a leader");
    let led: Vec<u32> = topic.partitions.iter().filter(|p| p.leader == Some(paused)).map(|p| p.partition).collect();
    let paused_addr = metadata.brokers.iter().find(|b| b.id == paused).expect("the paused node's address").addr.clone();
    let pid = dev_cluster::pid_of(dir.path(), paused as u32).expect("the leader's pid file");
    // SAFETY: kill(2) on a node process this test's keel dev started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
    let paused_at = Instant::now();
    let survivors: Vec<String> = addrs.iter().filter(|a| **a != paused_addr).cloned().collect();
    let others = Cluster::new(ClientConfig { bootstrap: survivors.clone(), ..ClientConfig::default() }).unwrap();
    let elected_within = loop {
        let m = others.metadata(true).await;
        if let Ok(m) = m {
            let t = m.topics.iter().find(|t| t.name == TOPIC).unwrap();
            if led.iter().all(|&p| t.partitions[p as usize].leader.is_some_and(|l| l != paused)) {
                break paused_at.elapsed();
            }
        }
        assert!(paused_at.elapsed() < Duration::from_secs(15), "the paused node's partitions {led:?} got no other leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("node {paused} (leading quiesced partitions {led:?}) paused; every one of them had another leader {elected_within:?} later");
    let producer2 = Producer::new(others.clone(), ProducerConfig::default()).unwrap();
    produce_round(&producer2, 2).await;

    // With that node still down, the survivors' groups — written just now — quiesce
    // again: a voter on a dead node does not keep its groups awake (heartbeating it in
    // vain kept a degraded 1,000-partition cluster's survivors at ~45 % of a core).
    let took = wait_all_quiesced(&survivors, Duration::from_secs(30)).await;
    eprintln!("with node {paused} down, all {} partition replicas on the survivors quiesced {took:?} after the write", 2 * PARTITIONS);

    // Resumed, the old leader still believes it leads partition 0 in its old term, with
    // 2 records committed. Asked straight away, it must not serve that: it refuses, or
    // answers with the 3 records committed meanwhile.
    // SAFETY: as above.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
    let request = message::encode(&FetchRequest { topic: TOPIC.into(), partition: 0, offset: 0, max_bytes: 1 << 20, max_wait_ms: 0 });
    match cluster.call_once(&paused_addr, api::FETCH, request, Duration::from_secs(5)).await {
        Ok(body) => {
            let (head, _): (FetchResponse, bytes::Bytes) = message::split_with_batches(&body).unwrap();
            assert_eq!(head.high_watermark, 3, "the resumed old leader served partition 0 with a stale high watermark");
            eprintln!("resumed node {paused} answered partition 0 with the current high watermark 3");
        }
        Err(e) => eprintln!("resumed node {paused} refused to serve partition 0: {e}"),
    }

    // Everything acknowledged reads back, once.
    let mut consumer = Consumer::new(cluster.clone(), TOPIC, StartAt::Earliest).await.unwrap();
    let want: HashSet<Vec<u8>> = (0..3).flat_map(|r| (0..PARTITIONS).map(move |p| value(r, p))).collect();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < want.len() {
        assert!(Instant::now() < deadline, "only {} of {} acknowledged records read back", got.len(), want.len());
        for m in consumer.poll(Duration::from_millis(500)).await.unwrap() {
            got.push(m.value.expect("every record has a value").to_vec());
        }
    }
    assert_eq!(got.len(), want.len(), "no record read twice");
    assert_eq!(got.into_iter().collect::<HashSet<_>>(), want);

    producer.close().await;
    producer2.close().await;
    // SAFETY: kill(2) on the keel dev process this test spawned.
    unsafe { libc::kill(dev.id() as i32, libc::SIGTERM) };
    assert!(dev.wait().unwrap().success());
}
