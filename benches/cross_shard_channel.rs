//! What it costs to hand a record from one shard's executor to another's: glommio's
//! `shared_channel` (woken through the receiving executor's ring) against a flume channel
//! awaited with its async API (woken through a futex), between two glommio executors placed on
//! two cores. Two shapes: a ping-pong (one record in flight: the hand-over's latency, there and
//! back) and a stream (records sent as fast as the receiver takes them: the cost per record).
//! A third pair of executors spins for 50 us before it parks, to show what the wake-up of a
//! parked executor costs.
//! The measurement a stage whose reader shard routes records to the other shards starts from.
//!
//! Run: `cargo bench --bench cross_shard_channel`.

use criterion::{criterion_group, criterion_main, Criterion};
use glommio::channels::shared_channel;
use glommio::{LocalExecutorBuilder, Placement};
use std::time::{Duration, Instant};

/// Capacity of every channel.
const CAPACITY: usize = 256;

#[derive(Clone, Copy)]
enum Kind {
    Shared,
    Flume,
    /// `Shared` between executors that spin for 50 us before they park.
    SharedSpinning,
}

impl Kind {
    fn executor(self, core: usize) -> LocalExecutorBuilder {
        let builder = LocalExecutorBuilder::new(placement(core));
        match self {
            Kind::SharedSpinning => builder.spin_before_park(Duration::from_micros(50)),
            Kind::Shared | Kind::Flume => builder,
        }
    }
}

/// Core `i`, or anywhere on a machine with fewer.
fn placement(core: usize) -> Placement {
    if core < sluice::usable_cores().len() {
        Placement::Fixed(sluice::usable_cores()[core])
    } else {
        Placement::Unbound
    }
}

/// A sender and a receiver of one kind, made on one thread and used on two executors.
enum Tx {
    Shared(shared_channel::SharedSender<u64>),
    Flume(flume::Sender<u64>),
}

enum Rx {
    Shared(shared_channel::SharedReceiver<u64>),
    Flume(flume::Receiver<u64>),
}

fn channel(kind: Kind) -> (Tx, Rx) {
    match kind {
        Kind::Shared | Kind::SharedSpinning => {
            let (tx, rx) = shared_channel::new_bounded(CAPACITY);
            (Tx::Shared(tx), Rx::Shared(rx))
        }
        Kind::Flume => {
            let (tx, rx) = flume::bounded(CAPACITY);
            (Tx::Flume(tx), Rx::Flume(rx))
        }
    }
}

/// The connected ends, on their executor.
enum Sending {
    Shared(shared_channel::ConnectedSender<u64>),
    Flume(flume::Sender<u64>),
}

enum Receiving {
    Shared(shared_channel::ConnectedReceiver<u64>),
    Flume(flume::Receiver<u64>),
}

impl Tx {
    async fn connect(self) -> Sending {
        match self {
            Tx::Shared(tx) => Sending::Shared(tx.connect().await),
            Tx::Flume(tx) => Sending::Flume(tx),
        }
    }
}

impl Rx {
    async fn connect(self) -> Receiving {
        match self {
            Rx::Shared(rx) => Receiving::Shared(rx.connect().await),
            Rx::Flume(rx) => Receiving::Flume(rx),
        }
    }
}

impl Sending {
    async fn send(&self, n: u64) {
        match self {
            Sending::Shared(tx) => tx.send(n).await.expect("the receiver is there"),
            Sending::Flume(tx) => tx.send_async(n).await.expect("the receiver is there"),
        }
    }
}

impl Receiving {
    async fn recv(&self) -> Option<u64> {
        match self {
            Receiving::Shared(rx) => rx.recv().await,
            Receiving::Flume(rx) => rx.recv_async().await.ok(),
        }
    }
}

/// `count` records there and back, one in flight; the time the sender's executor measured.
fn ping_pong(kind: Kind, count: u64) -> Duration {
    let (to_b, from_a) = channel(kind);
    let (to_a, from_b) = channel(kind);
    let echo = kind
        .executor(1)
        .spawn(move || async move {
            let (rx, tx) = (from_a.connect().await, to_a.connect().await);
            while let Some(n) = rx.recv().await {
                tx.send(n).await;
            }
        })
        .expect("an executor");
    let elapsed = kind
        .executor(0)
        .spawn(move || async move {
            let (tx, rx) = (to_b.connect().await, from_b.connect().await);
            let started = Instant::now();
            for n in 0..count {
                tx.send(n).await;
                assert_eq!(rx.recv().await, Some(n));
            }
            started.elapsed()
        })
        .expect("an executor")
        .join()
        .expect("the sender ran");
    echo.join().expect("the echo ran");
    elapsed
}

/// `count` records one way, as fast as the receiver takes them; the time until the last one
/// arrived.
fn stream(kind: Kind, count: u64) -> Duration {
    let (tx, rx) = channel(kind);
    let receiver = kind
        .executor(1)
        .spawn(move || async move {
            let rx = rx.connect().await;
            let mut last = None;
            while let Some(n) = rx.recv().await {
                last = Some(n);
            }
            (Instant::now(), last)
        })
        .expect("an executor");
    let started = kind
        .executor(0)
        .spawn(move || async move {
            let tx = tx.connect().await;
            let started = Instant::now();
            for n in 0..count {
                tx.send(n).await;
            }
            started
        })
        .expect("an executor")
        .join()
        .expect("the sender ran");
    let (ended, last) = receiver.join().expect("the receiver ran");
    assert_eq!(last, count.checked_sub(1));
    ended.saturating_duration_since(started)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("cross_shard_channel");
    group.sample_size(20);
    for (name, kind) in [
        ("shared_channel", Kind::Shared),
        ("flume", Kind::Flume),
        ("shared_channel_spinning", Kind::SharedSpinning),
    ] {
        group.bench_function(format!("ping_pong/{name}"), |b| {
            b.iter_custom(|iters| ping_pong(kind, iters))
        });
        group.bench_function(format!("stream/{name}"), |b| {
            b.iter_custom(|iters| stream(kind, iters))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
