//! The lookup server: RESP2 (or HTTP/1.1 GETs of `/KEY`, `ServerConfig::http`) over glommio
//! (io_uring) TCP, one executor per shard, all shards on one port (`SO_REUSEPORT`), each reply
//! delayed by the latency model.
//!
//! Owns: connections, reply timing and fault injection. Invariants:
//! - replies on a connection leave in request order; reply `i` leaves no earlier than its
//!   request's arrival plus its sampled delay, and no earlier than reply `i - 1`;
//! - a request's delay counts from the read that brought it; its reply is encoded straight into
//!   the connection's outbox, in chunks of replies that share a due time, which the
//!   connection's writer task hands to the socket when they come due;
//! - delays are timers on the connection's executor, never a blocked thread;
//! - a connection's pending replies are bounded (`MAX_PENDING_REPLIES`): past that the server
//!   stops reading from it, and TCP pushes back on the client;
//! - an injected error replaces one reply (RESP: `-ERR injected failure`; HTTP: `503` with
//!   `Retry-After: 0`); an injected reset closes the connection without answering what it has
//!   read;
//! - stopping the server closes every connection (as a stopping Redis does), so clients see
//!   the connection end instead of silence.

use crate::commands::{Context, Flow, Overlay};
use crate::keyspace::Keyspace;
use crate::latency::LatencyModel;
use futures::io::{AsyncReadExt, AsyncWriteExt};
use futures::FutureExt;
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use redis_protocol::resp2::decode::decode_range;
use redis_protocol::resp2::types::RangeFrame;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Replies a connection may hold back (waiting for their delay) before reading stops.
const MAX_PENDING_REPLIES: usize = 4096;
/// Registered io_uring memory per server executor (3 rings x this count against memlock).
const IO_MEMORY: usize = 256 * 1024;
/// A request larger than this closes the connection (protects the server's memory).
const MAX_REQUEST_BYTES: usize = 1 << 20;

/// The server's settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port.
    pub addr: SocketAddr,
    /// Executors (threads) serving connections.
    pub shards: usize,
    /// Pin shard `i` to `cores[i]` when given (one per shard).
    pub cores: Option<Vec<usize>>,
    /// Keys in the generated keyspace.
    pub keys: u64,
    /// Bytes per value.
    pub value_size: usize,
    /// Reply delay.
    pub latency: LatencyModel,
    /// Fraction of replies replaced by `-ERR injected failure`.
    pub error_rate: f64,
    /// Fraction of requests that close the connection instead of being answered.
    pub reset_rate: f64,
    /// Seeds delays and fault injection.
    pub seed: u64,
    /// Speak HTTP/1.1 (`GET /KEY`: the value as a JSON body, or 404) instead of RESP2.
    pub http: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            shards: 1,
            cores: None,
            keys: 100_000,
            value_size: 128,
            latency: LatencyModel::Fixed(Duration::from_millis(1)),
            error_rate: 0.0,
            reset_rate: 0.0,
            seed: 0x10ad,
            http: false,
        }
    }
}

/// What the server has served so far.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections: AtomicU64,
    pub commands: AtomicU64,
    pub gets: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub sets: AtomicU64,
    pub errors_injected: AtomicU64,
    pub resets_injected: AtomicU64,
    /// Replies written, and the sum of how late each was handed to the socket after its due
    /// time (arrival + delay), in microseconds: the server's own contribution to latency.
    pub replies_written: AtomicU64,
    pub reply_lateness_us: AtomicU64,
}

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not listen on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("could not start server shard {shard}: {reason}")]
    Executor { shard: usize, reason: String },
    #[error("invalid setting `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
}

/// A running server. Dropping it stops the server.
pub struct Server {
    addr: SocketAddr,
    stats: Arc<ServerStats>,
    stops: Vec<flume::Sender<()>>,
    joins: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl Server {
    /// Starts the server's shards; returns once every shard listens.
    pub fn start(config: ServerConfig) -> Result<Server, ServerError> {
        if config.shards == 0 {
            return Err(ServerError::InvalidConfig {
                field: "shards",
                reason: "must be at least 1".into(),
            });
        }
        for (field, rate) in [
            ("error_rate", config.error_rate),
            ("reset_rate", config.reset_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ServerError::InvalidConfig {
                    field,
                    reason: format!("{rate} is not in [0, 1]"),
                });
            }
        }
        let keyspace = Keyspace::new(config.keys, config.value_size);
        let overlay: Overlay = Default::default();
        let stats = Arc::new(ServerStats::default());
        let mut server = Server {
            addr: config.addr,
            stats: stats.clone(),
            stops: vec![],
            joins: vec![],
        };
        for shard in 0..config.shards {
            let (ready_tx, ready_rx) = flume::bounded::<Result<SocketAddr, String>>(1);
            let (stop_tx, stop_rx) = flume::bounded::<()>(1);
            let placement = match config.cores.as_ref().and_then(|c| c.get(shard)) {
                Some(&core) => Placement::Fixed(core),
                None => Placement::Unbound,
            };
            let shard_ctx = ShardContext {
                keyspace: keyspace.clone(),
                overlay: overlay.clone(),
                stats: stats.clone(),
                latency: config.latency.clone(),
                error_rate: config.error_rate,
                reset_rate: config.reset_rate,
                seed: config.seed.wrapping_add(shard as u64),
                http: config.http,
            };
            // Shards after the first bind the port the first one got.
            let addr = server.addr;
            let join = LocalExecutorBuilder::new(placement)
                .name("lg-server")
                .io_memory(IO_MEMORY)
                .spawn(move || run_shard(addr, shard_ctx, ready_tx, stop_rx))
                .map_err(|e| ServerError::Executor {
                    shard,
                    reason: e.to_string(),
                })?;
            server.joins.push(join);
            server.stops.push(stop_tx);
            match ready_rx.recv() {
                Ok(Ok(bound)) => server.addr = bound,
                Ok(Err(reason)) => return Err(ServerError::Bind { addr, reason }),
                Err(_) => {
                    return Err(ServerError::Executor {
                        shard,
                        reason: "the shard exited before listening".into(),
                    })
                }
            }
        }
        Ok(server)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters of what was served.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Stops every shard and waits for their threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for join in self.joins.drain(..) {
            let _ = join.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct ShardContext {
    keyspace: Keyspace,
    overlay: Overlay,
    stats: Arc<ServerStats>,
    latency: LatencyModel,
    error_rate: f64,
    reset_rate: f64,
    seed: u64,
    http: bool,
}

async fn run_shard(
    addr: SocketAddr,
    ctx: ShardContext,
    ready: flume::Sender<Result<SocketAddr, String>>,
    stop: flume::Receiver<()>,
) {
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let _ = ready.send(listener.local_addr().map_err(|e| e.to_string()));
    let ctx = Rc::new(ctx);
    let open: Rc<std::cell::RefCell<std::collections::HashSet<i32>>> = Default::default();
    let mut connection_no = 0u64;
    let accept_loop = async {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    connection_no += 1;
                    ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
                    let seed = ctx.seed ^ connection_no.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
                    open.borrow_mut().insert(fd);
                    let (ctx, open) = (ctx.clone(), open.clone());
                    glommio::spawn_local(async move {
                        serve_connection(stream, ctx, seed).await;
                        open.borrow_mut().remove(&fd);
                    })
                    .detach();
                }
                // Out of file descriptors and the like: back off, keep serving the others.
                Err(_) => glommio::timer::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    futures::select! {
        _ = accept_loop.fuse() => {}
        _ = stop.recv_async().fuse() => {}
    }
    // Close what is still open: pending reads end, the peers see the connection close.
    for fd in open.borrow().iter() {
        // SAFETY: `fd` belongs to a connection of this shard that has not ended (ended
        // connections remove themselves from `open` before their socket is dropped).
        unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
    }
}

/// Replies of one connection waiting for their due time, in request order. Shared by the
/// connection's reader (which appends) and writer (which takes what is due).
#[derive(Default)]
struct Outbox {
    /// Oldest first; due times never decrease along the queue.
    chunks: VecDeque<Chunk>,
    /// Replies held in `chunks` (bounded by `MAX_PENDING_REPLIES`).
    replies: usize,
    /// Emptied chunk buffers, for reuse.
    spare: Vec<Vec<u8>>,
    /// The reader stopped: once `chunks` is empty the writer ends.
    reader_done: bool,
    /// The writer ended (the socket failed, or it wrote a closing reply): the reader stops.
    writer_done: bool,
    /// The writer, waiting for a first chunk.
    writer: Option<Waker>,
    /// The reader, waiting for room.
    reader: Option<Waker>,
}

/// Encoded replies that come due at the same time (requests that arrived in one read, under a
/// fixed delay, share one chunk; under a random delay each reply has its own).
struct Chunk {
    due: Instant,
    bytes: Vec<u8>,
    replies: usize,
    /// Close the connection after writing this chunk (QUIT, protocol errors).
    close: bool,
}

/// Spare chunk buffers an outbox keeps.
const SPARE_CHUNKS: usize = 64;

impl Outbox {
    /// Counts one more reply due at `due` and returns the buffer its bytes go to: the newest
    /// chunk's when that chunk has the same due time (and does not close), else a new chunk's.
    fn buffer_for(&mut self, due: Instant) -> &mut Vec<u8> {
        let fits = self.chunks.back().is_some_and(|c| c.due == due && !c.close);
        if !fits {
            let bytes = self.spare.pop().unwrap_or_default();
            self.chunks.push_back(Chunk {
                due,
                bytes,
                replies: 0,
                close: false,
            });
        }
        let chunk = self.chunks.back_mut().expect("a chunk was just ensured");
        chunk.replies += 1;
        self.replies += 1;
        &mut chunk.bytes
    }

    fn recycle(&mut self, mut bytes: Vec<u8>) {
        if self.spare.len() < SPARE_CHUNKS {
            bytes.clear();
            self.spare.push(bytes);
        }
    }

    /// Marks the newest chunk as the last: the writer closes the connection after it.
    fn close_after_newest(&mut self) {
        self.chunks
            .back_mut()
            .expect("a reply was just added")
            .close = true;
    }

    fn is_full(&self) -> bool {
        self.replies >= MAX_PENDING_REPLIES
    }

    fn wake_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    fn wake_reader(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }
}

/// Writes a connection's replies as they come due: every chunk due by the time the first one
/// is, in one write. Ends when the reader is done and everything was written, after a chunk
/// that closes the connection, or when the socket fails.
async fn write_replies(
    outbox: Rc<RefCell<Outbox>>,
    mut writer: futures::io::WriteHalf<TcpStream>,
    stats: &ServerStats,
) {
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        let due = std::future::poll_fn(|cx| {
            let mut ob = outbox.borrow_mut();
            match ob.chunks.front() {
                Some(chunk) => Poll::Ready(Some(chunk.due)),
                None if ob.reader_done => Poll::Ready(None),
                None => {
                    ob.writer = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await;
        let Some(due) = due else { return };
        let now = Instant::now();
        if due > now {
            glommio::timer::sleep(due - now).await;
        }
        let now = Instant::now();
        let (mut replies, mut late_us, mut closing) = (0u64, 0u64, false);
        {
            let mut ob = outbox.borrow_mut();
            while let Some(chunk) = ob.chunks.front() {
                if chunk.due > now || closing {
                    break;
                }
                let chunk = ob.chunks.pop_front().expect("front exists");
                replies += chunk.replies as u64;
                late_us += chunk.replies as u64
                    * now.saturating_duration_since(chunk.due).as_micros() as u64;
                closing = chunk.close;
                ob.replies -= chunk.replies;
                if out.is_empty() {
                    // The common case, one chunk due: write its buffer as it is.
                    let spare = std::mem::replace(&mut out, chunk.bytes);
                    ob.recycle(spare);
                } else {
                    out.extend_from_slice(&chunk.bytes);
                    ob.recycle(chunk.bytes);
                }
            }
            ob.wake_reader();
        }
        stats.replies_written.fetch_add(replies, Ordering::Relaxed);
        stats
            .reply_lateness_us
            .fetch_add(late_us, Ordering::Relaxed);
        if writer.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
        if closing {
            let _ = writer.close().await;
            return;
        }
    }
}

/// Waits until the writer has drained the outbox below full; `true` if the writer ended instead.
async fn writer_made_room(outbox: &RefCell<Outbox>) -> bool {
    std::future::poll_fn(|cx| {
        let mut ob = outbox.borrow_mut();
        if ob.writer_done || !ob.is_full() {
            return Poll::Ready(ob.writer_done);
        }
        ob.wake_writer();
        ob.reader = Some(cx.waker().clone());
        Poll::Pending
    })
    .await
}

/// Reads a connection's requests and queues their replies, each due at its arrival plus a
/// sampled delay, for the writer task. Over 70 lines: the read loop's state (the buffer window,
/// the last due time, the fault injection, the outbox) is shared by every step of a request,
/// and one loop shows the order they happen in.
async fn serve_connection(stream: TcpStream, ctx: Rc<ShardContext>, seed: u64) {
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = stream.split();
    let outbox: Rc<RefCell<Outbox>> = Default::default();
    let writer_task = {
        let (outbox, ctx) = (outbox.clone(), ctx.clone());
        glommio::spawn_local(async move {
            write_replies(outbox.clone(), writer, &ctx.stats).await;
            let mut ob = outbox.borrow_mut();
            ob.writer_done = true;
            ob.wake_reader();
        })
    };

    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let (mut start, mut end) = (0usize, 0usize);
    let mut last_due = Instant::now();
    let mut reset = false;
    let context = Context {
        keyspace: &ctx.keyspace,
        overlay: &ctx.overlay,
        stats: &ctx.stats,
    };
    // Queues a reply that closes the connection, after everything before it.
    let close_with = |last_due: Instant, message: &[u8]| {
        let mut ob = outbox.borrow_mut();
        let due = Instant::now().max(last_due);
        ob.buffer_for(due).extend_from_slice(message);
        ob.close_after_newest();
    };
    'read: loop {
        if end == buf.len() {
            if start > 0 {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
            } else if buf.len() < MAX_REQUEST_BYTES {
                buf.resize(buf.len() * 2, 0);
            } else {
                break 'read; // a single request larger than the limit
            }
        }
        let n = match reader.read(&mut buf[end..]).await {
            Ok(0) | Err(_) => break 'read,
            Ok(n) => n,
        };
        end += n;
        // Every request this read brought arrived now: delays count from here.
        let arrival = Instant::now();
        let mut args: Vec<&[u8]> = Vec::with_capacity(4);
        loop {
            let used = if ctx.http {
                match http_request(&buf[start..end], &mut args) {
                    Ok(Some(used)) => used,
                    Ok(None) => break,
                    Err(()) => {
                        close_with(
                            last_due,
                            b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                        );
                        break 'read;
                    }
                }
            } else {
                let (frame, used) = match decode_range(&buf[start..end]) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(_) => {
                        close_with(last_due, b"-ERR Protocol error\r\n");
                        break 'read;
                    }
                };
                if !command_args(&buf[start..start + used], &frame, &mut args) {
                    close_with(
                        last_due,
                        b"-ERR Protocol error: expected an array of bulk strings\r\n",
                    );
                    break 'read;
                }
                used
            };
            ctx.stats.commands.fetch_add(1, Ordering::Relaxed);
            if ctx.reset_rate > 0.0 && rng.random_bool(ctx.reset_rate) {
                ctx.stats.resets_injected.fetch_add(1, Ordering::Relaxed);
                reset = true;
                break 'read;
            }
            let due = (arrival + ctx.latency.sample(&mut rng)).max(last_due);
            last_due = due;
            let full = {
                let mut ob = outbox.borrow_mut();
                let out = ob.buffer_for(due);
                let flow = if ctx.error_rate > 0.0 && rng.random_bool(ctx.error_rate) {
                    ctx.stats.errors_injected.fetch_add(1, Ordering::Relaxed);
                    out.extend_from_slice(if ctx.http {
                        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n".as_slice()
                    } else {
                        b"-ERR injected failure\r\n".as_slice()
                    });
                    Flow::Continue
                } else if ctx.http {
                    context.http_get(args[0], args[1], out);
                    Flow::Continue
                } else {
                    context.execute(&args, out)
                };
                if flow == Flow::Close {
                    ob.close_after_newest();
                    break 'read;
                }
                ob.is_full()
            };
            start += used;
            // Full: let the writer run, and stop reading until it makes room (TCP then
            // pushes back on the client).
            if full && writer_made_room(&outbox).await {
                break 'read;
            }
        }
        outbox.borrow_mut().wake_writer();
        if start == end {
            start = 0;
            end = 0;
        }
    }
    {
        let mut ob = outbox.borrow_mut();
        ob.reader_done = true;
        ob.wake_writer();
    }
    if reset {
        // Cancelling the writer drops the socket with the replies it still held.
        drop(writer_task);
    } else {
        writer_task.await;
    }
}

/// Puts the arguments of a command frame (an array of bulk strings) into `args`, as slices
/// of `buf`; false when the frame is no such array.
fn command_args<'a>(buf: &'a [u8], frame: &RangeFrame, args: &mut Vec<&'a [u8]>) -> bool {
    args.clear();
    let RangeFrame::Array(items) = frame else {
        return false;
    };
    for item in items {
        match item {
            RangeFrame::BulkString((s, e)) | RangeFrame::SimpleString((s, e)) => {
                match buf.get(*s..*e) {
                    Some(arg) => args.push(arg),
                    None => return false,
                }
            }
            _ => return false,
        }
    }
    !args.is_empty()
}

/// An HTTP request at the start of `buf`: its method and target into `args`, and the bytes it
/// takes (its head and its `Content-Length` body); `Ok(None)` when more bytes are needed.
fn http_request<'a>(buf: &'a [u8], args: &mut Vec<&'a [u8]>) -> Result<Option<usize>, ()> {
    args.clear();
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let head = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let mut body = 0usize;
    for h in request.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            body = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(())?;
        }
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(());
    };
    if buf.len() < head + body {
        return Ok(None);
    }
    // The method and target are slices of `buf` (httparse borrows them from it).
    args.push(method.as_bytes());
    args.push(target.as_bytes());
    Ok(Some(head + body))
}
