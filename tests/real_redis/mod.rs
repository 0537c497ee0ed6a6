//! A real Redis for the tests that need one: `REDIS_URL`, else 127.0.0.1:6379; a test skips
//! (saying so) when none answers, unless SLUICE_REQUIRE_REDIS=1 makes that a failure. And the
//! `redis-server` binary, for the tests that start servers of their own.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

/// A real Redis, or `None` (skip) when unreachable and not required.
pub fn real_redis() -> Option<SocketAddr> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let addr = sluice::redis::parse_url(&url).unwrap();
    let reachable = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok();
    if !reachable && std::env::var("SLUICE_REQUIRE_REDIS").is_ok_and(|v| v == "1") {
        panic!("SLUICE_REQUIRE_REDIS=1 but no Redis answers at {url}");
    }
    reachable.then_some(addr).or_else(|| {
        eprintln!("skipping: no Redis at {url}");
        None
    })
}

/// Sends one command to Redis and reads its (short) reply.
pub fn redis_command(conn: &mut std::net::TcpStream, args: &[&str]) -> String {
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    conn.write_all(cmd.as_bytes()).unwrap();
    let mut buf = [0u8; 256];
    let n = conn.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Whether `redis-server` can be started; `false` (saying so: the test skips) when it is not
/// installed, a failure instead under SLUICE_REQUIRE_REDIS=1.
pub fn redis_server_installed() -> bool {
    let found = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("SLUICE_REQUIRE_REDIS").is_ok_and(|v| v == "1") {
            panic!("SLUICE_REQUIRE_REDIS=1 but redis-server is not installed");
        }
        eprintln!("skipping: redis-server is not installed");
    }
    found
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `sluice enrich` (the binary at `bin`, `env!("CARGO_BIN_EXE_sluice")`) against `url`
/// with `key`, from `input` to `output`, with `extra` flags; its output.
pub fn enrich_files(
    bin: &str,
    url: &str,
    key: &str,
    input: &std::path::Path,
    output: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    std::process::Command::new(bin)
        .args(["enrich", "--redis", url, "--key", key, "--input"])
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .expect("sluice runs")
}
