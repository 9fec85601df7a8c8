//! `keel-sim`: sweep seeds of the deterministic Raft-group simulation, or replay one.

use std::time::{Duration, Instant};

use clap::Parser;
use keel_sim::{run_seed, Options};

#[derive(Parser)]
#[command(name = "keel-sim", about = "Deterministic simulation of Keel's partition Raft groups")]
struct Cli {
    /// Seeds to run: FIRST, FIRST+1, …
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Replay one seed and print everything that happened in it.
    #[arg(long)]
    reproduce: Option<u64>,
    /// Partition groups, each on all three nodes.
    #[arg(long, default_value_t = 3)]
    groups: u64,
    /// Simulated time under faults before healing.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    time: Duration,
    /// Reintroduce a bug the simulation must catch: `ack-before-fsync` (needs the
    /// `sabotage` feature).
    #[arg(long)]
    sabotage: Option<String>,
    /// Keep going after a failing seed (the exit status still reports it).
    #[arg(long)]
    keep_going: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(mode) = &cli.sabotage {
        sabotage(mode)?;
    }
    let options = Options { groups: cli.groups, fault_time: cli.time, ..Options::default() };
    if let Some(seed) = cli.reproduce {
        let out = run_seed(seed, &options);
        for e in &out.events {
            println!("{e}");
        }
        println!(
            "seed {seed}: {} — {} acknowledged, {} unknown, {} refused; {} crashes ({} power cuts of every node), {} partitions, {} disk stalls; {} entries committed; network {:?}; {} ms simulated; digest {:016x}",
            out.violation.as_deref().map_or("ok".to_string(), |v| format!("VIOLATION: {v}")),
            out.acked,
            out.unknown,
            out.failed,
            out.crashes,
            out.power_cuts_all,
            out.partitions,
            out.disk_stalls,
            out.committed_entries,
            out.net,
            out.sim_ms,
            out.digest
        );
        std::process::exit(if out.violation.is_some() { 1 } else { 0 });
    }
    let started = Instant::now();
    let (mut passed, mut failed, mut acked, mut crashes) = (0u64, Vec::new(), 0u64, 0u64);
    for seed in cli.first..cli.first + cli.seeds {
        let out = run_seed(seed, &options);
        acked += out.acked;
        crashes += out.crashes;
        match out.violation {
            None => passed += 1,
            Some(v) => {
                println!(
                    "seed {seed} ({} of this sweep): VIOLATION: {v}\n  replay: keel-sim --reproduce {seed}{}",
                    seed - cli.first + 1,
                    cli.sabotage.as_deref().map_or(String::new(), |m| format!(" --sabotage {m}"))
                );
                failed.push(seed);
                if !cli.keep_going {
                    break;
                }
            }
        }
    }
    println!(
        "keel-sim: {passed} seed(s) passed, {} failed{}; {acked} writes acknowledged, {crashes} crashes; {:.1} s",
        failed.len(),
        if failed.is_empty() { String::new() } else { format!(" ({failed:?})") },
        started.elapsed().as_secs_f64()
    );
    std::process::exit(if failed.is_empty() { 0 } else { 1 });
}

fn sabotage(mode: &str) -> anyhow::Result<()> {
    match mode {
        #[cfg(feature = "sabotage")]
        "ack-before-fsync" => {
            keel_storage::observe::set_ack_before_fsync(true);
            Ok(())
        }
        #[cfg(not(feature = "sabotage"))]
        "ack-before-fsync" => anyhow::bail!("this keel-sim was built without the `sabotage` feature; build it with --features sabotage"),
        other => anyhow::bail!("unknown sabotage mode {other:?}; the simulator knows `ack-before-fsync`"),
    }
}
