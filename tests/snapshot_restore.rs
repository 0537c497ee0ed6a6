//! Exactly-once at the operator level, after Flink's `AsyncWaitOperatorTest`:
//! `testStateSnapshotAndRestore` and `testRestartWithFullQueue`, in all three modes. The
//! snapshot goes through real checkpoint files (`CheckpointStore`) between a "crash" (the
//! operator dropped with entries in flight) and the restore; the restored operator re-issues
//! the in-flight entries, in their original order, before the rest of the input.

mod common;

use common::*;
use sluice::checkpoint::{CheckpointStore, ShardSnapshot};
use sluice::clock::SimClock;
use sluice::{
    from_fn, restore_elements, AsyncFunction, AsyncWait, Element, Emitted, OutputMode, Outputs,
};
use std::time::Instant;

/// Input: (value, latency ms). Output: value, after the latency.
fn delayed(clock: &SimClock) -> impl AsyncFunction<In = (u64, u64), Out = u64, Error = SimError> {
    let clock = clock.clone();
    from_fn(move |&(value, latency_ms): &(u64, u64)| {
        let sleep = clock.sleep(ms(latency_ms));
        async move {
            sleep.await;
            Ok::<_, SimError>(Outputs::One(value))
        }
    })
}

fn encode(input: &(u64, u64)) -> Vec<u8> {
    [input.0.to_le_bytes(), input.1.to_le_bytes()].concat()
}

fn decode(bytes: &[u8]) -> Result<(u64, u64), String> {
    if bytes.len() != 16 {
        return Err(format!("{} bytes, expected 16", bytes.len()));
    }
    let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
    Ok((word(0), word(8)))
}

/// The whole input: records (value = seq * 10) and a watermark after every 4th record.
fn input_elements(latencies: &[u64]) -> (Vec<Element<(u64, u64)>>, Vec<In>) {
    let (mut elements, mut model, mut seq, mut ts) = (vec![], vec![], 0u64, 0u64);
    for (i, &latency) in latencies.iter().enumerate() {
        elements.push(Element::Record {
            seq,
            key: seq % 3,
            input: (seq * 10, latency),
            pushed_at: Some(Instant::now()),
        });
        model.push(In::Rec { seq, key: seq % 3 });
        seq += 1;
        if i % 4 == 3 {
            ts += 100;
            elements.push(Element::Watermark { seq, timestamp: ts });
            model.push(In::Wm { seq, ts });
            seq += 1;
        }
    }
    (elements, model)
}

fn to_model(items: &[Emitted<u64>]) -> Vec<Out> {
    items
        .iter()
        .map(|e| match e {
            Emitted::Record { seq, outputs } => {
                assert_eq!(
                    outputs.as_slice(),
                    &[seq * 10],
                    "output belongs to its input"
                );
                Out::Rec(*seq)
            }
            Emitted::Watermark { timestamp, .. } => Out::Wm(*timestamp),
        })
        .collect()
}

/// Runs the input until `crash_after` ms, snapshots to disk, drops the operator, restores from
/// disk into a new operator, and runs to the end. Returns the (before, after) outputs.
fn crash_and_restore(
    mode: OutputMode,
    capacity: usize,
    latencies: &[u64],
    crash_after: u64,
    tag: &str,
) -> (Vec<Out>, Vec<In>, usize) {
    let (elements, model) = input_elements(latencies);
    let clock = SimClock::new();
    let source = Source::new();
    for e in elements.iter().cloned() {
        source.element(e);
    }
    let mut op = AsyncWait::new(
        source.clone(),
        delayed(&clock),
        config(capacity, 10_000, mode),
        clock.clone(),
    );
    let mut before = vec![];
    for _ in 0..crash_after {
        before.extend(drain(&mut op).items);
        clock.advance(ms(1));
    }
    before.extend(drain(&mut op).items);
    // Checkpoint: the in-flight entries, and the source offset (elements the operator took).
    let taken = elements.len() - source.waiting();
    let entries = op.snapshot(encode);
    let in_flight = entries.len();
    let dir = std::env::temp_dir().join(format!("sluice-restore-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = CheckpointStore::open(&dir, 2).unwrap();
    let snapshot = ShardSnapshot {
        checkpoint_id: 1,
        shard: 0,
        entries,
    };
    store
        .write(1, taken as u64, before.len() as u64, &[snapshot])
        .unwrap();
    drop(op); // the crash: everything in flight is lost from memory

    let restored = store.restore().unwrap().expect("a checkpoint");
    let offset = restored.manifest.source_offset as usize;
    let replay = restore_elements(&restored.snapshots[0].entries, decode).unwrap();
    let clock = SimClock::new();
    let source = Source::new();
    for e in replay.into_iter().chain(elements[offset..].iter().cloned()) {
        source.element(e);
    }
    source.close();
    let mut op = AsyncWait::new(
        source,
        delayed(&clock),
        config(capacity, 10_000, mode),
        clock.clone(),
    );
    let after = run_to_end(&mut op, &clock, ms(1), 100_000);
    assert!(after.error.is_none());
    let _ = std::fs::remove_dir_all(&dir);
    let mut out = to_model(&before);
    out.extend(to_model(&after.items));
    (out, model, in_flight)
}

const LATENCIES: [u64; 12] = [30, 10, 50, 20, 5, 40, 15, 25, 35, 45, 8, 12];

fn state_snapshot_and_restore(mode: OutputMode) {
    for crash_after in [0, 7, 18, 33, 60] {
        let (out, model, _) = crash_and_restore(
            mode,
            4,
            &LATENCIES,
            crash_after,
            &format!("{mode:?}-{crash_after}"),
        );
        // Exactly once, in order (ordered), per key (key-ordered), between the right watermarks.
        check_merged(mode, &model, &out);
    }
}

#[test]
fn state_snapshot_and_restore_ordered() {
    state_snapshot_and_restore(OutputMode::Ordered);
}

#[test]
fn state_snapshot_and_restore_unordered() {
    state_snapshot_and_restore(OutputMode::Unordered);
}

#[test]
fn state_snapshot_and_restore_key_ordered() {
    state_snapshot_and_restore(OutputMode::KeyOrdered);
}

fn restart_with_full_queue(mode: OutputMode) {
    // Capacity 2 and slow lookups: at the crash two entries fill the queue and the third
    // element still waits in the source, so it is not in the snapshot but after the offset.
    let (out, model, in_flight) =
        crash_and_restore(mode, 2, &[100, 100, 100], 1, &format!("full-{mode:?}"));
    assert_eq!(in_flight, 2, "the snapshot holds the full queue");
    check_merged(mode, &model, &out);
}

#[test]
fn restart_with_full_queue_ordered() {
    restart_with_full_queue(OutputMode::Ordered);
}

#[test]
fn restart_with_full_queue_unordered() {
    restart_with_full_queue(OutputMode::Unordered);
}

#[test]
fn restart_with_full_queue_key_ordered() {
    restart_with_full_queue(OutputMode::KeyOrdered);
}
