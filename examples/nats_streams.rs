//! Sets up and reads the JetStream streams of the NATS benchmark (docs/benchmarks.md,
//! "Streams in and out"): `fill` makes an input stream holding the JSON Lines of a file (one
//! message per line; with PARTITIONS, on subjects `IN_SUBJECT.<p>`, a record's partition being
//! a hash of its `user_id` field) and an empty output stream; `wait` waits until a stream
//! holds N messages and prints how long that took; `drop` deletes streams.
//!
//! Run: `cargo run --release --example nats_streams -- fill nats://127.0.0.1:4222 IN in.subject
//! OUT out.subject < records.jsonl`, `... wait nats://127.0.0.1:4222 OUT 200000`,
//! `... drop nats://127.0.0.1:4222 IN OUT`.

use async_nats::jetstream;
use std::io::BufRead;
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!(
        "usage: nats_streams fill URL IN_STREAM IN_SUBJECT OUT_STREAM OUT_SUBJECT [PARTITIONS] < lines\n\
         \x20      nats_streams wait URL STREAM COUNT\n\
         \x20      nats_streams drop URL STREAM..."
    );
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(command), Some(url)) = (args.first(), args.get(1)) else {
        usage()
    };
    let js = jetstream::new(async_nats::connect(url).await.expect("NATS answers"));
    match (command.as_str(), &args[2..]) {
        ("fill", [stream_in, subject_in, stream_out, subject_out, partitions @ ..])
            if partitions.len() <= 1 =>
        {
            let partitions: Option<u64> = partitions
                .first()
                .map(|p| p.parse().unwrap_or_else(|_| usage()));
            let captured = match partitions {
                Some(_) => format!("{subject_in}.*"),
                None => subject_in.clone(),
            };
            for (name, subject, window) in [
                (stream_in, &captured, Duration::from_secs(120)),
                (stream_out, subject_out, Duration::from_secs(600)),
            ] {
                let _ = js.delete_stream(name).await;
                js.create_stream(jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![subject.clone()],
                    duplicate_window: window,
                    ..Default::default()
                })
                .await
                .expect("the stream is created");
            }
            let mut acks = Vec::new();
            let mut count = 0u64;
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                let subject = match partitions {
                    Some(p) => {
                        let record: serde_json::Value =
                            serde_json::from_str(&line).expect("a JSON record");
                        let user = record["user_id"].as_str().unwrap_or_default();
                        format!("{subject_in}.{}", sluice::hash_key(user.as_bytes()) % p)
                    }
                    None => subject_in.clone(),
                };
                let ack = js.publish(subject, line.into()).await.expect("published");
                acks.push(ack);
                count += 1;
                // The client holds back publishes beyond a few thousand acks not awaited.
                if acks.len() == 1000 {
                    for ack in acks.drain(..) {
                        ack.await.expect("stored");
                    }
                }
            }
            for ack in acks {
                ack.await.expect("stored");
            }
            eprintln!("nats_streams: {count} messages in {stream_in}");
        }
        ("wait", [stream, count]) => {
            let count: u64 = count.parse().unwrap_or_else(|_| usage());
            let started = Instant::now();
            let mut stream = js.get_stream(stream).await.expect("the stream exists");
            while stream.info().await.expect("stream info").state.messages < count {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            println!("{:.3}", started.elapsed().as_secs_f64());
        }
        ("drop", streams) if !streams.is_empty() => {
            for name in streams {
                let _ = js.delete_stream(name).await;
            }
        }
        _ => usage(),
    }
}
