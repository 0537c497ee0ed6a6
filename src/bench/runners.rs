//! One benchmark point per mode: the three baselines and sluice's three modes, each doing GETs
//! of uniformly drawn keys against the same server for the same wall time.
//!
//! Owns: how each contender is driven. Invariants: every contender gets records from the same
//! key distribution until the deadline, then finishes what it has in flight; `records` counts
//! completed lookups only; a lookup that finds no value or fails is an error, never a record.

use super::blocking_client::BlockingClient;
use super::cpu::CpuMark;
use super::Mode;
use crate::enrich::backend::{Backend, BackendError};
use crate::function::{AsyncFunction, Outputs};
use crate::lookup::{
    AdaptiveConfig, Concurrency, Get, LayerConfig, LayerStats, LookupError, Lookups, Sinks,
};
use crate::redis::{ClientConfig, RedisClient};
use crate::{OutputMode, Stage};
use futures::StreamExt;
use hdrhistogram::Histogram;
use loadgen::records::{KeyDistribution, KeySampler};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// What one run of one point measured.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub records: u64,
    pub elapsed: Duration,
    /// Dispatch-to-result latency, microseconds.
    pub latency_us: Histogram<u64>,
    /// Client CPU (user + system) over the run.
    pub cpu: Duration,
    /// sluice's modes: each request's time on the wire (handed to the socket -> reply read),
    /// microseconds; the rest of `latency_us` is the client's own queueing.
    pub wire_us: Option<Histogram<u64>>,
    /// sluice's modes: what the lookup layer did (requests, cache hits, coalescing, limit).
    pub layer: Option<LayerStats>,
}

/// Where and what to look up.
#[derive(Debug, Clone)]
pub struct Workload {
    pub addr: SocketAddr,
    pub keys: u64,
    pub duration: Duration,
    /// Instead of `duration`: stop after this many records in all.
    pub records: Option<u64>,
    pub seed: u64,
    /// The sluice modes' Redis client settings (`--reply-split`).
    pub client: ClientConfig,
    /// Pin the sluice modes' shards to cores when there is one per shard (`--no-pin`: never).
    pub pin: bool,
    /// How keys are drawn (`--key-distribution`).
    pub distribution: KeyDistribution,
    /// The sluice modes' lookup layer (batching, coalescing, cache, limits); the cache's
    /// entries and TTL also size the caching tokio baseline's cache.
    pub layer: LayerConfig,
    /// The server speaks HTTP (`GET /KEY`, loadgen's `--http` mode) instead of RESP.
    pub http: bool,
}

/// A sluice mode's backend on one shard: a Redis client, or an HTTP client with as many
/// connections as the point's capacity (one request per connection).
fn backend(w: &Workload, capacity: usize) -> Backend {
    if w.http {
        let endpoint = crate::http::HttpEndpoint {
            addr: w.addr,
            host_header: w.addr.to_string(),
        };
        let config = crate::http::HttpConfig {
            max_connections: capacity,
            ..Default::default()
        };
        Backend::http(endpoint, &config)
    } else {
        Backend::Redis(crate::lookup::RedisLookup::new(
            RedisClient::new(w.addr, &w.client),
            crate::lookup::ValueKind::String,
        ))
    }
}

/// When a point stops producing records: after `Workload::records` records in all (shared by
/// the point's workers), or at the deadline (the clock is read every 64 records: reading it
/// per record costs as much as the bookkeeping being measured).
#[derive(Clone)]
pub(crate) struct Budget {
    deadline: Instant,
    remaining: Option<Arc<AtomicU64>>,
    taken: u64,
}

impl Budget {
    pub(crate) fn new(w: &Workload, start: Instant) -> Budget {
        Budget {
            deadline: start + w.duration,
            remaining: w.records.map(|n| Arc::new(AtomicU64::new(n))),
            taken: 0,
        }
    }

    /// Whether one more record may be produced.
    pub(crate) fn take(&mut self) -> bool {
        if let Some(remaining) = &self.remaining {
            return remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
        }
        self.taken += 1;
        self.taken % 64 != 0 || Instant::now() < self.deadline
    }
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds")
}

fn record_latency(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// Writes key `i` (`user:user_000042`) into `buf` without allocating.
pub(crate) fn key_of(i: u64, buf: &mut [u8; 32]) -> &[u8] {
    const PREFIX: &[u8] = b"user:user_";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 20];
    let mut n = i;
    let mut len = 0;
    while n > 0 || len < 6 {
        digits[len] = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
    }
    for j in 0..len {
        buf[PREFIX.len() + j] = digits[len - 1 - j];
    }
    &buf[..PREFIX.len() + len]
}

/// The workload's keys, a different stream per worker.
struct Keys(KeySampler);

impl Keys {
    fn new(w: &Workload, worker: u64) -> Keys {
        let seed = w.seed ^ worker.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Keys(KeySampler::new(w.keys, w.distribution, seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_key()
    }
}

fn missing(key: u64) -> String {
    format!(
        "key user:user_{key:06} has no value: is the keyspace the server's (--keys; a Redis \
         needs it loaded first, --load)?"
    )
}

/// Runs one point of `mode`.
pub fn run(
    mode: Mode,
    shards: usize,
    capacity: usize,
    w: &Workload,
) -> Result<Measurement, String> {
    match mode {
        Mode::SyncMap => sync_map(shards, w),
        Mode::ThreadPool => thread_pool((shards * capacity).min(512), w),
        Mode::TokioBuffered => tokio_futures(shards, capacity, true, w),
        Mode::TokioUnordered => tokio_futures(shards, capacity, false, w),
        Mode::TokioLocalUnordered => tokio_local(shards, capacity, false, false, w),
        Mode::TokioLocalBuffered => tokio_local(shards, capacity, true, false, w),
        Mode::TokioCachedUnordered => tokio_local(shards, capacity, false, true, w),
        Mode::Ordered => sluice(OutputMode::Ordered, shards, capacity, w),
        Mode::Unordered => sluice(OutputMode::Unordered, shards, capacity, w),
        Mode::KeyOrdered => sluice(OutputMode::KeyOrdered, shards, capacity, w),
        Mode::OnShardOrdered => on_shard(OutputMode::Ordered, shards, capacity, w),
        Mode::OnShardUnordered => on_shard(OutputMode::Unordered, shards, capacity, w),
        Mode::RoutedOrdered => routed(OutputMode::Ordered, shards, capacity, w),
        Mode::RoutedUnordered => routed(OutputMode::Unordered, shards, capacity, w),
        Mode::AdapterUnordered => adapter(shards, capacity, w),
    }
}

/// The operator as a single-threaded `Stream` combinator: one glommio executor per shard
/// (pinned like the stage's shards), generating, looking up and consuming on that thread.
fn adapter(shards: usize, capacity: usize, w: &Workload) -> Result<Measurement, String> {
    use crate::{AsyncWaitExt, OperatorConfig};
    let cores = crate::usable_cores();
    let cpu = CpuMark::now();
    let start = Instant::now();
    let budget = Budget::new(w, start);
    let workers: Vec<_> = (0..shards)
        .map(|s| {
            let mut budget = budget.clone();
            let placement = match cores.get(s) {
                Some(&core) if w.pin && shards <= cores.len() => glommio::Placement::Fixed(core),
                _ => glommio::Placement::Unbound,
            };
            let w = w.clone();
            glommio::LocalExecutorBuilder::new(placement)
                .io_memory(crate::DEFAULT_IO_MEMORY)
                .spawn(move || async move {
                    let mut keys = Keys::new(&w, s as u64);
                    let input = futures::stream::iter(std::iter::from_fn(move || {
                        budget.take().then(|| keys.next())
                    }));
                    let mut config = OperatorConfig::new();
                    config.capacity = std::num::NonZeroUsize::new(capacity).expect("capacity >= 1");
                    config.mode = OutputMode::Unordered;
                    config.timeout = LOOKUP_TIMEOUT;
                    let layer = shard_layer(&w, shards, capacity);
                    let lookups = Rc::new(Lookups::new(backend(&w, capacity), layer));
                    let lookup = KeyLookup::new(lookups.clone(), None, w.http);
                    let mut outputs = input.async_wait(lookup, config);
                    let mut n = 0u64;
                    while let Some(r) = outputs.next().await {
                        r.map_err(|e| e.to_string())?;
                        n += 1;
                    }
                    let latency = outputs.operator().metrics().invoke_to_emit_us.clone();
                    let wire = lookups.backend().wire_latency();
                    Ok::<_, String>((n, latency, wire, lookups.stats()))
                })
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let mut records = 0;
    let mut latency_us = histogram();
    let mut wire_us = crate::redis::wire_histogram();
    let mut layer = LayerStats::default();
    for worker in workers {
        let (n, h, wire, stats) = worker.join().map_err(|e| e.to_string())??;
        records += n;
        latency_us.add(&h).map_err(|e| e.to_string())?;
        wire_us.add(&wire).map_err(|e| e.to_string())?;
        layer.add(&stats);
    }
    let wire_us = Some(wire_us);
    Ok(Measurement {
        records,
        elapsed: start.elapsed(),
        latency_us,
        cpu: cpu.client_since(),
        wire_us,
        layer: Some(layer),
    })
}

/// One blocking client per shard, one request at a time.
fn sync_map(shards: usize, w: &Workload) -> Result<Measurement, String> {
    let cpu = CpuMark::now();
    let start = Instant::now();
    let budget = Budget::new(w, start);
    let workers: Vec<_> = (0..shards as u64)
        .map(|s| {
            let (w, mut budget) = (w.clone(), budget.clone());
            std::thread::spawn(move || -> WorkerResult {
                let mut keys = Keys::new(&w, s);
                blocking_lookups(
                    w.addr,
                    w.http,
                    std::iter::from_fn(|| budget.take().then(|| keys.next())),
                )
            })
        })
        .collect();
    collect(workers, start, cpu)
}

/// A baseline worker's result: lookups done and their latencies.
type WorkerResult = Result<(u64, Histogram<u64>), String>;

/// One blocking client looking up `keys` one at a time, timing each.
pub(crate) fn blocking_lookups(
    addr: SocketAddr,
    http: bool,
    keys: impl Iterator<Item = u64>,
) -> WorkerResult {
    let mut client =
        BlockingClient::connect(addr, http).map_err(|e| format!("connect {addr}: {e}"))?;
    let mut hist = histogram();
    let mut buf = [0u8; 32];
    let mut n = 0;
    for k in keys {
        let t = Instant::now();
        client
            .get(key_of(k, &mut buf))
            .map_err(|e| e.to_string())?
            .ok_or_else(|| missing(k))?;
        record_latency(&mut hist, t.elapsed());
        n += 1;
    }
    Ok((n, hist))
}

fn collect(
    workers: Vec<std::thread::JoinHandle<WorkerResult>>,
    start: Instant,
    cpu: CpuMark,
) -> Result<Measurement, String> {
    let mut records = 0;
    let mut latency_us = histogram();
    for w in workers {
        let (n, h) = w.join().map_err(|_| "a worker panicked".to_string())??;
        records += n;
        latency_us.add(&h).expect("same bounds");
    }
    Ok(Measurement {
        records,
        elapsed: start.elapsed(),
        latency_us,
        cpu: cpu.client_since(),
        wire_us: None,
        layer: None,
    })
}

/// A producer feeding a pool of blocking clients through a bounded queue.
fn thread_pool(threads: usize, w: &Workload) -> Result<Measurement, String> {
    let cpu = CpuMark::now();
    let start = Instant::now();
    let mut budget = Budget::new(w, start);
    let (tx, rx) = flume::bounded::<u64>(threads);
    let producer = {
        let w = w.clone();
        std::thread::spawn(move || {
            let mut keys = Keys::new(&w, 0);
            while budget.take() {
                if tx.send(keys.next()).is_err() {
                    break;
                }
            }
        })
    };
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (rx, addr, http) = (rx.clone(), w.addr, w.http);
            std::thread::spawn(move || -> WorkerResult { blocking_lookups(addr, http, rx.iter()) })
        })
        .collect();
    drop(rx);
    let result = collect(workers, start, cpu);
    producer
        .join()
        .map_err(|_| "producer panicked".to_string())?;
    result
}

/// The caching tokio baseline's cache, shared by its threads.
type TokioCache = moka::sync::Cache<u64, bytes::Bytes>;

/// Entries (and their TTL) of the caching baseline when the layer has no cache configured.
const TOKIO_CACHE_DEFAULT_ENTRIES: u64 = 100_000;
const TOKIO_CACHE_DEFAULT_TTL: Duration = Duration::from_secs(60);

fn tokio_cache(shards: usize, layer: &LayerConfig) -> TokioCache {
    let (entries, ttl) = match &layer.cache {
        Some(c) => (c.entries.get() as u64 * shards as u64, c.ttl),
        None => (TOKIO_CACHE_DEFAULT_ENTRIES, TOKIO_CACHE_DEFAULT_TTL),
    };
    moka::sync::Cache::builder()
        .max_capacity(entries)
        .time_to_live(ttl)
        .build()
}

/// redis-rs's default pipeline queue per multiplexed connection.
const PIPELINE_BUFFER_DEFAULT: usize = 50;

/// How long any contender's lookup may take before the point fails: the same for sluice's
/// modes and the tokio baseline (whose redis-rs default is 500 ms, short enough for one stall
/// of a shared machine, or a debug build under load, to fail a whole sweep).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A tokio worker's way to the server: redis-rs's multiplexed connections, or a reqwest
/// client (its own keep-alive pool).
#[derive(Clone)]
enum TokioConns {
    Redis(Vec<redis::aio::MultiplexedConnection>),
    Http(reqwest::Client),
}

/// The tokio baseline's clients: redis-rs connections (`redis_connections`), or over HTTP a
/// reqwest client per worker as a user configures one for a lookup service (HTTP/1.1,
/// `TCP_NODELAY`, an idle pool as large as the requests in flight, the same timeout).
fn tokio_connections(
    runtime: &tokio::runtime::Runtime,
    shards: usize,
    capacity: usize,
    w: &Workload,
) -> Result<Vec<TokioConns>, String> {
    if w.http {
        return (0..shards)
            .map(|_| {
                reqwest::Client::builder()
                    .http1_only()
                    .tcp_nodelay(true)
                    .pool_max_idle_per_host(capacity)
                    .timeout(LOOKUP_TIMEOUT)
                    .build()
                    .map(TokioConns::Http)
                    .map_err(|e| e.to_string())
            })
            .collect();
    }
    Ok(redis_connections(runtime, shards, capacity, w)?
        .into_iter()
        .map(TokioConns::Redis)
        .collect())
}

/// The tokio baseline's Redis connections, opened before the clock starts as the other
/// contenders' are: as many multiplexed connections per worker as sluice's client opens per
/// shard.
fn redis_connections(
    runtime: &tokio::runtime::Runtime,
    shards: usize,
    capacity: usize,
    w: &Workload,
) -> Result<Vec<Vec<redis::aio::MultiplexedConnection>>, String> {
    // TCP_NODELAY, as sluice's client and the blocking baselines set it (and as Jedis, Lettuce
    // and go-redis do by default): redis-rs leaves Nagle on, which holds a multiplexed
    // connection's write until the previous one is acknowledged, i.e. about one round trip
    // (redis-rs issue #2195). A baseline measured with it would be a strawman.
    let info = redis::IntoConnectionInfo::into_connection_info(format!("redis://{}/", w.addr))
        .map_err(|e| e.to_string())?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    let client = redis::Client::open(info).map_err(|e| e.to_string())?;
    // Connect before the clock starts, as the other contenders do: as many multiplexed
    // connections per worker as sluice's client opens per shard.
    let per_shard = w.client.connection_count();
    // And a pipeline queue that holds the requests in flight: redis-rs queues a multiplexed
    // connection's requests for its driver in a channel of 50 by default (redis-rs issue
    // #1933), which at 256 in flight against Redis halved the baseline's rate and doubled
    // its CPU per record (docs/decisions/fair-baselines-and-the-embedded-server.md).
    let conn_config = redis::AsyncConnectionConfig::new()
        .set_pipeline_buffer_size(capacity.div_ceil(per_shard).max(PIPELINE_BUFFER_DEFAULT))
        .set_response_timeout(Some(LOOKUP_TIMEOUT));
    runtime.block_on(async {
        let mut v = vec![];
        for _ in 0..shards {
            let mut shard = vec![];
            for _ in 0..per_shard {
                shard.push(
                    client
                        .get_multiplexed_async_connection_with_config(&conn_config)
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            v.push(shard);
        }
        Ok::<_, String>(v)
    })
}

/// One tokio worker's share of the baseline: GETs over its connections through `buffered` or
/// `buffer_unordered`, until the time budget runs out; the records done and their latencies.
async fn tokio_shard(
    s: usize,
    conns: TokioConns,
    w: Workload,
    mut budget: Budget,
    capacity: usize,
    ordered: bool,
    cache: Option<TokioCache>,
) -> Result<(u64, hdrhistogram::Histogram<u64>), String> {
    let mut keys = Keys::new(&w, s as u64);
    let lookups = futures::stream::iter(std::iter::from_fn(move || {
        budget.take().then(|| keys.next())
    }))
    .enumerate()
    .map(move |(i, k)| {
        // Round-robin, as sluice's client spreads requests over its connections.
        let conn = match &conns {
            TokioConns::Redis(c) => futures::future::Either::Left(c[i % c.len()].clone()),
            TokioConns::Http(client) => futures::future::Either::Right(client.clone()),
        };
        let (cache, addr) = (cache.clone(), w.addr);
        async move {
            let mut buf = [0u8; 32];
            let t = Instant::now();
            if let Some(cache) = &cache {
                if cache.get(&k).is_some() {
                    return Ok(t.elapsed());
                }
            }
            let v: Option<bytes::Bytes> = match conn {
                futures::future::Either::Left(mut conn) => redis::cmd("GET")
                    .arg(key_of(k, &mut buf))
                    .query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?
                    .map(bytes::Bytes::from),
                futures::future::Either::Right(client) => {
                    let key = String::from_utf8_lossy(key_of(k, &mut buf)).into_owned();
                    reqwest_get(&client, format!("http://{addr}/{key}")).await?
                }
            };
            let v = v.ok_or_else(|| missing(k))?;
            if let Some(cache) = &cache {
                cache.insert(k, v);
            }
            Ok::<_, String>(t.elapsed())
        }
    });
    let mut hist = histogram();
    let mut n = 0;
    // Two loops rather than one over a boxed stream: a `dyn Stream` would add a
    // virtual call per record to the baseline.
    if ordered {
        let mut s = lookups.buffered(capacity);
        while let Some(r) = s.next().await {
            record_latency(&mut hist, r?);
            n += 1;
        }
    } else {
        let mut s = lookups.buffer_unordered(capacity);
        while let Some(r) = s.next().await {
            record_latency(&mut hist, r?);
            n += 1;
        }
    }
    Ok((n, hist))
}

/// A GET through reqwest: the body for 200, `None` for 404.
async fn reqwest_get(
    client: &reqwest::Client,
    url: String,
) -> Result<Option<bytes::Bytes>, String> {
    let response = client.get(url).send().await.map_err(|e| e.to_string())?;
    match response.status().as_u16() {
        200 => Ok(Some(response.bytes().await.map_err(|e| e.to_string())?)),
        404 => Ok(None),
        status => Err(format!("the server answered {status}")),
    }
}

/// What a Rust user writes by hand: tokio (one worker thread per shard), redis-rs's multiplexed
/// connection (or reqwest over HTTP), and `buffered` / `buffer_unordered`.
fn tokio_futures(
    shards: usize,
    capacity: usize,
    ordered: bool,
    w: &Workload,
) -> Result<Measurement, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(shards)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let connections = tokio_connections(&runtime, shards, capacity, w)?;
    let cpu = CpuMark::now();
    let start = Instant::now();
    let budget = Budget::new(w, start);
    let tasks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(s, conns)| {
            let (w, budget) = (w.clone(), budget.clone());
            runtime.spawn(tokio_shard(s, conns, w, budget, capacity, ordered, None))
        })
        .collect();
    let mut records = 0;
    let mut latency_us = histogram();
    for t in tasks {
        let (n, h) = runtime.block_on(t).map_err(|e| e.to_string())??;
        records += n;
        latency_us.add(&h).expect("same bounds");
    }
    let elapsed = start.elapsed();
    let cpu = cpu.client_since();
    runtime.shutdown_background();
    Ok(Measurement {
        records,
        elapsed,
        latency_us,
        cpu,
        wire_us: None,
        layer: None,
    })
}

/// The baseline on a current-thread tokio runtime per shard, each on a thread of its own (the
/// calling thread's cost stays out: it only starts the clock and joins): what a
/// single-threaded tokio program costs, without a multi-thread runtime's work stealing and the
/// wake-ups of its idle workers. Each thread connects on its own runtime (a multiplexed
/// connection's driver runs on the runtime that opened it), then waits for the clock to start.
///
/// `ordered` uses `buffered`, else `buffer_unordered`. With `cached`, the threads share a cache in front of Redis as a Rust user adds one: moka's
/// concurrent cache, keyed by the key's index (cheaper than the key's string), holding as many
/// entries for as long as sluice's per-shard caches do in all (`--cache-size` x shards,
/// `--cache-ttl`).
fn tokio_local(
    shards: usize,
    capacity: usize,
    ordered: bool,
    cached: bool,
    w: &Workload,
) -> Result<Measurement, String> {
    let cache = cached.then(|| tokio_cache(shards, &w.layer));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut starts = Vec::with_capacity(shards);
    let mut threads = Vec::with_capacity(shards);
    for s in 0..shards {
        let (start_tx, start_rx) = std::sync::mpsc::channel::<Budget>();
        starts.push(start_tx);
        let (w, ready, cache) = (w.clone(), ready_tx.clone(), cache.clone());
        threads.push(std::thread::spawn(move || -> WorkerResult {
            let connected = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    let conns = tokio_connections(&rt, 1, capacity, &w)?;
                    let conns = conns.into_iter().next().ok_or("no connection")?;
                    Ok((rt, conns))
                });
            let _ = ready.send(connected.as_ref().map(|_| ()).map_err(Clone::clone));
            let (runtime, conns) = connected?;
            // The sender is dropped when another shard failed to connect: stop.
            let budget = start_rx.recv().map_err(|_| "not started".to_string())?;
            runtime.block_on(tokio_shard(s, conns, w, budget, capacity, ordered, cache))
        }));
    }
    drop(ready_tx);
    for _ in 0..shards {
        ready_rx
            .recv()
            .map_err(|_| "a tokio thread ended before it connected".to_string())??;
    }
    let cpu = CpuMark::now();
    let start = Instant::now();
    let budget = Budget::new(w, start);
    for tx in starts {
        let _ = tx.send(budget.clone());
    }
    collect(threads, start, cpu)
}

/// A lookup of a key index through the shard's lookup layer; fails on a missing key.
pub(crate) struct KeyLookup {
    lookups: Rc<Lookups<Backend>>,
    /// Where `close` adds the client's wire times and the layer's figures (the stage's
    /// shards).
    sinks: Option<Sinks>,
    /// Keys are request targets (`/KEY`).
    http: bool,
}

impl KeyLookup {
    pub(crate) fn new(lookups: Rc<Lookups<Backend>>, sinks: Option<Sinks>, http: bool) -> Self {
        KeyLookup {
            lookups,
            sinks,
            http,
        }
    }
}

/// Error of [`KeyLookup`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyLookupError {
    #[error(transparent)]
    Lookup(#[from] LookupError<BackendError>),
    #[error("{0}")]
    Missing(String),
}

pub(crate) struct KeyLookupFuture {
    get: Get<Backend>,
    key: u64,
}

impl Future for KeyLookupFuture {
    type Output = Result<Outputs<u32>, KeyLookupError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let key = self.key;
        Pin::new(&mut self.get).poll(cx).map(|r| match r? {
            Some(v) => Ok(Outputs::One(v.len() as u32)),
            None => Err(KeyLookupError::Missing(missing(key))),
        })
    }
}

impl AsyncFunction for KeyLookup {
    type In = u64;
    type Out = u32;
    type Error = KeyLookupError;
    type Future = KeyLookupFuture;
    fn invoke(&self, key: &u64) -> KeyLookupFuture {
        let mut buf = [0u8; 33];
        let get = if self.http {
            buf[0] = b'/';
            let len = key_of(*key, (&mut buf[1..]).try_into().expect("32 bytes")).len();
            self.lookups.get(&buf[..1 + len])
        } else {
            let key_buf: &mut [u8; 32] = (&mut buf[..32]).try_into().expect("32 bytes");
            self.lookups.get(key_of(*key, key_buf))
        };
        KeyLookupFuture { get, key: *key }
    }

    fn close(&mut self) {
        if let Some(sinks) = &self.sinks {
            sinks.add(None, self.lookups.backend().wire_latency(), &self.lookups);
        }
    }
}

/// The layer of one shard of a point: the rate limit shared over the shards, the adaptive
/// limit bounded by the point's capacity.
fn shard_layer(w: &Workload, shards: usize, capacity: usize) -> LayerConfig {
    let mut layer = w.layer.for_shard(shards);
    layer.capacity = std::num::NonZeroUsize::new(capacity);
    if let Concurrency::Adaptive(_) = layer.concurrency {
        layer.concurrency = Concurrency::Adaptive(AdaptiveConfig::for_capacity(capacity));
    }
    layer
}

/// A thread that pushes keys into the stage until the budget runs out; the count it pushed.
fn feed(
    mut producer: crate::Producer<u64>,
    w: &Workload,
    mut budget: Budget,
) -> (std::thread::JoinHandle<()>, Arc<AtomicU64>) {
    let pushed = Arc::new(AtomicU64::new(0));
    let (w, count) = (w.clone(), pushed.clone());
    let feeder = std::thread::spawn(move || {
        let mut keys = Keys::new(&w, 0);
        let mut i = 0u64;
        while budget.take() {
            if producer.push(keys.next()).is_err() {
                break;
            }
            i += 1;
        }
        count.store(i, Ordering::Relaxed);
    });
    (feeder, pushed)
}

/// The stage of a sluice mode's point: a Redis client and the point's lookup layer per shard,
/// whose wire times and layer figures go to `figures` when the shard closes.
fn stage_builder(
    mode: OutputMode,
    shards: usize,
    capacity: usize,
    w: &Workload,
    figures: &Sinks,
) -> crate::StageBuilder<KeyLookup, impl Fn(crate::ShardContext) -> KeyLookup + Send + Sync> {
    let layer = shard_layer(w, shards, capacity);
    let (figures, shard_w) = (figures.clone(), w.clone());
    Stage::builder(move |_| {
        let lookups = Rc::new(Lookups::new(backend(&shard_w, capacity), layer.clone()));
        KeyLookup::new(lookups, Some(figures.clone()), shard_w.http)
    })
    .shards(shards)
    .capacity(capacity)
    .timeout(LOOKUP_TIMEOUT)
    .mode(mode)
    .pinning(if w.pin {
        crate::engine::Pinning::Auto
    } else {
        crate::engine::Pinning::Off
    })
}

fn sluice(
    mode: OutputMode,
    shards: usize,
    capacity: usize,
    w: &Workload,
) -> Result<Measurement, String> {
    let sinks = Sinks::new();
    let mut builder = stage_builder(mode, shards, capacity, w, &sinks);
    if mode == OutputMode::KeyOrdered {
        builder = builder.key_by(|k: &u64| *k);
    }
    let (producer, mut consumer, handle) = builder.start().map_err(|e| e.to_string())?.split();
    let cpu = CpuMark::now();
    let start = Instant::now();
    let (feeder, pushed) = feed(producer, w, Budget::new(w, start));
    let mut records = 0;
    let mut failure = None;
    while let Some(item) = consumer.recv() {
        match item {
            Ok(_) => records += 1,
            Err(e) => failure = Some(e.to_string()),
        }
    }
    let elapsed = start.elapsed();
    let cpu = cpu.client_since();
    feeder.join().map_err(|_| "feeder panicked".to_string())?;
    let metrics = handle.metrics();
    handle.join().map_err(|e| e.to_string())?;
    if let Some(f) = failure {
        return Err(f);
    }
    assert_eq!(
        records,
        pushed.load(Ordering::Relaxed),
        "every pushed record came back"
    );
    let (wire_us, layer) = (Some(sinks.wire_us()), sinks.layer());
    Ok(Measurement {
        records,
        elapsed,
        latency_us: metrics.invoke_to_emit_us,
        cpu,
        wire_us,
        layer: Some(layer),
    })
}

/// Counts the records a shard's operator emitted; adds its count to `total` when its source
/// ended.
struct CountOutputs {
    records: u64,
    total: Arc<AtomicU64>,
}

impl<O: 'static> crate::ShardSink<O> for CountOutputs {
    async fn write(&mut self, outputs: &mut Vec<crate::Output<O>>) -> Result<(), crate::SinkError> {
        let records = outputs
            .iter()
            .filter(|o| matches!(o, crate::Output::Record { .. }))
            .count();
        self.records += records as u64;
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), crate::SinkError> {
        self.total.fetch_add(self.records, Ordering::Relaxed);
        Ok(())
    }
}

/// The stage with its source and sink on the shards: each shard draws keys until the budget
/// runs out, looks them up through its layer, and counts what its operator emits, all on its
/// own thread.
fn on_shard(
    mode: OutputMode,
    shards: usize,
    capacity: usize,
    w: &Workload,
) -> Result<Measurement, String> {
    let figures = Sinks::new();
    let builder = stage_builder(mode, shards, capacity, w, &figures);
    let counted = Arc::new(AtomicU64::new(0));
    let total = counted.clone();
    let cpu = CpuMark::now();
    let start = Instant::now();
    let budget = Budget::new(w, start);
    let source_w = w.clone();
    let handle = builder
        .run_on_shards(
            move |ctx| {
                let (mut budget, mut keys) =
                    (budget.clone(), Keys::new(&source_w, ctx.index as u64));
                futures::stream::iter(std::iter::from_fn(move || {
                    budget
                        .take()
                        .then(|| crate::SourceItem::Record(keys.next()))
                }))
            },
            move |_| CountOutputs {
                records: 0,
                total: total.clone(),
            },
        )
        .map_err(|e| e.to_string())?;
    measure_sinks(handle, start, cpu, &counted, &figures)
}

/// Waits for a stage whose sinks count into `counted`, and measures it from `start` and `cpu`.
fn measure_sinks(
    mut handle: crate::StageHandle,
    start: Instant,
    cpu: CpuMark,
    counted: &AtomicU64,
    figures: &Sinks,
) -> Result<Measurement, String> {
    let ended = handle.wait();
    let elapsed = start.elapsed();
    let cpu = cpu.client_since();
    ended.map_err(|e| e.to_string())?;
    let metrics = handle.metrics();
    let records = counted.load(Ordering::Relaxed);
    assert_eq!(records, metrics.records_in, "every record read came out");
    Ok(Measurement {
        records,
        elapsed,
        latency_us: metrics.invoke_to_emit_us,
        cpu,
        wire_us: Some(figures.wire_us()),
        layer: Some(figures.layer()),
    })
}

/// The stage with one source and one sink on shard 0: keys drawn there until the budget runs
/// out, routed to the shards, looked up, merged and counted back on shard 0.
fn routed(
    mode: OutputMode,
    shards: usize,
    capacity: usize,
    w: &Workload,
) -> Result<Measurement, String> {
    let figures = Sinks::new();
    let stage = stage_builder(mode, shards, capacity, w, &figures)
        .routed()
        .map_err(|e| e.to_string())?;
    let counted = Arc::new(AtomicU64::new(0));
    let total = counted.clone();
    let cpu = CpuMark::now();
    let start = Instant::now();
    let (mut budget, mut keys) = (Budget::new(w, start), Keys::new(w, 0));
    let handle = stage.run(
        move || {
            futures::stream::iter(std::iter::from_fn(move || {
                budget
                    .take()
                    .then(|| crate::SourceItem::Record(keys.next()))
            }))
        },
        move || CountOutputs { records: 0, total },
    );
    measure_sinks(handle, start, cpu, &counted, &figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_loadgens_keyspace() {
        let mut buf = [0u8; 32];
        for i in [0, 7, 99_999, 1_234_567] {
            assert_eq!(key_of(i, &mut buf), loadgen::keyspace::key(i).as_bytes());
        }
    }
}
