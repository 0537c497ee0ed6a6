//! The cost of a cache hit on a shard: `Cache::get` alone (Clock-PRO and LRU), and a whole
//! `Lookups::get` answered from the cache (the invalidation check, the stats, the future,
//! polled to its answer), with 100 000 keys cached and looked up in a shuffled order so that
//! the CPU's caches do not hold them all. Each iteration looks up `BATCH` keys and checks that
//! every one was a hit, so the lookups are really made. Target: under 0.5 us per hit.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::FutureExt;
use sluice::lookup::{BatchLookup, Cache, CacheConfig, Eviction, LayerConfig, Lookups, Values};
use std::num::NonZeroUsize;
use std::rc::Rc;
use std::time::{Duration, Instant};

const KEYS: usize = 100_000;
const BATCH: usize = 1_000;

fn keys() -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = (0..KEYS)
        .map(|i| format!("user:user_{i:06}").into_bytes())
        .collect();
    fastrand::Rng::with_seed(7).shuffle(&mut keys);
    keys
}

fn config(eviction: Eviction) -> CacheConfig {
    CacheConfig {
        entries: NonZeroUsize::new(KEYS).unwrap(),
        max_bytes: 1 << 30,
        ttl: Duration::from_secs(3600),
        missing_ttl: None,
        eviction,
    }
}

fn value() -> bytes::Bytes {
    bytes::Bytes::from(vec![b'v'; 128])
}

fn cache_get(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("cache_hit");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, eviction) in [("clock-pro", Eviction::ClockPro), ("lru", Eviction::Lru)] {
        let mut cache = Cache::new(config(eviction));
        let now = Instant::now();
        for k in &keys {
            cache.insert(Rc::from(&k[..]), Some(value()), now);
        }
        let mut at = 0;
        group.bench_function(BenchmarkId::new("Cache::get", name), |b| {
            b.iter(|| {
                let now = Instant::now();
                let mut hits = 0;
                for _ in 0..BATCH {
                    at = (at + 1) % KEYS;
                    hits += usize::from(matches!(cache.get(&keys[at], now), Some(Some(_))));
                }
                assert_eq!(hits, BATCH);
            })
        });
    }
    group.finish();
}

/// A backend that answers every key at once (only the warm-up reaches it).
struct Ready;

impl BatchLookup for Ready {
    type Error = String;
    type Future = std::future::Ready<Result<Values, String>>;
    fn get_many(&self, keys: &[&[u8]]) -> Self::Future {
        std::future::ready(Ok(keys.iter().map(|_| Some(value())).collect()))
    }
}

fn layer_get(c: &mut Criterion) {
    let keys = keys();
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .make()
        .expect("executor")
        .run(async {
            let mut group = c.benchmark_group("cache_hit");
            group.throughput(Throughput::Elements(BATCH as u64));
            for (name, eviction) in [("clock-pro", Eviction::ClockPro), ("lru", Eviction::Lru)] {
                let layer = Lookups::new(
                    Ready,
                    LayerConfig {
                        cache: Some(config(eviction)),
                        ..LayerConfig::default()
                    },
                );
                // Warm up: every key looked up once, so every later lookup is a hit.
                for k in &keys {
                    layer.get(k).await.expect("answered");
                }
                let misses = layer.stats().lookups;
                let mut at = 0;
                group.bench_function(BenchmarkId::new("Lookups::get", name), |b| {
                    b.iter(|| {
                        for _ in 0..BATCH {
                            at = (at + 1) % KEYS;
                            let answer = layer.get(&keys[at]).now_or_never();
                            assert!(matches!(answer, Some(Ok(Some(_)))));
                        }
                    })
                });
                let stats = layer.stats();
                assert_eq!(stats.lookups - misses, stats.cache_hits, "all hits");
            }
            group.finish();
        });
}

criterion_group!(benches, cache_get, layer_get);
criterion_main!(benches);
