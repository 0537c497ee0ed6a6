//! The checkpoint store on real files: durable write order and retention, and restore that
//! refuses every truncated or bit-flipped file with a clear error and falls back to the
//! previous checkpoint (never a panic).

use sluice::checkpoint::{CheckpointError, CheckpointStore, EntrySnapshot, ShardSnapshot};
use std::path::{Path, PathBuf};

/// An empty directory for one test, removed when the test ends.
fn dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("sluice-chk-{name}-"))
        .tempdir()
        .unwrap()
}

fn snapshots(id: u64, entries: u64) -> Vec<ShardSnapshot> {
    (0..2)
        .map(|shard| ShardSnapshot {
            checkpoint_id: id,
            shard,
            entries: (0..entries)
                .map(|i| EntrySnapshot {
                    seq: id * 1000 + i * 2 + shard as u64,
                    key: i,
                    attempts: 1,
                    watermark: None,
                    input: format!("{{\"user_id\":\"user_{i:06}\"}}").into_bytes(),
                })
                .collect(),
        })
        .collect()
}

fn files(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn restores_the_newest_and_keeps_only_the_last_k() {
    let tmp = dir("keep");
    let d = tmp.path();
    let store = CheckpointStore::open(d, 2).unwrap();
    assert!(
        store.restore().unwrap().is_none(),
        "an empty directory has no checkpoint"
    );
    for id in 1..=3 {
        store
            .write(id, id * 100, id * 50, &snapshots(id, 5))
            .unwrap();
    }
    let names = files(d);
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".manifest")).count(),
        2,
        "{names:?}"
    );
    assert!(
        names.iter().all(|n| !n.contains(&format!("{:020}", 1))),
        "checkpoint 1 removed: {names:?}"
    );
    let r = store.restore().unwrap().unwrap();
    assert_eq!(
        (
            r.manifest.checkpoint_id,
            r.manifest.source_offset,
            r.manifest.sink_position
        ),
        (3, 300, 150)
    );
    assert_eq!(r.snapshots, snapshots(3, 5));
    assert!(r.skipped.is_empty());
}

fn newest_snapshot(d: &Path) -> PathBuf {
    d.join(
        files(d)
            .into_iter()
            .rfind(|n| n.ends_with("shard-1.snap"))
            .unwrap(),
    )
}

fn newest_manifest(d: &Path) -> PathBuf {
    d.join(
        files(d)
            .into_iter()
            .rfind(|n| n.ends_with(".manifest"))
            .unwrap(),
    )
}

#[test]
fn a_truncated_snapshot_at_every_length_falls_back_to_the_previous_checkpoint() {
    let tmp = dir("truncate");
    let d = tmp.path();
    let store = CheckpointStore::open(d, 3).unwrap();
    store.write(1, 10, 5, &snapshots(1, 3)).unwrap();
    store.write(2, 20, 9, &snapshots(2, 3)).unwrap();
    let path = newest_snapshot(d);
    let original = std::fs::read(&path).unwrap();
    for len in 0..original.len() {
        std::fs::write(&path, &original[..len]).unwrap();
        let r = store
            .restore()
            .unwrap()
            .expect("checkpoint 1 is still valid");
        assert_eq!(r.manifest.checkpoint_id, 1, "truncated to {len}");
        assert_eq!(r.skipped.len(), 1);
        assert!(
            r.skipped[0].contains("checkpoint 2") && r.skipped[0].contains("shard-1.snap"),
            "{}",
            r.skipped[0]
        );
    }
    std::fs::write(&path, &original).unwrap();
    assert_eq!(store.restore().unwrap().unwrap().manifest.checkpoint_id, 2);
}

#[test]
fn random_bit_flips_in_snapshot_or_manifest_are_detected() {
    let tmp = dir("flip");
    let d = tmp.path();
    let store = CheckpointStore::open(d, 3).unwrap();
    store.write(1, 10, 5, &snapshots(1, 20)).unwrap();
    store.write(2, 20, 9, &snapshots(2, 20)).unwrap();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for path in [newest_snapshot(d), newest_manifest(d)] {
        let original = std::fs::read(&path).unwrap();
        for _ in 0..300 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let bit = (rng % (original.len() as u64 * 8)) as usize;
            let mut flipped = original.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            std::fs::write(&path, &flipped).unwrap();
            let r = store
                .restore()
                .unwrap()
                .expect("checkpoint 1 is still valid");
            // A flip in the snapshot's reserved header bytes is caught by the manifest's CRC.
            assert_eq!(r.manifest.checkpoint_id, 1, "{} bit {bit}", path.display());
        }
        std::fs::write(&path, &original).unwrap();
    }
    assert_eq!(store.restore().unwrap().unwrap().manifest.checkpoint_id, 2);
}

#[test]
fn a_leftover_temporary_manifest_from_a_crash_is_ignored() {
    let tmp = dir("tmp");
    let d = tmp.path();
    let store = CheckpointStore::open(d, 3).unwrap();
    store.write(1, 10, 5, &snapshots(1, 2)).unwrap();
    // A crash between writing the temporary manifest and renaming it.
    std::fs::write(
        d.join(format!("chk-{:020}.manifest.tmp", 2)),
        b"sluice-manifest v1 crc32=0\n{",
    )
    .unwrap();
    assert_eq!(store.restore().unwrap().unwrap().manifest.checkpoint_id, 1);
}

#[test]
fn no_valid_checkpoint_is_an_error_that_lists_why() {
    let tmp = dir("none");
    let d = tmp.path();
    let store = CheckpointStore::open(d, 3).unwrap();
    store.write(1, 10, 5, &snapshots(1, 2)).unwrap();
    std::fs::write(newest_manifest(d), b"garbage").unwrap();
    match store.restore() {
        Err(CheckpointError::Corrupt { reason, .. }) => {
            assert!(reason.contains("checkpoint 1"), "{reason}")
        }
        other => panic!("expected a corrupt-checkpoint error, got {other:?}"),
    }
}
