//! Starting `keel dev` as a child process for tests, and reading its files.

pub mod dev;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `keel` (the CLI) pointed at `bootstrap`.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn keel(bootstrap: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keel"));
    c.env("KEEL_BOOTSTRAP", bootstrap);
    c
}

/// Runs `cmd`, fails the test with its stderr unless it succeeds, returns its stdout.
#[allow(dead_code)]
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Starts `keel dev` on `dir` with client ports from `base_port`.
#[allow(dead_code)] // not every test binary uses every helper
pub fn start_dev(dir: &Path, base_port: u16) -> Child {
    start_dev_with_env(dir, base_port, &[])
}

/// [`start_dev`] with `env` (`KEEL_*` overrides) in the nodes' environment.
pub fn start_dev_with_env(dir: &Path, base_port: u16, env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .envs(env.iter().copied())
        .args(["dev", "--data-dir"])
        .arg(dir)
        .args(["--base-port", &base_port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the keel binary starts")
}

/// The PID `keel dev` wrote for `node`, once the file exists.
pub fn pid_of(dir: &Path, node: u32) -> Option<u32> {
    std::fs::read_to_string(dir.join(format!("node{node}/keel.pid"))).ok()?.trim().parse().ok()
}

/// Waits until all three PID files and the bootstrap file exist; returns the PIDs.
pub fn wait_for_files(dir: &Path) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pids: Vec<u32> = (1..=3).filter_map(|n| pid_of(dir, n)).collect();
        if pids.len() == 3 && dir.join("bootstrap").exists() {
            return pids;
        }
        assert!(Instant::now() < deadline, "keel dev wrote no pid/bootstrap files");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Lowest port of the kernel's ephemeral range (`ip_local_port_range`, 32768 on
/// Linux by default): a node port at or above it can be taken at any moment by some
/// outgoing connection's local port, and the node then fails to bind.
const EPHEMERAL_PORTS_START: u16 = 32_768;

/// The ports a three-node `keel dev` / `--dev-nodes 3` cluster on `base` listens on
/// (client, peer and admin of each node), from the embedded configuration itself.
fn dev_ports(base: u16) -> Vec<u16> {
    keel_broker::config::ClusterConfig::dev(3, base)
        .members
        .iter()
        .flat_map(|m| [&m.client_addr, &m.peer_addr, &m.admin_addr])
        .map(|a| a.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("a dev address ends in a port"))
        .collect()
}

/// A base port for a three-node cluster, in `offset .. offset + 2000` (spread by this
/// process's id, so test binaries run one after the other rarely reuse a port still in
/// TIME_WAIT), whose nine ports are all free right now (probed by binding them). Every
/// port stays below the ephemeral range. The same `offset` gives the same base for the
/// whole test process (a test restarting a node of its cluster asks again, while the
/// other nodes hold their ports).
pub fn base_port(offset: u16) -> u16 {
    const SPREAD: u16 = 2_000;
    static CHOSEN: std::sync::Mutex<Vec<(u16, u16)>> = std::sync::Mutex::new(Vec::new());
    assert!(dev_ports(offset + SPREAD - 1).iter().all(|&p| p < EPHEMERAL_PORTS_START), "test port offset {offset} reaches the ephemeral port range");
    let mut chosen = CHOSEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&(_, base)) = chosen.iter().find(|(o, _)| *o == offset) {
        return base;
    }
    let start = (std::process::id() % u32::from(SPREAD)) as u16;
    let base = (0..SPREAD)
        .step_by(7)
        .map(|step| offset + (start + step) % SPREAD)
        .find(|&base| dev_ports(base).into_iter().all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()))
        .unwrap_or_else(|| panic!("no base port in {offset}..{} has its nine node ports free", offset + SPREAD));
    chosen.push((offset, base));
    base
}

/// Kills any node still listed in `dir`'s PID files when dropped, so a failing test
/// leaves no processes behind. (After a clean stop `keel dev` has removed the files, and
/// this does nothing; `keel dev` itself exits once all its nodes are gone.)
#[allow(dead_code)]
pub struct KillNodesOnDrop<'a>(pub &'a Path);

impl Drop for KillNodesOnDrop<'_> {
    fn drop(&mut self) {
        for node in 1..=3 {
            if let Some(pid) = pid_of(self.0, node) {
                // SAFETY: kill(2) on a node process this test's keel dev started.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

/// The client addresses `keel dev` wrote to its bootstrap file.
#[allow(dead_code)]
pub fn bootstrap_addrs(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("bootstrap")).unwrap().trim().split(',').map(str::to_string).collect()
}

/// The admin address of the node whose client address is `client_addr` (`keel dev`
/// puts it 200 ports above).
#[allow(dead_code)]
pub fn admin_addr(client_addr: &str) -> String {
    let (host, port) = client_addr.rsplit_once(':').unwrap();
    format!("{host}:{}", port.parse::<u16>().unwrap() + 200)
}

/// `POST path` with a JSON body on a node's admin listener; returns the status line.
#[allow(dead_code)]
pub fn admin_post(admin: &str, path: &str, json: &str) -> String {
    use std::io::{Read, Write};
    // A node serves its admin listener a moment after the cluster answers clients (a
    // topic can be led by two nodes while the third is still starting): wait for it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match std::net::TcpStream::connect(admin) {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("the admin listener at {admin} does not answer: {e}"),
        }
    };
    write!(s, "POST {path} HTTP/1.0\r\nHost: {admin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}", json.len()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer.lines().next().unwrap_or_default().to_string()
}

/// `GET path` on a node's admin listener; returns the body.
#[allow(dead_code)]
pub fn admin_get(admin: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

/// SIGKILLs every node listed in `dir`'s PID files and waits until they are gone.
#[allow(dead_code)]
pub fn kill_all_nodes(dir: &Path) {
    let pids: Vec<u32> = (1..=3).filter_map(|n| pid_of(dir, n)).collect();
    for pid in &pids {
        // SAFETY: kill(2) on a node process this test's keel dev started.
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: kill(pid, 0) only checks that the process exists.
    while pids.iter().any(|p| unsafe { libc::kill(*p as libc::pid_t, 0) } == 0) {
        assert!(Instant::now() < deadline, "killed nodes did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sum, over the nodes with these client addresses, of every `/metrics` series whose
/// line starts with `series` (a metric name with `{` or with its labels).
#[allow(dead_code)]
pub fn metric_sum<'a>(client_addrs: impl IntoIterator<Item = &'a str>, series: &str) -> u64 {
    client_addrs
        .into_iter()
        .map(|addr| admin_get(&admin_addr(addr), "/metrics"))
        .flat_map(|text| text.lines().filter(|l| l.starts_with(series)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).collect::<Vec<_>>())
        .sum()
}

/// The largest value, over the nodes with these client addresses that answer, of the
/// `/metrics` series whose line starts with `series`; `None` when no node has one.
#[allow(dead_code)]
pub fn metric_max<'a>(client_addrs: impl IntoIterator<Item = &'a str>, series: &str) -> Option<f64> {
    client_addrs
        .into_iter()
        .filter_map(|addr| try_admin_get(&admin_addr(addr), "/metrics"))
        .flat_map(|text| text.lines().filter(|l| l.starts_with(series)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).collect::<Vec<_>>())
        .reduce(f64::max)
}

/// `GET path` on a node's admin listener; `None` if the node does not answer.
#[allow(dead_code)]
pub fn try_admin_get(admin: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    answer.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// A node process a test started itself ([`restart_node`]); SIGKILLed when dropped.
#[allow(dead_code)]
pub struct NodeProcess(pub Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts node `node` of a `keel dev` cluster (client ports from `base_port`) on
/// `dir/node<N>` exactly as `keel dev` does, after the test killed it; output goes to
/// `dir/node<N>-restarted.log`.
#[allow(dead_code)]
pub fn restart_node(dir: &Path, base_port: u16, node: u32) -> NodeProcess {
    restart_node_with_env(dir, base_port, node, &[])
}

/// [`restart_node`] with `KEEL_*` overrides in the node's environment.
pub fn restart_node_with_env(dir: &Path, base_port: u16, node: u32, env: &[(&str, &str)]) -> NodeProcess {
    let node_dir = dir.join(format!("node{node}"));
    std::fs::create_dir_all(&node_dir).unwrap();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("node{node}-restarted.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .envs(env.iter().copied())
        .args(["serve", "--dev-nodes", "3", "--dev-base-port", &base_port.to_string(), "--node-id", &node.to_string(), "--data-dir"])
        .arg(&node_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    NodeProcess(child)
}

/// One stored log entry: index, term, base offset, payload.
#[allow(dead_code)]
pub type StoredEntry = (u64, u64, u64, Vec<u8>);

/// Every entry of the log in `dir` (a stopped node's group directory).
#[allow(dead_code)]
pub fn log_entries(dir: &Path) -> Vec<StoredEntry> {
    let log = keel_storage::Log::open(dir, keel_storage::LogConfig::default()).unwrap();
    let st = log.state();
    let mut entries = Vec::new();
    let mut next = st.first_index;
    while next < st.next_index {
        let batch = log.read(next..st.next_index, u64::MAX).unwrap();
        next = batch.last().unwrap().meta.id.index + 1;
        entries.extend(batch.into_iter().map(|e| (e.meta.id.index, e.meta.id.term, e.meta.base_offset, e.payload.to_vec())));
    }
    entries
}

/// Every entry of every log under `groups` (a stopped node's `groups/`), by group
/// directory name.
#[allow(dead_code)]
pub fn group_logs(groups: &Path) -> Vec<(String, Vec<StoredEntry>)> {
    let mut dirs: Vec<_> = std::fs::read_dir(groups).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    dirs.into_iter().map(|d| (d.file_name().unwrap().to_string_lossy().into_owned(), log_entries(&d))).collect()
}

/// A client of the `keel dev` cluster in `dir`, once it has accepted topic `name` of
/// `partitions` partitions (R3; retried for up to 30 s while the cluster forms) and
/// every replica of every partition has caught up with its leader.
///
/// The wait matters to tests that then kill a node: two nodes can form the cluster,
/// create the topic and take writes before the third has joined (its data directory
/// is empty, and an empty one cannot be told from a wiped one, so it first learns
/// from a leader whether it held the group before). Kill that leader inside this
/// window and the late node — rightly — waits for it, and the survivor alone has no
/// quorum (`leader_failover` failed once in 20 this way).
#[allow(dead_code)] // not every test binary that includes this module uses it
pub async fn cluster_with_topic(dir: &Path, name: &str, partitions: u32) -> keel_client::Cluster {
    let cluster = keel_client::Cluster::new(keel_client::ClientConfig { bootstrap: bootstrap_addrs(dir), ..keel_client::ClientConfig::default() }).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = keel_client::Admin::new(cluster.clone()).create_topic(name, partitions, 3).await {
        assert!(Instant::now() < deadline, "the cluster never accepted the topic: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let caught_up = |ps: &[serde_json::Value]| {
        ps.len() == partitions as usize
            && ps.iter().all(|p| p["replica_lag"].as_array().is_some_and(|lags| lags.len() == 3 && lags.iter().all(|r| r["lag"].as_u64() == Some(0))))
    };
    wait_for_partitions(&bootstrap_addrs(dir).join(","), name, "every replica caught up", caught_up).await;
    cluster
}

/// Polls `keel cluster status --json --all --topic TOPIC` until `ok` holds for its
/// partitions (fails the test after 30 s, printing the last status).
#[allow(dead_code)]
pub async fn wait_for_partitions(bootstrap: &str, topic: &str, what: &str, ok: impl Fn(&[serde_json::Value]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = keel(bootstrap).args(["cluster", "status", "--json", "--all", "--topic", topic]).output().unwrap();
        let status: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
        if status.as_ref().and_then(|s| s["partitions"].as_array()).is_some_and(|ps| ok(ps)) {
            return;
        }
        assert!(Instant::now() < deadline, "topic {topic}: not {what} within 30 s; last status: {}", String::from_utf8_lossy(&out.stdout));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
