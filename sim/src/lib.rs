//! `keel-sim`: a deterministic simulation of Keel's partition Raft groups.
//!
//! Three nodes, each with an in-memory disk ([`keel_storage::disk::MemoryDisk`]) holding
//! one replica of every group, run the production replication code — openraft over
//! `PartitionLogStore` (the segment log) and `PartitionStateMachine` — in one
//! current-thread Tokio runtime with paused time. A seeded router ([`network`]) delays,
//! drops, duplicates and cuts their messages; a seeded nemesis crashes nodes (their disks
//! keep what was synced, plus a torn prefix of what was not), restarts them, partitions
//! and heals; clients write batches and record what was acknowledged. The safety
//! invariants ([`check`]) are checked after every step; then everything heals and every
//! group must elect a leader, commit, and bring all three replicas to the same log.
//!
//! Everything comes from one seed: the schedule, the network, the torn writes, and
//! openraft's election timeouts (`replication::runtime::seed_thread`). Storage work runs
//! in place (`Disk::runs_inline`, `Flusher::inline`), so no thread outside the runtime
//! takes part, and a seed replays exactly (`keel-sim --reproduce SEED`).

pub mod check;
pub mod network;
pub mod world;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_broker::replication::EntryData;
use keel_protocol::batch::{BatchBuilder, BatchOptions, NewRecord};
use openraft::error::{ClientWriteError, Fatal, RaftError};
use tokio::time::Instant;

use check::{Ack, Checker};
use network::{Net, NetStats, NodeId, Weather};
use world::{World, NODES};

/// The shape of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Partition groups, each replicated on all three nodes.
    pub groups: u64,
    /// Simulated time under faults, before the healing (liveness) phase.
    pub fault_time: Duration,
    /// Concurrent writers.
    pub clients: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options { groups: 3, fault_time: Duration::from_secs(20), clients: 3 }
    }
}

/// What one seed did, and the first invariant it broke.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub seed: u64,
    pub violation: Option<String>,
    pub acked: u64,
    pub unknown: u64,
    pub failed: u64,
    pub crashes: u64,
    pub power_cuts_all: u64,
    pub partitions: u64,
    pub disk_stalls: u64,
    pub committed_entries: usize,
    pub net: NetStats,
    /// Simulated milliseconds the run took.
    pub sim_ms: u64,
    /// A digest of the schedule and everything committed: equal for two runs of a seed.
    pub digest: u64,
    /// What happened, with simulated times.
    pub events: Vec<String>,
}

/// Whether a seed replays exactly: only in builds with `--cfg tokio_unstable`, which lets
/// the simulation seed Tokio's own generator. Other builds check the same invariants,
/// but two runs of one seed may interleave differently.
pub const DETERMINISTIC: bool = cfg!(tokio_unstable);

/// How long the healed cluster gets to elect, commit and converge.
const LIVENESS_WITHIN: Duration = Duration::from_secs(30);
/// A client write that has no answer after this is indeterminate.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

struct Sim {
    world: World,
    checker: Mutex<Checker>,
    events: Mutex<Vec<String>>,
    violation: Mutex<Option<String>>,
    start: Instant,
    stop: AtomicBool,
    next_write: AtomicU64,
    counts: Mutex<Outcome>,
}

impl Sim {
    fn event(&self, what: String) {
        let ms = self.start.elapsed().as_millis();
        self.events.lock().unwrap().push(format!("{ms:>7} ms  {what}"));
    }

    fn violated(&self) -> bool {
        self.violation.lock().unwrap().is_some()
    }

    /// Runs the invariants; records the first violation.
    fn check(&self) {
        if self.violated() {
            return;
        }
        let result = self.checker.lock().unwrap().check(&self.world);
        if let Err(v) = result {
            self.violate(v);
        }
    }

    /// Records a broken invariant (the first one is the seed's verdict).
    fn violate(&self, v: String) {
        self.event(format!("VIOLATION: {v}"));
        self.violation.lock().unwrap().get_or_insert(v);
    }

    fn count(&self, f: impl FnOnce(&mut Outcome)) {
        f(&mut self.counts.lock().unwrap());
    }
}

/// Runs one seed to the end (or its first violation).
pub fn run_seed(seed: u64, options: &Options) -> Outcome {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time().start_paused(true);
    // Tokio draws from its own generator too (which waiter of a `watch` channel wakes
    // first); seeding it needs `--cfg tokio_unstable` (see `DETERMINISTIC`).
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    let rt = builder.build().expect("a current-thread runtime");
    keel_broker::replication::runtime::seed_thread(Some(seed));
    let outcome = rt.block_on(simulate(seed, options));
    keel_broker::replication::runtime::seed_thread(None);
    outcome
}

/// A one-record batch whose record timestamp is `write` (how checks identify it).
pub fn batch(write: u64) -> EntryData {
    let mut b = BatchBuilder::new(BatchOptions::default()).expect("default batch options");
    b.push(NewRecord { timestamp_ms: write as i64, key: None, value: Some(b"keel-sim"), headers: &[], message_id: None, deliver_at_ms: None })
        .expect("one small record");
    EntryData::batch(b.finish().expect("a one-record batch"))
}

async fn simulate(seed: u64, options: &Options) -> Outcome {
    let net = Net::new(seed ^ 0x6e65_7477_6f72_6b00);
    let world = match World::new(net.clone(), options.groups, seed) {
        Ok(w) => w,
        Err(e) => return Outcome { seed, violation: Some(format!("setting up: {e}")), ..Outcome::default() },
    };
    let sim = Arc::new(Sim {
        world,
        checker: Mutex::default(),
        events: Mutex::default(),
        violation: Mutex::default(),
        start: Instant::now(),
        stop: AtomicBool::new(false),
        next_write: AtomicU64::new(1),
        counts: Mutex::new(Outcome { seed, ..Outcome::default() }),
    });
    if let Err(e) = setup(&sim).await {
        *sim.violation.lock().unwrap() = Some(format!("the cluster did not start: {e}"));
    }
    if !sim.violated() {
        let clients: Vec<_> =
            (0..options.clients).map(|c| tokio::spawn(client(sim.clone(), fastrand::Rng::with_seed(seed.wrapping_mul(31).wrapping_add(c))))).collect();
        nemesis(&sim, fastrand::Rng::with_seed(seed ^ 0x6e65_6d65_7369_7300), options.fault_time).await;
        sim.stop.store(true, Ordering::Relaxed);
        for c in clients {
            let _ = c.await;
        }
        if !sim.violated() {
            liveness(&sim).await;
        }
    }
    sim.world.shutdown().await;
    let mut out = sim.counts.lock().unwrap().clone();
    let checker = sim.checker.lock().unwrap();
    out.violation = sim.violation.lock().unwrap().clone();
    out.committed_entries = checker.committed_entries();
    out.net = sim.world.net.stats();
    out.sim_ms = sim.start.elapsed().as_millis() as u64;
    out.events = sim.events.lock().unwrap().clone();
    out.events.extend(sim.world.net.take_trace());
    let mut h = checker.digest();
    for e in &out.events {
        for b in e.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    out.digest = h;
    out
}

async fn setup(sim: &Sim) -> anyhow::Result<()> {
    for n in NODES {
        sim.world.start(n).await?;
    }
    sim.world.initialize().await?;
    sim.event(format!("3 nodes up, {} group(s) initialized", sim.world.groups.len()));
    Ok(())
}

/// A writer: one batch at a time to whichever replica believes it leads.
async fn client(sim: Arc<Sim>, mut rng: fastrand::Rng) {
    while !sim.stop.load(Ordering::Relaxed) && !sim.violated() {
        tokio::time::sleep(Duration::from_millis(rng.u64(20..120))).await;
        let group = sim.world.groups[rng.usize(0..sim.world.groups.len())];
        let target = sim.world.leader(group).unwrap_or_else(|| NODES[rng.usize(0..NODES.len())]);
        let Some(replica) = sim.world.replica(target, group) else { continue };
        let incarnation = sim.world.incarnation(target);
        let write = sim.next_write.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(WRITE_TIMEOUT, replica.raft.client_write(batch(write))).await {
            Ok(Ok(reply)) => match reply.data.stored_at() {
                Some(offset) => {
                    sim.event(format!("write {write} to node {target} group {group}: acknowledged at index {} offset {offset}", reply.log_id.index));
                    sim.checker.lock().unwrap().acks.push(Ack { write, group, index: reply.log_id.index, offset });
                    sim.count(|o| o.acked += 1);
                }
                None => {
                    sim.event(format!("write {write} to node {target} group {group}: not stored ({:?})", reply.data));
                    sim.count(|o| o.failed += 1)
                }
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => sim.count(|o| o.failed += 1),
            Ok(Err(RaftError::Fatal(Fatal::Stopped))) => {
                sim.event(format!("write {write} to node {target} group {group}: unknown (the node stopped)"));
                sim.count(|o| o.unknown += 1)
            }
            Ok(Err(RaftError::Fatal(f))) if sim.world.is_up(target) && sim.world.incarnation(target) == incarnation => {
                sim.violate(format!("node {target} group {group}: the Raft core failed: {f}"));
            }
            other => {
                let why = match other {
                    Err(_) => "no answer in time".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(_)) => unreachable!("answered above"),
                };
                sim.event(format!("write {write} to node {target} group {group}: unknown ({why})"));
                sim.count(|o| o.unknown += 1)
            }
        }
        sim.check();
    }
}

/// The fault schedule: a seeded sequence of crashes (power cuts), restarts, partitions,
/// heals and network weather, each followed by a check.
async fn nemesis(sim: &Sim, mut rng: fastrand::Rng, fault_time: Duration) {
    let world = &sim.world;
    while sim.start.elapsed() < fault_time && !sim.violated() {
        tokio::time::sleep(Duration::from_millis(rng.u64(200..2500))).await;
        let up: Vec<NodeId> = NODES.iter().copied().filter(|n| world.is_up(*n)).collect();
        let down: Vec<NodeId> = NODES.iter().copied().filter(|n| !world.is_up(*n)).collect();
        let roll = rng.u32(0..100);
        if roll < 20 && !up.is_empty() {
            let n = up[rng.usize(0..up.len())];
            let torn = crash(sim, n, &mut rng).await;
            sim.count(|o| o.crashes += 1);
            sim.event(format!("crash node {n} (power cut; {torn})"));
        } else if roll < 27 && up.len() > 1 {
            let mut what = Vec::new();
            for n in &up {
                what.push(format!("node {n}: {}", crash(sim, *n, &mut rng).await));
            }
            sim.count(|o| {
                o.crashes += up.len() as u64;
                o.power_cuts_all += 1;
            });
            sim.event(format!("power cut on every live node ({})", what.join("; ")));
        } else if roll < 55 && !down.is_empty() {
            let n = down[rng.usize(0..down.len())];
            restart(sim, n).await;
        } else if roll < 67 {
            let n = NODES[rng.usize(0..NODES.len())];
            let rest: Vec<NodeId> = NODES.iter().copied().filter(|x| *x != n).collect();
            world.net.cut(&[n], &rest);
            world.net.cut(&rest, &[n]);
            sim.count(|o| o.partitions += 1);
            sim.event(format!("isolate node {n}"));
        } else if roll < 72 {
            let (a, b) = (NODES[rng.usize(0..3)], NODES[rng.usize(0..3)]);
            world.net.cut(&[a], &[b]);
            sim.count(|o| o.partitions += 1);
            sim.event(format!("cut the link {a} -> {b} (one way)"));
        } else if roll < 84 {
            world.net.heal();
            sim.event("heal the network".to_string());
        } else if roll < 89 {
            let n = NODES[rng.usize(0..NODES.len())];
            let stall = rng.bool();
            world.stall_disk(n, stall);
            sim.count(|o| o.disk_stalls += u64::from(stall));
            sim.event(format!("{} node {n}'s disk", if stall { "stall" } else { "resume" }));
        } else if roll < 94 {
            let slow = rng.bool();
            let w = Weather { drop_per_mille: rng.u32(0..250), duplicate_per_mille: rng.u32(0..150), delay_ms: if slow { (5, 80) } else { (1, 10) } };
            world.net.set_weather(w);
            sim.event(format!("weather: {w:?}"));
        } else {
            world.net.set_weather(Weather::CALM);
            sim.event("calm weather".to_string());
        }
        sim.check();
    }
}

/// Crashes `node` with a power cut; each file keeps a random share of its unsynced
/// appends (none, all, or a torn prefix). Describes what was kept.
async fn crash(sim: &Sim, node: NodeId, rng: &mut fastrand::Rng) -> String {
    let (mut files, mut kept, mut lost) = (0u64, 0u64, 0u64);
    let mut choices = Vec::new();
    // Decide the torn prefixes up front, from the seed, in the disk's path order.
    let mut pick = |_: &std::path::Path, appended: u64| {
        let keep = match rng.u32(0..3) {
            0 => 0,
            1 => appended,
            _ => rng.u64(0..=appended),
        };
        choices.push((appended, keep));
        keep
    };
    sim.world.crash(node, &mut pick).await;
    for (appended, keep) in choices {
        if appended > 0 {
            files += 1;
            kept += keep;
            lost += appended - keep;
        }
    }
    format!("{files} file(s) with unsynced appends, {kept} bytes kept, {lost} lost")
}

async fn restart(sim: &Sim, node: NodeId) {
    match sim.world.start(node).await {
        Ok(()) => sim.event(format!("restart node {node}")),
        Err(e) => {
            sim.violate(format!("node {node} did not restart: {e:#}"));
        }
    }
}

/// Heals everything, restarts every node, and requires every group to commit a new
/// write and every replica to apply the same log within `LIVENESS_WITHIN`.
async fn liveness(sim: &Sim) {
    let world = &sim.world;
    world.net.heal();
    world.net.set_weather(Weather::CALM);
    for n in NODES {
        world.stall_disk(n, false);
        if !world.is_up(n) {
            restart(sim, n).await;
        }
    }
    sim.event("liveness: healed, every node up".to_string());
    let deadline = Instant::now() + LIVENESS_WITHIN;
    for &group in &world.groups {
        let index = loop {
            if Instant::now() >= deadline {
                sim.violate(format!("liveness: group {group} committed nothing within {LIVENESS_WITHIN:?} of healing"));
                return;
            }
            let Some(leader) = world.leader(group) else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Some(r) = world.replica(leader, group) else { continue };
            let write = sim.next_write.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(WRITE_TIMEOUT, r.raft.client_write(batch(write))).await {
                Ok(Ok(reply)) => {
                    if let Some(offset) = reply.data.stored_at() {
                        sim.checker.lock().unwrap().acks.push(Ack { write, group, index: reply.log_id.index, offset });
                    }
                    break reply.log_id.index;
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        for n in NODES {
            let Some(mut r) = world.replica(n, group) else { continue };
            let caught_up = tokio::time::timeout_at(deadline, r.applied.wait_for(|a| a.is_some_and(|a| a.index >= index))).await;
            if !matches!(caught_up, Ok(Ok(_))) {
                sim.violate(format!("liveness: node {n} group {group} did not apply index {index} within {LIVENESS_WITHIN:?} of healing"));
                return;
            }
        }
    }
    sim.check();
    let all_present = sim.checker.lock().unwrap().check_all_acked_present();
    if let Err(v) = all_present {
        sim.violate(v);
    }
    sim.event("liveness: every group committed and every replica converged".to_string());
}
