//! `sluice enrich --http` end to end: the real binary against Python's `http.server` (a server
//! that is not ours; python3 is on every machine here, and the test says so when it is not)
//! and against a server in this test that answers 503 with `Retry-After` before it answers,
//! and 418 for one user.

mod helpers;
mod python_http;

use helpers::{lines, sluice};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `count` records `{"n":N,"user_id":"u N%30"}` (a space in the id: it goes percent-encoded).
fn write_input(path: &Path, count: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    for n in 0..count {
        writeln!(f, r#"{{"n":{n},"user_id":"u {}"}}"#, n % 30).unwrap();
    }
}

#[test]
fn enrich_from_python_http_server_on_one_and_two_shards() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    std::fs::create_dir_all(site.join("users")).unwrap();
    // Users 0..25 exist; 25..30 do not (404: missing).
    for u in 0..25 {
        std::fs::write(
            site.join(format!("users/u {u}")),
            format!(r#"{{"segment":"s{}","since":{}}}"#, u % 3, 2000 + u),
        )
        .unwrap();
    }
    let Some((mut server, port)) = python_http::python_server(&site) else {
        return;
    };
    let input = dir.path().join("in.jsonl");
    write_input(&input, 600);
    let url = format!("http://127.0.0.1:{port}/users/{{user_id}}");
    let mut outputs = vec![];
    for shards in ["1", "2"] {
        let output = dir.path().join(format!("out-{shards}.jsonl"));
        let metrics = dir.path().join(format!("m-{shards}.json"));
        let out = sluice(&[
            "enrich",
            "--http",
            &url,
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--shards",
            shards,
            // Python's http.server listens with a backlog of 5: more connects at once are
            // dropped and retried by TCP a second later.
            "--capacity",
            "4",
            "--metrics-json",
            metrics.to_str().unwrap(),
        ]);
        assert!(out.status.success());
        let got = lines(&output);
        assert_eq!(got.len(), 600);
        for (n, record) in got.iter().enumerate() {
            assert_eq!(record["n"], n, "ordered");
            let u = n % 30;
            if u < 25 {
                assert_eq!(record["segment"], format!("s{}", u % 3), "{record}");
                assert_eq!(record["since"], 2000 + u);
            } else {
                assert!(record.get("segment").is_none(), "missing: kept unchanged");
            }
        }
        let m: Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
        assert_eq!(m["enriched"], 500);
        assert_eq!(m["missing_kept"], 100);
        assert_eq!(m["on_one_thread"], shards == "1");
        assert!(m["lookups"]["requests"].as_u64().unwrap() >= 30, "{m}");
        outputs.push(std::fs::read(&output).unwrap());
    }
    assert_eq!(outputs[0], outputs[1]);
    let _ = server.kill();
    let _ = server.wait();
}

/// A request as the test servers see it.
struct Request {
    method: String,
    target: String,
    /// Header names lower-cased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// An HTTP/1.1 server on a free port whose answer to each request (keep-alive) is `answer`'s
/// whole response.
fn serve_http(answer: impl Fn(Request) -> String + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let mut first = String::new();
                    if reader.read_line(&mut first).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut headers = vec![];
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':') {
                            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
                        }
                    }
                    let length = headers
                        .iter()
                        .find(|(n, _)| n == "content-length")
                        .map_or(0, |(_, v)| v.parse().unwrap());
                    let mut body = vec![0; length];
                    std::io::Read::read_exact(&mut reader, &mut body).unwrap();
                    let mut parts = first.split(' ');
                    let request = Request {
                        method: parts.next().unwrap_or("").to_string(),
                        target: parts.next().unwrap_or("").to_string(),
                        headers,
                        body,
                    };
                    if writer.write_all(answer(request).as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Answers each path 503 with `Retry-After: 1` the first time and `{"ok":true}` after; the
/// path `/users/teapot` always 418. The targets asked, in order.
fn busy_then_ok_server() -> (u16, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let port = serve_http(move |request| {
        let earlier = {
            let mut log = log.lock().unwrap();
            let earlier = log.iter().filter(|t| **t == request.target).count();
            log.push(request.target.clone());
            earlier
        };
        if request.target == "/users/teapot" {
            "HTTP/1.1 418 I'm a teapot\r\nContent-Length: 9\r\n\r\nno coffee".into()
        } else if earlier == 0 {
            "HTTP/1.1 503 Busy\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n".into()
        } else {
            "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"ok\":true}".into()
        }
    });
    (port, seen)
}

#[test]
fn busy_answers_are_retried_after_retry_after_and_other_statuses_follow_on_error() {
    let (port, seen) = busy_then_ok_server();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"user_id\":\"a\"}\n{\"user_id\":\"b\"}\n{\"user_id\":\"teapot\"}\n{\"user_id\":\"a\"}\n",
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let url = format!("http://127.0.0.1:{port}/users/{{user_id}}");
    let started = Instant::now();
    let out = sluice(&[
        "enrich",
        "--http",
        &url,
        "--http-header",
        "X-Api-Key: secret",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--shards",
        "1",
        "--retry",
        "fixed:3:10ms",
        "--on-error",
        "emit",
    ]);
    assert!(out.status.success());
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1),
        "Retry-After honoured: {elapsed:?}"
    );
    let got = lines(&output);
    assert_eq!(got.len(), 4);
    assert_eq!(got[0]["ok"], true);
    assert_eq!(got[1]["ok"], true);
    assert!(
        got[2].get("ok").is_none(),
        "418: emitted unenriched under --on-error emit"
    );
    assert_eq!(got[3]["ok"], true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("retries"), "{stderr}");
    // a and b were each asked twice (503, then 200); teapot once (not retryable).
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.iter().filter(|t| *t == "/users/a").count(),
        2,
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|t| *t == "/users/teapot").count(),
        1,
        "{seen:?}"
    );
}

#[test]
fn bad_http_flags_are_named() {
    let out = sluice(&["enrich", "--http", "https://example.com/{id}"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("https is not supported"));
    let out = sluice(&["enrich", "--http", "http://127.0.0.1:1/users/"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--http") && stderr.contains("no `{field}`"),
        "{stderr}"
    );
    let out = sluice(&[
        "enrich",
        "--http",
        "http://127.0.0.1:1/u/{id}",
        "--key",
        "x:{id}",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--key"));
    let out = sluice(&[
        "enrich",
        "--http",
        "http://127.0.0.1:1/u/{id}",
        "--http-header",
        "no colon",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--http-header"));
    // Nothing listens on port 1: said before anything is read.
    let out = sluice(&["enrich", "--http", "http://127.0.0.1:1/u/{id}"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("(--http)") && stderr.contains("does not answer"),
        "{stderr}"
    );
}

/// Answers `{"got":BODY,"target":..,"method":..,"json":..}` (the body must be JSON).
fn echo_server() -> u16 {
    serve_http(|request| {
        let json = request
            .headers
            .iter()
            .any(|(n, v)| n == "content-type" && v == "application/json");
        let answer = format!(
            r#"{{"got":{},"target":"{}","method":"{}","json":{json}}}"#,
            String::from_utf8_lossy(&request.body),
            request.target,
            request.method
        );
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        )
    })
}

#[test]
fn a_body_template_posts_each_records_fields_as_json() {
    let port = echo_server();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\":1,\"name\":\"a \\\"quoted\\\" name\",\"amount\":12.5}\n{\"id\":2,\"name\":\"b\",\"amount\":3}\n",
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let url = format!("http://127.0.0.1:{port}/score/{{id}}");
    let out = sluice(&[
        "enrich",
        "--http",
        &url,
        "--http-body",
        r#"{{"name":"{name}","amount":{amount}}}"#,
        "--into",
        "score",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--shards",
        "1",
    ]);
    assert!(out.status.success());
    let got = lines(&output);
    assert_eq!(got[0]["score"]["got"]["name"], "a \"quoted\" name");
    assert_eq!(got[0]["score"]["got"]["amount"], 12.5);
    assert_eq!(got[0]["score"]["target"], "/score/1");
    assert_eq!(
        got[0]["score"]["method"], "POST",
        "a body makes POST the default"
    );
    assert_eq!(got[0]["score"]["json"], true, "sent as application/json");
    assert_eq!(got[1]["score"]["got"]["amount"], 3);
}
