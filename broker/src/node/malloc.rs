//! glibc malloc tuned for a broker's allocation pattern.
//!
//! Every produce request frame (tens to hundreds of KiB) owns the allocation it was read
//! into — the codec hands the read buffer to the frame, so that the leader can stamp
//! offsets into the batch in place — and the buffer is freed once the batch is stored
//! and replicated; the same holds for followers' AppendEntries frames. glibc maps
//! allocations above its mmap threshold (128 KiB at start, raised only as mapped blocks
//! are freed) with a fresh `mmap`, and hands freed memory at the top of a heap above its
//! trim threshold back to the kernel. Either way the next frame's buffer was new memory
//! that the kernel page-faulted and zeroed on first touch: `clear_page_erms` under
//! `recv` was 10.7% of all node CPU in a profile of `keel-bench --partitions 1000`.
//! Fixed thresholds (`MALLOC_MMAP_THRESHOLD_BYTES`, `MALLOC_TRIM_THRESHOLD_BYTES`)
//! keep freed buffers in the heap for the next frame. Measured side by side
//! (`scripts/bench-compare`, 3 rounds, `--in-flight 1024 --cpu`): node CPU per message
//! 17.9 → 14.1 µs on a 3-partition topic, 46.9 → 45.4 µs on a 1,000-partition one.

use super::limits::{MALLOC_MMAP_THRESHOLD_BYTES, MALLOC_TRIM_THRESHOLD_BYTES};

/// Sets the thresholds; call before the node starts its threads. A glibc that refuses
/// a value keeps its default (logged), which is slower, never wrong.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune() {
    for (name, param, value) in
        [("M_MMAP_THRESHOLD", libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES), ("M_TRIM_THRESHOLD", libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES)]
    {
        let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a parameter of the allocator; it is called before the
        // runtime's threads start.
        if unsafe { libc::mallopt(param, value) } != 1 {
            tracing::warn!(param = name, value, "glibc refused a malloc setting; keeping its default");
        }
    }
}

/// Other allocators are left as they are.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() {}
