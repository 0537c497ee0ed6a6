//! The thread-per-core engine: a `Stage` of `N` shards between a `Producer` and a `Consumer`.
//!
//! ```text
//!  producer thread(s)        shard threads (glommio, one per core)        consumer thread
//!  ┌──────────┐ handoff  ┌───────────────────────────────────┐ handoff  ┌──────────┐
//!  │ Producer │──bounded─▶ shard 0: AsyncWait(func₀) ─ io_uring ─bounded─▶ Consumer │
//!  │ seq, key │──bounded─▶ shard 1: AsyncWait(func₁) ─ io_uring ─bounded─▶ (merge)  │
//!  └──────────┘          └───────────────────────────────────┘          └──────────┘
//! ```
//!
//! Owns: building and starting a stage, and restoring it from a checkpoint. Invariants: every
//! channel is bounded; a shard's queue is allocated on its own thread when it starts; a stage
//! that could not start every shard stops the ones it started and reports which shard failed;
//! a restored stage re-issues each shard's snapshot entries (less those the merge had already
//! released) to the same shard before any new input, and numbers new input from the
//! checkpoint barrier's sequence number on.

pub(crate) mod handoff;
mod local;
mod merge;
pub(crate) mod messages;
mod placement;
mod plan;
mod producer;
pub(crate) mod restore;
mod routed;
mod routing;
mod shard;

pub use local::{OnShards, ShardSink, SinkCheckpoint, SinkError, SourceItem};
pub use merge::{Consumer, Output, RecvTimedOut};
pub use placement::{
    default_shards, locked_memory_per_shard, memlock_limit, plan, shards_that_fit, usable_cores,
    Pinning, ShardPlacement,
};
pub(crate) use plan::{Plan, Spec};
pub use plan::{MAX_CAPACITY, MAX_SHARDS, MIN_CHANNEL_CAPACITY};
pub use producer::{Producer, QUEUE_WAIT_SAMPLE};
pub use routed::Routed;
pub use routing::{hash_key, KeyFn, Routing};
pub use shard::ShardContext;
pub(crate) use shard::{shard_input, Gate, ShardCheckpoint, ShardInput};

use crate::checkpoint::{Checkpointing, RestoreInfo};
use crate::error::{BuildError, StageError};
use crate::function::AsyncFunction;
use crate::metrics::{MetricsCell, MetricsSnapshot};
use crate::operator::{OperatorConfig, OutputMode};
use crate::retry::RetryPolicy;
use glommio::{LocalExecutorBuilder, Placement};
use handoff::Doorbell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Registered io_uring memory per shard. glommio registers it with each of its three rings and
/// each registration counts against `RLIMIT_MEMLOCK`, so a shard locks 3 x this: 768 KiB, which
/// lets 10 executors share an 8 MiB limit. Network I/O does not use it; file I/O does.
pub const DEFAULT_IO_MEMORY: usize = 256 * 1024;
/// io_uring submission queue depth per ring.
pub const DEFAULT_RING_DEPTH: usize = 128;

/// Builds a [`Stage`]. Start with [`Stage::builder`].
pub struct StageBuilder<F: AsyncFunction, Fac> {
    factory: Fac,
    shards: Option<usize>,
    capacity: usize,
    timeout: Duration,
    mode: OutputMode,
    retry: RetryPolicy<F::Out, F::Error>,
    key_fn: Option<KeyFn<F::In>>,
    routing: Option<Routing>,
    pinning: Pinning,
    io_memory: usize,
    ring_depth: usize,
    channel_capacity: Option<usize>,
    seed: u64,
    checkpointing: Option<Checkpointing<F::In, F::Out>>,
}

/// A running stage, split into its three parts with [`Stage::split`].
pub struct Stage<I, O: 'static> {
    producer: Producer<I>,
    consumer: Consumer<O>,
    handle: StageHandle,
    restored: Option<RestoreInfo>,
}

impl<I, O: 'static> Stage<I, O> {
    /// A builder whose `factory` creates the function once per shard, on the shard's thread.
    pub fn builder<F, Fac>(factory: Fac) -> StageBuilder<F, Fac>
    where
        F: AsyncFunction<In = I, Out = O>,
        Fac: Fn(ShardContext) -> F + Send + Sync + 'static,
    {
        StageBuilder {
            factory,
            shards: None,
            capacity: 100,
            timeout: Duration::from_secs(10),
            mode: OutputMode::Ordered,
            retry: RetryPolicy::none(),
            key_fn: None,
            routing: None,
            pinning: Pinning::Auto,
            io_memory: DEFAULT_IO_MEMORY,
            ring_depth: DEFAULT_RING_DEPTH,
            channel_capacity: None,
            seed: 0x5eed,
            checkpointing: None,
        }
    }

    /// What the stage restored from its checkpoint directory when it started, if anything:
    /// resume the source at `source` and cut the sink back to `sink_position`.
    pub fn restored(&self) -> Option<&RestoreInfo> {
        self.restored.as_ref()
    }

    /// The producer (input), the consumer (merged output) and the handle (metrics, join).
    pub fn split(self) -> (Producer<I>, Consumer<O>, StageHandle) {
        (self.producer, self.consumer, self.handle)
    }
}

impl<F, Fac> StageBuilder<F, Fac>
where
    F: AsyncFunction,
    F::In: Send,
    F::Out: Send,
    Fac: Fn(ShardContext) -> F + Send + Sync + 'static,
{
    /// Number of shards (default: one per usable core).
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }
    /// Slots per shard: in-flight requests plus unemitted results plus watermarks (default 100).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }
    /// The per-record timeout, covering all attempts (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// The output mode (default `Ordered`).
    pub fn mode(mut self, mode: OutputMode) -> Self {
        self.mode = mode;
        self
    }
    /// The retry policy (default none).
    pub fn retry(mut self, retry: RetryPolicy<F::Out, F::Error>) -> Self {
        self.retry = retry;
        self
    }
    /// The record's key, for `KeyOrdered` and key routing. Use [`hash_key`] for any `Hash` key.
    pub fn key_by(mut self, key: impl Fn(&F::In) -> u64 + Send + Sync + 'static) -> Self {
        self.key_fn = Some(Arc::new(key));
        self
    }
    /// How records are spread (default: by key when a key is set, else round-robin).
    pub fn routing(mut self, routing: Routing) -> Self {
        self.routing = Some(routing);
        self
    }
    /// Core placement (default `Auto`).
    pub fn pinning(mut self, pinning: Pinning) -> Self {
        self.pinning = pinning;
        self
    }
    /// Registered io_uring memory per shard, in bytes (see [`DEFAULT_IO_MEMORY`]).
    pub fn io_memory(mut self, bytes: usize) -> Self {
        self.io_memory = bytes;
        self
    }
    /// io_uring ring depth per shard.
    pub fn ring_depth(mut self, depth: usize) -> Self {
        self.ring_depth = depth;
        self
    }
    /// Capacity of each shard's ingress and egress channel (default: the queue capacity, at
    /// least [`MIN_CHANNEL_CAPACITY`]).
    pub fn channel_capacity(mut self, capacity: usize) -> Self {
        self.channel_capacity = Some(capacity);
        self
    }
    /// Seed for backoff jitter (shard `i` uses `seed + i`).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Checkpoints to `checkpointing.dir` (see `Producer::checkpoint`), and restores the
    /// newest valid checkpoint found there when the stage starts.
    pub fn checkpointing(mut self, checkpointing: Checkpointing<F::In, F::Out>) -> Self {
        self.checkpointing = Some(checkpointing);
        self
    }

    /// Starts the shards.
    pub fn start(self) -> Result<Stage<F::In, F::Out>, BuildError> {
        self.start_with_edges(None)
    }

    /// Starts the shards; shard 0 also runs what `edges` hands it (a routed stage's source and
    /// sink), before it counts itself ended.
    fn start_with_edges(
        self,
        mut edges: Option<routed::EdgeSlot>,
    ) -> Result<Stage<F::In, F::Out>, BuildError> {
        let mut wiring = Plan::new(Spec {
            shards: self.shard_count()?,
            capacity: self.capacity,
            timeout: self.timeout,
            mode: self.mode,
            key_fn: self.key_fn,
            routing: self.routing,
            channel_capacity: self.channel_capacity,
            checkpointing: self.checkpointing,
        })?;
        let shards = wiring.shards;
        let placements = plan(shards, &self.pinning, &usable_cores());
        let factory = Arc::new(self.factory);
        let mut senders = Vec::with_capacity(shards);
        let mut receivers = Vec::with_capacity(shards);
        let mut cells = Vec::with_capacity(shards);
        let mut joins = Vec::with_capacity(shards);
        // One thread waits for ingress space (the producer) and one for egress data (the
        // consumer), whichever shard it is; each shard waits on its own ingress data and egress
        // space.
        let (ingress_space, egress_data) = (Doorbell::new(), Doorbell::new());
        let ended = Arc::new(AtomicUsize::new(0));
        let channel = Some(wiring.channel_capacity);
        for placement in &placements {
            let (in_tx, in_rx) = handoff::channel(channel, Doorbell::new(), ingress_space.clone());
            let (out_tx, out_rx) = handoff::channel(channel, egress_data.clone(), Doorbell::new());
            let cell: MetricsCell = Arc::new(Mutex::new(MetricsSnapshot::default()));
            let shard_plan = wiring.shard(placement.shard);
            let parts = shard::ShardParts::<F> {
                context: ShardContext {
                    index: placement.shard,
                    shards,
                },
                ingress: in_rx,
                egress: out_tx,
                config: OperatorConfig {
                    capacity: wiring.capacity,
                    timeout: self.timeout,
                    mode: self.mode,
                    retry: self.retry.clone(),
                    seed: self.seed.wrapping_add(placement.shard as u64),
                },
                metrics: cell.clone(),
                restore: shard_plan.restore,
                checkpoint: shard_plan.checkpoint,
            };
            let rings = (self.io_memory, self.ring_depth);
            let edge = edges.take();
            let join = spawn_shard(
                placement,
                rings,
                factory.clone(),
                parts,
                ended.clone(),
                edge,
            )?;
            senders.push(in_tx);
            receivers.push(out_rx);
            cells.push(cell);
            joins.push(join);
        }
        let (producer, consumer, restored) = wiring.finish(senders, receivers)?;
        Ok(Stage {
            producer,
            consumer,
            handle: StageHandle {
                cells,
                ended,
                placements,
                joins,
            },
            restored,
        })
    }
}

impl<F: AsyncFunction, Fac> StageBuilder<F, Fac> {
    /// The shard count: as set, or one per usable core within the locked-memory limit;
    /// refused when its io_uring memory would exceed the limit (the plan checks the range).
    fn shard_count(&self) -> Result<usize, BuildError> {
        let shards = self
            .shards
            .unwrap_or_else(|| placement::default_shards_for(self.io_memory));
        let limit = placement::memlock_limit();
        if let Some(fit) = placement::shards_that_fit(limit, self.io_memory) {
            if shards > fit && shards <= plan::MAX_SHARDS {
                return Err(BuildError::LockedMemory {
                    shards,
                    needed_kib: shards as u64 * locked_memory_per_shard(self.io_memory) / 1024,
                    limit_kib: limit.unwrap_or(0) / 1024,
                    fit,
                });
            }
        }
        Ok(shards)
    }
}

/// Starts one shard's executor thread where `placement` says.
fn spawn_shard<F, Fac>(
    placement: &ShardPlacement,
    rings: (usize, usize),
    factory: Arc<Fac>,
    parts: shard::ShardParts<F>,
    ended: Arc<AtomicUsize>,
    edge: Option<routed::EdgeSlot>,
) -> Result<glommio::ExecutorJoinHandle<Result<(), StageError>>, BuildError>
where
    F: AsyncFunction,
    F::In: Send,
    F::Out: Send,
    Fac: Fn(ShardContext) -> F + Send + Sync + 'static,
{
    let shard = placement.shard;
    spawn_executor(placement, rings, move || async move {
        let edge = edge.map(|slot| glommio::spawn_local(routed::run_edge(slot, shard)));
        // Its failures travel to the merge, which reports them.
        shard::run_shard(factory, parts).await;
        // A routed stage's source and sink report theirs (the merge's included) here.
        let result = match edge {
            Some(edge) => edge.await,
            None => Ok(()),
        };
        ended.fetch_add(1, Ordering::Release);
        result
    })
}

/// A shard's executor thread where `placement` says, with its rings' `(io_memory,
/// ring_depth)`, running what `body` makes there.
pub(crate) fn spawn_executor<Fut>(
    placement: &ShardPlacement,
    (io_memory, ring_depth): (usize, usize),
    body: impl FnOnce() -> Fut + Send + 'static,
) -> Result<glommio::ExecutorJoinHandle<Result<(), StageError>>, BuildError>
where
    Fut: std::future::Future<Output = Result<(), StageError>> + 'static,
{
    let glommio_placement = match placement.core {
        Some(core) => Placement::Fixed(core),
        None => Placement::Unbound,
    };
    LocalExecutorBuilder::new(glommio_placement)
        .name(&format!("sluice-shard-{}", placement.shard))
        .io_memory(io_memory)
        .ring_depth(ring_depth)
        .spawn(body)
        .map_err(|e| BuildError::Executor {
            shard: placement.shard,
            reason: e.to_string(),
        })
}

/// Reads a stage's metrics from any thread, for as long as it is kept: what each shard last
/// published (they publish as they run, and a last time when they end).
#[derive(Clone)]
pub struct StageObserver {
    cells: Vec<MetricsCell>,
}

impl StageObserver {
    /// All shards' metrics merged.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mut total = MetricsSnapshot::default();
        for cell in &self.cells {
            total.merge(&cell.lock().unwrap_or_else(|p| p.into_inner()));
        }
        total
    }
}

/// Observes and joins a running stage.
pub struct StageHandle {
    cells: Vec<MetricsCell>,
    /// Shards whose work ended (their thread is about to end).
    ended: Arc<AtomicUsize>,
    placements: Vec<ShardPlacement>,
    joins: Vec<glommio::ExecutorJoinHandle<Result<(), StageError>>>,
}

impl StageHandle {
    /// Where each shard runs.
    pub fn placements(&self) -> &[ShardPlacement] {
        &self.placements
    }

    /// Whether every shard's work ended (with sources on the shards: each source ended and
    /// its sink finished, or the shard failed), so that [`StageHandle::wait`] returns at once.
    pub fn finished(&self) -> bool {
        self.ended.load(Ordering::Acquire) == self.cells.len()
    }

    /// Each shard's last published metrics.
    pub fn shard_metrics(&self) -> Vec<MetricsSnapshot> {
        self.cells
            .iter()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// One counter summed over the shards' last published metrics, without copying their
    /// histograms (cheap enough for a progress line): `handle.sum(|m| m.retries)`.
    pub fn sum(&self, counter: impl Fn(&MetricsSnapshot) -> u64) -> u64 {
        self.cells
            .iter()
            .map(|c| counter(&c.lock().unwrap_or_else(|p| p.into_inner())))
            .sum()
    }

    /// All shards' metrics merged.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.observer().metrics()
    }

    /// A reader of the shards' metrics that another thread can keep (a metrics endpoint).
    pub fn observer(&self) -> StageObserver {
        StageObserver {
            cells: self.cells.clone(),
        }
    }

    /// Waits for every shard thread to end (after the input finished and the consumer read
    /// to the end, or after either side was dropped; with sources on the shards, after every
    /// source ended and its sink finished) and reports the first shard's failure: a panic, and
    /// with sources on the shards also the function's failure or the sink's.
    pub fn join(mut self) -> Result<(), StageError> {
        self.wait()
    }

    /// [`StageHandle::join`] keeping the handle: afterwards its metrics are the shards' final
    /// ones. A second call returns at once.
    pub fn wait(&mut self) -> Result<(), StageError> {
        let mut first_error = None;
        for (shard, join) in self.joins.drain(..).enumerate() {
            let failure = match join.join() {
                Ok(result) => result.err(),
                Err(e) => Some(StageError::ShardPanicked {
                    shard,
                    message: e.to_string(),
                }),
            };
            if let Some(failure) = failure {
                first_error.get_or_insert(failure);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
