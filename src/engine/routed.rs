//! Routed stages: one source and one sink on shard 0, the lookups on every shard. A record
//! crosses only the cores it must: from the reader's shard to the shard its key routes to, and
//! back to shard 0 for the merge (`StageBuilder::routed`).
//!
//! ```text
//!  shard 0 (glommio LocalExecutor)                          shard i (one per core)
//!  ┌─────────────────────────────────────────────┐         ┌───────────────────────────┐
//!  │ source ─▶ Producer (seq, key, route) ───────┼─handoff─▶ AsyncWait(func_i) ─ io_uring│
//!  │           AsyncWait(func_0) ─ io_uring       │         │                           │
//!  │ sink ◀── Consumer (merge: order, watermarks, ◀─handoff─┼── batches of outputs      │
//!  │           checkpoint alignment)              │         └───────────────────────────┘
//!  └─────────────────────────────────────────────┘
//! ```
//!
//! Owns: the edge task on shard 0 (the source read into the producer, the consumer's merged
//! stream written to the sink, checkpoints made durable and committed). Invariants:
//! - the stage is the producer-fed stage (`StageBuilder::start`): routing, the merge's order,
//!   watermarks and checkpoints across shards are its, and the same restore applies; only the
//!   threads that push and pull are gone (the hand-overs to and from shard 0's own operator stay
//!   on its thread, and a shard that waits is woken through its executor, not a parked thread);
//! - the source is read only while the producer takes what it yields (a full shard channel
//!   waits, nothing is buffered between them), and every `YIELD_EVERY` records the task yields
//!   if its time slice is spent (`glommio::yield_if_needed`), so reading never starves the
//!   lookups on the same core;
//! - the sink gets outputs in the merge's order, in batches of what it had ready at once;
//!   everything the merge released before a failure reaches the sink before the failure is
//!   reported; `finish` is called once, after the last output, only when the stream ended
//!   without a failure;
//! - a checkpoint: outputs before `Output::Checkpoint(id)` are written, the sink's position is
//!   taken, then on a blocking thread made durable and the merge's commit run (it waits for
//!   every shard's snapshot, shard 0's too, then writes the merge's snapshot and the
//!   manifest); the edge's writing waits for it, the shards and the source go on; the sink
//!   hears whether it was committed.

use super::merge::Consumer;
use super::producer::Producer;
use super::shard::panic_message;
use super::{Output, ShardSink, SinkCheckpoint, SourceItem, Stage, StageBuilder, StageHandle};
use crate::checkpoint::{CheckpointRefused, RestoreInfo};
use crate::error::{BuildError, StageError};
use crate::function::AsyncFunction;
use crate::ShardContext;
use futures::future::{Either, FutureExt, LocalBoxFuture};
use futures::{Stream, StreamExt};
use std::panic::AssertUnwindSafe;

/// What shard 0 is handed to run beside its operator.
pub(crate) type EdgeJob =
    Box<dyn FnOnce() -> LocalBoxFuture<'static, Result<(), StageError>> + Send>;

/// Where shard 0 waits for its edge job (none comes if the routed stage is dropped unrun).
pub(crate) type EdgeSlot = flume::Receiver<EdgeJob>;

/// The source task asks whether to yield to the shard's other tasks after this many records
/// in a row.
const YIELD_EVERY: usize = 64;

/// The sink takes at most this many outputs in one `write`.
const MAX_BATCH: usize = 1024;

/// Shard 0's edge task: waits for the job and runs it; a panic in the user's source or sink
/// is the shard's.
pub(crate) async fn run_edge(slot: EdgeSlot, shard: usize) -> Result<(), StageError> {
    let Ok(job) = slot.recv_async().await else {
        return Ok(());
    };
    match AssertUnwindSafe(job()).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => Err(StageError::ShardPanicked {
            shard,
            message: panic_message(panic),
        }),
    }
}

/// A stage whose source and sink run on shard 0, started and (with checkpoints) restored,
/// waiting for them. From [`StageBuilder::routed`].
pub struct Routed<I, O: 'static> {
    stage: Stage<I, O>,
    slot: flume::Sender<EdgeJob>,
}

impl<F, Fac> StageBuilder<F, Fac>
where
    F: AsyncFunction,
    F::In: Send,
    F::Out: Send,
    Fac: Fn(ShardContext) -> F + Send + Sync + 'static,
{
    /// Starts the shards for one source and one sink that run on shard 0's executor: the
    /// source's records are numbered, keyed and routed to the shards (`routing`, `key_by`) as a
    /// producer would, and the shards' outputs merged for the sink as a consumer would (each
    /// mode's order across shards, watermarks, checkpoints across shards with
    /// `checkpointing`), without a producer or consumer thread. With one shard a record never
    /// leaves shard 0's thread; with N it crosses to its shard and back.
    ///
    /// [`Routed::restored`] says where the source resumes; [`Routed::run`] hands over the
    /// source and the sink.
    ///
    /// ```
    /// use sluice::{from_fn, Output, Outputs, OutputMode, ShardSink, SinkError, SourceItem, Stage};
    ///
    /// /// Checks that the outputs come in input order.
    /// struct InOrder(u64);
    /// impl ShardSink<u64> for InOrder {
    ///     async fn write(&mut self, outputs: &mut Vec<Output<u64>>) -> Result<(), SinkError> {
    ///         for output in outputs.drain(..) {
    ///             if let Output::Record { value, .. } = output {
    ///                 assert_eq!(value, self.0 * 2);
    ///                 self.0 += 1;
    ///             }
    ///         }
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let routed = Stage::builder(|_shard| {
    ///     from_fn(|&n: &u64| async move { Ok::<_, std::io::Error>(Outputs::One(n * 2)) })
    /// })
    /// .shards(2)
    /// .capacity(16)
    /// .mode(OutputMode::Ordered)
    /// .routed()
    /// .unwrap();
    /// let mut handle = routed.run(
    ///     || futures::stream::iter((0..1000u64).map(SourceItem::Record)),
    ///     || InOrder(0),
    /// );
    /// handle.wait().unwrap();
    /// assert_eq!(handle.metrics().records_out, 1000);
    /// ```
    pub fn routed(self) -> Result<Routed<F::In, F::Out>, BuildError> {
        let (slot, edge) = flume::bounded(1);
        let stage = self.start_with_edges(Some(edge))?;
        Ok(Routed { stage, slot })
    }
}

impl<I: Send + 'static, O: Send + 'static> Routed<I, O> {
    /// What the stage restored from its checkpoint directory: resume the source at `source`
    /// and cut the sink back to `sink_position` (and its side outputs to theirs).
    pub fn restored(&self) -> Option<&RestoreInfo> {
        self.stage.restored()
    }

    /// Hands shard 0 the source and the sink, made there by `source` and `sink` (so they may
    /// hold `!Send` state and use the shard's io_uring). `join` on the handle waits for the
    /// source to end and the sink to finish, and reports the first failure (the function's,
    /// under its policy; the sink's; a panic).
    pub fn run<S, SF, K, KF>(self, source: SF, sink: KF) -> StageHandle
    where
        S: Stream<Item = SourceItem<I>> + Unpin + 'static,
        SF: FnOnce() -> S + Send + 'static,
        K: ShardSink<O>,
        KF: FnOnce() -> K + Send + 'static,
    {
        let (producer, consumer, handle) = self.stage.split();
        let job: EdgeJob = Box::new(move || {
            async move { run_edges(producer, consumer, source(), sink()).await }.boxed_local()
        });
        // Shard 0 gone already: its join reports why.
        let _ = self.slot.send(job);
        handle
    }
}

/// The source into the producer while the consumer's stream goes to the sink; the end or a
/// failure of the sink's side ends both.
async fn run_edges<I, O, S, K>(
    producer: Producer<I>,
    mut consumer: Consumer<O>,
    source: S,
    mut sink: K,
) -> Result<(), StageError>
where
    S: Stream<Item = SourceItem<I>> + Unpin,
    K: ShardSink<O>,
{
    let read = std::pin::pin!(read(producer, source));
    let write = std::pin::pin!(write(&mut consumer, &mut sink));
    match futures::future::select(read, write).await {
        // The producer is dropped: the shards finish what they hold and the stream ends.
        Either::Left(((), write)) => write.await,
        Either::Right((written, _read)) => written,
    }
}

/// Pushes what the source yields until it ends or the shards are gone (the consumer then
/// reports why).
async fn read<I, S>(mut producer: Producer<I>, mut source: S)
where
    S: Stream<Item = SourceItem<I>> + Unpin,
{
    let mut in_a_row = 0;
    while let Some(item) = source.next().await {
        let taken = match item {
            SourceItem::Record(input) => producer.push_async(input).await.is_ok(),
            SourceItem::Watermark(ts) => producer.push_watermark_async(ts).await.is_ok(),
            // Without checkpointing, or while the previous one commits, the source goes on.
            SourceItem::Checkpoint(at) => !matches!(
                producer.checkpoint_async(at).await,
                Err(CheckpointRefused::Closed)
            ),
        };
        if !taken {
            return;
        }
        in_a_row += 1;
        if in_a_row == YIELD_EVERY {
            in_a_row = 0;
            glommio::yield_if_needed().await;
        }
    }
}

/// Writes the merged stream to the sink in batches of what is ready; commits checkpoints.
async fn write<O, K: ShardSink<O>>(
    consumer: &mut Consumer<O>,
    sink: &mut K,
) -> Result<(), StageError> {
    let sink_failed = |source| StageError::Sink { shard: 0, source };
    let mut outputs = Vec::new();
    loop {
        let mut next = consumer.next().await;
        let mut ended = None;
        let mut checkpoint = None;
        loop {
            match next {
                Some(Ok(Output::Checkpoint(id))) => {
                    checkpoint = Some(id);
                    break;
                }
                Some(Ok(output)) => outputs.push(output),
                Some(Err(e)) => {
                    ended = Some(Err(e));
                    break;
                }
                None => {
                    ended = Some(Ok(()));
                    break;
                }
            }
            if outputs.len() >= MAX_BATCH {
                break;
            }
            match consumer.next().now_or_never() {
                Some(more) => next = more,
                None => break,
            }
        }
        if !outputs.is_empty() {
            let written = sink.write(&mut outputs).await;
            outputs.clear();
            written.map_err(sink_failed)?;
        }
        if let Some(id) = checkpoint {
            commit(consumer, sink, id).await.map_err(sink_failed)?;
        }
        match ended {
            Some(Ok(())) => return sink.finish().await.map_err(sink_failed),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
}

/// Checkpoint `id`, aligned at the merge: the sink's position, made durable on a blocking
/// thread, then the merge's commit; the sink hears how it went.
async fn commit<O, K: ShardSink<O>>(
    consumer: &mut Consumer<O>,
    sink: &mut K,
    id: u64,
) -> Result<(), super::SinkError> {
    let SinkCheckpoint {
        position,
        make_durable,
    } = sink.checkpoint(id).await?;
    // Waits for the shards' snapshot reports, shard 0's among them: not on this thread.
    let commit = consumer.commit_later(id, position);
    let committed = glommio::executor()
        .spawn_blocking(move || {
            if let Some(make_durable) = make_durable {
                make_durable()?;
            }
            Ok::<_, super::SinkError>(commit())
        })
        .await?;
    sink.committed(id, committed).await
}
