//! Small records rewritten often, in place: a Raft group's vote and its committed-index
//! hints. [`atomic_file`](crate::atomic_file) replaces a file by writing a new one and
//! renaming it over the old: a new inode for every write, and on ext4 allocating inodes
//! while as many are being freed is slow (`find_inode_bit` scanning for recently
//! deleted ones). When a node died leading hundreds of groups, that allocation was a
//! fifth of the survivors' CPU while they elected (see ARCHITECTURE.md, "Many
//! partitions"). Here a write is one positioned write (and `fdatasync` when durable)
//! into a file that already exists.
//!
//! # Layout
//! Two slots, at offsets 0 and [`SLOT_STRIDE`]; the file is `2 × SLOT_STRIDE` long from
//! its creation on, so a write never changes its length. Each slot holds a frame:
//! `magic:u32 "KSL1" | seq:u64 | len:u32 | crc32c(seq, len, contents):u32 | contents`,
//! at most [`SLOT_CONTENTS_MAX`] bytes of contents. The slots are a page apart, so a
//! power cut that tears one slot's write cannot reach the other, even on a device that
//! rewrites whole 4 KiB sectors.
//!
//! # Rules
//! - A read returns the valid frame with the highest `seq`. The file is created whole
//!   (written beside, then renamed into place), so a file holding no valid frame is
//!   damaged and reported so.
//! - A write goes to the slot *not* holding that frame, with `seq` one above it. The
//!   newest record is never overwritten: torn, a write reads back as the record before.
//! - A file written with `durable` (fdatasync before returning) returns, after a crash,
//!   the last record written durably or a later one. Written without, a crash may
//!   bring back any record ever written to it, none, or a damaged file — fit only for
//!   hints of which every earlier value is also true, and whose readers take damage
//!   for absence. A file written both ways loses the guarantee for its durable records
//!   (an unsynced write may take the slot of the last durable one, and itself be
//!   lost): a record that must never go back in time is only ever written durably.

use std::io;
use std::path::Path;

use crate::disk::{Disk, DiskFile, OpenMode};
use crate::error::StorageError;

const MAGIC: u32 = u32::from_le_bytes(*b"KSL1");
/// Bytes before a slot's contents: magic, seq, len, crc.
const FRAME_LEN: usize = 20;
/// Where the second slot starts; also the size of the first.
pub const SLOT_STRIDE: u64 = 4096;
/// The largest record a slot file holds.
pub const SLOT_CONTENTS_MAX: usize = 512 - FRAME_LEN;

/// The newest valid record in `dir/name`, `Ok(None)` if the file does not exist. A file
/// that exists always holds a valid record (it is created whole, by a rename, and a
/// write never overwrites its newest record), so one that holds none is reported
/// corrupt, never silently treated as absent.
pub fn read(disk: &dyn Disk, dir: &Path, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
    let path = dir.join(name);
    let f = match disk.open(&path, OpenMode::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io("open", &path, e)),
    };
    let [a, b] = read_slots(&*f).map_err(|e| StorageError::io("read", &path, e))?;
    match [a, b].into_iter().flatten().max_by_key(|r| r.seq) {
        Some(r) => Ok(Some(r.contents)),
        None => Err(StorageError::Corrupt { path, position: 0, reason: "neither slot holds a valid record".to_string() }),
    }
}

/// Whether `dir/name` exists.
pub fn exists(disk: &dyn Disk, dir: &Path, name: &str) -> bool {
    disk.exists(&dir.join(name))
}

/// Writes `contents` as the newest record of `dir/name`. With `durable`, the record is
/// on disk when this returns. The file is created at its first write, whole: written
/// beside it, then renamed into place (made durable with the directory when
/// `durable`). See the module's rules.
pub fn write(disk: &dyn Disk, dir: &Path, name: &str, contents: &[u8], durable: bool) -> Result<(), StorageError> {
    assert!(contents.len() <= SLOT_CONTENTS_MAX, "slot file {name}: a record of {} bytes is above SLOT_CONTENTS_MAX", contents.len());
    match SlotWriter::open(disk, dir, name)? {
        Some(mut w) => w.write(contents, durable),
        None => create(disk, dir, name, contents, durable),
    }
}

/// A slot file held open for a stream of writes to it (a hint rewritten at every
/// commit): it remembers the slot and sequence number of its next write, so a write is
/// one positioned write (and one `fdatasync` when durable) — no open, read or close.
/// The rules are [`write`]'s; only valid while nothing else writes the file.
#[derive(Debug)]
pub struct SlotWriter {
    file: std::sync::Arc<dyn DiskFile>,
    path: std::path::PathBuf,
    next_slot: u64,
    next_seq: u64,
}

impl SlotWriter {
    /// Opens `dir/name` for writes, `Ok(None)` if it does not exist yet (its first write
    /// goes through [`write`], which creates it).
    pub fn open(disk: &dyn Disk, dir: &Path, name: &str) -> Result<Option<SlotWriter>, StorageError> {
        let path = dir.join(name);
        let file = match disk.open(&path, OpenMode::ReadWrite) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageError::io("open", &path, e)),
        };
        let slots = read_slots(&*file).map_err(|e| StorageError::io("read", &path, e))?;
        let (next_slot, next_seq) = match newest(&slots) {
            Some((slot, r)) => (1 - slot as u64, r.seq + 1),
            None => (0, 1),
        };
        Ok(Some(SlotWriter { file, path, next_slot, next_seq }))
    }

    /// Writes `contents` as the file's newest record (see [`write`]).
    pub fn write(&mut self, contents: &[u8], durable: bool) -> Result<(), StorageError> {
        assert!(contents.len() <= SLOT_CONTENTS_MAX, "slot file {}: a record of {} bytes is above SLOT_CONTENTS_MAX", self.path.display(), contents.len());
        self.file.write_all_at(self.next_slot * SLOT_STRIDE, &[&encode(self.next_seq, contents)]).map_err(|e| StorageError::io("write", &self.path, e))?;
        if durable {
            self.file.sync_data().map_err(|e| StorageError::io("fdatasync", &self.path, e))?;
        }
        self.next_slot = 1 - self.next_slot;
        self.next_seq += 1;
        Ok(())
    }
}

/// The file's first write: the whole file beside it, then renamed into place.
fn create(disk: &dyn Disk, dir: &Path, name: &str, contents: &[u8], durable: bool) -> Result<(), StorageError> {
    let (tmp, dst) = (dir.join(format!("{name}.tmp")), dir.join(name));
    let f = disk.open(&tmp, OpenMode::CreateTruncate).map_err(|e| StorageError::io("create", &tmp, e))?;
    f.set_len(2 * SLOT_STRIDE).map_err(|e| StorageError::io("size", &tmp, e))?;
    f.write_all_at(0, &[&encode(1, contents)]).map_err(|e| StorageError::io("write", &tmp, e))?;
    if durable {
        f.sync_all().map_err(|e| StorageError::io("fsync", &tmp, e))?;
    }
    drop(f);
    disk.rename(&tmp, &dst).map_err(|e| StorageError::io("rename", &dst, e))?;
    if durable {
        disk.sync_dir(dir).map_err(|e| StorageError::io("fsync directory", dir, e))?;
    }
    Ok(())
}

/// A valid frame.
#[derive(Debug)]
struct Record {
    seq: u64,
    contents: Vec<u8>,
}

fn encode(seq: u64, contents: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(FRAME_LEN + contents.len());
    frame.extend_from_slice(&MAGIC.to_le_bytes());
    frame.extend_from_slice(&seq.to_le_bytes());
    frame.extend_from_slice(&(contents.len() as u32).to_le_bytes());
    frame.extend_from_slice(&checksum(seq, contents).to_le_bytes());
    frame.extend_from_slice(contents);
    frame
}

fn checksum(seq: u64, contents: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&seq.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &(contents.len() as u32).to_le_bytes());
    crc32c::crc32c_append(crc, contents)
}

/// The frame at the start of `buf`, if it is whole and valid.
fn decode(buf: &[u8]) -> Option<Record> {
    let magic = u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?);
    let seq = u64::from_le_bytes(buf.get(4..12)?.try_into().ok()?);
    let len = u32::from_le_bytes(buf.get(12..16)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(buf.get(16..20)?.try_into().ok()?);
    if magic != MAGIC || len > SLOT_CONTENTS_MAX {
        return None;
    }
    let contents = buf.get(FRAME_LEN..FRAME_LEN + len)?;
    (checksum(seq, contents) == crc).then(|| Record { seq, contents: contents.to_vec() })
}

/// Both slots' frames, `None` where a slot is invalid or beyond the file's end.
fn read_slots(f: &dyn DiskFile) -> io::Result<[Option<Record>; 2]> {
    let size = f.size()?;
    let slot = |i: u64| -> io::Result<Option<Record>> {
        let at = i * SLOT_STRIDE;
        let len = size.saturating_sub(at).min((FRAME_LEN + SLOT_CONTENTS_MAX) as u64) as usize;
        if len < FRAME_LEN {
            return Ok(None);
        }
        let mut buf = vec![0; len];
        f.read_exact_at(&mut buf, at)?;
        Ok(decode(&buf))
    };
    Ok([slot(0)?, slot(1)?])
}

/// The valid slot with the highest seq, and its frame.
fn newest(slots: &[Option<Record>; 2]) -> Option<(usize, &Record)> {
    slots.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|s| (i, s))).max_by_key(|(_, s)| s.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_writer_alternates_slots_and_each_write_reads_back_as_the_newest() {
        let (disk, dir) = memory_dir();
        let disk = &*disk;
        assert!(SlotWriter::open(disk, dir, "hint").unwrap().is_none(), "no file yet: no writer");
        write(disk, dir, "hint", b"one", true).unwrap();
        let mut w = SlotWriter::open(disk, dir, "hint").unwrap().expect("the file exists now");
        for value in [&b"two"[..], b"three", b"four"] {
            w.write(value, false).unwrap();
            assert_eq!(read(disk, dir, "hint").unwrap().as_deref(), Some(value));
        }
        // A plain write after the writer's writes goes on from the newest record.
        write(disk, dir, "hint", b"five", true).unwrap();
        assert_eq!(read(disk, dir, "hint").unwrap().as_deref(), Some(&b"five"[..]));
        let mut w = SlotWriter::open(disk, dir, "hint").unwrap().unwrap();
        w.write(b"six", true).unwrap();
        disk.power_loss();
        assert_eq!(read(disk, dir, "hint").unwrap().as_deref(), Some(&b"six"[..]), "a durable write survives power loss");
    }
    use crate::disk::{MemoryDisk, OsDisk};

    fn memory_dir() -> (std::sync::Arc<MemoryDisk>, &'static Path) {
        let disk = std::sync::Arc::new(MemoryDisk::new());
        let dir = Path::new("/groups/1");
        disk.create_dir_all(dir).unwrap();
        (disk, dir)
    }

    #[test]
    fn the_newest_record_is_read_back_and_the_file_keeps_its_length_and_inode() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(&OsDisk, dir.path(), "vote").unwrap(), None);
        write(&OsDisk, dir.path(), "vote", b"first", true).unwrap();
        let inode = std::fs::metadata(dir.path().join("vote")).unwrap().ino();
        for value in [&b"second"[..], b"third", b"", b"fifth"] {
            write(&OsDisk, dir.path(), "vote", value, true).unwrap();
            assert_eq!(read(&OsDisk, dir.path(), "vote").unwrap().as_deref(), Some(value));
        }
        let meta = std::fs::metadata(dir.path().join("vote")).unwrap();
        assert_eq!((meta.ino(), meta.len()), (inode, 2 * SLOT_STRIDE), "rewritten in place");
    }

    #[test]
    fn a_torn_write_reads_back_as_the_record_before_it() {
        let (disk, dir) = memory_dir();
        write(&*disk, dir, "vote", b"term 3", true).unwrap();
        write(&*disk, dir, "vote", b"term 4", true).unwrap();
        // The next write goes to slot 0 (term 3's): tear it at every length.
        let f = disk.open(&dir.join("vote"), OpenMode::ReadWrite).unwrap();
        let frame = encode(3, b"term 5");
        for cut in 0..frame.len() {
            let mut torn = frame[..cut].to_vec();
            torn.resize(frame.len(), 0xa5);
            f.write_all_at(0, &[&torn]).unwrap();
            assert_eq!(read(&*disk, dir, "vote").unwrap().as_deref(), Some(&b"term 4"[..]), "torn at {cut}");
        }
        // Neither slot valid (slot 0 torn, slot 1 damaged): reported, not taken for absent.
        f.write_all_at(SLOT_STRIDE, &[&[0xff; 64]]).unwrap();
        assert!(matches!(read(&*disk, dir, "vote"), Err(StorageError::Corrupt { .. })), "neither slot valid");
    }

    #[test]
    fn a_durable_record_survives_a_power_cut_and_unsynced_ones_may_not() {
        let (disk, dir) = memory_dir();
        write(&*disk, dir, "vote", b"granted term 7", true).unwrap();
        disk.power_loss();
        assert_eq!(read(&*disk, dir, "vote").unwrap().as_deref(), Some(&b"granted term 7"[..]), "created and written durably");
        write(&*disk, dir, "vote", b"granted term 8", true).unwrap();
        disk.power_loss();
        assert_eq!(read(&*disk, dir, "vote").unwrap().as_deref(), Some(&b"granted term 8"[..]));

        write(&*disk, dir, "hint", b"committed 10", false).unwrap();
        write(&*disk, dir, "hint", b"committed 11", false).unwrap();
        assert_eq!(read(&*disk, dir, "hint").unwrap().as_deref(), Some(&b"committed 11"[..]), "read before the crash");
        disk.power_loss();
        assert_eq!(read(&*disk, dir, "hint").unwrap(), None, "never synced: gone with its creation");
    }

    #[test]
    fn a_crash_while_creating_the_file_leaves_no_file_not_an_empty_one() {
        let (disk, dir) = memory_dir();
        write(&*disk, dir, "vote", b"first", true).unwrap();
        assert!(!exists(&*disk, dir, "vote.tmp"));
        // A crash between the create and the rename: only the temporary file was made.
        let f = disk.open(&dir.join("other.tmp"), OpenMode::CreateTruncate).unwrap();
        f.write_all_at(0, &[&encode(1, b"half")[..10]]).unwrap();
        assert_eq!(read(&*disk, dir, "other").unwrap(), None);
        write(&*disk, dir, "other", b"whole", true).unwrap();
        assert_eq!(read(&*disk, dir, "other").unwrap().as_deref(), Some(&b"whole"[..]));
    }
}
