//! The NATS server (with JetStream) the tests use: `NATS_URL`, else 127.0.0.1:4222 when it
//! answers; the tests that need one skip (saying so) when none does, unless
//! SLUICE_REQUIRE_NATS=1 makes that a failure.

#![allow(dead_code)]

use async_nats::jetstream;
use futures::StreamExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// Input stream `IN_<tag>` on subject `in.<tag>` holding `count` records, and an empty output
/// stream `OUT_<tag>` on `out.<tag>` with a duplicate window of 10 minutes.
pub async fn streams(js: &jetstream::Context, tag: &str, count: u64) {
    make_streams(js, tag, count, None).await
}

/// As [`streams`], with the input on subjects `in.<tag>.<p>` for `partitions` partitions: a
/// record's partition is its user's number modulo `partitions`, so one key stays on one.
pub async fn partitioned_streams(js: &jetstream::Context, tag: &str, count: u64, partitions: u64) {
    make_streams(js, tag, count, Some(partitions)).await
}

/// Record `n`'s user number.
pub fn user_of(n: u64) -> u64 {
    n * 7 % 1000
}

async fn make_streams(js: &jetstream::Context, tag: &str, count: u64, partitions: Option<u64>) {
    for name in [format!("IN_{tag}"), format!("OUT_{tag}")] {
        let _ = js.delete_stream(&name).await;
    }
    js.create_stream(jetstream::stream::Config {
        name: format!("IN_{tag}"),
        subjects: vec![match partitions {
            None => format!("in.{tag}"),
            Some(_) => format!("in.{tag}.*"),
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    js.create_stream(jetstream::stream::Config {
        name: format!("OUT_{tag}"),
        subjects: vec![format!("out.{tag}")],
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut acks = vec![];
    for n in 0..count {
        let user = user_of(n);
        let record = format!(r#"{{"n":{n},"user_id":"user_{user:06}"}}"#);
        let subject = match partitions {
            None => format!("in.{tag}"),
            Some(p) => format!("in.{tag}.{}", user % p),
        };
        acks.push(js.publish(subject, record.into()).await.unwrap());
        // The client holds back publishes beyond a few thousand acks not awaited.
        if acks.len() == 500 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// How many messages the output stream holds (asking again for up to 20 s while the server
/// does not answer: it may be starting again).
pub async fn stored(js: &jetstream::Context, tag: &str) -> u64 {
    let started = Instant::now();
    loop {
        let info = async {
            let mut stream = js.get_stream(format!("OUT_{tag}")).await?;
            Ok::<_, async_nats::Error>(stream.info().await?.state.messages)
        };
        match info.await {
            Ok(messages) => return messages,
            Err(e) if started.elapsed() > Duration::from_secs(20) => {
                panic!("the output stream does not answer: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The output stream's records' `n`, in stored order; each must be enriched.
pub async fn outputs(js: &jetstream::Context, tag: &str, count: u64) -> Vec<u64> {
    let records = records(js, &format!("OUT_{tag}"), count).await;
    records
        .iter()
        .map(|record| {
            assert!(record.get("segment").is_some(), "not enriched: {record}");
            record["n"].as_u64().unwrap()
        })
        .collect()
}

/// Up to `count` JSON messages of a stream, in stored order.
pub async fn records(js: &jetstream::Context, stream: &str, count: u64) -> Vec<serde_json::Value> {
    let stream = js.get_stream(stream).await.unwrap();
    let reader = stream
        .create_consumer(jetstream::consumer::pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut records = vec![];
    while (records.len() as u64) < count {
        let mut batch = reader
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        let before = records.len();
        while let Some(m) = batch.next().await {
            records.push(serde_json::from_slice(&m.unwrap().payload).unwrap());
        }
        if records.len() == before {
            break;
        }
    }
    records
}

/// A `sluice enrich` run, killed (SIGKILL) if it is still running when dropped: a test that
/// fails leaves no run behind.
pub struct Run(pub Child);

impl std::ops::Deref for Run {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Run {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub fn enrich(url: &str, tag: &str, extra: &[&str]) -> Run {
    enrich_from(&format!("{url}/IN_{tag}?consumer=enrich"), url, tag, extra)
}

/// `sluice enrich` (ordered, embedded lookups) from `input` to `out.<tag>` at `url`.
pub fn enrich_from(input: &str, url: &str, tag: &str, extra: &[&str]) -> Run {
    Run(Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["enrich", "--loadgen", "--key", "user:{user_id}"])
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(format!("{url}/out.{tag}"))
        .args(["--mode", "ordered"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap())
}

/// Waits until the output stream holds `count` messages, then stops the run with SIGINT
/// (NATS input has no end) and returns its stderr.
pub fn finish(
    rt: &tokio::runtime::Runtime,
    js: &jetstream::Context,
    tag: &str,
    count: u64,
    mut child: Run,
) -> String {
    let started = Instant::now();
    while rt.block_on(stored(js, tag)) < count {
        if started.elapsed() > Duration::from_secs(120) {
            let held = rt.block_on(stored(js, tag));
            let stderr = interrupt(child);
            panic!("the output stream holds {held} of {count}; the run said:\n{stderr}");
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    interrupt(child)
}

/// Stops a run with SIGINT and returns its stderr, checking that it drained and summarised.
pub fn interrupt(mut child: Run) -> String {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if stopping.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
            panic!("the run did not stop within 30 s of SIGINT: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    // Drained and summarised; a signal's exit status, as for any interrupted run.
    assert_eq!(status.code(), Some(130), "{stderr}");
    stderr
}

/// A runtime for the test's own client, and that client's JetStream context on `url`.
pub fn client(url: &str) -> (tokio::runtime::Runtime, jetstream::Context) {
    let rt = runtime();
    let js = rt.block_on(async { jetstream::new(async_nats::connect(url).await.unwrap()) });
    (rt, js)
}

/// Deletes the streams `IN_<tag>`, `OUT_<tag>` and those named in `more`.
pub fn drop_streams(
    rt: &tokio::runtime::Runtime,
    js: &jetstream::Context,
    tag: &str,
    more: &[String],
) {
    rt.block_on(async {
        for name in [format!("IN_{tag}"), format!("OUT_{tag}")]
            .iter()
            .chain(more)
        {
            let _ = js.delete_stream(name).await;
        }
    });
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A `nats-server -js` of the test's own, on a free port with its store in a scratch
/// directory, that the test can kill and start again (the store survives). `None`, saying so,
/// where the binary is not installed (a failure under SLUICE_REQUIRE_NATS=1).
pub struct OwnServer {
    pub url: String,
    port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnServer {
    pub fn start() -> Option<OwnServer> {
        let installed = Command::new("nats-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            if std::env::var("SLUICE_REQUIRE_NATS").is_ok_and(|v| v == "1") {
                panic!("SLUICE_REQUIRE_NATS=1 but nats-server is not installed");
            }
            eprintln!("SKIPPED: nats-server is not installed");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = OwnServer {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            store: tempfile::tempdir().unwrap(),
            child: None,
        };
        server.restart();
        Some(server)
    }

    /// Starts the server (again), and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the server ends mid-write, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}
