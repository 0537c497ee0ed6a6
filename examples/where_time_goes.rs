//! Where one lookup's time goes, sequentially (one record in flight), against the embedded
//! loadgen server with no added delay:
//!
//! 1. the round trip of a blocking `std::net` client (the floor: loopback + server);
//! 2. the round trip of sluice's io_uring Redis client on a glommio executor;
//! 3. a 1-shard stage at capacity 1: invoke-to-emit inside the shard (the operator's cost on
//!    top of 2), and push-to-receive end to end (adding the producer -> shard -> consumer
//!    thread hops).
//!
//! Run: `cargo run --release --example where_time_goes` (figures in docs/benchmarks.md).

use loadgen::{keyspace, LatencyModel, Server, ServerConfig};
use sluice::{from_fn, Outputs, Stage};
use std::io::{Read, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

const N: u32 = 20_000;

fn main() {
    let server = Server::start(ServerConfig {
        latency: LatencyModel::Fixed(Duration::ZERO),
        ..Default::default()
    })
    .expect("loadgen server");
    let addr = server.addr();

    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    for i in 0..N {
        let k = keyspace::key(u64::from(i) % 1000);
        let cmd = format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len());
        stream.write_all(cmd.as_bytes()).unwrap();
        let _ = stream.read(&mut buf).unwrap();
    }
    let blocking = started.elapsed() / N;

    let io_uring = glommio::LocalExecutorBuilder::default()
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .spawn(move || async move {
            let client = sluice::redis::RedisClient::new(addr, &Default::default());
            client.get(b"user:user_000001").await.unwrap();
            let started = Instant::now();
            for i in 0..N {
                client
                    .get(keyspace::key(u64::from(i) % 1000).as_bytes())
                    .await
                    .unwrap();
            }
            started.elapsed() / N
        })
        .unwrap()
        .join()
        .unwrap();

    let stage = Stage::builder(move |_| {
        let client = Rc::new(sluice::redis::RedisClient::new(addr, &Default::default()));
        from_fn(move |k: &u64| {
            let get = client.get(keyspace::key(*k).as_bytes());
            async move { get.await.map(|v| Outputs::One(v.map_or(0, |v| v.len()))) }
        })
    })
    .shards(1)
    .capacity(1)
    .start()
    .unwrap();
    let (mut producer, mut consumer, handle) = stage.split();
    let started = Instant::now();
    for i in 0..u64::from(N) {
        producer.push(i % 1000).unwrap();
        consumer.recv().unwrap().unwrap();
    }
    let end_to_end = started.elapsed() / N;
    let in_shard = handle.metrics().invoke_to_emit_us.value_at_quantile(0.5);
    drop(producer);
    while consumer.recv().is_some() {}
    handle.join().unwrap();

    println!("blocking std client round trip      {blocking:>10.1?}");
    println!("io_uring client round trip          {io_uring:>10.1?}");
    println!(
        "stage, invoke to emit (p50)         {:>10.1?}",
        Duration::from_micros(in_shard)
    );
    println!("stage, push to receive (mean)       {end_to_end:>10.1?}");
}
