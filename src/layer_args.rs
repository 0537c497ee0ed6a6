//! The lookup layer's flags, shared by `sluice enrich` and `sluice bench`.
//!
//! Owns: turning flags into a `LayerConfig`. Invariant: every flag is checked here, with an
//! error that names it; the layer never sees an impossible setting.

use clap::Args;
use sluice::lookup::{
    AdaptiveConfig, BreakerConfig, CacheConfig, Concurrency, Eviction, LayerConfig,
};
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

/// How the cache is kept fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Invalidation {
    /// Entries expire after --cache-ttl.
    Ttl,
    /// Redis tells each shard which keys it read were written since (client tracking, Redis 6
    /// or newer): they leave the cache within milliseconds; --cache-ttl still bounds an
    /// entry's life.
    Tracking,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConcurrencyArg {
    /// Up to the capacity.
    Fixed,
    /// A limit below the capacity that follows the backend's latency (Vegas, AIMD back-off).
    Adaptive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvictionArg {
    Lru,
    ClockPro,
}

#[derive(Args, Debug, Clone)]
pub struct LayerArgs {
    /// Keys per request to the backend (Redis: MGET of up to N keys; 1: a GET per key), and
    /// at most a quarter of the capacity, so that several requests keep the pipeline full. A
    /// batch leaves when full or when the shard's turn ends (see --batch-linger). With
    /// batching, a key holding a non-string value reads as missing (MGET's nil), where GET
    /// fails with WRONGTYPE.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub batch_size: u64,
    /// How long a batch that is not full waits for more keys (0: none; what the shard issued
    /// in its turn goes at once).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub batch_linger: Duration,
    /// Send a request per lookup even when the same key is already in flight.
    #[arg(long)]
    pub no_coalesce: bool,
    /// Entries in each shard's cache of looked-up values (0: no cache).
    #[arg(long, default_value_t = 0)]
    pub cache_size: usize,
    /// Bytes of keys and values in each shard's cache at most.
    #[arg(long, default_value = "64MiB", value_parser = crate::parse_size)]
    pub cache_bytes: u64,
    /// How long a cached value is used after it was looked up.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub cache_ttl: Duration,
    /// Cache missing keys too, for this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub cache_missing_ttl: Option<Duration>,
    /// Which entry leaves a full cache: lru, or clock-pro (frequency-aware, keeps hot keys
    /// through a scan of cold ones).
    #[arg(long, value_enum, default_value = "clock-pro")]
    pub cache_eviction: EvictionArg,
    /// How cached values are kept fresh.
    #[arg(long, value_enum, default_value = "ttl")]
    pub cache_invalidation: Invalidation,
    /// Keys in flight to the backend: fixed (up to the capacity) or adaptive.
    #[arg(long, value_enum, default_value = "fixed")]
    pub concurrency: ConcurrencyArg,
    /// Keys sent to the backend per second, in all (each shard takes an equal share).
    #[arg(long)]
    pub max_rate: Option<f64>,
    /// Open a circuit breaker after this many consecutive failed requests on a shard: lookups
    /// then fail at once (to --on-error) until a probe succeeds.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_failures: Option<u32>,
    /// How long an open breaker waits before it probes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub breaker_cool_down: Duration,
}

impl LayerArgs {
    /// Whether the Redis client tracks the keys it reads for the cache (client tracking).
    pub fn tracking(&self) -> bool {
        self.cache_invalidation == Invalidation::Tracking
    }

    /// The layer for a stage of `capacity` per shard.
    pub fn config(&self, capacity: usize) -> Result<LayerConfig, String> {
        if let Some(r) = self.max_rate {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!(
                    "--max-rate {r}: give a positive number of keys per second"
                ));
            }
        }
        if self.tracking() && self.cache_size == 0 {
            return Err(
                "--cache-invalidation tracking keeps a cache fresh: give it one with --cache-size"
                    .into(),
            );
        }
        if self.cache_size > 0 && self.cache_ttl.is_zero() {
            return Err("--cache-ttl 0: a cache needs a positive TTL (or --cache-size 0)".into());
        }
        let cache = NonZeroUsize::new(self.cache_size).map(|entries| CacheConfig {
            entries,
            max_bytes: self.cache_bytes,
            ttl: self.cache_ttl,
            missing_ttl: self.cache_missing_ttl,
            eviction: match self.cache_eviction {
                EvictionArg::Lru => Eviction::Lru,
                EvictionArg::ClockPro => Eviction::ClockPro,
            },
        });
        Ok(LayerConfig {
            batch_size: NonZeroUsize::new(self.batch_size as usize).expect("range 1.."),
            linger: self.batch_linger,
            capacity: NonZeroUsize::new(capacity),
            coalesce: !self.no_coalesce,
            cache,
            concurrency: match self.concurrency {
                ConcurrencyArg::Fixed => Concurrency::Fixed,
                ConcurrencyArg::Adaptive => {
                    Concurrency::Adaptive(AdaptiveConfig::for_capacity(capacity))
                }
            },
            max_rate: self.max_rate,
            breaker: self.breaker_failures.map(|n| BreakerConfig {
                failures: NonZeroU32::new(n).expect("range 1.."),
                cool_down: self.breaker_cool_down,
            }),
        })
    }
}
