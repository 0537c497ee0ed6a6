//! `sluice enrich` on the shards: the input read, parsed and keyed, and the outputs merged,
//! serialized and written on shard 0's thread; the lookups on every shard. The calling thread
//! only reports progress and waits.
//!
//! ```text
//!  one shard (one thread)
//!  ┌────────────────────────────────────────────────────────────────────────────┐
//!  │ Source: Lines (read, parse, key) ─▶ AsyncWait(RedisEnrich) ─▶ Sink: Writer  │
//!  │   waits (Pending) while the budget is full ◀── woken after each write ──┘   │
//!  └────────────────────────────────────────────────────────────────────────────┘
//!
//!  N shards (StageBuilder::routed)
//!  shard 0: Lines ─▶ route by key ─┬─▶ AsyncWait (shard 0) ─┐
//!                                  └─▶ shard i: AsyncWait ──┴─▶ merge ─▶ Writer (shard 0)
//! ```
//!
//! Owns: the run when it reads a file (a pipe on standard input would block the shard while
//! it waits for a line: those runs use the reader thread; so do NATS streams, whose client
//! runs on tokio). With one shard the operator reads the source itself
//! (`StageBuilder::run_on_shards`); with several the source and the sink run on shard 0 and the
//! stage routes and merges (`StageBuilder::routed`), checkpoints across shards included.
//! Invariants: the same as the threaded run's (`mod.rs`), kept by the same parts: `Lines` reads
//! and says when a checkpoint is due (`CheckpointClock`), `Budget` bounds the bytes (the source
//! waits without blocking: it returns `Pending` and the sink wakes it after the lines it
//! handled released their bytes; both are on shard 0), `Writer` applies every line's policy
//! in the order the stage releases them and makes the files durable for a checkpoint, whose
//! commit the stage does (`ShardSink::checkpoint`, `committed`); a signal ends the source, so
//! what is in flight drains and is written; a second one stops at once, after flushing what
//! the writer holds.

use super::budget::Budget;
use super::files::PendingSync;
use super::reader::{CheckpointClock, Lines, ReaderState};
use super::writer::{Writer, PROGRESS_EVERY};
use super::{
    outcome, report_progress, startup, summarize, EnrichConfig, EnrichError, Enriched, Line, Run,
    RunEnd, Stop, Summary,
};
use crate::checkpoint::CheckpointError;
use crate::checkpoint::RestoreInfo;
use crate::error::StageError;
use crate::{Output, ShardSink, SinkCheckpoint, SinkError, SourceItem, StageHandle};
use futures::task::AtomicWaker;
use futures::Stream;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// How often the calling thread looks at the shard and the signals while the run goes on.
const WATCH_EVERY: Duration = Duration::from_millis(20);

/// Whether `config`'s run goes on the shards: it reads a file.
pub(crate) fn applies(config: &EnrichConfig) -> bool {
    config.input.is_some()
}

/// The input as the shard's source: a line whenever the operator has room and the budget
/// allows, the watermark it raised after it, and the last watermark at the end.
struct LineSource {
    lines: Lines,
    budget: Arc<Budget>,
    stop: Arc<Stop>,
    state: Arc<ReaderState>,
    /// Woken by the sink after it handled lines (and released their bytes).
    room: Arc<AtomicWaker>,
    /// The watermark that goes after the line just yielded.
    watermark: Option<u64>,
    /// With `--checkpoint-dir`.
    checkpoints: Option<CheckpointClock>,
    ended: bool,
}

impl LineSource {
    fn end(&mut self) -> Poll<Option<SourceItem<Arc<Line>>>> {
        self.ended = true;
        Poll::Ready(self.lines.last_watermark().map(SourceItem::Watermark))
    }
}

impl Stream for LineSource {
    type Item = SourceItem<Arc<Line>>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(w) = this.watermark.take() {
            return Poll::Ready(Some(SourceItem::Watermark(w)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        if this.stop.requested() {
            return this.end();
        }
        if let Some(at) = this.checkpoints.as_mut().and_then(|c| c.due(&this.lines)) {
            return Poll::Ready(Some(SourceItem::Checkpoint(at)));
        }
        if this.budget.full() {
            // Registered before the second look, so a release in between is not missed.
            this.room.register(cx.waker());
            if this.budget.full() {
                return Poll::Pending;
            }
        }
        match this.lines.next_line() {
            None => this.end(),
            Some((mut line, watermark)) => {
                this.budget.hold(&mut line);
                this.state.accepted.fetch_add(1, Ordering::Relaxed);
                this.watermark = watermark;
                Poll::Ready(Some(SourceItem::Record(Arc::new(line))))
            }
        }
    }
}

/// The writer as the shard's sink. The writer sits behind a lock that the calling thread takes
/// for progress, and to flush after a second signal while the shard may be waiting on a
/// stalled server; the shard takes it once per batch.
struct WriterSink {
    writer: Arc<Mutex<Writer>>,
    room: Arc<AtomicWaker>,
}

impl ShardSink<Enriched> for WriterSink {
    async fn write(&mut self, outputs: &mut Vec<Output<Enriched>>) -> Result<(), SinkError> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let handled = outputs.drain(..).try_for_each(|output| match output {
            Output::Record { value, .. } => writer.record(value),
            Output::Watermark(ts) => {
                writer.watermark(ts);
                Ok(())
            }
            // The stage commits its checkpoints through `checkpoint` and `committed`.
            Output::Checkpoint(_) => Ok(()),
        });
        self.room.wake();
        handled.and_then(|()| writer.flush_if_due())?;
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), SinkError> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        writer.flush()?;
        Ok(())
    }

    /// The files flushed here; their fsyncs run on a blocking thread before the commit, while
    /// the shard goes on.
    async fn checkpoint(&mut self, _id: u64) -> Result<SinkCheckpoint, SinkError> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (position, syncs) = writer.flush_for_checkpoint()?;
        Ok(SinkCheckpoint {
            position,
            make_durable: Some(Box::new(move || {
                Ok(syncs.into_iter().try_for_each(PendingSync::sync)?)
            })),
        })
    }

    async fn committed(
        &mut self,
        id: u64,
        result: Result<(), CheckpointError>,
    ) -> Result<(), SinkError> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        Ok(writer.committed(id, result)?)
    }
}

/// Makes the source or the sink on the shard.
type Make<T> = Box<dyn FnOnce() -> T + Send>;

/// What `made` makes, on the one shard that calls it.
fn make_once<T>(made: &Mutex<Option<Make<T>>>) -> T {
    let make = made
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .expect("one shard: made once");
    make()
}

/// The stage in its shape, started and restored, waiting for its source and sink: with one
/// shard the operator reads the source itself (no channel between them); with several the
/// source and the sink run on shard 0 and records are routed to the shards and merged back.
enum Shape<F: crate::AsyncFunction, Fac> {
    One(crate::OnShards<F, Fac>),
    Routed(crate::Routed<F::In, F::Out>),
}

impl<F, Fac> Shape<F, Fac>
where
    F: crate::AsyncFunction<In = Arc<Line>, Out = Enriched>,
    Fac: Fn(crate::ShardContext) -> F + Send + Sync + 'static,
{
    fn restored(&self) -> Option<&RestoreInfo> {
        match self {
            Shape::One(stage) => stage.restored(),
            Shape::Routed(stage) => stage.restored(),
        }
    }

    fn run(
        self,
        source: Make<LineSource>,
        sink: Make<WriterSink>,
    ) -> Result<StageHandle, crate::BuildError> {
        match self {
            Shape::One(stage) => {
                // One shard: each factory is called once.
                let (source, sink) = (Mutex::new(Some(source)), Mutex::new(Some(sink)));
                stage.run(move |_| make_once(&source), move |_| make_once(&sink))
            }
            Shape::Routed(stage) => Ok(stage.run(source, sink)),
        }
    }
}

/// Runs `run` on the shards (the input and output on shard 0); this thread reports progress
/// until the stage ends or a second signal.
pub(crate) fn run(
    run: &Run<'_>,
    progress: &mut dyn FnMut(&Summary, u64),
) -> Result<Summary, EnrichError> {
    let config = run.config;
    let shards = config.shards.unwrap_or_else(crate::default_shards);
    let (builder, sinks) = startup::stage_builder(config, run.cluster, &run.budget);
    let stage_error = |e: crate::BuildError| EnrichError::Stage(e.to_string());
    let builder = builder.shards(shards);
    let stage = if shards == 1 {
        Shape::One(builder.on_shards().map_err(stage_error)?)
    } else {
        Shape::Routed(builder.routed().map_err(stage_error)?)
    };
    let restored = stage.restored().cloned();
    startup::check_restored(config, restored.as_ref())?;
    let files = startup::open_files(config, restored.as_ref())?;
    let state = Arc::new(ReaderState::default());
    let room = Arc::new(AtomicWaker::new());
    let writer = Arc::new(Mutex::new(Writer::new(
        outcome::Policies::of(config),
        files.output,
        files.dead_letters,
        run.budget.clone(),
        config.emit_watermarks,
    )));
    let lines = Lines::new(
        files.input,
        config.key.clone(),
        config.event_time.clone(),
        config.max_out_of_orderness,
        state.clone(),
    );
    let source: Make<LineSource> = {
        let (budget, stop, state, room) = (
            run.budget.clone(),
            run.stop.clone(),
            state.clone(),
            room.clone(),
        );
        let interval = config
            .checkpoint_dir
            .as_ref()
            .map(|_| config.checkpoint_interval);
        Box::new(move || LineSource {
            checkpoints: interval.map(CheckpointClock::new),
            lines,
            budget,
            stop,
            state,
            room,
            watermark: None,
            ended: false,
        })
    };
    let sink: Make<WriterSink> = {
        let writer = writer.clone();
        Box::new(move || WriterSink { writer, room })
    };
    let mut handle = stage.run(source, sink).map_err(stage_error)?;
    if let Some(e) = &run.exporter {
        e.attach_stage(handle.observer(), sinks.clone());
    }
    let mut last_progress = Instant::now();
    let mut at_once = false;
    while !handle.finished() {
        if run.stop.at_once() {
            at_once = true;
            break;
        }
        std::thread::sleep(WATCH_EVERY);
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            let (mut summary, handled) = {
                let w = writer.lock().unwrap_or_else(|p| p.into_inner());
                (w.summary.clone(), w.handled)
            };
            report_progress(run, &mut summary, handled, &state, &handle, progress);
        }
    }
    let mut failure = None;
    let metrics = if at_once {
        // The shard may wait on a stalled server: leave it (the process is about to exit).
        None
    } else {
        failure = handle.wait().err().map(enrich_error);
        Some(handle.metrics())
    };
    // What the writer holds reaches the files whichever way the run ended.
    let mut writer = writer.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = writer.flush() {
        failure.get_or_insert(e);
    }
    let ended = RunEnd {
        state,
        metrics,
        sinks,
        at_once,
        failure,
        restored,
    };
    let mut summary = summarize(run, ended, &mut writer);
    summary.on_the_shards = true;
    summary.on_one_thread = shards == 1;
    Ok(summary)
}

/// The run's failure from the shard's: a line's policy or a file (the sink's), as the writer
/// said it; anything else as the stage said it.
fn enrich_error(error: StageError) -> EnrichError {
    match error {
        StageError::Sink { source, .. } => match source.downcast::<EnrichError>() {
            Ok(e) => *e,
            Err(other) => EnrichError::Stage(other.to_string()),
        },
        other => EnrichError::Stage(other.to_string()),
    }
}
