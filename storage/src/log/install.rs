//! Installing a log received from elsewhere: a *staged* log — a directory holding a
//! log opened with [`Log::create_at`], filled by appends and closed — replaces this
//! log's entries. This is how a replica behind its leader's retained prefix (or one
//! whose directory was wiped) takes the leader's segments: the same entries, the same
//! offsets, byte for byte, so the next entry it appends is stamped exactly as the
//! leader's.
//!
//! Every file in the staged directory moves into this log's directory (segments, their
//! indexes, the purge point, and whatever the caller put beside them, such as a state
//! snapshot). Across a crash the install is all or nothing: a marker file
//! (`install.pending`) records the phase before anything is deleted, and opening the
//! log finishes an install it finds started:
//! 1. marker `1` + the staged directory's name: delete this log's segments, indexes
//!    and purge point; sync the directory;
//! 2. marker `2`: rename every file still in the staged directory into this one (a
//!    file already moved is simply absent there); sync; remove the staged directory;
//!    remove the marker.

use super::*;

/// Marker of an install in progress (see the module docs).
pub(crate) const INSTALL_MARKER: &str = "install.pending";

/// Whether `name` is one of a log's own files (what phase 1 deletes).
fn is_log_file(name: &str) -> bool {
    name == PURGE_FILE || name.ends_with(".log") || name.ends_with(".index") || name.ends_with(".timeindex")
}

impl Log {
    /// Creates a log in the empty directory `dir` that starts after `purged`: its first
    /// entry will be `purged.index + 1`, at message offset `start_offset`. For staging
    /// a copy of another log's suffix.
    pub fn create_at(disk: Arc<dyn Disk>, dir: impl AsRef<Path>, config: LogConfig, purged: LogId, start_offset: u64) -> Result<Log, StorageError> {
        let dir = dir.as_ref();
        disk.create_dir_all(dir).map_err(|e| StorageError::io("create log directory", dir, e))?;
        let existing = disk.read_dir(dir).map_err(|e| StorageError::io("list log directory", dir, e))?;
        if existing.iter().any(|n| is_log_file(n)) {
            return Err(StorageError::InvalidAppend { reason: format!("{} already holds a log; a staged log starts in an empty directory", dir.display()) });
        }
        let mut meta = Vec::with_capacity(24);
        for w in [purged.term, purged.index, start_offset] {
            meta.extend_from_slice(&w.to_le_bytes());
        }
        atomic_file::write(&*disk, dir, PURGE_FILE, &meta)?;
        Log::open_on(disk, dir, config)
    }

    /// Replaces this log's entries with the staged log in `staged` (closed: flushed and
    /// dropped), moving every file of that directory into this one. Durable and
    /// crash-atomic (see the module docs); readers see the new log when it returns.
    pub fn install_staged(&self, staged: &Path) -> Result<(), StorageError> {
        let _io = self.lock_io();
        // Nothing of the old log may still be waiting to be written.
        self.write_pending(true)?;
        let _layout = self.layout.write().expect("layout lock poisoned by an earlier panic");
        let mut st = self.lock_state();
        if let Some(cause) = &st.poisoned {
            return Err(self.poisoned_error(cause));
        }
        let name = staged
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|_| staged.parent() == Some(self.dir.as_path()))
            .ok_or_else(|| StorageError::InvalidAppend { reason: format!("a staged log must be a directory inside {}", self.dir.display()) })?
            .to_string();
        // The old segments' handles close with the old state, below.
        finish_install(&*self.disk, &self.dir, Some(&name))?;
        let fresh = Log::open_on(self.disk.clone(), &self.dir, self.config.clone())?;
        let mut new_state = std::mem::replace(&mut *fresh.lock_state(), State::new(Vec::new(), 0, 0, None, None, 0));
        new_state.poisoned = None;
        // The old cache goes with the old state: its place in the shared budget too.
        new_state.cache_held = st.cache_held;
        *st = new_state;
        self.account_cache(&mut st);
        self.durable.reset(st.next_index);
        self.debug_check(&st, "an install");
        Ok(())
    }
}

/// Finishes (or, with `start`, starts and finishes) the install recorded in `dir`'s
/// marker. Does nothing if there is no marker and no `start`.
pub(crate) fn finish_install(disk: &dyn Disk, dir: &Path, start: Option<&str>) -> Result<(), StorageError> {
    let (mut phase, staged_name) = match start {
        Some(name) => {
            write_marker(disk, dir, 1, name)?;
            (1u8, name.to_string())
        }
        None => match atomic_file::read(disk, dir, INSTALL_MARKER)? {
            None => return Ok(()),
            Some(bytes) => {
                let (phase, name) = bytes.split_first().ok_or_else(|| corrupt_marker(dir))?;
                let name = std::str::from_utf8(name).map_err(|_| corrupt_marker(dir))?.to_string();
                if !matches!(phase, 1 | 2) || name.is_empty() || name.contains('/') {
                    return Err(corrupt_marker(dir));
                }
                tracing::warn!(dir = %dir.display(), phase, "finishing a log install a crash interrupted");
                (*phase, name)
            }
        },
    };
    let staged = dir.join(&staged_name);
    if phase == 1 {
        for name in disk.read_dir(dir).map_err(|e| StorageError::io("list log directory", dir, e))? {
            if is_log_file(&name) {
                let path = dir.join(&name);
                disk.remove_file(&path).map_err(|e| StorageError::io("delete replaced log file", &path, e))?;
            }
        }
        atomic_file::sync_dir(disk, dir)?;
        write_marker(disk, dir, 2, &staged_name)?;
        phase = 2;
    }
    debug_assert_eq!(phase, 2);
    if disk.exists(&staged) {
        for name in disk.read_dir(&staged).map_err(|e| StorageError::io("list staged log", &staged, e))? {
            if name.ends_with(".tmp") {
                continue;
            }
            let (from, to) = (staged.join(&name), dir.join(&name));
            disk.rename(&from, &to).map_err(|e| StorageError::io("move staged file", &from, e))?;
        }
        atomic_file::sync_dir(disk, dir)?;
        disk.remove_dir_all(&staged).map_err(|e| StorageError::io("remove staged directory", &staged, e))?;
    }
    disk.remove_file(&dir.join(INSTALL_MARKER)).map_err(|e| StorageError::io("remove install marker", dir, e))?;
    atomic_file::sync_dir(disk, dir)
}

fn write_marker(disk: &dyn Disk, dir: &Path, phase: u8, staged_name: &str) -> Result<(), StorageError> {
    let mut bytes = vec![phase];
    bytes.extend_from_slice(staged_name.as_bytes());
    atomic_file::write(disk, dir, INSTALL_MARKER, &bytes)
}

fn corrupt_marker(dir: &Path) -> StorageError {
    StorageError::Corrupt { path: dir.join(INSTALL_MARKER), position: 0, reason: "install marker does not parse".into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EntryMeta;

    fn config() -> LogConfig {
        LogConfig { segment_bytes: 4096, index_interval_bytes: 512, ..LogConfig::default() }
    }

    fn entry(term: u64, index: u64, base_offset: u64, fill: u8) -> Entry {
        let payload = Bytes::from(vec![fill; 300 + (index as usize % 7) * 50]);
        Entry { meta: EntryMeta { id: LogId { term, index }, kind: 1, base_offset, record_count: 3, max_timestamp_ms: index as i64 }, payload }
    }

    /// A leader's log: entries 0..60 over several segments, purged up to 20.
    fn leader(dir: &Path) -> Log {
        let log = Log::open(dir, config()).unwrap();
        log.append((0..60).map(|i| entry(1 + i / 30, i, i * 3, i as u8))).unwrap();
        log.flush().unwrap();
        let purge_at = log.read(20..21, 0).unwrap()[0].meta.id;
        log.purge_upto(purge_at).unwrap();
        log
    }

    /// A follower's log with a different (older) history: five entries of term 1.
    fn follower(dir: &Path) -> Log {
        let log = Log::open(dir, config()).unwrap();
        log.append((0..5).map(|i| entry(1, i, i * 3, 0xee))).unwrap();
        log.flush().unwrap();
        log
    }

    fn read_all(log: &Log, range: Range<u64>) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut next = range.start;
        while next < range.end {
            let batch = log.read(next..range.end, u64::MAX).unwrap();
            let Some(last) = batch.last() else { break };
            next = last.meta.id.index + 1;
            out.extend(batch);
        }
        out
    }

    /// Stages the leader's entries 21..=45 in `staging` (closed when this returns).
    fn stage(leader: &Log, staging: &Path) {
        let first = leader.read(21..22, 0).unwrap()[0].meta.base_offset;
        let purged = leader.state().purged.unwrap();
        let staged = Log::create_at(crate::disk::os(), staging, config(), purged, first).unwrap();
        staged.append(read_all(leader, 21..46)).unwrap();
        staged.flush().unwrap();
        std::fs::write(staging.join("partition.snapshot"), b"state at 45").unwrap();
    }

    fn assert_holds_staged_copy(log: &Log, leader: &Log) {
        let st = log.state();
        assert_eq!((st.first_index, st.last.map(|l| l.index)), (21, Some(45)));
        assert_eq!(st.start_offset, 63);
        let ours = read_all(log, 0..100);
        let theirs = read_all(leader, 21..46);
        assert_eq!(ours.len(), 25);
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!((a.meta, &a.payload), (b.meta, &b.payload), "byte-identical entries at identical offsets");
        }
        assert_eq!(log.next_offset(), theirs.last().unwrap().meta.end_offset());
    }

    #[test]
    fn an_installed_staged_log_holds_the_leaders_entries_and_appends_continue_at_its_offsets() {
        let tmp = tempfile::tempdir().unwrap();
        let leader = leader(&tmp.path().join("leader"));
        let dir = tmp.path().join("follower");
        let log = follower(&dir);
        stage(&leader, &dir.join("staging"));
        log.install_staged(&dir.join("staging")).unwrap();
        assert_holds_staged_copy(&log, &leader);
        assert_eq!(std::fs::read(dir.join("partition.snapshot")).unwrap(), b"state at 45", "files beside the staged log move too");
        assert!(!dir.join("staging").exists() && !dir.join(INSTALL_MARKER).exists());
        // The next entry (the leader's 46) goes on at the leader's offsets.
        let next = read_all(&leader, 46..47);
        log.append(next.clone()).unwrap();
        log.flush().unwrap();
        drop(log);
        let log = Log::open(&dir, config()).unwrap();
        assert_eq!(read_all(&log, 46..47)[0].payload, next[0].payload);
        assert_eq!(log.state().durable_end, 47);
    }

    #[test]
    fn an_install_a_crash_interrupted_in_either_phase_finishes_when_the_log_opens() {
        for (phase, moved) in [(1u8, 0usize), (2, 0), (2, 3), (2, usize::MAX)] {
            let tmp = tempfile::tempdir().unwrap();
            let leader = leader(&tmp.path().join("leader"));
            let dir = tmp.path().join("follower");
            drop(follower(&dir));
            let staging = dir.join("staging");
            stage(&leader, &staging);
            let disk = crate::disk::OsDisk;
            write_marker(&disk, &dir, 1, "staging").unwrap();
            if phase == 2 {
                for name in disk.read_dir(&dir).unwrap() {
                    if is_log_file(&name) {
                        std::fs::remove_file(dir.join(name)).unwrap();
                    }
                }
                write_marker(&disk, &dir, 2, "staging").unwrap();
                let mut names = disk.read_dir(&staging).unwrap();
                names.sort();
                for name in names.into_iter().take(moved) {
                    std::fs::rename(staging.join(&name), dir.join(&name)).unwrap();
                }
            }
            let log = Log::open(&dir, config()).unwrap();
            assert_holds_staged_copy(&log, &leader);
            assert!(!staging.exists() && !dir.join(INSTALL_MARKER).exists(), "phase {phase}, {moved} moved");
        }
    }
}
