//! Stages whose sources and sinks run on the shards (`StageBuilder::run_on_shards`), on real
//! glommio executors: each shard's output keeps its mode's guarantees against its own source
//! (checked by the same model as the merged output of a producer-fed stage), every record
//! comes out once, on the thread that read it; failures of the function, the sink and a panic
//! end the run with the error after everything emitted before it was written.

mod common;

use common::{check_merged, In, Out};
use sluice::checkpoint::{CheckpointError, Checkpointing, Codec, SinkPosition, SourcePosition};
use sluice::{
    from_fn, BuildError, Output, OutputMode, Outputs, ShardContext, ShardSink, SinkCheckpoint,
    SinkError, SourceItem, Stage, StageError,
};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

/// Shard `shard`'s source: records `(seq, key, latency_us)` and a watermark every 7 records,
/// as `In` for the model.
/// Input: (seq, key, latency in microseconds). Output: the seq, after the latency.
type Input = (u64, u64, u64);

fn source_items(shard: usize, records: u64) -> (Vec<SourceItem<Input>>, Vec<In>) {
    let (mut items, mut model) = (vec![], vec![]);
    let (mut seq, mut ts) = (0, 0);
    for i in 0..records {
        let h = (i + 1000 * shard as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        let (latency, key) = (h % 2000, h % 5);
        items.push(SourceItem::Record((seq, key, latency)));
        model.push(In::Rec { seq, key });
        seq += 1;
        if i % 7 == 6 {
            ts += 10;
            items.push(SourceItem::Watermark(ts));
            model.push(In::Wm { seq, ts });
            seq += 1;
        }
    }
    (items, model)
}

/// What a shard's sink saw, and on which thread.
#[derive(Default)]
struct Seen {
    outputs: Vec<Out>,
    writes: usize,
    finished: usize,
    threads: Vec<ThreadId>,
}

type Shared = Arc<Mutex<Vec<Seen>>>;

/// Keeps every output of its shard; fails its `fail_at`-th write when set.
struct Collect {
    shard: usize,
    seen: Shared,
    fail_at: Option<usize>,
}

impl ShardSink<u64> for Collect {
    async fn write(&mut self, outputs: &mut Vec<Output<u64>>) -> Result<(), SinkError> {
        let mut seen = self.seen.lock().unwrap();
        let seen = &mut seen[self.shard];
        seen.writes += 1;
        if Some(seen.writes) == self.fail_at {
            return Err("the disk is full".into());
        }
        seen.threads.push(std::thread::current().id());
        for output in outputs.drain(..) {
            seen.outputs.push(match output {
                Output::Record { seq, value } => {
                    assert_eq!(seq, value, "an output belongs to its input");
                    Out::Rec(seq)
                }
                Output::Watermark(ts) => Out::Wm(ts),
                Output::Checkpoint(id) => panic!("checkpoint {id} from a stage without them"),
            });
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), SinkError> {
        self.seen.lock().unwrap()[self.shard].finished += 1;
        Ok(())
    }
}

fn collecting(shards: usize, fail_at: Option<usize>) -> (Shared, impl Fn(ShardContext) -> Collect) {
    let seen: Shared = Arc::new(Mutex::new((0..shards).map(|_| Seen::default()).collect()));
    let sinks = seen.clone();
    (seen, move |ctx: ShardContext| Collect {
        shard: ctx.index,
        seen: sinks.clone(),
        fail_at,
    })
}

/// Runs `shards` pipelines of `records` records each and checks every shard's output.
fn run(mode: OutputMode, shards: usize, records: u64) {
    let (seen, sinks) = collecting(shards, None);
    let handle = Stage::builder(|_ctx| {
        from_fn(|&(seq, _key, latency_us): &(u64, u64, u64)| async move {
            glommio::timer::sleep(Duration::from_micros(latency_us)).await;
            Ok::<_, std::io::Error>(Outputs::One(seq))
        })
    })
    .shards(shards)
    .capacity(8)
    .timeout(Duration::from_secs(30))
    .mode(mode)
    .key_by(|&(_, key, _): &(u64, u64, u64)| key)
    .run_on_shards(
        move |ctx| futures::stream::iter(source_items(ctx.index, records).0),
        sinks,
    )
    .expect("stage starts");
    assert_eq!(handle.placements().len(), shards);
    let mut handle = handle;
    handle.wait().expect("shards end cleanly");
    let metrics = handle.metrics();
    let seen = seen.lock().unwrap();
    for (shard, seen) in seen.iter().enumerate() {
        let (_, model) = source_items(shard, records);
        check_merged(mode, &model, &seen.outputs);
        let records_out = seen
            .outputs
            .iter()
            .filter(|o| matches!(o, Out::Rec(_)))
            .count();
        assert_eq!(
            records_out as u64, records,
            "shard {shard}: every record once"
        );
        assert_eq!(seen.finished, 1, "shard {shard}: finished once");
        assert!(
            seen.writes < records as usize,
            "shard {shard}: outputs written in batches"
        );
        let first = seen.threads[0];
        assert!(
            seen.threads.iter().all(|t| *t == first),
            "shard {shard}: written on one thread"
        );
    }
    assert_eq!(
        (metrics.records_in, metrics.records_out),
        (records * shards as u64, records * shards as u64)
    );
}

#[test]
fn one_shard_ordered() {
    run(OutputMode::Ordered, 1, 2000);
}

#[test]
fn one_shard_unordered() {
    run(OutputMode::Unordered, 1, 2000);
}

#[test]
fn four_shards_every_mode() {
    // 4 shards on a 2-core machine run unpinned.
    for mode in [
        OutputMode::Ordered,
        OutputMode::Unordered,
        OutputMode::KeyOrdered,
    ] {
        run(mode, 4, 1000);
    }
}

/// A function that fails record 500 (no retries) fails the run at once, as Flink's operator
/// does (policies that emit a fallback are the function's `on_error`): ordered, the sink got a
/// prefix of the records before it, and `finish` was not called.
#[test]
fn a_failed_record_stops_the_shard_after_what_came_before() {
    let (seen, sinks) = collecting(1, None);
    let mut handle = Stage::builder(|_ctx| {
        from_fn(|&seq: &u64| async move {
            glommio::timer::sleep(Duration::from_micros(seq % 300)).await;
            if seq == 500 {
                return Err(std::io::Error::other("the profile service said no"));
            }
            Ok(Outputs::One(seq))
        })
    })
    .shards(1)
    .capacity(16)
    .run_on_shards(
        |_| futures::stream::iter((0..1000u64).map(SourceItem::Record)),
        sinks,
    )
    .expect("stage starts");
    let error = handle.wait().expect_err("record 500 fails");
    assert!(
        matches!(&error, StageError::Function { seq: 500, .. }),
        "{error}"
    );
    let seen = seen.lock().unwrap();
    let written = seen[0].outputs.len() as u64;
    assert!(written <= 500, "nothing from record 500 on");
    let expected: Vec<Out> = (0..written).map(Out::Rec).collect();
    assert_eq!(seen[0].outputs, expected);
    assert_eq!(seen[0].finished, 0);
}

#[test]
fn a_failed_sink_stops_its_shard_and_names_it() {
    let (seen, sinks) = collecting(2, Some(3));
    let error = Stage::builder(|_ctx| {
        from_fn(|&n: &u64| async move { Ok::<_, std::io::Error>(Outputs::One(n)) })
    })
    .shards(2)
    .capacity(4)
    .mode(OutputMode::Unordered)
    .run_on_shards(
        // A batch holds at most 256 outputs: 2000 records make more than 3 writes.
        |_| futures::stream::iter((0..2000u64).map(SourceItem::Record)),
        sinks,
    )
    .expect("stage starts")
    .join()
    .expect_err("the sinks fail");
    assert!(matches!(&error, StageError::Sink { .. }), "{error}");
    assert!(error.to_string().contains("the disk is full"), "{error}");
    for seen in seen.lock().unwrap().iter() {
        assert_eq!(seen.finished, 0);
        assert_eq!(seen.writes, 3, "no write after the failed one");
    }
}

#[test]
fn a_panic_in_the_function_is_reported_with_its_shard() {
    let (_seen, sinks) = collecting(1, None);
    let error = Stage::builder(|_ctx| {
        from_fn(|&n: &u64| async move {
            if n == 7 {
                panic!("the lookup panicked on 7");
            }
            Ok::<_, std::io::Error>(Outputs::One(n))
        })
    })
    .shards(1)
    .run_on_shards(
        |_| futures::stream::iter((0..20u64).map(SourceItem::Record)),
        sinks,
    )
    .expect("stage starts")
    .join()
    .expect_err("the function panics");
    match error {
        StageError::ShardPanicked { shard, message } => {
            assert_eq!(shard, 0);
            assert!(message.contains("panicked on 7"), "{message}");
        }
        other => panic!("expected a panic report, got {other}"),
    }
}

#[test]
fn routing_and_checkpoints_across_shards_are_refused_with_the_setting_named() {
    let function = |_ctx: ShardContext| {
        from_fn(|&n: &u64| async move { Ok::<_, std::io::Error>(Outputs::One(n)) })
    };
    let (_seen, sinks) = collecting(1, None);
    let refused = Stage::builder(function)
        .shards(1)
        .routing(sluice::Routing::RoundRobin)
        .run_on_shards(
            |_| futures::stream::iter(Vec::<SourceItem<u64>>::new()),
            sinks,
        )
        .err()
        .expect("refused");
    assert!(
        matches!(
            refused,
            BuildError::InvalidConfig {
                field: "routing",
                ..
            }
        ),
        "{refused}"
    );
    let dir = tempfile::tempdir().unwrap();
    let refused = Stage::builder(function)
        .shards(2)
        .checkpointing(Checkpointing::new(dir.path(), Codec::u64(), Codec::u64()))
        .on_shards()
        .err()
        .expect("refused");
    assert!(
        matches!(
            refused,
            BuildError::InvalidConfig {
                field: "checkpointing",
                ..
            }
        ),
        "{refused}"
    );
}

/// The sink of the checkpoint test: a "file" of the values written, whose durable length is
/// what a checkpoint records; it fails (the run's crash) at its `crash_at`-th write after
/// `crash_after` checkpoints were committed.
struct FileSink {
    file: Arc<Mutex<Vec<u64>>>,
    committed: Arc<Mutex<Vec<u64>>>,
    crash: Option<(usize, usize)>,
    writes_after: usize,
}

impl ShardSink<u64> for FileSink {
    async fn write(&mut self, outputs: &mut Vec<Output<u64>>) -> Result<(), SinkError> {
        if let Some((after, at)) = self.crash {
            if self.committed.lock().unwrap().len() >= after {
                self.writes_after += 1;
                if self.writes_after == at {
                    return Err("crash".into());
                }
            }
        }
        let mut file = self.file.lock().unwrap();
        for output in outputs.drain(..) {
            if let Output::Record { value, .. } = output {
                file.push(value);
            }
        }
        Ok(())
    }

    async fn checkpoint(&mut self, _id: u64) -> Result<SinkCheckpoint, SinkError> {
        Ok(SinkPosition::from(self.file.lock().unwrap().len() as u64).into())
    }

    async fn committed(
        &mut self,
        id: u64,
        result: Result<(), CheckpointError>,
    ) -> Result<(), SinkError> {
        result?;
        self.committed.lock().unwrap().push(id);
        Ok(())
    }
}

/// `records` numbers from `from` on, with a checkpoint request every 250 (its position: the
/// records before it).
fn numbers_with_checkpoints(from: u64, records: u64) -> Vec<SourceItem<u64>> {
    let mut items = vec![];
    for n in from..records {
        if n % 250 == 0 && n > from {
            items.push(SourceItem::Checkpoint(SourcePosition {
                offset: n,
                records: n,
                digest: 0,
            }));
        }
        items.push(SourceItem::Record(n));
    }
    items
}

/// One shard with its source and sink on it checkpoints: a run that fails after its third
/// committed checkpoint resumes from the newest, re-issues what was in flight there, and the
/// "file" cut back to the checkpoint's length ends up holding every record once, in order.
#[test]
fn one_shard_checkpoints_and_a_restart_resumes_exactly_once() {
    const RECORDS: u64 = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let file = Arc::new(Mutex::new(Vec::new()));
    let stage = |crash: Option<(usize, usize)>, committed: Arc<Mutex<Vec<u64>>>| {
        let builder = Stage::builder(|_ctx| {
            from_fn(|&n: &u64| async move {
                glommio::timer::sleep(Duration::from_micros(n * 7919 % 400)).await;
                Ok::<_, std::io::Error>(Outputs::One(n))
            })
        })
        .shards(1)
        .capacity(32)
        .mode(OutputMode::Ordered)
        .checkpointing(Checkpointing::new(dir.path(), Codec::u64(), Codec::u64()))
        .on_shards()
        .expect("the stage's checkpoints open");
        let resume_at = builder.restored().map_or(0, |r| r.source.records);
        if let Some(restored) = builder.restored() {
            file.lock()
                .unwrap()
                .truncate(restored.sink_position as usize);
        }
        let sink_file = file.clone();
        let handle = builder
            .run(
                move |_| futures::stream::iter(numbers_with_checkpoints(resume_at, RECORDS)),
                move |_| FileSink {
                    file: sink_file.clone(),
                    committed: committed.clone(),
                    crash,
                    writes_after: 0,
                },
            )
            .expect("stage starts");
        (handle, resume_at)
    };
    let committed = Arc::new(Mutex::new(Vec::new()));
    let (mut first, _) = stage(Some((3, 2)), committed.clone());
    let error = first.wait().expect_err("the sink crashes");
    assert!(error.to_string().contains("crash"), "{error}");
    assert!(committed.lock().unwrap().len() >= 3);
    let (mut second, resumed_at) = stage(None, Arc::new(Mutex::new(Vec::new())));
    second.wait().expect("the resumed run ends cleanly");
    assert!(
        resumed_at >= 750,
        "resumed from the third checkpoint or later: {resumed_at}"
    );
    let expected: Vec<u64> = (0..RECORDS).collect();
    assert_eq!(
        *file.lock().unwrap(),
        expected,
        "every record once, in order"
    );
}
