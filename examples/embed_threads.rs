//! Embedding a stage in a plain threaded program: a producer thread feeds transactions, the
//! main thread reads enriched results in input order, and the handle reports metrics.
//!
//! Run: `cargo run --release --example embed_threads`

use sluice::{from_fn, hash_key, Output, OutputMode, Outputs, RetryPolicy, Stage};
use std::time::Duration;

#[derive(Debug, Clone)]
struct Transaction {
    user_id: u64,
    amount_cents: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let stage = Stage::builder(|shard| {
        // Created on the shard's own thread: a real client (Redis, HTTP) would connect here.
        println!("shard {} of {} starting", shard.index, shard.shards);
        from_fn(|tx: &Transaction| {
            let tx = tx.clone();
            async move {
                // Stands in for a 1 ms lookup of the user's country.
                glommio::timer::sleep(Duration::from_millis(1)).await;
                let country = ["NL", "US", "IN", "BR"][(tx.user_id % 4) as usize];
                Ok::<_, std::io::Error>(Outputs::One((tx, country)))
            }
        })
    })
    .capacity(100)
    .timeout(Duration::from_millis(500))
    .mode(OutputMode::KeyOrdered)
    .key_by(|tx: &Transaction| hash_key(&tx.user_id))
    .retry(RetryPolicy::fixed(3, Duration::from_millis(5)).on_any_error())
    .start()?;
    let (mut producer, mut consumer, handle) = stage.split();
    for p in handle.placements() {
        println!("{p}");
    }

    let feeder = std::thread::spawn(move || {
        for i in 0..20_000u64 {
            let tx = Transaction {
                user_id: i % 1_000,
                amount_cents: i * 7 % 10_000,
            };
            producer.push(tx).expect("stage running");
            if i % 1_000 == 999 {
                producer.push_watermark(i).expect("stage running");
            }
        }
    });

    let started = std::time::Instant::now();
    let (mut records, mut watermarks, mut total_cents) = (0u64, 0u64, 0u64);
    while let Some(item) = consumer.recv() {
        match item? {
            Output::Record {
                value: (tx, _country),
                ..
            } => {
                records += 1;
                total_cents += tx.amount_cents;
            }
            Output::Watermark(_) => watermarks += 1,
            Output::Checkpoint(_) => unreachable!("this stage takes no checkpoints"),
        }
    }
    feeder.join().expect("feeder thread");
    let elapsed = started.elapsed();
    let m = handle.metrics();
    println!(
        "{records} records, {watermarks} watermarks, {total_cents} cents in {elapsed:.2?} \
         ({:.0} records/s); invoke-to-emit p50 {} us, p99 {} us",
        records as f64 / elapsed.as_secs_f64(),
        m.invoke_to_emit_us.value_at_quantile(0.5),
        m.invoke_to_emit_us.value_at_quantile(0.99),
    );
    handle.join()?;
    Ok(())
}
