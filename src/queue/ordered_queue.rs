//! `OrderedQueue`: head-of-line emission (Flink's `OrderedStreamElementQueue`).
//!
//! Invariant: slots leave in exactly the order they were pushed; only a completed head leaves.

use std::collections::VecDeque;

pub(crate) struct OrderedQueue {
    order: VecDeque<u32>,
    completed: Box<[bool]>,
}

impl OrderedQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        OrderedQueue {
            order: VecDeque::with_capacity(capacity),
            completed: vec![false; capacity].into_boxed_slice(),
        }
    }

    pub(crate) fn push(&mut self, slot: u32) {
        assert!(
            self.order.len() < self.completed.len(),
            "ordered queue over capacity: the operator pushed without a free slot"
        );
        self.completed[slot as usize] = false;
        self.order.push_back(slot);
    }

    pub(crate) fn on_complete(&mut self, slot: u32) {
        self.completed[slot as usize] = true;
    }

    pub(crate) fn pop(&mut self) -> Option<u32> {
        let head = *self.order.front()?;
        if !self.completed[head as usize] {
            return None;
        }
        self.completed[head as usize] = false;
        self.order.pop_front()
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_of_line_blocks_completed_followers() {
        let mut q = OrderedQueue::new(3);
        q.push(2);
        q.push(0);
        q.push(1);
        q.on_complete(0);
        q.on_complete(1);
        assert_eq!(q.pop(), None, "head 2 not complete");
        q.on_complete(2);
        assert_eq!(
            (q.pop(), q.pop(), q.pop(), q.pop()),
            (Some(2), Some(0), Some(1), None)
        );
    }
}
