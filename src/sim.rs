//! `SimStage`: a whole stage (producer routing, `N` operators, the output merge) driven on one
//! thread by a simulated clock, for deterministic tests of the engine and of user functions.
//!
//! Owns: nothing new; it wires the real `Producer`, `AsyncWait` and `Consumer` together without
//! threads. Invariants: the same routing and merge code as a real `Stage`; time moves only in
//! `run`'s steps; egress channels are bounded (2), so the merge's backpressure is exercised.

use crate::clock::SimClock;
use crate::engine::{
    Consumer, Egress, GatedIngress, KeyFn, Output, Producer, Routing, ShardContext,
};
use crate::error::StageError;
use crate::function::AsyncFunction;
use crate::operator::{AsyncWait, OperatorConfig, OutputMode};
use futures::task::noop_waker;
use futures::Stream;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

type Ingress<I> = GatedIngress<I>;

struct SimShard<F: AsyncFunction> {
    op: AsyncWait<Ingress<F::In>, F, SimClock>,
    egress: flume::Sender<Egress<F::Out>>,
    held: Option<Egress<F::Out>>,
    ended: bool,
}

/// See the module documentation.
pub struct SimStage<F: AsyncFunction> {
    clock: SimClock,
    producer: Option<Producer<F::In>>,
    shards: Vec<SimShard<F>>,
    consumer: Consumer<F::Out>,
    capacity: usize,
    max_occupied: usize,
}

impl<F: AsyncFunction> SimStage<F> {
    /// `shards` operators built by `factory`, routed by `key` when given (else round-robin).
    pub fn new(
        clock: &SimClock,
        shards: usize,
        config: OperatorConfig<F::Out, F::Error>,
        key: Option<KeyFn<F::In>>,
        factory: impl Fn(ShardContext) -> F,
    ) -> Self {
        assert!(shards > 0, "a stage has at least one shard");
        assert!(
            config.mode != OutputMode::KeyOrdered || key.is_some(),
            "KeyOrdered needs a key"
        );
        let routing = if key.is_some() {
            Routing::ByKey
        } else {
            Routing::RoundRobin
        };
        let mut senders = vec![];
        let mut receivers = vec![];
        let mut sim_shards = vec![];
        for index in 0..shards {
            let (in_tx, in_rx) = flume::unbounded();
            let (out_tx, out_rx) = flume::bounded(2);
            let mut shard_config = config.clone();
            shard_config.seed = config.seed.wrapping_add(index as u64);
            let op = AsyncWait::new(
                GatedIngress::new(in_rx, Default::default()),
                factory(ShardContext { index, shards }),
                shard_config,
                clock.clone(),
            );
            senders.push(in_tx);
            receivers.push(out_rx);
            sim_shards.push(SimShard {
                op,
                egress: out_tx,
                held: None,
                ended: false,
            });
        }
        let capacity = config.capacity.get();
        SimStage {
            clock: clock.clone(),
            producer: Some(Producer::new(senders, key, routing, None, 0)),
            shards: sim_shards,
            consumer: Consumer::new(receivers, config.mode, shards * (capacity + 4), None),
            capacity,
            max_occupied: 0,
        }
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
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = vec![];
        for _ in 0..max_steps {
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
                            out.push(o);
                            progressed = true;
                        }
                        Poll::Ready(Some(Err(e))) => return (out, Some(e)),
                        Poll::Ready(None) => return (out, None),
                        Poll::Pending => break,
                    }
                }
                if !progressed {
                    break;
                }
            }
            self.clock.advance(step);
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
                    Err(flume::TrySendError::Full(item)) => {
                        shard.held = Some(item);
                        return progressed;
                    }
                    Err(flume::TrySendError::Disconnected(_)) => return progressed,
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
                Poll::Pending => return progressed,
            }
        }
    }
}
