//! A fixed-capacity set of in-flight attempt futures, indexed by the operator's slot ids.
//!
//! Owns: the attempt futures and their wake-ups. Compared with `FuturesUnordered` it allocates
//! nothing per record: the future storage and one waker per slot are allocated when the shard
//! starts, and a wake-up sets one bit in a shared bitmap.
//!
//! Invariants:
//! - a future is stored in place in a boxed slice that never reallocates, and is only ever
//!   dropped in place (`cancel`, completion), so the `Pin` promise holds;
//! - a slot is polled only when its bit was set since its last poll (or right after insertion);
//! - at most `capacity` futures exist at once.

use futures::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

struct ReadyBits {
    words: Box<[AtomicU64]>,
    parent: AtomicWaker,
}

struct SlotWaker {
    slot: u32,
    ready: Arc<ReadyBits>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let word = &self.ready.words[(self.slot / 64) as usize];
        let previous = word.fetch_or(1 << (self.slot % 64), Ordering::AcqRel);
        // Only the 0 -> non-zero transition needs to wake the operator: a non-zero word is
        // still waiting to be drained by it.
        if previous == 0 {
            self.ready.parent.wake();
        }
    }
}

/// See the module documentation.
pub(crate) struct InFlightSet<Fut> {
    futures: Box<[Option<Fut>]>,
    wakers: Box<[Waker]>,
    ready: Arc<ReadyBits>,
    len: usize,
}

impl<Fut: Future> InFlightSet<Fut> {
    pub(crate) fn new(capacity: usize) -> Self {
        let words = capacity.div_ceil(64);
        let ready = Arc::new(ReadyBits {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            parent: AtomicWaker::new(),
        });
        let wakers = (0..capacity)
            .map(|slot| {
                Waker::from(Arc::new(SlotWaker {
                    slot: slot as u32,
                    ready: ready.clone(),
                }))
            })
            .collect();
        InFlightSet {
            futures: (0..capacity).map(|_| None).collect(),
            wakers,
            ready,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Stores `fut` in `slot` and polls it once. Returns its output if it was ready at once.
    pub(crate) fn insert_and_poll(&mut self, slot: u32, fut: Fut) -> Option<Fut::Output> {
        let place = &mut self.futures[slot as usize];
        assert!(place.is_none(), "slot {slot} already holds an attempt");
        *place = Some(fut);
        self.len += 1;
        self.poll_slot(slot)
    }

    /// Drops the attempt in `slot`, if any (a timeout cancels it).
    pub(crate) fn cancel(&mut self, slot: u32) {
        let place = &mut self.futures[slot as usize];
        if place.is_some() {
            // Assignment drops the future in place: it is never moved.
            *place = None;
            self.len -= 1;
        }
    }

    /// Registers the operator's waker, then polls every slot that was woken, handing each
    /// finished attempt to `on_ready`. Returns how many finished.
    pub(crate) fn poll_woken(
        &mut self,
        cx: &mut Context<'_>,
        mut on_ready: impl FnMut(u32, Fut::Output),
    ) -> usize {
        self.ready.parent.register(cx.waker());
        let mut finished = 0;
        for w in 0..self.ready.words.len() {
            let mut bits = self.ready.words[w].swap(0, Ordering::AcqRel);
            while bits != 0 {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                let slot = w as u32 * 64 + bit;
                if let Some(out) = self.poll_slot(slot) {
                    finished += 1;
                    on_ready(slot, out);
                }
            }
        }
        finished
    }

    fn poll_slot(&mut self, slot: u32) -> Option<Fut::Output> {
        let place = &mut self.futures[slot as usize];
        // A stale wake-up for a slot that was cancelled or reused is harmless: an empty slot
        // is skipped, and a reused slot's new future tolerates a spurious poll.
        let fut = place.as_mut()?;
        let mut cx = Context::from_waker(&self.wakers[slot as usize]);
        // SAFETY: the future lives in `self.futures`, a boxed slice that is never reallocated,
        // and it is only dropped in place (assignment of `None`), never moved out.
        let pinned = unsafe { Pin::new_unchecked(fut) };
        match pinned.poll(&mut cx) {
            Poll::Ready(out) => {
                *place = None;
                self.len -= 1;
                Some(out)
            }
            Poll::Pending => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::oneshot;
    use futures::task::noop_waker;

    #[test]
    fn polls_only_woken_slots_and_frees_finished_ones() {
        let mut set = InFlightSet::new(130);
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let (tx_a, rx_a) = oneshot::channel::<u32>();
        let (tx_b, rx_b) = oneshot::channel::<u32>();
        assert!(set.insert_and_poll(3, rx_a).is_none());
        assert!(set.insert_and_poll(129, rx_b).is_none());
        assert_eq!(set.len(), 2);
        assert_eq!(set.poll_woken(&mut cx, |_, _| panic!("nothing woken")), 0);
        tx_b.send(9).unwrap();
        let mut seen = vec![];
        assert_eq!(
            set.poll_woken(&mut cx, |s, v| seen.push((s, v.unwrap()))),
            1
        );
        assert_eq!(seen, vec![(129, 9)]);
        set.cancel(3);
        assert_eq!(set.len(), 0);
        drop(tx_a);
        assert_eq!(set.poll_woken(&mut cx, |_, _| panic!("cancelled")), 0);
    }
}
