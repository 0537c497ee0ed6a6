//! The messages between a stage's threads: what the producer sends a shard (`Inbound`), what a
//! shard sends the merge (`Egress`), and the checkpoint `Barrier` both carry.
//!
//! Owns: the vocabulary of the hand-overs. Invariants: a `Barrier` is made only by the
//! producer (`Producer::checkpoint`), one per checkpoint with one sequence number, and travels
//! unchanged to every shard, through the shard's snapshot and on to the merge; none of these
//! types is visible outside the crate, so a user's input or output can never be taken for one.

use crate::error::StageError;
use crate::operator::{Element, Emitted};

/// Checkpoint `id`'s barrier, at sequence number `seq`: what a shard receives after it belongs
/// to the next checkpoint, what it emits after it was emitted after its snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Barrier {
    pub(crate) seq: u64,
    pub(crate) id: u64,
}

/// What travels to a shard: an element, or a checkpoint barrier (the shard takes barriers out
/// before the operator sees its input).
pub(crate) enum Inbound<I> {
    Element(Element<I>),
    Barrier(Barrier),
}

/// What a shard sends to the merge.
pub(crate) enum Egress<O> {
    /// Outputs in the shard's emission order.
    Items(Vec<Emitted<O>>),
    /// The shard took its snapshot for this checkpoint: what follows was emitted after it.
    Barrier(Barrier),
    Failed(StageError),
    Finished,
}
