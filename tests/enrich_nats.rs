//! `sluice enrich` from a JetStream stream to another, the real binary against the real NATS
//! server (`NATS_URL` or 127.0.0.1:4222; skipped, saying so, where none answers): every message
//! enriched once and in input order (ordered mode, two shards); and a run killed with SIGKILL
//! again and again at random moments, then run to the end: the output stream holds every input
//! exactly once, in order. Lookups go to the embedded loadgen server (a RESP server over TCP).

mod real_nats;

use async_nats::jetstream;
use real_nats::{enrich, finish, outputs, stored, streams};
use std::time::{Duration, Instant};

#[test]
fn stream_to_stream_enriches_every_message_once_in_order() {
    let Some(url) = real_nats::nats_url() else {
        return;
    };
    let tag = format!("once{}", std::process::id());
    let (rt, js) = real_nats::client(&url);
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
    real_nats::drop_streams(&rt, &js, &tag, &[]);
}

#[test]
fn killed_again_and_again_the_output_stream_holds_every_input_once() {
    let Some(url) = real_nats::nats_url() else {
        return;
    };
    const COUNT: u64 = 6000;
    let tag = format!("kill{}", std::process::id());
    let (rt, js) = real_nats::client(&url);
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
    real_nats::drop_streams(&rt, &js, &tag, &[]);
}

#[test]
fn the_nats_server_restarted_mid_run_loses_nothing() {
    let Some(mut server) = real_nats::OwnServer::start() else {
        return;
    };
    const COUNT: u64 = 4000;
    let url = server.url.clone();
    let tag = "restart";
    let (rt, js) = real_nats::client(&url);
    rt.block_on(streams(&js, tag, COUNT));
    let child = enrich(
        &url,
        tag,
        &[
            "--shards",
            "2",
            "--capacity",
            "16",
            "--loadgen-latency",
            "2ms",
        ],
    );
    // Mid-run: some outputs stored, most not.
    let started = Instant::now();
    let mut before = 0;
    while before < COUNT / 10 {
        before = rt.block_on(stored(&js, tag));
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();
    assert!(before < COUNT, "the restart came too late to test anything");
    std::thread::sleep(Duration::from_millis(1500));
    server.restart();
    let stderr = finish(&rt, &js, tag, COUNT, child);
    eprintln!("server killed with {before} of {COUNT} stored:\n{stderr}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rt.block_on(stored(&js, tag)), COUNT);
    let mut ns = rt.block_on(outputs(&js, tag, COUNT));
    // A publish retried while the server was down may be stored after later ones.
    let moved = ns.windows(2).filter(|w| w[0] > w[1]).count();
    eprintln!("{moved} outputs stored after a later one");
    ns.sort_unstable();
    assert_eq!(
        ns,
        (0..COUNT).collect::<Vec<_>>(),
        "every input exactly once"
    );
}

/// A group's run is over: (after a moment, for anything still in flight) the output stream
/// holds every input once, and each key's records in input order. Then the streams and the
/// group's bucket go.
fn group_output_is_exact(
    rt: &tokio::runtime::Runtime,
    js: &jetstream::Context,
    tag: &str,
    count: u64,
) {
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rt.block_on(stored(js, tag)), count);
    let ns = rt.block_on(outputs(js, tag, count));
    let mut sorted = ns.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..count).collect::<Vec<_>>(), "every input once");
    let mut last = std::collections::HashMap::new();
    for &n in &ns {
        let user = real_nats::user_of(n);
        if let Some(previous) = last.insert(user, n) {
            assert!(
                previous < n,
                "user {user}: record {n} stored after {previous}"
            );
        }
    }
    real_nats::drop_streams(rt, js, tag, &[format!("KV_sluice_group_{tag}")]);
}

/// The leases a group member's summary says it took.
fn leases_taken(stderr: &str) -> u64 {
    assert!(stderr.contains("group: held up to "), "{stderr}");
    let at = stderr.find(" leases taken").expect("a group line");
    stderr[..at].rsplit(' ').next().unwrap().parse().unwrap()
}

/// Three processes share six partitions; one is killed for good mid-run. Its partitions are
/// taken over by the other two (their leases expire after 3 lease periods), the output stream
/// holds every input once, and each key's records are stored in input order.
#[test]
fn three_processes_share_six_partitions_and_one_dies() {
    let Some(url) = real_nats::nats_url() else {
        return;
    };
    const COUNT: u64 = 6000;
    let tag = format!("group{}", std::process::id());
    let (rt, js) = real_nats::client(&url);
    rt.block_on(real_nats::partitioned_streams(&js, &tag, COUNT, 6));
    let input = format!("{url}/IN_{tag}?consumer=enrich&group={tag}&partitions=6&lease=500ms");
    let slow = ["--capacity", "8", "--loadgen-latency", "5ms"];
    let mut members: Vec<_> = (0..3)
        .map(|_| real_nats::enrich_from(&input, &url, &tag, &slow))
        .collect();
    let started = Instant::now();
    let mut before = 0;
    while before < COUNT / 4 {
        before = rt.block_on(stored(&js, &tag));
        let ended = members.iter_mut().any(|m| m.try_wait().unwrap().is_some());
        if ended || started.elapsed() > Duration::from_secs(60) {
            for mut m in members {
                let _ = m.kill();
                let stderr = std::io::read_to_string(m.stderr.take().unwrap()).unwrap();
                eprintln!("a member said:\n{stderr}");
            }
            panic!("{before} stored, a member ended or 60 s passed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut dead = members.remove(0);
    // The partitions it leased (a member's name holds its process id).
    let pid = format!("-{}-", dead.id());
    let held = rt.block_on(async {
        let leases = js
            .get_key_value(format!("sluice_group_{tag}"))
            .await
            .unwrap();
        let mut held = vec![];
        for p in 0..6 {
            if let Some(owner) = leases.get(format!("partition.{p}")).await.unwrap() {
                if String::from_utf8_lossy(&owner).contains(&pid) {
                    held.push(p);
                }
            }
        }
        held
    });
    assert!(!held.is_empty(), "the member to kill leased no partition");
    dead.kill().unwrap(); // SIGKILL, not started again
    dead.wait().unwrap();
    assert!(before < COUNT, "the kill came too late to test anything");
    while rt.block_on(stored(&js, &tag)) < COUNT {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the output stream holds {} of {COUNT}",
            rt.block_on(stored(&js, &tag))
        );
        for m in &mut members {
            assert!(m.try_wait().unwrap().is_none(), "a member ended early");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let stderrs: Vec<String> = members.into_iter().map(real_nats::interrupt).collect();
    let taken: u64 = stderrs.iter().map(|e| leases_taken(e)).sum();
    eprintln!(
        "killed holding partitions {held:?} with {before} of {COUNT} stored\n{}",
        stderrs.join("\n")
    );
    assert!(
        taken >= 6,
        "the dead member's partitions {held:?} were not taken over ({taken} leases taken)"
    );
    group_output_is_exact(&rt, &js, &tag, COUNT);
}

/// Bad records dead-lettered to a subject of another stream: each input is in the output
/// stream or the dead-letter stream, once, and every input is acknowledged (a second run
/// reads nothing). A dead-letter file, or a subject no stream captures, is refused at start.
#[test]
fn dead_letters_go_to_a_stream_and_are_acknowledged_with_it() {
    let Some(url) = real_nats::nats_url() else {
        return;
    };
    const COUNT: u64 = 1000;
    let tag = format!("dead{}", std::process::id());
    let (rt, js) = real_nats::client(&url);
    rt.block_on(async {
        streams(&js, &tag, 0).await;
        let _ = js.delete_stream(format!("DL_{tag}")).await;
        js.create_stream(jetstream::stream::Config {
            name: format!("DL_{tag}"),
            subjects: vec![format!("dl.{tag}")],
            ..Default::default()
        })
        .await
        .unwrap();
        for n in 0..COUNT {
            // Every tenth record has no key field: a bad record.
            let record = if n % 10 == 3 {
                format!(r#"{{"n":{n}}}"#)
            } else {
                format!(r#"{{"n":{n},"user_id":"user_{:06}"}}"#, n % 100)
            };
            js.publish(format!("in.{tag}"), record.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let dead_letter = format!("{url}/dl.{tag}");
    let refused = |target: &str, says: &str| {
        let mut child = enrich(&url, &tag, &["--on-bad-record", "dead-letter", target]);
        let status = child.wait().unwrap();
        let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
        assert!(!status.success(), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    };
    refused("bad.jsonl", "dead letters go to a subject");
    refused(&format!("{url}/nowhere.{tag}"), &format!("nowhere.{tag}"));
    let dead_letters = ["--on-bad-record", "dead-letter", &dead_letter];
    let child = enrich(
        &url,
        &tag,
        &[&dead_letters[..], &["--shards", "2"]].concat(),
    );
    let started = Instant::now();
    let dead = |js: &jetstream::Context| {
        rt.block_on(async {
            let mut s = js.get_stream(format!("DL_{tag}")).await.unwrap();
            s.info().await.unwrap().state.messages
        })
    };
    while dead(&js) < COUNT / 10 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "dead letters missing"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stderr = finish(&rt, &js, &tag, COUNT - COUNT / 10, child);
    assert!(
        stderr.contains(&format!("{COUNT} acknowledged")),
        "{stderr}"
    );
    assert_eq!(dead(&js), COUNT / 10);
    let ns = rt.block_on(outputs(&js, &tag, COUNT - COUNT / 10));
    let expected: Vec<u64> = (0..COUNT).filter(|n| n % 10 != 3).collect();
    assert_eq!(ns, expected, "the good records once, in order");
    let letters = rt.block_on(real_nats::records(&js, &format!("DL_{tag}"), COUNT / 10));
    let bad: Vec<u64> = letters
        .iter()
        .map(|letter| {
            assert!(
                letter["error"].as_str().unwrap().contains("user_id"),
                "{letter}"
            );
            let input: serde_json::Value =
                serde_json::from_str(letter["input"].as_str().unwrap()).unwrap();
            input["n"].as_u64().unwrap()
        })
        .collect();
    let expected: Vec<u64> = (0..COUNT).filter(|n| n % 10 == 3).collect();
    assert_eq!(bad, expected, "the bad records once, in order");
    // Run again: everything was acknowledged.
    let child = enrich(&url, &tag, &dead_letters);
    std::thread::sleep(Duration::from_millis(1500));
    let stderr = real_nats::interrupt(child);
    assert!(stderr.contains("nats: 0 delivered"), "{stderr}");
    real_nats::drop_streams(&rt, &js, &tag, &[format!("DL_{tag}")]);
}

/// Two processes share four partitions; one is stopped (SIGSTOP) for longer than its leases
/// last, and the other takes its partitions. When it goes on (SIGCONT) its leases have lapsed:
/// it publishes nothing more for them (its outputs in flight are fenced) and acknowledges
/// nothing for them. The output stream holds every input once, each key in input order.
#[test]
fn a_stopped_member_is_fenced_when_it_goes_on() {
    let Some(url) = real_nats::nats_url() else {
        return;
    };
    const COUNT: u64 = 4000;
    let tag = format!("fence{}", std::process::id());
    let (rt, js) = real_nats::client(&url);
    rt.block_on(real_nats::partitioned_streams(&js, &tag, COUNT, 4));
    let input = format!("{url}/IN_{tag}?consumer=enrich&group={tag}&partitions=4&lease=300ms");
    let slow = ["--capacity", "8", "--loadgen-latency", "5ms"];
    let mut members: Vec<_> = (0..2)
        .map(|_| real_nats::enrich_from(&input, &url, &tag, &slow))
        .collect();
    let started = Instant::now();
    while rt.block_on(stored(&js, &tag)) < COUNT / 5 {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopped = members[0].id() as i32;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(stopped, libc::SIGSTOP) };
    // Longer than the TTL (3 x 300 ms) and the other's next ticks.
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: as above.
    unsafe { libc::kill(stopped, libc::SIGCONT) };
    while rt.block_on(stored(&js, &tag)) < COUNT {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the output stream holds {} of {COUNT}",
            rt.block_on(stored(&js, &tag))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stderrs: Vec<String> = members.drain(..).map(real_nats::interrupt).collect();
    eprintln!("{}", stderrs.join("\n"));
    assert!(
        leases_taken(&stderrs[1]) >= 4,
        "the other member did not take the stopped one's partitions:\n{}",
        stderrs[1]
    );
    group_output_is_exact(&rt, &js, &tag, COUNT);
}
