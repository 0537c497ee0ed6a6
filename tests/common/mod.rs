//! Deterministic poll-level harness: a simulated clock, a source the test feeds by hand, and
//! simulated lookups whose latency and failures the test chooses.
#![allow(dead_code)]

use futures::task::noop_waker;
use futures::Stream;
use sluice::clock::SimClock;
use sluice::{AsyncFunction, AsyncWait, Element, Emitted, OperatorConfig, StageError};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A source the test fills; the operator drains it only while it has a free slot.
pub struct Source<I> {
    inner: Rc<RefCell<SourceState<I>>>,
}

impl<I> Clone for Source<I> {
    fn clone(&self) -> Self {
        Source {
            inner: self.inner.clone(),
        }
    }
}

impl<I> Default for Source<I> {
    fn default() -> Self {
        Self::new()
    }
}

struct SourceState<I> {
    items: VecDeque<Element<I>>,
    closed: bool,
    next_seq: u64,
    waker: Option<Waker>,
}

impl<I> Default for SourceState<I> {
    fn default() -> Self {
        SourceState {
            items: VecDeque::new(),
            closed: false,
            next_seq: 0,
            waker: None,
        }
    }
}

impl<I> Source<I> {
    pub fn new() -> Self {
        Source {
            inner: Rc::new(RefCell::new(SourceState::default())),
        }
    }
    /// Queues a record keyed by `key`; returns its sequence number.
    pub fn record_keyed(&self, input: I, key: u64) -> u64 {
        let mut s = self.inner.borrow_mut();
        let seq = s.next_seq;
        s.next_seq += 1;
        s.items.push_back(Element::Record {
            seq,
            key,
            input,
            pushed_at: Instant::now(),
        });
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        seq
    }
    pub fn record(&self, input: I) -> u64 {
        let key = self.inner.borrow().next_seq;
        self.record_keyed(input, key)
    }
    pub fn watermark(&self, timestamp: u64) -> u64 {
        let mut s = self.inner.borrow_mut();
        let seq = s.next_seq;
        s.next_seq += 1;
        s.items.push_back(Element::Watermark { seq, timestamp });
        seq
    }
    pub fn close(&self) {
        self.inner.borrow_mut().closed = true;
    }
    /// Elements not yet taken by the operator.
    pub fn waiting(&self) -> usize {
        self.inner.borrow().items.len()
    }
}

impl<I> Stream for Source<I> {
    type Item = Element<I>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Element<I>>> {
        let mut s = self.inner.borrow_mut();
        match s.items.pop_front() {
            Some(e) => Poll::Ready(Some(e)),
            None if s.closed => Poll::Ready(None),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// What one drain of the operator saw.
#[derive(Debug)]
pub struct Drained<O> {
    pub items: Vec<Emitted<O>>,
    pub error: Option<StageError>,
    pub ended: bool,
}

/// Polls `op` until it is pending or ended.
pub fn drain<S, F>(op: &mut AsyncWait<S, F, SimClock>) -> Drained<F::Out>
where
    S: Stream<Item = Element<F::In>> + Unpin,
    F: AsyncFunction,
{
    let waker = noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut out = Drained {
        items: vec![],
        error: None,
        ended: false,
    };
    for _ in 0..1_000_000 {
        match Pin::new(&mut *op).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(e))) => out.items.push(e),
            Poll::Ready(Some(Err(e))) => out.error = Some(e),
            Poll::Ready(None) => {
                out.ended = true;
                return out;
            }
            Poll::Pending => return out,
        }
    }
    panic!("operator kept yielding: a livelock");
}

/// Drives `op` with the clock until the stream ends; steps of `step`, at most `max_steps`.
pub fn run_to_end<S, F>(
    op: &mut AsyncWait<S, F, SimClock>,
    clock: &SimClock,
    step: Duration,
    max_steps: usize,
) -> Drained<F::Out>
where
    S: Stream<Item = Element<F::In>> + Unpin,
    F: AsyncFunction,
{
    let mut all = Drained {
        items: vec![],
        error: None,
        ended: false,
    };
    for _ in 0..max_steps {
        let d = drain(op);
        all.items.extend(d.items);
        if d.error.is_some() {
            all.error = d.error;
        }
        if d.ended {
            all.ended = true;
            return all;
        }
        clock.advance(step);
    }
    panic!("operator did not finish within {max_steps} steps: a hang");
}

/// Sequence numbers and watermarks in emission order, as compact tokens: `R<seq>` / `W<ts>`.
pub fn tokens<O>(items: &[Emitted<O>]) -> Vec<String> {
    items
        .iter()
        .map(|e| match e {
            Emitted::Record { seq, .. } => format!("R{seq}"),
            Emitted::Watermark { timestamp, .. } => format!("W{timestamp}"),
        })
        .collect()
}

/// A config with the given capacity, timeout and mode.
pub fn config<O, E>(capacity: usize, timeout_ms: u64, mode: sluice::OutputMode) -> OperatorConfig<O, E> {
    let mut c = OperatorConfig::new();
    c.capacity = std::num::NonZeroUsize::new(capacity).expect("non-zero capacity");
    c.timeout = Duration::from_millis(timeout_ms);
    c.mode = mode;
    c
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The error a simulated lookup fails with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("simulated lookup failure: {0}")]
pub struct SimError(pub &'static str);
