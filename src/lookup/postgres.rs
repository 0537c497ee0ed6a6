//! `PostgresLookup`: a PostgreSQL table as the lookup layer's backend. A key is one execution's
//! parameters (separated by `PARAM_SEPARATOR`), its value the row as a JSON object; a batch is
//! one execution of the batch query (`= ANY($1)`) when one was given. The layer's coalescing,
//! cache, limits and breaker then apply to PostgreSQL as to Redis.
//!
//! Owns: turning a batch of keys into executions. Invariant: a batch answers in key order,
//! one value per key, whether it is one execution of the batch query or one of the query per
//! key (without a batch query).

use super::{BatchLookup, Values};
use crate::postgres::{PgClient, PgError, PgFuture};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// See the module documentation.
pub struct PostgresLookup {
    client: PgClient,
}

impl PostgresLookup {
    pub fn new(client: PgClient) -> PostgresLookup {
        PostgresLookup { client }
    }

    pub fn client(&self) -> &PgClient {
        &self.client
    }
}

/// A batch's answer: one execution, or one per key joined.
pub enum PostgresFuture {
    One(PgFuture),
    Each(Pin<Box<dyn Future<Output = Result<Values, PgError>>>>),
}

impl Future for PostgresFuture {
    type Output = Result<Values, PgError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            PostgresFuture::One(f) => Pin::new(f).poll(cx),
            PostgresFuture::Each(f) => f.as_mut().poll(cx),
        }
    }
}

impl BatchLookup for PostgresLookup {
    type Error = PgError;
    type Future = PostgresFuture;

    fn get_many(&self, keys: &[&[u8]]) -> PostgresFuture {
        if self.client.has_batch_query() || keys.len() == 1 {
            return if keys.len() == 1 {
                PostgresFuture::One(self.client.get(keys[0]))
            } else {
                PostgresFuture::One(self.client.get_batch(keys))
            };
        }
        let each: Vec<_> = keys.iter().map(|k| self.client.get(k)).collect();
        PostgresFuture::Each(Box::pin(async move {
            let answers = futures::future::try_join_all(each).await?;
            Ok(answers.into_iter().flatten().collect())
        }))
    }

    fn get_one(&self, key: &[u8]) -> PostgresFuture {
        PostgresFuture::One(self.client.get(key))
    }
}
