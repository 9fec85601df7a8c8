//! Retention through Raft with real processes (`keel dev`): a topic with a byte bound
//! keeps every replica's log under it while taking many times as much; a consumer
//! behind the new start is told where it is; and a follower stopped during the run —
//! whose entries the leader has purged meanwhile — is caught up by a snapshot carrying
//! the leader's retained log, then holds entries identical to the leader's.
//!
//! Size: `KEEL_RETENTION_MIB` MiB produced (default 24; the issue's figure is 200),
//! with a bound of 4 MiB (10 MiB from 100 MiB up) and 1 MiB segments.

mod dev_cluster;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dev_cluster::dev::Dev;
use futures::StreamExt;
use keel_client::consumer::{Consumer, StartAt};
use keel_client::producer::{Producer, ProducerConfig, Record};
use keel_protocol::TopicConfigPatch;

const MIB: u64 = 1 << 20;
const PORT_OFFSET: u16 = 24_500;
const METADATA_GROUP_DIR: &str = "00000000000000000000";

/// The partition group's directory on `node` (the one group that is not metadata).
fn partition_dir(dir: &Path, node: u64) -> Option<PathBuf> {
    let groups = dir.join(format!("node{node}/groups"));
    std::fs::read_dir(groups).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| !p.ends_with(METADATA_GROUP_DIR))
}

/// Bytes of segment files in a group directory.
fn segment_bytes(group: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(group) else { return 0 };
    entries.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".log")).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
}

fn node_pid(dir: &Path, node: u64) -> u32 {
    dev_cluster::pid_of(dir, node as u32).expect("a node pid file")
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process this test started (directly or through keel dev).
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Waits until `node` is fully caught up on every partition of `topic`, as its leader
/// reports it.
fn wait_caught_up(bootstrap: &str, topic: &str, node: u64, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let out = dev_cluster::keel(bootstrap).args(["cluster", "status", "--json"]).output().unwrap();
        if out.status.success() {
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let caught_up = status["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["topic"] == topic)
                .all(|p| p["replica_lag"].as_array().unwrap().iter().any(|r| r["replica"] == node && r["lag"] == 0));
            if caught_up {
                return started.elapsed();
            }
            assert!(started.elapsed() < limit, "node {node} never caught up on {topic}: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every node has applied the metadata group up to its leader's commit
/// index (as the leader reports it when the wait begins).
async fn wait_metadata_applied(cluster: &keel_client::Cluster, limit: Duration) {
    let admin = keel_client::admin::Admin::new(cluster.clone());
    let started = Instant::now();
    let mut target = None;
    loop {
        let metadata_groups: Vec<_> = match admin.cluster_status(Duration::from_secs(2)).await {
            Ok(reports) => reports.into_iter().map(|(b, r)| (b.id, r.ok().and_then(|s| s.groups.into_iter().find(|g| g.topic.is_none())))).collect(),
            Err(_) => Vec::new(),
        };
        if target.is_none() {
            target = metadata_groups.iter().filter_map(|(_, g)| g.as_ref()).find(|g| g.role == "leader").and_then(|g| g.committed_index);
        }
        if let Some(t) = target {
            if metadata_groups.len() == 3 && metadata_groups.iter().all(|(_, g)| g.as_ref().and_then(|g| g.applied_index).is_some_and(|a| a >= t)) {
                return;
            }
        }
        let applied: Vec<_> = metadata_groups.iter().map(|(n, g)| (*n, g.as_ref().and_then(|g| g.applied_index))).collect();
        assert!(started.elapsed() < limit, "the metadata group was not applied up to {target:?} on every node: (node, applied) {applied:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_retention_bounds_every_replica_and_a_stopped_follower_catches_up_by_snapshot() {
    let total_mib: u64 = std::env::var("KEEL_RETENTION_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let bound = if total_mib >= 100 { 10 * MIB } else { 4 * MIB };
    let segment = MIB;
    let dev = Dev::start(PORT_OFFSET);
    let dir = dev.dir.path().to_path_buf();
    let config = TopicConfigPatch { retention_bytes: Some(bound), segment_bytes: Some(segment), ..TopicConfigPatch::default() };
    dev.create_topic("ret", 1, config).await;
    let leader = dev.leader("ret", 0).await;
    let victim = leader % 3 + 1;
    let survivors: Vec<u64> = (1..=3).filter(|n| *n != victim).collect();

    // 1. Stop a follower, then produce `total_mib` MiB of 1 KiB messages while sampling
    //    every live replica's segment bytes.
    signal(node_pid(&dir, victim), libc::SIGKILL);
    eprintln!("stopped node {victim} (a follower of ret/0; the leader is node {leader})");
    let sampling = Arc::new(AtomicBool::new(true));
    let peaks: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(vec![0; 4]));
    let sampler = {
        let (sampling, peaks, dir, survivors) = (sampling.clone(), peaks.clone(), dir.clone(), survivors.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                for n in &survivors {
                    if let Some(g) = partition_dir(&dir, *n) {
                        let b = segment_bytes(&g);
                        let mut p = peaks.lock().unwrap();
                        p[*n as usize] = p[*n as usize].max(b);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let messages = total_mib * 1024;
    let value = vec![b'r'; 1000];
    let started = Instant::now();
    let producer = Producer::new(dev.cluster.clone(), ProducerConfig::default()).unwrap();
    let mut acks = std::collections::VecDeque::new();
    for i in 0..messages {
        let mut v = i.to_be_bytes().to_vec();
        v.extend_from_slice(&value[8..]);
        acks.push_back(producer.send("ret", Record::new(v)).await.unwrap());
        if acks.len() >= 4096 {
            acks.pop_front().unwrap().wait().await.expect("every message is acknowledged");
        }
    }
    for a in acks {
        a.wait().await.expect("every message is acknowledged");
    }
    producer.close().await;
    let took = started.elapsed();
    eprintln!("produced {messages} messages ({total_mib} MiB) in {took:.1?}");

    // 2. Every live replica gets under the bound plus one segment, and stays there.
    let settle = Instant::now();
    loop {
        let sizes: Vec<u64> = survivors.iter().map(|n| partition_dir(&dir, *n).map_or(0, |g| segment_bytes(&g))).collect();
        if sizes.iter().all(|s| *s <= bound + segment) {
            eprintln!("segment bytes after the run: {sizes:?} (bound {bound} + one segment {segment}), settled in {:.1?}", settle.elapsed());
            break;
        }
        assert!(settle.elapsed() < Duration::from_secs(30), "retention never brought the replicas under {bound} + {segment}: {sizes:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let peaks = peaks.lock().unwrap().clone();
    eprintln!("peak segment bytes during the run: {:?} MiB", survivors.iter().map(|n| peaks[*n as usize] as f64 / MIB as f64).collect::<Vec<_>>());
    // The leader throttles producers at the bound plus half a segment; a follower's
    // purge follows the leader's by a few milliseconds of writes.
    assert!(peaks[leader as usize] <= bound + segment, "the leader stayed under the bound plus one segment: {peaks:?}");
    assert!(survivors.iter().all(|n| peaks[*n as usize] <= bound + 2 * segment), "followers stayed near the bound: {peaks:?}");

    // 3. A consumer behind the start is told the new start; a plain consumer from the
    //    beginning skips to it.
    let consumer = Consumer::new(dev.cluster.clone(), "ret", StartAt::Earliest).await.unwrap();
    let refused = consumer.fetch_partition(0, 0, Duration::ZERO).await.expect_err("offset 0 was deleted by retention");
    let range = refused.out_of_range().expect("an OffsetOutOfRange answer carrying the range");
    eprintln!("fetch at 0: {refused}; log start {}, high watermark {}", range.log_start_offset, range.high_watermark);
    assert!(range.log_start_offset > 0 && range.high_watermark == messages, "{range:?}");
    assert!((messages - range.log_start_offset) * 1000 <= bound + 2 * segment, "the retained messages fit the bound");
    let mut reader = Consumer::new(dev.cluster.clone(), "ret", StartAt::Earliest).await.unwrap();
    let first = reader.poll(Duration::from_secs(5)).await.unwrap();
    // (Retention may still move the start between these reads.)
    let start_after = consumer.fetch_partition(0, 0, Duration::ZERO).await.unwrap_err().out_of_range().unwrap().log_start_offset;
    let at = first.first().map(|m| m.offset).expect("messages from the log start");
    let skips = reader.take_retention_skips();
    assert_eq!((skips.len(), skips[0].from, skips[0].to), (1, 0, at), "the consumer says it moved past deleted messages: {skips:?}");
    assert!((range.log_start_offset..=start_after).contains(&at), "a consumer from the beginning goes on from the log start ({at})");
    assert_eq!(first[0].value.as_deref().map(|v| u64::from_be_bytes(v[..8].try_into().unwrap())), Some(at));

    // 4. The stopped follower comes back: the leader no longer holds what it lacks, so
    //    it is sent a snapshot with the retained log.
    let restarted = dev_cluster::restart_node(&dir, dev_cluster::base_port(PORT_OFFSET), victim as u32);
    let took = wait_caught_up(&dev.bootstrap, "ret", victim, Duration::from_secs(120));
    eprintln!("node {victim} caught up in {took:.1?}");
    let victim_client = std::fs::read_to_string(dir.join("bootstrap")).unwrap();
    let victim_addr = victim_client.split(',').nth(victim as usize - 1).unwrap().trim().to_string();
    let installed = dev_cluster::metric_sum([victim_addr.as_str()], "keel_snapshots_installed_total{with_log=\"true\"}");
    let received = dev_cluster::metric_sum([victim_addr.as_str()], "keel_snapshot_bytes_total{direction=\"received\"}");
    eprintln!("node {victim}: {installed} snapshot(s) installed with the log, {received} entry bytes received");
    assert!(installed >= 1 && received > 0, "the follower was caught up by a snapshot carrying the log");
    // Entries appended after the install, on every replica.
    dev.produce("ret", (0..200).map(|i| Record::new(format!("after {i}"))).collect()).await;
    wait_caught_up(&dev.bootstrap, "ret", victim, Duration::from_secs(30));

    // 5. Stop everything cleanly; the restarted follower's log equals the leader's
    //    entry by entry (index, term, offset, bytes) wherever both hold entries, and
    //    both end at the same entry.
    signal(restarted.0.id(), libc::SIGTERM);
    let mut dev = dev;
    signal(dev.process.id(), libc::SIGTERM);
    assert!(dev.process.wait().unwrap().success());
    let tmp = &dev.dir;
    let mut restarted = restarted;
    let deadline = Instant::now() + Duration::from_secs(20);
    while restarted.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the restarted node did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let theirs = dev_cluster::log_entries(&partition_dir(tmp.path(), leader).unwrap());
    let mine = dev_cluster::log_entries(&partition_dir(tmp.path(), victim).unwrap());
    let victim_bytes = segment_bytes(&partition_dir(tmp.path(), victim).unwrap());
    eprintln!(
        "leader log: entries {}..={}; caught-up follower: entries {}..={} ({victim_bytes} segment bytes)",
        theirs[0].0,
        theirs.last().unwrap().0,
        mine[0].0,
        mine.last().unwrap().0
    );
    assert_eq!(mine.last().map(|e| e.0), theirs.last().map(|e| e.0), "both logs end at the same entry");
    let from = mine[0].0.max(theirs[0].0);
    let a: Vec<_> = mine.iter().filter(|e| e.0 >= from).collect();
    let b: Vec<_> = theirs.iter().filter(|e| e.0 >= from).collect();
    assert!(a.len() >= 5, "the logs overlap");
    assert!(a == b, "the caught-up follower's entries equal the leader's from entry {from}");
    assert!(victim_bytes <= bound + segment, "the caught-up follower is under the bound too");
}

/// The client address of `node` (the bootstrap file lists them in node order).
fn client_addr(dir: &Path, node: u64) -> String {
    let bootstrap = std::fs::read_to_string(dir.join("bootstrap")).unwrap();
    bootstrap.split(',').nth(node as usize - 1).unwrap().trim().to_string()
}

/// Segment bytes in `node`'s staged snapshot log of its partition group.
fn staged_bytes(dir: &Path, node: u64) -> u64 {
    partition_dir(dir, node).map_or(0, |g| segment_bytes(&g.join("snapshot.staging")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_is_refilled_from_a_purged_leader_and_a_killed_transfer_resumes() {
    const OFFSET: u16 = 26_300;
    let bound = 4 * MIB;
    let dev = Dev::start(OFFSET);
    let dir = dev.dir.path().to_path_buf();
    let config = TopicConfigPatch { retention_bytes: Some(bound), segment_bytes: Some(MIB), ..TopicConfigPatch::default() };
    dev.create_topic("wipe", 1, config).await;
    let leader = dev.leader("wipe", 0).await;
    let victim = leader % 3 + 1;
    let value = |i: u64| {
        let mut v = i.to_be_bytes().to_vec();
        v.resize(1000, b'w');
        Record::new(v)
    };
    dev.produce("wipe", (0..12_000).map(value).collect()).await;

    // 1. Wipe the victim while its leader's log is purged.
    signal(node_pid(&dir, victim), libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::remove_dir_all(dir.join(format!("node{victim}"))).unwrap();
    let admin = dev_cluster::admin_addr(&client_addr(&dir, leader));
    let first = Consumer::new(dev.cluster.clone(), "wipe", StartAt::Earliest).await.unwrap();
    let start = first.fetch_partition(0, 0, Duration::ZERO).await.expect_err("the leader's log is purged").out_of_range().unwrap().log_start_offset;
    eprintln!("wiped node {victim}; the leader (node {leader}) starts at offset {start}");
    assert!(start > 0);

    // 2. Slow the leader's snapshot chunks down, restart the victim empty, and kill it
    //    once part of the transfer is staged.
    assert!(dev_cluster::admin_post(&admin, "/test/faults", r#"{"snapshot_chunk_delay_ms": 400}"#).contains("200"));
    let base_port = dev_cluster::base_port(OFFSET);
    let restarted = dev_cluster::restart_node(&dir, base_port, victim as u32);
    let deadline = Instant::now() + Duration::from_secs(60);
    while staged_bytes(&dir, victim) == 0 {
        assert!(Instant::now() < deadline, "no snapshot transfer to the wiped node began");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(restarted); // SIGKILL mid-transfer
    let staged_before = staged_bytes(&dir, victim);
    eprintln!("killed node {victim} with {staged_before} bytes of the transfer staged");

    // 3. Restart it: the transfer resumes after what was staged.
    let restarted = dev_cluster::restart_node(&dir, base_port, victim as u32);
    let took = wait_caught_up(&dev.bootstrap, "wipe", victim, Duration::from_secs(120));
    assert!(dev_cluster::admin_post(&admin, "/test/faults", r#"{"snapshot_chunk_delay_ms": 0}"#).contains("200"));
    let received = dev_cluster::metric_sum([client_addr(&dir, victim).as_str()], "keel_snapshot_bytes_total{direction=\"received\"}");
    let installed = dev_cluster::metric_sum([client_addr(&dir, victim).as_str()], "keel_snapshots_installed_total{with_log=\"true\"}");
    eprintln!("node {victim} caught up {took:.1?} after its restart, receiving {received} more entry bytes; {installed} snapshot(s) installed with the log");
    let node_log = std::fs::read_to_string(dir.join(format!("node{victim}-restarted.log"))).unwrap_or_default();
    for line in node_log.lines().filter(|l| l.contains("snapshot") || l.contains("refill") || l.contains("rejoin")) {
        eprintln!("  node {victim}: {line}");
    }
    assert_eq!(installed, 1);
    assert!(received > 0 && received + staged_before <= bound + 2 * MIB, "the resumed transfer did not send the staged part again");

    // 4. Kill another node: every later write needs the refilled node's acknowledgement.
    let other = (1..=3).find(|n| *n != victim && *n != leader).unwrap();
    signal(node_pid(&dir, other), libc::SIGKILL);
    dev.produce("wipe", (12_000..13_000).map(value).collect()).await;
    // (Read from the first of those: retention keeps moving the start while they are read.)
    let mut reader = Consumer::new(dev.cluster.clone(), "wipe", StartAt::Offset(12_000)).await.unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.last().is_none_or(|o| *o < 12_999) {
        assert!(Instant::now() < deadline, "could not read back to the end");
        for m in reader.poll(Duration::from_secs(1)).await.unwrap() {
            assert_eq!(u64::from_be_bytes(m.value.as_deref().unwrap()[..8].try_into().unwrap()), m.offset);
            seen.push(m.offset);
        }
    }
    assert_eq!(seen.first().copied(), Some(12_000));
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "every message written with node {other} down, in order");
    eprintln!("read offsets {}..={} back in order with node {other} down", seen[0], seen.last().unwrap());

    // 5. The refilled node's log equals the leader's wherever both hold entries.
    let mut restarted = restarted;
    signal(restarted.0.id(), libc::SIGTERM);
    let mut dev = dev;
    signal(dev.process.id(), libc::SIGTERM);
    let _ = dev.process.wait();
    while restarted.0.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let theirs = dev_cluster::log_entries(&partition_dir(&dir, leader).unwrap());
    let mine = dev_cluster::log_entries(&partition_dir(&dir, victim).unwrap());
    let from = mine[0].0.max(theirs[0].0);
    let last = mine.last().unwrap().0;
    // The leader may hold a tail the refilled node never received: entries appended after
    // the refilled node was stopped, which no quorum acknowledged (node 3 was down). Every
    // entry carrying an acknowledged record (offsets below 13,000) it must hold.
    let unreplicated: Vec<_> = theirs.iter().filter(|e| e.0 > last).map(|e| (e.0, e.2)).collect();
    assert!(
        unreplicated.iter().all(|(_, base_offset)| *base_offset >= 13_000),
        "the refilled node (last entry {last}) lacks entries holding acknowledged records: (index, base offset) {unreplicated:?}"
    );
    let a: Vec<_> = mine.iter().filter(|e| e.0 >= from).collect();
    let b: Vec<_> = theirs.iter().filter(|e| (from..=last).contains(&e.0)).collect();
    let range = |v: &[&dev_cluster::StoredEntry]| (v.first().map(|e| e.0), v.last().map(|e| e.0));
    let differ = a.iter().zip(&b).find(|(x, y)| x != y).map(|(x, y)| (x.0, x.1, y.1, x.2, y.2, x.3.len(), y.3.len()));
    assert!(
        !a.is_empty() && a == b,
        "the refilled node's entries equal the leader's from entry {from}: refilled {:?}, leader {:?}, first difference (index, terms, base offsets, lengths) {differ:?}",
        range(&a),
        range(&b)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_retention_empties_a_quiet_partition_once_its_messages_are_older_than_the_retention() {
    let dev = Dev::start(27_800);
    let config = TopicConfigPatch { retention_ms: Some(3_000), dedupe_window_ms: Some(1_000), ..TopicConfigPatch::default() };
    dev.create_topic("aged", 1, config).await;
    dev.produce("aged", (0..50).map(|i| Record::new(format!("old {i}"))).collect()).await;
    let produced = Instant::now();
    let consumer = Consumer::new(dev.cluster.clone(), "aged", StartAt::Earliest).await.unwrap();
    let fetched = consumer.fetch_partition(0, 0, Duration::ZERO).await.unwrap();
    assert_eq!(fetched.messages.len(), 50, "kept while younger than the retention");
    // Nothing is written any more: the active segment must roll by age and go.
    let deadline = Instant::now() + Duration::from_secs(30);
    let range = loop {
        if let Err(e) = consumer.fetch_partition(0, 0, Duration::ZERO).await {
            if let Some(r) = e.out_of_range() {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "the quiet partition's messages never aged out");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("all 50 messages deleted {:.1?} after they were written (retention 3 s): {range:?}", produced.elapsed());
    assert_eq!((range.log_start_offset, range.high_watermark), (50, 50));
    assert!(produced.elapsed() >= Duration::from_secs(3), "nothing went before its time");
}

/// Segment bytes of the metadata log on `node`.
fn metadata_log_bytes(dir: &Path, node: u64) -> u64 {
    segment_bytes(&dir.join(format!("node{node}/groups/{METADATA_GROUP_DIR}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_log_is_cut_and_purged_and_a_wiped_node_gets_the_metadata_by_snapshot() {
    const OFFSET: u16 = 27_400;
    const SEGMENT: u64 = 64 * 1024;
    const RETAINED: u64 = 128 * 1024;
    const PRODUCERS: usize = 2_000;
    let env = [("KEEL_METADATA_SEGMENT_BYTES", "65536"), ("KEEL_METADATA_RETAINED_BYTES", "131072")];
    let dev = Dev::start_with_env(OFFSET, &env);
    let dir = dev.dir.path().to_path_buf();
    // A topic created before everything the cut removes: afterwards only the metadata
    // snapshot knows it.
    dev.create_topic("early", 1, TopicConfigPatch::default()).await;
    let value = |i: u64| Record::new(i.to_be_bytes().to_vec());
    dev.produce("early", (0..10).map(value).collect()).await;

    // 1. Wipe node 3, then fill the metadata log with named producer registrations.
    let victim = 3;
    signal(node_pid(&dir, victim), libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::remove_dir_all(dir.join(format!("node{victim}"))).unwrap();
    let started = Instant::now();
    let names: Vec<String> = (0..PRODUCERS).map(|i| format!("metadata-log-filler-{i:05}-{}", "n".repeat(40))).collect();
    let registered = futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let cluster = dev.cluster.clone();
            async move {
                let body = keel_protocol::message::encode(&keel_protocol::message::InitProducerRequest { name: Some(name), current: None });
                cluster.call_any("register a producer", keel_protocol::api::client::INIT_PRODUCER, &|_| body.clone()).await.map(|_| ())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    assert!(registered.iter().all(Result::is_ok), "every registration succeeds: {:?}", registered.iter().find(|r| r.is_err()));
    eprintln!("registered {PRODUCERS} named producers in {:.1?}", started.elapsed());

    // 2. The live nodes' metadata logs were cut and purged down to the bound.
    let live = [1u64, 2];
    let addrs: Vec<String> = live.iter().map(|n| client_addr(&dir, *n)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let bytes: Vec<u64> = live.iter().map(|n| metadata_log_bytes(&dir, *n)).collect();
        let purged = addrs.iter().map(|a| dev_cluster::metric_sum([a.as_str()], "keel_retention_purged_segments_total")).collect::<Vec<_>>();
        if bytes.iter().all(|b| *b <= RETAINED + SEGMENT) && purged.iter().all(|p| *p > 0) {
            eprintln!("metadata log bytes on nodes 1, 2: {bytes:?} (bound {} + a segment); segments purged: {purged:?}", RETAINED);
            break;
        }
        assert!(Instant::now() < deadline, "the metadata logs were not purged to the bound: {bytes:?} bytes, {purged:?} segments purged");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 3. The wiped node restarts empty: the metadata reaches it as a snapshot with the
    //    leader's retained log (the entries that created "early" are gone), so it
    //    hosts "early" again and catches up on it.
    let base_port = dev_cluster::base_port(OFFSET);
    let restarted = dev_cluster::restart_node_with_env(&dir, base_port, victim as u32, &env);
    let restart = Instant::now();
    let installed = loop {
        let addr = client_addr(&dir, victim);
        if std::net::TcpStream::connect(dev_cluster::admin_addr(&addr)).is_ok() {
            let n = dev_cluster::metric_sum([addr.as_str()], "keel_snapshots_installed_total{with_log=\"true\"}");
            if n >= 1 {
                break n;
            }
        }
        assert!(restart.elapsed() < Duration::from_secs(60), "the metadata never reached the wiped node by snapshot");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("node {victim} installed {installed} snapshot(s) with the log {:.1?} after its restart", restart.elapsed());
    while partition_dir(&dir, victim).is_none() {
        assert!(restart.elapsed() < Duration::from_secs(60), "node {victim} never hosted early/0 again");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_caught_up(&dev.bootstrap, "early", victim, Duration::from_secs(60));
    eprintln!("node {victim} hosts early/0 again, caught up {:.1?} after its restart", restart.elapsed());
    assert!(metadata_log_bytes(&dir, victim) <= RETAINED + SEGMENT, "the refilled node holds only the retained metadata log");

    // 4. A node whose metadata log was purged restarts from its snapshot: killed and
    //    restarted, node 1 alone answers that "early" exists.
    signal(node_pid(&dir, 1), libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    let restarted_1 = dev_cluster::restart_node_with_env(&dir, base_port, 1, &env);
    let only_1 =
        keel_client::Cluster::new(keel_client::ClientConfig { bootstrap: vec![client_addr(&dir, 1)], ..keel_client::ClientConfig::default() }).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(m) = only_1.metadata(true).await {
            if m.topics.iter().any(|t| t.name == "early") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "restarted node 1 never answered with the early topic");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("node 1, restarted over its purged metadata log, knows topic early");

    // 5. Every node's metadata, read from its snapshot and log, is the same and holds
    //    every registration and the early topic.
    //    Node 1 answered from its snapshot; the registrations after it it applies once
    //    the leader tells it the commit index, so wait for that before stopping it.
    wait_metadata_applied(&dev.cluster, Duration::from_secs(30)).await;
    std::thread::sleep(Duration::from_millis(500)); // the committed-index hint is saved every 200 ms
    let mut dev = dev;
    signal(dev.process.id(), libc::SIGTERM);
    let _ = dev.process.wait();
    for mut node in [restarted, restarted_1] {
        signal(node.0.id(), libc::SIGTERM);
        while node.0.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let states: Vec<_> = (1..=3).map(|n| keel_broker::inspect::metadata_state(&dir.join(format!("node{n}"))).unwrap()).collect();
    for (n, s) in states.iter().enumerate() {
        eprintln!(
            "node {}: metadata applied to offset {}, {} named producers, topics {:?}",
            n + 1,
            s.applied_offset,
            s.named_producers.len(),
            s.topics.keys().collect::<Vec<_>>()
        );
        assert!(s.topics.contains_key("early"));
        assert!(names.iter().all(|name| s.named_producers.contains_key(name)), "node {} knows every registered producer", n + 1);
    }
    assert!(states[2] == states[0] && states[1] == states[0], "every node folded the same metadata");
}
