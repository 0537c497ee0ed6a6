//! `Limiter`: how many keys a shard lets its backend have in flight, adapted to the backend's
//! latency as TCP Vegas adapts a window (the Vegas limit of Netflix's concurrency-limits),
//! with a multiplicative back-off when a request fails or its records time out (AIMD).
//!
//! Owns: the limit. Invariants: `min <= limit <= max` at all times; the limit grows only while
//! the backend is kept busy (at least half the limit in flight), so an idle stage does not
//! inflate it; one back-off per round trip: after a decrease, further drops of requests sent
//! before it do not decrease it again.
//!
//! The estimate: with `rtt_noload` the lowest round trip seen, `queue = limit x (1 -
//! rtt_noload / rtt)` is how many of the limit's keys are waiting in the backend rather than
//! being served. Below `alpha` the limit grows, above `beta` it shrinks; both scale with
//! `log10(limit)` so that a large limit moves in larger steps. The no-load round trip is
//! re-measured every `probe_interval` samples, as BBR's ProbeRTT does: the limit is halved for
//! one round of requests (as many answers as the limit was), their fastest round trip is the
//! new no-load estimate, and the limit is restored. So a backend that became slower for good
//! does not hold the limit down forever, and a queue the limit itself keeps in the backend
//! does not pass for the no-load time (which would let the limit ratchet upwards).

use std::time::{Duration, Instant};

/// Settings of the adaptive limit.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConfig {
    pub initial: usize,
    pub min: usize,
    /// The stage's capacity is the natural maximum.
    pub max: usize,
    /// The factor a drop (a failed request, or one whose records timed out) multiplies the
    /// limit by.
    pub backoff_ratio: f64,
    /// Samples between re-measurements of the no-load round trip.
    pub probe_interval: u32,
}

impl AdaptiveConfig {
    /// Defaults for a stage of `capacity`: start at a quarter of it (at least 4), back off
    /// by 0.9.
    pub fn for_capacity(capacity: usize) -> AdaptiveConfig {
        let max = capacity.max(1);
        AdaptiveConfig {
            initial: (max / 4).clamp(1, max).max(4.min(max)),
            min: 1,
            max,
            backoff_ratio: 0.9,
            probe_interval: 1_000,
        }
    }
}

/// See the module documentation.
/// A re-measurement of the no-load round trip under way.
#[derive(Debug, Clone)]
struct Probe {
    /// The limit to restore.
    saved: f64,
    /// Answers still to see, and the fastest so far.
    left: usize,
    fastest: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Limiter {
    config: AdaptiveConfig,
    limit: f64,
    rtt_noload: Option<Duration>,
    samples: u32,
    probe: Option<Probe>,
    /// Requests sent before this instant do not trigger another back-off.
    backed_off_at: Option<Instant>,
    min_seen: usize,
    max_seen: usize,
}

impl Limiter {
    pub fn new(config: AdaptiveConfig) -> Limiter {
        assert!(
            config.min >= 1 && config.min <= config.max,
            "limit bounds 1 <= min <= max"
        );
        let initial = config.initial.clamp(config.min, config.max);
        Limiter {
            limit: initial as f64,
            rtt_noload: None,
            samples: 0,
            probe: None,
            backed_off_at: None,
            min_seen: initial,
            max_seen: initial,
            config,
        }
    }

    /// The current limit, in keys in flight.
    pub fn limit(&self) -> usize {
        self.limit as usize
    }

    /// The lowest and highest limit so far.
    pub fn range(&self) -> (usize, usize) {
        (self.min_seen, self.max_seen)
    }

    /// A request sent at `sent_at` was answered after `rtt`, with `in_flight` keys in flight
    /// when it was sent.
    pub fn on_answer(&mut self, rtt: Duration, in_flight: usize) {
        let rtt = rtt.max(Duration::from_nanos(1));
        if let Some(p) = &mut self.probe {
            p.fastest = Some(p.fastest.map_or(rtt, |f| f.min(rtt)));
            p.left = p.left.saturating_sub(1);
            if p.left == 0 {
                self.rtt_noload = p.fastest;
                let saved = p.saved;
                self.probe = None;
                self.set(saved);
            }
            return;
        }
        self.samples += 1;
        if self.samples >= self.config.probe_interval {
            self.samples = 0;
            self.probe = Some(Probe {
                saved: self.limit,
                left: self.limit() + 1,
                fastest: None,
            });
            self.limit = (self.limit / 2.0).max(self.config.min as f64);
            return;
        }
        let noload = match self.rtt_noload {
            Some(n) if n <= rtt => n,
            _ => {
                self.rtt_noload = Some(rtt);
                return;
            }
        };
        if (in_flight as f64) * 2.0 < self.limit {
            return; // the stage, not the backend, is the limit: no evidence to grow
        }
        let f = self.limit.log10().max(1.0);
        let (alpha, beta) = (3.0 * f, 6.0 * f);
        let queue = self.limit * (1.0 - noload.as_secs_f64() / rtt.as_secs_f64());
        if queue <= f {
            self.set(self.limit + beta);
        } else if queue < alpha {
            self.set(self.limit + f);
        } else if queue > beta {
            self.set(self.limit - f);
        }
    }

    /// A request sent at `sent_at` failed, or its records timed out: back off, once per
    /// round of requests.
    pub fn on_drop(&mut self, sent_at: Instant, now: Instant) {
        if self.backed_off_at.is_some_and(|at| sent_at < at) {
            return;
        }
        self.backed_off_at = Some(now);
        if let Some(p) = &mut self.probe {
            p.saved *= self.config.backoff_ratio;
        }
        self.set(self.limit * self.config.backoff_ratio);
    }

    fn set(&mut self, limit: f64) {
        self.limit = limit.clamp(self.config.min as f64, self.config.max as f64);
        let l = self.limit();
        self.min_seen = self.min_seen.min(l);
        self.max_seen = self.max_seen.max(l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that serves `knee` requests at once in `base`; past the knee requests queue,
    /// so a round trip takes `base x in_flight / knee` (Little's law at its throughput limit).
    fn rtt_at(in_flight: usize, knee: usize, base: Duration) -> Duration {
        base.mul_f64((in_flight as f64 / knee as f64).max(1.0))
    }

    /// Drives the limiter in closed loop: the backend always has `limit` keys in flight.
    fn settle(knee: usize, max: usize) -> Limiter {
        let mut l = Limiter::new(AdaptiveConfig {
            initial: 4,
            ..AdaptiveConfig::for_capacity(max)
        });
        let base = Duration::from_micros(500);
        for _ in 0..20_000 {
            let in_flight = l.limit();
            l.on_answer(rtt_at(in_flight, knee, base), in_flight);
        }
        l
    }

    #[test]
    fn the_limit_settles_near_the_knee_of_the_backend() {
        for knee in [8, 32, 100] {
            let l = settle(knee, 1_000);
            let limit = l.limit();
            let slack = 6.0 * (limit as f64).log10().max(1.0) + 1.0;
            assert!(
                limit >= knee && (limit as f64) <= knee as f64 + slack,
                "knee {knee}: limit {limit}"
            );
        }
    }

    #[test]
    fn the_limit_stays_within_its_bounds() {
        let l = settle(10_000, 64);
        assert_eq!(
            l.limit(),
            64,
            "a backend without a knee lets it grow to max"
        );
        assert_eq!(l.range().1, 64);
    }

    #[test]
    fn an_idle_stage_does_not_grow_the_limit() {
        let mut l = Limiter::new(AdaptiveConfig {
            initial: 20,
            ..AdaptiveConfig::for_capacity(100)
        });
        for _ in 0..1_000 {
            l.on_answer(Duration::from_micros(100), 2);
        }
        assert!(l.limit() <= 20, "limit {}", l.limit());
    }

    #[test]
    fn drops_back_off_once_per_round() {
        let mut l = Limiter::new(AdaptiveConfig {
            initial: 100,
            ..AdaptiveConfig::for_capacity(100)
        });
        let t0 = Instant::now();
        l.on_drop(t0, t0 + Duration::from_millis(1));
        assert_eq!(l.limit(), 90);
        // Another request of the same round (sent before the back-off) fails too.
        l.on_drop(t0, t0 + Duration::from_millis(2));
        assert_eq!(l.limit(), 90);
        // One sent after it fails: back off again.
        l.on_drop(t0 + Duration::from_millis(3), t0 + Duration::from_millis(4));
        assert_eq!(l.limit(), 81);
        for i in 0..100 {
            l.on_drop(
                t0 + Duration::from_millis(10 + 2 * i),
                t0 + Duration::from_millis(11 + 2 * i),
            );
        }
        assert_eq!(l.limit(), 1, "never below min");
    }
}
