//! The hand-overs between the producer thread, the shards and the consumer thread
//! (`engine::handoff`), on real threads: each side parks on a full or empty channel and is woken
//! by the other side's doorbell, and a side that goes away wakes the one waiting on it. Every
//! wait here is bounded by a watchdog, so a lost wake-up fails the test instead of hanging it.

use sluice::{from_fn, Output, Outputs, PushError, Stage};
use std::sync::mpsc;
use std::time::Duration;

/// Runs `f` on a thread and fails if it has not returned within `limit` (a lost wake-up).
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}: a lost wake-up"))
}

fn echo_stage(shards: usize, capacity: usize, channel: usize) -> Stage<u64, u64> {
    Stage::builder(|_ctx| {
        from_fn(|&v: &u64| async move { Ok::<_, std::io::Error>(Outputs::One(v)) })
    })
    .shards(shards)
    .capacity(capacity)
    .channel_capacity(channel)
    .start()
    .expect("stage starts")
}

/// Counts the outputs to the end of the stream (each must be `Ok`), then joins the feeder and
/// the shards.
fn count_to_the_end(
    consumer: &mut sluice::Consumer<u64>,
    feeder: std::thread::JoinHandle<()>,
    handle: sluice::StageHandle,
) -> u64 {
    let mut count = 0u64;
    while let Some(item) = consumer.recv() {
        item.expect("no stage error");
        count += 1;
    }
    feeder.join().unwrap();
    handle.join().unwrap();
    count
}

#[test]
fn a_slow_consumer_parks_shards_and_producer_and_loses_nothing() {
    within(Duration::from_secs(60), "the slow-consumer run", || {
        // Channels of 1: the producer waits for every drain, the shards for every read.
        let (mut producer, mut consumer, handle) = echo_stage(2, 2, 1).split();
        let n = 2_000u64;
        let feeder = std::thread::spawn(move || {
            for v in 0..n {
                producer.push(v).expect("the stage is alive");
            }
        });
        let mut got = Vec::new();
        while let Some(item) = consumer.recv() {
            match item.expect("no stage error") {
                Output::Record { value, .. } => got.push(value),
                other => panic!("unexpected {other:?}"),
            }
            if got.len() % 100 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        feeder.join().unwrap();
        handle.join().unwrap();
        got.sort_unstable();
        assert_eq!(got, (0..n).collect::<Vec<_>>());
    });
}

#[test]
fn a_fast_consumer_waits_for_a_slow_producer_without_missing_a_wake_up() {
    within(Duration::from_secs(60), "the slow-producer run", || {
        let (mut producer, mut consumer, handle) = echo_stage(2, 4, 4).split();
        let feeder = std::thread::spawn(move || {
            for v in 0..200u64 {
                // The shards and the consumer are idle (armed) when most records arrive.
                std::thread::sleep(Duration::from_micros(200));
                producer.push(v).expect("the stage is alive");
            }
        });
        assert_eq!(count_to_the_end(&mut consumer, feeder, handle), 200);
    });
}

#[test]
fn a_producer_blocked_on_a_full_stage_gets_its_record_back_when_the_consumer_goes() {
    let back = within(Duration::from_secs(60), "the blocked producer", || {
        let (mut producer, consumer, handle) = echo_stage(1, 1, 1).split();
        // Nobody reads: egress, the shard's queue, its ingress buffer and channel fill up, and
        // the producer parks on a full ingress channel.
        let feeder = std::thread::spawn(move || {
            for v in 0..1_000_000u64 {
                if let Err(PushError::Closed(back)) = producer.push(v) {
                    return Some(back);
                }
            }
            None
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!feeder.is_finished(), "the producer is blocked, not done");
        drop(consumer);
        let back = feeder.join().unwrap();
        handle.join().unwrap();
        back
    });
    assert!(back.is_some(), "the blocked push hands its record back");
}

#[test]
fn an_async_producer_is_woken_by_drains_too() {
    within(Duration::from_secs(60), "the async producer", || {
        let (mut producer, mut consumer, handle) = echo_stage(2, 2, 1).split();
        let feeder = std::thread::spawn(move || {
            futures::executor::block_on(async {
                for v in 0..2_000u64 {
                    producer.push_async(v).await.expect("the stage is alive");
                }
            })
        });
        assert_eq!(count_to_the_end(&mut consumer, feeder, handle), 2_000);
    });
}
