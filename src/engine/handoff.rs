//! Hand-over channels between a stage's threads: a flume channel whose two sides wait on
//! `Doorbell`s, rung after the channel's lock is released.
//!
//! Why not flume's own blocking and async waits: flume wakes a waiting receiver (a stream's
//! waker) or a blocked sender (when a receiver drains) while it still holds the channel's lock.
//! When the woken thread shares the core with the waker, it preempts it inside the lock, blocks
//! on the lock, and is woken a second time when the lock is released: four context switches per
//! hand-over instead of two (seen with `perf sched timehist` against Redis at 64 in flight,
//! docs/decisions/handoff-doorbells.md). Here the channel is only ever used with `try_send`,
//! `try_recv` and `drain`, which never block or register inside flume, and the waiting side is
//! woken by a doorbell after the operation has returned.
//!
//! Owns: one bounded channel and the two doorbells it rings. Invariants:
//! - every successful send rings `data` and every successful receive or non-empty drain rings
//!   `space`, each after the channel operation returned;
//! - a side waits only after arming its doorbell and then checking the channel again, so a
//!   ring between its check and its wait is never lost (the channel's lock orders that check
//!   against the other side's operation: if the check came first, the arming, made before it,
//!   is visible to the ring that follows the operation; if the operation came first, the check
//!   sees its effect, a disconnect included, since `try_recv` and `try_send` read it under
//!   the lock);
//! - dropping the sender rings `data` (the receiver then sees the disconnect) and dropping the
//!   receiver rings `space` (a waiting sender then gets its item back), each after the flume
//!   end is dropped;
//! - a full channel hands the item back; nothing is dropped.
//!
//! A doorbell has one waiter at a time: the producer (one for all shards' ingress space), a
//! shard (its own ingress data, its own egress space) or the consumer (one for all shards'
//! egress data).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// Wakes one armed waiter. Ringing an unarmed bell costs one atomic load.
#[derive(Default)]
pub(crate) struct Doorbell {
    armed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Doorbell {
    pub(crate) fn new() -> Arc<Doorbell> {
        Arc::new(Doorbell::default())
    }

    /// Arms the bell for `waker`. The caller then checks its condition again and waits only
    /// if it still does not hold.
    pub(crate) fn arm(&self, waker: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(PoisonError::into_inner);
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
        drop(slot);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Wakes the armed waiter, if any, and disarms the bell. Call after the change the waiter
    /// waits for, outside any lock the woken side takes.
    pub(crate) fn ring(&self) {
        if self.armed.load(Ordering::SeqCst) && self.armed.swap(false, Ordering::SeqCst) {
            let waker = self
                .waker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// The sending side. Not `Clone`: each channel has one sender.
pub(crate) struct Sender<T> {
    /// `None` only while dropping (so the drop can ring after the flume end is gone).
    tx: Option<flume::Sender<T>>,
    data: Arc<Doorbell>,
    space: Arc<Doorbell>,
}

/// The receiving side. Not `Clone`: each channel has one receiver.
pub(crate) struct Receiver<T> {
    rx: Option<flume::Receiver<T>>,
    data: Arc<Doorbell>,
    space: Arc<Doorbell>,
}

/// Why a `try_send` did not send; both hand the item back.
pub(crate) enum TrySendError<T> {
    Full(T),
    Disconnected(T),
}

/// A channel of `capacity` items (`None`: unbounded, for the deterministic simulation only).
/// The receiver waits on `data`, the sender on `space`; several channels may share a doorbell
/// when one thread waits on all of them.
pub(crate) fn channel<T>(
    capacity: Option<usize>,
    data: Arc<Doorbell>,
    space: Arc<Doorbell>,
) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = match capacity {
        Some(capacity) => flume::bounded(capacity),
        None => flume::unbounded(),
    };
    let sender = Sender {
        tx: Some(tx),
        data: data.clone(),
        space: space.clone(),
    };
    (
        sender,
        Receiver {
            rx: Some(rx),
            data,
            space,
        },
    )
}

impl<T> Sender<T> {
    fn tx(&self) -> &flume::Sender<T> {
        self.tx
            .as_ref()
            .expect("the sender is present until dropped")
    }

    /// Sends without waiting; rings the receiver's doorbell on success.
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        match self.tx().try_send(item) {
            Ok(()) => {
                self.data.ring();
                Ok(())
            }
            Err(flume::TrySendError::Full(item)) => Err(TrySendError::Full(item)),
            Err(flume::TrySendError::Disconnected(item)) => Err(TrySendError::Disconnected(item)),
        }
    }

    /// A send that waits: `Ok` once decided (sent, or `Err(item)` when the receiver is gone),
    /// `Err(item)` while the channel is full.
    fn try_decide(&self, item: T) -> Result<Result<(), T>, T> {
        match self.try_send(item) {
            Ok(()) => Ok(Ok(())),
            Err(TrySendError::Disconnected(item)) => Ok(Err(item)),
            Err(TrySendError::Full(item)) => Err(item),
        }
    }

    /// After a full channel: arms `space` for `waker`, then tries once more (the drain that
    /// made room may have come before the arming).
    fn arm_and_retry(&self, item: T, waker: &Waker) -> Result<Result<(), T>, T> {
        self.space.arm(waker);
        self.try_decide(item)
    }

    /// Sends, awaiting space. `Err` hands the item back when the receiver is gone.
    pub(crate) fn send(&self, item: T) -> SendFuture<'_, T> {
        SendFuture {
            sender: self,
            item: Some(item),
        }
    }

    /// Sends, parking this thread while the channel is full. `Err` hands the item back when
    /// the receiver is gone.
    pub(crate) fn send_blocking(&self, item: T) -> Result<(), T> {
        let mut item = match self.try_decide(item) {
            Ok(result) => return result,
            Err(full) => full,
        };
        let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
        loop {
            match self.arm_and_retry(item, &waker) {
                Ok(result) => return result,
                // Unparked by a ring, or spuriously: either way, try again.
                Err(back) => {
                    item = back;
                    std::thread::park();
                }
            }
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        drop(self.tx.take());
        self.data.ring();
    }
}

/// The future of [`Sender::send`].
pub(crate) struct SendFuture<'a, T> {
    sender: &'a Sender<T>,
    item: Option<T>,
}

impl<T> Unpin for SendFuture<'_, T> {}

impl<T> Future for SendFuture<'_, T> {
    type Output = Result<(), T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), T>> {
        let item = self.item.take().expect("polled after completion");
        let item = match self.sender.try_decide(item) {
            Ok(result) => return Poll::Ready(result),
            Err(full) => full,
        };
        match self.sender.arm_and_retry(item, cx.waker()) {
            Ok(result) => Poll::Ready(result),
            Err(item) => {
                self.item = Some(item);
                Poll::Pending
            }
        }
    }
}

impl<T> Receiver<T> {
    fn rx(&self) -> &flume::Receiver<T> {
        self.rx
            .as_ref()
            .expect("the receiver is present until dropped")
    }

    /// The channel's capacity (`None`: unbounded).
    pub(crate) fn capacity(&self) -> Option<usize> {
        self.rx().capacity()
    }

    /// Takes one item; rings the sender's doorbell on success. `Disconnected` only once the
    /// channel is empty and the sender is gone (decided under the channel's lock).
    pub(crate) fn try_recv(&self) -> Result<T, flume::TryRecvError> {
        let item = self.rx().try_recv()?;
        self.space.ring();
        Ok(item)
    }

    /// Moves every queued item into `into` in one lock; rings the sender's doorbell if it
    /// took any. Returns how many it took.
    pub(crate) fn drain_into(&self, into: &mut impl Extend<T>) -> usize {
        let drained = self.rx().drain();
        let taken = drained.len();
        into.extend(drained);
        if taken > 0 {
            self.space.ring();
        }
        taken
    }

    /// Arms the receiver's doorbell for `waker`; check the channel again before waiting.
    pub(crate) fn arm(&self, waker: &Waker) {
        self.data.arm(waker);
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        drop(self.rx.take());
        self.space.ring();
    }
}

/// Wakes a thread parked in [`Sender::send_blocking`].
struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pair(capacity: usize) -> (Sender<u32>, Receiver<u32>) {
        channel(Some(capacity), Doorbell::new(), Doorbell::new())
    }

    #[test]
    fn a_full_channel_hands_the_item_back() {
        let (tx, rx) = pair(1);
        assert!(tx.try_send(1).is_ok());
        assert!(matches!(tx.try_send(2), Err(TrySendError::Full(2))));
        assert_eq!(rx.try_recv().ok(), Some(1));
        assert!(tx.try_send(3).is_ok());
        drop(rx);
        assert!(matches!(tx.try_send(4), Err(TrySendError::Disconnected(4))));
    }

    #[test]
    fn a_blocked_sender_is_woken_by_a_drain_and_loses_nothing() {
        let (tx, rx) = pair(2);
        let sender = std::thread::spawn(move || {
            for i in 0..1000 {
                tx.send_blocking(i).expect("the receiver is alive");
            }
        });
        let mut got = Vec::new();
        while got.len() < 1000 {
            if rx.drain_into(&mut got) == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        sender.join().unwrap();
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn a_blocked_sender_gets_its_item_back_when_the_receiver_is_dropped() {
        let (tx, rx) = pair(1);
        tx.try_send(1).ok().unwrap();
        let sender = std::thread::spawn(move || tx.send_blocking(2));
        std::thread::sleep(Duration::from_millis(20));
        drop(rx);
        assert_eq!(sender.join().unwrap(), Err(2));
    }

    /// The next item, waiting on the doorbell; `None` once the sender is gone.
    fn recv_next(rx: &Receiver<u32>) -> Option<u32> {
        futures::executor::block_on(std::future::poll_fn(|cx| {
            let mut armed = false;
            loop {
                match rx.try_recv() {
                    Ok(v) => return Poll::Ready(Some(v)),
                    Err(flume::TryRecvError::Disconnected) => return Poll::Ready(None),
                    Err(flume::TryRecvError::Empty) if armed => return Poll::Pending,
                    Err(flume::TryRecvError::Empty) => {
                        rx.arm(cx.waker());
                        armed = true;
                    }
                }
            }
        }))
    }

    #[test]
    fn an_armed_receiver_is_woken_by_each_send_and_by_the_senders_drop() {
        let (tx, rx) = pair(4);
        let receiver = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(v) = recv_next(&rx) {
                got.push(v);
            }
            got
        });
        for i in 0..20 {
            // Slow enough that the receiver is usually waiting when the item arrives.
            std::thread::sleep(Duration::from_micros(500));
            tx.send_blocking(i).ok().unwrap();
        }
        drop(tx);
        assert_eq!(receiver.join().unwrap(), (0..20).collect::<Vec<_>>());
    }
}
