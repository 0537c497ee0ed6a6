//! `--metrics-addr HOST:PORT`: the run's metrics in the Prometheus (OpenMetrics) text format
//! at `GET /metrics`, for a run that goes on for weeks, as Flink's metric reporters serve a
//! job's.
//!
//! Owns: the endpoint's listening socket and thread, and what a scrape reads. Invariants:
//! - the address is bound before the run starts, so a bad or taken one fails the run at once,
//!   naming the flag;
//! - a scrape reads the figures as they are (the shards' published metrics, the lookup layers'
//!   figures so far, the writer's counts as of its last progress report, at most 100 ms old,
//!   the NATS counts) and never blocks the run: it takes only the locks the progress report
//!   and the shards' publishing take, for as long as a copy;
//! - counters only go up over a run; a request that is not `GET /metrics` gets a 404, a
//!   malformed or slow one is dropped after 2 s, and none stops the endpoint.

use super::nats_io::NatsCounts;
use super::{EnrichError, Summary};
use crate::lookup::{LayerStats, Sinks};
use crate::{MetricsSnapshot, StageObserver};
use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a scrape reads; filled in as the run starts its parts.
#[derive(Default)]
struct Sources {
    /// The writer's counts as of its last progress report, and the lines in flight then.
    summary: Summary,
    in_flight: u64,
    stage: Option<StageObserver>,
    sinks: Option<Sinks>,
    nats: Option<Arc<NatsCounts>>,
}

/// The run's side of the endpoint.
#[derive(Clone)]
pub(crate) struct Exporter {
    sources: Arc<Mutex<Sources>>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exporter")
    }
}

impl Exporter {
    /// Binds `addr` and serves it on a thread of its own for the rest of the process.
    pub(crate) fn start(addr: &str) -> Result<Exporter, EnrichError> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            EnrichError::Usage(format!("--metrics-addr {addr}: cannot listen there: {e}"))
        })?;
        let exporter = Exporter {
            sources: Arc::default(),
        };
        let mut registry = Registry::with_prefix("sluice");
        registry.register_collector(Box::new(RunCollector(exporter.sources.clone())));
        std::thread::Builder::new()
            .name("sluice-metrics".into())
            .spawn(move || serve(listener, registry))
            .map_err(|e| EnrichError::Usage(format!("cannot start the metrics thread: {e}")))?;
        Ok(exporter)
    }

    fn with(&self, f: impl FnOnce(&mut Sources)) {
        f(&mut self.sources.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub(crate) fn attach_stage(&self, stage: StageObserver, sinks: Sinks) {
        self.with(|s| {
            s.stage = Some(stage);
            s.sinks = Some(sinks);
        });
    }

    pub(crate) fn attach_nats(&self, counts: Arc<NatsCounts>) {
        self.with(|s| s.nats = Some(counts));
    }

    /// The writer's counts so far (called with each progress report).
    pub(crate) fn update(&self, summary: &Summary, in_flight: u64) {
        self.with(|s| {
            s.summary.clone_from(summary);
            s.in_flight = in_flight;
        });
    }
}

fn serve(listener: TcpListener, registry: Registry) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        // One at a time: a scrape is a copy and a format, and scrapers come every few seconds.
        let _ = answer(stream, &registry);
    }
}

fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() + n > 8192 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, kind, body) = if method == Some(b"GET") && path == Some(b"/metrics") {
        let mut body = String::new();
        match prometheus_client::encoding::text::encode(&mut body, registry) {
            Ok(()) => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            ),
            Err(_) => (
                "500 Internal Server Error",
                "text/plain",
                "could not encode\n".into(),
            ),
        }
    } else {
        (
            "404 Not Found",
            "text/plain",
            "sluice serves GET /metrics\n".into(),
        )
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// Reads [`Sources`] at each scrape.
struct RunCollector(Arc<Mutex<Sources>>);

impl std::fmt::Debug for RunCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunCollector")
    }
}

/// Upper bounds of the latency histograms' buckets, in microseconds.
const BUCKETS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

struct Out<'a>(DescriptorEncoder<'a>);

impl Out<'_> {
    fn counter(&mut self, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
        let c = ConstCounter::new(value);
        c.encode(
            self.0
                .encode_descriptor(name, help, None, c.metric_type())?,
        )
    }

    fn gauge(&mut self, name: &str, help: &str, value: i64) -> Result<(), std::fmt::Error> {
        let g = ConstGauge::new(value);
        g.encode(
            self.0
                .encode_descriptor(name, help, None, g.metric_type())?,
        )
    }

    /// A histogram in seconds from one in microseconds.
    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        h: &Histogram<u64>,
    ) -> Result<(), std::fmt::Error> {
        let mut buckets = Vec::with_capacity(BUCKETS_US.len() + 1);
        let mut below = 0;
        for bound in BUCKETS_US {
            let upto = h.count_between(0, bound);
            buckets.push((bound as f64 / 1e6, upto - below));
            below = upto;
        }
        buckets.push((f64::MAX, h.len() - below));
        let sum = h.mean() * h.len() as f64 / 1e6;
        let mut m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, h.len(), &buckets, None)
    }
}

impl Collector for RunCollector {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (summary, in_flight, stage, layer, nats) = {
            let s = self.0.lock().unwrap_or_else(|p| p.into_inner());
            (
                s.summary.clone(),
                s.in_flight,
                s.stage.as_ref().map(StageObserver::metrics),
                s.sinks.as_ref().map(Sinks::live_layer),
                s.nats.clone(),
            )
        };
        let mut out = Out(encoder);
        let s = &summary;
        out.counter("lines_read", "Input lines read.", s.lines_read)?;
        out.gauge(
            "lines_in_flight",
            "Lines read and not yet written or decided.",
            in_flight as i64,
        )?;
        for (name, help, value) in [
            (
                "records_enriched",
                "Records written with their value.",
                s.enriched,
            ),
            (
                "records_missing_kept",
                "Records whose key was missing, written as they were.",
                s.missing_kept,
            ),
            (
                "records_missing_dropped",
                "Records whose key was missing, dropped.",
                s.missing_dropped,
            ),
            (
                "records_bad_skipped",
                "Lines that were not records, skipped.",
                s.bad_skipped,
            ),
            (
                "records_bad_dead_lettered",
                "Lines that were not records, dead-lettered.",
                s.bad_dead_lettered,
            ),
            (
                "records_timed_out_emitted",
                "Records whose lookup timed out, written without a value.",
                s.timeouts_emitted,
            ),
            (
                "records_timed_out_dropped",
                "Records whose lookup timed out, dropped.",
                s.timeouts_dropped,
            ),
            (
                "records_timed_out_dead_lettered",
                "Records whose lookup timed out, dead-lettered.",
                s.timeouts_dead_lettered,
            ),
            (
                "records_failed_emitted",
                "Records whose lookup failed, written without a value.",
                s.errors_emitted,
            ),
            (
                "records_failed_dropped",
                "Records whose lookup failed, dropped.",
                s.errors_dropped,
            ),
            (
                "records_failed_dead_lettered",
                "Records whose lookup failed, dead-lettered.",
                s.errors_dead_lettered,
            ),
        ] {
            out.counter(name, help, value)?;
        }
        out.gauge(
            "bytes_held_peak",
            "The most bytes of lines and values held at once.",
            s.peak_bytes_held as i64,
        )?;
        if let Some(m) = stage {
            stage_metrics(&mut out, &m)?;
        }
        if let Some(l) = layer {
            layer_metrics(&mut out, &l)?;
        }
        if let Some(n) = nats {
            nats_metrics(&mut out, &n)?;
        }
        Ok(())
    }
}

fn stage_metrics(out: &mut Out<'_>, m: &MetricsSnapshot) -> Result<(), std::fmt::Error> {
    out.counter(
        "stage_records_in",
        "Records accepted by the stage.",
        m.records_in,
    )?;
    out.counter(
        "stage_records_out",
        "Records whose outcome left the stage.",
        m.records_out,
    )?;
    out.gauge(
        "stage_in_flight",
        "Entries holding a slot of the stage's queues.",
        m.in_flight as i64,
    )?;
    out.counter(
        "stage_timeouts",
        "Lookups whose timeout expired.",
        m.timeouts,
    )?;
    out.counter(
        "stage_retries",
        "Lookup attempts after the first.",
        m.retries,
    )?;
    out.counter(
        "stage_failures",
        "Lookup attempts that ended in an error, retried or not.",
        m.failures,
    )?;
    out.histogram(
        "latency_seconds",
        "From a record's first lookup attempt to its outcome.",
        &m.invoke_to_emit_us,
    )?;
    out.histogram(
        "queue_wait_seconds",
        "From a record's push to its first lookup attempt (waiting for a slot), sampled.",
        &m.queue_wait_us,
    )
}

fn layer_metrics(out: &mut Out<'_>, l: &LayerStats) -> Result<(), std::fmt::Error> {
    for (name, help, value) in [
        ("lookups", "Lookups asked of the lookup layer.", l.lookups),
        (
            "lookup_cache_hits",
            "Lookups answered by the cache.",
            l.cache_hits,
        ),
        (
            "lookups_coalesced",
            "Lookups that shared a request pending for their key.",
            l.coalesced,
        ),
        (
            "lookups_rejected",
            "Lookups refused by the open circuit breaker.",
            l.rejected,
        ),
        (
            "backend_requests",
            "Requests sent to the backend.",
            l.requests,
        ),
        (
            "backend_keys",
            "Keys the backend requests carried.",
            l.keys_sent,
        ),
        (
            "backend_requests_failed",
            "Backend requests that failed.",
            l.failed_requests,
        ),
        (
            "lookups_abandoned",
            "Keys not sent: every record waiting for them timed out first.",
            l.abandoned,
        ),
        (
            "cache_invalidated",
            "Cached keys dropped because the backend said they were written.",
            l.invalidated,
        ),
        (
            "cache_flushes",
            "Times the whole cache was dropped on the backend's word.",
            l.cache_flushes,
        ),
        (
            "breaker_opened",
            "Times a circuit breaker opened.",
            l.breaker_opened,
        ),
    ] {
        out.counter(name, help, value)?;
    }
    if let Some(limit) = l.limit {
        out.gauge(
            "concurrency_limit",
            "The adaptive concurrency limit, summed over shards.",
            limit as i64,
        )?;
    }
    Ok(())
}

fn nats_metrics(out: &mut Out<'_>, n: &NatsCounts) -> Result<(), std::fmt::Error> {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    for (name, help, value) in [
        (
            "nats_delivered",
            "Messages delivered by the input stream.",
            &n.delivered,
        ),
        (
            "nats_redelivered",
            "Of those, deliveries after the first.",
            &n.redelivered,
        ),
        (
            "nats_published",
            "Outputs published (and acknowledged by the output stream).",
            &n.published,
        ),
        (
            "nats_duplicates",
            "Of those, dropped by the output stream as duplicates.",
            &n.duplicates,
        ),
        ("nats_acked", "Input messages acknowledged.", &n.acked),
        (
            "nats_retried",
            "Publishes or acknowledgements tried again.",
            &n.retried,
        ),
        (
            "nats_fenced",
            "Outputs not published: their partition's lease was lost.",
            &n.fenced,
        ),
        (
            "nats_leases_taken",
            "Partition leases taken.",
            &n.leases_gained,
        ),
        (
            "nats_leases_lost",
            "Partition leases lost or given up.",
            &n.leases_lost,
        ),
    ] {
        out.counter(name, help, get(value))?;
    }
    out.gauge(
        "nats_partitions_owned",
        "Partitions this process holds the lease of.",
        get(&n.partitions) as i64,
    )
}
