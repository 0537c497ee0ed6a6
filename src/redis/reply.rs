//! `Reply`: an owned RESP2 or RESP3 reply, and the decoder that builds it from the bytes a
//! connection has read.
//!
//! Owns: the reply grammars (RESP2, and RESP3 for a connection that said `HELLO 3`). Invariants: `decode_reply` never reads past the buffer it is
//! given and never uses more of it than the first whole reply; a buffer holding only part of a
//! reply is `Ok(None)` (the caller reads more and tries again from the same start), never an
//! error; anything that cannot begin or continue a reply is an `Err` naming the byte offset
//! (the stream cannot be resynchronised after it); nesting is bounded (`MAX_DEPTH`), so a
//! hostile reply cannot exhaust the stack, and so is a bulk string's length (`MAX_BULK`); no
//! allocation is sized by a length prefix alone.
//!
//! Hand-written, like the request encoder: `redis-protocol`'s `decode_range` plus building
//! the reply from its range frames was ~5% of a shard's CPU at 64 in flight against Redis
//! (nom combinators, a UTF-8 check and a `str::parse` per length prefix). This decoder is
//! checked against that crate's on arbitrary and on well-formed input
//! (`tests/resp_decoder.rs`) and fuzzed (`fuzz/fuzz_targets/resp_reply.rs`); the speed-up is
//! in `benches/resp_decode.rs`.

use super::RedisError;

/// A decoded reply (or error reply) and the bytes it used.
pub type Decoded = (Result<Reply, RedisError>, usize);

/// Deepest nesting of arrays accepted. Redis's own replies nest a few levels at most.
pub const MAX_DEPTH: usize = 64;

/// Longest bulk string accepted: Redis's own limit on a string value (512 MiB). A longer
/// prefix is an error at once instead of a read buffer growing towards it.
pub const MAX_BULK: usize = 512 << 20;

/// Decodes the first reply in `buf`: `Ok(None)` when `buf` holds no complete reply yet,
/// otherwise the reply (a top-level error frame becomes `Err(RedisError::ErrorReply)`) and the
/// bytes it used. `Err` is a protocol violation: the stream cannot be resynchronised.
/// Shared by the connection, the blocking baseline client and the decoder's fuzz target.
pub fn decode_reply(buf: &[u8]) -> Result<Option<Decoded>, String> {
    decode(buf, Protocol::Resp2)
}

/// [`decode_reply`] in the given grammar: RESP3 adds null, booleans, doubles, big numbers,
/// blob errors, verbatim strings (their text), maps, sets (as arrays), attributes (skipped)
/// and push messages ([`Reply::Push`], which answer no request).
pub fn decode(buf: &[u8], protocol: Protocol) -> Result<Option<Decoded>, String> {
    let mut at = 0;
    Ok(parse(buf, &mut at, 0, protocol)?.map(|reply| match reply {
        // A top-level error reply is the caller's `Err`, not a `Reply`.
        Reply::Error(message) => (Err(RedisError::ErrorReply { message }), at),
        reply => (Ok(reply), at),
    }))
}

/// A RESP2 or RESP3 reply (error replies are `RedisError::ErrorReply` instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Nil,
    Status(String),
    Int(i64),
    Bulk(Vec<u8>),
    /// An array, or a RESP3 set.
    Array(Vec<Reply>),
    /// An error nested inside an array (top-level errors become `Err`).
    Error(String),
    /// RESP3: a boolean.
    Bool(bool),
    /// RESP3: a double or a big number, as the server wrote it.
    Double(String),
    BigNumber(String),
    /// RESP3: a map, its pairs in the order sent.
    Map(Vec<(Reply, Reply)>),
    /// RESP3: an out-of-band message (an invalidation, a published message), not the answer
    /// to a request.
    Push(Vec<Reply>),
}

impl Reply {
    /// A short description for error messages.
    pub fn describe(&self) -> String {
        match self {
            Reply::Nil => "nil".into(),
            Reply::Status(s) => format!("status {s}"),
            Reply::Int(i) => format!("integer {i}"),
            Reply::Bulk(b) => format!("bulk string of {} bytes", b.len()),
            Reply::Array(a) => format!("array of {}", a.len()),
            Reply::Error(e) => format!("error {e}"),
            Reply::Bool(b) => format!("boolean {b}"),
            Reply::Double(d) => format!("double {d}"),
            Reply::BigNumber(n) => format!("big number {n}"),
            Reply::Map(m) => format!("map of {}", m.len()),
            Reply::Push(p) => format!("push message of {}", p.len()),
        }
    }
}

/// The values a `GET` (`single`) or an `MGET` answered: a bulk string is a value, nil is
/// missing (what the lookup layer, on one server or a cluster, hands its records).
pub fn get_values(reply: Reply, single: bool) -> Result<Vec<Option<bytes::Bytes>>, RedisError> {
    let value = |reply: Reply, command: &'static str| match reply {
        Reply::Bulk(v) => Ok(Some(bytes::Bytes::from(v))),
        Reply::Nil => Ok(None),
        Reply::Error(message) => Err(RedisError::ErrorReply { message }),
        other => Err(RedisError::UnexpectedReply {
            command,
            got: other.describe(),
        }),
    };
    match reply {
        reply if single => Ok(vec![value(reply, "GET")?]),
        Reply::Array(items) => items.into_iter().map(|i| value(i, "MGET")).collect(),
        other => Err(RedisError::UnexpectedReply {
            command: "MGET",
            got: other.describe(),
        }),
    }
}

/// The line that starts at `from` (up to its CRLF, which may not occur before) and the
/// offset just past its CRLF; `None` while the CRLF has not arrived.
fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let rest = &buf[from.min(buf.len())..];
    let mut i = 0;
    while let Some(cr) = rest[i..].iter().position(|&b| b == b'\r') {
        let cr = i + cr;
        match rest.get(cr + 1)? {
            b'\n' => return Some((&rest[..cr], from + cr + 2)),
            _ => i = cr + 1, // a bare CR belongs to the line
        }
    }
    None
}

/// The integer on the line at `from` (`[+-]?[0-9]+`, fitting an `i64`) and the offset past
/// its CRLF.
fn integer(buf: &[u8], from: usize, what: &str) -> Result<Option<(i64, usize)>, String> {
    let Some((text, next)) = line(buf, from) else {
        return Ok(None);
    };
    let bad = || {
        format!(
            "{what} at byte {from} is not an integer: {:?}",
            String::from_utf8_lossy(&text[..text.len().min(24)])
        )
    };
    let (negative, digits) = match text.first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() {
        return Err(bad());
    }
    let mut value: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(bad());
        }
        let d = i64::from(d - b'0');
        // Accumulate negatively so that i64::MIN parses too.
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_sub(d))
            .ok_or_else(bad)?;
    }
    let value = if negative {
        value
    } else {
        value.checked_neg().ok_or_else(bad)?
    };
    Ok(Some((value, next)))
}

/// A length prefix: `Some(None)` for RESP2's null (-1), `Some(Some(n))` otherwise.
fn length(buf: &[u8], from: usize, what: &str) -> Result<Option<(Option<usize>, usize)>, String> {
    Ok(match integer(buf, from, what)? {
        None => None,
        Some((-1, next)) => Some((None, next)),
        Some((n, next)) => match usize::try_from(n) {
            Ok(n) => Some((Some(n), next)),
            Err(_) => return Err(format!("{what} at byte {from} is negative: {n}")),
        },
    })
}

/// Which grammar a connection speaks: RESP2, or RESP3 after `HELLO 3` (its extra types, push
/// messages among them, are an error in RESP2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Resp2,
    Resp3,
}

/// The bytes of a length-prefixed string whose header starts at `start` (`$`, `!` or `=`),
/// and the offset past its CRLF; `Some(None)` for RESP2's null bulk string.
/// A blob's bytes (`None`: null) and the offset past it.
type Blob<'a> = (Option<&'a [u8]>, usize);

fn blob(buf: &[u8], start: usize) -> Result<Option<Blob<'_>>, String> {
    match length(buf, start + 1, "a bulk string's length")? {
        None => Ok(None),
        Some((None, next)) => Ok(Some((None, next))),
        Some((Some(len), data)) => {
            if len > MAX_BULK {
                return Err(format!(
                    "the bulk string at byte {start} is {len} bytes, over Redis's limit of {MAX_BULK}"
                ));
            }
            let end = data + len;
            match buf.get(end..end + 2) {
                None => Ok(None),
                Some(b"\r\n") => Ok(Some((Some(&buf[data..end]), end + 2))),
                Some(_) => Err(format!(
                    "the bulk string at byte {start} ({len} bytes) is not followed by CRLF"
                )),
            }
        }
    }
}

/// The `len` replies that follow an aggregate's header (ending at `first`), or `None` while
/// they have not all arrived.
fn items(
    buf: &[u8],
    start: usize,
    first: usize,
    len: usize,
    depth: usize,
    protocol: Protocol,
) -> Result<Option<(Vec<Reply>, usize)>, String> {
    if depth == MAX_DEPTH {
        return Err(format!(
            "the array at byte {start} nests deeper than {MAX_DEPTH} arrays"
        ));
    }
    // Each element takes at least 3 bytes (`+\r\n`): what has arrived bounds the allocation,
    // not the prefix.
    let mut items = Vec::with_capacity(len.min(buf.len().saturating_sub(first) / 3));
    let mut at = first;
    for _ in 0..len {
        match parse(buf, &mut at, depth + 1, protocol)? {
            Some(item) => items.push(item),
            None => return Ok(None),
        }
    }
    Ok(Some((items, at)))
}

/// Parses the reply at `*at`, advancing `*at` past it when it is whole. Over 70 lines: one
/// arm per RESP type in one match, as the protocol lists them, on the per-reply path.
fn parse(
    buf: &[u8],
    at: &mut usize,
    depth: usize,
    protocol: Protocol,
) -> Result<Option<Reply>, String> {
    let start = *at;
    let Some(&kind) = buf.get(start) else {
        return Ok(None);
    };
    let text = |s: &[u8]| String::from_utf8_lossy(s).into_owned();
    let resp3 = protocol == Protocol::Resp3;
    let (reply, next) = match kind {
        b'+' | b'-' => {
            let Some((s, next)) = line(buf, start + 1) else {
                return Ok(None);
            };
            let reply = if kind == b'+' {
                Reply::Status(text(s))
            } else {
                Reply::Error(text(s))
            };
            (reply, next)
        }
        b':' => match integer(buf, start + 1, "an integer reply")? {
            Some((i, next)) => (Reply::Int(i), next),
            None => return Ok(None),
        },
        b'$' => match blob(buf, start)? {
            None => return Ok(None),
            Some((None, next)) => (Reply::Nil, next),
            Some((Some(data), next)) => (Reply::Bulk(data.to_vec()), next),
        },
        b'*' | b'~' | b'>' | b'%' | b'|' if kind == b'*' || resp3 => {
            let what = "an aggregate's length";
            let (len, first) = match length(buf, start + 1, what)? {
                None => return Ok(None),
                Some((None, next)) if kind == b'*' => {
                    *at = next;
                    return Ok(Some(Reply::Nil));
                }
                Some((None, _)) => return Err(format!("{what} at byte {start} is negative: -1")),
                Some((Some(len), first)) => (len, first),
            };
            // A map or an attribute holds `len` pairs.
            let paired = matches!(kind, b'%' | b'|');
            let count = if paired {
                len.checked_mul(2)
                    .ok_or_else(|| format!("the map at byte {start} is too long: {len}"))?
            } else {
                len
            };
            let Some((mut list, next)) = items(buf, start, first, count, depth, protocol)? else {
                return Ok(None);
            };
            match kind {
                b'>' => (Reply::Push(list), next),
                b'%' => {
                    let mut pairs = Vec::with_capacity(len);
                    let mut it = list.drain(..);
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    (Reply::Map(pairs), next)
                }
                // An attribute describes the reply that follows it: skipped.
                b'|' => {
                    *at = next;
                    return match parse(buf, at, depth + 1, protocol)? {
                        Some(reply) => Ok(Some(reply)),
                        None => {
                            *at = start;
                            Ok(None)
                        }
                    };
                }
                _ => (Reply::Array(list), next),
            }
        }
        b'_' | b'#' | b',' | b'(' if resp3 => {
            let Some((s, next)) = line(buf, start + 1) else {
                return Ok(None);
            };
            let reply = match (kind, s) {
                (b'_', b"") => Reply::Nil,
                (b'#', b"t") => Reply::Bool(true),
                (b'#', b"f") => Reply::Bool(false),
                (b',', _) => Reply::Double(text(s)),
                (b'(', _) if !s.is_empty() => Reply::BigNumber(text(s)),
                _ => {
                    return Err(format!(
                        "the reply at byte {start} is not a well-formed {:?}: {:?}",
                        kind as char,
                        String::from_utf8_lossy(&s[..s.len().min(24)])
                    ))
                }
            };
            (reply, next)
        }
        b'!' | b'=' if resp3 => match blob(buf, start)? {
            None => return Ok(None),
            Some((None, _)) => return Err(format!("the blob at byte {start} has length -1")),
            Some((Some(data), next)) if kind == b'!' => (Reply::Error(text(data)), next),
            // A verbatim string: a three-letter format and a colon, then the text.
            Some((Some(data), next)) => match data.get(3) {
                Some(b':') => (Reply::Bulk(data[4..].to_vec()), next),
                _ => {
                    return Err(format!(
                        "the verbatim string at byte {start} has no format prefix"
                    ))
                }
            },
        },
        other => {
            let grammar = if resp3 { "RESP3" } else { "RESP2" };
            return Err(format!(
                "byte {start} (0x{other:02x}) does not begin a {grammar} reply"
            ));
        }
    };
    *at = next;
    Ok(Some(reply))
}
