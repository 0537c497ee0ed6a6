//! Retry policies: when to retry an attempt (a result predicate and/or an error predicate) and
//! how long to wait before the next one (fixed delay or exponential backoff with jitter).
//!
//! Owns: the attempt arithmetic. Invariants:
//! - `max_attempts` counts every call, the first one included (Flink's `maxAttempts` counts
//!   retries only; see `docs/guarantees.md`), and is never zero;
//! - the delay before attempt `n + 1` depends on `n` (and, for decorrelated jitter, on the
//!   previous delay) and never exceeds `max_delay` (FLINK-33698 computed it from the wrong
//!   attempt);
//! - a retry is only ever scheduled before the record's deadline; the operator enforces that.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// Jitter for exponential backoff, as in the AWS Architecture Blog's "Exponential Backoff And
/// Jitter" study. `d` is the capped exponential delay for the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly `d`.
    None,
    /// Uniform in `[0, d]`.
    Full,
    /// `d / 2` plus uniform in `[0, d / 2]`.
    Equal,
    /// Uniform in `[initial, previous * multiplier]`, capped at `max_delay`.
    Decorrelated,
}

/// How long to wait between attempts.
#[derive(Debug, Clone, PartialEq)]
pub enum Backoff {
    /// The same delay before every retry.
    Fixed { delay: Duration },
    /// `initial * multiplier^(n - 1)` before attempt `n + 1`, capped at `max_delay`, with jitter.
    Exponential {
        initial: Duration,
        max_delay: Duration,
        multiplier: f64,
        jitter: Jitter,
    },
}

impl Backoff {
    /// The delay after failed attempt `attempt` (1-based), before attempt `attempt + 1`.
    /// `previous` is the delay used before `attempt` (zero before the first retry).
    pub fn delay(&self, attempt: u32, previous: Duration, rng: &mut fastrand::Rng) -> Duration {
        assert!(attempt >= 1, "attempts are 1-based");
        match *self {
            Backoff::Fixed { delay } => delay,
            Backoff::Exponential {
                initial,
                max_delay,
                multiplier,
                jitter,
            } => {
                let capped = exponential(initial, max_delay, multiplier, attempt);
                let delay = match jitter {
                    Jitter::None => capped,
                    Jitter::Full => uniform(rng, Duration::ZERO, capped),
                    Jitter::Equal => capped / 2 + uniform(rng, Duration::ZERO, capped / 2),
                    Jitter::Decorrelated => {
                        let base = previous.max(initial);
                        let high = base.mul_f64(multiplier).min(max_delay).max(initial);
                        uniform(rng, initial.min(high), high)
                    }
                };
                delay.min(max_delay)
            }
        }
    }
}

fn exponential(initial: Duration, max_delay: Duration, multiplier: f64, attempt: u32) -> Duration {
    let factor = multiplier.powi(attempt.saturating_sub(1).min(1024) as i32);
    let nanos = initial.as_nanos() as f64 * factor;
    if !nanos.is_finite() || nanos >= max_delay.as_nanos() as f64 {
        max_delay
    } else {
        Duration::from_nanos(nanos as u64)
    }
}

fn uniform(rng: &mut fastrand::Rng, low: Duration, high: Duration) -> Duration {
    if high <= low {
        return low;
    }
    let span = (high - low).as_nanos().min(u64::MAX as u128) as u64;
    low + Duration::from_nanos(rng.u64(0..=span))
}

type ResultPredicate<O> = Arc<dyn Fn(&[O]) -> bool + Send + Sync>;
type ErrorPredicate<E> = Arc<dyn Fn(&E) -> bool + Send + Sync>;

/// When and how to retry an attempt. `O` is the output type, `E` the error type of the function.
///
/// ```
/// use sluice::RetryPolicy;
/// use std::time::Duration;
/// let p: RetryPolicy<String, std::io::Error> =
///     RetryPolicy::fixed(3, Duration::from_millis(10)).on_empty_result().on_any_error();
/// assert_eq!(p.max_attempts(), 3);
/// ```
pub struct RetryPolicy<O, E> {
    max_attempts: NonZeroU32,
    backoff: Backoff,
    on_result: Option<ResultPredicate<O>>,
    on_error: Option<ErrorPredicate<E>>,
}

impl<O, E> Clone for RetryPolicy<O, E> {
    fn clone(&self) -> Self {
        RetryPolicy {
            max_attempts: self.max_attempts,
            backoff: self.backoff.clone(),
            on_result: self.on_result.clone(),
            on_error: self.on_error.clone(),
        }
    }
}

impl<O, E> fmt::Debug for RetryPolicy<O, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("on_result", &self.on_result.is_some())
            .field("on_error", &self.on_error.is_some())
            .finish()
    }
}

impl<O, E> Default for RetryPolicy<O, E> {
    fn default() -> Self {
        Self::none()
    }
}

impl<O, E> RetryPolicy<O, E> {
    /// Never retry: one attempt.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: NonZeroU32::MIN,
            backoff: Backoff::Fixed {
                delay: Duration::ZERO,
            },
            on_result: None,
            on_error: None,
        }
    }

    /// Up to `max_attempts` calls in all, `delay` apart. `max_attempts` of 0 is taken as 1.
    pub fn fixed(max_attempts: u32, delay: Duration) -> Self {
        RetryPolicy {
            max_attempts: NonZeroU32::new(max_attempts).unwrap_or(NonZeroU32::MIN),
            backoff: Backoff::Fixed { delay },
            ..Self::none()
        }
    }

    /// Up to `max_attempts` calls in all with exponential backoff. A `multiplier` below 1 is
    /// taken as 1.
    pub fn exponential(
        max_attempts: u32,
        initial: Duration,
        max_delay: Duration,
        multiplier: f64,
        jitter: Jitter,
    ) -> Self {
        RetryPolicy {
            max_attempts: NonZeroU32::new(max_attempts).unwrap_or(NonZeroU32::MIN),
            backoff: Backoff::Exponential {
                initial,
                max_delay: max_delay.max(initial),
                multiplier: if multiplier.is_finite() {
                    multiplier.max(1.0)
                } else {
                    1.0
                },
                jitter,
            },
            ..Self::none()
        }
    }

    /// Retry when the outputs satisfy `predicate`.
    pub fn on_result(mut self, predicate: impl Fn(&[O]) -> bool + Send + Sync + 'static) -> Self {
        self.on_result = Some(Arc::new(predicate));
        self
    }

    /// Retry when the call produced no output (Flink's `EMPTY_RESULT_PREDICATE`).
    pub fn on_empty_result(self) -> Self {
        self.on_result(|outputs| outputs.is_empty())
    }

    /// Retry when the error satisfies `predicate`.
    pub fn on_error(mut self, predicate: impl Fn(&E) -> bool + Send + Sync + 'static) -> Self {
        self.on_error = Some(Arc::new(predicate));
        self
    }

    /// Retry on every error (Flink's `HAS_EXCEPTION_PREDICATE`).
    pub fn on_any_error(self) -> Self {
        self.on_error(|_| true)
    }

    /// Every call counted, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts.get()
    }

    /// The backoff between attempts.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// Whether the outcome of attempt `attempt` asks for another one.
    pub(crate) fn wants_retry(&self, attempt: u32, outcome: &Result<&[O], &E>) -> bool {
        if attempt >= self.max_attempts.get() {
            return false;
        }
        match outcome {
            Ok(outputs) => self.on_result.as_ref().is_some_and(|p| p(outputs)),
            Err(error) => self.on_error.as_ref().is_some_and(|p| p(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    // FLINK-33698: the exponential strategy computed its delay from the wrong attempt, so the
    // delays did not grow as documented. Each attempt's delay is checked here on its own.
    #[test]
    fn exponential_backoff_delays_computed_per_attempt() {
        let b = Backoff::Exponential {
            initial: ms(10),
            max_delay: ms(100),
            multiplier: 2.0,
            jitter: Jitter::None,
        };
        let mut rng = fastrand::Rng::with_seed(1);
        let delays: Vec<_> = (1..=6)
            .map(|n| b.delay(n, Duration::ZERO, &mut rng))
            .collect();
        assert_eq!(
            delays,
            vec![ms(10), ms(20), ms(40), ms(80), ms(100), ms(100)]
        );
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let mut rng = fastrand::Rng::with_seed(7);
        for jitter in [Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
            let b = Backoff::Exponential {
                initial: ms(10),
                max_delay: ms(1000),
                multiplier: 3.0,
                jitter,
            };
            let mut previous = Duration::ZERO;
            for attempt in 1..=20 {
                let d = b.delay(attempt, previous, &mut rng);
                let cap = exponential(ms(10), ms(1000), 3.0, attempt);
                match jitter {
                    Jitter::Full => assert!(d <= cap),
                    Jitter::Equal => assert!(d >= cap / 2 && d <= cap),
                    _ => assert!(d >= ms(10) && d <= ms(1000)),
                }
                previous = d;
            }
        }
    }

    #[test]
    fn predicates_and_attempt_limit_decide_retries() {
        let p: RetryPolicy<u8, std::io::Error> = RetryPolicy::fixed(3, ms(1)).on_empty_result();
        assert!(p.wants_retry(1, &Ok(&[])));
        assert!(p.wants_retry(2, &Ok(&[])));
        assert!(!p.wants_retry(3, &Ok(&[])), "third attempt is the last");
        assert!(!p.wants_retry(1, &Ok(&[1])));
        let err = std::io::Error::other("x");
        assert!(!p.wants_retry(1, &Err(&err)), "no error predicate set");
        let p = p.on_error(|e: &std::io::Error| e.kind() == std::io::ErrorKind::Other);
        assert!(p.wants_retry(1, &Err(&err)));
        assert_eq!(
            RetryPolicy::<u8, std::io::Error>::fixed(0, ms(1)).max_attempts(),
            1
        );
    }
}
