//! Regression (found while stopping a soak): `keel-jepsen run` had no signal handling,
//! so SIGINT or SIGTERM left its `keel serve` processes running and its network
//! namespaces behind. Now an interrupted run kills its nodes and removes its namespaces.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `keel` binary the workspace build put beside `keel-jepsen`.
fn keel_binary() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_keel-jepsen")).parent().expect("a target dir").to_path_buf();
    let keel = dir.join("keel");
    assert!(keel.exists(), "{} is missing: build the workspace (cargo test --workspace builds it)", keel.display());
    keel
}

/// PIDs of `keel serve` processes whose command line mentions `needle`.
fn nodes_running(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("serve") && cmdline.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn an_interrupted_run_kills_its_nodes() {
    let store = tempfile::tempdir().expect("temp dir");
    let needle = store.path().to_string_lossy().to_string();
    let mut run = Command::new(env!("CARGO_BIN_EXE_keel-jepsen"))
        .args(["run", "--no-netns", "--time", "60s", "--faults", "kill", "--seed", "4242", "--keel"])
        .arg(keel_binary())
        .arg("--store")
        .arg(store.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keel-jepsen");
    let deadline = Instant::now() + Duration::from_secs(60);
    while nodes_running(&needle).len() < 3 {
        assert!(Instant::now() < deadline, "the run's three nodes did not start within 60 s");
        assert!(run.try_wait().expect("poll the run").is_none(), "the run ended before its nodes started");
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: kill(2) on the PID of the child this test started.
    unsafe {
        libc::kill(run.id() as libc::pid_t, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = run.try_wait().expect("poll the run") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = run.kill();
            panic!("the interrupted run did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "an interrupted run is not a valid run");
    let left = nodes_running(&needle);
    for pid in &left {
        // Clean up after a failure: these are the nodes of the run this test started.
        unsafe {
            libc::kill(*pid as libc::pid_t, libc::SIGKILL);
        }
    }
    assert!(left.is_empty(), "nodes still running after the interrupted run exited: {left:?}");
}
