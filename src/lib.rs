//! sluice: Flink's Async I/O operator (`AsyncWaitOperator`) rebuilt as a thread-per-core
//! engine on io_uring, for enriching a stream with lookups to external systems without letting
//! their latency dominate.
//!
//! A [`Stage`] runs `N` shards, each a glommio executor (pinned to its core when there are
//! enough) with a fixed-capacity element queue. You push records and watermarks into its
//! [`Producer`], and read the merged results from its [`Consumer`]:
//!
//! ```
//! use sluice::{from_fn, Output, OutputMode, Outputs, Stage};
//! use std::time::Duration;
//!
//! // The function runs on the shard's thread; its future may be !Send.
//! let stage = Stage::builder(|_shard| {
//!     from_fn(|user: &u64| {
//!         let user = *user;
//!         async move {
//!             glommio::timer::sleep(Duration::from_millis(1)).await; // a lookup
//!             Ok::<_, std::io::Error>(Outputs::One(format!("user {user}: country=NL")))
//!         }
//!     })
//! })
//! .shards(2)
//! .capacity(64)
//! .timeout(Duration::from_secs(1))
//! .mode(OutputMode::Ordered)
//! .start()?;
//! let (mut producer, mut consumer, handle) = stage.split();
//!
//! std::thread::spawn(move || {
//!     for user in 0..100 {
//!         producer.push(user).expect("stage running");
//!     }
//!     producer.push_watermark(1_000).expect("stage running");
//! }); // dropping the producer ends the input
//!
//! let mut records = 0;
//! while let Some(item) = consumer.recv() {
//!     match item? {
//!         Output::Record { seq, value } => {
//!             assert_eq!(seq, records); // Ordered: input order across shards
//!             records += 1;
//!             let _ = value;
//!         }
//!         Output::Watermark(ts) => assert_eq!(ts, 1_000),
//!         Output::Checkpoint(_) => unreachable!("no checkpointing configured"),
//!     }
//! }
//! assert_eq!(records, 100);
//! println!("p99 {} us", handle.metrics().invoke_to_emit_us.value_at_quantile(0.99));
//! handle.join()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! On one thread, [`AsyncWaitExt::async_wait`] is the same operator as a `Stream` combinator
//! (like `buffered`/`buffer_unordered`, plus timeouts, retries and metrics). [`sim::SimStage`]
//! runs a whole stage deterministically on a simulated clock, for tests. With
//! `StageBuilder::checkpointing`, `Producer::checkpoint` takes exactly-once checkpoints of
//! everything in flight (see [`checkpoint`] and `docs/embedding.md`).
//!
//! See `docs/architecture.md` for the data path and `docs/guarantees.md` for the semantics,
//! point by point against Flink.

#[cfg(feature = "tools")]
pub mod bench;
pub mod checkpoint;
pub mod clock;
mod engine;
#[cfg(feature = "tools")]
pub mod enrich;
mod error;
mod function;
pub mod http;
mod in_flight;
pub mod lookup;
mod metrics;
#[cfg(feature = "nats")]
pub mod nats;
mod operator;
pub mod postgres;
mod queue;
mod reconnect;
pub mod redis;
mod retry;
pub mod sim;
mod stream_ext;

pub use engine::{
    default_shards, hash_key, locked_memory_per_shard, memlock_limit, plan, shards_that_fit,
    usable_cores, Consumer, KeyFn, OnShards, Output, Pinning, Producer, RecvTimedOut, Routed,
    Routing, ShardContext, ShardPlacement, ShardSink, SinkCheckpoint, SinkError, SourceItem, Stage,
    StageBuilder, StageHandle, StageObserver, DEFAULT_IO_MEMORY, DEFAULT_RING_DEPTH, MAX_CAPACITY,
    MAX_SHARDS, MIN_CHANNEL_CAPACITY, QUEUE_WAIT_SAMPLE,
};
pub use error::{BuildError, PushError, StageError};
pub use function::{from_fn, AsyncFunction, Fallback, FnFunction, Outputs, OutputsIter};
pub use metrics::MetricsSnapshot;
pub use operator::{restore_elements, AsyncWait, Element, Emitted, OperatorConfig, OutputMode};
pub use retry::{Backoff, Jitter, RetryPolicy};
pub use stream_ext::{AsyncWaitExt, AsyncWaitStream, Tagged};
