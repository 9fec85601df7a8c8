//! `keel-jepsen`: run the fault-injection harness against real `keel serve` processes
//! (`run`, `soak`), or check a recorded history (`check`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use keel_jepsen::checker::Floors;
use keel_jepsen::nemesis::Fault;
use keel_jepsen::nodes::Placement;
use keel_jepsen::runner::{self, RunConfig};
use keel_jepsen::topology::Topology;

#[derive(Parser)]
#[command(name = "keel-jepsen", about = "Keel's fault-injection harness")]
enum Cli {
    /// Workloads under rotating faults, then heal, drain, dump and check; `--runs N`
    /// runs N times with seeds S, S+1, … (each in its own process), stopping at the
    /// first invalid run (a soak).
    Run(Box<RunArgs>),
    /// Check a recorded history and print the results as JSON.
    Check {
        history: PathBuf,
        #[arg(long, default_value_t = 100)]
        min_acked: u64,
        #[arg(long, default_value_t = 1)]
        min_faults: u64,
        #[arg(long, default_value_t = 1)]
        min_leader_changes: u64,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// The `keel` binary to run.
    #[arg(long, default_value = "target/release/keel")]
    keel: PathBuf,
    /// Where runs keep their histories, results, reports and node logs.
    #[arg(long, default_value = "store")]
    store: PathBuf,
    /// How long the workloads run under faults.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    time: Duration,
    /// Length of each nemesis period.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    interval: Duration,
    /// Faults to rotate through (comma-separated), or "all".
    #[arg(long, default_value = "all")]
    faults: String,
    #[arg(long, default_value_t = 2)]
    log_producers: usize,
    #[arg(long, default_value_t = 3)]
    readers: usize,
    #[arg(long, default_value_t = 3)]
    idem_producers: usize,
    /// W2 queue workload: producers to the queue topic, and queue-group members that
    /// ack, nack (poison messages always) and crash now and then.
    #[arg(long, default_value_t = 0)]
    queue_producers: usize,
    #[arg(long, default_value_t = 0)]
    queue_members: usize,
    /// Queue messages acked that a valid run with the queue workload has at least.
    #[arg(long, default_value_t = 100)]
    min_queue_acked: u64,
    /// W4 replay workload: replay jobs of the W1 topic created during the run (one
    /// every 12 s), each checked to hold its source range once, in order.
    #[arg(long, default_value_t = 0)]
    replays: usize,
    /// Retention on the W1 topic: at most this many bytes per partition, in segments of
    /// a quarter of it (at least 64 KiB), so the run purges logs and sends lagging
    /// followers snapshots that carry the log; 0 keeps everything. Messages retention
    /// deleted before any reader saw them are counted, not lost.
    #[arg(long, default_value_t = 0)]
    retention_bytes: u64,
    /// Partitions of the W1 topic: many make most of its groups quiesce between writes
    /// and reads, so faults hit sleeping leaders and followers (issue 12).
    #[arg(long, default_value_t = 3)]
    log_partitions: u32,
    /// Messages/s per producer.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// The schedule's seed (random if omitted).
    #[arg(long)]
    seed: Option<u64>,
    /// Run the nodes on loopback even where network namespaces work (no network faults).
    #[arg(long)]
    no_netns: bool,
    /// Acknowledged sends a valid run has at least.
    #[arg(long, default_value_t = 1000)]
    min_acked: u64,
    #[arg(long, default_value_t = 1)]
    min_faults: u64,
    #[arg(long, default_value_t = 1)]
    min_leader_changes: u64,
    /// Keep the nodes' data directories of valid runs too.
    #[arg(long)]
    keep_data: bool,
    /// Runs, one after another (a soak); stops at the first invalid one.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Run the nodes with a deliberate bug (`ack-before-commit`, `ack-before-fsync`,
    /// `read-beyond-hw`, `skip-dedupe`, `ignore-ledger`; the keel binary needs the `sabotage` feature).
    /// The run should then be invalid, with the matching anomaly.
    #[arg(long)]
    sabotage: Option<String>,
}

fn faults(spec: &str) -> anyhow::Result<Vec<Fault>> {
    if spec == "all" {
        return Ok(Fault::ALL.to_vec());
    }
    if spec == "none" {
        return Ok(Vec::new());
    }
    spec.split(',').map(|n| Fault::parse(n.trim()).ok_or_else(|| anyhow::anyhow!("unknown fault {n:?}; known: {:?}", Fault::ALL.map(|f| f.name())))).collect()
}

/// Makes the run's placement: namespaces where possible (entering the client namespace
/// on this thread, before any runtime thread exists), loopback otherwise.
fn placement(args: &RunArgs, seed: u64) -> anyhow::Result<Placement> {
    let prefix = format!("jt{}-", std::process::id() % 100_000);
    if !args.no_netns {
        match Topology::probe(&prefix) {
            Ok(()) => {
                let t = Topology::create(&prefix, 3).map_err(anyhow::Error::msg)?;
                t.enter_client_namespace().map_err(anyhow::Error::msg)?;
                return Ok(Placement::Namespaces(t));
            }
            Err(e) => eprintln!("network namespaces are unavailable ({e}): nodes run on loopback and network faults are skipped"),
        }
    }
    Ok(Placement::Loopback { base_port: 20_000 + (seed % 5_000) as u16 })
}

fn run_one(args: &RunArgs, seed: u64) -> anyhow::Result<runner::RunSummary> {
    let dir = runner::run_dir(&args.store, seed);
    if args.retention_bytes > 0 && args.replays > 0 {
        anyhow::bail!("--retention-bytes and --replays do not go together: retention may delete a replay's source range before the job copies it");
    }
    let config = RunConfig {
        keel: std::fs::canonicalize(&args.keel).map_err(|e| anyhow::anyhow!("the keel binary {}: {e}", args.keel.display()))?,
        dir: dir.clone(),
        seed,
        time: args.time,
        interval: args.interval,
        faults: faults(&args.faults)?,
        log_producers: args.log_producers,
        readers: args.readers,
        idem_producers: args.idem_producers,
        queue_producers: args.queue_producers,
        queue_members: args.queue_members,
        replays: args.replays,
        retention_bytes: args.retention_bytes,
        log_partitions: args.log_partitions,
        rate: args.rate,
        floors: Floors {
            acked_sends: args.min_acked,
            faults: args.min_faults,
            leader_changes: args.min_leader_changes,
            dumped_nodes: 3,
            queue_acked: args.min_queue_acked,
        },
        keep_data: args.keep_data,
        sabotage: args.sabotage.clone(),
    };
    let placement = placement(args, seed)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // On SIGINT or SIGTERM the run is dropped: its nodes are killed and its namespaces
    // removed (`Nodes` and `Topology` tear down on drop; tasks holding them end with the
    // runtime, before this function returns).
    let summary = runtime
        .block_on(async {
            tokio::select! {
                biased;
                signal = interrupted() => Err(format!("interrupted by {signal}: the run's nodes were killed and its namespaces removed")),
                summary = runner::run(config, placement) => summary,
            }
        })
        .map_err(anyhow::Error::msg)?;
    let r = &summary.results;
    eprintln!(
        "run {} ({}): {} — {} sends acknowledged, {} unknown, {} failed; {} faults; {} leader changes; {} retries deduplicated, {} messages stored twice; longest ack gap {} ms; forbidden anomalies: {:?}; report {}",
        seed,
        dir.display(),
        if r.valid { "VALID" } else { "INVALID" },
        r.stats.acked,
        r.stats.unknown,
        r.stats.failed,
        r.stats.faults,
        r.stats.leader_changes,
        r.stats.retries_deduplicated,
        r.stats.duplicates_stored,
        r.stats.longest_ack_gap_ms,
        r.forbidden().iter().map(|a| (a.name, a.count)).collect::<Vec<_>>(),
        dir.join("report.html").display()
    );
    if !r.vacuous.is_empty() {
        eprintln!("  not enough exercised: {}", r.vacuous.join("; "));
    }
    Ok(summary)
}

/// Resolves at the first SIGINT or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Set in the environment of a soak's runs: each dies with its parent.
const SOAK_CHILD_ENV: &str = "KEEL_JEPSEN_SOAK_CHILD";

fn main() -> anyhow::Result<std::process::ExitCode> {
    tracing_subscriber_init();
    if std::env::var_os(SOAK_CHILD_ENV).is_some() {
        // If the soak's process goes, this run gets SIGTERM and tears itself down.
        // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of this process.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        }
    }
    match Cli::parse() {
        Cli::Run(args) if args.runs <= 1 => {
            let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
            let summary = run_one(&args, seed)?;
            Ok(if summary.results.valid { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
        }
        Cli::Run(args) => {
            // Each run in a process of its own (namespaces are entered per process),
            // with the same arguments but one run and its own seed.
            let mut passed = Vec::new();
            let mut skip = false;
            for a in std::env::args().skip(1) {
                if skip {
                    skip = false;
                    continue;
                }
                if a == "--runs" || a == "--seed" {
                    skip = true;
                    continue;
                }
                if a.starts_with("--runs=") || a.starts_with("--seed=") {
                    continue;
                }
                passed.push(a);
            }
            let first = args.seed.unwrap_or_else(|| fastrand::u64(..) >> 1);
            for i in 0..args.runs {
                let seed = first.wrapping_add(u64::from(i));
                let status =
                    std::process::Command::new(std::env::current_exe()?).args(&passed).arg("--seed").arg(seed.to_string()).env(SOAK_CHILD_ENV, "1").status()?;
                if !status.success() {
                    eprintln!("soak: run {} of {} (seed {seed}) is invalid or failed; stopping", i + 1, args.runs);
                    return Ok(std::process::ExitCode::FAILURE);
                }
            }
            eprintln!("soak: {} runs valid (seeds {first}..={})", args.runs, first.wrapping_add(u64::from(args.runs) - 1));
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cli::Check { history, min_acked, min_faults, min_leader_changes } => {
            let events = keel_jepsen::history::read(&history)?;
            let floors = Floors { acked_sends: min_acked, faults: min_faults, leader_changes: min_leader_changes, dumped_nodes: 0, queue_acked: 0 };
            let results = keel_jepsen::checker::check(&events, floors);
            println!("{}", serde_json::to_string_pretty(&results)?);
            Ok(if results.valid { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
        }
    }
}

fn tracing_subscriber_init() {
    // Warnings from the harness go to stderr; quiet otherwise.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
}
