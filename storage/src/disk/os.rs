//! [`OsDisk`]: the operating system's file system (production).

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{Disk, DiskFile, FileMap, OpenMode};

/// The operating system's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsDisk;

#[derive(Debug)]
struct OsFile {
    file: File,
    /// Held across the seek and the vectored write that share the file position.
    write: Mutex<()>,
}

impl Disk for OsDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        // The highest ancestor that does not exist yet: everything from it down is new,
        // and each new directory's entry lives in its parent.
        let mut first_new = None;
        let mut at = Some(dir);
        while let Some(p) = at {
            if p.as_os_str().is_empty() || p.exists() {
                break;
            }
            first_new = Some(p);
            at = p.parent();
        }
        let Some(first_new) = first_new else { return Ok(()) };
        fs::create_dir_all(dir)?;
        let mut new_dirs: Vec<&Path> = dir.ancestors().take_while(|p| *p != first_new).collect();
        new_dirs.push(first_new);
        for d in new_dirs {
            if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
                self.sync_dir(parent)?;
            }
        }
        Ok(())
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>> {
        let mut options = OpenOptions::new();
        match mode {
            OpenMode::Read => options.read(true),
            OpenMode::ReadWrite => options.read(true).write(true),
            OpenMode::CreateNew => options.read(true).write(true).create_new(true),
            OpenMode::CreateTruncate => options.read(true).write(true).create(true).truncate(true),
        };
        Ok(Arc::new(OsFile { file: options.open(path)?, write: Mutex::new(()) }))
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::remove_dir_all(dir)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
}

impl DiskFile for OsFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, pos)
    }

    fn write_all_at(&self, pos: u64, pieces: &[&[u8]]) -> io::Result<()> {
        let _position = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut f: &File = &self.file;
        f.seek(SeekFrom::Start(pos))?;
        let mut slices: Vec<IoSlice<'_>> = pieces.iter().filter(|p| !p.is_empty()).map(|p| IoSlice::new(p)).collect();
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let n = f.write_vectored(rest)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"));
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn drop_cached(&self, from: u64, to: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        if to <= from {
            return Ok(());
        }
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(from), libc::off_t::try_from(to - from)) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "range beyond off_t"));
        };
        // SAFETY: plain syscall on a descriptor this file owns; it reads no memory of ours.
        let rc = unsafe { libc::posix_fadvise(self.file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    fn map(&self) -> io::Result<FileMap> {
        // SAFETY: only files that are never modified again are mapped (sealed index
        // files, written once to a temp name and renamed into place); this process
        // deletes only whole files (a deleted file's mapping stays valid). Another
        // process writing into the data directory is outside the supported model
        // (storage/DESIGN.md).
        let map = unsafe { memmap2::Mmap::map(&self.file) }?;
        Ok(FileMap::mapped(map))
    }
}
