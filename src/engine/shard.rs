//! A shard: one glommio `LocalExecutor` thread running one `AsyncWait` operator over its
//! ingress channel, sending what it emits to its egress channel.
//!
//! Owns: the shard's thread, the user function's life cycle and the shard's part of a
//! checkpoint. Invariants: the function is created on the shard's thread and closed there
//! after the last output; restored elements enter the operator before any new input; a
//! checkpoint barrier stops the input (`GatedIngress`) until the shard has snapshotted the
//! operator, which then holds every element before the barrier and none after it, and the
//! barrier is forwarded to the merge after every output emitted before it; the snapshot file
//! is written by a task of its own, and the last one is awaited before the shard ends; the shard always
//! ends its egress with `Finished` or `Failed` (a panic in user code becomes `Failed`), unless
//! the consumer is gone; when the consumer is gone the shard stops and drops its input, so the
//! producer's next push fails instead of blocking forever.

use super::handoff;
use super::messages::{Barrier, Egress, Inbound};
use crate::checkpoint::coordinator::{write_shard_snapshot, ShardReport};
use crate::checkpoint::Codec;
use crate::clock::GlommioClock;
use crate::error::StageError;
use crate::function::AsyncFunction;
use crate::metrics::MetricsCell;
use crate::operator::{AsyncWait, Element, Emitted, OperatorConfig};
use futures::{FutureExt, Stream, StreamExt};
use std::cell::Cell;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// Most outputs sent to the merge in one message.
const MAX_EGRESS_BATCH: usize = 256;

/// How many times the shard yields to tasks already woken (a connection completing its next
/// turn of replies) to add their outputs to a batch before handing it to the consumer. No
/// timer: it stops as soon as a yield brings nothing. Each hand-over wakes the consumer thread,
/// which on a shared core preempts the shard; against Redis at 64 in flight gathering cut the
/// stage's CPU per record by 15-20% (docs/decisions/shard-gathering.md).
const GATHER_ROUNDS: usize = 8;

/// The shard's input: takes every queued element in one lock (`drain`) and hands them out one
/// by one, so the producer and the shard meet on the channel's lock once per burst instead of
/// once per record. Holds at most the channel's capacity (the producer may block meanwhile).
pub(crate) struct BatchedIngress<T: 'static> {
    rx: handoff::Receiver<T>,
    buffer: VecDeque<T>,
}

impl<T: 'static> BatchedIngress<T> {
    pub(crate) fn new(rx: handoff::Receiver<T>) -> Self {
        BatchedIngress {
            buffer: VecDeque::with_capacity(rx.capacity().unwrap_or(0)),
            rx,
        }
    }
}

impl<T: 'static> Stream for BatchedIngress<T> {
    type Item = T;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = &mut *self;
        if this.buffer.is_empty() && this.rx.drain_into(&mut this.buffer) == 0 {
            // Nothing queued: arm the doorbell, then look once more (a push between the drain
            // and the arming rang an unarmed bell). `try_recv` tells a disconnect apart from an
            // empty channel under the channel's lock, so it cannot miss a last push.
            this.rx.arm(cx.waker());
            return match this.rx.try_recv() {
                Ok(element) => Poll::Ready(Some(element)),
                Err(flume::TryRecvError::Empty) => Poll::Pending,
                Err(flume::TryRecvError::Disconnected) => Poll::Ready(None),
            };
        }
        Poll::Ready(this.buffer.pop_front())
    }
}

impl<T: 'static> Unpin for BatchedIngress<T> {}

/// The checkpoint barrier the input stopped at, if any.
pub(crate) type Gate = Rc<Cell<Option<Barrier>>>;

/// The operator's input: elements from the channel until a checkpoint barrier, which closes
/// the gate. While the gate is closed the input is pending; the shard loop sees the closed
/// gate when the operator goes pending, snapshots, and opens it.
pub(crate) struct GatedIngress<T: 'static> {
    inner: BatchedIngress<Inbound<T>>,
    gate: Gate,
}

impl<T: 'static> GatedIngress<T> {
    pub(crate) fn new(rx: handoff::Receiver<Inbound<T>>, gate: Gate) -> Self {
        GatedIngress {
            inner: BatchedIngress::new(rx),
            gate,
        }
    }
}

/// A shard operator's whole input: the elements a restore re-issues, then the gated channel.
pub(crate) type ShardInput<T> =
    futures::stream::Chain<futures::stream::Iter<std::vec::IntoIter<Element<T>>>, GatedIngress<T>>;

/// The input of a shard that re-issues `restore` and then reads `rx` behind `gate`; the real
/// shard and `SimStage`'s pumped one both build their operator on it.
pub(crate) fn shard_input<T: 'static>(
    restore: Vec<Element<T>>,
    rx: handoff::Receiver<Inbound<T>>,
    gate: &Gate,
) -> ShardInput<T> {
    futures::stream::iter(restore).chain(GatedIngress::new(rx, gate.clone()))
}

impl<T: 'static> Stream for GatedIngress<T> {
    type Item = Element<T>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Element<T>>> {
        if self.gate.get().is_some() {
            return Poll::Pending;
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Inbound::Element(element))) => Poll::Ready(Some(element)),
            Poll::Ready(Some(Inbound::Barrier(barrier))) => {
                self.gate.set(Some(barrier));
                Poll::Pending
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: 'static> Unpin for GatedIngress<T> {}

/// A shard's checkpoint settings.
pub(crate) struct ShardCheckpoint<I> {
    pub(crate) dir: PathBuf,
    pub(crate) input: Codec<I>,
    pub(crate) reports: flume::Sender<ShardReport>,
}

/// What the shard loop waits for: the operator's next item, or the checkpoint barrier its
/// input stopped at.
pub(crate) enum Step<T> {
    Item(Option<T>),
    Barrier(Barrier),
}

/// The operator's next item; when it has none, the barrier at its closed gate, if any.
pub(crate) fn poll_or_barrier<S, F>(
    op: &mut AsyncWait<S, F, GlommioClock>,
    gate: &Gate,
    cx: &mut Context<'_>,
) -> Poll<Step<Result<Emitted<F::Out>, StageError>>>
where
    S: Stream<Item = Element<F::In>> + Unpin,
    F: AsyncFunction,
{
    match op.poll_next_unpin(cx) {
        Poll::Ready(item) => Poll::Ready(Step::Item(item)),
        Poll::Pending => match gate.get() {
            Some(barrier) => Poll::Ready(Step::Barrier(barrier)),
            None => Poll::Pending,
        },
    }
}

/// What a shard learns about itself when its function is created.
#[derive(Debug, Clone, Copy)]
pub struct ShardContext {
    /// This shard's index, `0..shards`.
    pub index: usize,
    /// How many shards the stage has.
    pub shards: usize,
}

pub(crate) struct ShardParts<F: AsyncFunction> {
    pub(crate) context: ShardContext,
    pub(crate) ingress: handoff::Receiver<Inbound<F::In>>,
    pub(crate) egress: handoff::Sender<Egress<F::Out>>,
    pub(crate) config: OperatorConfig<F::Out, F::Error>,
    pub(crate) metrics: MetricsCell,
    /// Elements re-issued from a checkpoint, fed before the ingress.
    pub(crate) restore: Vec<Element<F::In>>,
    pub(crate) checkpoint: Option<ShardCheckpoint<F::In>>,
}

/// The body of a shard's executor: builds the function and the operator on the shard's thread,
/// runs them, and turns a panic into `StageError::ShardPanicked` for the merge.
pub(crate) async fn run_shard<F, Fac>(factory: std::sync::Arc<Fac>, parts: ShardParts<F>)
where
    F: AsyncFunction,
    Fac: Fn(ShardContext) -> F + Send + Sync + 'static,
{
    let ShardParts {
        context,
        ingress,
        egress,
        config,
        metrics,
        restore,
        checkpoint,
    } = parts;
    // Outside the body: awaited after a panic too (`SnapshotWrites`).
    let mut writes = SnapshotWrites::default();
    let body = AssertUnwindSafe(async {
        let func = factory(context);
        let gate: Gate = Rc::new(Cell::new(None));
        let input = shard_input(restore, ingress, &gate);
        let op = AsyncWait::with_metrics(input, func, config, GlommioClock, Some(metrics));
        let shard = context.index;
        drive(op, &gate, &egress, checkpoint.as_ref(), shard, &mut writes).await
    });
    let ended = body.catch_unwind().await;
    writes.finish().await;
    match ended {
        Ok(true) => {
            let _ = egress.send(Egress::Finished).await;
        }
        Ok(false) => {}
        Err(panic) => {
            let _ = egress
                .send(Egress::Failed(StageError::ShardPanicked {
                    shard: context.index,
                    message: panic_message(panic),
                }))
                .await;
        }
    }
}

/// What a caught panic said.
pub(crate) fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".into())
}

/// The shard's loop: outputs gathered into batches for the merge, and each checkpoint barrier
/// snapshotted where the operator's input stopped before it goes on (the writes left in
/// `writes`). Returns `true` when the input ended or the consumer went away, `false` after it
/// sent a failure.
async fn drive<S, F>(
    mut op: AsyncWait<S, F, GlommioClock>,
    gate: &Gate,
    egress: &handoff::Sender<Egress<F::Out>>,
    checkpoint: Option<&ShardCheckpoint<F::In>>,
    shard: usize,
    writes: &mut SnapshotWrites,
) -> bool
where
    S: Stream<Item = Element<F::In>> + Unpin,
    F: AsyncFunction,
{
    loop {
        let step = futures::future::poll_fn(|cx| poll_or_barrier(&mut op, gate, cx)).await;
        let first = match step {
            Step::Item(Some(first)) => first,
            Step::Item(None) => break,
            Step::Barrier(barrier) => {
                let checkpoint =
                    checkpoint.expect("barriers come only from a stage with checkpointing");
                writes.push(snapshot(&mut op, checkpoint, barrier, shard));
                gate.set(None);
                if egress.send(Egress::Barrier(barrier)).await.is_err() {
                    op.close();
                    return true;
                }
                continue;
            }
        };
        let (batch, failure) = gather(&mut op, first, GATHER_ROUNDS).await;
        if !batch.is_empty() && egress.send(Egress::Items(batch)).await.is_err() {
            // The consumer is gone: stop; dropping `op` drops the input.
            op.close();
            return true;
        }
        if let Some(error) = failure {
            op.close();
            let _ = egress.send(Egress::Failed(error)).await;
            return false;
        }
    }
    op.close();
    true
}

/// A shard's snapshot writes still running. A shard awaits them before it ends, on every path
/// (a consumer gone and a panic included): a task dropped with its executor would leave the kernel an
/// io_uring operation whose completion writes into memory already freed (opening the file
/// runs `statx` in the kernel's worker pool, which fills a buffer of the task's), and the
/// heap corrupts.
#[derive(Default)]
pub(crate) struct SnapshotWrites {
    tasks: Vec<glommio::Task<()>>,
}

impl SnapshotWrites {
    /// Keeps `write`, dropping the writes that have finished (one checkpoint is in progress at
    /// a time, so this holds one or two).
    pub(crate) fn push(&mut self, write: glommio::Task<()>) {
        self.tasks.retain_mut(|t| t.now_or_never().is_none());
        self.tasks.push(write);
    }

    /// Waits for every write to finish.
    pub(crate) async fn finish(self) {
        for task in self.tasks {
            task.await;
        }
    }
}

/// Takes the operator's part of `barrier`'s checkpoint where its input stopped, and writes it
/// in a task of its own (the shard goes on meanwhile); the task reports to the coordinator.
fn snapshot<S, F>(
    op: &mut AsyncWait<S, F, GlommioClock>,
    checkpoint: &ShardCheckpoint<F::In>,
    barrier: Barrier,
    shard: usize,
) -> glommio::Task<()>
where
    S: Stream<Item = Element<F::In>> + Unpin,
    F: AsyncFunction,
{
    let snapshot = op.checkpoint(barrier.id, shard, |input| checkpoint.input.encode(input));
    write_snapshot(checkpoint, snapshot)
}

/// Writes a shard's snapshot in a task of its own, which reports to the coordinator.
pub(crate) fn write_snapshot<I>(
    checkpoint: &ShardCheckpoint<I>,
    snapshot: crate::checkpoint::ShardSnapshot,
) -> glommio::Task<()> {
    let (dir, reports) = (checkpoint.dir.clone(), checkpoint.reports.clone());
    let (id, shard) = (snapshot.checkpoint_id, snapshot.shard as usize);
    glommio::spawn_local(async move {
        let result = write_shard_snapshot(dir, snapshot).await;
        let _ = reports.send_async(ShardReport { id, shard, result }).await;
    })
}

/// The batch to hand on, starting with `first`: what else is ready now, then what the tasks
/// already woken (the connection's next turn of replies) complete when the shard yields to
/// them, up to `rounds` yields, so the consumer gets one hand-over per burst, not one per turn.
/// Stops at the first failure, which is returned beside the batch.
pub(crate) async fn gather<S, F>(
    op: &mut AsyncWait<S, F, GlommioClock>,
    first: Result<Emitted<F::Out>, StageError>,
    rounds: usize,
) -> (Vec<Emitted<F::Out>>, Option<StageError>)
where
    S: Stream<Item = Element<F::In>> + Unpin,
    F: AsyncFunction,
{
    let mut batch = Vec::new();
    let mut failure = None;
    match first {
        Ok(emitted) => batch.push(emitted),
        Err(error) => failure = Some(error),
    }
    let mut yields = 0;
    loop {
        let before = batch.len();
        while failure.is_none() && batch.len() < MAX_EGRESS_BATCH {
            // A poll with a no-op waker; the shard loop polls with the task's waker before the
            // shard sleeps, so no wake-up is lost.
            match op.next().now_or_never().flatten() {
                Some(Ok(emitted)) => batch.push(emitted),
                Some(Err(error)) => failure = Some(error),
                None => break,
            }
        }
        let stalled = yields > 0 && batch.len() == before;
        if failure.is_some() || batch.len() >= MAX_EGRESS_BATCH || stalled || yields == rounds {
            return (batch, failure);
        }
        yields += 1;
        // Wakes this task and returns `Pending` once: the tasks already woken run first.
        glommio::executor().yield_now().await;
    }
}
