//! The lookup layer's cache kept fresh by Redis itself (client tracking: `HELLO 3`, `CLIENT
//! TRACKING ON`, invalidations as push messages) against a real `redis-server` (`REDIS_URL`,
//! else 127.0.0.1:6379; skipped, saying so, when none answers, unless SLUICE_REQUIRE_REDIS=1),
//! and refused clearly by a server without it.

mod real_redis;

use bytes::Bytes;
use real_redis::{real_redis, redis_command};
use sluice::lookup::{CacheConfig, Eviction, LayerConfig, LayerStats, Lookups};
use sluice::redis::{ClientConfig, RedisClient};
use std::net::{SocketAddr, TcpStream};
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests here kill tracking connections by their flag: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn run<T: Send + 'static, Fut: std::future::Future<Output = T> + 'static>(
    f: impl FnOnce() -> Fut + Send + 'static,
) -> T {
    glommio::LocalExecutorBuilder::default()
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .spawn(f)
        .expect("executor")
        .join()
        .expect("executor ran")
}

fn layer(batch_size: usize) -> LayerConfig {
    LayerConfig {
        batch_size: NonZeroUsize::new(batch_size).unwrap(),
        cache: Some(CacheConfig {
            entries: NonZeroUsize::new(1_000).unwrap(),
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(60),
            missing_ttl: Some(Duration::from_secs(60)),
            eviction: Eviction::ClockPro,
        }),
        ..LayerConfig::default()
    }
}

fn client(addr: SocketAddr, tracking: bool) -> RedisClient {
    RedisClient::new(
        addr,
        &ClientConfig {
            tracking,
            ..ClientConfig::default()
        },
    )
}

/// Caches `key` at `old`, writes `new` from another connection, and looks it up every
/// millisecond for up to `wait`: how long until the new value was seen (`None`: never), and
/// the layer's figures.
fn write_while_cached(
    addr: SocketAddr,
    tracking: bool,
    batch_size: usize,
    key: String,
    wait: Duration,
) -> (Option<Duration>, LayerStats) {
    let mut other = TcpStream::connect(addr).unwrap();
    assert!(redis_command(&mut other, &["SET", &key, "old"]).starts_with("+OK"));
    run(move || async move {
        let lookups = Lookups::new(client(addr, tracking), layer(batch_size));
        let old = Some(Bytes::from_static(b"old"));
        assert_eq!(lookups.get(key.as_bytes()).await.unwrap(), old);
        assert_eq!(lookups.get(key.as_bytes()).await.unwrap(), old);
        assert_eq!(lookups.stats().cache_hits, 1, "the second lookup is a hit");
        assert!(redis_command(&mut other, &["SET", &key, "new"]).starts_with("+OK"));
        let written = Instant::now();
        let seen = loop {
            if lookups.get(key.as_bytes()).await.unwrap().as_deref() == Some(&b"new"[..]) {
                break Some(written.elapsed());
            }
            if written.elapsed() > wait {
                break None;
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        };
        redis_command(&mut other, &["DEL", &key]);
        (seen, lookups.stats())
    })
}

#[test]
fn a_cached_key_written_from_another_connection_is_seen_fresh_within_100ms() {
    let Some(addr) = real_redis() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for batch_size in [1, 16] {
        let key = format!("sluice-test:tracking:{}:{batch_size}", std::process::id());
        let (seen, stats) =
            write_while_cached(addr, true, batch_size, key.clone(), Duration::from_secs(2));
        let seen = seen.expect("the written value is seen");
        assert!(
            seen < Duration::from_millis(100),
            "batch {batch_size}: seen after {seen:?}"
        );
        assert!(stats.invalidated >= 1, "{stats:?}");
        // Without tracking, the cache serves the old value for its TTL (60 s here).
        let (seen, stats) =
            write_while_cached(addr, false, batch_size, key, Duration::from_millis(200));
        assert_eq!(seen, None, "without tracking the cached value stays");
        assert_eq!(stats.invalidated, 0);
    }
}

/// Kills the connections of this Redis that have client tracking on.
fn kill_tracking_connections(addr: SocketAddr) -> usize {
    let mut admin = TcpStream::connect(addr).unwrap();
    let mut list = String::new();
    // CLIENT LIST's reply may take more than one read.
    let cmd = "*2\r\n$6\r\nCLIENT\r\n$4\r\nLIST\r\n";
    std::io::Write::write_all(&mut admin, cmd.as_bytes()).unwrap();
    admin
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 65536];
    while let Ok(n) = std::io::Read::read(&mut admin, &mut buf) {
        if n == 0 {
            break;
        }
        list.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let ids: Vec<String> = list
        .lines()
        .filter(|l| {
            l.split(' ')
                .any(|f| f.starts_with("flags=") && f.contains('t'))
        })
        .filter_map(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("id="))
                .map(String::from)
        })
        .collect();
    admin.set_read_timeout(None).unwrap();
    for id in &ids {
        redis_command(&mut admin, &["CLIENT", "KILL", "ID", id]);
    }
    ids.len()
}

#[test]
fn a_lost_tracking_connection_flushes_the_cache() {
    let Some(addr) = real_redis() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let key = format!("sluice-test:tracking-lost:{}", std::process::id());
    let mut other = TcpStream::connect(addr).unwrap();
    assert!(redis_command(&mut other, &["SET", &key, "v"]).starts_with("+OK"));
    let stats = run(move || async move {
        let lookups = Lookups::new(client(addr, true), layer(1));
        assert!(lookups.get(key.as_bytes()).await.unwrap().is_some());
        assert_eq!(lookups.cached(), 1);
        assert!(kill_tracking_connections(addr) >= 1, "ours among them");
        // The next lookup after the loss is noticed misses and is answered after the
        // reconnect (which tracks again).
        let deadline = Instant::now() + Duration::from_secs(2);
        while lookups.backend().invalidations().unwrap().counts().1 == 0 {
            assert!(Instant::now() < deadline, "the loss was noticed");
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        assert!(lookups.get(key.as_bytes()).await.unwrap().is_some());
        redis_command(&mut other, &["DEL", &key]);
        lookups.stats()
    });
    assert!(stats.cache_flushes >= 1, "{stats:?}");
    assert_eq!(stats.cache_hits, 0, "{stats:?}");
    assert_eq!(
        stats.requests, 2,
        "looked up again after the flush: {stats:?}"
    );
}

#[test]
fn a_server_without_client_tracking_is_refused_naming_the_command() {
    let server = loadgen::Server::start(loadgen::ServerConfig::default()).unwrap();
    let addr = server.addr();
    let error = run(move || async move {
        let lookups = Lookups::new(client(addr, true), layer(1));
        lookups
            .get(b"user:user_000001")
            .await
            .unwrap_err()
            .to_string()
    });
    assert!(
        error.contains("HELLO 3") && error.contains("Redis 6"),
        "{error}"
    );
}
