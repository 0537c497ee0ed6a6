//! The writer (the calling thread): the stage's outputs to lines in the output and the
//! dead-letter files, checkpoints committed, files flushed when the input goes idle.
//!
//! Owns: the run's files while it runs, and the summary's per-line counts. Invariants:
//! - outputs are handled in the order the stage releases them (input order in ordered mode),
//!   so at a `fail` outcome every line before it has been handled, and it is flushed before
//!   the run stops;
//! - a checkpoint is committed only after the dead-letter files and then the output are
//!   flushed and fsynced, with all their lengths in the manifest;
//! - buffered lines reach their file within `IDLE_FLUSH` of the stage going quiet, and at most
//!   `MAX_FLUSH_DELAY` after they were written while it is busy;
//! - a second signal stops the loop at once; what was handed to the files is flushed.

use super::budget::Budget;
use super::files::{DeadLetters, LineFile, PendingSync};
use super::outcome::{Action, Policies};
use super::summary::Summary;
use super::{EnrichError, Enriched, Lookup, Stop};
use crate::checkpoint::{CheckpointError, SinkPosition};
use crate::{Consumer, Output, RecvTimedOut};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Buffered lines are flushed when no output arrived for this long (`tail -f | sluice enrich`
/// shows each record promptly).
pub(crate) const IDLE_FLUSH: Duration = Duration::from_millis(100);
/// Buffered lines are flushed at least this often while outputs keep arriving.
pub(crate) const MAX_FLUSH_DELAY: Duration = Duration::from_secs(1);
/// The progress callback runs at most this often.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// The clock is read for the flush and progress cadences once per this many outputs.
const CLOCK_EVERY: u32 = 64;

/// How the writer loop ended.
pub(crate) enum Ended {
    /// The stage finished: every output was handled.
    Finished,
    /// A line's policy, a file, or the stage failed.
    Failed(EnrichError),
    /// A second signal: outputs still in the stage are not written.
    AtOnce,
}

pub(crate) struct Writer {
    pub policies: Policies,
    pub output: LineFile,
    pub dead_letters: DeadLetters,
    pub summary: Summary,
    pub emit_watermarks: bool,
    pub budget: Arc<Budget>,
    /// Lines whose action was applied.
    pub handled: u64,
    /// With NATS ends: outputs go to the output stream instead of `output`, and each line's
    /// delivery is acknowledged after its output is stored or its drop decided.
    pub nats: Option<super::nats_io::OutputThread>,
    last_flush: Instant,
}

impl Writer {
    pub(crate) fn new(
        policies: Policies,
        output: LineFile,
        dead_letters: DeadLetters,
        budget: Arc<Budget>,
        emit_watermarks: bool,
    ) -> Writer {
        Writer {
            policies,
            output,
            dead_letters,
            summary: Summary::default(),
            emit_watermarks,
            budget,
            handled: 0,
            nats: None,
            last_flush: Instant::now(),
        }
    }

    /// Handles outputs until the stage finishes, a failure, or a second signal. `progress` is
    /// called with the summary so far and the lines handled.
    pub(crate) fn run(
        &mut self,
        consumer: &mut Consumer<Enriched>,
        stop: &Stop,
        progress: &mut dyn FnMut(&mut Summary, u64),
    ) -> Ended {
        let mut last_progress = Instant::now();
        let mut since_clock = 0u32;
        loop {
            if stop.at_once() {
                return Ended::AtOnce;
            }
            // Nothing ready is the moment to look at the flush cadence: a trickle of outputs
            // (never idle for `IDLE_FLUSH`) still reaches the file every `MAX_FLUSH_DELAY`.
            let ready = match consumer.recv_timeout(Duration::ZERO) {
                Ok(item) => Ok(item),
                Err(RecvTimedOut) => {
                    // Nothing more at hand: what was gathered for NATS goes now.
                    if let Some(nats) = &mut self.nats {
                        nats.hand_over();
                    }
                    if self.last_flush.elapsed() >= MAX_FLUSH_DELAY {
                        if let Err(e) = self.flush() {
                            return Ended::Failed(e);
                        }
                    }
                    consumer.recv_timeout(IDLE_FLUSH)
                }
            };
            let item = match ready {
                Err(RecvTimedOut) => {
                    if let Err(e) = self.flush() {
                        return Ended::Failed(e);
                    }
                    // Idle (a stream with nothing new): the counts so far are still reported.
                    if last_progress.elapsed() >= PROGRESS_EVERY {
                        progress(&mut self.summary, self.handled);
                        last_progress = Instant::now();
                    }
                    continue;
                }
                Ok(None) => return Ended::Finished,
                Ok(Some(Err(e))) => return Ended::Failed(EnrichError::Stage(e.to_string())),
                Ok(Some(Ok(item))) => item,
            };
            let result = match item {
                Output::Checkpoint(id) => self.checkpoint(consumer, id),
                Output::Watermark(ts) => {
                    self.watermark(ts);
                    Ok(())
                }
                Output::Record { value, .. } => self.record(value),
            };
            if let Err(e) = result {
                return Ended::Failed(e);
            }
            since_clock += 1;
            if since_clock < CLOCK_EVERY {
                continue;
            }
            since_clock = 0;
            if let Err(e) = self.flush_if_due() {
                return Ended::Failed(e);
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                progress(&mut self.summary, self.handled);
                last_progress = Instant::now();
            }
        }
    }

    /// Counts a watermark, and writes it when the run emits them.
    pub(crate) fn watermark(&mut self, ts: u64) {
        self.summary.watermarks += 1;
        if self.emit_watermarks {
            self.output
                .push_uncounted(format!("{{\"watermark\":{ts}}}").as_bytes());
        }
    }

    /// Writes out what the files buffer if the last flush is `MAX_FLUSH_DELAY` ago.
    pub(crate) fn flush_if_due(&mut self) -> Result<(), EnrichError> {
        if self.last_flush.elapsed() >= MAX_FLUSH_DELAY {
            self.flush()?;
        }
        Ok(())
    }

    /// Applies one line's policy; `Err` stops the run (after flushing what came before).
    pub(crate) fn record(&mut self, enriched: Enriched) -> Result<(), EnrichError> {
        let reserved = enriched.line.held();
        let held = reserved.bytes
            + match &enriched.lookup {
                Lookup::Found(v) => reserved.beyond(v.len() as u64),
                _ => 0,
            };
        let line = enriched.line.line();
        let action = self.policies.decide(enriched);
        self.budget.release(held);
        let s = &mut self.summary;
        if let Some(nats) = &mut self.nats {
            match action {
                Action::Write(fields, count) => {
                    let mut bytes = Vec::with_capacity(256);
                    fields.write_json(&mut bytes);
                    nats.publish(line, bytes);
                    s.add(count, 1);
                }
                Action::Drop(count) => {
                    nats.done(line);
                    s.add(count, 1);
                }
                Action::DeadLetter(target, entry, count) => {
                    nats.dead_letter(line, &target, entry);
                    s.add(count, 1);
                }
                Action::Fail(why) => return Err(why),
            }
            self.handled += 1;
            return Ok(());
        }
        match action {
            Action::Write(fields, count) => self.output.push_record(&fields, count, s)?,
            Action::DeadLetter(path, entry, count) => {
                self.dead_letters.push(&path, entry.as_bytes(), count, s)?
            }
            Action::Drop(count) => s.add(count, 1),
            Action::Fail(why) => {
                self.flush()?;
                return Err(why);
            }
        }
        self.handled += 1;
        Ok(())
    }

    /// Writes out what the files buffer.
    pub(crate) fn flush(&mut self) -> Result<(), EnrichError> {
        self.last_flush = Instant::now();
        if let Some(nats) = &mut self.nats {
            nats.hand_over();
        }
        let dead = self.dead_letters.flush(&mut self.summary);
        self.output.flush(&mut self.summary).and(dead)
    }

    /// Makes the dead letters and the output durable and commits checkpoint `id`. A
    /// checkpoint that cannot be committed (a full checkpoint disk) is counted and said; a
    /// failed fsync or a file that cannot be written stops the run.
    fn checkpoint(
        &mut self,
        consumer: &mut Consumer<Enriched>,
        id: u64,
    ) -> Result<(), EnrichError> {
        let sink = self.durable_position()?;
        let result = consumer.commit_checkpoint(id, sink);
        self.committed(id, result)
    }

    /// Makes the dead letters, then the output, durable; where each of them ends.
    pub(crate) fn durable_position(&mut self) -> Result<SinkPosition, EnrichError> {
        let (position, syncs) = self.flush_for_checkpoint()?;
        syncs.into_iter().try_for_each(PendingSync::sync)?;
        Ok(position)
    }

    /// Flushes the dead letters and the output; where each of them ends, and their fsyncs
    /// (dead letters first), which make that durable.
    pub(crate) fn flush_for_checkpoint(
        &mut self,
    ) -> Result<(SinkPosition, Vec<PendingSync>), EnrichError> {
        self.last_flush = Instant::now();
        let (side_outputs, mut syncs) =
            self.dead_letters.flush_for_checkpoint(&mut self.summary)?;
        let (position, sync) = self.output.flush_for_checkpoint(&mut self.summary)?;
        syncs.push(sync);
        let position = SinkPosition {
            position,
            side_outputs,
        };
        Ok((position, syncs))
    }

    /// Counts checkpoint `id`'s commit, or says why it failed and goes on; `Err` only for a
    /// failed fsync, after which the run must stop.
    pub(crate) fn committed(
        &mut self,
        id: u64,
        result: Result<(), CheckpointError>,
    ) -> Result<(), EnrichError> {
        match result {
            Ok(()) => self.summary.checkpoints += 1,
            Err(e @ CheckpointError::Fsync { .. }) => {
                return Err(EnrichError::Stage(e.to_string()))
            }
            Err(other) => {
                self.summary.checkpoint_failures += 1;
                eprintln!(
                    "sluice enrich: checkpoint {id} not committed ({} so far): {other}",
                    self.summary.checkpoint_failures
                );
            }
        }
        Ok(())
    }
}
