//! The peer `sluice enrich --postgres` is measured against (docs/benchmarks.md): the program a
//! Rust user would write by hand for the same job with tokio (a current-thread runtime),
//! tokio-postgres and `futures`' `buffered` / `buffer_unordered`. It reads JSON Lines from
//! standard input, parses each line with serde_json, runs QUERY (prepared once) with the
//! record's integer KEY_FIELD as `$1`, merges the row's columns into the record, serializes it
//! and writes it to standard output, with CAPACITY queries in flight on one connection
//! (tokio-postgres pipelines the queries issued concurrently on a client), in input order
//! (`ordered`) or as they complete (`unordered`).
//!
//! Run: `cargo run --release --example tokio_postgres_enrich -- postgres://USER@HOST/DB
//! 'SELECT name, tier FROM users WHERE id = $1' user_id 64 ordered < in.jsonl > out.jsonl`

use futures::StreamExt;
use serde_json::{Map, Value};
use std::io::{BufRead, Write};
use tokio_postgres::types::Type;
use tokio_postgres::Row;

fn usage() -> ! {
    eprintln!(
        "usage: tokio_postgres_enrich URL QUERY KEY_FIELD CAPACITY ordered|unordered < in > out"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, query, field, capacity, mode] = &args[..] else {
        usage()
    };
    let capacity: usize = capacity.parse().unwrap_or_else(|_| usage());
    let ordered = match mode.as_str() {
        "ordered" => true,
        "unordered" => false,
        _ => usage(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = std::time::Instant::now();
    let written = runtime.block_on(run(url, query, field, capacity, ordered));
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "tokio_postgres_enrich: {written} lines in {secs:.2} s ({:.0} records/s)",
        written as f64 / secs
    );
}

/// The row's columns as JSON values, by the types the benchmark's table has.
fn row_fields(row: &Row) -> Map<String, Value> {
    let mut fields = Map::new();
    for (i, column) in row.columns().iter().enumerate() {
        let value = match *column.type_() {
            Type::INT4 => row.get::<_, Option<i32>>(i).map(Value::from),
            Type::INT8 => row.get::<_, Option<i64>>(i).map(Value::from),
            Type::FLOAT8 => row.get::<_, Option<f64>>(i).map(Value::from),
            Type::BOOL => row.get::<_, Option<bool>>(i).map(Value::from),
            Type::TEXT | Type::VARCHAR => row.get::<_, Option<String>>(i).map(Value::from),
            ref other => panic!("column {}: type {other} is not handled", column.name()),
        };
        fields.insert(column.name().to_string(), value.unwrap_or(Value::Null));
    }
    fields
}

async fn run(url: &str, query: &str, field: &str, capacity: usize, ordered: bool) -> u64 {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL answers");
    tokio::spawn(connection);
    let statement = client.prepare(query).await.expect("the query prepares");
    let lines = std::io::stdin().lock().lines().map_while(Result::ok);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let enriched = futures::stream::iter(lines).map(|line| {
        let (client, statement) = (&client, &statement);
        async move {
            let mut record: Value = serde_json::from_str(&line).expect("a JSON record");
            let id = record[field].as_i64().expect("an integer key") as i32;
            let row = client
                .query_opt(statement, &[&id])
                .await
                .expect("the query runs");
            if let (Some(row), Value::Object(fields)) = (row, &mut record) {
                fields.extend(row_fields(&row));
            }
            serde_json::to_string(&record).expect("serializes")
        }
    });
    let mut written = 0u64;
    let mut write = |line: String| {
        out.write_all(line.as_bytes()).expect("write");
        out.write_all(b"\n").expect("write");
        written += 1;
    };
    if ordered {
        let mut s = enriched.buffered(capacity);
        while let Some(line) = s.next().await {
            write(line);
        }
    } else {
        let mut s = enriched.buffer_unordered(capacity);
        while let Some(line) = s.next().await {
            write(line);
        }
    }
    out.flush().expect("flush");
    written
}
