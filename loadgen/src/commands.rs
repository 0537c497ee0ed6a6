//! The RESP2 commands the lookup server answers, as a real client expects them.
//!
//! Owns: command semantics and reply encoding. Invariant: every command gets exactly one reply
//! frame (or the connection closes), so pipelined replies match requests in order.
//! Replies are encoded with `redis-protocol`'s encoder, except GET's bulk string, the hot path,
//! which is written directly into a buffer of its exact size (the crate's encoder sizes the
//! reply with a floating-point `log10` and zero-fills the buffer before encoding into it).

use crate::keyspace::Keyspace;
use crate::server::ServerStats;
use redis_protocol::resp2::encode::encode_borrowed;
use redis_protocol::resp2::types::BorrowedFrame;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Values written with `SET`, shared by all shards; checked before the generated keyspace.
pub(crate) type Overlay = Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>;

/// What the connection does after a command.
pub(crate) enum Action {
    Reply(Vec<u8>),
    ReplyAndClose(Vec<u8>),
}

fn encode(frame: &BorrowedFrame<'_>) -> Vec<u8> {
    let mut buf = vec![0; frame.encode_len(false)];
    let n = encode_borrowed(&mut buf, frame, false).expect("buffer sized by encode_len");
    buf.truncate(n);
    buf
}

/// `$<len>\r\n<value>\r\n`, allocated once (a length has at most 20 digits).
fn bulk_string(value: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::with_capacity(value.len() + 25);
    write!(out, "${}\r\n", value.len()).expect("writing to a Vec cannot fail");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
    out
}

fn error(message: &str) -> Vec<u8> {
    encode(&BorrowedFrame::Error(message))
}

fn ok() -> Vec<u8> {
    encode(&BorrowedFrame::SimpleString(b"OK"))
}

pub(crate) struct Context<'a> {
    pub(crate) keyspace: &'a Keyspace,
    pub(crate) overlay: &'a Overlay,
    pub(crate) stats: &'a ServerStats,
}

impl Context<'_> {
    /// `f` applied to `key`'s value (a value written with SET first, then the keyspace),
    /// without copying the value out.
    fn lookup<R>(&self, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        if self.stats.sets.load(Ordering::Relaxed) > 0 {
            let overlay = self.overlay.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = overlay.get(key) {
                return Some(f(v));
            }
        }
        self.keyspace.get(key).map(f)
    }

    fn count_lookup(&self, hit: bool) {
        let counter = if hit {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs one command (`args[0]` is its name).
    pub(crate) fn execute(&self, args: &[&[u8]]) -> Action {
        let Some(name) = args.first() else {
            return Action::Reply(error("ERR empty command"));
        };
        let name = name.to_ascii_uppercase();
        let reply = match (name.as_slice(), args.len()) {
            (b"GET", 2) => {
                self.stats.gets.fetch_add(1, Ordering::Relaxed);
                let reply = self.lookup(args[1], bulk_string);
                self.count_lookup(reply.is_some());
                reply.unwrap_or_else(|| encode(&BorrowedFrame::Null))
            }
            (b"MGET", n) if n >= 2 => {
                self.stats.gets.fetch_add(n as u64 - 1, Ordering::Relaxed);
                let values: Vec<Option<Vec<u8>>> = args[1..]
                    .iter()
                    .map(|k| self.lookup(k, <[u8]>::to_vec))
                    .collect();
                let frames: Vec<BorrowedFrame<'_>> = values
                    .iter()
                    .map(|v| {
                        self.count_lookup(v.is_some());
                        match v {
                            Some(v) => BorrowedFrame::BulkString(v),
                            None => BorrowedFrame::Null,
                        }
                    })
                    .collect();
                encode(&BorrowedFrame::Array(&frames))
            }
            (b"SET", 3) => {
                self.overlay
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(args[1].to_vec(), args[2].to_vec());
                self.stats.sets.fetch_add(1, Ordering::Relaxed);
                ok()
            }
            (b"PING", 1) => encode(&BorrowedFrame::SimpleString(b"PONG")),
            (b"PING", 2) | (b"ECHO", 2) => encode(&BorrowedFrame::BulkString(args[1])),
            (b"DBSIZE", 1) => {
                let overlay = self.overlay.lock().unwrap_or_else(|p| p.into_inner());
                let extra = overlay
                    .keys()
                    .filter(|k| self.keyspace.get(k).is_none())
                    .count() as u64;
                encode(&BorrowedFrame::Integer(
                    (self.keyspace.len() + extra) as i64,
                ))
            }
            (b"HELLO", 1) => hello(),
            (b"HELLO", _) if args[1] == b"2" => hello(),
            (b"HELLO", _) => error("NOPROTO this server speaks RESP2 only"),
            (b"CLIENT", n) if n >= 2 => {
                let sub = args[1].to_ascii_uppercase();
                match sub.as_slice() {
                    b"ID" => encode(&BorrowedFrame::Integer(1)),
                    b"GETNAME" => encode(&BorrowedFrame::Null),
                    _ => ok(), // SETNAME, SETINFO, NO-EVICT, ...: accepted
                }
            }
            (b"SELECT", 2) if args[1] == b"0" => ok(),
            (b"SELECT", 2) => error("ERR DB index is out of range"),
            (b"COMMAND", _) => encode(&BorrowedFrame::Array(&[])),
            (b"INFO", _) => {
                let info = format!(
                    "# Server\r\nredis_version:7.0.0-loadgen\r\nredis_mode:standalone\r\n\
                     # Stats\r\nloadgen_gets:{}\r\n",
                    self.stats.gets.load(Ordering::Relaxed)
                );
                encode(&BorrowedFrame::BulkString(info.as_bytes()))
            }
            (b"QUIT", _) => return Action::ReplyAndClose(ok()),
            (b"GET" | b"SET" | b"PING" | b"DBSIZE" | b"ECHO" | b"SELECT", _) => {
                let name = String::from_utf8_lossy(&name).to_lowercase();
                error(&format!(
                    "ERR wrong number of arguments for '{name}' command"
                ))
            }
            _ => {
                let shown = String::from_utf8_lossy(args[0]);
                error(&format!("ERR unknown command '{shown}'"))
            }
        };
        Action::Reply(reply)
    }
}

fn hello() -> Vec<u8> {
    encode(&BorrowedFrame::Array(&[
        BorrowedFrame::BulkString(b"server"),
        BorrowedFrame::BulkString(b"redis"),
        BorrowedFrame::BulkString(b"version"),
        BorrowedFrame::BulkString(b"7.0.0"),
        BorrowedFrame::BulkString(b"proto"),
        BorrowedFrame::Integer(2),
        BorrowedFrame::BulkString(b"id"),
        BorrowedFrame::Integer(1),
        BorrowedFrame::BulkString(b"mode"),
        BorrowedFrame::BulkString(b"standalone"),
        BorrowedFrame::BulkString(b"role"),
        BorrowedFrame::BulkString(b"master"),
        BorrowedFrame::BulkString(b"modules"),
        BorrowedFrame::Array(&[]),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_strings_match_the_crates_encoder() {
        for value in [&b""[..], b"x", b"\r\n binary \0 bytes", &[b'v'; 1000]] {
            assert_eq!(
                bulk_string(value),
                encode(&BorrowedFrame::BulkString(value)),
                "{value:?}"
            );
        }
    }
}
