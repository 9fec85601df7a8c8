//! Node recovery with real processes (`keel dev` plus a node restarted by hand):
//! a follower killed with SIGKILL restarts on its directory and catches up; a node whose
//! data directory is wiped is refilled from its peers — proven by killing another node
//! afterwards, so that every later write must be acknowledged by the refilled node, and
//! by comparing its logs with a peer's entry by entry.

mod dev_cluster;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const VICTIM: u32 = 3;

use dev_cluster::{keel, run_ok};

/// Produces the values `from..to` (one per line) and checks every one was acknowledged.
fn produce(bootstrap: &str, from: u32, to: u32) {
    let mut p = keel(bootstrap).args(["produce", "r"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        let mut stdin = std::io::BufWriter::new(p.stdin.take().unwrap());
        for i in from..to {
            writeln!(stdin, "{i}").unwrap();
        }
    }
    let out = p.wait_with_output().unwrap();
    assert!(out.status.success(), "produce failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{} messages acknowledged", to - from));
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a process this test started (directly or through keel dev).
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Starts node `VICTIM` on `dir/nodeN` exactly as `keel dev` does.
fn start_victim(dir: &Path, base_port: u16) -> dev_cluster::NodeProcess {
    dev_cluster::restart_node(dir, base_port, VICTIM)
}

/// Waits until every partition's leader reports the victim fully caught up.
fn wait_caught_up(bootstrap: &str, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let out = keel(bootstrap).args(["cluster", "status", "--json"]).output().unwrap();
        if out.status.success() {
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let parts = status["partitions"].as_array().unwrap();
            let caught_up =
                parts.len() == 3 && parts.iter().all(|p| p["replica_lag"].as_array().unwrap().iter().any(|r| r["replica"] == VICTIM && r["lag"] == 0));
            if caught_up {
                return started.elapsed();
            }
            assert!(started.elapsed() < Duration::from_secs(60), "{what}: node {VICTIM} never caught up: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_killed_follower_catches_up_and_a_wiped_node_is_refilled_from_its_peers() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = dev_cluster::KillNodesOnDrop(dir.path());
    let base_port = dev_cluster::base_port(27_000);
    let mut dev = dev_cluster::start_dev(dir.path(), base_port);
    dev_cluster::wait_for_files(dir.path());
    let bootstrap = std::fs::read_to_string(dir.path().join("bootstrap")).unwrap();
    run_ok(keel(&bootstrap).args(["topic", "create", "r", "--partitions", "3", "--replicas", "3"]));
    produce(&bootstrap, 0, 3000);

    // 1. SIGKILL the victim, write while it is down, restart it on its directory.
    kill(dev_cluster::pid_of(dir.path(), VICTIM).unwrap(), libc::SIGKILL);
    produce(&bootstrap, 3000, 4000);
    let victim = start_victim(dir.path(), base_port);
    let took = wait_caught_up(&bootstrap, "after a restart");
    eprintln!("restarted node caught up in {took:?}");

    // 2. SIGKILL it again, wipe its data directory, write, restart it empty.
    drop(victim);
    std::fs::remove_dir_all(dir.path().join(format!("node{VICTIM}"))).unwrap();
    produce(&bootstrap, 4000, 5000);
    let victim = start_victim(dir.path(), base_port);
    let took = wait_caught_up(&bootstrap, "after a wipe");
    eprintln!("wiped node refilled in {took:?}");

    // 3. Kill another node: every write from now on needs the refilled node's
    //    acknowledgement, which Raft gives only if its log holds the whole prefix.
    kill(dev_cluster::pid_of(dir.path(), 1).unwrap(), libc::SIGKILL);
    produce(&bootstrap, 5000, 5500);
    let consumed = run_ok(keel(&bootstrap).args(["consume", "r", "--from", "earliest", "--max", "5500", "--idle-timeout", "30s"]));
    let mut values: Vec<u32> = consumed.lines().map(|l| l.parse().unwrap()).collect();
    values.sort_unstable();
    values.dedup();
    assert_eq!(values, (0..5500).collect::<Vec<_>>(), "every acknowledged value is read back");

    // 4. Stop both survivors cleanly; the refilled node's logs equal node 2's entry by
    //    entry (metadata group and every partition).
    kill(victim.0.id(), libc::SIGTERM);
    kill(dev.id(), libc::SIGTERM);
    assert!(dev.wait().unwrap().success());
    let mut victim = victim;
    let deadline = Instant::now() + Duration::from_secs(20);
    while victim.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the restarted node did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let refilled = dev_cluster::group_logs(&dir.path().join(format!("node{VICTIM}/groups")));
    let reference = dev_cluster::group_logs(&dir.path().join("node2/groups"));
    assert_eq!(refilled.len(), 4, "the metadata group and three partitions");
    assert_eq!(refilled.iter().map(|(g, _)| g).collect::<Vec<_>>(), reference.iter().map(|(g, _)| g).collect::<Vec<_>>());
    for ((group, mine), (_, theirs)) in refilled.iter().zip(&reference) {
        assert!(!mine.is_empty(), "group {group} is empty on the refilled node");
        assert_eq!(mine.len(), theirs.len(), "group {group}: entry count differs");
        assert!(mine == theirs, "group {group}: entries differ from node 2's");
    }
}
