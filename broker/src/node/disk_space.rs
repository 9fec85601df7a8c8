//! Disk space: a node running out refuses new data instead of failing a write.
//!
//! A segment write or fsync that fails — `ENOSPC` included — poisons its log, and
//! openraft treats any storage error as fatal to the group, so Keel never lets a
//! partition's data fill the disk. Every `DISK_CHECK_INTERVAL` the node reads the free
//! space of its data directory's file system (`statvfs`). Below `node.min_free_bytes`
//! the node is **full**:
//! - produces to partitions it leads are answered `StorageFull` (retriable) before
//!   anything is proposed, so nothing is half-written and acknowledged data is never at
//!   risk; the reserve absorbs what is already in flight, the small control entries
//!   (consumer-group acks, clock ticks, retention cuts) and replication of what other
//!   leaders committed;
//! - it hands the leadership of each partition it leads to another replica (at most
//!   every `DISK_FULL_STEP_DOWN_INTERVAL` per partition), since a leader that cannot
//!   take writes should not stay one; a replica whose disk has room takes over;
//! - `/health/ready` names the cause, and `keel_disk_free_bytes` / `keel_disk_full`
//!   report it.
//!
//! It is full until free space is back above the minimum plus `DISK_FULL_HYSTERESIS`
//! (retention deleting segments, or an operator freeing space), then resumes by itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::limits::{DISK_CHECK_INTERVAL, DISK_FULL_HYSTERESIS, DISK_FULL_STEP_DOWN_INTERVAL};
use super::reconcile::HostedPartitions;

/// What the node knows of its data directory's free space.
#[derive(Debug)]
pub struct DiskSpace {
    dir: PathBuf,
    /// Below this many free bytes the node is full (0: never).
    min_free: u64,
    free: AtomicU64,
    full: AtomicBool,
}

/// Bytes available to this process on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs(3) fills the zeroed struct from a NUL-terminated path we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `path` outlives the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl DiskSpace {
    pub fn new(dir: PathBuf, min_free: u64) -> Arc<DiskSpace> {
        let space = Arc::new(DiskSpace { dir, min_free, free: AtomicU64::new(u64::MAX), full: AtomicBool::new(false) });
        space.check();
        space
    }

    /// Whether the node refuses new data for lack of space.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// Free bytes at the last check.
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Acquire)
    }

    pub fn min_free(&self) -> u64 {
        self.min_free
    }

    /// Why the node refuses data, for users (`None` when it does not).
    pub fn refusal(&self) -> Option<String> {
        self.is_full().then(|| {
            format!(
                "the data directory {} has {} bytes free, below node.min_free_bytes ({}): new data is refused until space is freed (retention, or deleting other files)",
                self.dir.display(),
                self.free(),
                self.min_free
            )
        })
    }

    /// Reads the free space and updates the full flag (with hysteresis). Returns
    /// `Some(now_full)` when the flag changed.
    pub fn check(&self) -> Option<bool> {
        let free = match free_bytes(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the data directory's free space");
                return None;
            }
        };
        self.free.store(free, Ordering::Release);
        let was = self.is_full();
        let now = judge(was, free, self.min_free);
        crate::metrics::disk_space(free, now);
        (now != was).then(|| {
            self.full.store(now, Ordering::Release);
            now
        })
    }
}

/// Whether a node with `free` bytes free is full, given whether it was.
pub fn judge(was_full: bool, free: u64, min_free: u64) -> bool {
    if min_free == 0 {
        return false;
    }
    if was_full {
        free < min_free.saturating_add(DISK_FULL_HYSTERESIS.min(min_free))
    } else {
        free < min_free
    }
}

/// Runs until the node stops: checks the space, and while full moves leadership away.
pub async fn run(space: Arc<DiskSpace>, hosted: HostedPartitions, node_id: u64) {
    let mut tick = tokio::time::interval(DISK_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stepped_down: HashMap<u64, Instant> = HashMap::new();
    loop {
        tick.tick().await;
        let space_ = space.clone();
        let changed = tokio::task::spawn_blocking(move || space_.check()).await.ok().flatten();
        match changed {
            Some(true) => tracing::error!(free = space.free(), min_free = space.min_free(), "{}", space.refusal().unwrap_or_default()),
            Some(false) => tracing::warn!(free = space.free(), "the data directory has room again; taking new data"),
            None => {}
        }
        if !space.is_full() {
            stepped_down.clear();
            continue;
        }
        let partitions: Vec<_> = hosted.read().expect("hosted lock poisoned").values().cloned().collect();
        for p in partitions {
            if !p.serving_now() || stepped_down.get(&p.group.id).is_some_and(|t| t.elapsed() < DISK_FULL_STEP_DOWN_INTERVAL) {
                continue;
            }
            let Some(to) = p.replicas.iter().copied().find(|r| *r != node_id) else { continue };
            stepped_down.insert(p.group.id, Instant::now());
            p.group.sleep.wake(&p.group.raft, crate::peer::quiescence::WakeReason::Transfer);
            match p.group.raft.trigger().transfer_leader(to).await {
                Ok(()) => tracing::warn!(partition = %p.name(), to, "out of disk space: handing the leadership to another replica"),
                Err(e) => tracing::warn!(partition = %p.name(), error = %e, "could not hand the leadership away"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_full_below_the_minimum_and_stays_full_until_clearly_above_it() {
        let min = 100 * 1024 * 1024;
        assert!(!judge(false, min, min));
        assert!(judge(false, min - 1, min));
        assert!(judge(true, min + 1, min), "just above the minimum is not enough to resume");
        assert!(!judge(true, min + DISK_FULL_HYSTERESIS, min));
        assert!(!judge(false, 0, 0), "0 turns the check off");
    }

    #[test]
    fn the_free_space_of_a_real_directory_is_read() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        let space = DiskSpace::new(dir.path().to_path_buf(), u64::MAX);
        assert!(space.is_full(), "no file system has u64::MAX bytes free");
        assert!(space.refusal().unwrap().contains("node.min_free_bytes"));
    }
}
