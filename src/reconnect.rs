//! The driver of a connection that reconnects (the Redis and PostgreSQL clients' connections):
//! connect, run until the connection ends, and after a failure let the connection fail what
//! must fail, wait, and connect again, until the client closes it.
//!
//! Owns: the loop and its backoff. Invariants:
//! - the wait before an attempt starts at `Backoff::initial` after a connection that was up,
//!   and doubles after each failed connect, up to `Backoff::max`;
//! - the driver exits as soon as the connection says it was closed (a session ended by the
//!   client, or a status change refused because the client closed it), and never sleeps
//!   after that.

use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

/// The wait between connect attempts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

impl Backoff {
    /// From the client's settings (a `max` below `initial` is `initial`).
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
        }
    }
}

/// How one session of a connection ended.
pub(crate) enum Ended<E> {
    /// The client closed the connection: the driver exits.
    Closed,
    /// The connect attempt failed (nothing was written on it).
    ConnectFailed(E),
    /// The connection broke after it was up.
    Lost(E),
}

/// What a connection gives its driver.
pub(crate) trait Reconnect {
    type Error;

    /// Connects, says it is up (`Ended::Closed` if the client closed it meanwhile), and runs
    /// the connection until it ends.
    fn session(self: &Rc<Self>) -> impl Future<Output = Ended<Self::Error>>;

    /// After a failed session: records why and fails the requests that must fail. `false`
    /// when the client closed the connection.
    fn failed(&self, ended: Ended<Self::Error>) -> bool;

    /// Before the next attempt, after the wait. `false` when the client closed the connection.
    fn connecting(&self) -> bool;
}

/// Runs `connection` until its client closes it; see the module documentation.
pub(crate) async fn drive<C: Reconnect>(connection: Rc<C>, backoff: Backoff) {
    let mut delay = backoff.initial;
    loop {
        let ended = connection.session().await;
        let wait = match &ended {
            Ended::Closed => return,
            Ended::Lost(_) => backoff.initial,
            Ended::ConnectFailed(_) => delay,
        };
        if !connection.failed(ended) {
            return;
        }
        glommio::timer::sleep(wait).await;
        delay = (wait * 2).min(backoff.max);
        if !connection.connecting() {
            return;
        }
    }
}
