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
            pushed_at: Some(Instant::now()),
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
    /// Queues an element as given (its sequence number is kept).
    pub fn element(&self, element: Element<I>) {
        let mut s = self.inner.borrow_mut();
        let seq = match &element {
            Element::Record { seq, .. } | Element::Watermark { seq, .. } => *seq,
        };
        s.next_seq = s.next_seq.max(seq + 1);
        s.items.push_back(element);
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
pub fn config<O, E>(
    capacity: usize,
    timeout_ms: u64,
    mode: sluice::OutputMode,
) -> OperatorConfig<O, E> {
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

/// One input element as the test pushed it: a record (seq, key) or a watermark (seq, ts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum In {
    Rec { seq: u64, key: u64 },
    Wm { seq: u64, ts: u64 },
}

/// One merged output element: the input seq of a record, or a watermark timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    Rec(u64),
    Wm(u64),
}

/// Checks a merged output against the plain model of each mode:
/// - every record exactly once (nothing lost, nothing duplicated);
/// - every watermark once, in increasing order, with every record pushed before it ahead of
///   it and every record pushed after it behind it (the barrier, all modes);
/// - `Ordered`: records in input order; `KeyOrdered`: records of one key in input order.
///
/// Assumes the input's watermarks strictly increase.
pub fn check_merged(mode: sluice::OutputMode, input: &[In], output: &[Out]) {
    use std::collections::HashMap;
    let mut position = HashMap::new();
    for (i, o) in output.iter().enumerate() {
        if let Out::Rec(seq) = o {
            assert!(
                position.insert(*seq, i).is_none(),
                "record {seq} emitted twice"
            );
        }
    }
    let records: Vec<(u64, u64)> = input
        .iter()
        .filter_map(|e| match e {
            In::Rec { seq, key } => Some((*seq, *key)),
            _ => None,
        })
        .collect();
    assert_eq!(
        position.len(),
        records.len(),
        "records lost: output {output:?}"
    );
    for (seq, _) in &records {
        assert!(position.contains_key(seq), "record {seq} lost");
    }
    let wm_pos: HashMap<u64, usize> = output
        .iter()
        .enumerate()
        .filter_map(|(i, o)| match o {
            Out::Wm(ts) => Some((*ts, i)),
            _ => None,
        })
        .collect();
    let in_wms: Vec<(u64, u64)> = input
        .iter()
        .filter_map(|e| match e {
            In::Wm { seq, ts } => Some((*seq, *ts)),
            _ => None,
        })
        .collect();
    let out_wms: Vec<u64> = output
        .iter()
        .filter_map(|o| match o {
            Out::Wm(ts) => Some(*ts),
            _ => None,
        })
        .collect();
    // Watermarks with no record between them form a run. Unordered modes may fold a run into
    // its last watermark; the last of every run always leaves, and ordered mode keeps all.
    let mut must_appear = vec![];
    for (i, e) in input.iter().enumerate() {
        if let In::Wm { ts, .. } = e {
            let next_is_wm = matches!(input.get(i + 1), Some(In::Wm { .. }));
            if !next_is_wm || mode == sluice::OutputMode::Ordered {
                must_appear.push(*ts);
            }
        }
    }
    let mut it = in_wms.iter().map(|w| w.1);
    for ts in &out_wms {
        assert!(
            it.any(|t| t == *ts),
            "watermark {ts} not from the input or out of order"
        );
    }
    for ts in &must_appear {
        assert!(out_wms.contains(ts), "watermark {ts} missing: {output:?}");
    }
    for &(wseq, ts) in &in_wms {
        let Some(&wp) = wm_pos.get(&ts) else { continue };
        for &(seq, _) in &records {
            let rp = position[&seq];
            if seq < wseq {
                assert!(
                    rp < wp,
                    "record {seq} overtaken by watermark {ts}: {output:?}"
                );
            } else {
                assert!(rp > wp, "record {seq} overtook watermark {ts}: {output:?}");
            }
        }
    }
    match mode {
        sluice::OutputMode::Ordered => {
            let order: Vec<u64> = output
                .iter()
                .filter_map(|o| match o {
                    Out::Rec(s) => Some(*s),
                    _ => None,
                })
                .collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(order, sorted, "ordered mode out of input order");
        }
        sluice::OutputMode::KeyOrdered => {
            let mut last: HashMap<u64, u64> = HashMap::new();
            let key_of: HashMap<u64, u64> = records.iter().copied().collect();
            for o in output {
                if let Out::Rec(seq) = o {
                    let key = key_of[seq];
                    if let Some(prev) = last.insert(key, *seq) {
                        assert!(prev < *seq, "key {key}: record {seq} overtook {prev}");
                    }
                }
            }
        }
        sluice::OutputMode::Unordered => {}
    }
}

/// A checkpointed test's input: (logical position, key, latency us).
pub type Input = (u64, u64, u64);

/// The logical input of the checkpoint tests: records with one of 5 keys, a watermark after
/// every 7th record.
pub fn logical_input(records: u64) -> Vec<In> {
    let mut input = vec![];
    let mut ts = 0;
    for i in 0..records {
        let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        input.push(In::Rec {
            seq: input.len() as u64,
            key: h % 5,
        });
        if i % 7 == 6 {
            ts += 10;
            input.push(In::Wm {
                seq: input.len() as u64,
                ts,
            });
        }
    }
    input
}

/// [`Input`] as 24 little-endian bytes in a checkpoint.
pub fn input_codec() -> sluice::checkpoint::Codec<Input> {
    sluice::checkpoint::Codec::new(
        |&(p, k, l): &Input| [p, k, l].iter().flat_map(|v| v.to_le_bytes()).collect(),
        |b| {
            if b.len() != 24 {
                return Err(format!("{} bytes, an input is 24", b.len()));
            }
            let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
            Ok((word(0), word(1), word(2)))
        },
    )
}
