//! The Redis client as a [`BatchLookup`]: `GET` for one key (batching off), `MGET` for a batch,
//! and client tracking's invalidations (with `ClientConfig::tracking`) for the layer's cache.
//!
//! Owns: the mapping of replies to values. Invariant: with batching on every request is an
//! `MGET`, even of one key, so a run's semantics do not depend on how its batches fell: `MGET`
//! answers nil for a key that holds a non-string value, which reads as missing, where `GET`
//! (batching off) fails the record with Redis's `WRONGTYPE` error.

use super::{BatchLookup, Invalidated, Values};
use crate::redis::{get_values, RedisClient, RedisError, ReplyFuture};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

impl BatchLookup for RedisClient {
    type Error = RedisError;
    type Future = RedisValues;

    fn get_many(&self, keys: &[&[u8]]) -> RedisValues {
        let mut args: Vec<&[u8]> = Vec::with_capacity(keys.len() + 1);
        args.push(b"MGET");
        args.extend_from_slice(keys);
        RedisValues {
            reply: self.command_of_keys(&args, keys.len()),
            single: false,
        }
    }

    fn get_one(&self, key: &[u8]) -> RedisValues {
        RedisValues {
            reply: self.command(&[b"GET", key]),
            single: true,
        }
    }

    fn invalidated(&self) -> Option<Invalidated> {
        self.invalidations()?.take()
    }
}

/// The values of a `GET` or `MGET`.
pub struct RedisValues {
    reply: ReplyFuture,
    /// A `GET` (else an `MGET`).
    single: bool,
}

impl Future for RedisValues {
    type Output = Result<Values, RedisError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let single = self.single;
        Pin::new(&mut self.reply)
            .poll(cx)
            .map(|r| get_values(r?, single))
    }
}
