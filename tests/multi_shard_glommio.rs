//! The engine on real glommio executors: 1, 2 and 4 shards (4 shards on a 2-core machine run
//! unpinned), every mode, records with varying latency and watermarks every few records. The
//! merged output must keep each mode's guarantees across shards.

mod common;

use common::{check_merged, In, Out};
use sluice::{from_fn, Output, OutputMode, Outputs, Stage, QUEUE_WAIT_SAMPLE};
use std::time::Duration;

/// Input: (seq, key, latency in microseconds). Output: the seq, after the latency.
fn run(mode: OutputMode, shards: usize, records: u64) {
    let stage = Stage::builder(|_ctx| {
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
    .start()
    .expect("stage starts");
    let (mut producer, mut consumer, handle) = stage.split();
    assert_eq!(handle.placements().len(), shards);

    let feeder = std::thread::spawn(move || {
        let mut pushed = vec![];
        let mut ts = 0;
        for i in 0..records {
            // Deterministic pseudo-random latency in 0..2000 us and key in 0..5.
            let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            let (latency, key) = (h % 2000, h % 5);
            let seq = producer.next_seq();
            assert_eq!(producer.push((seq, key, latency)).unwrap(), seq);
            pushed.push(In::Rec { seq, key });
            if i % 7 == 6 {
                ts += 10;
                let seq = producer.push_watermark(ts).unwrap();
                pushed.push(In::Wm { seq, ts });
            }
        }
        producer.finish();
        pushed
    });
    let mut output = vec![];
    while let Some(item) = consumer.recv() {
        match item.expect("no stage error") {
            Output::Record { seq, value } => {
                assert_eq!(seq, value, "output belongs to its input");
                output.push(Out::Rec(seq));
            }
            Output::Watermark(ts) => output.push(Out::Wm(ts)),
            Output::Checkpoint(id) => panic!("checkpoint {id} from a stage without checkpoints"),
        }
    }
    let pushed = feeder.join().unwrap();
    check_merged(mode, &pushed, &output);
    // Shards publish their final metrics before they report finished.
    let metrics = handle.metrics();
    handle.join().expect("shards end cleanly");
    assert_eq!(
        (metrics.records_in, metrics.records_out),
        (records, records)
    );
    assert_eq!(metrics.invoke_to_emit_us.len(), records);
    // The wait before the first invoke is sampled: records whose sequence number is a
    // multiple of QUEUE_WAIT_SAMPLE (watermarks take sequence numbers too).
    let sampled = pushed
        .iter()
        .filter(|i| matches!(i, In::Rec { seq, .. } if seq % QUEUE_WAIT_SAMPLE == 0))
        .count();
    assert!(sampled > 0);
    assert_eq!(metrics.queue_wait_us.len(), sampled as u64);
    assert_eq!(metrics.in_flight, 0);
}

#[test]
fn ordered_across_1_2_and_4_shards() {
    for shards in [1, 2, 4] {
        run(OutputMode::Ordered, shards, 300);
    }
}

#[test]
fn unordered_keeps_the_watermark_barrier_across_1_2_and_4_shards() {
    for shards in [1, 2, 4] {
        run(OutputMode::Unordered, shards, 300);
    }
}

#[test]
fn key_ordered_keeps_per_key_order_across_1_2_and_4_shards() {
    for shards in [1, 2, 4] {
        run(OutputMode::KeyOrdered, shards, 300);
    }
}

#[test]
fn a_function_error_fails_the_stage_and_hands_back_later_pushes() {
    let stage = Stage::builder(|_ctx| {
        from_fn(|&v: &u64| async move {
            if v == 50 {
                Err(std::io::Error::other("lookup refused"))
            } else {
                Ok(Outputs::One(v))
            }
        })
    })
    .shards(2)
    .capacity(4)
    .start()
    .unwrap();
    let (mut producer, mut consumer, handle) = stage.split();
    let feeder = std::thread::spawn(move || {
        for v in 0..10_000u64 {
            if let Err(sluice::PushError::Closed(back)) = producer.push(v) {
                return Some(back);
            }
        }
        None
    });
    let mut error = None;
    while let Some(item) = consumer.recv() {
        if let Err(e) = item {
            error = Some(e);
        }
    }
    drop(consumer);
    let handed_back = feeder.join().unwrap();
    let error = error.expect("the error reaches the consumer");
    assert!(error.to_string().contains("lookup refused"), "{error}");
    assert!(error.to_string().contains("50"), "names the input: {error}");
    assert!(
        handed_back.is_some(),
        "a push after the failure hands the record back"
    );
    handle.join().unwrap();
}

#[test]
fn a_panic_in_the_function_is_reported_not_hung() {
    let stage = Stage::builder(|_ctx| {
        from_fn(|&v: &u64| {
            assert!(v != 3, "boom at three");
            async move { Ok::<_, std::io::Error>(Outputs::One(v)) }
        })
    })
    .shards(2)
    .start()
    .unwrap();
    let (mut producer, mut consumer, handle) = stage.split();
    std::thread::spawn(move || {
        for v in 0..10u64 {
            if producer.push(v).is_err() {
                break;
            }
        }
    });
    let mut error = None;
    while let Some(item) = consumer.recv() {
        if let Err(e) = item {
            error = Some(e);
        }
    }
    let error = error.expect("the panic reaches the consumer");
    assert!(error.to_string().contains("boom at three"), "{error}");
    drop(consumer);
    let _ = handle.join();
}

/// Pushes `0..n`, ends the input, and counts the outputs (each must be `Ok`).
fn push_and_drain(
    mut producer: sluice::Producer<u64>,
    consumer: &mut sluice::Consumer<u64>,
    n: u64,
) -> u64 {
    for v in 0..n {
        producer.push(v).unwrap();
    }
    producer.finish();
    let mut outputs = 0;
    while let Some(item) = consumer.recv() {
        item.unwrap();
        outputs += 1;
    }
    outputs
}

#[test]
fn more_shards_than_cores_still_runs_and_says_so() {
    let cores = sluice::usable_cores().len();
    let shards = cores + 2;
    let stage = Stage::builder(|_ctx| {
        from_fn(|&v: &u64| async move { Ok::<_, std::io::Error>(Outputs::One(v)) })
    })
    .shards(shards)
    .start()
    .unwrap();
    let (producer, mut consumer, handle) = stage.split();
    assert!(handle
        .placements()
        .iter()
        .all(|p| p.core.is_none() && p.reason.is_some()));
    assert_eq!(push_and_drain(producer, &mut consumer, 100), 100);
    handle.join().unwrap();
}

/// Counts `close` calls; answers every record at once.
struct Closing {
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::ThreadId,
}

impl sluice::AsyncFunction for Closing {
    type In = u64;
    type Out = u64;
    type Error = std::io::Error;
    type Future = futures::future::Ready<Result<Outputs<u64>, std::io::Error>>;
    fn invoke(&self, v: &u64) -> Self::Future {
        assert_eq!(
            std::thread::current().id(),
            self.thread,
            "invoked on the shard's thread"
        );
        futures::future::ready(Ok(Outputs::One(*v)))
    }
    fn close(&mut self) {
        assert_eq!(
            std::thread::current().id(),
            self.thread,
            "closed on the shard's thread"
        );
        self.closed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn the_function_is_created_and_closed_once_per_shard_on_its_thread() {
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let created = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (c, k) = (closed.clone(), created.clone());
    let stage = Stage::builder(move |_ctx| {
        k.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Closing {
            closed: c.clone(),
            thread: std::thread::current().id(),
        }
    })
    .shards(3)
    .start()
    .unwrap();
    let (producer, mut consumer, handle) = stage.split();
    assert_eq!(push_and_drain(producer, &mut consumer, 50), 50);
    handle.join().unwrap();
    assert_eq!(created.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(
        closed.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "close ran once per shard"
    );
}

#[test]
fn key_ordered_without_a_key_is_refused_with_a_clear_error() {
    let result = Stage::builder(|_ctx| {
        from_fn(|v: &u64| futures::future::ready(Ok::<_, std::io::Error>(Outputs::One(*v))))
    })
    .mode(OutputMode::KeyOrdered)
    .start();
    let Err(error) = result else {
        panic!("KeyOrdered without key_by must not start")
    };
    assert!(error.to_string().contains("key_by"), "{error}");
    let result = Stage::builder(|_ctx| {
        from_fn(|v: &u64| futures::future::ready(Ok::<_, std::io::Error>(Outputs::One(*v))))
    })
    .capacity(0)
    .start();
    let Err(error) = result else {
        panic!("capacity 0 must not start")
    };
    assert!(error.to_string().contains("capacity"), "{error}");
}
