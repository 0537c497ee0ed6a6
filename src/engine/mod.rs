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
mod merge;
mod placement;
mod producer;
pub(crate) mod restore;
mod shard;

pub(crate) use merge::Egress;
pub(crate) use merge::MergeCheckpoint;
pub use merge::{Consumer, Output, RecvTimedOut};
pub use placement::{
    default_shards, locked_memory_per_shard, memlock_limit, plan, shards_that_fit, usable_cores,
    Pinning, ShardPlacement,
};
pub use producer::{KeyFn, Producer, Routing, QUEUE_WAIT_SAMPLE};
pub use shard::ShardContext;
pub(crate) use shard::{Gate, GatedIngress};

use crate::checkpoint::{Checkpointing, RestoreInfo};
use crate::error::{BuildError, StageError};
use crate::function::AsyncFunction;
use crate::metrics::{MetricsCell, MetricsSnapshot};
use crate::operator::{OperatorConfig, OutputMode};
use crate::retry::RetryPolicy;
use glommio::{LocalExecutorBuilder, Placement};
use handoff::Doorbell;
use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Registered io_uring memory per shard. glommio registers it with each of its three rings and
/// each registration counts against `RLIMIT_MEMLOCK`, so a shard locks 3 x this: 768 KiB, which
/// lets 10 executors share an 8 MiB limit. Network I/O does not use it; file I/O does.
pub const DEFAULT_IO_MEMORY: usize = 256 * 1024;
/// The default ingress/egress channel capacity is the queue capacity, but at least this: with
/// key routing and a small capacity, a shallow channel makes the single producer wait on one
/// busy shard while the others idle (head-of-line blocking at the producer). Channels hold
/// records not yet started; requests in flight stay bounded by the queue capacity.
pub const MIN_CHANNEL_CAPACITY: usize = 64;
/// io_uring submission queue depth per ring.
pub const DEFAULT_RING_DEPTH: usize = 128;

/// Hashes any key to the `u64` that routing and key order use (stable across runs).
pub fn hash_key<K: Hash + ?Sized>(key: &K) -> u64 {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    key.hash(&mut h);
    h.finish()
}

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

    fn invalid(field: &'static str, reason: impl Into<String>) -> BuildError {
        BuildError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }

    /// The shard count: as set, or one per usable core within the locked-memory limit;
    /// refused when out of range or when its io_uring memory would exceed the limit.
    fn shard_count(&self) -> Result<usize, BuildError> {
        let shards = self
            .shards
            .unwrap_or_else(|| placement::default_shards_for(self.io_memory));
        if shards == 0 || shards > 1024 {
            return Err(Self::invalid(
                "shards",
                format!("{shards} is not in 1..=1024"),
            ));
        }
        let limit = placement::memlock_limit();
        if let Some(fit) = placement::shards_that_fit(limit, self.io_memory) {
            if shards > fit {
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

    /// Starts the shards.
    pub fn start(self) -> Result<Stage<F::In, F::Out>, BuildError> {
        let shards = self.shard_count()?;
        let capacity = NonZeroUsize::new(self.capacity)
            .filter(|c| c.get() <= 1 << 20)
            .ok_or_else(|| {
                Self::invalid(
                    "capacity",
                    format!("{} is not in 1..=1048576", self.capacity),
                )
            })?;
        if self.timeout.is_zero() {
            return Err(Self::invalid("timeout", "must be greater than zero"));
        }
        let routing = self.routing.unwrap_or(if self.key_fn.is_some() {
            Routing::ByKey
        } else {
            Routing::RoundRobin
        });
        if self.mode == OutputMode::KeyOrdered
            && (self.key_fn.is_none() || routing != Routing::ByKey)
        {
            return Err(Self::invalid(
                "mode",
                "KeyOrdered needs key_by(..) and key routing, so one key stays on one shard",
            ));
        }
        if routing == Routing::ByKey && self.key_fn.is_none() {
            return Err(Self::invalid("routing", "ByKey routing needs key_by(..)"));
        }
        let channel_capacity = self
            .channel_capacity
            .unwrap_or(capacity.get().max(MIN_CHANNEL_CAPACITY))
            .max(1);
        let mut opened = match &self.checkpointing {
            None => None,
            Some(c) => Some(restore::open_checkpoints(c, shards, self.mode)?),
        };
        let mut restores = match (&self.checkpointing, &opened) {
            (
                Some(c),
                Some(restore::Opened {
                    restored: Some(restored),
                    ..
                }),
            ) => restore::reissue(&c.input, restored)?,
            _ => (0..shards).map(|_| vec![]).collect(),
        };
        if let Some(info) = opened.as_mut().and_then(|o| o.info.as_mut()) {
            info.reissued = restores.iter().map(Vec::len).sum();
        }
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
        for placement in &placements {
            let (in_tx, in_rx) = handoff::channel(
                Some(channel_capacity),
                Doorbell::new(),
                ingress_space.clone(),
            );
            let (out_tx, out_rx) =
                handoff::channel(Some(channel_capacity), egress_data.clone(), Doorbell::new());
            let cell: MetricsCell = Arc::new(Mutex::new(MetricsSnapshot::default()));
            let parts = shard::ShardParts::<F> {
                context: ShardContext {
                    index: placement.shard,
                    shards,
                },
                ingress: in_rx,
                egress: out_tx,
                config: OperatorConfig {
                    capacity,
                    timeout: self.timeout,
                    mode: self.mode,
                    retry: self.retry.clone(),
                    seed: self.seed.wrapping_add(placement.shard as u64),
                },
                metrics: cell.clone(),
                restore: std::mem::take(&mut restores[placement.shard]),
                checkpoint: match (&self.checkpointing, &opened) {
                    (Some(c), Some(o)) => Some(shard::ShardCheckpoint {
                        dir: o.coordinator.dir().to_path_buf(),
                        input: c.input.clone(),
                        reports: o.coordinator.reports(),
                    }),
                    _ => None,
                },
            };
            let glommio_placement = match placement.core {
                Some(core) => Placement::Fixed(core),
                None => Placement::Unbound,
            };
            let factory = factory.clone();
            let join = LocalExecutorBuilder::new(glommio_placement)
                .name(&format!("sluice-shard-{}", placement.shard))
                .io_memory(self.io_memory)
                .ring_depth(self.ring_depth)
                .spawn(move || shard::run_shard(factory, parts))
                .map_err(|e| BuildError::Executor {
                    shard: placement.shard,
                    reason: e.to_string(),
                })?;
            senders.push(in_tx);
            receivers.push(out_rx);
            cells.push(cell);
            joins.push(join);
        }
        let window = (shards * (capacity.get() + 2 * channel_capacity)).max(64);
        let (coordinator, restored, mut info) = match opened {
            Some(o) => (Some(o.coordinator), o.restored, o.info),
            None => (None, None, None),
        };
        let merge_checkpoint = match (&self.checkpointing, &coordinator) {
            (Some(c), Some(coordinator)) => Some(merge::MergeCheckpoint {
                coordinator: coordinator.clone(),
                output: c.output.clone(),
            }),
            _ => None,
        };
        let mut consumer = Consumer::new(receivers, self.mode, window, merge_checkpoint);
        let mut first_seq = 0;
        if let (Some(restored), Some(info)) = (&restored, info.as_mut()) {
            let merge = restored.merge.as_ref().expect("checked when opened");
            info.held = consumer.restore(merge).map_err(BuildError::Checkpoint)?;
            first_seq = merge.barrier_seq + 1;
        }
        Ok(Stage {
            producer: Producer::new(senders, self.key_fn, routing, coordinator, first_seq),
            consumer,
            handle: StageHandle {
                cells,
                placements,
                joins,
            },
            restored: info,
        })
    }
}

/// Observes and joins a running stage.
pub struct StageHandle {
    cells: Vec<MetricsCell>,
    placements: Vec<ShardPlacement>,
    joins: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl StageHandle {
    /// Where each shard runs.
    pub fn placements(&self) -> &[ShardPlacement] {
        &self.placements
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
        let mut total = MetricsSnapshot::default();
        for shard in self.shard_metrics() {
            total.merge(&shard);
        }
        total
    }

    /// Waits for every shard thread to end (after the input finished and the consumer read
    /// to the end, or after either side was dropped).
    pub fn join(self) -> Result<(), StageError> {
        let mut first_error = None;
        for (shard, join) in self.joins.into_iter().enumerate() {
            if let Err(e) = join.join() {
                first_error.get_or_insert(StageError::ShardPanicked {
                    shard,
                    message: e.to_string(),
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
