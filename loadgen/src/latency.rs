//! `LatencyModel`: how long the server waits before each reply.
//!
//! Owns: the delay distribution. Invariant: a sample is never negative and never exceeds
//! `MAX_DELAY`; the same seed gives the same sequence of delays.

use rand::rngs::SmallRng;
use rand_distr::{Distribution, LogNormal};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Longest single reply delay the model will produce.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// A reply delay distribution.
#[derive(Debug, Clone, PartialEq)]
pub enum LatencyModel {
    /// Every reply waits exactly this long.
    Fixed(Duration),
    /// Uniform in `[min, max]`.
    Uniform { min: Duration, max: Duration },
    /// Log-normal with the given median and 99th percentile: most replies near `p50`, a long
    /// tail reaching `p99` one time in a hundred (and beyond, rarely).
    LongTail { p50: Duration, p99: Duration },
}

impl LatencyModel {
    /// The median delay (for Little's law estimates).
    pub fn median(&self) -> Duration {
        match *self {
            LatencyModel::Fixed(d) => d,
            LatencyModel::Uniform { min, max } => (min + max) / 2,
            LatencyModel::LongTail { p50, .. } => p50,
        }
    }

    /// The mean delay (Little's law uses the mean).
    pub fn mean(&self) -> Duration {
        match *self {
            LatencyModel::LongTail { p50, p99 } => {
                let sigma = Self::sigma(p50, p99);
                p50.mul_f64((sigma * sigma / 2.0).exp())
            }
            _ => self.median(),
        }
    }

    fn sigma(p50: Duration, p99: Duration) -> f64 {
        // z(0.99) = 2.3263: p99 = p50 * exp(2.3263 * sigma).
        (p99.as_secs_f64() / p50.as_secs_f64().max(1e-9))
            .ln()
            .max(0.0)
            / 2.326_348
    }

    /// Draws one delay.
    pub fn sample(&self, rng: &mut SmallRng) -> Duration {
        let d = match *self {
            LatencyModel::Fixed(d) => d,
            LatencyModel::Uniform { min, max } => {
                let (lo, hi) = (min.as_nanos() as u64, max.as_nanos() as u64);
                Duration::from_nanos(rand::Rng::random_range(rng, lo..=hi.max(lo)))
            }
            LatencyModel::LongTail { p50, p99 } => {
                let sigma = Self::sigma(p50, p99);
                let mu = p50.as_secs_f64().max(1e-9).ln();
                let dist = LogNormal::new(mu, sigma).expect("finite parameters");
                Duration::from_secs_f64(dist.sample(rng).min(MAX_DELAY.as_secs_f64()))
            }
        };
        d.min(MAX_DELAY)
    }
}

impl fmt::Display for LatencyModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LatencyModel::Fixed(d) => write!(f, "{}", humantime::format_duration(*d)),
            LatencyModel::Uniform { min, max } => write!(
                f,
                "uniform:{}:{}",
                humantime::format_duration(*min),
                humantime::format_duration(*max)
            ),
            LatencyModel::LongTail { p50, p99 } => write!(
                f,
                "longtail:{}:{}",
                humantime::format_duration(*p50),
                humantime::format_duration(*p99)
            ),
        }
    }
}

/// A latency specification that could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid latency `{spec}`: {reason}. Use `1ms`, `uniform:500us:2ms` or `longtail:1ms:20ms`"
)]
pub struct ParseLatencyError {
    spec: String,
    reason: String,
}

impl FromStr for LatencyModel {
    type Err = ParseLatencyError;
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ParseLatencyError {
            spec: spec.to_string(),
            reason,
        };
        let duration =
            |s: &str| humantime::parse_duration(s.trim()).map_err(|e| err(format!("`{s}`: {e}")));
        let parts: Vec<&str> = spec.split(':').collect();
        let model = match parts.as_slice() {
            [d] => LatencyModel::Fixed(duration(d)?),
            ["fixed", d] => LatencyModel::Fixed(duration(d)?),
            ["uniform", a, b] => {
                let (min, max) = (duration(a)?, duration(b)?);
                if min > max {
                    return Err(err("the minimum exceeds the maximum".into()));
                }
                LatencyModel::Uniform { min, max }
            }
            ["longtail", a, b] => {
                let (p50, p99) = (duration(a)?, duration(b)?);
                if p50 > p99 || p50.is_zero() {
                    return Err(err("need 0 < p50 <= p99".into()));
                }
                LatencyModel::LongTail { p50, p99 }
            }
            _ => return Err(err("unknown form".into())),
        };
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn parses_every_form_and_rejects_nonsense() {
        assert_eq!(
            "1ms".parse(),
            Ok(LatencyModel::Fixed(Duration::from_millis(1)))
        );
        assert_eq!(
            "uniform:1ms:3ms".parse::<LatencyModel>().unwrap().median(),
            Duration::from_millis(2)
        );
        assert!("longtail:5ms:1ms".parse::<LatencyModel>().is_err());
        let e = "soon".parse::<LatencyModel>().unwrap_err().to_string();
        assert!(e.contains("soon") && e.contains("longtail"), "{e}");
    }

    #[test]
    fn long_tail_hits_its_median_and_p99() {
        let m: LatencyModel = "longtail:1ms:20ms".parse().unwrap();
        let mut rng = SmallRng::seed_from_u64(3);
        let mut v: Vec<Duration> = (0..20_000).map(|_| m.sample(&mut rng)).collect();
        v.sort();
        let (p50, p99) = (v[10_000].as_secs_f64(), v[19_800].as_secs_f64());
        assert!((p50 / 0.001 - 1.0).abs() < 0.1, "p50 {p50}");
        assert!((p99 / 0.020 - 1.0).abs() < 0.2, "p99 {p99}");
    }
}
