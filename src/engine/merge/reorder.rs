//! `ReorderWindow`: the ordered mode's window of sequence numbers, which puts the shards'
//! outputs back into global sequence order.
//!
//! Owns: the slots from `base_seq` on. Invariants: a slot is filled at most once per sequence
//! number (a watermark counts one arrival per shard); only the head slot is released, and only
//! when complete (a record, a watermark every shard delivered, or an aligned checkpoint
//! barrier's sequence number, which produces nothing); the window's length is fixed while it
//! runs, so a shard whose next item lies beyond it is held back (backpressure, not memory).

use crate::checkpoint::{CheckpointError, Codec, HeldEntry, MergeSnapshot};
use crate::function::Outputs;
use crate::operator::Emitted;
use std::collections::VecDeque;

enum Slot<O> {
    Empty,
    /// `after_barrier`: arrived after its shard's checkpoint barrier (so it is also in the
    /// shard's snapshot, and is not part of the merge's).
    Record {
        outputs: Outputs<O>,
        after_barrier: bool,
    },
    Watermark {
        timestamp: u64,
        arrivals: usize,
        arrivals_after_barrier: usize,
    },
}

/// What leaves the head of the window.
pub(super) enum Released<O> {
    Record {
        seq: u64,
        outputs: Outputs<O>,
    },
    Watermark {
        seq: u64,
        timestamp: u64,
    },
    /// An aligned checkpoint barrier's sequence number: nothing to emit.
    Barrier,
}

pub(super) struct ReorderWindow<O> {
    base_seq: u64,
    slots: VecDeque<Slot<O>>,
    /// Aligned checkpoint barriers' sequence numbers the window has not passed yet
    /// (ascending); their slots stay empty and are skipped.
    skip: VecDeque<u64>,
}

impl<O> ReorderWindow<O> {
    pub(super) fn new(window: usize) -> Self {
        assert!(window > 0, "the reorder window is non-empty");
        ReorderWindow {
            base_seq: 0,
            slots: (0..window).map(|_| Slot::Empty).collect(),
            skip: VecDeque::new(),
        }
    }

    /// The next sequence number to release.
    pub(super) fn base_seq(&self) -> u64 {
        self.base_seq
    }

    /// Whether sequence number `seq` has a slot now.
    pub(super) fn fits(&self, seq: u64) -> bool {
        assert!(
            seq >= self.base_seq,
            "sequence {seq} arrived twice or out of shard order"
        );
        ((seq - self.base_seq) as usize) < self.slots.len()
    }

    /// Places an item that [`Self::fits`]; `after_barrier` when its shard already passed the
    /// barrier of the checkpoint being aligned.
    pub(super) fn place(&mut self, item: Emitted<O>, after_barrier: bool) {
        let seq = match &item {
            Emitted::Record { seq, .. } | Emitted::Watermark { seq, .. } => *seq,
        };
        let after = usize::from(after_barrier);
        let slot = &mut self.slots[(seq - self.base_seq) as usize];
        match (item, &mut *slot) {
            (Emitted::Record { outputs, .. }, Slot::Empty) => {
                *slot = Slot::Record {
                    outputs,
                    after_barrier,
                }
            }
            (Emitted::Watermark { timestamp, .. }, Slot::Empty) => {
                *slot = Slot::Watermark {
                    timestamp,
                    arrivals: 1,
                    arrivals_after_barrier: after,
                }
            }
            (
                Emitted::Watermark { .. },
                Slot::Watermark {
                    arrivals,
                    arrivals_after_barrier,
                    ..
                },
            ) => {
                *arrivals += 1;
                *arrivals_after_barrier += after;
            }
            _ => panic!("sequence {seq} delivered twice"),
        }
    }

    /// Releases the head of the window if it is complete (`shards` arrivals make a watermark).
    pub(super) fn pop(&mut self, shards: usize) -> Option<Released<O>> {
        let ready = match self.slots.front()? {
            Slot::Empty => self.skip.front() == Some(&self.base_seq),
            Slot::Record { .. } => true,
            Slot::Watermark { arrivals, .. } => *arrivals == shards,
        };
        if !ready {
            return None;
        }
        let head = self.slots.pop_front().expect("checked above");
        self.slots.push_back(Slot::Empty);
        let seq = self.base_seq;
        self.base_seq += 1;
        Some(match head {
            Slot::Record { outputs, .. } => Released::Record { seq, outputs },
            Slot::Watermark { timestamp, .. } => Released::Watermark { seq, timestamp },
            Slot::Empty => {
                self.skip.pop_front();
                Released::Barrier
            }
        })
    }

    /// The merge's part of the checkpoint whose barrier is `barrier_seq`, now aligned: what the
    /// window holds below the barrier that arrived before its shard's barrier, and earlier
    /// barriers not yet passed. From here on nothing held counts as "after the barrier", and
    /// `barrier_seq` is skipped when the window reaches it.
    pub(super) fn held_at(&mut self, barrier_seq: u64, codec: &Codec<O>) -> Vec<HeldEntry> {
        let mut held = vec![];
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let seq = self.base_seq + i as u64;
            match slot {
                _ if seq >= barrier_seq => {}
                Slot::Record {
                    outputs,
                    after_barrier: false,
                } => held.push(HeldEntry {
                    seq,
                    watermark: None,
                    arrivals: 0,
                    outputs: outputs.as_slice().iter().map(|o| codec.encode(o)).collect(),
                }),
                Slot::Watermark {
                    timestamp,
                    arrivals,
                    arrivals_after_barrier,
                } if *arrivals > *arrivals_after_barrier => held.push(HeldEntry {
                    seq,
                    watermark: Some(*timestamp),
                    arrivals: (*arrivals - *arrivals_after_barrier) as u32,
                    outputs: vec![],
                }),
                _ => {}
            }
            match slot {
                Slot::Record { after_barrier, .. } => *after_barrier = false,
                Slot::Watermark {
                    arrivals_after_barrier,
                    ..
                } => *arrivals_after_barrier = 0,
                Slot::Empty => {}
            }
        }
        // Earlier checkpoints' barriers the window has not passed: their sequence numbers
        // produce nothing, and no shard will send them again.
        held.extend(self.skip.iter().map(|&seq| HeldEntry {
            seq,
            watermark: None,
            arrivals: 0,
            outputs: vec![],
        }));
        held.sort_by_key(|h| h.seq);
        self.skip.push_back(barrier_seq);
        held
    }

    /// Continues from a checkpoint's merge snapshot; returns how many records it held. The
    /// window grows if the snapshot's span up to its barrier does not fit.
    pub(super) fn restore(
        &mut self,
        snapshot: &MergeSnapshot,
        codec: &Codec<O>,
    ) -> Result<usize, CheckpointError> {
        self.base_seq = snapshot.base_seq;
        self.skip.clear();
        // The barrier's own slot must fit, whatever the window is now.
        let span = (snapshot.barrier_seq - snapshot.base_seq) as usize + 1;
        let window = self.slots.len().max(span);
        self.slots = (0..window).map(|_| Slot::Empty).collect();
        let mut held = 0;
        for entry in &snapshot.held {
            let slot = &mut self.slots[(entry.seq - self.base_seq) as usize];
            *slot = match entry.watermark {
                Some(timestamp) => Slot::Watermark {
                    timestamp,
                    arrivals: entry.arrivals as usize,
                    arrivals_after_barrier: 0,
                },
                None => {
                    held += 1;
                    let mut outputs = Vec::with_capacity(entry.outputs.len());
                    for bytes in &entry.outputs {
                        outputs.push(codec.decode(bytes).map_err(|reason| {
                            CheckpointError::Decode {
                                checkpoint_id: snapshot.checkpoint_id,
                                what: "held output of record",
                                seq: entry.seq,
                                reason,
                            }
                        })?);
                    }
                    Slot::Record {
                        outputs: Outputs::from(outputs),
                        after_barrier: false,
                    }
                }
            };
        }
        // The barrier's sequence number produces nothing.
        self.slots[span - 1] = Slot::Record {
            outputs: Outputs::None,
            after_barrier: false,
        };
        Ok(held)
    }
}
