//! `Sinks`: where a stage's shards leave their Redis client's wire times and their lookup
//! layer's figures when they close, for a summary or a report after the stage ended, and
//! their layer's figures so far while they run, for a metrics endpoint.
//!
//! Owns: the shared totals. Invariants: each shard adds its own figures once, from `close`,
//! and then empties its live slot, so [`Sinks::live_layer`] counts each figure once.

use super::{BatchLookup, LayerStats, Lookups};
use hdrhistogram::Histogram;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub(crate) struct Sinks {
    wire_us: Arc<Mutex<Histogram<u64>>>,
    layer: Arc<Mutex<LayerStats>>,
    /// Each running shard's layer figures so far, by slot.
    live: Arc<Mutex<Vec<LayerStats>>>,
}

impl Sinks {
    pub(crate) fn new() -> Sinks {
        Sinks {
            wire_us: Arc::new(Mutex::new(crate::redis::wire_histogram())),
            layer: Arc::new(Mutex::new(LayerStats::default())),
            live: Arc::default(),
        }
    }

    /// A live slot for a shard's layer figures.
    pub(crate) fn slot(&self) -> usize {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.push(LayerStats::default());
        live.len() - 1
    }

    /// A running shard's layer figures so far.
    pub(crate) fn publish(&self, slot: usize, stats: LayerStats) {
        if let Some(s) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(slot)
        {
            *s = stats;
        }
    }

    /// The figures of the shards that closed plus those published by the running ones.
    pub(crate) fn live_layer(&self) -> LayerStats {
        let mut total = self.layer();
        for s in self.live.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            total.add(s);
        }
        total
    }

    /// Adds a shard's figures (from its function's `close`): its clients' wire times and its
    /// layer's counters; its live slot (if it has one) is emptied.
    pub(crate) fn add<B: BatchLookup>(
        &self,
        slot: Option<usize>,
        wire_us: Histogram<u64>,
        lookups: &Lookups<B>,
    ) {
        self.wire_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(wire_us)
            .expect("wire histograms share their bounds");
        let mut layer = self.layer.lock().unwrap_or_else(|p| p.into_inner());
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        layer.add(&lookups.stats());
        if let Some(s) = slot.and_then(|slot| live.get_mut(slot)) {
            *s = LayerStats::default();
        }
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
