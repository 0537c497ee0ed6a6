//! An HTTP/1.1 response read from bytes: the head parsed with `httparse`, the body framed by
//! `Content-Length`, by chunked transfer coding, or by the end of the connection.
//!
//! Owns: turning bytes into a complete response or "need more". Invariants: nothing is taken
//! as complete before every byte of its framing arrived (a partial head, a partial chunk, a
//! body shorter than its length are `None`, never a truncated body); a response that cannot be
//! framed (two different lengths, a length that is not a number, a chunk size that is not hex,
//! a head over `MAX_HEAD`) is an error naming what was wrong; no input panics (fuzzed:
//! `fuzz/fuzz_targets/http_response.rs`).

use std::time::Duration;

/// The largest response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Headers read at most.
const MAX_HEADERS: usize = 64;

/// How the body's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` bytes (0 for 204, 304 and 1xx).
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// No length: the body ends when the server closes the connection.
    UntilClose,
}

/// A response's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// Bytes of the head, up to and including the blank line.
    pub len: usize,
    pub framing: Framing,
    /// The connection may carry the next request (HTTP/1.1 without `Connection: close`, or
    /// HTTP/1.0 with `Connection: keep-alive`), and the body has a known end.
    pub keep_alive: bool,
    /// `Retry-After` in seconds, if given as a number.
    pub retry_after: Option<Duration>,
}

/// A response that could not be read; `what` says which part and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed HTTP response: {what}")]
pub struct Malformed {
    pub what: String,
}

fn malformed(what: impl Into<String>) -> Malformed {
    Malformed { what: what.into() }
}

/// Parses the head at the start of `buf`; `Ok(None)` when more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, Malformed> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(malformed(format!("head longer than {MAX_HEAD} bytes")))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(malformed(format!("head: {e}"))),
    };
    let status = response.code.ok_or_else(|| malformed("no status code"))?;
    let http11 = response.version == Some(1);
    let (mut length, mut chunked, mut close, mut keep_alive_header) = (None, false, false, false);
    let mut retry_after = None;
    for h in response.headers.iter() {
        let value = std::str::from_utf8(h.value).map(str::trim);
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| malformed("Content-Length is not a number"))?;
            if length.is_some_and(|l| l != n) {
                return Err(malformed("two different Content-Length headers"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = value.unwrap_or("");
            chunked = v
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.unwrap_or("");
            for token in v.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive_header |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("retry-after") {
            retry_after = value
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs);
        }
    }
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        // Chunked wins over a length (RFC 9112, 6.3).
        Framing::Chunked
    } else {
        length.map_or(Framing::UntilClose, Framing::Length)
    };
    let persistent = if http11 { !close } else { keep_alive_header };
    Ok(Some(Head {
        status,
        len,
        framing,
        keep_alive: persistent && framing != Framing::UntilClose,
        retry_after,
    }))
}

/// A chunked body at the start of `buf`: the decoded bytes and how many bytes of `buf` it took
/// (trailers included), or `Ok(None)` when more bytes are needed.
pub fn decode_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, Malformed> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_end) = find_crlf(&buf[at..]) else {
            return check_pending_line(&buf[at..]).map(|()| None);
        };
        let line = &buf[at..at + line_end];
        // The size, then optional extensions after `;`.
        let size_text = line.split(|&b| b == b';').next().unwrap_or(line);
        let size_text = std::str::from_utf8(size_text)
            .map(str::trim)
            .map_err(|_| malformed("chunk size is not text"))?;
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| malformed(format!("chunk size {size_text:?} is not hexadecimal")))?;
        at += line_end + 2;
        if size == 0 {
            // Trailers, each ending in CRLF, then a blank line.
            loop {
                let Some(end) = find_crlf(&buf[at..]) else {
                    return check_pending_line(&buf[at..]).map(|()| None);
                };
                at += end + 2;
                if end == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        let needed = size
            .checked_add(2)
            .ok_or_else(|| malformed("chunk size overflows"))?;
        if buf.len() - at < needed {
            return Ok(None);
        }
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err(malformed("chunk data not followed by CRLF"));
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += needed;
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// A line without its CRLF yet: fine unless it is already too long to be a chunk line.
fn check_pending_line(rest: &[u8]) -> Result<(), Malformed> {
    if rest.len() > MAX_HEAD {
        return Err(malformed(format!(
            "chunk line longer than {MAX_HEAD} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_their_framing() {
        let head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(
            (head.status, head.framing, head.keep_alive),
            (200, Framing::Length(5), true)
        );
        assert_eq!(head.len, 38);
        let head = parse_head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        let head = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(
            (head.framing, head.keep_alive),
            (Framing::UntilClose, false)
        );
        let head = parse_head(b"HTTP/1.1 503 Busy\r\nRetry-After: 2\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.retry_after, Some(Duration::from_secs(2)));
        assert!(!head.keep_alive);
        let head = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Length(0));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
    }

    #[test]
    fn bad_heads_are_named() {
        let err = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").unwrap_err();
        assert!(err.what.contains("Content-Length"), "{err}");
        let err = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
            .unwrap_err();
        assert!(err.what.contains("two different"), "{err}");
        assert!(parse_head(b"SMTP ready\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_bodies_whole_and_in_pieces() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nExpires: never\r\n\r\nNEXT";
        let (decoded, used) = decode_chunked(body).unwrap().unwrap();
        assert_eq!(decoded, b"Wikipedia");
        assert_eq!(&body[used..], b"NEXT");
        for cut in 0..body.len() - 4 {
            assert_eq!(decode_chunked(&body[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(decode_chunked(b"zz\r\n").is_err());
        assert!(decode_chunked(b"2\r\nabX\r\n").is_err());
    }
}
