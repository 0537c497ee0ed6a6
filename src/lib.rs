//! sluice: Flink's Async I/O operator (`AsyncWaitOperator`) as a thread-per-core engine.
//! (Crate docs are completed below once the engine exists.)

pub mod clock;
mod engine;
mod error;
mod function;
mod in_flight;
mod metrics;
mod operator;
mod queue;
mod retry;
pub mod sim;

pub use engine::{
    default_shards, hash_key, plan, usable_cores, Consumer, KeyFn, Output, Pinning, Producer,
    Routing, ShardContext, ShardPlacement, Stage, StageBuilder, StageHandle, DEFAULT_IO_MEMORY,
    DEFAULT_RING_DEPTH,
};
pub use error::{BuildError, PushError, StageError};
pub use function::{from_fn, AsyncFunction, Fallback, FnFunction, Outputs, OutputsIter};
pub use metrics::MetricsSnapshot;
pub use operator::{AsyncWait, Element, Emitted, OperatorConfig, OutputMode};
pub use retry::{Backoff, Jitter, RetryPolicy};
