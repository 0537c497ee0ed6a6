//! `HttpClient`: HTTP/1.1 requests from one shard over glommio's io_uring TCP, on a pool of
//! keep-alive connections.
//!
//! Owns: the shard's connections to one server. Invariants:
//! - a connection carries one request at a time (no pipelining: HTTP/1.1 servers and proxies
//!   handle it badly), so requests in flight never exceed `max_connections`; a request that
//!   finds every connection busy and the pool full waits for one;
//! - a connection goes back to the pool only after a whole response was read from it, the
//!   response allows it (`keep_alive`) and nothing followed it; a request dropped midway (a
//!   timeout) drops its connection, and its place in the pool is freed; whenever a connection
//!   or a place is freed, every waiting request looks again (no waiter is left asleep);
//! - a request on a connection taken from the pool that fails before any byte of a response
//!   arrived (the server closed the idle connection) is sent once more on a new connection;
//! - a response body over `MAX_BODY` is refused (malformed, not retried) before it is all read;
//! - the status decides the outcome: 2xx the body, 404 missing, 429 and 503 `Busy` (retryable,
//!   with `Retry-After`), any other status an error; a reset, an early end or a failed connect
//!   is retryable, a malformed response is not.

use super::response::{decode_chunked, parse_head, Framing, Head, Malformed};
use super::HttpEndpoint;
use bytes::Bytes;
use futures::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

const READ_CHUNK: usize = 16 * 1024;
/// The largest response body taken: a value is one record's enrichment, and a server that
/// sends more (a wrong URL answering a listing, say) must not exhaust the shard's memory.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// A client's settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Connections to the server at most (requests in flight at most); at least 1.
    pub max_connections: usize,
    /// `GET` unless a body is sent.
    pub method: String,
    /// Sent with every request (`Host`, `Content-Length` and `Connection` are the client's).
    pub headers: Vec<(String, String)>,
    pub connect_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_connections: 64,
            method: "GET".into(),
            headers: vec![],
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// Why a request got no answer to use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    /// The connection broke or ended before the whole response arrived.
    #[error("{endpoint}: connection lost: {reason}")]
    Io { endpoint: String, reason: String },
    /// 429 or 503: the server asks to come back later.
    #[error("{endpoint} answered {status} (busy){}", retry_after.map(|d| format!(", retry after {d:?}")).unwrap_or_default())]
    Busy {
        endpoint: String,
        status: u16,
        retry_after: Option<Duration>,
    },
    /// Any other status that is neither 2xx nor 404; `body` is its start.
    #[error("{endpoint} answered {status} for {target}: {body}")]
    Status {
        endpoint: String,
        status: u16,
        target: String,
        body: String,
    },
    #[error("{endpoint}: {malformed}")]
    Malformed {
        endpoint: String,
        malformed: Malformed,
    },
}

impl HttpError {
    /// Connection trouble and a busy server may pass; a status or a malformed answer will not.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            HttpError::Connect { .. } | HttpError::Io { .. } | HttpError::Busy { .. }
        )
    }

    /// How long the server asked to wait (`Retry-After`), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            HttpError::Busy { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

struct Conn {
    stream: TcpStream,
    /// Read into; it grows when a response needs more and is zeroed only as it grows.
    buf: Vec<u8>,
    /// Bytes of `buf` read and not yet taken.
    end: usize,
}

impl Conn {
    fn filled(&self) -> &[u8] {
        &self.buf[..self.end]
    }

    /// Takes the first `n` bytes read: what follows them moves to the front.
    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.end, 0);
        self.end -= n;
    }
}

#[derive(Default)]
struct Pool {
    idle: Vec<Conn>,
    /// Connections open or being opened, idle or lent.
    open: usize,
    waiters: VecDeque<Waker>,
    /// Connections opened so far (for tests and figures).
    opened: u64,
}

struct Inner {
    endpoint: HttpEndpoint,
    config: HttpConfig,
    pool: RefCell<Pool>,
    /// Each answered request's time from its bytes handed to the socket to its whole response
    /// read, in microseconds.
    wire_us: RefCell<hdrhistogram::Histogram<u64>>,
}

/// See the module documentation. Cheap to clone (one shard's client).
#[derive(Clone)]
pub struct HttpClient {
    inner: Rc<Inner>,
}

/// A connection lent to one request. Dropped without `give_back`, it closes the connection and
/// frees its place in the pool; either way a waiting request is woken.
struct Lease {
    inner: Rc<Inner>,
    conn: Option<Conn>,
    reused: bool,
    returned: bool,
}

impl Lease {
    /// The connection goes back to the pool, still open.
    fn give_back(mut self) {
        if let Some(conn) = self.conn.take() {
            self.inner.pool.borrow_mut().idle.push(conn);
            self.returned = true;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut pool = self.inner.pool.borrow_mut();
        if !self.returned {
            pool.open -= 1;
        }
        // Every waiter looks again: a request polled while waiting registered its waker once
        // more, so waking only the oldest could wake one that no longer waits and leave the
        // one that does asleep. Those that find no room register again.
        let waiters = std::mem::take(&mut pool.waiters);
        drop(pool);
        for w in waiters {
            w.wake();
        }
    }
}

impl HttpClient {
    pub fn new(endpoint: HttpEndpoint, mut config: HttpConfig) -> HttpClient {
        config.max_connections = config.max_connections.max(1);
        HttpClient {
            inner: Rc::new(Inner {
                endpoint,
                config,
                pool: RefCell::new(Pool::default()),
                wire_us: RefCell::new(crate::redis::wire_histogram()),
            }),
        }
    }

    /// Every answered request's time on the wire (microseconds): the server and the network,
    /// without the wait for a connection.
    pub fn wire_latency(&self) -> hdrhistogram::Histogram<u64> {
        self.inner.wire_us.borrow().clone()
    }

    /// Connections opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.inner.pool.borrow().opened
    }

    /// Requests `target` (the path and query, starting with `/`), with `body` if given; the
    /// outcome by the status policy (module documentation).
    pub async fn request(
        &self,
        target: &[u8],
        body: Option<&[u8]>,
    ) -> Result<Option<Bytes>, HttpError> {
        let request = self.encode(target, body);
        let mut lease = self.lease().await?;
        let sent = std::time::Instant::now();
        let head_and_body = match exchange(&mut lease, &request).await {
            Err(Exchange::Stale(_)) if lease.reused => {
                // The server closed the idle connection: once more, on a new one.
                drop(lease);
                lease = self.new_lease().await?;
                exchange(&mut lease, &request).await
            }
            other => other,
        };
        let (head, body) = head_and_body.map_err(|e| self.io_error(e))?;
        let _ = self
            .inner
            .wire_us
            .borrow_mut()
            .record(sent.elapsed().as_micros() as u64);
        // Reusable when the response allows it and nothing followed it.
        if head.keep_alive && lease.conn.as_ref().is_some_and(|c| c.end == 0) {
            lease.give_back();
        } else {
            drop(lease);
        }
        let endpoint = || self.inner.endpoint.to_string();
        match head.status {
            200..=299 => Ok(Some(body)),
            404 => Ok(None),
            429 | 503 => Err(HttpError::Busy {
                endpoint: endpoint(),
                status: head.status,
                retry_after: head.retry_after,
            }),
            status => Err(HttpError::Status {
                endpoint: endpoint(),
                status,
                target: String::from_utf8_lossy(target).into_owned(),
                body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            }),
        }
    }

    fn encode(&self, target: &[u8], body: Option<&[u8]>) -> Vec<u8> {
        let config = &self.inner.config;
        let mut out = Vec::with_capacity(128 + target.len() + body.map_or(0, <[u8]>::len));
        out.extend_from_slice(config.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(target);
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(self.inner.endpoint.host_header.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &config.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if let Some(body) = body {
            let typed = config
                .headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
            if !typed {
                out.extend_from_slice(b"Content-Type: application/json\r\n");
            }
            out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            out.extend_from_slice(body);
        } else {
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// An idle connection, or a new one when the pool has room; else waits for either.
    async fn lease(&self) -> Result<Lease, HttpError> {
        futures::future::poll_fn(|cx| {
            let mut pool = self.inner.pool.borrow_mut();
            if !pool.idle.is_empty() || pool.open < self.inner.config.max_connections {
                Poll::Ready(())
            } else {
                if !pool.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    pool.waiters.push_back(cx.waker().clone());
                }
                Poll::Pending
            }
        })
        .await;
        let idle = self.inner.pool.borrow_mut().idle.pop();
        match idle {
            Some(conn) => Ok(Lease {
                inner: self.inner.clone(),
                conn: Some(conn),
                reused: true,
                returned: false,
            }),
            None => self.new_lease().await,
        }
    }

    /// A new connection (its place in the pool taken before the connect).
    async fn new_lease(&self) -> Result<Lease, HttpError> {
        self.inner.pool.borrow_mut().open += 1;
        let mut lease = Lease {
            inner: self.inner.clone(),
            conn: None,
            reused: false,
            returned: false,
        };
        let addr = self.inner.endpoint.addr;
        let stream = TcpStream::connect_timeout(addr, self.inner.config.connect_timeout)
            .await
            .map_err(|e| HttpError::Connect {
                endpoint: self.inner.endpoint.to_string(),
                reason: e.to_string(),
            })?;
        let _ = stream.set_nodelay(true);
        self.inner.pool.borrow_mut().opened += 1;
        lease.conn = Some(Conn {
            stream,
            buf: vec![0; READ_CHUNK],
            end: 0,
        });
        Ok(lease)
    }

    fn io_error(&self, e: Exchange) -> HttpError {
        let endpoint = self.inner.endpoint.to_string();
        match e {
            Exchange::Stale(reason) | Exchange::Broken(reason) => {
                HttpError::Io { endpoint, reason }
            }
            Exchange::Malformed(malformed) => HttpError::Malformed {
                endpoint,
                malformed,
            },
        }
    }
}

/// How an exchange failed.
enum Exchange {
    /// Before any byte of the response arrived.
    Stale(String),
    /// Midway through the response.
    Broken(String),
    Malformed(Malformed),
}

/// Sends `request` on the lease's connection and reads one whole response.
async fn exchange(lease: &mut Lease, request: &[u8]) -> Result<(Head, Bytes), Exchange> {
    let conn = lease.conn.as_mut().expect("a lease holds its connection");
    conn.end = 0;
    conn.stream
        .write_all(request)
        .await
        .map_err(|e| Exchange::Stale(e.to_string()))?;
    let head = loop {
        if let Some(head) = parse_head(conn.filled()).map_err(Exchange::Malformed)? {
            break head;
        }
        if read_more(conn).await? == 0 {
            return Err(if conn.end == 0 {
                Exchange::Stale("closed before answering".into())
            } else {
                Exchange::Broken("closed in the middle of the head".into())
            });
        }
    };
    let body = match head.framing {
        Framing::Length(n) if n > MAX_BODY => {
            return Err(Exchange::Malformed(Malformed {
                what: format!("a body of {n} bytes, more than the {MAX_BODY} taken"),
            }))
        }
        Framing::Length(n) => {
            let end = head.len + n;
            while conn.end < end {
                if read_more(conn).await? == 0 {
                    return Err(Exchange::Broken(format!(
                        "closed after {} of {n} body bytes",
                        conn.end - head.len
                    )));
                }
            }
            let body = Bytes::copy_from_slice(&conn.buf[head.len..end]);
            conn.consume(end);
            body
        }
        Framing::Chunked => loop {
            if let Some((body, used)) =
                decode_chunked(&conn.filled()[head.len..]).map_err(Exchange::Malformed)?
            {
                conn.consume(head.len + used);
                break Bytes::from(body);
            }
            if conn.end > head.len + MAX_BODY {
                return Err(Exchange::Malformed(Malformed {
                    what: format!("a chunked body of more than {MAX_BODY} bytes"),
                }));
            }
            if read_more(conn).await? == 0 {
                return Err(Exchange::Broken(
                    "closed in the middle of a chunked body".into(),
                ));
            }
        },
        Framing::UntilClose => {
            while read_more(conn).await? > 0 {
                if conn.end > head.len + MAX_BODY {
                    return Err(Exchange::Malformed(Malformed {
                        what: format!("a body of more than {MAX_BODY} bytes"),
                    }));
                }
            }
            let body = Bytes::copy_from_slice(&conn.filled()[head.len..]);
            conn.end = 0;
            body
        }
    };
    Ok((head, body))
}

/// Reads what the socket has into the connection's buffer (grown, never re-zeroed, when less
/// than a chunk is free); 0 at its end.
async fn read_more(conn: &mut Conn) -> Result<usize, Exchange> {
    let start = conn.end;
    if conn.buf.len() - start < READ_CHUNK {
        conn.buf.resize(start + READ_CHUNK, 0);
    }
    let n = conn
        .stream
        .read(&mut conn.buf[start..])
        .await
        .map_err(|e| {
            if start == 0 {
                Exchange::Stale(e.to_string())
            } else {
                Exchange::Broken(e.to_string())
            }
        })?;
    conn.end += n;
    Ok(n)
}
