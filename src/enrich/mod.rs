//! `sluice enrich`: JSON Lines in, each record enriched with the value stored under its key,
//! JSON Lines out.
//!
//! ```text
//!  reader thread                  stage (shards)                   writer (calling thread)
//!  line -> record | bad -> push ─▶ GET key (io_uring Redis) ─▶ policy -> output | dead letter
//!   (reader.rs, record.rs,          (lookup.rs)                  (writer.rs, outcome.rs, files.rs)
//!    watermarks.rs, budget.rs)
//! ```
//!
//! That is the shape for standard input and NATS streams; a file is read and written on shard
//! 0's thread instead, the same parts as the shard's source and sink (`on_shard.rs`).
//!
//! Owns: the command's orchestration: checks before any file is touched (`guard.rs`), the
//! stage, the threads, and the summary at the end. Invariants:
//! - memory is bounded by the stage (shards x (capacity + channels) lines) and by bytes
//!   (`EnrichConfig::max_bytes_held`, see `budget.rs`), never by the input size;
//! - every line read ends as an output line, a dead-letter line, a counted drop or skip, a
//!   blank line, or a line not written because the run stopped: `Summary::accounted` equals
//!   `lines_read` (checked by `tests/enrich_cli.rs`);
//! - on a failure (a bad record, a missing key or a lookup under `fail`, a file that cannot be
//!   written), every line before the failing one is handled and flushed (in ordered mode: in
//!   input order), and the error names the line;
//! - on SIGINT/SIGTERM the reader stops, what is in flight drains and is written, and the
//!   summary says the run was interrupted; a second signal stops at once;
//! - with a checkpoint directory: one run at a time holds it; a finished run's directory and
//!   files are never touched again; output and dead letters are exactly-once (`resume.rs`).

pub(crate) mod backend;
mod budget;
mod error;
mod exporter;
mod fields;
mod files;
mod guard;
mod lookup;
mod nats_io;
mod on_shard;
mod options;
mod outcome;
mod reader;
mod record;
mod resume;
mod startup;
mod summary;
mod template;
mod threads;
mod watermarks;
mod writer;

pub use backend::{BackendConfig, BackendError};
pub use error::EnrichError;
pub use lookup::{Enriched, Lookup};
pub use nats_io::{parse_ends as parse_nats_ends, NatsEnds};
pub use options::{OnBadRecord, OnFailedLookup, OnMissing, RetrySpec};
pub use record::{BadRecord, Fields, Line, Record};
pub use resume::completed_marker;
pub use summary::Summary;
pub use template::{KeyError, KeyTemplate, TemplateError};

use crate::OutputMode;
use budget::Budget;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use threads::Threads;
use writer::{Ended, Writer};

/// Bytes a run holds at most before the reader waits (`EnrichConfig::max_bytes_held`).
pub const DEFAULT_MAX_BYTES_HELD: u64 = 256 * 1024 * 1024;

/// Where the looked-up value goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// An object's fields join the record's top level (they win over same-named fields); a
    /// value that is not a JSON object goes under `value`.
    Merge,
    /// The value (an object, or else a string) goes under this field.
    Into(String),
}

/// Everything `sluice enrich` needs.
#[derive(Debug, Clone)]
pub struct EnrichConfig {
    /// Where values are looked up.
    pub backend_config: BackendConfig,
    /// The backend as the user named it (`redis://host:port`, `loadgen`), recorded with
    /// checkpoints so that a resume against another backend is refused.
    pub backend: String,
    pub key: KeyTemplate,
    /// NATS JetStream in and out instead of `input` and `output` (`nats_io.rs`).
    pub nats: Option<NatsEnds>,
    /// Serve the run's metrics there in the Prometheus text format (`exporter.rs`).
    pub metrics_addr: Option<String>,
    /// `None`: standard input.
    pub input: Option<PathBuf>,
    /// `None`: standard output.
    pub output: Option<PathBuf>,
    pub placement: Placement,
    pub on_missing: OnMissing,
    /// With `keep`: set this field to `true` on records whose key had no value.
    pub missing_marker: Option<String>,
    pub on_bad_record: OnBadRecord,
    pub on_timeout: OnFailedLookup,
    pub on_error: OnFailedLookup,
    pub mode: OutputMode,
    pub capacity: usize,
    pub shards: Option<usize>,
    /// Connections per shard to Redis (requests spread round-robin; more of them help against
    /// a server whose replies are slow now and then: replies on one connection come in order).
    /// 0 is taken as 1, as `ClientConfig::connections` is.
    pub connections: usize,
    pub timeout: Duration,
    pub retry: RetrySpec,
    /// Also retry a key that has no value (Flink's `ifResult(EMPTY)`), for values written
    /// shortly after the records that need them. Connection errors are always retried.
    pub retry_missing: bool,
    /// Event time field (epoch seconds, epoch milliseconds, or RFC 3339).
    pub event_time: Option<String>,
    pub max_out_of_orderness: Duration,
    pub emit_watermarks: bool,
    /// Checkpoints here, and resumes from the newest one (needs file input and output).
    pub checkpoint_dir: Option<PathBuf>,
    pub checkpoint_interval: Duration,
    /// Bytes of lines and values the run holds at most before the reader waits (plus the
    /// values of the lookups already in flight); see `docs/enrich.md`.
    pub max_bytes_held: u64,
    /// The lookup layer in front of Redis (batching, coalescing, cache, limits).
    pub layer: crate::lookup::LayerConfig,
    /// Client tracking keeps the layer's cache fresh (`ClientConfig::tracking`).
    pub tracking: bool,
    /// What the keys hold: strings, or hashes read as JSON objects.
    pub value: crate::lookup::ValueKind,
}

/// Stop requests: signals (the first drains, a second stops at once) and the run's own halt
/// after a failure.
#[derive(Debug, Default)]
pub struct Stop {
    signals: AtomicUsize,
    halted: AtomicBool,
}

impl Stop {
    /// A signal arrived (async-signal-safe: one atomic add).
    pub fn signal(&self) {
        self.signals.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a signal asked the run to stop.
    pub fn interrupted(&self) -> bool {
        self.signals.load(Ordering::SeqCst) > 0
    }

    /// Whether a second signal asked to stop without waiting for the lookups in flight.
    pub fn at_once(&self) -> bool {
        self.signals.load(Ordering::SeqCst) > 1
    }

    fn halt(&self) {
        self.halted.store(true, Ordering::SeqCst);
    }

    /// Whether the reader should stop reading.
    fn requested(&self) -> bool {
        self.interrupted() || self.halted.load(Ordering::SeqCst)
    }
}

/// Runs the enrichment until the input ends, a failure, or a signal on `stop`. The `Err` case
/// is a setup error (files, Redis, the checkpoint directory); run failures are in
/// `Summary::failure`. `progress` gets the summary so far and the lines in flight.
///
/// A run that reads a file reads and writes on shard 0's thread (`on_shard.rs`); otherwise
/// (standard input, NATS) a reader thread feeds the stage and this thread writes.
pub fn run(
    config: &EnrichConfig,
    stop: Arc<Stop>,
    progress: &mut dyn FnMut(&Summary, u64),
) -> Result<Summary, EnrichError> {
    let started = Instant::now();
    // The lock is held until the run ends.
    let startup::Preflight {
        lock: _lock,
        completed,
        cluster,
    } = startup::preflight(config)?;
    if completed {
        return Ok(Summary {
            already_completed: true,
            ..Summary::default()
        });
    }
    let budget = Arc::new(Budget::new(config.max_bytes_held));
    let exporter = match &config.metrics_addr {
        Some(addr) => Some(exporter::Exporter::start(addr)?),
        None => None,
    };
    let run = Run {
        config,
        cluster,
        budget,
        stop,
        started,
        exporter,
    };
    if on_shard::applies(config) {
        on_shard::run(&run, progress)
    } else {
        run_threads(&run, progress)
    }
}

/// What both ways of running share.
pub(crate) struct Run<'a> {
    pub config: &'a EnrichConfig,
    pub cluster: bool,
    pub budget: Arc<Budget>,
    pub stop: Arc<Stop>,
    pub started: Instant,
    /// `--metrics-addr`'s endpoint.
    pub exporter: Option<exporter::Exporter>,
}

/// How a run ended, for its summary.
pub(crate) struct RunEnd {
    pub state: Arc<reader::ReaderState>,
    /// The shards' metrics (not read after a stop at once).
    pub metrics: Option<crate::MetricsSnapshot>,
    pub sinks: crate::lookup::Sinks,
    pub at_once: bool,
    pub failure: Option<EnrichError>,
    pub restored: Option<crate::checkpoint::RestoreInfo>,
}

/// A reader thread pushes into the stage; this thread writes what it releases.
fn run_threads(
    run: &Run<'_>,
    progress: &mut dyn FnMut(&Summary, u64),
) -> Result<Summary, EnrichError> {
    let (config, stop) = (run.config, &run.stop);
    let (stage, sinks) = startup::start_stage(config, run.cluster, &run.budget)?;
    let restored = stage.restored().cloned();
    startup::check_restored(config, restored.as_ref())?;
    let files = startup::open_files(config, restored.as_ref())?;
    let (producer, mut consumer, handle) = stage.split();
    if let Some(e) = &run.exporter {
        e.attach_stage(handle.observer(), sinks.clone());
    }
    let mut files = files;
    let mut nats = None;
    if let Some(ends) = &config.nats {
        let counts = Arc::new(nats_io::NatsCounts::default());
        let shards = config.shards.unwrap_or(1).max(1);
        let max_ack_pending = (4 * config.capacity * shards).max(256);
        // Ordered: outcomes come in input order, so a consumer's prefix is acknowledged at once.
        let ack_all = config.mode == crate::OutputMode::Ordered;
        let (lines, input_thread, pending) = nats_io::start_input(
            &ends.input,
            max_ack_pending,
            ack_all,
            counts.clone(),
            stop.clone(),
        )?;
        if let Some(e) = &run.exporter {
            e.attach_nats(counts.clone());
        }
        files.input.input = Box::new(lines);
        let dead_letters: Vec<String> = startup::dead_letter_targets(config)
            .iter()
            .filter_map(|t| nats_io::dead_letter_subject(t))
            .collect();
        let output = nats_io::OutputThread::start(
            &ends.output,
            &dead_letters,
            ack_all,
            pending,
            counts.clone(),
            stop.clone(),
        )?;
        nats = Some((output, input_thread, counts));
    }
    let threads = Threads::start(config, producer, files.input, &run.budget, stop)?;
    let mut writer = Writer::new(
        outcome::Policies::of(config),
        files.output,
        files.dead_letters,
        run.budget.clone(),
        config.emit_watermarks,
    );
    let mut nats_counts = None;
    let mut nats_input = None;
    if let Some((output, input_thread, counts)) = nats {
        writer.nats = Some(output);
        nats_counts = Some(counts);
        nats_input = Some(input_thread);
    }
    let state = threads.state.clone();
    let mut report = |s: &mut Summary, handled: u64| {
        report_progress(run, s, handled, &state, &handle, progress);
    };
    let ended = writer.run(&mut consumer, stop, &mut report);
    drop(consumer);
    let at_once = matches!(ended, Ended::AtOnce);
    let mut failure = match ended {
        Ended::Failed(e) => Some(e),
        Ended::Finished | Ended::AtOnce => None,
    };
    if let Err(e) = threads.stop(failure.is_some(), at_once, stop) {
        failure.get_or_insert(e);
    }
    if let Err(e) = writer.flush() {
        failure.get_or_insert(e);
    }
    if let Some(nats) = writer.nats.as_mut() {
        nats.finish();
    }
    // After the outputs: a group's leases are kept until they are published.
    if let Some(input) = nats_input.as_mut() {
        input.finish();
    }
    let metrics = (!at_once).then(|| {
        let m = handle.metrics();
        let _ = handle.join();
        m
    });
    let ended = RunEnd {
        state,
        metrics,
        sinks,
        at_once,
        failure,
        restored,
    };
    let mut summary = summarize(run, ended, &mut writer);
    let group = config
        .nats
        .as_ref()
        .is_some_and(|n| n.input.group.is_some());
    summary.nats = nats_counts.map(|c| c.line(group));
    Ok(summary)
}

/// Shows the summary so far: the writer's counts with the lines read, the retries and the
/// time filled in, and the lines in flight (accepted, not yet `handled`).
pub(crate) fn report_progress(
    run: &Run<'_>,
    summary: &mut Summary,
    handled: u64,
    state: &reader::ReaderState,
    handle: &crate::StageHandle,
    progress: &mut dyn FnMut(&Summary, u64),
) {
    summary.lines_read = state.lines_read.load(Ordering::Relaxed);
    summary.retries = handle.sum(|m| m.retries);
    summary.elapsed_s = run.started.elapsed().as_secs_f64();
    let accepted = state.accepted.load(Ordering::Relaxed);
    let in_flight = accepted.saturating_sub(handled);
    if let Some(e) = &run.exporter {
        e.update(summary, in_flight);
    }
    progress(summary, in_flight);
}

/// The run's summary from what its writer counted and how it ended; marks a checkpointed
/// run completed.
pub(crate) fn summarize(run: &Run<'_>, ended: RunEnd, writer: &mut Writer) -> Summary {
    let RunEnd {
        state,
        metrics,
        sinks,
        at_once,
        failure,
        restored,
    } = ended;
    let mut summary = std::mem::take(&mut writer.summary);
    summary.lines_read = state.lines_read.load(Ordering::Relaxed);
    summary.blank_lines = state.blank_lines.load(Ordering::Relaxed);
    let accepted = state.accepted.load(Ordering::Relaxed);
    summary.unwritten_after_failure += accepted.saturating_sub(writer.handled);
    let reader_failure = state
        .failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    summary.failure = failure.or(reader_failure);
    summary.peak_bytes_held = run.budget.peak();
    summary.interrupted = run.stop.interrupted();
    summary.stopped_at_once = at_once;
    summary.resumed_from = restored.as_ref().map(|r| r.checkpoint_id);
    summary.resumed_after_line = restored.as_ref().map(|r| r.source.records);
    fill_timings(
        &mut summary,
        metrics.as_ref(),
        &sinks.wire_us(),
        run.started,
    );
    summary.lookups = sinks.layer();
    warn_about_outcomes(&mut summary);
    if let Some(dir) = &run.config.checkpoint_dir {
        if summary.failure.is_none() && !summary.interrupted {
            mark_completed(dir, writer, &mut summary);
        }
    }
    summary
}

/// The latency and wire-time figures of the summary.
fn fill_timings(
    summary: &mut Summary,
    metrics: Option<&crate::MetricsSnapshot>,
    wire: &hdrhistogram::Histogram<u64>,
    started: Instant,
) {
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.records_per_s = summary.lines_read as f64 / summary.elapsed_s.max(1e-9);
    if let Some(m) = metrics {
        summary.retries = m.retries;
        let h = &m.invoke_to_emit_us;
        summary.latency_p50_us = h.value_at_quantile(0.5);
        summary.latency_p99_us = h.value_at_quantile(0.99);
        summary.latency_p999_us = h.value_at_quantile(0.999);
        summary.latency_max_us = h.max();
        let q = &m.queue_wait_us;
        summary.queue_wait_p50_us = q.value_at_quantile(0.5);
        summary.queue_wait_p99_us = q.value_at_quantile(0.99);
    }
    summary.wire_p50_us = wire.value_at_quantile(0.5);
    summary.wire_p99_us = wire.value_at_quantile(0.99);
}

/// Warnings for a run that worked but probably not as meant.
fn warn_about_outcomes(summary: &mut Summary) {
    let looked_up = summary.enriched
        + summary.missing_kept
        + summary.missing_dropped
        + summary.timeouts_emitted
        + summary.errors_emitted;
    if looked_up > 0 && summary.enriched == 0 {
        summary.warnings.push(
            "no key had a value: check --key against the keys in Redis (nothing was enriched)"
                .into(),
        );
    }
    if summary.values_not_objects > 0 {
        summary.warnings.push(format!(
            "{} values were not JSON objects: they went in as strings (under `value`, or the \
             --into field)",
            summary.values_not_objects
        ));
    }
    if summary.checkpoint_failures > 0 {
        summary.warnings.push(format!(
            "{} checkpoints could not be committed (see the messages above); a crash would \
             resume from an older one",
            summary.checkpoint_failures
        ));
    }
}

/// Makes every file durable and leaves the completed marker; a failure there is said with the
/// news that the output is complete.
fn mark_completed(dir: &std::path::Path, writer: &mut Writer, summary: &mut Summary) {
    let durable = writer
        .dead_letters
        .make_durable(summary)
        .and_then(|_| writer.output.make_durable(summary))
        .and_then(|_| {
            let json = serde_json::to_string_pretty(&*summary)
                .map_err(|e| EnrichError::dir(dir, format!("completed marker: {e}")))?;
            resume::mark_completed(dir, &json)
        });
    if let Err(e) = durable {
        summary.output_complete = summary.accounted() == summary.lines_read;
        summary.failure = Some(EnrichError::dir(
            dir,
            format!(
                "the run finished but could not be marked completed ({e}); re-running the same \
                 command would resume from the last checkpoint"
            ),
        ));
    }
}
