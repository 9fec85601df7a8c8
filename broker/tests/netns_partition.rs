//! A real network partition between real processes: three `keel serve` processes, each
//! in its own network namespace, joined by veth pairs to a bridge in a fourth (the
//! Jepsen harness' topology, `keel_jepsen::topology`). Unplugging
//! the partition leader's cable (`ip link set vN down` in the bridge namespace) cuts it
//! off in both directions while it keeps running. Checked: the isolated leader
//! acknowledges none of the writes sent to it; the majority elects a leader and
//! acknowledges new writes; after the heal every acknowledged value is read back and
//! none of the minority's.
//!
//! Needs root (network namespaces). Without them the test says so and passes, unless
//! `KEEL_REQUIRE_NETNS=1` (set by `scripts/test-all` wherever `ip netns add` works).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keel_jepsen::topology::Topology;

const CLIENT_PORT: u16 = 9092;
/// How much of each node's log a failing run prints: its start and its end.
const LOG_HEAD_LINES: usize = 150;
const LOG_TAIL_LINES: usize = 60;
/// Log lines left out of that print (repeated while a peer is cut off).
const LOG_NOISE: [&str; 4] = ["failed to send a heartbeat", "election timeout expired", "load membership from log", "load key log ids"];

/// The namespaces (`keel_jepsen::topology`) and the node processes of one run; the
/// processes are killed before the namespaces are removed (also on failure).
struct Run {
    nodes: Vec<Child>,
    topology: Topology,
    /// The nodes' log files, printed (their tails) when the test fails.
    logs: Vec<PathBuf>,
}

impl Run {
    /// `keel ARGS` run inside node `i`'s namespace, its own node first in the
    /// bootstrap list (what a client on that side of a partition can reach).
    fn keel_in(&self, i: u32, args: &[&str]) -> Command {
        let mut c = self.topology.command(i, std::path::Path::new(env!("CARGO_BIN_EXE_keel")));
        c.args(args);
        c.env("KEEL_BOOTSTRAP", bootstrap_from(i));
        c
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
        if std::thread::panicking() {
            for (i, path) in self.logs.iter().enumerate() {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                // Without the lines every unreachable peer repeats.
                let lines: Vec<&str> = text.lines().filter(|l| !LOG_NOISE.iter().any(|n| l.contains(n))).collect();
                if lines.len() <= LOG_HEAD_LINES + LOG_TAIL_LINES {
                    eprintln!("--- node {} log ({} lines) ---\n{}", i + 1, lines.len(), lines.join("\n"));
                } else {
                    let (head, tail) = (&lines[..LOG_HEAD_LINES], &lines[lines.len() - LOG_TAIL_LINES..]);
                    eprintln!(
                        "--- node {} log, first {LOG_HEAD_LINES} and last {LOG_TAIL_LINES} of {} lines ---\n{}\n[...]\n{}",
                        i + 1,
                        lines.len(),
                        head.join("\n"),
                        tail.join("\n")
                    );
                }
            }
        }
    }
}

fn bootstrap_from(first: u32) -> String {
    std::iter::once(first).chain((1..=3).filter(|i| *i != first)).map(|i| format!("10.77.0.{i}:{CLIENT_PORT}")).collect::<Vec<_>>().join(",")
}

fn config(dir: &Path) -> PathBuf {
    let mut toml = String::from("[node]\nid = 1\ndata_dir = \"unused\"\n\n[cluster]\nname = \"netns-test\"\n");
    for i in 1..=3 {
        toml += &format!(
            "\n[[cluster.members]]\nid = {i}\nclient_addr = \"10.77.0.{i}:{CLIENT_PORT}\"\npeer_addr = \"10.77.0.{i}:9192\"\nadmin_addr = \"10.77.0.{i}:9292\"\n"
        );
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Sends `values` with `keel produce` from inside node `from`'s namespace.
fn produce(t: &Run, from: u32, values: &[String], timeout: &str) -> Output {
    let mut p = t.keel_in(from, &["produce", "p", "--timeout", timeout]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        let mut stdin = p.stdin.take().unwrap();
        for v in values {
            writeln!(stdin, "{v}").unwrap();
        }
    }
    p.wait_with_output().unwrap()
}

/// Polls `keel cluster status --json` from inside node `from`'s namespace until `pick`
/// finds what it wants in it, or fails the test saying `what` with the last answer.
fn seen_from<T>(t: &Run, from: u32, within: Duration, what: &str, pick: impl Fn(&serde_json::Value) -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        let out = t.keel_in(from, &["cluster", "status", "--json"]).output().unwrap();
        if let Some(found) = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok().as_ref().and_then(&pick) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what} seen from node {from} within {within:?}; last status: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until node `from`'s own `keel cluster status` lists partition 0 with every
/// replica's lag known and zero.
fn caught_up_seen_from(t: &Run, from: u32, within: Duration) {
    seen_from(t, from, within, "no fully replicated partition 0", |status| {
        let lags = status["partitions"][0]["replica_lag"].as_array()?;
        (lags.len() == 3 && lags.iter().all(|r| r["lag"].as_u64() == Some(0))).then_some(())
    })
}

/// The leader of partition 0 as `keel cluster status` sees it from node `from`.
fn leader_seen_from(t: &Run, from: u32, not: Option<u64>, within: Duration) -> u64 {
    seen_from(t, from, within, &format!("no leader for partition 0 (other than {not:?})"), |status| {
        status["partitions"][0]["leader"].as_u64().filter(|l| Some(*l) != not)
    })
}

#[test]
fn a_leader_cut_off_by_a_real_network_partition_acknowledges_nothing() {
    let prefix = format!("k{}", std::process::id() % 100_000);
    let topology = match Topology::create(&prefix, 3) {
        Ok(t) => t,
        Err(e) => {
            assert!(std::env::var_os("KEEL_REQUIRE_NETNS").is_none(), "network namespaces are required here but unavailable: {e}");
            eprintln!("SKIPPED: network namespaces unavailable ({e}); run as root to include this test");
            return;
        }
    };
    // Made before the run so that it is removed after it: a failing run prints the
    // nodes' logs from its drop.
    let dir = tempfile::tempdir().unwrap();
    let mut t = Run { nodes: Vec::new(), topology, logs: Vec::new() };
    let cfg = config(dir.path());
    for i in 1..=3u32 {
        let log_path = dir.path().join(format!("node{i}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        t.logs.push(log_path);
        let child = t
            .topology
            .command(i, Path::new(env!("CARGO_BIN_EXE_keel")))
            // openraft's warnings too (off by default): a failing run's printout
            // then shows replication errors, not only Keel's own events.
            .env("RUST_LOG", "info,openraft=warn")
            .args(["serve", "--config"])
            .arg(&cfg)
            .args(["--node-id", &i.to_string(), "--data-dir"])
            .arg(dir.path().join(format!("node{i}")))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        t.nodes.push(child);
    }

    // Wait for the cluster, create a one-partition topic, write through the leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !t.keel_in(1, &["topic", "create", "p", "--partitions", "1", "--replicas", "3"]).output().unwrap().status.success() {
        assert!(Instant::now() < deadline, "the cluster never accepted a topic");
        std::thread::sleep(Duration::from_millis(300));
    }
    let before: Vec<String> = (0..100).map(|i| format!("before-{i}")).collect();
    ok(produce(&t, 1, &before, "30s"), "produce before the partition");
    // The cut is made on a formed cluster: every node holds the metadata and hosts the
    // partition, caught up. (A node that started late was refilled like a wiped node,
    // `node/rejoin.rs`, and does not vote until it is: cutting the leader off before
    // that leaves the other two without a quorum — twice in 30 looped runs of this
    // test, 2026-12-03, before it waited for this.)
    for i in 1..=3 {
        caught_up_seen_from(&t, i, Duration::from_secs(30));
    }
    let old = leader_seen_from(&t, 1, None, Duration::from_secs(10)) as u32;
    let majority: Vec<u32> = (1..=3).filter(|i| *i != old).collect();

    // Unplug the leader. From its own namespace only it is reachable.
    t.topology.cable(old, false).unwrap();
    let minority: Vec<String> = (0..5).map(|i| format!("minority-{i}")).collect();
    let out = produce(&t, old, &minority, "4s");
    assert!(!out.status.success(), "the isolated leader acknowledged writes: {}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 of 5 messages acknowledged"), "{}", String::from_utf8_lossy(&out.stderr));

    // The majority elects a new leader and keeps acknowledging.
    let new = leader_seen_from(&t, majority[0], Some(u64::from(old)), Duration::from_secs(45));
    assert_ne!(new as u32, old);
    let after: Vec<String> = (0..100).map(|i| format!("after-{i}")).collect();
    ok(produce(&t, majority[0], &after, "30s"), "produce on the majority side");

    // Heal: everything acknowledged is there, from any side, and nothing else.
    t.topology.cable(old, true).unwrap();
    let out = ok(t.keel_in(old, &["consume", "p", "--from", "earliest", "--idle-timeout", "5s"]).output().unwrap(), "consume after the heal");
    let mut got: Vec<&str> = out.lines().collect();
    got.sort_unstable();
    got.dedup();
    let mut want: Vec<&str> = before.iter().chain(&after).map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(got, want, "after the heal exactly the acknowledged values are present");
}
