//! A node slow to start on a brand-new cluster: its peer listener answers the others'
//! first-start probes ("no such group here"), so they form the metadata group without
//! it; it opens its own metadata group only later (`KEEL_TEST_METADATA_OPEN_DELAY_MS`),
//! finds a leader with a log, and must be refilled like a wiped node (`node/rejoin.rs`).
//! Checked: it ends up holding the metadata — a topic created while it was away is in
//! its metadata answer and it hosts the topic's partitions — and votes again, so that
//! the cluster survives losing another node. (`tests/netns_partition.rs` once failed
//! with a node that never held the metadata; this is the late start it had.)

mod dev_cluster;

use std::path::Path;
use std::time::{Duration, Instant};

use dev_cluster::{keel, restart_node_with_env as start};

/// How long node 2 holds back its metadata group.
const LATE_MS: &str = "3000";

/// Waits until `check` passes, or fails the test saying `what`, with the nodes' logs
/// in `dir`.
fn eventually(dir: &Path, what: &str, within: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(()) => return,
            Err(last) if Instant::now() >= deadline => {
                for node in 1..=3 {
                    let log = std::fs::read_to_string(dir.join(format!("node{node}-restarted.log"))).unwrap_or_default();
                    let lines: Vec<&str> = log.lines().collect();
                    eprintln!("---- node {node} log, last 80 of {} lines ----", lines.len());
                    lines[lines.len().saturating_sub(80)..].iter().for_each(|l| eprintln!("{l}"));
                }
                panic!("{what} within {within:?}; last: {last}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn a_node_that_opens_its_metadata_after_the_cluster_formed_is_refilled_and_votes_again() {
    let dir = tempfile::tempdir().unwrap();
    let base_port = dev_cluster::base_port(19_000);
    let addr = |n: u16| format!("127.0.0.1:{}", base_port + n - 1);
    let mut nodes = vec![
        // Each node's output goes to `dir/node<N>-restarted.log`.
        start(dir.path(), base_port, 1, &[]),
        start(dir.path(), base_port, 2, &[("KEEL_TEST_METADATA_OPEN_DELAY_MS", LATE_MS)]),
        start(dir.path(), base_port, 3, &[]),
    ];
    // The topic is created through node 1 while node 2 has not opened its metadata.
    eventually(dir.path(), "nodes 1 and 3 accepted a topic", Duration::from_secs(30), || {
        let out = keel(&addr(1)).args(["topic", "create", "t", "--partitions", "3", "--replicas", "3"]).output().unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });

    // Node 2's own metadata answer lists the topic, and node 2 reports hosting its
    // three partitions.
    eventually(dir.path(), "node 2 held the topic's metadata and hosted its partitions", Duration::from_secs(30), || {
        let out = keel(&addr(2)).args(["cluster", "status", "--topic", "t", "--json"]).output().unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|_| String::from_utf8_lossy(&out.stderr).into_owned())?;
        let parts = status["partitions"].as_array().ok_or("no partitions")?;
        let full = parts.len() == 3 && parts.iter().all(|p| p["replica_lag"].as_array().is_some_and(|l| l.iter().all(|r| r["lag"].as_u64().is_some())));
        if full {
            Ok(())
        } else {
            Err(status.to_string())
        }
    });
    let log2 = std::fs::read_to_string(dir.path().join("node2-restarted.log")).unwrap();
    assert!(log2.contains("refilling a group whose local state was lost"), "node 2 went through the refill: {log2}");

    // Node 2 votes again: with node 1 gone, nodes 2 and 3 elect leaders and take writes.
    drop(nodes.remove(0));
    eventually(dir.path(), "nodes 2 and 3 acknowledged a write without node 1", Duration::from_secs(30), || {
        let out = keel(&format!("{},{}", addr(2), addr(3))).args(["produce", "t", "--timeout", "5s", "after-node-1"]).output().unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
}
