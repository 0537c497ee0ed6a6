//! `Connection`: one pipelined TCP connection to Redis on glommio (io_uring), driven by one
//! task that writes queued requests and reads replies.
//!
//! Owns: the socket, the outgoing bytes and a ring of reply slots. Requests are encoded into
//! `out` and get consecutive ids; replies arrive in request order (RESP has no ids), so reply
//! `n` completes slot `n % ring`. Invariants:
//! - `next_reply <= next_request <= next_reply + ring.len()`, and a request takes its slot
//!   only when the slot is free (its previous request answered and read), so the ring never
//!   overwrites a pending reply;
//! - a slot is completed once; a request whose future was dropped (a timeout) is `Abandoned`
//!   and its reply is discarded on arrival;
//! - when the connection breaks, every request handed to the socket and not answered fails
//!   with a retryable `ConnectionLost` (one attempt each), and the driver reconnects with
//!   exponential backoff; requests not yet handed to the socket, and those issued while it
//!   waits, wait for the next connect attempt instead of failing at once, so a reconnect does
//!   not burn a request's retries; a connect attempt that fails fails them (retryable
//!   `Connect`), and until a connect succeeds new requests fail at once with `Unavailable`
//!   (the server is not there: the caller's retry policy decides); no request waits longer
//!   than one backoff and one connect;
//! - a request whose slot is still taken (the ring is full of requests in flight or abandoned
//!   ones whose replies have not arrived, as against a stalled server) waits for a slot instead
//!   of failing: a stalled server shows as the caller's timeouts, never as an error about a
//!   limit the caller did not set;
//! - every answered request's time on the wire (handed to the socket -> its reply completed)
//!   goes into `wire_us`, so a caller can tell the server and network apart from its own
//!   queueing;
//! - a driver turn writes what was queued before it completes anything, and completes replies
//!   worth at most `max(weight in flight / reply_split, MIN_REPLIES_PER_TURN)`, a request
//!   weighing what its caller said it carries (the keys of an `MGET`; 1 for other commands),
//!   so the split means the same share of the work whether a window is 64 `GET`s or four
//!   `MGET`s of 16; when it stops with replies still buffered it wakes itself, so buffered
//!   replies are never left without a turn;
//! - `weight_in_flight` is the sum of the weights of the requests holding a slot and not yet
//!   answered.

use super::error::RedisError;
use super::reply::{decode, Protocol, Reply};
use super::tracking::Invalidations;
use super::{Endpoint, Server};
use crate::reconnect::{Ended, Reconnect};
use futures::io::{AsyncRead, AsyncWrite};
use glommio::net::{TcpStream, UnixStream};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

const READ_CHUNK: usize = 64 * 1024;

/// The fewest replies a driver turn completes (when that many are there). Smaller windows are
/// not split: each turn costs the caller a wake-up (a `Stage` hands a batch to its consumer
/// thread per turn), and against a server with a real delay, splitting 8 in flight in 4 turns
/// doubled the stage's CPU per record for nothing (docs/decisions/reply-split.md).
const MIN_REPLIES_PER_TURN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    /// Connecting (at start or after a backoff): requests queue up.
    Connecting,
    Connected,
    /// Waiting to reconnect after the connection broke (why): requests queue up for the
    /// next connect attempt.
    Down(String),
    /// Waiting to reconnect after a connect attempt failed (why): the server is not there, so
    /// requests fail at once until a connect succeeds.
    Unreachable(String),
    /// The client was dropped: the driver exits.
    Closed,
}

enum Slot {
    Free,
    Waiting(Option<Waker>),
    Done(Result<Reply, RedisError>),
    Abandoned,
}

struct State {
    status: Status,
    out: Vec<u8>,
    ring: Box<[Slot]>,
    next_request: u64,
    next_reply: u64,
    /// The first request not yet handed to the socket.
    next_unsent: u64,
    /// When each slot's request was handed to the socket.
    sent_at: Box<[Instant]>,
    /// Each slot's request's weight, and their sum over the requests not yet answered.
    weights: Box<[u32]>,
    weight_in_flight: usize,
    wire_us: hdrhistogram::Histogram<u64>,
    driver: Option<Waker>,
    /// Requests waiting for a free slot, woken when one frees.
    slot_waiters: Vec<Waker>,
}

impl State {
    /// Frees slot `index`, and wakes the requests waiting for one.
    fn free(&mut self, index: usize) {
        self.ring[index] = Slot::Free;
        for w in self.slot_waiters.drain(..) {
            w.wake();
        }
    }
}

pub(crate) struct Connection {
    endpoint: Rc<Endpoint>,
    /// With TLS: its configuration, or why it could not be made (each connect attempt then
    /// fails with that reason).
    tls: Option<Result<Arc<rustls::ClientConfig>, String>>,
    reply_split: usize,
    /// With client tracking: where the server's invalidations go (the connection then says
    /// `HELLO 3` and `CLIENT TRACKING ON` on every connect, and reads RESP3).
    tracking: Option<Rc<Invalidations>>,
    state: RefCell<State>,
}

impl Connection {
    /// A connection to `addr` whose driver must be spawned with `reconnect::drive`.
    /// At most `in flight / reply_split` replies (at least `MIN_REPLIES_PER_TURN`) are
    /// completed per turn of the driver (see `Io::poll`); 1 completes all that arrived.
    pub(crate) fn new(
        endpoint: Rc<Endpoint>,
        max_in_flight: usize,
        reply_split: usize,
        tracking: Option<Rc<Invalidations>>,
    ) -> Rc<Connection> {
        Rc::new(Connection {
            tls: endpoint.tls.as_ref().map(super::tls::client_config),
            endpoint,
            reply_split: reply_split.max(1),
            tracking,
            state: RefCell::new(State {
                status: Status::Connecting,
                out: Vec::with_capacity(READ_CHUNK),
                ring: (0..max_in_flight.max(1)).map(|_| Slot::Free).collect(),
                next_request: 0,
                next_reply: 0,
                next_unsent: 0,
                sent_at: vec![Instant::now(); max_in_flight.max(1)].into_boxed_slice(),
                weights: vec![1; max_in_flight.max(1)].into_boxed_slice(),
                weight_in_flight: 0,
                wire_us: wire_histogram(),
                driver: None,
                slot_waiters: Vec::new(),
            }),
        })
    }

    /// Time on the wire of every answered request so far, in microseconds.
    pub(crate) fn wire_latency(&self) -> hdrhistogram::Histogram<u64> {
        self.state.borrow().wire_us.clone()
    }

    pub(crate) fn in_flight(&self) -> usize {
        let st = self.state.borrow();
        (st.next_request - st.next_reply) as usize
    }

    /// Queues a command weighing `weight` in the reply split (the keys it looks up); the
    /// returned future resolves with its reply.
    pub(crate) fn send(self: &Rc<Self>, args: &[&[u8]], weight: u32) -> ReplyFuture {
        let mut command = Vec::new();
        let queued = {
            let mut st = self.state.borrow_mut();
            if let Some(error) = self.refusal(&st.status) {
                return ReplyFuture::failed(error);
            }
            match self.take_slot(&mut st, weight, |out| encode_command(out, args)) {
                Some(id) => Inner::Pending {
                    conn: self.clone(),
                    id,
                },
                None => {
                    encode_command(&mut command, args);
                    Inner::Queued {
                        conn: self.clone(),
                        command,
                        weight,
                    }
                }
            }
        };
        ReplyFuture { inner: queued }
    }

    /// Why a request cannot be queued now, if it cannot.
    fn refusal(&self, status: &Status) -> Option<RedisError> {
        let reason = match status {
            Status::Closed => "the client was closed".to_string(),
            Status::Unreachable(reason) => reason.clone(),
            Status::Connecting | Status::Connected | Status::Down(_) => return None,
        };
        Some(RedisError::Unavailable {
            addr: self.endpoint.server.clone(),
            reason,
        })
    }

    /// Takes the next request's slot if it is free: `encode` appends the command to the
    /// outgoing bytes, and the request's id is returned.
    fn take_slot(
        &self,
        st: &mut State,
        weight: u32,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Option<u64> {
        let limit = st.ring.len() as u64;
        let id = st.next_request;
        let index = (id % limit) as usize;
        // The slot is busy while its earlier request is in flight, or answered but not yet
        // read by its future.
        if !matches!(st.ring[index], Slot::Free) {
            return None;
        }
        encode(&mut st.out);
        st.next_request += 1;
        st.ring[index] = Slot::Waiting(None);
        let weight = weight.max(1);
        st.weights[index] = weight;
        st.weight_in_flight += weight as usize;
        if let Some(w) = &st.driver {
            w.wake_by_ref();
        }
        Some(id)
    }

    /// Marks the connection closed and wakes its driver so it exits.
    pub(crate) fn close(&self) {
        let mut st = self.state.borrow_mut();
        st.status = Status::Closed;
        if let Some(w) = st.driver.take() {
            w.wake();
        }
    }

    /// Fails the requests handed to the socket and not answered, and with `queued` also those
    /// not yet handed to it (else they stay queued for the next connection, whose first reply
    /// answers the first of them).
    fn fail_pending(&self, error: RedisError, queued: bool) {
        let mut st = self.state.borrow_mut();
        if queued {
            st.next_unsent = st.next_request;
            st.out.clear();
        }
        let limit = st.ring.len() as u64;
        let mut freed = false;
        for id in st.next_reply..st.next_unsent {
            let weight = st.weights[(id % limit) as usize] as usize;
            st.weight_in_flight -= weight;
            let slot = &mut st.ring[(id % limit) as usize];
            *slot = match std::mem::replace(slot, Slot::Free) {
                Slot::Waiting(waker) => {
                    if let Some(w) = waker {
                        w.wake();
                    }
                    Slot::Done(Err(error.clone()))
                }
                _ => {
                    freed = true;
                    Slot::Free
                }
            };
        }
        st.next_reply = st.next_unsent;
        if freed {
            for w in st.slot_waiters.drain(..) {
                w.wake();
            }
        }
    }

    fn set_status(&self, status: Status) -> bool {
        let mut st = self.state.borrow_mut();
        if st.status == Status::Closed {
            return false;
        }
        st.status = status;
        true
    }
}

impl Connection {
    /// Connects, and with client tracking says `HELLO 3` and `CLIENT TRACKING ON` before any
    /// request: a server that refuses either fails the connect attempt with its answer.
    async fn open(self: &Rc<Self>) -> Result<Io, RedisError> {
        let failed = |reason: String| RedisError::Connect {
            addr: self.endpoint.server.clone(),
            reason,
        };
        let refused = |reason: String| RedisError::Refused {
            addr: self.endpoint.server.clone(),
            reason,
        };
        let stream = match &self.endpoint.server {
            Server::Tcp(addr) => {
                let stream = TcpStream::connect(*addr)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                let _ = stream.set_nodelay(true);
                match &self.tls {
                    None => Stream::Tcp(stream),
                    Some(config) => {
                        let config = config.clone().map_err(&refused)?;
                        let name =
                            super::tls::server_name(&self.endpoint.host).map_err(&refused)?;
                        let tls = futures_rustls::TlsConnector::from(config)
                            .connect(name, stream)
                            .await
                            .map_err(|e| refused(format!("TLS handshake: {e}")))?;
                        Stream::Tls(Box::new(tls))
                    }
                }
            }
            Server::Unix(_) if self.tls.is_some() => {
                return Err(refused("TLS over a unix socket is not supported".into()))
            }
            Server::Unix(path) => Stream::Unix(
                UnixStream::connect(path)
                    .await
                    .map_err(|e| failed(e.to_string()))?,
            ),
        };
        let mut io = Io {
            conn: self.clone(),
            stream,
            writing: Vec::with_capacity(READ_CHUNK),
            written: 0,
            read: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            protocol: Protocol::Resp2,
        };
        let mut commands = self.endpoint.login();
        if self.tracking.is_some() {
            io.protocol = Protocol::Resp3;
            let why = "(for client tracking, which needs Redis 6 or newer)";
            commands.push((
                format!("HELLO 3 {why}"),
                vec![b"HELLO".to_vec(), b"3".to_vec()],
            ));
            commands.push((
                format!("CLIENT TRACKING ON {why}"),
                vec![b"CLIENT".to_vec(), b"TRACKING".to_vec(), b"ON".to_vec()],
            ));
        }
        if !commands.is_empty() {
            io.handshake(&commands)
                .await
                .map_err(|(command, reason)| refused(format!("{command}: {reason}")))?;
        }
        Ok(io)
    }
}

/// An empty histogram with the bounds of every wire-time histogram (so they can be added).
pub(crate) fn wire_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Appends `args` as a RESP2 array of bulk strings.
///
/// Hand-written on purpose: `redis-protocol`'s encoder sizes integers with a floating-point
/// `log10`, and encoding took ~17% of the client's CPU in the profile in
/// docs/decisions/cpu-at-64-in-flight.md.
/// A command is `*N\r\n` then `$len\r\narg\r\n` per argument (replies are decoded by
/// `reply::decode_reply`, hand-written too). `tests/resp_decoder.rs` checks this encoder
/// against the crate's.
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    fn header(out: &mut Vec<u8>, kind: u8, n: usize) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n;
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        out.push(kind);
        out.extend_from_slice(&digits[i..]);
        out.extend_from_slice(b"\r\n");
    }
    header(out, b'*', args.len());
    for arg in args {
        header(out, b'$', arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// A connection's socket: TCP, or a unix socket.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<futures_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_close(cx),
            Stream::Unix(s) => Pin::new(s).poll_close(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}

pub(crate) struct Io {
    conn: Rc<Connection>,
    stream: Stream,
    writing: Vec<u8>,
    written: usize,
    read: Vec<u8>,
    start: usize,
    end: usize,
    protocol: Protocol,
}

impl Io {
    /// Sends `commands` and reads their replies before any request: the connection's set-up
    /// (`AUTH`, `SELECT`, `HELLO 3`). Each command comes with how errors name it (never with a
    /// password). On failure, that name and why.
    async fn handshake(
        &mut self,
        commands: &[(String, Vec<Vec<u8>>)],
    ) -> Result<(), (String, String)> {
        use futures::io::{AsyncReadExt, AsyncWriteExt};
        let mut out = Vec::new();
        for (_, c) in commands {
            let args: Vec<&[u8]> = c.iter().map(Vec::as_slice).collect();
            encode_command(&mut out, &args);
        }
        let all = || {
            let names: Vec<&str> = commands.iter().map(|(n, _)| n.as_str()).collect();
            names.join(", ")
        };
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| (all(), e.to_string()))?;
        for (name, _) in commands {
            let name = || name.clone();
            loop {
                match decode(&self.read[self.start..self.end], self.protocol) {
                    Ok(Some((Ok(Reply::Push(_)), used))) => self.start += used,
                    Ok(Some((Ok(_), used))) => {
                        self.start += used;
                        break;
                    }
                    Ok(Some((Err(e), _))) => return Err((name(), e.to_string())),
                    Err(reason) => return Err((name(), reason)),
                    Ok(None) => {
                        if self.end == self.read.len() {
                            return Err((name(), "the reply is too long".into()));
                        }
                        match self.stream.read(&mut self.read[self.end..]).await {
                            Ok(0) => {
                                return Err((name(), "the server closed the connection".into()))
                            }
                            Ok(n) => self.end += n,
                            Err(e) => return Err((name(), e.to_string())),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn broken(&self, reason: impl std::fmt::Display) -> RedisError {
        RedisError::ConnectionLost {
            addr: self.conn.endpoint.server.clone(),
            reason: reason.to_string(),
        }
    }

    /// One driver turn. Over 70 lines: connect, write, read and complete are one state
    /// machine over the connection's borrowed state, on the per-request path; the order of the
    /// steps (write what completions issued before reading more) is the design, kept in view.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RedisError>> {
        {
            let mut st = self.conn.state.borrow_mut();
            if st.status == Status::Closed {
                return Poll::Ready(Ok(()));
            }
            if !st.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                st.driver = Some(cx.waker().clone());
            }
        }
        // Write everything queued; requests queued while a write is pending go out together.
        loop {
            if self.written == self.writing.len() {
                self.writing.clear();
                self.written = 0;
                let mut st = self.conn.state.borrow_mut();
                std::mem::swap(&mut self.writing, &mut st.out);
                if self.writing.is_empty() {
                    break;
                }
                let (now, limit) = (Instant::now(), st.ring.len() as u64);
                for id in st.next_unsent..st.next_request {
                    st.sent_at[(id % limit) as usize] = now;
                }
                st.next_unsent = st.next_request;
            }
            match Pin::new(&mut self.stream).poll_write(cx, &self.writing[self.written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(self.broken("the socket accepted no bytes")))
                }
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.broken(e))),
                Poll::Pending => break,
            }
        }
        // Complete replies already buffered, then read more. At most 1/`reply_split` of the
        // requests in flight (but at least `MIN_REPLIES_PER_TURN`) are completed per poll:
        // the driver then yields, so their futures' owners issue the next requests, which the
        // next poll writes before completing more. The server then works on those while this
        // side handles the rest of the batch, instead of the two sides taking turns on whole
        // windows (docs/decisions/reply-split.md).
        let mut budget = {
            let st = self.conn.state.borrow();
            (st.weight_in_flight / self.conn.reply_split).max(MIN_REPLIES_PER_TURN)
        };
        loop {
            match self.complete_replies(&mut budget) {
                Err(e) => return Poll::Ready(Err(e)),
                Ok(true) => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Ok(false) => {}
            }
            if self.end == self.read.len() {
                if self.start > 0 {
                    self.read.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                } else {
                    // One reply larger than the buffer: grow it.
                    self.read.resize(self.read.len() * 2, 0);
                }
            }
            match Pin::new(&mut self.stream).poll_read(cx, &mut self.read[self.end..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(self.broken("the server closed the connection")))
                }
                Poll::Ready(Ok(n)) => self.end += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.broken(e))),
                Poll::Pending => break,
            }
        }
        Poll::Pending
    }

    /// Completes buffered replies until the buffer holds no whole reply or `budget` runs out;
    /// returns whether it ran out with a whole reply possibly left.
    fn complete_replies(&mut self, budget: &mut usize) -> Result<bool, RedisError> {
        let mut st = self.conn.state.borrow_mut();
        let limit = st.ring.len() as u64;
        let now = Instant::now();
        loop {
            if *budget == 0 {
                return Ok(self.start < self.end);
            }
            let (result, used) = match decode(&self.read[self.start..self.end], self.protocol) {
                Ok(Some((Ok(Reply::Push(message)), used))) => {
                    // Out of band: answers no request.
                    self.start += used;
                    if let Some(t) = &self.conn.tracking {
                        t.push(message);
                    }
                    continue;
                }
                Ok(Some(found)) => found,
                Ok(None) => break,
                Err(reason) => {
                    return Err(RedisError::Protocol {
                        addr: self.conn.endpoint.server.clone(),
                        reason,
                    })
                }
            };
            if st.next_reply == st.next_request {
                return Err(RedisError::Protocol {
                    addr: self.conn.endpoint.server.clone(),
                    reason: "a reply arrived with no request pending".into(),
                });
            }
            self.start += used;
            let id = st.next_reply;
            let weight = st.weights[(id % limit) as usize] as usize;
            *budget = budget.saturating_sub(weight);
            st.weight_in_flight -= weight;
            st.next_reply += 1;
            debug_assert!(st.next_reply < st.next_request || st.weight_in_flight == 0);
            let wire = now.saturating_duration_since(st.sent_at[(id % limit) as usize]);
            st.wire_us.saturating_record(wire.as_micros() as u64);
            let index = (id % limit) as usize;
            match std::mem::replace(&mut st.ring[index], Slot::Free) {
                Slot::Waiting(waker) => {
                    if let Some(w) = waker {
                        w.wake();
                    }
                    st.ring[index] = Slot::Done(result);
                }
                Slot::Abandoned => st.free(index),
                Slot::Free | Slot::Done(_) => panic!("reply {id} completes a slot twice"),
            }
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(false)
    }
}

enum Inner {
    Failed(Option<RedisError>),
    /// Waiting for a free slot, with the command encoded.
    Queued {
        conn: Rc<Connection>,
        command: Vec<u8>,
        weight: u32,
    },
    Pending {
        conn: Rc<Connection>,
        id: u64,
    },
    Finished,
}

/// The reply to one request. Dropping it before it resolves abandons the request: its reply
/// is discarded when it arrives.
pub struct ReplyFuture {
    inner: Inner,
}

impl ReplyFuture {
    fn failed(error: RedisError) -> Self {
        ReplyFuture {
            inner: Inner::Failed(Some(error)),
        }
    }
}

impl Future for ReplyFuture {
    type Output = Result<Reply, RedisError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Inner::Queued {
            conn,
            command,
            weight,
        } = &mut self.inner
        {
            let conn = conn.clone();
            let mut st = conn.state.borrow_mut();
            if let Some(error) = conn.refusal(&st.status) {
                drop(st);
                self.inner = Inner::Finished;
                return Poll::Ready(Err(error));
            }
            match conn.take_slot(&mut st, *weight, |out| out.extend_from_slice(command)) {
                Some(id) => {
                    drop(st);
                    self.inner = Inner::Pending {
                        conn: conn.clone(),
                        id,
                    };
                }
                None => {
                    st.slot_waiters.push(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
        let result = match &mut self.inner {
            Inner::Failed(e) => Err(e.take().expect("polled after completion")),
            Inner::Queued { .. } => unreachable!("taken a slot above"),
            Inner::Pending { conn, id } => {
                let mut st = conn.state.borrow_mut();
                let limit = st.ring.len() as u64;
                let slot = &mut st.ring[(*id % limit) as usize];
                match slot {
                    Slot::Waiting(waker) => {
                        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *waker = Some(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                    Slot::Done(_) => {
                        let index = (*id % limit) as usize;
                        match std::mem::replace(&mut st.ring[index], Slot::Free) {
                            Slot::Done(r) => {
                                st.free(index);
                                r
                            }
                            _ => unreachable!(),
                        }
                    }
                    Slot::Free | Slot::Abandoned => panic!("request {id} lost its reply slot"),
                }
            }
            Inner::Finished => panic!("ReplyFuture polled after completion"),
        };
        self.inner = Inner::Finished;
        Poll::Ready(result)
    }
}

impl Drop for ReplyFuture {
    fn drop(&mut self) {
        if let Inner::Pending { conn, id } = &self.inner {
            let Ok(mut st) = conn.state.try_borrow_mut() else {
                return;
            };
            let limit = st.ring.len() as u64;
            let index = (*id % limit) as usize;
            match std::mem::replace(&mut st.ring[index], Slot::Free) {
                Slot::Waiting(_) => st.ring[index] = Slot::Abandoned,
                // Completed but never read: the slot is free again.
                _ => st.free(index),
            }
        }
    }
}

/// The driver (`reconnect::drive`). A failed connect (refused included) is the attempt of every
/// request waiting for it, and requests fail at once until a connect succeeds; a connection
/// that broke costs only the requests on the wire an attempt, and the others wait for the
/// reconnect. With client tracking, the cache forgets everything when a connection ends: what
/// the server said was written while it tracked may be lost with it.
impl Reconnect for Connection {
    type Error = RedisError;

    type Io = Io;

    fn connect(self: &Rc<Self>) -> impl std::future::Future<Output = Result<Io, RedisError>> {
        self.open()
    }

    fn poll_io(io: &mut Io, cx: &mut Context<'_>) -> Poll<Result<(), RedisError>> {
        io.poll(cx)
    }

    fn connected(&self) -> bool {
        self.set_status(Status::Connected)
    }

    fn failed(&self, ended: Ended<RedisError>) -> bool {
        let failure = match ended {
            Ended::Closed => return false,
            Ended::ConnectFailed(e) | Ended::Lost(e) => e,
        };
        if let Some(t) = &self.tracking {
            t.flush_all();
        }
        let reason = failure.to_string();
        let lost = match failure {
            RedisError::Connect { .. }
            | RedisError::Refused { .. }
            | RedisError::Protocol { .. }
            | RedisError::ConnectionLost { .. } => failure,
            other => RedisError::ConnectionLost {
                addr: self.endpoint.server.clone(),
                reason: other.to_string(),
            },
        };
        let connect_failed = matches!(
            lost,
            RedisError::Connect { .. } | RedisError::Refused { .. }
        );
        let status = if connect_failed {
            Status::Unreachable(reason)
        } else {
            Status::Down(reason)
        };
        if !self.set_status(status) {
            return false;
        }
        self.fail_pending(lost, connect_failed);
        true
    }

    fn connecting(&self) -> bool {
        self.set_status(Status::Connecting)
    }
}
