//! The client's hand-written RESP2 codec under random input (the in-suite sibling of
//! `fuzz/fuzz_targets/resp_reply.rs`): arbitrary bytes never panic the decoder, well-formed
//! replies, however they are split across reads, decode to what was encoded, and both the
//! encoder and the decoder agree with `redis-protocol`'s, the crate they replaced.

#[path = "common/resp_reference.rs"]
mod resp_reference;

use proptest::prelude::*;
use redis_protocol::resp2::encode::encode_borrowed;
use redis_protocol::resp2::types::BorrowedFrame;
use resp_reference::reference;
use sluice::redis::{decode_reply, encode_command, RedisError, Reply};

/// Whether `buf` holds a bulk string (at any depth) whose data is followed by two bytes other
/// than CRLF: `redis-protocol` skips any two, the hand-written decoder calls it an error.
fn has_bulk_without_crlf(buf: &[u8]) -> bool {
    fn walk(buf: &[u8], at: &mut usize) -> Option<bool> {
        let kind = *buf.get(*at)?;
        let crlf = buf[*at..].windows(2).position(|w| w == b"\r\n")? + *at;
        let text = std::str::from_utf8(&buf[*at + 1..crlf]).ok();
        *at = crlf + 2;
        match kind {
            b'$' => match text?.parse::<i64>().ok()? {
                n if n >= 0 => {
                    let end = *at + n as usize;
                    let tail = buf.get(end..end + 2)?;
                    *at = end + 2;
                    Some(tail != b"\r\n")
                }
                _ => Some(false),
            },
            b'*' => {
                for _ in 0..text?.parse::<i64>().ok()?.max(0) {
                    if walk(buf, at)? {
                        return Some(true);
                    }
                }
                Some(false)
            }
            _ => Some(false),
        }
    }
    walk(buf, &mut 0).unwrap_or(false)
}

/// Bytes made of RESP2's pieces (type bytes, CRLF, lengths, signs, text) and some arbitrary
/// ones, so random input gets past the first byte and into every branch of the grammar.
fn resp_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    let pieces: Vec<&'static [u8]> = vec![
        b"*",
        b"$",
        b":",
        b"+",
        b"-",
        b"\r\n",
        b"\r\n",
        b"\r",
        b"\n",
        b"0",
        b"1",
        b"2",
        b"3",
        b"-1",
        b"-2",
        b"+1",
        b"12",
        b"ab",
        b"99999999999999999999",
    ];
    let piece = prop_oneof![
        6 => prop::sample::select(pieces).prop_map(<[u8]>::to_vec),
        1 => any::<u8>().prop_map(|b| vec![b]),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|p| p.concat())
}

fn encode(r: &Reply, out: &mut Vec<u8>) {
    match r {
        Reply::Nil => out.extend(b"$-1\r\n"),
        Reply::Status(s) => out.extend(format!("+{s}\r\n").as_bytes()),
        Reply::Int(i) => out.extend(format!(":{i}\r\n").as_bytes()),
        Reply::Bulk(b) => {
            out.extend(format!("${}\r\n", b.len()).as_bytes());
            out.extend(b);
            out.extend(b"\r\n");
        }
        Reply::Array(items) => {
            out.extend(format!("*{}\r\n", items.len()).as_bytes());
            for i in items {
                encode(i, out);
            }
        }
        Reply::Error(e) => out.extend(format!("-{e}\r\n").as_bytes()),
        other => unreachable!("RESP2 replies only: {other:?}"),
    }
}

fn reply() -> impl Strategy<Value = Reply> {
    let leaf = prop_oneof![
        Just(Reply::Nil),
        "[a-zA-Z0-9 ]{0,12}".prop_map(Reply::Status),
        any::<i64>().prop_map(Reply::Int),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Reply::Bulk),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop::collection::vec(inner, 0..6).prop_map(Reply::Array)
    })
}

proptest! {
    #[test]
    fn the_hand_written_command_encoder_matches_redis_protocols(
        args in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..12),
    ) {
        let mut ours = vec![];
        encode_command(&mut ours, &args.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let frames: Vec<BorrowedFrame<'_>> = args.iter().map(|a| BorrowedFrame::BulkString(a)).collect();
        let frame = BorrowedFrame::Array(&frames);
        let mut theirs = vec![0; frame.encode_len(false)];
        let n = encode_borrowed(&mut theirs, &frame, false).unwrap();
        theirs.truncate(n);
        prop_assert_eq!(ours, theirs);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(data in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut at = 0;
        while let Ok(Some((_, used))) = decode_reply(&data[at..]) {
            prop_assert!(used > 0 && at + used <= data.len());
            at += used;
        }
    }

    #[test]
    fn the_decoder_agrees_with_redis_protocols_on_resp_like_bytes(data in resp_like_bytes()) {
        let (ours, theirs) = (decode_reply(&data), reference(&data));
        match (&ours, &theirs) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            // Stricter on purpose: a bulk string's data must end in CRLF.
            (Err(_), Ok(_)) => prop_assert!(has_bulk_without_crlf(&data), "{:?} vs {:?}", ours, theirs),
            (Ok(_), Err(_)) => prop_assert!(false, "accepted what redis-protocol rejects: {:?} vs {:?}", ours, theirs),
        }
    }

    #[test]
    fn the_decoder_agrees_with_redis_protocols_on_every_prefix_of_replies(
        replies in prop::collection::vec(reply(), 1..4),
        error in prop::option::of("[a-zA-Z ]{0,12}"),
    ) {
        let mut bytes = vec![];
        if let Some(e) = &error {
            bytes.extend(format!("-{e}\r\n").as_bytes());
        }
        for r in &replies {
            encode(r, &mut bytes);
        }
        for cut in 0..=bytes.len() {
            prop_assert_eq!(decode_reply(&bytes[..cut]), reference(&bytes[..cut]), "cut at {}", cut);
        }
    }

    #[test]
    fn replies_split_across_reads_decode_to_what_was_sent(
        replies in prop::collection::vec(reply(), 1..8),
        split in any::<prop::sample::Index>(),
    ) {
        let mut bytes = vec![];
        for r in &replies {
            encode(r, &mut bytes);
        }
        let cut = split.index(bytes.len() + 1);
        // Everything decodable from the first read must be a prefix of the replies.
        let mut decoded = vec![];
        let mut at = 0;
        while let Some((r, used)) = decode_reply(&bytes[at..cut]).unwrap() {
            decoded.push(r.unwrap());
            at += used;
        }
        while let Some((r, used)) = decode_reply(&bytes[at..]).unwrap() {
            decoded.push(r.unwrap());
            at += used;
        }
        prop_assert_eq!(at, bytes.len());
        prop_assert_eq!(decoded, replies);
    }
}

#[test]
fn a_top_level_error_is_an_error_reply() {
    let (r, used) = decode_reply(b"-WRONGTYPE no\r\n+OK\r\n").unwrap().unwrap();
    assert_eq!(used, 15);
    assert_eq!(
        r,
        Err(RedisError::ErrorReply {
            message: "WRONGTYPE no".into()
        })
    );
    assert!(decode_reply(b"?bogus\r\n").is_err());
    assert_eq!(decode_reply(b"$5\r\nab").unwrap(), None);
}

#[test]
fn nesting_and_bulk_lengths_are_bounded_and_errors_name_the_offset() {
    use sluice::redis::{MAX_BULK, MAX_DEPTH};
    let nested = |depth: usize| [b"*1\r\n".repeat(depth), b":7\r\n".to_vec()].concat();
    let (reply, used) = decode_reply(&nested(MAX_DEPTH)).unwrap().unwrap();
    assert_eq!(used, MAX_DEPTH * 4 + 4);
    let mut inner = reply.unwrap();
    for _ in 0..MAX_DEPTH {
        inner = match inner {
            Reply::Array(mut items) if items.len() == 1 => items.pop().unwrap(),
            other => panic!("expected a one-element array, got {other:?}"),
        };
    }
    assert_eq!(inner, Reply::Int(7));
    // One level deeper is refused, even before the rest has arrived; no stack is exhausted.
    let error = decode_reply(&nested(MAX_DEPTH + 1)[..(MAX_DEPTH + 1) * 4]).unwrap_err();
    assert!(error.contains("deeper than 64"), "{error}");
    assert!(decode_reply(&b"*1\r\n".repeat(100_000)).is_err());
    // A bulk string up to Redis's limit waits for its bytes; a longer one is refused at once.
    assert_eq!(
        decode_reply(format!("${MAX_BULK}\r\n").as_bytes()),
        Ok(None)
    );
    let error = decode_reply(format!("${}\r\n", MAX_BULK + 1).as_bytes()).unwrap_err();
    assert!(error.contains("over Redis's limit"), "{error}");
    // Errors say where: the byte offset of the offending reply within the buffer.
    let error = decode_reply(b"*2\r\n:1\r\n?x\r\n").unwrap_err();
    assert!(error.contains("byte 8"), "{error}");
    let error = decode_reply(b"*1\r\n$3\r\nabcXY").unwrap_err();
    assert!(
        error.contains("byte 4") && error.contains("CRLF"),
        "{error}"
    );
    let error = decode_reply(b"*1\r\n:12a\r\n").unwrap_err();
    assert!(error.contains("byte 5") && error.contains("12a"), "{error}");
}

/// RESP3, as a connection that said `HELLO 3` reads it: every type Redis 7 sends, push
/// messages (client tracking's invalidations) among them; and its types refused in RESP2.
#[test]
fn resp3_replies_decode_and_are_refused_in_resp2() {
    use sluice::redis::{decode, Protocol};
    let hello = b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n";
    let cases: Vec<(&[u8], Reply)> = vec![
        (b"_\r\n", Reply::Nil),
        (b"#t\r\n", Reply::Bool(true)),
        (b"#f\r\n", Reply::Bool(false)),
        (b",3.25\r\n", Reply::Double("3.25".into())),
        (b",inf\r\n", Reply::Double("inf".into())),
        (
            b"(3492890328409238509324850943850943825024385\r\n",
            Reply::BigNumber("3492890328409238509324850943850943825024385".into()),
        ),
        (
            b"=15\r\ntxt:Some string\r\n",
            Reply::Bulk(b"Some string".to_vec()),
        ),
        (
            b"~2\r\n:1\r\n$1\r\na\r\n",
            Reply::Array(vec![Reply::Int(1), Reply::Bulk(b"a".to_vec())]),
        ),
        (
            hello,
            Reply::Map(vec![
                (
                    Reply::Bulk(b"server".to_vec()),
                    Reply::Bulk(b"redis".to_vec()),
                ),
                (Reply::Bulk(b"proto".to_vec()), Reply::Int(3)),
            ]),
        ),
        (
            b">2\r\n$10\r\ninvalidate\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n",
            Reply::Push(vec![
                Reply::Bulk(b"invalidate".to_vec()),
                Reply::Array(vec![Reply::Bulk(b"a".to_vec()), Reply::Bulk(b"b".to_vec())]),
            ]),
        ),
        (
            b">2\r\n$10\r\ninvalidate\r\n_\r\n",
            Reply::Push(vec![Reply::Bulk(b"invalidate".to_vec()), Reply::Nil]),
        ),
        // An attribute describes the reply after it, which is what is returned.
        (
            b"|1\r\n+key-popularity\r\n:7\r\n*1\r\n:2\r\n",
            Reply::Array(vec![Reply::Int(2)]),
        ),
        (
            b"*3\r\n$1\r\nv\r\n_\r\n$1\r\nw\r\n",
            Reply::Array(vec![
                Reply::Bulk(b"v".to_vec()),
                Reply::Nil,
                Reply::Bulk(b"w".to_vec()),
            ]),
        ),
    ];
    for (bytes, expected) in cases {
        let (reply, used) = decode(bytes, Protocol::Resp3).unwrap().unwrap();
        assert_eq!(
            (reply.unwrap(), used),
            (expected, bytes.len()),
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
        // Every strict prefix waits for more bytes.
        for cut in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..cut], Protocol::Resp3),
                Ok(None),
                "{:?} cut at {cut}",
                String::from_utf8_lossy(bytes)
            );
        }
        // RESP3's own types are not RESP2.
        if !matches!(bytes[0], b'*' | b'$' | b':' | b'+' | b'-') {
            let error = decode_reply(bytes).unwrap_err();
            assert!(
                error.contains("RESP2") && error.contains("byte 0"),
                "{error}"
            );
        }
    }
    let (blob_error, _) = decode(b"!21\r\nSYNTAX invalid syntax\r\n", Protocol::Resp3)
        .unwrap()
        .unwrap();
    assert_eq!(
        blob_error,
        Err(RedisError::ErrorReply {
            message: "SYNTAX invalid syntax".into()
        })
    );
    for bad in [
        &b"#x\r\n"[..],
        b"_1\r\n",
        b"(\r\n",
        b"=3\r\nabc\r\n",
        b"%-1\r\n",
    ] {
        let error = decode(bad, Protocol::Resp3).unwrap_err();
        assert!(
            error.contains("byte 0"),
            "{:?}: {error}",
            String::from_utf8_lossy(bad)
        );
    }
}
