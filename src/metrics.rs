//! Per-shard observability: counters and HDR latency histograms, published to a shared cell
//! that the handle merges on request.
//!
//! Owns: what is counted and when it becomes visible. Invariant: the operator updates plain
//! local fields on its hot path and publishes a copy at most every `PUBLISH_EVERY` records, when
//! it goes idle (at most every `PUBLISH_IDLE_INTERVAL`: an operator that goes idle sooner
//! after a publish arms its timer for [`OperatorMetrics::publish_due`], so what it did last is
//! published even if it then stays idle for good), and at the end, so readers never contend
//! with the per-record path.

use hdrhistogram::Histogram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PUBLISH_EVERY: u64 = 1024;
/// An idle operator publishes at most this often.
const PUBLISH_IDLE_INTERVAL: Duration = Duration::from_millis(50);
/// Latencies above this (in microseconds) are clamped into the top bucket.
const HIGHEST_US: u64 = 3_600_000_000;

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_US, 2).expect("static histogram bounds are valid")
}

/// A point-in-time copy of one shard's (or the merged) metrics.
#[derive(Debug, Clone)]
pub struct MetricsSnapshot {
    /// Records accepted by the operator.
    pub records_in: u64,
    /// Records whose outcome left the operator (each may carry zero or more outputs).
    pub records_out: u64,
    /// Entries (records and watermarks) holding a queue slot when published.
    pub in_flight: u64,
    /// Records whose timeout expired.
    pub timeouts: u64,
    /// Retries started (attempts after the first).
    pub retries: u64,
    /// Attempts that ended in an error, retried or not.
    pub failures: u64,
    /// From the first invoke to emission, in microseconds.
    pub invoke_to_emit_us: Histogram<u64>,
    /// From the producer's push to the first invoke, in microseconds. Sampled: one record in
    /// [`QUEUE_WAIT_SAMPLE`](crate::QUEUE_WAIT_SAMPLE) (by sequence number), so its
    /// count is about `records_in / QUEUE_WAIT_SAMPLE`. Records re-issued from a checkpoint are all recorded
    /// (from their restore); records fed through the `AsyncWaitExt` adapter are not (they have
    /// no push).
    pub queue_wait_us: Histogram<u64>,
}

impl Default for MetricsSnapshot {
    fn default() -> Self {
        MetricsSnapshot {
            records_in: 0,
            records_out: 0,
            in_flight: 0,
            timeouts: 0,
            retries: 0,
            failures: 0,
            invoke_to_emit_us: new_histogram(),
            queue_wait_us: new_histogram(),
        }
    }
}

impl MetricsSnapshot {
    /// Adds `other` into `self` (counters summed, histograms merged).
    pub fn merge(&mut self, other: &MetricsSnapshot) {
        self.records_in += other.records_in;
        self.records_out += other.records_out;
        self.in_flight += other.in_flight;
        self.timeouts += other.timeouts;
        self.retries += other.retries;
        self.failures += other.failures;
        self.invoke_to_emit_us
            .add(&other.invoke_to_emit_us)
            .expect("same histogram bounds");
        self.queue_wait_us
            .add(&other.queue_wait_us)
            .expect("same histogram bounds");
    }
}

/// Where a shard publishes its metrics; read by the stage handle.
pub(crate) type MetricsCell = Arc<Mutex<MetricsSnapshot>>;

/// The operator's local metrics.
pub(crate) struct OperatorMetrics {
    pub(crate) local: MetricsSnapshot,
    unpublished: u64,
    last_publish: Option<Instant>,
    /// Records in at the last publish.
    published_in: u64,
    cell: Option<MetricsCell>,
}

impl OperatorMetrics {
    pub(crate) fn new(cell: Option<MetricsCell>) -> Self {
        OperatorMetrics {
            local: MetricsSnapshot::default(),
            unpublished: 0,
            last_publish: None,
            published_in: 0,
            cell,
        }
    }

    pub(crate) fn record_latency(hist: &mut Histogram<u64>, d: Duration) {
        hist.saturating_record((d.as_micros() as u64).clamp(1, HIGHEST_US));
    }

    /// Counts an emitted record; publishes every `PUBLISH_EVERY` (and says so).
    pub(crate) fn emitted(&mut self, invoke_to_emit: Duration, in_flight: usize) -> bool {
        self.local.records_out += 1;
        Self::record_latency(&mut self.local.invoke_to_emit_us, invoke_to_emit);
        self.unpublished += 1;
        if self.unpublished >= PUBLISH_EVERY {
            self.publish(in_flight);
            return true;
        }
        false
    }

    /// Publishes when going idle, unless a publish happened recently; says whether it did.
    pub(crate) fn publish_if_stale(&mut self, now: Instant, in_flight: usize) -> bool {
        let stale = self
            .last_publish
            .is_none_or(|at| now.saturating_duration_since(at) >= PUBLISH_IDLE_INTERVAL);
        if stale && self.cell.is_some() {
            self.last_publish = Some(now);
            self.publish(in_flight);
            return true;
        }
        false
    }

    /// When the figures not published yet are due (an idle operator arms its timer for it),
    /// if anything was counted since the last publish.
    pub(crate) fn publish_due(&self) -> Option<Instant> {
        let changed = self.unpublished > 0 || self.local.records_in != self.published_in;
        match (&self.cell, self.last_publish) {
            (Some(_), Some(at)) if changed => Some(at + PUBLISH_IDLE_INTERVAL),
            _ => None,
        }
    }

    pub(crate) fn publish(&mut self, in_flight: usize) {
        self.local.in_flight = in_flight as u64;
        self.unpublished = 0;
        self.published_in = self.local.records_in;
        if let Some(cell) = &self.cell {
            let mut shared = cell.lock().unwrap_or_else(|p| p.into_inner());
            shared.clone_from(&self.local);
        }
    }
}
