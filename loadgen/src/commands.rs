//! The RESP2 commands the lookup server answers, as a real client expects them.
//!
//! Owns: command semantics and reply encoding. Invariant: every command gets exactly one reply
//! frame (or the connection closes), so pipelined replies match requests in order.
//! Replies are appended to the caller's buffer (the connection's outbox), encoded with
//! `redis-protocol`'s encoder, except GET's bulk string, the hot path, which is written
//! directly from the keyspace (the crate's encoder sizes the reply with a floating-point
//! `log10` and needs a zero-filled slice to encode into).

use crate::keyspace::Keyspace;
use crate::server::ServerStats;
use redis_protocol::resp2::encode::encode_borrowed;
use redis_protocol::resp2::types::BorrowedFrame;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Values written with `SET`, shared by all shards; checked before the generated keyspace.
pub(crate) type Overlay = Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>;

/// What the connection does after a command's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    Close,
}

/// Appends `frame` to `out`.
fn encode(out: &mut Vec<u8>, frame: &BorrowedFrame<'_>) {
    let start = out.len();
    out.resize(start + frame.encode_len(false), 0);
    let n = encode_borrowed(&mut out[start..], frame, false).expect("buffer sized by encode_len");
    out.truncate(start + n);
}

/// Appends `$<len>\r\n<value>\r\n` to `out`.
fn bulk_string(out: &mut Vec<u8>, value: &[u8]) {
    use std::io::Write;
    out.reserve(value.len() + 25); // a length has at most 20 digits
    write!(out, "${}\r\n", value.len()).expect("writing to a Vec cannot fail");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn error(out: &mut Vec<u8>, message: &str) {
    encode(out, &BorrowedFrame::Error(message))
}

fn ok(out: &mut Vec<u8>) {
    encode(out, &BorrowedFrame::SimpleString(b"OK"))
}

/// Room for a command name upper-cased on the stack; a longer name is no command the server
/// knows (its longest, `COMMAND`, has 7 bytes).
const MAX_NAME: usize = 16;

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

    /// Answers an HTTP request for `target` (`/KEY`, percent-encoded): the value as a JSON
    /// body with its length, or 404; any method but GET and HEAD is 405. The connection stays
    /// open (HTTP/1.1 keep-alive).
    pub(crate) fn http_get(&self, method: &[u8], target: &[u8], out: &mut Vec<u8>) {
        use std::io::Write;
        if method != b"GET" && method != b"HEAD" {
            out.extend_from_slice(
                b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Length: 0\r\n\r\n",
            );
            return;
        }
        self.stats.gets.fetch_add(1, Ordering::Relaxed);
        let path = target.split(|&b| b == b'?').next().unwrap_or(target);
        let path = path.strip_prefix(b"/").unwrap_or(path);
        // Keys without escapes (loadgen's own) are looked up where they lie.
        let key = match path.contains(&b'%') {
            true => std::borrow::Cow::Owned(percent_decode(path)),
            false => std::borrow::Cow::Borrowed(path),
        };
        let body = method == b"GET";
        let found = self.lookup(&key, |v| {
            out.extend_from_slice(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ",
            );
            write!(out, "{}\r\n\r\n", v.len()).expect("writing to a Vec cannot fail");
            if body {
                out.extend_from_slice(v);
            }
        });
        self.count_lookup(found.is_some());
        if found.is_none() {
            out.extend_from_slice(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        }
    }

    /// Runs one command (`args[0]` is its name) and appends its reply to `out`. Over 70 lines:
    /// one arm per command, as a dispatch table reads.
    pub(crate) fn execute(&self, args: &[&[u8]], out: &mut Vec<u8>) -> Flow {
        let Some(name) = args.first() else {
            error(out, "ERR empty command");
            return Flow::Continue;
        };
        // Upper-cased on the stack: no allocation per command. A longer name is no command.
        let mut upper = [0u8; MAX_NAME];
        let name: &[u8] = match upper.get_mut(..name.len()) {
            Some(upper) => {
                upper.copy_from_slice(name);
                upper.make_ascii_uppercase();
                upper
            }
            None => b"",
        };
        match (name, args.len()) {
            (b"GET", 2) => {
                self.stats.gets.fetch_add(1, Ordering::Relaxed);
                let hit = self.lookup(args[1], |v| bulk_string(out, v)).is_some();
                self.count_lookup(hit);
                if !hit {
                    encode(out, &BorrowedFrame::Null);
                }
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
                encode(out, &BorrowedFrame::Array(&frames));
            }
            (b"SET", 3) => {
                self.overlay
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(args[1].to_vec(), args[2].to_vec());
                self.stats.sets.fetch_add(1, Ordering::Relaxed);
                ok(out);
            }
            (b"PING", 1) => encode(out, &BorrowedFrame::SimpleString(b"PONG")),
            (b"PING", 2) | (b"ECHO", 2) => encode(out, &BorrowedFrame::BulkString(args[1])),
            (b"DBSIZE", 1) => {
                let overlay = self.overlay.lock().unwrap_or_else(|p| p.into_inner());
                let extra = overlay
                    .keys()
                    .filter(|k| self.keyspace.get(k).is_none())
                    .count() as u64;
                encode(
                    out,
                    &BorrowedFrame::Integer((self.keyspace.len() + extra) as i64),
                );
            }
            (b"HELLO", 1) => hello(out),
            (b"HELLO", _) if args[1] == b"2" => hello(out),
            (b"HELLO", _) => error(out, "NOPROTO this server speaks RESP2 only"),
            (b"CLIENT", n) if n >= 2 => match args[1].to_ascii_uppercase().as_slice() {
                b"ID" => encode(out, &BorrowedFrame::Integer(1)),
                b"GETNAME" => encode(out, &BorrowedFrame::Null),
                _ => ok(out), // SETNAME, SETINFO, NO-EVICT, ...: accepted
            },
            (b"SELECT", 2) if args[1] == b"0" => ok(out),
            (b"SELECT", 2) => error(out, "ERR DB index is out of range"),
            (b"COMMAND", _) => encode(out, &BorrowedFrame::Array(&[])),
            (b"INFO", _) => {
                let info = format!(
                    "# Server\r\nredis_version:7.0.0-loadgen\r\nredis_mode:standalone\r\n\
                     # Stats\r\nloadgen_gets:{}\r\n",
                    self.stats.gets.load(Ordering::Relaxed)
                );
                encode(out, &BorrowedFrame::BulkString(info.as_bytes()));
            }
            (b"QUIT", _) => {
                ok(out);
                return Flow::Close;
            }
            (b"GET" | b"SET" | b"PING" | b"DBSIZE" | b"ECHO" | b"SELECT", _) => {
                let name = String::from_utf8_lossy(name).to_lowercase();
                error(
                    out,
                    &format!("ERR wrong number of arguments for '{name}' command"),
                );
            }
            _ => {
                let shown = String::from_utf8_lossy(args[0]);
                error(out, &format!("ERR unknown command '{shown}'"));
            }
        }
        Flow::Continue
    }
}

fn hello(out: &mut Vec<u8>) {
    encode(
        out,
        &BorrowedFrame::Array(&[
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
        ]),
    )
}

/// `%XX` escapes decoded (a malformed escape is kept as it is).
fn percent_decode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            text[i],
            text.get(i + 1).copied().and_then(hex),
            text.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_strings_match_the_crates_encoder() {
        for value in [&b""[..], b"x", b"\r\n binary \0 bytes", &[b'v'; 1000]] {
            // Appended after what the buffer already holds, as replies are.
            let (mut ours, mut theirs) = (b"+OK\r\n".to_vec(), b"+OK\r\n".to_vec());
            bulk_string(&mut ours, value);
            encode(&mut theirs, &BorrowedFrame::BulkString(value));
            assert_eq!(ours, theirs, "{value:?}");
        }
    }
}
