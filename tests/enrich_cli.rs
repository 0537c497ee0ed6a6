//! `sluice enrich` end to end: the real binary, JSON Lines files and pipes, against the embedded
//! loadgen server (`--loadgen`), a loadgen server the test stops mid-run, and a real Redis when
//! one is reachable (`REDIS_URL`, else 127.0.0.1:6379; required with SLUICE_REQUIRE_REDIS=1).

mod real_redis;

use loadgen::{keyspace, Event, Generator, GeneratorConfig, LatencyModel, Server, ServerConfig};
use real_redis::{real_redis, redis_command};
use serde_json::{Map, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

/// A directory for one test's files, removed when the test ends.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Scratch {
        Scratch(
            tempfile::Builder::new()
                .prefix("sluice-enrich-")
                .tempdir()
                .unwrap(),
        )
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// `count` generated transactions (keys in 0..keys) as JSON Lines, event times increasing.
fn transactions(path: &Path, count: usize, keys: u64) -> Vec<Map<String, Value>> {
    let records: Vec<Map<String, Value>> = Generator::new(GeneratorConfig {
        keys,
        watermark_every: 0,
        max_out_of_orderness_ms: 0,
        ..Default::default()
    })
    .filter_map(|e| match e {
        Event::Record(t) => Some(
            serde_json::to_value(t)
                .unwrap()
                .as_object()
                .unwrap()
                .clone(),
        ),
        Event::Watermark(_) => None,
    })
    .take(count)
    .collect();
    let mut f = std::fs::File::create(path).unwrap();
    for r in &records {
        writeln!(f, "{}", Value::Object(r.clone())).unwrap();
    }
    records
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("output line {l:?}: {e}")))
        .collect()
}

/// `enrich --loadgen` with 10 keys and the key template `user:{user_id}`.
const LOADGEN_ENRICH: [&str; 6] = [
    "enrich",
    "--loadgen",
    "--loadgen-keys",
    "10",
    "--key",
    "user:{user_id}",
];

/// [`LOADGEN_ENRICH`] from `input` to `output`.
fn loadgen_args(input: &Path, output: &Path) -> Vec<String> {
    let files = [
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    LOADGEN_ENRICH
        .iter()
        .chain(&files)
        .map(|a| a.to_string())
        .collect()
}

fn run(args: &[&str]) -> Output {
    let out = sluice().args(args).output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Every record of `records` is in `output`, enriched with its 128-byte profile, in input order.
fn assert_enriched_in_order(records: &[Map<String, Value>], output: &Path) {
    let got = lines(output);
    assert_eq!(got.len(), records.len());
    for (r, g) in records.iter().zip(&got) {
        assert_eq!(g, &expected(r, 128), "record enriched and in input order");
    }
}

/// The expected enrichment of a record: its fields, then the profile's (loadgen keyspace).
fn expected(record: &Map<String, Value>, value_size: usize) -> Value {
    let id = record["user_id"].as_str().unwrap();
    let i: u64 = id.trim_start_matches("user_").parse().unwrap();
    let mut m = record.clone();
    let profile: Value = serde_json::from_slice(&keyspace::value(i, value_size)).unwrap();
    m.extend(profile.as_object().unwrap().clone());
    Value::Object(m)
}

#[test]
fn ordered_enrichment_is_correct_record_by_record_and_in_input_order() {
    let scratch = Scratch::new();
    let (input, output, metrics) = (
        scratch.file("in1.jsonl"),
        scratch.file("out1.jsonl"),
        scratch.file("m1.json"),
    );
    let records = transactions(&input, 3_000, 1_000);
    let out = run(&[
        "enrich",
        "--loadgen",
        "--loadgen-keys",
        "1000",
        "--key",
        "user:{user_id}",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--capacity",
        "32",
        "--metrics-json",
        metrics.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert_enriched_in_order(&records, &output);
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!(summary["lines_read"], 3_000);
    assert_eq!(summary["enriched"], 3_000);
    assert!(String::from_utf8_lossy(&out.stderr).contains("enriched"));
    // Where the time goes: the embedded server delays every reply by 1 ms, so no reply is on
    // the wire for less, and a lookup (invoke to emit) contains its time on the wire.
    let us = |field: &str| summary[field].as_u64().unwrap_or_else(|| panic!("{field}"));
    assert!(us("wire_p50_us") >= 1_000, "{summary}");
    assert!(us("wire_p50_us") <= us("latency_p50_us"), "{summary}");
    assert!(us("wire_p99_us") <= us("latency_p99_us"), "{summary}");
    // The wait for a slot is reported (its size depends on how far the reader runs ahead).
    us("queue_wait_p50_us");
    us("queue_wait_p99_us");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("waiting for a slot"), "{stderr}");
    assert!(stderr.contains("of which on the wire"), "{stderr}");
}

#[test]
fn unordered_output_is_a_permutation_and_keeps_watermarks_as_barriers() {
    let scratch = Scratch::new();
    let (input, output) = (scratch.file("in2.jsonl"), scratch.file("out2.jsonl"));
    let records = transactions(&input, 2_000, 1_000);
    let out = run(&[
        "enrich",
        "--loadgen",
        "--loadgen-keys",
        "1000",
        "--loadgen-latency",
        "uniform:0ms:2ms",
        "--key",
        "user:{user_id}",
        "--mode",
        "unordered",
        "--shards",
        "2",
        "--event-time",
        "timestamp",
        "--emit-watermarks",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let got = lines(&output);
    let mut ids: Vec<String> = got
        .iter()
        .filter_map(|v| {
            v.get("transaction_id")
                .map(|t| t.as_str().unwrap().to_string())
        })
        .collect();
    let in_order = ids.clone();
    ids.sort();
    let mut expected_ids: Vec<String> = records
        .iter()
        .map(|r| r["transaction_id"].as_str().unwrap().to_string())
        .collect();
    expected_ids.sort();
    assert_eq!(
        ids, expected_ids,
        "a permutation: nothing lost, nothing duplicated"
    );
    assert_ne!(
        in_order,
        records
            .iter()
            .map(|r| r["transaction_id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>(),
        "unordered mode with random latency reorders"
    );
    // Event times strictly increase in the input and out-of-orderness is 0, so watermark W is
    // emitted right after the record with timestamp W + 1: every record with timestamp <= W + 1
    // belongs before it, every later one after it.
    let watermarks: Vec<(usize, u64)> = got
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.get("watermark").map(|w| (i, w.as_u64().unwrap())))
        .collect();
    assert!(
        watermarks.len() >= 19,
        "a watermark every 100 records: {}",
        watermarks.len()
    );
    for (pos, w) in &watermarks {
        for (i, v) in got.iter().enumerate() {
            if let Some(ts) = v.get("timestamp").and_then(Value::as_u64) {
                assert_eq!(ts <= w + 1, i < *pos, "record {ts} vs watermark {w}");
            }
        }
    }
}

#[test]
fn bad_record_fail_names_line_and_field_and_writes_everything_before() {
    let scratch = Scratch::new();
    let (input, output) = (scratch.file("in3.jsonl"), scratch.file("out3.jsonl"));
    let mut records = transactions(&input, 500, 1_000);
    let mut text = std::fs::read_to_string(&input).unwrap();
    text.push_str("{\"transaction_id\":\"no-user\"}\n");
    for r in records.drain(..100).collect::<Vec<_>>() {
        text.push_str(&format!("{}\n", Value::Object(r)));
    }
    std::fs::write(&input, text).unwrap();
    let out = run(&[
        "enrich",
        "--loadgen",
        "--loadgen-keys",
        "1000",
        "--key",
        "user:{user_id}",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "a bad record fails the run by default"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 501") && stderr.contains("user_id") && stderr.contains("no-user"),
        "{stderr}"
    );
    assert_eq!(
        lines(&output).len(),
        500,
        "every record before the bad one written and flushed"
    );
}

#[test]
fn bad_record_skip_and_dead_letter() {
    let scratch = Scratch::new();
    let (input, output, dlq) = (
        scratch.file("in4.jsonl"),
        scratch.file("out4.jsonl"),
        scratch.file("dlq4.jsonl"),
    );
    std::fs::write(
        &input,
        "{\"user_id\":\"user_000001\"}\nnot json\n[1,2]\n{\"user_id\":null}\n{\"user_id\":\"user_000002\"}\n",
    )
    .unwrap();
    let base = loadgen_args(&input, &output);
    let base: Vec<&str> = base.iter().map(String::as_str).collect();
    let out = run(&[&base[..], &["--on-bad-record", "skip"]].concat());
    assert!(out.status.success());
    assert_eq!(lines(&output).len(), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad records, skipped"));
    let out = run(&[
        &base[..],
        &["--on-bad-record", "dead-letter", dlq.to_str().unwrap()],
    ]
    .concat());
    assert!(out.status.success());
    assert_eq!(lines(&output).len(), 2);
    let dead = lines(&dlq);
    assert_eq!(
        dead.iter()
            .map(|d| d["line"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert!(dead[0]["error"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    assert!(dead[1]["error"].as_str().unwrap().contains("array"));
    assert!(dead[2]["error"]
        .as_str()
        .unwrap()
        .contains("`user_id` is null"));
    assert_eq!(dead[0]["input"], "not json");
}

#[test]
fn a_line_that_is_not_utf8_is_a_bad_record_and_crlf_lines_are_fine() {
    let scratch = Scratch::new();
    let (input, output, dlq) = (
        scratch.file("in11.jsonl"),
        scratch.file("out11.jsonl"),
        scratch.file("dlq11.jsonl"),
    );
    let mut bytes = b"{\"user_id\":\"user_000001\"}\r\n".to_vec();
    bytes.extend(b"{\"user_id\":\"\xff\xfe\"}\n");
    bytes.extend(b"{\"user_id\":\"user_000002\"}\n");
    std::fs::write(&input, bytes).unwrap();
    let base = loadgen_args(&input, &output);
    let base: Vec<&str> = base.iter().map(String::as_str).collect();
    let out = run(&[
        &base[..],
        &["--on-bad-record", "dead-letter", dlq.to_str().unwrap()],
    ]
    .concat());
    assert!(out.status.success());
    let got = lines(&output);
    assert_eq!(got.len(), 2, "the CRLF line and the last line are enriched");
    assert_eq!(got[0]["user_id"], "user_000001");
    assert!(got[0].get("country_of_purchase").is_some());
    let dead = lines(&dlq);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["line"], 2);
    assert!(
        dead[0]["error"].as_str().unwrap().contains("not UTF-8"),
        "{}",
        dead[0]
    );
    let out = run(&base);
    assert!(!out.status.success(), "fail is the default policy");
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
}

#[test]
fn missing_keys_keep_drop_or_fail() {
    let scratch = Scratch::new();
    let (input, output) = (scratch.file("in5.jsonl"), scratch.file("out5.jsonl"));
    std::fs::write(
        &input,
        "{\"user_id\":\"user_000001\"}\n{\"user_id\":\"nobody\"}\n{\"user_id\":\"user_000002\"}\n",
    )
    .unwrap();
    let base = loadgen_args(&input, &output);
    let base: Vec<&str> = base.iter().map(String::as_str).collect();
    let out = run(&base);
    assert!(out.status.success());
    let got = lines(&output);
    assert_eq!(
        got[1],
        serde_json::json!({"user_id": "nobody"}),
        "keep: the record unchanged"
    );
    run(&[&base[..], &["--missing-marker", "_missing"]].concat());
    assert_eq!(lines(&output)[1]["_missing"], true);
    let out = run(&[&base[..], &["--on-missing", "drop"]].concat());
    assert!(out.status.success());
    assert_eq!(lines(&output).len(), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing, dropped"));
    let out = run(&[&base[..], &["--on-missing", "fail"]].concat());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 2") && stderr.contains("user:nobody"),
        "{stderr}"
    );
    assert_eq!(
        lines(&output).len(),
        1,
        "ordered: the record before the missing key was written"
    );
}

/// The three shapes of a run give the same output, dead letters and counts for the same input
/// with every kind of line (records, a missing key, bad lines, blank lines, event times): one
/// shard reading a file on the shard's thread (`on_one_thread`), two shards reading the file
/// on shard 0 and routing the lookups, and two shards fed by a reader thread from standard
/// input. A failing policy on the shard stops the run after writing every line before the
/// failing one.
#[test]
fn every_shape_of_a_run_writes_the_same() {
    let scratch = Scratch::new();
    let input = scratch.file("in-one.jsonl");
    transactions(&input, 2_000, 10);
    let mut text = std::fs::read_to_string(&input).unwrap();
    let mut lines_in: Vec<&str> = text.lines().collect();
    lines_in.insert(700, "not json");
    lines_in.insert(900, "");
    lines_in.insert(1200, "{\"user_id\":\"nobody\",\"timestamp\":1}");
    text = lines_in.join("\n") + "\n";
    std::fs::write(&input, &text).unwrap();
    // `shape` "2-stdin": two shards fed by a reader thread from standard input.
    let run_with = |shape: &str, more: &[&str]| {
        let (output, dead, metrics) = (
            scratch.file(&format!("out-{shape}.jsonl")),
            scratch.file(&format!("dead-{shape}.jsonl")),
            scratch.file(&format!("m-{shape}.json")),
        );
        let stdin = shape.ends_with("-stdin");
        let mut base = loadgen_args(&input, &output);
        if stdin {
            let i = base.iter().position(|a| a == "--input").unwrap();
            base[i + 1] = "-".into();
        }
        let base: Vec<&str> = base.iter().map(String::as_str).collect();
        let flags = [
            "--shards",
            shape.trim_end_matches("-stdin"),
            "--capacity",
            "16",
            "--loadgen-latency",
            "uniform:0ms:1ms",
            "--on-bad-record",
            "dead-letter",
            dead.to_str().unwrap(),
            "--event-time",
            "timestamp",
            "--emit-watermarks",
            "--metrics-json",
            metrics.to_str().unwrap(),
        ];
        let args = [&base[..], &flags, more].concat();
        let out = if stdin {
            let out = sluice()
                .args(&args)
                .stdin(std::fs::File::open(&input).unwrap())
                .output()
                .unwrap();
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            out
        } else {
            run(&args)
        };
        let summary: Value =
            serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
        (out, output, dead, summary)
    };
    let (one, out1, dead1, m1) = run_with("1", &[]);
    assert!(one.status.success());
    assert_eq!(m1["on_one_thread"], true, "{m1}");
    assert_eq!(m1["on_the_shards"], true, "{m1}");
    for shape in ["2", "2-stdin"] {
        let (two, out2, dead2, m2) = run_with(shape, &[]);
        assert!(two.status.success(), "{shape}");
        assert_eq!(m2["on_one_thread"], false, "{m2}");
        // Two shards reading the file are routed from shard 0; standard input has its threads.
        assert_eq!(m2["on_the_shards"], shape == "2", "{shape}: {m2}");
        assert_eq!(
            std::fs::read_to_string(&out1).unwrap(),
            std::fs::read_to_string(&out2).unwrap(),
            "{shape}: the same output lines, watermarks included, in the same order"
        );
        assert_eq!(
            std::fs::read_to_string(&dead1).unwrap(),
            std::fs::read_to_string(&dead2).unwrap(),
            "{shape}"
        );
        for count in [
            "lines_read",
            "blank_lines",
            "enriched",
            "missing_kept",
            "bad_dead_lettered",
            "watermarks",
        ] {
            assert_eq!(m1[count], m2[count], "{shape}: {count}: {m1} vs {m2}");
        }
    }
    assert_eq!(m1["lines_read"], 2_003);
    assert_eq!(m1["missing_kept"], 1);
    assert!(m1["watermarks"].as_u64().unwrap() > 10, "{m1}");
    // A failing policy on the shard: the line is named, every line before it is written.
    let (failed, out1, _, m1) = run_with("1", &["--on-missing", "fail"]);
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("line 1201") && stderr.contains("user:nobody"),
        "{stderr}"
    );
    let written = lines(&out1);
    let records = written
        .iter()
        .filter(|v| v.get("user_id").is_some())
        .count();
    assert_eq!(
        records, 1_198,
        "the records before line 1201 (less the bad one)"
    );
    assert_eq!(m1["on_one_thread"], true);
}

/// SIGINT to a run on one shard's thread: the source stops, what is in flight drains and is
/// written, the counts add up, exit 130; a second SIGINT stops at once and still flushes what
/// the writer holds.
#[test]
fn sigint_drains_a_run_on_one_thread_and_a_second_stops_it_at_once() {
    let scratch = Scratch::new();
    let input = scratch.file("in-sig.jsonl");
    transactions(&input, 20_000, 10);
    for signals in [1, 2] {
        let (output, metrics) = (
            scratch.file(&format!("out-sig{signals}.jsonl")),
            scratch.file(&format!("m-sig{signals}.json")),
        );
        let base = loadgen_args(&input, &output);
        let base: Vec<&str> = base.iter().map(String::as_str).collect();
        // One signal: 4 in flight at 2 ms each (2000 records/s), so the run is mid-way at the
        // signal. Two: 5 s per lookup, so the second comes while the first lines wait (until a
        // first lookup completes the byte budget lets one line in at a time).
        let latency = if signals == 1 { "2ms" } else { "5s" };
        let flags = [
            "--shards",
            "1",
            "--capacity",
            if signals == 1 { "4" } else { "8" },
            "--loadgen-latency",
            latency,
            "--metrics-json",
            metrics.to_str().unwrap(),
        ];
        let child = sluice()
            .args([&base[..], &flags].concat())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // (A server that slow also delays the start: the preflight's PING waits for it.)
        std::thread::sleep(Duration::from_millis(if signals == 1 {
            700
        } else {
            2_500
        }));
        for _ in 0..signals {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            std::thread::sleep(Duration::from_millis(5));
        }
        let signalled = std::time::Instant::now();
        let out = child.wait_with_output().unwrap();
        if signals == 2 {
            assert!(
                signalled.elapsed() < Duration::from_secs(4),
                "not waiting for the lookups"
            );
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{stderr}");
        let m: Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
        assert_eq!(m["on_one_thread"], true, "{m}");
        assert_eq!(m["interrupted"], true, "{m}");
        assert_eq!(m["stopped_at_once"], signals == 2, "{m}");
        let read = m["lines_read"].as_u64().unwrap();
        assert!(read > 0 && read < 20_000, "stopped mid-way: {m}");
        let written = lines(&output).len() as u64;
        assert_eq!(written, m["enriched"].as_u64().unwrap(), "{m}");
        let unwritten = m["unwritten_after_failure"].as_u64().unwrap();
        assert_eq!(
            written + unwritten,
            read,
            "every line read is accounted for: {m}"
        );
        if signals == 1 {
            assert_eq!(unwritten, 0, "a first signal drains what is in flight: {m}");
        }
    }
}

#[test]
fn into_field_and_non_json_values() {
    let scratch = Scratch::new();
    let (input, output) = (scratch.file("in6.jsonl"), scratch.file("out6.jsonl"));
    std::fs::write(&input, "{\"user_id\":\"user_000003\",\"n\":1}\n").unwrap();
    let base = loadgen_args(&input, &output);
    let base: Vec<&str> = base.iter().map(String::as_str).collect();
    let out = run(&[&base[..], &["--into", "profile"]].concat());
    assert!(out.status.success());
    let got = &lines(&output)[0];
    assert_eq!(got["n"], 1);
    assert_eq!(got["profile"]["user_id"], "user_000003");
}

/// Starts `sluice enrich` against `url` with retries and emit-on-failure policies, for the
/// tests that stop the server mid-run.
fn enrich_that_outlives_its_server(
    url: &str,
    input: &Path,
    output: &Path,
    metrics: &Path,
) -> std::process::Child {
    sluice()
        .args([
            "enrich",
            "--redis",
            url,
            "--key",
            "user:{user_id}",
            "--capacity",
            "16",
            "--shards",
            "1",
            "--timeout",
            "300ms",
            "--retry",
            "fixed:2:1ms",
            "--on-timeout",
            "emit",
            "--on-error",
            "emit",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--metrics-json",
            metrics.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The run succeeded, the server served some records and not all, failed lookups were retried
/// and then emitted by policy, the counts add up, and every record was written. Returns the
/// summary and the output.
fn assert_outlived_its_server(
    child: std::process::Child,
    metrics: &Path,
    output: &Path,
    total: u64,
) -> (Value, Vec<Value>) {
    let out = child.wait_with_output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "failed lookups are emitted unenriched by policy"
    );
    let s: Value = serde_json::from_str(&std::fs::read_to_string(metrics).unwrap()).unwrap();
    let n = |k: &str| s[k].as_u64().unwrap();
    assert_eq!(n("lines_read"), total);
    assert!(
        n("enriched") > 0 && n("enriched") < total,
        "the server stopped mid-run: {s}"
    );
    assert!(n("errors_emitted") + n("timeouts_emitted") > 0, "{s}");
    assert!(n("retries") > 0, "connection errors were retried: {s}");
    assert_eq!(
        n("enriched") + n("errors_emitted") + n("timeouts_emitted"),
        total,
        "counts add up: {s}"
    );
    let written = lines(output);
    assert_eq!(written.len() as u64, total, "every record written");
    (s, written)
}

/// A loadgen server in this process: the 1 000 keys `transactions(.., 1_000)` draws from,
/// every reply delayed by `delay`.
fn loadgen_server(delay: Duration) -> Server {
    Server::start(ServerConfig {
        keys: 1_000,
        latency: LatencyModel::Fixed(delay),
        ..Default::default()
    })
    .unwrap()
}

/// `--connections N` opens N connections per shard and spreads the lookups over them.
#[test]
fn connections_per_shard_are_opened_and_used() {
    let server = loadgen_server(Duration::from_millis(1));
    let scratch = Scratch::new();
    let (input, output) = (
        scratch.file("in-conn.jsonl"),
        scratch.file("out-conn.jsonl"),
    );
    let records = transactions(&input, 2_000, 1_000);
    let out = run(&[
        "enrich",
        "--redis",
        &format!("redis://{}", server.addr()),
        "--key",
        "user:{user_id}",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--shards",
        "2",
        "--connections",
        "3",
        // A GET per record (duplicate keys in flight would share one).
        "--no-coalesce",
    ]);
    assert!(out.status.success());
    assert_enriched_in_order(&records, &output);
    let stats = server.stats();
    // Three per shard, and the one that checks the server answers before the run starts.
    assert_eq!(stats.connections.load(Ordering::Relaxed), 2 * 3 + 1);
    assert_eq!(stats.gets.load(Ordering::Relaxed), 2_000);
}

#[test]
fn a_server_that_stops_mid_run_is_handled_by_retry_and_timeout_policy() {
    let server = loadgen_server(Duration::from_millis(2));
    let scratch = Scratch::new();
    let (input, output, metrics) = (
        scratch.file("in7.jsonl"),
        scratch.file("out7.jsonl"),
        scratch.file("m7.json"),
    );
    transactions(&input, 1_500, 1_000);
    let child = enrich_that_outlives_its_server(
        &format!("redis://{}", server.addr()),
        &input,
        &output,
        &metrics,
    );
    // About 8 records per ms get through: stop the server a fraction of the way in.
    std::thread::sleep(Duration::from_millis(100));
    server.stop();
    assert_outlived_its_server(child, &metrics, &output, 1_500);
}

/// `sluice enrich --loadgen` reading a pipe, after `records` lines were written to it.
fn piped_enrich(records: u64) -> (std::process::Child, std::process::ChildStdin) {
    let mut child = sluice()
        .args(LOADGEN_ENRICH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for i in 0..records {
        writeln!(stdin, "{{\"user_id\":\"user_00000{i}\"}}").unwrap();
    }
    stdin.flush().unwrap();
    (child, stdin)
}

#[test]
fn a_stdin_pipe_that_closes_early_ends_cleanly_and_sigint_drains() {
    // Closed early: everything written, exit 0.
    let (child, stdin) = piped_enrich(5);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 5);

    // Still open, then SIGINT: what was sent is written, the summary says interrupted, 130.
    let (mut child, stdin) = piped_enrich(3);
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert_eq!(
        stdout.lines().count(),
        3,
        "records sent before the signal were written"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    drop(stdin);
}

#[test]
fn real_redis_enrichment_with_a_composite_key() {
    let Some(addr) = real_redis() else { return };
    let prefix = format!("sluice-enrich-test-{}", std::process::id());
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    let mut send = |args: &[&str]| {
        redis_command(&mut conn, args);
    };
    send(&[
        "SET",
        &format!("{prefix}:NL:7"),
        r#"{"country_of_purchase":"NLD","state_of_purchase":"NH"}"#,
    ]);
    send(&["SET", &format!("{prefix}:US:8"), "plain text"]);
    let scratch = Scratch::new();
    let (input, output) = (scratch.file("in9.jsonl"), scratch.file("out9.jsonl"));
    std::fs::write(&input, format!(
        "{{\"p\":\"{prefix}\",\"country\":\"NL\",\"user_id\":7}}\n{{\"p\":\"{prefix}\",\"country\":\"US\",\"user_id\":8}}\n{{\"p\":\"{prefix}\",\"country\":\"XX\",\"user_id\":9}}\n"
    ))
    .unwrap();
    let url = format!("redis://{addr}");
    let out = run(&[
        "enrich",
        "--redis",
        &url,
        "--key",
        "{p}:{country}:{user_id}",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--missing-marker",
        "_missing",
    ]);
    assert!(out.status.success());
    let got = lines(&output);
    assert_eq!(got[0]["state_of_purchase"], "NH");
    assert_eq!(
        got[1]["value"], "plain text",
        "a non-JSON value goes under `value`"
    );
    assert_eq!(got[2]["_missing"], true);
    send(&["DEL", &format!("{prefix}:NL:7"), &format!("{prefix}:US:8")]);
}

/// Profiles kept as hashes: `--value hash` reads each with HGETALL (its fields become the
/// record's), `--value hash:F,G` with HMGET; a key with no hash is missing. Batched (the
/// commands pipelined) and not, over RESP2 and over RESP3 (client tracking on).
#[test]
fn real_redis_hash_values_as_json_objects() {
    let Some(addr) = real_redis() else { return };
    let prefix = format!("sluice-hash-test-{}", std::process::id());
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    for (user, tier, zip) in [("1", "gold", "1011"), ("2", "silver", "2022")] {
        redis_command(
            &mut conn,
            &[
                "HSET",
                &format!("{prefix}:{user}"),
                "tier",
                tier,
                "zip",
                zip,
            ],
        );
    }
    let scratch = Scratch::new();
    let (input, output) = (
        scratch.file("in-hash.jsonl"),
        scratch.file("out-hash.jsonl"),
    );
    let records: String = (0..40)
        .map(|i| {
            format!(
                "{{\"p\":\"{prefix}\",\"n\":{i},\"user\":\"{}\"}}\n",
                i % 3 + 1
            )
        })
        .collect();
    std::fs::write(&input, records).unwrap();
    let url = format!("redis://{addr}");
    let flag_sets: [&[&str]; 4] = [
        &["--value", "hash"],
        &["--value", "hash", "--batch-size", "8"],
        &["--value", "hash:zip,none", "--batch-size", "8"],
        &[
            "--value",
            "hash",
            "--cache-size",
            "10",
            "--cache-invalidation",
            "tracking",
        ],
    ];
    for flags in flag_sets {
        let mut args = vec![
            "enrich",
            "--redis",
            &url,
            "--key",
            "{p}:{user}",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        let out = run(&args);
        assert!(
            out.status.success(),
            "{flags:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = lines(&output);
        assert_eq!(got.len(), 40);
        for r in &got {
            let n = r["n"].as_u64().unwrap();
            let fields: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
            match (n % 3 + 1, flags[1]) {
                (3, _) => assert_eq!(fields, ["p", "n", "user"], "missing: {r}"),
                (u, "hash") => {
                    assert_eq!(r["tier"], if u == 1 { "gold" } else { "silver" }, "{r}");
                    assert_eq!(r["zip"], if u == 1 { "1011" } else { "2022" }, "{r}");
                }
                (u, _) => {
                    assert_eq!(
                        fields,
                        ["p", "n", "user", "zip"],
                        "only the fields asked: {r}"
                    );
                    assert_eq!(r["zip"], if u == 1 { "1011" } else { "2022" }, "{r}");
                }
            }
        }
    }
    let out = run(&["enrich", "--redis", &url, "--key", "{p}", "--value", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--value"),
        "{stderr}"
    );
    redis_command(
        &mut conn,
        &["DEL", &format!("{prefix}:1"), &format!("{prefix}:2")],
    );
}

/// Starts a private `redis-server` on a free port, or `None` (skip) when the binary is missing
/// and not required.
fn private_redis_server() -> Option<(std::process::Child, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    match Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(child) => {
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some((child, port));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("redis-server did not start on port {port}");
        }
        Err(e) if std::env::var("SLUICE_REQUIRE_REDIS").is_ok_and(|v| v == "1") => {
            panic!("SLUICE_REQUIRE_REDIS=1 but redis-server cannot start: {e}")
        }
        Err(e) => {
            eprintln!("skipping: redis-server not available ({e})");
            None
        }
    }
}

#[test]
fn a_real_redis_that_stops_mid_run_is_handled_by_retry_and_timeout_policy() {
    let Some((mut redis, port)) = private_redis_server() else {
        return;
    };
    let scratch = Scratch::new();
    let (input, output, metrics) = (
        scratch.file("in10.jsonl"),
        scratch.file("out10.jsonl"),
        scratch.file("m10.json"),
    );
    transactions(&input, 20_000, 1_000);
    // Load the 1 000 profiles the records refer to.
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut batch = String::new();
    for i in 0..1_000u64 {
        let (k, v) = (
            keyspace::key(i),
            String::from_utf8(keyspace::value(i, 128)).unwrap(),
        );
        batch.push_str(&format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
            k.len(),
            v.len()
        ));
    }
    conn.write_all(batch.as_bytes()).unwrap();
    let mut replies = vec![0u8; 5 * 1_000];
    conn.read_exact(&mut replies).unwrap();
    assert!(replies.chunks(5).all(|r| r == b"+OK\r\n"));
    let url = format!("redis://127.0.0.1:{port}");
    let child = enrich_that_outlives_its_server(&url, &input, &output, &metrics);
    // Stop Redis once some output has been written (the writer flushes every 256 KiB).
    for _ in 0..10_000 {
        if std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0) > 0 {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    conn.write_all(b"*2\r\n$8\r\nSHUTDOWN\r\n$6\r\nNOSAVE\r\n")
        .unwrap();
    let _ = redis.wait();
    let (s, written) = assert_outlived_its_server(child, &metrics, &output, 20_000);
    let with_profile = written
        .iter()
        .filter(|v| v.get("country_of_purchase").is_some())
        .count() as u64;
    assert_eq!(
        with_profile,
        s["enriched"].as_u64().unwrap(),
        "enriched records carry the profile, the others do not"
    );
}

/// `GET /metrics` on `port`: the body of a 200, or the status line of anything else.
fn scrape(port: u16, path: &str) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_string();
    if status.contains(" 200 ") {
        assert!(head.contains("application/openmetrics-text"), "{head}");
        Ok(body.to_string())
    } else {
        Err(status)
    }
}

/// A sample's value in a scrape: `name` followed by a space.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_addr_serves_the_running_counts_in_the_prometheus_format() {
    let port = real_redis::free_port();
    // Standard input left open: the run is alive (and idle) while it is scraped.
    let mut child = sluice()
        .args([
            "enrich",
            "--loadgen",
            "--key",
            "user:{user_id}",
            "--shards",
            "2",
        ])
        .args(["--on-bad-record", "skip"])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for n in 0..500 {
        writeln!(stdin, r#"{{"n":{n},"user_id":"user_{:06}"}}"#, n % 50).unwrap();
    }
    writeln!(stdin, "not json").unwrap();
    stdin.flush().unwrap();
    // Each part publishes on its own cadence (the writer's counts every 100 ms, the shards'
    // when they go idle): scrape until all have caught up with the input.
    let expected = [
        ("sluice_lines_read_total", 501.0),
        ("sluice_lookups_total", 500.0),
        ("sluice_records_enriched_total", 500.0),
        ("sluice_records_bad_skipped_total", 1.0),
        ("sluice_lines_in_flight", 0.0),
        ("sluice_stage_records_out_total", 501.0),
        // The bad record passes through the stage (with no lookup) and is timed too.
        ("sluice_latency_seconds_count", 501.0),
        ("sluice_latency_seconds_bucket{le=\"+Inf\"}", 501.0),
    ];
    let started = std::time::Instant::now();
    let body = loop {
        let body = scrape(port, "/metrics").unwrap_or_default();
        if expected
            .iter()
            .all(|&(name, value)| sample(&body, name) == Some(value))
        {
            break body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the counts never reached {expected:?}:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Coalesced or not, every lookup is accounted for by a request or a share of one.
    let requests = sample(&body, "sluice_backend_requests_total").unwrap();
    let coalesced = sample(&body, "sluice_lookups_coalesced_total").unwrap();
    assert_eq!(requests + coalesced, 500.0, "{body}");
    assert!(
        body.contains("# TYPE sluice_latency_seconds histogram"),
        "{body}"
    );
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    assert_eq!(scrape(port, "/"), Err("HTTP/1.1 404 Not Found".into()));
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_metrics_addr_that_cannot_be_served_is_refused_by_name() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for bad in ["nowhere", addr.as_str()] {
        let out = sluice()
            .args(["enrich", "--loadgen", "--key", "user:{user_id}"])
            .args(["--metrics-addr", bad])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("--metrics-addr {bad}")),
            "{stderr}"
        );
    }
}
