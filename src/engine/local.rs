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
//! Owns: the per-shard pipeline and its end. Invariants: each shard numbers its source's
//! elements from 0 in the order the source yields them, and a record stays on that shard; the
//! source is polled only when the operator has a free slot (a full queue is backpressure on the
//! source, with nothing buffered between them); the sink gets outputs in the operator's emission
//! order (`Ordered`: the source's order) and watermarks only when they advance; everything
//! emitted before a failure reaches the sink before the shard stops; `finish` is called once,
//! after the last output, and only when the source ended without a failure; the user's function
//! is closed on every path.

use super::routing::KeyFn;
use super::shard::{gather, panic_message, ShardContext};
use super::{placement, plan, Output, Plan, Spec, StageBuilder, StageHandle};
use crate::clock::GlommioClock;
use crate::error::{BuildError, StageError};
use crate::function::AsyncFunction;
use crate::metrics::{MetricsCell, MetricsSnapshot};
use crate::operator::{AsyncWait, Element, Emitted, OperatorConfig};
use futures::{FutureExt, Stream, StreamExt};
use glommio::{LocalExecutorBuilder, Placement};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
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
}

impl<I> From<I> for SourceItem<I> {
    fn from(input: I) -> Self {
        SourceItem::Record(input)
    }
}

/// Why a sink could not take its outputs; it stops the shard (`StageError::Sink`).
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

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
}

/// A source's elements numbered and keyed for the operator.
struct LocalInput<S, I> {
    source: S,
    key_fn: Option<KeyFn<I>>,
    next_seq: u64,
}

impl<S, I> Stream for LocalInput<S, I>
where
    S: Stream<Item = SourceItem<I>> + Unpin,
{
    type Item = Element<I>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Element<I>>> {
        let this = &mut *self;
        let item = match this.source.poll_next_unpin(cx) {
            Poll::Ready(Some(item)) => item,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        let seq = this.next_seq;
        this.next_seq += 1;
        Poll::Ready(Some(match item {
            SourceItem::Record(input) => Element::Record {
                seq,
                key: this.key_fn.as_ref().map_or(seq, |key| key(&input)),
                input,
                pushed_at: None,
            },
            SourceItem::Watermark(timestamp) => Element::Watermark { seq, timestamp },
        }))
    }
}

impl<S, I> Unpin for LocalInput<S, I> {}

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
}

impl<F, Fac> StageBuilder<F, Fac>
where
    F: AsyncFunction,
    Fac: Fn(ShardContext) -> F + Send + Sync + 'static,
{
    /// Starts the shards with a source and a sink on each, made there by `sources` and `sinks`
    /// (so they may hold `!Send` state and use the shard's io_uring): no producer, consumer or
    /// channel, so a record is read, looked up and written without leaving its thread. Shard
    /// `i` reads its own source (a partition, a file, a generator); with `Ordered` its sink
    /// gets the outputs in that source's order, and with `KeyOrdered` a key's records must
    /// all come from one shard's source.
    ///
    /// `join` on the handle waits for every shard's source to end and its sink to finish, and
    /// reports the first failure (the function's, under its policy; a sink's; a panic). Not
    /// with `checkpointing` or `routing`, which concern records that cross threads: refused
    /// with `BuildError::InvalidConfig`.
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
        let refuse = |field, reason: &str| BuildError::InvalidConfig {
            field,
            reason: reason.into(),
        };
        if self.checkpointing.is_some() {
            return Err(refuse(
                "checkpointing",
                "a stage whose sources run on the shards does not checkpoint; use start() with \
                 a producer for exactly-once checkpoints",
            ));
        }
        if self.routing.is_some() {
            return Err(refuse(
                "routing",
                "with sources on the shards a record stays on the shard whose source read it",
            ));
        }
        let shards = self.shard_count()?;
        let checked: Plan<F::In, F::Out> = Plan::new(Spec {
            shards,
            capacity: self.capacity,
            timeout: self.timeout,
            mode: self.mode,
            key_fn: self.key_fn.clone(),
            routing: None,
            channel_capacity: None,
            checkpointing: None,
        })?;
        let placements = plan(shards, &self.pinning, &placement::usable_cores());
        let (factory, sources, sinks) =
            (Arc::new(self.factory), Arc::new(sources), Arc::new(sinks));
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
                key_fn: self.key_fn.clone(),
                config: OperatorConfig {
                    capacity: checked.capacity,
                    timeout: self.timeout,
                    mode: self.mode,
                    retry: self.retry.clone(),
                    seed: self.seed.wrapping_add(placement.shard as u64),
                },
                metrics: cell.clone(),
                ended: ended.clone(),
            };
            let core = match placement.core {
                Some(core) => Placement::Fixed(core),
                None => Placement::Unbound,
            };
            let join = LocalExecutorBuilder::new(core)
                .name(&format!("sluice-shard-{}", placement.shard))
                .io_memory(self.io_memory)
                .ring_depth(self.ring_depth)
                .spawn(move || run_local_shard(shard))
                .map_err(|e| BuildError::Executor {
                    shard: placement.shard,
                    reason: e.to_string(),
                });
            match join {
                Ok(join) => joins.push(join),
                Err(e) => {
                    // The shards already started run their sources to the end; they are not
                    // joined here, so the caller is not held by them.
                    return Err(e);
                }
            }
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
    let body = AssertUnwindSafe(async move {
        let func = (shard.factory)(shard.context);
        let input = LocalInput {
            source: (shard.sources)(shard.context),
            key_fn: shard.key_fn,
            next_seq: 0,
        };
        let sink = (shard.sinks)(shard.context);
        let op =
            AsyncWait::with_metrics(input, func, shard.config, GlommioClock, Some(shard.metrics));
        drive_local(op, sink, index).await
    });
    let result = match body.catch_unwind().await {
        Ok(result) => result,
        Err(panic) => Err(StageError::ShardPanicked {
            shard: index,
            message: panic_message(panic),
        }),
    };
    ended.fetch_add(1, Ordering::Release);
    result
}

/// The shard's loop: what the operator has ready at once goes to the sink in one `write`.
async fn drive_local<S, F, K>(
    mut op: AsyncWait<S, F, GlommioClock>,
    mut sink: K,
    shard: usize,
) -> Result<(), StageError>
where
    S: Stream<Item = Element<F::In>> + Unpin,
    F: AsyncFunction,
    K: ShardSink<F::Out>,
{
    let sink_failed = |source| StageError::Sink { shard, source };
    let mut outputs = Vec::new();
    let mut watermark = None;
    while let Some(first) = op.next().await {
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
    sink.finish().await.map_err(sink_failed)
}
