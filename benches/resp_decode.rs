//! The Redis client's reply decoder (`sluice::redis::decode_reply`, hand-written) beside
//! `redis-protocol`'s `decode_range` plus building the same `Reply` (what it replaced), on
//! what a connection reads at 64 requests in flight: 64 GET replies of 128 bytes in one
//! buffer, decoded one after another as the connection does. Also a mixed buffer (status,
//! integer, nil, error, nested arrays). Each iteration checks what it decoded, so both do the
//! full work.

#[path = "../tests/common/resp_reference.rs"]
mod resp_reference;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice::redis::{decode_reply, Decoded};
use std::hint::black_box;

type Decoder = fn(&[u8]) -> Result<Option<Decoded>, String>;

fn get_replies(n: usize, size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(format!("${size}\r\n").as_bytes());
        out.extend((0..size).map(|j| b'a' + ((i + j) % 26) as u8));
        out.extend(b"\r\n");
    }
    out
}

fn mixed_replies(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(match i % 5 {
            0 => b"+OK\r\n".to_vec(),
            1 => format!(":{}\r\n", i * 1_000_003).into_bytes(),
            2 => b"$-1\r\n".to_vec(),
            3 => b"-ERR unknown command\r\n".to_vec(),
            _ => b"*3\r\n$5\r\nhello\r\n*2\r\n:1\r\n:2\r\n+QUEUED\r\n".to_vec(),
        });
    }
    out
}

/// Decodes every reply in `buf`; returns how many.
fn decode_all(decode: Decoder, buf: &[u8]) -> usize {
    let (mut at, mut n) = (0, 0);
    while let Some((reply, used)) = decode(&buf[at..]).expect("well-formed") {
        black_box(reply).ok();
        at += used;
        n += 1;
    }
    assert_eq!(at, buf.len(), "every byte decoded");
    n
}

fn bench(c: &mut Criterion) {
    let decoders: [(&str, Decoder); 2] = [
        ("hand-written", decode_reply),
        ("redis-protocol", resp_reference::reference),
    ];
    for (name, buf, replies) in [
        ("get-64x128B", get_replies(64, 128), 64),
        ("mixed-64", mixed_replies(64), 64),
    ] {
        let mut group = c.benchmark_group(format!("resp_decode/{name}"));
        group.throughput(Throughput::Elements(replies as u64));
        for (decoder, decode) in decoders {
            group.bench_with_input(BenchmarkId::from_parameter(decoder), &buf, |b, buf| {
                b.iter(|| assert_eq!(decode_all(decode, black_box(buf)), replies))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
