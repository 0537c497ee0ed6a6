//! Routed stages (`StageBuilder::routed`) on real glommio shards: one source and one sink on
//! shard 0, records routed to 4 shards (on however many cores there are) and merged back. Each
//! mode must keep its order and watermark guarantees across shards (`common::check_merged`);
//! a failing sink stops the stage and is reported; with checkpoints, runs stopped at seeded
//! random moments (the sink fails, nothing more is committed) and restarted from the
//! checkpoint directory must end with every record exactly once.

mod common;

use common::{check_merged, input_codec, logical_input, In, Input, Out};
use sluice::checkpoint::{Checkpointing, Codec, SinkPosition, SourcePosition};
use sluice::{
    from_fn, Output, OutputMode, Outputs, Routed, ShardSink, SinkCheckpoint, SinkError, SourceItem,
    Stage, StageError,
};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn latency_us(position: u64) -> u64 {
    (position.wrapping_mul(0xff51_afd7_ed55_8ccd) >> 50) % 800
}

fn routed(mode: OutputMode, shards: usize, checkpoints: Option<&Path>) -> Routed<Input, u64> {
    let mut builder = Stage::builder(|_ctx| {
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
    .key_by(|&(_, key, _): &Input| key);
    if let Some(dir) = checkpoints {
        builder = builder.checkpointing(Checkpointing::new(dir, input_codec(), Codec::u64()));
    }
    builder.routed().expect("stage starts")
}

/// The input from `resume_at` on, with a checkpoint request after every 37th element.
fn source(input: &[In], resume_at: usize) -> impl futures::Stream<Item = SourceItem<Input>> {
    let mut items = vec![];
    for (i, element) in input[resume_at..].iter().enumerate() {
        items.push(match *element {
            In::Rec { seq, key } => SourceItem::Record((seq, key, latency_us(seq))),
            In::Wm { ts, .. } => SourceItem::Watermark(ts),
        });
        if i % 37 == 36 {
            items.push(SourceItem::Checkpoint(SourcePosition {
                offset: (resume_at + i + 1) as u64,
                records: 0,
                digest: 0,
            }));
        }
    }
    futures::stream::iter(items)
}

/// A sink into a shared `Vec` that fails once it has taken `fail_after` outputs.
struct VecSink {
    out: Arc<Mutex<Vec<Out>>>,
    fail_after: Option<usize>,
    finished: Arc<Mutex<bool>>,
}

impl ShardSink<u64> for VecSink {
    async fn write(&mut self, outputs: &mut Vec<Output<u64>>) -> Result<(), SinkError> {
        let mut out = self.out.lock().unwrap();
        for output in outputs.drain(..) {
            match output {
                Output::Record { value, .. } => out.push(Out::Rec(value)),
                Output::Watermark(ts) => out.push(Out::Wm(ts)),
                Output::Checkpoint(id) => panic!("checkpoint {id} reached the sink's write"),
            }
            if self.fail_after.is_some_and(|n| out.len() >= n) {
                return Err("the sink failed on purpose".into());
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), SinkError> {
        *self.finished.lock().unwrap() = true;
        Ok(())
    }

    async fn checkpoint(&mut self, _id: u64) -> Result<SinkCheckpoint, SinkError> {
        Ok(SinkPosition::from(self.out.lock().unwrap().len() as u64).into())
    }
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sluice-stage-routed-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_once(mode: OutputMode, shards: usize, records: u64) {
    let input = logical_input(records);
    let out = Arc::new(Mutex::new(vec![]));
    let finished = Arc::new(Mutex::new(false));
    let stage = routed(mode, shards, None);
    assert!(stage.restored().is_none());
    let (items, sink) = (
        source(&input, 0),
        VecSink {
            out: out.clone(),
            fail_after: None,
            finished: finished.clone(),
        },
    );
    let mut handle = stage.run(move || items, move || sink);
    handle.wait().expect("the stage ends without a failure");
    assert!(*finished.lock().unwrap(), "the sink was not finished");
    let records = input.iter().filter(|e| matches!(e, In::Rec { .. })).count();
    assert_eq!(handle.metrics().records_out, records as u64);
    check_merged(mode, &input, &out.lock().unwrap());
}

#[test]
fn ordered_across_four_shards() {
    run_once(OutputMode::Ordered, 4, 3000);
}

#[test]
fn unordered_across_four_shards() {
    run_once(OutputMode::Unordered, 4, 3000);
}

#[test]
fn key_ordered_across_four_shards() {
    run_once(OutputMode::KeyOrdered, 4, 3000);
}

#[test]
fn one_shard_is_the_same_stage() {
    run_once(OutputMode::Ordered, 1, 1000);
}

#[test]
fn a_failing_sink_stops_the_stage_and_is_reported() {
    let input = logical_input(2000);
    let out = Arc::new(Mutex::new(vec![]));
    let finished = Arc::new(Mutex::new(false));
    let stage = routed(OutputMode::Ordered, 2, None);
    let (items, sink) = (
        source(&input, 0),
        VecSink {
            out: out.clone(),
            fail_after: Some(300),
            finished: finished.clone(),
        },
    );
    let mut handle = stage.run(move || items, move || sink);
    match handle.wait() {
        Err(StageError::Sink { shard: 0, source }) => {
            assert!(source.to_string().contains("on purpose"), "{source}")
        }
        other => panic!("expected the sink's failure, got {other:?}"),
    }
    assert!(!*finished.lock().unwrap(), "a failed sink was finished");
    assert_eq!(out.lock().unwrap().len(), 300);
}

/// Runs `input` to the end through stops after the given numbers of outputs.
fn run_with_stops(mode: OutputMode, shards: usize, input: &[In], stops: &[usize]) -> Vec<Out> {
    let dir = tempdir(&format!("{mode:?}-{shards}"));
    let out = Arc::new(Mutex::new(vec![]));
    let mut restores = 0;
    for attempt in 0..=stops.len() {
        let stage = routed(mode, shards, Some(&dir));
        let resume_at = match stage.restored() {
            Some(info) => {
                restores += 1;
                assert!(info.skipped.is_empty(), "{:?}", info.skipped);
                out.lock().unwrap().truncate(info.sink_position as usize);
                info.source.offset as usize
            }
            None => {
                out.lock().unwrap().clear();
                0
            }
        };
        let fail_after = stops.get(attempt).map(|n| out.lock().unwrap().len() + n);
        let finished = Arc::new(Mutex::new(false));
        let (items, sink) = (
            source(input, resume_at),
            VecSink {
                out: out.clone(),
                fail_after,
                finished: finished.clone(),
            },
        );
        let mut handle = stage.run(move || items, move || sink);
        match (handle.wait(), fail_after) {
            (Ok(()), _) => {
                assert!(*finished.lock().unwrap());
                break;
            }
            (Err(StageError::Sink { .. }), Some(_)) => {}
            (Err(e), _) => panic!("attempt {attempt}: {e}"),
        }
    }
    assert!(
        restores > 0 || stops.is_empty(),
        "no stop restored anything"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.lock().unwrap().clone();
    out
}

fn check_with_stops(mode: OutputMode, shards: usize, seed: u64) {
    let input = logical_input(1500);
    let mut rng = fastrand::Rng::with_seed(seed);
    let stops: Vec<usize> = (0..4).map(|_| rng.usize(50..600)).collect();
    let out = run_with_stops(mode, shards, &input, &stops);
    check_merged(mode, &input, &out);
}

#[test]
fn ordered_checkpoints_across_two_shards_survive_stops() {
    check_with_stops(OutputMode::Ordered, 2, 11);
}

#[test]
fn unordered_checkpoints_across_four_shards_survive_stops() {
    check_with_stops(OutputMode::Unordered, 4, 12);
}

#[test]
fn key_ordered_checkpoints_across_two_shards_survive_stops() {
    check_with_stops(OutputMode::KeyOrdered, 2, 13);
}
