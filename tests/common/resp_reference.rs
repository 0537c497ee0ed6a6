//! The reference RESP2 reply decoder: `redis-protocol`'s, as the client used it until session
//! 6. Shared by `tests/resp_decoder.rs` (which checks the hand-written decoder agrees with it)
//! and `benches/resp_decode.rs` (which measures the two side by side).

use redis_protocol::resp2::decode::decode_range;
use redis_protocol::resp2::types::RangeFrame;
use sluice::redis::{Decoded, RedisError, Reply};

/// What `redis-protocol` decodes from `buf`, as a `Reply`, in `decode_reply`'s shape.
pub fn reference(buf: &[u8]) -> Result<Option<Decoded>, String> {
    fn build(buf: &[u8], frame: &RangeFrame) -> Reply {
        let text = |(s, e): (usize, usize)| String::from_utf8_lossy(&buf[s..e]).into_owned();
        match frame {
            RangeFrame::SimpleString(r) => Reply::Status(text(*r)),
            RangeFrame::Error(r) => Reply::Error(text(*r)),
            RangeFrame::Integer(i) => Reply::Int(*i),
            RangeFrame::BulkString((s, e)) => Reply::Bulk(buf[*s..*e].to_vec()),
            RangeFrame::Array(items) => Reply::Array(items.iter().map(|f| build(buf, f)).collect()),
            RangeFrame::Null => Reply::Nil,
        }
    }
    Ok(decode_range(buf)
        .map_err(|e| e.to_string())?
        .map(|(frame, used)| {
            let reply = match build(buf, &frame) {
                Reply::Error(message) => Err(RedisError::ErrorReply { message }),
                other => Ok(other),
            };
            (reply, used)
        }))
}
