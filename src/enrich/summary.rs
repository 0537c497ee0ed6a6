//! `Summary`: what happened to every line of a `sluice enrich` run, and how it is shown.
//!
//! Owns: the counts and their rendering. Invariant: the counts of a run add up to its lines
//! read (`accounted` is checked against `lines_read` by the tests): every line is blank,
//! written, dead-lettered, a counted drop or skip, or not written because the run stopped.

use super::EnrichError;
use serde::Serialize;

/// Counts of what happened to every line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub lines_read: u64,
    /// Lines of only white space (not records; nothing is written for them).
    pub blank_lines: u64,
    pub enriched: u64,
    /// Of `enriched`, values that were not JSON objects (they went in as strings).
    pub values_not_objects: u64,
    pub missing_kept: u64,
    pub missing_dropped: u64,
    pub bad_skipped: u64,
    pub bad_dead_lettered: u64,
    pub timeouts_emitted: u64,
    pub timeouts_dropped: u64,
    pub timeouts_dead_lettered: u64,
    pub errors_emitted: u64,
    pub errors_dropped: u64,
    pub errors_dead_lettered: u64,
    /// Records read but not written because the run failed or was stopped at once: those in
    /// the stage, the one that failed the run, and any whose bytes were buffered for a file
    /// that then failed to take them.
    pub unwritten_after_failure: u64,
    pub watermarks: u64,
    /// The most bytes of lines and values the run held at once (`--max-bytes-held` bounds it).
    pub peak_bytes_held: u64,
    pub retries: u64,
    pub elapsed_s: f64,
    pub records_per_s: f64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub latency_p999_us: u64,
    pub latency_max_us: u64,
    /// From the reader's push to the first lookup: waiting for a free slot (backpressure).
    pub queue_wait_p50_us: u64,
    pub queue_wait_p99_us: u64,
    /// Of a lookup, the time on the wire: from the request handed to the socket to its reply
    /// read (Redis and the network, without the client's own queueing).
    pub wire_p50_us: u64,
    pub wire_p99_us: u64,
    /// What the lookup layer did: backend requests, cache hits, coalesced lookups, the limit.
    pub lookups: crate::lookup::LayerStats,
    pub interrupted: bool,
    /// A second signal stopped the run without waiting for the lookups in flight.
    pub stopped_at_once: bool,
    /// Why the run failed, if it did.
    pub failure: Option<EnrichError>,
    /// The output holds every record read, as the counts say, although the run reports a
    /// failure (for example: the completed marker could not be written).
    pub output_complete: bool,
    /// Things the user should know that did not stop the run.
    pub warnings: Vec<String>,
    /// Checkpoints committed during this run.
    pub checkpoints: u64,
    /// Checkpoints that could not be committed (for example: disk full); the run went on.
    pub checkpoint_failures: u64,
    /// The checkpoint this run resumed from, and the input line it resumed after.
    pub resumed_from: Option<u64>,
    pub resumed_after_line: Option<u64>,
    /// The checkpoint directory says a previous run finished: nothing was done.
    pub already_completed: bool,
    /// The run read and wrote on shard 0's thread (a file): no reader or writer thread beside
    /// the shards (standard input and NATS streams have them).
    pub on_the_shards: bool,
    /// On the shards with one shard: read, looked up and written on one thread.
    pub on_one_thread: bool,
    /// With NATS ends: deliveries, publishes, duplicates dropped, acknowledgements.
    pub nats: Option<String>,
}

impl Summary {
    /// The lookup layer's line: how much work the backend got for the lookups.
    fn lookup_line(&self) -> String {
        let l = &self.lookups;
        if l.lookups == 0 {
            return String::new();
        }
        let mut s = format!(
            "  lookups: {} -> {} backend requests ({:.1} keys each); cache hits {:.1}%, \
             coalesced {}",
            l.lookups,
            l.requests,
            l.keys_per_request(),
            l.hit_ratio() * 100.0,
            l.coalesced
        );
        if let Some(limit) = l.limit {
            s.push_str(&format!(
                "; concurrency limit {limit} (range {}..{})",
                l.limit_min.unwrap_or(limit),
                l.limit_max.unwrap_or(limit)
            ));
        }
        if l.invalidated > 0 || l.cache_flushes > 0 {
            s.push_str(&format!(
                "; invalidated by Redis: {} keys, the whole cache {} times",
                l.invalidated, l.cache_flushes
            ));
        }
        if l.breaker_opened > 0 || l.rejected > 0 {
            s.push_str(&format!(
                "; circuit breaker opened {} times, {} lookups refused",
                l.breaker_opened, l.rejected
            ));
        }
        s.push('\n');
        s
    }

    /// The human-readable summary printed on stderr.
    pub fn render(&self) -> String {
        if self.already_completed {
            return "sluice enrich: this run already completed (its checkpoint directory holds \
                    the completed marker); nothing to do. Remove the directory to run again.\n"
                .into();
        }
        let mut s = format!(
            "sluice enrich: {} lines in {:.2} s ({:.0} records/s{}){}\n",
            self.lines_read,
            self.elapsed_s,
            self.records_per_s,
            if self.on_one_thread {
                ", on one thread"
            } else if self.on_the_shards {
                ", on the shards"
            } else {
                ""
            },
            match (self.interrupted, self.stopped_at_once) {
                (_, true) => ", stopped at once by a second signal",
                (true, false) => ", interrupted",
                _ => "",
            }
        );
        let rows = [
            ("blank lines", self.blank_lines),
            ("enriched", self.enriched),
            ("missing, kept", self.missing_kept),
            ("missing, dropped", self.missing_dropped),
            ("bad records, skipped", self.bad_skipped),
            ("bad records, dead-lettered", self.bad_dead_lettered),
            ("timeouts, emitted unenriched", self.timeouts_emitted),
            ("timeouts, dropped", self.timeouts_dropped),
            ("timeouts, dead-lettered", self.timeouts_dead_lettered),
            ("lookup errors, emitted unenriched", self.errors_emitted),
            ("lookup errors, dropped", self.errors_dropped),
            ("lookup errors, dead-lettered", self.errors_dead_lettered),
            ("not written (run stopped)", self.unwritten_after_failure),
            ("watermarks", self.watermarks),
            ("retries", self.retries),
            ("checkpoints", self.checkpoints),
            ("checkpoints not committed", self.checkpoint_failures),
        ];
        if let (Some(id), Some(line)) = (self.resumed_from, self.resumed_after_line) {
            s.push_str(&format!(
                "  resumed from checkpoint {id}, after input line {line}\n"
            ));
        }
        for (name, n) in rows.iter().filter(|(_, n)| *n > 0) {
            s.push_str(&format!("  {name:<34} {n}\n"));
        }
        s.push_str(&format!(
            "  latency p50 {} us, p99 {} us, p99.9 {} us, max {} us\n",
            self.latency_p50_us, self.latency_p99_us, self.latency_p999_us, self.latency_max_us
        ));
        s.push_str(&format!(
            "  where the time goes (p50 / p99): waiting for a slot {} / {} us; \
             lookup {} / {} us, of which on the wire {} / {} us\n",
            self.queue_wait_p50_us,
            self.queue_wait_p99_us,
            self.latency_p50_us,
            self.latency_p99_us,
            self.wire_p50_us,
            self.wire_p99_us
        ));
        s.push_str(&self.lookup_line());
        if let Some(nats) = &self.nats {
            s.push_str(nats);
        }
        for w in &self.warnings {
            s.push_str(&format!("  warning: {w}\n"));
        }
        if let Some(f) = &self.failure {
            s.push_str(&format!("  failed: {f}\n"));
            if self.output_complete {
                s.push_str("  the output is complete: every line read is accounted for above\n");
            }
        }
        s
    }

    /// Every outcome counted, which equals `lines_read` for a whole run.
    pub fn accounted(&self) -> u64 {
        self.blank_lines
            + self.enriched
            + self.missing_kept
            + self.missing_dropped
            + self.bad_skipped
            + self.bad_dead_lettered
            + self.timeouts_emitted
            + self.timeouts_dropped
            + self.timeouts_dead_lettered
            + self.errors_emitted
            + self.errors_dropped
            + self.errors_dead_lettered
            + self.unwritten_after_failure
    }
}

/// One of the summary's per-record outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    Enriched,
    /// Enriched with a value that is not a JSON object.
    EnrichedNotObject,
    MissingKept,
    MissingDropped,
    BadSkipped,
    BadDeadLettered,
    TimeoutEmitted,
    TimeoutDropped,
    TimeoutDeadLettered,
    ErrorEmitted,
    ErrorDropped,
    ErrorDeadLettered,
}

impl Summary {
    /// Counts `n` records as `count`.
    pub(crate) fn add(&mut self, count: Count, n: u64) {
        let field = match count {
            Count::Enriched => &mut self.enriched,
            Count::EnrichedNotObject => {
                self.values_not_objects += n;
                &mut self.enriched
            }
            Count::MissingKept => &mut self.missing_kept,
            Count::MissingDropped => &mut self.missing_dropped,
            Count::BadSkipped => &mut self.bad_skipped,
            Count::BadDeadLettered => &mut self.bad_dead_lettered,
            Count::TimeoutEmitted => &mut self.timeouts_emitted,
            Count::TimeoutDropped => &mut self.timeouts_dropped,
            Count::TimeoutDeadLettered => &mut self.timeouts_dead_lettered,
            Count::ErrorEmitted => &mut self.errors_emitted,
            Count::ErrorDropped => &mut self.errors_dropped,
            Count::ErrorDeadLettered => &mut self.errors_dead_lettered,
        };
        *field += n;
    }
}
