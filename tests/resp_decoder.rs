//! The client's reply decoder under random input (the in-suite sibling of
//! `fuzz/fuzz_targets/resp_reply.rs`): arbitrary bytes never panic it, and well-formed replies,
//! however they are split across reads, decode to what was encoded.

use proptest::prelude::*;
use redis_protocol::resp2::encode::encode_borrowed;
use redis_protocol::resp2::types::BorrowedFrame;
use sluice::redis::{decode_reply, encode_command, RedisError, Reply};

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
