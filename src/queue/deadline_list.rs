//! `DeadlineList`: the deadlines of pending records, in insertion order.
//!
//! Every record gets the same timeout, so deadlines grow with insertion order and the earliest
//! pending deadline is always the head of this list: O(1) insert, O(1) removal on completion
//! (intrusive links per slot), and one operator timer instead of a timer per record (Flink
//! registers a processing-time timer per record).
//!
//! Invariants: deadlines along the list never decrease (asserted on insert); a slot is linked
//! at most once.

use super::NIL;
use std::time::Instant;

pub(crate) struct DeadlineList {
    prev: Box<[u32]>,
    next: Box<[u32]>,
    deadline: Box<[Option<Instant>]>,
    head: u32,
    tail: u32,
}

impl DeadlineList {
    pub(crate) fn new(capacity: usize) -> Self {
        DeadlineList {
            prev: vec![NIL; capacity].into_boxed_slice(),
            next: vec![NIL; capacity].into_boxed_slice(),
            deadline: vec![None; capacity].into_boxed_slice(),
            head: NIL,
            tail: NIL,
        }
    }

    pub(crate) fn push_back(&mut self, slot: u32, deadline: Instant) {
        let s = slot as usize;
        assert!(
            self.deadline[s].is_none(),
            "slot {slot} already has a deadline"
        );
        if self.tail != NIL {
            let tail_deadline = self.deadline[self.tail as usize].expect("tail is linked");
            assert!(
                tail_deadline <= deadline,
                "deadlines must not decrease in insertion order"
            );
            self.next[self.tail as usize] = slot;
        } else {
            self.head = slot;
        }
        self.prev[s] = self.tail;
        self.next[s] = NIL;
        self.deadline[s] = Some(deadline);
        self.tail = slot;
    }

    /// Unlinks `slot`; a slot without a deadline is left alone.
    pub(crate) fn remove(&mut self, slot: u32) {
        let s = slot as usize;
        if self.deadline[s].take().is_none() {
            return;
        }
        let (p, n) = (self.prev[s], self.next[s]);
        if p != NIL {
            self.next[p as usize] = n;
        } else {
            self.head = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        } else {
            self.tail = p;
        }
    }

    pub(crate) fn deadline(&self, slot: u32) -> Option<Instant> {
        self.deadline[slot as usize]
    }

    /// The earliest pending deadline and its slot.
    pub(crate) fn front(&self) -> Option<(u32, Instant)> {
        (self.head != NIL).then(|| {
            (
                self.head,
                self.deadline[self.head as usize].expect("linked"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn front_is_the_earliest_pending_deadline() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut d = DeadlineList::new(4);
        d.push_back(3, at(1));
        d.push_back(0, at(2));
        d.push_back(2, at(3));
        assert_eq!(d.front(), Some((3, at(1))));
        d.remove(0);
        d.remove(3);
        assert_eq!(d.front(), Some((2, at(3))));
        d.remove(2);
        d.remove(2);
        assert_eq!(d.front(), None);
        d.push_back(1, at(4));
        assert_eq!(d.front(), Some((1, at(4))));
    }
}
