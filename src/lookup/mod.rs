//! The lookup layer: what sits between a shard's function and its backend client so that the
//! backend gets less work per record — identical keys in flight coalesced into one request,
//! the keys of one turn batched into one multi-key request, a bounded per-shard cache in
//! front, an adaptive concurrency limit, a rate limit and a circuit breaker — each optional and
//! each counted in [`LayerStats`].
//!
//! Owns: the contract a backend implements ([`BatchLookup`]) and the layer's settings. A
//! backend answers a batch of keys with one value (or `None`, missing) per key, in key order;
//! the layer never reorders what a record sees: the operator above it keeps its order
//! guarantees as without the layer. The layer is per shard and `!Send`, like the client it
//! wraps: create it in the shard's factory.

mod breaker;
mod cache;
mod http;
mod layer;
mod limit;
mod postgres;
mod rate;
mod redis;
mod redis_lookup;
#[cfg(feature = "tools")]
mod sinks;
mod stats;

/// What a backend says was written since it answered (see [`BatchLookup::invalidated`]).
pub use crate::redis::Invalidated;
pub use breaker::BreakerConfig;
pub use cache::{Cache, CacheConfig, Eviction};
pub use http::{HttpFuture, HttpLookup, BODY_SEPARATOR};
pub use layer::{Get, Lookups};
pub use limit::{AdaptiveConfig, Limiter};
pub use postgres::{PostgresFuture, PostgresLookup};
pub use redis::RedisValues;
pub use redis_lookup::{ClusterValues, HashValues, LookupFuture, RedisLookup, ValueKind};
#[cfg(feature = "tools")]
pub(crate) use sinks::Sinks;
pub use stats::LayerStats;

use bytes::Bytes;
use std::fmt;
use std::future::Future;
use std::num::NonZeroUsize;
use std::time::Duration;

/// One value per key, in the keys' order; `None` is a missing key.
pub type Values = Vec<Option<Bytes>>;

/// A key-value backend that answers many keys in one request: Redis `MGET`, an HTTP batch
/// endpoint, a SQL `= ANY($1)`, or a user's own. Runs on one shard (`!Send` is fine).
///
/// The futures it returns own what they need (they outlive the `keys` slice), and answer
/// exactly `keys.len()` values; a different count fails the batch (`LookupError::Answer`).
pub trait BatchLookup: 'static {
    /// A failed request. Cloned to every record the request answered.
    type Error: Clone + fmt::Debug + fmt::Display + 'static;
    /// `Unpin` so that the layer holds it without a box (a boxed future is `Unpin` too).
    type Future: Future<Output = Result<Values, Self::Error>> + Unpin + 'static;

    /// Looks up `keys` in one request.
    fn get_many(&self, keys: &[&[u8]]) -> Self::Future;

    /// Looks up one key: what the layer calls when batching is off (`batch_size` 1). A backend
    /// whose single-key request differs from its batch (Redis: `GET` rather than `MGET`)
    /// overrides it.
    fn get_one(&self, key: &[u8]) -> Self::Future {
        self.get_many(&[key])
    }

    /// What the backend learnt was written since the last call (Redis: client tracking's
    /// invalidations), for the layer to drop from its cache before it answers from it. The
    /// default is nothing: cached values then live until their TTL.
    fn invalidated(&self) -> Option<Invalidated> {
        None
    }
}

/// A lookup that failed in the layer or in the backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError<E> {
    /// The backend's request failed; every record of the request sees its error.
    #[error("{0}")]
    Backend(E),
    /// The circuit breaker is open after `failures` consecutive failed requests: nothing is sent
    /// until the cool-down ends (then one probe request decides).
    #[error(
        "the backend failed {failures} requests in a row: the circuit breaker holds lookups \
         back for {cool_down:?} (then probes)"
    )]
    CircuitOpen { failures: u32, cool_down: Duration },
    /// The backend answered a batch with the wrong number of values.
    #[error("the backend answered {got} values for a batch of {expected} keys")]
    Answer { expected: usize, got: usize },
}

impl<E> LookupError<E> {
    /// The backend's error, if the backend failed.
    pub fn backend(&self) -> Option<&E> {
        match self {
            LookupError::Backend(e) => Some(e),
            _ => None,
        }
    }

    /// Whether a retry may help, given whether the backend's error is retryable: a breaker
    /// that is open is not (it fails fast so the policies decide at once), nor is a malformed
    /// answer.
    pub fn is_retryable(&self, backend: impl Fn(&E) -> bool) -> bool {
        match self {
            LookupError::Backend(e) => backend(e),
            LookupError::CircuitOpen { .. } | LookupError::Answer { .. } => false,
        }
    }
}

/// How many requests the layer lets the backend have in flight, in keys.
#[derive(Debug, Clone, PartialEq)]
pub enum Concurrency {
    /// No limit below the stage's capacity.
    Fixed,
    /// A limit that adapts to the backend's latency (see [`Limiter`]).
    Adaptive(AdaptiveConfig),
}

/// The fewest requests a full window is split into when batching (see
/// [`LayerConfig::capacity`]).
pub const PIPELINE_REQUESTS: usize = 4;

/// The layer's settings. The default is a pass-through with coalescing: one request per key,
/// no cache, no limits.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerConfig {
    /// Keys per backend request. 1 sends one single-key request per key.
    pub batch_size: NonZeroUsize,
    /// How long a batch that is not full waits for more keys. Zero sends what was looked up in
    /// the current turn of the shard (the keys the operator issued before it yielded).
    pub linger: Duration,
    /// The keys a shard has in flight at most (a stage's capacity), if known. A batch then
    /// holds at most a [`PIPELINE_REQUESTS`]th of it (of the adaptive limit, with one), so
    /// several requests share the pipeline: the backend works on some while the shard
    /// handles the answers of others, where one batch of the whole window would make the two
    /// take turns (docs/decisions/batch-size-and-pipeline-depth.md).
    pub capacity: Option<NonZeroUsize>,
    /// Identical keys in flight share one request.
    pub coalesce: bool,
    pub cache: Option<CacheConfig>,
    pub concurrency: Concurrency,
    /// Keys sent to the backend per second by this shard (a token bucket); `None`: no limit.
    pub max_rate: Option<f64>,
    pub breaker: Option<BreakerConfig>,
}

impl Default for LayerConfig {
    fn default() -> Self {
        LayerConfig {
            batch_size: NonZeroUsize::MIN,
            linger: Duration::ZERO,
            capacity: None,
            coalesce: true,
            cache: None,
            concurrency: Concurrency::Fixed,
            max_rate: None,
            breaker: None,
        }
    }
}

impl LayerConfig {
    /// The keys one batch may hold now, with `limit` the adaptive limit if there is one.
    pub fn batch_cap(&self, limit: Option<usize>) -> usize {
        let window = limit.or(self.capacity.map(NonZeroUsize::get));
        let cap = window.map_or(usize::MAX, |w| (w / PIPELINE_REQUESTS).max(1));
        self.batch_size.get().min(cap)
    }

    /// This shard's share of a stage-wide setting: the rate limit split evenly over `shards`.
    pub fn for_shard(&self, shards: usize) -> LayerConfig {
        LayerConfig {
            max_rate: self.max_rate.map(|r| r / shards.max(1) as f64),
            ..self.clone()
        }
    }

    /// A line for summaries and reports: what is on.
    pub fn describe(&self) -> String {
        let mut parts = vec![if self.batch_size.get() == 1 {
            "no batching".to_string()
        } else if self.linger.is_zero() {
            format!("batches of up to {}", self.batch_size)
        } else {
            format!(
                "batches of up to {} (linger {:?})",
                self.batch_size, self.linger
            )
        }];
        parts.push(
            if self.coalesce {
                "coalescing"
            } else {
                "no coalescing"
            }
            .into(),
        );
        match &self.cache {
            None => parts.push("no cache".into()),
            Some(c) => parts.push(format!(
                "cache of {} entries per shard ({:?}, ttl {:?}{})",
                c.entries,
                c.eviction,
                c.ttl,
                c.missing_ttl
                    .map_or(String::new(), |m| format!(", missing keys {m:?}"))
            )),
        }
        if let Concurrency::Adaptive(a) = &self.concurrency {
            parts.push(format!("adaptive limit {}..{}", a.min, a.max));
        }
        if let Some(r) = self.max_rate {
            parts.push(format!("at most {r:.0} keys/s per shard"));
        }
        if let Some(b) = &self.breaker {
            parts.push(format!(
                "breaker after {} failures ({:?} cool-down)",
                b.failures, b.cool_down
            ));
        }
        parts.join(", ")
    }
}
