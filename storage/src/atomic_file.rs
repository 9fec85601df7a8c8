//! Small metadata files written atomically: temp file, fsync, rename, fsync the
//! directory. A reader sees the old contents or the new, never a mix.
//!
//! Framing: `magic:u32 "KMF1" | len:u32 | crc32c(contents):u32 | contents`. A file that
//! fails its frame is reported as corrupt, never silently treated as absent.

use std::path::Path;

use crate::disk::{Disk, OpenMode};
use crate::error::StorageError;

const MAGIC: u32 = u32::from_le_bytes(*b"KMF1");
const FRAME_LEN: usize = 12;
/// Metadata files are small; refusing anything larger bounds the read.
pub const META_FILE_SIZE_MAX: usize = 1024 * 1024;

/// Atomically replaces `dir/name` with `contents`, durably (fsync file and directory).
pub fn write(disk: &dyn Disk, dir: &Path, name: &str, contents: &[u8]) -> Result<(), StorageError> {
    write_inner(disk, dir, name, contents, true)
}

/// Atomically replaces `dir/name` with `contents` without fsync: a reader sees the old
/// or the new contents, but after a machine crash either may be there. For hints whose
/// loss is harmless (the Raft committed index, which is clipped to the durable log).
pub fn write_unsynced(disk: &dyn Disk, dir: &Path, name: &str, contents: &[u8]) -> Result<(), StorageError> {
    write_inner(disk, dir, name, contents, false)
}

fn write_inner(disk: &dyn Disk, dir: &Path, name: &str, contents: &[u8], durable: bool) -> Result<(), StorageError> {
    assert!(contents.len() <= META_FILE_SIZE_MAX, "metadata file {name} of {} bytes is above META_FILE_SIZE_MAX", contents.len());
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut buf = Vec::with_capacity(FRAME_LEN + contents.len());
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.extend_from_slice(&(contents.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32c::crc32c(contents).to_le_bytes());
    buf.extend_from_slice(contents);
    let f = disk.open(&tmp, OpenMode::CreateTruncate).map_err(|e| StorageError::io("create", &tmp, e))?;
    f.write_all_at(0, &[&buf]).map_err(|e| StorageError::io("write", &tmp, e))?;
    if durable {
        f.sync_all().map_err(|e| StorageError::io("fsync", &tmp, e))?;
    }
    drop(f);
    disk.rename(&tmp, &dst).map_err(|e| StorageError::io("rename", &dst, e))?;
    if durable {
        sync_dir(disk, dir)?;
    }
    Ok(())
}

/// Reads `dir/name`: `Ok(None)` if it does not exist, `Err(Corrupt)` if its frame fails.
pub fn read(disk: &dyn Disk, dir: &Path, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
    let path = dir.join(name);
    let buf = match disk.read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io("read", &path, e)),
    };
    let corrupt = |reason: &str| StorageError::Corrupt { path: path.clone(), position: 0, reason: reason.to_string() };
    if buf.len() < FRAME_LEN || buf.len() > FRAME_LEN + META_FILE_SIZE_MAX {
        return Err(corrupt("metadata file size out of range"));
    }
    let word = |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    if word(0) != MAGIC {
        return Err(corrupt("bad metadata magic"));
    }
    let len = word(4) as usize;
    if FRAME_LEN + len != buf.len() {
        return Err(corrupt("metadata length does not match the file size"));
    }
    if crc32c::crc32c(&buf[FRAME_LEN..]) != word(8) {
        return Err(corrupt("metadata checksum mismatch"));
    }
    Ok(Some(buf[FRAME_LEN..].to_vec()))
}

/// fsyncs a directory so a create, rename or unlink in it is durable.
pub fn sync_dir(disk: &dyn Disk, dir: &Path) -> Result<(), StorageError> {
    disk.sync_dir(dir).map_err(|e| StorageError::io("fsync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::OsDisk;

    #[test]
    fn atomic_write_replaces_contents_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(&OsDisk, dir.path(), "vote").unwrap(), None);
        write(&OsDisk, dir.path(), "vote", b"first").unwrap();
        write(&OsDisk, dir.path(), "vote", b"second").unwrap();
        assert_eq!(read(&OsDisk, dir.path(), "vote").unwrap().as_deref(), Some(&b"second"[..]));
        assert!(!dir.path().join("vote.tmp").exists());
    }

    #[test]
    fn a_damaged_metadata_file_is_reported_corrupt_not_absent() {
        let dir = tempfile::tempdir().unwrap();
        write(&OsDisk, dir.path(), "vote", b"payload").unwrap();
        let path = dir.path().join("vote");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(read(&OsDisk, dir.path(), "vote"), Err(StorageError::Corrupt { .. })));
    }
}
