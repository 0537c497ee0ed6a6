//! `Consumer`: the stage's output side. Merges the shards' outputs so that the merged stream
//! keeps each mode's guarantees across shards.
//!
//! Owns: the egress order, in three parts: `reorder` (the ordered mode's window),
//! `watermarks` (the unordered modes' watermark barrier) and `alignment` (checkpoint barrier
//! alignment); a `Consumer` holds one of the first two and, with checkpointing, the third.
//! Invariants:
//! - shards send batches; each port keeps the rest of its current batch in `buffer` and reads
//!   its channel only when the buffer is empty, so memory per port is one batch;
//! - `Ordered`: outputs leave in global sequence order. A bounded reorder window holds early
//!   arrivals; a shard whose next item lies beyond the window is
//!   not read further (the item waits at the front of its buffer), which backpressures that
//!   shard instead of growing memory. No deadlock: the shard holding the next sequence number
//!   emits it first.
//! - `Unordered`/`KeyOrdered`: a shard that emitted watermark W is not read again until every
//!   shard has reached W (barrier), so no record overtakes a watermark and no watermark
//!   overtakes a record in the merged output, even across shards. Shards may fold consecutive
//!   watermarks, so the barrier releases the smallest watermark sequence number first.
//! - a watermark leaves only when it advances the merged watermark (the minimum over shards).
//! - after an error the stream ends; a shard that vanished without finishing is an error.
//! - checkpoints: the merge aligns a checkpoint's barriers (one per shard, at sequence number
//!   `B`) and yields `Output::Checkpoint` when the last one arrives. What it has released by
//!   then is the sink's part of the checkpoint; it snapshots what it holds that the shards
//!   emitted before their barrier (ordered mode), and lists what it released that a shard
//!   had in its snapshot (`released_in_flight`), so that restore re-issues the rest exactly
//!   once. Nothing at or after `B` is released before alignment: in ordered mode the window
//!   does not pass `B` until it is aligned (then `B` is skipped; the barrier never takes a
//!   window slot, since a shard sends it ahead of earlier results and a slot beyond the window
//!   would block the port that holds the window's head); in the unordered modes a shard past
//!   its barrier is not read beyond items below `B`. Shards emit their watermarks below `B`
//!   before any item above it, so neither rule can deadlock the watermark barrier.

use super::handoff;
use super::messages::{Barrier, Egress};
use crate::checkpoint::{CheckpointError, MergeSnapshot, SinkPosition};
use crate::error::StageError;
use crate::function::OutputsIter;
use crate::operator::{Emitted, OutputMode};
use alignment::Alignment;
use futures::{Stream, StreamExt};
use reorder::{Released, ReorderWindow};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use watermarks::WatermarkBarrier;

mod alignment;
mod reorder;
mod watermarks;

pub(crate) use alignment::MergeCheckpoint;

/// Nothing arrived within [`Consumer::recv_timeout`]'s timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvTimedOut;

/// Wakes the thread that waits in [`Consumer::recv_timeout`].
struct ThreadWaker(std::thread::Thread);

thread_local! {
    /// This thread's waker for [`Consumer::recv_timeout`], made once per thread.
    static THREAD_WAKER: std::task::Waker =
        std::task::Waker::from(Arc::new(ThreadWaker(std::thread::current())));
}

impl std::task::Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// One element of the merged output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<O> {
    /// An output of the input record with sequence number `seq`.
    Record { seq: u64, value: O },
    /// The merged event-time watermark: no later output belongs before it.
    Watermark(u64),
    /// Checkpoint `id` is aligned here: every output before this belongs to it, none after.
    /// Make the sink's output so far durable, then call [`Consumer::commit_checkpoint`].
    Checkpoint(u64),
}

struct Port<O: 'static> {
    rx: handoff::Receiver<Egress<O>>,
    buffer: VecDeque<Emitted<O>>,
    finished: bool,
    /// A checkpoint barrier read from the channel, taken once the port's buffer is empty.
    /// The port is not read while it is here.
    checkpoint_in: Option<Barrier>,
}

/// How the merge orders what the shards emit.
enum Order<O> {
    Ordered(ReorderWindow<O>),
    /// `Unordered` and `KeyOrdered`.
    Unordered(WatermarkBarrier),
}

/// What one step of releasing held items did.
enum Release<O> {
    /// Nothing is ready.
    Idle,
    /// Something left the merge's state without an output of its own (a record's outputs are
    /// now current, or a watermark did not advance the merged one).
    Moved,
    Emit(Output<O>),
}

/// The output mode as a merge snapshot records it.
pub(crate) fn mode_code(mode: OutputMode) -> u8 {
    match mode {
        OutputMode::Ordered => 0,
        OutputMode::Unordered => 1,
        OutputMode::KeyOrdered => 2,
    }
}

fn seq_of<O>(item: &Emitted<O>) -> u64 {
    match item {
        Emitted::Record { seq, .. } | Emitted::Watermark { seq, .. } => *seq,
    }
}

/// The merged output of a stage: a `Stream`, or blocking via [`Consumer::recv`].
pub struct Consumer<O: 'static> {
    ports: Vec<Port<O>>,
    mode: OutputMode,
    order: Order<O>,
    alignment: Option<Alignment<O>>,
    /// The record whose outputs are being emitted.
    current: Option<(u64, OutputsIter<O>)>,
    last_watermark: Option<u64>,
    next_port: usize,
    done: bool,
    /// `Output::Checkpoint` to yield before anything else.
    marker: Option<u64>,
}

impl<O: 'static> Consumer<O> {
    pub(crate) fn new(
        receivers: Vec<handoff::Receiver<Egress<O>>>,
        mode: OutputMode,
        window: usize,
        checkpoint: Option<MergeCheckpoint<O>>,
    ) -> Self {
        let shards = receivers.len();
        Consumer {
            ports: receivers
                .into_iter()
                .map(|rx| Port {
                    rx,
                    buffer: VecDeque::new(),
                    finished: false,
                    checkpoint_in: None,
                })
                .collect(),
            mode,
            order: match mode {
                OutputMode::Ordered => Order::Ordered(ReorderWindow::new(window)),
                OutputMode::Unordered | OutputMode::KeyOrdered => {
                    Order::Unordered(WatermarkBarrier::new(shards))
                }
            },
            alignment: checkpoint.map(|c| Alignment::new(c, shards)),
            current: None,
            last_watermark: None,
            next_port: 0,
            done: false,
            marker: None,
        }
    }

    /// Continues from a checkpoint's merge snapshot (the stage checked its shape); returns how
    /// many records the merge held.
    pub(crate) fn restore(&mut self, snapshot: &MergeSnapshot) -> Result<usize, CheckpointError> {
        self.last_watermark = snapshot.last_watermark;
        let codec = self
            .alignment
            .as_ref()
            .expect("restore needs a codec")
            .codec();
        match &mut self.order {
            Order::Ordered(window) => window.restore(snapshot, codec),
            Order::Unordered(_) => Ok(0),
        }
    }

    /// Commits checkpoint `id` after `Output::Checkpoint(id)`: `sink` (what the sink and its
    /// side outputs hold, already durable; a plain `u64` for a sink without side outputs) goes
    /// into its manifest with the shards' and the merge's files.
    /// An `Err` means the checkpoint was not committed; `CheckpointError::Fsync` means the
    /// process must stop (a failed fsync cannot be retried safely).
    pub fn commit_checkpoint(
        &mut self,
        id: u64,
        sink: impl Into<SinkPosition>,
    ) -> Result<(), CheckpointError> {
        match &mut self.alignment {
            Some(alignment) => alignment.commit(id, sink.into()),
            None => panic!("commit_checkpoint({id}) on a stage without checkpointing"),
        }
    }

    /// [`Consumer::commit_checkpoint`] as a job for a blocking thread (it waits for the
    /// shards' snapshot reports): for a consumer on a shard's own executor.
    pub(crate) fn commit_later(
        &mut self,
        id: u64,
        sink: SinkPosition,
    ) -> impl FnOnce() -> Result<(), CheckpointError> + Send + 'static {
        match &mut self.alignment {
            Some(alignment) => alignment.commit_later(id, sink),
            None => panic!("commit_checkpoint({id}) on a stage without checkpointing"),
        }
    }

    /// Takes port `p`'s checkpoint barrier; aligns when it is the last one.
    fn checkpoint_arrived(&mut self, p: usize, barrier: Barrier) {
        let alignment = self
            .alignment
            .as_mut()
            .expect("barriers come only from a stage with checkpointing");
        if alignment.arrived(p, barrier) {
            let window = match &mut self.order {
                Order::Ordered(window) => Some(window),
                Order::Unordered(_) => None,
            };
            let id = alignment.align(mode_code(self.mode), window, self.last_watermark);
            self.marker = Some(id);
        }
    }

    fn note_release(&mut self, seq: u64) {
        if let Some(alignment) = &mut self.alignment {
            alignment.note_release(seq);
        }
    }

    /// The next output, blocking the calling thread; `None` once the stage finished.
    pub fn recv(&mut self) -> Option<Result<Output<O>, StageError>> {
        futures::executor::block_on(self.next())
    }

    /// As [`Consumer::recv`], but gives up after `timeout` with `Err(RecvTimedOut)` (for a
    /// sink that flushes when its input goes idle, or watches for a signal).
    pub fn recv_timeout(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<Option<Result<Output<O>, StageError>>, RecvTimedOut> {
        let waker = THREAD_WAKER.with(std::task::Waker::clone);
        let mut cx = std::task::Context::from_waker(&waker);
        // Polled before the clock is read: an output that is ready costs no clock read.
        if let std::task::Poll::Ready(item) = self.poll_next_unpin(&mut cx) {
            return Ok(item);
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(RecvTimedOut);
            }
            std::thread::park_timeout(left);
            if let std::task::Poll::Ready(item) = self.poll_next_unpin(&mut cx) {
                return Ok(item);
            }
        }
    }

    /// A released watermark: an output only if it advances the merged watermark.
    fn watermark(&mut self, timestamp: u64) -> Release<O> {
        if self.last_watermark.is_some_and(|last| timestamp <= last) {
            return Release::Moved;
        }
        self.last_watermark = Some(timestamp);
        Release::Emit(Output::Watermark(timestamp))
    }

    /// Releases one thing the merge holds: the ordered window's head, or the lowest watermark
    /// every shard waits at.
    fn release(&mut self) -> Release<O> {
        let released = match &mut self.order {
            Order::Ordered(window) => window.pop(self.ports.len()),
            Order::Unordered(barrier) => {
                let ports = &self.ports;
                barrier
                    .release(|p| ports[p].finished)
                    .map(|(seq, timestamp)| Released::Watermark { seq, timestamp })
            }
        };
        match released {
            None => Release::Idle,
            Some(Released::Record { seq, outputs }) => {
                self.note_release(seq);
                self.current = Some((seq, outputs.into_iter()));
                Release::Moved
            }
            Some(Released::Watermark { seq, timestamp }) => {
                self.note_release(seq);
                self.watermark(timestamp)
            }
            Some(Released::Barrier) => Release::Moved,
        }
    }

    /// Takes items from the front of port `p`'s buffer while the mode allows. Returns true
    /// when it took anything.
    fn take_from(&mut self, p: usize) -> bool {
        let mut took = false;
        while self.current.is_none() && self.marker.is_none() {
            let Some(front) = self.ports[p].buffer.front() else {
                // The buffer is empty: a checkpoint barrier read after it comes next.
                let Some(barrier) = self.ports[p].checkpoint_in.take() else {
                    break;
                };
                self.checkpoint_arrived(p, barrier);
                took = true;
                continue;
            };
            let seq = seq_of(front);
            let passed = self.alignment.as_ref().is_some_and(|a| a.passed(p));
            match &mut self.order {
                Order::Ordered(window) => {
                    if !window.fits(seq) {
                        break; // beyond the window: wait for the head to advance
                    }
                    let item = self.ports[p].buffer.pop_front().expect("front exists");
                    window.place(item, passed);
                }
                Order::Unordered(barrier) => {
                    if barrier.is_waiting(p)
                        || self
                            .alignment
                            .as_ref()
                            .is_some_and(|a| a.holds_back(p, seq))
                    {
                        break; // at a watermark, or after a checkpoint that is aligning
                    }
                    match self.ports[p].buffer.pop_front().expect("front exists") {
                        Emitted::Record { seq, outputs } => {
                            if let Some(alignment) = &mut self.alignment {
                                alignment.note_release(seq);
                            }
                            self.current = Some((seq, outputs.into_iter()))
                        }
                        Emitted::Watermark { seq, timestamp } => barrier.wait(p, seq, timestamp),
                    }
                }
            }
            took = true;
        }
        took
    }

    /// Reads port `p`'s channel if the port may be read. `Err` ends the stream with that
    /// error; `Ok(true)` when something arrived.
    fn read_port(&mut self, p: usize) -> Result<bool, StageError> {
        let waiting = match &self.order {
            Order::Unordered(barrier) => barrier.is_waiting(p),
            Order::Ordered(_) => false,
        };
        let port = &mut self.ports[p];
        if port.finished || !port.buffer.is_empty() || waiting || port.checkpoint_in.is_some() {
            return Ok(false);
        }
        match port.rx.try_recv() {
            Ok(Egress::Items(items)) => port.buffer.extend(items),
            Ok(Egress::Barrier(barrier)) => port.checkpoint_in = Some(barrier),
            Ok(Egress::Finished) => port.finished = true,
            Ok(Egress::Failed(error)) => return Err(error),
            Err(flume::TryRecvError::Disconnected) => {
                return Err(StageError::ShardPanicked {
                    shard: p,
                    message: "the shard stopped without finishing (see its panic message on \
                              stderr)"
                        .into(),
                })
            }
            Err(flume::TryRecvError::Empty) => return Ok(false),
        }
        Ok(true)
    }

    fn poll_merge(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Output<O>, StageError>>> {
        let mut armed = false;
        loop {
            if let Some(id) = self.marker.take() {
                return Poll::Ready(Some(Ok(Output::Checkpoint(id))));
            }
            if let Some((seq, iter)) = &mut self.current {
                if let Some(value) = iter.next() {
                    return Poll::Ready(Some(Ok(Output::Record { seq: *seq, value })));
                }
                self.current = None;
            }
            match self.release() {
                Release::Emit(out) => return Poll::Ready(Some(Ok(out))),
                Release::Moved => continue,
                Release::Idle => {}
            }
            // Take buffered items; read a port's channel only when its buffer is empty.
            let n = self.ports.len();
            let mut progressed = false;
            for i in 0..n {
                let p = (self.next_port + i) % n;
                if self.take_from(p) {
                    progressed = true;
                    self.next_port = (p + 1) % n;
                    break;
                }
                match self.read_port(p) {
                    Ok(read) => progressed |= read,
                    Err(error) => {
                        self.done = true;
                        return Poll::Ready(Some(Err(error)));
                    }
                }
            }
            if progressed {
                continue;
            }
            if self
                .ports
                .iter()
                .all(|p| p.finished && p.buffer.is_empty() && p.checkpoint_in.is_none())
            {
                self.done = true;
                return Poll::Ready(None);
            }
            // Nothing to take: arm the shards' doorbell, then look once more (a shard that sent
            // between the look and the arming rang an unarmed bell).
            if !armed {
                armed = true;
                for port in &self.ports {
                    port.rx.arm(cx.waker());
                }
                continue;
            }
            return Poll::Pending;
        }
    }
}

impl<O: 'static> Stream for Consumer<O> {
    type Item = Result<Output<O>, StageError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        this.poll_merge(cx)
    }
}

// Nothing in the consumer is pinned: its receivers and outputs are plain values.
impl<O: 'static> Unpin for Consumer<O> {}
