//! Consumer groups against real processes (`keel dev`, the `keel` CLI as a member):
//! each test fails if the semantics are wrong, and each holds across a SIGKILL of the
//! partition's leader in the middle of it.
//!
//! - a stream group resumes at its committed offset after its member restarts;
//! - a message nacked forever is dead-lettered after exactly max-deliveries attempts,
//!   whole, with every attempt's reason;
//! - a member killed holding leases: its messages go to another member once the
//!   leases run out, none lost;
//! - a slow member never holds more than its credit while a fast one drains the rest;
//! - a dead stream member's partitions are owned by the survivor within the session
//!   timeout.
//!
//! The tests share two cores: they run one at a time (`SERIAL`). Their port ranges stay
//! below Linux's ephemeral ports (32768 and up), like every other test's.

mod dev_cluster;

use dev_cluster::dev::Dev;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use keel_client::consumer::{Consumer, StartAt};
use keel_client::group::{GroupConsumer, StreamGroupConfig};
use keel_client::producer::Record;
use keel_client::queue::{Delivery, QueueConfig, QueueConsumer};
use keel_client::{Admin, Cluster};
use keel_protocol::message::SettleOutcome;
use keel_protocol::{GroupConfigPatch, TopicConfigPatch};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn lines(out: &str) -> Vec<String> {
    out.lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_group_resumes_at_its_committed_offset_after_its_member_restarts_even_across_a_leader_kill() {
    let _serial = SERIAL.lock().await;
    let dev = Dev::start(21_000);
    dev.create_topic("events", 1, TopicConfigPatch::default()).await;
    let values: Vec<String> = (0..100).map(|i| format!("event-{i:03}")).collect();
    dev.produce("events", values.iter().map(|v| Record::new(v.clone())).collect()).await;

    let first = dev_cluster::run_ok(dev.keel().args(["consume", "events", "--group", "audit", "--max", "40"]));
    assert_eq!(lines(&first), values[..40], "the first member reads from the start and stops after 40");
    // The group is 60 messages behind: its lag age is that of message 40, and grows.
    let lag_age = |min: f64, max: f64| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let age = dev_cluster::metric_max(dev.bootstrap.split(','), "keel_consumer_lag_seconds{").unwrap_or(-1.0);
            if (min..=max).contains(&age) {
                return age;
            }
            assert!(Instant::now() < deadline, "keel_consumer_lag_seconds stayed {age}, not in {min}..={max}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    eprintln!("lag age while 60 behind: {} s", lag_age(1.0, 120.0));

    dev.kill_leader("events", 0).await;
    let second = dev_cluster::run_ok(dev.keel().args(["consume", "events", "--group", "audit", "--idle-timeout", "3s"]));
    assert_eq!(lines(&second), values[40..], "the restarted member continues exactly after what the first printed, under a new leader");

    let third = dev_cluster::run_ok(dev.keel().args(["consume", "events", "--group", "audit", "--idle-timeout", "2s"]));
    assert!(third.is_empty(), "everything was committed: {third:?}");
    lag_age(0.0, 0.0);
    let other = dev_cluster::run_ok(dev.keel().args(["consume", "events", "--group", "billing", "--idle-timeout", "2s"]));
    assert_eq!(lines(&other).len(), 100, "another group has its own offsets");

    // A reset is refused while a member is live (its next commit would undo it) …
    let member = GroupConsumer::join(dev.cluster.clone(), "events", "audit", StreamGroupConfig::default()).await.unwrap();
    let refused = dev.keel().args(["group", "reset", "audit", "--topic", "events", "--to-offset", "90"]).output().unwrap();
    assert!(!refused.status.success(), "a reset with a live member must fail");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("live member") && why.contains("--force"), "the refusal says why and what to do: {why}");
    member.close().await.unwrap();
    // … and done once it left: the next member starts at the new offset.
    dev_cluster::run_ok(dev.keel().args(["group", "reset", "audit", "--topic", "events", "--to-offset", "90"]));
    let after_reset = dev_cluster::run_ok(dev.keel().args(["consume", "events", "--group", "audit", "--idle-timeout", "2s"]));
    assert_eq!(lines(&after_reset), values[90..], "the group continues from the reset offset");
    dev.stop();
}

/// Dead letters of `topic` (its `.dlq` topic) as `(message, failure record)`.
async fn dead_letters(cluster: &Cluster, topic: &str) -> Vec<(keel_client::consumer::Message, serde_json::Value)> {
    let dlq = format!("{topic}.dlq");
    if !cluster.metadata(true).await.unwrap().topics.iter().any(|t| t.name == dlq) {
        return Vec::new();
    }
    let Ok(consumer) = Consumer::new(cluster.clone(), &dlq, StartAt::Earliest).await else { return Vec::new() };
    let Ok(f) = consumer.fetch_partition(0, 0, Duration::ZERO).await else { return Vec::new() };
    f.messages
        .into_iter()
        .map(|m| {
            let failure =
                m.headers.iter().find(|(k, _)| k == "keel-dlq").and_then(|(_, v)| serde_json::from_slice(v.as_deref()?).ok()).expect("a failure record");
            (m, failure)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_nacked_forever_is_dead_lettered_after_exactly_max_deliveries_with_every_reason_even_across_a_leader_kill() {
    let _serial = SERIAL.lock().await;
    let dev = Dev::start(23_000);
    dev.create_topic("payments", 1, TopicConfigPatch { max_deliveries: Some(4), ..TopicConfigPatch::default() }).await;
    let admin = Admin::new(dev.cluster.clone());
    let fast = GroupConfigPatch { retry_base_ms: Some(50), retry_max_ms: Some(200), lease_timeout_ms: Some(3_000), ..GroupConfigPatch::default() };
    admin.configure_group("settle", fast).await.unwrap();
    dev.produce("payments", vec![Record::new("poison-payload").with_key("acct-7").with_header("trace", "abc")]).await;

    let mut consumer = QueueConsumer::new(dev.cluster.clone(), "payments", "settle", QueueConfig::default()).await.unwrap();
    let mut attempts_seen = Vec::new();
    let mut killed = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    let letters = loop {
        assert!(Instant::now() < deadline, "no dead letter within 60 s; attempts seen {attempts_seen:?}");
        for d in consumer.poll(Duration::from_millis(300)).await.unwrap() {
            assert_eq!(d.message.value.as_deref(), Some(&b"poison-payload"[..]));
            attempts_seen.push(d.attempt);
            // The answer may be lost when the leader dies: the outcome then shows in
            // the next delivery's attempt number, or the dead letter.
            let _ = d.nack(None, &format!("failure {}", d.attempt), "test").await;
        }
        if !killed && attempts_seen.len() >= 2 {
            dev.kill_leader("payments", 0).await;
            killed = true;
        }
        let letters = dead_letters(&dev.cluster, "payments").await;
        if !letters.is_empty() {
            break letters;
        }
    };
    // Nothing more is delivered once the message is dead-lettered.
    assert!(consumer.poll(Duration::from_secs(2)).await.unwrap().is_empty(), "a dead-lettered message is never delivered again");
    consumer.close().await;

    assert!(attempts_seen.windows(2).all(|w| w[0] < w[1]), "attempt numbers only grow, across the leader change: {attempts_seen:?}");
    assert!(attempts_seen.iter().all(|a| (1..=4).contains(a)), "never a fifth delivery: {attempts_seen:?}");
    assert_eq!(letters.len(), 1, "dead-lettered once");
    let (m, f) = &letters[0];
    assert_eq!(m.value.as_deref(), Some(&b"poison-payload"[..]), "the whole payload");
    assert_eq!(m.key.as_deref(), Some(&b"acct-7"[..]));
    assert!(m.headers.iter().any(|(k, v)| k == "trace" && v.as_deref() == Some(&b"abc"[..])), "the source headers are kept");
    assert_eq!(f["attempts"], 4, "{f}");
    assert_eq!(f["group"], "settle");
    assert_eq!((f["source"]["topic"].as_str(), f["source"]["partition"].as_u64(), f["source"]["offset"].as_u64()), (Some("payments"), Some(0), Some(0)));
    let history = f["history"].as_array().unwrap();
    assert_eq!(history.iter().map(|a| a["attempt"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2, 3, 4], "every attempt is recorded: {f}");
    for a in history {
        let n = a["attempt"].as_u64().unwrap();
        match a["outcome"].as_str().unwrap() {
            "nacked" => assert_eq!(a["reason"], format!("failure {n}"), "attempt {n}'s reason"),
            // A delivery whose answer died with the old leader runs out its lease.
            "expired" => assert!(!attempts_seen.contains(&(n as u32)) || killed),
            other => panic!("attempt {n} ended {other}"),
        }
    }
    let cause = f["cause"].as_str().unwrap();
    assert!(cause == "max_deliveries" || cause == "lease_expired", "{f}");
    assert!(attempts_seen.iter().filter(|a| history.iter().any(|h| h["attempt"] == **a && h["outcome"] == "nacked")).count() >= 2);
    // The dead-letter topic's leader reports its depth and the age of its oldest letter.
    let deadline = Instant::now() + Duration::from_secs(15);
    let series = |name: &str| dev_cluster::metric_max(dev.bootstrap.split(','), &format!("{name}{{topic=\"payments.dlq\"}}"));
    while series("keel_dead_letter_depth_messages") != Some(1.0) || !series("keel_dead_letter_oldest_age_seconds").is_some_and(|a| (1.0..120.0).contains(&a)) {
        assert!(
            Instant::now() < deadline,
            "dead-letter gauges: depth {:?}, oldest age {:?}",
            series("keel_dead_letter_depth_messages"),
            series("keel_dead_letter_oldest_age_seconds")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    dev.stop();
}

/// Starts `keel consume … --mode queue --exec 'sleep 600'` in its own process group: it
/// leases messages and never settles them.
fn stuck_member(dev: &Dev, topic: &str, group: &str) -> Child {
    use std::os::unix::process::CommandExt;
    dev.keel()
        .args(["consume", topic, "--group", group, "--mode", "queue", "--member", "stuck", "--max-in-flight", "10", "--exec", "sleep 600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap()
}

/// Acks everything `consumer` gets until `want` distinct offsets were acked; returns
/// offset → attempt of each ack.
async fn drain(consumer: &mut QueueConsumer, want: usize, within: Duration) -> BTreeMap<u64, u32> {
    let deadline = Instant::now() + within;
    let mut acked = BTreeMap::new();
    while acked.len() < want {
        assert!(Instant::now() < deadline, "only {} of {want} messages acked in time", acked.len());
        let batch: Vec<Delivery> = consumer.poll(Duration::from_millis(500)).await.unwrap();
        let outcomes = futures::future::join_all(batch.iter().map(Delivery::ack)).await;
        for (d, o) in batch.iter().zip(outcomes) {
            match o.unwrap() {
                SettleOutcome::Acked | SettleOutcome::AlreadySettled => {
                    acked.insert(d.message.offset, d.attempt);
                }
                other => panic!("ack of offset {} answered {other:?}", d.message.offset),
            }
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_s_leases_go_to_another_member_after_the_lease_timeout_and_none_is_lost_even_across_a_leader_kill() {
    let _serial = SERIAL.lock().await;
    let dev = Dev::start(25_000);
    dev.create_topic("jobs", 1, TopicConfigPatch::default()).await;
    let admin = Admin::new(dev.cluster.clone());
    admin.configure_group("workers", GroupConfigPatch { lease_timeout_ms: Some(3_000), ..GroupConfigPatch::default() }).await.unwrap();
    dev.produce("jobs", (0..50).map(|i| Record::new(format!("job-{i}"))).collect()).await;

    let mut stuck = stuck_member(&dev, "jobs", "workers");
    let deadline = Instant::now() + Duration::from_secs(20);
    let held = loop {
        assert!(Instant::now() < deadline, "the stuck member never took its leases");
        if let Ok(states) = admin.group_state("jobs", Some("workers")).await {
            let held: u32 =
                states.iter().flat_map(|(_, s)| s.queues.iter()).flat_map(|q| q.members.iter()).filter(|(m, _)| m == "stuck").map(|(_, n)| *n).sum();
            if held == 10 {
                break held;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // SAFETY: kill(2) on the process group of the member this test started.
    unsafe { libc::kill(-(stuck.id() as libc::pid_t), libc::SIGKILL) };
    let _ = stuck.wait();
    let killed_at = Instant::now();
    // The leases are replicated: the next leader honours them and lets them run out.
    dev.kill_leader("jobs", 0).await;

    let config = QueueConfig { member: Some("rescuer".into()), ..QueueConfig::default() };
    let mut rescuer = QueueConsumer::new(dev.cluster.clone(), "jobs", "workers", config).await.unwrap();
    let acked = drain(&mut rescuer, 50, Duration::from_secs(30)).await;
    rescuer.close().await;
    assert_eq!(acked.keys().copied().collect::<Vec<_>>(), (0..50).collect::<Vec<_>>(), "every message is acked, none lost");
    let redelivered: Vec<u64> = acked.iter().filter(|(_, a)| **a == 2).map(|(o, _)| *o).collect();
    assert_eq!(redelivered.len(), held as usize, "the killed member's leases come back as attempt 2: {acked:?}");
    assert!(acked.values().all(|a| *a <= 2));
    eprintln!("{} leases of the killed member redelivered within {:?} of the kill", redelivered.len(), killed_at.elapsed());
    let states = admin.group_state("jobs", Some("workers")).await.unwrap();
    let q = &states[0].1.queues[0];
    assert_eq!((q.floor, q.leased, q.waiting), (50, 0, 0), "everything is settled");
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_member_never_holds_more_than_its_credit_while_a_fast_member_drains_the_rest_even_across_a_leader_kill() {
    const LEASE_MS: u64 = 15_000;
    let _serial = SERIAL.lock().await;
    let dev = Dev::start(27_000);
    dev.create_topic("work", 3, TopicConfigPatch::default()).await;
    // The slow member keeps its leases by extending them (well within the timeout, so
    // they outlive the leader kill); a lease whose delivery answer died with the killed
    // leader runs out and comes back to the fast member within the test.
    let pool = GroupConfigPatch { lease_timeout_ms: Some(LEASE_MS), ..GroupConfigPatch::default() };
    Admin::new(dev.cluster.clone()).configure_group("pool", pool).await.unwrap();
    dev.produce("work", (0..600).map(|i| Record::new(format!("w-{i}")).with_key(format!("k{i}"))).collect()).await;

    let slow_config = QueueConfig { member: Some("slow".into()), max_in_flight: 6, ..QueueConfig::default() };
    let mut slow = QueueConsumer::new(dev.cluster.clone(), "work", "pool", slow_config).await.unwrap();
    let fast_config = QueueConfig { member: Some("fast".into()), max_in_flight: 100, ..QueueConfig::default() };
    let mut fast = QueueConsumer::new(dev.cluster.clone(), "work", "pool", fast_config).await.unwrap();

    // The slow member takes what it can and never settles it.
    let mut held: Vec<Delivery> = Vec::new();
    let mut fast_acked: BTreeSet<(u32, u64)> = BTreeSet::new();
    let mut killed = false;
    let mut extended_at = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while held.len() + fast_acked.len() < 600 {
        assert!(Instant::now() < deadline, "fast acked {} and slow holds {}: not all 600 delivered", fast_acked.len(), held.len());
        held.extend(slow.poll(Duration::from_millis(50)).await.unwrap());
        if extended_at.elapsed() >= Duration::from_millis(LEASE_MS / 6) {
            // Failures (during the kill) are retried at the next round.
            for d in &held {
                let _ = d.extend(None).await;
            }
            extended_at = Instant::now();
        }
        assert!(held.len() <= 6, "the slow member was sent {} messages with a credit of 6", held.len());
        if !killed && fast_acked.len() >= 200 {
            dev.kill_leader("work", 0).await;
            killed = true;
        }
        let batch = fast.poll(Duration::from_millis(200)).await.unwrap();
        let outcomes = futures::future::join_all(batch.iter().map(Delivery::ack)).await;
        for (d, first) in batch.iter().zip(outcomes) {
            // An ack caught by the kill is sent again: acks are idempotent.
            let mut tries = 0;
            let mut outcome = first;
            loop {
                match outcome {
                    Ok(SettleOutcome::Acked | SettleOutcome::AlreadySettled) => break,
                    Ok(other) => panic!("ack of {}/{} answered {other:?}", d.message.partition, d.message.offset),
                    Err(e) => {
                        tries += 1;
                        assert!(tries < 20, "ack of {}/{} kept failing: {e}", d.message.partition, d.message.offset);
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        outcome = d.ack().await;
                    }
                }
            }
            fast_acked.insert((d.message.partition, d.message.offset));
        }
    }
    assert!(killed, "the leader kill happened mid-run");
    let states = Admin::new(dev.cluster.clone()).group_state("work", Some("pool")).await.unwrap();
    let slow_leased: u32 = states.iter().flat_map(|(_, s)| s.queues.iter()).flat_map(|q| q.members.iter()).filter(|(m, _)| m == "slow").map(|(_, n)| *n).sum();
    assert!(slow_leased <= 6, "the broker leased {slow_leased} to the slow member");
    assert_eq!(slow_leased as usize, held.len());
    assert_eq!(fast_acked.len(), 600 - held.len(), "the fast member got everything the slow one did not hold");
    fast.close().await;
    drop(held);
    drop(slow);
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_stream_member_dies_the_survivor_owns_its_partitions_within_the_session_timeout_and_reads_them_even_across_a_leader_kill() {
    let _serial = SERIAL.lock().await;
    let dev = Dev::start(29_000);
    dev.create_topic("ledger", 4, TopicConfigPatch::default()).await;
    let session = Duration::from_secs(3);

    // Member A: a `keel consume` process; member B: this test.
    use std::os::unix::process::CommandExt;
    let mut a = dev
        .keel()
        .args(["consume", "ledger", "--group", "books", "--session-timeout", "3s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let config = StreamGroupConfig { session_timeout: session, ..StreamGroupConfig::default() };
    let mut b = GroupConsumer::join(dev.cluster.clone(), "ledger", "books", config).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.assignment().len() != 2 {
        assert!(Instant::now() < deadline, "the two members never split the 4 partitions: B has {:?}", b.assignment());
        b.poll(Duration::from_millis(100)).await.unwrap();
    }
    let before: Vec<u32> = b.assignment().to_vec();

    // SAFETY: kill(2) on the process group of the member this test started.
    unsafe { libc::kill(-(a.id() as libc::pid_t), libc::SIGKILL) };
    let _ = a.wait();
    let killed = Instant::now();
    while b.assignment().len() != 4 {
        assert!(killed.elapsed() < Duration::from_secs(15), "B never took the dead member's partitions: it has {:?}", b.assignment());
        b.poll(Duration::from_millis(50)).await.unwrap();
    }
    let took_over = killed.elapsed();
    eprintln!("the dead member's partitions were reassigned {took_over:?} after the kill (session timeout {session:?}; B had {before:?})");
    // Detection is the session timeout; the survivor learns of it from its next heartbeat.
    let bound = session + session / 5 + Duration::from_secs(1);
    assert!(took_over <= bound, "partitions unowned for {took_over:?}, more than the session timeout and a heartbeat ({bound:?})");

    // Then a partition leader dies (in `keel dev` often the metadata leader too, so the
    // coordinator with it): the survivor keeps or regains all four and reads on.
    let victim = dev.kill_leader("ledger", 0).await;
    let killed = Instant::now();
    b.poll(Duration::from_millis(50)).await.unwrap();
    while b.assignment().len() != 4 {
        assert!(killed.elapsed() < Duration::from_secs(15), "after node {victim} died B holds only {:?}", b.assignment());
        b.poll(Duration::from_millis(50)).await.unwrap();
    }
    eprintln!("after node {victim} was killed the survivor held all 4 partitions again {:?} later", killed.elapsed());

    // The survivor reads what is produced to every partition from now on.
    let values: Vec<String> = (0..40).map(|i| format!("entry-{i}")).collect();
    dev.produce("ledger", values.iter().map(|v| Record::new(v.clone()).with_key(v.clone())).collect()).await;
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !values.iter().all(|v| got.contains(v)) {
        assert!(Instant::now() < deadline, "the survivor read {} of the 40 new messages", values.iter().filter(|v| got.contains(*v)).count());
        for m in b.poll(Duration::from_millis(200)).await.unwrap() {
            got.insert(String::from_utf8(m.value.unwrap().to_vec()).unwrap());
        }
    }
    b.close().await.unwrap();
    dev.stop();
}

/// Acks `d`, again while the answer is an error (a leader change): acks are idempotent.
async fn ack_surely(d: &Delivery) {
    for tries in 0.. {
        match d.ack().await {
            Ok(SettleOutcome::Acked | SettleOutcome::AlreadySettled) => return,
            Ok(other) => panic!("ack of {}/{} answered {other:?}", d.message.partition, d.message.offset),
            Err(e) => {
                assert!(tries < 40, "ack of {}/{} kept failing: {e}", d.message.partition, d.message.offset);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_lanes_overtake_a_backlog_share_by_weight_and_keep_their_order_even_across_a_leader_kill() {
    let _serial = SERIAL.lock().await;
    let dev = Dev::start(30_000);
    dev.create_topic("tasks", 1, TopicConfigPatch { priorities: Some(10), ..TopicConfigPatch::default() }).await;
    dev.produce("tasks", (0..3_000).map(|i| Record::new(format!("bulk-{i}"))).collect()).await;

    let config = QueueConfig { member: Some("w".into()), max_in_flight: 50, ..QueueConfig::default() };
    let mut worker = QueueConsumer::new(dev.cluster.clone(), "tasks", "workers", config).await.unwrap();
    // (offset, lane, attempt) of every delivery, in delivery order.
    let mut seen: Vec<(u64, u8, u32)> = Vec::new();
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut urgent_at = None;
    let mut busy_at = None;
    let mut killed = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() < 4_003 {
        assert!(Instant::now() < deadline, "{} of 4003 acked in time", acked.len());
        let batch = worker.poll(Duration::from_millis(200)).await.unwrap();
        for d in &batch {
            seen.push((d.message.offset, d.message.priority, d.attempt));
        }
        futures::future::join_all(batch.iter().map(ack_surely)).await;
        acked.extend(batch.iter().map(|d| d.message.offset));
        if urgent_at.is_none() && seen.len() >= 300 {
            // Three urgent messages behind a backlog of ~2,700.
            dev.produce("tasks", (0..3).map(|i| Record::new(format!("urgent-{i}")).with_priority(9)).collect()).await;
            urgent_at = Some(seen.len());
        }
        if busy_at.is_none() && seen.len() >= 600 {
            // Then lane 9 busy too: both lanes have backlogs.
            dev.produce("tasks", (0..1_000).map(|i| Record::new(format!("busy-{i}")).with_priority(9)).collect()).await;
            busy_at = Some(seen.len());
        }
        if !killed && seen.len() >= 1_500 {
            dev.kill_leader("tasks", 0).await;
            killed = true;
        }
    }
    worker.close().await;

    // The urgent ones came within the deliveries already in flight (the credit, 50) and
    // the next round, not after the backlog.
    let urgent_at = urgent_at.unwrap();
    let urgent: Vec<usize> = seen.iter().enumerate().filter(|(_, (o, l, _))| *l == 9 && (3_000..3_003).contains(o)).map(|(i, _)| i).collect();
    assert_eq!(urgent.len(), 3, "each urgent message delivered once");
    assert!(urgent.iter().all(|i| *i < urgent_at + 150), "urgent messages delivered at {urgent:?}, after the backlog resumed at {urgent_at}");

    // While both lanes had a backlog, lane 9 (weight 10) got ~10 of every 11 deliveries
    // and lane 0 (weight 1) the rest: never starved.
    let window = &seen[busy_at.unwrap() + 100..busy_at.unwrap() + 650];
    let lane0 = window.iter().filter(|(_, l, _)| *l == 0).count();
    eprintln!("deliveries while both lanes were busy: {} of lane 9, {lane0} of lane 0", window.len() - lane0);
    assert!((25..=100).contains(&lane0), "lane 0 got {lane0} of 550 deliveries, not about 1/11");

    // Within a lane, first deliveries come in offset order; nothing is lost.
    for lane in [0u8, 9] {
        let firsts: Vec<u64> = seen.iter().filter(|(_, l, a)| *l == lane && *a == 1).map(|(o, ..)| *o).collect();
        assert!(firsts.windows(2).all(|w| w[0] < w[1]), "lane {lane} delivered out of order");
    }
    assert!(killed);
    assert_eq!(acked, (0..4_003).collect::<BTreeSet<u64>>(), "every message acked, none lost across the kill");

    // With nobody consuming, the leader reports the group's backlog per lane.
    dev.produce("tasks", (0..5).map(|i| Record::new(format!("later-{i}"))).collect()).await;
    dev.produce("tasks", (0..7).map(|i| Record::new(format!("later-urgent-{i}")).with_priority(9)).collect()).await;
    let backlog = |lane: u8| {
        dev_cluster::metric_max(
            dev.bootstrap.split(','),
            &format!("keel_queue_lane_backlog_messages{{group=\"1\",consumer_group=\"workers\",lane=\"{lane}\"}}"),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while (backlog(0), backlog(9)) != (Some(5.0), Some(7.0)) {
        assert!(Instant::now() < deadline, "lane backlog gauges: lane 0 {:?}, lane 9 {:?}", backlog(0), backlog(9));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A priority beyond the topic's lanes is refused, saying what to do.
    dev.create_topic("three-lanes", 1, TopicConfigPatch { priorities: Some(3), ..TopicConfigPatch::default() }).await;
    let refused = dev.keel().args(["produce", "three-lanes", "--priority", "5", "--timeout", "5s", "x"]).output().unwrap();
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && why.contains("priority lanes 0..3"), "refusal: {why}");
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_message_waits_for_its_time_without_holding_credit_even_across_a_leader_kill() {
    let _serial = SERIAL.lock().await;
    let dev = Dev::start(30_000);
    dev.create_topic("reminders", 1, TopicConfigPatch::default()).await;
    dev_cluster::run_ok(dev.keel().args(["produce", "reminders", "--delay", "6s", "later"]));
    dev.produce("reminders", (1..=3).map(|i| Record::new(format!("now-{i}"))).collect()).await;

    // Credit 1: were the waiting message holding it, nothing else would come.
    let config = QueueConfig { member: Some("r".into()), max_in_flight: 1, ..QueueConfig::default() };
    let mut member = QueueConsumer::new(dev.cluster.clone(), "reminders", "remind", config).await.unwrap();
    let mut got: Vec<(String, u32, i64, Option<i64>)> = Vec::new();
    let mut killed = false;
    let deadline = Instant::now() + Duration::from_secs(40);
    while got.len() < 4 {
        assert!(Instant::now() < deadline, "delivered only {got:?}");
        let batch = member.poll(Duration::from_millis(200)).await.unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        for d in &batch {
            let at = d.message.headers.iter().find(|(k, _)| k == "keel-deliver-at").and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok()?.parse().ok());
            got.push((String::from_utf8(d.message.value.clone().unwrap().to_vec()).unwrap(), d.attempt, now, at));
            ack_surely(d).await;
        }
        if !killed && got.len() == 3 {
            // The schedule is replicated state: the next leader keeps it.
            dev.kill_leader("reminders", 0).await;
            killed = true;
        }
    }
    member.close().await;
    let names: Vec<&str> = got.iter().map(|(n, ..)| n.as_str()).collect();
    assert_eq!(names, ["now-1", "now-2", "now-3", "later"], "the scheduled message did not hold the only credit");
    let (_, attempt, delivered_at, deliver_at) = got[3];
    let deliver_at = deliver_at.expect("the record carries its deliver-at time");
    assert!(delivered_at >= deliver_at, "delivered at {delivered_at}, before its time {deliver_at}");
    assert_eq!(attempt, 1, "waiting is not a delivery attempt");
    eprintln!("the scheduled message arrived {} ms after its time", delivered_at - deliver_at);

    // Too far ahead is refused, naming the bound.
    let refused = dev.keel().args(["produce", "reminders", "--delay", "8days", "--timeout", "5s", "x"]).output().unwrap();
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && why.contains("SCHEDULED_DELAY_MAX"), "refusal: {why}");
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_group_keeps_each_key_in_order_and_parks_a_poison_key_while_the_others_flow_even_across_a_leader_kill() {
    let _serial = SERIAL.lock().await;
    let dev = Dev::start(30_000);
    dev.create_topic("ledger-ops", 1, TopicConfigPatch { max_deliveries: Some(3), ..TopicConfigPatch::default() }).await;
    let admin = Admin::new(dev.cluster.clone());
    // Retries 2.5–3 s apart: the poison account stays parked for several gauge samples.
    let group = GroupConfigPatch {
        ordered: Some(1),
        retry_base_ms: Some(2_500),
        retry_max_ms: Some(3_000),
        lease_timeout_ms: Some(5_000),
        ..GroupConfigPatch::default()
    };
    admin.configure_group("posting", group).await.unwrap();
    // 200 accounts × 5 operations, interleaved (KEEL_ORDERED_KEYS sets the accounts for a
    // longer run); account 7's first two operations are poison.
    let accounts: usize = std::env::var("KEEL_ORDERED_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let total = accounts * 5 - 2;
    let mut records = Vec::new();
    for op in 0..5 {
        for acct in 0..accounts {
            let value = if acct == 7 && op < 2 { format!("acct-7-op-{op}-poison") } else { format!("acct-{acct}-op-{op}") };
            records.push(Record::new(value).with_key(format!("acct-{acct}")));
        }
    }
    dev.produce("ledger-ops", records).await;

    let config = QueueConfig { member: Some("poster".into()), max_in_flight: 500, ..QueueConfig::default() };
    let mut member = QueueConsumer::new(dev.cluster.clone(), "ledger-ops", "posting", config).await.unwrap();
    let mut done: BTreeMap<String, Vec<u32>> = BTreeMap::new(); // account → ops acked, in ack order
    let started = Instant::now();
    let mut parked_at: Option<usize> = None;
    let mut flowed_while_parked = false;
    let mut poison_seen_at: Option<usize> = None;
    let mut killed = false;
    let deadline = Instant::now() + Duration::from_secs(60 + accounts as u64 / 5);
    while done.values().map(Vec::len).sum::<usize>() < total {
        assert!(Instant::now() < deadline, "acked {} of {total}", done.values().map(Vec::len).sum::<usize>());
        let batch = member.poll(Duration::from_millis(200)).await.unwrap();
        let mut keys_in_batch = BTreeSet::new();
        for d in &batch {
            let key = String::from_utf8(d.message.key.clone().unwrap().to_vec()).unwrap();
            assert!(keys_in_batch.insert(key.clone()), "two messages of {key} out at once");
        }
        // One message per key in a batch, so the batch is settled at once.
        let (poison, fine): (Vec<&Delivery>, Vec<&Delivery>) = batch.iter().partition(|d| d.message.value.as_deref().is_some_and(|v| v.ends_with(b"poison")));
        if !poison.is_empty() && poison_seen_at.is_none() {
            poison_seen_at = Some(done.values().map(Vec::len).sum::<usize>());
        }
        for d in poison {
            let _ = d.nack(None, "cannot post", "validation").await;
        }
        futures::future::join_all(fine.iter().map(|d| ack_surely(d))).await;
        for d in fine {
            let value = String::from_utf8(d.message.value.clone().unwrap().to_vec()).unwrap();
            let key = String::from_utf8(d.message.key.clone().unwrap().to_vec()).unwrap();
            let op: u32 = value.rsplit('-').next().unwrap().parse().unwrap();
            done.entry(key).or_default().push(op);
        }
        // While account 7 has nothing acked: the leader reports it parked, and other
        // accounts' operations keep being acked after its poison was first delivered.
        let acked_now = done.values().map(Vec::len).sum::<usize>();
        if !done.contains_key("acct-7") {
            if parked_at.is_none() && dev_cluster::metric_max(dev.bootstrap.split(','), "keel_queue_parked_keys{").is_some_and(|n| n >= 1.0) {
                parked_at = Some(acked_now);
            }
            flowed_while_parked |= poison_seen_at.is_some_and(|at| acked_now > at);
        }
        if !killed && done.values().map(Vec::len).sum::<usize>() >= total * 2 / 5 {
            dev.kill_leader("ledger-ops", 0).await;
            killed = true;
        }
    }
    eprintln!("{total} operations of {accounts} accounts acked in {:?}, in order per account", started.elapsed());
    assert!(parked_at.is_some(), "keel_queue_parked_keys reported account 7 parked behind its poison operation");
    assert!(flowed_while_parked, "other accounts' operations were acked while account 7's poison held it back");
    for (acct, ops) in &done {
        let want: Vec<u32> = if acct == "acct-7" { (2..5).collect() } else { (0..5).collect() };
        assert_eq!(ops, &want, "{acct}'s operations in order");
    }
    let letters = dead_letters(&dev.cluster, "ledger-ops").await;
    let poison: Vec<&[u8]> = letters.iter().filter_map(|(m, _)| m.value.as_deref()).collect();
    assert_eq!(poison, [&b"acct-7-op-0-poison"[..], b"acct-7-op-1-poison"], "the poison operations were dead-lettered, in order");

    // The poison is fixed: a redrive sends both back, and they come in order.
    let out = dev_cluster::run_ok(dev.keel().args(["dlq", "redrive", "ledger-ops", "--group", "posting", "--json"]));
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["copied"].as_u64(), Some(2), "{summary}");
    let mut redriven = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while redriven.len() < 2 {
        assert!(Instant::now() < deadline, "redriven operations delivered: {redriven:?}");
        for d in member.poll(Duration::from_millis(200)).await.unwrap() {
            assert_eq!(d.attempt, 1, "a redriven message is a new message: its attempts start again");
            redriven.push(String::from_utf8(d.message.value.clone().unwrap().to_vec()).unwrap());
            ack_surely(&d).await;
        }
    }
    assert_eq!(redriven, ["acct-7-op-0-poison", "acct-7-op-1-poison"], "account 7's redriven operations come in order");
    member.close().await;
    dev.stop();
}
