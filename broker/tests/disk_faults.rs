//! Minority disk faults cost nothing (the NATS 2.12.1 schedule, Jepsen): writes are
//! acknowledged by the leader and one follower while the third replica is down; that
//! follower is killed and its segment tail is truncated or bit-flipped; the leader is
//! killed. The damaged follower and the lagging one now form a majority that lacks the
//! writes. Keel's damaged follower knows, from its ack ledger, that its log lost what
//! it acknowledged: it votes for no candidate lacking those entries, so the group waits
//! (no leader) until the old leader returns, is elected, and refills it. Every
//! acknowledged write is then read back, exactly once.
//!
//! The same schedule with the `ignore-ledger` sabotage (the ledger is not consulted)
//! must lose acknowledged writes: proof that the schedule reaches the fault.
//!
//! Real `keel serve` processes on loopback (`keel_jepsen::nodes`); one scenario at a time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use keel_client::consumer::Consumer;
use keel_client::producer::{Producer, ProducerConfig, Record};
use keel_client::{Admin, ClientConfig, Cluster};
use keel_jepsen::damage;
use keel_jepsen::nodes::{Nodes, Placement};

/// One scenario at a time: three debug nodes per scenario already fill two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOPIC: &str = "t";
/// Messages acknowledged by the leader and the follower-to-be-damaged.
const ACKED: usize = 120;
/// How long the damaged and the lagging replica are left alone: ten election timeouts.
const ALONE: Duration = Duration::from_secs(6);
const CONVERGE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
enum Harm {
    /// Cut this many bytes off the end of the last segment.
    Truncate(u64),
    /// Flip this many bits among the last 2 KiB of the last segment.
    Flip(usize),
}

struct Outcome {
    acked: Vec<String>,
    read: Vec<String>,
    /// A leader was elected while only the damaged and the lagging replica ran.
    led_without_the_writes: bool,
    damaged_metrics: Option<(u64, u64)>,
}

fn cluster(nodes: &Nodes) -> Cluster {
    Cluster::new(ClientConfig {
        bootstrap: nodes.client_addrs(),
        request_timeout: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    })
    .unwrap()
}

/// The partition's leader and group id, as the highest-term leader claim among `alive`.
async fn leader(cluster: &Cluster) -> Option<(u32, u64)> {
    let reports = Admin::new(cluster.clone()).cluster_status(Duration::from_secs(1)).await.ok()?;
    let mut best: Option<(u64, u32, u64)> = None;
    for (_, report) in reports {
        let Ok(report) = report else { continue };
        for g in report.groups.iter().filter(|g| g.topic.as_deref() == Some(TOPIC) && g.role == "leader") {
            if best.is_none_or(|b| g.term > b.0) {
                best = Some((g.term, report.node as u32, g.group));
            }
        }
    }
    best.map(|(_, node, group)| (node, group))
}

async fn wait_for_leader(cluster: &Cluster, limit: Duration) -> Option<(u32, u64)> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(l) = leader(cluster).await {
            return Some(l);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Every value in partition 0, in offset order, read from the leader.
async fn read_all(cluster: &Cluster) -> Vec<String> {
    let deadline = Instant::now() + CONVERGE;
    let consumer = Consumer::assign(cluster.clone(), TOPIC, &[(0, 0)]).await.unwrap();
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        match consumer.fetch_partition(0, offset, Duration::from_millis(200)).await {
            Ok(f) => {
                for m in &f.messages {
                    out.push(String::from_utf8_lossy(m.value.as_deref().unwrap_or_default()).into_owned());
                    offset = m.offset + 1;
                }
                if offset >= f.high_watermark {
                    return out;
                }
            }
            Err(e) => assert!(Instant::now() < deadline, "reading back: {e}"),
        }
    }
}

/// `keel_group_damage_detected_total` and `keel_groups_damaged` on a node's admin port.
fn damage_metrics(admin: &str) -> Option<(u64, u64)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let value = |name: &str| {
        body.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' ')).and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
    };
    Some((value("keel_group_damage_detected_total")? as u64, value("keel_groups_damaged").unwrap_or(0.0) as u64))
}

/// What happens around the damage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schedule {
    /// C lags (down) while L and B acknowledge; B is damaged; L dies; B and C run alone;
    /// L returns.
    LeaderDies,
    /// All three acknowledge; B is damaged and restarts while L keeps leading (L finds
    /// B's log shorter than it was and must resend).
    LeaderStays,
}

async fn scenario(schedule: Schedule, harm: Harm, sabotage: bool, base_port: u16) -> Outcome {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let env = if sabotage { vec![("KEEL_SABOTAGE".to_string(), "ignore-ledger".to_string())] } else { Vec::new() };
    let mut nodes = Nodes::start(Path::new(env!("CARGO_BIN_EXE_keel")), dir.path(), Placement::Loopback { base_port }, 3, env).unwrap();
    let cluster = cluster(&nodes);
    let admin = Admin::new(cluster.clone());
    let deadline = Instant::now() + CONVERGE;
    while let Err(e) = admin.create_topic(TOPIC, 1, 3).await {
        assert!(Instant::now() < deadline, "creating the topic: {e}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (l, group) = wait_for_leader(&cluster, CONVERGE).await.expect("the partition elects a leader");
    let others: Vec<u32> = (1..=3).filter(|n| *n != l).collect();
    let (b, c) = (others[0], others[1]);

    if schedule == Schedule::LeaderDies {
        // C lags: from now on every commit needs L and B.
        nodes.kill(c);
    }
    let producer = Producer::new(cluster.clone(), ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() }).unwrap();
    let mut acked = Vec::new();
    for i in 0..ACKED {
        let value = format!("m{i}");
        let record = Record { partition: Some(0), ..Record::new(value.clone()) };
        let delivery = producer.send(TOPIC, record).await.unwrap().wait().await;
        delivery.unwrap_or_else(|e| panic!("message {i} (with L and B up) was not acknowledged: {e}"));
        acked.push(value);
    }
    producer.close().await;

    // B dies and its disk loses the tail it acknowledged; then L dies.
    nodes.kill(b);
    let group_dir = damage::group_dirs(&nodes.data_dir(b)).into_iter().find(|(id, _)| *id == group).expect("B holds the partition group").1;
    let segment = damage::last_segment(&group_dir).expect("B's group has a segment");
    let done = match harm {
        Harm::Truncate(bytes) => damage::truncate_tail(&segment, bytes).unwrap(),
        Harm::Flip(bits) => damage::flip_bits(&segment, 2048, bits, &mut fastrand::Rng::with_seed(7)).unwrap(),
    };
    eprintln!("damage: {done}");
    let mut led_without_the_writes = false;
    if schedule == Schedule::LeaderDies {
        nodes.kill(l);
        // Only the damaged B and the lagging C run.
        nodes.spawn(b).unwrap();
        nodes.spawn(c).unwrap();
        let alone_until = Instant::now() + ALONE;
        while Instant::now() < alone_until {
            led_without_the_writes |= leader(&cluster).await.is_some();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // L returns: it holds the writes, so B votes for it.
        nodes.spawn(l).unwrap();
    } else {
        nodes.spawn(b).unwrap();
        // Writes go on meanwhile: L and C acknowledge them, B is resent what it lost.
        let producer = Producer::new(cluster.clone(), ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() }).unwrap();
        for i in ACKED..ACKED + 20 {
            let value = format!("m{i}");
            let record = Record { partition: Some(0), ..Record::new(value.clone()) };
            producer.send(TOPIC, record).await.unwrap().wait().await.unwrap_or_else(|e| panic!("message {i}: {e}"));
            acked.push(value);
        }
        producer.close().await;
    }
    wait_for_leader(&cluster, CONVERGE).await.expect("a leader once the old leader is back");
    let read = read_all(&cluster).await;
    let mut damaged_metrics = None;
    let deadline = Instant::now() + CONVERGE;
    while Instant::now() < deadline && !sabotage {
        damaged_metrics = damage_metrics(&nodes.admin_addr(b));
        if damaged_metrics.is_some_and(|(_, now)| now == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Outcome { acked, read, led_without_the_writes, damaged_metrics }
}

fn check_nothing_lost(o: &Outcome) {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &o.read {
        *seen.entry(v).or_default() += 1;
    }
    let lost: Vec<&String> = o.acked.iter().filter(|v| !seen.contains_key(v.as_str())).collect();
    let twice: Vec<(&&str, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(lost.is_empty(), "{} acknowledged messages lost: {lost:?}", lost.len());
    assert!(twice.is_empty(), "messages stored twice: {twice:?}");
    assert!(!o.led_without_the_writes, "a leader was elected by the damaged and the lagging replica");
    assert_eq!(o.damaged_metrics, Some((1, 0)), "B detected the damage once and was refilled (detected, still damaged)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_follower_tail_loses_no_acknowledged_write() {
    // About a third of the acknowledged batches (each ~100 bytes stored).
    let o = scenario(Schedule::LeaderDies, Harm::Truncate(4000), false, 23_400).await;
    check_nothing_lost(&o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_damaged_while_the_leader_stays_is_refilled_by_that_leader() {
    let o = scenario(Schedule::LeaderStays, Harm::Truncate(4000), false, 23_700).await;
    check_nothing_lost(&o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_flips_in_a_follower_tail_lose_no_acknowledged_write() {
    let o = scenario(Schedule::LeaderDies, Harm::Flip(3), false, 23_500).await;
    check_nothing_lost(&o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ack_ledger_the_same_schedule_loses_acknowledged_writes() {
    let o = scenario(Schedule::LeaderDies, Harm::Truncate(4000), true, 23_600).await;
    let read: std::collections::BTreeSet<&str> = o.read.iter().map(String::as_str).collect();
    let lost = o.acked.iter().filter(|v| !read.contains(v.as_str())).count();
    assert!(o.led_without_the_writes, "sabotaged: the damaged and the lagging replica elect a leader");
    assert!(lost > 0, "sabotaged: acknowledged writes are lost (else the schedule missed the fault)");
    eprintln!("sabotaged run lost {lost} of {} acknowledged writes", o.acked.len());
}
