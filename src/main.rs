//! The `sluice` command: `sluice bench` (the benchmark harness) and `sluice enrich` (JSON Lines
//! enrichment from Redis).

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use loadgen::{LatencyModel, Server, ServerConfig};
use sluice::bench::{self, Mode, SweepConfig};
use sluice::enrich::BackendConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod layer_args;
use layer_args::LayerArgs;

#[derive(Parser)]
#[command(
    version,
    about = "Flink's Async I/O operator as a thread-per-core io_uring engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compare async modes with synchronous baselines on a real network path.
    Bench(Box<BenchArgs>),
    /// Enrich JSON Lines with values looked up in Redis (see docs/enrich.md).
    Enrich(Box<EnrichArgs>),
}

#[derive(Args)]
struct EnrichArgs {
    /// With rediss://: trust only the CA certificates in this PEM file (by default the
    /// system's roots).
    #[arg(long, requires = "redis")]
    tls_ca: Option<PathBuf>,
    /// With rediss://: present this client certificate (PEM; with --tls-key).
    #[arg(long, requires = "redis")]
    tls_cert: Option<PathBuf>,
    /// With rediss://: the client certificate's private key (PEM).
    #[arg(long, requires = "redis")]
    tls_key: Option<PathBuf>,
    /// What the keys hold: string (GET, or MGET when batching), hash (HGETALL: the hash's
    /// fields become a JSON object), or hash:FIELD,FIELD,... (HMGET of those fields). Redis only.
    #[arg(long)]
    value: Option<sluice::lookup::ValueKind>,
    /// The Redis to look up in: redis://[USER:PASSWORD@]HOST[:PORT][/DB] (AUTH and SELECT on
    /// every connection; percent-escape special characters in the password), or
    /// unix:///PATH[?db=N&password=P]; rediss:// for TLS (see --tls-ca).
    #[arg(long, required_unless_present_any = ["loadgen", "http", "postgres"], conflicts_with_all = ["loadgen", "http", "postgres"])]
    redis: Option<String>,
    /// Look up in an HTTP API instead: http://HOST[:PORT]/PATH[?QUERY] with the record's
    /// fields in braces, e.g. 'http://127.0.0.1:8080/users/{user_id}' (each field's text
    /// percent-encoded; this is the key, so --key is not given). A 2xx answer's body is the
    /// value, 404 is missing, 429 and 503 are retried under --retry (at least as long as
    /// Retry-After says), any other status is an error under --on-error. Plain HTTP/1.1 with
    /// keep-alive, up to --capacity connections per shard; no TLS or redirects.
    #[arg(long, conflicts_with_all = ["loadgen", "key", "value"])]
    http: Option<String>,
    /// With --http: the request method (default GET, or POST with --http-body).
    #[arg(long, requires = "http")]
    http_method: Option<String>,
    /// With --http: a header for every request, 'Name: value' (repeat the flag for more).
    #[arg(long, requires = "http")]
    http_header: Vec<String>,
    /// With --http: a request body over the record's fields, each field's text as JSON string
    /// content, literal braces doubled: '{{"user":"{user_id}","amount":{amount}}}'. Sent with
    /// Content-Type: application/json unless --http-header gives one. The target and the body
    /// together are the key the cache and coalescing go by.
    #[arg(long, requires = "http")]
    http_body: Option<String>,
    /// Look up in PostgreSQL instead: postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (the
    /// password may come from PGPASSWORD instead; trust, password, MD5 and SCRAM-SHA-256
    /// logins; plain TCP, no TLS). Each record runs --query with --params; the row is the
    /// value, a JSON object of its columns; no row is missing.
    #[arg(long, conflicts_with_all = ["loadgen", "http", "key", "value"], requires_all = ["query", "params"])]
    postgres: Option<String>,
    /// With --postgres: the lookup, prepared once per connection:
    /// 'SELECT name, tier FROM users WHERE id = $1'.
    #[arg(long, requires = "postgres")]
    query: Option<String>,
    /// With --postgres: the query's parameters over the record's fields, one flag per $n in
    /// order: --params '{user_id}' (each field's text, which the server casts). The
    /// parameters together are the key the cache and coalescing go by.
    #[arg(long, requires = "postgres")]
    params: Vec<String>,
    /// With --postgres and --batch-size N > 1: one execution for a batch of keys, $1 being
    /// the keys as a text array; its first column must give each row's key back as --params
    /// wrote it: 'SELECT id, name, tier FROM users WHERE id = ANY($1)'. One --params only.
    #[arg(long, requires = "postgres")]
    batch_query: Option<String>,
    /// With --postgres, when a key has several rows: first (the first row), array (a JSON array
    /// of all) or error (the record fails under --on-error; not with --batch-query).
    #[arg(long, default_value = "first", requires = "postgres", value_parser = sluice::postgres::RowsPolicy::parse)]
    rows: sluice::postgres::RowsPolicy,
    /// Look up in an embedded loadgen server instead (keys user:user_000000 ..., JSON profiles),
    /// to try the command with nothing installed.
    #[arg(long)]
    loadgen: bool,
    /// Reply delay of the embedded server.
    #[arg(long, default_value = "1ms", requires = "loadgen")]
    loadgen_latency: LatencyModel,
    /// Keys in the embedded server.
    #[arg(long, default_value_t = 100_000, requires = "loadgen", value_parser = at_least_one_u64())]
    loadgen_keys: u64,
    /// The key template, one or more fields of the record: 'user:{user_id}'.
    #[arg(long, required_unless_present_any = ["http", "postgres"])]
    key: Option<String>,
    /// Input JSON Lines file, or - for standard input.
    #[arg(long, default_value = "-")]
    input: String,
    /// Output JSON Lines file, or - for standard output.
    #[arg(long, default_value = "-")]
    output: String,
    /// Merge the value's fields into the record's top level (the default).
    #[arg(long, conflicts_with = "into")]
    merge: bool,
    /// Put the value under this field instead.
    #[arg(long)]
    into: Option<String>,
    /// A key with no value: keep the record unchanged, drop it, or fail.
    #[arg(long, default_value = "keep")]
    on_missing: sluice::enrich::OnMissing,
    /// With --on-missing keep: set this field to true on such records.
    #[arg(long)]
    missing_marker: Option<String>,
    /// A line that is not a JSON object or lacks a key field: fail, skip, or dead-letter FILE.
    #[arg(long, num_args = 1..=2, default_values_t = ["fail".to_string()])]
    on_bad_record: Vec<String>,
    /// ordered, unordered or key-ordered.
    #[arg(long, default_value = "ordered")]
    mode: String,
    /// Lookups in flight per shard.
    #[arg(long, default_value_t = 100, value_parser = at_least_one())]
    capacity: usize,
    /// Shards (default: one per usable core, as many as the locked-memory limit allows).
    #[arg(long, value_parser = at_least_one())]
    shards: Option<usize>,
    /// Connections per shard to Redis or PostgreSQL; more help when some replies are slow (a connection's
    /// replies come in order, so a slow one holds back those behind it).
    #[arg(long, default_value_t = sluice::redis::ClientConfig::default().connections,
          value_parser = at_least_one())]
    connections: usize,
    /// Per-record timeout, all attempts included.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// none, fixed:ATTEMPTS:DELAY or exp:ATTEMPTS:INITIAL:MAX[:none|full|equal|decorrelated];
    /// retries connection errors.
    #[arg(long, default_value = "none")]
    retry: sluice::enrich::RetrySpec,
    /// What --retry retries, comma-separated: error (connection errors, always), missing (a
    /// key with no value yet, as Flink's ifResult(EMPTY)).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "error",
        requires = "retry"
    )]
    retry_on: Vec<RetryOn>,
    /// A lookup that timed out: fail, emit (the record unenriched), drop, or dead-letter FILE.
    #[arg(long, num_args = 1..=2, default_values_t = ["fail".to_string()])]
    on_timeout: Vec<String>,
    /// A lookup that failed after its retries: fail, emit, drop, or dead-letter FILE.
    #[arg(long, num_args = 1..=2, default_values_t = ["fail".to_string()])]
    on_error: Vec<String>,
    /// The event-time field (epoch seconds, epoch milliseconds, or RFC 3339).
    #[arg(long)]
    event_time: Option<String>,
    /// Watermarks trail the largest event time by this much (Flink's bounded out-of-orderness).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration, requires = "event_time")]
    max_out_of_orderness: Duration,
    /// Write watermarks as {"watermark": <millis>} lines.
    #[arg(long, requires = "event_time")]
    emit_watermarks: bool,
    /// Also write the summary as JSON here.
    #[arg(long)]
    metrics_json: Option<PathBuf>,
    /// Serve the run's metrics at http://HOST:PORT/metrics in the Prometheus text format
    /// while it runs (records, latency histograms, retries, lookups and cache, NATS acks and
    /// partitions).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Take exactly-once checkpoints here and resume from the newest one when re-run with the
    /// same command (needs --input FILE and --output FILE). A finished run leaves a
    /// `completed` marker, and a re-run then does nothing.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Time between checkpoints.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, requires = "checkpoint_dir")]
    checkpoint_interval: Duration,
    /// Bytes of records and looked-up values held at most before reading waits (plus the
    /// values of the lookups in flight): 64MiB, 1GiB, or a number of bytes.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    max_bytes_held: u64,
    #[command(flatten)]
    layer: LayerArgs,
}

/// What `--retry` retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RetryOn {
    Error,
    Missing,
}

/// A size: a number of bytes, or with a KiB, MiB or GiB suffix (KB, MB, GB are taken as the
/// same). At least 1 KiB.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 64MiB, 1GiB, 1048576)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (use KiB, MiB or GiB)"
            ))
        }
    };
    let bytes = n
        .checked_mul(scale)
        .ok_or_else(|| format!("`{s}` is too large"))?;
    if bytes < 1024 {
        return Err(format!("`{s}` is below the least size, 1KiB"));
    }
    Ok(bytes)
}

/// A comma-separated list on the command line (`1,2,4`). A newtype, because clap treats a
/// bare `Vec` as "the flag may repeat".
#[derive(Debug, Clone)]
struct List<T>(Vec<T>);

impl<T: std::str::FromStr> std::str::FromStr for List<T>
where
    T::Err: std::fmt::Display,
{
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(|p| p.trim().parse::<T>().map_err(|e| format!("`{p}`: {e}")))
            .collect::<Result<Vec<T>, String>>()
            .map(List)
    }
}

#[derive(Args)]
struct BenchArgs {
    /// Benchmark a real Redis (redis://HOST:PORT) instead of the embedded loadgen server. It
    /// must hold loadgen's keyspace (user:user_000000 ...; see docs/benchmarks.md).
    #[arg(long)]
    redis: Option<String>,
    /// With --redis: first write loadgen's keyspace (--keys users, 128-byte values) into it.
    #[arg(long, requires = "redis")]
    load: bool,
    /// What the embedded server speaks: redis (RESP2) or http (`GET /KEY`, keep-alive). With
    /// http every mode uses its HTTP client: the blocking baselines HTTP/1.1 keep-alive, the
    /// tokio ones reqwest, sluice's modes its io_uring HTTP client.
    #[arg(long, default_value = "redis", value_parser = ["redis", "http"], conflicts_with = "redis")]
    backend: String,
    /// Shard counts to sweep, e.g. `1,2`.
    #[arg(long)]
    shards: Option<List<usize>>,
    /// Embedded server reply delay: `1ms`, `uniform:500us:2ms`, `longtail:1ms:20ms`.
    #[arg(long, default_value = "1ms")]
    latency: LatencyModel,
    /// Capacities (requests in flight per shard) to sweep.
    #[arg(long)]
    capacities: Option<List<usize>>,
    /// Modes to run: sync-map, thread-pool, tokio-buffered, tokio-unordered (a multi-thread
    /// runtime), tokio-local-unordered (a current-thread runtime per shard), ordered,
    /// unordered, key-ordered (the stage fed by a producer thread, read by a consumer thread),
    /// on-shard-ordered, on-shard-unordered (the stage with its source and sink on each shard),
    /// routed-ordered, routed-unordered (one source and sink on shard 0, records routed to the
    /// shards and merged back) (the default set); tokio-local-buffered (the current-thread
    /// baseline, ordered), tokio-cached-unordered (the current-thread baseline with a moka
    /// cache in front of Redis) and adapter-unordered (the operator as a single-threaded
    /// Stream combinator).
    #[arg(long)]
    modes: Option<List<Mode>>,
    /// Wall time per point.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "records")]
    duration: Option<Duration>,
    /// Records per point instead of a wall time (a sync map at 1 ms does ~1000/s: keep it
    /// small, or leave sync-map out with --modes).
    #[arg(long)]
    records: Option<u64>,
    /// Runs per point, interleaved across modes; figures are medians.
    #[arg(long)]
    repeat: Option<usize>,
    /// A sweep that finishes in under a minute (for CI): 1 shard, capacities 1,4,16,64,256,
    /// 0.25 s per point.
    #[arg(long)]
    quick: bool,
    /// Keys in the embedded server's keyspace (and drawn from).
    #[arg(long, default_value_t = 100_000, value_parser = at_least_one_u64())]
    keys: u64,
    /// Pin the embedded server's executor to this core (by default it floats and competes
    /// with the client for the same cores).
    #[arg(long, conflicts_with = "redis")]
    server_core: Option<usize>,
    /// The sluice modes' Redis client completes at most 1/N of a connection's requests in
    /// flight per turn before writing the requests those completions issued (1: all that
    /// arrived; see docs/decisions/reply-split.md).
    #[arg(long, default_value_t = sluice::redis::ClientConfig::default().reply_split,
          value_parser = at_least_one())]
    reply_split: usize,
    /// Connections per shard to the server, for the sluice modes and the tokio baseline
    /// alike (requests spread round-robin over them). Under a random delay, replies on one
    /// connection leave in request order, so a slow one holds back those behind it: more
    /// connections split the window (docs/decisions/write-coalescing-and-connections.md).
    #[arg(long, default_value_t = sluice::redis::ClientConfig::default().connections,
          value_parser = at_least_one())]
    connections: usize,
    /// Never pin the sluice modes' shards to cores (by default each shard gets a core when
    /// there is one per shard; on a host where other busy threads share those cores, letting
    /// the scheduler place shards can do better: docs/decisions/shards-unpinned.md).
    #[arg(long)]
    no_pin: bool,
    /// Use this server limit (records/s, the ideal's cap) instead of measuring it first
    /// (for repeated runs against the same server, or to keep the server's CPU figures to
    /// the sweep itself).
    #[arg(long)]
    server_limit: Option<f64>,
    /// Measure nothing: print the table and write the chart (--svg) of a saved JSON report.
    #[arg(long)]
    replot: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/sluice-bench/report.json")]
    json: PathBuf,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "target/sluice-bench/throughput.svg")]
    svg: PathBuf,
    /// How the keys looked up are drawn from the keyspace: uniform, or zipf:S (S the
    /// exponent, 1.0 classic skew; the key of rank 1 is user_000000).
    #[arg(long, default_value = "uniform", value_parser = parse_distribution)]
    key_distribution: loadgen::KeyDistribution,
    #[command(flatten)]
    layer: LayerArgs,
}

fn parse_distribution(s: &str) -> Result<loadgen::KeyDistribution, String> {
    match s.split_once(':') {
        None if s == "uniform" => Ok(loadgen::KeyDistribution::Uniform),
        Some(("zipf", exponent)) => match exponent.parse::<f64>() {
            Ok(e) if e.is_finite() && e > 0.0 => Ok(loadgen::KeyDistribution::Zipf(e)),
            _ => Err(format!(
                "`{s}`: the Zipf exponent must be a positive number (zipf:1.0)"
            )),
        },
        _ => Err(format!(
            "`{s}`: expected uniform or zipf:S (for example zipf:1.0)"
        )),
    }
}

/// A count flag that must be at least 1.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

/// As `at_least_one`, for a `u64` count.
fn at_least_one_u64() -> clap::builder::RangedU64ValueParser<u64> {
    clap::builder::RangedU64ValueParser::<u64>::new().range(1..)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => run_bench(*args).map(|()| ExitCode::SUCCESS),
        Command::Enrich(args) => run_enrich(*args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--postgres` and its statements.
fn postgres_backend(url: &str, args: &EnrichArgs) -> Result<BackendConfig, String> {
    use sluice::postgres::{PgConfig, PgEndpoint, Statements};
    let mut endpoint = PgEndpoint::parse(url).map_err(|e| format!("--postgres {e}"))?;
    if endpoint.password.is_none() {
        endpoint.password = std::env::var("PGPASSWORD").ok();
    }
    let statements = Statements {
        query: args.query.clone().unwrap_or_default(),
        batch_query: args.batch_query.clone(),
        rows: args.rows,
    };
    statements.check().map_err(|e| format!("--rows: {e}"))?;
    if statements.batch_query.is_some() {
        if args.params.len() != 1 {
            return Err(format!(
                "--batch-query takes the keys as one array, so the query takes one --params \
                 (got {})",
                args.params.len()
            ));
        }
        if args.layer.batch_size < 2 {
            return Err(
                "--batch-query runs for batches of keys: give --batch-size N (N > 1)".into(),
            );
        }
    }
    let mut client = PgConfig::new(statements);
    client.connections = args.connections;
    Ok(BackendConfig::Postgres {
        endpoint,
        client,
        params: args.params.len(),
    })
}

/// The backend `sluice enrich` looks up in: the `--redis` address, the `--http` API, or an
/// embedded loadgen server (returned, to live as long as the run).
fn enrich_backend(args: &EnrichArgs) -> Result<(BackendConfig, Option<Server>), String> {
    if let Some(url) = &args.postgres {
        return Ok((postgres_backend(url, args)?, None));
    }
    if let Some(url) = &args.http {
        let (endpoint, _) = sluice::http::parse_url(url).map_err(|e| format!("--http {e}"))?;
        let mut headers = vec![];
        for header in &args.http_header {
            let (name, value) = header
                .split_once(':')
                .filter(|(n, _)| !n.trim().is_empty() && !n.contains(char::is_whitespace))
                .ok_or_else(|| format!("--http-header `{header}`: expected 'Name: value'"))?;
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
        let client = sluice::http::HttpConfig {
            // One request per connection: as many connections as lookups in flight.
            max_connections: args.capacity,
            method: args.http_method.clone().unwrap_or_else(|| {
                if args.http_body.is_some() {
                    "POST"
                } else {
                    "GET"
                }
                .to_string()
            }),
            headers,
            ..sluice::http::HttpConfig::default()
        };
        return Ok((BackendConfig::Http { endpoint, client }, None));
    }
    match &args.redis {
        Some(url) => {
            let mut endpoint = sluice::redis::Endpoint::parse(url).map_err(|e| e.to_string())?;
            let files = [&args.tls_ca, &args.tls_cert, &args.tls_key];
            match &mut endpoint.tls {
                Some(tls) => {
                    tls.ca_file.clone_from(&args.tls_ca);
                    tls.cert_file.clone_from(&args.tls_cert);
                    tls.key_file.clone_from(&args.tls_key);
                }
                None if files.iter().any(|f| f.is_some()) => {
                    return Err("--tls-ca, --tls-cert and --tls-key need a rediss:// URL".into())
                }
                None => {}
            }
            if args.tls_cert.is_some() != args.tls_key.is_some() {
                return Err("--tls-cert and --tls-key go together".into());
            }
            Ok((BackendConfig::Redis(endpoint), None))
        }
        None => {
            let server = Server::start(ServerConfig {
                keys: args.loadgen_keys,
                latency: args.loadgen_latency.clone(),
                ..Default::default()
            })
            .map_err(|e| e.to_string())?;
            Ok((BackendConfig::Redis(server.addr().into()), Some(server)))
        }
    }
}

/// The run's configuration from the command line; `backend` is where lookups go.
fn enrich_config(
    args: EnrichArgs,
    backend: BackendConfig,
) -> Result<sluice::enrich::EnrichConfig, String> {
    use sluice::enrich::{EnrichConfig, KeyTemplate, OnBadRecord, OnFailedLookup, Placement};
    let mode = match args.mode.as_str() {
        "ordered" => sluice::OutputMode::Ordered,
        "unordered" => sluice::OutputMode::Unordered,
        "key-ordered" => sluice::OutputMode::KeyOrdered,
        other => {
            return Err(format!(
                "--mode `{other}`: expected ordered, unordered or key-ordered"
            ))
        }
    };
    let nats = sluice::enrich::parse_nats_ends(&args.input, &args.output)?;
    let files = nats.is_none();
    let path = |p: &str| (p != "-" && files).then(|| PathBuf::from(p));
    if nats.is_some() {
        let refused = if args.checkpoint_dir.is_some() {
            Some("--checkpoint-dir: with NATS ends the acknowledgements are the checkpoint")
        } else if args.emit_watermarks {
            Some("--emit-watermarks: an output stream takes records only")
        } else {
            None
        };
        if let Some(why) = refused {
            return Err(format!("not with nats:// --input and --output: {why}"));
        }
    }
    let _ = args.merge; // the default; the flag exists to say so explicitly
    if args.layer.tracking() && args.redis.is_none() {
        return Err(
            "--cache-invalidation tracking needs --redis (a Redis 6 or newer): the embedded \
             loadgen server has no client tracking"
                .into(),
        );
    }
    Ok(EnrichConfig {
        layer: args.layer.config(args.capacity)?,
        tracking: args.layer.tracking(),
        value: args
            .value
            .clone()
            .unwrap_or(sluice::lookup::ValueKind::String),
        backend_config: backend,
        backend: match (&args.redis, &args.http, &args.postgres) {
            // As recorded with checkpoints and shown in the summary: never the password.
            (Some(url), _, _) => sluice::redis::redact_url(url),
            (None, Some(url), _) => url.clone(),
            (None, None, Some(url)) => sluice::postgres::PgEndpoint::parse(url)
                .map(|e| format!("{e} ({})", args.query.as_deref().unwrap_or_default()))
                .map_err(|e| format!("--postgres {e}"))?,
            (None, None, None) => format!("loadgen (keys {})", args.loadgen_keys),
        },
        max_bytes_held: args.max_bytes_held,
        key: match (&args.http, &args.key) {
            _ if args.postgres.is_some() => {
                KeyTemplate::parse_params(&args.params).map_err(|e| e.to_string())?
            }
            (Some(url), _) => {
                let (_, target) =
                    sluice::http::parse_url(url).map_err(|e| format!("--http {e}"))?;
                let key = KeyTemplate::parse_target(&target).map_err(|e| e.to_string())?;
                match &args.http_body {
                    Some(body) => key.with_body(body).map_err(|e| e.to_string())?,
                    None => key,
                }
            }
            (None, Some(key)) => KeyTemplate::parse(key).map_err(|e| e.to_string())?,
            (None, None) => {
                return Err("--key is required (or --http with fields in its URL)".into())
            }
        },
        nats,
        input: path(&args.input),
        output: path(&args.output),
        placement: match args.into {
            Some(field) => Placement::Into(field),
            None => Placement::Merge,
        },
        on_missing: args.on_missing,
        missing_marker: args.missing_marker,
        on_bad_record: OnBadRecord::parse(&args.on_bad_record)?,
        on_timeout: OnFailedLookup::parse("--on-timeout", &args.on_timeout)?,
        on_error: OnFailedLookup::parse("--on-error", &args.on_error)?,
        mode,
        capacity: args.capacity,
        shards: args.shards,
        connections: args.connections,
        timeout: args.timeout,
        retry: args.retry,
        retry_missing: args.retry_on.contains(&RetryOn::Missing),
        event_time: args.event_time,
        max_out_of_orderness: args.max_out_of_orderness,
        emit_watermarks: args.emit_watermarks,
        checkpoint_dir: args.checkpoint_dir,
        checkpoint_interval: args.checkpoint_interval,
        metrics_addr: args.metrics_addr,
    })
}

fn run_enrich(args: EnrichArgs) -> Result<ExitCode, String> {
    use sluice::enrich;
    use std::io::IsTerminal;
    use std::sync::Arc;

    let (backend, _server) = enrich_backend(&args)?;
    let metrics_json = args.metrics_json.clone();
    let config = enrich_config(args, backend)?;
    let stop = Arc::new(enrich::Stop::default());
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let stop = stop.clone();
        // SAFETY: the handler only does an atomic add, which is async-signal-safe.
        unsafe { signal_hook::low_level::register(signal, move || stop.signal()) }
            .map_err(|e| format!("cannot watch for signal {signal}: {e}"))?;
    }
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    let mut progress = |s: &enrich::Summary, in_flight: u64| {
        if let Some(bar) = &bar {
            let timeouts = s.timeouts_emitted + s.timeouts_dropped + s.timeouts_dead_lettered;
            bar.set_message(format!(
                "{} records, {:.0}/s, {in_flight} in flight, {timeouts} timeouts, {} retries",
                s.lines_read,
                s.lines_read as f64 / s.elapsed_s.max(1e-9),
                s.retries
            ));
        }
    };
    let summary = enrich::run(&config, stop, &mut progress).map_err(|e| e.to_string())?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    eprint!("{}", summary.render());
    if let Some(path) = &metrics_json {
        let json = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(failure) = &summary.failure {
        eprintln!("sluice: {failure}");
    }
    // Interrupted wins over a failure met while draining (say, a timeout against a stalled
    // server): the user asked the run to stop.
    Ok(if summary.interrupted {
        ExitCode::from(130)
    } else if summary.failure.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// What a sweep covers: the flags, or the defaults (`--quick`'s for CI).
struct Plan {
    shards: Vec<usize>,
    capacities: Vec<usize>,
    duration: Duration,
    repeat: usize,
    modes: Vec<Mode>,
}

impl Plan {
    fn of(args: &BenchArgs) -> Result<Plan, String> {
        let quick = args.quick;
        let shards = args.shards.clone().map(|l| l.0).unwrap_or_else(|| {
            if quick {
                vec![1]
            } else {
                vec![1, 2]
            }
        });
        let capacities = args.capacities.clone().map(|l| l.0).unwrap_or_else(|| {
            if quick {
                vec![1, 4, 16, 64, 256]
            } else {
                vec![1, 2, 4, 8, 16, 32, 64, 128, 256]
            }
        });
        let duration = args.duration.unwrap_or(if quick {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(1)
        });
        let modes = args
            .modes
            .clone()
            .map(|l| l.0)
            .unwrap_or_else(|| Mode::defaults().to_vec());
        let redis_defaults = sluice::redis::ClientConfig::default();
        if args.backend == "http"
            && (args.connections != redis_defaults.connections
                || args.reply_split != redis_defaults.reply_split)
        {
            return Err(
                "--connections and --reply-split set the Redis client; with --backend http \
                 each request in flight has a connection of its own"
                    .into(),
            );
        }
        if shards.contains(&0) || capacities.contains(&0) {
            return Err("--shards and --capacities must each be at least 1".into());
        }
        if let Some(rps) = args.server_limit {
            if !(rps.is_finite() && rps > 0.0) {
                return Err(format!("--server-limit must be a positive rate, got {rps}"));
            }
        }
        Ok(Plan {
            shards,
            capacities,
            duration,
            repeat: args.repeat.unwrap_or(1).max(1),
            modes,
        })
    }
}

/// The server under test (embedded, or the `--redis` one), and a zero-latency twin of the
/// embedded one to measure the server's limit.
struct Servers {
    server: Option<Server>,
    _limit_server: Option<Server>,
    addr: SocketAddr,
    limit_addr: SocketAddr,
    label: String,
    configured: Option<Duration>,
}

impl Servers {
    fn start(args: &BenchArgs) -> Result<Servers, String> {
        match &args.redis {
            Some(url) => {
                let addr = sluice::redis::parse_url(url).map_err(|e| e.to_string())?;
                if args.load {
                    eprintln!("sluice bench: loading {} keys into {url} ...", args.keys);
                    bench::load_keyspace(addr, args.keys, 128)?;
                }
                Ok(Servers {
                    server: None,
                    _limit_server: None,
                    addr,
                    limit_addr: addr,
                    label: url.clone(),
                    configured: None,
                })
            }
            None => {
                let start = |latency: LatencyModel| {
                    Server::start(ServerConfig {
                        keys: args.keys,
                        latency,
                        cores: args.server_core.map(|c| vec![c]),
                        http: args.backend == "http",
                        ..Default::default()
                    })
                    .map_err(|e| e.to_string())
                };
                let server = start(args.latency.clone())?;
                let limit = start(LatencyModel::Fixed(Duration::ZERO))?;
                let (addr, limit_addr) = (server.addr(), limit.addr());
                let label = format!(
                    "embedded loadgen ({}), latency {}",
                    args.backend, args.latency
                );
                Ok(Servers {
                    server: Some(server),
                    _limit_server: Some(limit),
                    addr,
                    limit_addr,
                    label,
                    configured: Some(args.latency.mean()),
                })
            }
        }
    }
}

/// `sluice bench`: the servers, the round trip and the server's limit, the sweep, the table,
/// the JSON and the chart. Over 70 lines: these steps in the order they run read best in one
/// place; the plan and the servers are types of their own.
fn run_bench(args: BenchArgs) -> Result<(), String> {
    if let Some(saved) = &args.replot {
        let report = bench::read_json(saved)?;
        print!("{}", report.table());
        bench::write_svg(&report, &args.svg)?;
        eprintln!("wrote {}", args.svg.display());
        return Ok(());
    }
    if args.layer.tracking() && args.redis.is_none() {
        return Err(
            "--cache-invalidation tracking needs --redis (a Redis 6 or newer): the embedded \
             loadgen server has no client tracking"
                .into(),
        );
    }
    // Checked before anything is measured; capacity-bound parts (the adaptive limit's
    // maximum, the batch cap) are set per point.
    let layer = args.layer.config(1)?;
    let Plan {
        shards,
        capacities,
        duration,
        repeat,
        modes,
    } = Plan::of(&args)?;

    let Servers {
        server,
        _limit_server,
        addr,
        limit_addr,
        label,
        configured,
    } = Servers::start(&args)?;
    // The embedded server's own delay beyond the configured one, over the sweep: (replies
    // written, their summed lateness in us) before and after.
    let lateness = |s: &Server| {
        let (st, relaxed) = (s.stats(), std::sync::atomic::Ordering::Relaxed);
        (
            st.replies_written.load(relaxed),
            st.reply_lateness_us.load(relaxed),
        )
    };
    let late_mark = server.as_ref().map(lateness);
    let http = args.backend == "http";
    let round_trip = bench::probe_round_trip(addr, args.keys, http)?
        .for_ideal(args.redis.is_none().then_some(&args.latency));
    let max_shards = *shards.iter().max().expect("non-empty");
    eprintln!(
        "sluice bench: {label}; round trip {round_trip:.2?}; {}",
        match args.server_limit {
            Some(rps) => format!("server limit given: {rps} records/s"),
            None => "measuring the server's limit ...".into(),
        }
    );
    let limit = match args.server_limit {
        Some(rps) => rps,
        None => bench::runners_limit(limit_addr, args.keys, max_shards, duration, http)?,
    };

    let config = SweepConfig {
        addr,
        server: label,
        configured_latency: configured,
        keys: args.keys,
        modes,
        shards,
        capacities,
        duration,
        records: args.records,
        repeat,
        seed: 42,
        client: sluice::redis::ClientConfig {
            reply_split: args.reply_split,
            connections: args.connections,
            tracking: args.layer.tracking(),
            ..Default::default()
        },
        pin: !args.no_pin,
        distribution: args.key_distribution,
        layer,
        http,
    };
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} (eta {eta})")
            .expect("static template"),
    );
    let mut progress = |done: usize, total: usize, label: &str| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(label.to_string());
    };
    let report = bench::sweep(&config, limit, round_trip, &mut progress)?;
    bar.finish_and_clear();
    print!("{}", report.table());
    if let (Some(server), Some((n0, l0))) = (server.as_ref(), late_mark) {
        let (n1, l1) = lateness(server);
        let (n, l) = (n1 - n0, l1 - l0);
        eprintln!(
            "embedded server: {n} replies, handed to the socket {:.1} us after their due time on \
             average (its timers and write batching)",
            l as f64 / n.max(1) as f64
        );
    }
    bench::write_json(&report, &args.json)?;
    bench::write_svg(&report, &args.svg)?;
    eprintln!("wrote {} and {}", args.json.display(), args.svg.display());
    Ok(())
}
