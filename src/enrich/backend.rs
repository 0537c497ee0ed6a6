//! The backend `sluice enrich` looks values up in: Redis (one server or a cluster), an HTTP
//! API or a PostgreSQL table, behind one `BatchLookup` so that the lookup layer, the policies
//! and the summary are the same for all.
//!
//! Owns: dispatching a batch to the backend the run was given. Invariant: a run has exactly
//! one backend, chosen from the command line (`--redis`, `--http`, `--postgres`, `--loadgen`);
//! its errors keep their own retryability (`BackendError::is_retryable`).

use crate::http::{HttpClient, HttpConfig, HttpEndpoint, HttpError};
use crate::lookup::{
    BatchLookup, HttpFuture, HttpLookup, LookupFuture, PostgresFuture, PostgresLookup, RedisLookup,
    Values,
};
use crate::postgres::{PgClient, PgConfig, PgEndpoint, PgError};
use crate::redis::RedisError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What a run looks values up in, as the command line gave it.
#[derive(Debug, Clone)]
pub enum BackendConfig {
    /// A Redis server (a cluster is found by the preflight).
    Redis(crate::redis::Endpoint),
    /// An HTTP API: each record's key is a request target (`--http`'s path and query with the
    /// record's fields in it), its value the response body.
    Http {
        endpoint: HttpEndpoint,
        client: HttpConfig,
    },
    /// A PostgreSQL server: each record's key is the query's parameters (`--params`), its
    /// value the row as a JSON object.
    Postgres {
        endpoint: PgEndpoint,
        client: PgConfig,
        /// The parameters each key gives (`--params` templates), checked against the query's.
        params: usize,
    },
}

/// One shard's backend.
pub(crate) enum Backend {
    Redis(RedisLookup),
    Http(HttpLookup),
    Postgres(PostgresLookup),
}

impl Backend {
    pub(crate) fn http(endpoint: HttpEndpoint, config: &HttpConfig) -> Backend {
        Backend::Http(HttpLookup::new(HttpClient::new(endpoint, config.clone())))
    }

    pub(crate) fn postgres(endpoint: PgEndpoint, config: &PgConfig) -> Backend {
        Backend::Postgres(PostgresLookup::new(PgClient::new(endpoint, config)))
    }

    /// Every answered request's time on the wire.
    pub(crate) fn wire_latency(&self) -> hdrhistogram::Histogram<u64> {
        match self {
            Backend::Redis(r) => r.wire_latency(),
            Backend::Http(h) => h.client().wire_latency(),
            Backend::Postgres(p) => p.client().wire_latency(),
        }
    }
}

/// A backend's failed request.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendError {
    Redis(RedisError),
    Http(HttpError),
    Postgres(PgError),
}

impl BackendError {
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            BackendError::Redis(e) => e.is_retryable(),
            BackendError::Http(e) => e.is_retryable(),
            BackendError::Postgres(e) => e.is_retryable(),
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Redis(e) => e.fmt(f),
            BackendError::Http(e) => e.fmt(f),
            BackendError::Postgres(e) => e.fmt(f),
        }
    }
}

/// A batch's answer from either backend.
pub(crate) enum BackendFuture {
    Redis(LookupFuture),
    Http(HttpFuture),
    Postgres(PostgresFuture),
}

impl Future for BackendFuture {
    type Output = Result<Values, BackendError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            BackendFuture::Redis(f) => Pin::new(f).poll(cx).map_err(BackendError::Redis),
            BackendFuture::Http(f) => f.as_mut().poll(cx).map_err(BackendError::Http),
            BackendFuture::Postgres(f) => Pin::new(f).poll(cx).map_err(BackendError::Postgres),
        }
    }
}

impl BatchLookup for Backend {
    type Error = BackendError;
    type Future = BackendFuture;

    fn get_many(&self, keys: &[&[u8]]) -> BackendFuture {
        match self {
            Backend::Redis(r) => BackendFuture::Redis(r.get_many(keys)),
            Backend::Http(h) => BackendFuture::Http(h.get_many(keys)),
            Backend::Postgres(p) => BackendFuture::Postgres(p.get_many(keys)),
        }
    }

    fn get_one(&self, key: &[u8]) -> BackendFuture {
        match self {
            Backend::Redis(r) => BackendFuture::Redis(r.get_one(key)),
            Backend::Http(h) => BackendFuture::Http(h.get_one(key)),
            Backend::Postgres(p) => BackendFuture::Postgres(p.get_one(key)),
        }
    }

    fn invalidated(&self) -> Option<crate::lookup::Invalidated> {
        match self {
            Backend::Redis(r) => r.invalidated(),
            Backend::Http(_) | Backend::Postgres(_) => None,
        }
    }
}
