//! The message-id window of one partition: which ids were stored within the topic's
//! dedupe window, and at which offset.
//!
//! Ids are kept as 128-bit SipHash-1-3 digests keyed by the topic's secret key (chosen
//! when the topic was created, identical on every replica): fixed size whatever the id's
//! length, and no one without the key can make two ids collide (a collision would drop a
//! message, so the digest is wide: for a billion ids the chance is about 1e-21).
//!
//! The window slides by the partition clock (the leader's time carried in the log), and
//! an id is remembered from its first sighting; a duplicate does not extend it. Memory
//! is bounded by the topic's `dedupe_ids_max`: the leader refuses (throttles) publishes
//! carrying ids when the window is full, so nothing is ever evicted early.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};
use siphasher::sip128::{Hasher128, SipHasher13};

/// A message id's keyed digest.
pub type IdDigest = u128;

/// The digest of `id` under the topic's key.
pub fn digest(key: &[u8; 16], id: &[u8]) -> IdDigest {
    let mut h = SipHasher13::new_with_key(key);
    h.write(id);
    h.finish128().as_u128()
}

/// Digests are uniformly random already: hash a `u128` key by taking its low bits.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u128` is used for digests; fold anything else in for safety.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// A map keyed by digests, hashed by [`DigestHasher`].
pub type DigestMap<V> = HashMap<IdDigest, V, BuildHasherDefault<DigestHasher>>;
/// A set of digests, hashed by [`DigestHasher`].
pub type DigestSet = std::collections::HashSet<IdDigest, BuildHasherDefault<DigestHasher>>;

/// Ids first seen at one partition-clock time, in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Bucket {
    first_seen_ms: i64,
    count: u64,
}

/// Approximate memory of one remembered id: the map slot (digest, offset, control byte,
/// spare capacity) plus its place in the arrival queue.
pub const BYTES_PER_ID: u64 = 72;

/// The ids stored within the window, each with the offset of its record.
#[derive(Debug, Clone, Default)]
pub struct MessageIdWindow {
    offsets: DigestMap<u64>,
    /// Digests in arrival order; `buckets` splits it by first-seen time.
    order: VecDeque<IdDigest>,
    buckets: VecDeque<Bucket>,
}

impl PartialEq for MessageIdWindow {
    fn eq(&self, other: &Self) -> bool {
        self.order == other.order && self.buckets == other.buckets && self.offsets == other.offsets
    }
}
impl Eq for MessageIdWindow {}

impl MessageIdWindow {
    /// The offset `digest` was stored at, if it is in the window.
    pub fn lookup(&self, digest: IdDigest) -> Option<u64> {
        self.offsets.get(&digest).copied()
    }

    /// Remembers `digest` as stored at `offset`, first seen at `now_ms`. The caller has
    /// checked it is not in the window.
    pub fn insert(&mut self, digest: IdDigest, offset: u64, now_ms: i64) {
        let fresh = self.offsets.insert(digest, offset).is_none();
        debug_assert!(fresh, "an id in the window is never inserted again");
        self.order.push_back(digest);
        match self.buckets.back_mut() {
            Some(b) if b.first_seen_ms >= now_ms => b.count += 1,
            _ => self.buckets.push_back(Bucket { first_seen_ms: now_ms, count: 1 }),
        }
    }

    /// Whether [`MessageIdWindow::expire`] at `now_ms` would forget any id.
    pub fn would_expire(&self, now_ms: i64, window_ms: u64) -> bool {
        let cutoff = now_ms.saturating_sub(i64::try_from(window_ms).unwrap_or(i64::MAX));
        self.buckets.front().is_some_and(|b| b.first_seen_ms <= cutoff)
    }

    /// Forgets ids first seen at or before `now_ms - window_ms`; returns how many.
    pub fn expire(&mut self, now_ms: i64, window_ms: u64) -> u64 {
        let cutoff = now_ms.saturating_sub(i64::try_from(window_ms).unwrap_or(i64::MAX));
        let mut expired = 0;
        while let Some(b) = self.buckets.front().copied() {
            if b.first_seen_ms > cutoff {
                break;
            }
            self.buckets.pop_front();
            for _ in 0..b.count {
                let d = self.order.pop_front().expect("buckets count exactly the ids in order");
                self.offsets.remove(&d);
            }
            expired += b.count;
        }
        if expired > 0 && self.offsets.capacity() > 4 * self.offsets.len().max(1024) {
            // The window shrank a lot (a burst passed): give the memory back.
            self.offsets.shrink_to_fit();
            self.order.shrink_to_fit();
        }
        debug_assert_eq!(self.offsets.len(), self.order.len());
        expired
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// When the oldest id leaves the window, on the partition clock.
    pub fn oldest_expires_at(&self, window_ms: u64) -> Option<i64> {
        self.buckets.front().map(|b| b.first_seen_ms.saturating_add(i64::try_from(window_ms).unwrap_or(i64::MAX)))
    }

    /// Approximate bytes of memory held.
    pub fn memory_bytes(&self) -> u64 {
        (self.offsets.capacity() as u64) * 25 + (self.order.capacity() as u64) * 16 + (self.buckets.capacity() as u64) * 16
    }

    /// The window as plain data, in arrival order (for snapshots).
    pub fn to_parts(&self) -> WindowParts {
        let ids = self.order.iter().map(|d| (*d, self.offsets[d])).collect();
        WindowParts { ids, buckets: self.buckets.iter().map(|b| (b.first_seen_ms, b.count)).collect() }
    }

    /// Rebuilds a window from [`MessageIdWindow::to_parts`]; `None` if the parts do not
    /// describe one (bucket counts not matching the ids, a repeated id).
    pub fn from_parts(parts: WindowParts) -> Option<MessageIdWindow> {
        let total: u64 = parts.buckets.iter().map(|(_, c)| *c).sum();
        if total != parts.ids.len() as u64 {
            return None;
        }
        let mut w = MessageIdWindow::default();
        w.offsets.reserve(parts.ids.len());
        for (d, offset) in parts.ids {
            if w.offsets.insert(d, offset).is_some() {
                return None;
            }
            w.order.push_back(d);
        }
        w.buckets = parts.buckets.into_iter().map(|(first_seen_ms, count)| Bucket { first_seen_ms, count }).collect();
        Some(w)
    }
}

/// A window as plain data: `(digest, offset)` in arrival order and `(first_seen_ms,
/// count)` runs over them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowParts {
    pub ids: Vec<(IdDigest, u64)>,
    pub buckets: Vec<(i64, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_found_within_the_window_and_forgotten_after_it() {
        let key = [7u8; 16];
        let mut w = MessageIdWindow::default();
        w.insert(digest(&key, b"order-1"), 10, 1_000);
        w.insert(digest(&key, b"order-2"), 11, 1_500);
        assert_eq!(w.lookup(digest(&key, b"order-1")), Some(10));
        assert_eq!(w.lookup(digest(&key, b"order-3")), None);
        assert_eq!(w.expire(1_999, 1_000), 0, "order-1 is 999 ms old");
        assert_eq!(w.expire(2_000, 1_000), 1);
        assert_eq!(w.lookup(digest(&key, b"order-1")), None);
        assert_eq!(w.lookup(digest(&key, b"order-2")), Some(11));
        assert_eq!(w.oldest_expires_at(1_000), Some(2_500));
    }

    #[test]
    fn digests_depend_on_the_topic_key() {
        assert_ne!(digest(&[1; 16], b"id"), digest(&[2; 16], b"id"));
        assert_eq!(digest(&[1; 16], b"id"), digest(&[1; 16], b"id"));
    }

    #[test]
    fn a_window_survives_its_snapshot_form() {
        let mut w = MessageIdWindow::default();
        for i in 0..100u64 {
            w.insert(u128::from(i) << 64 | 3, i, (i / 10) as i64);
        }
        let back = MessageIdWindow::from_parts(w.to_parts()).unwrap();
        assert_eq!(back, w);
        let mut parts = w.to_parts();
        parts.buckets.pop();
        assert!(MessageIdWindow::from_parts(parts).is_none(), "counts that do not match are refused");
    }
}
