//! `WatermarkBarrier`: the unordered modes' rule that no record overtakes a watermark and no
//! watermark overtakes a record in the merged output, across shards.
//!
//! Owns: which shard waits at which watermark. Invariants: a shard that emitted a watermark
//! is not read again until every live shard waits at one (or finished); the lowest waiting
//! watermark sequence number is released first (shards may fold consecutive watermarks), and
//! it frees exactly the shards waiting at it.

pub(super) struct WatermarkBarrier {
    /// Per shard: the watermark (sequence number, timestamp) it waits at.
    waiting: Vec<Option<(u64, u64)>>,
}

impl WatermarkBarrier {
    pub(super) fn new(shards: usize) -> Self {
        WatermarkBarrier {
            waiting: vec![None; shards],
        }
    }

    /// Whether shard `p` waits at a watermark (and is not to be read).
    pub(super) fn is_waiting(&self, p: usize) -> bool {
        self.waiting[p].is_some()
    }

    /// Shard `p` emitted watermark `timestamp` at sequence number `seq`.
    pub(super) fn wait(&mut self, p: usize, seq: u64, timestamp: u64) {
        self.waiting[p] = Some((seq, timestamp));
    }

    /// Once every shard either waits or has `finished`, releases the lowest watermark:
    /// `(seq, timestamp)`.
    pub(super) fn release(&mut self, finished: impl Fn(usize) -> bool) -> Option<(u64, u64)> {
        let mut lowest: Option<(u64, u64)> = None;
        for (p, waiting) in self.waiting.iter().enumerate() {
            match *waiting {
                Some((seq, ts)) if lowest.is_none_or(|(s, _)| seq < s) => lowest = Some((seq, ts)),
                Some(_) => {}
                None if !finished(p) => return None,
                None => {}
            }
        }
        let (seq, _) = lowest?;
        for waiting in &mut self.waiting {
            if waiting.is_some_and(|(s, _)| s == seq) {
                *waiting = None;
            }
        }
        lowest
    }
}
