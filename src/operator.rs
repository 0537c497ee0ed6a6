//! `AsyncWait`: Flink's `AsyncWaitOperator` for one shard, as a `Stream` adapter.
//!
//! Owns: a shard's slots (the fixed-capacity element queue), the attempts in flight, retries,
//! timeouts and emission. It pulls `Element`s from its input only while a slot is free, so a
//! full queue is backpressure on the input, never loss; it yields `Emitted` items in the order
//! the mode allows.
//!
//! Invariants:
//! - occupied slots (records in flight or completed but not emitted, plus watermarks)
//!   `<= capacity`; the slots, the queue and the futures' storage are allocated in `new`;
//! - each record's outcome is decided once: by its last attempt, by `on_error`, or by
//!   `timeout` (its deadline passed, or a wanted retry cannot start before it), whichever comes
//!   first; the other paths find the slot already settled;
//! - a retry is scheduled only before the record's deadline, which covers all attempts;
//! - at end of input, pending retry delays fire at once and every entry is emitted (or the
//!   stage fails) before the stream ends (Flink's `endInput`);
//! - after yielding an error the stream ends; nothing is emitted after a failure.

use crate::clock::{Clock, Timer};
use crate::error::{describe_input, StageError};
use crate::function::{AsyncFunction, Fallback, Outputs};
use crate::in_flight::InFlightSet;
use crate::metrics::{MetricsCell, MetricsSnapshot, OperatorMetrics};
use crate::queue::{DeadlineList, ElementQueue, OrderedQueue, SegmentedQueue, WatermarkPush};
use crate::retry::RetryPolicy;
use futures::Stream;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// How results leave the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputMode {
    /// In input order (head-of-line blocking).
    Ordered,
    /// As they complete, between watermarks.
    Unordered,
    /// In input order per key, as they complete across keys, between watermarks.
    KeyOrdered,
}

/// An element entering the operator. Sequence numbers are assigned by the stage's producer
/// (or by the single-threaded adapter) and increase by one per element.
#[derive(Debug, Clone, PartialEq)]
pub enum Element<I> {
    /// A record, with its routing/ordering key and the time it was pushed (`None`: no
    /// queue-wait measurement, as in the single-threaded adapter where it is zero).
    Record {
        seq: u64,
        key: u64,
        input: I,
        pushed_at: Option<Instant>,
    },
    /// An event-time watermark.
    Watermark { seq: u64, timestamp: u64 },
}

/// An element leaving the operator.
#[derive(Debug, Clone, PartialEq)]
pub enum Emitted<O> {
    /// The outcome of the record with sequence number `seq`.
    Record { seq: u64, outputs: Outputs<O> },
    /// A watermark, after every record pushed before it.
    Watermark { seq: u64, timestamp: u64 },
}

/// The operator's settings.
pub struct OperatorConfig<O, E> {
    /// Slots in the element queue: in-flight records plus completed-but-unemitted ones plus
    /// watermarks (Flink's `capacity`, default 100).
    pub capacity: NonZeroUsize,
    /// Covers every attempt of a record, from its first invoke.
    pub timeout: Duration,
    /// Emission order.
    pub mode: OutputMode,
    /// Retries and their backoff.
    pub retry: RetryPolicy<O, E>,
    /// Seeds the backoff jitter, for reproducible runs.
    pub seed: u64,
}

impl<O, E> Clone for OperatorConfig<O, E> {
    fn clone(&self) -> Self {
        OperatorConfig {
            capacity: self.capacity,
            timeout: self.timeout,
            mode: self.mode,
            retry: self.retry.clone(),
            seed: self.seed,
        }
    }
}

impl<O, E> OperatorConfig<O, E> {
    /// Ordered, capacity 100 and a 10 s timeout, no retries.
    pub fn new() -> Self {
        OperatorConfig {
            capacity: NonZeroUsize::new(100).expect("non-zero"),
            timeout: Duration::from_secs(10),
            mode: OutputMode::Ordered,
            retry: RetryPolicy::none(),
            seed: 0x5eed,
        }
    }
}

impl<O, E> Default for OperatorConfig<O, E> {
    fn default() -> Self {
        Self::new()
    }
}

enum SlotState<O> {
    Free,
    Running,
    Backoff,
    Done(Outputs<O>),
    Watermark(u64),
}

struct Slot<I, O> {
    seq: u64,
    key: u64,
    input: Option<I>,
    state: SlotState<O>,
    attempt: u32,
    previous_delay: Duration,
    first_invoke_at: Instant,
}

type AttemptOutcome<F> = Result<Outputs<<F as AsyncFunction>::Out>, <F as AsyncFunction>::Error>;

/// See the module documentation. Build one with [`AsyncWait::new`].
pub struct AsyncWait<S, F: AsyncFunction, C: Clock> {
    input: S,
    input_done: bool,
    func: F,
    closed: bool,
    clock: C,
    timer: C::Timer,
    timeout: Duration,
    retry: RetryPolicy<F::Out, F::Error>,
    rng: fastrand::Rng,
    slots: Box<[Slot<F::In, F::Out>]>,
    free: Vec<u32>,
    in_flight: InFlightSet<F::Future>,
    deadlines: DeadlineList,
    retries: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    queue: ElementQueue,
    /// Reused buffer for attempts finished in one poll.
    finished: Vec<(u32, AttemptOutcome<F>)>,
    failure: Option<StageError>,
    terminated: bool,
    metrics: OperatorMetrics,
    /// The clock read once per few polls: reading it per record costs as much as the rest of
    /// the operator's per-record work. See `refresh_now`.
    now: Instant,
    polls_since_now: u32,
}

/// A busy operator re-reads the clock at least every this many polls; an operator that went
/// pending re-reads it on its next poll. So `now` lags real time by at most the time of this
/// many polls (microseconds), never across a wait.
const POLLS_PER_CLOCK_READ: u32 = 16;

impl<S, F, C> AsyncWait<S, F, C>
where
    S: Stream<Item = Element<F::In>> + Unpin,
    F: AsyncFunction,
    C: Clock,
{
    /// An operator reading `input`, calling `func`, timed by `clock`.
    pub fn new(input: S, func: F, config: OperatorConfig<F::Out, F::Error>, clock: C) -> Self {
        Self::with_metrics(input, func, config, clock, None)
    }

    pub(crate) fn with_metrics(
        input: S,
        func: F,
        config: OperatorConfig<F::Out, F::Error>,
        clock: C,
        metrics: Option<MetricsCell>,
    ) -> Self {
        let capacity = config.capacity.get();
        assert!(capacity < u32::MAX as usize, "capacity must fit slot ids");
        let queue = match config.mode {
            OutputMode::Ordered => ElementQueue::Ordered(OrderedQueue::new(capacity)),
            OutputMode::Unordered => ElementQueue::Segmented(SegmentedQueue::new(capacity, false)),
            OutputMode::KeyOrdered => ElementQueue::Segmented(SegmentedQueue::new(capacity, true)),
        };
        let now = clock.now();
        AsyncWait {
            input,
            input_done: false,
            func,
            closed: false,
            timer: clock.timer(),
            clock,
            timeout: config.timeout,
            retry: config.retry,
            rng: fastrand::Rng::with_seed(config.seed),
            slots: (0..capacity)
                .map(|_| Slot {
                    seq: 0,
                    key: 0,
                    input: None,
                    state: SlotState::Free,
                    attempt: 0,
                    previous_delay: Duration::ZERO,
                    first_invoke_at: now,
                })
                .collect(),
            // Popped from the end: slot 0 is used first.
            free: (0..capacity as u32).rev().collect(),
            in_flight: InFlightSet::new(capacity),
            deadlines: DeadlineList::new(capacity),
            retries: BinaryHeap::with_capacity(capacity),
            queue,
            finished: Vec::with_capacity(capacity),
            failure: None,
            terminated: false,
            metrics: OperatorMetrics::new(metrics),
            now,
            polls_since_now: POLLS_PER_CLOCK_READ,
        }
    }

    /// Occupied slots: records in flight or awaiting emission, and watermarks.
    pub fn occupied(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Attempts whose futures are currently alive.
    pub fn attempts_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The instant the operator's timer is armed for (earliest deadline or retry), if any.
    /// `None` once every record settled: no timer is left behind.
    pub fn armed_until(&self) -> Option<Instant> {
        self.next_wake()
    }

    /// This operator's metrics so far.
    pub fn metrics(&self) -> &MetricsSnapshot {
        &self.metrics.local
    }

    /// The entries whose results have not left this operator (records in flight, backing off,
    /// or completed but not yet emitted, and watermarks still queued), in sequence order, with
    /// inputs encoded by `encode`. Re-issuing them (see [`restore_elements`]) before any new
    /// input gives exactly-once results, as Flink's `AsyncWaitOperator.snapshotState` does.
    pub fn snapshot(
        &self,
        encode: impl Fn(&F::In) -> Vec<u8>,
    ) -> Vec<crate::checkpoint::EntrySnapshot> {
        let mut entries: Vec<_> = self
            .slots
            .iter()
            .filter_map(|s| match (&s.state, &s.input) {
                (SlotState::Free, _) => None,
                (SlotState::Watermark(ts), _) => Some(crate::checkpoint::EntrySnapshot {
                    seq: s.seq,
                    key: 0,
                    attempts: 0,
                    watermark: Some(*ts),
                    input: vec![],
                }),
                (_, Some(input)) => Some(crate::checkpoint::EntrySnapshot {
                    seq: s.seq,
                    key: s.key,
                    attempts: s.attempt,
                    watermark: None,
                    input: encode(input),
                }),
                (_, None) => panic!("an occupied record slot holds its input"),
            })
            .collect();
        entries.sort_by_key(|e| e.seq);
        entries
    }

    /// A shard's part of checkpoint `checkpoint_id`, taken where its input stopped at the
    /// barrier: [`Self::snapshot`], after which the next watermark no longer folds into one the
    /// snapshot holds (restore re-issues that one under its own sequence number).
    pub(crate) fn checkpoint(
        &mut self,
        checkpoint_id: u64,
        shard: usize,
        encode: impl Fn(&F::In) -> Vec<u8>,
    ) -> crate::checkpoint::ShardSnapshot {
        let entries = self.snapshot(encode);
        self.queue.seal();
        crate::checkpoint::ShardSnapshot {
            checkpoint_id,
            shard: shard as u32,
            entries,
        }
    }

    /// Runs the function's `close` (once) and publishes the final metrics.
    pub fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            self.func.close();
            self.metrics.publish(self.occupied());
        }
    }

    fn accept(&mut self, element: Element<F::In>, now: Instant) {
        match element {
            Element::Record {
                seq,
                key,
                input,
                pushed_at,
            } => {
                let slot = self.free.pop().expect("accept is called with a free slot");
                self.metrics.local.records_in += 1;
                if let Some(pushed_at) = pushed_at {
                    OperatorMetrics::record_latency(
                        &mut self.metrics.local.queue_wait_us,
                        now.saturating_duration_since(pushed_at),
                    );
                }
                let s = &mut self.slots[slot as usize];
                s.seq = seq;
                s.key = key;
                s.input = Some(input);
                s.attempt = 0;
                s.previous_delay = Duration::ZERO;
                s.first_invoke_at = now;
                self.deadlines.push_back(slot, now + self.timeout);
                self.queue.push_record(slot, key);
                self.start_attempt(slot, now);
            }
            Element::Watermark { seq, timestamp } => {
                let slot = *self.free.last().expect("accept is called with a free slot");
                match self.queue.push_watermark(slot) {
                    WatermarkPush::Took => {
                        self.free.pop();
                        let s = &mut self.slots[slot as usize];
                        s.seq = seq;
                        s.state = SlotState::Watermark(timestamp);
                    }
                    WatermarkPush::MergedInto(earlier) => {
                        let s = &mut self.slots[earlier as usize];
                        let SlotState::Watermark(previous) = s.state else {
                            panic!("a merged watermark slot must hold a watermark");
                        };
                        s.seq = seq;
                        s.state = SlotState::Watermark(previous.max(timestamp));
                    }
                }
            }
        }
    }

    fn start_attempt(&mut self, slot: u32, now: Instant) {
        let s = &mut self.slots[slot as usize];
        s.attempt += 1;
        s.state = SlotState::Running;
        let fut = self
            .func
            .invoke(s.input.as_ref().expect("a running slot holds its input"));
        if let Some(outcome) = self.in_flight.insert_and_poll(slot, fut) {
            self.on_attempt_done(slot, outcome, now);
        }
    }

    /// Decides what a finished attempt means: another attempt, or the record's outcome.
    fn on_attempt_done(
        &mut self,
        slot: u32,
        outcome: Result<Outputs<F::Out>, F::Error>,
        now: Instant,
    ) {
        let s = &mut self.slots[slot as usize];
        debug_assert!(matches!(s.state, SlotState::Running));
        if outcome.is_err() {
            self.metrics.local.failures += 1;
        }
        let view = outcome.as_ref().map(Outputs::as_slice);
        if self.retry.wants_retry(s.attempt, &view) {
            let delay = if self.input_done {
                Duration::ZERO
            } else {
                self.retry
                    .backoff()
                    .delay(s.attempt, s.previous_delay, &mut self.rng)
            };
            let deadline = self
                .deadlines
                .deadline(slot)
                .expect("running slot has a deadline");
            let retry_at = now + delay;
            if retry_at < deadline {
                s.state = SlotState::Backoff;
                s.previous_delay = delay;
                self.retries.push(Reverse((retry_at, s.seq, slot)));
                return;
            }
            // No further attempt can start before the deadline: the record times out now
            // rather than idling until then (Flink calls `timeout()` when the deadline passes
            // during a retry wait).
            self.time_out(slot);
            return;
        }
        match outcome {
            Ok(outputs) => self.settle(slot, outputs),
            Err(error) => {
                let input = s.input.as_ref().expect("running slot holds its input");
                match self.func.on_error(input, &error) {
                    Fallback::Emit(outputs) => self.settle(slot, outputs),
                    Fallback::Fail => {
                        let error = StageError::Function {
                            seq: s.seq,
                            input: describe_input(input),
                            attempts: s.attempt,
                            source: Box::new(error),
                        };
                        self.failure.get_or_insert(error);
                    }
                }
            }
        }
    }

    fn settle(&mut self, slot: u32, outputs: Outputs<F::Out>) {
        self.slots[slot as usize].state = SlotState::Done(outputs);
        self.deadlines.remove(slot);
        self.queue.on_complete(slot);
    }

    /// Starts every retry whose delay has passed. Returns whether any started.
    fn fire_retries(&mut self, now: Instant) -> bool {
        let mut fired = false;
        while let Some(&Reverse((at, seq, slot))) = self.retries.peek() {
            if at > now && !self.input_done {
                break;
            }
            self.retries.pop();
            let s = &self.slots[slot as usize];
            if s.seq != seq || !matches!(s.state, SlotState::Backoff) {
                continue; // settled by its deadline meanwhile
            }
            self.metrics.local.retries += 1;
            fired = true;
            self.start_attempt(slot, now);
        }
        fired
    }

    /// Applies the timeout to every record whose deadline has passed. Returns whether any did.
    fn expire_deadlines(&mut self, now: Instant) -> bool {
        let mut expired = false;
        while let Some((slot, deadline)) = self.deadlines.front() {
            if deadline > now || self.failure.is_some() {
                break;
            }
            expired = true;
            self.time_out(slot);
        }
        expired
    }

    /// Settles a pending record by its timeout handler; cancels its attempt if one runs.
    fn time_out(&mut self, slot: u32) {
        self.deadlines.remove(slot);
        self.in_flight.cancel(slot);
        self.metrics.local.timeouts += 1;
        let s = &mut self.slots[slot as usize];
        // A pending retry is now stale: `fire_retries` skips slots that are not in Backoff.
        s.state = SlotState::Running;
        let input = s.input.as_ref().expect("pending slot holds its input");
        match self.func.timeout(input) {
            Fallback::Emit(outputs) => self.settle(slot, outputs),
            Fallback::Fail => {
                let error = StageError::Timeout {
                    seq: s.seq,
                    input: describe_input(input),
                    timeout: self.timeout,
                };
                self.failure.get_or_insert(error);
            }
        }
    }

    fn emit(&mut self, slot: u32, now: Instant) -> Emitted<F::Out> {
        self.free.push(slot);
        let occupied = self.slots.len() - self.free.len();
        let s = &mut self.slots[slot as usize];
        let state = std::mem::replace(&mut s.state, SlotState::Free);
        s.input = None;
        match state {
            SlotState::Done(outputs) => {
                let latency = now.saturating_duration_since(s.first_invoke_at);
                if self.metrics.emitted(latency, occupied) {
                    self.func.metrics_published();
                }
                Emitted::Record {
                    seq: s.seq,
                    outputs,
                }
            }
            SlotState::Watermark(timestamp) => Emitted::Watermark {
                seq: s.seq,
                timestamp,
            },
            _ => panic!("the queue released slot {slot} before its outcome was decided"),
        }
    }

    fn refresh_now(&mut self) {
        self.now = self.clock.now();
        self.polls_since_now = 0;
    }

    fn next_wake(&self) -> Option<Instant> {
        let deadline = self.deadlines.front().map(|(_, at)| at);
        let retry = self.retries.peek().map(|Reverse((at, _, _))| *at);
        match (deadline, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The elements to feed a restored operator first, in their original order, from a snapshot
/// taken with [`AsyncWait::snapshot`]; `decode` inverts the snapshot's `encode`. Chain the
/// source, resumed after the last element the snapshotted operator had taken, behind them.
pub fn restore_elements<I, E>(
    entries: &[crate::checkpoint::EntrySnapshot],
    decode: impl Fn(&[u8]) -> Result<I, E>,
) -> Result<Vec<Element<I>>, E> {
    let now = Instant::now();
    entries
        .iter()
        .map(|e| element_of(e, now, &decode))
        .collect()
}

/// One snapshot entry back as the element it was, pushed at `now`.
pub(crate) fn element_of<I, E>(
    e: &crate::checkpoint::EntrySnapshot,
    now: Instant,
    decode: impl Fn(&[u8]) -> Result<I, E>,
) -> Result<Element<I>, E> {
    Ok(match e.watermark {
        Some(timestamp) => Element::Watermark {
            seq: e.seq,
            timestamp,
        },
        None => Element::Record {
            seq: e.seq,
            key: e.key,
            input: decode(&e.input)?,
            pushed_at: Some(now),
        },
    })
}

// No field is ever pinned: the attempt futures live in the boxed in-flight set, the input is
// `Unpin` by bound, and the function, clock and timer are only used through `&mut`.
impl<S: Unpin, F: AsyncFunction, C: Clock> Unpin for AsyncWait<S, F, C> {}

impl<S, F, C> Stream for AsyncWait<S, F, C>
where
    S: Stream<Item = Element<F::In>> + Unpin,
    F: AsyncFunction,
    C: Clock,
{
    type Item = Result<Emitted<F::Out>, StageError>;

    /// Over 70 lines: the operator's one turn (admit input, poll the ready slots, expire
    /// deadlines, release outputs) on the per-record path; its steps share the borrowed state,
    /// and one function keeps their order, which the invariants depend on, in view.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.terminated {
            return Poll::Ready(None);
        }
        this.polls_since_now += 1;
        if this.polls_since_now >= POLLS_PER_CLOCK_READ {
            this.refresh_now();
        }
        loop {
            let now = this.now;
            let mut progressed = false;

            // 1. Take input while a slot is free (a full queue is backpressure).
            while !this.input_done && this.failure.is_none() && !this.free.is_empty() {
                match Pin::new(&mut this.input).poll_next(cx) {
                    Poll::Ready(Some(element)) => {
                        this.accept(element, now);
                        progressed = true;
                    }
                    Poll::Ready(None) => {
                        this.input_done = true;
                        progressed = true;
                    }
                    Poll::Pending => break,
                }
            }

            // 2. Emit what the mode allows.
            if let Some(error) = this.failure.take() {
                this.terminated = true;
                this.retries.clear();
                for slot in 0..this.slots.len() as u32 {
                    this.in_flight.cancel(slot);
                }
                this.metrics.publish(this.occupied());
                return Poll::Ready(Some(Err(error)));
            }
            if let Some(slot) = this.queue.pop() {
                return Poll::Ready(Some(Ok(this.emit(slot, now))));
            }

            // 3. Poll the attempts that were woken.
            let mut finished = std::mem::take(&mut this.finished);
            if this.in_flight.len() > 0 {
                this.in_flight
                    .poll_woken(cx, |slot, outcome| finished.push((slot, outcome)));
            }
            progressed |= !finished.is_empty();
            for (slot, outcome) in finished.drain(..) {
                this.on_attempt_done(slot, outcome, now);
            }
            this.finished = finished;

            // 4. Timers: retries first (they are due strictly before their deadline).
            progressed |= this.fire_retries(now);
            progressed |= this.expire_deadlines(now);

            if progressed {
                continue;
            }
            if this.input_done && this.queue.len() == 0 {
                debug_assert_eq!(this.occupied(), 0, "an empty queue holds no slot");
                this.terminated = true;
                this.metrics.publish(0);
                return Poll::Ready(None);
            }
            if this.metrics.publish_if_stale(now, this.occupied()) {
                this.func.metrics_published();
            }
            let wake = match (this.next_wake(), this.metrics.publish_due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(at) = wake {
                if this.timer.poll_at(at, cx).is_ready() {
                    this.refresh_now();
                    continue;
                }
            }
            // Time passes while pending: read the clock on the next poll.
            this.polls_since_now = POLLS_PER_CLOCK_READ;
            return Poll::Pending;
        }
    }
}
