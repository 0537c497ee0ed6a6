//! The benchmark harness end to end on a tiny sweep against the embedded server: every mode
//! produces a point, the derived columns are consistent with the measurements, and the JSON
//! and SVG outputs are written and well formed. (No timing assertions: figures are for
//! docs/benchmarks.md, measured with the full harness.)

use loadgen::{LatencyModel, Server, ServerConfig};
use sluice::bench::{self, Mode, SweepConfig};
use std::time::Duration;

#[test]
fn a_small_sweep_reports_every_mode_and_writes_json_and_svg() {
    let server = Server::start(ServerConfig {
        keys: 1_000,
        latency: LatencyModel::Fixed(Duration::from_millis(1)),
        ..Default::default()
    })
    .unwrap();
    let round_trip = bench::probe_round_trip(server.addr(), 1_000, false)
        .unwrap()
        .best_batch;
    assert!(
        round_trip >= Duration::from_millis(1),
        "the server's delay is in the round trip"
    );
    let config = SweepConfig {
        addr: server.addr(),
        server: "test".into(),
        configured_latency: Some(Duration::from_millis(1)),
        keys: 1_000,
        modes: Mode::ALL.to_vec(),
        shards: vec![1, 2],
        capacities: vec![1, 8],
        duration: Duration::from_millis(100),
        records: None,
        repeat: 2,
        seed: 1,
        client: Default::default(),
        pin: true,
        distribution: loadgen::KeyDistribution::Uniform,
        layer: Default::default(),
        http: false,
    };
    let mut calls = 0;
    let report = bench::sweep(&config, 1e9, round_trip, &mut |_, _, _| calls += 1).unwrap();
    // sync-map once per shard count; the others at both capacities.
    let others = Mode::ALL.len() - 1;
    assert_eq!(report.points.len(), 2 * (1 + others * 2));
    assert_eq!(
        calls,
        2 * report.points.len() + 1,
        "progress before each run and at the end"
    );
    for p in &report.points {
        assert!(p.records > 0 && p.rps > 0.0, "{p:?}");
        assert_eq!(p.repeats, 2);
        // (The caching baseline answers repeated keys without the server.)
        assert!(
            p.p50_us >= 1_000 || p.mode == "tokio-cached-unordered",
            "every lookup waited for the server: {p:?}"
        );
        assert!(p.p50_us <= p.p99_us && p.p99_us <= p.p999_us);
        let expected_ideal = p.in_flight as f64 / round_trip.as_secs_f64();
        assert!((p.ideal_rps - expected_ideal).abs() < 1e-6 * expected_ideal);
        assert!((p.efficiency - p.rps / p.ideal_rps).abs() < 1e-9);
        assert!(p.cpu_us_per_record > 0.0);
        // Every tokio mode ran at every point: each point has its ratio, and the tokio modes'
        // own are at least 1 (each repeat divides by the cheapest of them).
        let ratio = p
            .cpu_vs_tokio
            .expect("the tokio baseline ran at every point");
        assert!(ratio > 0.0, "{p:?}");
        if p.mode.starts_with("tokio") && p.mode != "tokio-cached-unordered" {
            assert!(ratio >= 1.0 - 1e-9, "{p:?}");
        }
    }
    let sync = report
        .points
        .iter()
        .find(|p| p.mode == "sync-map" && p.shards == 1)
        .unwrap();
    assert_eq!(sync.speedup_vs_sync_map, Some(1.0));
    let ordered8 = report
        .points
        .iter()
        .find(|p| p.mode == "ordered" && p.shards == 2 && p.capacity == 8)
        .unwrap();
    assert_eq!(ordered8.in_flight, 16);

    let dir = std::env::temp_dir().join(format!("sluice-bench-test-{}", std::process::id()));
    let (json, svg) = (dir.join("r.json"), dir.join("c.svg"));
    bench::write_json(&report, &json).unwrap();
    bench::write_svg(&report, &svg).unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let points = parsed["points"].as_array().unwrap();
    assert_eq!(points.len(), report.points.len());
    // The client settings the sluice modes ran with are part of the report.
    let split = sluice::redis::ClientConfig::default().reply_split;
    assert_eq!(parsed["reply_split"], serde_json::json!(split));
    assert_eq!(parsed["pinned"], serde_json::json!(true));
    let connections = sluice::redis::ClientConfig::default().connections;
    assert_eq!(parsed["connections"], serde_json::json!(connections));
    for key in [
        "mode",
        "shards",
        "capacity",
        "latency_ms",
        "records",
        "rps",
        "ideal_rps",
        "p50_us",
        "p99_us",
        "p999_us",
        "cpu_us_per_record",
        "cpu_vs_tokio",
    ] {
        assert!(points[0].get(key).is_some(), "JSON point lacks `{key}`");
    }
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(
        chart.starts_with("<svg") && chart.contains("key-ordered") && chart.contains("sync-map")
    );
    let table = report.table();
    assert!(table.contains("tokio-unordered") && table.contains("records/s"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_record_budget_runs_exactly_that_many_lookups_per_point() {
    let server = Server::start(ServerConfig {
        keys: 100,
        latency: LatencyModel::Fixed(Duration::ZERO),
        ..Default::default()
    })
    .unwrap();
    let config = SweepConfig {
        addr: server.addr(),
        server: "test".into(),
        configured_latency: None,
        keys: 100,
        modes: Mode::ALL.to_vec(),
        shards: vec![2],
        capacities: vec![4],
        duration: Duration::from_secs(3600),
        records: Some(333),
        repeat: 1,
        seed: 1,
        client: Default::default(),
        pin: true,
        distribution: loadgen::KeyDistribution::Uniform,
        layer: Default::default(),
        http: false,
    };
    let report = bench::sweep(&config, 1e9, Duration::from_micros(50), &mut |_, _, _| {}).unwrap();
    assert_eq!(report.points.len(), Mode::ALL.len());
    for p in &report.points {
        assert_eq!(
            p.records, 333,
            "{}: the budget is shared by the point's workers",
            p.mode
        );
    }
}

/// With batching, coalescing and a cache on skewed keys, the sluice modes send fewer requests
/// than records, and say so; the caching tokio baseline runs beside them.
#[test]
fn the_lookup_layer_shows_in_the_report() {
    use sluice::lookup::{CacheConfig, Eviction, LayerConfig};
    let server = Server::start(ServerConfig {
        keys: 10_000,
        latency: LatencyModel::Fixed(Duration::from_millis(1)),
        ..Default::default()
    })
    .unwrap();
    let layer = LayerConfig {
        batch_size: std::num::NonZeroUsize::new(16).unwrap(),
        cache: Some(CacheConfig {
            entries: std::num::NonZeroUsize::new(1_000).unwrap(),
            max_bytes: 1 << 24,
            ttl: Duration::from_secs(60),
            missing_ttl: None,
            eviction: Eviction::ClockPro,
        }),
        ..LayerConfig::default()
    };
    let config = SweepConfig {
        addr: server.addr(),
        server: "test".into(),
        configured_latency: Some(Duration::from_millis(1)),
        keys: 10_000,
        modes: vec![
            Mode::Unordered,
            Mode::AdapterUnordered,
            Mode::TokioCachedUnordered,
        ],
        shards: vec![1],
        capacities: vec![64],
        duration: Duration::from_millis(300),
        records: None,
        repeat: 1,
        seed: 1,
        client: Default::default(),
        pin: false,
        distribution: loadgen::KeyDistribution::Zipf(1.0),
        layer,
        http: false,
    };
    let report = bench::sweep(&config, 1e9, Duration::from_millis(1), &mut |_, _, _| {}).unwrap();
    assert_eq!(report.key_distribution.as_deref(), Some("zipf:1"));
    assert!(report
        .lookup_layer
        .as_deref()
        .unwrap()
        .contains("batches of up to 16"));
    for p in &report.points {
        assert!(p.records > 0, "{p:?}");
        if p.mode == "tokio-cached-unordered" {
            assert_eq!(
                p.requests_per_record, None,
                "a baseline has no layer figures"
            );
            continue;
        }
        let hits = p.cache_hit_ratio.unwrap();
        let requests = p.requests_per_record.unwrap();
        assert!(hits > 0.3, "zipf(1) over 10k keys with 1k cached: {p:?}");
        assert!(requests < 0.5 * (1.0 - hits), "batched: {p:?}");
        assert!(p.keys_per_request.unwrap() > 1.0, "{p:?}");
    }
    assert!(report.table().contains("req/r"));
}

/// Under a random delay the probe reports the median of all its lookups beside the smallest
/// batch median (which is biased low there): uniform 1-3 ms has a 2 ms median.
#[test]
fn the_round_trip_probe_reports_the_median_of_all_lookups() {
    let server = Server::start(ServerConfig {
        keys: 1_000,
        latency: "uniform:1ms:3ms".parse::<LatencyModel>().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let probed = bench::probe_round_trip(server.addr(), 1_000, false).unwrap();
    assert!(
        probed.overall >= Duration::from_micros(1_800),
        "the median of 500 delays of 1-3 ms: {probed:?}"
    );
    assert!(probed.best_batch <= probed.overall, "{probed:?}");
}

/// Count flags of `sluice bench` below 1 are refused before anything starts, naming the flag.
#[test]
fn count_flags_below_one_are_refused_by_name() {
    let cases = [
        ("bench", "--reply-split"),
        ("bench", "--connections"),
        ("bench", "--keys"),
        ("enrich", "--capacity"),
        ("enrich", "--shards"),
    ];
    for (command, flag) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([command, flag, "0"])
            .args(
                ["--loadgen", "--key", "{k}"]
                    .iter()
                    .filter(|_| command == "enrich"),
            )
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(flag) && stderr.contains("0 is not in 1.."),
            "{flag}: {stderr}"
        );
    }
}

/// Against loadgen's HTTP mode every mode runs over HTTP (the blocking baselines, the tokio
/// ones through reqwest, sluice's modes), every lookup waiting for the server.
#[test]
fn a_sweep_over_http_runs_every_mode() {
    let server = Server::start(ServerConfig {
        keys: 1_000,
        latency: LatencyModel::Fixed(Duration::from_millis(1)),
        http: true,
        ..Default::default()
    })
    .unwrap();
    let round_trip = bench::probe_round_trip(server.addr(), 1_000, true)
        .unwrap()
        .best_batch;
    assert!(round_trip >= Duration::from_millis(1));
    let modes = Mode::ALL.to_vec();
    let config = SweepConfig {
        addr: server.addr(),
        server: "test http".into(),
        configured_latency: Some(Duration::from_millis(1)),
        keys: 1_000,
        modes: modes.clone(),
        shards: vec![1],
        capacities: vec![4],
        duration: Duration::from_millis(200),
        records: None,
        repeat: 1,
        seed: 1,
        client: Default::default(),
        pin: true,
        distribution: loadgen::KeyDistribution::Uniform,
        layer: Default::default(),
        http: true,
    };
    let report = bench::sweep(&config, 1e9, round_trip, &mut |_, _, _| {}).unwrap();
    assert_eq!(report.points.len(), modes.len());
    for p in &report.points {
        assert!(p.records > 0, "{p:?}");
        assert!(
            p.p50_us >= 1_000 || p.mode == "tokio-cached-unordered",
            "every lookup waited for the server: {p:?}"
        );
    }
}

/// The Redis client's settings do nothing over HTTP: asking for them there is refused by name,
/// before anything runs.
#[test]
fn redis_client_flags_are_refused_over_http() {
    // 3 is neither flag's default (1 connection, a reply split of 4).
    for flag in ["--connections", "--reply-split"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["bench", "--backend", "http", flag, "3"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(flag) && stderr.contains("--backend http"),
            "{stderr}"
        );
    }
}
