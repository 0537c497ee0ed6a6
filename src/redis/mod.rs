//! A Redis client for a shard: glommio TCP on io_uring, a few connections per shard, many
//! requests in flight per connection (pipelining, replies matched in order), reconnect with
//! backoff. `!Send` on purpose: create one per shard, inside the shard's factory.
//!
//! Owns: the shard's connections. Invariant: requests spread round-robin over connections,
//! and each connection's requests are answered in the order sent.

pub mod cluster;
mod connection;
mod endpoint;
mod error;
mod reply;
pub mod tls;
mod tracking;

pub use connection::{encode_command, ReplyFuture};
pub use endpoint::{redact_url, Endpoint, Server, Tls};
pub use error::RedisError;
pub use reply::{decode, decode_reply, get_values, Decoded, Protocol, Reply, MAX_BULK, MAX_DEPTH};
pub use tracking::{Invalidated, Invalidations};

// For the tools' summaries of wire times.
use crate::reconnect::{self, Backoff};
#[cfg_attr(not(feature = "tools"), allow(unused_imports))]
pub(crate) use connection::wire_histogram;
use connection::Connection;
use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Connections per client (per shard); 0 is taken as 1.
    pub connections: usize,
    /// Requests in flight per connection (the reply ring's size); above it a request waits for
    /// a slot (its caller's timeout bounds the wait).
    pub max_in_flight: usize,
    /// A connection's driver completes at most `in flight / reply_split` replies (but at least
    /// 16, so windows of 16 or fewer are not split) before it yields and writes the requests
    /// those completions issued, so the server works on new requests while the client handles
    /// the rest of a batch. 1 completes every reply that arrived at once: client and server
    /// then take turns on whole windows. Against Redis at 64 in flight, 4 gives 1.5x-1.8x the
    /// throughput of 1, for the single-threaded adapter and for a `Stage` alike; against a
    /// server with a real delay (1 ms) it moves throughput by no more than the noise and costs
    /// some CPU per record (docs/decisions/reply-split.md). 0 is taken as 1.
    pub reply_split: usize,
    /// First reconnect delay; doubles up to `reconnect_max`.
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// Client tracking, for a cache in front of the client: every connection says `HELLO 3`
    /// and `CLIENT TRACKING ON` when it connects (Redis 6 or newer; a server that refuses fails
    /// the connect attempt, naming the command), and the server's invalidations of keys it
    /// read are collected in [`RedisClient::invalidations`]; a lost connection invalidates
    /// everything.
    pub tracking: bool,
}

impl ClientConfig {
    /// The connections a client opens: `connections`, 0 taken as 1. Anything that opens
    /// connections on these settings (the tokio baseline too) uses this count.
    pub fn connection_count(&self) -> usize {
        self.connections.max(1)
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connections: 1,
            max_in_flight: 4096,
            reply_split: 4,
            reconnect_initial: Duration::from_millis(10),
            reconnect_max: Duration::from_secs(1),
            tracking: false,
        }
    }
}

/// The TCP address of a `redis://` URL (see [`Endpoint::parse`]), for callers that need only
/// that: a URL with a login, a database or a unix socket is refused.
pub fn parse_url(url: &str) -> Result<SocketAddr, RedisError> {
    let endpoint = Endpoint::parse(url)?;
    let refuse = |reason: &str| RedisError::InvalidUrl {
        url: endpoint.to_string(),
        reason: reason.to_string(),
    };
    if endpoint.password.is_some() || endpoint.db != 0 {
        return Err(refuse("this tool takes no login or database"));
    }
    match endpoint.server {
        Server::Tcp(addr) => Ok(addr),
        Server::Unix(_) => Err(refuse("this tool takes a TCP address, not a unix socket")),
    }
}

/// See the module documentation.
pub struct RedisClient {
    connections: Vec<Rc<Connection>>,
    next: Cell<usize>,
    invalidations: Option<Rc<Invalidations>>,
}

impl RedisClient {
    /// Creates the connections and spawns their drivers on the current glommio executor.
    /// Connecting happens in the background: requests sent meanwhile are queued and sent once
    /// connected (or fail with `Connect` if the server cannot be reached).
    pub fn new(endpoint: impl Into<Endpoint>, config: &ClientConfig) -> RedisClient {
        let endpoint = Rc::new(endpoint.into());
        let backoff = Backoff::new(config.reconnect_initial, config.reconnect_max);
        let invalidations = config.tracking.then(Rc::default);
        let connections = (0..config.connection_count())
            .map(|_| {
                let conn = Connection::new(
                    endpoint.clone(),
                    config.max_in_flight,
                    config.reply_split,
                    invalidations.clone(),
                );
                glommio::spawn_local(reconnect::drive(conn.clone(), backoff)).detach();
                conn
            })
            .collect();
        RedisClient {
            connections,
            next: Cell::new(0),
            invalidations,
        }
    }

    /// With `ClientConfig::tracking`: what the server invalidated of what this client read.
    pub fn invalidations(&self) -> Option<&Invalidations> {
        self.invalidations.as_deref()
    }

    /// Sends any command, e.g. `&[b"GET", key]`.
    pub fn command(&self, args: &[&[u8]]) -> ReplyFuture {
        self.command_of_keys(args, 1)
    }

    /// Sends a command that looks up `keys` keys (an `MGET`): the connection's reply split
    /// (`ClientConfig::reply_split`) counts its reply as that many, so a window of a few large
    /// requests is split as finely as one of many small ones.
    pub fn command_of_keys(&self, args: &[&[u8]], keys: usize) -> ReplyFuture {
        let i = self.next.get();
        self.next.set((i + 1) % self.connections.len());
        let weight = u32::try_from(keys).unwrap_or(u32::MAX);
        self.connections[i].send(args, weight)
    }

    /// `ASKING`, then `args`, on one connection (a cluster's `ASK` redirection: the node
    /// serves a slot it is importing only to a connection that said `ASKING` just before).
    /// `ASKING`'s own reply is discarded.
    pub fn command_after_asking(&self, args: &[&[u8]]) -> ReplyFuture {
        let i = self.next.get();
        self.next.set((i + 1) % self.connections.len());
        drop(self.connections[i].send(&[b"ASKING"], 1));
        self.connections[i].send(args, 1)
    }

    /// `GET key`: the value, or `None` for a missing key.
    pub fn get(&self, key: &[u8]) -> GetFuture {
        GetFuture(self.command(&[b"GET", key]))
    }

    /// Each answered request's time on the wire (from being handed to the socket to its
    /// reply being read), in microseconds, over all connections: the server and the network,
    /// without this client's own queueing before the write and after the read.
    pub fn wire_latency(&self) -> hdrhistogram::Histogram<u64> {
        let mut total = self.connections[0].wire_latency();
        for c in &self.connections[1..] {
            total.add(c.wire_latency()).expect("same bounds");
        }
        total
    }

    /// Adds [`RedisClient::wire_latency`] into `sink`: how a function that owns a client on
    /// each shard reports it from `close` (the shards' histograms share the same bounds).
    pub fn add_wire_latency_to(&self, sink: &std::sync::Mutex<hdrhistogram::Histogram<u64>>) {
        let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
        sink.add(self.wire_latency()).expect("same bounds");
    }

    /// Requests in flight over all connections.
    pub fn in_flight(&self) -> usize {
        self.connections.iter().map(|c| c.in_flight()).sum()
    }
}

impl Drop for RedisClient {
    fn drop(&mut self) {
        for c in &self.connections {
            c.close();
        }
    }
}

/// See [`RedisClient::get`].
pub struct GetFuture(ReplyFuture);

impl Future for GetFuture {
    type Output = Result<Option<Vec<u8>>, RedisError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| match r? {
            Reply::Bulk(v) => Ok(Some(v)),
            Reply::Nil => Ok(None),
            other => Err(RedisError::UnexpectedReply {
                command: "GET",
                got: other.describe(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_why_not() {
        assert_eq!(parse_url("redis://127.0.0.1:7000").unwrap().port(), 7000);
        assert_eq!(parse_url("127.0.0.1").unwrap().port(), 6379);
        assert_eq!(parse_url("redis://127.0.0.1:7000/0").unwrap().port(), 7000);
        let e = parse_url("redis://127.0.0.1:7000/3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no login or database"), "{e}");
        assert!(parse_url("rediss://h:1").is_err());
        let e = parse_url("redis://user:pw@127.0.0.1:1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no login") && !e.contains("pw"), "{e}");
    }
}
