//! The peer `sluice enrich` is measured against (docs/benchmarks.md): the program a Rust user
//! would write by hand for the same job with tokio (a current-thread runtime), redis-rs and
//! `futures`' `buffered`. It reads JSON Lines from standard input, parses each line with
//! serde_json, `GET`s `PREFIX<value of KEY_FIELD>`, merges the value's fields into the record,
//! serializes it and writes it to standard output, in input order, with `CAPACITY` lookups in
//! flight. With `CACHE` > 0 a `quick_cache` of that many parsed values sits in front of
//! Redis (no expiry: the most a hand-written cache would do for the benchmark's sake).
//!
//! Run: `cargo run --release --example tokio_enrich -- redis://127.0.0.1:6379 user_id user: 64 0
//! < in.jsonl > out.jsonl`

use futures::StreamExt;
use redis::AsyncCommands;
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::io::{BufRead, Write};
use std::rc::Rc;

type Profile = Option<Rc<Map<String, Value>>>;

fn usage() -> ! {
    eprintln!("usage: tokio_enrich REDIS_URL KEY_FIELD PREFIX CAPACITY CACHE < in > out");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, field, prefix, capacity, cache] = &args[..] else {
        usage()
    };
    let capacity: usize = capacity.parse().unwrap_or_else(|_| usage());
    let cache: usize = cache.parse().unwrap_or_else(|_| usage());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = std::time::Instant::now();
    let written = runtime.block_on(run(url, field, prefix, capacity, cache));
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "tokio_enrich: {written} lines in {secs:.2} s ({:.0} records/s)",
        written as f64 / secs
    );
}

async fn run(url: &str, field: &str, prefix: &str, capacity: usize, cache: usize) -> u64 {
    let client = redis::Client::open(url).expect("a redis:// URL");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    let cache = (cache > 0).then(|| Rc::new(RefCell::new(quick_cache::unsync::Cache::new(cache))));
    let lines = std::io::stdin().lock().lines().map_while(Result::ok);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let enriched = futures::stream::iter(lines)
        .map(|line| {
            let (mut conn, cache) = (conn.clone(), cache.clone());
            async move {
                let mut record: Value = serde_json::from_str(&line).expect("a JSON record");
                let id = match &record[field] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let key = format!("{prefix}{id}");
                let cached: Option<Profile> =
                    cache.as_ref().and_then(|c| c.borrow().get(&key).cloned());
                let profile = match cached {
                    Some(p) => p,
                    None => {
                        let raw: Option<String> = conn.get(&key).await.expect("GET answered");
                        let p: Profile = raw.map(|r| Rc::new(serde_json::from_str(&r).unwrap()));
                        if let Some(c) = &cache {
                            c.borrow_mut().insert(key, p.clone());
                        }
                        p
                    }
                };
                if let (Some(p), Value::Object(fields)) = (profile, &mut record) {
                    for (k, v) in p.iter() {
                        fields.insert(k.clone(), v.clone());
                    }
                }
                serde_json::to_string(&record).expect("serializes")
            }
        })
        .buffered(capacity);
    futures::pin_mut!(enriched);
    let mut written = 0u64;
    while let Some(line) = enriched.next().await {
        out.write_all(line.as_bytes()).expect("write");
        out.write_all(b"\n").expect("write");
        written += 1;
    }
    out.flush().expect("flush");
    written
}
