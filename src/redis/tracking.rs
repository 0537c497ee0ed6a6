//! `Invalidations`: what a client's connections heard from the server about keys written since
//! they read them (Redis client tracking: `CLIENT TRACKING ON` after `HELLO 3`, invalidations
//! as RESP3 push messages on the same connection), for a cache in front of the client to drop.
//!
//! Owns: the keys invalidated and not yet taken, and whether everything must go. Invariants:
//! a key the server invalidated is handed out by the next [`Invalidations::take`]; "everything"
//! (the server flushed, or a tracking connection was lost, so invalidations may have been
//! missed) supersedes the keys taken with it; a push message that is not an invalidation is
//! ignored.

use super::Reply;
use std::cell::{Cell, RefCell};

/// What was invalidated since the last [`Invalidations::take`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidated {
    /// These keys were written (or expired, or were evicted) on the server.
    Keys(Vec<Vec<u8>>),
    /// Anything may have changed: the server was flushed, or a connection that tracked
    /// keys was lost.
    All,
}

/// See the module documentation. Shared by the connections of one client (one shard).
#[derive(Debug, Default)]
pub struct Invalidations {
    keys: RefCell<Vec<Vec<u8>>>,
    all: Cell<bool>,
    /// Something is waiting to be taken (a check that costs no borrow).
    pending: Cell<bool>,
    /// Keys invalidated and times everything was, since the start.
    keys_seen: Cell<u64>,
    flushes: Cell<u64>,
}

impl Invalidations {
    /// Takes what was invalidated since the last call, if anything.
    pub fn take(&self) -> Option<Invalidated> {
        if !self.pending.replace(false) {
            return None;
        }
        let keys = std::mem::take(&mut *self.keys.borrow_mut());
        Some(if self.all.replace(false) {
            Invalidated::All
        } else {
            Invalidated::Keys(keys)
        })
    }

    /// Keys the server invalidated, and times everything was, since the client started.
    pub fn counts(&self) -> (u64, u64) {
        (self.keys_seen.get(), self.flushes.get())
    }

    /// Everything goes.
    pub(crate) fn flush_all(&self) {
        self.all.set(true);
        self.pending.set(true);
        self.flushes.set(self.flushes.get() + 1);
    }

    /// A push message: `["invalidate", [key, ...]]`, or `["invalidate", nil]` when the server
    /// was flushed.
    pub(crate) fn push(&self, message: Vec<Reply>) {
        let mut parts = message.into_iter();
        if !matches!(parts.next(), Some(Reply::Bulk(kind)) if kind == b"invalidate") {
            return;
        }
        match parts.next() {
            Some(Reply::Array(keys)) => {
                let mut taken = self.keys.borrow_mut();
                for key in keys {
                    if let Reply::Bulk(key) = key {
                        taken.push(key);
                        self.keys_seen.set(self.keys_seen.get() + 1);
                    }
                }
                self.pending.set(true);
            }
            _ => self.flush_all(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalidate(keys: Option<&[&str]>) -> Vec<Reply> {
        let keys = match keys {
            Some(k) => Reply::Array(k.iter().map(|k| Reply::Bulk(k.as_bytes().into())).collect()),
            None => Reply::Nil,
        };
        vec![Reply::Bulk(b"invalidate".to_vec()), keys]
    }

    #[test]
    fn keys_are_taken_once_and_a_flush_supersedes_them() {
        let inv = Invalidations::default();
        assert_eq!(inv.take(), None);
        inv.push(invalidate(Some(&["a", "b"])));
        inv.push(invalidate(Some(&["c"])));
        assert_eq!(
            inv.take(),
            Some(Invalidated::Keys(vec![
                b"a".to_vec(),
                b"b".to_vec(),
                b"c".to_vec()
            ]))
        );
        assert_eq!(inv.take(), None);
        inv.push(invalidate(Some(&["d"])));
        inv.push(invalidate(None));
        assert_eq!(inv.take(), Some(Invalidated::All));
        assert_eq!(inv.take(), None);
        // Other push messages (a published message) are not invalidations.
        inv.push(vec![
            Reply::Bulk(b"message".to_vec()),
            Reply::Bulk(b"x".to_vec()),
        ]);
        assert_eq!(inv.take(), None);
        assert_eq!(inv.counts(), (4, 1));
    }
}
