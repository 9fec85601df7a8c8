//! `keel serve`: run one broker node until SIGTERM or SIGINT, then shut down cleanly.

use std::path::PathBuf;

use anyhow::Context;
use keel_broker::config::{ClusterConfig, Config};
use keel_broker::node::Node;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: crate::LogFormat,
    /// TOML config file (see broker/keel.example.toml). Without it, the embedded
    /// `keel dev` cluster config is used.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id (overrides the file and KEEL_NODE_ID).
    #[arg(long)]
    node_id: Option<u64>,
    /// Data directory (overrides the file and KEEL_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Async runtime worker threads (overrides the file); 0 = one per CPU core.
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Use the embedded dev cluster of this many nodes instead of a file's members.
    #[arg(long)]
    dev_nodes: Option<u16>,
    /// Base port of the embedded dev cluster.
    #[arg(long, default_value_t = keel_broker::config::DEV_BASE_PORT)]
    dev_base_port: u16,
}

pub fn resolve_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(n) = args.dev_nodes {
        config.cluster = ClusterConfig::dev(n, args.dev_base_port);
    }
    config.apply_env(std::env::vars())?;
    if let Some(id) = args.node_id {
        config.node.id = id;
    }
    if let Some(n) = args.worker_threads {
        config.node.worker_threads = n;
    }
    if let Some(dir) = &args.data_dir {
        config.node.data_dir = dir.clone();
    }
    config.validate()?;
    Ok(config)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = resolve_config(&args)?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.node.worker_threads > 0 {
        builder.worker_threads(config.node.worker_threads);
    }
    let runtime = builder.enable_all().thread_name("keel").build().context("starting the async runtime")?;
    runtime.block_on(async move {
        // Handlers before startup, so a signal during startup still shuts down cleanly.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        // Startup can wait for peers (a node with no state asks them whether the
        // cluster exists), so a signal must be able to end it.
        let node = tokio::select! {
            node = Node::start(config) => node?,
            _ = term.recv() => { tracing::info!("SIGTERM during startup: exiting"); return Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT during startup: exiting"); return Ok(()) }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        node.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}
