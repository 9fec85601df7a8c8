//! `keel group …` (list, describe, config, reset) and `keel dlq …` (inspect, show).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context};
use keel_client::consumer::{list_offset, Consumer, Message, StartAt};
use keel_client::{Admin, Cluster};
use keel_protocol::message::GroupStateResponse;
use keel_protocol::{GroupConfig, GroupConfigPatch};

use keel_broker::node::dead_letters::{dead_letter_topic, FAILURE_HEADER};

use crate::client_cmds::{runtime, Connect};

/// Sample offsets shown per reason by `keel dlq inspect`.
const SAMPLES_PER_REASON: usize = 5;

#[derive(clap::Subcommand)]
pub enum GroupCommand {
    /// Consumer groups that consumed any topic, with their mode and topics.
    List,
    /// A group in every topic it consumed: per partition, its position, the high
    /// watermark and its lag; for queue groups also leased, waiting and dead-lettering
    /// messages and the members holding leases.
    Describe { group: String },
    /// Show a group's settings, or change some of them.
    Config {
        group: String,
        #[command(flatten)]
        settings: GroupSettings,
    },
    /// Set a stream group's committed offsets in a topic. Refused while the group has
    /// live members (their next commit would overwrite the reset): stop them first;
    /// they read the new offsets when they next start.
    Reset {
        group: String,
        /// Reset even though members are live.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        topic: String,
        /// Only this partition (default: every partition).
        #[arg(long)]
        partition: Option<u32>,
        #[arg(long, group = "to", required = true)]
        to_offset: Option<u64>,
        /// An RFC 3339 time: the first offset at or after it.
        #[arg(long, group = "to")]
        to_time: Option<String>,
        #[arg(long, group = "to")]
        to_earliest: bool,
        #[arg(long, group = "to")]
        to_latest: bool,
    },
}

/// Group settings a command may set (`GroupConfig`).
#[derive(clap::Args, Debug, Default)]
pub struct GroupSettings {
    /// How long a member holds a leased message before it is delivered again (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    lease_timeout: Option<Duration>,
    /// First retry delay bound after a nack (e.g. 1s); grows by --retry-multiplier.
    #[arg(long, value_parser = humantime::parse_duration)]
    retry_base: Option<Duration>,
    /// Growth of the retry delay bound per attempt.
    #[arg(long)]
    retry_multiplier: Option<u32>,
    /// Longest retry delay (e.g. 10m).
    #[arg(long, value_parser = humantime::parse_duration)]
    retry_max: Option<Duration>,
    /// Leased, unsettled messages one member may hold per partition.
    #[arg(long)]
    max_unacked: Option<u32>,
    /// Ordered by key: at most one message per key out at a time; a key whose message
    /// keeps failing is parked while other keys flow.
    #[arg(long)]
    ordered: Option<bool>,
}

impl GroupSettings {
    fn patch(&self) -> GroupConfigPatch {
        let ms = |d: &Option<Duration>| d.map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64);
        GroupConfigPatch {
            lease_timeout_ms: ms(&self.lease_timeout),
            retry_base_ms: ms(&self.retry_base),
            retry_multiplier: self.retry_multiplier,
            retry_max_ms: ms(&self.retry_max),
            max_unacked: self.max_unacked,
            ordered: self.ordered.map(u32::from),
        }
    }
}

#[derive(clap::Subcommand)]
pub enum DlqCommand {
    /// Dead letters of a topic, grouped by failure reason: count, oldest age and sample
    /// offsets (of the dead-letter topic, for `keel dlq show`).
    Inspect {
        topic: String,
        /// Only this group's dead letters.
        #[arg(long)]
        group: Option<String>,
    },
    /// One dead letter: the message and its whole failure record.
    Show {
        topic: String,
        /// Its offset in the dead-letter topic (see `keel dlq inspect`).
        #[arg(long)]
        offset: u64,
    },
    /// Send dead letters back to their topic (or --to another), as a job: each becomes
    /// a new message (delivery attempts start again at 1) carrying `keel-redrive-count`;
    /// one redriven --max-redrives times already goes to `<topic>.quarantine` instead.
    /// Each dead letter is redriven once: later redrives leave out what earlier ones
    /// moved. --dry-run lists what would move.
    Redrive(super::job_cmds::RedriveArgs),
}

/// A duration for people: whole seconds from a second up, milliseconds below.
fn human_ms(ms: u64) -> String {
    let ms = if ms >= 1_000 { ms / 1_000 * 1_000 } else { ms };
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn print_group_config(c: &GroupConfig) {
    println!("  lease_timeout     {}", human_ms(c.lease_timeout_ms));
    println!("  retry_base        {}", human_ms(c.retry_base_ms));
    println!("  retry_multiplier  {}", c.retry_multiplier);
    println!("  retry_max         {}", human_ms(c.retry_max_ms));
    println!("  max_unacked       {}", c.max_unacked);
    println!("  ordered           {}", if c.ordered == 1 { "by key" } else { "no" });
}

/// Every topic's group states (`group`, or all), skipping topics whose partitions do
/// not answer right now (reported on stderr).
async fn states(admin: &Admin, group: Option<&str>) -> anyhow::Result<Vec<(String, Vec<(u32, GroupStateResponse)>)>> {
    let mut out = Vec::new();
    for t in admin.list_topics().await? {
        match admin.group_state(&t.name, group).await {
            Ok(s) => out.push((t.name.clone(), s)),
            Err(e) => eprintln!("warning: {}: {e}", t.name),
        }
    }
    Ok(out)
}

pub fn group(cmd: GroupCommand, connect: Connect) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let admin = Admin::new(connect.cluster()?);
        match cmd {
            GroupCommand::List => {
                let mut groups: BTreeMap<String, (BTreeSet<&'static str>, BTreeSet<String>)> = BTreeMap::new();
                for (topic, parts) in states(&admin, None).await? {
                    for (_, s) in parts {
                        for g in s.streams {
                            let e = groups.entry(g.group).or_default();
                            e.0.insert("stream");
                            e.1.insert(topic.clone());
                        }
                        for g in s.queues {
                            let e = groups.entry(g.group).or_default();
                            e.0.insert("queue");
                            e.1.insert(topic.clone());
                        }
                    }
                }
                for (g, (modes, topics)) in &groups {
                    let modes: Vec<&str> = modes.iter().copied().collect();
                    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
                    if connect.json {
                        println!("{}", serde_json::json!({"group": g, "modes": modes, "topics": topics}));
                    } else {
                        println!("{g}\t{}\t{}", modes.join(","), topics.join(","));
                    }
                }
                if groups.is_empty() && !connect.json {
                    eprintln!("no consumer group has consumed any topic yet");
                }
            }
            GroupCommand::Describe { group } => describe(&admin, &group, connect.json).await?,
            GroupCommand::Config { group, settings } => {
                let config = admin.configure_group(&group, settings.patch()).await?;
                if connect.json {
                    println!("{}", serde_json::json!({"group": group, "config": config}));
                } else {
                    println!("group {group}:");
                    print_group_config(&config);
                }
            }
            GroupCommand::Reset { group, force, topic, partition, to_offset, to_time, to_earliest, to_latest } => {
                let cluster = admin.cluster().clone();
                let live = admin.describe_members(&group).await.with_context(|| format!("asking the coordinator whether {group} has live members"))?;
                if !live.members.is_empty() && !force {
                    let names: Vec<&str> = live.members.iter().map(|(m, ..)| m.as_str()).collect();
                    bail!(
                        "group {group} has {} live member(s) ({}): their next commit would overwrite the reset. Stop them first, or pass --force",
                        names.len(),
                        names.join(", ")
                    );
                }
                let partitions: Vec<u32> = match partition {
                    Some(p) => vec![p],
                    None => (0..cluster.partitions(&topic).await?).collect(),
                };
                let time = to_time
                    .as_deref()
                    .map(|t| {
                        humantime::parse_rfc3339_weak(t)
                            .with_context(|| format!("--to-time {t:?} is not an RFC 3339 time"))
                            .map(|t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64))
                    })
                    .transpose()?;
                for p in partitions {
                    let offset = match (to_offset, time, to_earliest, to_latest) {
                        (Some(o), ..) => o,
                        (None, Some(ts), ..) => list_offset(&cluster, &topic, p, ts).await?,
                        (None, None, true, _) => 0,
                        (None, None, false, true) => list_offset(&cluster, &topic, p, i64::MAX).await?,
                        _ => bail!("name where to reset to: --to-offset, --to-time, --to-earliest or --to-latest"),
                    };
                    admin.reset_offset(&group, &topic, p, offset).await.with_context(|| format!("resetting {group} in {topic}/{p}"))?;
                    if connect.json {
                        println!("{}", serde_json::json!({"group": group, "topic": topic, "partition": p, "offset": offset}));
                    } else {
                        println!("{group} in {topic}/{p}: next offset {offset}");
                    }
                }
            }
        }
        Ok(())
    })
}

async fn describe(admin: &Admin, group: &str, json: bool) -> anyhow::Result<()> {
    let mut found = false;
    let now = now_ms();
    match admin.describe_members(group).await {
        Ok(m) if !m.members.is_empty() => {
            found = true;
            for (member, since_ms, assignment) in &m.members {
                let parts: Vec<String> =
                    assignment.iter().map(|(t, ps)| format!("{t}:{}", ps.iter().map(u32::to_string).collect::<Vec<_>>().join(","))).collect();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"group": group, "mode": "stream", "generation": m.generation, "member": member, "last_heard_ms": since_ms, "assignment": assignment})
                    );
                } else {
                    println!("member {member}	generation {}	partitions {}	last heard {} ago", m.generation, parts.join(" "), human_ms(*since_ms));
                }
            }
        }
        Ok(_) => {}
        Err(e) => eprintln!("warning: the group coordinator did not answer: {e}"),
    }
    for (topic, parts) in states(admin, Some(group)).await? {
        for (p, s) in parts {
            for g in &s.streams {
                found = true;
                let lag = s.high_watermark.saturating_sub(g.committed.offset);
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"group": group, "mode": "stream", "topic": topic, "partition": p, "committed": g.committed.offset,
                            "generation": g.committed.generation, "committed_at_ms": g.committed.committed_at_ms,
                            "high_watermark": s.high_watermark, "lag": lag})
                    );
                } else {
                    println!("{topic}/{p}\tstream\tcommitted {}\thigh watermark {}\tlag {lag}", g.committed.offset, s.high_watermark);
                }
            }
            for q in &s.queues {
                found = true;
                let backlog = s.high_watermark.saturating_sub(q.cursor);
                let unsettled = q.leased + q.waiting + q.dead_lettering;
                let oldest = q.oldest_unsettled_delivery_ms.map(|t| now.saturating_sub(t).max(0) as u64);
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"group": group, "mode": "queue", "topic": topic, "partition": p, "floor": q.floor, "cursor": q.cursor,
                            "high_watermark": s.high_watermark, "lag": backlog + unsettled, "not_delivered": backlog, "leased": q.leased,
                            "waiting_retry": q.waiting, "dead_lettering": q.dead_lettering, "oldest_unsettled_age_ms": oldest,
                            "members": q.members.iter().map(|(m, n)| serde_json::json!({"member": m, "leased": n})).collect::<Vec<_>>(),
                            "delivered_total": q.delivered_total, "redelivered_total": q.redelivered_total,
                            "acked_total": q.acked_total, "dead_lettered_total": q.dead_lettered_total})
                    );
                } else {
                    let members: Vec<String> = q.members.iter().map(|(m, n)| format!("{m}:{n}")).collect();
                    println!(
                        "{topic}/{p}\tqueue\tlag {} (not delivered {backlog}, leased {}, waiting retry {}, dead-lettering {})\toldest unsettled {}\tdelivered {} (redelivered {}), acked {}, dead-lettered {}\tmembers [{}]",
                        backlog + unsettled,
                        q.leased,
                        q.waiting,
                        q.dead_lettering,
                        oldest.map_or("-".to_string(), human_ms),
                        q.delivered_total,
                        q.redelivered_total,
                        q.acked_total,
                        q.dead_lettered_total,
                        members.join(" ")
                    );
                }
            }
        }
    }
    if !found {
        bail!("group {group:?} has not consumed any topic (see `keel group list`)");
    }
    Ok(())
}

/// Every message of `topic` (all partitions) up to its high watermark now.
async fn read_all(cluster: &Cluster, topic: &str) -> anyhow::Result<Vec<Message>> {
    let consumer = Consumer::new(cluster.clone(), topic, StartAt::Earliest).await?;
    let mut out = Vec::new();
    for p in 0..cluster.partitions(topic).await? {
        let mut offset = 0;
        loop {
            let f = consumer.fetch_partition(p, offset, Duration::ZERO).await?;
            offset = offset.max(f.log_start_offset);
            let Some(last) = f.messages.last().map(|m| m.offset) else { break };
            out.extend(f.messages.into_iter().filter(|m| m.offset >= offset));
            offset = last + 1;
            if offset >= f.high_watermark {
                break;
            }
        }
    }
    Ok(out)
}

fn failure_of(m: &Message) -> Option<serde_json::Value> {
    let (_, v) = m.headers.iter().find(|(k, _)| k == FAILURE_HEADER)?;
    serde_json::from_slice(v.as_deref()?).ok()
}

pub fn dlq(cmd: DlqCommand, connect: Connect) -> anyhow::Result<()> {
    let cmd = match cmd {
        DlqCommand::Redrive(args) => return super::job_cmds::redrive(args, connect),
        other => other,
    };
    runtime()?.block_on(async move {
        let cluster = connect.cluster()?;
        match cmd {
            DlqCommand::Inspect { topic, group } => {
                let dlq = dead_letter_topic(&topic);
                if !cluster.metadata(true).await?.topics.iter().any(|t| t.name == dlq) {
                    if connect.json {
                        println!("{}", serde_json::json!({"topic": topic, "dead_letter_topic": dlq, "dead_letters": 0, "reasons": []}));
                    } else {
                        println!("{topic} has no dead letters ({dlq} does not exist yet)");
                    }
                    return Ok(());
                }
                let now = now_ms();
                struct Reason {
                    count: u64,
                    oldest_ms: i64,
                    samples: Vec<(u64, String)>,
                    groups: BTreeSet<String>,
                }
                let mut reasons: BTreeMap<String, Reason> = BTreeMap::new();
                let mut total = 0u64;
                for m in read_all(&cluster, &dlq).await? {
                    let Some(f) = failure_of(&m) else { continue };
                    let g = f["group"].as_str().unwrap_or_default().to_string();
                    if group.as_ref().is_some_and(|want| *want != g) {
                        continue;
                    }
                    total += 1;
                    let reason = f["reason"].as_str().unwrap_or("(none)").to_string();
                    let at = f["dead_lettered_ms"].as_i64().unwrap_or(m.timestamp_ms);
                    let source = format!("{}/{}@{}", f["source"]["topic"].as_str().unwrap_or("?"), f["source"]["partition"], f["source"]["offset"]);
                    let r = reasons.entry(reason).or_insert(Reason { count: 0, oldest_ms: at, samples: Vec::new(), groups: BTreeSet::new() });
                    r.count += 1;
                    r.oldest_ms = r.oldest_ms.min(at);
                    r.groups.insert(g);
                    if r.samples.len() < SAMPLES_PER_REASON {
                        r.samples.push((m.offset, source));
                    }
                }
                let mut sorted: Vec<(String, Reason)> = reasons.into_iter().collect();
                sorted.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(&b.0)));
                if connect.json {
                    let rows: Vec<serde_json::Value> = sorted
                        .iter()
                        .map(|(reason, r)| {
                            serde_json::json!({"reason": reason, "count": r.count, "oldest_age_ms": now.saturating_sub(r.oldest_ms).max(0),
                                "groups": r.groups, "samples": r.samples.iter().map(|(o, s)| serde_json::json!({"dlq_offset": o, "source": s})).collect::<Vec<_>>()})
                        })
                        .collect();
                    println!("{}", serde_json::json!({"topic": topic, "dead_letter_topic": dlq, "group": group, "dead_letters": total, "reasons": rows}));
                } else {
                    let scope = group.as_ref().map_or(String::new(), |g| format!(" of group {g}"));
                    println!("{total} dead letters{scope} in {dlq}");
                    for (reason, r) in &sorted {
                        let samples: Vec<String> = r.samples.iter().map(|(o, s)| format!("{o} ({s})")).collect();
                        println!(
                            "  {:>6}  oldest {:<10}  {reason}\n          groups {}; dead-letter offsets {}",
                            r.count,
                            human_ms(now.saturating_sub(r.oldest_ms).max(0) as u64),
                            r.groups.iter().cloned().collect::<Vec<_>>().join(","),
                            samples.join(", ")
                        );
                    }
                }
            }
            DlqCommand::Redrive(_) => unreachable!("redrive is run outside this runtime (see above)"),
            DlqCommand::Show { topic, offset } => {
                let dlq = dead_letter_topic(&topic);
                let consumer = Consumer::new(cluster.clone(), &dlq, StartAt::Earliest).await?;
                let f = consumer.fetch_partition(0, offset, Duration::ZERO).await?;
                let Some(m) = f.messages.into_iter().find(|m| m.offset == offset) else {
                    bail!("{dlq} has no message at offset {offset} (its offsets run below {})", f.high_watermark);
                };
                let failure = failure_of(&m).unwrap_or(serde_json::Value::Null);
                let headers: serde_json::Map<String, serde_json::Value> = m
                    .headers
                    .iter()
                    .filter(|(k, _)| k != FAILURE_HEADER)
                    .map(|(k, v)| (k.clone(), v.as_deref().map(String::from_utf8_lossy).map_or(serde_json::Value::Null, |s| s.into())))
                    .collect();
                let value = m.value.as_deref().map(String::from_utf8_lossy);
                let key = m.key.as_deref().map(String::from_utf8_lossy);
                let out = serde_json::json!({"dead_letter_topic": dlq, "offset": m.offset, "key": key, "value": value, "headers": headers, "failure": failure});
                if connect.json {
                    println!("{out}");
                } else {
                    println!("{}", serde_json::to_string_pretty(&out)?);
                }
            }
        }
        Ok(())
    })
}
