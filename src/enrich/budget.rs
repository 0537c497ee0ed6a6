//! `Budget`: the bytes a run of `sluice enrich` holds, and the wait that keeps them bounded.
//!
//! Owns: the byte count of lines between the reader's push and the writer's handling, plus
//! the values their lookups found. Invariant: the reader pushes a line only while the count is
//! at most the limit (or nothing is held yet), so memory follows `--max-bytes-held`, not the
//! input's size or its values' sizes times the records in flight.

use super::record::{Line, Reservation};
use super::Stop;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// How long the reader waits at a time for the byte budget before looking at the stop flag.
const BUDGET_WAIT: Duration = Duration::from_millis(50);

/// The bytes a run holds (lines from the push until the writer handled them, and the values
/// their lookups found), and the limit above which the reader waits.
///
/// Each line reserves its own weight and the largest value seen so far (the estimate of its
/// value), and what its value has beyond that is added when it arrives; so the count is at
/// least the bytes held, and until a first lookup completes (no estimate yet) one line at a
/// time is let in. The count then stays under the limit plus one line's reservation, and
/// beyond that only by how much values outgrow the largest seen before them.
pub(crate) struct Budget {
    held: AtomicU64,
    peak: AtomicU64,
    limit: u64,
    /// The largest value seen, and whether any lookup completed.
    estimate: AtomicU64,
    known: AtomicBool,
    lock: Mutex<()>,
    released: Condvar,
}

impl Budget {
    pub(crate) fn new(limit: u64) -> Budget {
        Budget {
            held: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            limit,
            estimate: AtomicU64::new(0),
            known: AtomicBool::new(false),
            lock: Mutex::new(()),
            released: Condvar::new(),
        }
    }

    fn take(&self, bytes: u64) {
        let now = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// Reserves a line of `weight` bytes and its value's estimate.
    pub(crate) fn reserve(&self, weight: u64) -> Reservation {
        let for_value = self.estimate.load(Ordering::Relaxed);
        let held = Reservation {
            bytes: weight + for_value,
            for_value,
        };
        self.take(held.bytes);
        held
    }

    /// Reserves `line`'s weight and its value's estimate, and marks the line with it.
    pub(crate) fn hold(&self, line: &mut Line) -> Reservation {
        let held = self.reserve(weight(line));
        line.set_held(held);
        held
    }

    /// A lookup of a line that reserved `held` completed with a value of `bytes` (0: none).
    pub(crate) fn value_arrived(&self, held: Reservation, bytes: u64) {
        self.take(held.beyond(bytes));
        self.estimate.fetch_max(bytes, Ordering::Relaxed);
        if !self.known.swap(true, Ordering::Relaxed) {
            self.wake();
        }
    }

    /// The writer handled a line that held `bytes` (its reservation and its value).
    pub(crate) fn release(&self, bytes: u64) {
        let before = self.held.fetch_sub(
            bytes.min(self.held.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        if before > self.limit && before.saturating_sub(bytes) <= self.limit {
            self.wake();
        }
    }

    fn wake(&self) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.released.notify_all();
    }

    /// The most bytes held at once.
    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Whether a new line must wait: the bytes held are above the limit, or a line is held
    /// and no lookup completed yet.
    pub(crate) fn full(&self) -> bool {
        let held = self.held.load(Ordering::Relaxed);
        held > self.limit || (held > 0 && !self.known.load(Ordering::Relaxed))
    }

    /// Waits until the bytes held are at most the limit, or `stop` is raised.
    pub(crate) fn wait_for_room(&self, stop: &Stop) {
        while self.full() && !stop.requested() {
            let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            if self.full() {
                let _ = self.released.wait_timeout(guard, BUDGET_WAIT);
            }
        }
    }
}

/// What a line is taken to weigh in the budget: the bytes its parsed form holds (the line's
/// text and its fields' ranges), its key, and some bookkeeping.
pub(crate) fn weight(line: &Line) -> u64 {
    match line {
        Line::Record(r) => (r.fields.heap_bytes() + r.key.len() + 64) as u64,
        Line::Bad(b) => (b.text.len() + b.reason.len() + 64) as u64,
    }
}
