//! Time for the operator: the real clock (glommio's io_uring timers) and a simulated clock that
//! moves only when a test moves it.
//!
//! Owns: the notion of "now" and the one timer an operator arms. Invariant: an operator holds a
//! single timer, re-armed to its earliest deadline, so timer cost is per wake-up, not per record.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A source of time and of a re-armable timer.
pub trait Clock: Clone + 'static {
    /// The operator's single timer.
    type Timer: Timer;
    /// The current time.
    fn now(&self) -> Instant;
    /// A new, unarmed timer. Called on the thread that will poll it.
    fn timer(&self) -> Self::Timer;
}

/// A timer that can be pointed at a new instant at any time.
pub trait Timer {
    /// Arms the timer for `at` (re-arming it if it pointed elsewhere) and polls it: ready once
    /// the clock has reached `at`, otherwise `cx` is woken when it does.
    fn poll_at(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()>;
}

/// Wall-clock time with glommio timers; only usable inside a glommio executor.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlommioClock;

impl Clock for GlommioClock {
    type Timer = GlommioTimer;
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn timer(&self) -> GlommioTimer {
        GlommioTimer {
            inner: None,
            armed_at: None,
        }
    }
}

/// See [`GlommioClock`].
pub struct GlommioTimer {
    inner: Option<glommio::timer::Timer>,
    armed_at: Option<Instant>,
}

impl Timer for GlommioTimer {
    fn poll_at(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let now = Instant::now();
            if now >= at {
                return Poll::Ready(());
            }
            // Re-arm only to wake *earlier*. The operator's deadlines grow with time, so a
            // timer armed for an earlier deadline stays armed: it fires early at most once per
            // timeout period and is re-armed then, instead of a timer reset per record.
            if self.armed_at.is_none_or(|armed| at < armed) {
                let wait = at - now;
                match &mut self.inner {
                    Some(t) => t.reset(wait),
                    None => self.inner = Some(glommio::timer::Timer::new(wait)),
                }
                self.armed_at = Some(at);
            }
            let timer = self.inner.as_mut().expect("armed above");
            match Pin::new(timer).poll(cx) {
                // Fired: spent until reset. If it fired for an earlier instant than `at`,
                // loop to re-arm for `at`.
                Poll::Ready(_) => self.armed_at = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A clock that moves only when the test calls [`SimClock::advance`]. Single-threaded.
#[derive(Clone)]
pub struct SimClock {
    state: Rc<SimState>,
}

struct SimState {
    now: Cell<Instant>,
    sleepers: RefCell<Vec<Waker>>,
}

impl Default for SimClock {
    fn default() -> Self {
        Self::new()
    }
}

impl SimClock {
    /// A clock standing at an arbitrary fixed origin.
    pub fn new() -> Self {
        SimClock {
            state: Rc::new(SimState {
                now: Cell::new(Instant::now()),
                sleepers: RefCell::new(Vec::new()),
            }),
        }
    }

    /// Moves time forward and wakes every sleeper so it can check its deadline.
    pub fn advance(&self, by: Duration) {
        self.state.now.set(self.state.now.get() + by);
        let sleepers = std::mem::take(&mut *self.state.sleepers.borrow_mut());
        for w in sleepers {
            w.wake();
        }
    }

    /// A future ready once the clock reaches `at`.
    pub fn sleep_until(&self, at: Instant) -> SimSleep {
        SimSleep {
            clock: self.clone(),
            at,
        }
    }

    /// A future ready once the clock moved `by` from now.
    pub fn sleep(&self, by: Duration) -> SimSleep {
        self.sleep_until(self.now() + by)
    }

    fn poll_until(&self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.now.get() >= at {
            Poll::Ready(())
        } else {
            self.state.sleepers.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        }
    }
}

impl Clock for SimClock {
    type Timer = SimTimer;
    fn now(&self) -> Instant {
        self.state.now.get()
    }
    fn timer(&self) -> SimTimer {
        SimTimer {
            clock: self.clone(),
        }
    }
}

/// See [`SimClock`].
pub struct SimTimer {
    clock: SimClock,
}

impl Timer for SimTimer {
    fn poll_at(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        self.clock.poll_until(at, cx)
    }
}

/// See [`SimClock::sleep_until`].
pub struct SimSleep {
    clock: SimClock,
    at: Instant,
}

impl Future for SimSleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.clock.poll_until(self.at, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker;

    #[test]
    fn sim_sleep_fires_only_when_advanced_past_deadline() {
        let clock = SimClock::new();
        let mut sleep = clock.sleep(Duration::from_millis(5));
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut sleep).poll(&mut cx).is_pending());
        clock.advance(Duration::from_millis(4));
        assert!(Pin::new(&mut sleep).poll(&mut cx).is_pending());
        clock.advance(Duration::from_millis(1));
        assert!(Pin::new(&mut sleep).poll(&mut cx).is_ready());
    }
}
