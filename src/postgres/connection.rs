//! `Connection`: one pipelined connection to PostgreSQL on glommio (io_uring), driven by one
//! task that writes queued lookups and reads their rows.
//!
//! Owns: the socket and the lookups queued on it (`unsent`) and sent on it (`sent`). A lookup
//! is a `Bind` and an `Execute` of a statement prepared at connect; each write of the driver
//! sends every queued lookup with a `Sync` after each quarter of the keys in flight (after at
//! least `MIN_KEYS_PER_SYNC`), so several lookups are one implicit transaction and one
//! `ReadyForQuery` at the server (one reply flush, where tokio-postgres syncs, and the server
//! flushes, after every query), while the window still overlaps the server's work with the
//! shard's. Invariants:
//! - `sent` is the lookups and `Sync`s in the order written, and the server answers in that
//!   order: `BindComplete`, rows, then `CommandComplete` or `PortalSuspended` per lookup,
//!   `ReadyForQuery` per `Sync`; the answer at the front of `sent` is always the next one read;
//! - a lookup the server fails gets the server's error; the lookups after it up to the next
//!   `Sync` are skipped by the server (it discards until `Sync`), so when `ReadyForQuery` comes
//!   they go back, in order, to the front of `unsent`: an error costs the others one round trip,
//!   never an error they did not cause;
//! - a lookup whose future was dropped (a timeout) before it was written is not written; one
//!   dropped after is read and its answer discarded;
//! - when the connection breaks, every lookup written and not answered fails with a retryable
//!   `ConnectionLost`, and the driver reconnects with exponential backoff; lookups not yet
//!   written wait for the next connect attempt; a connect attempt that fails fails them
//!   (retryable `Connect`, or `Refused` when the server said no), and until a connect succeeds
//!   new lookups fail at once with `Unavailable`;
//! - every answered lookup's time on the wire (written -> answered) goes into `wire_us`.

use super::handshake::{self, Prepared, Reader, Statement, BATCH_QUERY, QUERY};
use super::row::{write_row, write_text_array};
use super::{PgEndpoint, PgError, RowsPolicy, Statements, PARAM_SEPARATOR};
use crate::lookup::Values;
use crate::reconnect::{Ended, Reconnect};
use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use futures::io::AsyncWrite;
use glommio::net::TcpStream;
use postgres_protocol::message::backend::{DataRowBody, Message};
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;
use smallvec::SmallVec;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A write's lookups are closed by a `Sync` every `keys in flight / SYNC_SPLIT` keys (at least
/// `MIN_KEYS_PER_SYNC`): the server flushes its answers only at a `Sync`, so one `Sync` per
/// window would make the two sides take turns (the server works through the whole window while
/// the shard waits, then the shard handles the whole window while the server waits); with four,
/// the shard handles the first quarter's answers while the server works on the rest. The
/// figures are in docs/benchmarks.md ("PostgreSQL").
const SYNC_SPLIT: usize = 4;
const MIN_KEYS_PER_SYNC: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Connecting,
    Connected,
    /// Waiting to reconnect after the connection broke: lookups queue up.
    Down,
    /// Waiting to reconnect after a connect attempt failed (why): lookups fail at once.
    Unreachable(PgError),
    Closed,
}

/// What one lookup asks.
pub(crate) enum Kind {
    /// One key: its parameters, separated by `PARAM_SEPARATOR`.
    One(Vec<u8>),
    /// Several keys in one execution of the batch query; `order` is the keys' indices sorted
    /// by key, to find a row's keys by binary search.
    Batch { keys: Vec<Vec<u8>>, order: Vec<u32> },
}

impl Kind {
    pub(crate) fn batch(keys: &[&[u8]]) -> Kind {
        let mut order: Vec<u32> = (0..keys.len() as u32).collect();
        order.sort_unstable_by_key(|&i| keys[i as usize]);
        Kind::Batch {
            keys: keys.iter().map(|k| k.to_vec()).collect(),
            order,
        }
    }

    fn answers(&self) -> usize {
        match self {
            Kind::One(_) => 1,
            Kind::Batch { keys, .. } => keys.len(),
        }
    }
}

enum Slot {
    Waiting(Option<Waker>),
    Done(Result<Values, PgError>),
    Taken,
}

/// A lookup, shared by its future and the connection.
pub(crate) struct Request {
    kind: Kind,
    slot: RefCell<Slot>,
    sent_at: Cell<Instant>,
}

impl Request {
    fn new(kind: Kind) -> Rc<Request> {
        Rc::new(Request {
            kind,
            slot: RefCell::new(Slot::Waiting(None)),
            sent_at: Cell::new(Instant::now()),
        })
    }

    pub(crate) fn failed(kind: Kind, error: PgError) -> Rc<Request> {
        let r = Request::new(kind);
        r.complete(Err(error));
        r
    }

    fn complete(&self, result: Result<Values, PgError>) {
        let mut slot = self.slot.borrow_mut();
        if let Slot::Waiting(Some(waker)) = std::mem::replace(&mut *slot, Slot::Done(result)) {
            waker.wake();
        }
    }

    /// The answer, once there is one.
    pub(crate) fn poll_answer(&self, cx: &mut Context<'_>) -> Poll<Result<Values, PgError>> {
        let mut slot = self.slot.borrow_mut();
        match &mut *slot {
            Slot::Waiting(waker) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Slot::Done(_) => match std::mem::replace(&mut *slot, Slot::Taken) {
                Slot::Done(result) => Poll::Ready(result),
                _ => unreachable!("matched Done"),
            },
            Slot::Taken => panic!("a lookup's answer is taken once"),
        }
    }

    /// Whether only the connection still holds it (its future was dropped).
    fn abandoned(self: &Rc<Self>) -> bool {
        Rc::strong_count(self) == 1
    }
}

enum Sent {
    Lookup(Rc<Request>),
    Sync,
}

struct State {
    status: Status,
    unsent: VecDeque<Rc<Request>>,
    sent: VecDeque<Sent>,
    /// Keys in `unsent` and `sent` (a batch counts its keys), to pick the least busy connection.
    keys_in_flight: usize,
    wire_us: hdrhistogram::Histogram<u64>,
    driver: Option<Waker>,
}

pub(crate) struct Connection {
    endpoint: Rc<PgEndpoint>,
    statements: Rc<Statements>,
    connect_timeout: Duration,
    state: RefCell<State>,
}

impl Connection {
    pub(crate) fn new(
        endpoint: Rc<PgEndpoint>,
        statements: Rc<Statements>,
        connect_timeout: Duration,
    ) -> Rc<Connection> {
        Rc::new(Connection {
            endpoint,
            statements,
            connect_timeout,
            state: RefCell::new(State {
                status: Status::Connecting,
                unsent: VecDeque::new(),
                sent: VecDeque::new(),
                keys_in_flight: 0,
                wire_us: crate::redis::wire_histogram(),
                driver: None,
            }),
        })
    }

    pub(crate) fn wire_latency(&self) -> hdrhistogram::Histogram<u64> {
        self.state.borrow().wire_us.clone()
    }

    pub(crate) fn keys_in_flight(&self) -> usize {
        self.state.borrow().keys_in_flight
    }

    /// Queues a lookup; its future resolves with its answer.
    pub(crate) fn submit(&self, kind: Kind) -> Rc<Request> {
        let mut st = self.state.borrow_mut();
        let refusal = match &st.status {
            Status::Closed => Some(PgError::Unavailable {
                server: self.endpoint.host.clone(),
                reason: "the client was closed".into(),
            }),
            Status::Unreachable(why) => Some(PgError::Unavailable {
                server: self.endpoint.host.clone(),
                reason: why.to_string(),
            }),
            _ => None,
        };
        if let Some(e) = refusal {
            return Request::failed(kind, e);
        }
        st.keys_in_flight += kind.answers();
        let request = Request::new(kind);
        st.unsent.push_back(request.clone());
        if let Some(w) = &st.driver {
            w.wake_by_ref();
        }
        request
    }

    pub(crate) fn close(&self) {
        let mut st = self.state.borrow_mut();
        st.status = Status::Closed;
        if let Some(w) = st.driver.take() {
            w.wake();
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

    /// Fails the lookups written and not answered, and with `queued` those not written too.
    fn fail_pending(&self, error: &PgError, queued: bool) {
        let (sent, unsent) = {
            let mut st = self.state.borrow_mut();
            let sent = std::mem::take(&mut st.sent);
            let unsent = if queued {
                std::mem::take(&mut st.unsent)
            } else {
                VecDeque::new()
            };
            (sent, unsent)
        };
        let failed = sent
            .into_iter()
            .filter_map(|s| match s {
                Sent::Lookup(r) => Some(r),
                Sent::Sync => None,
            })
            .chain(unsent);
        for request in failed {
            self.state.borrow_mut().keys_in_flight -= request.kind.answers();
            request.complete(Err(error.clone()));
        }
    }

    async fn open(self: &Rc<Self>) -> Result<Io, PgError> {
        let failed = |reason: String| PgError::Connect {
            server: self.endpoint.host.clone(),
            reason,
        };
        let mut stream = TcpStream::connect_timeout(self.endpoint.addr, self.connect_timeout)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let mut reader = Reader::new();
        let prepared =
            handshake::handshake(&mut stream, &mut reader, &self.endpoint, &self.statements)
                .await?;
        Ok(Io {
            conn: self.clone(),
            stream,
            reader,
            prepared,
            writing: BytesMut::with_capacity(16 * 1024),
            written: 0,
            rows: Rows::default(),
        })
    }
}

/// The rows read so far for the lookup at the front of `sent`.
#[derive(Default)]
struct Rows {
    /// One key: its rows as JSON (`{..}`, or `[{..},{..}` for the array policy).
    json: Vec<u8>,
    count: usize,
    /// A batch: each key's rows as JSON and their count.
    per_key: Vec<(usize, Vec<u8>)>,
}

pub(crate) struct Io {
    conn: Rc<Connection>,
    stream: TcpStream,
    reader: Reader,
    prepared: Prepared,
    writing: BytesMut,
    written: usize,
    rows: Rows,
}

impl Io {
    fn broken(&self, reason: impl std::fmt::Display) -> PgError {
        PgError::ConnectionLost {
            server: self.conn.endpoint.host.clone(),
            reason: reason.to_string(),
        }
    }

    fn protocol(&self, reason: impl std::fmt::Display) -> PgError {
        PgError::Protocol {
            server: self.conn.endpoint.host.clone(),
            reason: reason.to_string(),
        }
    }

    /// One driver turn: write what was queued (and a `Sync`), then read and answer.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PgError>> {
        loop {
            {
                let mut st = self.conn.state.borrow_mut();
                if st.status == Status::Closed {
                    return Poll::Ready(Ok(()));
                }
                if !st.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    st.driver = Some(cx.waker().clone());
                }
            }
            let mut progress = false;
            if self.written == self.writing.len() {
                self.writing.clear();
                self.written = 0;
                self.encode_queued();
            }
            while self.written < self.writing.len() {
                match Pin::new(&mut self.stream).poll_write(cx, &self.writing[self.written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(self.broken("the socket accepted no bytes")))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.written += n;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(self.broken(e))),
                    Poll::Pending => break,
                }
            }
            match self.reader.poll_fill(&mut self.stream, cx) {
                Poll::Ready(Ok(())) => {
                    progress = true;
                    loop {
                        match self.reader.parse() {
                            Ok(Some(message)) => {
                                if let Err(e) = self.answer(message) {
                                    return Poll::Ready(Err(e));
                                }
                            }
                            Ok(None) => break,
                            Err(e) => return Poll::Ready(Err(self.protocol(e))),
                        }
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.broken(e))),
                Poll::Pending => {}
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Moves every queued lookup whose future still waits into `writing`, then a `Sync`.
    fn encode_queued(&mut self) {
        let mut st = self.conn.state.borrow_mut();
        let keys_per_sync = (st.keys_in_flight / SYNC_SPLIT).max(MIN_KEYS_PER_SYNC);
        let mut keys_since_sync = 0;
        let now = Instant::now();
        while let Some(request) = st.unsent.pop_front() {
            if request.abandoned() {
                st.keys_in_flight -= request.kind.answers();
                continue;
            }
            if let Err(e) = encode(
                &mut self.writing,
                &self.prepared,
                &self.conn.statements,
                &request.kind,
            ) {
                st.keys_in_flight -= request.kind.answers();
                request.complete(Err(e));
                continue;
            }
            request.sent_at.set(now);
            keys_since_sync += request.kind.answers();
            st.sent.push_back(Sent::Lookup(request));
            if keys_since_sync >= keys_per_sync {
                frontend::sync(&mut self.writing);
                st.sent.push_back(Sent::Sync);
                keys_since_sync = 0;
            }
        }
        if keys_since_sync > 0 {
            frontend::sync(&mut self.writing);
            st.sent.push_back(Sent::Sync);
        }
    }

    /// Takes one backend message: the next part of the answer at the front of `sent`.
    fn answer(&mut self, message: Message) -> Result<(), PgError> {
        match message {
            Message::BindComplete
            | Message::NoticeResponse(_)
            | Message::ParameterStatus(_)
            | Message::NotificationResponse(_) => Ok(()),
            Message::DataRow(row) => self.row(&row),
            Message::CommandComplete(_)
            | Message::PortalSuspended
            | Message::EmptyQueryResponse => {
                let request = self.pop_lookup()?;
                let values = self.take_values(&request.kind);
                self.finish(request, values);
                Ok(())
            }
            Message::ErrorResponse(body) => {
                let error = handshake::server_error(&body);
                let front_is_lookup =
                    matches!(self.conn.state.borrow().sent.front(), Some(Sent::Lookup(_)));
                if !front_is_lookup {
                    // Not a lookup's: the connection's own (a shutdown, a failed commit).
                    return if self.conn.state.borrow().sent.is_empty() {
                        Err(self.broken(error))
                    } else {
                        Ok(())
                    };
                }
                let request = self.pop_lookup()?;
                self.rows = Rows::default();
                self.finish(request, Err(error));
                Ok(())
            }
            Message::ReadyForQuery(_) => self.end_of_sync(),
            _ => Err(self.protocol("a message that answers no lookup")),
        }
    }

    fn pop_lookup(&mut self) -> Result<Rc<Request>, PgError> {
        let mut st = self.conn.state.borrow_mut();
        match st.sent.pop_front() {
            Some(Sent::Lookup(r)) => Ok(r),
            Some(Sent::Sync) => {
                st.sent.push_front(Sent::Sync);
                drop(st);
                Err(self.protocol("a lookup's answer where ReadyForQuery was due"))
            }
            None => {
                drop(st);
                Err(self.protocol("an answer with no lookup sent"))
            }
        }
    }

    fn finish(&self, request: Rc<Request>, result: Result<Values, PgError>) {
        let mut st = self.conn.state.borrow_mut();
        st.keys_in_flight -= request.kind.answers();
        let wire = request.sent_at.get().elapsed();
        st.wire_us.saturating_record(wire.as_micros() as u64);
        drop(st);
        request.complete(result);
    }

    /// `ReadyForQuery`: the end of one `Sync`'s lookups. Those still unanswered were skipped
    /// after an error and go back to the front of the queue, in order.
    fn end_of_sync(&mut self) -> Result<(), PgError> {
        let mut st = self.conn.state.borrow_mut();
        let mut skipped = vec![];
        loop {
            match st.sent.pop_front() {
                Some(Sent::Sync) => break,
                Some(Sent::Lookup(r)) => skipped.push(r),
                None => {
                    drop(st);
                    return Err(self.protocol("ReadyForQuery with no Sync sent"));
                }
            }
        }
        for request in skipped.into_iter().rev() {
            st.unsent.push_front(request);
        }
        Ok(())
    }

    /// A row of the lookup at the front of `sent`.
    fn row(&mut self, row: &DataRowBody) -> Result<(), PgError> {
        let conn = self.conn.clone();
        let st = conn.state.borrow();
        let Some(Sent::Lookup(request)) = st.sent.front() else {
            drop(st);
            return Err(self.protocol("a row with no lookup sent"));
        };
        // Inline up to 16 columns: no allocation per row.
        let mut fields: SmallVec<[_; 16]> = SmallVec::new();
        let mut ranges = row.ranges();
        while let Some(range) = ranges.next().map_err(|e| PgError::Protocol {
            server: self.conn.endpoint.host.clone(),
            reason: e.to_string(),
        })? {
            fields.push(range);
        }
        let policy = self.conn.statements.rows;
        match &request.kind {
            Kind::One(_) => {
                let columns = &self.prepared.query.columns;
                append_row(
                    &mut self.rows.json,
                    self.rows.count,
                    policy,
                    columns,
                    row.buffer(),
                    &fields,
                );
                self.rows.count += 1;
            }
            Kind::Batch { keys, order } => {
                let Some(batch) = &self.prepared.batch_query else {
                    drop(st);
                    return Err(self.protocol("a batch answered with no batch query"));
                };
                if self.rows.per_key.len() != keys.len() {
                    self.rows.per_key = vec![(0, Vec::new()); keys.len()];
                }
                // The first column is the key the row answers, as the key was written.
                let key: &[u8] = match fields.first() {
                    Some(Some(range)) => &row.buffer()[range.clone()],
                    _ => return Ok(()), // a NULL key answers no key
                };
                let start = order.partition_point(|&i| keys[i as usize].as_slice() < key);
                for &i in order[start..]
                    .iter()
                    .take_while(|&&i| keys[i as usize] == key)
                {
                    let (count, json) = &mut self.rows.per_key[i as usize];
                    // The key column matched the row; the value is the other columns.
                    append_row(
                        json,
                        *count,
                        policy,
                        &batch.columns[1..],
                        row.buffer(),
                        &fields[1..],
                    );
                    *count += 1;
                }
            }
        }
        Ok(())
    }

    /// The values of the lookup at the front, from the rows read for it.
    fn take_values(&mut self, kind: &Kind) -> Result<Values, PgError> {
        let rows = std::mem::take(&mut self.rows);
        let policy = self.conn.statements.rows;
        match kind {
            Kind::One(_) => Ok(vec![close_rows(rows.count, rows.json, policy)?]),
            Kind::Batch { keys, .. } => {
                if rows.per_key.is_empty() {
                    return Ok(vec![None; keys.len()]);
                }
                rows.per_key
                    .into_iter()
                    .map(|(count, json)| close_rows(count, json, policy))
                    .collect()
            }
        }
    }
}

/// Adds a key's row number `count` (from 0) to its JSON under `policy`.
fn append_row(
    json: &mut Vec<u8>,
    count: usize,
    policy: RowsPolicy,
    columns: &[super::row::Column],
    buf: &[u8],
    fields: &[Option<std::ops::Range<usize>>],
) {
    match policy {
        RowsPolicy::First | RowsPolicy::Error if count > 0 => {}
        RowsPolicy::First | RowsPolicy::Error => {
            write_row(json, columns, buf, fields.iter().cloned())
        }
        RowsPolicy::Array => {
            json.push(if count == 0 { b'[' } else { b',' });
            write_row(json, columns, buf, fields.iter().cloned());
        }
    }
}

/// A key's value from its rows: none is missing.
fn close_rows(
    count: usize,
    mut json: Vec<u8>,
    policy: RowsPolicy,
) -> Result<Option<Bytes>, PgError> {
    match (count, policy) {
        (0, _) => Ok(None),
        (_, RowsPolicy::Array) => {
            json.push(b']');
            Ok(Some(json.into()))
        }
        (1, _) | (_, RowsPolicy::First) => Ok(Some(json.into())),
        (_, RowsPolicy::Error) => Err(PgError::Rows),
    }
}

/// Appends a lookup's `Bind` and `Execute`.
fn encode(
    out: &mut BytesMut,
    prepared: &Prepared,
    statements: &Statements,
    kind: &Kind,
) -> Result<(), PgError> {
    let mut array = Vec::new();
    // Inline up to 4 parameters: no allocation per lookup.
    type Params<'a> = SmallVec<[&'a [u8]; 4]>;
    let (statement, name, params, max_rows): (&Statement, &str, Params<'_>, i32) = match kind {
        Kind::One(key) => (
            &prepared.query,
            QUERY,
            key.split(|&b| b == PARAM_SEPARATOR).collect(),
            statements.rows.max_rows(),
        ),
        Kind::Batch { keys, .. } => {
            let Some(batch) = &prepared.batch_query else {
                return Err(PgError::Params {
                    expected: 0,
                    got: 1,
                    why: "no batch query was prepared",
                });
            };
            let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            write_text_array(&mut array, &keys);
            (batch, BATCH_QUERY, smallvec::smallvec![array.as_slice()], 0)
        }
    };
    if params.len() != statement.params {
        return Err(PgError::Params {
            expected: statement.params,
            got: params.len(),
            why: "a key's parameters are separated by NUL bytes, which a field may hold",
        });
    }
    frontend::bind(
        "",
        name,
        std::iter::empty(),
        params,
        |param, buf| {
            buf.extend_from_slice(param);
            Ok(IsNull::No)
        },
        std::iter::empty(),
        out,
    )
    .map_err(|e| PgError::Params {
        expected: statement.params,
        got: 0,
        why: match e {
            frontend::BindError::Conversion(_) => "a parameter could not be encoded",
            frontend::BindError::Serialization(_) => "a parameter is too long for one message",
        },
    })?;
    frontend::execute("", max_rows, out).map_err(|_| PgError::Params {
        expected: statement.params,
        got: 0,
        why: "the execute message could not be encoded",
    })?;
    Ok(())
}

/// The driver (`reconnect::drive`): a connect that fails fails everything queued, and new
/// lookups at once, until a connect succeeds; a connection that broke fails what was written
/// on it, and the rest waits for the next one.
impl Reconnect for Connection {
    type Error = PgError;

    type Io = Io;

    fn connect(self: &Rc<Self>) -> impl std::future::Future<Output = Result<Io, PgError>> {
        self.open()
    }

    fn poll_io(io: &mut Io, cx: &mut Context<'_>) -> Poll<Result<(), PgError>> {
        io.poll(cx)
    }

    fn connected(&self) -> bool {
        self.set_status(Status::Connected)
    }

    fn failed(&self, ended: Ended<PgError>) -> bool {
        match ended {
            Ended::Closed => false,
            Ended::ConnectFailed(e) => {
                let up = self.set_status(Status::Unreachable(e.clone()));
                if up {
                    self.fail_pending(&e, true);
                }
                up
            }
            Ended::Lost(e) => {
                let up = self.set_status(Status::Down);
                if up {
                    self.fail_pending(&e, false);
                }
                up
            }
        }
    }

    fn connecting(&self) -> bool {
        self.set_status(Status::Connecting)
    }
}
