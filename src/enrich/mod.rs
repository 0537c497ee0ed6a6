//! `sluice enrich`: JSON Lines in, each record enriched with the value stored under its key,
//! JSON Lines out.
//!
//! ```text
//!  reader thread                 stage (shards)                  writer (calling thread)
//!  line -> JSON -> key -> push ─▶ GET key (io_uring Redis) ─▶ merge value, apply policies, write
//!   └ bad record: fail | skip | dead-letter                        └ missing / timeout / error
//! ```
//!
//! Owns: the command's data path and its accounting. Invariants:
//! - memory is bounded by the stage (shards x (capacity + channels)), never by the input size:
//!   the reader blocks when the stage is full;
//! - every line read ends as an output line, a dead-letter line, or a counted drop or skip;
//!   the summary's counts add up to the lines read (checked by `tests/enrich_cli.rs`);
//! - on a failure (a bad record under `fail`, a missing key under `fail`, a lookup that fails
//!   under `fail`), the reader stops, every record already accepted is written (in ordered mode:
//!   every record before the failing one) and flushed, and the error names the line;
//! - on SIGINT/SIGTERM (the `stop` flag) the reader stops, what is in flight drains and is
//!   written, and the summary says the run was interrupted;
//! - with a checkpoint directory, the reader starts a checkpoint every interval at the byte
//!   just after the last line it handled, and the writer commits it after flushing and
//!   fsyncing the output up to the checkpoint's marker (see `resume.rs`).

mod lookup;
mod options;
mod resume;
mod template;

pub use lookup::{Enriched, Lookup, Record};
pub use options::{OnBadRecord, OnFailedLookup, OnMissing, RetrySpec};
pub use resume::completed_marker;
pub use template::{KeyError, KeyTemplate, TemplateError};

use crate::checkpoint::{CheckpointError, CheckpointRefused, Checkpointing, SourcePosition};
use crate::{Output, OutputMode, Stage};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufWriter, Seek, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Event time field (epoch seconds, epoch milliseconds, or RFC 3339).
    pub event_time: Option<String>,
    pub max_out_of_orderness: Duration,
    pub emit_watermarks: bool,
    /// Checkpoints here, and resumes from the newest one (needs file input and output).
    pub checkpoint_dir: Option<PathBuf>,
    pub checkpoint_interval: Duration,
}

/// Counts of what happened to every line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub lines_read: u64,
    pub enriched: u64,
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
    /// Records accepted into the stage but not written because the run failed.
    pub unwritten_after_failure: u64,
    pub watermarks: u64,
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
    pub interrupted: bool,
    /// Why the run failed, if it did.
    pub failure: Option<String>,
    /// Checkpoints committed during this run.
    pub checkpoints: u64,
    /// Checkpoints that could not be committed (for example: disk full); the run went on.
    pub checkpoint_failures: u64,
    /// The checkpoint this run resumed from, and the input line it resumed after.
    pub resumed_from: Option<u64>,
    pub resumed_after_line: Option<u64>,
    /// The checkpoint directory says a previous run finished: nothing was done.
    pub already_completed: bool,
}

impl Summary {
    /// The human-readable summary printed on stderr.
    pub fn render(&self) -> String {
        if self.already_completed {
            return "sluice enrich: this run already completed (its checkpoint directory holds \
                    the completed marker); nothing to do. Remove the directory to run again.\n"
                .into();
        }
        let mut s = format!(
            "sluice enrich: {} lines in {:.2} s ({:.0} records/s){}\n",
            self.lines_read,
            self.elapsed_s,
            self.records_per_s,
            if self.interrupted {
                ", interrupted"
            } else {
                ""
            }
        );
        let rows = [
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
            ("not written (run failed)", self.unwritten_after_failure),
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
        if let Some(f) = &self.failure {
            s.push_str(&format!("  failed: {f}\n"));
        }
        s
    }
}

/// Dead-letter files, shared by the reader (bad records) and the writer (lookups).
#[derive(Clone, Default)]
struct DeadLetters {
    files: Arc<Mutex<HashMap<PathBuf, BufWriter<File>>>>,
}

impl DeadLetters {
    fn open(&self, path: &PathBuf) -> Result<(), String> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if !files.contains_key(path) {
            let f = File::create(path)
                .map_err(|e| format!("dead-letter file {}: {e}", path.display()))?;
            files.insert(path.clone(), BufWriter::new(f));
        }
        Ok(())
    }

    fn write(&self, path: &PathBuf, line: u64, reason: &str, input: &str) -> Result<(), String> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let f = files.get_mut(path).expect("opened at start");
        let entry = serde_json::json!({"line": line, "error": reason, "input": input});
        serde_json::to_writer(&mut *f, &entry)
            .and_then(|_| f.write_all(b"\n").map_err(serde_json::Error::io))
            .map_err(|e| format!("dead-letter file {}: {e}", path.display()))
    }

    fn flush(&self) -> Result<(), String> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        for (path, f) in files.iter_mut() {
            f.flush()
                .map_err(|e| format!("dead-letter file {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

/// Reads an event time: epoch seconds or milliseconds (numbers above 1e11 are taken as
/// milliseconds), or an RFC 3339 string. Returns milliseconds.
fn event_time_ms(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => {
            let v = n.as_f64()?;
            if !(0.0..1e15).contains(&v) {
                return None;
            }
            Some(if v > 1e11 {
                v as u64
            } else {
                (v * 1000.0) as u64
            })
        }
        Value::String(s) => {
            let t = humantime::parse_rfc3339_weak(s).ok()?;
            Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
        }
        _ => None,
    }
}

/// A bad line: the reason names the field where there is one.
struct BadRecord {
    line: u64,
    reason: String,
    text: String,
}

enum Parsed {
    Record(Record, Option<u64>),
    Bad(BadRecord),
}

fn parse_line(config: &EnrichConfig, line_no: u64, text: &str) -> Parsed {
    let bad = |reason: String| {
        Parsed::Bad(BadRecord {
            line: line_no,
            reason,
            text: text.to_string(),
        })
    };
    let fields = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        Ok(other) => {
            let kind = match other {
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                _ => "null",
            };
            return bad(format!("not a JSON object but {kind}"));
        }
        Err(e) => return bad(format!("not valid JSON: {e}")),
    };
    let key = match config.key.render(&fields) {
        Ok(k) => k,
        Err(e) => return bad(e.to_string()),
    };
    let event_time = match &config.event_time {
        None => None,
        Some(field) => match fields.get(field) {
            None => return bad(format!("event time field `{field}` is missing")),
            Some(v) => match event_time_ms(v) {
                Some(ms) => Some(ms),
                None => {
                    return bad(format!(
                        "event time field `{field}` is {v}, not epoch seconds, epoch milliseconds or RFC 3339"
                    ))
                }
            },
        },
    };
    Parsed::Record(
        Record {
            line: line_no,
            key,
            fields,
        },
        event_time,
    )
}

/// Applies a timeout or lookup-error policy; returns whether to write the record unenriched.
fn failed_lookup(
    policy: &OnFailedLookup,
    (emitted, dropped, dead_lettered): (&mut u64, &mut u64, &mut u64),
    dead_letters: &DeadLetters,
    key: &str,
    line: u64,
    fields: &Map<String, Value>,
    what: &str,
) -> Result<bool, String> {
    match policy {
        OnFailedLookup::Emit => {
            *emitted += 1;
            Ok(true)
        }
        OnFailedLookup::Drop => {
            *dropped += 1;
            Ok(false)
        }
        OnFailedLookup::DeadLetter(path) => {
            dead_letters.write(path, line, what, &Value::Object(fields.clone()).to_string())?;
            *dead_lettered += 1;
            Ok(false)
        }
        OnFailedLookup::Fail => Err(format!("line {line}: {what} (key {key:?})")),
    }
}

/// Shared between the reader and the writer.
#[derive(Default)]
struct ReaderState {
    lines_read: AtomicU64,
    bad_skipped: AtomicU64,
    bad_dead_lettered: AtomicU64,
    accepted: AtomicU64,
    failure: Mutex<Option<String>>,
}

/// The output: standard output, or a file (which a checkpoint flushes and fsyncs).
enum Sink {
    Stdout(BufWriter<std::io::Stdout>),
    File(BufWriter<File>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Stdout(w) => w.write(buf),
            Sink::File(w) => w.write(buf),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout(w) => w.write_all(buf),
            Sink::File(w) => w.write_all(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout(w) => w.flush(),
            Sink::File(w) => w.flush(),
        }
    }
}

impl Sink {
    /// Flushes and fsyncs a file output; returns its length, now durable.
    fn make_durable(&mut self) -> Result<u64, String> {
        let Sink::File(w) = self else {
            unreachable!("checkpoints need a file output (checked at start)")
        };
        w.flush().map_err(|e| format!("output: {e}"))?;
        let file = w.get_mut();
        file.sync_data().map_err(|e| {
            format!("output: fsync failed: {e}; stopping (a failed fsync cannot be retried safely)")
        })?;
        file.stream_position().map_err(|e| format!("output: {e}"))
    }
}

/// Runs the enrichment until the input ends, a failure, or `stop` is raised. The `Err` case is
/// a setup error (files, Redis address); run failures are in `Summary::failure`.
pub fn run(
    config: &EnrichConfig,
    stop: Arc<AtomicBool>,
    progress: &mut dyn FnMut(&Summary, u64),
) -> Result<Summary, String> {
    let started = Instant::now();
    let dead_letters = DeadLetters::default();
    for policy_file in [
        match &config.on_bad_record {
            OnBadRecord::DeadLetter(p) => Some(p),
            _ => None,
        },
        match &config.on_timeout {
            OnFailedLookup::DeadLetter(p) => Some(p),
            _ => None,
        },
        match &config.on_error {
            OnFailedLookup::DeadLetter(p) => Some(p),
            _ => None,
        },
    ]
    .into_iter()
    .flatten()
    {
        dead_letters.open(policy_file)?;
    }
    if let Some(dir) = &config.checkpoint_dir {
        if config.input.is_none() || config.output.is_none() {
            return Err(format!(
                "--checkpoint-dir {} needs --input FILE and --output FILE: standard input \
                 cannot be re-read from an offset, nor standard output cut back on resume",
                dir.display()
            ));
        }
        if completed_marker(dir).exists() {
            return Ok(Summary {
                already_completed: true,
                ..Summary::default()
            });
        }
    }

    let (addr, connections) = (config.redis, config.connections);
    let timeout_emits = config.on_timeout != OnFailedLookup::Fail;
    let error_emits = config.on_error != OnFailedLookup::Fail;
    // Each shard's client adds its wire times here when the shard closes its function.
    let wire_us = Arc::new(Mutex::new(crate::redis::wire_histogram()));
    let wire_sink = wire_us.clone();
    let mut builder = Stage::builder(move |_| {
        lookup::RedisEnrich::new(
            addr,
            connections,
            timeout_emits,
            error_emits,
            wire_sink.clone(),
        )
    })
    .capacity(config.capacity)
    .timeout(config.timeout)
    .mode(config.mode)
    .retry(
        config
            .retry
            .policy(|e: &crate::redis::RedisError| e.is_retryable()),
    );
    if let Some(shards) = config.shards {
        builder = builder.shards(shards);
    }
    if config.mode == OutputMode::KeyOrdered {
        builder = builder.key_by(|r: &Arc<Record>| crate::hash_key(&r.key));
    }
    if let Some(dir) = &config.checkpoint_dir {
        builder = builder.checkpointing(Checkpointing::new(
            dir,
            resume::record_codec(),
            resume::enriched_codec(),
        ));
    }
    let stage = builder.start().map_err(|e| e.to_string())?;
    let restored = stage.restored().cloned();
    for skipped in restored.iter().flat_map(|r| &r.skipped) {
        eprintln!("sluice enrich: {skipped}");
    }
    let (input, first_offset, first_line): (Box<dyn BufRead + Send>, u64, u64) = match &config.input
    {
        None => (Box::new(std::io::BufReader::new(std::io::stdin())), 0, 0),
        Some(p) => {
            let (reader, offset, lines) = resume::open_source(p, restored.as_ref())?;
            (Box::new(reader), offset, lines)
        }
    };
    let mut output = match &config.output {
        None => Sink::Stdout(BufWriter::with_capacity(256 * 1024, std::io::stdout())),
        Some(p) => Sink::File(BufWriter::with_capacity(
            256 * 1024,
            resume::open_sink(p, restored.as_ref())?,
        )),
    };
    let (producer, mut consumer, handle) = stage.split();
    // Shared so that a signal can end the input even while the reader is blocked reading an
    // idle pipe: the watcher takes the producer, the stage drains, the writer finishes.
    let producer = Arc::new(Mutex::new(Some(producer)));
    let finished = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (producer, stop, finished) = (producer.clone(), stop.clone(), finished.clone());
        std::thread::spawn(move || {
            while !finished.load(Ordering::Relaxed) {
                if stop.load(Ordering::Relaxed) {
                    producer.lock().unwrap_or_else(|p| p.into_inner()).take();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let state = Arc::new(ReaderState::default());
    let reader = {
        let (config, state, stop, dead_letters, producer) = (
            config.clone(),
            state.clone(),
            stop.clone(),
            dead_letters.clone(),
            producer.clone(),
        );
        std::thread::Builder::new()
            .name("sluice-reader".into())
            .spawn(move || {
                let out_of_orderness = config.max_out_of_orderness.as_millis() as u64;
                let (mut max_event, mut last_watermark, mut since_watermark) =
                    (None::<u64>, None::<u64>, 0u32);
                let fail = |message: String| {
                    state
                        .failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(message);
                };
                let checkpointing = config.checkpoint_dir.is_some();
                let mut last_checkpoint = Instant::now();
                let checkpoint = |at: SourcePosition| -> bool {
                    let mut guard = producer.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(p) = guard.as_mut() else {
                        return false;
                    };
                    match p.checkpoint(at) {
                        // Still committing the previous one: try again at the next interval.
                        Ok(_) | Err(CheckpointRefused::InProgress { .. }) => true,
                        Err(_) => false,
                    }
                };
                let push = |record: Option<Arc<Record>>, watermark: u64| -> bool {
                    let mut guard = producer.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(p) = guard.as_mut() else {
                        return false;
                    };
                    match record {
                        Some(r) => p.push(r).is_ok(),
                        None => p.push_watermark(watermark).is_ok(),
                    }
                };
                let mut input = input;
                let (mut offset, mut line_no) = (first_offset, first_line);
                let mut buffer = Vec::with_capacity(1024);
                // Bytes, not `lines()`: a line that is not UTF-8 is a bad record for the
                // policy to handle, not the end of the run.
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Checkpoint between lines: everything before `offset` has been handled.
                    if checkpointing
                        && line_no % 64 == 0
                        && last_checkpoint.elapsed() >= config.checkpoint_interval
                    {
                        let at = SourcePosition {
                            offset,
                            records: line_no,
                        };
                        if !checkpoint(at) {
                            break;
                        }
                        last_checkpoint = Instant::now();
                    }
                    line_no += 1;
                    // One buffer for every line: parsing borrows it, so a line costs no
                    // allocation of its own.
                    buffer.clear();
                    match input.read_until(b'\n', &mut buffer) {
                        Ok(0) => break,
                        Ok(n) => offset += n as u64,
                        Err(e) => {
                            fail(format!("reading line {line_no}: {e}"));
                            break;
                        }
                    }
                    let mut bytes = buffer.as_slice();
                    if let [rest @ .., b'\n'] = bytes {
                        bytes = rest;
                    }
                    if let [rest @ .., b'\r'] = bytes {
                        bytes = rest; // CRLF line endings
                    }
                    state.lines_read.fetch_add(1, Ordering::Relaxed);
                    let parsed = match std::str::from_utf8(bytes) {
                        Ok(text) => parse_line(&config, line_no, text),
                        Err(e) => Parsed::Bad(BadRecord {
                            line: line_no,
                            reason: format!(
                                "not UTF-8 (invalid byte at column {})",
                                e.valid_up_to() + 1
                            ),
                            text: String::from_utf8_lossy(bytes).into_owned(),
                        }),
                    };
                    match parsed {
                        Parsed::Record(record, event_time) => {
                            if !push(Some(Arc::new(record)), 0) {
                                break; // the stage stopped (the writer reports why) or a signal
                            }
                            state.accepted.fetch_add(1, Ordering::Relaxed);
                            if let Some(t) = event_time {
                                max_event = Some(max_event.map_or(t, |m| m.max(t)));
                                since_watermark += 1;
                                // Flink's bounded out-of-orderness: max event time - bound - 1.
                                let w = max_event
                                    .expect("set above")
                                    .saturating_sub(out_of_orderness + 1);
                                if since_watermark >= 100 && last_watermark.is_none_or(|l| w > l) {
                                    if !push(None, w) {
                                        break;
                                    }
                                    last_watermark = Some(w);
                                    since_watermark = 0;
                                }
                            }
                        }
                        Parsed::Bad(bad) => match &config.on_bad_record {
                            OnBadRecord::Fail => {
                                let shown: String = bad.text.chars().take(200).collect();
                                fail(format!(
                                    "line {}: bad record: {}: {shown}",
                                    bad.line, bad.reason
                                ));
                                break;
                            }
                            OnBadRecord::Skip => {
                                state.bad_skipped.fetch_add(1, Ordering::Relaxed);
                            }
                            OnBadRecord::DeadLetter(path) => {
                                if let Err(e) =
                                    dead_letters.write(path, bad.line, &bad.reason, &bad.text)
                                {
                                    fail(e);
                                    break;
                                }
                                state.bad_dead_lettered.fetch_add(1, Ordering::Relaxed);
                            }
                        },
                    }
                }
                // The final watermark: everything read is at or before it.
                if let Some(m) = max_event {
                    let w = m.saturating_sub(out_of_orderness + 1);
                    if last_watermark.is_none_or(|l| w > l) {
                        push(None, w);
                    }
                }
                producer.lock().unwrap_or_else(|p| p.into_inner()).take();
            })
            .map_err(|e| e.to_string())?
    };

    let mut summary = Summary::default();
    let mut write_failure: Option<String> = None;
    let mut written_since_progress = 0u64;
    let mut last_progress = Instant::now();
    let write =
        |summary: &mut Summary, output: &mut Sink, item: Output<Enriched>| -> Result<(), String> {
            let enriched = match item {
                Output::Checkpoint(_) => unreachable!("checkpoints are committed by the loop"),
                Output::Watermark(ts) => {
                    summary.watermarks += 1;
                    if config.emit_watermarks {
                        writeln!(output, "{{\"watermark\":{ts}}}")
                            .map_err(|e| format!("output: {e}"))?;
                    }
                    return Ok(());
                }
                Output::Record { value, .. } => value,
            };
            let line = enriched.record.line;
            let record = Arc::try_unwrap(enriched.record).unwrap_or_else(|shared| Record {
                line: shared.line,
                key: shared.key.clone(),
                fields: shared.fields.clone(),
            });
            let mut fields = record.fields;
            let write_record = match enriched.lookup {
                Lookup::Found(bytes) => {
                    summary.enriched += 1;
                    match (serde_json::from_slice::<Value>(&bytes), &config.placement) {
                        (Ok(Value::Object(found)), Placement::Merge) => fields.extend(found),
                        (Ok(Value::Object(found)), Placement::Into(f)) => {
                            fields.insert(f.clone(), Value::Object(found));
                        }
                        (_, placement) => {
                            let field = match placement {
                                Placement::Into(f) => f.clone(),
                                Placement::Merge => "value".to_string(),
                            };
                            fields.insert(
                                field,
                                Value::String(String::from_utf8_lossy(&bytes).into_owned()),
                            );
                        }
                    }
                    true
                }
                Lookup::Missing => match config.on_missing {
                    OnMissing::Keep => {
                        summary.missing_kept += 1;
                        if let Some(marker) = &config.missing_marker {
                            fields.insert(marker.clone(), Value::Bool(true));
                        }
                        true
                    }
                    OnMissing::Drop => {
                        summary.missing_dropped += 1;
                        false
                    }
                    OnMissing::Fail => {
                        return Err(format!(
                            "line {line}: key {:?} has no value (--on-missing fail)",
                            record.key
                        ))
                    }
                },
                Lookup::TimedOut => {
                    let counts = (
                        &mut summary.timeouts_emitted,
                        &mut summary.timeouts_dropped,
                        &mut summary.timeouts_dead_lettered,
                    );
                    failed_lookup(
                        &config.on_timeout,
                        counts,
                        &dead_letters,
                        &record.key,
                        line,
                        &fields,
                        "lookup timed out",
                    )?
                }
                Lookup::Failed(error) => {
                    let counts = (
                        &mut summary.errors_emitted,
                        &mut summary.errors_dropped,
                        &mut summary.errors_dead_lettered,
                    );
                    let what = format!("lookup failed: {error}");
                    failed_lookup(
                        &config.on_error,
                        counts,
                        &dead_letters,
                        &record.key,
                        line,
                        &fields,
                        &what,
                    )?
                }
            };
            if write_record {
                serde_json::to_writer(&mut *output, &Value::Object(fields))
                    .map_err(|e| format!("output: {e}"))?;
                output
                    .write_all(b"\n")
                    .map_err(|e| format!("output: {e}"))?;
            }
            Ok(())
        };
    let mut stage_failure = None;
    let mut handled = 0u64;
    while let Some(item) = consumer.recv() {
        match item {
            Ok(Output::Checkpoint(id)) => {
                let committed = output.make_durable().map_err(Some).and_then(|position| {
                    consumer
                        .commit_checkpoint(id, position)
                        .map_err(|e| match e {
                            CheckpointError::Fsync { .. } => Some(e.to_string()),
                            other => {
                                eprintln!("sluice enrich: checkpoint {id} not committed: {other}");
                                None
                            }
                        })
                });
                match committed {
                    Ok(()) => summary.checkpoints += 1,
                    Err(None) => summary.checkpoint_failures += 1,
                    Err(Some(fatal)) => {
                        write_failure = Some(fatal);
                        break;
                    }
                }
                continue;
            }
            Ok(out) => {
                let is_record = matches!(out, Output::Record { .. });
                if let Err(e) = write(&mut summary, &mut output, out) {
                    write_failure = Some(e);
                    break;
                }
                if is_record {
                    handled += 1;
                }
            }
            Err(e) => {
                stage_failure = Some(e.to_string());
                break;
            }
        }
        written_since_progress += 1;
        if written_since_progress >= 1024 || last_progress.elapsed() >= Duration::from_millis(200) {
            if last_progress.elapsed() >= Duration::from_millis(100) {
                summary.lines_read = state.lines_read.load(Ordering::Relaxed);
                summary.retries = handle.sum(|m| m.retries);
                summary.elapsed_s = started.elapsed().as_secs_f64();
                let in_flight = state
                    .accepted
                    .load(Ordering::Relaxed)
                    .saturating_sub(handled);
                progress(&summary, in_flight);
                last_progress = Instant::now();
            }
            written_since_progress = 0;
        }
    }
    // On a failure, stop the reader and release the stage.
    let signalled = stop.load(Ordering::Relaxed);
    if write_failure.is_some() || stage_failure.is_some() {
        stop.store(true, Ordering::Relaxed);
    }
    drop(consumer);
    finished.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    // After a signal the reader may be blocked reading an idle pipe: leave it (the process is
    // about to exit); everything it handed over has been written.
    if !stop.load(Ordering::Relaxed) || reader.is_finished() {
        reader
            .join()
            .map_err(|_| "the reader thread panicked".to_string())?;
    }
    let flushed = output.flush().map_err(|e| format!("output: {e}"));
    let metrics = handle.metrics();
    let _ = handle.join();
    dead_letters.flush()?;

    summary.lines_read = state.lines_read.load(Ordering::Relaxed);
    summary.bad_skipped = state.bad_skipped.load(Ordering::Relaxed);
    summary.bad_dead_lettered = state.bad_dead_lettered.load(Ordering::Relaxed);
    let accepted = state.accepted.load(Ordering::Relaxed);
    summary.unwritten_after_failure =
        accepted.saturating_sub(handled + u64::from(write_failure.is_some()));
    summary.retries = metrics.retries;
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.records_per_s = summary.lines_read as f64 / summary.elapsed_s.max(1e-9);
    let h = &metrics.invoke_to_emit_us;
    summary.latency_p50_us = h.value_at_quantile(0.5);
    summary.latency_p99_us = h.value_at_quantile(0.99);
    summary.latency_p999_us = h.value_at_quantile(0.999);
    summary.latency_max_us = h.max();
    let q = &metrics.queue_wait_us;
    summary.queue_wait_p50_us = q.value_at_quantile(0.5);
    summary.queue_wait_p99_us = q.value_at_quantile(0.99);
    let wire = wire_us.lock().unwrap_or_else(|p| p.into_inner());
    summary.wire_p50_us = wire.value_at_quantile(0.5);
    summary.wire_p99_us = wire.value_at_quantile(0.99);
    drop(wire);
    let reader_failure = state
        .failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    summary.failure = write_failure
        .or(stage_failure)
        .or(reader_failure)
        .or(flushed.err());
    summary.interrupted = signalled;
    summary.resumed_from = restored.as_ref().map(|r| r.checkpoint_id);
    summary.resumed_after_line = restored.as_ref().map(|r| r.source.records);
    if let Some(dir) = &config.checkpoint_dir {
        if summary.failure.is_none() && !summary.interrupted {
            let durable = output.make_durable().and_then(|_| {
                let json = serde_json::to_string_pretty(&summary).expect("a summary serialises");
                resume::mark_completed(dir, &json)
            });
            if let Err(e) = durable {
                summary.failure = Some(e);
            }
        }
    }
    Ok(summary)
}
