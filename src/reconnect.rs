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
use std::task::{Context, Poll};
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
    /// A connection that is up.
    type Io;

    /// Connects (the handshake included).
    fn connect(self: &Rc<Self>) -> impl Future<Output = Result<Self::Io, Self::Error>>;

    /// Runs the connection: `Ready(Ok)` when the client closed it, `Ready(Err)` when it broke.
    fn poll_io(io: &mut Self::Io, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>>;

    /// The connection is up. `false` when the client closed it meanwhile.
    fn connected(&self) -> bool;

    /// After a failed session: records why and fails the requests that must fail. `false`
    /// when the client closed the connection.
    fn failed(&self, ended: Ended<Self::Error>) -> bool;

    /// Before the next attempt, after the wait. `false` when the client closed the connection.
    fn connecting(&self) -> bool;
}

/// One session: connect, say so, run until the connection ends.
async fn session<C: Reconnect>(connection: &Rc<C>) -> Ended<C::Error> {
    let mut io = match connection.connect().await {
        Ok(io) => io,
        Err(e) => return Ended::ConnectFailed(e),
    };
    if !connection.connected() {
        return Ended::Closed;
    }
    match std::future::poll_fn(|cx| C::poll_io(&mut io, cx)).await {
        Ok(()) => Ended::Closed,
        Err(e) => Ended::Lost(e),
    }
}

/// Runs `connection` until its client closes it; see the module documentation.
pub(crate) async fn drive<C: Reconnect>(connection: Rc<C>, backoff: Backoff) {
    let mut delay = backoff.initial;
    loop {
        let ended = session(&connection).await;
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
