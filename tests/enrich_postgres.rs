//! `sluice enrich --postgres` end to end: the real binary against a real PostgreSQL (`PG_URL`,
//! or 127.0.0.1:5432; skipped, saying so, where none answers): one execution per record and the
//! batch query give the same output on one and two shards; a key the server cannot cast is an
//! error under `--on-error`; bad flags and a missing table are refused naming the flag; and a
//! run killed again and again with checkpoints writes every record exactly once.

mod helpers;
mod real_postgres;

use helpers::{lines, sluice};
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const USERS: &str = "CREATE TABLE users (id int PRIMARY KEY, name text, tier text, since int); \
    INSERT INTO users SELECT i, 'user ' || i, CASE WHEN i % 3 = 0 THEN 'gold' ELSE 'free' END, \
    2000 + i % 20 FROM generate_series(1, 400) AS i;";

/// `count` records `{"n":N,"user_id":N*7%500}`: ids 401..499 and 0 have no row.
fn write_input(path: &Path, count: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    for n in 0..count {
        writeln!(f, r#"{{"n":{n},"user_id":{}}}"#, n * 7 % 500).unwrap();
    }
}

/// What record `n` should look like after enrichment.
fn expected(n: u64) -> Value {
    let id = n * 7 % 500;
    if (1..=400).contains(&id) {
        serde_json::json!({"n": n, "user_id": id, "name": format!("user {id}"),
            "tier": if id % 3 == 0 { "gold" } else { "free" }, "since": 2000 + id % 20})
    } else {
        serde_json::json!({"n": n, "user_id": id})
    }
}

#[test]
fn enrich_from_postgres_per_key_and_batched_on_one_and_two_shards() {
    let Some(url) = real_postgres::url() else {
        return;
    };
    let schema = real_postgres::Schema::create(&url, "enrich", USERS);
    let users = schema.table("users");
    let query = format!("SELECT name, tier, since FROM {users} WHERE id = $1");
    let batch_query = format!("SELECT id, name, tier, since FROM {users} WHERE id = ANY($1)");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    write_input(&input, 3000);
    for shards in ["1", "2"] {
        for batched in [false, true] {
            let output = dir.path().join(format!("out-{shards}-{batched}.jsonl"));
            let mut args = vec![
                "enrich",
                "--postgres",
                &url,
                "--query",
                &query,
                "--params",
                "{user_id}",
                "--input",
                input.to_str().unwrap(),
                "--output",
                output.to_str().unwrap(),
                "--shards",
                shards,
                "--capacity",
                "64",
            ];
            if batched {
                // The batch query's first column is the key each row answers; the value is
                // the other columns, so the output is the per-key query's.
                args.extend(["--batch-size", "16", "--batch-query", &batch_query]);
            }
            let out = sluice(&args);
            assert!(out.status.success(), "{shards} shards, batched {batched}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let got = lines(&output);
            assert_eq!(got.len(), 3000);
            for (n, line) in got.iter().enumerate() {
                let want = expected(n as u64);
                assert_eq!(line, &want, "{shards} shards, batched {batched}, line {n}");
            }
            if batched {
                let requests = stderr
                    .lines()
                    .find(|l| l.contains("backend requests"))
                    .expect("the summary counts backend requests")
                    .to_string();
                let keys_each: f64 = requests
                    .split('(')
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse().ok())
                    .expect("keys per request");
                assert!(keys_each > 2.0, "batches of several keys: {requests}");
            }
        }
    }
}

#[test]
fn a_key_the_server_cannot_cast_is_an_error_under_on_error() {
    let Some(url) = real_postgres::url() else {
        return;
    };
    let schema = real_postgres::Schema::create(&url, "cast", USERS);
    let query = format!("SELECT name FROM {} WHERE id = $1", schema.table("users"));
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"user_id\":1}\n{\"user_id\":\"abc\"}\n{\"user_id\":2}\n",
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let base = |on_error: &'static str| {
        vec![
            "enrich".to_string(),
            "--postgres".into(),
            url.clone(),
            "--query".into(),
            query.clone(),
            "--params".into(),
            "{user_id}".into(),
            "--input".into(),
            input.to_str().unwrap().into(),
            "--output".into(),
            output.to_str().unwrap().into(),
            "--on-error".into(),
            on_error.into(),
        ]
    };
    let args = base("emit");
    let out = sluice(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success());
    let got = lines(&output);
    assert_eq!(got[0]["name"], "user 1");
    assert_eq!(got[1], serde_json::json!({"user_id": "abc"}));
    assert_eq!(got[2]["name"], "user 2");
    let args = base("fail");
    let out = sluice(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("22P02") && stderr.contains("abc"),
        "the server's error names the value: {stderr}"
    );
}

#[test]
fn bad_flags_and_a_missing_table_are_refused_naming_the_flag() {
    let Some(url) = real_postgres::url() else {
        return;
    };
    let schema = real_postgres::Schema::create(&url, "flags", USERS);
    let users = schema.table("users");
    let query = format!("SELECT name FROM {users} WHERE id = $1");
    let batch = format!("SELECT id, name FROM {users} WHERE id = ANY($1)");
    let two = format!("SELECT name FROM {users} WHERE id = $1 AND tier = $2");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--params", "{user_id}"], "--query"),
        (vec!["--query", &query], "--params"),
        (vec!["--query", &two, "--params", "{user_id}"], "--params"),
        (
            vec![
                "--query",
                &query,
                "--params",
                "{user_id}",
                "--batch-query",
                &batch,
            ],
            "--batch-size",
        ),
        (
            vec![
                "--query",
                &query,
                "--params",
                "{user_id}",
                "--batch-query",
                &batch,
                "--batch-size",
                "8",
                "--rows",
                "error",
            ],
            "--rows",
        ),
        (
            vec!["--query", &query, "--params", "{user_id}", "--rows", "many"],
            "--rows",
        ),
        (
            vec![
                "--query",
                "SELECT name FROM sluice_no_such_table WHERE id = $1",
                "--params",
                "{user_id}",
            ],
            "sluice_no_such_table",
        ),
        (
            vec![
                "--query",
                &query,
                "--params",
                "{user_id}",
                "--batch-size",
                "8",
                "--batch-query",
                &two,
            ],
            "--batch-query",
        ),
        (vec!["--query", &query, "--params", "user_id"], "--params"),
    ];
    for (flags, named) in cases {
        let mut args = vec!["enrich", "--postgres", &url];
        args.extend(&flags);
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was taken");
        assert!(stderr.contains(named), "{flags:?}: {stderr}");
    }
    let out = sluice(&[
        "enrich",
        "--postgres",
        "postgres://postgres@127.0.0.1:1/test",
        "--query",
        &query,
        "--params",
        "{user_id}",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not answer"));
}

/// One run of the kill loop's command.
fn checkpointed(url: &str, query: &str, dir: &Path, shards: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.args(["enrich", "--postgres", url, "--query", query])
        .args(["--params", "{user_id}", "--input"])
        .arg(dir.join("in.jsonl"))
        .arg("--output")
        .arg(dir.join("out.jsonl"))
        .arg("--checkpoint-dir")
        .arg(dir.join("checkpoints"))
        .args(["--checkpoint-interval", "20ms", "--capacity", "32"])
        .args(["--shards", shards, "--timeout", "30s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

#[test]
fn a_run_killed_again_and_again_writes_every_record_once() {
    let Some(url) = real_postgres::url() else {
        return;
    };
    let schema = real_postgres::Schema::create(&url, "crash", USERS);
    // A little work per row, so that a run takes long enough to be killed mid-way.
    let query = format!(
        "SELECT name, tier, since FROM {} WHERE id = $1 AND pg_sleep(0.0002) IS NOT NULL",
        schema.table("users")
    );
    for shards in ["1", "2"] {
        let dir = tempfile::tempdir().unwrap();
        write_input(&dir.path().join("in.jsonl"), 4000);
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut kills, started) = (0, Instant::now());
        loop {
            assert!(started.elapsed() < Duration::from_secs(120), "not done");
            let mut child = checkpointed(&url, &query, dir.path(), shards)
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_millis(rng.u64(50..300));
            let status = loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break Some(s);
                }
                if kills < 6 && Instant::now() >= deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            match status {
                Some(status) => {
                    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
                    assert!(status.success(), "{stderr}");
                    assert!(kills == 0 || stderr.contains("resumed from checkpoint"));
                    break;
                }
                None => {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    kills += 1;
                }
            }
        }
        let got = lines(&dir.path().join("out.jsonl"));
        assert_eq!(got.len(), 4000, "{shards} shards after {kills} kills");
        for (n, line) in got.iter().enumerate() {
            assert_eq!(line, &expected(n as u64), "{shards} shards, line {n}");
        }
        eprintln!("{shards} shards: exactly once after {kills} kills");
    }
}
