//! `sluice enrich` from a JetStream stream to another, the real binary against the real NATS
//! server (`NATS_URL` or 127.0.0.1:4222; skipped, saying so, where none answers): every message
//! enriched once and in input order (ordered mode, two shards); and a run killed with SIGKILL
//! again and again at random moments, then run to the end: the output stream holds every input
//! exactly once, in order. Lookups go to the embedded loadgen server (a RESP server over TCP).

mod real_nats;

use async_nats::jetstream;
use futures::StreamExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Input stream `IN_<tag>` on subject `in.<tag>` holding `count` records, and an empty output
/// stream `OUT_<tag>` on `out.<tag>` with a duplicate window of 10 minutes.
async fn streams(js: &jetstream::Context, tag: &str, count: u64) {
    for name in [format!("IN_{tag}"), format!("OUT_{tag}")] {
        let _ = js.delete_stream(&name).await;
    }
    js.create_stream(jetstream::stream::Config {
        name: format!("IN_{tag}"),
        subjects: vec![format!("in.{tag}")],
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
        let record = format!(r#"{{"n":{n},"user_id":"user_{:06}"}}"#, n * 7 % 1000);
        acks.push(
            js.publish(format!("in.{tag}"), record.into())
                .await
                .unwrap(),
        );
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

async fn stored(js: &jetstream::Context, tag: &str) -> u64 {
    let mut stream = js.get_stream(format!("OUT_{tag}")).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// The output stream's records' `n`, in stored order; each must be enriched.
async fn outputs(js: &jetstream::Context, tag: &str, count: u64) -> Vec<u64> {
    let stream = js.get_stream(format!("OUT_{tag}")).await.unwrap();
    let reader = stream
        .create_consumer(jetstream::consumer::pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut ns = vec![];
    while (ns.len() as u64) < count {
        let mut batch = reader
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        let before = ns.len();
        while let Some(m) = batch.next().await {
            let record: serde_json::Value = serde_json::from_slice(&m.unwrap().payload).unwrap();
            assert!(record.get("segment").is_some(), "not enriched: {record}");
            ns.push(record["n"].as_u64().unwrap());
        }
        if ns.len() == before {
            break;
        }
    }
    ns
}

fn enrich(url: &str, tag: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["enrich", "--loadgen", "--key", "user:{user_id}"])
        .arg("--input")
        .arg(format!("{url}/IN_{tag}?consumer=enrich"))
        .arg("--output")
        .arg(format!("{url}/out.{tag}"))
        .args(["--mode", "ordered"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the output stream holds `count` messages, then stops the run with SIGINT
/// (NATS input has no end) and returns its stderr.
fn finish(
    rt: &tokio::runtime::Runtime,
    js: &jetstream::Context,
    tag: &str,
    count: u64,
    mut child: Child,
) -> String {
    let started = Instant::now();
    while rt.block_on(stored(js, tag)) < count {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the output stream holds {} of {count}",
            rt.block_on(stored(js, tag))
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn stream_to_stream_enriches_every_message_once_in_order() {
    let Some(url) = real_nats::nats_url() else {
        return;
    };
    let rt = runtime();
    let tag = format!("once{}", std::process::id());
    let js = rt.block_on(async { jetstream::new(async_nats::connect(&url).await.unwrap()) });
    rt.block_on(streams(&js, &tag, 3000));
    let child = enrich(&url, &tag, &["--shards", "2", "--capacity", "64"]);
    let stderr = finish(&rt, &js, &tag, 3000, child);
    eprintln!("{stderr}");
    assert!(
        stderr.contains("3000 published (0 duplicates") && stderr.contains("3000 acknowledged"),
        "{stderr}"
    );
    let ns = rt.block_on(outputs(&js, &tag, 3000));
    assert_eq!(ns, (0..3000).collect::<Vec<_>>());
    // Run again: everything was acknowledged, so nothing is delivered or published.
    let child = enrich(&url, &tag, &["--shards", "1"]);
    std::thread::sleep(Duration::from_millis(1500));
    let stderr = finish(&rt, &js, &tag, 3000, child);
    assert!(stderr.contains("nats: 0 delivered"), "{stderr}");
    rt.block_on(async {
        for name in [format!("IN_{tag}"), format!("OUT_{tag}")] {
            let _ = js.delete_stream(&name).await;
        }
    });
}

#[test]
fn killed_again_and_again_the_output_stream_holds_every_input_once() {
    let Some(url) = real_nats::nats_url() else {
        return;
    };
    const COUNT: u64 = 6000;
    let rt = runtime();
    let tag = format!("kill{}", std::process::id());
    let js = rt.block_on(async { jetstream::new(async_nats::connect(&url).await.unwrap()) });
    rt.block_on(streams(&js, &tag, COUNT));
    let slow = [
        "--shards",
        "2",
        "--capacity",
        "4",
        "--loadgen-latency",
        "25ms",
    ];
    let mut rng = fastrand::Rng::with_seed(20);
    let mut kills = 0;
    while kills < 20 {
        let mut child = enrich(&url, &tag, &slow);
        // A run needs a few hundred milliseconds to start: most kills land mid-run.
        std::thread::sleep(Duration::from_millis(rng.u64(300..1200)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    let before = rt.block_on(stored(&js, &tag));
    assert!(
        before < COUNT,
        "the kills came too late to test anything ({before} stored)"
    );
    let child = enrich(&url, &tag, &slow);
    let stderr = finish(&rt, &js, &tag, COUNT, child);
    eprintln!("after {kills} kills ({before} stored before the last run):\n{stderr}");
    // A little longer: anything still in flight would show as an extra message.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rt.block_on(stored(&js, &tag)), COUNT);
    let ns = rt.block_on(outputs(&js, &tag, COUNT));
    assert_eq!(
        ns,
        (0..COUNT).collect::<Vec<_>>(),
        "exactly once, in input order"
    );
    rt.block_on(async {
        for name in [format!("IN_{tag}"), format!("OUT_{tag}")] {
            let _ = js.delete_stream(&name).await;
        }
    });
}
