//! Operator overhead per core: records/s through one `AsyncWait` (on a glommio executor) for
//! each mode at capacities 1, 16 and 256, beside `futures`' `buffered` / `buffer_unordered` on
//! a current-thread tokio runtime, in the same run. Three functions:
//! - `ready`: the future is ready at once, so the figure is pure operator cost;
//! - `yield_once`: the future wakes itself and completes on its second poll, the same code on
//!   both runtimes, so wake-up and re-poll handling is included;
//! - `timer_1ms`: the future completes after a 1 ms timer (glommio's io_uring timer for sluice,
//!   tokio's timer wheel for the baselines; tokio rounds to whole milliseconds, so a shorter
//!   timer would measure tokio's granularity, not the operator). Throughput should approach
//!   capacity / 1 ms on both.
//!
//! sluice carries timeouts (one deadline per record), watermark segments and metrics while the
//! baselines carry none. Each iteration pushes `RECORDS` records and checks every output came
//! back, so the parameters are really used.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::StreamExt;
use glommio::LocalExecutorBuilder;
use sluice::{from_fn, AsyncWaitExt, OperatorConfig, OutputMode, Outputs};
use std::num::NonZeroUsize;
use std::time::Duration;

const RECORDS: u64 = 20_000;
const TIMER: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Work {
    Ready,
    YieldOnce,
    Timer,
}

/// Completes on its second poll after waking itself: runtime-neutral "not ready at once".
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            std::task::Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }
}

fn config(capacity: usize, mode: OutputMode) -> OperatorConfig<u64, std::io::Error> {
    let mut c = OperatorConfig::new();
    c.capacity = NonZeroUsize::new(capacity).unwrap();
    c.mode = mode;
    c.timeout = Duration::from_secs(30);
    c
}

async fn sluice_run(capacity: usize, mode: OutputMode, work: Work) -> u64 {
    let func = from_fn(move |&v: &u64| async move {
        match work {
            Work::Ready => {}
            Work::YieldOnce => YieldOnce(false).await,
            Work::Timer => glommio::timer::sleep(TIMER).await,
        }
        Ok::<_, std::io::Error>(Outputs::One(v))
    });
    let mut s = futures::stream::iter(0..records(work)).async_wait(func, config(capacity, mode));
    let mut sum = 0;
    while let Some(v) = s.next().await {
        sum += v.unwrap();
    }
    sum
}

async fn futures_run(capacity: usize, ordered: bool, work: Work) -> u64 {
    let call = move |v: u64| async move {
        match work {
            Work::Ready => {}
            Work::YieldOnce => YieldOnce(false).await,
            Work::Timer => tokio::time::sleep(TIMER).await,
        }
        Ok::<u64, std::io::Error>(v)
    };
    let input = futures::stream::iter(0..records(work)).map(call);
    let mut sum = 0;
    if ordered {
        let mut s = input.buffered(capacity);
        while let Some(v) = s.next().await {
            sum += v.unwrap();
        }
    } else {
        let mut s = input.buffer_unordered(capacity);
        while let Some(v) = s.next().await {
            sum += v.unwrap();
        }
    }
    sum
}

/// Timer runs are slow by design (capacity / 1 ms): fewer records keep them short.
fn records(work: Work) -> u64 {
    if work == Work::Timer {
        RECORDS / 10
    } else {
        RECORDS
    }
}

fn overhead(c: &mut Criterion) {
    let executor = LocalExecutorBuilder::default()
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .make()
        .expect("glommio executor");
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    for (group_name, work, capacities) in [
        ("ready", Work::Ready, &[1usize, 16, 256][..]),
        ("yield_once", Work::YieldOnce, &[1, 16, 256][..]),
        ("timer_1ms", Work::Timer, &[16, 256][..]),
    ] {
        let expected: u64 = (0..records(work)).sum();
        let mut group = c.benchmark_group(group_name);
        group.throughput(Throughput::Elements(records(work)));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(3));
        group.warm_up_time(Duration::from_secs(1));
        for &capacity in capacities {
            for (name, mode) in [
                ("sluice_ordered", OutputMode::Ordered),
                ("sluice_unordered", OutputMode::Unordered),
                ("sluice_key_ordered", OutputMode::KeyOrdered),
            ] {
                group.bench_with_input(BenchmarkId::new(name, capacity), &capacity, |b, &cap| {
                    b.iter(|| {
                        let sum = executor.run(sluice_run(cap, mode, work));
                        assert_eq!(sum, expected);
                    })
                });
            }
            for (name, ordered) in [
                ("futures_buffered", true),
                ("futures_buffer_unordered", false),
            ] {
                group.bench_with_input(BenchmarkId::new(name, capacity), &capacity, |b, &cap| {
                    b.iter(|| {
                        let sum = tokio_rt.block_on(futures_run(cap, ordered, work));
                        assert_eq!(sum, expected);
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, overhead);
criterion_main!(benches);
