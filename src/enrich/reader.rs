//! The input's lines (`Lines`: read, counted, parsed, with event-time watermarks), and the
//! reader thread that pushes them into the stage with checkpoint barriers between them.
//!
//! Owns: the input's position and the watermark generator. Invariants:
//! - every line read is pushed (a record or a bad record, which the writer handles in order) or
//!   counted as blank; nothing else is decided here, so the writer is the one place where a
//!   line's outcome is applied;
//! - a checkpoint starts only between lines, at the byte just after the last line pushed, with
//!   the CRC-32 of every byte before it;
//! - the bytes held by the run (`budget.rs`) stay under its limit before a line is pushed: the
//!   reader waits while they are above it;
//! - a watermark (`watermarks.rs`) goes in after the record that raised it, and the final one
//!   after the last record.

use super::budget::Budget;
use super::record::{self, Line, LineFormat, Parsed};
use super::resume;
use super::watermarks::Watermarks;
use super::{EnrichError, Stop};
use crate::checkpoint::{CheckpointRefused, SourcePosition};
use crate::Producer;
use std::io::BufRead;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A checkpoint is considered every this many lines (the clock is not read per line).
const CHECKPOINT_CHECK_EVERY: u64 = 64;

/// Counts shared between the reader and the writer.
#[derive(Default)]
pub(crate) struct ReaderState {
    pub lines_read: AtomicU64,
    pub blank_lines: AtomicU64,
    pub accepted: AtomicU64,
    pub failure: Mutex<Option<EnrichError>>,
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

/// The input's non-blank lines, parsed, each with the watermark that goes in after it; the
/// one reading of the input that the reader thread and the source on the shard share.
pub(crate) struct Lines {
    pub(crate) input: ReaderInput,
    key: super::KeyTemplate,
    event_time: Option<String>,
    watermarks: Watermarks,
    buffer: Vec<u8>,
    state: Arc<ReaderState>,
}

impl Lines {
    pub(crate) fn new(
        input: ReaderInput,
        key: super::KeyTemplate,
        event_time: Option<String>,
        max_out_of_orderness: Duration,
        state: Arc<ReaderState>,
    ) -> Lines {
        Lines {
            input,
            key,
            event_time,
            watermarks: Watermarks::new(max_out_of_orderness.as_millis() as u64),
            buffer: Vec::with_capacity(1024),
            state,
        }
    }

    /// The next line that is not blank, and the watermark to push after it; `None` at the end
    /// of the input or at a read error (recorded in the shared state, naming the line). Blank
    /// lines are counted and skipped.
    pub(crate) fn next_line(&mut self) -> Option<(Line, Option<u64>)> {
        loop {
            self.buffer.clear();
            let first = self.input.offset == 0;
            match self.input.input.read_until(b'\n', &mut self.buffer) {
                Ok(0) => return None,
                Ok(n) => {
                    self.input.offset += n as u64;
                    self.input.hasher.update(&self.buffer);
                }
                Err(e) => {
                    let line = self.input.line + 1;
                    fail(
                        &self.state,
                        EnrichError::line(line, format!("cannot be read: {e}")),
                    );
                    return None;
                }
            }
            self.input.line += 1;
            self.state.lines_read.fetch_add(1, Ordering::Relaxed);
            let format = LineFormat {
                key: &self.key,
                event_time: self.event_time.as_deref(),
            };
            let content = record::content(&self.buffer, first);
            match record::parse(&format, self.input.line, content) {
                Parsed::Blank => {
                    self.state.blank_lines.fetch_add(1, Ordering::Relaxed);
                }
                Parsed::Line(line, event_time) => {
                    let watermark = event_time.and_then(|t| self.watermarks.after(t));
                    return Some((line, watermark));
                }
            }
        }
    }

    /// A line returned by `next_line` was not handed to the stage (it stopped): not read.
    pub(crate) fn unread(&self) {
        self.state.lines_read.fetch_sub(1, Ordering::Relaxed);
    }

    /// The watermark after the last line.
    pub(crate) fn last_watermark(&self) -> Option<u64> {
        self.watermarks.last()
    }

    /// Where the input resumes: just after the last line read, with the CRC-32 of every byte
    /// before it.
    pub(crate) fn position(&self) -> SourcePosition {
        SourcePosition {
            offset: self.input.offset,
            records: self.input.line,
            digest: resume::source_digest(&self.input.hasher),
        }
    }
}

/// When a checkpoint is due: every `interval`, looked at between lines once per
/// `CHECKPOINT_CHECK_EVERY` lines (the clock is not read per line).
pub(crate) struct CheckpointClock {
    interval: Duration,
    last: Instant,
}

impl CheckpointClock {
    pub(crate) fn new(interval: Duration) -> CheckpointClock {
        CheckpointClock {
            interval,
            last: Instant::now(),
        }
    }

    /// The position to checkpoint at, if one is due after the lines read so far.
    pub(crate) fn due(&mut self, lines: &Lines) -> Option<SourcePosition> {
        if lines.input.line % CHECKPOINT_CHECK_EVERY != 0 || self.last.elapsed() < self.interval {
            return None;
        }
        self.last = Instant::now();
        Some(lines.position())
    }
}

/// Records the run's first failure.
fn fail(state: &ReaderState, error: EnrichError) {
    state
        .failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert(error);
}

impl ReaderContext {
    /// Runs `f` on the producer; `None` once it is gone (a signal, or the stage stopped).
    fn with_producer<T>(&self, f: impl FnOnce(&mut Producer<Arc<Line>>) -> T) -> Option<T> {
        let mut guard = self.producer.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_mut().map(f)
    }

    fn push(&self, mut line: Line) -> bool {
        self.budget.wait_for_room(&self.stop);
        let held = self.budget.hold(&mut line);
        let pushed = self
            .with_producer(|p| p.push(Arc::new(line)).is_ok())
            .unwrap_or(false);
        if !pushed {
            self.budget.release(held.bytes);
        }
        pushed
    }

    /// Starts a checkpoint at `at`; `false` once the stage is gone.
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
    pub(crate) fn run(self, input: ReaderInput) {
        let mut lines = Lines::new(
            input,
            self.key.clone(),
            self.event_time.clone(),
            self.max_out_of_orderness,
            self.state.clone(),
        );
        let mut clock = self.checkpoint_interval.map(CheckpointClock::new);
        while !self.stop.requested() {
            if let Some(at) = clock.as_mut().and_then(|c| c.due(&lines)) {
                if !self.checkpoint(at) {
                    break;
                }
            }
            let Some((line, watermark)) = lines.next_line() else {
                break;
            };
            if !self.push(line) {
                // The stage stopped (the writer reports why) or a signal: this line was read
                // but not handed over.
                lines.unread();
                break;
            }
            self.state.accepted.fetch_add(1, Ordering::Relaxed);
            if let Some(w) = watermark {
                if self.with_producer(|p| p.push_watermark(w).is_ok()) != Some(true) {
                    break;
                }
            }
        }
        if let Some(w) = lines.last_watermark() {
            self.with_producer(|p| p.push_watermark(w));
        }
        self.producer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}
