//! Disk full, for real: a `keel dev` cluster on a small tmpfs, a filler file taking
//! most of it, producers writing until the nodes reach `node.min_free_bytes`. They must
//! see `StorageFull` (never a crash, never a lost acknowledged message), `/health/ready`
//! must name the cause, and once the filler is deleted producing resumes by itself. And
//! without the reserve, where writes really fail with `ENOSPC`: the groups they stop
//! reopen by themselves once space is freed, with nothing acknowledged lost.
//!
//! Mounting a tmpfs needs root (CI runs as root); without it the test says so and
//! returns.

mod dev_cluster;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_client::consumer::{Consumer, StartAt};
use keel_client::producer::{Producer, ProducerConfig, Record};
use keel_client::{ClientConfig, Cluster};
use keel_protocol::{ErrorCode, TopicConfigPatch};

const MIB: u64 = 1 << 20;
const TMPFS_MIB: u64 = 96;
const MIN_FREE: u64 = 24 * MIB;

/// Unmounts the tmpfs (after killing the nodes on it) when dropped.
struct Mount<'a>(&'a Path);

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        dev_cluster::kill_all_nodes(self.0);
        let _ = Command::new("umount").arg(self.0).status();
    }
}

fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df").args(["-B1", "--output=avail"]).arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
}

/// A `keel dev` cluster on its own tmpfs with `min_free` as `node.min_free_bytes`, and
/// topic "full" (1 partition, R3). `None` without root.
struct Setup {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    dev: std::process::Child,
    pids: Vec<u32>,
    addrs: Vec<String>,
    cluster: Cluster,
}

async fn start_on_tmpfs(min_free: u64, port_offset: u16) -> Option<Setup> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tmpfs");
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={TMPFS_MIB}m"), "tmpfs"]).arg(&dir).stderr(Stdio::null()).status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: mounting a {TMPFS_MIB} MiB tmpfs needs root");
        return None;
    }
    let data = dir.join("keel-data");
    let base_port = dev_cluster::base_port(port_offset);
    let dev = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["dev", "--data-dir"])
        .arg(&data)
        .args(["--base-port", &base_port.to_string()])
        .env("KEEL_MIN_FREE_BYTES", min_free.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pids = dev_cluster::wait_for_files(&data);
    let addrs = dev_cluster::bootstrap_addrs(&data);
    let cluster = Cluster::new(ClientConfig { bootstrap: addrs.clone(), ..ClientConfig::default() }).unwrap();
    let admin = keel_client::Admin::new(cluster.clone());
    let req = keel_protocol::message::CreateTopicRequest { name: "full".into(), partitions: 1, replicas: 3, config: TopicConfigPatch::default() };
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin.create_topic_with(req.clone()).await.is_err() {
        assert!(Instant::now() < deadline, "the cluster never accepted the topic");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Some(Setup { _tmp: tmp, dir, dev, pids, addrs, cluster })
}

fn value(i: u64) -> Record {
    let mut v = i.to_be_bytes().to_vec();
    v.resize(1000, b'f');
    Record::new(v)
}

/// Produces 1,000 messages at a time to "full" until one fails (at most 200,000);
/// returns the acknowledged ones and the failure.
async fn produce_until_a_send_fails(cluster: &Cluster, config: &ProducerConfig) -> (Vec<u64>, Option<keel_client::ClientError>) {
    let producer = Producer::new(cluster.clone(), config.clone()).unwrap();
    let mut acked: Vec<u64> = Vec::new();
    let mut failed = None;
    'produce: for chunk in 0..200u64 {
        let mut acks = Vec::new();
        for i in chunk * 1000..(chunk + 1) * 1000 {
            acks.push((i, producer.send("full", value(i)).await.unwrap()));
        }
        for (i, a) in acks {
            match a.wait().await {
                Ok(_) => acked.push(i),
                Err(e) => {
                    failed = Some(e);
                    break 'produce;
                }
            }
        }
    }
    producer.close().await;
    (acked, failed)
}

/// Deletes `filler`, then produces until a message is acknowledged again (within 60 s)
/// and 999 more; returns how long after the delete the first was, adding all to `acked`.
async fn free_and_resume(cluster: &Cluster, config: ProducerConfig, filler: &Path, acked: &mut Vec<u64>) -> Duration {
    std::fs::remove_file(filler).unwrap();
    let freed = Instant::now();
    let producer = Producer::new(cluster.clone(), config).unwrap();
    let next = 1_000_000u64;
    let resumed = loop {
        match producer.send("full", value(next)).await.unwrap().wait().await {
            Ok(_) => break freed.elapsed(),
            Err(e) => {
                assert!(freed.elapsed() < Duration::from_secs(60), "producing never resumed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    acked.push(next);
    for i in next + 1..next + 1000 {
        producer.send("full", value(i)).await.unwrap().wait().await.expect("produces are accepted again");
        acked.push(i);
    }
    producer.close().await;
    resumed
}

/// Reads topic "full" until every message of `acked` was seen.
async fn read_back(cluster: &Cluster, acked: &[u64]) {
    let mut consumer = Consumer::new(cluster.clone(), "full", StartAt::Earliest).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !acked.iter().all(|i| seen.contains(i)) {
        assert!(Instant::now() < deadline, "{} acknowledged messages were not read back", acked.iter().filter(|i| !seen.contains(*i)).count());
        for m in consumer.poll(Duration::from_secs(1)).await.unwrap() {
            seen.insert(u64::from_be_bytes(m.value.as_deref().unwrap()[..8].try_into().unwrap()));
        }
    }
    eprintln!("all {} acknowledged messages read back", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_see_storage_full_then_resume_when_space_is_freed_and_nothing_acknowledged_is_lost() {
    let Some(Setup { _tmp, dir, mut dev, pids, addrs, cluster }) = start_on_tmpfs(MIN_FREE, 22_300).await else { return };
    let _mount = Mount(&dir);
    // 1. A filler leaves 40 MiB free: the nodes cross the 24 MiB minimum after about
    //    16 MiB of writes (every message is stored three times on this one tmpfs).
    let filler = dir.join("filler");
    let fill = free_bytes(&dir).saturating_sub(40 * MIB);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();
    eprintln!("filler of {} MiB; {} MiB free", fill / MIB, free_bytes(&dir) / MIB);

    // 2. Produce until a send fails with StorageFull.
    let config = ProducerConfig { delivery_timeout: Duration::from_secs(3), ..ProducerConfig::default() };
    let started = Instant::now();
    let (mut acked, refused) = produce_until_a_send_fails(&cluster, &config).await;
    let refused = refused.expect("the producer saw StorageFull before writing 200 MiB into 40 MiB");
    assert!(
        refused.code() == Some(ErrorCode::StorageFull) || refused.to_string().contains("StorageFull"),
        "a send failed with something other than StorageFull: {refused}"
    );
    eprintln!("{} messages acknowledged, then StorageFull after {:.1?}: {refused}", acked.len(), started.elapsed());
    assert!(free_bytes(&dir) > 0, "the reserve was never used up");

    // 3. Meanwhile every node is up and says why it is not ready.
    for (n, pid) in pids.iter().enumerate() {
        // SAFETY: kill(pid, 0) only checks that the process exists.
        assert_eq!(unsafe { libc::kill(*pid as libc::pid_t, 0) }, 0, "node {} crashed", n + 1);
    }
    let ready = dev_cluster::admin_get(&dev_cluster::admin_addr(&addrs[0]), "/health/ready");
    eprintln!("/health/ready while full: {ready}");
    assert!(ready.contains("min_free_bytes"), "{ready}");
    assert_eq!(dev_cluster::metric_max(addrs.iter().map(String::as_str), "keel_disk_full"), Some(1.0));

    // 4. Free the space: producing resumes by itself.
    let resumed = free_and_resume(&cluster, config, &filler, &mut acked).await;
    eprintln!("producing resumed {resumed:.1?} after the filler was deleted");
    let ready = dev_cluster::admin_get(&dev_cluster::admin_addr(&addrs[0]), "/health/ready");
    assert!(!ready.contains("min_free_bytes"), "{ready}");

    // 5. Every acknowledged message is there.
    read_back(&cluster, &acked).await;
    // SAFETY: kill(2) on the keel dev process this test spawned.
    unsafe { libc::kill(dev.id() as libc::pid_t, libc::SIGTERM) };
    assert!(dev.wait().unwrap().success(), "keel dev stops cleanly after a disk-full episode");
}

/// Without the reserve (`min_free_bytes` 0) writes really fail with ENOSPC. A group whose
/// write failed stops (its log refuses further writes rather than risk what it
/// acknowledged); once space is freed the node reopens it from disk by itself, and
/// producing resumes with nothing acknowledged lost and no node restarted by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_stopped_by_a_real_enospc_reopens_by_itself_once_space_is_freed() {
    let Some(Setup { _tmp, dir, mut dev, pids, addrs, cluster }) = start_on_tmpfs(0, 22_600).await else { return };
    let _mount = Mount(&dir);
    let filler = dir.join("filler");
    let fill = free_bytes(&dir).saturating_sub(20 * MIB);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();

    // 1. Produce until sends fail: the disk is really full.
    let config = ProducerConfig { delivery_timeout: Duration::from_secs(3), ..ProducerConfig::default() };
    let (mut acked, failed) = produce_until_a_send_fails(&cluster, &config).await;
    let failed = failed.expect("producing into 20 MiB free without a reserve failed at some point");
    eprintln!("{} messages acknowledged, then: {failed}; {} bytes free", acked.len(), free_bytes(&dir));
    for (n, pid) in pids.iter().enumerate() {
        // SAFETY: kill(pid, 0) only checks that the process exists.
        assert_eq!(unsafe { libc::kill(*pid as libc::pid_t, 0) }, 0, "node {} crashed", n + 1);
    }

    // 2. Free the space: the stopped groups reopen and producing resumes.
    let resumed = free_and_resume(&cluster, config, &filler, &mut acked).await;
    let reopened = dev_cluster::metric_sum(addrs.iter().map(String::as_str), "keel_groups_reopened_total");
    eprintln!("producing resumed {resumed:.1?} after the filler was deleted; {reopened} group(s) reopened after a storage error");
    assert!(reopened >= 1, "a group stopped by ENOSPC was reopened");

    // 3. Every acknowledged message is there.
    read_back(&cluster, &acked).await;
    // SAFETY: kill(2) on the keel dev process this test spawned.
    unsafe { libc::kill(dev.id() as libc::pid_t, libc::SIGTERM) };
    assert!(dev.wait().unwrap().success(), "keel dev stops cleanly after an ENOSPC episode");
}
