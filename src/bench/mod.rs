//! `sluice bench`: how much asynchronous enrichment gains over a synchronous `map`, and how
//! close each contender comes to the limit, on a real network path.
//!
//! Owns: the sweep. For each repeat, for each shard count and capacity, every mode runs one
//! point in turn (interleaved, so drift on a noisy machine hits all modes alike); each figure is
//! the median over repeats. Invariants: all modes see the same server, key distribution and
//! duration; the ideal is Little's law (`shards x capacity / round-trip latency`) capped by the
//! server's measured limit; nothing is a hard-coded figure.

mod blocking_client;
pub mod cpu;
mod report;
mod runners;

pub use report::{read_json, write_json, write_svg, Point, Report};
pub use runners::{Measurement, Workload};

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// A contender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// One blocking client per shard, one request at a time (Flink's `MapFunction`).
    SyncMap,
    /// A pool of `shards x capacity` blocking clients (at most 512 threads).
    ThreadPool,
    /// tokio + redis-rs + `buffered` (ordered), a multi-thread runtime with one worker per shard.
    TokioBuffered,
    /// tokio + redis-rs + `buffer_unordered`, on the same multi-thread runtime.
    TokioUnordered,
    /// tokio + redis-rs + `buffer_unordered` on a current-thread runtime per shard, each on a
    /// thread of its own: the single-threaded program, without work stealing or idle workers.
    TokioLocalUnordered,
    /// `buffered` (ordered) on the current-thread runtimes of `tokio-local-unordered`.
    TokioLocalBuffered,
    /// `tokio-local-unordered` with a moka cache in front of Redis, shared by its threads.
    TokioCachedUnordered,
    /// The stage fed by a producer thread and read by a consumer thread (the embedding shape:
    /// records cross from the user's threads to the shards and back).
    Ordered,
    Unordered,
    KeyOrdered,
    /// The stage with its source and sink on the shards (`StageBuilder::run_on_shards`, the
    /// way `sluice enrich` runs): records generated, looked up and counted on each shard's
    /// thread.
    OnShardOrdered,
    OnShardUnordered,
    /// The stage with one source and one sink on shard 0 (`StageBuilder::routed`, the way
    /// `sluice enrich --shards N` reads a file): records generated on shard 0, routed to the
    /// shards, merged and counted back on shard 0.
    RoutedOrdered,
    RoutedUnordered,
    /// The operator as a `Stream` combinator on one glommio executor: records generated and
    /// consumed on that thread, as the tokio baseline and redis-benchmark do (no producer or
    /// consumer thread).
    AdapterUnordered,
}

impl Mode {
    pub const ALL: [Mode; 15] = [
        Mode::SyncMap,
        Mode::ThreadPool,
        Mode::TokioBuffered,
        Mode::TokioUnordered,
        Mode::TokioLocalUnordered,
        Mode::Ordered,
        Mode::Unordered,
        Mode::KeyOrdered,
        Mode::OnShardOrdered,
        Mode::OnShardUnordered,
        Mode::RoutedOrdered,
        Mode::RoutedUnordered,
        Mode::TokioLocalBuffered,
        Mode::TokioCachedUnordered,
        Mode::AdapterUnordered,
    ];

    /// What `sluice bench` runs without `--modes`: all but the opt-in baselines (the ordered
    /// current-thread tokio program and the caching one) and the adapter mode.
    pub fn defaults() -> &'static [Mode] {
        &Mode::ALL[..Mode::ALL.len() - 3]
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::SyncMap => "sync-map",
            Mode::ThreadPool => "thread-pool",
            Mode::TokioBuffered => "tokio-buffered",
            Mode::TokioUnordered => "tokio-unordered",
            Mode::TokioLocalUnordered => "tokio-local-unordered",
            Mode::TokioLocalBuffered => "tokio-local-buffered",
            Mode::TokioCachedUnordered => "tokio-cached-unordered",
            Mode::Ordered => "ordered",
            Mode::Unordered => "unordered",
            Mode::KeyOrdered => "key-ordered",
            Mode::OnShardOrdered => "on-shard-ordered",
            Mode::OnShardUnordered => "on-shard-unordered",
            Mode::RoutedOrdered => "routed-ordered",
            Mode::RoutedUnordered => "routed-unordered",
            Mode::AdapterUnordered => "adapter-unordered",
        }
    }

    /// Requests in flight this mode may have at `shards` and `capacity`.
    pub fn in_flight(self, shards: usize, capacity: usize) -> usize {
        match self {
            Mode::SyncMap => shards,
            Mode::ThreadPool => (shards * capacity).min(512),
            _ => shards * capacity,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Mode::ALL.iter().map(|m| m.name()).collect();
                format!("unknown mode `{s}`; modes are {}", names.join(", "))
            })
    }
}

/// The sweep's settings.
#[derive(Debug, Clone)]
pub struct SweepConfig {
    pub addr: SocketAddr,
    /// A label for the server (`loadgen 1ms` or the Redis URL).
    pub server: String,
    /// The server's configured latency, if known (embedded server).
    pub configured_latency: Option<Duration>,
    pub keys: u64,
    pub modes: Vec<Mode>,
    pub shards: Vec<usize>,
    pub capacities: Vec<usize>,
    pub duration: Duration,
    /// Instead of `duration`: records per point.
    pub records: Option<u64>,
    pub repeat: usize,
    pub seed: u64,
    /// The sluice modes' Redis client settings.
    pub client: crate::redis::ClientConfig,
    /// Pin the sluice modes' shards (one core per shard when there are enough).
    pub pin: bool,
    pub distribution: loadgen::records::KeyDistribution,
    /// The sluice modes' lookup layer.
    pub layer: crate::lookup::LayerConfig,
    /// The server speaks HTTP (`GET /KEY`) instead of RESP: every mode uses its HTTP client
    /// (the blocking baselines HTTP/1.1 keep-alive, the tokio ones reqwest, sluice's
    /// `HttpLookup`).
    pub http: bool,
}

/// Called before each point with (done, total, label).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, &str);

/// The round trip of sequential GETs, measured before a sweep.
#[derive(Debug, Clone, Copy)]
pub struct RoundTrip {
    /// The smallest median of 5 batches of 100: one disturbed moment on a shared machine does
    /// not stretch it and flatter every efficiency computed from it. The round trip under a
    /// fixed delay.
    pub best_batch: Duration,
    /// The median of all 500: under a random delay, the smallest of 5 batch medians is biased
    /// low (each is a noisy estimate), this one is not.
    pub overall: Duration,
}

impl RoundTrip {
    /// The round trip Little's law should use for the ideal: the mean. Under a fixed delay (or
    /// a real server, `delay` None) that is `best_batch`; under a random delay the probe's
    /// median holds the delay's median, and the mean lies above it by the delay's mean minus
    /// its median (1.27x the median for longtail:1ms:5ms).
    pub fn for_ideal(&self, delay: Option<&loadgen::LatencyModel>) -> Duration {
        match delay {
            Some(d) if !matches!(d, loadgen::LatencyModel::Fixed(_)) => {
                self.overall + d.mean().saturating_sub(d.median())
            }
            _ => self.best_batch,
        }
    }
}

/// Measures the round trip of sequential GETs (Little's law needs the real latency).
pub fn probe_round_trip(addr: SocketAddr, keys: u64, http: bool) -> Result<RoundTrip, String> {
    const BATCHES: u64 = 5;
    const PER_BATCH: u64 = 100;
    let mut all = runners::histogram();
    let mut best_batch = Duration::MAX;
    for batch in 0..BATCHES {
        let batch_keys = (batch * PER_BATCH..(batch + 1) * PER_BATCH).map(|i| i % keys);
        let (_, latency_us) = runners::blocking_lookups(addr, http, batch_keys)
            .map_err(|e| format!("probing the round trip: {e}"))?;
        best_batch = best_batch.min(Duration::from_micros(latency_us.value_at_quantile(0.5)));
        all.add(&latency_us).map_err(|e| e.to_string())?;
    }
    Ok(RoundTrip {
        best_batch,
        overall: Duration::from_micros(all.value_at_quantile(0.5)),
    })
}

/// Runs the sweep and returns one point per (mode, shards, capacity), medians over repeats.
pub fn sweep(
    config: &SweepConfig,
    server_limit_rps: f64,
    round_trip: Duration,
    progress: Progress<'_>,
) -> Result<Report, String> {
    let mut plan = vec![];
    for &shards in &config.shards {
        for &capacity in &config.capacities {
            for &mode in &config.modes {
                // sync-map ignores capacity: measure it once per shard count.
                if mode == Mode::SyncMap && capacity != config.capacities[0] {
                    continue;
                }
                plan.push((mode, shards, capacity));
            }
        }
    }
    let total = plan.len() * config.repeat;
    let mut runs: std::collections::BTreeMap<(usize, usize, Mode), Vec<Measurement>> =
        Default::default();
    let mut done = 0;
    for r in 0..config.repeat {
        for &(mode, shards, capacity) in &plan {
            progress(
                done,
                total,
                &format!(
                    "{mode} shards={shards} capacity={capacity} (repeat {})",
                    r + 1
                ),
            );
            let workload = Workload {
                addr: config.addr,
                keys: config.keys,
                duration: config.duration,
                records: config.records,
                seed: config.seed.wrapping_add(r as u64),
                client: config.client.clone(),
                pin: config.pin,
                distribution: config.distribution,
                layer: config.layer.clone(),
                http: config.http,
            };
            let m = runners::run(mode, shards, capacity, &workload)
                .map_err(|e| format!("{mode} shards={shards} capacity={capacity}: {e}"))?;
            runs.entry((shards, capacity, mode)).or_default().push(m);
            done += 1;
        }
    }
    progress(done, total, "done");
    Ok(Report::from_runs(
        config,
        server_limit_rps,
        round_trip,
        runs,
    ))
}

/// Requests in flight per shard when measuring the server's limit.
const LIMIT_IN_FLIGHT_PER_SHARD: usize = 1024;

/// The server's limit, in records/s: the cheapest client (the operator as a single-threaded
/// combinator, one per shard) with 1024 requests in flight per shard against a server that
/// adds no latency. (Measured with the full stage at 256 in flight instead, the "limit" was
/// the client's and the adapter beat it by up to 27%.)
pub fn runners_limit(
    addr: SocketAddr,
    keys: u64,
    shards: usize,
    duration: Duration,
    http: bool,
) -> Result<f64, String> {
    let w = Workload {
        addr,
        keys,
        duration,
        records: None,
        seed: 1,
        client: Default::default(),
        pin: true,
        distribution: loadgen::records::KeyDistribution::Uniform,
        layer: Default::default(),
        http,
    };
    let m = runners::run(
        Mode::AdapterUnordered,
        shards,
        LIMIT_IN_FLIGHT_PER_SHARD,
        &w,
    )?;
    Ok(m.records as f64 / m.elapsed.as_secs_f64())
}

/// Writes loadgen's keyspace (`keys` users, values of `value_size` bytes) into the Redis at
/// `addr`, pipelined, so `--redis` benchmarks find every key.
pub fn load_keyspace(addr: SocketAddr, keys: u64, value_size: usize) -> Result<(), String> {
    glommio::LocalExecutorBuilder::default()
        .io_memory(crate::DEFAULT_IO_MEMORY)
        .spawn(move || async move {
            let client = crate::redis::RedisClient::new(addr, &Default::default());
            let mut start = 0;
            while start < keys {
                let end = (start + 1_000).min(keys);
                let batch: Vec<_> = (start..end)
                    .map(|i| {
                        let (k, v) = (
                            loadgen::keyspace::key(i),
                            loadgen::keyspace::value(i, value_size),
                        );
                        client.command(&[b"SET", k.as_bytes(), &v])
                    })
                    .collect();
                for reply in futures::future::join_all(batch).await {
                    reply.map_err(|e| format!("loading the keyspace into {addr}: {e}"))?;
                }
                start = end;
            }
            Ok::<(), String>(())
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ideal_uses_the_best_batch_under_a_fixed_delay_and_the_mean_under_a_random_one() {
        let probed = RoundTrip {
            best_batch: Duration::from_micros(1_050),
            overall: Duration::from_micros(1_100),
        };
        let fixed: loadgen::LatencyModel = "1ms".parse().unwrap();
        assert_eq!(probed.for_ideal(None), probed.best_batch);
        assert_eq!(probed.for_ideal(Some(&fixed)), probed.best_batch);
        // Uniform: mean = median, so the overall median as it is.
        let uniform: loadgen::LatencyModel = "uniform:500us:1500us".parse().unwrap();
        assert_eq!(probed.for_ideal(Some(&uniform)), probed.overall);
        // Log-normal with p50 1 ms, p99 5 ms: mean = 1 ms x exp(sigma^2 / 2), about 1.27 ms.
        let tail: loadgen::LatencyModel = "longtail:1ms:5ms".parse().unwrap();
        let extra = probed.for_ideal(Some(&tail)) - probed.overall;
        assert!(
            (Duration::from_micros(260)..Duration::from_micros(280)).contains(&extra),
            "{extra:?}"
        );
    }
}
