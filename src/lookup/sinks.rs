//! `Sinks`: where a stage's shards leave their Redis client's wire times and their lookup
//! layer's figures when they close, for a summary or a report after the stage ended.
//!
//! Owns: the shared totals. Invariant: each shard adds its own figures once, from `close`.

use super::{BatchLookup, LayerStats, Lookups};
use hdrhistogram::Histogram;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub(crate) struct Sinks {
    wire_us: Arc<Mutex<Histogram<u64>>>,
    layer: Arc<Mutex<LayerStats>>,
}

impl Sinks {
    pub(crate) fn new() -> Sinks {
        Sinks {
            wire_us: Arc::new(Mutex::new(crate::redis::wire_histogram())),
            layer: Arc::new(Mutex::new(LayerStats::default())),
        }
    }

    /// Adds a shard's figures (from its function's `close`): its clients' wire times and its
    /// layer's counters.
    pub(crate) fn add<B: BatchLookup>(&self, wire_us: Histogram<u64>, lookups: &Lookups<B>) {
        self.wire_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(wire_us)
            .expect("wire histograms share their bounds");
        let mut layer = self.layer.lock().unwrap_or_else(|p| p.into_inner());
        layer.add(&lookups.stats());
    }

    pub(crate) fn wire_us(&self) -> Histogram<u64> {
        self.wire_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn layer(&self) -> LayerStats {
        self.layer.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
