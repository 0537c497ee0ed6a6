//! `Cache`: a shard's bounded cache of looked-up values, expiring after write.
//!
//! Owns: the entries and their expiry times. Invariants: at most `entries` entries and about
//! `max_bytes` bytes of keys and values (see [`Eviction`] for how each policy holds the bytes
//! bound); an entry read after its expiry is a miss and is dropped; a missing key is cached only
//! with a `missing_ttl`; time is passed in (`now`), so tests drive it with a simulated clock.
//! No locks: a cache belongs to one shard.

use bytes::Bytes;
use std::num::NonZeroUsize;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Per-entry bookkeeping counted against `max_bytes` besides the key and value.
const ENTRY_OVERHEAD_BYTES: u64 = 64;

/// Which entry leaves when the cache is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// The least recently used (the `lru` crate, with the bytes counted here).
    Lru,
    /// Frequency-aware: quick_cache's Clock-PRO variant (close to S3-FIFO), which keeps hot
    /// keys through a scan of cold ones. Its bound is a weight: an entry weighs
    /// `max(1, bytes x entries / max_bytes)` against a capacity of `entries`, so both bounds
    /// hold at once (an entry smaller than `max_bytes / entries` costs one slot).
    ClockPro,
}

/// The cache's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub entries: NonZeroUsize,
    /// Bytes of keys and values (plus 64 bytes of bookkeeping per entry).
    pub max_bytes: u64,
    /// Expire after write.
    pub ttl: Duration,
    /// Cache missing keys for this long; `None`: never.
    pub missing_ttl: Option<Duration>,
    pub eviction: Eviction,
}

#[derive(Clone)]
struct Entry {
    value: Option<Bytes>,
    expires: Instant,
}

fn entry_bytes(key: &[u8], entry: &Entry) -> u64 {
    key.len() as u64 + entry.value.as_ref().map_or(0, |v| v.len() as u64) + ENTRY_OVERHEAD_BYTES
}

#[derive(Clone)]
struct Weight {
    entries: u64,
    max_bytes: u64,
}

impl quick_cache::Weighter<Rc<[u8]>, Entry> for Weight {
    fn weight(&self, key: &Rc<[u8]>, entry: &Entry) -> u64 {
        let bytes = entry_bytes(key, entry) as u128;
        let units = (bytes * self.entries as u128).div_ceil(self.max_bytes.max(1) as u128);
        units.clamp(1, u64::MAX as u128) as u64
    }
}

enum Store {
    Lru {
        map: lru::LruCache<Rc<[u8]>, Entry>,
        bytes: u64,
    },
    ClockPro(quick_cache::unsync::Cache<Rc<[u8]>, Entry, Weight>),
}

/// See the module documentation.
pub struct Cache {
    store: Store,
    config: CacheConfig,
}

impl Cache {
    pub fn new(config: CacheConfig) -> Cache {
        let entries = config.entries.get();
        let store = match config.eviction {
            Eviction::Lru => Store::Lru {
                map: lru::LruCache::unbounded(),
                bytes: 0,
            },
            Eviction::ClockPro => {
                let weight = Weight {
                    entries: entries as u64,
                    max_bytes: config.max_bytes,
                };
                Store::ClockPro(quick_cache::unsync::Cache::with_weighter(
                    entries,
                    entries as u64,
                    weight,
                ))
            }
        };
        Cache { store, config }
    }

    /// `Some(Some(value))` for a cached value, `Some(None)` for a cached missing key, `None`
    /// for a miss (never cached, evicted or expired).
    pub fn get(&mut self, key: &[u8], now: Instant) -> Option<Option<Bytes>> {
        let fresh = |e: &Entry| (now < e.expires).then(|| e.value.clone());
        let found = match &mut self.store {
            Store::Lru { map, .. } => map.get(key).map(fresh),
            Store::ClockPro(c) => c.get(key).map(fresh),
        };
        match found {
            Some(Some(value)) => Some(value),
            Some(None) => {
                self.remove(key);
                None
            }
            None => None,
        }
    }

    /// Caches what a lookup found (`None`: missing, cached only with a `missing_ttl`). A value
    /// that cannot be cached still replaces any older entry of the key.
    pub fn insert(&mut self, key: Rc<[u8]>, value: Option<Bytes>, now: Instant) {
        let ttl = match &value {
            Some(_) => Some(self.config.ttl),
            None => self.config.missing_ttl,
        };
        let Some(ttl) = ttl.filter(|t| !t.is_zero()) else {
            self.remove(&key);
            return;
        };
        let entry = Entry {
            value,
            expires: now + ttl,
        };
        let size = entry_bytes(&key, &entry);
        if size > self.config.max_bytes {
            self.remove(&key);
            return;
        }
        match &mut self.store {
            Store::Lru { map, bytes } => {
                if let Some(old) = map.peek(&key) {
                    *bytes -= entry_bytes(&key, old);
                }
                *bytes += size;
                map.put(key, entry);
                while map.len() > self.config.entries.get() || *bytes > self.config.max_bytes {
                    match map.pop_lru() {
                        Some((k, e)) => *bytes -= entry_bytes(&k, &e),
                        None => break,
                    }
                }
            }
            Store::ClockPro(c) => c.insert(key, entry),
        }
    }

    /// Drops `key`'s entry, if any.
    pub fn remove(&mut self, key: &[u8]) {
        match &mut self.store {
            Store::Lru { map, bytes } => {
                if let Some((k, e)) = map.pop_entry(key) {
                    *bytes -= entry_bytes(&k, &e);
                }
            }
            Store::ClockPro(c) => {
                c.remove(key);
            }
        }
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        match &mut self.store {
            Store::Lru { map, bytes } => {
                map.clear();
                *bytes = 0;
            }
            Store::ClockPro(c) => c.clear(),
        }
    }

    pub fn len(&self) -> usize {
        match &self.store {
            Store::Lru { map, .. } => map.len(),
            Store::ClockPro(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the entries held, as counted against `max_bytes`.
    pub fn bytes(&self) -> u64 {
        match &self.store {
            Store::Lru { bytes, .. } => *bytes,
            Store::ClockPro(c) => c.iter().map(|(k, e)| entry_bytes(k, e)).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(eviction: Eviction) -> CacheConfig {
        CacheConfig {
            entries: NonZeroUsize::new(100).unwrap(),
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(10),
            missing_ttl: None,
            eviction,
        }
    }

    fn key(i: u32) -> Rc<[u8]> {
        format!("k{i}").into_bytes().into()
    }

    #[test]
    fn values_expire_after_write_on_the_given_clock() {
        for eviction in [Eviction::Lru, Eviction::ClockPro] {
            let mut c = Cache::new(config(eviction));
            let t0 = Instant::now();
            c.insert(key(1), Some(Bytes::from_static(b"v")), t0);
            let hit = c.get(b"k1", t0 + Duration::from_secs(9));
            assert_eq!(hit, Some(Some(Bytes::from_static(b"v"))), "{eviction:?}");
            assert_eq!(c.get(b"k1", t0 + Duration::from_secs(10)), None);
            assert!(
                c.is_empty(),
                "{eviction:?}: an expired entry is dropped when read"
            );
        }
    }

    #[test]
    fn missing_keys_are_cached_only_with_their_own_ttl() {
        let t0 = Instant::now();
        let mut c = Cache::new(config(Eviction::Lru));
        c.insert(key(1), None, t0);
        assert_eq!(c.get(b"k1", t0), None);
        let mut c = Cache::new(CacheConfig {
            missing_ttl: Some(Duration::from_secs(1)),
            ..config(Eviction::ClockPro)
        });
        c.insert(key(1), None, t0);
        assert_eq!(c.get(b"k1", t0 + Duration::from_millis(999)), Some(None));
        assert_eq!(c.get(b"k1", t0 + Duration::from_secs(1)), None);
        // A key found missing replaces its cached value.
        c.insert(key(2), Some(Bytes::from_static(b"v")), t0);
        let mut lru = Cache::new(config(Eviction::Lru));
        lru.insert(key(2), Some(Bytes::from_static(b"v")), t0);
        lru.insert(key(2), None, t0);
        assert_eq!(lru.get(b"k2", t0), None);
    }

    #[test]
    fn both_policies_hold_the_entry_and_byte_bounds() {
        for eviction in [Eviction::Lru, Eviction::ClockPro] {
            let t0 = Instant::now();
            let mut c = Cache::new(config(eviction));
            for i in 0..1_000 {
                c.insert(key(i), Some(Bytes::from(vec![0u8; 10])), t0);
            }
            assert!(c.len() <= 100, "{eviction:?}: {} entries", c.len());
            let mut c = Cache::new(CacheConfig {
                max_bytes: 10_000,
                ..config(eviction)
            });
            for i in 0..1_000 {
                c.insert(key(i), Some(Bytes::from(vec![0u8; 1_000])), t0);
            }
            assert!(c.bytes() <= 10_000, "{eviction:?}: {} bytes", c.bytes());
            assert!(!c.is_empty(), "{eviction:?}");
        }
    }

    #[test]
    fn lru_keeps_the_recently_read_and_clock_pro_the_frequent_through_a_scan() {
        let t0 = Instant::now();
        for eviction in [Eviction::Lru, Eviction::ClockPro] {
            let mut c = Cache::new(config(eviction));
            for i in 0..50 {
                c.insert(key(i), Some(Bytes::from_static(b"hot")), t0);
            }
            for _ in 0..3 {
                for i in 0..50 {
                    assert!(c.get(format!("k{i}").as_bytes(), t0).is_some());
                }
            }
            // A scan of cold keys, each read once.
            for i in 1_000..1_200 {
                c.insert(key(i), Some(Bytes::from_static(b"cold")), t0);
            }
            let hot = (0..50)
                .filter(|i| c.get(format!("k{i}").as_bytes(), t0).is_some())
                .count();
            match eviction {
                Eviction::Lru => assert_eq!(hot, 0, "a scan flushes LRU"),
                Eviction::ClockPro => assert!(hot >= 40, "only {hot} hot keys kept"),
            }
        }
    }
}
