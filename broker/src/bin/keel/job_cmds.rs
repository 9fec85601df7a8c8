//! `keel replay`, `keel dlq redrive` and `keel job …`: replay and redrive jobs.
//!
//! A job runs in the cluster (on the metadata leader), not in this process: these
//! commands create it, then follow its progress (a bar on a terminal) until it ends
//! and print a summary; `--detach` returns at once, and interrupting the command
//! leaves the job running (`keel job show ID`).

use std::io::IsTerminal;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context};
use keel_client::consumer::{Consumer, StartAt};
use keel_client::job::{Job, JobAction, JobFilter, JobKind, JobRequest, JobSpec, JobState, Position, RedriveFilter, Selection};
use keel_client::{Admin, Cluster};

use super::client_cmds::{runtime, Connect};

/// How often a following command asks for the job's progress.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// The topic to replay.
    topic: String,
    /// Where the range starts: an offset, a time (RFC 3339, e.g. 2026-12-02T10:00:00Z),
    /// a duration ago (e.g. 15m), or `earliest`.
    #[arg(long, default_value = "earliest", value_parser = parse_position)]
    from: Position,
    /// Where the range ends (not included): an offset, a time, a duration ago, or
    /// `latest` (the end when the job is created).
    #[arg(long, default_value = "latest", value_parser = parse_position)]
    to: Position,
    /// Only these partitions (repeat the flag); all by default.
    #[arg(long = "partition")]
    partitions: Vec<u32>,
    /// Only messages with this key.
    #[arg(long)]
    key: Option<String>,
    /// Only messages carrying this header with this value, `name=value` (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// The topic to copy into; created like the source (partitions, replicas,
    /// settings) if it does not exist. Partition N goes to partition N.
    #[arg(long)]
    into: String,
    /// Messages per second, over the whole job (default: as fast as it goes).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    #[command(flatten)]
    run: RunFlags,
}

/// How a job command runs.
#[derive(clap::Args, Debug)]
pub struct RunFlags {
    /// Resolve the job and say what it would copy; create nothing.
    #[arg(long)]
    dry_run: bool,
    /// Return once the job is created instead of following it to its end.
    #[arg(long)]
    detach: bool,
}

#[derive(clap::Args, Debug)]
pub struct RedriveArgs {
    /// The topic whose dead letters (`<topic>.dlq`) are sent back.
    topic: String,
    /// Only dead letters of this consumer group.
    #[arg(long)]
    group: Option<String>,
    /// Only dead letters whose last failure reason is exactly this.
    #[arg(long)]
    reason: Option<String>,
    /// Only dead letters written since this time (RFC 3339) or this long ago (e.g. 1h).
    #[arg(long, value_parser = parse_time)]
    since: Option<i64>,
    /// Only dead letters with this key.
    #[arg(long)]
    key: Option<String>,
    /// Only dead letters delivered at least this many times.
    #[arg(long)]
    min_attempts: Option<u32>,
    /// Send them to this topic instead of the one they came from.
    #[arg(long)]
    to: Option<String>,
    /// A dead letter already redriven this many times goes to `<topic>.quarantine`
    /// instead (the loop guard); default 3.
    #[arg(long)]
    max_redrives: Option<u32>,
    /// Messages per second (default: as fast as it goes).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    #[command(flatten)]
    run: RunFlags,
}

#[derive(clap::Subcommand, Debug)]
pub enum JobCommand {
    /// Running and paused jobs; with --all every job the cluster remembers (the audit
    /// trail: who ran what, when, and how many messages it moved).
    List {
        #[arg(long)]
        all: bool,
    },
    /// One job: its spec, state and per-partition progress.
    Show { id: u64 },
    /// Stop a running job at its next checkpoint; `resume` continues it from there.
    Pause { id: u64 },
    /// Continue a paused (or failed) job from its last checkpoint.
    Resume { id: u64 },
    /// End a job for good; what it copied stays.
    Cancel { id: u64 },
    /// Follow a job to its end and print its summary.
    Wait { id: u64 },
}

fn parse_position(s: &str) -> Result<Position, String> {
    match s {
        "earliest" => Ok(Position::Earliest),
        "latest" | "now" => Ok(Position::Latest),
        _ if s.bytes().all(|b| b.is_ascii_digit()) => s.parse().map(Position::Offset).map_err(|e| format!("{s:?}: {e}")),
        _ => parse_time(s).map(Position::Time),
    }
}

/// A time: RFC 3339, or a duration ago.
fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64));
    }
    let ago =
        humantime::parse_duration(s).map_err(|_| format!("{s:?} is not an offset, a time (2026-12-02T10:00:00Z), a duration ago (15m), earliest or latest"))?;
    Ok(now_ms() - ago.as_millis() as i64)
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?}: a header condition is name=value"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Who is asking, for the audit trail: `user@host` (the user from `$USER`, else the
/// process's uid looked up in /etc/passwd).
fn requester() -> String {
    // SAFETY: getuid(2) has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let from_passwd = || {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        passwd.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_string())
        })
    };
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).ok().or_else(from_passwd).unwrap_or_else(|| format!("uid{uid}"));
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    if host.is_empty() {
        user
    } else {
        format!("{user}@{host}")
    }
}

pub fn replay(args: ReplayArgs, connect: Connect) -> anyhow::Result<()> {
    let request = JobRequest {
        kind: JobKind::Replay,
        source: args.topic,
        target: Some(args.into),
        partitions: args.partitions,
        from: args.from,
        until: args.to,
        filter: JobFilter { key: args.key, headers: args.headers },
        redrive: RedriveFilter::default(),
        max_redrives: None,
        rate: args.rate,
        requested_by: requester(),
        dry_run: args.run.dry_run,
        request_id: String::new(),
    };
    runtime()?.block_on(run_job(request, args.run, connect))
}

pub fn redrive(args: RedriveArgs, connect: Connect) -> anyhow::Result<()> {
    let dlq = keel_broker::node::dead_letters::dead_letter_topic(&args.topic);
    let request = JobRequest {
        kind: JobKind::Redrive,
        source: dlq,
        target: Some(args.to.unwrap_or(args.topic)),
        partitions: Vec::new(),
        from: Position::Earliest,
        until: Position::Latest,
        filter: JobFilter { key: args.key, headers: Vec::new() },
        redrive: RedriveFilter { group: args.group, reason: args.reason, since_ms: args.since, min_attempts: args.min_attempts },
        max_redrives: args.max_redrives,
        rate: args.rate,
        requested_by: requester(),
        dry_run: args.run.dry_run,
        request_id: String::new(),
    };
    runtime()?.block_on(run_job(request, args.run, connect))
}

async fn run_job(request: JobRequest, flags: RunFlags, connect: Connect) -> anyhow::Result<()> {
    let cluster = connect.cluster()?;
    let admin = Admin::new(cluster.clone());
    let kind = request.kind;
    let created = admin.create_job(request).await.context("creating the job")?;
    let Some(job) = created.job else {
        return dry_run(&cluster, &created.spec, connect.json).await;
    };
    if !connect.json {
        match kind {
            JobKind::Replay => {
                eprintln!("job {}: replaying {} messages of {} into {} ({})", job.id, job.spec.total(), job.spec.source, job.spec.target, ranges(&job.spec))
            }
            JobKind::Redrive => eprintln!(
                "job {}: redriving from {} dead letters of {} into {} ({})",
                job.id,
                job.spec.total(),
                job.spec.source,
                job.spec.target,
                ranges(&job.spec)
            ),
        }
    }
    if flags.detach {
        print_job(&job, connect.json);
        return Ok(());
    }
    let job = follow(&admin, job.id, connect.json).await?;
    print_summary(&job, connect.json);
    if let JobState::Failed(reason) = &job.state {
        bail!("job {} failed: {reason}", job.id);
    }
    Ok(())
}

fn ranges(spec: &JobSpec) -> String {
    spec.ranges.iter().map(|r| format!("p{} {}..{}", r.partition, r.from, r.until)).collect::<Vec<_>>().join(", ")
}

/// Polls the job until it ends, with a progress bar on a terminal.
async fn follow(admin: &Admin, id: u64, json: bool) -> anyhow::Result<Job> {
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} job {prefix} [{bar:40}] {pos}/{len} source messages, {msg} ({eta} left)")
                .expect("the template is valid")
                .progress_chars("=> "),
        );
        bar.set_prefix(id.to_string());
        bar
    });
    loop {
        let job = admin.job(id).await.with_context(|| format!("following job {id} (it goes on running; `keel job show {id}`)"))?;
        if let Some(bar) = &bar {
            bar.set_length(job.spec.total());
            bar.set_position(job.position());
            bar.set_message(format!("{} copied", job.copied()));
        }
        if job.state.finished() {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            return Ok(job);
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

fn print_summary(job: &Job, json: bool) {
    let took_ms = (job.updated_at_ms - job.created_at_ms).max(0);
    if json {
        println!(
            "{}",
            serde_json::json!({"job": job, "copied": job.copied(), "skipped": job.skipped(), "quarantined": job.quarantined(), "duration_ms": took_ms})
        );
        return;
    }
    let rate = if took_ms > 0 { job.copied() as f64 * 1000.0 / took_ms as f64 } else { 0.0 };
    let (skipped, quarantined) = match job.spec.kind {
        JobKind::Redrive => ("filtered out or redriven before", format!(", quarantined {}", job.quarantined())),
        JobKind::Replay => ("filtered out", String::new()),
    };
    println!(
        "job {} {}: copied {}, skipped {} ({skipped}){quarantined}, in {:.1} s ({rate:.0} msgs/s) from {} into {}",
        job.id,
        job.state.name(),
        job.copied(),
        job.skipped(),
        took_ms as f64 / 1000.0,
        job.spec.source,
        job.spec.target
    );
    if let JobState::Failed(reason) = &job.state {
        println!("  failed: {reason}");
    }
}

/// What a job would move: for a replay, the resolved ranges; for a redrive, every dead
/// letter it would send, and where — chosen by the same rule the job applies.
async fn dry_run(cluster: &Cluster, spec: &JobSpec, json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    if spec.kind == JobKind::Redrive {
        for r in &spec.ranges {
            let consumer = Consumer::new(cluster.clone(), &spec.source, StartAt::Earliest).await?;
            let mut offset = r.from;
            while offset < r.until {
                let f = consumer.fetch_partition(r.partition, offset, Duration::ZERO).await?;
                let Some(last) = f.messages.last().map(|m| m.offset) else { break };
                for m in f.messages.iter().filter(|m| m.offset >= offset && m.offset < r.until) {
                    let headers = m.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref()));
                    let (action, letter) = match spec.select_parts(m.offset, m.key.as_deref(), headers) {
                        Selection::Skip => continue,
                        Selection::Copy(l) => ("redrive", l),
                        Selection::Quarantine(l) => ("quarantine", Some(l)),
                    };
                    let letter = letter.unwrap_or_default();
                    let to = if action == "quarantine" { spec.quarantine.as_ref().map_or(String::new(), |q| q.topic.clone()) } else { spec.target.clone() };
                    rows.push(serde_json::json!({"dlq_offset": m.offset, "action": action, "to": to,
                        "key": m.key.as_deref().map(String::from_utf8_lossy), "group": letter.group, "reason": letter.last_reason().or(letter.reason.as_deref()),
                        "attempts": letter.attempts, "source": format!("{}/{}@{}", letter.source.topic, letter.source.partition, letter.source.offset)}));
                }
                offset = last + 1;
            }
        }
    }
    if json {
        println!("{}", serde_json::json!({"dry_run": true, "spec": spec, "total": spec.total(), "would_move": rows}));
        return Ok(());
    }
    match spec.kind {
        JobKind::Replay => {
            println!("dry run: would replay {} messages of {} into {} ({})", spec.total(), spec.source, spec.target, ranges(spec));
            if spec.filter != JobFilter::default() {
                println!("  (before the filter: key {:?}, headers {:?})", spec.filter.key, spec.filter.headers);
            }
        }
        JobKind::Redrive => {
            println!("dry run: {} of the {} dead letters in {} ({}) would move:", rows.len(), spec.total(), spec.source, ranges(spec));
            for r in &rows {
                println!(
                    "  {:>8}  {:<10} -> {:<24} key {:<12} group {:<12} attempts {:<3} reason {}",
                    r["dlq_offset"],
                    r["action"].as_str().unwrap_or_default(),
                    r["to"].as_str().unwrap_or_default(),
                    r["key"].as_str().unwrap_or("-"),
                    r["group"].as_str().unwrap_or_default(),
                    r["attempts"],
                    r["reason"].as_str().unwrap_or("-")
                );
            }
            if !spec.exclude.is_empty() {
                println!("  ({} dead letters earlier redrives moved are left out)", spec.exclude.len());
            }
        }
    }
    Ok(())
}

fn print_job(job: &Job, json: bool) {
    if json {
        println!("{}", serde_json::to_string(job).expect("a job always encodes as JSON"));
        return;
    }
    println!(
        "job {} {} {} -> {}: {}  copied {} skipped {}{}  by {} at {}",
        job.id,
        job.spec.kind.as_str(),
        job.spec.source,
        job.spec.target,
        job.state.name(),
        job.copied(),
        job.skipped(),
        if job.spec.kind == JobKind::Redrive { format!(" quarantined {}", job.quarantined()) } else { String::new() },
        job.spec.requested_by,
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(job.created_at_ms.max(0) as u64)),
    );
}

pub fn job(cmd: JobCommand, connect: Connect) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let admin = Admin::new(connect.cluster()?);
        match cmd {
            JobCommand::List { all } => {
                let jobs = admin.list_jobs(all).await?;
                if connect.json {
                    println!("{}", serde_json::to_string(&jobs)?);
                } else if jobs.is_empty() {
                    println!("no {}jobs{}", if all { "" } else { "running or paused " }, if all { "" } else { " (--all for finished ones)" });
                }
                if !connect.json {
                    for j in &jobs {
                        print_job(j, false);
                    }
                }
            }
            JobCommand::Show { id } => {
                let job = admin.job(id).await?;
                if connect.json {
                    print_job(&job, true);
                } else {
                    print_job(&job, false);
                    if let JobState::Failed(reason) = &job.state {
                        println!("  failed: {reason}");
                    }
                    let f = &job.spec.filter;
                    println!("  ranges {}  rate {}  filter key {:?} headers {:?}", ranges(&job.spec), job.spec.rate, f.key, f.headers);
                    for p in &job.progress {
                        println!(
                            "  partition {}: at {} of ..{}  copied {} skipped {} quarantined {}",
                            p.partition, p.next, p.until, p.copied, p.skipped, p.quarantined
                        );
                    }
                }
            }
            JobCommand::Pause { id } | JobCommand::Resume { id } | JobCommand::Cancel { id } => {
                let action = match cmd {
                    JobCommand::Pause { .. } => JobAction::Pause,
                    JobCommand::Resume { .. } => JobAction::Resume,
                    _ => JobAction::Cancel,
                };
                let job = admin.control_job(id, action).await?;
                print_job(&job, connect.json);
            }
            JobCommand::Wait { id } => {
                let job = follow(&admin, id, connect.json).await?;
                print_summary(&job, connect.json);
            }
        }
        Ok(())
    })
}
