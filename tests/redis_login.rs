//! Logging in to a production-like Redis: a `redis-server` this test starts on a private port
//! with a password (`requirepass`), an ACL user and a unix socket. The client's `AUTH` and
//! `SELECT` on every connection, a refused login named without the password, and `sluice
//! enrich` end to end with a `redis://user:password@host/db` URL and a `unix://` one. Skipped
//! (saying so) when `redis-server` is not installed, unless SLUICE_REQUIRE_REDIS=1.

mod real_redis;

use real_redis::{enrich_files, free_port, redis_server_installed};
use sluice::redis::{ClientConfig, Endpoint, RedisClient, Server};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PASSWORD: &str = "p@ss word";
const ALICE: &str = "s3cret";

/// A `redis-server` of this test's own, stopped when dropped.
struct OwnRedis {
    child: Child,
    port: u16,
    socket: PathBuf,
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn own_redis(name: &str) -> Option<OwnRedis> {
    if !redis_server_installed() {
        return None;
    }
    let port = free_port();
    let socket = std::env::temp_dir().join(format!("sluice-{}-{name}.sock", std::process::id()));
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--requirepass", PASSWORD])
        .args([
            "--user",
            "alice",
            "on",
            &format!(">{ALICE}"),
            "~*",
            "&*",
            "+@all",
        ])
        .arg("--unixsocket")
        .arg(&socket)
        .args(["--unixsocketperm", "700"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let redis = OwnRedis {
        child,
        port,
        socket,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() || !redis.socket.exists() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(redis)
}

/// Runs `commands` (each logged in as the default user) on the test's server.
fn admin(redis: &OwnRedis, commands: &[&[&str]]) {
    let args = vec![
        "-p".to_string(),
        redis.port.to_string(),
        "--no-auth-warning".into(),
        "-a".into(),
        PASSWORD.into(),
    ];
    for c in commands {
        let out = Command::new("redis-cli")
            .args(&args)
            .args(*c)
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "{c:?}: {out:?}");
    }
}

fn get(endpoint: Endpoint, key: &str) -> Result<Option<Vec<u8>>, String> {
    let key = key.to_string();
    glommio::LocalExecutorBuilder::default()
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .spawn(move || async move {
            let client = RedisClient::new(endpoint, &ClientConfig::default());
            client.get(key.as_bytes()).await.map_err(|e| e.to_string())
        })
        .unwrap()
        .join()
        .unwrap()
}

fn url_password() -> String {
    PASSWORD.replace('@', "%40").replace(' ', "%20")
}

#[test]
fn auth_select_and_unix_sockets_on_every_connection() {
    let Some(redis) = own_redis("login") else {
        return;
    };
    admin(
        &redis,
        &[&["SET", "k", "db0"], &["-n", "2", "SET", "k", "db2"]],
    );
    let port = redis.port;
    let url = |login: &str, db: &str| format!("redis://{login}127.0.0.1:{port}{db}");
    let parse = |u: &str| Endpoint::parse(u).unwrap();
    // The default user's password, then an ACL user; database 2 selected.
    let default = parse(&url(&format!(":{}@", url_password()), ""));
    assert_eq!(get(default, "k").unwrap().as_deref(), Some(&b"db0"[..]));
    let alice = parse(&url(&format!("alice:{ALICE}@"), "/2"));
    assert_eq!(get(alice, "k").unwrap().as_deref(), Some(&b"db2"[..]));
    // A unix socket, with its database and password in the query.
    let unix = parse(&format!(
        "unix://{}?db=2&password={}",
        redis.socket.display(),
        url_password()
    ));
    assert!(matches!(unix.server, Server::Unix(_)));
    assert_eq!(get(unix, "k").unwrap().as_deref(), Some(&b"db2"[..]));
    // Refusals name the command and the server's reason, never the password.
    let wrong = get(parse(&url("alice:not-it@", "")), "k").unwrap_err();
    assert!(
        wrong.contains("AUTH as `alice`") && wrong.contains("WRONGPASS"),
        "{wrong}"
    );
    assert!(!wrong.contains("not-it"), "{wrong}");
    let none = get(parse(&url("", "")), "k").unwrap_err();
    assert!(none.contains("NOAUTH"), "{none}");
}

#[test]
fn enrich_logs_in_and_refuses_a_wrong_password_before_writing() {
    let Some(redis) = own_redis("enrich") else {
        return;
    };
    admin(
        &redis,
        &[&["-n", "3", "SET", "user:u1", r#"{"tier":"gold"}"#]],
    );
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    writeln!(f, r#"{{"user_id":"u1","n":1}}"#).unwrap();
    writeln!(f, r#"{{"user_id":"u2","n":2}}"#).unwrap();
    drop(f);
    let output = dir.path().join("out.jsonl");
    let sluice = env!("CARGO_BIN_EXE_sluice");
    let enrich = |url: &str| enrich_files(sluice, url, "user:{user_id}", &input, &output, &[]);
    for url in [
        format!("redis://alice:{ALICE}@127.0.0.1:{}/3", redis.port),
        format!(
            "unix://{}?db=3&user=alice&password={ALICE}",
            redis.socket.display()
        ),
    ] {
        let run = enrich(&url);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{url}: {stderr}");
        assert!(
            !stderr.contains(ALICE),
            "the password is never shown: {stderr}"
        );
        let out = std::fs::read_to_string(&output).unwrap();
        assert_eq!(
            out, "{\"user_id\":\"u1\",\"n\":1,\"tier\":\"gold\"}\n{\"user_id\":\"u2\",\"n\":2}\n",
            "{url}"
        );
    }
    std::fs::remove_file(&output).unwrap();
    let run = enrich(&format!(
        "redis://alice:wrong-one@127.0.0.1:{}/3",
        redis.port
    ));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("refused AUTH as `alice`") && stderr.contains("WRONGPASS"),
        "{stderr}"
    );
    assert!(!stderr.contains("wrong-one"), "{stderr}");
    assert!(!output.exists(), "nothing written before the refusal");
}
