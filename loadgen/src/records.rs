//! The record generator: deterministic transactions like the seeds' (user id, transaction id,
//! stock, amount, event time), keys uniform or Zipf over the keyspace, bounded out-of-orderness
//! in event time, and a watermark every N records.
//!
//! Owns: the input stream of a benchmark or a demo. Invariants: the same config gives the same
//! sequence; a record's event time is at most `max_out_of_orderness_ms` behind the largest
//! event time generated before it; every watermark equals (largest event time so far -
//! out-of-orderness - 1), so no later record is behind it, and watermarks strictly increase.

use crate::keyspace::user_id;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

const STOCKS: [&str; 8] = [
    "AMZN", "AAPL", "MSFT", "GOOG", "NVDA", "TSLA", "META", "NFLX",
];

/// One transaction, with the seeds' field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    pub user_id: String,
    pub transaction_id: String,
    pub stock_purchased: String,
    pub amount_obtained: u64,
    /// Event time, epoch milliseconds.
    pub timestamp: u64,
}

/// One generated element.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Record(Transaction),
    /// An event-time watermark, epoch milliseconds.
    Watermark(u64),
}

/// How user ids are drawn from the keyspace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyDistribution {
    Uniform,
    /// Zipf with this exponent (1.0 is classic; larger is more skewed).
    Zipf(f64),
}

/// The generator's settings.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub keys: u64,
    pub distribution: KeyDistribution,
    pub seed: u64,
    /// Event time of the first record, epoch milliseconds.
    pub start_ms: u64,
    /// Event time advances by this much per record on average.
    pub step_ms: u64,
    /// Records may be this far behind the newest event time.
    pub max_out_of_orderness_ms: u64,
    /// A watermark after every this many records (0: none).
    pub watermark_every: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            keys: 100_000,
            distribution: KeyDistribution::Uniform,
            seed: 7,
            start_ms: 1_602_603_593_000,
            step_ms: 1,
            max_out_of_orderness_ms: 50,
            watermark_every: 1_000,
        }
    }
}

/// Key indexes drawn from a keyspace of `keys` by a distribution, deterministically from a
/// seed. Zipf ranks map to indexes in order: index 0 is the most frequent key.
pub struct KeySampler {
    rng: SmallRng,
    zipf: Option<Zipf<f64>>,
    keys: u64,
}

impl KeySampler {
    pub fn new(keys: u64, distribution: KeyDistribution, seed: u64) -> KeySampler {
        assert!(keys > 0, "a keyspace has at least one key");
        let zipf = match distribution {
            KeyDistribution::Zipf(s) => Some(Zipf::new(keys as f64, s).expect("valid Zipf")),
            KeyDistribution::Uniform => None,
        };
        KeySampler {
            rng: SmallRng::seed_from_u64(seed),
            zipf,
            keys,
        }
    }

    /// The next key index, in `0..keys`.
    pub fn next_key(&mut self) -> u64 {
        match &self.zipf {
            // Zipf samples 1..=n, rank 1 most frequent.
            Some(z) => (z.sample(&mut self.rng) as u64).clamp(1, self.keys) - 1,
            None => self.rng.random_range(0..self.keys),
        }
    }
}

/// An endless, deterministic iterator of [`Event`]s.
pub struct Generator {
    config: GeneratorConfig,
    keys: KeySampler,
    records: u64,
    clock_ms: u64,
    max_event_ms: u64,
    last_watermark: Option<u64>,
    pending_watermark: Option<u64>,
}

impl Generator {
    pub fn new(config: GeneratorConfig) -> Self {
        Generator {
            keys: KeySampler::new(config.keys, config.distribution, config.seed),
            records: 0,
            clock_ms: config.start_ms,
            max_event_ms: config.start_ms,
            last_watermark: None,
            pending_watermark: None,
            config,
        }
    }

    /// The key index of the next user.
    fn next_key(&mut self) -> u64 {
        self.keys.next_key()
    }
}

impl Iterator for Generator {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        if let Some(w) = self.pending_watermark.take() {
            return Some(Event::Watermark(w));
        }
        let key = self.next_key();
        self.clock_ms += self.config.step_ms;
        let lag = if self.config.max_out_of_orderness_ms > 0 {
            // The same stream as the keys (a generated file stays what it was).
            self.keys
                .rng
                .random_range(0..=self.config.max_out_of_orderness_ms)
        } else {
            0
        };
        let timestamp = self.clock_ms.saturating_sub(lag).max(
            self.max_event_ms
                .saturating_sub(self.config.max_out_of_orderness_ms),
        );
        self.max_event_ms = self.max_event_ms.max(timestamp);
        let tx = Transaction {
            user_id: user_id(key),
            transaction_id: format!("transaction_{:09}", self.records),
            stock_purchased: STOCKS[(self.keys.rng.random::<u32>() % STOCKS.len() as u32) as usize]
                .to_string(),
            amount_obtained: self.keys.rng.random_range(1..=1_000),
            timestamp,
        };
        self.records += 1;
        if self.config.watermark_every > 0
            && self.records.is_multiple_of(self.config.watermark_every)
        {
            let w = self
                .max_event_ms
                .saturating_sub(self.config.max_out_of_orderness_ms + 1);
            if self.last_watermark.is_none_or(|last| w > last) {
                self.last_watermark = Some(w);
                self.pending_watermark = Some(w);
            }
        }
        Some(Event::Record(tx))
    }
}

/// Paces an open-loop producer at a target rate without drifting: event `n` is due at
/// `start + n / rate`.
pub struct Pacer {
    start: Instant,
    interval: Duration,
    sent: u64,
}

impl Pacer {
    /// `rate` events per second (must be > 0).
    pub fn new(rate: f64) -> Self {
        assert!(rate > 0.0, "a pacer needs a positive rate");
        Pacer {
            start: Instant::now(),
            interval: Duration::from_secs_f64(1.0 / rate),
            sent: 0,
        }
    }

    /// Blocks the thread until the next event is due.
    pub fn wait(&mut self) {
        let due = self.start + self.interval.mul_f64(self.sent as f64);
        self.sent += 1;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_bounded_out_of_orderness_and_safe_watermarks() {
        let config = GeneratorConfig {
            keys: 50,
            max_out_of_orderness_ms: 20,
            watermark_every: 10,
            ..Default::default()
        };
        let a: Vec<Event> = Generator::new(config.clone()).take(2_000).collect();
        let b: Vec<Event> = Generator::new(config).take(2_000).collect();
        assert_eq!(a, b);
        let mut max_seen = 0;
        let mut watermark = None;
        let mut watermarks = 0;
        for e in &a {
            match e {
                Event::Record(t) => {
                    assert!(t.timestamp + 20 >= max_seen, "bounded out-of-orderness");
                    if let Some(w) = watermark {
                        assert!(t.timestamp > w, "record behind a watermark");
                    }
                    max_seen = max_seen.max(t.timestamp);
                }
                Event::Watermark(w) => {
                    assert!(watermark.is_none_or(|p| *w > p));
                    watermark = Some(*w);
                    watermarks += 1;
                }
            }
        }
        assert!(watermarks > 100);
    }

    #[test]
    fn zipf_skews_toward_low_ranks() {
        let config = GeneratorConfig {
            keys: 1_000,
            distribution: KeyDistribution::Zipf(1.1),
            watermark_every: 0,
            ..Default::default()
        };
        let hot = Generator::new(config)
            .take(10_000)
            .filter(|e| matches!(e, Event::Record(t) if t.user_id == user_id(0)))
            .count();
        assert!(hot > 500, "rank 1 drew {hot} of 10000");
    }
}
