//! `Alignment`: the merge's side of checkpointing. Aligns a checkpoint's barriers (one per
//! shard) and keeps the merge's snapshot until the sink commits it.
//!
//! Owns: the checkpoint being aligned and the one aligned but not yet committed.
//! Invariants: one checkpoint aligns at a time, and each shard delivers its barrier once; the
//! snapshot is taken when the last barrier arrives, and lists every sequence number below the
//! barrier released since the first one arrived (`released_in_flight`), so restore re-issues
//! the rest exactly once; in the unordered modes a shard past its barrier is held back at its
//! first item above the barrier until the checkpoint aligns.

use super::reorder::ReorderWindow;
use crate::checkpoint::coordinator::Coordinator;
use crate::checkpoint::{CheckpointError, Codec, MergeSnapshot, SinkPosition};
use crate::engine::messages::Barrier;
use std::sync::Arc;

/// The consumer's side of checkpointing, as the stage's plan hands it over.
pub(crate) struct MergeCheckpoint<O> {
    pub(crate) coordinator: Arc<Coordinator>,
    pub(crate) output: Codec<O>,
}

/// The checkpoint whose barriers are arriving.
struct Aligning {
    barrier: Barrier,
    /// Sequence numbers below the barrier released since the first barrier arrived.
    released: Vec<u64>,
}

pub(super) struct Alignment<O> {
    checkpoint: MergeCheckpoint<O>,
    aligning: Option<Aligning>,
    /// Per shard: its barrier of the checkpoint being aligned has been taken.
    passed: Vec<bool>,
    /// The snapshot of an aligned checkpoint, until the sink commits it.
    aligned: Option<MergeSnapshot>,
}

impl<O> Alignment<O> {
    pub(super) fn new(checkpoint: MergeCheckpoint<O>, shards: usize) -> Self {
        Alignment {
            checkpoint,
            aligning: None,
            passed: vec![false; shards],
            aligned: None,
        }
    }

    /// The codec of the merge's held outputs.
    pub(super) fn codec(&self) -> &Codec<O> {
        &self.checkpoint.output
    }

    /// Whether shard `p` has passed the barrier of the checkpoint being aligned.
    pub(super) fn passed(&self, p: usize) -> bool {
        self.passed[p]
    }

    /// Unordered modes: whether shard `p`'s next item, at `seq`, must wait for the alignment.
    pub(super) fn holds_back(&self, p: usize, seq: u64) -> bool {
        self.passed[p] && self.aligning.as_ref().is_some_and(|a| seq > a.barrier.seq)
    }

    /// Takes shard `p`'s `barrier`; true when it was the last one (call [`Self::align`]).
    pub(super) fn arrived(&mut self, p: usize, barrier: Barrier) -> bool {
        let aligning = self.aligning.get_or_insert(Aligning {
            barrier,
            released: vec![],
        });
        assert!(
            aligning.barrier == barrier,
            "checkpoint {} arrived while {} is aligning (one at a time)",
            barrier.id,
            aligning.barrier.id
        );
        assert!(
            !self.passed[p],
            "shard {p} delivered checkpoint {}'s barrier twice",
            barrier.id
        );
        self.passed[p] = true;
        self.passed.iter().all(|&passed| passed)
    }

    /// Notes a release while a checkpoint aligns (see `MergeSnapshot::released_in_flight`).
    pub(super) fn note_release(&mut self, seq: u64) {
        if let Some(a) = &mut self.aligning {
            if seq < a.barrier.seq {
                a.released.push(seq);
            }
        }
    }

    /// Every barrier arrived: snapshots what the merge holds (the ordered window, if any) and
    /// returns the checkpoint's id, for the `Output::Checkpoint` marker.
    pub(super) fn align(
        &mut self,
        mode: u8,
        window: Option<&mut ReorderWindow<O>>,
        last_watermark: Option<u64>,
    ) -> u64 {
        let aligning = self.aligning.take().expect("every barrier arrived");
        let barrier = aligning.barrier;
        let (base_seq, held) = match window {
            Some(window) => {
                let held = window.held_at(barrier.seq, &self.checkpoint.output);
                (window.base_seq(), held)
            }
            None => (0, vec![]),
        };
        self.passed.iter_mut().for_each(|passed| *passed = false);
        self.aligned = Some(MergeSnapshot {
            checkpoint_id: barrier.id,
            barrier_seq: barrier.seq,
            shards: self.passed.len() as u32,
            mode,
            base_seq,
            last_watermark,
            held,
            released_in_flight: aligning.released,
        });
        barrier.id
    }

    /// Commits checkpoint `id`, aligned before (see `Consumer::commit_checkpoint`).
    pub(super) fn commit(&mut self, id: u64, sink: SinkPosition) -> Result<(), CheckpointError> {
        self.commit_later(id, sink)()
    }

    /// The commit of checkpoint `id` (aligned before) as a job for another thread: it waits
    /// for the shards' snapshots, so a shard's own thread must not run it.
    pub(super) fn commit_later(
        &mut self,
        id: u64,
        sink: SinkPosition,
    ) -> impl FnOnce() -> Result<(), CheckpointError> + Send + 'static {
        let snapshot = match self.aligned.take() {
            Some(s) if s.checkpoint_id == id => s,
            other => panic!(
                "commit_checkpoint({id}) without Output::Checkpoint({id}) (aligned: {:?})",
                other.map(|s| s.checkpoint_id)
            ),
        };
        let coordinator = self.checkpoint.coordinator.clone();
        move || coordinator.commit(&snapshot, &sink)
    }
}
