//! `PgClient`: one shard's PostgreSQL lookups over a few pipelined connections.
//!
//! Owns: the shard's connections to one server and the choice among them. Invariants: a lookup
//! goes to the connection with the fewest keys in flight (ties to the first), so a batch and
//! single lookups spread by work, not by count; the connections' drivers run on the shard's
//! executor and exit when the client is dropped.

use super::connection::{Connection, Kind, Request};
use super::{PgConfig, PgEndpoint, PgError};
use crate::lookup::Values;
use crate::reconnect::{self, Backoff};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// See the module documentation.
pub struct PgClient {
    connections: Vec<Rc<Connection>>,
    batch: bool,
}

impl PgClient {
    /// Creates the connections and spawns their drivers on the current glommio executor.
    /// Connecting happens in the background: lookups made meanwhile are queued and sent once
    /// connected (or fail if the server cannot be reached or refuses the login).
    pub fn new(endpoint: PgEndpoint, config: &PgConfig) -> PgClient {
        let endpoint = Rc::new(endpoint);
        let statements = Rc::new(config.statements.clone());
        let backoff = Backoff::new(config.reconnect_initial, config.reconnect_max);
        let connections = (0..config.connections.max(1))
            .map(|_| {
                let conn =
                    Connection::new(endpoint.clone(), statements.clone(), config.connect_timeout);
                glommio::spawn_local(reconnect::drive(conn.clone(), backoff)).detach();
                conn
            })
            .collect();
        PgClient {
            connections,
            batch: config.statements.batch_query.is_some(),
        }
    }

    /// Whether `get_batch` runs the batch query (else it is one lookup per key).
    pub fn has_batch_query(&self) -> bool {
        self.batch
    }

    fn least_busy(&self) -> &Rc<Connection> {
        self.connections
            .iter()
            .min_by_key(|c| c.keys_in_flight())
            .expect("a client has at least one connection")
    }

    /// Runs the query for one key: its parameters separated by `PARAM_SEPARATOR`. Answers one
    /// value: the row (or rows, by the policy) as JSON, or `None` when there is none.
    pub fn get(&self, key: &[u8]) -> PgFuture {
        PgFuture {
            request: self.least_busy().submit(Kind::One(key.to_vec())),
        }
    }

    /// Runs the batch query for `keys`: one value per key, in their order.
    pub fn get_batch(&self, keys: &[&[u8]]) -> PgFuture {
        let kind = Kind::batch(keys);
        let request = if self.batch {
            self.least_busy().submit(kind)
        } else {
            Request::failed(
                kind,
                PgError::Params {
                    expected: 1,
                    got: keys.len(),
                    why: "this client has no batch query",
                },
            )
        };
        PgFuture { request }
    }

    /// Every answered lookup's time on the wire, in microseconds.
    pub fn wire_latency(&self) -> hdrhistogram::Histogram<u64> {
        let mut all = crate::redis::wire_histogram();
        for c in &self.connections {
            let _ = all.add(c.wire_latency());
        }
        all
    }
}

impl Drop for PgClient {
    fn drop(&mut self) {
        for c in &self.connections {
            c.close();
        }
    }
}

/// A lookup's answer. Dropped before it is sent, the lookup is not sent.
pub struct PgFuture {
    request: Rc<Request>,
}

impl Future for PgFuture {
    type Output = Result<Values, PgError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.request.poll_answer(cx)
    }
}
