//! `keel`: the broker (`serve`), a local three-node cluster (`dev`), and — as the client
//! library lands — the admin, produce and consume commands.

mod client_cmds;
mod dev;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "keel", version, about = "Keel: a replicated, durable event bus")]
struct Cli {
    /// Log format for broker processes.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    connect: client_cmds::Connect,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run one broker node.
    Serve(serve::ServeArgs),
    /// Run a local cluster of broker processes with the embedded default config.
    Dev(dev::DevArgs),
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(client_cmds::TopicCommand),
    /// Send messages: the MESSAGE argument, or one per line of standard input.
    Produce(client_cmds::ProduceArgs),
    /// Read a topic (stream mode), one message per line.
    Consume(client_cmds::ConsumeArgs),
    /// Cluster-wide views.
    #[command(subcommand)]
    Cluster(client_cmds::ClusterCommand),
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            init_logs(cli.log_format);
            serve::run(args)
        }
        Command::Dev(args) => dev::run(args, cli.log_format),
        Command::Topic(cmd) => client_cmds::topic(cmd, cli.connect),
        Command::Produce(args) => client_cmds::produce(args, cli.connect),
        Command::Consume(args) => client_cmds::consume(args, cli.connect),
        Command::Cluster(cmd) => client_cmds::cluster(cmd, cli.connect),
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
