//! loadgen: a lookup server speaking the Redis protocol with a configurable latency model and
//! fault injection, and a generator of transactions, for benchmarking stream-enrichment
//! engines. It does not depend on sluice, so it can drive other engines too.
//!
//! ```no_run
//! use loadgen::{Server, ServerConfig};
//! let server = Server::start(ServerConfig::default()).expect("server starts");
//! println!("serving {} keys on {}", 100_000, server.addr());
//! ```

mod commands;
pub mod keyspace;
mod latency;
pub mod records;
mod server;

pub use latency::{LatencyModel, ParseLatencyError};
pub use records::{Event, Generator, GeneratorConfig, KeyDistribution, Pacer, Transaction};
pub use server::{Server, ServerConfig, ServerError, ServerStats};

/// The port `loadgen serve` listens on by default (not Redis's 6379, which a real Redis may
/// hold).
pub const DEFAULT_PORT: u16 = 7379;
