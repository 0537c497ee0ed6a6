//! Element queues: which occupied slot may leave next, per output mode.
//!
//! Owns: emission order. A queue knows slot ids only; the operator owns the slots' contents
//! and tells the queue when a record's outcome is final (`on_complete`).
//!
//! Invariants (each queue asserts its own):
//! - every slot pushed is popped exactly once;
//! - `Ordered`: slots leave in push order;
//! - `Unordered`/`KeyOrdered`: a slot never leaves before a watermark pushed before it, and a
//!   watermark never leaves before a record pushed before it (segments);
//! - `KeyOrdered`: slots with the same key leave in push order;
//! - the queue's memory is allocated when it is created and bounded by its capacity.

mod deadline_list;
mod ordered_queue;
mod segmented_queue;

pub(crate) use deadline_list::DeadlineList;
pub(crate) use ordered_queue::OrderedQueue;
pub(crate) use segmented_queue::SegmentedQueue;

/// "No slot" in the intrusive lists.
pub(crate) const NIL: u32 = u32::MAX;

/// Where a pushed watermark went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatermarkPush {
    /// The watermark took the offered slot.
    Took,
    /// It followed another watermark with no record in between, so it was folded into that
    /// watermark's slot (given here) and the offered slot stays free.
    MergedInto(u32),
}

/// The three output modes behind one interface.
pub(crate) enum ElementQueue {
    Ordered(OrderedQueue),
    Segmented(SegmentedQueue),
}

impl ElementQueue {
    pub(crate) fn push_record(&mut self, slot: u32, key: u64) {
        match self {
            ElementQueue::Ordered(q) => q.push(slot),
            ElementQueue::Segmented(q) => q.push_record(slot, key),
        }
    }

    pub(crate) fn push_watermark(&mut self, slot: u32) -> WatermarkPush {
        match self {
            ElementQueue::Ordered(q) => {
                q.push(slot);
                q.on_complete(slot);
                WatermarkPush::Took
            }
            ElementQueue::Segmented(q) => q.push_watermark(slot),
        }
    }

    /// The next watermark does not fold into an earlier one (see `SegmentedQueue::seal`).
    pub(crate) fn seal(&mut self) {
        if let ElementQueue::Segmented(q) = self {
            q.seal();
        }
    }

    pub(crate) fn on_complete(&mut self, slot: u32) {
        match self {
            ElementQueue::Ordered(q) => q.on_complete(slot),
            ElementQueue::Segmented(q) => q.on_complete(slot),
        }
    }

    pub(crate) fn pop(&mut self) -> Option<u32> {
        match self {
            ElementQueue::Ordered(q) => q.pop(),
            ElementQueue::Segmented(q) => q.pop(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            ElementQueue::Ordered(q) => q.len(),
            ElementQueue::Segmented(q) => q.len(),
        }
    }
}
