//! `Producer`: the stage's input side. Assigns sequence numbers, routes records to shards
//! (round-robin or by key hash) and broadcasts watermarks, over bounded hand-over channels
//! (`handoff`: a full channel parks the producer until a shard drains, outside flume's lock).
//!
//! Owns: the global input order. Invariants: every element gets the next sequence number, so
//! sequence numbers are dense; a record goes to exactly one shard, a watermark or a checkpoint
//! barrier to every shard with one sequence number; a full shard channel blocks (or awaits),
//! it never drops; a push that fails hands the element back.

use super::handoff;
use super::messages::{Barrier, Inbound};
use super::routing::{shard_of, KeyFn, Routing};
use crate::checkpoint::coordinator::Coordinator;
use crate::checkpoint::{CheckpointRefused, SourcePosition};
use crate::error::PushError;
use crate::operator::Element;
use std::sync::Arc;
use std::time::Instant;

/// One record in this many carries its push time, for the `queue_wait_us` metric: a clock
/// read per record was a third of the producer thread's CPU against Redis at 64 in flight
/// (the profile in docs/decisions/cpu-at-64-in-flight.md). Sampling by sequence number, like Flink's latency markers, keeps
/// the histogram's quantiles while the producer reads the clock once per 16 pushes.
pub const QUEUE_WAIT_SAMPLE: u64 = 16;

/// The input side of a stage. Not `Clone`: one producer defines one input order.
pub struct Producer<I> {
    senders: Vec<handoff::Sender<Inbound<I>>>,
    checkpoints: Option<Arc<Coordinator>>,
    next_seq: u64,
    next_shard: usize,
    key_fn: Option<KeyFn<I>>,
    routing: Routing,
}

impl<I> Producer<I> {
    pub(crate) fn new(
        senders: Vec<handoff::Sender<Inbound<I>>>,
        key_fn: Option<KeyFn<I>>,
        routing: Routing,
        checkpoints: Option<Arc<Coordinator>>,
        first_seq: u64,
    ) -> Self {
        assert!(!senders.is_empty(), "a stage has at least one shard");
        assert!(
            routing == Routing::RoundRobin || key_fn.is_some(),
            "key routing needs a key function"
        );
        Producer {
            senders,
            checkpoints,
            next_seq: first_seq,
            next_shard: 0,
            key_fn,
            routing,
        }
    }

    /// The sequence number the next element will get (also: elements pushed so far).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn route(&mut self, input: I) -> (usize, Inbound<I>) {
        let seq = self.next_seq;
        let key = self.key_fn.as_ref().map_or(seq, |f| f(&input));
        let shard = match self.routing {
            Routing::ByKey => shard_of(key, self.senders.len()),
            Routing::RoundRobin => {
                let s = self.next_shard;
                self.next_shard = (s + 1) % self.senders.len();
                s
            }
        };
        let element = Element::Record {
            seq,
            key,
            input,
            pushed_at: (seq % QUEUE_WAIT_SAMPLE == 0).then(Instant::now),
        };
        (shard, Inbound::Element(element))
    }

    fn unwrap_record(element: Inbound<I>) -> I {
        match element {
            Inbound::Element(Element::Record { input, .. }) => input,
            _ => unreachable!("a record was sent"),
        }
    }

    /// Pushes a record, blocking while its shard is full. Returns the record's sequence number.
    pub fn push(&mut self, input: I) -> Result<u64, PushError<I>> {
        let (shard, element) = self.route(input);
        match self.senders[shard].send_blocking(element) {
            Ok(()) => Ok(self.take_seq()),
            Err(e) => Err(PushError::Closed(Self::unwrap_record(e))),
        }
    }

    /// Pushes a record, awaiting while its shard is full (usable from any async runtime).
    pub async fn push_async(&mut self, input: I) -> Result<u64, PushError<I>> {
        let (shard, element) = self.route(input);
        match self.senders[shard].send(element).await {
            Ok(()) => Ok(self.take_seq()),
            Err(e) => Err(PushError::Closed(Self::unwrap_record(e))),
        }
    }

    /// Broadcasts a watermark to every shard, blocking while a shard is full.
    pub fn push_watermark(&mut self, timestamp: u64) -> Result<u64, PushError<u64>> {
        let seq = self.next_seq;
        for sender in &self.senders {
            sender
                .send_blocking(Inbound::Element(Element::Watermark { seq, timestamp }))
                .map_err(|_| PushError::Closed(timestamp))?;
        }
        Ok(self.take_seq())
    }

    /// Broadcasts a watermark to every shard, awaiting while a shard is full.
    pub async fn push_watermark_async(&mut self, timestamp: u64) -> Result<u64, PushError<u64>> {
        let seq = self.next_seq;
        for sender in &self.senders {
            sender
                .send(Inbound::Element(Element::Watermark { seq, timestamp }))
                .await
                .map_err(|_| PushError::Closed(timestamp))?;
        }
        Ok(self.take_seq())
    }

    /// Starts a checkpoint whose source resumes at `source` (the position just after the last
    /// element pushed), broadcasting its barrier to every shard (blocking while a shard's
    /// channel is full). Returns the checkpoint id. The consumer yields
    /// `Output::Checkpoint(id)` where the barrier reaches the output; the sink then makes its
    /// output durable and calls `Consumer::commit_checkpoint`. One checkpoint at a time.
    pub fn checkpoint(&mut self, source: SourcePosition) -> Result<u64, CheckpointRefused> {
        let (id, barrier) = self.begin_checkpoint(source)?;
        for sender in &self.senders {
            if sender.send_blocking(Inbound::Barrier(barrier)).is_err() {
                return Err(self.abort_checkpoint(id));
            }
        }
        self.take_seq();
        Ok(id)
    }

    /// [`Producer::checkpoint`], awaiting while a shard's channel is full (for a source that
    /// runs on an executor, which must not block).
    pub async fn checkpoint_async(
        &mut self,
        source: SourcePosition,
    ) -> Result<u64, CheckpointRefused> {
        let (id, barrier) = self.begin_checkpoint(source)?;
        for sender in &self.senders {
            if sender.send(Inbound::Barrier(barrier)).await.is_err() {
                return Err(self.abort_checkpoint(id));
            }
        }
        self.take_seq();
        Ok(id)
    }

    fn begin_checkpoint(
        &self,
        source: SourcePosition,
    ) -> Result<(u64, Barrier), CheckpointRefused> {
        let coordinator = self
            .checkpoints
            .as_ref()
            .ok_or(CheckpointRefused::NotConfigured)?;
        let id = coordinator.begin(source)?;
        Ok((
            id,
            Barrier {
                seq: self.next_seq,
                id,
            },
        ))
    }

    fn abort_checkpoint(&self, id: u64) -> CheckpointRefused {
        if let Some(coordinator) = &self.checkpoints {
            coordinator.abort(id);
        }
        CheckpointRefused::Closed
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Ends the input: shards finish what they hold, then the consumer's stream ends.
    pub fn finish(self) {}
}
