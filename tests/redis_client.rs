//! The io_uring Redis client over real loopback TCP: against loadgen's server (with injected
//! errors and resets) and against a real `redis-server` when one is reachable (`REDIS_URL`, else
//! 127.0.0.1:6379). With `SLUICE_REQUIRE_REDIS=1` (set by `.ci/run`) an unreachable Redis fails
//! the test instead of skipping it.

use futures::future::join_all;
use loadgen::{keyspace, LatencyModel, Server, ServerConfig};
use sluice::redis::{parse_url, ClientConfig, RedisClient, RedisError, Reply};
use std::net::SocketAddr;
use std::time::Duration;

fn run<T, F, Fut>(make: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    glommio::LocalExecutorBuilder::default()
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .spawn(make)
        .expect("executor")
        .join()
        .expect("executor ran")
}

fn loadgen(latency: &str, error_rate: f64, reset_rate: f64) -> Server {
    Server::start(ServerConfig {
        keys: 1_000,
        latency: latency.parse::<LatencyModel>().unwrap(),
        error_rate,
        reset_rate,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn gets_hits_and_misses_pipelined_against_loadgen() {
    let server = loadgen("1ms", 0.0, 0.0);
    let addr = server.addr();
    let (hits, misses) = run(move || async move {
        let client = RedisClient::new(addr, &ClientConfig::default());
        let keys: Vec<String> = (0..1_200).map(keyspace::key).collect();
        let replies = join_all(keys.iter().map(|k| client.get(k.as_bytes()))).await;
        let mut hits = 0;
        let mut misses = 0;
        for (i, r) in replies.into_iter().enumerate() {
            match r.unwrap() {
                Some(v) => {
                    assert_eq!(
                        v,
                        keyspace::value(i as u64, 128),
                        "reply matched to its request"
                    );
                    hits += 1;
                }
                None => misses += 1,
            }
        }
        (hits, misses)
    });
    assert_eq!((hits, misses), (1_000, 200));
}

/// The driver completes a share of the window per turn and writes the requests those
/// completions issue before completing more: with any split, a closed loop (new requests as
/// replies arrive, as the operator does) gets every reply, matched to its request, in order.
#[test]
fn every_reply_split_matches_replies_to_requests_in_a_closed_loop() {
    use futures::StreamExt;
    let server = loadgen("200us", 0.0, 0.0);
    let addr = server.addr();
    for reply_split in [1, 2, 4, 1_000] {
        let answered = run(move || async move {
            let client = RedisClient::new(
                addr,
                &ClientConfig {
                    reply_split,
                    ..Default::default()
                },
            );
            let client = &client;
            let mut replies = futures::stream::iter(0..3_000u64)
                .map(|i| async move { (i, client.get(keyspace::key(i % 1_000).as_bytes()).await) })
                .buffered(64);
            let mut answered = 0u64;
            while let Some((i, reply)) = replies.next().await {
                assert_eq!(i, answered, "split {reply_split}: replies in request order");
                assert_eq!(
                    reply.unwrap(),
                    Some(keyspace::value(i % 1_000, 128)),
                    "split {reply_split}: reply {i} matched to its request"
                );
                answered += 1;
            }
            answered
        });
        assert_eq!(answered, 3_000, "split {reply_split}");
    }
}

#[test]
fn error_replies_are_typed_and_not_retryable() {
    let server = loadgen("0ms", 1.0, 0.0);
    let addr = server.addr();
    let error = run(move || async move {
        let client = RedisClient::new(addr, &ClientConfig::default());
        client.get(b"user:user_000001").await.unwrap_err()
    });
    assert_eq!(
        error,
        RedisError::ErrorReply {
            message: "ERR injected failure".into()
        }
    );
    assert!(!error.is_retryable());
}

#[test]
fn a_reset_fails_in_flight_requests_retryably_and_the_client_reconnects() {
    // Every 5th request resets the connection.
    let server = loadgen("0ms", 0.0, 0.2);
    let addr = server.addr();
    let (ok, retryable) = run(move || async move {
        let client = RedisClient::new(
            addr,
            &ClientConfig {
                reconnect_initial: Duration::from_millis(1),
                ..Default::default()
            },
        );
        let (mut ok, mut retryable) = (0, 0);
        for i in 0..200u64 {
            match client.get(keyspace::key(i % 1_000).as_bytes()).await {
                Ok(Some(_)) => ok += 1,
                Ok(None) => panic!("key exists"),
                Err(e) => {
                    assert!(e.is_retryable(), "{e}");
                    let text = e.to_string();
                    assert_eq!(text.matches("lost").count(), 1, "said once: {text}");
                    retryable += 1;
                    glommio::timer::sleep(Duration::from_millis(3)).await;
                }
            }
        }
        (ok, retryable)
    });
    assert!(ok > 100, "the client reconnected and kept serving: {ok} ok");
    assert!(
        retryable > 10,
        "resets surfaced as retryable errors: {retryable}"
    );
    assert!(
        server
            .stats()
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            > 10
    );
}

#[test]
fn an_unreachable_server_is_a_retryable_connect_error() {
    // A port nothing listens on: bind, take the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let error = run(move || async move {
        let client = RedisClient::new(addr, &ClientConfig::default());
        client.get(b"k").await.unwrap_err()
    });
    assert!(matches!(error, RedisError::Connect { .. }), "{error}");
    assert!(error.is_retryable());
    assert!(error.to_string().contains(&port.to_string()));
}

/// The real Redis to test against, or `None` (skip) when unreachable and not required.
fn real_redis() -> Option<SocketAddr> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let addr = parse_url(&url).expect("REDIS_URL parses");
    let reachable = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok();
    let required = std::env::var("SLUICE_REQUIRE_REDIS").is_ok_and(|v| v == "1");
    match (reachable, required) {
        (true, _) => Some(addr),
        (false, true) => panic!("SLUICE_REQUIRE_REDIS=1 but no Redis answers at {url}"),
        (false, false) => {
            eprintln!("skipping: no Redis at {url} (set REDIS_URL, or SLUICE_REQUIRE_REDIS=1 to require it)");
            None
        }
    }
}

#[test]
fn real_redis_set_get_mget_errors_and_pipelining() {
    let Some(addr) = real_redis() else { return };
    let prefix = format!("sluice-test:{}:", std::process::id());
    run(move || async move {
        let client = RedisClient::new(
            addr,
            &ClientConfig {
                connections: 2,
                ..Default::default()
            },
        );
        let key = |i: u32| format!("{prefix}{i}");
        // Pipelined SETs then GETs.
        let sets = join_all((0..500).map(|i| {
            let (k, v) = (key(i), format!("value-{i}"));
            client.command(&[b"SET", k.as_bytes(), v.as_bytes()])
        }))
        .await;
        assert!(sets
            .iter()
            .all(|r| r.as_ref().unwrap() == &Reply::Status("OK".into())));
        let gets = join_all((0..500).map(|i| {
            let k = key(i);
            client.get(k.as_bytes())
        }))
        .await;
        for (i, r) in gets.into_iter().enumerate() {
            assert_eq!(r.unwrap(), Some(format!("value-{i}").into_bytes()));
        }
        assert_eq!(client.get(key(9_999).as_bytes()).await.unwrap(), None);
        let (k0, k1, missing) = (key(0), key(1), key(9_999));
        let mget = client
            .command(&[b"MGET", k0.as_bytes(), missing.as_bytes(), k1.as_bytes()])
            .await;
        assert_eq!(
            mget.unwrap(),
            Reply::Array(vec![
                Reply::Bulk(b"value-0".to_vec()),
                Reply::Nil,
                Reply::Bulk(b"value-1".to_vec())
            ])
        );
        // A type error is an error reply, not a broken connection.
        let err = client.command(&[b"INCR", k0.as_bytes()]).await.unwrap_err();
        assert!(
            matches!(err, RedisError::ErrorReply { ref message } if message.contains("not an integer")),
            "{err}"
        );
        assert_eq!(
            client.command(&[b"PING"]).await.unwrap(),
            Reply::Status("PONG".into())
        );
        let keys: Vec<String> = (0..500).map(key).collect();
        let mut del: Vec<&[u8]> = vec![b"DEL"];
        del.extend(keys.iter().map(|k| k.as_bytes()));
        assert_eq!(client.command(&del).await.unwrap(), Reply::Int(500));
    });
}

#[test]
fn time_on_the_wire_covers_the_server_delay_of_every_answered_request() {
    let server = loadgen("3ms", 0.0, 0.0);
    let addr = server.addr();
    let wire = run(move || async move {
        let client = RedisClient::new(addr, &ClientConfig::default());
        let keys: Vec<String> = (0..200).map(keyspace::key).collect();
        for r in join_all(keys.iter().map(|k| client.get(k.as_bytes()))).await {
            r.unwrap();
        }
        client.wire_latency()
    });
    assert_eq!(wire.len(), 200, "one sample per answered request");
    // The server holds each reply 3 ms; the wire time includes that, and the loopback is fast.
    assert!(wire.min() >= 3_000, "min {} us", wire.min());
    assert!(
        wire.value_at_quantile(0.5) < 1_000_000,
        "p50 {} us",
        wire.value_at_quantile(0.5)
    );
}
