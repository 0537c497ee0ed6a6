//! Exactly-once through a whole stage on real glommio shards: checkpoint barriers from the
//! producer, shard snapshots written with io_uring, the merge's snapshot, and restore. Each
//! run is "crashed" (everything dropped without a commit) at seeded random moments and
//! restarted from its checkpoint directory until it finishes; the sink (a `Vec`, cut back to
//! the committed position on restore like a file) must then hold every record exactly once and
//! keep each mode's order and watermark guarantees (`common::check_merged`).

mod common;

use common::{check_merged, input_codec, logical_input, In, Input, Out};
use sluice::checkpoint::{CheckpointRefused, Checkpointing, Codec, SourcePosition};
use sluice::{from_fn, Output, OutputMode, Outputs, Stage};
use std::path::Path;
use std::time::Duration;

fn latency_us(position: u64) -> u64 {
    (position.wrapping_mul(0xff51_afd7_ed55_8ccd) >> 50) % 1500
}

fn start(dir: &Path, mode: OutputMode, shards: usize) -> Stage<Input, u64> {
    Stage::builder(|_ctx| {
        from_fn(|&(position, _key, latency): &Input| async move {
            glommio::timer::sleep(Duration::from_micros(latency)).await;
            Ok::<_, std::io::Error>(Outputs::One(position))
        })
    })
    .shards(shards)
    .capacity(16)
    .channel_capacity(8)
    .timeout(Duration::from_secs(30))
    .mode(mode)
    .key_by(|&(_, key, _): &Input| key)
    .checkpointing(Checkpointing::new(dir, input_codec(), Codec::u64()))
    .start()
    .expect("stage starts")
}

/// Runs `input` to the end through crashes after the given numbers of outputs.
fn run_with_crashes(mode: OutputMode, shards: usize, input: &[In], crashes: &[usize]) -> Vec<Out> {
    let dir = tempdir(&format!("{mode:?}-{shards}"));
    let mut sink: Vec<Out> = vec![];
    let mut restores = 0;
    for attempt in 0..=crashes.len() {
        let stage = start(&dir, mode, shards);
        let resume_at = match stage.restored() {
            Some(info) => {
                restores += 1;
                assert!(info.skipped.is_empty(), "{:?}", info.skipped);
                eprintln!(
                    "{mode:?}/{shards}: restored checkpoint {} at input {} sink {}: {} re-issued, {} held",
                    info.checkpoint_id, info.source.offset, info.sink_position, info.reissued, info.held
                );
                sink.truncate(info.sink_position as usize);
                info.source.offset as usize
            }
            None => {
                sink.clear();
                0
            }
        };
        let (mut producer, mut consumer, handle) = stage.split();
        let todo: Vec<In> = input[resume_at..].to_vec();
        let feeder = std::thread::spawn(move || {
            for (i, element) in todo.into_iter().enumerate() {
                let pushed = match element {
                    In::Rec { seq, key } => producer.push((seq, key, latency_us(seq))).is_ok(),
                    In::Wm { ts, .. } => producer.push_watermark(ts).is_ok(),
                };
                if !pushed {
                    return; // crashed
                }
                if i % 37 == 36 {
                    let at = SourcePosition {
                        offset: (resume_at + i + 1) as u64,
                        records: 0,
                        digest: 0,
                    };
                    match producer.checkpoint(at) {
                        Ok(_) | Err(CheckpointRefused::InProgress { .. }) => {}
                        Err(CheckpointRefused::Closed) => return,
                        Err(other) => panic!("{other}"),
                    }
                }
            }
        });
        let crash_after = crashes.get(attempt).copied();
        let mut outputs = 0;
        let mut crashed = false;
        while let Some(item) = consumer.recv() {
            match item.expect("no stage error") {
                Output::Record { value, .. } => sink.push(Out::Rec(value)),
                Output::Watermark(ts) => sink.push(Out::Wm(ts)),
                Output::Checkpoint(id) => consumer
                    .commit_checkpoint(id, sink.len() as u64)
                    .expect("checkpoint commits"),
            }
            outputs += 1;
            if crash_after == Some(outputs) {
                crashed = true;
                break;
            }
        }
        drop(consumer);
        feeder.join().expect("feeder");
        let _ = handle.join();
        if !crashed {
            break;
        }
    }
    assert!(
        restores > 0 || crashes.is_empty(),
        "no crash restored anything"
    );
    let _ = std::fs::remove_dir_all(&dir);
    sink
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sluice-stage-checkpoint-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn crashes(seed: u64, count: usize, max_outputs: usize) -> Vec<usize> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count).map(|_| rng.usize(1..max_outputs)).collect()
}

fn check(mode: OutputMode, shards: usize, seed: u64) {
    let input = logical_input(1500);
    let sink = run_with_crashes(mode, shards, &input, &crashes(seed, 4, 1200));
    check_merged(mode, &input, &sink);
}

#[test]
fn ordered_one_shard_survives_crashes() {
    check(OutputMode::Ordered, 1, 1);
}

#[test]
fn ordered_two_shards_survive_crashes() {
    check(OutputMode::Ordered, 2, 2);
}

#[test]
fn ordered_four_shards_survive_crashes() {
    check(OutputMode::Ordered, 4, 3);
}

#[test]
fn unordered_two_shards_survive_crashes() {
    check(OutputMode::Unordered, 2, 4);
}

#[test]
fn unordered_four_shards_survive_crashes() {
    check(OutputMode::Unordered, 4, 5);
}

#[test]
fn key_ordered_two_shards_survive_crashes() {
    check(OutputMode::KeyOrdered, 2, 6);
}

#[test]
fn without_crashes_the_output_is_complete() {
    let input = logical_input(500);
    let sink = run_with_crashes(OutputMode::Ordered, 2, &input, &[]);
    check_merged(OutputMode::Ordered, &input, &sink);
}

#[test]
fn a_checkpoint_of_another_shard_count_or_mode_is_refused() {
    let dir = tempdir("shape");
    let input = logical_input(200);
    {
        let (mut producer, mut consumer, handle) = start(&dir, OutputMode::Ordered, 2).split();
        let feeder = std::thread::spawn(move || {
            for element in &input {
                if let In::Rec { seq, key } = *element {
                    producer.push((seq, key, 0)).unwrap();
                }
            }
            producer
                .checkpoint(SourcePosition {
                    offset: 7,
                    records: 0,
                    digest: 0,
                })
                .unwrap();
        });
        let mut len = 0;
        while let Some(item) = consumer.recv() {
            match item.unwrap() {
                Output::Checkpoint(id) => consumer.commit_checkpoint(id, len).unwrap(),
                _ => len += 1,
            }
        }
        feeder.join().unwrap();
        handle.join().unwrap();
    }
    let error = match Stage::builder(|_ctx| {
        from_fn(|&(p, _, _): &Input| async move { Ok::<_, std::io::Error>(Outputs::One(p)) })
    })
    .shards(3)
    .checkpointing(Checkpointing::new(&dir, input_codec(), Codec::u64()))
    .start()
    {
        Ok(_) => panic!("a 2-shard checkpoint restored into 3 shards"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("2 shards") && error.contains("3 shards"),
        "{error}"
    );
    // Held outputs of an ordered merge mean nothing to an unordered one: refused too.
    let error = match Stage::builder(|_ctx| {
        from_fn(|&(p, _, _): &Input| async move { Ok::<_, std::io::Error>(Outputs::One(p)) })
    })
    .shards(2)
    .mode(OutputMode::Unordered)
    .checkpointing(Checkpointing::new(&dir, input_codec(), Codec::u64()))
    .start()
    {
        Ok(_) => panic!("an ordered checkpoint restored into an unordered stage"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("mode Ordered") && error.contains("mode Unordered"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
