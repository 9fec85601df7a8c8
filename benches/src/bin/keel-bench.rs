//! `keel-bench`: load against a running Keel cluster through the Rust client.
//!
//! Produce phase: `--producers` producers send `--message-size` messages for
//! `--duration` (or `--messages` in total), each keeping at most `--in-flight` messages
//! unacknowledged, optionally capped at `--rate` messages/s. Reports acknowledged
//! msgs/s and MB/s, ack latency percentiles (HdrHistogram) and, in `--failover` mode,
//! the longest gap between acknowledgements after SIGKILL of the leader of partition 0
//! (PID from `keel dev`'s `DIR/nodeN/keel.pid`). Consume phase: reads the topic from
//! the earliest offset and reports msgs/s, end-to-end latency (producer timestamp to
//! receipt, during the produce phase only when `--consumers` > 0) and, if asked,
//! checks that every acknowledged message is present.
//!
//! Producers are idempotent by default (`--no-idempotence` turns it off);
//! `--message-ids` gives every message a distinct message id. `--verify` reports
//! acknowledged messages missing and messages read back more than once. `--metrics`
//! scrapes every node's `/metrics` after the produce phase and compares the stored
//! message counters with what was acknowledged; `--rss` reports each `keel dev` node's
//! peak resident memory (VmHWM, from the PID files).
//!
//! Every loop is bounded by count and time and stops by itself.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use keel_client::consumer::{Consumer, StartAt};
use keel_client::producer::{Producer, ProducerConfig, Record};
use keel_client::{Admin, ClientConfig, Cluster};
use tokio::sync::Semaphore;

#[derive(Parser, Clone)]
#[command(name = "keel-bench", about = "Load generator for a Keel cluster")]
struct Args {
    #[arg(long, env = "KEEL_BOOTSTRAP", default_value = "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094")]
    bootstrap: String,
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Create the topic first (ignored if it exists).
    #[arg(long, default_value_t = 3)]
    partitions: u32,
    #[arg(long, default_value_t = 3)]
    replicas: u16,
    #[arg(long, default_value_t = 1)]
    producers: usize,
    #[arg(long, default_value_t = 1024)]
    message_size: usize,
    /// Unacknowledged messages per producer.
    #[arg(long, default_value_t = 1024)]
    in_flight: usize,
    /// Batches in flight per partition per producer (at most 5 with idempotence, which
    /// keeps order; without it, order is only kept with 1).
    #[arg(long, default_value_t = 5)]
    batches_in_flight_per_partition: usize,
    /// Produce without idempotence.
    #[arg(long)]
    no_idempotence: bool,
    /// Give every message a distinct message id (broker-side dedupe window).
    #[arg(long)]
    message_ids: bool,
    /// Send this many messages first, unmeasured (with distinct message ids under
    /// --message-ids, so the measured phase runs with that many ids in the window).
    #[arg(long, default_value_t = 0)]
    warmup_messages: u64,
    /// Scrape every node's /metrics (admin ports 9292..) after producing and compare.
    #[arg(long)]
    metrics: bool,
    /// Report each `keel dev` node's peak resident memory (from --data-dir's PID files).
    #[arg(long)]
    rss: bool,
    /// Report the `keel dev` nodes' CPU time (utime + stime, from /proc) over the
    /// produce phase, per acknowledged message (PIDs from --data-dir's PID files).
    #[arg(long)]
    cpu: bool,
    /// Producer linger.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2ms")]
    linger: Duration,
    /// Batches close only at the linger or the size limit, not also when the in-flight
    /// window is full (`ProducerConfig::close_when_window_full` off).
    #[arg(long)]
    fixed_linger: bool,
    /// Producer batch size limit in bytes (default: the client's `ProducerConfig`).
    #[arg(long)]
    batch_bytes: Option<usize>,
    /// Total messages/s across producers; unlimited if omitted.
    #[arg(long)]
    rate: Option<u64>,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    duration: Duration,
    /// Stop after this many messages (whichever of this and --duration comes first).
    #[arg(long)]
    messages: Option<u64>,
    /// Read the topic back from the earliest offset after producing.
    #[arg(long)]
    consume: bool,
    /// Check that every acknowledged message is read back (implies --consume).
    #[arg(long)]
    verify: bool,
    /// After producing (and the stream consume, if asked), consume the topic with a
    /// queue group of this many members, each acking every message; reports msgs/s.
    #[arg(long, default_value_t = 0)]
    queue_members: usize,
    /// Unsettled deliveries per queue member (its credit).
    #[arg(long, default_value_t = 1000)]
    queue_in_flight: u32,
    /// After producing (the lane-0 backlog), measure priority delivery: a queue group
    /// of --queue-members drains the backlog while this many lane-9 messages are
    /// published one at a time (every --priority-interval); reports the p50/p99/max time
    /// from publish to delivery, then lane 0's share while lane 9 is busy too. Creates
    /// the topic with 10 priority lanes.
    #[arg(long, default_value_t = 0)]
    priority_trials: usize,
    /// Time between two lane-9 trial messages.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2ms")]
    priority_interval: Duration,
    /// SIGKILL the leader of partition 0 halfway through the produce phase; reports when
    /// each partition it led had another leader (polled every 50 ms).
    #[arg(long)]
    failover: bool,
    /// Before measuring, create a second topic `<topic>-idle` of this many partitions
    /// (same replicas), wait until all are led, then `--idle-settle` (so its groups
    /// quiesce): the cost of many idle partitions on the measured topic.
    #[arg(long, default_value_t = 0)]
    idle_partitions: u32,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    idle_settle: Duration,
    /// `keel dev`'s data directory (for --failover's PID files).
    #[arg(long, default_value = "keel-data")]
    data_dir: PathBuf,
    /// Write the summary as JSON to this file too.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A message body: producer id, sequence, padding to the size.
fn body(producer: usize, seq: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(16));
    b.put_u64_le(producer as u64);
    b.put_u64_le(seq);
    b.resize(size.max(16), b'x');
    b.freeze()
}

/// The unmeasured warm-up: `--warmup-messages` messages through one producer with a
/// 4,096-message window, every one acknowledged.
async fn warm_up(cluster: &Cluster, args: &Args) -> anyhow::Result<()> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let producer = Producer::new(cluster.clone(), ProducerConfig { idempotence: !args.no_idempotence, ..ProducerConfig::default() })?;
    let mut pending = FuturesUnordered::new();
    for i in 0..args.warmup_messages {
        if pending.len() >= 4096 {
            if let Some(r) = pending.next().await {
                let _: keel_client::producer::Delivery = r?;
            }
        }
        let mut record = Record::new(body(usize::MAX, i, args.message_size));
        if args.message_ids {
            record.message_id = Some(Bytes::from(format!("warm-{i}")));
        }
        let ack = producer.send(&args.topic, record).await?;
        pending.push(ack.wait());
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    producer.close().await;
    Ok(())
}

/// Every node's `/metrics` (admin address = client port + 200, as `keel dev` lays them
/// out): per node, each metric line's name (with labels) and value.
async fn scrape(cluster: &Cluster) -> anyhow::Result<Vec<(u64, Vec<(String, f64)>)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let brokers = cluster.metadata(true).await?.brokers.clone();
    let mut out = Vec::new();
    for b in brokers {
        let (host, port) = b.addr.rsplit_once(':').context("a broker address is host:port")?;
        let admin = format!("{host}:{}", port.parse::<u16>()? + 200);
        let Ok(mut stream) = tokio::net::TcpStream::connect(&admin).await else { continue };
        stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes()).await?;
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text)).await.context("scraping /metrics timed out")??;
        let lines = text
            .lines()
            .filter(|l| l.starts_with("keel_"))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(name, v)| Some((name.to_string(), v.parse::<f64>().ok()?))))
            .collect();
        out.push((b.id, lines));
    }
    Ok(out)
}

/// Per node, the sum of every series of `metric` whose labels contain `filter`.
fn sum_of(scraped: &[(u64, Vec<(String, f64)>)], metric: &str, filter: &str) -> Vec<(u64, f64)> {
    scraped.iter().map(|(node, lines)| (*node, lines.iter().filter(|(n, _)| n.starts_with(metric) && n.contains(filter)).map(|(_, v)| v).sum())).collect()
}

fn id_of(value: &[u8]) -> Option<(u64, u64)> {
    Some((u64::from_le_bytes(value.get(0..8)?.try_into().ok()?), u64::from_le_bytes(value.get(8..16)?.try_into().ok()?)))
}

struct Shared {
    ack_latency_us: Histogram<u64>,
    acked: Vec<(u64, u64)>,
    ack_times: Vec<Instant>,
    failed: u64,
    first_error: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cluster = Cluster::new(ClientConfig::with_bootstrap(&args.bootstrap))?;
    let admin = Admin::new(cluster.clone());
    if admin.describe_topic(&args.topic).await.is_err() {
        let config = keel_protocol::TopicConfigPatch { priorities: (args.priority_trials > 0).then_some(10), ..Default::default() };
        let req = keel_protocol::message::CreateTopicRequest { name: args.topic.clone(), partitions: args.partitions, replicas: args.replicas, config };
        admin.create_topic_with(req).await.context("creating the bench topic")?;
    }
    if args.idle_partitions > 0 {
        let idle = format!("{}-idle", args.topic);
        let started = Instant::now();
        if admin.describe_topic(&idle).await.is_err() {
            let req = keel_protocol::message::CreateTopicRequest {
                name: idle.clone(),
                partitions: args.idle_partitions,
                replicas: args.replicas,
                config: Default::default(),
            };
            admin.create_topic_with(req).await.context("creating the idle topic")?;
        }
        while admin.describe_topic(&idle).await?.partitions.iter().any(|p| p.leader.is_none()) {
            if started.elapsed() > Duration::from_secs(300) {
                bail!("partitions of {idle} have no leader after 300 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!("idle topic {idle}: {} partitions led after {:.1} s; settling {:?}", args.idle_partitions, started.elapsed().as_secs_f64(), args.idle_settle);
        tokio::time::sleep(args.idle_settle).await;
    }
    // Wait for every partition to have a leader before measuring (as for the idle topic:
    // a new topic of 1,000 partitions took 11–30 s to be led on this 2-core machine).
    let waited = Instant::now();
    while admin.describe_topic(&args.topic).await?.partitions.iter().any(|p| p.leader.is_none()) {
        if waited.elapsed() > Duration::from_secs(300) {
            bail!("partitions of {} have no leader after 300 s", args.topic);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if waited.elapsed() > Duration::from_secs(1) {
        eprintln!("topic {}: every partition led after {:.1} s", args.topic, waited.elapsed().as_secs_f64());
    }
    if args.warmup_messages > 0 {
        let warm_started = Instant::now();
        warm_up(&cluster, &args).await?;
        eprintln!("warm-up: {} messages in {:.1} s", args.warmup_messages, warm_started.elapsed().as_secs_f64());
    }
    let shared = Arc::new(Mutex::new(Shared {
        ack_latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        acked: Vec::new(),
        ack_times: Vec::new(),
        failed: 0,
        first_error: None,
    }));
    let cpu_before = args.cpu.then(|| node_cpu_ticks(&args.data_dir));
    let started = Instant::now();
    let deadline = started + args.duration;
    let per_producer_cap = args.messages.map(|m| m.div_ceil(args.producers as u64));
    let per_producer_rate = args.rate.map(|r| (r as f64 / args.producers as f64).max(1.0));
    let mut tasks = Vec::new();
    for pid in 0..args.producers {
        let cfg = ProducerConfig {
            linger: args.linger,
            close_when_window_full: !args.fixed_linger,
            max_in_flight_per_partition: args.batches_in_flight_per_partition,
            max_in_flight: 64,
            batch_bytes: args.batch_bytes.unwrap_or(ProducerConfig::default().batch_bytes),
            idempotence: !args.no_idempotence,
            ..ProducerConfig::default()
        };
        let producer = Arc::new(Producer::new(cluster.clone(), cfg)?);
        let (shared, args) = (shared.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            // One collector per producer awaits acknowledgements as they complete
            // (FuturesUnordered), recording each at its own completion time: no task
            // and no shared lock per message.
            let (ack_tx, mut ack_rx) =
                tokio::sync::mpsc::channel::<((u64, u64), Instant, keel_client::producer::DeliveryFuture, tokio::sync::OwnedSemaphorePermit)>(args.in_flight);
            let collector = {
                let shared = shared.clone();
                tokio::spawn(async move {
                    use futures::stream::{FuturesUnordered, StreamExt};
                    let mut pending = FuturesUnordered::new();
                    let mut local = Shared {
                        ack_latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
                        acked: Vec::new(),
                        ack_times: Vec::new(),
                        failed: 0,
                        first_error: None,
                    };
                    let mut open = true;
                    while open || !pending.is_empty() {
                        tokio::select! {
                            next = ack_rx.recv(), if open => match next {
                                Some((id, sent_at, ack, permit)) => pending.push(async move {
                                    let r = ack.wait().await;
                                    drop(permit);
                                    (id, sent_at, r, Instant::now())
                                }),
                                None => open = false,
                            },
                            Some((id, sent_at, result, now)) = pending.next(), if !pending.is_empty() => match result {
                                Ok(_) => {
                                    let _ = local.ack_latency_us.record((now - sent_at).as_micros().max(1) as u64);
                                    local.acked.push(id);
                                    local.ack_times.push(now);
                                }
                                Err(e) => {
                                    local.failed += 1;
                                    local.first_error.get_or_insert(e.to_string());
                                }
                            },
                        }
                    }
                    let mut s = shared.lock().expect("the results lock is never held across a panic");
                    let _ = s.ack_latency_us.add(&local.ack_latency_us);
                    s.acked.extend(local.acked);
                    s.ack_times.extend(local.ack_times);
                    s.failed += local.failed;
                    if s.first_error.is_none() {
                        s.first_error = local.first_error;
                    }
                })
            };
            // The window bounds unacknowledged messages, so the hand-off to the
            // collector never holds more than `in_flight` entries.
            let window = Arc::new(Semaphore::new(args.in_flight));
            let mut seq = 0u64;
            while Instant::now() < deadline && per_producer_cap.is_none_or(|cap| seq < cap) {
                if let Some(rate) = per_producer_rate {
                    let due = started + Duration::from_secs_f64(seq as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let permit = window.clone().acquire_owned().await.expect("never closed");
                let mut record = Record::new(body(pid, seq, args.message_size));
                record.timestamp_ms = Some(now_ms());
                if args.message_ids {
                    record.message_id = Some(Bytes::from(format!("{pid}-{seq}")));
                }
                let sent_at = Instant::now();
                let ack = match producer.send(&args.topic, record).await {
                    Ok(a) => a,
                    Err(e) => {
                        shared.lock().expect("the results lock is never held across a panic").first_error.get_or_insert(e.to_string());
                        break;
                    }
                };
                if ack_tx.send(((pid as u64, seq), sent_at, ack, permit)).await.is_err() {
                    break;
                }
                seq += 1;
            }
            producer.flush().await.ok();
            drop(ack_tx);
            let _ = collector.await;
            seq
        }));
    }
    let mut killed: Option<(u64, Instant)> = None;
    let mut reelection: Option<tokio::task::JoinHandle<(usize, Vec<Duration>, Duration)>> = None;
    if args.failover {
        tokio::time::sleep(args.duration / 2).await;
        let described = admin.describe_topic(&args.topic).await?;
        let leader = described.partitions[0].leader.context("partition 0 has no leader")?;
        let led: Vec<u32> = described.partitions.iter().filter(|p| p.leader == Some(leader)).map(|p| p.partition).collect();
        let pid_file = args.data_dir.join(format!("node{leader}/keel.pid"));
        let pid: i32 = std::fs::read_to_string(&pid_file).with_context(|| format!("reading {}", pid_file.display()))?.trim().parse()?;
        // SAFETY: kill(2) on a keel node process named by keel dev's pid file.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let at = Instant::now();
        killed = Some((leader, at));
        eprintln!("killed node {leader} (pid {pid}), the leader of partition 0 and {} partitions in all", led.len());
        let (cluster, topic) = (cluster.clone(), args.topic.clone());
        let survivors: Vec<String> = cluster.metadata(false).await?.brokers.iter().filter(|b| b.id != leader).map(|b| b.addr.clone()).collect();
        reelection = Some(tokio::spawn(async move {
            // When each partition the killed node led was first reported led by a
            // survivor (each survivor's own view of the groups it leads, every 50 ms).
            // A time is when the answer arrived; the slowest poll bounds how late that is.
            let mut when: std::collections::HashMap<u32, Duration> = std::collections::HashMap::new();
            let mut slowest_poll = Duration::ZERO;
            while when.len() < led.len() && at.elapsed() < Duration::from_secs(30) {
                for addr in &survivors {
                    let asked = Instant::now();
                    let Ok(body) = cluster.call_once(addr, keel_protocol::api::client::CLUSTER_STATUS, bytes::Bytes::new(), Duration::from_secs(2)).await
                    else {
                        continue;
                    };
                    let Ok(status) = keel_protocol::message::decode::<keel_protocol::message::ClusterStatusResponse>(&body) else { continue };
                    let seen = at.elapsed();
                    slowest_poll = slowest_poll.max(asked.elapsed());
                    for g in status.groups.iter().filter(|g| g.role == "leader" && g.topic.as_deref() == Some(topic.as_str())) {
                        if let Some(p) = g.partition.filter(|p| led.contains(p)) {
                            when.entry(p).or_insert(seen);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut times: Vec<Duration> = when.into_values().collect();
            times.sort();
            (led.len(), times, slowest_poll)
        }));
    }
    let mut sent = 0u64;
    for t in tasks {
        sent += t.await?;
    }
    let elapsed = started.elapsed();
    let cpu_after = args.cpu.then(|| node_cpu_ticks(&args.data_dir));
    // Every acknowledgement task has finished (each producer waited for its window),
    // so the shared results can be taken out whole.
    let s = std::mem::replace(
        &mut *shared.lock().expect("the results lock is never held across a panic"),
        Shared { ack_latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?, acked: Vec::new(), ack_times: Vec::new(), failed: 0, first_error: None },
    );
    let acked = s.acked.len() as u64;
    let mut times = s.ack_times.clone();
    times.sort();
    let max_gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    let gap_after_kill = killed.map(|(_, at)| times.windows(2).filter(|w| w[1] >= at).map(|w| w[1] - w[0]).max().unwrap_or_default());
    let h = &s.ack_latency_us;
    let mb = (acked as f64 * args.message_size as f64) / 1e6;
    let mut summary = serde_json::json!({
        "producers": args.producers, "message_size": args.message_size, "in_flight": args.in_flight,
        "linger_ms": args.linger.as_secs_f64() * 1000.0, "close_when_window_full": !args.fixed_linger,
        "sent": sent, "acknowledged": acked, "failed": s.failed, "seconds": elapsed.as_secs_f64(),
        "produce_msgs_per_s": acked as f64 / elapsed.as_secs_f64(), "produce_mb_per_s": mb / elapsed.as_secs_f64(),
        "ack_latency_ms": {"p50": h.value_at_quantile(0.5) as f64 / 1000.0, "p90": h.value_at_quantile(0.9) as f64 / 1000.0,
            "p99": h.value_at_quantile(0.99) as f64 / 1000.0, "p999": h.value_at_quantile(0.999) as f64 / 1000.0, "max": h.max() as f64 / 1000.0},
        "longest_ack_gap_ms": max_gap.as_secs_f64() * 1000.0,
    });
    if let (Some((node, _)), Some(gap)) = (killed, gap_after_kill) {
        summary["failover"] = serde_json::json!({"killed_node": node, "longest_ack_gap_after_kill_ms": gap.as_secs_f64() * 1000.0});
        if let Some(task) = reelection.take() {
            let (led, times, slowest_poll) = task.await?;
            let at = |q: f64| times.get(((times.len() as f64 * q).ceil() as usize).saturating_sub(1)).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
            println!(
                "failover: {} of the {led} partitions node {node} led had another leader; after ms: first {:.0}  p50 {:.0}  p90 {:.0}  p99 {:.0}  max {:.0} (status polls took up to {:.0} ms)",
                times.len(),
                at(0.0),
                at(0.5),
                at(0.9),
                at(0.99),
                at(1.0),
                slowest_poll.as_secs_f64() * 1000.0
            );
            summary["failover"]["partitions_led"] = serde_json::json!(led);
            summary["failover"]["partitions_reelected"] = serde_json::json!(times.len());
            summary["failover"]["reelected_ms"] = serde_json::json!({"first": at(0.0), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0)});
            summary["failover"]["slowest_status_poll_ms"] = serde_json::json!(slowest_poll.as_secs_f64() * 1000.0);
        }
    }
    println!(
        "produce: {acked} acknowledged of {sent} sent in {:.1} s: {:.0} msgs/s, {:.1} MB/s; {} failed",
        elapsed.as_secs_f64(),
        acked as f64 / elapsed.as_secs_f64(),
        mb / elapsed.as_secs_f64(),
        s.failed
    );
    println!(
        "ack latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.9) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.value_at_quantile(0.999) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
    if let (Some(before), Some(after)) = (&cpu_before, &cpu_after) {
        summary["cpu"] = cpu_report(before, after, acked, elapsed);
    }
    if let Some(gap) = gap_after_kill {
        println!("failover: longest gap between acknowledgements after the kill: {:.0} ms", gap.as_secs_f64() * 1000.0);
    }
    if let Some(e) = &s.first_error {
        println!("first error: {e}");
    }
    let acked_ids: HashSet<(u64, u64)> = s.acked.iter().copied().collect();
    if args.metrics {
        let scraped = scrape(&cluster).await?;
        let as_ints = |v: Vec<(u64, f64)>| v.into_iter().map(|(n, x)| (n, x.max(0.0) as u64)).collect::<Vec<_>>();
        let topic = format!("topic=\"{}\"", args.topic);
        let stored = as_ints(sum_of(&scraped, "keel_produce_messages_total{", &topic));
        let total: u64 = stored.iter().map(|(_, v)| v).sum();
        let warm = args.warmup_messages;
        println!(
            "metrics: keel_produce_messages_total{{{topic}}} per node {stored:?}, sum {total} = acknowledged {acked} + warm-up {warm}: {}",
            total == acked + warm
        );
        let throttled = as_ints(sum_of(&scraped, "keel_produce_throttled_total{", ""));
        let duplicates = as_ints(sum_of(&scraped, "keel_produce_duplicates_total{", ""));
        let ids = as_ints(sum_of(&scraped, "keel_message_ids_held{", ""));
        let id_bytes = as_ints(sum_of(&scraped, "keel_message_id_window_bytes{", ""));
        println!("metrics: throttled {throttled:?}, duplicates {duplicates:?}, message ids held per node {ids:?}, window bytes per node {id_bytes:?}");
        summary["metrics"] = serde_json::json!({"produce_messages_total": total, "per_node": stored, "acknowledged": acked, "warmup": args.warmup_messages,
            "throttled": throttled, "duplicates": duplicates, "message_ids_held": ids, "message_id_window_bytes": id_bytes});
    }

    if args.consume || args.verify {
        let mut consumer = Consumer::new(cluster.clone(), &args.topic, StartAt::Earliest).await?;
        let mut e2e = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?;
        let mut seen: HashSet<(u64, u64)> = HashSet::with_capacity(acked_ids.len());
        let mut read = 0u64;
        let mut duplicates = 0u64;
        let start = Instant::now();
        let mut idle_since = Instant::now();
        let consume_deadline = start + Duration::from_secs(120);
        while idle_since.elapsed() < Duration::from_secs(3) && Instant::now() < consume_deadline {
            let batch = consumer.poll(Duration::from_millis(500)).await?;
            if batch.is_empty() {
                continue;
            }
            idle_since = Instant::now();
            let now = now_ms();
            for m in batch {
                read += 1;
                let _ = e2e.record((now - m.timestamp_ms).max(1) as u64);
                if let Some(id) = m.value.as_deref().and_then(id_of) {
                    if !seen.insert(id) {
                        duplicates += 1;
                    }
                }
            }
        }
        let secs = (idle_since - start).as_secs_f64().max(1e-3);
        println!("consume: {read} messages in {secs:.1} s: {:.0} msgs/s", read as f64 / secs);
        summary["consume"] = serde_json::json!({"messages": read, "seconds": secs, "msgs_per_s": read as f64 / secs});
        if args.verify {
            let missing = acked_ids.iter().filter(|id| !seen.contains(id)).count();
            println!(
                "verify: {} acknowledged, {} read back distinct, {missing} acknowledged messages missing, {duplicates} messages read back more than once",
                acked_ids.len(),
                seen.len()
            );
            summary["verify"] = serde_json::json!({"acknowledged": acked_ids.len(), "missing": missing, "duplicates": duplicates});
            if missing > 0 {
                eprintln!("ACKNOWLEDGED MESSAGES LOST: {missing}");
            }
            if duplicates > 0 {
                eprintln!("MESSAGES STORED MORE THAN ONCE: {duplicates}");
            }
        }
    }
    if args.priority_trials > 0 {
        summary["priority"] = priority_trials(&cluster, &args).await?;
    } else if args.queue_members > 0 {
        let (acked, secs, redelivered) = queue_consume(&cluster, &args).await?;
        println!(
            "queue consume ({} members, each message acked): {acked} messages in {secs:.1} s: {:.0} msgs/s, {redelivered} redeliveries",
            args.queue_members,
            acked as f64 / secs
        );
        summary["queue_consume"] = serde_json::json!({"members": args.queue_members, "messages": acked, "seconds": secs, "msgs_per_s": acked as f64 / secs, "redelivered": redelivered});
    }
    if args.rss {
        let mut nodes = serde_json::Map::new();
        for id in 1..=9u64 {
            let Ok(pid) = std::fs::read_to_string(args.data_dir.join(format!("node{id}/keel.pid"))) else { continue };
            let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap_or_default();
            let kib = |field: &str| status.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok());
            if let (Some(hwm), Some(rss)) = (kib("VmHWM:"), kib("VmRSS:")) {
                println!("node {id}: peak RSS {:.1} MiB, RSS now {:.1} MiB", hwm as f64 / 1024.0, rss as f64 / 1024.0);
                nodes.insert(id.to_string(), serde_json::json!({"peak_rss_mib": hwm as f64 / 1024.0, "rss_mib": rss as f64 / 1024.0}));
            }
        }
        summary["rss"] = serde_json::Value::Object(nodes);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)?;
    }
    println!("{summary}");
    Ok(())
}

/// Clock ticks per second of /proc's utime and stime (USER_HZ).
fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// utime + stime in clock ticks of `pid` (fields 14 and 15 of /proc/PID/stat, counted
/// after the command name, which may hold spaces).
fn process_cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// CPU ticks at one instant: per `keel dev` node (by id) and the bench's own (as node
/// 0), and the whole machine's from /proc/stat.
struct CpuTicks {
    processes: Vec<(u64, u64)>,
    /// (ticks stolen by the hypervisor, all ticks) summed over the CPUs.
    machine: Option<(u64, u64)>,
}

/// The first line of /proc/stat: (steal, total) ticks over all CPUs.
fn machine_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal (guest time is within user).
    let total = fields.iter().take(8).sum();
    Some((*fields.get(7)?, total))
}

fn node_cpu_ticks(data_dir: &std::path::Path) -> CpuTicks {
    CpuTicks { processes: process_ticks(data_dir), machine: machine_cpu_ticks() }
}

/// Per `keel dev` node (by id), its CPU ticks now; and the bench's own, as node 0.
fn process_ticks(data_dir: &std::path::Path) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for id in 1..=9u64 {
        let Ok(pid) = std::fs::read_to_string(data_dir.join(format!("node{id}/keel.pid"))) else { continue };
        if let Some(t) = process_cpu_ticks(pid.trim()) {
            out.push((id, t));
        }
    }
    if let Some(t) = process_cpu_ticks("self") {
        out.push((0, t));
    }
    out
}

/// The nodes' CPU over the produce phase, in µs per acknowledged message (all nodes
/// summed), and each node's share of a core; and the share of the machine's CPU time
/// the hypervisor stole meanwhile (a disturbed run on a shared host shows here).
fn cpu_report(before: &CpuTicks, after: &CpuTicks, acked: u64, elapsed: Duration) -> serde_json::Value {
    let steal_pct = match (before.machine, after.machine) {
        (Some((s0, t0)), Some((s1, t1))) if t1 > t0 => Some(s1.saturating_sub(s0) as f64 * 100.0 / (t1 - t0) as f64),
        _ => None,
    };
    let (before, after) = (&before.processes, &after.processes);
    let hz = clock_ticks_per_s();
    let spent = |id: u64| -> Option<f64> {
        let b = before.iter().find(|(i, _)| *i == id)?.1;
        let a = after.iter().find(|(i, _)| *i == id)?.1;
        Some(a.saturating_sub(b) as f64 / hz)
    };
    let mut nodes = serde_json::Map::new();
    let mut total = 0.0;
    for (id, _) in after.iter().filter(|(id, _)| *id != 0) {
        if let Some(s) = spent(*id) {
            total += s;
            nodes.insert(id.to_string(), serde_json::json!({"cpu_seconds": s, "cores": s / elapsed.as_secs_f64()}));
        }
    }
    let per_msg_us = total * 1e6 / acked.max(1) as f64;
    let bench = spent(0).unwrap_or(0.0);
    println!(
        "cpu: nodes {total:.2} s over {:.1} s = {per_msg_us:.2} µs per acknowledged message ({}); load generator {bench:.2} s = {:.2} µs per message; stolen by the hypervisor {}",
        elapsed.as_secs_f64(),
        nodes.iter().map(|(id, v)| format!("node {id} {:.2} cores", v["cores"].as_f64().unwrap_or(0.0))).collect::<Vec<_>>().join(", "),
        bench * 1e6 / acked.max(1) as f64,
        steal_pct.map_or("unknown".to_string(), |p| format!("{p:.1} % of the machine's CPU time"))
    );
    serde_json::json!({"node_seconds": total, "us_per_message": per_msg_us, "nodes": nodes, "bench_seconds": bench, "bench_us_per_message": bench * 1e6 / acked.max(1) as f64, "steal_pct": steal_pct})
}

/// The priority phase: a fresh queue group of `--queue-members` drains the topic's
/// lane-0 backlog, acking everything; meanwhile lane-9 messages are published one at a
/// time and the time from `send` to the member's `poll` returning each is recorded.
/// Then a burst of lane-9 messages makes both lanes busy, and the lanes' shares of the
/// next deliveries are counted.
async fn priority_trials(cluster: &Cluster, args: &Args) -> anyhow::Result<serde_json::Value> {
    use keel_client::queue::{QueueConfig, QueueConsumer};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let group = format!("prio-{}", now_ms());
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    // Deliveries per lane, counted only while `counting`.
    let counting = Arc::new(AtomicBool::new(false));
    let lane_counts: Arc<[AtomicU64; 10]> = Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut members = tokio::task::JoinSet::new();
    for i in 0..args.queue_members.max(1) {
        let config = QueueConfig { member: Some(format!("prio-{i}")), max_in_flight: args.queue_in_flight, ..QueueConfig::default() };
        let mut consumer = QueueConsumer::new(cluster.clone(), &args.topic, &group, config).await?;
        let (sent, latencies, counting, lane_counts, delivered, stop) =
            (sent.clone(), latencies.clone(), counting.clone(), lane_counts.clone(), delivered.clone(), stop.clone());
        members.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let batch = consumer.poll(Duration::from_millis(100)).await?;
                let now = Instant::now();
                for d in &batch {
                    if d.message.priority == 9 {
                        let key = d.message.value.as_deref().map(|v| String::from_utf8_lossy(v).to_string()).unwrap_or_default();
                        if let Some(at) = sent.lock().expect("sent lock").remove(&key) {
                            latencies.lock().expect("latencies lock").push(now.duration_since(at).as_secs_f64() * 1000.0);
                        }
                    }
                    if counting.load(Ordering::Relaxed) {
                        lane_counts[usize::from(d.message.priority).min(9)].fetch_add(1, Ordering::Relaxed);
                    }
                }
                delivered.fetch_add(batch.len() as u64, Ordering::Relaxed);
                for o in futures::future::join_all(batch.iter().map(|d| d.ack())).await {
                    o?;
                }
            }
            consumer.close().await;
            anyhow::Ok(())
        });
    }
    // Let the members get going on the backlog first.
    while delivered.load(Ordering::Relaxed) < 10_000 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let producer = Producer::new(cluster.clone(), ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() })?;
    let started = Instant::now();
    for i in 0..args.priority_trials {
        let key = format!("trial-{i}");
        sent.lock().expect("sent lock").insert(key.clone(), Instant::now());
        let ack = producer.send(&args.topic, Record::new(key).with_priority(9)).await?;
        tokio::spawn(async move { ack.wait().await });
        tokio::time::sleep(args.priority_interval).await;
    }
    producer.flush().await?;
    // Wait for the last trials to arrive (at most 10 s).
    let wait = Instant::now() + Duration::from_secs(10);
    while !sent.lock().expect("sent lock").is_empty() && Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let trials_secs = started.elapsed().as_secs_f64();
    let missing = sent.lock().expect("sent lock").len();
    let mut lat = latencies.lock().expect("latencies lock").clone();
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(f64::NAN);
    let backlog_delivered = delivered.load(Ordering::Relaxed);
    let backlog_left = args.messages.unwrap_or(0).saturating_sub(backlog_delivered.saturating_sub(lat.len() as u64));
    println!(
        "priority: {} lane-9 trials over {trials_secs:.1} s behind the lane-0 backlog ({backlog_delivered} delivered meanwhile, about {backlog_left} still queued): publish-to-delivery ms p50 {:.2} p99 {:.2} max {:.2}; {missing} not delivered within 10 s",
        lat.len(),
        pct(0.5),
        pct(0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    // Both lanes busy: a burst of lane-9 messages, then count the lanes' deliveries.
    let burst = 50_000u64;
    for i in 0..burst {
        let ack = producer.send(&args.topic, Record::new(format!("busy-{i}")).with_priority(9)).await?;
        drop(ack);
    }
    producer.flush().await?;
    counting.store(true, Ordering::Relaxed);
    let window = Instant::now();
    while lane_counts[9].load(Ordering::Relaxed) < burst / 2 && window.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    counting.store(false, Ordering::Relaxed);
    let (lane0, lane9) = (lane_counts[0].load(Ordering::Relaxed), lane_counts[9].load(Ordering::Relaxed));
    let share0 = lane0 as f64 / (lane0 + lane9).max(1) as f64;
    println!(
        "priority: while both lanes were busy, lane 9 got {lane9} and lane 0 {lane0} deliveries: lane 0's share {:.1} % (weights 10 : 1 → {:.1} %)",
        share0 * 100.0,
        100.0 / 11.0
    );
    stop.store(true, Ordering::Relaxed);
    while let Some(joined) = members.join_next().await {
        joined.context("a queue member task failed")??;
    }
    producer.close().await;
    Ok(serde_json::json!({
        "trials": lat.len(), "missing": missing, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": lat.last().copied(),
        "backlog_delivered_during_trials": backlog_delivered, "backlog_left_after_trials": backlog_left, "busy_lane9": lane9, "busy_lane0": lane0, "lane0_share": share0,
    }))
}

/// The queue-group consume phase: `--queue-members` members of a fresh group, each
/// acking every message it gets, until the group is idle for 3 s (or 120 s pass).
/// Returns messages acked, seconds from the first delivery to the last ack, and
/// deliveries after the first attempt.
async fn queue_consume(cluster: &Cluster, args: &Args) -> anyhow::Result<(u64, f64, u64)> {
    use keel_client::queue::{QueueConfig, QueueConsumer};
    use std::sync::atomic::{AtomicU64, Ordering};
    let group = format!("bench-{}", now_ms());
    let acked = Arc::new(AtomicU64::new(0));
    let redelivered = Arc::new(AtomicU64::new(0));
    let first = Arc::new(Mutex::new(None::<Instant>));
    let last = Arc::new(Mutex::new(Instant::now()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.queue_members {
        let config = QueueConfig { member: Some(format!("bench-{i}")), max_in_flight: args.queue_in_flight, ..QueueConfig::default() };
        let mut consumer = QueueConsumer::new(cluster.clone(), &args.topic, &group, config).await?;
        let (acked, redelivered, first, last) = (acked.clone(), redelivered.clone(), first.clone(), last.clone());
        tasks.spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut idle_since = Instant::now();
            while idle_since.elapsed() < Duration::from_secs(3) && Instant::now() < deadline {
                let batch = consumer.poll(Duration::from_millis(500)).await?;
                if batch.is_empty() {
                    continue;
                }
                first.lock().expect("first lock").get_or_insert_with(Instant::now);
                idle_since = Instant::now();
                let outcomes = futures::future::join_all(batch.iter().map(|d| d.ack())).await;
                for (d, o) in batch.iter().zip(outcomes) {
                    if matches!(o?, keel_protocol::message::SettleOutcome::Acked) {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    if d.attempt > 1 {
                        redelivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                *last.lock().expect("last lock") = Instant::now();
            }
            consumer.close().await;
            anyhow::Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a queue member task failed")??;
    }
    let first = first.lock().expect("first lock").unwrap_or_else(Instant::now);
    let secs = last.lock().expect("last lock").saturating_duration_since(first).as_secs_f64().max(1e-3);
    Ok((acked.load(Ordering::Relaxed), secs, redelivered.load(Ordering::Relaxed)))
}
