//! `Consumer`: the stage's output side. Merges the shards' outputs so that the merged stream
//! keeps each mode's guarantees across shards.
//!
//! Owns: the egress order. Invariants:
//! - shards send batches; each port keeps the rest of its current batch in `buffer` and reads
//!   its channel only when the buffer is empty, so memory per port is one batch;
//! - `Ordered`: outputs leave in global sequence order. A bounded reorder window (`window`
//!   sequence numbers) holds early arrivals; a shard whose next item lies beyond the window is
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
use crate::checkpoint::coordinator::Coordinator;
use crate::checkpoint::{CheckpointError, Codec, HeldEntry, MergeSnapshot, SinkPosition};
use crate::error::StageError;
use crate::function::{Outputs, OutputsIter};
use crate::operator::{Emitted, OutputMode};
use futures::{Stream, StreamExt};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// What a shard sends to the merge.
pub(crate) enum Egress<O> {
    /// Outputs in the shard's emission order.
    Items(Vec<Emitted<O>>),
    /// Checkpoint `id`'s barrier, with sequence number `seq`: what follows was emitted after
    /// the shard's snapshot.
    Barrier {
        seq: u64,
        id: u64,
    },
    Failed(StageError),
    Finished,
}

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
    /// Unordered modes: the watermark (seq, timestamp) this shard is waiting at.
    barrier: Option<(u64, u64)>,
    /// A checkpoint barrier (seq, id) read from the channel, taken once the port's buffer
    /// is empty. The port is not read while it is here.
    checkpoint_in: Option<(u64, u64)>,
    /// This shard's barrier of the checkpoint being aligned has been taken.
    passed_checkpoint: bool,
}

enum Pending<O> {
    Empty,
    /// `after_barrier`: arrived after its shard's checkpoint barrier (so it is also in the
    /// shard's snapshot, and is not part of the merge's).
    Record {
        outputs: Outputs<O>,
        after_barrier: bool,
    },
    Watermark {
        timestamp: u64,
        arrivals: usize,
        arrivals_after_barrier: usize,
    },
}

/// The checkpoint whose barriers are arriving.
struct Aligning {
    id: u64,
    seq: u64,
    /// Sequence numbers below `seq` released since the first barrier arrived.
    released: Vec<u64>,
}

/// The output mode as a merge snapshot records it.
pub(crate) fn mode_code(mode: OutputMode) -> u8 {
    match mode {
        OutputMode::Ordered => 0,
        OutputMode::Unordered => 1,
        OutputMode::KeyOrdered => 2,
    }
}

/// The consumer's side of checkpointing.
pub(crate) struct MergeCheckpoint<O> {
    pub(crate) coordinator: Arc<Coordinator>,
    pub(crate) output: Codec<O>,
}

/// The merged output of a stage: a `Stream`, or blocking via [`Consumer::recv`].
pub struct Consumer<O: 'static> {
    ports: Vec<Port<O>>,
    mode: OutputMode,
    window: usize,
    base_seq: u64,
    reorder: VecDeque<Pending<O>>,
    current: Option<(u64, OutputsIter<O>)>,
    last_watermark: Option<u64>,
    next_port: usize,
    done: bool,
    checkpoints: Option<MergeCheckpoint<O>>,
    aligning: Option<Aligning>,
    /// The snapshot of an aligned checkpoint, until the sink commits it.
    aligned: Option<MergeSnapshot>,
    /// `Output::Checkpoint` to yield before anything else.
    marker: Option<u64>,
    /// Ordered: aligned checkpoint barriers' sequence numbers the window has not passed yet
    /// (ascending); their slots stay empty and are skipped.
    skip: VecDeque<u64>,
}

impl<O: 'static> Consumer<O> {
    pub(crate) fn new(
        receivers: Vec<handoff::Receiver<Egress<O>>>,
        mode: OutputMode,
        window: usize,
        checkpoints: Option<MergeCheckpoint<O>>,
    ) -> Self {
        assert!(window > 0, "the reorder window is non-empty");
        let reorder = if mode == OutputMode::Ordered {
            (0..window).map(|_| Pending::Empty).collect()
        } else {
            VecDeque::new()
        };
        Consumer {
            ports: receivers
                .into_iter()
                .map(|rx| Port {
                    rx,
                    buffer: VecDeque::new(),
                    finished: false,
                    barrier: None,
                    checkpoint_in: None,
                    passed_checkpoint: false,
                })
                .collect(),
            mode,
            window,
            base_seq: 0,
            reorder,
            current: None,
            last_watermark: None,
            next_port: 0,
            done: false,
            checkpoints,
            aligning: None,
            aligned: None,
            marker: None,
            skip: VecDeque::new(),
        }
    }

    /// Continues from a checkpoint's merge snapshot (the stage checked its shape).
    pub(crate) fn restore(&mut self, snapshot: &MergeSnapshot) -> Result<usize, CheckpointError> {
        self.last_watermark = snapshot.last_watermark;
        if self.mode != OutputMode::Ordered {
            return Ok(0);
        }
        let codec = &self
            .checkpoints
            .as_ref()
            .expect("restore needs a codec")
            .output;
        self.base_seq = snapshot.base_seq;
        // The barrier's own slot must fit, whatever the window is now.
        let span = (snapshot.barrier_seq - snapshot.base_seq) as usize + 1;
        if span > self.window {
            self.window = span;
        }
        self.reorder = (0..self.window).map(|_| Pending::Empty).collect();
        let mut held = 0;
        for entry in &snapshot.held {
            let slot = &mut self.reorder[(entry.seq - self.base_seq) as usize];
            *slot = match entry.watermark {
                Some(timestamp) => Pending::Watermark {
                    timestamp,
                    arrivals: entry.arrivals as usize,
                    arrivals_after_barrier: 0,
                },
                None => {
                    held += 1;
                    let mut outputs = Vec::with_capacity(entry.outputs.len());
                    for bytes in &entry.outputs {
                        outputs.push(codec.decode(bytes).map_err(|reason| {
                            CheckpointError::Decode {
                                checkpoint_id: snapshot.checkpoint_id,
                                what: "held output of record",
                                seq: entry.seq,
                                reason,
                            }
                        })?);
                    }
                    Pending::Record {
                        outputs: Outputs::from(outputs),
                        after_barrier: false,
                    }
                }
            };
        }
        // The barrier's sequence number produces nothing.
        self.reorder[span - 1] = Pending::Record {
            outputs: Outputs::None,
            after_barrier: false,
        };
        Ok(held)
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
        let snapshot = match self.aligned.take() {
            Some(s) if s.checkpoint_id == id => s,
            other => panic!(
                "commit_checkpoint({id}) without Output::Checkpoint({id}) (aligned: {:?})",
                other.map(|s| s.checkpoint_id)
            ),
        };
        let checkpoints = self.checkpoints.as_ref().expect("aligned, so configured");
        checkpoints.coordinator.commit(&snapshot, &sink.into())
    }

    /// Takes checkpoint barrier (`seq`, `id`) from port `p`; aligns when it is the last one.
    fn checkpoint_arrived(&mut self, p: usize, seq: u64, id: u64) {
        let aligning = self.aligning.get_or_insert(Aligning {
            id,
            seq,
            released: vec![],
        });
        assert!(
            aligning.id == id && aligning.seq == seq,
            "checkpoint {id} arrived while {} is aligning (one at a time)",
            aligning.id
        );
        assert!(
            !self.ports[p].passed_checkpoint,
            "shard {p} delivered checkpoint {id}'s barrier twice"
        );
        self.ports[p].passed_checkpoint = true;
        if self.ports.iter().all(|port| port.passed_checkpoint) {
            self.align();
        }
    }

    /// Every barrier of the checkpoint arrived: snapshot what the merge holds.
    fn align(&mut self) {
        let aligning = self.aligning.take().expect("aligning");
        let codec = &self
            .checkpoints
            .as_ref()
            .expect("barriers need checkpointing")
            .output;
        let mut held = vec![];
        for (i, slot) in self.reorder.iter_mut().enumerate() {
            let seq = self.base_seq + i as u64;
            match slot {
                _ if seq >= aligning.seq => {}
                Pending::Record {
                    outputs,
                    after_barrier: false,
                } => held.push(HeldEntry {
                    seq,
                    watermark: None,
                    arrivals: 0,
                    outputs: outputs.as_slice().iter().map(|o| codec.encode(o)).collect(),
                }),
                Pending::Watermark {
                    timestamp,
                    arrivals,
                    arrivals_after_barrier,
                } if *arrivals > *arrivals_after_barrier => held.push(HeldEntry {
                    seq,
                    watermark: Some(*timestamp),
                    arrivals: (*arrivals - *arrivals_after_barrier) as u32,
                    outputs: vec![],
                }),
                _ => {}
            }
            // From here on nothing is "after the barrier" of a checkpoint in progress.
            match slot {
                Pending::Record { after_barrier, .. } => *after_barrier = false,
                Pending::Watermark {
                    arrivals_after_barrier,
                    ..
                } => *arrivals_after_barrier = 0,
                _ => {}
            }
        }
        // Earlier checkpoints' barriers the window has not passed: their sequence numbers
        // produce nothing, and no shard will send them again.
        held.extend(self.skip.iter().map(|&seq| HeldEntry {
            seq,
            watermark: None,
            arrivals: 0,
            outputs: vec![],
        }));
        held.sort_by_key(|h| h.seq);
        if self.mode == OutputMode::Ordered {
            self.skip.push_back(aligning.seq);
        }
        for port in &mut self.ports {
            port.passed_checkpoint = false;
        }
        self.aligned = Some(MergeSnapshot {
            checkpoint_id: aligning.id,
            barrier_seq: aligning.seq,
            shards: self.ports.len() as u32,
            mode: mode_code(self.mode),
            base_seq: self.base_seq,
            last_watermark: self.last_watermark,
            held,
            released_in_flight: aligning.released,
        });
        self.marker = Some(aligning.id);
    }

    /// Notes a release while a checkpoint aligns (see `MergeSnapshot::released_in_flight`).
    fn note_release(&mut self, seq: u64) {
        if let Some(a) = &mut self.aligning {
            if seq < a.seq {
                a.released.push(seq);
            }
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

    fn advancing_watermark(&mut self, timestamp: u64) -> Option<Output<O>> {
        if self.last_watermark.is_some_and(|last| timestamp <= last) {
            return None;
        }
        self.last_watermark = Some(timestamp);
        Some(Output::Watermark(timestamp))
    }

    fn seq_of(item: &Emitted<O>) -> u64 {
        match item {
            Emitted::Record { seq, .. } | Emitted::Watermark { seq, .. } => *seq,
        }
    }

    /// Ordered: whether `item` fits the reorder window now.
    fn fits(&self, item: &Emitted<O>) -> bool {
        let seq = Self::seq_of(item);
        assert!(
            seq >= self.base_seq,
            "sequence {seq} arrived twice or out of shard order"
        );
        ((seq - self.base_seq) as usize) < self.window
    }

    /// Ordered: places an item from port `p` that fits in the reorder window.
    fn place(&mut self, p: usize, item: Emitted<O>) {
        let seq = Self::seq_of(&item);
        let after = usize::from(self.ports[p].passed_checkpoint);
        let slot = &mut self.reorder[(seq - self.base_seq) as usize];
        match (item, &mut *slot) {
            (Emitted::Record { outputs, .. }, Pending::Empty) => {
                *slot = Pending::Record {
                    outputs,
                    after_barrier: after == 1,
                }
            }
            (Emitted::Watermark { timestamp, .. }, Pending::Empty) => {
                *slot = Pending::Watermark {
                    timestamp,
                    arrivals: 1,
                    arrivals_after_barrier: after,
                }
            }
            (
                Emitted::Watermark { .. },
                Pending::Watermark {
                    arrivals,
                    arrivals_after_barrier,
                    ..
                },
            ) => {
                *arrivals += 1;
                *arrivals_after_barrier += after;
            }
            _ => panic!("sequence {seq} delivered twice"),
        }
    }

    /// Ordered: releases the head of the window if complete.
    fn pop_ordered(&mut self) -> Option<Option<Output<O>>> {
        let shards = self.ports.len();
        let ready = match self.reorder.front()? {
            // An aligned checkpoint's barrier: nothing to release.
            Pending::Empty => self.skip.front() == Some(&self.base_seq),
            Pending::Record { .. } => true,
            Pending::Watermark { arrivals, .. } => *arrivals == shards,
        };
        if !ready {
            return None;
        }
        let head = self.reorder.pop_front().expect("checked above");
        self.reorder.push_back(Pending::Empty);
        let seq = self.base_seq;
        self.base_seq += 1;
        Some(match head {
            Pending::Record { outputs, .. } => {
                self.note_release(seq);
                self.current = Some((seq, outputs.into_iter()));
                None
            }
            Pending::Watermark { timestamp, .. } => {
                self.note_release(seq);
                self.advancing_watermark(timestamp)
            }
            Pending::Empty => {
                self.skip.pop_front();
                None
            }
        })
    }

    /// Unordered modes: releases the lowest barrier once every live shard waits at one.
    fn release_barrier(&mut self) -> Option<Option<Output<O>>> {
        let mut lowest: Option<(u64, u64)> = None;
        for port in &self.ports {
            match port.barrier {
                Some((seq, ts)) if lowest.is_none_or(|(s, _)| seq < s) => lowest = Some((seq, ts)),
                Some(_) => {}
                None if !port.finished => return None,
                None => {}
            }
        }
        let (seq, timestamp) = lowest?;
        for port in &mut self.ports {
            if port.barrier.is_some_and(|(s, _)| s == seq) {
                port.barrier = None;
            }
        }
        self.note_release(seq);
        Some(self.advancing_watermark(timestamp))
    }

    /// Takes items from the front of port `p`'s buffer while the mode allows. Returns true
    /// when it took anything.
    fn take_from(&mut self, p: usize) -> bool {
        let mut took = false;
        while self.current.is_none() && self.marker.is_none() {
            let Some(front) = self.ports[p].buffer.front() else {
                // The buffer is empty: a checkpoint barrier read after it comes next.
                let Some((seq, id)) = self.ports[p].checkpoint_in else {
                    break;
                };
                self.checkpoint_arrived(p, seq, id);
                self.ports[p].checkpoint_in = None;
                took = true;
                continue;
            };
            match self.mode {
                OutputMode::Ordered => {
                    if !self.fits(front) {
                        break; // beyond the window: wait for the head to advance
                    }
                    let item = self.ports[p].buffer.pop_front().expect("front exists");
                    self.place(p, item);
                }
                OutputMode::Unordered | OutputMode::KeyOrdered => {
                    if self.ports[p].barrier.is_some() {
                        break;
                    }
                    if self.ports[p].passed_checkpoint
                        && self
                            .aligning
                            .as_ref()
                            .is_some_and(|a| Self::seq_of(front) > a.seq)
                    {
                        break; // after the checkpoint: wait for it to align
                    }
                    match self.ports[p].buffer.pop_front().expect("front exists") {
                        Emitted::Record { seq, outputs } => {
                            self.note_release(seq);
                            self.current = Some((seq, outputs.into_iter()))
                        }
                        Emitted::Watermark { seq, timestamp } => {
                            self.ports[p].barrier = Some((seq, timestamp))
                        }
                    }
                }
            }
            took = true;
        }
        took
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
            // Release what the merge already holds.
            let released = match self.mode {
                OutputMode::Ordered => self.pop_ordered(),
                _ => self.release_barrier(),
            };
            if let Some(out) = released {
                if let Some(out) = out {
                    return Poll::Ready(Some(Ok(out)));
                }
                continue;
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
                let port = &mut self.ports[p];
                if port.finished
                    || !port.buffer.is_empty()
                    || port.barrier.is_some()
                    || port.checkpoint_in.is_some()
                {
                    continue;
                }
                match port.rx.try_recv() {
                    Ok(Egress::Items(items)) => {
                        port.buffer.extend(items);
                        progressed = true;
                    }
                    Ok(Egress::Barrier { seq, id }) => {
                        port.checkpoint_in = Some((seq, id));
                        progressed = true;
                    }
                    Ok(Egress::Finished) => {
                        port.finished = true;
                        progressed = true;
                    }
                    Ok(Egress::Failed(error)) => {
                        self.done = true;
                        return Poll::Ready(Some(Err(error)));
                    }
                    Err(flume::TryRecvError::Disconnected) => {
                        self.done = true;
                        return Poll::Ready(Some(Err(StageError::ShardPanicked {
                            shard: p,
                            message: "the shard stopped without finishing (see its panic \
                                      message on stderr)"
                                .into(),
                        })));
                    }
                    Err(flume::TryRecvError::Empty) => {}
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
