//! Replay and redrive jobs against real processes (`keel dev`, the `keel` CLI): each
//! fails if a job loses, duplicates or reorders a message, and each kills the node
//! running the job (the metadata leader) halfway.
//!
//! - a replay by time range copies exactly the source range, once, in order per
//!   partition, across a SIGKILL of the job's node, and holds its `--rate`;
//! - a redrive interrupted by a SIGKILL of the job's node sends each dead letter back
//!   once, exactly the ones its dry run listed, each a new message with its redrive
//!   count; a later redrive leaves them out, and the loop guard quarantines letters
//!   redriven the configured number of times.
//!
//! `KEEL_REPLAY_MESSAGES` sets the replay's size (default 30,000; the issue's
//! measurement used 1,000,000).

mod dev_cluster;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dev_cluster::dev::Dev;
use keel_client::consumer::{Consumer, Message, StartAt};
use keel_client::job::{Job, JobState};
use keel_client::producer::Record;
use keel_client::queue::{QueueConfig, QueueConsumer};
use keel_client::{Admin, Cluster};
use keel_protocol::{GroupConfigPatch, TopicConfigPatch};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Every message of `topic`/`partition` below its high watermark now.
async fn read_partition(cluster: &Cluster, topic: &str, partition: u32) -> Vec<Message> {
    let consumer = Consumer::new(cluster.clone(), topic, StartAt::Earliest).await.unwrap();
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let f = consumer.fetch_partition(partition, offset, Duration::ZERO).await.unwrap();
        let Some(last) = f.messages.last().map(|m| m.offset) else { break };
        out.extend(f.messages.into_iter().filter(|m| m.offset >= offset));
        offset = last + 1;
        if offset >= f.high_watermark {
            break;
        }
    }
    out
}

/// The node leading the metadata group (which runs the jobs).
async fn metadata_leader(admin: &Admin) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(nodes) = admin.cluster_status(Duration::from_secs(2)).await {
            let leader = nodes.iter().filter_map(|(_, s)| s.as_ref().ok()).flat_map(|s| s.groups.iter()).find(|g| g.topic.is_none()).and_then(|g| g.leader);
            if let Some(l) = leader {
                return l;
            }
        }
        assert!(Instant::now() < deadline, "no metadata leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kill_node(dev: &Dev, node: u64) {
    let pid = dev_cluster::pid_of(dev.dir.path(), node as u32).expect("the node's pid file");
    // SAFETY: kill(2) on a node process this test's keel dev started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    eprintln!("killed node {node}, the metadata leader running the job");
}

/// Follows `id` until it ends; calls `each` with every observation.
async fn wait_job(admin: &Admin, id: u64, within: Duration, mut each: impl FnMut(&Job)) -> Job {
    let deadline = Instant::now() + within;
    loop {
        match admin.job(id).await {
            Ok(job) => {
                each(&job);
                if job.state.finished() {
                    return job;
                }
            }
            Err(e) => eprintln!("job {id}: {e} (retrying)"),
        }
        assert!(Instant::now() < deadline, "job {id} did not end within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of the high watermarks of `topic`'s partitions.
async fn end_of(cluster: &Cluster, topic: &str, partitions: u32) -> u64 {
    let consumer = Consumer::new(cluster.clone(), topic, StartAt::Earliest).await.unwrap();
    let mut sum = 0;
    for p in 0..partitions {
        sum += consumer.fetch_partition(p, 0, Duration::ZERO).await.map_or(0, |f| f.high_watermark);
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_by_time_copies_the_range_once_in_order_at_its_rate_even_when_its_node_is_killed_halfway() {
    let _serial = SERIAL.lock().await;
    let dev = Dev::start(28_000);
    let admin = Admin::new(dev.cluster.clone());
    dev.create_topic("events", 3, TopicConfigPatch::default()).await;
    let n: usize = std::env::var("KEEL_REPLAY_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(30_000);
    // Before the range, the range, after the range: told apart by their timestamps.
    let before: Vec<Record> = (0..300).map(|i| Record::new(format!("before-{i}")).with_key(format!("k{}", i % 97))).collect();
    dev.produce("events", before).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let from = now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100_000) {
        dev.produce("events", chunk.iter().map(|i| Record::new(format!("in-{i:08}")).with_key(format!("k{}", i % 97))).collect()).await;
    }
    eprintln!("produced {n} messages in {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let until = now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    dev.produce("events", (0..300).map(|i| Record::new(format!("after-{i}")).with_key(format!("k{}", i % 97))).collect()).await;

    // At a rate that makes the job last about 10 s, so the kill lands in its middle.
    let rate = (n / 10).max(100) as u32;
    let out = dev_cluster::run_ok(dev.keel().args(["replay", "events", "--from", &rfc3339(from), "--to", &rfc3339(until), "--into", "events.recon"]).args([
        "--rate",
        &rate.to_string(),
        "--detach",
        "--json",
    ]));
    let job: Job = serde_json::from_str(out.trim()).expect("the created job as JSON");
    assert_eq!(job.spec.total(), n as u64, "the time range resolved to exactly the messages produced inside it");
    // Measure the rate from the target's growth while the job runs, before the kill.
    let t0 = Instant::now();
    let (mut first, mut last) = (None, None);
    let mut killed = None;
    while killed.is_none() {
        let copied = end_of(&dev.cluster, "events.recon", 3).await;
        if copied >= n as u64 / 10 && first.is_none() {
            first = Some((t0.elapsed(), copied));
        }
        if copied >= n as u64 * 4 / 10 {
            last = Some((t0.elapsed(), copied));
            killed = Some(metadata_leader(&admin).await);
            kill_node(&dev, killed.unwrap());
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "the replay did not reach 40% ({copied} of {n})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ((t1, c1), (t2, c2)) = (first.unwrap(), last.unwrap());
    let measured = (c2 - c1) as f64 / (t2 - t1).as_secs_f64();
    eprintln!("replay rate {measured:.0} msgs/s for --rate {rate} (10%→40% of the range)");
    assert!((measured - f64::from(rate)).abs() <= f64::from(rate) * 0.1, "--rate {rate} held within 10%: {measured:.0} msgs/s");

    let job = wait_job(&admin, job.id, Duration::from_secs(180), |_| {}).await;
    assert_eq!(job.state, JobState::Done, "{job:?}");
    assert_eq!((job.copied(), job.skipped()), (n as u64, 0));
    assert!(metadata_leader(&admin).await != killed.unwrap(), "another node finished the job");
    // Exactly the source range, once, in order, partition by partition.
    let mut copied = 0;
    for (p, range) in job.spec.ranges.iter().enumerate() {
        let source: Vec<Message> =
            read_partition(&dev.cluster, "events", p as u32).await.into_iter().filter(|m| m.offset >= range.from && m.offset < range.until).collect();
        let target = read_partition(&dev.cluster, "events.recon", p as u32).await;
        let values = |ms: &[Message]| ms.iter().map(|m| (m.key.clone(), m.value.clone(), m.timestamp_ms)).collect::<Vec<_>>();
        assert_eq!(target.len(), source.len(), "partition {p}: the target holds as many messages as the range");
        assert!(values(&target) == values(&source), "partition {p}: the target holds the range's messages, once each, in order");
        assert!(source.iter().all(|m| m.value.as_deref().is_some_and(|v| v.starts_with(b"in-"))));
        copied += target.len();
    }
    assert_eq!(copied, n);
    eprintln!("replayed {n} messages exactly once across the kill of node {}", killed.unwrap());
    dev.stop();
}

fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string()
}

/// Dead-letters every message of `topic` in group `group` (a member that nacks each
/// with `reason` until it is dead-lettered); returns when `count` letters exist.
async fn dead_letter_all(dev: &Dev, topic: &str, group: &str, reason: &str, count: usize) {
    let config = QueueConfig { member: Some("failing".into()), ..QueueConfig::default() };
    let mut member = QueueConsumer::new(dev.cluster.clone(), topic, group, config).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let dlq = format!("{topic}.dlq");
    loop {
        for d in member.poll(Duration::from_millis(200)).await.unwrap_or_default() {
            let _ = d.nack(None, reason, "test").await;
        }
        let letters =
            if dev.cluster.metadata(true).await.unwrap().topics.iter().any(|t| t.name == dlq) { read_partition(&dev.cluster, &dlq, 0).await.len() } else { 0 };
        if letters >= count {
            break;
        }
        assert!(Instant::now() < deadline, "{letters} of {count} dead letters");
    }
    member.close().await;
}

fn header<'m>(m: &'m Message, name: &str) -> Option<&'m [u8]> {
    m.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_interrupted_by_a_kill_moves_each_dead_letter_once_as_its_dry_run_said_and_the_loop_guard_quarantines() {
    let _serial = SERIAL.lock().await;
    let dev = Dev::start(28_600);
    let admin = Admin::new(dev.cluster.clone());
    dev.create_topic("payments", 2, TopicConfigPatch { max_deliveries: Some(2), ..TopicConfigPatch::default() }).await;
    let fast_retries = GroupConfigPatch { retry_base_ms: Some(50), retry_max_ms: Some(100), ..GroupConfigPatch::default() };
    admin.configure_group("billing", fast_retries).await.unwrap();
    let n = 40;
    dev.produce(
        "payments",
        (0..n).map(|i| Record::new(format!("pay-{i}")).with_key(format!("card-{}", i % 7)).with_header("trace", format!("t-{i}"))).collect(),
    )
    .await;
    dead_letter_all(&dev, "payments", "billing", "card declined", n).await;

    // The dry run lists every letter; nothing moves.
    let dry = dev_cluster::run_ok(dev.keel().args(["dlq", "redrive", "payments", "--group", "billing", "--reason", "card declined", "--dry-run", "--json"]));
    let dry: serde_json::Value = serde_json::from_str(dry.trim()).unwrap();
    let listed: Vec<u64> = dry["would_move"].as_array().unwrap().iter().map(|r| r["dlq_offset"].as_u64().unwrap()).collect();
    assert_eq!(listed.len(), n, "{dry}");
    assert_eq!(end_of(&dev.cluster, "payments", 2).await, n as u64, "a dry run moves nothing");

    // The redrive, slow enough to be interrupted: its node is killed after a third.
    let out = dev_cluster::run_ok(dev.keel().args([
        "dlq",
        "redrive",
        "payments",
        "--group",
        "billing",
        "--reason",
        "card declined",
        "--rate",
        "8",
        "--detach",
        "--json",
    ]));
    let job: Job = serde_json::from_str(out.trim()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while end_of(&dev.cluster, "payments", 2).await < n as u64 + 12 {
        assert!(Instant::now() < deadline, "the redrive did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed = metadata_leader(&admin).await;
    kill_node(&dev, killed);
    let job = wait_job(&admin, job.id, Duration::from_secs(120), |_| {}).await;
    assert_eq!((job.state.clone(), job.copied(), job.quarantined()), (JobState::Done, n as u64, 0), "{job:?}");

    // Each listed letter came back once, as a new message with its count and its origin.
    let mut redriven: BTreeMap<u64, Message> = BTreeMap::new();
    for p in 0..2 {
        for m in read_partition(&dev.cluster, "payments", p).await.into_iter().filter(|m| header(m, "keel-redriven-from").is_some()) {
            let from = String::from_utf8(header(&m, "keel-redriven-from").unwrap().to_vec()).unwrap();
            let offset: u64 = from.strip_prefix("payments.dlq@").unwrap().parse().unwrap();
            assert_eq!(header(&m, "keel-redrive-count"), Some(&b"1"[..]));
            assert!(header(&m, "keel-dlq").is_none() && header(&m, "trace").is_some(), "the failure record stays behind, the rest travels");
            assert!(redriven.insert(offset, m).is_none(), "dead letter {offset} was redriven twice");
        }
    }
    assert_eq!(redriven.keys().copied().collect::<Vec<_>>(), listed, "what moved is what the dry run listed");

    // A second redrive finds nothing new to move.
    let again = dev_cluster::run_ok(dev.keel().args(["dlq", "redrive", "payments", "--group", "billing", "--dry-run", "--json"]));
    let again: serde_json::Value = serde_json::from_str(again.trim()).unwrap();
    assert_eq!(again["would_move"].as_array().unwrap().len(), 0, "letters redriven before are left out: {again}");

    // They fail again; with --max-redrives 1 the loop guard quarantines all of them.
    dead_letter_all(&dev, "payments", "billing", "card declined", 2 * n).await;
    let out = dev_cluster::run_ok(dev.keel().args(["dlq", "redrive", "payments", "--group", "billing", "--max-redrives", "1", "--json"]));
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((summary["copied"].as_u64(), summary["quarantined"].as_u64()), (Some(0), Some(n as u64)), "{summary}");
    let quarantined = read_partition(&dev.cluster, "payments.quarantine", 0).await;
    assert_eq!(quarantined.len(), n, "each letter quarantined once");
    assert!(quarantined.iter().all(|m| header(m, "keel-dlq").is_some() && header(m, "keel-redrive-count") == Some(&b"1"[..])));
    assert_eq!(end_of(&dev.cluster, "payments", 2).await, 2 * n as u64, "nothing quarantined went back to payments");
    let audit = dev_cluster::run_ok(dev.keel().args(["job", "list", "--all"]));
    assert_eq!(audit.lines().filter(|l| l.contains("redrive payments.dlq -> payments: done")).count(), 2, "{audit}");
    dev.stop();
}
