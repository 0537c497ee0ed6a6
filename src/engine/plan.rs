//! `Plan`: a stage before it runs. Checks the configuration, sizes the channels and the
//! merge's reorder window, opens the checkpoint directory and decides what each shard
//! re-issues, then builds the producer and the consumer around the shards' channels.
//!
//! Owns: the wiring that the real `Stage` and the single-threaded `SimStage` share, so that
//! they cannot drift apart; only how a shard runs (a glommio executor, or a pump on the test's
//! thread) differs. Invariants: a plan exists only for a valid configuration; each shard's
//! re-issued elements are handed out once, to that shard; new input is numbered from the
//! restored checkpoint's barrier on, and the consumer resumes from its merge snapshot before
//! anything is read.

use super::handoff;
use super::merge::MergeCheckpoint;
use super::messages::{Egress, Inbound};
use super::restore;
use super::shard::ShardCheckpoint;
use super::{Consumer, KeyFn, Producer, Routing};
use crate::checkpoint::coordinator::Coordinator;
use crate::checkpoint::{CheckpointError, Checkpointing, RestoreInfo};
use crate::error::BuildError;
use crate::operator::{Element, OutputMode};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

/// The default ingress/egress channel capacity is the queue capacity, but at least this: with
/// key routing and a small capacity, a shallow channel makes the single producer wait on one
/// busy shard while the others idle (head-of-line blocking at the producer). Channels hold
/// records not yet started; requests in flight stay bounded by the queue capacity.
pub const MIN_CHANNEL_CAPACITY: usize = 64;
/// Most shards a stage runs.
pub const MAX_SHARDS: usize = 1024;
/// Largest queue capacity per shard.
pub const MAX_CAPACITY: usize = 1 << 20;
/// The smallest ordered reorder window, in sequence numbers.
const MIN_WINDOW: usize = 64;

/// What a stage is asked to be.
pub(crate) struct Spec<I, O> {
    pub(crate) shards: usize,
    pub(crate) capacity: usize,
    pub(crate) timeout: Duration,
    pub(crate) mode: OutputMode,
    pub(crate) key_fn: Option<KeyFn<I>>,
    /// `None`: by key when a key is set, else round-robin.
    pub(crate) routing: Option<Routing>,
    /// `None`: the capacity, at least [`MIN_CHANNEL_CAPACITY`].
    pub(crate) channel_capacity: Option<usize>,
    pub(crate) checkpointing: Option<Checkpointing<I, O>>,
}

/// A checked stage, ready to be wired.
pub(crate) struct Plan<I, O> {
    pub(crate) shards: usize,
    pub(crate) capacity: NonZeroUsize,
    pub(crate) mode: OutputMode,
    pub(crate) channel_capacity: usize,
    key_fn: Option<KeyFn<I>>,
    routing: Routing,
    checkpointing: Option<Checkpointing<I, O>>,
    opened: Option<restore::Opened>,
    /// Per shard, the elements it re-issues (taken by [`Plan::shard`]).
    restores: Vec<Vec<Element<I>>>,
}

/// One shard's part of the plan.
pub(crate) struct ShardPlan<I> {
    /// Elements re-issued from the checkpoint, fed before any new input.
    pub(crate) restore: Vec<Element<I>>,
    pub(crate) checkpoint: Option<ShardCheckpoint<I>>,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> BuildError {
    BuildError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

/// The ordered merge's reorder window: everything a shard can hold that the merge has not
/// released (its queue and both channels), for every shard.
pub(crate) fn reorder_window(shards: usize, capacity: usize, channel_capacity: usize) -> usize {
    (shards * (capacity + 2 * channel_capacity)).max(MIN_WINDOW)
}

impl<I, O> Plan<I, O> {
    /// Checks `spec`, opens its checkpoint directory and loads what a restore re-issues.
    pub(crate) fn new(spec: Spec<I, O>) -> Result<Self, BuildError> {
        if spec.shards == 0 || spec.shards > MAX_SHARDS {
            let reason = format!("{} is not in 1..={MAX_SHARDS}", spec.shards);
            return Err(invalid("shards", reason));
        }
        let capacity = NonZeroUsize::new(spec.capacity)
            .filter(|c| c.get() <= MAX_CAPACITY)
            .ok_or_else(|| {
                invalid(
                    "capacity",
                    format!("{} is not in 1..={MAX_CAPACITY}", spec.capacity),
                )
            })?;
        if spec.timeout.is_zero() {
            return Err(invalid("timeout", "must be greater than zero"));
        }
        let routing = spec.routing.unwrap_or(if spec.key_fn.is_some() {
            Routing::ByKey
        } else {
            Routing::RoundRobin
        });
        if spec.mode == OutputMode::KeyOrdered
            && (spec.key_fn.is_none() || routing != Routing::ByKey)
        {
            return Err(invalid(
                "mode",
                "KeyOrdered needs key_by(..) and key routing, so one key stays on one shard",
            ));
        }
        if routing == Routing::ByKey && spec.key_fn.is_none() {
            return Err(invalid("routing", "ByKey routing needs key_by(..)"));
        }
        let channel_capacity = spec
            .channel_capacity
            .unwrap_or(capacity.get().max(MIN_CHANNEL_CAPACITY))
            .max(1);
        let mut opened = match &spec.checkpointing {
            None => None,
            Some(c) => Some(restore::open_checkpoints(c, spec.shards, spec.mode)?),
        };
        let restores = match (&spec.checkpointing, &opened) {
            (
                Some(c),
                Some(restore::Opened {
                    restored: Some(restored),
                    ..
                }),
            ) => restore::reissue(&c.input, restored)?,
            _ => (0..spec.shards).map(|_| vec![]).collect(),
        };
        if let Some(info) = opened.as_mut().and_then(|o| o.info.as_mut()) {
            info.reissued = restores.iter().map(Vec::len).sum();
        }
        Ok(Plan {
            shards: spec.shards,
            capacity,
            mode: spec.mode,
            channel_capacity,
            key_fn: spec.key_fn,
            routing,
            checkpointing: spec.checkpointing,
            opened,
            restores,
        })
    }

    /// Shard `index`'s part: what it re-issues and where its snapshots go.
    pub(crate) fn shard(&mut self, index: usize) -> ShardPlan<I> {
        ShardPlan {
            restore: std::mem::take(&mut self.restores[index]),
            checkpoint: match (&self.checkpointing, &self.opened) {
                (Some(c), Some(o)) => Some(ShardCheckpoint {
                    dir: o.coordinator.dir().to_path_buf(),
                    input: c.input.clone(),
                    reports: o.coordinator.reports(),
                }),
                _ => None,
            },
        }
    }

    /// For a stage with its source and sink on its one shard (no merge): the coordinator, the
    /// first sequence number of new input and what was restored. Refuses a checkpoint whose
    /// merge held outputs (one written by a producer-fed stage with released outputs pending),
    /// which only a merge can give back.
    #[allow(clippy::type_complexity)]
    pub(crate) fn local_checkpoints(
        &mut self,
    ) -> Result<(Option<Arc<Coordinator>>, u64, Option<RestoreInfo>), BuildError> {
        let Some(opened) = self.opened.take() else {
            return Ok((None, 0, None));
        };
        let mut first_seq = 0;
        if let Some(merge) = opened.restored.as_ref().and_then(|r| r.merge.as_ref()) {
            if !merge.held.is_empty() {
                return Err(BuildError::Checkpoint(CheckpointError::Mismatch {
                    checkpoint_id: merge.checkpoint_id,
                    found: format!("{} outputs held by the merge", merge.held.len()),
                    expected: "none (a stage with its sink on the shard has no merge)".into(),
                }));
            }
            first_seq = merge.barrier_seq + 1;
        }
        Ok((Some(opened.coordinator), first_seq, opened.info))
    }

    /// The producer and the consumer around the shards' channels (in shard order), the
    /// consumer resumed from the restored checkpoint, and what was restored.
    #[allow(clippy::type_complexity)]
    pub(crate) fn finish(
        self,
        senders: Vec<handoff::Sender<Inbound<I>>>,
        receivers: Vec<handoff::Receiver<Egress<O>>>,
    ) -> Result<(Producer<I>, Consumer<O>, Option<RestoreInfo>), BuildError> {
        let window = reorder_window(self.shards, self.capacity.get(), self.channel_capacity);
        let (coordinator, restored, mut info) = match self.opened {
            Some(o) => (Some(o.coordinator), o.restored, o.info),
            None => (None, None, None),
        };
        let merge_checkpoint = match (&self.checkpointing, &coordinator) {
            (Some(c), Some(coordinator)) => Some(MergeCheckpoint {
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
        let producer = Producer::new(senders, self.key_fn, self.routing, coordinator, first_seq);
        Ok((producer, consumer, info))
    }
}
