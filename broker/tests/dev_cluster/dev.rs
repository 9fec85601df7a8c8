//! A `keel dev` cluster for a multi-process test: started in a temporary directory,
//! with a client, helpers to create topics, produce, find and kill leaders, and run
//! the CLI; every node is killed when it is dropped.
#![allow(dead_code)] // not every test binary uses every helper

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use keel_client::producer::{Producer, ProducerConfig, Record};
use keel_client::{Admin, ClientConfig, Cluster};
use keel_protocol::message::CreateTopicRequest;
use keel_protocol::TopicConfigPatch;

use super as dev_cluster;

/// Lines of each node's log a failing test prints.
const DIAGNOSTIC_LOG_LINES: usize = 60;

pub struct Dev {
    pub dir: tempfile::TempDir,
    pub process: Child,
    pub cluster: Cluster,
    pub bootstrap: String,
}

impl Dev {
    pub fn start(port_offset: u16) -> Dev {
        Dev::start_with_env(port_offset, &[])
    }

    /// [`Dev::start`] with `KEEL_*` overrides in the nodes' environment.
    pub fn start_with_env(port_offset: u16, env: &[(&str, &str)]) -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let process = dev_cluster::start_dev_with_env(dir.path(), dev_cluster::base_port(port_offset), env);
        dev_cluster::wait_for_files(dir.path());
        let addrs = dev_cluster::bootstrap_addrs(dir.path());
        let cluster = Cluster::new(ClientConfig { bootstrap: addrs.clone(), ..ClientConfig::default() }).unwrap();
        Dev { dir, process, cluster, bootstrap: addrs.join(",") }
    }

    pub async fn create_topic(&self, name: &str, partitions: u32, config: TopicConfigPatch) {
        let admin = Admin::new(self.cluster.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        let req = CreateTopicRequest { name: name.into(), partitions, replicas: 3, config };
        while let Err(e) = admin.create_topic_with(req.clone()).await {
            assert!(Instant::now() < deadline, "the cluster never accepted topic {name}: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn produce(&self, topic: &str, records: Vec<Record>) {
        let producer = Producer::new(self.cluster.clone(), ProducerConfig::default()).unwrap();
        let mut acks = Vec::new();
        for r in records {
            acks.push(producer.send(topic, r).await.unwrap());
        }
        for a in acks {
            a.wait().await.expect("every record is acknowledged");
        }
        producer.close().await;
    }

    /// The leader of `topic`/`partition`, once there is one.
    pub async fn leader(&self, topic: &str, partition: u32) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(m) = self.cluster.metadata(true).await {
                let leader = m.topics.iter().find(|t| t.name == topic).and_then(|t| t.partitions.get(partition as usize)).and_then(|p| p.leader);
                if let Some(l) = leader {
                    return l;
                }
            }
            assert!(Instant::now() < deadline, "{topic}/{partition} has no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs the node leading `topic`/`partition`, returning its id, once all three of
    /// its replicas have joined the group (each acknowledged something: its lag is known)
    /// — else the survivors
    /// may be one replica and a node still learning whether it held the group before,
    /// with no quorum between them (`dev_cluster::cluster_with_topic`).
    pub async fn kill_leader(&self, topic: &str, partition: u32) -> u64 {
        let joined = |ps: &[serde_json::Value]| {
            ps.iter()
                .find(|p| p["partition"].as_u64() == Some(u64::from(partition)))
                .is_some_and(|p| p["replica_lag"].as_array().is_some_and(|lags| lags.len() == 3 && lags.iter().all(|r| r["lag"].as_u64().is_some())))
        };
        dev_cluster::wait_for_partitions(&self.bootstrap, topic, "three replicas joined", joined).await;
        let leader = self.leader(topic, partition).await;
        let pid = dev_cluster::pid_of(self.dir.path(), leader as u32).expect("the leader's pid file");
        // SAFETY: kill(2) on a node process this test's keel dev started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        eprintln!("killed node {leader}, the leader of {topic}/{partition}");
        leader
    }

    pub fn keel(&self) -> Command {
        dev_cluster::keel(&self.bootstrap)
    }

    pub fn stop(mut self) {
        // SAFETY: kill(2) on the keel dev process this test spawned.
        unsafe { libc::kill(self.process.id() as i32, libc::SIGTERM) };
        let _ = self.process.wait();
        dev_cluster::kill_all_nodes(self.dir.path());
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: the end of each node's log says what the cluster did.
            for node in 1..=3 {
                let log = std::fs::read_to_string(self.dir.path().join(format!("node{node}/keel.log"))).unwrap_or_default();
                // Without the per-heartbeat warnings about the killed node, which would fill it.
                let lines: Vec<&str> = log.lines().filter(|l| !l.contains("failed to send a heartbeat") && !l.contains("Unreachable node")).collect();
                eprintln!("---- the last lines of node {node}'s log ----");
                for line in &lines[lines.len().saturating_sub(DIAGNOSTIC_LOG_LINES)..] {
                    eprintln!("{line}");
                }
            }
        }
        for node in 1..=3 {
            if let Some(pid) = dev_cluster::pid_of(self.dir.path(), node) {
                // SAFETY: kill(2) on a node process this test's keel dev started.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        let _ = self.process.kill();
    }
}
