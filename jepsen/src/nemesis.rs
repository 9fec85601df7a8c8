//! The nemesis: faults injected on a seeded schedule, each start and stop recorded in
//! the history (`shared/notes/jepsen.md` §4).
//!
//! Every `interval` the schedule picks a fault from those enabled (about one period in
//! four is quiet), applies it to its targets — often the leader of a partition, where it
//! hurts — holds it for the period, and undoes it. Faults needing network control
//! (partitions, loss, bandwidth) are only offered when the nodes run in namespaces.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::history::{Actor, FaultOp, Op, Recorder};
use crate::nodes::Nodes;

/// A fault the nemesis can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL a node, restart it at the end of the period.
    Kill,
    /// SIGKILL two nodes at once (a majority: no quorum), restart them at the end.
    KillMajority,
    /// SIGSTOP a node, SIGCONT it at the end.
    Pause,
    /// Pause a node, then kill it half-way (a node that was frozen never wakes).
    PauseKill,
    /// Cut one node off from the others, both directions.
    PartitionOne,
    /// Cut two nodes apart; the third still reaches both (a bridge).
    PartitionRing,
    /// One node's frames to the others are dropped; it still hears them.
    PartitionOneWay,
    /// Cut one node off; half-way, kill one of the majority (no quorum for a while).
    PartitionKill,
    /// 30% of the packets a node receives are dropped.
    Loss,
    /// A node's link capped at 1 Mbit/s.
    Bandwidth,
    /// Stop a node, delete its data directory, start it again (it is refilled).
    WipeRefill,
    /// A node drops the answers of the produces it stores (and closes the connection):
    /// the producers' retries must be recognised. Needs a `fault-injection` build.
    DropAnswers,
    /// SIGKILL every node at once, restart them at the end. The nodes run on the lazy
    /// disk (`KEEL_TEST_DISK=lazy`, a `fault-injection` build) whenever this fault is
    /// enabled, so this — and every other kill — is a power cut: what was not synced is
    /// gone.
    PowerLoss,
    /// The schedule that lost acknowledged writes in NATS 2.12.1, on the minority node
    /// [`CORRUPT_NODE`] (the same one all run): one other node is paused (it lags) while
    /// writes are acknowledged by the third and [`CORRUPT_NODE`]; midway that node is
    /// SIGKILLed and the last segment of one of its groups damaged — its tail cut by up
    /// to 16 KiB, or 1–8 bits flipped in its last 4 KiB —, the third node (which holds
    /// the only intact copies) is SIGKILLed, and the lagging node resumed and the
    /// damaged one restarted. They are a majority: the damaged node must notice it lost
    /// what it acknowledged and elect no one without it, so the group waits for the
    /// third node, restarted at the end, instead of losing the writes.
    Corrupt,
}

/// The node the `corrupt` fault damages, in every period of a run: a fixed minority.
pub const CORRUPT_NODE: u32 = 3;

impl Fault {
    pub const ALL: [Fault; 14] = [
        Fault::Kill,
        Fault::KillMajority,
        Fault::Pause,
        Fault::PauseKill,
        Fault::PartitionOne,
        Fault::PartitionRing,
        Fault::PartitionOneWay,
        Fault::PartitionKill,
        Fault::Loss,
        Fault::Bandwidth,
        Fault::WipeRefill,
        Fault::DropAnswers,
        Fault::PowerLoss,
        Fault::Corrupt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::KillMajority => "kill-majority",
            Fault::Pause => "pause",
            Fault::PauseKill => "pause-kill",
            Fault::PartitionOne => "partition-one",
            Fault::PartitionRing => "partition-ring",
            Fault::PartitionOneWay => "partition-one-way",
            Fault::PartitionKill => "partition-kill",
            Fault::Loss => "loss",
            Fault::Bandwidth => "bandwidth",
            Fault::WipeRefill => "wipe-refill",
            Fault::DropAnswers => "drop-answers",
            Fault::PowerLoss => "power-loss",
            Fault::Corrupt => "corrupt",
        }
    }

    pub fn parse(name: &str) -> Option<Fault> {
        Fault::ALL.iter().copied().find(|f| f.name() == name)
    }

    /// Whether it needs the nodes in network namespaces.
    pub fn needs_network(self) -> bool {
        matches!(self, Fault::PartitionOne | Fault::PartitionRing | Fault::PartitionOneWay | Fault::PartitionKill | Fault::Loss | Fault::Bandwidth)
    }
}

/// Who to hit: a preferred node (e.g. a partition leader the runner saw) or any.
pub type LeaderHint = Arc<Mutex<Option<u32>>>;

/// Runs the schedule until `stop`: every `interval`, quiet or one fault.
pub async fn run(
    nodes: Arc<Mutex<Nodes>>,
    recorder: Arc<Recorder>,
    faults: Vec<Fault>,
    interval: Duration,
    seed: u64,
    leader: LeaderHint,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let count = nodes.lock().expect("nodes lock poisoned").count();
    while !stop.load(Ordering::Relaxed) {
        if faults.is_empty() || rng.u32(0..4) == 0 {
            sleep_or_stop(interval, &stop).await;
            continue;
        }
        let fault = faults[rng.usize(0..faults.len())];
        // Half the time the node a partition leader runs on, else any node.
        let hinted = *leader.lock().expect("leader hint lock poisoned");
        let target = match hinted {
            Some(l) if rng.bool() => l,
            _ => rng.u32(1..=count),
        };
        let other = |rng: &mut fastrand::Rng, not: u32| loop {
            let n = rng.u32(1..=count);
            if n != not {
                break n;
            }
        };
        let target = if fault == Fault::Corrupt { CORRUPT_NODE.min(count) } else { target };
        let mut detail = match fault {
            Fault::PartitionRing | Fault::PartitionKill | Fault::KillMajority => {
                let b = other(&mut rng, target);
                json!({"nodes": [target, b]})
            }
            // [damaged, lagging]; the third node is the one killed midway.
            Fault::Corrupt => json!({"nodes": [target, other(&mut rng, target)]}),
            Fault::PowerLoss => json!({"nodes": (1..=count).collect::<Vec<u32>>()}),
            _ => json!({"nodes": [target]}),
        };
        // The corrupt fault's damage is chosen (and recorded) before it is done.
        let harm = (fault == Fault::Corrupt).then(|| Harm::pick(&mut rng));
        if let Some(h) = &harm {
            detail["harm"] = json!(h.describe());
        }
        let second = detail["nodes"].get(1).and_then(|v| v.as_u64()).map(|v| v as u32);
        recorder.note(Actor::Nemesis, Op::Fault(FaultOp { name: fault.name().into(), phase: "start".into(), detail: detail.clone() }));
        let started = start(&nodes, fault, target, second, count);
        if let Err(e) = &started {
            tracing::warn!(fault = fault.name(), error = %e, "could not inject the fault");
        }
        sleep_or_stop(interval / 2, &stop).await;
        if started.is_ok() {
            match midway(&nodes, fault, target, second, count, harm.as_ref()) {
                Ok(Some(done)) => recorder.note(
                    Actor::Nemesis,
                    Op::Fault(FaultOp { name: fault.name().into(), phase: "info".into(), detail: json!({"nodes": [target], "done": done}) }),
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!(fault = fault.name(), error = %e, "the fault's second step failed"),
            }
        }
        sleep_or_stop(interval - interval / 2, &stop).await;
        if let Err(e) = end(&nodes, fault, target, second, count) {
            tracing::warn!(fault = fault.name(), error = %e, "could not undo the fault");
        }
        recorder.note(Actor::Nemesis, Op::Fault(FaultOp { name: fault.name().into(), phase: "stop".into(), detail }));
    }
}

async fn sleep_or_stop(d: Duration, stop: &std::sync::atomic::AtomicBool) {
    let end = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < end && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100).min(end.saturating_duration_since(tokio::time::Instant::now()))).await;
    }
}

fn others(count: u32, node: u32) -> impl Iterator<Item = u32> {
    (1..=count).filter(move |n| *n != node)
}

/// The damage a `corrupt` period does.
#[derive(Debug, Clone)]
struct Harm {
    /// Which of the node's groups (an index into its sorted group directories).
    group_pick: usize,
    kind: HarmKind,
}

#[derive(Debug, Clone)]
enum HarmKind {
    Truncate(u64),
    Flip { bits: usize, seed: u64 },
}

impl Harm {
    fn pick(rng: &mut fastrand::Rng) -> Harm {
        let kind = if rng.bool() {
            // Mostly small cuts (a torn-looking tail), sometimes many entries.
            let bytes = if rng.u32(0..4) == 0 { rng.u64(4096..16384) } else { rng.u64(1..4096) };
            HarmKind::Truncate(bytes)
        } else {
            HarmKind::Flip { bits: rng.usize(1..=8), seed: rng.u64(..) }
        };
        Harm { group_pick: rng.usize(..), kind }
    }

    fn describe(&self) -> String {
        match self.kind {
            HarmKind::Truncate(b) => format!("cut {b} bytes off a segment tail"),
            HarmKind::Flip { bits, .. } => format!("flip {bits} bits in a segment's last 4 KiB"),
        }
    }

    /// Damages the stopped node's data directory; says what was done.
    fn apply(&self, data_dir: &std::path::Path) -> Result<String, String> {
        let groups = crate::damage::group_dirs(data_dir);
        if groups.is_empty() {
            return Ok("no group to damage".into());
        }
        let (_, dir) = &groups[self.group_pick % groups.len()];
        let Some(segment) = crate::damage::last_segment(dir) else { return Ok(format!("{} holds no segment", dir.display())) };
        let done = match self.kind {
            HarmKind::Truncate(bytes) => crate::damage::truncate_tail(&segment, bytes)?,
            HarmKind::Flip { bits, seed } => crate::damage::flip_bits(&segment, 4096, bits, &mut fastrand::Rng::with_seed(seed))?,
        };
        Ok(done.to_string())
    }
}

/// Injects `fault`.
fn start(nodes: &Mutex<Nodes>, fault: Fault, target: u32, second: Option<u32>, count: u32) -> Result<(), String> {
    let mut n = nodes.lock().expect("nodes lock poisoned");
    match fault {
        Fault::Corrupt => n.pause(second.ok_or("corrupt needs a node to lag")?),
        Fault::PowerLoss => {
            for i in 1..=count {
                if n.is_paused(i) {
                    n.resume(i);
                }
                n.kill(i);
            }
        }
        Fault::Kill => n.kill(target),
        Fault::KillMajority => {
            n.kill(target);
            n.kill(second.ok_or("kill-majority needs two nodes")?);
        }
        Fault::Pause | Fault::PauseKill => n.pause(target),
        Fault::WipeRefill => {
            n.kill(target);
            n.wipe(target)?;
            n.spawn(target)?;
        }
        Fault::PartitionOne | Fault::PartitionKill => {
            let t = n.topology().ok_or("partitions need namespaces")?;
            let links: Vec<(u32, u32)> = others(count, target).flat_map(|o| [(target, o), (o, target)]).collect();
            t.drop_between(&links)?;
        }
        Fault::PartitionRing => {
            let t = n.topology().ok_or("partitions need namespaces")?;
            let b = second.ok_or("a ring partition needs two nodes")?;
            t.drop_between(&[(target, b), (b, target)])?;
        }
        Fault::PartitionOneWay => {
            let t = n.topology().ok_or("partitions need namespaces")?;
            let links: Vec<(u32, u32)> = others(count, target).map(|o| (target, o)).collect();
            t.drop_between(&links)?;
        }
        Fault::Loss => n.topology().ok_or("loss needs namespaces")?.loss(target, 30)?,
        Fault::DropAnswers => admin_post(&n.admin_addr(target), "/test/faults", r#"{"drop_produce_answers": 1000000}"#)?,
        Fault::Bandwidth => n.topology().ok_or("bandwidth caps need namespaces")?.bandwidth(target, Some(1024))?,
    }
    Ok(())
}

/// The second step of a fault, halfway through its period; for `corrupt`, returns what
/// the damage did.
fn midway(nodes: &Mutex<Nodes>, fault: Fault, target: u32, second: Option<u32>, count: u32, harm: Option<&Harm>) -> Result<Option<String>, String> {
    let mut n = nodes.lock().expect("nodes lock poisoned");
    match fault {
        Fault::Corrupt => {
            let lagging = second.ok_or("corrupt needs a node to lag")?;
            n.kill(target);
            let done = harm.ok_or("corrupt needs its harm")?.apply(&n.data_dir(target))?;
            for intact in (1..=count).filter(|x| *x != target && *x != lagging) {
                n.kill(intact);
            }
            n.resume(lagging);
            n.spawn(target)?;
            return Ok(Some(done));
        }
        Fault::PauseKill => n.kill(target),
        Fault::PartitionKill => {
            if let Some(b) = second {
                n.kill(b);
            }
        }
        _ => {}
    }
    Ok(None)
}

fn end(nodes: &Mutex<Nodes>, fault: Fault, target: u32, second: Option<u32>, count: u32) -> Result<(), String> {
    let mut n = nodes.lock().expect("nodes lock poisoned");
    match fault {
        Fault::PowerLoss | Fault::Corrupt => {
            for node in 1..=count {
                if n.is_paused(node) {
                    n.resume(node);
                }
                if !n.is_running(node) {
                    n.spawn(node)?;
                }
            }
        }
        Fault::Kill | Fault::PauseKill | Fault::KillMajority => {
            for node in std::iter::once(target).chain(second.filter(|_| fault == Fault::KillMajority)) {
                if !n.is_running(node) {
                    n.spawn(node)?;
                }
            }
        }
        Fault::Pause => n.resume(target),
        Fault::WipeRefill => {}
        Fault::PartitionOne | Fault::PartitionRing | Fault::PartitionOneWay => n.topology().ok_or("no namespaces")?.heal()?,
        Fault::PartitionKill => {
            n.topology().ok_or("no namespaces")?.heal()?;
            if let Some(b) = second {
                if !n.is_running(b) {
                    n.spawn(b)?;
                }
            }
        }
        Fault::Loss => n.topology().ok_or("no namespaces")?.loss(target, 0)?,
        Fault::DropAnswers => admin_post(&n.admin_addr(target), "/test/faults", r#"{"drop_produce_answers": 0}"#)?,
        Fault::Bandwidth => n.topology().ok_or("no namespaces")?.bandwidth(target, None)?,
    }
    Ok(())
}

/// `POST path` with a JSON body on a node's admin listener (test faults).
fn admin_post(admin: &str, path: &str, json: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = admin.parse().map_err(|e| format!("{admin}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("{admin}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    write!(s, "POST {path} HTTP/1.0\r\nHost: {admin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}", json.len())
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    match answer.lines().next() {
        Some(status) if status.contains(" 200") => Ok(()),
        other => Err(format!("{admin}{path}: {other:?} (is the keel binary built with the fault-injection feature?)")),
    }
}

/// Undoes everything: heal the network, resume paused nodes, start stopped ones.
pub fn heal_all(nodes: &Mutex<Nodes>) -> Result<(), String> {
    let mut n = nodes.lock().expect("nodes lock poisoned");
    let count = n.count();
    if let Some(t) = n.topology() {
        t.heal()?;
        for i in 1..=count {
            t.loss(i, 0)?;
            t.bandwidth(i, None)?;
        }
    }
    for i in 1..=count {
        if n.is_paused(i) {
            n.resume(i);
        }
        if !n.is_running(i) {
            n.spawn(i)?;
        }
        // (Fails harmlessly on a build without fault injection.)
        let _ = admin_post(&n.admin_addr(i), "/test/faults", r#"{"drop_produce_answers": 0}"#);
    }
    Ok(())
}
