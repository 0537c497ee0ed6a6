//! Checkpoint snapshots: encode, decode (checksum + validation + deserialisation) and a
//! durable write (write + fsync) of a shard snapshot with 1k, 10k and 100k in-flight entries,
//! as the rkyv archive sluice writes, beside serde JSON of the same `ShardSnapshot`, in the
//! same run. Each entry carries a 96-byte input like an enrich record (line, key, JSON fields).
//! Sizes are printed once per entry count. Every iteration checks what it decoded, so the
//! parameters are really used.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice::checkpoint::{EntrySnapshot, ShardSnapshot};
use std::io::Write;
use std::path::{Path, PathBuf};

fn snapshot(entries: u64) -> ShardSnapshot {
    ShardSnapshot {
        checkpoint_id: 1,
        shard: 0,
        entries: (0..entries)
            .map(|i| {
                let mut input = i.to_le_bytes().to_vec();
                let fields = format!(
                    r#"{{"user_id":"user_{:06}","amount":{},"txn":"t{:012}"}}"#,
                    i % 100_000,
                    i * 7 % 1000,
                    i
                );
                input.extend_from_slice(fields.as_bytes());
                input.resize(96, b' ');
                EntrySnapshot {
                    seq: i * 3,
                    key: i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    attempts: 1,
                    watermark: None,
                    input,
                }
            })
            .collect(),
    }
}

fn write_durably(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

fn bench_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("checkpoint-bench");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn snapshots(c: &mut Criterion) {
    let dir = bench_dir();
    let path = Path::new("bench");
    for n in [1_000u64, 10_000, 100_000] {
        let s = snapshot(n);
        let rkyv_bytes = s.encode().unwrap();
        let json_bytes = serde_json::to_vec(&s).unwrap();
        eprintln!(
            "{n} entries: rkyv {} bytes ({:.1} per entry), serde JSON {} bytes ({:.1} per entry)",
            rkyv_bytes.len(),
            rkyv_bytes.len() as f64 / n as f64,
            json_bytes.len(),
            json_bytes.len() as f64 / n as f64
        );
        let mut group = c.benchmark_group(format!("snapshot_{n}"));
        group.throughput(Throughput::Elements(n));
        group.sample_size(if n >= 100_000 { 20 } else { 50 });
        group.bench_function(BenchmarkId::new("encode", "rkyv"), |b| {
            b.iter(|| s.encode().unwrap().len())
        });
        group.bench_function(BenchmarkId::new("encode", "serde_json"), |b| {
            b.iter(|| serde_json::to_vec(&s).unwrap().len())
        });
        group.bench_function(BenchmarkId::new("decode", "rkyv"), |b| {
            b.iter(|| {
                let back = ShardSnapshot::decode(&rkyv_bytes, path).unwrap();
                assert_eq!(back.entries.len() as u64, n);
            })
        });
        group.bench_function(BenchmarkId::new("decode", "serde_json"), |b| {
            b.iter(|| {
                let back: ShardSnapshot = serde_json::from_slice(&json_bytes).unwrap();
                assert_eq!(back.entries.len() as u64, n);
            })
        });
        let file = dir.join(format!("snap-{n}"));
        group.bench_function(BenchmarkId::new("encode_write_fsync", "rkyv"), |b| {
            b.iter(|| write_durably(&file, &s.encode().unwrap()))
        });
        group.bench_function(BenchmarkId::new("encode_write_fsync", "serde_json"), |b| {
            b.iter(|| write_durably(&file, &serde_json::to_vec(&s).unwrap()))
        });
        group.finish();
    }
}

criterion_group!(benches, snapshots);
criterion_main!(benches);
