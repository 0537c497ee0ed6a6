//! Redis Cluster: a 3-master cluster this test starts on private ports (`redis-server
//! --cluster-enabled yes`, `redis-cli --cluster create`). Lookups through the lookup layer,
//! batched, reach each key's node; a slot migrated during the run is followed through `ASK`
//! (while it migrates) and `MOVED` (once it moved). Skipped (saying so) when `redis-server` is
//! missing, unless SLUICE_REQUIRE_REDIS=1.

mod real_redis;

use bytes::Bytes;
use futures::future::join_all;
use real_redis::{enrich_files, free_port, redis_server_installed};
use sluice::lookup::{LayerConfig, Lookups};
use sluice::redis::cluster::{key_slot, RedisCluster};
use sluice::redis::{ClientConfig, Endpoint};
use std::io::Write;
use std::net::TcpListener;
use std::num::NonZeroUsize;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

struct Cluster {
    nodes: Vec<(Child, u16)>,
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (child, _) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Cluster {
    /// Node `i` on `port`, with its cluster configuration file (kept across a restart).
    fn spawn_node(&self, i: usize, port: u16) -> Child {
        let conf = self.dir.path().join(format!("nodes-{i}.conf"));
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-config-file"])
            .arg(&conf)
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts")
    }

    /// Starts node `i`, killed before, again on its port with its configuration: its keys are
    /// gone (nothing is saved), its slots are its own again.
    fn start_again(&mut self, i: usize) {
        let port = self.nodes[i].1;
        let child = self.spawn_node(i, port);
        self.nodes[i].0 = child;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
            || !cli(port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
        {
            assert!(Instant::now() < deadline, "node {i} did not come back");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A free port whose cluster bus port (port + 10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 50000 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

fn start_cluster() -> Option<Cluster> {
    if !redis_server_installed() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster {
        nodes: Vec::new(),
        dir,
    };
    for i in 0..3 {
        let port = free_cluster_port();
        let child = cluster.spawn_node(i, port);
        cluster.nodes.push((child, port));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (_, port) in &cluster.nodes {
        while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
            assert!(Instant::now() < deadline, "a node did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let addrs: Vec<String> = cluster
        .nodes
        .iter()
        .map(|(_, p)| format!("127.0.0.1:{p}"))
        .collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create runs");
    assert!(out.status.success(), "{out:?}");
    for (_, port) in &cluster.nodes {
        while !cli(*port, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
            assert!(Instant::now() < deadline, "the cluster did not settle");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Some(cluster)
}

fn run<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
    f: impl FnOnce() -> F + Send + 'static,
) -> T {
    glommio::LocalExecutorBuilder::default()
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

const KEYS: usize = 500;

fn key(i: usize) -> String {
    format!("user:{i}")
}

/// Runs `commands` through `redis-cli -c` at the node on `port` (it follows redirections).
fn write_through(port: u16, commands: &[String]) {
    let mut cli = Command::new("redis-cli")
        .args(["-c", "-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = cli.stdin.take().unwrap();
    for c in commands {
        writeln!(stdin, "{c}").unwrap();
    }
    drop(stdin);
    assert!(cli.wait().unwrap().success());
}

/// The node owning `slot`, and its id.
fn owner(cluster: &Cluster, slot: u16) -> (u16, String) {
    let port = cluster.nodes[0].1;
    let nodes = cli(port, &["CLUSTER", "NODES"]);
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        for range in &fields[8..] {
            let (start, end) = match range.split_once('-') {
                Some((s, e)) => (s.parse::<u16>().unwrap(), e.parse::<u16>().unwrap()),
                None => match range.parse::<u16>() {
                    Ok(s) => (s, s),
                    Err(_) => continue, // a migration marker
                },
            };
            if (start..=end).contains(&slot) {
                let port = fields[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
                return (port, fields[0].to_string());
            }
        }
    }
    panic!("no owner of slot {slot}");
}

#[test]
fn batched_lookups_reach_each_node_and_follow_a_migrating_slot() {
    let Some(cluster) = start_cluster() else {
        return;
    };
    let first = cluster.nodes[0].1;
    let commands: Vec<String> = (0..KEYS).map(|i| format!("SET {} v{i}", key(i))).collect();
    write_through(first, &commands);

    // The slot of key 0, and where it will move.
    let slot = key_slot(key(0).as_bytes());
    let (source, source_id) = owner(&cluster, slot);
    let (target, target_id) = cluster
        .nodes
        .iter()
        .map(|(_, p)| *p)
        .find(|p| *p != source)
        .map(|p| (p, cli(p, &["CLUSTER", "MYID"])))
        .unwrap();
    let (slot_s, in_slot): (String, Vec<usize>) = (
        slot.to_string(),
        (0..KEYS)
            .filter(|&i| key_slot(key(i).as_bytes()) == slot)
            .collect(),
    );
    let ports: Vec<u16> = cluster.nodes.iter().map(|(_, p)| *p).collect();

    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let lookups_thread = std::thread::spawn(move || {
        run(move || async move {
            let seed = Endpoint::parse(&format!("redis://127.0.0.1:{first}")).unwrap();
            let layer = LayerConfig {
                batch_size: NonZeroUsize::new(16).unwrap(),
                capacity: NonZeroUsize::new(256),
                ..LayerConfig::default()
            };
            let lookups = Rc::new(Lookups::new(
                RedisCluster::new(seed, &ClientConfig::default()),
                layer,
            ));
            let check = |lookups: Rc<Lookups<RedisCluster>>| async move {
                let keys: Vec<String> = (0..KEYS).map(key).collect();
                let answers = join_all(keys.iter().map(|k| lookups.get(k.as_bytes()))).await;
                for (i, a) in answers.into_iter().enumerate() {
                    assert_eq!(a.unwrap(), Some(Bytes::from(format!("v{i}"))), "key {i}");
                }
            };
            check(lookups.clone()).await;
            assert_eq!(lookups.backend().nodes().len(), 3, "every node reached");
            let batched = lookups.stats();
            assert!(batched.keys_per_request() > 1.0, "{batched:?}");
            // The slot is migrating, its keys already on the target: ASK.
            done_tx.send(()).unwrap();
            rx.recv().unwrap();
            check(lookups.clone()).await;
            let (moved, asked, _) = lookups.backend().redirections();
            assert!(asked >= 1 && moved == 0, "asked {asked}, moved {moved}");
            // The slot moved: MOVED, and the map is read again.
            done_tx.send(()).unwrap();
            rx.recv().unwrap();
            check(lookups.clone()).await;
            let (moved, _, refreshes) = lookups.backend().redirections();
            assert!(
                moved >= 1 && refreshes >= 2,
                "moved {moved}, refreshes {refreshes}"
            );
        })
    });

    done_rx.recv().unwrap();
    cli(
        target,
        &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &source_id],
    );
    cli(
        source,
        &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &target_id],
    );
    let mut migrate = vec![
        "MIGRATE".to_string(),
        "127.0.0.1".into(),
        target.to_string(),
        String::new(),
        "0".into(),
        "5000".into(),
        "KEYS".into(),
    ];
    migrate.extend(in_slot.iter().map(|&i| key(i)));
    let migrate: Vec<&str> = migrate.iter().map(String::as_str).collect();
    assert_eq!(cli(source, &migrate), "OK");
    tx.send(()).unwrap();
    done_rx.recv().unwrap();
    for port in &ports {
        cli(*port, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &target_id]);
    }
    tx.send(()).unwrap();
    lookups_thread.join().expect("the lookups saw every value");
}

#[test]
fn enrich_finds_a_cluster_by_itself_and_reads_from_every_node() {
    let Some(cluster) = start_cluster() else {
        return;
    };
    let port = cluster.nodes[1].1;
    let commands: Vec<String> = (0..100)
        .flat_map(|i| {
            [
                format!("SET user:{i} '{{\"tier\":\"t{i}\"}}'"),
                format!("HSET profile:{i} tier h{i} zip z{i}"),
            ]
        })
        .collect();
    write_through(port, &commands);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines: String = (0..200).map(|i| format!("{{\"id\":{i}}}\n")).collect();
    std::fs::write(&input, lines).unwrap();
    let output = dir.path().join("out.jsonl");
    let url = format!("redis://127.0.0.1:{port}");
    let sluice = env!("CARGO_BIN_EXE_sluice");
    let extra = ["--batch-size", "8", "--shards", "2"];
    let run = enrich_files(sluice, &url, "user:{id}", &input, &output, &extra);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let out = std::fs::read_to_string(&output).unwrap();
    for (i, line) in out.lines().enumerate() {
        let expected = if i < 100 {
            format!("{{\"id\":{i},\"tier\":\"t{i}\"}}")
        } else {
            format!("{{\"id\":{i}}}")
        };
        assert_eq!(line, expected);
    }
    assert_eq!(out.lines().count(), 200);
    // Hashes, each key's HGETALL (or HMGET) at its slot's node.
    for (value, fields) in [("hash", "tier,zip"), ("hash:zip", "zip")] {
        let extra = ["--value", value, "--batch-size", "8"];
        let run = enrich_files(sluice, &url, "profile:{id}", &input, &output, &extra);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let out = std::fs::read_to_string(&output).unwrap();
        assert_eq!(out.lines().count(), 200);
        for (i, line) in out.lines().enumerate() {
            let expected = match (i < 100, fields) {
                (false, _) => format!("{{\"id\":{i}}}"),
                (true, "zip") => format!("{{\"id\":{i},\"zip\":\"z{i}\"}}"),
                (true, _) => format!("{{\"id\":{i},\"tier\":\"h{i}\",\"zip\":\"z{i}\"}}"),
            };
            assert_eq!(line, expected, "--value {value}");
        }
    }
}

/// A node that dies and comes back: its keys' lookups fail while it is down (the connection's
/// error, for the retry policy) and succeed again once it is back, through the reconnect.
#[test]
fn a_restarted_node_is_reconnected() {
    let Some(mut cluster) = start_cluster() else {
        return;
    };
    let seed = cluster.nodes[0].1;
    let victim = cluster.nodes[2].1;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let lookups_thread = std::thread::spawn(move || {
        run(move || async move {
            let seed = Endpoint::parse(&format!("redis://127.0.0.1:{seed}")).unwrap();
            let cluster = RedisCluster::new(seed, &ClientConfig::default());
            let lookups = Lookups::new(cluster, LayerConfig::default());
            // A key on each node; the value is missing (nothing was written), the point is
            // that each node answers.
            let keys: Vec<String> = (0..60).map(key).collect();
            let all = |lookups: &Lookups<RedisCluster>| {
                let gets: Vec<_> = keys.iter().map(|k| lookups.get(k.as_bytes())).collect();
                join_all(gets)
            };
            assert!(all(&lookups).await.iter().all(|a| a.is_ok()));
            done_tx.send(()).unwrap();
            rx.recv().unwrap(); // the node was killed
            let answers = all(&lookups).await;
            let failed = answers.iter().filter(|a| a.is_err()).count();
            assert!(failed > 0 && failed < answers.len(), "{failed} failed");
            done_tx.send(()).unwrap();
            rx.recv().unwrap(); // the node is back
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if all(&lookups).await.iter().all(|a| a.is_ok()) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the node's keys failed after it came back"
                );
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    done_rx.recv().unwrap();
    let (child, _) = &mut cluster.nodes[2];
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(victim, cluster.nodes[2].1);
    tx.send(()).unwrap();
    done_rx.recv().unwrap();
    cluster.start_again(2);
    tx.send(()).unwrap();
    lookups_thread.join().expect("lookups recovered");
}
