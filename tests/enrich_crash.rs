//! The crash test of exactly-once: `sluice enrich --checkpoint-dir` over a large input, with
//! a lookup server (loadgen, in this process) that answers slowly, killed with SIGKILL at
//! seeded random moments (checkpoints every 20 ms, so some kills land inside one), and
//! re-run with the same command until it finishes. The output must then hold every input
//! line exactly once, correctly enriched, in input order for ordered mode. A re-run after
//! the finish must do nothing (completed marker).

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

fn write_input(path: &Path, lines: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for n in 0..lines {
        writeln!(f, r#"{{"n":{n},"user_id":"user_{:06}"}}"#, user_of(n)).unwrap();
    }
}

fn enrich(server: &Server, dir: &Path, mode: &str) -> Command {
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
        .args(["--capacity", "64", "--shards", "2", "--timeout", "30s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Runs, kills at random moments, re-runs until a run finishes; returns the number of kills.
fn run_until_done(server: &Server, dir: &Path, mode: &str, seed: u64) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let mut kills = 0;
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "{mode}: not finished after {kills} kills in 240 s"
        );
        let mut child = enrich(server, dir, mode).spawn().unwrap();
        // Mostly short lives, so most runs die mid-way; after 20 kills let it finish.
        let life = Duration::from_millis(rng.u64(30..400));
        let deadline = Instant::now() + life;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if kills < 20 && Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        match status {
            Some(status) => {
                let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
                assert!(status.success(), "{mode}: the run failed: {stderr}");
                assert!(
                    kills == 0 || stderr.contains("resumed from checkpoint"),
                    "{mode}: the last run did not resume: {stderr}"
                );
                eprintln!("{mode}: finished after {kills} kills:\n{stderr}");
                return kills;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
            }
        }
    }
}

fn check_output(dir: &Path, lines: u64, ordered: bool) {
    let text = std::fs::read_to_string(dir.join("out.jsonl")).unwrap();
    let mut seen = vec![false; lines as usize];
    let mut previous = None;
    let mut count = 0;
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("output line {}: {e}: {line:?}", i + 1));
        let n = v["n"].as_u64().expect("n");
        assert!(!seen[n as usize], "input {n} written twice");
        seen[n as usize] = true;
        if ordered {
            assert_eq!(n, previous.map_or(0, |p: u64| p + 1), "out of order");
        }
        previous = Some(n);
        let profile: Value =
            serde_json::from_slice(&keyspace::value(user_of(n), VALUE_SIZE)).unwrap();
        for (field, value) in profile.as_object().unwrap() {
            assert_eq!(&v[field], value, "input {n}: field {field}");
        }
        count += 1;
    }
    assert_eq!(count, lines, "every input line once");
}

fn crash_test(mode: &str, seed: u64) {
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
    let dir = temp_dir(mode);
    let lines = 100_000;
    write_input(&dir.join("in.jsonl"), lines);
    let kills = run_until_done(&server, &dir, mode, seed);
    assert!(kills >= 5, "only {kills} kills: the test did not test much");
    check_output(&dir, lines, mode == "ordered");
    // A re-run of a finished job does nothing.
    let before = std::fs::read(dir.join("out.jsonl")).unwrap();
    let rerun = enrich(&server, &dir, mode).output().unwrap();
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{stderr}");
    assert!(stderr.contains("already completed"), "{stderr}");
    assert_eq!(std::fs::read(dir.join("out.jsonl")).unwrap(), before);
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ordered_enrich_survives_sigkill() {
    crash_test("ordered", 11);
}

#[test]
fn unordered_enrich_survives_sigkill() {
    crash_test("unordered", 12);
}
