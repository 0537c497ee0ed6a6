//! `Reply`: an owned RESP2 reply, and the decoder that builds it from the bytes a connection
//! has read.
//!
//! Owns: the RESP2 reply grammar. Invariants: `decode_reply` never reads past the buffer it is
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
    let mut at = 0;
    Ok(parse(buf, &mut at, 0)?.map(|reply| match reply {
        // A top-level error reply is the caller's `Err`, not a `Reply`.
        Reply::Error(message) => (Err(RedisError::ErrorReply { message }), at),
        reply => (Ok(reply), at),
    }))
}

/// A RESP2 reply (error replies are `RedisError::ErrorReply` instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Nil,
    Status(String),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Reply>),
    /// An error nested inside an array (top-level errors become `Err`).
    Error(String),
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
        }
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

/// Parses the reply at `*at`, advancing `*at` past it when it is whole. Over 70 lines: one
/// arm per RESP2 type in one match, as the protocol lists them, on the per-reply path.
fn parse(buf: &[u8], at: &mut usize, depth: usize) -> Result<Option<Reply>, String> {
    let start = *at;
    let Some(&kind) = buf.get(start) else {
        return Ok(None);
    };
    let text = |s: &[u8]| String::from_utf8_lossy(s).into_owned();
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
        b'$' => match length(buf, start + 1, "a bulk string's length")? {
            None => return Ok(None),
            Some((None, next)) => (Reply::Nil, next),
            Some((Some(len), data)) => {
                if len > MAX_BULK {
                    return Err(format!(
                        "the bulk string at byte {start} is {len} bytes, over Redis's limit of {MAX_BULK}"
                    ));
                }
                let end = data + len;
                match buf.get(end..end + 2) {
                    None => return Ok(None),
                    Some(b"\r\n") => (Reply::Bulk(buf[data..end].to_vec()), end + 2),
                    Some(_) => {
                        return Err(format!(
                            "the bulk string at byte {start} ({len} bytes) is not followed by CRLF"
                        ))
                    }
                }
            }
        },
        b'*' => match length(buf, start + 1, "an array's length")? {
            None => return Ok(None),
            Some((None, next)) => (Reply::Nil, next),
            Some((Some(len), first)) => {
                if depth == MAX_DEPTH {
                    return Err(format!(
                        "the array at byte {start} nests deeper than {MAX_DEPTH} arrays"
                    ));
                }
                // Each element takes at least 3 bytes (`+\r\n`): what has arrived bounds
                // the allocation, not the prefix.
                let mut items = Vec::with_capacity(len.min((buf.len() - first) / 3));
                *at = first;
                for _ in 0..len {
                    match parse(buf, at, depth + 1)? {
                        Some(item) => items.push(item),
                        None => {
                            *at = start;
                            return Ok(None);
                        }
                    }
                }
                (Reply::Array(items), *at)
            }
        },
        other => {
            return Err(format!(
                "byte {start} (0x{other:02x}) does not begin a RESP2 reply"
            ))
        }
    };
    *at = next;
    Ok(Some(reply))
}
