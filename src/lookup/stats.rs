//! `LayerStats`: what a shard's lookup layer did, for the summaries and metrics.
//!
//! Owns: the counters' meaning. Invariant: every lookup is counted once, as a cache hit, a
//! coalesced lookup, a refused one (breaker open) or a key of a backend request (`keys_sent`,
//! or `abandoned` when every record waiting for it was gone before it was sent); so
//! `lookups == cache_hits + coalesced + rejected + keys_sent + abandoned` once the layer is idle.

use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LayerStats {
    pub lookups: u64,
    pub cache_hits: u64,
    /// Lookups that shared a request already pending for the same key.
    pub coalesced: u64,
    /// Lookups refused at once by the open circuit breaker.
    pub rejected: u64,
    /// Backend requests sent, and the keys they carried.
    pub requests: u64,
    pub keys_sent: u64,
    /// Requests that failed (their keys all failed).
    pub failed_requests: u64,
    /// Keys not sent because every record waiting for them timed out first.
    pub abandoned: u64,
    /// Cached keys dropped because the backend said they were written (client tracking), and
    /// times the whole cache was dropped on its word (a flush, a lost tracking connection).
    pub invalidated: u64,
    pub cache_flushes: u64,
    pub breaker_opened: u64,
    /// Shards whose breaker is open or half-open when the stats were taken.
    pub breakers_tripped: u64,
    /// The concurrency limit when the stats were taken, and its lowest and highest value
    /// (`None` without an adaptive limit). Summed over shards.
    pub limit: Option<u64>,
    pub limit_min: Option<u64>,
    pub limit_max: Option<u64>,
}

impl LayerStats {
    /// Adds another shard's figures.
    pub fn add(&mut self, o: &LayerStats) {
        self.lookups += o.lookups;
        self.cache_hits += o.cache_hits;
        self.coalesced += o.coalesced;
        self.rejected += o.rejected;
        self.requests += o.requests;
        self.keys_sent += o.keys_sent;
        self.failed_requests += o.failed_requests;
        self.abandoned += o.abandoned;
        self.invalidated += o.invalidated;
        self.cache_flushes += o.cache_flushes;
        self.breaker_opened += o.breaker_opened;
        self.breakers_tripped += o.breakers_tripped;
        let sum = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        self.limit = sum(self.limit, o.limit);
        self.limit_min = sum(self.limit_min, o.limit_min);
        self.limit_max = sum(self.limit_max, o.limit_max);
    }

    /// Keys per backend request.
    pub fn keys_per_request(&self) -> f64 {
        self.keys_sent as f64 / self.requests.max(1) as f64
    }

    /// Cache hits per lookup.
    pub fn hit_ratio(&self) -> f64 {
        self.cache_hits as f64 / self.lookups.max(1) as f64
    }

    /// Backend requests per lookup: what the layer saves the backend.
    pub fn requests_per_lookup(&self) -> f64 {
        self.requests as f64 / self.lookups.max(1) as f64
    }
}
