//! `keel-jepsen`: proves Keel's promise — nothing acknowledged is lost, nothing is stored
//! twice — against real `keel serve` processes under faults.
//!
//! # Layout
//! - [`history`]: the recorded history (`history.jsonl`): invocations, completions
//!   (`ok` / `fail` / `info`), faults, observations, each node's final log.
//! - [`topology`]: network namespaces on a bridge, and the network faults they give.
//! - [`nodes`]: the `keel serve` processes of a run: start, kill, pause, wipe, dump.
//! - [`workload`]: the workloads, W1 (ordered log: idempotent producers, readers from several offsets)
//!   and W3 (producers retrying the same sequence across faults).
//! - [`replay`]: W4, replay jobs of the W1 topic during the faults.
//! - [`nemesis`]: the faults, on a seeded rotating schedule with quiet periods.
//! - [`runner`]: one run: nodes, workloads, nemesis, heal, drain, dumps, check.
//! - [`report`]: `results.json` and `report.html`.
//! - [`checker`]: every anomaly of `shared/notes/jepsen.md` §3 that applies, with its
//!   verdict, vacuity floors and self-tests.
//!
//! **Architecture invariant:** the harness is a client. It depends on the client and
//! protocol crates and starts the `keel` binary; it never links the broker or storage.

pub mod checker;
pub mod damage;
pub mod history;
pub mod nemesis;
pub mod nodes;
pub mod queue;
pub mod replay;
pub mod report;
pub mod runner;
pub mod topology;
pub mod workload;
