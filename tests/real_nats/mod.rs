//! The NATS server (with JetStream) the tests use: `NATS_URL`, else 127.0.0.1:4222 when it
//! answers; the tests that need one skip (saying so) when none does, unless
//! SLUICE_REQUIRE_NATS=1 makes that a failure.

#![allow(dead_code)]

use std::time::Duration;

/// The server's URL, if one answers.
pub fn nats_url() -> Option<String> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let addr = url.trim_start_matches("nats://").to_string();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
    if !reachable {
        if std::env::var("SLUICE_REQUIRE_NATS").is_ok_and(|v| v == "1") {
            panic!("SLUICE_REQUIRE_NATS=1 but no NATS answers at {url}");
        }
        eprintln!("SKIPPED: no NATS answers at {url} (set NATS_URL)");
        return None;
    }
    Some(url)
}
