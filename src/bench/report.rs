//! The sweep's results: medians per point, the table, the JSON report and the SVG chart.
//!
//! Owns: presentation. Invariants: every figure comes from the measurements handed in; the
//! JSON schema is the one in `docs/benchmarks.md`.

use super::runners::Measurement;
use super::{Mode, SweepConfig};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// One (mode, shards, capacity) point: medians over its repeats.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub mode: String,
    pub shards: usize,
    pub capacity: usize,
    /// Requests this mode keeps in flight at most.
    pub in_flight: usize,
    /// The server's configured latency (embedded server), else the measured round trip.
    pub latency_ms: f64,
    /// Records completed (median run).
    pub records: u64,
    pub rps: f64,
    /// Little's law, capped by the server's measured limit.
    pub ideal_rps: f64,
    pub efficiency: f64,
    pub speedup_vs_sync_map: Option<f64>,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub cpu_us_per_record: f64,
    /// sluice's modes: median time on the wire (request handed to the socket -> reply read);
    /// `p50_us` minus this is the client's own queueing. Absent in older reports.
    #[serde(default)]
    pub wire_p50_us: Option<u64>,
    /// This mode's CPU per record over the tokio baseline's (the cheapest of `tokio-buffered`,
    /// `tokio-unordered` and `tokio-local-unordered`) at the same shards and capacity, taken within each repeat (the
    /// runs measured side by side), then the median. Absent when no tokio mode ran, and in
    /// older reports.
    #[serde(default)]
    pub cpu_vs_tokio: Option<f64>,
    pub repeats: usize,
    /// sluice's modes: backend requests per record (batching, coalescing and the cache each
    /// lower it), keys per request, cache hits per record and coalesced lookups per record
    /// (median run). Absent for the baselines and in older reports.
    #[serde(default)]
    pub requests_per_record: Option<f64>,
    #[serde(default)]
    pub keys_per_request: Option<f64>,
    #[serde(default)]
    pub cache_hit_ratio: Option<f64>,
    #[serde(default)]
    pub coalesced_ratio: Option<f64>,
    /// The adaptive concurrency limit at the end of the median run, summed over shards.
    #[serde(default)]
    pub limit: Option<u64>,
}

/// Everything a sweep produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The report's layout (`REPORT_SCHEMA_VERSION`); absent (version 1) in older reports.
    #[serde(default = "schema_v1")]
    pub schema_version: u32,
    /// The commit the binary was built from (`-dirty` when tracked files differed); absent in
    /// older reports, empty when built outside a git checkout.
    #[serde(default)]
    pub git_commit: Option<String>,
    /// When the sweep finished (RFC 3339, UTC); absent in older reports.
    #[serde(default)]
    pub measured_at: Option<String>,
    pub server: String,
    pub machine: Machine,
    pub duration_s: f64,
    pub repeat: usize,
    pub round_trip_us: f64,
    pub server_limit_rps: f64,
    /// The sluice modes' `reply_split` (absent in older reports).
    #[serde(default)]
    pub reply_split: Option<usize>,
    /// Whether the sluice modes' shards were pinned (absent in older reports,
    /// which pinned them).
    #[serde(default)]
    pub pinned: Option<bool>,
    /// Connections per shard, for the sluice modes and the tokio baseline alike (absent in
    /// older reports, which used one).
    #[serde(default)]
    pub connections: Option<usize>,
    /// The sluice modes' lookup layer settings, and how keys were drawn (absent in older
    /// reports: no layer, uniform keys).
    #[serde(default)]
    pub lookup_layer: Option<String>,
    #[serde(default)]
    pub key_distribution: Option<String>,
    pub points: Vec<Point>,
}

/// The JSON report's layout: 2 added `schema_version` and `git_commit`; 3 the lookup layer's
/// settings and figures.
pub const REPORT_SCHEMA_VERSION: u32 = 3;

fn schema_v1() -> u32 {
    1
}

/// The commit this binary was built from, if known.
fn built_from() -> Option<String> {
    Some(env!("SLUICE_GIT_COMMIT").to_string()).filter(|c| !c.is_empty())
}

/// Where the figures were measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub memlock_kib: Option<u64>,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split(':').nth(1))
            })
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let memlock_kib = limits
            .lines()
            .find(|l| l.starts_with("Max locked memory"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|b| b / 1024);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel,
            memlock_kib,
        }
    }
}

fn median_by<T: Clone>(items: &[T], key: impl Fn(&T) -> f64) -> T {
    let mut sorted: Vec<&T> = items.iter().collect();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted[sorted.len() / 2].clone()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The tokio baseline's CPU per record at each (shards, capacity), per repeat: the cheapest of
/// its modes. Run `r` of every mode at a point belongs to repeat `r`.
fn tokio_cpu_per_repeat(
    runs: &BTreeMap<(usize, usize, Mode), Vec<Measurement>>,
    cpu: impl Fn(&Measurement) -> f64,
) -> BTreeMap<(usize, usize), Vec<f64>> {
    let mut tokio_cpu: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    for ((shards, capacity, mode), ms) in runs {
        if matches!(
            mode,
            Mode::TokioBuffered
                | Mode::TokioUnordered
                | Mode::TokioLocalUnordered
                | Mode::TokioLocalBuffered
        ) {
            let per_repeat = tokio_cpu.entry((*shards, *capacity)).or_default();
            for (r, m) in ms.iter().enumerate() {
                match per_repeat.get_mut(r) {
                    Some(best) => *best = best.min(cpu(m)),
                    None => per_repeat.push(cpu(m)),
                }
            }
        }
    }
    tokio_cpu
}

impl Report {
    /// Over 70 lines: one `Point` literal with a line per report field, each computed where it
    /// is set, reads better than helpers that each return one field.
    pub(crate) fn from_runs(
        config: &SweepConfig,
        server_limit_rps: f64,
        round_trip: Duration,
        runs: BTreeMap<(usize, usize, Mode), Vec<Measurement>>,
    ) -> Report {
        let latency = config.configured_latency.unwrap_or(round_trip);
        let rps = |m: &Measurement| m.records as f64 / m.elapsed.as_secs_f64();
        let cpu = |m: &Measurement| m.cpu.as_secs_f64() * 1e6 / m.records.max(1) as f64;
        let tokio_cpu = tokio_cpu_per_repeat(&runs, cpu);
        let mut sync_rps: BTreeMap<usize, f64> = BTreeMap::new();
        for ((shards, _, mode), ms) in &runs {
            if *mode == Mode::SyncMap {
                sync_rps.insert(*shards, median(ms.iter().map(rps).collect()));
            }
        }
        let points = runs
            .iter()
            .map(|((shards, capacity, mode), ms)| {
                let typical = median_by(ms, rps);
                let r = median(ms.iter().map(rps).collect());
                let in_flight = mode.in_flight(*shards, *capacity);
                let ideal = (in_flight as f64 / round_trip.as_secs_f64()).min(server_limit_rps);
                let q = |quantile: f64| {
                    median(
                        ms.iter()
                            .map(|m| m.latency_us.value_at_quantile(quantile) as f64)
                            .collect(),
                    ) as u64
                };
                Point {
                    mode: mode.name().to_string(),
                    shards: *shards,
                    capacity: *capacity,
                    in_flight,
                    latency_ms: latency.as_secs_f64() * 1e3,
                    records: typical.records,
                    rps: r,
                    ideal_rps: ideal,
                    efficiency: r / ideal,
                    speedup_vs_sync_map: sync_rps.get(shards).map(|s| r / s),
                    p50_us: q(0.5),
                    p99_us: q(0.99),
                    p999_us: q(0.999),
                    cpu_us_per_record: median(ms.iter().map(cpu).collect()),
                    wire_p50_us: ms
                        .iter()
                        .map(|m| m.wire_us.as_ref().map(|h| h.value_at_quantile(0.5) as f64))
                        .collect::<Option<Vec<f64>>>()
                        .map(|v| median(v) as u64),
                    cpu_vs_tokio: tokio_cpu
                        .get(&(*shards, *capacity))
                        .filter(|t| t.len() == ms.len())
                        .map(|t| median(ms.iter().zip(t).map(|(m, t)| cpu(m) / t).collect())),
                    repeats: ms.len(),
                    requests_per_record: typical.layer.as_ref().map(|l| l.requests_per_lookup()),
                    keys_per_request: typical.layer.as_ref().map(|l| l.keys_per_request()),
                    cache_hit_ratio: typical.layer.as_ref().map(|l| l.hit_ratio()),
                    coalesced_ratio: typical
                        .layer
                        .as_ref()
                        .map(|l| l.coalesced as f64 / l.lookups.max(1) as f64),
                    limit: typical.layer.as_ref().and_then(|l| l.limit),
                }
            })
            .collect();
        Report {
            schema_version: REPORT_SCHEMA_VERSION,
            git_commit: built_from(),
            measured_at: Some(
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            ),
            server: config.server.clone(),
            machine: Machine::probe(),
            duration_s: config.duration.as_secs_f64(),
            repeat: config.repeat,
            round_trip_us: round_trip.as_secs_f64() * 1e6,
            server_limit_rps,
            // The Redis client's settings: an HTTP sweep uses neither.
            reply_split: (!config.http).then_some(config.client.reply_split),
            pinned: Some(config.pin),
            connections: (!config.http).then_some(config.client.connections),
            lookup_layer: Some(config.layer.describe()),
            key_distribution: Some(match config.distribution {
                loadgen::KeyDistribution::Uniform => "uniform".to_string(),
                loadgen::KeyDistribution::Zipf(e) => format!("zipf:{e}"),
            }),
            points,
        }
    }

    /// The table, as printed after a sweep.
    pub fn table(&self) -> String {
        let mut out = format!(
            "measured {} on commit {}; {} ({} cores, Linux {})\n",
            self.measured_at.as_deref().unwrap_or("(date not recorded)"),
            self.git_commit.as_deref().unwrap_or("(not recorded)"),
            self.machine.cpu,
            self.machine.cores,
            self.machine.kernel,
        );
        out.push_str(&format!(
            "server: {}; round trip {:.0} us; server limit {:.0} records/s; {} x {:.1} s per point",
            self.server, self.round_trip_us, self.server_limit_rps, self.repeat, self.duration_s
        ));
        if let Some(split) = self.reply_split {
            out.push_str(&format!("; reply split {split}"));
        }
        if let Some(n) = self.connections.filter(|&n| n != 1) {
            out.push_str(&format!("; {n} connections per shard"));
        }
        if let Some(pinned) = self.pinned {
            out.push_str(if pinned {
                "; shards pinned"
            } else {
                "; shards unpinned"
            });
        }
        if let Some(d) = &self.key_distribution {
            out.push_str(&format!("\nkeys: {d}"));
        }
        if let Some(l) = &self.lookup_layer {
            out.push_str(&format!("; lookup layer: {l}"));
        }
        out.push_str("\n\n");
        out.push_str(&format!(
            "{:<22} {:>6} {:>8} {:>12} {:>8} {:>7} {:>8} {:>8} {:>9} {:>8} {:>9} {:>8} {:>6} {:>5}\n",
            "mode",
            "shards",
            "capacity",
            "records/s",
            "speedup",
            "eff.",
            "p50 us",
            "p99 us",
            "p99.9 us",
            "cpu us/r",
            "cpu/tokio",
            "wire p50",
            "req/r",
            "hit%"
        ));
        for p in &self.points {
            out.push_str(&format!(
                "{:<22} {:>6} {:>8} {:>12.0} {:>8} {:>6.0}% {:>8} {:>8} {:>9} {:>8.2} {:>9} {:>8} {:>6} {:>5}\n",
                p.mode,
                p.shards,
                if p.mode == "sync-map" {
                    "-".to_string()
                } else {
                    p.capacity.to_string()
                },
                p.rps,
                p.speedup_vs_sync_map
                    .map_or("-".into(), |s| format!("{s:.1}x")),
                p.efficiency * 100.0,
                p.p50_us,
                p.p99_us,
                p.p999_us,
                p.cpu_us_per_record,
                p.cpu_vs_tokio.map_or("-".into(), |c| format!("{c:.2}x")),
                p.wire_p50_us.map_or("-".into(), |w| w.to_string()),
                p.requests_per_record
                    .map_or("-".into(), |r| format!("{r:.3}")),
                p.cache_hit_ratio
                    .map_or("-".into(), |h| format!("{:.0}", h * 100.0))
            ));
        }
        out.push_str(LEGEND);
        out.push_str(&self.conclusion());
        out
    }

    /// The lines a reader came for: at each shard count and capacity, the best of sluice's
    /// modes against the synchronous map, the ideal and the tokio baseline.
    pub fn conclusion(&self) -> String {
        let mut keys: Vec<(usize, usize)> = self
            .points
            .iter()
            .filter(|p| SLUICE_MODES.contains(&p.mode.as_str()))
            .map(|p| (p.shards, p.capacity))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut out = String::new();
        for (shards, capacity) in keys {
            let at = |p: &&Point| p.shards == shards && p.capacity == capacity;
            let best = self
                .points
                .iter()
                .filter(at)
                .filter(|p| SLUICE_MODES.contains(&p.mode.as_str()))
                .max_by(|a, b| a.rps.total_cmp(&b.rps));
            let Some(best) = best else { continue };
            let tokio = self
                .points
                .iter()
                .filter(at)
                .filter(|p| p.mode.starts_with("tokio-"))
                .map(|p| p.rps)
                .max_by(f64::total_cmp);
            out.push_str(&format!(
                "{shards} shard(s), capacity {capacity:>4}: best {} at {:.0} records/s, {} the sync map, {:.0}% of the ideal{}\n",
                best.mode,
                best.rps,
                best.speedup_vs_sync_map
                    .map_or("-".into(), |s| format!("{s:.1}x")),
                best.efficiency * 100.0,
                tokio.map_or(String::new(), |t| format!(
                    ", {:.2}x the faster tokio baseline",
                    best.rps / t.max(1e-9)
                ))
            ));
        }
        if !out.is_empty() {
            out.insert_str(0, "\nConclusion:\n");
        }
        out
    }
}

/// The sluice modes the conclusion compares (the baselines are the others).
const SLUICE_MODES: [&str; 4] = ["ordered", "unordered", "key-ordered", "adapter-unordered"];

/// What the table's columns mean.
const LEGEND: &str = "
speedup: records/s over the synchronous map's (one lookup at a time); eff.: records/s as a
share of the ideal (capacity x shards / round trip, capped by the server's measured limit);
p50/p99/p99.9 us: a record's latency; cpu us/r: the whole process's CPU time (user + system)
per record; cpu/tokio: that over the cheapest tokio baseline's at the same shards and capacity,
taken within each repeat; wire p50: a request's median time between the socket and its reply
(the rest of p50 is the client's own queueing); req/r: backend requests per record (the
lookup layer's batching, coalescing and cache lower it); hit%: cache hits per record.
";

/// Reads a report written by [`write_json`].
pub fn read_json(path: &Path) -> Result<Report, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a sluice bench report: {e}", path.display()))
}

/// Writes the report as JSON.
pub fn write_json(report: &Report, path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))
}

/// One colour per mode, far apart (Tableau 10); odd modes also get triangles, not circles.
const COLORS: [RGBColor; 8] = [
    RGBColor(214, 39, 40),
    RGBColor(127, 127, 127),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(23, 190, 207),
];

/// The ideal at each capacity for `shards` shards (Little's law, capped by the server's
/// limit), from the async points that carry it.
fn ideal_line(report: &Report, shards: usize) -> Vec<(f64, f64)> {
    let mut line: Vec<(f64, f64)> = report
        .points
        .iter()
        .filter(|p| p.shards == shards && p.mode != "sync-map" && p.ideal_rps > 0.0)
        .map(|p| (p.capacity as f64, p.ideal_rps))
        .collect();
    line.sort_by(|a, b| a.0.total_cmp(&b.0));
    line.dedup_by(|a, b| a.0 == b.0);
    line
}

/// A line's legend entry: `name`, and with several shard counts which one (dashed after the
/// first).
fn legend_label(name: &str, shards: usize, first: bool, several: bool) -> String {
    if !several {
        return name.to_string();
    }
    let plural = if shards == 1 { "" } else { "s" };
    let dashed = if first { "" } else { ", dashed" };
    format!("{name} ({shards} shard{plural}{dashed})")
}

/// `mode`'s records/s at each capacity for `shards` shards; the sync map (capacity does not
/// apply) as a flat line across the sweep's capacities.
fn mode_line(report: &Report, mode: Mode, shards: usize, capacities: &[usize]) -> Vec<(f64, f64)> {
    let line: Vec<(f64, f64)> = report
        .points
        .iter()
        .filter(|p| p.mode == mode.name() && p.shards == shards)
        .map(|p| (p.capacity as f64, p.rps))
        .collect();
    match line.first() {
        Some(&(_, y)) if mode == Mode::SyncMap => {
            capacities.iter().map(|c| (*c as f64, y)).collect()
        }
        _ => line,
    }
}

/// Sorted, without repeats.
fn distinct(mut values: Vec<usize>) -> Vec<usize> {
    values.sort_unstable();
    values.dedup();
    values
}

/// Writes the throughput-against-capacity chart as SVG: one line per mode (and shard count),
/// and the ideal. Over 70 lines: one chart's drawing, step by step, reads best in one place.
pub fn write_svg(report: &Report, path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let capacities = distinct(report.points.iter().map(|p| p.capacity).collect());
    let (min_cap, max_cap) = (
        *capacities.first().ok_or("no points")? as f64,
        *capacities.last().ok_or("no points")? as f64,
    );
    let max_rps = report.points.iter().map(|p| p.rps).fold(1.0, f64::max);
    let min_rps = report
        .points
        .iter()
        .map(|p| p.rps)
        .fold(f64::INFINITY, f64::min)
        .max(1.0);
    let shard_counts = distinct(report.points.iter().map(|p| p.shards).collect());
    let several = shard_counts.len() > 1;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Throughput against capacity ({})", report.server),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(80)
            // Log scales on both axes: the sync map's hundreds of records/s and the async
            // modes' hundreds of thousands on one picture.
            .build_cartesian_2d(
                (min_cap.max(1.0)..max_cap.max(2.0)).log_scale(),
                (min_rps * 0.7..max_rps * 1.4).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("capacity (requests in flight per shard)")
            .y_desc("records/s")
            .y_label_formatter(&|v| {
                if *v >= 1e3 {
                    format!("{:.0}k", v / 1e3)
                } else {
                    format!("{v:.0}")
                }
            })
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for (si, shards) in shard_counts.iter().enumerate() {
            let ideal = ideal_line(report, *shards);
            if ideal.is_empty() {
                continue;
            }
            let style = BLACK.stroke_width(1);
            let label = legend_label("ideal", *shards, si == 0, several);
            if si == 0 {
                chart
                    .draw_series(LineSeries::new(ideal, style))?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            } else {
                chart
                    .draw_series(DashedLineSeries::new(ideal, 3, 3, style))?
                    .label(label)
                    .legend(move |(x, y)| {
                        // A dashed entry: two short strokes.
                        EmptyElement::at((x, y))
                            + PathElement::new(vec![(0, 0), (8, 0)], style)
                            + PathElement::new(vec![(12, 0), (20, 0)], style)
                    });
            }
        }
        for (mi, mode) in Mode::ALL.iter().enumerate() {
            for (si, shards) in shard_counts.iter().enumerate() {
                let line = mode_line(report, *mode, *shards, &capacities);
                if line.is_empty() {
                    continue;
                }
                let color = COLORS[mi % COLORS.len()];
                let style = color.stroke_width(2);
                let label = legend_label(mode.name(), *shards, si == 0, several);
                if si == 0 {
                    chart
                        .draw_series(LineSeries::new(line.clone(), style))?
                        .label(label)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                } else {
                    // Further shard counts: dashed, in the mode's colour, in the legend too.
                    chart
                        .draw_series(DashedLineSeries::new(line.clone(), 6, 4, style))?
                        .label(label)
                        .legend(move |(x, y)| {
                            // A dashed entry: two short strokes.
                            EmptyElement::at((x, y))
                                + PathElement::new(vec![(0, 0), (8, 0)], style)
                                + PathElement::new(vec![(12, 0), (20, 0)], style)
                        });
                }
                if mi % 2 == 0 {
                    chart.draw_series(
                        line.iter()
                            .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                    )?;
                } else {
                    chart.draw_series(
                        line.iter()
                            .map(|&(x, y)| TriangleMarker::new((x, y), 4, color.filled())),
                    )?;
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cpu_us_per_record: f64) -> Measurement {
        Measurement {
            records: 1_000,
            elapsed: Duration::from_secs(1),
            latency_us: hdrhistogram::Histogram::new(3).unwrap(),
            cpu: Duration::from_secs_f64(cpu_us_per_record * 1e-3),
            wire_us: None,
            layer: None,
        }
    }

    fn config(modes: Vec<Mode>) -> SweepConfig {
        SweepConfig {
            addr: "127.0.0.1:1".parse().unwrap(),
            server: "test".into(),
            configured_latency: Some(Duration::from_millis(1)),
            keys: 1,
            modes,
            shards: vec![1],
            capacities: vec![64],
            duration: Duration::from_secs(1),
            records: None,
            repeat: 3,
            seed: 0,
            client: Default::default(),
            pin: false,
            distribution: loadgen::KeyDistribution::Uniform,
            layer: Default::default(),
            http: false,
        }
    }

    fn report(runs: Vec<(Mode, [f64; 3])>) -> Report {
        let modes = runs.iter().map(|(m, _)| *m).collect();
        let runs = runs
            .into_iter()
            .map(|(mode, cpu)| ((1, 64, mode), cpu.iter().map(|&c| run(c)).collect()))
            .collect();
        Report::from_runs(&config(modes), 1e9, Duration::from_millis(1), runs)
    }

    fn point(report: &Report, mode: Mode) -> &Point {
        report
            .points
            .iter()
            .find(|p| p.mode == mode.name())
            .unwrap()
    }

    #[test]
    fn cpu_against_tokio_is_taken_within_each_repeat_against_the_cheaper_tokio_mode() {
        let report = report(vec![
            (Mode::TokioBuffered, [1.0, 4.0, 3.0]),
            (Mode::TokioUnordered, [2.0, 5.0, 2.5]),
            (Mode::Unordered, [0.9, 1.0, 1.1]),
        ]);
        let unordered = point(&report, Mode::Unordered);
        // Per repeat: 0.9 / 1.0, 1.0 / 4.0, 1.1 / 2.5; the median is 0.44. The ratio of the
        // medians (1.0 / 2.5 = 0.4) would mix repeats measured minutes apart.
        let ratio = unordered.cpu_vs_tokio.unwrap();
        assert!((ratio - 0.44).abs() < 1e-9, "{ratio}");
        assert!((unordered.cpu_us_per_record - 1.0).abs() < 1e-9);
        // The tokio modes against the cheaper of the two: buffered 1, 1, 1.2; unordered 2,
        // 1.25, 1.
        let buffered = point(&report, Mode::TokioBuffered).cpu_vs_tokio.unwrap();
        assert!((buffered - 1.0).abs() < 1e-9, "{buffered}");
        let tokio_unordered = point(&report, Mode::TokioUnordered).cpu_vs_tokio.unwrap();
        assert!((tokio_unordered - 1.25).abs() < 1e-9, "{tokio_unordered}");
        assert!(report.table().contains("0.44x"));
    }

    #[test]
    fn without_a_tokio_mode_there_is_no_cpu_ratio() {
        let report = report(vec![(Mode::Unordered, [1.0, 1.0, 1.0])]);
        assert_eq!(point(&report, Mode::Unordered).cpu_vs_tokio, None);
        let table = report.table();
        let row = table.lines().find(|l| l.starts_with("unordered")).unwrap();
        let line: Vec<&str> = row.split_whitespace().collect();
        assert_eq!((line[0], line[10]), ("unordered", "-"), "{line:?}");
    }

    #[test]
    fn the_table_says_what_its_columns_mean_and_ends_with_the_conclusion() {
        let report = report(vec![
            (Mode::Unordered, [1.0, 1.0, 1.0]),
            (Mode::TokioUnordered, [2.0, 2.0, 2.0]),
        ]);
        let table = report.table();
        for column in ["speedup:", "eff.:", "cpu us/r:", "cpu/tokio:", "wire p50:"] {
            assert!(table.contains(column), "{column} explained");
        }
        let last = table.lines().last().unwrap();
        assert!(
            last.starts_with("1 shard(s), capacity   64: best unordered")
                && last.contains("x the faster tokio baseline"),
            "{last}"
        );
        assert!(
            !last.contains("tokio-unordered"),
            "a baseline is never the best sluice mode"
        );
    }

    #[test]
    fn a_report_names_its_schema_and_reads_back_older_reports_as_version_1() {
        let report = report(vec![(Mode::Unordered, [1.0, 1.0, 1.0])]);
        assert_eq!(report.schema_version, REPORT_SCHEMA_VERSION);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["schema_version"], REPORT_SCHEMA_VERSION);
        assert!(json.get("git_commit").is_some());
        assert!(report.table().starts_with("measured "));

        let mut old = json;
        let fields = old.as_object_mut().unwrap();
        fields.remove("schema_version");
        fields.remove("git_commit");
        fields.remove("measured_at");
        let read: Report = serde_json::from_value(old).unwrap();
        assert_eq!(read.schema_version, 1);
        assert_eq!(read.git_commit, None);
        assert_eq!(read.points.len(), 1);
    }
}
