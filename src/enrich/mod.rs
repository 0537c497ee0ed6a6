//! `sluice enrich`: JSON Lines in, each record enriched with the value stored under its key,
//! JSON Lines out.
//!
//! ```text
//!  reader thread                  stage (shards)                   writer (calling thread)
//!  line -> record | bad -> push ─▶ GET key (io_uring Redis) ─▶ policy -> output | dead letter
//!   (reader.rs, record.rs)          (lookup.rs)                  (writer.rs, outcome.rs, files.rs)
//! ```
//!
//! Owns: the command's orchestration: checks before any file is touched (`guard.rs`), the
//! stage, the threads, and the summary at the end. Invariants:
//! - memory is bounded by the stage (shards x (capacity + channels) lines) and by bytes
//!   (`EnrichConfig::max_bytes_held`, see `reader::Budget`), never by the input size;
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

mod fields;
mod files;
mod guard;
mod lookup;
mod options;
mod outcome;
mod reader;
mod record;
mod resume;
mod summary;
mod template;
mod writer;

pub use lookup::{Enriched, Lookup};
pub use options::{OnBadRecord, OnFailedLookup, OnMissing, RetrySpec};
pub use record::{BadRecord, Fields, Line, Record};
pub use resume::completed_marker;
pub use summary::Summary;
pub use template::{KeyError, KeyTemplate, TemplateError};

use crate::checkpoint::{Checkpointing, RestoreInfo};
use crate::redis::ClientConfig;
use crate::{OutputMode, Stage};
use files::{DeadLetters, LineFile, Target};
use guard::{DirLock, Role};
use reader::{Budget, ReaderContext, ReaderInput, ReaderState};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use writer::{Ended, Writer};

/// Bytes a run holds at most before the reader waits (`EnrichConfig::max_bytes_held`).
pub const DEFAULT_MAX_BYTES_HELD: u64 = 256 * 1024 * 1024;
/// How often the signal watcher looks at the stop flag.
const WATCH_EVERY: Duration = Duration::from_millis(20);
/// How long the check that Redis answers may take to connect before the run starts.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long it waits for the PING's reply (a slower server is taken as reachable).
const PING_WAIT: Duration = Duration::from_secs(1);

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
    pub redis: SocketAddr,
    /// The backend as the user named it (`redis://host:port`, `loadgen`), recorded with
    /// checkpoints so that a resume against another backend is refused.
    pub backend: String,
    pub key: KeyTemplate,
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

/// The dead-letter files the policies name, each once.
fn dead_letter_paths(config: &EnrichConfig) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = [
        match &config.on_bad_record {
            OnBadRecord::DeadLetter(p) => Some(p.clone()),
            _ => None,
        },
        match &config.on_timeout {
            OnFailedLookup::DeadLetter(p) => Some(p.clone()),
            _ => None,
        },
        match &config.on_error {
            OnFailedLookup::DeadLetter(p) => Some(p.clone()),
            _ => None,
        },
    ]
    .into_iter()
    .flatten()
    .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// The settings that shape the output, recorded with checkpoints.
fn output_settings(config: &EnrichConfig) -> serde_json::Value {
    let show = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    serde_json::json!({
        "backend": config.backend,
        "key": config.key.source(),
        "input": show(&config.input),
        "output": show(&config.output),
        "placement": format!("{:?}", config.placement),
        "on_missing": format!("{:?}", config.on_missing),
        "missing_marker": config.missing_marker,
        "on_bad_record": format!("{:?}", config.on_bad_record),
        "on_timeout": format!("{:?}", config.on_timeout),
        "on_error": format!("{:?}", config.on_error),
        "mode": format!("{:?}", config.mode),
        "event_time": config.event_time,
        "max_out_of_orderness_ms": config.max_out_of_orderness.as_millis() as u64,
        "emit_watermarks": config.emit_watermarks,
    })
}

/// Checks what can be checked before any file is written: the files' roles, the checkpoint
/// directory (locked for the run), the completed marker, and that Redis answers.
fn preflight(config: &EnrichConfig) -> Result<(Option<DirLock>, bool), String> {
    let dead = dead_letter_paths(config);
    let mut roles = vec![];
    if let Some(p) = &config.input {
        roles.push(Role {
            what: "--input",
            path: p,
        });
    }
    if let Some(p) = &config.output {
        roles.push(Role {
            what: "--output",
            path: p,
        });
    }
    roles.extend(dead.iter().map(|p| Role {
        what: "dead-letter file",
        path: p,
    }));
    guard::distinct_files(&roles)?;
    let mut lock = None;
    if let Some(dir) = &config.checkpoint_dir {
        if config.input.is_none() || config.output.is_none() {
            return Err(format!(
                "--checkpoint-dir {} needs --input FILE and --output FILE: standard input \
                 cannot be re-read from an offset, nor standard output cut back on resume",
                dir.display()
            ));
        }
        lock = Some(DirLock::acquire(dir)?);
        if completed_marker(dir).exists() {
            return Ok((lock, true));
        }
    }
    redis_answers(config.redis)?;
    Ok((lock, false))
}

/// Connects to Redis and sends a PING, so that an unreachable server (or one that refuses
/// commands) is said before any line is read or any file created. A server that is slow to
/// answer the PING is taken as reachable: the run's timeout policy handles slowness.
fn redis_answers(addr: SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let unreachable = |e: std::io::Error| {
        format!("Redis at {addr} does not answer: {e}; check --redis and that the server runs")
    };
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, PREFLIGHT_TIMEOUT).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(PING_WAIT))
        .map_err(unreachable)?;
    stream
        .write_all(b"*1\r\n$4\r\nPING\r\n")
        .map_err(unreachable)?;
    let mut reply = [0u8; 256];
    let n = match stream.read(&mut reply) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Err(unreachable(e)),
        Err(_) => return Ok(()), // slow, or interrupted: reachable
    };
    match reply.get(..n) {
        Some(r) if r.starts_with(b"+PONG") => Ok(()),
        Some(r) if r.starts_with(b"-") => Err(format!(
            "Redis at {addr} refused PING: {}",
            String::from_utf8_lossy(&r[1..]).trim_end()
        )),
        _ => Err(format!(
            "the server at {addr} does not speak Redis (no PONG to PING)"
        )),
    }
}

/// Each shard's wire times, added when the shard closes its function.
type WireTimes = Arc<Mutex<hdrhistogram::Histogram<u64>>>;

/// Builds and starts the stage (restoring a checkpoint in the directory, if any).
fn start_stage(
    config: &EnrichConfig,
    budget: &Arc<Budget>,
) -> Result<(Stage<Arc<Line>, Enriched>, WireTimes), String> {
    let addr = config.redis;
    let client = ClientConfig {
        connections: config.connections,
        ..ClientConfig::default()
    };
    // Each shard's client adds its wire times here when the shard closes its function.
    let wire_us = Arc::new(Mutex::new(crate::redis::wire_histogram()));
    let (wire_sink, budget) = (wire_us.clone(), budget.clone());
    let mut builder = Stage::builder(move |_| {
        lookup::RedisEnrich::new(addr, &client, wire_sink.clone(), budget.clone())
    })
    .capacity(config.capacity)
    .timeout(config.timeout)
    .mode(config.mode)
    .retry({
        let policy = config
            .retry
            .policy(|e: &crate::redis::RedisError| e.is_retryable());
        if config.retry_missing && config.retry != RetrySpec::None {
            policy.on_result(|outs: &[Enriched]| outs.iter().any(|e| e.lookup == Lookup::Missing))
        } else {
            policy
        }
    });
    if let Some(shards) = config.shards {
        builder = builder.shards(shards);
    }
    if config.mode == OutputMode::KeyOrdered {
        builder = builder.key_by(|l: &Arc<Line>| match &**l {
            Line::Record(r) => crate::hash_key(&r.key),
            Line::Bad(b) => b.line,
        });
    }
    if let Some(dir) = &config.checkpoint_dir {
        builder = builder.checkpointing(Checkpointing::new(
            dir,
            resume::line_codec(),
            resume::enriched_codec(),
        ));
    }
    let stage = builder.start().map_err(|e| e.to_string())?;
    Ok((stage, wire_us))
}

/// The files a run reads and writes, opened where it starts.
struct Files {
    input: ReaderInput,
    output: LineFile,
    dead_letters: DeadLetters,
}

/// Opens the input at the restored position and the output and dead-letter files cut back to
/// what the restored checkpoint committed (or emptied for a fresh run).
fn open_files(config: &EnrichConfig, restored: Option<&RestoreInfo>) -> Result<Files, String> {
    let input = match &config.input {
        None => ReaderInput {
            input: Box::new(std::io::BufReader::new(std::io::stdin())) as Box<dyn BufRead + Send>,
            offset: 0,
            line: 0,
            hasher: crc32fast::Hasher::new(),
        },
        Some(p) => {
            let source = resume::open_source(p, restored)?;
            ReaderInput {
                input: Box::new(source.reader),
                offset: source.offset,
                line: source.lines,
                hasher: source.hasher,
            }
        }
    };
    let output = match &config.output {
        None => LineFile::new("output".into(), Target::Stdout(std::io::stdout())),
        Some(p) => {
            let committed = restored.map(|r| (r.checkpoint_id, r.sink_position));
            let file = resume::open_appending(p, committed, "output")?;
            LineFile::new(format!("output {}", p.display()), Target::File(file))
        }
    };
    let mut dead_letters = DeadLetters::default();
    for path in dead_letter_paths(config) {
        let committed = match restored {
            None => None,
            Some(r) => {
                let name = DeadLetters::side_output_name(&path);
                let position = r.side_outputs.get(&name).copied().unwrap_or(0);
                Some((r.checkpoint_id, position))
            }
        };
        let file = resume::open_appending(&path, committed, "dead-letter file")?;
        dead_letters.insert(path, file);
    }
    Ok(Files {
        input,
        output,
        dead_letters,
    })
}

/// Runs the enrichment until the input ends, a failure, or a signal on `stop`. The `Err` case
/// is a setup error (files, Redis, the checkpoint directory); run failures are in
/// `Summary::failure`. `progress` gets the summary so far and the lines in flight.
pub fn run(
    config: &EnrichConfig,
    stop: Arc<Stop>,
    progress: &mut dyn FnMut(&Summary, u64),
) -> Result<Summary, String> {
    let started = Instant::now();
    let (_lock, completed) = preflight(config)?;
    if completed {
        return Ok(Summary {
            already_completed: true,
            ..Summary::default()
        });
    }
    let budget = Arc::new(Budget::new(config.max_bytes_held));
    let (stage, wire_us) = start_stage(config, &budget)?;
    let restored = stage.restored().cloned();
    if let Some(dir) = &config.checkpoint_dir {
        match &restored {
            Some(r) => guard::check_settings(dir, r.checkpoint_id, &output_settings(config))?,
            None => guard::record_settings(dir, &output_settings(config))?,
        }
    }
    for skipped in restored.iter().flat_map(|r| &r.skipped) {
        eprintln!("sluice enrich: {skipped}");
    }
    let files = open_files(config, restored.as_ref())?;
    let (producer, mut consumer, handle) = stage.split();
    // Shared so that a signal can end the input even while the reader is blocked reading an
    // idle pipe: the watcher takes the producer, the stage drains, the writer finishes.
    let producer = Arc::new(Mutex::new(Some(producer)));
    let finished = Arc::new(AtomicBool::new(false));
    let watcher = spawn_watcher(producer.clone(), stop.clone(), finished.clone());
    let state = Arc::new(ReaderState::default());
    let context = ReaderContext {
        key: config.key.clone(),
        event_time: config.event_time.clone(),
        max_out_of_orderness: config.max_out_of_orderness,
        checkpoint_interval: config
            .checkpoint_dir
            .as_ref()
            .map(|_| config.checkpoint_interval),
        producer,
        state: state.clone(),
        budget: budget.clone(),
        stop: stop.clone(),
    };
    let reader = std::thread::Builder::new()
        .name("sluice-reader".into())
        .spawn(move || context.run(files.input))
        .map_err(|e| format!("cannot start the reader thread: {e}"))?;

    let policies = outcome::Policies {
        placement: config.placement.clone(),
        on_missing: config.on_missing,
        missing_marker: config.missing_marker.clone(),
        on_bad_record: config.on_bad_record.clone(),
        on_timeout: config.on_timeout.clone(),
        on_error: config.on_error.clone(),
    };
    let mut writer = Writer::new(
        &policies,
        files.output,
        files.dead_letters,
        budget.clone(),
        config.emit_watermarks,
    );
    let mut report = |s: &mut Summary, handled: u64| {
        s.lines_read = state.lines_read.load(Ordering::Relaxed);
        s.retries = handle.sum(|m| m.retries);
        s.elapsed_s = started.elapsed().as_secs_f64();
        progress(
            s,
            state
                .accepted
                .load(Ordering::Relaxed)
                .saturating_sub(handled),
        );
    };
    let ended = writer.run(&mut consumer, &stop, &mut report);

    // Stop the reader on a failure, release the stage, and wait for what should end.
    let at_once = matches!(ended, Ended::AtOnce);
    let mut failure = match ended {
        Ended::Failed(e) => Some(e),
        Ended::Finished | Ended::AtOnce => None,
    };
    if failure.is_some() || at_once {
        stop.halt();
    }
    drop(consumer);
    finished.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    if let Err(e) = writer.flush() {
        failure.get_or_insert(e);
    }
    // After a signal the reader may be blocked reading an idle pipe, and after a second one
    // the shards may wait on a stalled server: leave them (the process is about to exit).
    if !at_once && (!stop.interrupted() || reader.is_finished()) && reader.join().is_err() {
        failure.get_or_insert("the reader thread panicked".into());
    }
    let metrics = (!at_once).then(|| {
        let m = handle.metrics();
        let _ = handle.join();
        m
    });
    let mut summary = std::mem::take(&mut writer.summary);
    summary.lines_read = state.lines_read.load(Ordering::Relaxed);
    summary.blank_lines = state.blank_lines.load(Ordering::Relaxed);
    summary.unwritten_after_failure += state
        .accepted
        .load(Ordering::Relaxed)
        .saturating_sub(writer.handled);
    if let Some(reader_failure) = state
        .failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        failure.get_or_insert(reader_failure);
    }
    summary.failure = failure;
    summary.peak_bytes_held = budget.peak();
    summary.interrupted = stop.interrupted();
    summary.stopped_at_once = at_once;
    summary.resumed_from = restored.as_ref().map(|r| r.checkpoint_id);
    summary.resumed_after_line = restored.as_ref().map(|r| r.source.records);
    fill_timings(&mut summary, metrics.as_ref(), &wire_us, started);
    warn_about_outcomes(&mut summary);
    if let Some(dir) = &config.checkpoint_dir {
        if summary.failure.is_none() && !summary.interrupted {
            mark_completed(dir, &mut writer, &mut summary);
        }
    }
    Ok(summary)
}

/// Takes the producer when a signal arrives, so that the input ends even while the reader is
/// blocked reading.
fn spawn_watcher(
    producer: Arc<Mutex<Option<crate::Producer<Arc<Line>>>>>,
    stop: Arc<Stop>,
    finished: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !finished.load(Ordering::Relaxed) {
            if stop.requested() {
                producer.lock().unwrap_or_else(|p| p.into_inner()).take();
                return;
            }
            std::thread::sleep(WATCH_EVERY);
        }
    })
}

/// The latency and wire-time figures of the summary.
fn fill_timings(
    summary: &mut Summary,
    metrics: Option<&crate::MetricsSnapshot>,
    wire_us: &Mutex<hdrhistogram::Histogram<u64>>,
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
    let wire = wire_us.lock().unwrap_or_else(|p| p.into_inner());
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
fn mark_completed(dir: &std::path::Path, writer: &mut Writer<'_>, summary: &mut Summary) {
    let durable = writer
        .dead_letters
        .make_durable(summary)
        .and_then(|_| writer.output.make_durable(summary))
        .and_then(|_| {
            let json = serde_json::to_string_pretty(&*summary).map_err(|e| e.to_string())?;
            resume::mark_completed(dir, &json)
        });
    if let Err(e) = durable {
        summary.output_complete = summary.accounted() == summary.lines_read;
        summary.failure = Some(format!(
            "{e}: the run finished but could not be marked completed in {}; re-running the same \
             command would resume from the last checkpoint",
            dir.display()
        ));
    }
}
