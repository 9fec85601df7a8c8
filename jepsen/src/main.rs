//! `keel-jepsen`: check a recorded history (`keel-jepsen check history.jsonl`).

use clap::Parser;

#[derive(Parser)]
#[command(name = "keel-jepsen", about = "Keel's fault-injection harness")]
enum Cli {
    /// Check a recorded history and print the results as JSON.
    Check {
        history: std::path::PathBuf,
        /// Acknowledged sends a valid run has at least.
        #[arg(long, default_value_t = 100)]
        min_acked: u64,
        #[arg(long, default_value_t = 1)]
        min_faults: u64,
        #[arg(long, default_value_t = 1)]
        min_leader_changes: u64,
    },
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    match Cli::parse() {
        Cli::Check { history, min_acked, min_faults, min_leader_changes } => {
            let events = keel_jepsen::history::read(&history)?;
            let floors = keel_jepsen::checker::Floors { acked_sends: min_acked, faults: min_faults, leader_changes: min_leader_changes };
            let results = keel_jepsen::checker::check(&events, floors);
            println!("{}", serde_json::to_string_pretty(&results)?);
            Ok(if results.valid { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
        }
    }
}
