//! The storage I/O seam: everything the log, its index files and the metadata files do
//! to a disk goes through a [`Disk`] and the [`DiskFile`]s it opens.
//!
//! - [`OsDisk`]: the operating system's file system. The production backend; a thin
//!   layer over `std::fs` (one vectored write per flush, `fdatasync`, `mmap`).
//! - [`MemoryDisk`] (tests, the simulator): files in memory that keep what was synced
//!   apart from what was only written, so [`MemoryDisk::power_loss`] drops every unsynced
//!   write, create, rename and unlink; it can also fail writes, syncs and reads on
//!   command and damage files the way a bad disk does.
//! - [`LazyDisk`] (tests, the power-loss nemesis): the OS file system, except that file
//!   writes stay in the process until the file is synced, so killing the process loses
//!   exactly what a power cut would lose of file contents.
//!
//! # Contract (what the log relies on; every backend honours it)
//! - A file's bytes and length are durable once `sync_data` (or `sync_all`) returns.
//! - Creating, renaming or removing a file is durable once `sync_dir` of its directory
//!   returns. `create_dir_all` is durable when it returns (it syncs the parents of the
//!   directories it creates).
//! - `rename` within a directory is atomic.
//! - Reads see every write made through any handle of this disk, synced or not.
//! - One handle writes a file at a time (the log's `io` lock guarantees it).

mod lazy;
mod memory;
mod os;

use std::fmt;
use std::io;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

pub use lazy::LazyDisk;
pub use memory::{IoKind, MemoryDisk};
pub use os::OsDisk;

/// How [`Disk::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, for reading only.
    Read,
    /// An existing file, for reading and writing.
    ReadWrite,
    /// A new file that must not exist yet, for reading and writing.
    CreateNew,
    /// Create the file, or empty it if it exists; for reading and writing.
    CreateTruncate,
}

/// A file system: directories and the files in them.
pub trait Disk: Send + Sync + fmt::Debug + 'static {
    /// Creates `dir` and its missing parents; durable when it returns.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Opens `path` as `mode` says.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>>;
    /// Names of the entries (files and directories) in `dir`, in no particular order.
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Removes a file (durable after `sync_dir` of its directory).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything in it (durable after `sync_dir` of its parent).
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Renames a file, replacing `to` atomically (durable after `sync_dir`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the creates, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Whether `path` exists (file or directory).
    fn exists(&self, path: &Path) -> bool;

    /// Whether callers should run this disk's operations in place instead of on a
    /// blocking thread: true for a disk in memory, whose operations never block (and
    /// which a deterministic simulation drives from its one thread).
    fn runs_inline(&self) -> bool {
        false
    }

    /// The whole contents of an existing file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let file = self.open(path, OpenMode::Read)?;
        let mut buf = vec![0u8; usize::try_from(file.size()?).map_err(io::Error::other)?];
        file.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }
}

/// An open file. Positions are bytes from the start of the file.
pub trait DiskFile: Send + Sync + fmt::Debug {
    /// The file's length in bytes, counting unsynced writes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `pos`; `UnexpectedEof` if the file ends first.
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()>;
    /// Writes `pieces` back to back from `pos` (extending the file if needed).
    fn write_all_at(&self, pos: u64, pieces: &[&[u8]]) -> io::Result<()>;
    /// Shortens or extends (with zeros) the file to `len`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's bytes and length durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the file's bytes and all its metadata durable (`fsync`).
    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }
    /// A read-only view of the whole file as it is now. Only for files that are never
    /// modified again (sealed index files).
    fn map(&self) -> io::Result<FileMap>;
    /// Advises that the bytes `from..to`, already synced, will not be read soon: the OS
    /// may drop them from its page cache (`posix_fadvise(DONTNEED)`). Advice only:
    /// nothing about the file's contents or durability changes, and a later read
    /// fetches the bytes again. A no-op where there is no page cache.
    fn drop_cached(&self, _from: u64, _to: u64) -> io::Result<()> {
        Ok(())
    }
}

/// A read-only view of a whole file: memory-mapped ([`OsDisk`]) or copied.
pub struct FileMap(MapInner);

enum MapInner {
    Mapped(memmap2::Mmap),
    Copied(bytes::Bytes),
}

impl FileMap {
    pub(crate) fn mapped(map: memmap2::Mmap) -> FileMap {
        FileMap(MapInner::Mapped(map))
    }

    pub(crate) fn copied(bytes: bytes::Bytes) -> FileMap {
        FileMap(MapInner::Copied(bytes))
    }
}

impl Deref for FileMap {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            MapInner::Mapped(m) => m,
            MapInner::Copied(b) => b,
        }
    }
}

impl fmt::Debug for FileMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.0 {
            MapInner::Mapped(_) => "mapped",
            MapInner::Copied(_) => "copied",
        };
        f.debug_struct("FileMap").field("kind", &kind).field("len", &self.len()).finish()
    }
}

/// The production disk, shared: what `Log::open` uses.
pub fn os() -> Arc<dyn Disk> {
    Arc::new(OsDisk)
}

/// `UnexpectedEof` for a read of `len` bytes at `pos` in a file of `file_len` bytes.
fn short_read(pos: u64, len: usize, file_len: u64) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("read of {len} bytes at {pos} runs past the end of the file ({file_len} bytes)"))
}
