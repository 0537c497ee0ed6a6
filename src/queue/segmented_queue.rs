//! `SegmentedQueue`: unordered emission between watermarks (Flink's
//! `UnorderedStreamElementQueue`), optionally in input order per key (`KeyOrdered`, as in
//! FLIP-519 and Confluent's parallel consumer KEY mode).
//!
//! A segment is the run of records between two watermarks, closed by the later watermark.
//! Only the front segment emits; its watermark leaves once all its records left, and then the
//! next segment starts to emit. A watermark that follows another with no record in between is
//! folded into the earlier one's slot, so consecutive watermarks create no empty segment,
//! unless the queue was sealed in between (a checkpoint barrier passed: the earlier watermark
//! is in the snapshot and must leave under its own sequence number).
//!
//! In keyed mode the records of one key form a chain across segments; a completed record joins
//! its segment's ready list only when it heads its chain, so same-key records leave in push
//! order while other keys pass freely.
//!
//! Invariants: only the front segment emits; a segment's watermark leaves after all its
//! records; `records_left` counts records pushed and not yet popped; every list is intrusive
//! over slot ids, so nothing allocates after creation (the key map is sized for `capacity`).

use super::{WatermarkPush, NIL};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

struct Segment {
    records_left: u32,
    ready_head: u32,
    ready_tail: u32,
    /// The watermark slot that closes this segment, or NIL while it is open.
    closing: u32,
}

#[derive(Clone, Copy)]
struct Chain {
    head: u32,
    tail: u32,
}

/// Keys are already hashes from the user's key function; mix them once more so that
/// low-entropy keys (small integers) spread well in the map.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, key: u64) {
        self.0 = (key ^ (key >> 31)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub(crate) struct SegmentedQueue {
    segments: VecDeque<Segment>,
    /// The number of `segments[0]`; segment numbers grow by one per segment.
    front_segment_no: u64,
    slot_segment: Box<[u64]>,
    next_ready: Box<[u32]>,
    completed: Box<[bool]>,
    keyed: bool,
    slot_key: Box<[u64]>,
    next_same_key: Box<[u32]>,
    chains: HashMap<u64, Chain, BuildHasherDefault<KeyHasher>>,
    len: usize,
    capacity: usize,
    /// The next watermark must not fold (see `seal`).
    sealed: bool,
}

impl SegmentedQueue {
    pub(crate) fn new(capacity: usize, keyed: bool) -> Self {
        SegmentedQueue {
            // Each segment holds at least one slot, plus one open segment.
            segments: VecDeque::with_capacity(capacity + 1),
            front_segment_no: 0,
            slot_segment: vec![0; capacity].into_boxed_slice(),
            next_ready: vec![NIL; capacity].into_boxed_slice(),
            completed: vec![false; capacity].into_boxed_slice(),
            keyed,
            slot_key: vec![0; if keyed { capacity } else { 0 }].into_boxed_slice(),
            next_same_key: vec![NIL; if keyed { capacity } else { 0 }].into_boxed_slice(),
            chains: HashMap::with_capacity_and_hasher(
                if keyed { capacity } else { 0 },
                Default::default(),
            ),
            len: 0,
            capacity,
            sealed: false,
        }
    }

    /// The next watermark does not fold into the last one.
    pub(crate) fn seal(&mut self) {
        self.sealed = true;
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push_record(&mut self, slot: u32, key: u64) {
        assert!(self.len < self.capacity, "segmented queue over capacity");
        self.sealed = false;
        let open = matches!(self.segments.back(), Some(s) if s.closing == NIL);
        if !open {
            self.segments.push_back(Segment {
                records_left: 0,
                ready_head: NIL,
                ready_tail: NIL,
                closing: NIL,
            });
        }
        let no = self.front_segment_no + self.segments.len() as u64 - 1;
        self.segments.back_mut().expect("pushed above").records_left += 1;
        let s = slot as usize;
        self.slot_segment[s] = no;
        self.next_ready[s] = NIL;
        self.completed[s] = false;
        self.len += 1;
        if self.keyed {
            self.slot_key[s] = key;
            self.next_same_key[s] = NIL;
            match self.chains.get_mut(&key) {
                Some(chain) => {
                    self.next_same_key[chain.tail as usize] = slot;
                    chain.tail = slot;
                }
                None => {
                    self.chains.insert(
                        key,
                        Chain {
                            head: slot,
                            tail: slot,
                        },
                    );
                }
            }
        }
    }

    pub(crate) fn push_watermark(&mut self, slot: u32) -> WatermarkPush {
        let sealed = std::mem::take(&mut self.sealed);
        match self.segments.back_mut() {
            // No record since the last watermark: fold into it.
            Some(last) if last.closing != NIL && !sealed => WatermarkPush::MergedInto(last.closing),
            Some(last) if last.closing == NIL => {
                last.closing = slot;
                self.len += 1;
                WatermarkPush::Took
            }
            // No segment, or a sealed closed one: the watermark closes an empty segment.
            _ => {
                self.segments.push_back(Segment {
                    records_left: 0,
                    ready_head: NIL,
                    ready_tail: NIL,
                    closing: slot,
                });
                self.len += 1;
                WatermarkPush::Took
            }
        }
    }

    pub(crate) fn on_complete(&mut self, slot: u32) {
        let s = slot as usize;
        assert!(!self.completed[s], "slot {slot} completed twice");
        self.completed[s] = true;
        let heads_chain = !self.keyed || self.chains[&self.slot_key[s]].head == slot;
        if heads_chain {
            self.append_ready(slot);
        }
    }

    pub(crate) fn pop(&mut self) -> Option<u32> {
        let front = self.segments.front_mut()?;
        if front.ready_head != NIL {
            let slot = front.ready_head;
            front.ready_head = self.next_ready[slot as usize];
            if front.ready_head == NIL {
                front.ready_tail = NIL;
            }
            front.records_left -= 1;
            self.completed[slot as usize] = false;
            self.len -= 1;
            if self.keyed {
                self.advance_chain(slot);
            }
            return Some(slot);
        }
        if front.records_left == 0 && front.closing != NIL {
            let watermark = front.closing;
            self.segments.pop_front();
            self.front_segment_no += 1;
            self.len -= 1;
            return Some(watermark);
        }
        None
    }

    fn advance_chain(&mut self, popped: u32) {
        let key = self.slot_key[popped as usize];
        let next = self.next_same_key[popped as usize];
        if next == NIL {
            self.chains.remove(&key);
            return;
        }
        self.chains
            .get_mut(&key)
            .expect("popped slot heads its chain")
            .head = next;
        if self.completed[next as usize] {
            self.append_ready(next);
        }
    }

    fn append_ready(&mut self, slot: u32) {
        let index = (self.slot_segment[slot as usize] - self.front_segment_no) as usize;
        let segment = &mut self.segments[index];
        if segment.ready_tail == NIL {
            segment.ready_head = slot;
        } else {
            self.next_ready[segment.ready_tail as usize] = slot;
        }
        segment.ready_tail = slot;
        self.next_ready[slot as usize] = NIL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_waits_for_its_segment_and_blocks_the_next() {
        let mut q = SegmentedQueue::new(8, false);
        q.push_record(0, 0);
        q.push_record(1, 0);
        assert_eq!(q.push_watermark(2), WatermarkPush::Took);
        q.push_record(3, 0);
        q.on_complete(3);
        q.on_complete(1);
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.pop(), None, "record 3 is behind the watermark");
        q.on_complete(0);
        assert_eq!(
            (q.pop(), q.pop(), q.pop(), q.pop()),
            (Some(0), Some(2), Some(3), None)
        );
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn consecutive_watermarks_fold_into_one_slot() {
        let mut q = SegmentedQueue::new(4, false);
        assert_eq!(q.push_watermark(0), WatermarkPush::Took);
        assert_eq!(q.push_watermark(1), WatermarkPush::MergedInto(0));
        q.push_record(1, 0);
        assert_eq!(q.push_watermark(2), WatermarkPush::Took);
        assert_eq!(q.pop(), Some(0));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn keyed_mode_keeps_order_per_key_only() {
        let mut q = SegmentedQueue::new(8, true);
        q.push_record(0, 7);
        q.push_record(1, 7);
        q.push_record(2, 9);
        q.on_complete(1);
        q.on_complete(2);
        assert_eq!(q.pop(), Some(2), "key 9 does not wait for key 7");
        assert_eq!(q.pop(), None, "slot 1 waits for slot 0 of the same key");
        q.on_complete(0);
        assert_eq!((q.pop(), q.pop(), q.pop()), (Some(0), Some(1), None));
    }
}
