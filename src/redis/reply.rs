//! `Reply`: an owned RESP2 reply, built from `redis-protocol`'s zero-copy range frames.

use super::RedisError;
use redis_protocol::resp2::decode::decode_range;
use redis_protocol::resp2::types::RangeFrame;

/// A decoded reply (or error reply) and the bytes it used.
pub type Decoded = (Result<Reply, RedisError>, usize);

/// Decodes the first reply in `buf`: `Ok(None)` when `buf` holds no complete reply yet,
/// otherwise the reply (a top-level error frame becomes `Err(RedisError::ErrorReply)`) and the
/// bytes it used. `Err` is a protocol violation: the stream cannot be resynchronised.
/// Shared by the connection and the decoder's fuzz target.
pub fn decode_reply(buf: &[u8]) -> Result<Option<Decoded>, String> {
    let (frame, used) = match decode_range(buf) {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    assert!(
        used <= buf.len(),
        "the decoder used more bytes than it was given"
    );
    let reply = match &frame {
        RangeFrame::Error((s, e)) => Err(RedisError::ErrorReply {
            message: String::from_utf8_lossy(&buf[*s..*e]).into_owned(),
        }),
        _ => Ok(Reply::from_frame(buf, &frame)),
    };
    Ok(Some((reply, used)))
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
    /// Builds a reply from a frame whose ranges index `buf`.
    pub(crate) fn from_frame(buf: &[u8], frame: &RangeFrame) -> Reply {
        let text = |(s, e): (usize, usize)| String::from_utf8_lossy(&buf[s..e]).into_owned();
        match frame {
            RangeFrame::SimpleString(r) => Reply::Status(text(*r)),
            RangeFrame::Error(r) => Reply::Error(text(*r)),
            RangeFrame::Integer(i) => Reply::Int(*i),
            RangeFrame::BulkString((s, e)) => Reply::Bulk(buf[*s..*e].to_vec()),
            RangeFrame::Array(items) => {
                Reply::Array(items.iter().map(|f| Reply::from_frame(buf, f)).collect())
            }
            RangeFrame::Null => Reply::Nil,
        }
    }

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
