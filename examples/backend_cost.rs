//! Two ways to reach Redis side by side, as sluice sees them: the same uniform lookups (keys
//! `user:user_NNNNNN`) through the lookup layer, alternating between endpoint A and endpoint B,
//! the whole process's CPU time (user + system) per record for each. Used for what TLS costs
//! (A plain, B `rediss://` to the same server) and for one server against a cluster (B
//! `--cluster`); see docs/benchmarks.md. Pin it to a core and the servers to the other.
//!
//! Run: `cargo run --release --example backend_cost -- A_URL B_URL [--tls-ca FILE]
//! [--cluster] [--in-flight N] [--batch N] [--records N] [--keys N] [--rounds N]`

use futures::StreamExt;
use sluice::bench::cpu::process_cpu;
use sluice::lookup::{BatchLookup, LayerConfig, Lookups};
use sluice::redis::cluster::RedisCluster;
use sluice::redis::{ClientConfig, Endpoint, RedisClient};
use std::num::NonZeroUsize;
use std::time::Instant;

/// Looks `keys` up, `in_flight` at a time: records/s, CPU us per record, and how many were
/// found.
async fn measure<B: BatchLookup>(
    lookups: &Lookups<B>,
    keys: &[String],
    in_flight: usize,
) -> (f64, f64, usize) {
    let (cpu0, wall0) = (process_cpu(), Instant::now());
    let mut found = 0usize;
    let mut answers = futures::stream::iter(keys.iter())
        .map(|k| lookups.get(k.as_bytes()))
        .buffer_unordered(in_flight);
    while let Some(answer) = answers.next().await {
        found += usize::from(
            answer
                .unwrap_or_else(|e| panic!("a lookup failed: {e}"))
                .is_some(),
        );
    }
    let n = keys.len() as f64;
    (
        n / wall0.elapsed().as_secs_f64(),
        (process_cpu() - cpu0).as_secs_f64() * 1e6 / n,
        found,
    )
}

struct Options {
    a: Endpoint,
    b: Endpoint,
    cluster: bool,
    in_flight: usize,
    batch: usize,
    records: usize,
    keys: u64,
    rounds: u64,
}

fn options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut urls = vec![];
    let (mut ca, mut cluster) = (None, false);
    let (mut in_flight, mut batch, mut records, mut keys, mut rounds) =
        (256, 1, 500_000, 1_000_000, 3);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String, flag: &str| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match arg.as_str() {
            "--tls-ca" => ca = Some(value("--tls-ca")?),
            "--cluster" => cluster = true,
            "--in-flight" => in_flight = number(value(&arg)?, &arg)? as usize,
            "--batch" => batch = number(value(&arg)?, &arg)? as usize,
            "--records" => records = number(value(&arg)?, &arg)? as usize,
            "--keys" => keys = number(value(&arg)?, &arg)?,
            "--rounds" => rounds = number(value(&arg)?, &arg)?,
            url => urls.push(Endpoint::parse(url).map_err(|e| e.to_string())?),
        }
    }
    let [a, mut b]: [Endpoint; 2] = urls
        .try_into()
        .map_err(|_| "give two URLs, A and B".to_string())?;
    if let (Some(ca), Some(tls)) = (ca, b.tls.as_mut()) {
        tls.ca_file = Some(ca.into());
    }
    Ok(Options {
        a,
        b,
        cluster,
        in_flight,
        batch: batch.max(1),
        records,
        keys,
        rounds,
    })
}

fn main() {
    let o = options().unwrap_or_else(|e| {
        eprintln!("backend_cost: {e}");
        std::process::exit(2)
    });
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .make()
        .expect("executor")
        .run(async move {
            let client = ClientConfig {
                max_in_flight: o.in_flight * 2,
                ..ClientConfig::default()
            };
            let layer = LayerConfig {
                batch_size: NonZeroUsize::new(o.batch).unwrap(),
                capacity: NonZeroUsize::new(o.in_flight),
                ..LayerConfig::default()
            };
            let a = Lookups::new(RedisClient::new(o.a.clone(), &client), layer.clone());
            let (b_single, b_cluster) = if o.cluster {
                let c = RedisCluster::new(o.b.clone(), &client);
                (None, Some(Lookups::new(c, layer)))
            } else {
                let c = RedisClient::new(o.b.clone(), &client);
                (Some(Lookups::new(c, layer)), None)
            };
            println!(
                "A {}, B {}{}; in flight {}, batches of {}, {} records per run, uniform over {} keys",
                o.a,
                o.b,
                if o.cluster { " (cluster)" } else { "" },
                o.in_flight,
                o.batch,
                o.records,
                o.keys
            );
            for round in 1..=o.rounds {
                let mut rng = fastrand::Rng::with_seed(round);
                let keys: Vec<String> = (0..o.records)
                    .map(|_| loadgen::keyspace::key(rng.u64(..o.keys)))
                    .collect();
                let (rate, cpu, found) = measure(&a, &keys, o.in_flight).await;
                println!("round {round} A: {rate:.0} records/s, {cpu:.2} us cpu/record, {found} found");
                let (rate, cpu, found) = match (&b_single, &b_cluster) {
                    (Some(b), _) => measure(b, &keys, o.in_flight).await,
                    (_, Some(b)) => measure(b, &keys, o.in_flight).await,
                    _ => unreachable!("one of the two"),
                };
                println!("round {round} B: {rate:.0} records/s, {cpu:.2} us cpu/record, {found} found");
            }
        });
}
