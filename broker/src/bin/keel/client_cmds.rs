//! The client-side commands: `keel topic …`, `keel produce`, `keel consume`. They use the
//! Rust client library, like any application would.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, Context};
use keel_client::consumer::{Consumer, StartAt};
use keel_client::producer::{Producer, ProducerConfig, Record};
use keel_client::{Admin, ClientConfig, Cluster};
use keel_protocol::message::CreateTopicRequest;
use keel_protocol::{TopicConfig, TopicConfigPatch};

/// Where the CLI finds the cluster.
#[derive(clap::Args, Clone)]
pub struct Connect {
    /// Broker client addresses, host:port[,host:port…]. Defaults to the `keel dev` cluster.
    #[arg(long, global = true, env = "KEEL_BOOTSTRAP", default_value = "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094")]
    bootstrap: String,
    /// Print data as JSON (one object per line for streams).
    #[arg(long, global = true)]
    pub json: bool,
}

impl Connect {
    pub fn cluster(&self) -> anyhow::Result<Cluster> {
        Ok(Cluster::new(ClientConfig::with_bootstrap(&self.bootstrap))?)
    }
}

/// Topic settings a command may set (`TopicConfig`); each omitted one keeps its
/// default (create) or current value (alter).
#[derive(clap::Args, Debug, Default)]
pub struct TopicSettings {
    /// Keep messages this long (e.g. 7d, 12h); 0s keeps them forever.
    #[arg(long, value_parser = humantime::parse_duration)]
    retention: Option<Duration>,
    /// Keep at most this many bytes per partition (e.g. 10GiB, 500MB); 0 keeps everything.
    #[arg(long, value_parser = parse_size)]
    retention_bytes: Option<u64>,
    /// Close a partition's segment file at this size (64KiB..=1GiB); retention deletes whole segments.
    #[arg(long, value_parser = parse_size)]
    segment_bytes: Option<u64>,
    /// Largest batch (and message) a producer may send, in bytes.
    #[arg(long)]
    max_message_bytes: Option<u32>,
    /// How long a message id is remembered (e.g. 2m, 1h; at most 24h).
    #[arg(long, value_parser = humantime::parse_duration)]
    dedupe_window: Option<Duration>,
    /// Most message ids one partition remembers; beyond, publishes with ids are throttled.
    #[arg(long)]
    dedupe_ids_max: Option<u64>,
    /// Forget an idempotent producer this long after its last write (e.g. 1d).
    #[arg(long, value_parser = humantime::parse_duration)]
    producer_expiry: Option<Duration>,
    /// Deliveries of a message to a queue group before it is dead-lettered (1..=100).
    #[arg(long)]
    max_deliveries: Option<u32>,
    /// Priority lanes (1..=10): producers may send with `--priority 0..N`; queue groups
    /// deliver higher lanes first, by weight.
    #[arg(long)]
    priorities: Option<u32>,
    /// Lane L's delivery weight is 1 + STEP × L (0: every lane equal).
    #[arg(long)]
    priority_weight_step: Option<u32>,
}

impl TopicSettings {
    fn patch(&self) -> TopicConfigPatch {
        let ms = |d: &Option<Duration>| d.map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64);
        TopicConfigPatch {
            retention_ms: ms(&self.retention),
            retention_bytes: self.retention_bytes,
            segment_bytes: self.segment_bytes,
            max_message_bytes: self.max_message_bytes,
            dedupe_window_ms: ms(&self.dedupe_window),
            dedupe_ids_max: self.dedupe_ids_max,
            producer_expiry_ms: ms(&self.producer_expiry),
            max_deliveries: self.max_deliveries,
            priorities: self.priorities,
            priority_weight_step: self.priority_weight_step,
        }
    }
}

#[derive(clap::Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, default_value_t = 3)]
        partitions: u32,
        #[arg(long, default_value_t = 3)]
        replicas: u16,
        #[command(flatten)]
        settings: TopicSettings,
    },
    /// Change some of a topic's settings; prints the whole config after the change.
    Alter {
        name: String,
        #[command(flatten)]
        settings: TopicSettings,
    },
    /// List topics.
    List,
    /// Show a topic's settings, partitions, replicas and leaders.
    Describe { name: String },
    /// Delete a topic and its data.
    Delete { name: String },
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the async runtime")
}

/// A duration in milliseconds, for people.
fn human_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

/// A byte count for people: the largest binary unit that divides it, else bytes.
fn human_bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} B")
}

/// Parses a size: a whole number with an optional unit, binary (KiB, MiB, GiB, TiB)
/// or decimal (KB, MB, GB, TB), or B.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size: expected a whole number with an optional unit, e.g. 10MiB"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => return Err(format!("unknown size unit {other:?} in {text:?}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB")),
    };
    n.checked_mul(factor).ok_or_else(|| format!("{text:?} is too large"))
}

/// A topic config, one setting per line.
fn print_config(config: &TopicConfig) {
    let retention = if config.retention_ms == 0 { "forever".to_string() } else { human_ms(config.retention_ms) };
    println!("  retention          {retention}");
    let retention_bytes = if config.retention_bytes == 0 { "unlimited".to_string() } else { human_bytes(config.retention_bytes) };
    println!("  retention_bytes    {retention_bytes} per partition");
    println!("  segment_bytes      {}", human_bytes(config.segment_bytes));
    println!("  max_message_bytes  {}", config.max_message_bytes);
    println!("  dedupe_window      {}", human_ms(config.dedupe_window_ms));
    println!("  dedupe_ids_max     {}", config.dedupe_ids_max);
    println!("  producer_expiry    {}", human_ms(config.producer_expiry_ms));
    println!("  max_deliveries     {}", config.max_deliveries);
    let weights: Vec<String> = (0..config.priorities).map(|l| config.lane_weight(l as u8).to_string()).collect();
    println!("  priorities         {} (lane weights {})", config.priorities, weights.join(":"));
}

pub fn topic(cmd: TopicCommand, connect: Connect) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let client = connect.cluster()?;
        let admin = Admin::new(client.clone());
        match cmd {
            TopicCommand::Create { name, partitions, replicas, settings } => {
                admin.create_topic_with(CreateTopicRequest { name: name.clone(), partitions, replicas, config: settings.patch() }).await?;
                if connect.json {
                    println!("{}", serde_json::json!({"created": name, "partitions": partitions, "replicas": replicas}));
                } else {
                    println!("created topic {name} ({partitions} partitions, {replicas} replicas)");
                }
            }
            TopicCommand::Alter { name, settings } => {
                let patch = settings.patch();
                if patch.is_empty() {
                    bail!("name at least one setting to change (see `keel topic alter --help`)");
                }
                let config = admin.alter_topic(&name, patch).await?;
                if connect.json {
                    println!("{}", serde_json::json!({"topic": name, "config": config}));
                } else {
                    println!("altered topic {name}; its settings now:");
                    print_config(&config);
                }
            }
            TopicCommand::List => {
                let topics = admin.list_topics().await?;
                for t in &topics {
                    if connect.json {
                        println!("{}", serde_json::json!({"name": t.name, "partitions": t.partitions.len(), "replicas": t.partitions.first().map_or(0, |p| p.replicas.len())}));
                    } else {
                        println!("{}\t{} partitions", t.name, t.partitions.len());
                    }
                }
            }
            TopicCommand::Describe { name } => {
                let t = admin.describe_topic(&name).await?;
                // Each partition's retained range, from its leader (`None` if it does not answer).
                let mut ranges = Vec::with_capacity(t.partitions.len());
                for p in &t.partitions {
                    let start = keel_client::consumer::list_offset(&client, &name, p.partition, i64::MIN).await.ok();
                    let end = keel_client::consumer::list_offset(&client, &name, p.partition, i64::MAX).await.ok();
                    ranges.push((start, end));
                }
                if connect.json {
                    let parts: Vec<_> = t
                        .partitions
                        .iter()
                        .zip(&ranges)
                        .map(|(p, (start, end))| {
                            serde_json::json!({"partition": p.partition, "leader": p.leader, "replicas": p.replicas, "log_start_offset": start, "high_watermark": end})
                        })
                        .collect();
                    println!("{}", serde_json::json!({"name": t.name, "config": t.config, "partitions": parts}));
                } else {
                    println!("topic {}", t.name);
                    print_config(&t.config);
                    for (p, (start, end)) in t.partitions.iter().zip(&ranges) {
                        let leader = p.leader.map_or("none".to_string(), |l| l.to_string());
                        let show = |o: &Option<u64>| o.map_or("?".to_string(), |o| o.to_string());
                        println!("  partition {}  leader {leader}  replicas {:?}  offsets {}..{}", p.partition, p.replicas, show(start), show(end));
                    }
                }
            }
            TopicCommand::Delete { name } => {
                admin.delete_topic(&name).await?;
                println!("deleted topic {name}");
            }
        }
        Ok(())
    })
}

#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// Nodes, liveness, and per partition: leader, term, commit index, replica lag,
    /// under-replicated flag. Over `STATUS_PARTITION_ROWS_MAX` partitions, a summary per
    /// topic and only the partitions without a leader or under-replicated.
    Status {
        /// Only this topic's partitions.
        #[arg(long)]
        topic: Option<String>,
        /// Every partition, however many (the text output summarises large clusters).
        #[arg(long)]
        all: bool,
    },
}

/// Partitions `keel cluster status` lists one per line before it summarises per topic
/// instead (then listing only partitions without a leader or under-replicated, up to
/// this many).
const STATUS_PARTITION_ROWS_MAX: usize = 50;

/// A replica more than this many log entries behind its leader counts as lagging.
const UNDER_REPLICATED_LAG_ENTRIES: u64 = 1000;

pub fn cluster(cmd: ClusterCommand, connect: Connect) -> anyhow::Result<()> {
    let ClusterCommand::Status { topic, all } = cmd;
    runtime()?.block_on(async move {
        let cluster = connect.cluster()?;
        let admin = Admin::new(cluster.clone());
        let reports = admin.cluster_status(Duration::from_secs(2)).await?;
        let metadata = cluster.metadata(false).await?;
        let up: Vec<u64> = reports.iter().filter(|(_, r)| r.is_ok()).map(|(b, _)| b.id).collect();
        // The leader's report of each group, if any live node leads it.
        let leader_view = |group_topic: &str, partition: u32| {
            reports
                .iter()
                .filter_map(|(_, r)| r.as_ref().ok())
                .flat_map(|r| r.groups.iter())
                .find(|g| g.role == "leader" && g.topic.as_deref() == Some(group_topic) && g.partition == Some(partition))
                .cloned()
        };
        if let Some(name) = &topic {
            if !metadata.topics.iter().any(|t| &t.name == name) {
                anyhow::bail!("no topic {name:?} in the cluster's metadata; `keel topic list` shows the topics");
            }
        }
        let mut rows: Vec<StatusRow> = Vec::new();
        for t in metadata.topics.iter().filter(|t| topic.as_ref().is_none_or(|name| &t.name == name)) {
            for p in &t.partitions {
                let view = leader_view(&t.name, p.partition);
                let lags: Vec<(u64, Option<u64>)> = p
                    .replicas
                    .iter()
                    .map(|r| {
                        let lag = view.as_ref().and_then(|v| {
                            if Some(*r) == v.leader {
                                return Some(0);
                            }
                            let matched = v.matched.iter().find(|(id, _)| id == r)?.1?;
                            Some(v.last_log_index.unwrap_or(0).saturating_sub(matched))
                        });
                        (*r, lag.filter(|_| up.contains(r)))
                    })
                    .collect();
                let under = view.is_none() || lags.iter().any(|(_, lag)| lag.is_none_or(|l| l > UNDER_REPLICATED_LAG_ENTRIES));
                rows.push((t.name.clone(), p.partition, view, lags, under));
            }
        }
        if connect.json {
            let nodes: Vec<_> = reports
                .iter()
                .map(|(b, r)| serde_json::json!({"id": b.id, "addr": b.addr, "up": r.is_ok(), "error": r.as_ref().err().map(|e| e.to_string())}))
                .collect();
            let parts: Vec<_> = rows
                .iter()
                .map(|(t, p, v, lags, under)| {
                    serde_json::json!({"topic": t, "partition": p, "leader": v.as_ref().and_then(|v| v.leader), "term": v.as_ref().map(|v| v.term),
                        "commit_index": v.as_ref().and_then(|v| v.committed_index), "high_watermark": v.as_ref().map(|v| v.high_watermark),
                        "replica_lag": lags.iter().map(|(r, l)| serde_json::json!({"replica": r, "lag": l})).collect::<Vec<_>>(), "under_replicated": under})
                })
                .collect();
            let topics: Vec<_> = summarise(&rows)
                .iter()
                .map(|t| {
                    serde_json::json!({"topic": t.topic, "partitions": t.partitions, "no_leader": t.no_leader, "under_replicated": t.under_replicated,
                        "led_by": t.led_by.iter().map(|(n, c)| serde_json::json!({"node": n, "partitions": c})).collect::<Vec<_>>()})
                })
                .collect();
            println!("{}", serde_json::json!({"nodes": nodes, "topics": topics, "partitions": parts}));
            return Ok(());
        }
        println!("NODE  ADDRESS              STATE  GROUPS LED/HOSTED");
        for (b, r) in &reports {
            match r {
                Ok(s) => println!("{:<5} {:<20} up     {}/{}", b.id, b.addr, s.groups.iter().filter(|g| g.role == "leader").count(), s.groups.len()),
                Err(keel_client::ClientError::NoBroker { last, .. }) => {
                    println!("{:<5} {:<20} DOWN   ({})", b.id, b.addr, last.rsplit(": ").next().unwrap_or(last))
                }
                Err(e) => println!("{:<5} {:<20} DOWN   ({e})", b.id, b.addr),
            }
        }
        println!();
        let listed: Vec<_> = if all || rows.len() <= STATUS_PARTITION_ROWS_MAX {
            rows.iter().collect()
        } else {
            println!("TOPIC                 PARTITIONS  NO LEADER  UNDER-REPLICATED  LED BY (node:partitions)");
            for t in summarise(&rows) {
                let led: Vec<String> = t.led_by.iter().map(|(n, c)| format!("{n}:{c}")).collect();
                println!("{:<21} {:<11} {:<10} {:<17} {}", t.topic, t.partitions, t.no_leader, t.under_replicated, led.join(" "));
            }
            let troubled: Vec<_> = rows.iter().filter(|(.., under)| *under).collect();
            println!();
            if troubled.is_empty() {
                println!("every partition has a leader and is fully replicated ({} partitions; --all lists them, --topic T one topic's)", rows.len());
                return Ok(());
            }
            println!(
                "partitions without a leader or under-replicated: {} of {}{}",
                troubled.len(),
                rows.len(),
                if troubled.len() > STATUS_PARTITION_ROWS_MAX {
                    format!(" (the first {STATUS_PARTITION_ROWS_MAX}; --all lists every partition)")
                } else {
                    String::new()
                }
            );
            troubled.into_iter().take(STATUS_PARTITION_ROWS_MAX).collect()
        };
        println!("TOPIC/PARTITION       LEADER  TERM  COMMIT  HW        REPLICA LAG (entries)        UNDER-REPLICATED");
        for (t, p, v, lags, under) in listed {
            let under = *under;
            let lag_text: Vec<String> = lags.iter().map(|(r, l)| format!("{r}:{}", l.map_or("?".to_string(), |l| l.to_string()))).collect();
            let (leader, term, commit, hw) = match &v {
                Some(v) => (
                    v.leader.map_or("-".into(), |l| l.to_string()),
                    v.term.to_string(),
                    v.committed_index.map_or("-".into(), |c| c.to_string()),
                    v.high_watermark.to_string(),
                ),
                None => ("none".into(), "-".into(), "-".into(), "-".into()),
            };
            println!(
                "{:<21} {:<7} {:<5} {:<7} {:<9} {:<28} {}",
                format!("{t}/{p}"),
                leader,
                term,
                commit,
                hw,
                lag_text.join(" "),
                if under { "YES" } else { "no" }
            );
        }
        Ok(())
    })
}

/// One partition in `keel cluster status`: topic, partition, its leader's report (if a
/// live node leads it), each replica's lag, under-replicated.
type StatusRow = (String, u32, Option<keel_protocol::message::GroupStatus>, Vec<(u64, Option<u64>)>, bool);

/// One topic's line of the `keel cluster status` summary.
struct TopicSummary {
    topic: String,
    partitions: usize,
    no_leader: usize,
    under_replicated: usize,
    /// Partitions led, per node, in node order.
    led_by: Vec<(u64, usize)>,
}

/// Per topic, in the order the rows list them: partition count, partitions without a
/// leader, under-replicated ones, and leaders per node.
fn summarise(rows: &[StatusRow]) -> Vec<TopicSummary> {
    let mut out: Vec<TopicSummary> = Vec::new();
    for (topic, _, view, _, under) in rows {
        if out.last().is_none_or(|t| &t.topic != topic) {
            out.push(TopicSummary { topic: topic.clone(), partitions: 0, no_leader: 0, under_replicated: 0, led_by: Vec::new() });
        }
        let t = out.last_mut().expect("pushed above");
        t.partitions += 1;
        t.under_replicated += usize::from(*under);
        match view.as_ref().and_then(|v| v.leader) {
            None => t.no_leader += 1,
            Some(l) => match t.led_by.iter_mut().find(|(n, _)| *n == l) {
                Some((_, c)) => *c += 1,
                None => {
                    t.led_by.push((l, 1));
                    t.led_by.sort_unstable();
                }
            },
        }
    }
    out
}

#[derive(clap::Args)]
pub struct ProduceArgs {
    topic: String,
    /// Message key (same key, same partition, in order).
    #[arg(long)]
    key: Option<String>,
    /// A header, name=value; repeatable.
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// The message. Without it, every line of standard input is one message.
    message: Option<String>,
    /// Give up on a message not acknowledged within this long (e.g. 5s); the command
    /// then fails, saying how many were acknowledged.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    timeout: std::time::Duration,
    /// The message's id: within the topic's dedupe window, a message with an id already
    /// stored (in its partition: give the same key) is not stored again. Only with a
    /// MESSAGE argument.
    #[arg(long, requires = "message")]
    message_id: Option<String>,
    /// Register as this stable producer name: a newer `keel produce` with the same name
    /// fences this one.
    #[arg(long)]
    producer_name: Option<String>,
    /// Send without idempotence (a retried batch may then be stored twice).
    #[arg(long, conflicts_with = "producer_name")]
    no_idempotence: bool,
    /// Priority lane (0 up to the topic's `priorities` − 1): queue groups deliver higher
    /// lanes first.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..10))]
    priority: u8,
    /// Deliver to queue groups not before this RFC 3339 time (at most 7 days ahead).
    #[arg(long, conflicts_with = "delay")]
    deliver_at: Option<String>,
    /// Deliver to queue groups not before this long from now (e.g. 30s, 2h).
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("header {s:?} is not name=value"))
}

pub fn produce(args: ProduceArgs, connect: Connect) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let cluster = connect.cluster()?;
        cluster.partitions(&args.topic).await?;
        let config =
            ProducerConfig { delivery_timeout: args.timeout, idempotence: !args.no_idempotence, name: args.producer_name.clone(), ..ProducerConfig::default() };
        let producer = Producer::new(cluster, config)?;
        let deliver_at = match (&args.deliver_at, args.delay) {
            (Some(t), _) => Some(humantime::parse_rfc3339_weak(t).with_context(|| format!("--deliver-at {t:?} is not an RFC 3339 time"))?),
            (None, Some(d)) => Some(std::time::SystemTime::now() + d),
            (None, None) => None,
        };
        let make = |value: String| {
            let mut r = Record::new(value).with_priority(args.priority);
            if let Some(at) = deliver_at {
                r = r.deliver_at(at);
            }
            if let Some(id) = &args.message_id {
                r = r.with_message_id(id.clone());
            }
            if let Some(k) = &args.key {
                r = r.with_key(k.clone());
            }
            for (name, v) in &args.headers {
                r = r.with_header(name.clone(), v.clone());
            }
            r
        };
        // Acknowledgements are awaited as they come, so memory stays bounded by the
        // producer's queue and in-flight window, not by the input size.
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::channel::<keel_client::producer::DeliveryFuture>(64 * 1024);
        let waiter = tokio::spawn(async move {
            let (mut ok, mut duplicates, mut last, mut first_error) = (0u64, 0u64, None, None);
            while let Some(ack) = ack_rx.recv().await {
                match ack.wait().await {
                    Ok(d) => {
                        ok += 1;
                        duplicates += u64::from(d.duplicate);
                        last = Some(d);
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            (ok, duplicates, last, first_error)
        });
        let mut sent = 0u64;
        match &args.message {
            Some(m) => {
                ack_tx.send(producer.send(&args.topic, make(m.clone())).await?).await.ok();
                sent += 1;
            }
            None => {
                let (line_tx, mut line_rx) = tokio::sync::mpsc::channel::<String>(1024);
                std::thread::spawn(move || {
                    for line in std::io::stdin().lock().lines() {
                        let Ok(line) = line else { break };
                        if line_tx.blocking_send(line).is_err() {
                            break;
                        }
                    }
                });
                while let Some(line) = line_rx.recv().await {
                    ack_tx.send(producer.send(&args.topic, make(line)).await?).await.ok();
                    sent += 1;
                }
            }
        }
        producer.flush().await?;
        drop(ack_tx);
        let (ok, duplicates, last, first_error) = waiter.await?;
        producer.close().await;
        if let Some(e) = first_error {
            bail!("{ok} of {sent} messages acknowledged; the first failure: {e}");
        }
        match (sent, last) {
            // One message: say where it is.
            (1, Some(d)) => {
                if connect.json {
                    println!("{}", serde_json::json!({"acknowledged": 1, "partition": d.partition, "offset": d.offset, "duplicate": d.duplicate}));
                } else if d.duplicate {
                    println!("1 message acknowledged: already stored at partition {} offset {} (not stored again)", d.partition, d.offset);
                } else {
                    println!("1 message acknowledged: partition {} offset {}", d.partition, d.offset);
                }
            }
            _ => {
                if connect.json {
                    println!("{}", serde_json::json!({"acknowledged": ok, "duplicates": duplicates}));
                } else if duplicates > 0 {
                    println!("{ok} messages acknowledged ({duplicates} had been stored before and were not stored again)");
                } else {
                    println!("{ok} messages acknowledged");
                }
            }
        }
        Ok(())
    })
}

/// `keel consume`: read a topic, alone (stream, from `--from`) or as a member of a
/// consumer group (`--group`: stream mode commits its offsets; queue mode leases).
#[derive(clap::Args)]
pub struct ConsumeArgs {
    pub topic: String,
    /// earliest, latest, an offset, or an RFC 3339 time (2026-11-01T00:00:00Z). With
    /// `--group`: where the group starts in partitions it has never consumed.
    #[arg(long, default_value = "earliest")]
    from: String,
    /// Stop after this many messages.
    #[arg(long)]
    pub max: Option<u64>,
    /// Stop after this long without a new message (e.g. 5s); wait forever if omitted.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// value: the message value per line; json: an object per line.
    #[arg(long, value_enum, default_value = "value")]
    pub format: ConsumeFormat,
    /// Skip stored batches that do not decode (each is reported on stderr) instead of
    /// stopping at the first. Their messages are lost to this reader.
    #[arg(long)]
    pub skip_undecodable: bool,
    /// Consume as a member of this consumer group.
    #[arg(long)]
    pub group: Option<String>,
    /// stream: ordered per partition, the group's offsets committed on exit (what was
    /// printed), so the next run continues where this one stopped. queue: messages are
    /// leased to this member and acked (or nacked, termed) one by one.
    #[arg(long, value_enum, default_value = "stream", requires = "group")]
    pub mode: ConsumeMode,
    /// Stream mode: the coordinator gives this member's partitions to the others after
    /// this long without a heartbeat (e.g. 10s).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub session_timeout: Duration,
    /// Queue mode: this member's name in the group (default: made up per process).
    #[arg(long, requires = "group")]
    pub member: Option<String>,
    /// Queue mode: unsettled messages this member holds at most (its credit).
    #[arg(long, default_value_t = 1_000)]
    pub max_in_flight: u32,
    /// Queue mode drill: nack every message (it is retried after the group's backoff,
    /// then dead-lettered after max deliveries) with `--reason`.
    #[arg(long, conflicts_with_all = ["term_all", "exec"], requires = "reason")]
    pub nack_all: bool,
    /// Queue mode drill: term every message (dead-lettered at once) with `--reason`.
    #[arg(long, conflicts_with = "exec", requires = "reason")]
    pub term_all: bool,
    /// The reason given with --nack-all / --term-all.
    #[arg(long)]
    pub reason: Option<String>,
    /// Queue mode: run this shell command per message with its value on stdin; exit 0
    /// acks it, anything else nacks it with the command's stderr as the reason.
    #[arg(long)]
    pub exec: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ConsumeFormat {
    Value,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsumeMode {
    Stream,
    Queue,
}

fn parse_start(s: &str) -> anyhow::Result<StartAt> {
    Ok(match s {
        "earliest" => StartAt::Earliest,
        "latest" => StartAt::Latest,
        _ => match s.parse::<u64>() {
            Ok(o) => StartAt::Offset(o),
            Err(_) => {
                let t = humantime::parse_rfc3339_weak(s).with_context(|| format!("--from {s:?} is not earliest, latest, an offset or an RFC 3339 time"))?;
                StartAt::Time(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64))
            }
        },
    })
}

pub fn consume(args: ConsumeArgs, connect: Connect) -> anyhow::Result<()> {
    let start = parse_start(&args.from)?;
    let json = connect.json || matches!(args.format, ConsumeFormat::Json);
    if args.group.is_none() && (args.nack_all || args.term_all || args.exec.is_some()) {
        bail!("--nack-all, --term-all and --exec settle queue-group deliveries: add --group G --mode queue");
    }
    if args.mode == ConsumeMode::Queue {
        return runtime()?.block_on(crate::consume::queue(args, connect, start, json));
    }
    if args.nack_all || args.term_all || args.exec.is_some() {
        bail!("--nack-all, --term-all and --exec need --mode queue (a stream group commits offsets, it does not settle messages)");
    }
    if args.group.is_some() {
        return runtime()?.block_on(crate::consume::stream_group(args, connect, start, json));
    }
    runtime()?.block_on(async move {
        let mut consumer = Consumer::new(connect.cluster()?, &args.topic, start).await?;
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let mut count = 0u64;
        let mut last_message = Instant::now();
        'outer: loop {
            let messages = match consumer.poll(Duration::from_millis(500)).await {
                Ok(m) => m,
                Err(keel_client::ClientError::UndecodableBatch { partition, offset, next_offset, reason, .. }) if args.skip_undecodable => {
                    eprintln!("skipping {}/{partition} offsets {offset}..{next_offset}: the stored batch does not decode ({reason})", args.topic);
                    consumer.skip_to(partition, next_offset)?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            crate::consume::report_retention_skips(&args.topic, consumer.take_retention_skips());
            if messages.is_empty() {
                if args.idle_timeout.is_some_and(|t| last_message.elapsed() >= t) {
                    break;
                }
                out.flush()?;
                continue;
            }
            last_message = Instant::now();
            for m in messages {
                print_message(&mut out, &m, json, serde_json::Map::new())?;
                count += 1;
                if args.max.is_some_and(|max| count >= max) {
                    break 'outer;
                }
            }
        }
        out.flush()?;
        Ok(())
    })
}

/// Prints one message: its value, or (json) an object with its position, key, headers
/// and the `extra` fields.
pub fn print_message(
    out: &mut impl Write,
    m: &keel_client::consumer::Message,
    json: bool,
    extra: serde_json::Map<String, serde_json::Value>,
) -> std::io::Result<()> {
    let value = m.value.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
    if !json {
        return writeln!(out, "{value}");
    }
    let headers: serde_json::Map<String, serde_json::Value> =
        m.headers.iter().map(|(k, v)| (k.clone(), v.as_deref().map(String::from_utf8_lossy).map_or(serde_json::Value::Null, |s| s.into()))).collect();
    let mut line = serde_json::json!({"partition": m.partition, "offset": m.offset, "timestamp_ms": m.timestamp_ms,
        "key": m.key.as_deref().map(String::from_utf8_lossy), "value": value, "headers": headers, "priority": m.priority});
    if let Some(obj) = line.as_object_mut() {
        obj.extend(extra);
    }
    writeln!(out, "{line}")
}
