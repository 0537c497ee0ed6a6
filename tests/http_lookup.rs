//! The HTTP client and `HttpLookup` on a glommio executor, against real sockets: a small
//! HTTP/1.1 server in this test (keep-alive, chunked bodies, statuses, a connection closed
//! after its response) and Python's `http.server` (a server that is not ours: HTTP/1.0, one
//! connection per request). Python is on every machine here; the test says so when it is not
//! and skips that part.

mod helpers;
mod python_http;

use bytes::Bytes;
use helpers::run;
use sluice::http::{parse_url, HttpClient, HttpConfig, HttpError};
use sluice::lookup::{CacheConfig, Eviction, HttpLookup, LayerConfig, LookupError, Lookups};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A small HTTP/1.1 server: `/users/N` answers `{"id":N}` (Content-Length, keep-alive),
/// `/chunked/N` the same in three chunks, `/missing` 404, `/busy` 503 with `Retry-After: 1`,
/// `/teapot` 418, `/huge` announces a body of a gigabyte, `/close-after/N` answers and then
/// closes the connection without saying so.
struct TestServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl TestServer {
    fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || serve(stream));
            }
        });
        TestServer { addr, accepted }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn serve(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let target = request_line.split(' ').nth(1).unwrap().to_string();
        let reply = |status: &str, extra: &str, body: &str| {
            format!(
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let (text, close) = if let Some(n) = target.strip_prefix("/users/") {
            (reply("200 OK", "", &format!("{{\"id\":{n}}}")), false)
        } else if let Some(n) = target.strip_prefix("/chunked/") {
            let body = format!("{{\"id\":{n}}}");
            let (a, b) = body.split_at(3);
            let text = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            );
            (text, false)
        } else if target == "/missing" {
            (reply("404 Not Found", "", "no such user"), false)
        } else if target == "/busy" {
            (
                reply("503 Service Unavailable", "Retry-After: 1\r\n", ""),
                false,
            )
        } else if target == "/teapot" {
            (reply("418 I'm a teapot", "", "no coffee"), false)
        } else if target == "/huge" {
            // A length no lookup value has; the body never comes.
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n".to_string(),
                false,
            )
        } else if let Some(n) = target.strip_prefix("/close-after/") {
            (reply("200 OK", "", &format!("{{\"id\":{n}}}")), true)
        } else {
            (reply("400 Bad Request", "", "unknown path"), true)
        };
        if writer.write_all(text.as_bytes()).is_err() || close {
            return;
        }
    }
}

fn client(url: &str, max_connections: usize) -> HttpClient {
    let (endpoint, _) = parse_url(url).unwrap();
    HttpClient::new(
        endpoint,
        HttpConfig {
            max_connections,
            ..HttpConfig::default()
        },
    )
}

fn body(s: &str) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(s.as_bytes()))
}

#[test]
fn statuses_bodies_and_framing() {
    let server = TestServer::start();
    let url = server.url();
    run(move || async move {
        let c = client(&url, 4);
        assert_eq!(
            c.request(b"/users/7", None).await.unwrap(),
            body("{\"id\":7}")
        );
        assert_eq!(
            c.request(b"/chunked/12", None).await.unwrap(),
            body("{\"id\":12}")
        );
        assert_eq!(c.request(b"/missing", None).await.unwrap(), None);
        let busy = c.request(b"/busy", None).await.unwrap_err();
        assert!(busy.is_retryable(), "{busy}");
        assert_eq!(busy.retry_after(), Some(Duration::from_secs(1)));
        let teapot = c.request(b"/teapot", None).await.unwrap_err();
        assert!(!teapot.is_retryable());
        let text = teapot.to_string();
        assert!(
            text.contains("418") && text.contains("/teapot") && text.contains("no coffee"),
            "{text}"
        );
        let huge = c.request(b"/huge", None).await.unwrap_err();
        assert!(
            !huge.is_retryable() && huge.to_string().contains("999999999"),
            "{huge}"
        );
        // A body goes with its length (the server reads it before answering).
        assert_eq!(
            c.request(b"/users/8", Some(b"{\"q\":1}")).await.unwrap(),
            body("{\"id\":8}")
        );
    });
}

#[test]
fn keep_alive_connections_are_reused_and_bounded() {
    let server = TestServer::start();
    let url = server.url();
    let opened = run(move || async move {
        let c = client(&url, 8);
        for i in 0..300 {
            let target = format!("/users/{i}");
            assert!(c.request(target.as_bytes(), None).await.unwrap().is_some());
        }
        let sequential = c.connections_opened();
        let answers = futures::future::join_all((0..200).map(|i| {
            let c = c.clone();
            async move { c.request(format!("/users/{i}").as_bytes(), None).await }
        }))
        .await;
        assert!(answers.iter().all(|a| matches!(a, Ok(Some(_)))));
        (sequential, c.connections_opened())
    });
    assert_eq!(
        opened.0, 1,
        "300 requests one after another: one connection"
    );
    assert!(opened.1 <= 8, "at most max_connections: {}", opened.1);
    assert_eq!(server.accepted.load(Ordering::SeqCst) as u64, opened.1);
}

#[test]
fn a_connection_the_server_closed_is_retried_once_on_a_new_one() {
    let server = TestServer::start();
    let url = server.url();
    let opened = run(move || async move {
        let c = client(&url, 1);
        assert!(c.request(b"/close-after/1", None).await.unwrap().is_some());
        // The pooled connection is closed by now: the request goes again on a new one.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            c.request(b"/users/2", None).await.unwrap(),
            body("{\"id\":2}")
        );
        c.connections_opened()
    });
    assert_eq!(opened, 2);
}

#[test]
fn a_server_that_is_not_there_is_a_retryable_connect_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let error = run(move || async move {
        client(&format!("http://127.0.0.1:{port}"), 2)
            .request(b"/users/1", None)
            .await
            .unwrap_err()
    });
    assert!(matches!(error, HttpError::Connect { .. }), "{error}");
    assert!(error.is_retryable());
}

#[test]
fn lookups_through_the_layer_against_python_http_server() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("users")).unwrap();
    for i in 0..20 {
        std::fs::write(
            dir.path().join(format!("users/user_{i}")),
            format!("{{\"id\":{i},\"segment\":\"s{}\"}}", i % 3),
        )
        .unwrap();
    }
    let Some((mut child, port)) = python_http::python_server(dir.path()) else {
        return;
    };
    let (answers, stats, opened) = run(move || async move {
        let layer = LayerConfig {
            batch_size: NonZeroUsize::new(4).unwrap(),
            cache: Some(CacheConfig {
                entries: NonZeroUsize::new(100).unwrap(),
                max_bytes: 1 << 20,
                ttl: Duration::from_secs(60),
                missing_ttl: Some(Duration::from_secs(60)),
                eviction: Eviction::ClockPro,
            }),
            ..LayerConfig::default()
        };
        let lookups = Lookups::new(
            HttpLookup::new(client(&format!("http://127.0.0.1:{port}"), 4)),
            layer,
        );
        let keys: Vec<String> = (0..40).map(|i| format!("/users/user_{}", i % 25)).collect();
        let answers =
            futures::future::join_all(keys.iter().map(|k| lookups.get(k.as_bytes()))).await;
        let opened = lookups.backend().client().connections_opened();
        (answers, lookups.stats(), opened)
    });
    let _ = child.kill();
    let _ = child.wait();
    for (i, answer) in answers.iter().enumerate() {
        let user = i % 25;
        let expected: Result<Option<Bytes>, LookupError<HttpError>> = Ok(if user < 20 {
            body(&format!("{{\"id\":{user},\"segment\":\"s{}\"}}", user % 3))
        } else {
            None
        });
        assert_eq!(answer, &expected, "key /users/user_{user}");
    }
    // 25 distinct keys: the rest coalesced onto the first lookups or answered by the cache.
    assert_eq!(stats.keys_sent, 25, "{stats:?}");
    // HTTP/1.0 without keep-alive: a connection per request.
    assert_eq!(opened, 25);
}

/// loadgen's HTTP mode serves the keyspace the Redis mode serves: `GET /KEY` answers the value
/// (after the latency model's delay), 404 for a key it lacks, and an injected error is a 503
/// with `Retry-After: 0`; its connections are kept alive.
#[test]
fn loadgen_serves_its_keyspace_over_http() {
    use loadgen::{keyspace, LatencyModel, Server, ServerConfig};
    let server = Server::start(ServerConfig {
        keys: 1_000,
        latency: LatencyModel::Fixed(Duration::from_millis(1)),
        http: true,
        ..Default::default()
    })
    .unwrap();
    let url = format!("http://{}", server.addr());
    let (answers, missing, opened) = run(move || async move {
        let c = client(&url, 16);
        let answers = futures::future::join_all((0..200u64).map(|i| {
            let c = c.clone();
            async move {
                c.request(format!("/user:user_{:06}", i % 1_000).as_bytes(), None)
                    .await
            }
        }))
        .await;
        let missing = c.request(b"/user:nobody", None).await;
        (answers, missing, c.connections_opened())
    });
    for (i, answer) in answers.into_iter().enumerate() {
        let expected = Bytes::from(keyspace::value(i as u64 % 1_000, 128));
        assert_eq!(answer.unwrap(), Some(expected), "key {i}");
    }
    assert_eq!(missing.unwrap(), None);
    assert!(opened <= 16, "{opened}");
    assert_eq!(server.stats().gets.load(Ordering::SeqCst), 201);
    server.stop();

    let failing = Server::start(ServerConfig {
        keys: 10,
        latency: LatencyModel::Fixed(Duration::ZERO),
        http: true,
        error_rate: 1.0,
        ..Default::default()
    })
    .unwrap();
    let url = format!("http://{}", failing.addr());
    let busy =
        run(move || async move { client(&url, 1).request(b"/user:user_000001", None).await });
    let busy = busy.unwrap_err();
    assert!(busy.is_retryable(), "{busy}");
    assert_eq!(busy.retry_after(), Some(Duration::ZERO));
}
