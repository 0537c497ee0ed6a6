//! `RedisEnrich`: the stage's function for `sluice enrich`, a GET of the record's key that
//! carries the record through to the writer.
//!
//! Owns: turning a lookup (or its timeout or failure) into an `Enriched` outcome. Invariant:
//! every input yields exactly one `Enriched` unless the stage fails; the record travels in an
//! `Arc`, so a retry or a timeout never copies it.

use crate::function::{AsyncFunction, Fallback, Outputs};
use crate::redis::{ClientConfig, GetFuture, RedisClient, RedisError};
use hdrhistogram::Histogram;
use serde_json::{Map, Value};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// A parsed input line on its way to a lookup.
pub struct Record {
    /// 1-based line number in the input.
    pub line: u64,
    pub key: String,
    pub fields: Map<String, Value>,
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} (key {:?})", self.line, self.key)
    }
}

/// What the lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Vec<u8>),
    Missing,
    TimedOut,
    Failed(String),
}

/// A record and its lookup, for the writer.
#[derive(Debug)]
pub struct Enriched {
    pub record: Arc<Record>,
    pub lookup: Lookup,
}

pub(crate) struct RedisEnrich {
    client: RedisClient,
    timeout_emits: bool,
    error_emits: bool,
    /// Where `close` adds this shard's wire times (for the summary).
    wire_sink: Arc<Mutex<Histogram<u64>>>,
}

impl RedisEnrich {
    /// `timeout_emits` / `error_emits`: whether a timed-out / failed lookup becomes an
    /// `Enriched` for the writer's policy (emit, drop, dead-letter) instead of failing the stage.
    pub(crate) fn new(
        addr: SocketAddr,
        connections: usize,
        timeout_emits: bool,
        error_emits: bool,
        wire_sink: Arc<Mutex<Histogram<u64>>>,
    ) -> Self {
        let config = ClientConfig {
            connections,
            ..ClientConfig::default()
        };
        RedisEnrich {
            client: RedisClient::new(addr, &config),
            timeout_emits,
            error_emits,
            wire_sink,
        }
    }
}

pub(crate) struct EnrichFuture {
    get: GetFuture,
    record: Option<Arc<Record>>,
}

impl Future for EnrichFuture {
    type Output = Result<Outputs<Enriched>, RedisError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let value = match Pin::new(&mut self.get).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(v)) => v,
        };
        let record = self.record.take().expect("polled after completion");
        let lookup = value.map_or(Lookup::Missing, Lookup::Found);
        Poll::Ready(Ok(Outputs::One(Enriched { record, lookup })))
    }
}

impl AsyncFunction for RedisEnrich {
    type In = Arc<Record>;
    type Out = Enriched;
    type Error = RedisError;
    type Future = EnrichFuture;

    fn invoke(&self, input: &Arc<Record>) -> EnrichFuture {
        EnrichFuture {
            get: self.client.get(input.key.as_bytes()),
            record: Some(input.clone()),
        }
    }

    fn timeout(&self, input: &Arc<Record>) -> Fallback<Enriched> {
        if !self.timeout_emits {
            return Fallback::Fail;
        }
        Fallback::Emit(Outputs::One(Enriched {
            record: input.clone(),
            lookup: Lookup::TimedOut,
        }))
    }

    fn close(&mut self) {
        self.client.add_wire_latency_to(&self.wire_sink);
    }

    fn on_error(&self, input: &Arc<Record>, error: &RedisError) -> Fallback<Enriched> {
        if !self.error_emits {
            return Fallback::Fail;
        }
        Fallback::Emit(Outputs::One(Enriched {
            record: input.clone(),
            lookup: Lookup::Failed(error.to_string()),
        }))
    }
}
