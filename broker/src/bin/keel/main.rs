//! `keel`: the broker (`serve`), a local three-node cluster (`dev`), and — as the client
//! library lands — the admin, produce and consume commands.

mod client_cmds;
mod consume;
mod dev;
mod group_cmds;
mod job_cmds;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "keel", version, about = "Keel: a replicated, durable event bus")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Log format of broker processes (`serve`, `dev`).
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run one broker node.
    Serve(serve::ServeArgs),
    /// Run a local cluster of broker processes with the embedded default config.
    Dev(dev::DevArgs),
    /// Create, list, describe, alter and delete topics.
    Topic {
        #[command(flatten)]
        connect: client_cmds::Connect,
        #[command(subcommand)]
        command: client_cmds::TopicCommand,
    },
    /// Send messages: the MESSAGE argument, or one per line of standard input.
    Produce {
        #[command(flatten)]
        connect: client_cmds::Connect,
        #[command(flatten)]
        args: client_cmds::ProduceArgs,
    },
    /// Read a topic, one message per line: alone, or in a consumer group (--group) in
    /// stream mode (offsets committed) or queue mode (leased, acked one by one).
    Consume {
        #[command(flatten)]
        connect: client_cmds::Connect,
        #[command(flatten)]
        args: client_cmds::ConsumeArgs,
    },
    /// Print a stopped node's committed records, from its data directory.
    Dump(DumpArgs),
    /// Consumer groups: list, describe (offsets, lag, leases), settings, offset resets.
    Group {
        #[command(flatten)]
        connect: client_cmds::Connect,
        #[command(subcommand)]
        command: group_cmds::GroupCommand,
    },
    /// Dead letters: grouped by failure reason, one with its failure record, or sent
    /// back to their topic (redrive).
    Dlq {
        #[command(flatten)]
        connect: client_cmds::Connect,
        #[command(subcommand)]
        command: group_cmds::DlqCommand,
    },
    /// Copy a range of a topic (by offsets or times, optionally filtered) into another
    /// topic, as a job the cluster runs: resumable, rate-limited, audited.
    Replay {
        #[command(flatten)]
        connect: client_cmds::Connect,
        #[command(flatten)]
        args: job_cmds::ReplayArgs,
    },
    /// Replay and redrive jobs: list (--all: the audit trail), show, pause, resume,
    /// cancel, wait.
    Job {
        #[command(flatten)]
        connect: client_cmds::Connect,
        #[command(subcommand)]
        command: job_cmds::JobCommand,
    },
    /// Cluster-wide views.
    Cluster {
        #[command(flatten)]
        connect: client_cmds::Connect,
        #[command(subcommand)]
        command: client_cmds::ClusterCommand,
    },
}

/// `keel serve`'s log filter unless `RUST_LOG` sets one: Keel's own events from `info`
/// up, openraft's only at `error`. openraft logs every heartbeat the node triggers and
/// every election step at `info`, and each failed heartbeat or replication RPC at
/// `warn`, per group: with hundreds of groups that was 15,000 lines a second on each
/// survivor of a node's failure, and ~1,400 a second under load — CPU taken from the
/// failover and the data path. Keel logs what matters of those itself (peers lost,
/// wakes, campaigns, refills); `RUST_LOG=info,openraft=info` brings openraft's back.
const DEFAULT_LOG_FILTER: &str = "info,openraft=error";

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    use std::io::IsTerminal;
    // A log line that cannot be written (the log's disk is full) is dropped. With internal
    // errors logged, tracing-subscriber would report it with `eprintln!`, which panics
    // when stderr fails too — in whatever task logged, a Raft core included.
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Client commands end quietly when their output pipe closes (`keel consume … | head`):
/// SIGPIPE's default action, which Rust programs otherwise ignore (a write then fails
/// and `println!` panics). Brokers keep ignoring it: their sockets report EPIPE.
fn exit_quietly_on_closed_pipe() {
    // SAFETY: setting a signal's disposition to the default has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            init_logs(args.log_format);
            keel_broker::node::malloc::tune();
            keel_broker::node::open_files::raise_limit();
            serve::run(args)
        }
        Command::Dev(args) => dev::run(args),
        Command::Dump(args) => {
            exit_quietly_on_closed_pipe();
            dump(args)
        }
        Command::Topic { connect, command } => {
            exit_quietly_on_closed_pipe();
            client_cmds::topic(command, connect)
        }
        Command::Produce { connect, args } => {
            exit_quietly_on_closed_pipe();
            client_cmds::produce(args, connect)
        }
        Command::Consume { connect, args } => {
            exit_quietly_on_closed_pipe();
            client_cmds::consume(args, connect)
        }
        Command::Group { connect, command } => {
            exit_quietly_on_closed_pipe();
            group_cmds::group(command, connect)
        }
        Command::Dlq { connect, command } => {
            exit_quietly_on_closed_pipe();
            group_cmds::dlq(command, connect)
        }
        Command::Cluster { connect, command } => {
            exit_quietly_on_closed_pipe();
            client_cmds::cluster(command, connect)
        }
        Command::Replay { connect, args } => {
            exit_quietly_on_closed_pipe();
            job_cmds::replay(args, connect)
        }
        Command::Job { connect, command } => {
            exit_quietly_on_closed_pipe();
            job_cmds::job(command, connect)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

impl LogFormat {
    fn as_arg(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(clap::Args)]
struct DumpArgs {
    /// The node's data directory (the node must be stopped).
    #[arg(long)]
    data_dir: std::path::PathBuf,
    /// One JSON object per record (topic, partition, offset, key, value).
    #[arg(long)]
    json: bool,
}

/// `keel dump`: every partition's committed, served records on one stopped node.
fn dump(args: DumpArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let partitions = keel_broker::inspect::committed_records(&args.data_dir).map_err(anyhow::Error::msg)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for p in partitions {
        for r in p.records {
            let text = |b: &Option<bytes::Bytes>| b.as_deref().map(|v| String::from_utf8_lossy(v).into_owned());
            if args.json {
                let line = serde_json::json!({"topic": p.topic, "partition": p.partition, "offset": r.offset, "key": text(&r.key), "value": text(&r.value)});
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "{}/{}\t{}\t{}", p.topic, p.partition, r.offset, text(&r.value).unwrap_or_default())?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
