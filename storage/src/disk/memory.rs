//! [`MemoryDisk`]: files in memory, with power loss and injected faults.
//!
//! Two namespaces (path → directory or file) and, per file, two contents: what is
//! *live* (what reads see: the page cache) and what is *durable* (what survives a power
//! cut). Writes and `set_len` change the live content; `sync_data` copies it to the
//! durable one. Creates, renames and unlinks change the live namespace; `sync_dir`
//! copies that directory's entries to the durable namespace. [`MemoryDisk::power_loss`]
//! throws away everything live and starts over from what was durable; handles opened
//! before it fail from then on, like the file descriptors of a process that died.
//!
//! Every operation takes one lock: this is a test and simulation backend, built to be
//! exact and deterministic (ordered maps only), not fast.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::sync::{Mutex, MutexGuard};

use super::{short_read, Disk, DiskFile, FileMap, OpenMode};

/// A kind of I/O call, for injected failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum IoKind {
    /// `write_all_at` and `set_len`.
    Write,
    /// `sync_data`, `sync_all` and `sync_dir`.
    Sync,
    /// `read_exact_at` (and `read`).
    Read,
}

/// An in-memory disk. Clones share the same files (keep one to cut the power).
#[derive(Debug, Clone, Default)]
pub struct MemoryDisk {
    shared: Arc<Mutex<State>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Dir,
    File(u64),
}

#[derive(Debug, Default, Clone)]
struct Content {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Byte range of `live` changed since the last sync.
    dirty: Option<(u64, u64)>,
}

impl Content {
    fn touch(&mut self, from: u64, to: u64) {
        self.dirty = Some(match self.dirty {
            None => (from, to),
            Some((a, b)) => (a.min(from), b.max(to)),
        });
    }

    fn sync(&mut self) {
        let len = self.live.len();
        self.durable.resize(len, 0);
        if let Some((from, to)) = self.dirty.take() {
            let (from, to) = ((from as usize).min(len), (to as usize).min(len));
            self.durable[from..to].copy_from_slice(&self.live[from..to]);
        }
    }
}

#[derive(Debug, Default, Clone)]
struct State {
    live: BTreeMap<PathBuf, Node>,
    durable: BTreeMap<PathBuf, Node>,
    files: BTreeMap<u64, Content>,
    next_file: u64,
    /// Bumped by every power loss; handles of an older generation are dead.
    generation: u64,
    /// Calls of each kind still to fail.
    failures: BTreeMap<IoKind, u32>,
}

impl State {
    fn fail(&mut self, kind: IoKind) -> io::Result<()> {
        match self.failures.get_mut(&kind) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(io::Error::from_raw_os_error(5))
            }
            _ => Ok(()),
        }
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.live.get(path) == Some(&Node::Dir)
    }

    fn parent_exists(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() && !self.is_dir(p) => Err(not_found(p)),
            _ => Ok(()),
        }
    }

    fn file(&self, path: &Path) -> io::Result<u64> {
        match self.live.get(path) {
            Some(Node::File(id)) => Ok(*id),
            Some(Node::Dir) => Err(io::Error::new(io::ErrorKind::IsADirectory, format!("{} is a directory", path.display()))),
            None => Err(not_found(path)),
        }
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} does not exist", path.display()))
}

fn is_under(path: &Path, dir: &Path) -> bool {
    path != dir && path.starts_with(dir)
}

#[derive(Debug)]
struct MemoryFile {
    shared: Arc<Mutex<State>>,
    id: u64,
    generation: u64,
    writable: bool,
}

impl MemoryDisk {
    pub fn new() -> MemoryDisk {
        MemoryDisk::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An independent copy of this disk as it is now (files, what is synced, pending
    /// failures); handles opened on this disk do not reach the copy.
    pub fn deep_copy(&self) -> MemoryDisk {
        MemoryDisk { shared: Arc::new(Mutex::new(self.lock().clone())) }
    }

    /// Makes the next `count` calls of `kind` fail with EIO.
    pub fn fail_next(&self, kind: IoKind, count: u32) {
        *self.lock().failures.entry(kind).or_default() += count;
    }

    /// A power cut: every unsynced write, length change, create, rename and unlink is
    /// gone, and every handle opened before fails from now on.
    pub fn power_loss(&self) {
        self.power_loss_keeping(|_, _| 0);
    }

    /// A power cut in which some unsynced appends reached the platter anyway: for each
    /// surviving file whose live content is its durable content plus appended bytes,
    /// `keep(path, appended)` says how many of those bytes survive (a torn write).
    pub fn power_loss_keeping(&self, mut keep: impl FnMut(&Path, u64) -> u64) {
        let mut st = self.lock();
        let st = &mut *st;
        st.generation += 1;
        st.live = st.durable.clone();
        let surviving: BTreeMap<u64, &PathBuf> = st.durable.iter().filter_map(|(p, n)| if let Node::File(id) = n { Some((*id, p)) } else { None }).collect();
        st.files.retain(|id, _| surviving.contains_key(id));
        for (id, content) in st.files.iter_mut() {
            let durable_len = content.durable.len() as u64;
            let appended_only = content.dirty.is_some_and(|(from, _)| from >= durable_len) && content.live.len() as u64 > durable_len;
            if appended_only {
                let extra = content.live.len() as u64 - durable_len;
                let kept = keep(surviving[id], extra).min(extra) as usize;
                let from = durable_len as usize;
                let tail = content.live[from..from + kept].to_vec();
                content.durable.extend_from_slice(&tail);
            }
            content.live = content.durable.clone();
            content.dirty = None;
        }
    }

    /// Changes a file's bytes in place, both live and durable — damage at rest (a bad
    /// sector, a misdirected write, an operator's mistake), not a write.
    pub fn damage(&self, path: &Path, change: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        let mut st = self.lock();
        let id = st.file(path)?;
        let content = st.files.get_mut(&id).expect("a file in the namespace has content");
        content.sync();
        change(&mut content.durable);
        content.live = content.durable.clone();
        Ok(())
    }

    /// Every file in the live namespace under `dir`, with its live length.
    pub fn files_under(&self, dir: &Path) -> Vec<(PathBuf, u64)> {
        let st = self.lock();
        st.live
            .iter()
            .filter(|(p, _)| is_under(p, dir))
            .filter_map(|(p, n)| if let Node::File(id) = n { Some((p.clone(), st.files[id].live.len() as u64)) } else { None })
            .collect()
    }
}

impl Disk for MemoryDisk {
    fn runs_inline(&self) -> bool {
        true
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        for p in dir.ancestors().filter(|p| !p.as_os_str().is_empty()) {
            match st.live.get(p) {
                Some(Node::File(_)) => return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} is a file", p.display()))),
                Some(Node::Dir) => {}
                None => {
                    st.live.insert(p.to_path_buf(), Node::Dir);
                }
            }
            // Durable when this returns (the contract): the parents are synced.
            st.durable.insert(p.to_path_buf(), Node::Dir);
        }
        Ok(())
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>> {
        let mut st = self.lock();
        let id = match (mode, st.live.get(path).copied()) {
            (OpenMode::CreateNew, Some(_)) => return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", path.display()))),
            (OpenMode::Read | OpenMode::ReadWrite, _) => st.file(path)?,
            (OpenMode::CreateTruncate, Some(_)) => {
                let id = st.file(path)?;
                let content = st.files.get_mut(&id).expect("a file in the namespace has content");
                let old = content.live.len() as u64;
                content.live.clear();
                content.touch(0, old);
                id
            }
            (OpenMode::CreateNew | OpenMode::CreateTruncate, None) => {
                st.parent_exists(path)?;
                let id = st.next_file;
                st.next_file += 1;
                st.files.insert(id, Content::default());
                st.live.insert(path.to_path_buf(), Node::File(id));
                id
            }
        };
        Ok(Arc::new(MemoryFile { shared: self.shared.clone(), id, generation: st.generation, writable: mode != OpenMode::Read }))
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = self.lock();
        if !st.is_dir(dir) {
            return Err(not_found(dir));
        }
        Ok(st.live.keys().filter(|p| p.parent() == Some(dir)).filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).collect())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.file(path)?;
        st.live.remove(path);
        Ok(())
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        if !st.is_dir(dir) {
            return Err(not_found(dir));
        }
        st.live.retain(|p, _| p != dir && !is_under(p, dir));
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let id = st.file(from)?;
        st.parent_exists(to)?;
        if st.is_dir(to) {
            return Err(io::Error::new(io::ErrorKind::IsADirectory, format!("{} is a directory", to.display())));
        }
        st.live.remove(from);
        st.live.insert(to.to_path_buf(), Node::File(id));
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.fail(IoKind::Sync)?;
        if !st.is_dir(dir) {
            return Err(not_found(dir));
        }
        let st = &mut *st;
        let children: Vec<PathBuf> = st.live.keys().chain(st.durable.keys()).filter(|p| p.parent() == Some(dir)).cloned().collect();
        for child in children {
            match st.live.get(&child).copied() {
                Some(node) => {
                    st.durable.insert(child, node);
                }
                None => {
                    st.durable.retain(|p, _| *p != child && !is_under(p, &child));
                }
            }
        }
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        self.lock().live.contains_key(path)
    }
}

impl MemoryFile {
    /// The disk's state, if this handle is still alive (no power loss since it opened).
    fn lock(&self) -> io::Result<MutexGuard<'_, State>> {
        let st = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if st.generation != self.generation {
            return Err(io::Error::other("the disk lost power since this file was opened"));
        }
        Ok(st)
    }

    fn writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, "file opened read-only"))
        }
    }
}

impl DiskFile for MemoryFile {
    fn size(&self) -> io::Result<u64> {
        let st = self.lock()?;
        Ok(st.files[&self.id].live.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let mut st = self.lock()?;
        st.fail(IoKind::Read)?;
        let live = &st.files[&self.id].live;
        let end = pos.checked_add(buf.len() as u64).filter(|e| *e <= live.len() as u64).ok_or_else(|| short_read(pos, buf.len(), live.len() as u64))?;
        buf.copy_from_slice(&live[pos as usize..end as usize]);
        Ok(())
    }

    fn write_all_at(&self, pos: u64, pieces: &[&[u8]]) -> io::Result<()> {
        self.writable()?;
        let mut st = self.lock()?;
        st.fail(IoKind::Write)?;
        let content = st.files.get_mut(&self.id).expect("an open file has content");
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        let end = pos as usize + total;
        if content.live.len() < end {
            content.live.resize(end, 0);
        }
        let mut at = pos as usize;
        for piece in pieces {
            content.live[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
        content.touch(pos, end as u64);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        let mut st = self.lock()?;
        st.fail(IoKind::Write)?;
        let content = st.files.get_mut(&self.id).expect("an open file has content");
        let old = content.live.len() as u64;
        content.live.resize(len as usize, 0);
        content.touch(old.min(len), old.max(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = self.lock()?;
        st.fail(IoKind::Sync)?;
        st.files.get_mut(&self.id).expect("an open file has content").sync();
        Ok(())
    }

    fn map(&self) -> io::Result<FileMap> {
        let st = self.lock()?;
        Ok(FileMap::copied(bytes::Bytes::copy_from_slice(&st.files[&self.id].live)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_file(disk: &MemoryDisk, path: &str, bytes: &[u8], sync: bool) -> Arc<dyn DiskFile> {
        let f = disk.open(Path::new(path), OpenMode::CreateTruncate).unwrap();
        f.write_all_at(0, &[bytes]).unwrap();
        if sync {
            f.sync_data().unwrap();
        }
        f
    }

    #[test]
    fn power_loss_keeps_synced_bytes_and_drops_unsynced_ones() {
        let disk = MemoryDisk::new();
        disk.create_dir_all(Path::new("/d")).unwrap();
        let f = write_file(&disk, "/d/a", b"synced", true);
        f.write_all_at(6, &[b" and not"]).unwrap();
        disk.sync_dir(Path::new("/d")).unwrap();
        assert_eq!(disk.read(Path::new("/d/a")).unwrap(), b"synced and not");
        disk.power_loss();
        assert_eq!(disk.read(Path::new("/d/a")).unwrap(), b"synced");
        assert!(f.size().is_err(), "a handle from before the power loss is dead");
    }

    #[test]
    fn a_synced_file_whose_directory_was_not_synced_is_gone_after_power_loss() {
        let disk = MemoryDisk::new();
        disk.create_dir_all(Path::new("/d")).unwrap();
        write_file(&disk, "/d/a", b"bytes", true);
        disk.power_loss();
        assert!(!disk.exists(Path::new("/d/a")));
        assert!(disk.exists(Path::new("/d")), "create_dir_all is durable");
    }

    #[test]
    fn an_unsynced_rename_rolls_back_and_a_synced_one_stays() {
        let disk = MemoryDisk::new();
        disk.create_dir_all(Path::new("/d")).unwrap();
        write_file(&disk, "/d/f", b"old", true);
        disk.sync_dir(Path::new("/d")).unwrap();
        write_file(&disk, "/d/f.tmp", b"new", true);
        disk.rename(Path::new("/d/f.tmp"), Path::new("/d/f")).unwrap();
        disk.power_loss();
        assert_eq!(disk.read(Path::new("/d/f")).unwrap(), b"old");
        write_file(&disk, "/d/f.tmp", b"new", true);
        disk.rename(Path::new("/d/f.tmp"), Path::new("/d/f")).unwrap();
        disk.sync_dir(Path::new("/d")).unwrap();
        disk.power_loss();
        assert_eq!(disk.read(Path::new("/d/f")).unwrap(), b"new");
        assert!(!disk.exists(Path::new("/d/f.tmp")));
    }

    #[test]
    fn an_unsynced_truncation_is_undone_by_power_loss() {
        let disk = MemoryDisk::new();
        disk.create_dir_all(Path::new("/d")).unwrap();
        let f = write_file(&disk, "/d/a", b"0123456789", true);
        disk.sync_dir(Path::new("/d")).unwrap();
        f.set_len(4).unwrap();
        f.write_all_at(4, &[b"xy"]).unwrap();
        assert_eq!(disk.read(Path::new("/d/a")).unwrap(), b"0123xy");
        disk.power_loss();
        assert_eq!(disk.read(Path::new("/d/a")).unwrap(), b"0123456789");
    }

    #[test]
    fn a_torn_power_loss_keeps_a_prefix_of_the_appended_bytes() {
        let disk = MemoryDisk::new();
        disk.create_dir_all(Path::new("/d")).unwrap();
        let f = write_file(&disk, "/d/a", b"head", true);
        disk.sync_dir(Path::new("/d")).unwrap();
        f.write_all_at(4, &[b"tail"]).unwrap();
        disk.power_loss_keeping(|path, appended| {
            assert_eq!((path, appended), (Path::new("/d/a"), 4));
            2
        });
        assert_eq!(disk.read(Path::new("/d/a")).unwrap(), b"headta");
    }

    #[test]
    fn injected_failures_hit_the_next_calls_of_their_kind_only() {
        let disk = MemoryDisk::new();
        disk.create_dir_all(Path::new("/d")).unwrap();
        let f = write_file(&disk, "/d/a", b"x", false);
        disk.fail_next(IoKind::Sync, 1);
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(5));
        f.sync_data().unwrap();
        disk.fail_next(IoKind::Write, 1);
        assert!(f.write_all_at(0, &[b"y"]).is_err());
        f.write_all_at(0, &[b"y"]).unwrap();
        disk.fail_next(IoKind::Read, 1);
        let mut buf = [0u8; 1];
        assert!(f.read_exact_at(&mut buf, 0).is_err());
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"y");
    }

    #[test]
    fn removing_a_directory_is_durable_only_after_its_parent_is_synced() {
        let disk = MemoryDisk::new();
        disk.create_dir_all(Path::new("/d/g")).unwrap();
        write_file(&disk, "/d/g/a", b"x", true);
        disk.sync_dir(Path::new("/d/g")).unwrap();
        disk.remove_dir_all(Path::new("/d/g")).unwrap();
        assert!(!disk.exists(Path::new("/d/g/a")));
        disk.power_loss();
        assert!(disk.exists(Path::new("/d/g/a")));
        disk.remove_dir_all(Path::new("/d/g")).unwrap();
        disk.sync_dir(Path::new("/d")).unwrap();
        disk.power_loss();
        assert!(!disk.exists(Path::new("/d/g")) && !disk.exists(Path::new("/d/g/a")));
    }
}
