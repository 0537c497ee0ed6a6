//! The `sluice` command: `sluice bench` (the benchmark harness).

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use loadgen::{LatencyModel, Server, ServerConfig};
use sluice::bench::{self, Mode, SweepConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    Bench(BenchArgs),
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
    /// Shard counts to sweep, e.g. `1,2`.
    #[arg(long)]
    shards: Option<List<usize>>,
    /// Embedded server reply delay: `1ms`, `uniform:500us:2ms`, `longtail:1ms:20ms`.
    #[arg(long, default_value = "1ms")]
    latency: LatencyModel,
    /// Capacities (requests in flight per shard) to sweep.
    #[arg(long)]
    capacities: Option<List<usize>>,
    /// Modes to run: sync-map, thread-pool, tokio-buffered, tokio-unordered, ordered,
    /// unordered, key-ordered (the default set), and adapter-unordered (the operator as a
    /// single-threaded Stream combinator).
    #[arg(long)]
    modes: Option<List<Mode>>,
    /// Wall time per point.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Runs per point, interleaved across modes; figures are medians.
    #[arg(long)]
    repeat: Option<usize>,
    /// A sweep that finishes in under a minute (for CI): 1 shard, capacities 1,4,16,64,256,
    /// 0.25 s per point.
    #[arg(long)]
    quick: bool,
    /// Keys in the embedded server's keyspace (and drawn from).
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/sluice-bench/report.json")]
    json: PathBuf,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "target/sluice-bench/throughput.svg")]
    svg: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => run_bench(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_bench(args: BenchArgs) -> Result<(), String> {
    let quick = args.quick;
    let shards = args
        .shards
        .map(|l| l.0)
        .unwrap_or_else(|| if quick { vec![1] } else { vec![1, 2] });
    let capacities = args.capacities.map(|l| l.0).unwrap_or_else(|| {
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
    let repeat = args.repeat.unwrap_or(1).max(1);
    let modes = args
        .modes
        .map(|l| l.0)
        .unwrap_or_else(|| Mode::ALL.to_vec());
    if shards.contains(&0) || capacities.contains(&0) {
        return Err("shards and capacities must be at least 1".into());
    }

    // The server under test, and a zero-latency twin to measure the server's limit.
    let (_server, _limit_server, addr, limit_addr, label, configured) = match &args.redis {
        Some(url) => {
            let addr = sluice::redis::parse_url(url).map_err(|e| e.to_string())?;
            if args.load {
                eprintln!("sluice bench: loading {} keys into {url} ...", args.keys);
                bench::load_keyspace(addr, args.keys, 128)?;
            }
            (None, None, addr, addr, url.clone(), None)
        }
        None => {
            let start = |latency: LatencyModel| {
                Server::start(ServerConfig {
                    keys: args.keys,
                    latency,
                    ..Default::default()
                })
                .map_err(|e| e.to_string())
            };
            let server = start(args.latency.clone())?;
            let limit = start(LatencyModel::Fixed(Duration::ZERO))?;
            let (addr, limit_addr) = (server.addr(), limit.addr());
            let label = format!("embedded loadgen, latency {}", args.latency);
            (
                Some(server),
                Some(limit),
                addr,
                limit_addr,
                label,
                Some(args.latency.mean()),
            )
        }
    };
    let round_trip = bench::probe_round_trip(addr, args.keys)?;
    let max_shards = *shards.iter().max().expect("non-empty");
    eprintln!(
        "sluice bench: {label}; round trip {round_trip:.2?}; measuring the server's limit ..."
    );
    let limit = bench::runners_limit(limit_addr, args.keys, max_shards, duration)?;

    let config = SweepConfig {
        addr,
        server: label,
        configured_latency: configured,
        keys: args.keys,
        modes,
        shards,
        capacities,
        duration,
        repeat,
        seed: 42,
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
    bench::write_json(&report, &args.json)?;
    bench::write_svg(&report, &args.svg)?;
    eprintln!("wrote {} and {}", args.json.display(), args.svg.display());
    Ok(())
}
