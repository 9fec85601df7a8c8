//! `keel dev` as a user runs it: real processes, PID files, the bootstrap file, a
//! produce through the client API, SIGTERM stopping every node, and a restart on the
//! same directory finding the data intact.

mod dev_cluster;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_net::{CallError, Caller};
use keel_protocol::api::client as api;
use keel_protocol::batch::{BatchBuilder, BatchOptions, NewRecord};
use keel_protocol::message::{self, *};
use keel_protocol::ErrorCode;

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

fn stop(mut dev: Child, pids: &[u32]) {
    // SAFETY: kill(2) on the keel dev process this test spawned.
    unsafe { libc::kill(dev.id() as libc::pid_t, libc::SIGTERM) };
    let status = dev.wait().unwrap();
    assert!(status.success(), "keel dev exits 0 on SIGTERM: {status}");
    for pid in pids {
        assert!(!alive(*pid), "node process {pid} stopped with keel dev");
    }
}

async fn call(addrs: &[String], api_key: u16, payload: Bytes) -> Result<Bytes, (ErrorCode, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        let caller = Caller::new(0, addrs[i % addrs.len()].clone(), None);
        match caller.call(api_key, payload.clone(), Duration::from_secs(10)).await {
            Ok(b) => return Ok(b),
            Err(CallError::Refused { code, message, .. }) if !code.is_retriable() => return Err((code, message)),
            Err(e) => assert!(Instant::now() < deadline, "no answer within 30 s: {e}"),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_dev_runs_three_processes_and_restarts_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = dev_cluster::KillNodesOnDrop(dir.path());
    let base_port = dev_cluster::base_port(21_000);
    let dev = dev_cluster::start_dev(dir.path(), base_port);
    let pids = dev_cluster::wait_for_files(dir.path());
    assert!(pids.iter().all(|p| alive(*p)), "three live node processes");
    let addrs: Vec<String> = std::fs::read_to_string(dir.path().join("bootstrap")).unwrap().split(',').map(str::to_string).collect();
    assert_eq!(addrs.len(), 3);

    let create = CreateTopicRequest { name: "t".into(), partitions: 1, replicas: 3, config: Default::default() };
    call(&addrs, api::CREATE_TOPIC, create.encode(keel_protocol::limits::PROTOCOL_VERSION_MAX)).await.unwrap();
    let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
    b.push(NewRecord { timestamp_ms: 1, value: Some(b"survives a restart"), ..NewRecord::default() }).unwrap();
    let req = ProduceRequest { topic: "t".into(), partition: 0, timeout_ms: 10_000 };
    call(&addrs, api::PRODUCE, message::encode_with_batches(&req, &[b.finish().unwrap()])).await.unwrap();
    stop(dev, &pids);

    let dev = dev_cluster::start_dev(dir.path(), base_port);
    let pids = dev_cluster::wait_for_files(dir.path());
    let fetch = FetchRequest { topic: "t".into(), partition: 0, offset: 0, max_bytes: 4096, max_wait_ms: 2000 };
    let deadline = Instant::now() + Duration::from_secs(30);
    let value = loop {
        let body = call(&addrs, api::FETCH, message::encode(&fetch)).await;
        if let Ok(body) = body {
            let (_, batches): (FetchResponse, Bytes) = message::split_with_batches(&body).unwrap();
            if let Some(view) = message::split_batches(batches).unwrap().first() {
                break view.records().next().unwrap().unwrap().value.unwrap().to_vec();
            }
        }
        assert!(Instant::now() < deadline, "the topic's data did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(value, b"survives a restart");
    stop(dev, &pids);
}
