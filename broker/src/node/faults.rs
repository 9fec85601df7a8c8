//! Test-only faults a node can be told to inject (the admin listener's
//! `POST /test/faults`, compiled only with the `fault-injection` feature): the switches
//! exist in every build, so the code paths that consult them are always compiled, but
//! nothing can turn them on without the feature.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use keel_storage::Disk;

/// The disk a node's data directory is on: the OS file system, or — only in builds with
/// the `fault-injection` feature, and only when `KEEL_TEST_DISK=lazy` — the lazy disk
/// that keeps file writes in the process until they are synced, so killing the node is
/// a power cut for its files (the Jepsen harness' power-loss nemesis).
pub fn disk_from_env() -> Result<Arc<dyn Disk>, String> {
    let choice = std::env::var("KEEL_TEST_DISK").ok();
    match choice.as_deref() {
        None | Some("" | "os") => Ok(keel_storage::disk::os()),
        #[cfg(feature = "fault-injection")]
        Some("lazy") => {
            tracing::warn!("KEEL_TEST_DISK=lazy: unsynced file writes stay in this process; a kill loses them like a power cut");
            Ok(Arc::new(keel_storage::disk::LazyDisk))
        }
        Some(other) => Err(format!("KEEL_TEST_DISK={other} is not a disk this build offers (\"os\"; \"lazy\" needs the fault-injection feature); unset it")),
    }
}

/// The faults a node injects. All off by default.
#[derive(Debug, Default)]
pub struct NodeFaults {
    /// The next this-many successful produce answers are not sent: the connection is
    /// closed instead, after the batch was appended and committed (an answer lost on
    /// the way back).
    drop_produce_answers: AtomicU32,
}

impl NodeFaults {
    /// Whether to drop this produce answer (counting it if so).
    pub fn take_produce_answer_drop(&self) -> bool {
        self.drop_produce_answers.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
    }

    #[cfg(feature = "fault-injection")]
    pub fn drop_produce_answers(&self, count: u32) {
        self.drop_produce_answers.store(count, Ordering::Release);
    }
}

/// Test-only (`fault-injection` builds): `KEEL_TEST_METADATA_OPEN_DELAY_MS` holds a
/// starting node back this long after its peer listener answers and before it opens
/// its metadata group — a node slow to start while the others form the cluster
/// (`tests/late_node.rs`).
pub async fn metadata_open_delay() {
    #[cfg(feature = "fault-injection")]
    if let Some(ms) = std::env::var("KEEL_TEST_METADATA_OPEN_DELAY_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
        tracing::warn!(ms, "KEEL_TEST_METADATA_OPEN_DELAY_MS: opening the metadata group late");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}
