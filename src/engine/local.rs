//! Stages whose sources and sinks run on the shards: a record is read, looked up and written
//! on one thread, and never crosses to another (`StageBuilder::run_on_shards`).
//!
//! ```text
//!  shard i (glommio LocalExecutor, one per core)
//!  ┌──────────────────────────────────────────────────────────────────────────┐
//!  │ source(i) ─▶ seq := n++, key ─▶ AsyncWait(func_i) ─ io_uring ─▶ sink(i)   │
//!  └──────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Owns: the per-shard pipeline, its end, and (one shard) its checkpoints. Invariants:
//! - each shard numbers its source's elements from 0 (after a restore: from the checkpoint's
//!   barrier on, its re-issued elements first) in the order the source yields them, and a
//!   record stays on that shard;
//! - the source is polled only when the operator has a free slot (a full queue is backpressure
//!   on the source, with nothing buffered between them);
//! - the sink gets outputs in the operator's emission order (`Ordered`: the source's order) and
//!   watermarks only when they advance; everything emitted before a failure reaches the sink
//!   before the shard stops; `finish` is called once, after the last output and the last
//!   checkpoint's commit, and only when the source ended without a failure; the user's
//!   function is closed on every path;
//! - a checkpoint (`SourceItem::Checkpoint`) stops the source where it was yielded, snapshots
//!   the operator there (the elements before it still in it) and takes the sink's position
//!   after everything it got before it; the commit (the sink's fsyncs, the snapshot file, the
//!   merge's snapshot holding nothing, the manifest: the files a producer-fed stage writes, so
//!   the same restore applies) runs on a blocking thread while the shard goes on, and one
//!   checkpoint is in progress at a time.

use super::merge::mode_code;
use super::messages::Barrier;
use super::routing::KeyFn;
use super::shard::{
    gather, panic_message, poll_or_barrier, write_snapshot, Gate, ShardCheckpoint, ShardContext,
    SnapshotWrites, Step,
};
use super::{placement, plan, spawn_executor, Output, Plan, Spec, StageBuilder, StageHandle};
use crate::checkpoint::coordinator::Coordinator;
use crate::checkpoint::{
    CheckpointError, MergeSnapshot, RestoreInfo, SinkPosition, SourcePosition,
};
use crate::clock::GlommioClock;
use crate::error::{BuildError, StageError};
use crate::function::AsyncFunction;
use crate::metrics::{MetricsCell, MetricsSnapshot};
use crate::operator::{AsyncWait, Element, Emitted, OperatorConfig, OutputMode};
use futures::{FutureExt, Stream, StreamExt};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// What a source on a shard yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceItem<I> {
    /// A record for the shard's operator.
    Record(I),
    /// An event-time watermark: no later record of this source belongs before it.
    Watermark(u64),
    /// Take a checkpoint here (a stage with `checkpointing`; ignored otherwise, and while the
    /// previous one is being committed): the source resumes at `position`, just after every
    /// element it yielded before this one.
    Checkpoint(SourcePosition),
}

impl<I> From<I> for SourceItem<I> {
    fn from(input: I) -> Self {
        SourceItem::Record(input)
    }
}

/// Why a sink could not take its outputs; it stops the shard (`StageError::Sink`).
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// A sink's part of a checkpoint: where its output ends, and what makes that durable.
pub struct SinkCheckpoint {
    pub position: SinkPosition,
    /// Run on a blocking thread before the checkpoint is committed (while the shard goes on):
    /// typically the output files' fsync. `None`: the position is durable already. An error
    /// stops the shard (`StageError::Sink`): a failed fsync cannot be retried safely.
    pub make_durable: Option<Box<dyn FnOnce() -> Result<(), SinkError> + Send>>,
}

impl From<SinkPosition> for SinkCheckpoint {
    fn from(position: SinkPosition) -> Self {
        SinkCheckpoint {
            position,
            make_durable: None,
        }
    }
}

/// Where a shard's outputs go when the sink runs on the shard (a file written through the
/// shard's ring, a socket, a counter). Created on the shard by the factory given to
/// [`StageBuilder::run_on_shards`], so it may hold `!Send` state.
// The shard is one thread: the futures need not be `Send`, which is what the lint warns about.
#[allow(async_fn_in_trait)]
pub trait ShardSink<O>: 'static {
    /// Takes a batch of outputs, in the shard's emission order: what the operator had ready at
    /// once (one write per burst, not per record). The sink takes what it keeps out of
    /// `outputs` (`drain(..)`); the shard clears it afterwards. An error stops the shard.
    async fn write(&mut self, outputs: &mut Vec<Output<O>>) -> Result<(), SinkError>;

    /// After the last output of a source that ended: make the output complete (flush, close).
    async fn finish(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Checkpoint `id`: say where the output (and its side outputs) ends after everything
    /// written so far, and what makes that durable (an fsync, run on a blocking thread while
    /// the shard goes on, before the commit); a restore cuts them back there. Needed with
    /// `checkpointing`; a sink that cannot fails the shard.
    async fn checkpoint(&mut self, id: u64) -> Result<SinkCheckpoint, SinkError> {
        Err(format!("checkpoint {id}: this sink cannot make its output durable").into())
    }

    /// Whether checkpoint `id` was committed. By default a checkpoint that could not be
    /// committed stops the shard; a sink may count it and go on instead (the next one may
    /// succeed), except for `CheckpointError::Fsync`, after which the process must stop.
    async fn committed(
        &mut self,
        id: u64,
        result: Result<(), CheckpointError>,
    ) -> Result<(), SinkError> {
        let _ = id;
        result.map_err(Into::into)
    }
}

/// A source's elements numbered and keyed for the operator, after the elements a restore
/// re-issues; stopped at a checkpoint until the shard took its snapshot (the gate).
struct LocalInput<S, I> {
    restore: std::vec::IntoIter<Element<I>>,
    source: S,
    key_fn: Option<KeyFn<I>>,
    next_seq: u64,
    checkpoints: Option<Arc<Coordinator>>,
    gate: Gate,
}

impl<S, I> Stream for LocalInput<S, I>
where
    S: Stream<Item = SourceItem<I>> + Unpin,
{
    type Item = Element<I>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Element<I>>> {
        let this = &mut *self;
        if this.gate.get().is_some() {
            return Poll::Pending;
        }
        if let Some(element) = this.restore.next() {
            return Poll::Ready(Some(element));
        }
        loop {
            let item = match this.source.poll_next_unpin(cx) {
                Poll::Ready(Some(item)) => item,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            let seq = this.next_seq;
            let element = match item {
                SourceItem::Record(input) => Element::Record {
                    seq,
                    key: this.key_fn.as_ref().map_or(seq, |key| key(&input)),
                    input,
                    pushed_at: None,
                },
                SourceItem::Watermark(timestamp) => Element::Watermark { seq, timestamp },
                SourceItem::Checkpoint(position) => {
                    match this.checkpoints.as_ref().map(|c| c.begin(position)) {
                        // The barrier takes a sequence number, as the producer's does; the
                        // shard loop sees the closed gate when the operator goes pending.
                        Some(Ok(id)) => {
                            this.next_seq += 1;
                            this.gate.set(Some(Barrier { seq, id }));
                            return Poll::Pending;
                        }
                        // No checkpointing, or the previous one is still being committed.
                        _ => continue,
                    }
                }
            };
            this.next_seq += 1;
            return Poll::Ready(Some(element));
        }
    }
}

impl<S, I> Unpin for LocalInput<S, I> {}

/// What a checkpointing shard needs beside its operator.
struct LocalCheckpoint<I> {
    coordinator: Arc<Coordinator>,
    shard: ShardCheckpoint<I>,
    mode: OutputMode,
}

/// One shard's pipeline, moved onto its thread.
struct LocalShard<Fac, SF, KF, I, O, E> {
    context: ShardContext,
    factory: Arc<Fac>,
    sources: Arc<SF>,
    sinks: Arc<KF>,
    key_fn: Option<KeyFn<I>>,
    config: OperatorConfig<O, E>,
    metrics: MetricsCell,
    /// Counted up when this shard's pipeline ended, on any path.
    ended: Arc<AtomicUsize>,
    /// Elements re-issued from a checkpoint, and the first sequence number of new input.
    restore: Vec<Element<I>>,
    first_seq: u64,
    checkpoint: Option<LocalCheckpoint<I>>,
}

impl<F, Fac> StageBuilder<F, Fac>
where
    F: AsyncFunction,
    // Elements a restore re-issues are decoded here and moved to the shard.
    F::In: Send,
    Fac: Fn(ShardContext) -> F + Send + Sync + 'static,
{
    /// Starts the shards with a source and a sink on each, made there by `sources` and `sinks`
    /// (so they may hold `!Send` state and use the shard's io_uring): no producer, consumer or
    /// channel, so a record is read, looked up and written without leaving its thread. Shard
    /// `i` reads its own source (a partition, a file, a generator); with `Ordered` its sink
    /// gets the outputs in that source's order, and with `KeyOrdered` a key's records must
    /// all come from one shard's source. [`StageBuilder::on_shards`] then
    /// [`OnShards::run`], for a program that needs to see what a checkpoint restored first.
    ///
    /// `join` on the handle waits for every shard's source to end and its sink to finish, and
    /// reports the first failure (the function's, under its policy; a sink's; a panic).
    /// `routing` is refused (`BuildError::InvalidConfig`): it concerns records that cross
    /// threads; `checkpointing` needs one shard.
    ///
    /// ```
    /// use sluice::{from_fn, Output, Outputs, ShardSink, SinkError, SourceItem, Stage};
    ///
    /// /// Sums what its shard's operator emits.
    /// struct Sum(u64);
    /// impl ShardSink<u64> for Sum {
    ///     async fn write(&mut self, outputs: &mut Vec<Output<u64>>) -> Result<(), SinkError> {
    ///         for output in outputs.drain(..) {
    ///             if let Output::Record { value, .. } = output {
    ///                 self.0 += value;
    ///             }
    ///         }
    ///         Ok(())
    ///     }
    ///     async fn finish(&mut self) -> Result<(), SinkError> {
    ///         assert_eq!(self.0, (0..1000u64).map(|n| n * 2).sum::<u64>());
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let mut handle = Stage::builder(|_shard| {
    ///     from_fn(|&n: &u64| async move { Ok::<_, std::io::Error>(Outputs::One(n * 2)) })
    /// })
    /// .shards(2)
    /// .capacity(16)
    /// .run_on_shards(
    ///     |_shard| futures::stream::iter((0..1000u64).map(SourceItem::Record)),
    ///     |_shard| Sum(0),
    /// )
    /// .unwrap();
    /// handle.wait().unwrap();
    /// assert_eq!(handle.metrics().records_out, 2000);
    /// ```
    pub fn run_on_shards<S, SF, K, KF>(
        self,
        sources: SF,
        sinks: KF,
    ) -> Result<StageHandle, BuildError>
    where
        S: Stream<Item = SourceItem<F::In>> + Unpin + 'static,
        SF: Fn(ShardContext) -> S + Send + Sync + 'static,
        K: ShardSink<F::Out>,
        KF: Fn(ShardContext) -> K + Send + Sync + 'static,
    {
        self.on_shards()?.run(sources, sinks)
    }

    /// Checks the settings for sources and sinks on the shards and, with `checkpointing`,
    /// opens the checkpoint directory and loads what a restore re-issues, before anything
    /// runs: [`OnShards::restored`] says where the source resumes and where the sink's output
    /// is cut back to.
    pub fn on_shards(mut self) -> Result<OnShards<F, Fac>, BuildError> {
        let refuse = |field, reason: &str| BuildError::InvalidConfig {
            field,
            reason: reason.into(),
        };
        if self.routing.is_some() {
            return Err(refuse(
                "routing",
                "with sources on the shards a record stays on the shard whose source read it",
            ));
        }
        let shards = self.shard_count()?;
        if self.checkpointing.is_some() && shards != 1 {
            return Err(refuse(
                "checkpointing",
                "a stage whose sources run on the shards checkpoints with one shard; use \
                 start() with a producer for checkpoints across several",
            ));
        }
        let mut checked: Plan<F::In, F::Out> = Plan::new(Spec {
            shards,
            capacity: self.capacity,
            timeout: self.timeout,
            mode: self.mode,
            key_fn: self.key_fn.clone(),
            routing: None,
            channel_capacity: None,
            checkpointing: self.checkpointing.take(),
        })?;
        let shard_plan = checked.shard(0);
        let (coordinator, first_seq, restored) = checked.local_checkpoints()?;
        let checkpoint = match (coordinator, shard_plan.checkpoint) {
            (Some(coordinator), Some(shard)) => Some(LocalCheckpoint {
                coordinator,
                shard,
                mode: self.mode,
            }),
            _ => None,
        };
        Ok(OnShards {
            builder: self,
            shards,
            capacity: checked.capacity,
            restore: shard_plan.restore,
            first_seq,
            checkpoint,
            restored,
        })
    }
}

/// A stage for sources and sinks on the shards, checked and (with checkpoints) restored, not
/// yet running. From [`StageBuilder::on_shards`].
pub struct OnShards<F: AsyncFunction, Fac> {
    builder: StageBuilder<F, Fac>,
    shards: usize,
    capacity: std::num::NonZeroUsize,
    /// Shard 0's re-issued elements (only a one-shard stage checkpoints).
    restore: Vec<Element<F::In>>,
    first_seq: u64,
    checkpoint: Option<LocalCheckpoint<F::In>>,
    restored: Option<RestoreInfo>,
}

impl<F, Fac> OnShards<F, Fac>
where
    F: AsyncFunction,
    F::In: Send,
    Fac: Fn(ShardContext) -> F + Send + Sync + 'static,
{
    /// What the stage restored from its checkpoint directory: resume the source at `source`
    /// and cut the sink back to `sink_position` (and its side outputs to theirs).
    pub fn restored(&self) -> Option<&RestoreInfo> {
        self.restored.as_ref()
    }

    /// Starts the shards; see [`StageBuilder::run_on_shards`].
    pub fn run<S, SF, K, KF>(self, sources: SF, sinks: KF) -> Result<StageHandle, BuildError>
    where
        S: Stream<Item = SourceItem<F::In>> + Unpin + 'static,
        SF: Fn(ShardContext) -> S + Send + Sync + 'static,
        K: ShardSink<F::Out>,
        KF: Fn(ShardContext) -> K + Send + Sync + 'static,
    {
        let OnShards {
            builder: b,
            shards,
            capacity,
            mut restore,
            first_seq,
            mut checkpoint,
            restored: _,
        } = self;
        let placements = plan(shards, &b.pinning, &placement::usable_cores());
        let (factory, sources, sinks) = (Arc::new(b.factory), Arc::new(sources), Arc::new(sinks));
        let mut cells = Vec::with_capacity(shards);
        let mut joins = Vec::with_capacity(shards);
        let ended = Arc::new(AtomicUsize::new(0));
        for placement in &placements {
            let cell: MetricsCell = Arc::new(Mutex::new(MetricsSnapshot::default()));
            let shard = LocalShard {
                context: ShardContext {
                    index: placement.shard,
                    shards,
                },
                factory: factory.clone(),
                sources: sources.clone(),
                sinks: sinks.clone(),
                key_fn: b.key_fn.clone(),
                config: OperatorConfig {
                    capacity,
                    timeout: b.timeout,
                    mode: b.mode,
                    retry: b.retry.clone(),
                    seed: b.seed.wrapping_add(placement.shard as u64),
                },
                metrics: cell.clone(),
                ended: ended.clone(),
                restore: std::mem::take(&mut restore),
                first_seq,
                checkpoint: checkpoint.take(),
            };
            // A shard that cannot start fails the build; those already started run their
            // sources to the end on their own.
            let rings = (b.io_memory, b.ring_depth);
            let join = spawn_executor(placement, rings, move || run_local_shard(shard))?;
            joins.push(join);
            cells.push(cell);
        }
        Ok(StageHandle {
            cells,
            ended,
            placements,
            joins,
        })
    }
}

/// The body of a shard's executor: the function, source and sink made here, the pipeline run,
/// and a panic turned into `StageError::ShardPanicked`.
async fn run_local_shard<Fac, F, SF, S, KF, K>(
    shard: LocalShard<Fac, SF, KF, F::In, F::Out, F::Error>,
) -> Result<(), StageError>
where
    F: AsyncFunction,
    Fac: Fn(ShardContext) -> F,
    S: Stream<Item = SourceItem<F::In>> + Unpin + 'static,
    SF: Fn(ShardContext) -> S,
    K: ShardSink<F::Out>,
    KF: Fn(ShardContext) -> K,
{
    let index = shard.context.index;
    let ended = shard.ended.clone();
    // Outside the body: awaited after a panic too (`SnapshotWrites`).
    let mut writes = SnapshotWrites::default();
    let body = AssertUnwindSafe(async {
        let func = (shard.factory)(shard.context);
        let gate: Gate = Rc::new(Cell::new(None));
        let input = LocalInput {
            restore: shard.restore.into_iter(),
            source: (shard.sources)(shard.context),
            key_fn: shard.key_fn,
            next_seq: shard.first_seq,
            checkpoints: shard.checkpoint.as_ref().map(|c| c.coordinator.clone()),
            gate: gate.clone(),
        };
        let sink = (shard.sinks)(shard.context);
        let op =
            AsyncWait::with_metrics(input, func, shard.config, GlommioClock, Some(shard.metrics));
        let checkpoint = shard.checkpoint.as_ref();
        drive_local(op, sink, index, &gate, checkpoint, &mut writes).await
    });
    let outcome = body.catch_unwind().await;
    writes.finish().await;
    let result = match outcome {
        Ok(result) => result,
        Err(panic) => Err(StageError::ShardPanicked {
            shard: index,
            message: panic_message(panic),
        }),
    };
    ended.fetch_add(1, Ordering::Release);
    result
}

/// What the loop waits for: the shard loop's steps, or the end of a checkpoint's commit (`Err`
/// when the sink could not make its output durable).
enum LocalStep<T> {
    Shard(Step<T>),
    Committed(u64, Result<Result<(), CheckpointError>, SinkError>),
}

/// A checkpoint being made durable and committed on a blocking thread.
type Commit = (
    u64,
    glommio::Task<Result<Result<(), CheckpointError>, SinkError>>,
);

/// The shard's loop: what the operator has ready at once goes to the sink in one `write`; a
/// checkpoint is taken where the source stopped, and committed while the loop goes on.
async fn drive_local<S, F, K>(
    mut op: AsyncWait<S, F, GlommioClock>,
    mut sink: K,
    shard: usize,
    gate: &Gate,
    checkpoint: Option<&LocalCheckpoint<F::In>>,
    writes: &mut SnapshotWrites,
) -> Result<(), StageError>
where
    S: Stream<Item = Element<F::In>> + Unpin,
    F: AsyncFunction,
    K: ShardSink<F::Out>,
{
    let sink_failed = |source| StageError::Sink { shard, source };
    let mut outputs = Vec::new();
    let mut watermark = None;
    let mut commit: Option<Commit> = None;
    loop {
        let step = futures::future::poll_fn(|cx| {
            if let Some((id, task)) = &mut commit {
                if let Poll::Ready(result) = task.poll_unpin(cx) {
                    return Poll::Ready(LocalStep::Committed(*id, result));
                }
            }
            poll_or_barrier(&mut op, gate, cx).map(LocalStep::Shard)
        })
        .await;
        let first = match step {
            LocalStep::Shard(Step::Item(Some(first))) => first,
            LocalStep::Shard(Step::Item(None)) => break,
            LocalStep::Shard(Step::Barrier(barrier)) => {
                let checkpoint = checkpoint.expect("a barrier needs checkpointing");
                let taken =
                    take_checkpoint(&mut op, &mut sink, checkpoint, barrier, watermark, writes)
                        .await;
                gate.set(None);
                match taken {
                    Ok(task) => commit = Some((barrier.id, task)),
                    Err(e) => {
                        op.close();
                        return Err(sink_failed(e));
                    }
                }
                continue;
            }
            LocalStep::Committed(id, result) => {
                commit = None;
                let heard = match result {
                    Ok(committed) => sink.committed(id, committed).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = heard {
                    op.close();
                    return Err(sink_failed(e));
                }
                continue;
            }
        };
        // No yields: nothing crosses a thread, so a batch is only what is ready now.
        let (batch, failure) = gather(&mut op, first, 0).await;
        for emitted in batch {
            match emitted {
                Emitted::Record { seq, outputs: out } => {
                    outputs.extend(out.into_iter().map(|value| Output::Record { seq, value }))
                }
                Emitted::Watermark { timestamp, .. } => {
                    if watermark.is_none_or(|w| timestamp > w) {
                        watermark = Some(timestamp);
                        outputs.push(Output::Watermark(timestamp));
                    }
                }
            }
        }
        if !outputs.is_empty() {
            let written = sink.write(&mut outputs).await;
            outputs.clear();
            if let Err(e) = written {
                op.close();
                return Err(sink_failed(e));
            }
        }
        if let Some(error) = failure {
            op.close();
            return Err(error);
        }
    }
    op.close();
    // The last checkpoint's commit is heard before the sink finishes.
    if let Some((id, task)) = commit {
        match task.await {
            Ok(committed) => sink.committed(id, committed).await,
            Err(e) => Err(e),
        }
        .map_err(sink_failed)?;
    }
    sink.finish().await.map_err(sink_failed)
}

/// Checkpoint `barrier`: the operator's snapshot (written by a task of its own, which reports
/// to the coordinator), the sink's position after everything it got before the barrier; then,
/// on a blocking thread while the shard goes on, the sink's output made durable and the
/// commit (the merge's snapshot, holding nothing, and the manifest).
async fn take_checkpoint<S, F, K>(
    op: &mut AsyncWait<S, F, GlommioClock>,
    sink: &mut K,
    checkpoint: &LocalCheckpoint<F::In>,
    barrier: Barrier,
    watermark: Option<u64>,
    writes: &mut SnapshotWrites,
) -> Result<glommio::Task<Result<Result<(), CheckpointError>, SinkError>>, SinkError>
where
    S: Stream<Item = Element<F::In>> + Unpin,
    F: AsyncFunction,
    K: ShardSink<F::Out>,
{
    let coordinator = checkpoint.coordinator.clone();
    let snapshot = op.checkpoint(barrier.id, 0, |input| checkpoint.shard.input.encode(input));
    // Ordered: the merge of a producer-fed stage would next release the oldest element still
    // in the operator (everything emitted before it went to the sink).
    let base_seq = match checkpoint.mode {
        OutputMode::Ordered => snapshot.entries.first().map_or(barrier.seq, |e| e.seq),
        _ => 0,
    };
    writes.push(write_snapshot(&checkpoint.shard, snapshot));
    let SinkCheckpoint {
        position,
        make_durable,
    } = match sink.checkpoint(barrier.id).await {
        Ok(taken) => taken,
        Err(e) => {
            coordinator.abort(barrier.id);
            return Err(e);
        }
    };
    let merge = MergeSnapshot {
        checkpoint_id: barrier.id,
        barrier_seq: barrier.seq,
        shards: 1,
        mode: mode_code(checkpoint.mode),
        base_seq,
        last_watermark: watermark,
        held: vec![],
        released_in_flight: vec![],
    };
    Ok(glommio::spawn_local(async move {
        glommio::executor()
            .spawn_blocking(move || {
                if let Some(make_durable) = make_durable {
                    if let Err(e) = make_durable() {
                        coordinator.abort(merge.checkpoint_id);
                        return Err(e);
                    }
                }
                Ok(coordinator.commit(&merge, &position))
            })
            .await
    }))
}
