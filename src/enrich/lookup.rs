//! `RedisEnrich`: the stage's function for `sluice enrich`, a GET of the record's key that
//! carries the record through to the writer.
//!
//! Owns: turning a lookup (or its timeout or failure) into an `Enriched` outcome. Invariants:
//! every input yields exactly one `Enriched`, a timeout and a failed lookup included (the
//! writer applies the policy, `fail` too, in output order, so every record before a failing
//! one is written first); a bad record passes through with no lookup; the line travels in an
//! `Arc`, so a retry or a timeout never copies it.

use super::budget::Budget;
use super::record::Line;
use crate::function::{AsyncFunction, Fallback, Outputs};
use crate::redis::{ClientConfig, GetFuture, RedisClient, RedisError};
use hdrhistogram::Histogram;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// What the lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A bad record: nothing was looked up.
    NotNeeded,
    Found(Vec<u8>),
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

pub(crate) struct RedisEnrich {
    client: RedisClient,
    /// Found values count against the run's byte budget until the writer handled them.
    budget: Arc<Budget>,
    /// Where `close` adds this shard's wire times (for the summary).
    wire_sink: Arc<Mutex<Histogram<u64>>>,
}

impl RedisEnrich {
    pub(crate) fn new(
        addr: SocketAddr,
        config: &ClientConfig,
        wire_sink: Arc<Mutex<Histogram<u64>>>,
        budget: Arc<Budget>,
    ) -> Self {
        RedisEnrich {
            client: RedisClient::new(addr, config),
            budget,
            wire_sink,
        }
    }
}

pub(crate) enum EnrichFuture {
    Get(GetFuture, Option<Arc<Line>>, Arc<Budget>),
    PassThrough(Option<Arc<Line>>),
}

impl Future for EnrichFuture {
    type Output = Result<Outputs<Enriched>, RedisError>;
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

impl AsyncFunction for RedisEnrich {
    type In = Arc<Line>;
    type Out = Enriched;
    type Error = RedisError;
    type Future = EnrichFuture;

    fn invoke(&self, input: &Arc<Line>) -> EnrichFuture {
        match &**input {
            Line::Record(r) => {
                let get = self.client.get(r.key.as_bytes());
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

    fn close(&mut self) {
        self.client.add_wire_latency_to(&self.wire_sink);
    }

    fn on_error(&self, input: &Arc<Line>, error: &RedisError) -> Fallback<Enriched> {
        Fallback::Emit(Outputs::One(Enriched {
            line: input.clone(),
            lookup: Lookup::Failed(error.to_string()),
        }))
    }
}
