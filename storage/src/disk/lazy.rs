//! [`LazyDisk`]: the OS file system with file writes held in the process until synced.
//!
//! Every write and length change of a file stays in memory, attached to its handle,
//! until `sync_data` applies them to the real file and fsyncs it. Killing the process
//! (`kill -9`) therefore loses exactly the unsynced file contents, as a power cut would;
//! what was synced is on the real disk and survives. This turns every kill of a test
//! node into a power loss of its file contents (the Jepsen power-loss nemesis).
//!
//! Directory operations (create, rename, unlink) go straight to the OS and are not
//! held: a power cut could also undo unsynced ones, which [`super::MemoryDisk`] models
//! and this backend does not. Only one handle may write a file (the log's contract).

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{short_read, Disk, DiskFile, FileMap, OpenMode, OsDisk};

/// The OS file system, with file contents written only at sync (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct LazyDisk;

#[derive(Debug)]
struct LazyFile {
    inner: Arc<dyn DiskFile>,
    pending: Mutex<Pending>,
}

/// Changes not yet applied to the real file, in order.
#[derive(Debug, Default)]
struct Pending {
    /// The file's length as reads see it, if anything is pending.
    len: Option<u64>,
    /// Real bytes at or past this are cut (a pending `set_len` shrank the file).
    cut: Option<u64>,
    writes: Vec<(u64, Vec<u8>)>,
}

impl Disk for LazyDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        OsDisk.create_dir_all(dir)
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>> {
        // Emptying a file is a length change: held like the others.
        let (os_mode, truncate) = match mode {
            OpenMode::CreateTruncate if path.exists() => (OpenMode::ReadWrite, true),
            other => (other, false),
        };
        let file = LazyFile { inner: OsDisk.open(path, os_mode)?, pending: Mutex::new(Pending::default()) };
        if truncate {
            file.set_len(0)?;
        }
        Ok(Arc::new(file))
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        OsDisk.read_dir(dir)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        OsDisk.remove_file(path)
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        OsDisk.remove_dir_all(dir)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        OsDisk.rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        OsDisk.sync_dir(dir)
    }

    fn exists(&self, path: &Path) -> bool {
        OsDisk.exists(path)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        // A fresh handle has nothing pending: the real file is what it would read.
        OsDisk.read(path)
    }
}

impl LazyFile {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DiskFile for LazyFile {
    fn size(&self) -> io::Result<u64> {
        match self.pending().len {
            Some(len) => Ok(len),
            None => self.inner.size(),
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let p = self.pending();
        let Some(len) = p.len else { return self.inner.read_exact_at(buf, pos) };
        let end = pos.checked_add(buf.len() as u64).filter(|e| *e <= len).ok_or_else(|| short_read(pos, buf.len(), len))?;
        // The real bytes still valid, then the pending writes over them in order.
        let real_end = p.cut.map_or(u64::MAX, |c| c).min(self.inner.size()?).min(end);
        buf.fill(0);
        if real_end > pos {
            self.inner.read_exact_at(&mut buf[..(real_end - pos) as usize], pos)?;
        }
        for (at, bytes) in &p.writes {
            let (from, to) = ((*at).max(pos), (at + bytes.len() as u64).min(end));
            if from < to {
                buf[(from - pos) as usize..(to - pos) as usize].copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
            }
        }
        Ok(())
    }

    fn write_all_at(&self, pos: u64, pieces: &[&[u8]]) -> io::Result<()> {
        let len = self.size()?;
        let bytes = pieces.concat();
        let end = pos + bytes.len() as u64;
        let mut p = self.pending();
        p.len = Some(len.max(end));
        // Earlier pending writes this one covers whole would only be overwritten at the
        // sync: drop them, so a file rewritten in place and never synced (a held slot
        // file's hints) keeps a bounded list.
        p.writes.retain(|(at, b)| !(*at >= pos && at + b.len() as u64 <= end));
        p.writes.push((pos, bytes));
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let old = self.size()?;
        let mut p = self.pending();
        if len < old {
            p.cut = Some(p.cut.map_or(len, |c| c.min(len)));
            // Bytes past the new end are gone, even if the file grows again later.
            for (at, bytes) in p.writes.iter_mut() {
                bytes.truncate(len.saturating_sub(*at) as usize);
            }
        }
        p.len = Some(len);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut p = self.pending();
        if let Some(len) = p.len {
            if let Some(cut) = p.cut {
                self.inner.set_len(cut)?;
            }
            for (at, bytes) in &p.writes {
                if !bytes.is_empty() {
                    self.inner.write_all_at(*at, &[bytes])?;
                }
            }
            if self.inner.size()? != len {
                self.inner.set_len(len)?;
            }
            *p = Pending::default();
        }
        self.inner.sync_data()
    }

    fn map(&self) -> io::Result<FileMap> {
        if self.pending().len.is_some() {
            return Err(io::Error::other("mapping a file with unsynced writes"));
        }
        self.inner.map()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewriting_the_same_bytes_unsynced_keeps_one_pending_write_and_reads_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let f = LazyDisk.open(&dir.path().join("hint"), OpenMode::CreateTruncate).unwrap();
        f.write_all_at(0, &[b"0123456789"]).unwrap();
        for i in 0..1000u32 {
            f.write_all_at(2, &[&i.to_le_bytes()]).unwrap();
        }
        f.write_all_at(1, &[b"ab"]).unwrap();
        let mut buf = [0u8; 10];
        f.read_exact_at(&mut buf, 0).unwrap();
        let mut want = *b"0123456789";
        want[2..6].copy_from_slice(&999u32.to_le_bytes());
        want[1..3].copy_from_slice(b"ab");
        assert_eq!(buf, want, "later writes win over earlier ones, partially covered ones kept");
        // The pending list is private; its Debug form lists every pending write (1,000
        // of them would print tens of KiB).
        let pending = format!("{f:?}");
        assert!(pending.len() < 1000, "covered writes are dropped, not kept: {} bytes of pending writes", pending.len());
        f.sync_data().unwrap();
        assert_eq!(std::fs::read(dir.path().join("hint")).unwrap(), want);
    }

    #[test]
    fn writes_reach_the_real_file_only_at_sync_and_read_back_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = LazyDisk.open(&path, OpenMode::CreateNew).unwrap();
        f.write_all_at(0, &[b"hello ", b"world"]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"", "nothing written before the sync");
        let mut buf = [0u8; 11];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello world");
        f.sync_data().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
    }

    #[test]
    fn a_pending_truncation_hides_the_cut_bytes_and_applies_at_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let f = LazyDisk.open(&path, OpenMode::ReadWrite).unwrap();
        f.set_len(4).unwrap();
        f.set_len(6).unwrap();
        f.write_all_at(6, &[b"ab"]).unwrap();
        let mut buf = [0u8; 8];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"0123\0\0ab");
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789", "the real file is untouched before the sync");
        f.sync_data().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"0123\0\0ab");
    }

    #[test]
    fn dropping_a_file_with_pending_writes_loses_them_like_a_power_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = LazyDisk.open(&path, OpenMode::CreateNew).unwrap();
        f.write_all_at(0, &[b"synced"]).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(6, &[b" lost"]).unwrap();
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), b"synced");
    }
}
