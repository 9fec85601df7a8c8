//! One run: start the nodes, run the workloads under the nemesis, heal, drain, dump each
//! node's log, check the history, write the results and the report.
//!
//! The *final generator* (`shared/notes/jepsen.md` §1): stop the nemesis and heal
//! everything, wait for a leader on every partition, stop the writers, read every
//! partition from the start until nothing new comes, wait until every replica has applied
//! the same log, stop the nodes cleanly and dump each node's committed records.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_client::consumer::Consumer;
use keel_client::{Admin, ClientConfig, Cluster};

use crate::checker::{self, Floors, Results};
use crate::history::{Actor, DamageOp, DumpOp, LeaderOp, Op, Read, Recorder};
use crate::nemesis::{self, Fault, LeaderHint};
use crate::nodes::{Nodes, Placement};
use crate::report;
use crate::workload::{self, Ctx, From, IDEM_TOPIC, LOG_TOPIC, PARTITIONS};

/// What to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The `keel` binary.
    pub keel: PathBuf,
    /// The run's directory (history, results, report, node logs, data).
    pub dir: PathBuf,
    pub seed: u64,
    /// How long the workloads run under faults.
    pub time: Duration,
    /// How long each nemesis period lasts.
    pub interval: Duration,
    pub faults: Vec<Fault>,
    /// W1 producers, readers; W3 producers.
    pub log_producers: usize,
    pub readers: usize,
    pub idem_producers: usize,
    /// W2 producers and queue-group members.
    pub queue_producers: usize,
    pub queue_members: usize,
    /// W4 replay jobs of the W1 topic.
    pub replays: usize,
    /// Retention on the W1 topic (bytes per partition; 0: none).
    pub retention_bytes: u64,
    /// Partitions of the W1 topic.
    pub log_partitions: u32,
    /// Messages/s per producer.
    pub rate: f64,
    pub floors: Floors,
    /// Keep the data directories even when the run is valid.
    pub keep_data: bool,
    /// A sabotage mode for the nodes (`KEEL_SABOTAGE`; the keel binary needs the
    /// `sabotage` feature): the run should then be invalid.
    pub sabotage: Option<String>,
}

/// The smallest segment a topic may have (`TopicConfig::segment_bytes`).
const RETENTION_SEGMENT_BYTES_MIN: u64 = 64 * 1024;

/// How long the final drain may take.
const DRAIN_LIMIT: Duration = Duration::from_secs(90);
/// What a node logs when it finds a group's log below its ack ledger's record
/// (`broker/src/node/damage.rs`).
const DAMAGE_DETECTED_LINE: &str = "lost entries it acknowledged";

/// How long the final phase waits for leaders and for replicas to converge.
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);
/// How often the runner samples partition leaders.
const LEADER_SAMPLE_INTERVAL: Duration = Duration::from_millis(500);

/// The runner's view of a run, for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub seed: u64,
    pub sabotage: Option<String>,
    pub seconds: f64,
    pub netns: bool,
    pub faults_enabled: Vec<&'static str>,
    pub results: Results,
}

fn client(addrs: Vec<String>) -> Cluster {
    let config = ClientConfig { bootstrap: addrs, request_timeout: Duration::from_secs(5), attempt_timeout: Duration::from_secs(2), ..ClientConfig::default() };
    Cluster::new(config).expect("a non-empty bootstrap list")
}

/// Samples every partition's leader into the history (recording changes only), and keeps
/// the nemesis' hint (the node leading `LOG_TOPIC`/0).
async fn sample_leaders(cluster: Cluster, recorder: Arc<Recorder>, hint: LeaderHint, stop: Arc<AtomicBool>) {
    let admin = Admin::new(cluster);
    let mut last: std::collections::HashMap<(String, u32), (Option<u64>, u64)> = std::collections::HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(reports) = admin.cluster_status(Duration::from_secs(1)).await {
            // A deposed leader can still call itself leader (until it hears of the newer
            // term): per partition, the claim with the highest term wins.
            let mut claims: std::collections::BTreeMap<(String, u32), (u64, u64)> = std::collections::BTreeMap::new();
            for (_, report) in reports {
                let Ok(report) = report else { continue };
                for g in report.groups.iter().filter(|g| g.role == "leader") {
                    let (Some(topic), Some(partition)) = (g.topic.clone(), g.partition) else { continue };
                    let claim = claims.entry((topic, partition)).or_insert((g.term, report.node));
                    if g.term > claim.0 {
                        *claim = (g.term, report.node);
                    }
                }
            }
            for ((topic, partition), (term, node)) in claims {
                if topic == LOG_TOPIC && partition == 0 {
                    *hint.lock().expect("hint lock poisoned") = Some(node as u32);
                }
                let now = (Some(node), term);
                let key = (topic.clone(), partition);
                if last.get(&key).is_none_or(|prev| prev.1 < term) {
                    last.insert(key, now);
                    recorder.note(Actor::Runner, Op::Leader(LeaderOp { topic, partition, leader: Some(node), term }));
                }
            }
        }
        tokio::time::sleep(LEADER_SAMPLE_INTERVAL).await;
    }
}

async fn wait_for(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            return Err(format!("{what} not reached within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn every_partition_led(cluster: &Cluster) -> bool {
    match cluster.metadata(true).await {
        Ok(m) => {
            [LOG_TOPIC, IDEM_TOPIC].iter().all(|t| m.topics.iter().find(|x| x.name == *t).is_some_and(|x| x.partitions.iter().all(|p| p.leader.is_some())))
        }
        Err(_) => false,
    }
}

/// Whether every live replica of every group has applied the same log index.
async fn replicas_converged(cluster: &Cluster, nodes: u32) -> bool {
    let Ok(reports) = Admin::new(cluster.clone()).cluster_status(Duration::from_secs(2)).await else { return false };
    if reports.iter().filter(|(_, r)| r.is_ok()).count() < nodes as usize {
        return false;
    }
    let mut applied: std::collections::HashMap<u64, Vec<Option<u64>>> = std::collections::HashMap::new();
    for (_, r) in reports.iter() {
        for g in &r.as_ref().expect("filtered above").groups {
            applied.entry(g.group).or_default().push(g.applied_index);
        }
    }
    applied.values().all(|v| v.len() == nodes as usize && v.iter().all(|a| a.is_some() && *a == v[0]))
}

/// Reads every partition of the workload topics from offset 0 until the end (the
/// drain), recording every poll.
async fn drain(ctx: &Ctx) -> Result<(), String> {
    for topic in [LOG_TOPIC, IDEM_TOPIC] {
        let partitions = ctx.partitions(topic);
        let consumer = Consumer::assign(ctx.cluster.clone(), topic, &(0..partitions).map(|p| (p, 0)).collect::<Vec<_>>()).await.map_err(|e| e.to_string())?;
        for p in 0..partitions {
            let mut process = ctx.process();
            let mut position = 0u64;
            let deadline = Instant::now() + DRAIN_LIMIT;
            let mut quiet_since: Option<Instant> = None;
            loop {
                let before = position;
                let ok = workload::poll_once(ctx, &consumer, topic, p, &mut position, &mut process).await;
                if ok && position == before {
                    // Caught up when an answer brings nothing new for a while.
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(1) {
                        break;
                    }
                } else {
                    quiet_since = None;
                }
                if Instant::now() > deadline {
                    return Err(format!("draining {topic}/{p} did not finish within {DRAIN_LIMIT:?}"));
                }
            }
        }
    }
    Ok(())
}

/// Runs one test; the process must already be in the client namespace if `placement`
/// is namespaces.
pub async fn run(config: RunConfig, placement: Placement) -> Result<RunSummary, String> {
    let started = Instant::now();
    std::fs::create_dir_all(&config.dir).map_err(|e| format!("creating {}: {e}", config.dir.display()))?;
    let netns = matches!(placement, Placement::Namespaces(_));
    let faults: Vec<Fault> = config.faults.iter().copied().filter(|f| netns || !f.needs_network()).collect();
    if faults.len() < config.faults.len() {
        tracing::warn!("network namespaces are unavailable: partitions, loss and bandwidth faults are skipped");
    }
    let recorder = Arc::new(Recorder::create(Some(&config.dir.join("history.jsonl"))).map_err(|e| e.to_string())?);
    let mut env: Vec<(String, String)> = config.sabotage.iter().map(|m| ("KEEL_SABOTAGE".to_string(), m.clone())).collect();
    if faults.contains(&Fault::PowerLoss) {
        // Every kill is then a power cut: unsynced file writes die with the process.
        env.push(("KEEL_TEST_DISK".to_string(), "lazy".to_string()));
    }
    let nodes = Arc::new(Mutex::new(Nodes::start(&config.keel, &config.dir, placement, 3, env)?));
    let cluster = client(nodes.lock().expect("nodes lock poisoned").client_addrs());

    // Topics, once the cluster answers.
    let admin = Admin::new(cluster.clone());
    for topic in [LOG_TOPIC, IDEM_TOPIC] {
        let retention = if topic == LOG_TOPIC { config.retention_bytes } else { 0 };
        let patch = match retention {
            0 => keel_protocol::TopicConfigPatch::default(),
            r => keel_protocol::TopicConfigPatch {
                retention_bytes: Some(r),
                segment_bytes: Some((r / 4).max(RETENTION_SEGMENT_BYTES_MIN)),
                ..keel_protocol::TopicConfigPatch::default()
            },
        };
        let partitions = if topic == LOG_TOPIC { config.log_partitions } else { PARTITIONS };
        let req = keel_protocol::message::CreateTopicRequest { name: topic.into(), partitions, replicas: 3, config: patch };
        wait_for("the topic's creation", CONVERGE_LIMIT, async || match admin.create_topic_with(req.clone()).await {
            Ok(()) => true,
            Err(e) => e.code() == Some(keel_protocol::ErrorCode::TopicAlreadyExists),
        })
        .await?;
    }
    let queue = config.queue_producers > 0 || config.queue_members > 0;
    if queue {
        wait_for("the queue topic's creation", CONVERGE_LIMIT, async || workload::create_queue(&cluster).await).await?;
    }
    wait_for("a leader on every partition", CONVERGE_LIMIT, async || every_partition_led(&cluster).await).await?;

    let stop_clients = Arc::new(AtomicBool::new(false));
    let stop_nemesis = Arc::new(AtomicBool::new(false));
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let ctx = Ctx {
        cluster: cluster.clone(),
        recorder: recorder.clone(),
        stop: stop_clients.clone(),
        processes: Arc::new(AtomicU64::new(0)),
        log_partitions: config.log_partitions,
    };
    let hint: LeaderHint = Arc::default();
    let sampler = tokio::spawn(sample_leaders(cluster.clone(), recorder.clone(), hint.clone(), stop_sampler.clone()));
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..config.log_producers {
        workers.spawn(workload::log_producer(ctx.clone(), config.rate, config.seed.wrapping_add(i as u64)));
    }
    for i in 0..config.readers {
        let from = match i % 3 {
            0 => From::Earliest,
            1 => From::Latest,
            _ => From::Random(config.seed.wrapping_add(1000 + i as u64)),
        };
        workers.spawn(workload::reader(ctx.clone(), LOG_TOPIC, from));
    }
    for i in 0..config.idem_producers {
        workers.spawn(workload::idem_producer(ctx.clone(), (i as u32) % PARTITIONS, config.rate));
    }
    for i in 0..config.queue_producers {
        workers.spawn(workload::queue_producer(ctx.clone(), config.rate, config.seed.wrapping_add(2000 + i as u64)));
    }
    for i in 0..config.queue_members {
        workers.spawn(workload::queue_member(ctx.clone(), config.seed.wrapping_add(3000 + i as u64)));
    }
    let replays: crate::replay::Replays = Arc::default();
    if config.replays > 0 {
        workers.spawn(crate::replay::replayer(ctx.clone(), config.replays, replays.clone()));
    }
    let nemesis = tokio::spawn(nemesis::run(nodes.clone(), recorder.clone(), faults.clone(), config.interval, config.seed, hint, stop_nemesis.clone()));

    tokio::time::sleep(config.time).await;
    stop_nemesis.store(true, Ordering::Relaxed);
    let _ = nemesis.await;
    // From here on a problem does not end the run: it is recorded, the run is invalid,
    // and the report is still written (a cluster that does not recover is a finding).
    let mut problems: Vec<String> = Vec::new();
    if let Err(e) = nemesis::heal_all(&nodes) {
        problems.push(format!("healing: {e}"));
    }
    if let Err(e) = wait_for("a leader on every partition after healing", CONVERGE_LIMIT, async || every_partition_led(&cluster).await).await {
        problems.push(e);
    }
    // Writers run on for a moment in the healed cluster, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_clients.store(true, Ordering::Relaxed);
    while let Some(r) = workers.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "a worker ended with an error");
        }
    }
    if let Err(e) = drain(&ctx).await {
        problems.push(format!("the final drain did not finish: {e}"));
    }
    if queue {
        match workload::queue_drain(&ctx).await {
            Ok(()) => recorder.note(Actor::Runner, Op::QueueDrained),
            Err(e) => problems.push(format!("the queue drain did not finish: {e}")),
        }
    }
    crate::replay::finish(&ctx, &replays).await;
    if let Err(e) = wait_for("every replica applying the same log", CONVERGE_LIMIT, async || replicas_converged(&cluster, 3).await).await {
        problems.push(format!("the replicas did not converge: {e}"));
    }
    stop_sampler.store(true, Ordering::Relaxed);
    let _ = sampler.await;

    // Every node's committed log, from its data directory.
    {
        let mut n = nodes.lock().expect("nodes lock poisoned");
        for i in 1..=3 {
            n.stop(i);
        }
        for i in 1..=3 {
            let records = match n.dump(i) {
                Ok(r) => r,
                Err(e) => {
                    problems.push(format!("dumping node {i}: {e}"));
                    continue;
                }
            };
            let mut by_partition: std::collections::BTreeMap<(String, u32), Vec<Read>> = std::collections::BTreeMap::new();
            for r in records {
                let topic = r["topic"].as_str().unwrap_or_default().to_string();
                let partition = r["partition"].as_u64().unwrap_or_default() as u32;
                let read = Read { offset: r["offset"].as_u64().unwrap_or_default(), msg: r["value"].as_str().unwrap_or_default().to_string() };
                by_partition.entry((topic, partition)).or_default().push(read);
            }
            for ((topic, partition), records) in by_partition {
                recorder.note(Actor::Runner, Op::Dump(DumpOp { node: u64::from(i), topic, partition, records }));
            }
        }
    }
    // How often each node found a log below what it had acknowledged (its own log file
    // says so; counted across every restart).
    for i in 1..=3u64 {
        let log = std::fs::read_to_string(config.dir.join(format!("node{i}.log"))).unwrap_or_default();
        let detections = log.lines().filter(|l| l.contains(DAMAGE_DETECTED_LINE)).count() as u64;
        recorder.note(Actor::Runner, Op::Damage(DamageOp { node: i, detections }));
    }
    let events = recorder.finish().map_err(|e| e.to_string())?;
    let mut results = checker::check(&events, config.floors);
    if !problems.is_empty() {
        results.valid = false;
        results.vacuous.extend(problems);
    }
    let summary = RunSummary {
        seed: config.seed,
        sabotage: config.sabotage.clone(),
        seconds: started.elapsed().as_secs_f64(),
        netns,
        faults_enabled: faults.iter().map(|f| f.name()).collect(),
        results,
    };
    report::write(&config.dir, &summary, &events).map_err(|e| format!("writing the report: {e}"))?;
    drop(nodes);
    if summary.results.valid && !config.keep_data {
        for i in 1..=3 {
            let _ = std::fs::remove_dir_all(config.dir.join(format!("node{i}")));
        }
    }
    Ok(summary)
}

/// A directory for a new run under `store`: `<store>/<unix seconds>-<seed>`.
pub fn run_dir(store: &Path, seed: u64) -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    store.join(format!("{secs}-{seed}"))
}
