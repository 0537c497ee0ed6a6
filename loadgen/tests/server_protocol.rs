//! The lookup server against a plain blocking client over real loopback TCP: commands and
//! pipelining, reply delays, injected errors and resets.

use loadgen::keyspace;
use loadgen::{LatencyModel, Server, ServerConfig};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn start(latency: &str, error_rate: f64, reset_rate: f64) -> Server {
    Server::start(ServerConfig {
        keys: 1_000,
        value_size: 100,
        latency: latency.parse::<LatencyModel>().unwrap(),
        error_rate,
        reset_rate,
        ..Default::default()
    })
    .expect("server starts")
}

fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

/// Reads one RESP2 reply and renders it compactly.
fn read_reply(r: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    r.read_line(&mut line).expect("a reply line");
    let line = line.trim_end().to_string();
    match line.as_bytes()[0] {
        b'$' => {
            let len: i64 = line[1..].parse().unwrap();
            if len < 0 {
                return "nil".into();
            }
            let mut buf = vec![0; len as usize + 2];
            r.read_exact(&mut buf).unwrap();
            String::from_utf8(buf[..len as usize].to_vec()).unwrap()
        }
        b'*' => {
            let n: usize = line[1..].parse().unwrap();
            let items: Vec<String> = (0..n).map(|_| read_reply(r)).collect();
            format!("[{}]", items.join(","))
        }
        _ => line,
    }
}

#[test]
fn pipelined_commands_are_answered_in_order() {
    let server = start("0ms", 0.0, 0.0);
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    let mut batch = vec![];
    for args in [
        vec!["PING"],
        vec!["GET", &keyspace::key(5)],
        vec!["GET", "user:nobody"],
        vec!["DBSIZE"],
        vec!["SET", "k", "v"],
        vec!["GET", "k"],
        vec!["MGET", &keyspace::key(1), "nope"],
        vec!["HELLO", "3"],
        vec!["CLIENT", "SETNAME", "x"],
        vec!["NOSUCH"],
    ] {
        batch.extend(command(&args));
    }
    stream.write_all(&batch).unwrap();
    let mut r = BufReader::new(stream);
    assert_eq!(read_reply(&mut r), "+PONG");
    let value: serde_json::Value = serde_json::from_str(&read_reply(&mut r)).unwrap();
    assert_eq!(value["user_id"], "user_000005");
    assert_eq!(read_reply(&mut r), "nil");
    assert_eq!(read_reply(&mut r), ":1000");
    assert_eq!(read_reply(&mut r), "+OK");
    assert_eq!(read_reply(&mut r), "v");
    let mget = read_reply(&mut r);
    assert!(
        mget.contains("user_000001") && mget.ends_with(",nil]"),
        "{mget}"
    );
    assert!(read_reply(&mut r).starts_with("-NOPROTO"));
    assert_eq!(read_reply(&mut r), "+OK");
    assert!(read_reply(&mut r).starts_with("-ERR unknown command"));
    let stats = server.stats();
    assert_eq!(stats.commands.load(Ordering::Relaxed), 10);
    assert_eq!(stats.hits.load(Ordering::Relaxed), 3);
    assert_eq!(stats.misses.load(Ordering::Relaxed), 2);
}

#[test]
fn quit_answers_then_closes_and_names_are_case_insensitive() {
    let server = start("0ms", 0.0, 0.0);
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    let mut batch = command(&["ping"]);
    batch.extend(command(&["Get", &keyspace::key(7)]));
    batch.extend(command(&["quit"]));
    batch.extend(command(&["PING"])); // after QUIT: never answered
    stream.write_all(&batch).unwrap();
    let mut r = BufReader::new(stream);
    assert_eq!(read_reply(&mut r), "+PONG");
    let value: serde_json::Value = serde_json::from_str(&read_reply(&mut r)).unwrap();
    assert_eq!(value["user_id"], "user_000007");
    assert_eq!(read_reply(&mut r), "+OK");
    let mut rest = vec![];
    r.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "after QUIT: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

/// Sends `requests` GETs of keys `i % 1000` from another thread, `burst` per write, and checks
/// that every reply comes back, in request order.
fn pipelined_gets_are_answered_in_order(server: &Server, requests: u64, burst: u64) {
    let stream = TcpStream::connect(server.addr()).unwrap();
    let mut sender = stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for first in (0..requests).step_by(burst as usize) {
            let mut batch = vec![];
            for i in first..(first + burst).min(requests) {
                batch.extend(command(&["GET", &keyspace::key(i % 1_000)]));
            }
            sender.write_all(&batch).unwrap();
        }
    });
    let mut r = BufReader::new(stream);
    for i in 0..requests {
        let value: serde_json::Value = serde_json::from_str(&read_reply(&mut r)).unwrap();
        assert_eq!(value["user_id"], keyspace::user_id(i % 1_000), "reply {i}");
    }
    writer.join().unwrap();
}

/// More requests than a connection may hold back (4096), in one write: the server stops
/// reading until its writer makes room, and every request is still answered, in order.
#[test]
fn a_pipeline_longer_than_the_pending_limit_is_answered_in_order() {
    const REQUESTS: u64 = 12_000;
    let server = start("2ms", 0.0, 0.0);
    pipelined_gets_are_answered_in_order(&server, REQUESTS, REQUESTS);
    let stats = server.stats();
    assert_eq!(stats.hits.load(Ordering::Relaxed), REQUESTS);
    assert_eq!(stats.replies_written.load(Ordering::Relaxed), REQUESTS);
}

/// Under a random delay every reply gets its own due time (a chunk of its own in the outbox,
/// or shares one when its delay is clamped to the previous reply's): still in request order.
#[test]
fn replies_keep_request_order_under_a_random_delay() {
    const REQUESTS: u64 = 3_000;
    let server = start("uniform:0ms:2ms", 0.0, 0.0);
    pipelined_gets_are_answered_in_order(&server, REQUESTS, 100);
    assert_eq!(
        server.stats().replies_written.load(Ordering::Relaxed),
        REQUESTS
    );
}

#[test]
fn replies_wait_for_the_latency_model() {
    let server = start("30ms", 0.0, 0.0);
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    let started = Instant::now();
    stream.write_all(&command(&["PING"]).repeat(3)).unwrap();
    let mut r = BufReader::new(stream);
    for _ in 0..3 {
        assert_eq!(read_reply(&mut r), "+PONG");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(30),
        "replied after {elapsed:?}"
    );
}

#[test]
fn injected_errors_replace_replies() {
    let server = start("0ms", 1.0, 0.0);
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream
        .write_all(&command(&["GET", &keyspace::key(1)]))
        .unwrap();
    let mut r = BufReader::new(stream);
    assert_eq!(read_reply(&mut r), "-ERR injected failure");
    assert_eq!(server.stats().errors_injected.load(Ordering::Relaxed), 1);
}

#[test]
fn injected_resets_close_the_connection() {
    let server = start("0ms", 0.0, 1.0);
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(&command(&["PING"])).unwrap();
    let mut buf = [0u8; 16];
    let n = stream.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a reply");
    assert_eq!(server.stats().resets_injected.load(Ordering::Relaxed), 1);
}

#[test]
fn two_shards_share_one_port() {
    let server = Server::start(ServerConfig {
        shards: 2,
        latency: LatencyModel::Fixed(Duration::ZERO),
        ..Default::default()
    })
    .unwrap();
    for _ in 0..8 {
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        stream.write_all(&command(&["PING"])).unwrap();
        assert_eq!(read_reply(&mut BufReader::new(stream)), "+PONG");
    }
    assert_eq!(server.stats().connections.load(Ordering::Relaxed), 8);
}

#[test]
fn stopping_the_server_closes_open_connections() {
    let server = start("0ms", 0.0, 0.0);
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream.write_all(&command(&["PING"])).unwrap();
    let mut r = BufReader::new(stream.try_clone().unwrap());
    assert_eq!(read_reply(&mut r), "+PONG");
    server.stop();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        r.read(&mut buf).unwrap_or(0),
        0,
        "the client sees the connection end"
    );
}

/// Bad flags are refused by name (exit 2), and a port in use is said in words (exit 1).
#[test]
fn bad_flags_and_a_port_in_use_are_errors_that_name_them() {
    let loadgen = || std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"));
    for (args, flag) in [
        (&["records", "--keys", "0"][..], "--keys"),
        (&["records", "--zipf=-1"][..], "--zipf"),
        (&["records", "--rate", "0"][..], "--rate"),
        (&["serve", "--keys", "0"][..], "--keys"),
        (&["serve", "--error-rate", "2"][..], "--error-rate"),
        (&["serve", "--shards", "0"][..], "--shards"),
    ] {
        let out = loadgen().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = loadgen().args(["serve", "--port", &port]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("could not listen") && stderr.contains(&port) && !stderr.contains("Bind {"),
        "{stderr}"
    );
}
