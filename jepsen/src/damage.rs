//! Disk damage done to a stopped node's files, as a bad disk or a careless operator
//! would: its segment tail cut short, or bits flipped in it. Used by the `corrupt`
//! nemesis (on a minority only) and by the broker's disk-fault tests.

use std::path::{Path, PathBuf};

/// Every group directory of a node's data directory (`groups/<id:020>`), with its id.
pub fn group_dirs(data_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("groups")) else { return Vec::new() };
    let mut out: Vec<(u64, PathBuf)> =
        entries.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()).map(|id| (id, e.path()))).collect();
    out.sort();
    out
}

/// The newest segment file (`<first:020>.log`) of a group directory.
pub fn last_segment(group_dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(group_dir).ok()?;
    entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).max()
}

/// What was done to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// Cut from `from` bytes to `to`.
    Truncated { path: PathBuf, from: u64, to: u64 },
    /// These bit positions (byte * 8 + bit) were flipped.
    Flipped { path: PathBuf, bits: Vec<u64> },
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Truncated { path, from, to } => write!(f, "truncated {} from {from} to {to} bytes", path.display()),
            Damage::Flipped { path, bits } => write!(f, "flipped {} bit(s) of {} at {bits:?}", bits.len(), path.display()),
        }
    }
}

/// Segment header length: damage starts past it (a damaged header is another test).
const HEADER: u64 = 32;

/// Cuts the last `tail` bytes of `path` (never into the segment header).
pub fn truncate_tail(path: &Path, tail: u64) -> Result<Damage, String> {
    let len = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.len();
    let to = len.saturating_sub(tail).max(HEADER.min(len));
    let file = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    file.set_len(to).map_err(|e| format!("truncating {}: {e}", path.display()))?;
    file.sync_all().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Damage::Truncated { path: path.to_path_buf(), from: len, to })
}

/// Flips `count` random bits within the last `window` bytes of `path`.
pub fn flip_bits(path: &Path, window: u64, count: usize, rng: &mut fastrand::Rng) -> Result<Damage, String> {
    let mut bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = bytes.len() as u64;
    let start = len.saturating_sub(window).max(HEADER.min(len));
    if start >= len {
        return Ok(Damage::Flipped { path: path.to_path_buf(), bits: Vec::new() });
    }
    let mut bits = Vec::with_capacity(count);
    for _ in 0..count {
        let bit = rng.u64(start * 8..len * 8);
        bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
        bits.push(bit);
    }
    std::fs::write(path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Damage::Flipped { path: path.to_path_buf(), bits })
}
