//! The `keel serve` processes of a run: started from one generated config, each in its
//! node namespace (or on loopback ports without namespaces), each logging to
//! `nodeN.log` in the run's directory. Only the processes started here are ever
//! signalled, by PID; all are killed when the `Nodes` drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::topology::Topology;

/// Ports in namespaces (every node has its own address).
const NETNS_CLIENT_PORT: u16 = 9092;
/// How long a SIGTERMed node gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Where the nodes listen.
pub enum Placement {
    /// Node `i` at `10.77.0.i` in its own namespace.
    Namespaces(Topology),
    /// Node `i` on 127.0.0.1, client port `base + i - 1`, peer `+100`, admin `+200`.
    Loopback { base_port: u16 },
}

struct Proc {
    child: Option<Child>,
    paused: bool,
}

/// The nodes of one run.
pub struct Nodes {
    keel: PathBuf,
    /// Extra environment of every node (`KEEL_SABOTAGE`).
    env: Vec<(String, String)>,
    dir: PathBuf,
    config: PathBuf,
    pub placement: Placement,
    procs: Vec<Proc>,
}

impl Nodes {
    /// Writes the cluster config for `count` nodes and starts them all.
    pub fn start(keel: &Path, dir: &Path, placement: Placement, count: u32, env: Vec<(String, String)>) -> Result<Nodes, String> {
        let config = dir.join("cluster.toml");
        let mut toml = String::from("[node]\nid = 1\ndata_dir = \"unused\"\n\n[cluster]\nname = \"jepsen\"\n");
        for i in 1..=count {
            let (client, peer, admin) = Nodes::addrs_of(&placement, i);
            toml += &format!("\n[[cluster.members]]\nid = {i}\nclient_addr = \"{client}\"\npeer_addr = \"{peer}\"\nadmin_addr = \"{admin}\"\n");
        }
        std::fs::write(&config, toml).map_err(|e| format!("writing {}: {e}", config.display()))?;
        let mut nodes = Nodes { keel: keel.to_path_buf(), env, dir: dir.to_path_buf(), config, placement, procs: Vec::new() };
        for _ in 1..=count {
            nodes.procs.push(Proc { child: None, paused: false });
        }
        for i in 1..=count {
            nodes.spawn(i)?;
        }
        Ok(nodes)
    }

    fn addrs_of(placement: &Placement, node: u32) -> (String, String, String) {
        match placement {
            Placement::Namespaces(_) => {
                let host = Topology::addr(node);
                (format!("{host}:{NETNS_CLIENT_PORT}"), format!("{host}:{}", NETNS_CLIENT_PORT + 100), format!("{host}:{}", NETNS_CLIENT_PORT + 200))
            }
            Placement::Loopback { base_port } => {
                let p = base_port + node as u16 - 1;
                (format!("127.0.0.1:{p}"), format!("127.0.0.1:{}", p + 100), format!("127.0.0.1:{}", p + 200))
            }
        }
    }

    pub fn count(&self) -> u32 {
        self.procs.len() as u32
    }

    /// Every node's client address, node 1 first.
    pub fn client_addrs(&self) -> Vec<String> {
        (1..=self.count()).map(|i| Nodes::addrs_of(&self.placement, i).0).collect()
    }

    pub fn admin_addr(&self, node: u32) -> String {
        Nodes::addrs_of(&self.placement, node).2
    }

    pub fn data_dir(&self, node: u32) -> PathBuf {
        self.dir.join(format!("node{node}"))
    }

    pub fn topology(&self) -> Option<&Topology> {
        match &self.placement {
            Placement::Namespaces(t) => Some(t),
            Placement::Loopback { .. } => None,
        }
    }

    fn proc(&mut self, node: u32) -> &mut Proc {
        &mut self.procs[node as usize - 1]
    }

    /// Starts node `node` (it must not be running).
    pub fn spawn(&mut self, node: u32) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node{node}.log")))
            .map_err(|e| format!("opening node{node}.log: {e}"))?;
        let mut cmd = match &self.placement {
            Placement::Namespaces(t) => t.command(node, &self.keel),
            Placement::Loopback { .. } => Command::new(&self.keel),
        };
        cmd.args(["serve", "--config"])
            .arg(&self.config)
            .args(["--node-id", &node.to_string(), "--data-dir"])
            .arg(self.data_dir(node))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child = cmd.spawn().map_err(|e| format!("starting node {node}: {e}"))?;
        *self.proc(node) = Proc { child: Some(child), paused: false };
        Ok(())
    }

    pub fn is_running(&mut self, node: u32) -> bool {
        match self.proc(node).child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&mut self, node: u32) -> Option<u32> {
        self.proc(node).child.as_ref().map(Child::id)
    }

    fn signal(&mut self, node: u32, sig: libc::c_int) {
        if let Some(pid) = self.pid(node) {
            // SAFETY: kill(2) on a process this harness started and has not reaped.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self, node: u32) {
        self.signal(node, libc::SIGKILL);
        if let Some(mut c) = self.proc(node).child.take() {
            let _ = c.wait();
        }
        self.proc(node).paused = false;
    }

    /// SIGTERM (the node shuts down cleanly), SIGKILL after `STOP_GRACE`.
    pub fn stop(&mut self, node: u32) {
        if self.proc(node).paused {
            self.resume(node);
        }
        self.signal(node, libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while self.is_running(node) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill(node);
    }

    pub fn pause(&mut self, node: u32) {
        self.signal(node, libc::SIGSTOP);
        self.proc(node).paused = true;
    }

    pub fn resume(&mut self, node: u32) {
        self.signal(node, libc::SIGCONT);
        self.proc(node).paused = false;
    }

    pub fn is_paused(&mut self, node: u32) -> bool {
        self.proc(node).paused
    }

    /// Deletes node `node`'s data directory (it must be stopped).
    pub fn wipe(&mut self, node: u32) -> Result<(), String> {
        assert!(!self.is_running(node), "wipe a stopped node only");
        let dir = self.data_dir(node);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("wiping {}: {e}", dir.display())),
        }
    }

    /// `keel dump --json` of node `node`'s data directory (the node must be stopped):
    /// one JSON object per committed record.
    pub fn dump(&self, node: u32) -> Result<Vec<serde_json::Value>, String> {
        // With the nodes' environment: a sabotaged node's log is replayed as it applied it.
        let out = Command::new(&self.keel)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(["dump", "--json", "--data-dir"])
            .arg(self.data_dir(node))
            .output()
            .map_err(|e| format!("keel dump: {e}"))?;
        if !out.status.success() {
            return Err(format!("keel dump of node {node}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).map_err(|e| format!("keel dump output: {e}"))).collect()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for i in 1..=self.count() {
            if self.proc(i).paused {
                self.resume(i);
            }
            self.kill(i);
        }
    }
}
