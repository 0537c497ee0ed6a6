//! `Breaker`: a circuit breaker in front of a shard's backend. After `failures` consecutive
//! failed requests it opens: lookups fail at once (`LookupError::CircuitOpen`, not retryable,
//! so the stage's error and timeout policies decide without waiting) until `cool_down` has
//! passed; then it is half-open and lets one probe request through, whose success closes it
//! and whose failure opens it again.
//!
//! Owns: the breaker's state. Invariants: while open nothing is sent; while half-open at most
//! one request is in flight; any answered request resets the count of consecutive failures.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

/// The breaker's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failed requests that open it.
    pub failures: NonZeroU32,
    pub cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: NonZeroU32::new(5).expect("5 > 0"),
            cool_down: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { consecutive: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// What the breaker lets through now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Send.
    Yes,
    /// Send this one request as the probe; hold the rest until it is answered.
    Probe,
    /// A probe is in flight: hold the request.
    Hold,
    /// Open: fail at once.
    No,
}

#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    state: State,
    opened: u64,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            config,
            state: State::Closed { consecutive: 0 },
            opened: 0,
        }
    }

    pub(crate) fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Whether a new lookup is refused at once (open, before the cool-down's end).
    pub(crate) fn is_open(&mut self, now: Instant) -> bool {
        self.admit_peek(now) == Admit::No
    }

    fn admit_peek(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed { .. } => Admit::Yes,
            State::Open { until } if now < until => Admit::No,
            State::Open { .. } => {
                self.state = State::HalfOpen { probing: false };
                Admit::Probe
            }
            State::HalfOpen { probing: false } => Admit::Probe,
            State::HalfOpen { probing: true } => Admit::Hold,
        }
    }

    /// Asks to send a request now; `Probe` marks the probe as in flight.
    pub(crate) fn admit(&mut self, now: Instant) -> Admit {
        let admit = self.admit_peek(now);
        if admit == Admit::Probe {
            self.state = State::HalfOpen { probing: true };
        }
        admit
    }

    pub(crate) fn on_success(&mut self) {
        self.state = State::Closed { consecutive: 0 };
    }

    pub(crate) fn on_failure(&mut self, now: Instant) {
        let open = match self.state {
            State::Closed { consecutive } => consecutive + 1 >= self.config.failures.get(),
            State::HalfOpen { .. } => true,
            State::Open { .. } => false,
        };
        self.state = match self.state {
            _ if open => {
                self.opened += 1;
                State::Open {
                    until: now + self.config.cool_down,
                }
            }
            State::Closed { consecutive } => State::Closed {
                consecutive: consecutive + 1,
            },
            other => other,
        };
    }

    /// How many times it opened.
    pub(crate) fn times_opened(&self) -> u64 {
        self.opened
    }

    /// Whether it is not closed (open, or half-open and probing).
    pub(crate) fn is_tripped(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_then_probes_once() {
        let mut b = Breaker::new(BreakerConfig {
            failures: NonZeroU32::new(3).unwrap(),
            cool_down: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        b.on_failure(t0);
        b.on_failure(t0);
        b.on_success(); // an answer resets the count
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.admit(t0), Admit::Yes);
        b.on_failure(t0);
        assert!(b.is_open(t0 + Duration::from_millis(999)));
        assert_eq!(b.admit(t0 + Duration::from_millis(999)), Admit::No);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.admit(t1), Admit::Probe);
        assert_eq!(b.admit(t1), Admit::Hold, "one probe at a time");
        assert!(
            !b.is_open(t1),
            "half-open holds lookups back, it does not fail them"
        );
        b.on_failure(t1);
        assert_eq!(b.admit(t1), Admit::No, "a failed probe opens it again");
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(b.admit(t2), Admit::Probe);
        b.on_success();
        assert_eq!(b.admit(t2), Admit::Yes);
        assert_eq!(b.times_opened(), 2);
    }
}
