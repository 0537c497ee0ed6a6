//! Conformance with Flink's `AsyncWaitOperatorTest`, one behaviour per test, on a simulated
//! clock with simulated lookups (deterministic: no wall time, no threads).

mod common;

use common::*;
use sluice::clock::SimClock;
use sluice::{
    from_fn, AsyncFunction, AsyncWait, Emitted, Fallback, Jitter, OutputMode, Outputs, RetryPolicy,
    StageError,
};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Input: (value, latency in ms). Output: value * 10 after the latency.
fn delayed(clock: &SimClock) -> impl AsyncFunction<In = (u64, u64), Out = u64, Error = SimError> {
    let clock = clock.clone();
    from_fn(move |&(value, latency_ms): &(u64, u64)| {
        let sleep = clock.sleep(ms(latency_ms));
        async move {
            sleep.await;
            Ok::<_, SimError>(Outputs::One(value * 10))
        }
    })
}

fn op_with<F: AsyncFunction>(
    clock: &SimClock,
    source: &Source<F::In>,
    func: F,
    config: sluice::OperatorConfig<F::Out, F::Error>,
) -> AsyncWait<Source<F::In>, F, SimClock> {
    AsyncWait::new(source.clone(), func, config, clock.clone())
}

fn outputs(items: &[Emitted<u64>]) -> Vec<u64> {
    items
        .iter()
        .flat_map(|e| match e {
            Emitted::Record { outputs, .. } => outputs.as_slice().to_vec(),
            Emitted::Watermark { .. } => vec![],
        })
        .collect()
}

#[test]
fn event_time_ordered() {
    let clock = SimClock::new();
    let source = Source::new();
    let mut op = op_with(
        &clock,
        &source,
        delayed(&clock),
        config(10, 1_000, OutputMode::Ordered),
    );
    source.record((1, 30));
    source.record((2, 10));
    source.watermark(2);
    source.record((3, 20));
    source.record((4, 5));
    source.watermark(4);
    source.record((5, 1));
    source.close();
    let out = run_to_end(&mut op, &clock, ms(1), 1_000);
    assert!(out.error.is_none());
    assert_eq!(
        tokens(&out.items),
        ["R0", "R1", "W2", "R3", "R4", "W4", "R6"]
    );
    assert_eq!(outputs(&out.items), [10, 20, 30, 40, 50]);
}

#[test]
fn watermark_in_unordered_stays_between_its_records() {
    let clock = SimClock::new();
    let source = Source::new();
    let mut op = op_with(
        &clock,
        &source,
        delayed(&clock),
        config(10, 1_000, OutputMode::Unordered),
    );
    source.record((1, 30));
    source.record((2, 10));
    source.watermark(2);
    source.record((3, 1)); // fastest of all, but after the watermark
    source.record((4, 5));
    source.close();
    let out = run_to_end(&mut op, &clock, ms(1), 1_000);
    assert!(out.error.is_none());
    // Inside a segment records leave as they complete; nothing crosses the watermark.
    assert_eq!(tokens(&out.items), ["R1", "R0", "W2", "R3", "R4"]);
}

fn processing_time_with_capacity_smaller_than_input(mode: OutputMode) -> Vec<String> {
    let clock = SimClock::new();
    let source = Source::new();
    let max_occupied = Rc::new(Cell::new(0));
    let mut op = op_with(&clock, &source, delayed(&clock), config(3, 10_000, mode));
    // Latencies chosen so completion order differs from input order.
    let latencies = [9, 3, 7, 1, 8, 2, 6, 4, 5, 3];
    for (i, &lat) in latencies.iter().enumerate() {
        source.record((i as u64, lat));
    }
    source.close();
    let mut items = vec![];
    for _ in 0..1_000 {
        let d = drain(&mut op);
        max_occupied.set(max_occupied.get().max(op.occupied()));
        items.extend(d.items);
        assert!(d.error.is_none());
        if d.ended {
            break;
        }
        clock.advance(ms(1));
    }
    assert!(max_occupied.get() <= 3, "in flight never exceeds capacity");
    assert_eq!(max_occupied.get(), 3, "the capacity is really used");
    let mut values = outputs(&items);
    assert_eq!(values.len(), latencies.len(), "nothing lost or duplicated");
    values.sort();
    assert_eq!(values, (0..10).map(|v| v * 10).collect::<Vec<_>>());
    tokens(&items)
}

#[test]
fn processing_time_ordered_with_capacity_smaller_than_input() {
    let order = processing_time_with_capacity_smaller_than_input(OutputMode::Ordered);
    assert_eq!(order, (0..10).map(|i| format!("R{i}")).collect::<Vec<_>>());
}

#[test]
fn processing_time_unordered_with_capacity_smaller_than_input() {
    let order = processing_time_with_capacity_smaller_than_input(OutputMode::Unordered);
    assert_ne!(
        order,
        (0..10).map(|i| format!("R{i}")).collect::<Vec<_>>(),
        "unordered lets faster records overtake"
    );
}

#[test]
fn queue_full_blocks_and_resumes_after_one_completion() {
    let clock = SimClock::new();
    let source = Source::new();
    let mut op = op_with(
        &clock,
        &source,
        delayed(&clock),
        config(2, 1_000, OutputMode::Unordered),
    );
    source.record((1, 50));
    source.record((2, 10));
    source.record((3, 50));
    source.record((4, 50));
    let d = drain(&mut op);
    assert!(d.items.is_empty());
    assert_eq!(op.occupied(), 2);
    assert_eq!(
        source.waiting(),
        2,
        "the full queue stops taking input; nothing dropped"
    );
    clock.advance(ms(10));
    let d = drain(&mut op);
    assert_eq!(tokens(&d.items), ["R1"]);
    assert_eq!(source.waiting(), 1, "one completion frees exactly one slot");
    assert_eq!(op.occupied(), 2);
}

#[test]
fn default_timeout_fails_with_error_naming_the_input() {
    let clock = SimClock::new();
    let source = Source::new();
    let mut op = op_with(
        &clock,
        &source,
        delayed(&clock),
        config(4, 100, OutputMode::Ordered),
    );
    source.record((77, 10));
    source.record((4242, 500));
    source.close();
    let out = run_to_end(&mut op, &clock, ms(10), 100);
    assert_eq!(tokens(&out.items), ["R0"]);
    match out.error {
        Some(StageError::Timeout {
            seq,
            ref input,
            timeout,
        }) => {
            assert_eq!(seq, 1);
            assert_eq!(timeout, ms(100));
            assert!(input.contains("4242"), "error names the input: {input}");
        }
        other => panic!("expected a timeout error, got {other:?}"),
    }
    let message = out.error.unwrap().to_string();
    assert!(
        message.contains("4242") && message.contains("timed out"),
        "{message}"
    );
}

/// Times out every record with latency >= 100 and emits the fallback the test chooses.
struct WithFallback {
    clock: SimClock,
    fallback: Fallback<u64>,
    timeouts: Rc<Cell<u32>>,
}

impl AsyncFunction for WithFallback {
    type In = (u64, u64);
    type Out = u64;
    type Error = SimError;
    type Future = futures::future::LocalBoxFuture<'static, Result<Outputs<u64>, SimError>>;
    fn invoke(&self, &(value, latency): &(u64, u64)) -> Self::Future {
        let sleep = self.clock.sleep(ms(latency));
        Box::pin(async move {
            sleep.await;
            Ok(Outputs::One(value))
        })
    }
    fn timeout(&self, _input: &(u64, u64)) -> Fallback<u64> {
        self.timeouts.set(self.timeouts.get() + 1);
        self.fallback.clone()
    }
}

#[test]
fn overridden_timeout_emits_the_fallback() {
    let clock = SimClock::new();
    let source = Source::new();
    let timeouts = Rc::new(Cell::new(0));
    let func = WithFallback {
        clock: clock.clone(),
        fallback: Fallback::Emit(Outputs::One(999)),
        timeouts: timeouts.clone(),
    };
    let mut op = op_with(&clock, &source, func, config(4, 100, OutputMode::Ordered));
    source.record((1, 10));
    source.record((2, 500));
    source.record((3, 10));
    source.close();
    let out = run_to_end(&mut op, &clock, ms(10), 100);
    assert!(out.error.is_none());
    assert_eq!(outputs(&out.items), [1, 999, 3]);
    assert_eq!(timeouts.get(), 1);
}

// FLINK-24686: a `timeout()` override that completed nothing left the entry in the ordered
// queue forever, stalling every record behind it. Here an override returns the outcome, so
// "emit nothing" still settles the entry.
#[test]
fn overridden_timeout_emitting_nothing_does_not_stall_ordered_mode() {
    let clock = SimClock::new();
    let source = Source::new();
    let func = WithFallback {
        clock: clock.clone(),
        fallback: Fallback::Emit(Outputs::None),
        timeouts: Rc::new(Cell::new(0)),
    };
    let mut op = op_with(&clock, &source, func, config(4, 100, OutputMode::Ordered));
    source.record((1, 500));
    source.record((2, 10));
    source.close();
    let out = run_to_end(&mut op, &clock, ms(10), 100);
    assert!(out.ended && out.error.is_none());
    assert_eq!(tokens(&out.items), ["R0", "R1"]);
    assert_eq!(outputs(&out.items), [2]);
}

#[test]
fn no_timer_left_after_completion() {
    let clock = SimClock::new();
    let source = Source::new();
    let mut op = op_with(
        &clock,
        &source,
        delayed(&clock),
        config(4, 1_000, OutputMode::Unordered),
    );
    source.record((1, 10));
    drain(&mut op);
    assert_eq!(op.armed_until(), Some(clock_now(&clock) + ms(1_000)));
    clock.advance(ms(10));
    let d = drain(&mut op);
    assert_eq!(tokens(&d.items), ["R0"]);
    assert_eq!(
        op.armed_until(),
        None,
        "a completed record leaves no timer behind"
    );
}

fn clock_now(clock: &SimClock) -> Instant {
    use sluice::clock::Clock;
    clock.now()
}

#[test]
fn timeout_not_called_after_completion() {
    let clock = SimClock::new();
    let source = Source::new();
    let timeouts = Rc::new(Cell::new(0));
    let func = WithFallback {
        clock: clock.clone(),
        fallback: Fallback::Fail,
        timeouts: timeouts.clone(),
    };
    let mut op = op_with(&clock, &source, func, config(4, 100, OutputMode::Ordered));
    source.record((1, 99));
    let d = drain(&mut op);
    assert!(d.items.is_empty());
    clock.advance(ms(99));
    let d = drain(&mut op);
    assert_eq!(tokens(&d.items), ["R0"]);
    clock.advance(ms(1_000));
    let d = drain(&mut op);
    assert!(d.error.is_none());
    assert_eq!(
        timeouts.get(),
        0,
        "timeout must not run for a completed record"
    );
}

fn user_error_fails_cleanly_without_hanging(mode: OutputMode) {
    let clock = SimClock::new();
    let source = Source::new();
    let live = Rc::new(Cell::new(0i32));
    let live_in = live.clone();
    let c = clock.clone();
    let func = from_fn(move |&(value, latency): &(u64, u64)| {
        let sleep = c.sleep(ms(latency));
        let guard = LiveGuard::new(live_in.clone());
        async move {
            let _guard = guard;
            sleep.await;
            if value == 13 {
                Err(SimError("unlucky"))
            } else {
                Ok(Outputs::One(value))
            }
        }
    });
    let mut op = op_with(&clock, &source, func, config(8, 10_000, mode));
    source.record((1, 5));
    source.record((13, 10));
    source.record((2, 1_000));
    source.record((3, 1_000));
    let out = run_to_end(&mut op, &clock, ms(5), 10);
    assert!(out.ended, "the stream ends after the error");
    match out.error {
        Some(StageError::Function {
            seq,
            ref input,
            attempts,
            ..
        }) => {
            assert_eq!((seq, attempts), (1, 1));
            assert!(input.contains("13"));
        }
        other => panic!("expected a function error, got {other:?}"),
    }
    assert_eq!(live.get(), 0, "every attempt in flight was dropped");
    assert_eq!(source.waiting(), 0);
}

struct LiveGuard(Rc<Cell<i32>>);
impl LiveGuard {
    fn new(c: Rc<Cell<i32>>) -> Self {
        c.set(c.get() + 1);
        LiveGuard(c)
    }
}
impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

#[test]
fn user_error_fails_cleanly_without_hanging_ordered() {
    user_error_fails_cleanly_without_hanging(OutputMode::Ordered);
}

#[test]
fn user_error_fails_cleanly_without_hanging_unordered() {
    user_error_fails_cleanly_without_hanging(OutputMode::Unordered);
}

#[test]
fn results_completed_during_shutdown() {
    let clock = SimClock::new();
    let source = Source::new();
    let mut op = op_with(
        &clock,
        &source,
        delayed(&clock),
        config(8, 1_000, OutputMode::Ordered),
    );
    for i in 0..5 {
        source.record((i, 100 - i * 10));
    }
    source.close();
    let d = drain(&mut op);
    assert!(
        d.items.is_empty() && !d.ended,
        "input ended, results still in flight"
    );
    let out = run_to_end(&mut op, &clock, ms(10), 100);
    assert!(out.error.is_none());
    assert_eq!(outputs(&out.items), [0, 10, 20, 30, 40]);
}

/// Returns nothing for the first `empty_for` attempts of every record; records each call's time.
fn flaky(
    clock: &SimClock,
    empty_for: u32,
    latency: Duration,
    calls: Rc<RefCell<Vec<Instant>>>,
) -> impl AsyncFunction<In = u64, Out = u64, Error = SimError> {
    use sluice::clock::Clock;
    let clock = clock.clone();
    let attempts = Rc::new(RefCell::new(std::collections::HashMap::<u64, u32>::new()));
    from_fn(move |&value: &u64| {
        calls.borrow_mut().push(clock.now());
        let n = {
            let mut a = attempts.borrow_mut();
            let n = a.entry(value).or_insert(0);
            *n += 1;
            *n
        };
        let sleep = clock.sleep(latency);
        async move {
            sleep.await;
            if n <= empty_for {
                Ok::<_, SimError>(Outputs::None)
            } else {
                Ok(Outputs::One(value))
            }
        }
    })
}

#[test]
fn retry_on_empty_result_gives_up_after_max_attempts() {
    let clock = SimClock::new();
    let source = Source::new();
    let calls = Rc::new(RefCell::new(vec![]));
    let mut cfg = config(4, 10_000, OutputMode::Ordered);
    cfg.retry = RetryPolicy::fixed(3, ms(10)).on_empty_result();
    let mut op = op_with(
        &clock,
        &source,
        flaky(&clock, 100, ms(1), calls.clone()),
        cfg,
    );
    source.record(7);
    source.close();
    let out = run_to_end(&mut op, &clock, ms(1), 1_000);
    assert!(out.error.is_none());
    assert_eq!(calls.borrow().len(), 3, "three attempts in all");
    assert_eq!(tokens(&out.items), ["R0"]);
    assert_eq!(
        outputs(&out.items),
        Vec::<u64>::new(),
        "the last (empty) result is emitted"
    );
    assert_eq!(op.metrics().retries, 2);
}

#[test]
fn retry_on_empty_result_succeeds_when_a_later_attempt_returns() {
    let clock = SimClock::new();
    let source = Source::new();
    let calls = Rc::new(RefCell::new(vec![]));
    let mut cfg = config(4, 10_000, OutputMode::Ordered);
    cfg.retry = RetryPolicy::fixed(5, ms(10)).on_empty_result();
    let mut op = op_with(&clock, &source, flaky(&clock, 2, ms(1), calls.clone()), cfg);
    source.record(7);
    source.close();
    let out = run_to_end(&mut op, &clock, ms(1), 1_000);
    assert_eq!(outputs(&out.items), [7]);
    assert_eq!(calls.borrow().len(), 3);
}

#[test]
fn retries_bounded_by_the_timeout() {
    let clock = SimClock::new();
    let source = Source::new();
    let calls = Rc::new(RefCell::new(vec![]));
    let mut cfg = config(4, 100, OutputMode::Ordered);
    cfg.retry = RetryPolicy::fixed(1_000, ms(30)).on_empty_result();
    let mut op = op_with(
        &clock,
        &source,
        flaky(&clock, u32::MAX, ms(1), calls.clone()),
        cfg,
    );
    source.record(7);
    let start = clock_now(&clock);
    let out = run_to_end_open(&mut op, &clock, &source);
    let calls = calls.borrow();
    // Calls at 0, 31, 62, 93; the next would start at 124 > 100.
    assert_eq!(
        calls.len(),
        4,
        "calls: {:?}",
        calls.iter().map(|t| *t - start).collect::<Vec<_>>()
    );
    assert!(
        calls.iter().all(|t| *t - start < ms(100)),
        "no attempt starts after the deadline"
    );
    // The retry the policy wants cannot start before the deadline: the record times out (the
    // default timeout handler fails the stage), at once rather than idling until 100.
    assert!(
        matches!(out.error, Some(StageError::Timeout { seq: 0, .. })),
        "{:?}",
        out.error
    );
    assert!(out.items.is_empty());
    assert_eq!(clock_now(&clock) - start, ms(94));
}

/// Runs until the first record is out, then closes the source and runs to the end.
fn run_to_end_open<F: AsyncFunction>(
    op: &mut AsyncWait<Source<F::In>, F, SimClock>,
    clock: &SimClock,
    source: &Source<F::In>,
) -> Drained<F::Out> {
    let mut items = vec![];
    for _ in 0..10_000 {
        let d = drain(op);
        items.extend(d.items);
        if !items.is_empty() || d.error.is_some() {
            source.close();
            let mut rest = run_to_end(op, clock, ms(1), 10_000);
            items.append(&mut rest.items);
            rest.items = items;
            if d.error.is_some() {
                rest.error = d.error;
            }
            return rest;
        }
        clock.advance(ms(1));
    }
    panic!("no record completed");
}

// FLINK-40456: a timeout firing while a retry was pending completed the entry twice. Here the
// retry is due in the same instant as the deadline, and the entry must settle exactly once.
#[test]
fn timeout_racing_a_retry_completes_once() {
    let clock = SimClock::new();
    let source = Source::new();
    let timeouts = Rc::new(Cell::new(0));
    let calls = Rc::new(Cell::new(0));
    struct Racy {
        clock: SimClock,
        timeouts: Rc<Cell<u32>>,
        calls: Rc<Cell<u32>>,
    }
    impl AsyncFunction for Racy {
        type In = u64;
        type Out = u64;
        type Error = SimError;
        type Future = futures::future::LocalBoxFuture<'static, Result<Outputs<u64>, SimError>>;
        fn invoke(&self, _: &u64) -> Self::Future {
            self.calls.set(self.calls.get() + 1);
            let sleep = self.clock.sleep(ms(10));
            Box::pin(async move {
                sleep.await;
                Ok(Outputs::None)
            })
        }
        fn timeout(&self, _: &u64) -> Fallback<u64> {
            self.timeouts.set(self.timeouts.get() + 1);
            Fallback::Emit(Outputs::One(555))
        }
    }
    let mut cfg = config(4, 100, OutputMode::Ordered);
    // Attempt 1 ends at 10, retry due at 99; attempt 2 would end at 109 > deadline 100.
    cfg.retry = RetryPolicy::fixed(5, ms(89)).on_empty_result();
    let func = Racy {
        clock: clock.clone(),
        timeouts: timeouts.clone(),
        calls: calls.clone(),
    };
    let mut op = op_with(&clock, &source, func, cfg);
    source.record(1);
    // The source stays open: at end of input, pending retries would fire at once.
    drain(&mut op);
    clock.advance(ms(10));
    drain(&mut op);
    clock.advance(ms(89)); // retry due now: attempt 2 starts
    drain(&mut op);
    assert_eq!(calls.get(), 2);
    clock.advance(ms(1)); // deadline: attempt 2 is cancelled, timeout runs once
    let d = drain(&mut op);
    assert_eq!(calls.get(), 2, "no attempt after the deadline");
    source.close();
    let mut out = run_to_end(&mut op, &clock, ms(1), 1_000);
    out.items.splice(0..0, d.items);
    assert_eq!(timeouts.get(), 1);
    assert_eq!(
        outputs(&out.items),
        [555],
        "the entry completes exactly once"
    );
    assert_eq!(op.attempts_in_flight(), 0);
}

#[test]
fn exponential_backoff_delays_computed_per_attempt() {
    let clock = SimClock::new();
    let source = Source::new();
    let calls = Rc::new(RefCell::new(vec![]));
    let mut cfg = config(4, 100_000, OutputMode::Ordered);
    cfg.retry = RetryPolicy::exponential(5, ms(10), ms(50), 2.0, Jitter::None).on_empty_result();
    let mut op = op_with(
        &clock,
        &source,
        flaky(&clock, u32::MAX, Duration::ZERO, calls.clone()),
        cfg,
    );
    source.record(7);
    let start = clock_now(&clock);
    let out = run_to_end_open(&mut op, &clock, &source);
    assert!(out.error.is_none());
    let at: Vec<_> = calls.borrow().iter().map(|t| *t - start).collect();
    // Delays 10, 20, 40, then capped at 50.
    assert_eq!(at, vec![ms(0), ms(10), ms(30), ms(70), ms(120)]);
}

#[test]
fn pending_retries_fire_at_once_at_end_of_input() {
    let clock = SimClock::new();
    let source = Source::new();
    let calls = Rc::new(RefCell::new(vec![]));
    let mut cfg = config(4, 100_000, OutputMode::Ordered);
    cfg.retry = RetryPolicy::fixed(3, ms(10_000)).on_empty_result();
    let mut op = op_with(
        &clock,
        &source,
        flaky(&clock, 1, Duration::ZERO, calls.clone()),
        cfg,
    );
    source.record(7);
    drain(&mut op);
    assert_eq!(calls.borrow().len(), 1);
    source.close();
    let d = drain(&mut op);
    assert_eq!(
        calls.borrow().len(),
        2,
        "the delayed retry fired at end of input"
    );
    assert_eq!(outputs(&d.items), [7]);
    assert!(d.ended);
}

#[test]
fn error_predicate_retries_only_matching_errors() {
    let clock = SimClock::new();
    let source = Source::new();
    let calls = Rc::new(Cell::new(0));
    let calls_in = calls.clone();
    let c = clock.clone();
    let func = from_fn(move |&v: &u64| {
        calls_in.set(calls_in.get() + 1);
        let n = calls_in.get();
        // Record 2 fails late, after record 1 recovered from its transient error.
        let sleep = c.sleep(ms(if v == 2 { 50 } else { 0 }));
        async move {
            sleep.await;
            match (v, n) {
                (1, 1) => Err(SimError("transient")),
                (1, _) => Ok(Outputs::One(1)),
                _ => Err(SimError("fatal")),
            }
        }
    });
    let mut cfg = config(4, 10_000, OutputMode::Ordered);
    cfg.retry = RetryPolicy::fixed(3, ms(1)).on_error(|e: &SimError| e.0 == "transient");
    let mut op = op_with(&clock, &source, func, cfg);
    source.record(1);
    source.record(2);
    source.close();
    let out = run_to_end(&mut op, &clock, ms(1), 100);
    assert_eq!(outputs(&out.items), [1]);
    assert!(matches!(
        out.error,
        Some(StageError::Function {
            seq: 1,
            attempts: 1,
            ..
        })
    ));
}
