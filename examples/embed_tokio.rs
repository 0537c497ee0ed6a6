//! Embedding a stage in a tokio application, with a custom async function that is not Redis:
//! an HTTP lookup written against glommio's io_uring TCP.
//!
//! - tokio runs the producer and the consumer (`push_async`, and the consumer as a `Stream`);
//! - the shards run on their own glommio executors (pinned when there is a core for each);
//! - each shard's function is created on that shard's thread, so it may hold `!Send` state.
//!
//! A tiny HTTP server on a plain thread plays the lookup service: `GET /user/<id>` answers
//! `{"user":<id>,"tier":"gold"|"silver"}`.
//!
//! Run: `cargo run --release --example embed_tokio`

use futures::io::{AsyncReadExt, AsyncWriteExt};
use futures::StreamExt;
use sluice::{AsyncFunction, Fallback, Output, OutputMode, Outputs, RetryPolicy, Stage};
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

/// A lookup over HTTP/1.0 (one request per connection, kept simple on purpose).
struct HttpLookup {
    server: SocketAddr,
    /// Per-shard state: `Rc`, so this function is `!Send`, which is fine on its shard.
    requests: Rc<std::cell::Cell<u64>>,
}

impl AsyncFunction for HttpLookup {
    type In = u64;
    type Out = (u64, String);
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Outputs<(u64, String)>, std::io::Error>>>>;

    fn invoke(&self, user: &u64) -> Self::Future {
        let (server, user, requests) = (self.server, *user, self.requests.clone());
        Box::pin(async move {
            requests.set(requests.get() + 1);
            let mut stream = glommio::net::TcpStream::connect(server).await?;
            stream
                .write_all(format!("GET /user/{user} HTTP/1.0\r\n\r\n").as_bytes())
                .await?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await?;
            let body = response
                .split("\r\n\r\n")
                .nth(1)
                .ok_or_else(|| std::io::Error::other("no HTTP body"))?;
            Ok(Outputs::One((user, body.to_string())))
        })
    }

    /// A slow lookup is not fatal here: emit the record with an empty profile.
    fn timeout(&self, user: &u64) -> Fallback<(u64, String)> {
        Fallback::Emit(Outputs::One((*user, "{}".into())))
    }
}

fn start_http_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut request = String::new();
                reader.read_line(&mut request).ok();
                let user: u64 = request
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.strip_prefix("/user/"))
                    .and_then(|id| id.parse().ok())
                    .unwrap_or(0);
                let tier = if user % 3 == 0 { "gold" } else { "silver" };
                let body = format!("{{\"user\":{user},\"tier\":\"{tier}\"}}");
                let _ = (&stream).write_all(
                    format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            });
        }
    });
    addr
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = start_http_server();
    let stage = Stage::builder(move |_shard| HttpLookup {
        server,
        requests: Rc::new(std::cell::Cell::new(0)),
    })
    .capacity(32)
    .timeout(Duration::from_secs(2))
    .mode(OutputMode::Ordered)
    .retry(RetryPolicy::fixed(3, Duration::from_millis(10)).on_any_error())
    .start()?;
    let (mut producer, mut consumer, handle) = stage.split();
    for p in handle.placements() {
        println!("{p}");
    }

    // The producer is a tokio task: `push_async` waits (without blocking tokio) when full.
    let feeder = tokio::spawn(async move {
        for user in 0..2_000u64 {
            producer.push_async(user).await.expect("stage running");
        }
        // Dropping the producer ends the input.
    });

    // The consumer is a `futures::Stream`.
    let (mut records, mut gold) = (0u64, 0u64);
    while let Some(item) = consumer.next().await {
        if let Output::Record {
            seq,
            value: (user, profile),
        } = item?
        {
            assert_eq!(seq, user, "ordered mode: input order");
            records += 1;
            gold += u64::from(profile.contains("gold"));
        }
    }
    feeder.await?;
    let m = handle.metrics();
    println!(
        "{records} users enriched over HTTP, {gold} gold; p99 {} us, {} retries, {} timeouts",
        m.invoke_to_emit_us.value_at_quantile(0.99),
        m.retries,
        m.timeouts
    );
    handle.join()?;
    Ok(())
}
