//! `Enrich`: the stage's function for `sluice enrich`, a lookup of the record's key through
//! the shard's lookup layer (batching, coalescing, cache) over the run's backend (Redis or an
//! HTTP API, `backend.rs`), that carries the record through to the writer.
//!
//! Owns: turning a lookup (or its timeout or failure) into an `Enriched` outcome. Invariants:
//! every input yields exactly one `Enriched`, a timeout and a failed lookup included (the
//! writer applies the policy, `fail` too, in output order, so every record before a failing
//! one is written first); a bad record passes through with no lookup; the line travels in an
//! `Arc`, so a retry or a timeout never copies it.

use super::backend::{Backend, BackendConfig, BackendError};
use super::budget::Budget;
use super::record::Line;
use crate::function::{AsyncFunction, Fallback, Outputs};
use crate::lookup::{Get, LayerConfig, LookupError, Lookups, RedisLookup, Sinks, ValueKind};
use crate::redis::cluster::RedisCluster;
use crate::redis::{ClientConfig, RedisClient};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// What the lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A bad record: nothing was looked up.
    NotNeeded,
    /// The value (shared, not copied, by the records a coalesced or cached lookup answered).
    Found(Bytes),
    Missing,
    TimedOut,
    Failed(String),
}

/// A record and its lookup, for the writer.
#[derive(Debug)]
pub struct Enriched {
    pub line: Arc<Line>,
    pub lookup: Lookup,
}

/// The error of a lookup.
pub(crate) type EnrichError = LookupError<BackendError>;

/// How a shard's backend is made: the run's backend and, for Redis, its client settings,
/// whether it is a cluster and what its keys hold.
pub(crate) struct BackendParts<'a> {
    pub backend: &'a BackendConfig,
    pub redis: &'a ClientConfig,
    pub cluster: bool,
    pub value: &'a ValueKind,
}

pub(crate) struct Enrich {
    lookups: Lookups<Backend>,
    /// Found values count against the run's byte budget until the writer handled them.
    budget: Arc<Budget>,
    /// Where `close` adds this shard's wire times and layer figures (for the summary), and
    /// where its layer figures so far are published with the operator's metrics (for
    /// `--metrics-addr`).
    sinks: Sinks,
    slot: usize,
}

impl Enrich {
    pub(crate) fn new(
        parts: BackendParts<'_>,
        layer: LayerConfig,
        sinks: Sinks,
        budget: Arc<Budget>,
    ) -> Self {
        let backend = match parts.backend {
            BackendConfig::Redis(endpoint) if parts.cluster => {
                Backend::Redis(RedisLookup::cluster(
                    RedisCluster::new(endpoint.clone(), parts.redis),
                    parts.value.clone(),
                ))
            }
            BackendConfig::Redis(endpoint) => Backend::Redis(RedisLookup::new(
                RedisClient::new(endpoint.clone(), parts.redis),
                parts.value.clone(),
            )),
            BackendConfig::Http { endpoint, client } => Backend::http(endpoint.clone(), client),
            BackendConfig::Postgres {
                endpoint, client, ..
            } => Backend::postgres(endpoint.clone(), client),
        };
        Enrich {
            lookups: Lookups::new(backend, layer),
            budget,
            slot: sinks.slot(),
            sinks,
        }
    }
}

pub(crate) enum EnrichFuture {
    Get(Get<Backend>, Option<Arc<Line>>, Arc<Budget>),
    PassThrough(Option<Arc<Line>>),
}

impl Future for EnrichFuture {
    type Output = Result<Outputs<Enriched>, EnrichError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (line, lookup) = match self.get_mut() {
            EnrichFuture::PassThrough(line) => (line.take(), Lookup::NotNeeded),
            EnrichFuture::Get(get, line, budget) => match Pin::new(get).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    budget.value_arrived(Default::default(), 0);
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(Some(value))) => {
                    let line = line.take();
                    let held = line.as_ref().map(|l| l.held()).unwrap_or_default();
                    budget.value_arrived(held, value.len() as u64);
                    (line, Lookup::Found(value))
                }
                Poll::Ready(Ok(None)) => {
                    budget.value_arrived(Default::default(), 0);
                    (line.take(), Lookup::Missing)
                }
            },
        };
        let line = line.expect("polled after completion");
        Poll::Ready(Ok(Outputs::One(Enriched { line, lookup })))
    }
}

impl AsyncFunction for Enrich {
    type In = Arc<Line>;
    type Out = Enriched;
    type Error = EnrichError;
    type Future = EnrichFuture;

    fn invoke(&self, input: &Arc<Line>) -> EnrichFuture {
        match &**input {
            Line::Record(r) => {
                let get = self.lookups.get(r.key.as_bytes());
                EnrichFuture::Get(get, Some(input.clone()), self.budget.clone())
            }
            Line::Bad(_) => EnrichFuture::PassThrough(Some(input.clone())),
        }
    }

    fn timeout(&self, input: &Arc<Line>) -> Fallback<Enriched> {
        self.budget.value_arrived(Default::default(), 0);
        Fallback::Emit(Outputs::One(Enriched {
            line: input.clone(),
            lookup: Lookup::TimedOut,
        }))
    }

    fn metrics_published(&self) {
        self.sinks.publish(self.slot, self.lookups.stats());
    }

    fn close(&mut self) {
        self.sinks.add(
            Some(self.slot),
            self.lookups.backend().wire_latency(),
            &self.lookups,
        );
    }

    fn on_error(&self, input: &Arc<Line>, error: &EnrichError) -> Fallback<Enriched> {
        Fallback::Emit(Outputs::One(Enriched {
            line: input.clone(),
            lookup: Lookup::Failed(error.to_string()),
        }))
    }
}
