//! `HttpLookup`: an HTTP API as the lookup layer's backend. A key is a request target (the
//! path and query, `/users/42`), optionally followed by `BODY_SEPARATOR` (a NUL byte, which no
//! target holds) and a request body; its value is the response body. The layer's coalescing,
//! cache, limits and breaker then apply to HTTP as to Redis, keyed on target and body.
//!
//! Owns: turning keys into requests. Invariants: one request per key (HTTP has no multi-get;
//! a batch's keys go out at once, each on its own pooled connection, and the batch answers in
//! key order); the status policy is the client's (2xx a value, 404 missing, 429 and 503
//! retryable, other statuses an error); a busy answer with `Retry-After` fails only after that
//! long (at most `MAX_RETRY_AFTER`), so that a retry policy's next attempt comes no sooner
//! than the server asked.

use super::{BatchLookup, Values};
use crate::http::{HttpClient, HttpError};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// The longest `Retry-After` waited for; a record's timeout ends the wait sooner.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Between a key's request target and its body.
pub const BODY_SEPARATOR: u8 = 0;

/// One request for `key` (a target, or a target and a body); a busy answer waits out its
/// `Retry-After` before it fails.
async fn request(client: HttpClient, key: Vec<u8>) -> Result<Option<Bytes>, HttpError> {
    let answer = match key.iter().position(|&b| b == BODY_SEPARATOR) {
        Some(at) => client.request(&key[..at], Some(&key[at + 1..])).await,
        None => client.request(&key, None).await,
    };
    if let Err(e) = &answer {
        if let Some(wait) = e.retry_after() {
            glommio::timer::sleep(wait.min(MAX_RETRY_AFTER)).await;
        }
    }
    answer
}

/// See the module documentation.
pub struct HttpLookup {
    client: HttpClient,
}

impl HttpLookup {
    pub fn new(client: HttpClient) -> HttpLookup {
        HttpLookup { client }
    }

    pub fn client(&self) -> &HttpClient {
        &self.client
    }
}

/// A batch's answer.
pub type HttpFuture = Pin<Box<dyn Future<Output = Result<Values, HttpError>>>>;

impl BatchLookup for HttpLookup {
    type Error = HttpError;
    type Future = HttpFuture;

    fn get_many(&self, keys: &[&[u8]]) -> HttpFuture {
        let requests: Vec<_> = keys
            .iter()
            .map(|key| request(self.client.clone(), key.to_vec()))
            .collect();
        Box::pin(futures::future::try_join_all(requests))
    }

    fn get_one(&self, key: &[u8]) -> HttpFuture {
        let answer = request(self.client.clone(), key.to_vec());
        Box::pin(async move { Ok(vec![answer.await?]) })
    }
}
