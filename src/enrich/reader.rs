//! The reader thread: input bytes to lines, lines into the stage, with event-time watermarks
//! and checkpoint barriers between them.
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

use super::budget::{weight, Budget};
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

impl ReaderContext {
    fn fail(&self, error: EnrichError) {
        self.state
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(error);
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

    /// Starts a checkpoint at the current position if the interval has passed since the last
    /// one; `false` once the stage is gone.
    fn checkpoint_if_due(&self, input: &ReaderInput, last: &mut Instant) -> bool {
        let Some(interval) = self.checkpoint_interval else {
            return true;
        };
        if input.line % CHECKPOINT_CHECK_EVERY != 0 || last.elapsed() < interval {
            return true;
        }
        let at = SourcePosition {
            offset: input.offset,
            records: input.line,
            digest: resume::source_digest(&input.hasher),
        };
        *last = Instant::now();
        self.checkpoint(at)
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
        let mut watermarks = Watermarks::new(self.max_out_of_orderness.as_millis() as u64);
        let mut last_checkpoint = Instant::now();
        let mut buffer = Vec::with_capacity(1024);
        while !self.stop.requested() {
            if !self.checkpoint_if_due(&input, &mut last_checkpoint) {
                break;
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
                    self.fail(EnrichError::line(
                        input.line + 1,
                        format!("cannot be read: {e}"),
                    ));
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
