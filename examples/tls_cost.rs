//! What TLS costs per record: the same lookups over plain TCP and over TLS to one Redis (a
//! plain port and a TLS port of the same server), alternating, on one glommio executor:
//! `RECORDS` uniform GETs over loadgen's keyspace through the lookup layer, `IN_FLIGHT` at a
//! time, the whole process's CPU time (user + system) per record for each. Pin it to a core
//! and the server to the other, as in docs/benchmarks.md.
//!
//! Run: `taskset -c 0 cargo run --release --example tls_cost -- redis://127.0.0.1:16380
//! rediss://localhost:16381 CA.pem [IN_FLIGHT [RECORDS [KEYS]]]`

use futures::StreamExt;
use sluice::lookup::{LayerConfig, Lookups};
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(plain), Some(tls), Some(ca)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("usage: tls_cost PLAIN_URL TLS_URL CA_FILE [IN_FLIGHT [RECORDS [KEYS]]]");
        std::process::exit(2);
    };
    let number = |i: usize, default: usize| args.get(i).map_or(default, |a| a.parse().unwrap());
    let (in_flight, records, keys) = (number(3, 256), number(4, 500_000), number(5, 1_000_000));
    let plain = Endpoint::parse(plain).expect("the plain URL");
    let mut tls = Endpoint::parse(tls).expect("the TLS URL");
    tls.tls.as_mut().expect("a rediss:// URL").ca_file = Some(ca.into());
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
                capacity: std::num::NonZeroUsize::new(in_flight),
                ..LayerConfig::default()
            };
            println!("in flight {in_flight}, {records} records per run, uniform over {keys} keys");
            for round in 1..=3 {
                for (label, endpoint) in [("tcp", &plain), ("tls", &tls)] {
                    let lookups = Lookups::new(
                        RedisClient::new(endpoint.clone(), &client),
                        layer.clone(),
                    );
                    lookups.get(b"warm-up").await.expect("the server answers");
                    let mut rng = fastrand::Rng::with_seed(round);
                    let keys: Vec<String> = (0..records)
                        .map(|_| loadgen::keyspace::key(rng.u64(..keys as u64)))
                        .collect();
                    let (cpu0, wall0) = (cpu(), Instant::now());
                    let mut found = 0usize;
                    let mut answers = futures::stream::iter(keys.iter())
                        .map(|k| lookups.get(k.as_bytes()))
                        .buffer_unordered(in_flight);
                    while let Some(answer) = answers.next().await {
                        found += usize::from(answer.expect("answered").is_some());
                    }
                    let (cpu, wall) = (cpu() - cpu0, wall0.elapsed());
                    println!(
                        "round {round} {label}: {:.0} records/s, {:.2} us cpu/record, {found} found",
                        records as f64 / wall.as_secs_f64(),
                        cpu.as_secs_f64() * 1e6 / records as f64
                    );
                }
            }
        });
}
