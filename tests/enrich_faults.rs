//! `sluice enrich` at its edges: every failure safe. Each test names the fault it injects
//! (a re-run, a second process, a failing key, numbers beyond f64, an output that is the input,
//! a stalled server and signals, an unwritable checkpoint directory, input quirks, an idle
//! pipe, a full disk, large values, a changed input, changed settings) and checks that nothing
//! already accepted is lost and that the error names what was wrong. Real files and processes;
//! lookups against loadgen servers in this process, and a real Redis where the fault needs one
//! (`REDIS_URL`, else 127.0.0.1:6379; required with SLUICE_REQUIRE_REDIS=1).

mod real_redis;

use loadgen::{LatencyModel, Server, ServerConfig};
use real_redis::{real_redis, redis_command};
use serde_json::Value;
use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sluice-faults-")
        .tempdir()
        .unwrap()
}

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `sluice` to the end; prints its stderr for the test log.
fn run(args: &[&str]) -> Output {
    let out = sluice().args(args).output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `n` records `{"n":i,"user_id":"user_00000k"}` over 10 users, with `bad(i)` lines replaced
/// by a record without `user_id`.
fn write_input(path: &Path, n: u64, bad: impl Fn(u64) -> bool) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..n {
        if bad(i) {
            writeln!(f, r#"{{"n":{i}}}"#).unwrap();
        } else {
            writeln!(f, r#"{{"n":{i},"user_id":"user_{:06}"}}"#, i % 10).unwrap();
        }
    }
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}")))
        .collect()
}

fn metrics(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Every line of a summary accounted for (as `Summary::accounted`).
fn accounted(m: &Value) -> u64 {
    [
        "blank_lines",
        "enriched",
        "missing_kept",
        "missing_dropped",
        "bad_skipped",
        "bad_dead_lettered",
        "timeouts_emitted",
        "timeouts_dropped",
        "timeouts_dead_lettered",
        "errors_emitted",
        "errors_dropped",
        "errors_dead_lettered",
        "unwritten_after_failure",
    ]
    .iter()
    .map(|k| m[k].as_u64().unwrap_or_else(|| panic!("{k} in {m}")))
    .sum()
}

fn loadgen(latency: LatencyModel) -> Server {
    Server::start(ServerConfig {
        keys: 10,
        latency,
        ..Default::default()
    })
    .unwrap()
}

fn fixed(ms: u64) -> LatencyModel {
    LatencyModel::Fixed(Duration::from_millis(ms))
}

/// `enrich --redis <server> --key user:{user_id}` with the given files.
fn enrich_args(server: SocketAddr, input: &Path, output: &Path) -> Vec<String> {
    [
        "enrich",
        "--redis",
        &format!("redis://{server}"),
        "--key",
        "user:{user_id}",
        "--input",
        arg(input),
        "--output",
        arg(output),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn with(base: &[String], more: &[&str]) -> Vec<String> {
    base.iter()
        .cloned()
        .chain(more.iter().map(|s| s.to_string()))
        .collect()
}

/// `a` then `b`, as flags.
fn with_strs<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
    a.iter().chain(b).copied().collect()
}

fn run_owned(args: &[String]) -> Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&refs)
}

/// A run's files: `in.jsonl`, `out.jsonl` and the summary `m.json` in a scratch directory.
struct Files {
    /// Removed when the test ends.
    _dir: tempfile::TempDir,
    input: std::path::PathBuf,
    output: std::path::PathBuf,
    metrics: std::path::PathBuf,
}

impl Files {
    /// With `lines` lines of `write_input` as the input.
    fn with_input(lines: u64) -> Files {
        let dir = scratch();
        let f = Files {
            input: dir.path().join("in.jsonl"),
            output: dir.path().join("out.jsonl"),
            metrics: dir.path().join("m.json"),
            _dir: dir,
        };
        write_input(&f.input, lines, |_| false);
        f
    }

    /// Runs `enrich_args` against `server` with `more` flags and `--metrics-json`.
    fn enrich(&self, server: SocketAddr, more: &[&str]) -> Output {
        let args = with(&enrich_args(server, &self.input, &self.output), more);
        run_owned(&with(&args, &["--metrics-json", arg(&self.metrics)]))
    }

    fn summary(&self) -> Value {
        metrics(&self.metrics)
    }
}

#[test]
fn a_rerun_of_a_finished_run_leaves_its_dead_letters_alone() {
    let server = loadgen(fixed(0));
    let dir = scratch();
    let (input, output, dead) = (
        dir.path().join("in.jsonl"),
        dir.path().join("out.jsonl"),
        dir.path().join("bad.jsonl"),
    );
    write_input(&input, 500, |i| i % 50 == 7);
    let args = with(
        &enrich_args(server.addr(), &input, &output),
        &[
            "--on-bad-record",
            "dead-letter",
            arg(&dead),
            "--checkpoint-dir",
            arg(&dir.path().join("chk")),
        ],
    );
    let first = run_owned(&args);
    assert!(first.status.success(), "{}", stderr(&first));
    let dead_before = std::fs::read(&dead).unwrap();
    assert_eq!(read_lines(&dead).len(), 10);
    let again = run_owned(&args);
    assert!(again.status.success());
    assert!(
        stderr(&again).contains("already completed"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        std::fs::read(&dead).unwrap(),
        dead_before,
        "dead letters untouched"
    );
    assert_eq!(read_lines(&output).len(), 490);
}

#[test]
fn a_second_run_on_one_checkpoint_directory_is_refused_naming_the_first() {
    let server = loadgen(fixed(5));
    let dir = scratch();
    let (input, output, chk) = (
        dir.path().join("in.jsonl"),
        dir.path().join("out.jsonl"),
        dir.path().join("chk"),
    );
    write_input(&input, 400, |_| false);
    let args = with(
        &enrich_args(server.addr(), &input, &output),
        &[
            "--capacity",
            "1",
            "--shards",
            "1",
            "--checkpoint-dir",
            arg(&chk),
        ],
    );
    let first = sluice().args(&args).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while !chk.join("lock").exists()
        || std::fs::read_to_string(chk.join("lock"))
            .unwrap()
            .is_empty()
    {
        assert!(started.elapsed() < Duration::from_secs(10), "no lock taken");
        std::thread::sleep(Duration::from_millis(5));
    }
    let first_pid = first.id();
    let second = run_owned(&args);
    let first_out = first.wait_with_output().unwrap();
    assert_eq!(second.status.code(), Some(1));
    let e = stderr(&second);
    assert!(
        e.contains("in use") && e.contains(&first_pid.to_string()),
        "{e}"
    );
    assert!(first_out.status.success(), "{}", stderr(&first_out));
    let out = read_lines(&output);
    assert_eq!(out.len(), 400, "the first run's output is whole");
    assert!(out.iter().enumerate().all(|(i, v)| v["n"] == i as u64));
}

#[test]
fn a_failing_lookup_under_fail_writes_every_record_before_it() {
    let Some(addr) = real_redis() else { return };
    let prefix = format!("sluice-faults-{}", std::process::id());
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    let list = format!("{prefix}:999");
    redis_command(&mut conn, &["DEL", &list]);
    redis_command(&mut conn, &["RPUSH", &list, "a"]);
    let dir = scratch();
    let (input, output, m) = (
        dir.path().join("in.jsonl"),
        dir.path().join("out.jsonl"),
        dir.path().join("m.json"),
    );
    let text: String = (0..5000)
        .map(|i| format!("{{\"n\":{i},\"p\":\"{prefix}\"}}\n"))
        .collect();
    std::fs::write(&input, text).unwrap();
    for shards in ["1", "2"] {
        let out = run(&[
            "enrich",
            "--redis",
            &format!("redis://{addr}"),
            "--key",
            "{p}:{n}",
            "--input",
            arg(&input),
            "--output",
            arg(&output),
            "--shards",
            shards,
            "--metrics-json",
            arg(&m),
        ]);
        assert_eq!(out.status.code(), Some(1));
        let e = stderr(&out);
        assert!(e.contains("line 1000") && e.contains("WRONGTYPE"), "{e}");
        assert!(e.contains("--on-error"), "the message names the flag: {e}");
        let got = read_lines(&output);
        assert_eq!(
            got.len(),
            999,
            "every record before line 1000, {shards} shards"
        );
        assert!(got.iter().enumerate().all(|(i, v)| v["n"] == i as u64));
        let m = metrics(&m);
        assert_eq!(accounted(&m), m["lines_read"].as_u64().unwrap(), "{m}");
    }
    redis_command(&mut conn, &["DEL", &list]);
}

#[test]
fn numbers_and_escapes_leave_as_they_came_and_large_ids_do_not_collide() {
    let server = loadgen(fixed(0));
    let dir = scratch();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let line = r#"{"user_id":"user_000001","big":123456789012345678901234567890,"p":0.1000000000000000055511151231257827,"s":"caf\u00e9 \ud83d\ude00","e":1E+2,"nested":{"x":[1.50,-0]}}"#;
    std::fs::write(&input, format!("{line}\n")).unwrap();
    let out = run_owned(&enrich_args(server.addr(), &input, &output));
    assert!(out.status.success());
    let written = std::fs::read_to_string(&output).unwrap();
    for field in [
        r#""big":123456789012345678901234567890"#,
        r#""p":0.1000000000000000055511151231257827"#,
        r#""s":"caf\u00e9 \ud83d\ude00""#,
        r#""e":1E+2"#,
        r#""nested":{"x":[1.50,-0]}"#,
    ] {
        assert!(written.contains(field), "{field} in {written}");
    }
    assert!(
        written.starts_with(&line[..line.len() - 1]),
        "the record's bytes come first"
    );

    let Some(addr) = real_redis() else { return };
    let prefix = format!("sluice-faults-ids-{}", std::process::id());
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    for (id, v) in [("18446744073709551616", 1), ("18446744073709551617", 2)] {
        redis_command(
            &mut conn,
            &["SET", &format!("{prefix}:{id}"), &format!("{{\"v\":{v}}}")],
        );
    }
    std::fs::write(
        &input,
        format!(
            "{{\"p\":\"{prefix}\",\"id\":18446744073709551616}}\n{{\"p\":\"{prefix}\",\"id\":18446744073709551617}}\n"
        ),
    )
    .unwrap();
    let out = run(&[
        "enrich",
        "--redis",
        &format!("redis://{addr}"),
        "--key",
        "{p}:{id}",
        "--input",
        arg(&input),
        "--output",
        arg(&output),
    ]);
    assert!(out.status.success());
    let got = read_lines(&output);
    assert_eq!(
        (got[0]["v"].as_u64(), got[1]["v"].as_u64()),
        (Some(1), Some(2))
    );
    for id in ["18446744073709551616", "18446744073709551617"] {
        redis_command(&mut conn, &["DEL", &format!("{prefix}:{id}")]);
    }
}

#[test]
fn an_output_that_is_the_input_or_a_dead_letter_file_is_refused() {
    let server = loadgen(fixed(0));
    let dir = scratch();
    let input = dir.path().join("in.jsonl");
    write_input(&input, 20, |_| false);
    let before = std::fs::read(&input).unwrap();
    let symlink = dir.path().join("sym.jsonl");
    std::os::unix::fs::symlink(&input, &symlink).unwrap();
    let hard = dir.path().join("hard.jsonl");
    std::fs::hard_link(&input, &hard).unwrap();
    for output in [&input, &symlink, &hard] {
        let out = run_owned(&enrich_args(server.addr(), &input, output));
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("same file"), "{}", stderr(&out));
        assert_eq!(
            std::fs::read(&input).unwrap(),
            before,
            "the input is intact"
        );
    }
    let output = dir.path().join("out.jsonl");
    let out = run_owned(&with(
        &enrich_args(server.addr(), &input, &output),
        &["--on-bad-record", "dead-letter", arg(&output)],
    ));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("dead-letter file"),
        "{}",
        stderr(&out)
    );
    let out = run_owned(&with(
        &enrich_args(server.addr(), &input, &output),
        &["--on-error", "dead-letter", arg(&input)],
    ));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

/// Sends `signal` to `child`.
fn signal(child: &Child, signal: i32) {
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
}

#[test]
fn a_second_signal_stops_at_once_while_the_server_stalls() {
    // Replies take a minute: the first SIGINT drains (waits for them), the second stops.
    let server = loadgen(fixed(60_000));
    let dir = scratch();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_input(&input, 50, |_| false);
    let mut child = sluice()
        .args(enrich_args(server.addr(), &input, &output))
        .args(["--timeout", "120s", "--capacity", "10"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // After the start-up check (it waits up to a second for the server's PING) and the first
    // lookups are in flight.
    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first signal drains"
    );
    let second = Instant::now();
    signal(&child, libc::SIGTERM);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            second.elapsed() < Duration::from_secs(5),
            "a second signal stops at once"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut e = String::new();
    child.stderr.take().unwrap().read_to_string(&mut e).unwrap();
    assert_eq!(status.code(), Some(130), "{e}");
    assert!(
        e.contains("stopped at once") && e.contains("not written"),
        "{e}"
    );
}

#[test]
fn an_unwritable_checkpoint_directory_is_refused_before_anything_is_written() {
    let server = loadgen(fixed(0));
    let dir = scratch();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_input(&input, 20, |_| false);
    // A directory below a regular file cannot be made (root can write anywhere else).
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let out = run_owned(&with(
        &enrich_args(server.addr(), &input, &output),
        &["--checkpoint-dir", arg(&blocker.join("chk"))],
    ));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not writable"), "{}", stderr(&out));
    assert!(!output.exists(), "nothing was written");
}

#[test]
fn a_bom_blank_lines_and_crlf_do_not_stop_a_run() {
    let server = loadgen(fixed(0));
    let f = Files::with_input(0);
    std::fs::write(
        &f.input,
        "\u{feff}{\"user_id\":\"user_000001\"}\r\n\n   \n{\"user_id\":\"user_000002\"}\n\n",
    )
    .unwrap();
    let out = f.enrich(server.addr(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = read_lines(&f.output);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["user_id"], "user_000001");
    let m = f.summary();
    assert_eq!(
        (m["blank_lines"].as_u64(), m["enriched"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(accounted(&m), m["lines_read"].as_u64().unwrap());
}

#[test]
fn output_reaches_the_pipe_while_the_input_is_idle() {
    let server = loadgen(fixed(0));
    let mut child = sluice()
        .args([
            "enrich",
            "--redis",
            &format!("redis://{}", server.addr()),
            "--key",
            "user:{user_id}",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    for i in 0..3 {
        writeln!(stdin, "{{\"user_id\":\"user_00000{i}\",\"i\":{i}}}").unwrap();
        stdin.flush().unwrap();
        let line = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the record is written while the input is still open");
        assert!(line.contains(&format!("\"i\":{i}")), "{line}");
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_full_disk_counts_nothing_as_written_and_the_summary_adds_up() {
    let server = loadgen(fixed(0));
    let dir = scratch();
    let (input, m) = (dir.path().join("in.jsonl"), dir.path().join("m.json"));
    write_input(&input, 300, |_| false);
    let out = run_owned(&with(
        &enrich_args(server.addr(), &input, Path::new("/dev/full")),
        &["--metrics-json", arg(&m)],
    ));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/dev/full"), "{}", stderr(&out));
    let full = metrics(&m);
    assert_eq!(
        full["enriched"].as_u64(),
        Some(0),
        "nothing reached the file: {full}"
    );
    assert_eq!(
        accounted(&full),
        full["lines_read"].as_u64().unwrap(),
        "{full}"
    );

    // A missing key under `fail`: the summary still adds up (the failing record counts as
    // not written).
    let output = dir.path().join("out.jsonl");
    write_input(&input, 300, |_| false);
    let mut text = std::fs::read_to_string(&input).unwrap();
    text.push_str("{\"n\":300,\"user_id\":\"nobody\"}\n{\"n\":301,\"user_id\":\"user_000001\"}\n");
    std::fs::write(&input, text).unwrap();
    let out = run_owned(&with(
        &enrich_args(server.addr(), &input, &output),
        &["--on-missing", "fail", "--metrics-json", arg(&m)],
    ));
    assert_eq!(out.status.code(), Some(1));
    let m = metrics(&m);
    assert_eq!(read_lines(&output).len(), 300);
    assert_eq!(m["enriched"].as_u64(), Some(300));
    assert_eq!(accounted(&m), m["lines_read"].as_u64().unwrap(), "{m}");
}

#[test]
fn the_bytes_held_stay_under_the_bound_with_large_values() {
    const VALUE: usize = 256 * 1024;
    let server = Server::start(ServerConfig {
        keys: 10,
        value_size: VALUE,
        latency: fixed(1),
        ..Default::default()
    })
    .unwrap();
    let limit = 2 * 1024 * 1024;
    // One shard runs on its own thread, two read and write on shard 0 (either way the source
    // waits on the budget without blocking the shard).
    for shards in ["1", "2"] {
        let f = Files::with_input(200);
        let flags = [
            "--capacity",
            "64",
            "--shards",
            shards,
            "--max-bytes-held",
            "2MiB",
        ];
        let out = f.enrich(server.addr(), &flags);
        assert!(out.status.success());
        assert_eq!(read_lines(&f.output).len(), 200);
        let m = f.summary();
        assert_eq!(m["on_one_thread"], shards == "1", "{m}");
        let peak = m["peak_bytes_held"].as_u64().unwrap();
        // The limit, plus one line's reservation (its weight and a value's estimate) and its
        // value.
        let bound = limit + 1024 + 2 * VALUE as u64;
        assert!(peak > VALUE as u64, "the values were counted: {peak}");
        assert!(
            peak <= bound,
            "{shards} shards: peak {peak} bytes held, bound {bound}"
        );
    }
}

/// Runs to a first checkpoint and kills the run (SIGKILL) mid-way.
fn kill_after_a_checkpoint(args: &[String], chk: &Path) {
    let mut child = sluice().args(args).stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    let committed = || {
        std::fs::read_dir(chk).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".manifest"))
        })
    };
    while !committed() {
        assert!(started.elapsed() < Duration::from_secs(20), "no checkpoint");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_resume_refuses_a_changed_input_and_changed_settings() {
    let server = loadgen(fixed(2));
    let dir = scratch();
    let (input, output, chk) = (
        dir.path().join("in.jsonl"),
        dir.path().join("out.jsonl"),
        dir.path().join("chk"),
    );
    write_input(&input, 2000, |_| false);
    let args = with(
        &enrich_args(server.addr(), &input, &output),
        &[
            "--capacity",
            "4",
            "--checkpoint-dir",
            arg(&chk),
            "--checkpoint-interval",
            "20ms",
        ],
    );
    kill_after_a_checkpoint(&args, &chk);
    // Another key template: refused, naming it.
    let mut other = args.clone();
    let k = other.iter().position(|a| a == "user:{user_id}").unwrap();
    other[k] = "profile:{user_id}".into();
    let out = run_owned(&other);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("profile:{user_id}"),
        "{}",
        stderr(&out)
    );
    // The first line changed, same length: refused by its checksum.
    let text = std::fs::read_to_string(&input).unwrap();
    std::fs::write(&input, text.replacen("\"n\":0,", "\"n\":9,", 1)).unwrap();
    let out = run_owned(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("CRC-32"), "{}", stderr(&out));
    // Restored: the same command resumes and finishes, every line once.
    std::fs::write(&input, text).unwrap();
    let out = run_owned(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = read_lines(&output);
    assert_eq!(got.len(), 2000);
    assert!(got.iter().enumerate().all(|(i, v)| v["n"] == i as u64));
}

#[test]
fn nested_key_fields_are_looked_up() {
    let server = loadgen(fixed(0));
    let dir = scratch();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    std::fs::write(&input, "{\"user\":{\"id\":\"user_000003\"}}\n").unwrap();
    let mut args = enrich_args(server.addr(), &input, &output);
    let k = args.iter().position(|a| a == "user:{user_id}").unwrap();
    args[k] = "user:{user.id}".into();
    let out = run_owned(&args);
    assert!(out.status.success());
    let got = read_lines(&output);
    assert!(got[0].get("segment").is_some(), "enriched: {}", got[0]);
}

#[test]
fn a_stalled_server_shows_as_timeouts_under_the_timeout_policy() {
    // Replies take a minute: every lookup times out, and far more are abandoned than a
    // connection has room for (twice the capacity) while their replies are still owed.
    let server = loadgen(fixed(60_000));
    let f = Files::with_input(6000);
    let flags = ["--capacity", "200", "--shards", "1", "--timeout", "20ms"];
    let out = f.enrich(server.addr(), &with_strs(&flags, &["--on-timeout", "emit"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let m = f.summary();
    assert_eq!(m["timeouts_emitted"].as_u64(), Some(6000), "{m}");
    assert_eq!(read_lines(&f.output).len(), 6000);
    // What reached the stalled server is bounded by the capacity (twice it: the lookups in
    // flight and as many abandoned), not by the input.
    let sent = server
        .stats()
        .gets
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(sent <= 2 * 200, "{sent} requests sent to a stalled server");
}

#[test]
fn connection_resets_cost_a_request_one_attempt_and_reconnects_burn_no_retries() {
    let server = Server::start(ServerConfig {
        keys: 10,
        latency: fixed(0),
        reset_rate: 0.01,
        seed: 7,
        ..Default::default()
    })
    .unwrap();
    let f = Files::with_input(5000);
    let out = f.enrich(
        server.addr(),
        &["--capacity", "64", "--retry", "exp:10:1ms:50ms:full"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let m = f.summary();
    assert_eq!(m["enriched"].as_u64(), Some(5000), "{m}");
    assert!(
        m["retries"].as_u64().unwrap() > 0,
        "resets were retried: {m}"
    );
    let resets = server
        .stats()
        .resets_injected
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(resets > 0, "the server reset connections");
}

#[test]
fn shards_beyond_the_locked_memory_limit_are_refused_and_the_default_fits_it() {
    // Without CAP_IPC_LOCK (which lifts the limit for root) and with a 2 MiB limit: two
    // shards' io_uring memory (768 KiB each) fit, four do not.
    let runs = Command::new("setpriv").arg("--version").output().is_ok()
        && Command::new("prlimit").arg("--version").output().is_ok();
    if !runs {
        eprintln!("skipping: setpriv or prlimit (util-linux) not installed");
        return;
    }
    let server = loadgen(fixed(0));
    let dir = scratch();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_input(&input, 10, |_| false);
    let limited = |shards: Option<&str>| {
        let mut c = Command::new("setpriv");
        c.args([
            "--inh-caps=-ipc_lock",
            "--bounding-set=-ipc_lock",
            "prlimit",
        ])
        .arg("--memlock=2097152")
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .args(enrich_args(server.addr(), &input, &output));
        if let Some(n) = shards {
            c.args(["--shards", n]);
        }
        c.output().unwrap()
    };
    let out = limited(Some("4"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("locked memory") && e.contains("ulimit -l") && e.contains("2048 KiB"),
        "{e}"
    );
    let out = limited(None);
    assert!(
        out.status.success(),
        "the default shard count fits: {}",
        stderr(&out)
    );
    assert_eq!(read_lines(&output).len(), 10);
}

#[test]
fn an_unreachable_redis_is_said_before_anything_is_read_or_written() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = scratch();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_input(&input, 5, |_| false);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let out = run_owned(&enrich_args(addr, &input, &output));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("does not answer"), "{}", stderr(&out));
    assert!(!output.exists(), "no output file was created");
}

#[test]
fn a_run_where_no_key_has_a_value_warns() {
    let server = loadgen(fixed(0));
    let dir = scratch();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_input(&input, 20, |_| false);
    let mut args = enrich_args(server.addr(), &input, &output);
    let k = args.iter().position(|a| a == "user:{user_id}").unwrap();
    args[k] = "profile:{user_id}".into();
    let out = run_owned(&args);
    assert!(out.status.success(), "missing keys are kept by default");
    assert!(
        stderr(&out).contains("warning: no key had a value"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn retry_on_missing_waits_for_a_value_written_after_its_record() {
    let Some(addr) = real_redis() else { return };
    let key = format!("sluice-faults-late-{}", std::process::id());
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    redis_command(&mut conn, &["DEL", &key]);
    // A stream that stays open: at the end of the input, retries go out without their delay
    // (as in Flink), so the record is fed through a pipe closed after the value is written.
    let mut child = sluice()
        .args([
            "enrich",
            "--redis",
            &format!("redis://{addr}"),
            "--key",
            "{k}",
        ])
        .args(["--on-missing", "fail", "--retry", "fixed:100:20ms"])
        .args(["--retry-on", "missing,error"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{{\"k\":\"{key}\"}}").unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    redis_command(&mut conn, &["SET", &key, "{\"late\":true}"]);
    std::thread::sleep(Duration::from_millis(300));
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(line.contains("\"late\":true"), "{line}");
    redis_command(&mut conn, &["DEL", &key]);
}

#[test]
fn a_completed_marker_that_cannot_be_written_says_the_output_is_whole() {
    let server = loadgen(fixed(0));
    let dir = scratch();
    let (input, output, chk) = (
        dir.path().join("in.jsonl"),
        dir.path().join("out.jsonl"),
        dir.path().join("chk"),
    );
    write_input(&input, 100, |_| false);
    // The marker is written to `completed.tmp` and renamed: a directory there makes it fail.
    std::fs::create_dir_all(chk.join("completed.tmp").join("x")).unwrap();
    let out = run_owned(&with(
        &enrich_args(server.addr(), &input, &output),
        &["--checkpoint-dir", arg(&chk)],
    ));
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("completed marker") && e.contains("the output is complete"),
        "{e}"
    );
    assert_eq!(read_lines(&output).len(), 100);
}

#[test]
fn a_steady_trickle_of_input_reaches_the_pipe_within_the_flush_delay() {
    // A line every 40 ms is never idle for the 100 ms idle flush: the 1 s flush delay applies.
    let server = loadgen(fixed(0));
    let mut child = sluice()
        .args(["enrich", "--redis", &format!("redis://{}", server.addr())])
        .args(["--key", "user:{user_id}"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = tx.send((Instant::now(), line.unwrap()));
        }
    });
    let started = Instant::now();
    for i in 0..75 {
        writeln!(stdin, "{{\"user_id\":\"user_00000{}\",\"i\":{i}}}", i % 10).unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(40));
    }
    let (first_at, _) = rx
        .try_recv()
        .expect("output arrived while the input kept coming");
    assert!(
        first_at.duration_since(started) < Duration::from_millis(2500),
        "first output after {:?}",
        first_at.duration_since(started)
    );
    drop(stdin);
    assert!(child.wait().unwrap().success());
}
