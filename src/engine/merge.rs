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

use crate::error::StageError;
use crate::function::OutputsIter;
use crate::operator::{Emitted, OutputMode};
use futures::{Stream, StreamExt};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What a shard sends to the merge.
pub(crate) enum Egress<O> {
    /// Outputs in the shard's emission order.
    Items(Vec<Emitted<O>>),
    Failed(StageError),
    Finished,
}

/// One element of the merged output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<O> {
    /// An output of the input record with sequence number `seq`.
    Record { seq: u64, value: O },
    /// The merged event-time watermark: no later output belongs before it.
    Watermark(u64),
}

struct Port<O: 'static> {
    rx: flume::r#async::RecvStream<'static, Egress<O>>,
    buffer: VecDeque<Emitted<O>>,
    finished: bool,
    /// Unordered modes: the watermark (seq, timestamp) this shard is waiting at.
    barrier: Option<(u64, u64)>,
}

enum Pending<O> {
    Empty,
    Record(crate::function::Outputs<O>),
    Watermark { timestamp: u64, arrivals: usize },
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
}

impl<O: 'static> Consumer<O> {
    pub(crate) fn new(
        receivers: Vec<flume::Receiver<Egress<O>>>,
        mode: OutputMode,
        window: usize,
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
                    rx: rx.into_stream(),
                    buffer: VecDeque::new(),
                    finished: false,
                    barrier: None,
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
        }
    }

    /// The next output, blocking the calling thread; `None` once the stage finished.
    pub fn recv(&mut self) -> Option<Result<Output<O>, StageError>> {
        futures::executor::block_on(self.next())
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

    /// Ordered: places an item that fits in the reorder window.
    fn place(&mut self, item: Emitted<O>) {
        let seq = Self::seq_of(&item);
        let slot = &mut self.reorder[(seq - self.base_seq) as usize];
        match (item, &mut *slot) {
            (Emitted::Record { outputs, .. }, Pending::Empty) => *slot = Pending::Record(outputs),
            (Emitted::Watermark { timestamp, .. }, Pending::Empty) => {
                *slot = Pending::Watermark {
                    timestamp,
                    arrivals: 1,
                }
            }
            (Emitted::Watermark { .. }, Pending::Watermark { arrivals, .. }) => *arrivals += 1,
            _ => panic!("sequence {seq} delivered twice"),
        }
    }

    /// Ordered: releases the head of the window if complete.
    fn pop_ordered(&mut self) -> Option<Option<Output<O>>> {
        let shards = self.ports.len();
        let ready = match self.reorder.front()? {
            Pending::Empty => false,
            Pending::Record(_) => true,
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
            Pending::Record(outputs) => {
                self.current = Some((seq, outputs.into_iter()));
                None
            }
            Pending::Watermark { timestamp, .. } => self.advancing_watermark(timestamp),
            Pending::Empty => unreachable!(),
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
        Some(self.advancing_watermark(timestamp))
    }

    /// Takes items from the front of port `p`'s buffer while the mode allows. Returns true
    /// when it took anything.
    fn take_from(&mut self, p: usize) -> bool {
        let mut took = false;
        while self.current.is_none() {
            let Some(front) = self.ports[p].buffer.front() else {
                break;
            };
            match self.mode {
                OutputMode::Ordered => {
                    if !self.fits(front) {
                        break; // beyond the window: wait for the head to advance
                    }
                    let item = self.ports[p].buffer.pop_front().expect("front exists");
                    self.place(item);
                }
                OutputMode::Unordered | OutputMode::KeyOrdered => {
                    if self.ports[p].barrier.is_some() {
                        break;
                    }
                    match self.ports[p].buffer.pop_front().expect("front exists") {
                        Emitted::Record { seq, outputs } => {
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
        loop {
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
                if port.finished || !port.buffer.is_empty() || port.barrier.is_some() {
                    continue;
                }
                match port.rx.poll_next_unpin(cx) {
                    Poll::Ready(Some(Egress::Items(items))) => {
                        port.buffer.extend(items);
                        progressed = true;
                    }
                    Poll::Ready(Some(Egress::Finished)) => {
                        port.finished = true;
                        progressed = true;
                    }
                    Poll::Ready(Some(Egress::Failed(error))) => {
                        self.done = true;
                        return Poll::Ready(Some(Err(error)));
                    }
                    Poll::Ready(None) => {
                        self.done = true;
                        return Poll::Ready(Some(Err(StageError::ShardPanicked {
                            shard: p,
                            message: "the shard stopped without finishing (see its panic \
                                      message on stderr)"
                                .into(),
                        })));
                    }
                    Poll::Pending => {}
                }
            }
            if progressed {
                continue;
            }
            if self.ports.iter().all(|p| p.finished && p.buffer.is_empty()) {
                self.done = true;
                return Poll::Ready(None);
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

// Nothing in the consumer is pinned: flume's streams are Unpin and outputs are plain values.
impl<O: 'static> Unpin for Consumer<O> {}
