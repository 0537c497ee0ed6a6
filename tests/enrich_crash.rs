//! The crash test of exactly-once: `sluice enrich --checkpoint-dir` over a large input, with
//! a lookup server (loadgen, in this process) that answers slowly, killed with SIGKILL at
//! seeded random moments, every third kill aimed inside a checkpoint (its shard files written,
//! its manifest not yet: the test asserts some kills landed there), and re-run with the same
//! command until it finishes. The output must then hold every input line exactly once,
//! correctly enriched, in input order for ordered mode and per user for key-ordered mode. A
//! re-run after the finish must do nothing (completed marker).

use loadgen::{keyspace, LatencyModel, Server, ServerConfig};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KEYS: u64 = 1_000;
const VALUE_SIZE: usize = 128;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-crash-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn user_of(n: u64) -> u64 {
    (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) % KEYS
}

/// `lines` records `{"n","user_id"}`, with every `bad_every`-th line (0: none) lacking its key
/// field.
fn write_input_with_bad(path: &Path, lines: u64, bad_every: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for n in 0..lines {
        if bad_every > 0 && n % bad_every == bad_every - 1 {
            writeln!(f, r#"{{"n":{n}}}"#).unwrap();
        } else {
            writeln!(f, r#"{{"n":{n},"user_id":"user_{:06}"}}"#, user_of(n)).unwrap();
        }
    }
}

/// Bad lines go to `DIR/bad.jsonl`. With one shard the run reads, looks up and writes on the
/// shard's thread; with two it reads and writes on shard 0 and routes the lookups to both
/// (checkpoints across the two shards).
fn enrich(server: &Server, dir: &Path, mode: &str, shards: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.args(["enrich", "--redis"])
        .arg(format!("redis://{}", server.addr()))
        .args(["--key", "user:{user_id}", "--input"])
        .arg(dir.join("in.jsonl"))
        .arg("--output")
        .arg(dir.join("out.jsonl"))
        .arg("--checkpoint-dir")
        .arg(dir.join("checkpoints"))
        .args(["--checkpoint-interval", "20ms", "--mode", mode])
        .args(["--capacity", "64", "--shards", shards, "--timeout", "30s"])
        .args([
            "--batch-size",
            "16",
            "--cache-size",
            "300",
            "--cache-ttl",
            "60s",
        ])
        .args(["--concurrency", "adaptive", "--breaker-failures", "100"])
        .arg("--on-bad-record")
        .arg(format!("dead-letter:{}", dir.join("bad.jsonl").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Whether a kill left a checkpoint begun but not committed: snapshot files of a checkpoint
/// newer than the newest manifest.
fn killed_inside_a_checkpoint(dir: &Path) -> bool {
    let id_of = |name: &str| name.get(4..24).and_then(|d| d.parse::<u64>().ok());
    let names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    let newest_manifest = names
        .iter()
        .filter(|n| n.ends_with(".manifest"))
        .filter_map(|n| id_of(n))
        .max();
    names
        .iter()
        .filter(|n| n.ends_with(".snap"))
        .filter_map(|n| id_of(n))
        .any(|id| newest_manifest.is_none_or(|m| id > m))
}

/// Runs, kills at random moments, re-runs until a run finishes; returns the number of kills,
/// and how many of them landed inside a checkpoint.
fn run_until_done(
    server: &Server,
    dir: &Path,
    mode: &str,
    shards: &str,
    seed: u64,
) -> (usize, usize) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let checkpoints = dir.join("checkpoints");
    let (mut kills, mut inside) = (0, 0);
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "{mode}: not finished after {kills} kills in 240 s"
        );
        let mut child = enrich(server, dir, mode, shards).spawn().unwrap();
        // Mostly short lives, so most runs die mid-way; after 20 kills let it finish. Every
        // third kill waits for a checkpoint to be begun but not committed (shard files newer
        // than the newest manifest) and kills right then.
        let life = Duration::from_millis(rng.u64(30..400));
        let deadline = Instant::now() + life;
        let aim_inside = kills % 3 == 2;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if kills < 20 {
                let due = if aim_inside {
                    killed_inside_a_checkpoint(&checkpoints) || Instant::now() >= deadline + life
                } else {
                    Instant::now() >= deadline
                };
                if due {
                    break None;
                }
            }
            std::thread::sleep(Duration::from_micros(if aim_inside { 200 } else { 2000 }));
        };
        match status {
            Some(status) => {
                let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
                assert!(status.success(), "{mode}: the run failed: {stderr}");
                assert!(
                    kills == 0 || stderr.contains("resumed from checkpoint"),
                    "{mode}: the last run did not resume: {stderr}"
                );
                assert_eq!(
                    stderr.contains("on one thread"),
                    shards == "1",
                    "{mode}, {shards} shards: {stderr}"
                );
                eprintln!(
                    "{mode}: finished after {kills} kills ({inside} inside a checkpoint):\n{stderr}"
                );
                assert_layer_worked(mode, &stderr);
                return (kills, inside);
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                if killed_inside_a_checkpoint(&checkpoints) {
                    inside += 1;
                }
            }
        }
    }
}

/// The last run's summary shows batches of more than one key and cache hits: the parts were
/// really on.
fn assert_layer_worked(mode: &str, stderr: &str) {
    let line = stderr
        .lines()
        .find(|l| l.trim_start().starts_with("lookups:"))
        .unwrap_or_else(|| panic!("{mode}: no lookups line in {stderr}"));
    let number_before = |marker: &str| -> f64 {
        let head = &line[..line
            .find(marker)
            .unwrap_or_else(|| panic!("{marker} in {line}"))];
        let word = head.trim_end().rsplit([' ', '(']).next().unwrap();
        word.trim_end_matches('%').parse().unwrap()
    };
    assert!(number_before(" keys each") > 1.0, "{mode}: {line}");
    let hits = &line[line.find("cache hits ").unwrap() + "cache hits ".len()..];
    let hits: f64 = hits[..hits.find('%').unwrap()].parse().unwrap();
    assert!(hits > 0.0, "{mode}: {line}");
}

/// Every good line once, enriched with its user's profile; in input order (`ordered`), or in
/// input order per user (`key-ordered`), or in any order (`unordered`). With every
/// `bad_every`-th line bad (0: none), each of those once in the dead-letter file (in input
/// order in ordered mode).
fn check_output_with_bad(dir: &Path, lines: u64, bad_every: u64, mode: &str) {
    let is_bad = |n: u64| bad_every > 0 && n % bad_every == bad_every - 1;
    let dead = std::fs::read_to_string(dir.join("bad.jsonl")).unwrap_or_default();
    let mut dead_seen = std::collections::HashSet::new();
    let mut last_dead = None;
    for line in dead.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let input: Value = serde_json::from_str(v["input"].as_str().unwrap()).unwrap();
        let n = input["n"].as_u64().unwrap();
        assert!(is_bad(n), "line {n} dead-lettered but good");
        assert!(dead_seen.insert(n), "line {n} dead-lettered twice");
        assert_eq!(v["line"].as_u64(), Some(n + 1), "its line number");
        if mode == "ordered" {
            assert!(last_dead.is_none_or(|l| l < n), "dead letters out of order");
        }
        last_dead = Some(n);
    }
    let bad = (0..lines).filter(|&n| is_bad(n)).count();
    assert_eq!(dead_seen.len(), bad, "every bad line dead-lettered once");
    let text = std::fs::read_to_string(dir.join("out.jsonl")).unwrap();
    let mut seen = vec![false; lines as usize];
    let mut previous = None;
    let mut previous_of_user = std::collections::HashMap::new();
    let mut count = 0;
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("output line {}: {e}: {line:?}", i + 1));
        let n = v["n"].as_u64().expect("n");
        assert!(!seen[n as usize], "input {n} written twice");
        seen[n as usize] = true;
        if mode == "ordered" {
            let mut next = previous.map_or(0, |p: u64| p + 1);
            while is_bad(next) {
                next += 1;
            }
            assert_eq!(n, next, "out of order");
        }
        previous = Some(n);
        if let Some(before) = previous_of_user.insert(user_of(n), n) {
            if mode == "key-ordered" {
                assert!(before < n, "user {}: {before} after {n}", user_of(n));
            }
        }
        let profile: Value =
            serde_json::from_slice(&keyspace::value(user_of(n), VALUE_SIZE)).unwrap();
        for (field, value) in profile.as_object().unwrap() {
            assert_eq!(&v[field], value, "input {n}: field {field}");
        }
        count += 1;
    }
    assert_eq!(count, lines - bad as u64, "every good input line once");
}

fn crash_test(mode: &str, shards: &str, seed: u64) {
    crash_test_with_bad(mode, shards, seed, 100_000, 0);
}

fn crash_test_with_bad(mode: &str, shards: &str, seed: u64, lines: u64, bad_every: u64) {
    let server = Server::start(ServerConfig {
        keys: KEYS,
        value_size: VALUE_SIZE,
        latency: LatencyModel::Uniform {
            min: Duration::from_millis(1),
            max: Duration::from_millis(4),
        },
        seed,
        ..Default::default()
    })
    .unwrap();
    let dir = temp_dir(&format!("{mode}-{shards}-{bad_every}"));
    write_input_with_bad(&dir.join("in.jsonl"), lines, bad_every);
    let (kills, inside) = run_until_done(&server, &dir, mode, shards, seed);
    assert!(kills >= 5, "only {kills} kills: the test did not test much");
    assert!(inside >= 1, "no kill landed inside a checkpoint");
    check_output_with_bad(&dir, lines, bad_every, mode);
    // A re-run of a finished job does nothing.
    let before = std::fs::read(dir.join("out.jsonl")).unwrap();
    let dead_before = std::fs::read(dir.join("bad.jsonl")).unwrap_or_default();
    let rerun = enrich(&server, &dir, mode, shards).output().unwrap();
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{stderr}");
    assert!(stderr.contains("already completed"), "{stderr}");
    assert_eq!(std::fs::read(dir.join("out.jsonl")).unwrap(), before);
    assert_eq!(
        std::fs::read(dir.join("bad.jsonl")).unwrap_or_default(),
        dead_before
    );
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ordered_enrich_survives_sigkill() {
    crash_test("ordered", "2", 11);
}

#[test]
fn unordered_enrich_survives_sigkill() {
    crash_test("unordered", "2", 12);
}

#[test]
fn key_ordered_enrich_survives_sigkill() {
    crash_test("key-ordered", "2", 13);
}

#[test]
fn dead_letters_are_exactly_once_through_sigkill() {
    crash_test_with_bad("ordered", "2", 14, 60_000, 37);
}

#[test]
fn ordered_enrich_on_one_thread_survives_sigkill() {
    crash_test_with_bad("ordered", "1", 15, 100_000, 53);
}

#[test]
fn unordered_enrich_on_one_thread_survives_sigkill() {
    crash_test("unordered", "1", 16);
}
