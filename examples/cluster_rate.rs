//! One Redis against a Redis Cluster, as sluice sees them: the same uniform lookups (keys
//! `user:user_NNNNNN`) through the lookup layer, batched, alternating between a single server
//! and a cluster, the whole process's CPU per record for each. `scripts/cluster_comparison.sh`
//! runs it beside the servers' own CPU (docs/benchmarks.md).
//!
//! Run: `cargo run --release --example cluster_rate -- SINGLE_URL CLUSTER_URL
//! [IN_FLIGHT [RECORDS [KEYS [ROUNDS]]]]`

use futures::StreamExt;
use sluice::lookup::{BatchLookup, LayerConfig, Lookups};
use sluice::redis::cluster::RedisCluster;
use sluice::redis::{ClientConfig, Endpoint, RedisClient};
use std::time::{Duration, Instant};

fn cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we own; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Looks `keys` up through `lookups`, `in_flight` at a time: records/s, CPU us per record, and
/// how many were found.
async fn measure<B: BatchLookup>(
    lookups: &Lookups<B>,
    keys: &[String],
    in_flight: usize,
) -> (f64, f64, usize)
where
    B::Error: std::fmt::Debug,
{
    let (cpu0, wall0) = (cpu(), Instant::now());
    let mut found = 0usize;
    let mut answers = futures::stream::iter(keys.iter())
        .map(|k| lookups.get(k.as_bytes()))
        .buffer_unordered(in_flight);
    while let Some(answer) = answers.next().await {
        found += usize::from(answer.expect("answered").is_some());
    }
    let n = keys.len() as f64;
    (
        n / wall0.elapsed().as_secs_f64(),
        (cpu() - cpu0).as_secs_f64() * 1e6 / n,
        found,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(single), Some(cluster)) = (args.first(), args.get(1)) else {
        eprintln!(
            "usage: cluster_rate SINGLE_URL CLUSTER_URL [IN_FLIGHT [RECORDS [KEYS [ROUNDS]]]]"
        );
        std::process::exit(2);
    };
    let number = |i: usize, default: usize| args.get(i).map_or(default, |a| a.parse().unwrap());
    let (in_flight, records, keyspace, rounds) = (
        number(2, 256),
        number(3, 500_000),
        number(4, 1_000_000),
        number(5, 3),
    );
    let single = Endpoint::parse(single).expect("the single server's URL");
    let cluster = Endpoint::parse(cluster).expect("the cluster's URL");
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .make()
        .expect("executor")
        .run(async move {
            let client = ClientConfig {
                max_in_flight: in_flight * 2,
                ..ClientConfig::default()
            };
            let layer = LayerConfig {
                batch_size: std::num::NonZeroUsize::new(16).unwrap(),
                capacity: std::num::NonZeroUsize::new(in_flight),
                ..LayerConfig::default()
            };
            let one = Lookups::new(RedisClient::new(single, &client), layer.clone());
            let many = Lookups::new(RedisCluster::new(cluster, &client), layer);
            println!("in flight {in_flight}, batches of 16, {records} records per run, uniform over {keyspace} keys");
            for round in 1..=rounds {
                let mut rng = fastrand::Rng::with_seed(round as u64);
                let keys: Vec<String> = (0..records)
                    .map(|_| loadgen::keyspace::key(rng.u64(..keyspace as u64)))
                    .collect();
                let (rate, cpu, found) = measure(&one, &keys, in_flight).await;
                println!("round {round} single: {rate:.0} records/s, {cpu:.2} us cpu/record, {found} found");
                let (rate, cpu, found) = measure(&many, &keys, in_flight).await;
                println!("round {round} cluster: {rate:.0} records/s, {cpu:.2} us cpu/record, {found} found");
            }
        });
}
