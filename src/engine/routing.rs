//! Routing: which shard a record goes to. A record's key (`KeyFn`, or `hash_key` of any `Hash`
//! key) picks its shard under `Routing::ByKey`; `Routing::RoundRobin` ignores keys.
//!
//! Owns: the key-to-shard mapping. Invariant: `shard_of` is a pure function of the key and the
//! shard count, stable across runs and processes (a restored stage routes every key to the
//! shard it went to before), and `hash_key` does not depend on a per-process random seed.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A record's key for routing and key order (see `StageBuilder::key_by`).
pub type KeyFn<I> = Arc<dyn Fn(&I) -> u64 + Send + Sync>;

/// How records are spread over shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// In turn; ignores keys.
    RoundRobin,
    /// By the hash of the record's key: one key always goes to one shard.
    ByKey,
}

/// Hashes any key to the `u64` that routing and key order use (stable across runs).
pub fn hash_key<K: Hash + ?Sized>(key: &K) -> u64 {
    // SipHasher with its fixed zero key: `DefaultHasher` promises no stability across Rust
    // releases, and a checkpoint restored by a newer build must route keys as the old one did.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// Spreads a user key over shards; the key may have little entropy (small integers).
pub(crate) fn shard_of(key: u64, shards: usize) -> usize {
    let mixed = (key ^ (key >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    ((mixed ^ (mixed >> 33)) % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_keys_spread_over_every_shard() {
        for shards in [2, 3, 4, 7] {
            let mut seen = vec![0usize; shards];
            for key in 0..1000u64 {
                seen[shard_of(key, shards)] += 1;
            }
            // Each shard gets a share within a factor of two of the even one.
            let even = 1000 / shards;
            assert!(
                seen.iter().all(|&n| n > even / 2 && n < even * 2),
                "{shards}: {seen:?}"
            );
        }
    }

    #[test]
    fn the_hash_is_the_same_in_every_process() {
        // Fixed values: routing after a restore, in another process or build, depends on them.
        assert_eq!(hash_key(&42u64), 1_135_563_785_245_924_819);
        assert_eq!(hash_key("user:1"), hash_key(&String::from("user:1")));
        assert_ne!(hash_key("user:1"), hash_key("user:2"));
    }
}
