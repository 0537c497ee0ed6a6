//! `loadgen serve`: the lookup server; `loadgen records`: transactions as JSON Lines.

use clap::{Parser, Subcommand};
use loadgen::{
    Event, Generator, GeneratorConfig, KeyDistribution, LatencyModel, Pacer, Server, ServerConfig,
    DEFAULT_PORT,
};
use std::io::{BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Parser)]
#[command(
    version,
    about = "Lookup server and record generator for enrichment benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a generated keyspace over the Redis protocol (RESP2), or HTTP with --http, with
    /// delayed replies.
    Serve {
        /// Port to listen on (not 6379, where a real Redis may run).
        #[arg(long, default_value_t = DEFAULT_PORT)]
        port: u16,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        bind: IpAddr,
        /// Reply delay: `1ms`, `uniform:500us:2ms` or `longtail:P50:P99` (log-normal).
        #[arg(long, default_value = "1ms")]
        latency: LatencyModel,
        /// Keys `user:user_000000` .. in the keyspace.
        #[arg(long, default_value_t = 100_000, value_parser = at_least_one_u64())]
        keys: u64,
        /// Bytes per value (JSON, padded).
        #[arg(long, default_value_t = 128)]
        value_size: usize,
        /// Server threads (glommio executors), all on the same port.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
        shards: u16,
        /// Fraction of replies replaced by an error reply (with --http: 503, Retry-After: 0).
        #[arg(long, default_value_t = 0.0, value_parser = fraction)]
        error_rate: f64,
        /// Fraction of requests that reset the connection instead of a reply.
        #[arg(long, default_value_t = 0.0, value_parser = fraction)]
        reset_rate: f64,
        /// Seed for delays and faults.
        #[arg(long, default_value_t = 0x10ad)]
        seed: u64,
        /// Speak HTTP/1.1 instead: `GET /KEY` answers the value as a JSON body, or 404
        /// (keep-alive; `/user:user_000042`).
        #[arg(long)]
        http: bool,
    },
    /// Print generated transactions as JSON Lines on stdout.
    Records {
        /// How many records.
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Users to draw from (match the server's --keys).
        #[arg(long, default_value_t = 100_000, value_parser = at_least_one_u64())]
        keys: u64,
        /// Zipf exponent for skewed users (uniform when absent); above 0.
        #[arg(long, value_parser = positive)]
        zipf: Option<f64>,
        /// Maximum event-time lag behind the newest record, in ms.
        #[arg(long, default_value_t = 50)]
        max_out_of_orderness_ms: u64,
        /// Also print `{"watermark": ms}` lines, one per this many records (0: none).
        #[arg(long, default_value_t = 0)]
        watermark_every: u64,
        /// Records per second (open loop); as fast as possible when absent. Above 0.
        #[arg(long, value_parser = positive)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

/// A count flag that must be at least 1.
fn at_least_one_u64() -> clap::builder::RangedU64ValueParser<u64> {
    clap::builder::RangedU64ValueParser::<u64>::new().range(1..)
}

/// A finite number above 0.
fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a number above 0")),
    }
}

/// A fraction from 0 to 1.
fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a fraction from 0 to 1")),
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a subcommand. Over 70 lines: one arm per subcommand, each turning its flags into the
/// library's configuration.
fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Serve {
            port,
            bind,
            latency,
            keys,
            value_size,
            shards,
            error_rate,
            reset_rate,
            seed,
            http,
        } => {
            let server = Server::start(ServerConfig {
                addr: SocketAddr::new(bind, port),
                shards: usize::from(shards),
                cores: None,
                keys,
                value_size,
                latency: latency.clone(),
                error_rate,
                reset_rate,
                seed,
                http,
            })?;
            eprintln!(
                "loadgen: serving {keys} keys over {} on {} ({shards} shard(s), latency {latency}); Ctrl-C stops",
                if http { "HTTP" } else { "RESP2" },
                server.addr()
            );
            let mut last = 0;
            loop {
                std::thread::sleep(Duration::from_secs(5));
                let gets = server.stats().gets.load(Ordering::Relaxed);
                if gets != last {
                    eprintln!("loadgen: {gets} GETs served ({} /s)", (gets - last) / 5);
                    last = gets;
                }
            }
        }
        Command::Records {
            count,
            keys,
            zipf,
            max_out_of_orderness_ms,
            watermark_every,
            rate,
            seed,
        } => {
            let generator = Generator::new(GeneratorConfig {
                keys,
                distribution: zipf.map_or(KeyDistribution::Uniform, KeyDistribution::Zipf),
                seed,
                max_out_of_orderness_ms,
                watermark_every,
                ..Default::default()
            });
            let mut pacer = rate.map(Pacer::new);
            let stdout = std::io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            let mut records = 0;
            for event in generator {
                if records == count {
                    break;
                }
                match event {
                    Event::Record(tx) => {
                        if let Some(p) = &mut pacer {
                            p.wait();
                        }
                        serde_json::to_writer(&mut out, &tx)?;
                        records += 1;
                    }
                    Event::Watermark(w) => write!(out, "{{\"watermark\":{w}}}")?,
                }
                out.write_all(b"\n")?;
                if pacer.is_some() {
                    out.flush()?;
                }
            }
            out.flush()?;
        }
    }
    Ok(())
}
