//! `TokenBucket`: at most `rate` keys per second sent to the backend by one shard, with a
//! burst of what accrues in 10 ms (at least one key).
//!
//! Owns: the tokens. Invariants: `0 <= tokens <= burst`; tokens accrue with the time passed
//! in (`now`), so tests drive it with a simulated clock.

use std::time::{Duration, Instant};

/// Tokens accrue for at most this long while unused.
const BURST_WINDOW: Duration = Duration::from_millis(10);

#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate_per_s: f64, now: Instant) -> TokenBucket {
        assert!(
            rate_per_s.is_finite() && rate_per_s > 0.0,
            "a rate limit is positive"
        );
        let burst = (rate_per_s * BURST_WINDOW.as_secs_f64()).max(1.0);
        TokenBucket {
            rate_per_s,
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate_per_s).min(self.burst);
        self.at = now;
    }

    /// Whole tokens available now.
    pub(crate) fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.tokens as usize
    }

    pub(crate) fn spend(&mut self, n: usize) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }

    /// When the next whole token is there.
    pub(crate) fn next_token_at(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.at + Duration::from_secs_f64(missing / self.rate_per_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_per_second_hold_over_a_simulated_second() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000.0, t0);
        let mut sent = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(1) {
            let n = b.available(now);
            b.spend(n);
            sent += n;
            now = b.next_token_at().max(now + Duration::from_micros(1));
        }
        // The burst (10 keys) plus one second's worth.
        assert!((1_000..=1_011).contains(&sent), "{sent} keys");
    }
}
