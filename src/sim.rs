//! `SimStage`: a whole stage (producer routing, `N` operators, the output merge) driven on one
//! thread by a simulated clock, for deterministic tests of the engine and of user functions.
//!
//! Owns: nothing new; it wires the real `Producer`, `AsyncWait` and `Consumer` together without
//! threads, through the same `Plan` as a real `Stage` (validation, channel and window sizes,
//! restore and re-issue). Invariants: the same routing, merge, checkpoint and restore code as a
//! real `Stage`, where only the shard loop differs: each shard is pumped in turn on the test's
//! thread, and its snapshot file is written synchronously with std I/O instead of a glommio
//! task; time moves only when the test says; egress channels hold `SIM_CHANNEL_CAPACITY`
//! messages, so the merge's backpressure is exercised; ingress channels are unbounded, since
//! the test pushes on the thread that pumps the shards (a full channel would block it).

use crate::checkpoint::coordinator::ShardReport;
use crate::checkpoint::{
    CheckpointError, CheckpointRefused, Checkpointing, ManifestFile, RestoreInfo, ShardSnapshot,
    SinkPosition, SourcePosition,
};
use crate::clock::SimClock;
use crate::engine::handoff::{self, Doorbell};
use crate::engine::messages::Egress;
use crate::engine::{
    shard_input, Consumer, Gate, KeyFn, Output, Plan, Producer, ShardCheckpoint, ShardContext,
    ShardInput, Spec,
};
use crate::error::{BuildError, StageError};
use crate::function::AsyncFunction;
use crate::operator::{AsyncWait, OperatorConfig};
use futures::task::noop_waker;
use futures::Stream;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// Messages each simulated shard's egress channel holds.
const SIM_CHANNEL_CAPACITY: usize = 2;

struct SimShard<F: AsyncFunction> {
    index: usize,
    op: AsyncWait<ShardInput<F::In>, F, SimClock>,
    gate: Gate,
    checkpoint: Option<ShardCheckpoint<F::In>>,
    egress: handoff::Sender<Egress<F::Out>>,
    held: Option<Egress<F::Out>>,
    ended: bool,
}

/// Where `SimStage::run_now` stopped.
enum Now {
    /// Nothing moves without the clock (or a marker is out).
    Idle,
    Ended,
    Failed(StageError),
}

/// See the module documentation.
pub struct SimStage<F: AsyncFunction> {
    clock: SimClock,
    producer: Option<Producer<F::In>>,
    shards: Vec<SimShard<F>>,
    consumer: Consumer<F::Out>,
    capacity: usize,
    max_occupied: usize,
    restored: Option<RestoreInfo>,
}

impl<F: AsyncFunction> SimStage<F> {
    /// `shards` operators built by `factory`, routed by `key` when given (else round-robin).
    /// Fails as `StageBuilder::build` does when `shards` or the capacity is out of range.
    pub fn new(
        clock: &SimClock,
        shards: usize,
        config: OperatorConfig<F::Out, F::Error>,
        key: Option<KeyFn<F::In>>,
        factory: impl Fn(ShardContext) -> F,
    ) -> Result<Self, BuildError> {
        Self::build(clock, shards, config, key, factory, None)
    }

    /// As [`SimStage::new`], checkpointing to `checkpointing.dir` and restoring the newest
    /// checkpoint there, as `StageBuilder::checkpointing` does.
    pub fn with_checkpoints(
        clock: &SimClock,
        shards: usize,
        config: OperatorConfig<F::Out, F::Error>,
        key: Option<KeyFn<F::In>>,
        factory: impl Fn(ShardContext) -> F,
        checkpointing: Checkpointing<F::In, F::Out>,
    ) -> Result<Self, BuildError> {
        Self::build(clock, shards, config, key, factory, Some(checkpointing))
    }

    fn build(
        clock: &SimClock,
        shards: usize,
        config: OperatorConfig<F::Out, F::Error>,
        key: Option<KeyFn<F::In>>,
        factory: impl Fn(ShardContext) -> F,
        checkpointing: Option<Checkpointing<F::In, F::Out>>,
    ) -> Result<Self, BuildError> {
        let mut wiring = Plan::new(Spec {
            shards,
            capacity: config.capacity.get(),
            timeout: config.timeout,
            mode: config.mode,
            key_fn: key,
            routing: None,
            channel_capacity: Some(SIM_CHANNEL_CAPACITY),
            checkpointing,
        })?;
        let mut senders = vec![];
        let mut receivers = vec![];
        let mut sim_shards = vec![];
        for index in 0..shards {
            // Everything is polled in turn here: the doorbells ring, nobody waits on them.
            let (in_tx, in_rx) = handoff::channel(None, Doorbell::new(), Doorbell::new());
            let (out_tx, out_rx) = handoff::channel(
                Some(wiring.channel_capacity),
                Doorbell::new(),
                Doorbell::new(),
            );
            let mut shard_config = config.clone();
            shard_config.seed = config.seed.wrapping_add(index as u64);
            let shard_plan = wiring.shard(index);
            let gate = Gate::default();
            let input = shard_input(shard_plan.restore, in_rx, &gate);
            let op = AsyncWait::new(
                input,
                factory(ShardContext { index, shards }),
                shard_config,
                clock.clone(),
            );
            senders.push(in_tx);
            receivers.push(out_rx);
            sim_shards.push(SimShard {
                index,
                op,
                gate,
                checkpoint: shard_plan.checkpoint,
                egress: out_tx,
                held: None,
                ended: false,
            });
        }
        let capacity = wiring.capacity.get();
        let (producer, consumer, restored) = wiring.finish(senders, receivers)?;
        Ok(SimStage {
            clock: clock.clone(),
            producer: Some(producer),
            shards: sim_shards,
            consumer,
            capacity,
            max_occupied: 0,
            restored,
        })
    }

    /// What this stage restored when it was built, if anything.
    pub fn restored(&self) -> Option<&RestoreInfo> {
        self.restored.as_ref()
    }

    /// Starts a checkpoint (see `Producer::checkpoint`).
    pub fn checkpoint(&mut self, source: SourcePosition) -> Result<u64, CheckpointRefused> {
        self.producer().checkpoint(source)
    }

    /// Commits a checkpoint after its `Output::Checkpoint` (see `Consumer::commit_checkpoint`).
    pub fn commit_checkpoint(
        &mut self,
        id: u64,
        sink: impl Into<SinkPosition>,
    ) -> Result<(), CheckpointError> {
        self.consumer.commit_checkpoint(id, sink)
    }

    /// Runs until nothing can happen without the clock moving, or until a checkpoint marker
    /// (which the caller commits before going on); returns the outputs so far.
    pub fn run_until_idle(&mut self) -> Result<Vec<Output<F::Out>>, StageError> {
        let mut out = vec![];
        match self.run_now(&mut out, true) {
            Now::Failed(e) => Err(e),
            Now::Idle | Now::Ended => Ok(out),
        }
    }

    /// Pumps every shard and the merge until nothing moves without the clock (or, with
    /// `stop_at_marker`, until a checkpoint marker is out), appending the outputs to `out`.
    fn run_now(&mut self, out: &mut Vec<Output<F::Out>>, stop_at_marker: bool) -> Now {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        loop {
            let mut progressed = false;
            for shard in &mut self.shards {
                progressed |= Self::pump(shard, &mut cx);
                self.max_occupied = self.max_occupied.max(shard.op.occupied());
                assert!(
                    shard.op.occupied() <= self.capacity,
                    "in flight exceeds capacity"
                );
            }
            loop {
                match Pin::new(&mut self.consumer).poll_next(&mut cx) {
                    Poll::Ready(Some(Ok(o))) => {
                        let marker = matches!(o, Output::Checkpoint(_));
                        out.push(o);
                        progressed = true;
                        if marker && stop_at_marker {
                            return Now::Idle;
                        }
                    }
                    Poll::Ready(Some(Err(e))) => return Now::Failed(e),
                    Poll::Ready(None) => return Now::Ended,
                    Poll::Pending => break,
                }
            }
            if !progressed {
                return Now::Idle;
            }
        }
    }

    /// Moves the simulated clock.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    fn producer(&mut self) -> &mut Producer<F::In> {
        self.producer.as_mut().expect("push after finish")
    }

    /// Pushes a record; returns its sequence number.
    pub fn push(&mut self, input: F::In) -> u64 {
        match self.producer().push(input) {
            Ok(seq) => seq,
            Err(_) => panic!("a simulated shard dropped its input"),
        }
    }

    /// Broadcasts a watermark; returns its sequence number.
    pub fn push_watermark(&mut self, timestamp: u64) -> u64 {
        self.producer()
            .push_watermark(timestamp)
            .expect("simulated shards keep their input")
    }

    /// Ends the input.
    pub fn finish(&mut self) {
        self.producer = None;
    }

    /// The most slots any operator held at once so far.
    pub fn max_occupied(&self) -> usize {
        self.max_occupied
    }

    /// Runs until the merged output ends (or fails), moving the clock by `step` whenever
    /// nothing else can happen; panics after `max_steps` steps (a hang).
    pub fn run(
        &mut self,
        step: Duration,
        max_steps: usize,
    ) -> (Vec<Output<F::Out>>, Option<StageError>) {
        let mut out = vec![];
        for _ in 0..max_steps {
            match self.run_now(&mut out, false) {
                Now::Idle => self.clock.advance(step),
                Now::Ended => return (out, None),
                Now::Failed(e) => return (out, Some(e)),
            }
        }
        panic!("the simulated stage did not finish within {max_steps} steps");
    }

    /// Moves one shard's outputs into its bounded egress. Returns whether anything moved.
    fn pump(shard: &mut SimShard<F>, cx: &mut Context<'_>) -> bool {
        let mut progressed = false;
        loop {
            if let Some(item) = shard.held.take() {
                match shard.egress.try_send(item) {
                    Ok(()) => progressed = true,
                    Err(handoff::TrySendError::Full(item)) => {
                        shard.held = Some(item);
                        return progressed;
                    }
                    Err(handoff::TrySendError::Disconnected(_)) => return progressed,
                }
            }
            if shard.ended {
                return progressed;
            }
            match Pin::new(&mut shard.op).poll_next(cx) {
                Poll::Ready(Some(Ok(e))) => shard.held = Some(Egress::Items(vec![e])),
                Poll::Ready(Some(Err(e))) => {
                    shard.ended = true;
                    shard.held = Some(Egress::Failed(e));
                }
                Poll::Ready(None) => {
                    shard.ended = true;
                    shard.op.close();
                    shard.held = Some(Egress::Finished);
                }
                Poll::Pending => match shard.gate.get() {
                    Some(barrier) => {
                        let checkpoint = shard
                            .checkpoint
                            .as_ref()
                            .expect("barriers need checkpointing");
                        let snapshot = shard
                            .op
                            .checkpoint(barrier.id, shard.index, |i| checkpoint.input.encode(i));
                        let result = write_snapshot(&checkpoint.dir, &snapshot);
                        let report = ShardReport {
                            id: barrier.id,
                            shard: shard.index,
                            result,
                        };
                        let _ = checkpoint.reports.try_send(report);
                        shard.gate.set(None);
                        shard.held = Some(Egress::Barrier(barrier));
                        progressed = true;
                    }
                    None => return progressed,
                },
            }
        }
    }
}

fn write_snapshot(
    dir: &std::path::Path,
    snapshot: &ShardSnapshot,
) -> Result<ManifestFile, CheckpointError> {
    let name = crate::checkpoint::snapshot_name(snapshot.checkpoint_id, snapshot.shard);
    crate::checkpoint::write_file_durably(dir, name, &snapshot.encode()?)
}
