//! `keel dev`: a local cluster of `keel serve` child processes with the embedded config.
//!
//! Each node runs as its own process (so any one can be killed), with its data under
//! `DIR/nodeN`, its PID in `DIR/nodeN/keel.pid` and its log in `DIR/nodeN/keel.log`;
//! `DIR/bootstrap` holds the client addresses, comma-separated. Ctrl-C or SIGTERM stops
//! every node (SIGTERM, then SIGKILL after a grace period). Run it again on the same
//! directory and the cluster comes back with its data.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_broker::config::ClusterConfig;

use crate::LogFormat;

/// How long nodes get to stop after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for every node's client port to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct DevArgs {
    /// Where the nodes keep their data.
    #[arg(long, default_value = "keel-data")]
    data_dir: PathBuf,
    /// How many nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    nodes: u16,
    /// Node N listens on client port P+N-1, peer P+100+N-1, admin P+200+N-1.
    #[arg(long, default_value_t = keel_broker::config::DEV_BASE_PORT)]
    base_port: u16,
    /// Log format of the node processes (their logs go to DIR/nodeN/keel.log).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

struct Running {
    id: u64,
    child: Child,
    pid_file: PathBuf,
}

pub fn run(args: DevArgs) -> anyhow::Result<()> {
    let log_format = args.log_format;
    // Signal handlers first: a SIGTERM that arrives while the nodes start must stop
    // them, not kill this process and orphan them. The streams record signals that
    // arrive before they are polled.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut term, mut int) = {
        let _guard = runtime.enter();
        use tokio::signal::unix::{signal, SignalKind};
        (signal(SignalKind::terminate()).context("installing the SIGTERM handler")?, signal(SignalKind::interrupt()).context("installing the SIGINT handler")?)
    };
    let cluster = ClusterConfig::dev(args.nodes, args.base_port);
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let exe = std::env::current_exe().context("finding the keel executable")?;
    // The nodes share this machine: each gets an equal share of the cores as runtime
    // workers (fewer threads competing for the same cores, fewer cross-thread wakeups).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = (cores / usize::from(args.nodes.max(1))).max(1);
    let mut running = Vec::new();
    for m in &cluster.members {
        let dir = args.data_dir.join(format!("node{}", m.id));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("keel.log")).context("opening the node log")?;
        let child = Command::new(&exe)
            .args(["serve", "--log-format", log_format.as_arg(), "--dev-nodes"])
            .arg(args.nodes.to_string())
            .arg("--dev-base-port")
            .arg(args.base_port.to_string())
            .arg("--node-id")
            .arg(m.id.to_string())
            .arg("--worker-threads")
            .arg(workers.to_string())
            .arg("--data-dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {}", m.id))?;
        let pid_file = dir.join("keel.pid");
        std::fs::write(&pid_file, format!("{}\n", child.id())).context("writing the pid file")?;
        running.push(Running { id: m.id, child, pid_file });
    }
    let bootstrap: Vec<&str> = cluster.members.iter().map(|m| m.client_addr.as_str()).collect();
    std::fs::write(args.data_dir.join("bootstrap"), bootstrap.join(",")).context("writing the bootstrap file")?;

    println!("keel dev: {} nodes, data in {}", args.nodes, args.data_dir.display());
    for m in &cluster.members {
        let pid = running.iter().find(|r| r.id == m.id).map_or(0, |r| r.child.id());
        println!(
            "  node {}  pid {pid:<7}  client {}  peer {}  admin {}  log {}",
            m.id,
            m.client_addr,
            m.peer_addr,
            m.admin_addr,
            args.data_dir.join(format!("node{}/keel.log", m.id)).display()
        );
    }
    wait_ready(&bootstrap, &mut running);
    println!("bootstrap: {}   (Ctrl-C stops every node)", bootstrap.join(","));

    runtime.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick() => {
                    for r in &mut running {
                        if let Ok(Some(status)) = r.child.try_wait() {
                            if r.pid_file.exists() {
                                eprintln!("node {} exited ({status}); the others keep running", r.id);
                                let _ = std::fs::remove_file(&r.pid_file);
                            }
                        }
                    }
                    if running.iter().all(|r| !r.pid_file.exists()) {
                        eprintln!("every node has exited");
                        break;
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    stop_all(&mut running);
    Ok(())
}

fn wait_ready(addrs: &[&str], running: &mut [Running]) {
    let deadline = Instant::now() + READY_TIMEOUT;
    for addr in addrs {
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                eprintln!("warning: {addr} is not accepting connections after {READY_TIMEOUT:?}; see the node logs");
                return;
            }
            if running.iter_mut().any(|r| matches!(r.child.try_wait(), Ok(Some(_)))) {
                eprintln!("warning: a node exited during startup; see its keel.log");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped); no memory
    // is shared with the callee.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

fn stop_all(running: &mut [Running]) {
    for r in running.iter_mut() {
        if matches!(r.child.try_wait(), Ok(None)) {
            signal(r.child.id(), libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for r in running.iter_mut() {
        loop {
            match r.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    eprintln!("node {} did not stop within {STOP_GRACE:?}; killing it", r.id);
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let _ = std::fs::remove_file(&r.pid_file);
    }
    println!("keel dev: stopped");
}
