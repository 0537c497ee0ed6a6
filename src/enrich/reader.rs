//! The reader thread: input bytes to lines, lines into the stage, with event-time watermarks
//! and checkpoint barriers between them.
//!
//! Owns: the input's position and the watermark generator. Invariants:
//! - every line read is pushed (a record or a bad record, which the writer handles in order) or
//!   counted as blank; nothing else is decided here, so the writer is the one place where a
//!   line's outcome is applied;
//! - a checkpoint starts only between lines, at the byte just after the last line pushed, with
//!   the CRC-32 of every byte before it;
//! - the bytes held by the run (`Budget`) stay under its limit before a line is pushed: the
//!   reader waits while they are above it;
//! - watermarks follow Flink's bounded out-of-orderness (largest event time - bound - 1 ms),
//!   one at most every `WATERMARK_EVERY` records, and a final one at the end.

use super::record::{self, Line, LineFormat, Parsed, Reservation};
use super::resume;
use super::Stop;
use crate::checkpoint::{CheckpointRefused, SourcePosition};
use crate::Producer;
use std::io::BufRead;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A watermark goes out at most once per this many records with an event time.
pub(crate) const WATERMARK_EVERY: u32 = 100;
/// A checkpoint is considered every this many lines (the clock is not read per line).
const CHECKPOINT_CHECK_EVERY: u64 = 64;
/// How long the reader waits at a time for the byte budget before looking at the stop flag.
const BUDGET_WAIT: Duration = Duration::from_millis(50);

/// The bytes a run holds (lines from the push until the writer handled them, and the values
/// their lookups found), and the limit above which the reader waits.
///
/// Each line reserves its own weight and the largest value seen so far (the estimate of its
/// value), and what its value has beyond that is added when it arrives; so the count is at
/// least the bytes held, and until a first lookup completes (no estimate yet) one line at a
/// time is let in. The count then stays under the limit plus one line's reservation, and
/// beyond that only by how much values outgrow the largest seen before them.
pub(crate) struct Budget {
    held: AtomicU64,
    peak: AtomicU64,
    limit: u64,
    /// The largest value seen, and whether any lookup completed.
    estimate: AtomicU64,
    known: AtomicBool,
    lock: Mutex<()>,
    released: Condvar,
}

impl Budget {
    pub(crate) fn new(limit: u64) -> Budget {
        Budget {
            held: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            limit,
            estimate: AtomicU64::new(0),
            known: AtomicBool::new(false),
            lock: Mutex::new(()),
            released: Condvar::new(),
        }
    }

    fn take(&self, bytes: u64) {
        let now = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// Reserves a line of `weight` bytes and its value's estimate.
    fn reserve(&self, weight: u64) -> Reservation {
        let for_value = self.estimate.load(Ordering::Relaxed);
        let held = Reservation {
            bytes: weight + for_value,
            for_value,
        };
        self.take(held.bytes);
        held
    }

    /// A lookup of a line that reserved `held` completed with a value of `bytes` (0: none).
    pub(crate) fn value_arrived(&self, held: Reservation, bytes: u64) {
        self.take(held.beyond(bytes));
        self.estimate.fetch_max(bytes, Ordering::Relaxed);
        if !self.known.swap(true, Ordering::Relaxed) {
            self.wake();
        }
    }

    /// The writer handled a line that held `bytes` (its reservation and its value).
    pub(crate) fn release(&self, bytes: u64) {
        let before = self.held.fetch_sub(
            bytes.min(self.held.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        if before > self.limit && before.saturating_sub(bytes) <= self.limit {
            self.wake();
        }
    }

    fn wake(&self) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.released.notify_all();
    }

    /// The most bytes held at once.
    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    fn full(&self) -> bool {
        let held = self.held.load(Ordering::Relaxed);
        held > self.limit || (held > 0 && !self.known.load(Ordering::Relaxed))
    }

    /// Waits until the bytes held are at most the limit, or `stop` is raised.
    fn wait_for_room(&self, stop: &Stop) {
        while self.full() && !stop.requested() {
            let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            if self.full() {
                let _ = self.released.wait_timeout(guard, BUDGET_WAIT);
            }
        }
    }
}

/// What a line is taken to weigh in the budget: its bytes, and per field the parsed form's
/// own overhead.
pub(crate) fn weight(line: &Line) -> u64 {
    match line {
        Line::Record(r) => {
            let fields: usize = r
                .fields
                .iter()
                .map(|(k, v)| k.len() + v.get().len() + 48)
                .sum();
            (fields + r.key.len() + 64) as u64
        }
        Line::Bad(b) => (b.text.len() + b.reason.len() + 64) as u64,
    }
}

/// Counts shared between the reader and the writer.
#[derive(Default)]
pub(crate) struct ReaderState {
    pub lines_read: AtomicU64,
    pub blank_lines: AtomicU64,
    pub accepted: AtomicU64,
    pub failure: Mutex<Option<String>>,
}

/// Where and how the reader reads.
pub(crate) struct ReaderInput {
    pub input: Box<dyn BufRead + Send>,
    pub offset: u64,
    pub line: u64,
    pub hasher: crc32fast::Hasher,
}

/// What the reader needs besides its input.
pub(crate) struct ReaderContext {
    pub key: super::KeyTemplate,
    pub event_time: Option<String>,
    pub max_out_of_orderness: Duration,
    pub checkpoint_interval: Option<Duration>,
    pub producer: Arc<Mutex<Option<Producer<Arc<Line>>>>>,
    pub state: Arc<ReaderState>,
    pub budget: Arc<Budget>,
    pub stop: Arc<Stop>,
}

/// Bounded out-of-orderness watermarks over event times.
struct Watermarks {
    bound: u64,
    max_event: Option<u64>,
    last: Option<u64>,
    since: u32,
}

impl Watermarks {
    /// The watermark to emit after a record with event time `t`, if one is due.
    fn after(&mut self, t: u64) -> Option<u64> {
        let max = self.max_event.map_or(t, |m| m.max(t));
        self.max_event = Some(max);
        self.since += 1;
        let w = max.saturating_sub(self.bound + 1);
        (self.since >= WATERMARK_EVERY && self.last.is_none_or(|l| w > l)).then(|| {
            self.last = Some(w);
            self.since = 0;
            w
        })
    }

    /// The final watermark: everything read is at or before it.
    fn last(&self) -> Option<u64> {
        let w = self.max_event?.saturating_sub(self.bound + 1);
        self.last.is_none_or(|l| w > l).then_some(w)
    }
}

impl ReaderContext {
    fn fail(&self, message: String) {
        self.state
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(message);
    }

    /// Runs `f` on the producer; `None` once it is gone (a signal, or the stage stopped).
    fn with_producer<T>(&self, f: impl FnOnce(&mut Producer<Arc<Line>>) -> T) -> Option<T> {
        let mut guard = self.producer.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_mut().map(f)
    }

    fn push(&self, mut line: Line) -> bool {
        self.budget.wait_for_room(&self.stop);
        let held = self.budget.reserve(weight(&line));
        line.set_held(held);
        let pushed = self
            .with_producer(|p| p.push(Arc::new(line)).is_ok())
            .unwrap_or(false);
        if !pushed {
            self.budget.release(held.bytes);
        }
        pushed
    }

    fn checkpoint(&self, at: SourcePosition) -> bool {
        // Still committing the previous one: try again at the next interval.
        self.with_producer(|p| {
            matches!(
                p.checkpoint(at),
                Ok(_) | Err(CheckpointRefused::InProgress { .. })
            )
        })
        .unwrap_or(false)
    }

    /// Reads to the end of the input, a read error, or `stop`; then ends the stage's input.
    pub(crate) fn run(self, mut input: ReaderInput) {
        let format = LineFormat {
            key: &self.key,
            event_time: self.event_time.as_deref(),
        };
        let mut watermarks = Watermarks {
            bound: self.max_out_of_orderness.as_millis() as u64,
            max_event: None,
            last: None,
            since: 0,
        };
        let mut last_checkpoint = Instant::now();
        let mut buffer = Vec::with_capacity(1024);
        while !self.stop.requested() {
            if let Some(interval) = self.checkpoint_interval {
                if input.line % CHECKPOINT_CHECK_EVERY == 0 && last_checkpoint.elapsed() >= interval
                {
                    let at = SourcePosition {
                        offset: input.offset,
                        records: input.line,
                        digest: resume::source_digest(&input.hasher),
                    };
                    if !self.checkpoint(at) {
                        break;
                    }
                    last_checkpoint = Instant::now();
                }
            }
            buffer.clear();
            let first = input.offset == 0;
            match input.input.read_until(b'\n', &mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    input.offset += n as u64;
                    input.hasher.update(&buffer);
                }
                Err(e) => {
                    self.fail(format!("reading line {}: {e}", input.line + 1));
                    break;
                }
            }
            input.line += 1;
            self.state.lines_read.fetch_add(1, Ordering::Relaxed);
            let content = record::content(&buffer, first);
            let (line, event_time) = match record::parse(&format, input.line, content) {
                Parsed::Blank => {
                    self.state.blank_lines.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Parsed::Line(line, event_time) => (line, event_time),
            };
            if !self.push(line) {
                // The stage stopped (the writer reports why) or a signal: this line was read
                // but not handed over.
                self.state.lines_read.fetch_sub(1, Ordering::Relaxed);
                break;
            }
            self.state.accepted.fetch_add(1, Ordering::Relaxed);
            if let Some(w) = event_time.and_then(|t| watermarks.after(t)) {
                if self.with_producer(|p| p.push_watermark(w).is_ok()) != Some(true) {
                    break;
                }
            }
        }
        if let Some(w) = watermarks.last() {
            self.with_producer(|p| p.push_watermark(w));
        }
        self.producer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}
