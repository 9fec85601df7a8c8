//! The CLI as a user runs it against `keel dev`: `seq 1 N | keel produce t` (the nodes'
//! `/metrics` then count N stored messages), then one node is killed with SIGKILL, then
//! `keel consume t --from earliest --max N` returns all N values exactly once. And the
//! client commands end quietly when their output pipe closes.

use std::io::Write;
mod dev_cluster;

use std::process::Stdio;
use std::time::{Duration, Instant};

const N: u32 = 20_000;

use dev_cluster::{keel, run_ok};

#[test]
fn produce_kill_a_node_then_consume_returns_every_value_once() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = dev_cluster::KillNodesOnDrop(dir.path());
    let base_port = dev_cluster::base_port(23_000);
    let mut dev = dev_cluster::start_dev(dir.path(), base_port);
    dev_cluster::wait_for_files(dir.path());
    let bootstrap = std::fs::read_to_string(dir.path().join("bootstrap")).unwrap();

    run_ok(keel(&bootstrap).args(["topic", "create", "t", "--partitions", "3", "--replicas", "3"]));
    // Enough partitions beside it for `keel cluster status` to summarise.
    run_ok(keel(&bootstrap).args(["topic", "create", "wide", "--partitions", "60", "--replicas", "3"]));
    let mut produce = keel(&bootstrap).args(["produce", "t"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        let mut stdin = std::io::BufWriter::new(produce.stdin.take().unwrap());
        for i in 1..=N {
            writeln!(stdin, "{i}").unwrap();
        }
    }
    let out = produce.wait_with_output().unwrap();
    assert!(out.status.success(), "produce failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{N} messages acknowledged"));

    // Every node's /metrics: the stored-message counters add up to what was sent.
    let stored = dev_cluster::metric_sum(bootstrap.trim().split(','), "keel_produce_messages_total{topic=\"t\"}");
    assert_eq!(stored, u64::from(N), "keel_produce_messages_total over the nodes equals the messages sent");

    // SIGKILL one node: the others must still serve every acknowledged message.
    let victim = dev_cluster::pid_of(dir.path(), 1).unwrap() as i32;
    // SAFETY: kill(2) on a node process started by this test's keel dev.
    unsafe { libc::kill(victim, libc::SIGKILL) };

    // `keel cluster status` sees the dead node and the under-replicated partitions,
    // each still led by a live node.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status: serde_json::Value = serde_json::from_str(&run_ok(keel(&bootstrap).args(["cluster", "status", "--topic", "t", "--json"]))).unwrap();
        let node1_down = status["nodes"].as_array().unwrap().iter().any(|n| n["id"] == 1 && n["up"] == false);
        let parts = status["partitions"].as_array().unwrap();
        let all_led_elsewhere = parts.iter().all(|p| p["leader"].as_u64().is_some_and(|l| l != 1));
        let all_under = parts.iter().all(|p| p["under_replicated"] == true);
        if node1_down && all_led_elsewhere && all_under && parts.len() == 3 {
            // The per-topic summary agrees with the rows (`--topic` keeps only `t`).
            let topics = status["topics"].as_array().unwrap();
            assert_eq!(topics.len(), 1, "{status}");
            assert_eq!((topics[0]["topic"].as_str(), topics[0]["partitions"].as_u64(), topics[0]["under_replicated"].as_u64()), (Some("t"), Some(3), Some(3)));
            let led: u64 = topics[0]["led_by"].as_array().unwrap().iter().map(|l| l["partitions"].as_u64().unwrap()).sum();
            assert_eq!(led, 3, "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "cluster status never showed the failover: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Over 50 partitions the text output summarises per topic and lists only the
    // troubled partitions (all 63 are under-replicated with node 1 down: the first 50).
    let text = run_ok(keel(&bootstrap).args(["cluster", "status"]));
    assert!(text.contains("TOPIC                 PARTITIONS  NO LEADER  UNDER-REPLICATED"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("wide ") && l.split_whitespace().nth(1) == Some("60")), "{text}");
    assert!(text.contains("partitions without a leader or under-replicated: 63 of 63 (the first 50"), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("t/") || l.starts_with("wide/")).count(), 50, "{text}");

    let consumed = run_ok(keel(&bootstrap).args(["consume", "t", "--from", "earliest", "--max", &N.to_string(), "--idle-timeout", "30s"]));
    let mut values: Vec<u32> = consumed.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(values.len(), N as usize, "consume returned {} lines", values.len());
    values.sort_unstable();
    values.dedup();
    assert_eq!(values.len(), N as usize, "every value exactly once");
    assert_eq!((values[0], values[values.len() - 1]), (1, N));

    // SAFETY: kill(2) on the keel dev process this test spawned.
    unsafe { libc::kill(dev.id() as i32, libc::SIGTERM) };
    assert!(dev.wait().unwrap().success());
}

/// `keel … | head -1` used to end in a panic and a backtrace when head closed the pipe.
#[test]
fn a_client_command_whose_output_pipe_closes_exits_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = dev_cluster::KillNodesOnDrop(dir.path());
    let mut dev = dev_cluster::start_dev(dir.path(), dev_cluster::base_port(23_500));
    dev_cluster::wait_for_files(dir.path());
    let bootstrap = std::fs::read_to_string(dir.path().join("bootstrap")).unwrap();
    run_ok(keel(&bootstrap).args(["topic", "create", "p", "--partitions", "1", "--replicas", "3"]));
    let mut produce = keel(&bootstrap).args(["produce", "p"]).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    {
        let mut stdin = produce.stdin.take().unwrap();
        for i in 0..5000 {
            writeln!(stdin, "line {i}").unwrap();
        }
    }
    assert!(produce.wait().unwrap().success());
    let mut consume = keel(&bootstrap).args(["consume", "p", "--idle-timeout", "5s"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        use std::io::BufRead;
        let mut first = String::new();
        std::io::BufReader::new(consume.stdout.take().unwrap()).read_line(&mut first).unwrap();
        assert_eq!(first.trim(), "line 0");
        // Dropping the reader closes the pipe, as `head -1` does.
    }
    let out = consume.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    assert!(out.status.success() || out.status.signal() == Some(libc::SIGPIPE), "ends quietly: {:?}", out.status);
    // SAFETY: kill(2) on the keel dev process this test spawned.
    unsafe { libc::kill(dev.id() as i32, libc::SIGTERM) };
    assert!(dev.wait().unwrap().success());
}

/// Group directories (other than the metadata group's) on `node`.
fn partition_group_dirs(dir: &std::path::Path, node: u32) -> usize {
    std::fs::read_dir(dir.join(format!("node{node}/groups")))
        .map(|d| d.filter_map(|e| e.ok()).filter(|e| e.file_name() != "00000000000000000000").count())
        .unwrap_or(0)
}

/// `keel topic delete` removes the topic's partitions from every node, its name can be
/// used again by a new, empty topic, and followers do not keep the replication streams
/// of deleted groups (`keel_append_streams_open` stays bounded over create/delete
/// cycles: with the streams of every deleted group kept it grows by 2 per node and cycle).
#[test]
fn a_deleted_topic_leaves_no_partition_behind_and_its_name_starts_empty_again() {
    const CYCLES: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = dev_cluster::KillNodesOnDrop(dir.path());
    let mut dev = dev_cluster::start_dev(dir.path(), dev_cluster::base_port(23_800));
    dev_cluster::wait_for_files(dir.path());
    let bootstrap = std::fs::read_to_string(dir.path().join("bootstrap")).unwrap();
    let produce = |lines: std::ops::Range<u32>| {
        let mut p = keel(&bootstrap).args(["produce", "doomed"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        {
            let mut stdin = p.stdin.take().unwrap();
            for i in lines {
                writeln!(stdin, "{i}").unwrap();
            }
        }
        p.wait_with_output().unwrap()
    };
    for cycle in 0..CYCLES {
        run_ok(keel(&bootstrap).args(["topic", "create", "doomed", "--partitions", "1", "--replicas", "3"]));
        let base = 1000 * cycle as u32;
        let out = produce(base..base + 100);
        assert!(out.status.success(), "cycle {cycle}: produce failed: {}", String::from_utf8_lossy(&out.stderr));
        // Only this cycle's messages: the name starts empty again.
        let consumed = run_ok(keel(&bootstrap).args(["consume", "doomed", "--from", "earliest", "--max", "100", "--idle-timeout", "10s"]));
        let values: Vec<u32> = consumed.lines().map(|l| l.parse().unwrap()).collect();
        assert_eq!(values, (base..base + 100).collect::<Vec<_>>(), "cycle {cycle}: the new topic holds only its own messages");
        assert_eq!(run_ok(keel(&bootstrap).args(["topic", "delete", "doomed"])).trim(), "deleted topic doomed");
        let deadline = Instant::now() + Duration::from_secs(20);
        while (1..=3).any(|n| partition_group_dirs(dir.path(), n) > 0) {
            assert!(Instant::now() < deadline, "cycle {cycle}: a node kept the deleted partition's directory");
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = produce(0..1);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("doomed"), "cycle {cycle}: producing to a deleted topic fails naming it: {stderr}");
    }
    // Every node follows the metadata group and this cycle's partition at most from two
    // leaders each; the streams of the deleted partitions are gone.
    run_ok(keel(&bootstrap).args(["topic", "create", "doomed", "--partitions", "1", "--replicas", "3"]));
    assert!(produce(0..10).status.success());
    for addr in bootstrap.trim().split(',') {
        let open = dev_cluster::metric_sum([addr], "keel_append_streams_open "); // not `_opened_total`
        eprintln!("{addr}: {open} replication streams open");
        assert!(open <= 4, "{addr} holds {open} replication streams after {CYCLES} deleted topics");
    }
    // SAFETY: kill(2) on the keel dev process this test spawned.
    unsafe { libc::kill(dev.id() as i32, libc::SIGTERM) };
    assert!(dev.wait().unwrap().success());
}
