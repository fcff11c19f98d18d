//! Hash maps keyed by offsets and cluster indices (the engine's caches and sets).
//!
//! std's default hasher (SipHash-1-3) cost ~15 % of a background walk step (16 KiB
//! clusters, profiled with a guest writing): every entry looks up refcount blocks and L2
//! tables by offset. These maps hash a `u64` with one multiply by a per-map random odd key
//! and a fold of the high half into the low one (hashbrown takes the bucket from the low
//! bits and a tag from the top seven), so keys that differ only above the cluster bits
//! still spread. The random key keeps an image's chosen offsets from being able to pick
//! collisions in advance; a collision only costs probing, never correctness.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};

/// A map keyed by offset or index.
pub(crate) type OffMap<V> = HashMap<u64, V, OffState>;
/// A set of offsets or indices.
pub(crate) type OffSet = HashSet<u64, OffState>;

const MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// The per-map key of [`OffHasher`].
#[derive(Clone, Debug)]
pub(crate) struct OffState(u64);

impl Default for OffState {
    fn default() -> Self {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(MUL);
        OffState(h.finish() | 1)
    }
}

impl BuildHasher for OffState {
    type Hasher = OffHasher;
    fn build_hasher(&self) -> OffHasher {
        OffHasher(self.0)
    }
}

/// See the module docs. Keys other than integers (not used) fall back to a byte-wise mix.
pub(crate) struct OffHasher(u64);

impl Hasher for OffHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        let h = (self.0 ^ x).wrapping_mul(MUL);
        self.0 = h ^ (h >> 32);
    }

    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_offsets_spread_over_low_bits_and_tags() {
        let s = OffState::default();
        let mut low = HashSet::new();
        let mut tags = HashSet::new();
        for i in 0..4096u64 {
            let h = s.hash_one(i << 16);
            low.insert(h & 0xfff);
            tags.insert(h >> 57);
        }
        // 4096 keys into 4096 low-bit buckets: a random function fills ~63 %
        assert!(low.len() > 2000, "only {} distinct low 12-bit values", low.len());
        assert_eq!(tags.len(), 128);
        let mut m: OffMap<u64> = OffMap::default();
        for i in 0..10_000u64 {
            m.insert(i * 65536, i);
        }
        assert!((0..10_000u64).all(|i| m.get(&(i * 65536)) == Some(&i)));
    }

    #[test]
    fn maps_get_different_keys() {
        assert_ne!(OffState::default().hash_one(42u64), OffState::default().hash_one(42u64));
    }
}
