//! `sluice enrich` between two JetStream streams: `--input nats://HOST:PORT/STREAM?consumer=NAME`
//! (with `&group=NAME&partitions=P`, one of a group of processes sharing the stream's
//! partitions) and `--output nats://HOST:PORT/SUBJECT`.
//!
//! Owns: the two NATS threads of a run (each a tokio current-thread runtime: the NATS client
//! never runs on a shard) and the table of deliveries not yet acknowledged. The input thread
//! pulls messages (from one durable consumer, or one per partition leased, `<NAME>-p<P>`, each
//! in a task of its own that the lease loop starts and stops) and hands their payloads to the
//! reader as lines (a payload's newlines become spaces: JSON white space), numbered in the
//! order they are handed over, so line `n` is delivery `n`; the writer hands each line's
//! outcome to the output thread. Invariants:
//! - a delivery is acknowledged (sent, not confirmed: a lost ack is a redelivery whose output
//!   the output stream drops) only after its output's publish ack (`Nats-Msg-Id` = the
//!   source's stream and sequence), or its dead letter's (published with the same id to a
//!   subject of a dead-letter stream on the output's server), or, for a line that writes
//!   nothing (dropped, skipped), after the writer decided so; so a crash at any moment leaves
//!   each message either acknowledged with its output stored, or redelivered, and its output,
//!   published again, dropped as a duplicate;
//! - the consumer is re-created from its acknowledgement floor at start, so a restarted run
//!   resumes in stream order (an ordered run's outputs stay in input order across a crash);
//! - in an ordered run the consumers acknowledge prefixes (ack policy `all`): outcomes reach the
//!   output thread in input order, lines that write nothing take their turn among the
//!   publishes, and one ack per consumer covers every line done before it, sent every
//!   `ACK_WINDOW` lines done and whenever nothing is left in flight; a redelivery out of stream
//!   order re-opens the consumer from its acknowledgement floor, so an ack's prefix is always a
//!   prefix of the stream; unordered and key-ordered runs acknowledge each message;
//! - a blank payload never becomes a line; it is acknowledged at once (with the `all` policy
//!   only when no message before it from its consumer is still in flight: else the ack of a
//!   later message covers it);
//! - outputs are sent in the order the writer handed them over (input order in ordered mode)
//!   and only their acks are awaited together, so a healthy broker stores them in that order;
//! - a publish or an ack that fails (NATS restarting) is tried again with backoff until it
//!   succeeds or the run is stopped at once: the duplicate window makes a publish sent twice
//!   count once (a retried output may then land after later ones);
//! - in a group, an output is published only while the lease its delivery was read under is
//!   held and not lapsed ([`Leases::holds`]); a fenced output is neither published nor
//!   acknowledged (the partition's next owner reads it again); the leases are renewed until
//!   every output is done, and given up when the run ends;
//! - one partition's messages reach the reader in stream order, so a key (which stays on
//!   its partition) keeps its order in an ordered run, across the group;
//! - the reader sees the end of its input when the run is asked to stop (a signal); NATS
//!   input has no other end.

use super::{EnrichError, Stop};
use crate::nats::group::{Group, GroupConfig, Leases};
use crate::nats::{Delivery, JetStreamSink, JetStreamSource, NatsError, Published, SourceConfig};
use async_nats::jetstream;
use bytes::Bytes;
use futures::future::Either;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::StreamExt;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{BufRead, Read};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// `--input nats://HOST:PORT/STREAM?consumer=NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsInput {
    pub server: String,
    pub stream: String,
    pub consumer: String,
    /// `&group=NAME&partitions=P[&lease=DURATION]`: share the stream's partitions with the
    /// group's other processes.
    pub group: Option<GroupConfig>,
}

/// `--output nats://HOST:PORT/SUBJECT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsOutput {
    pub server: String,
    pub subject: String,
}

/// A run's two NATS ends (one without the other is refused: see `parse_ends`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsEnds {
    pub input: NatsInput,
    pub output: NatsOutput,
}

/// A `nats://` URL's parts: the server URL, the path, the query's NAME=VALUE pairs.
struct UrlParts<'a> {
    server: String,
    path: &'a str,
    pairs: Vec<(&'a str, &'a str)>,
}

/// `nats://HOST:PORT/PATH?QUERY` into its parts.
fn split_url<'a>(flag: &str, url: &'a str) -> Result<UrlParts<'a>, String> {
    let rest = url
        .strip_prefix("nats://")
        .ok_or_else(|| format!("{flag} `{url}` is not a nats:// URL"))?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (host, path) = rest
        .split_once('/')
        .ok_or_else(|| format!("{flag} `{url}`: no /STREAM or /SUBJECT after the host"))?;
    if host.is_empty() || path.is_empty() {
        return Err(format!(
            "{flag} `{url}`: the host or the name after it is missing"
        ));
    }
    let mut pairs = vec![];
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        pairs.push(
            pair.split_once('=')
                .ok_or_else(|| format!("{flag} `{url}`: `{pair}` is not NAME=VALUE"))?,
        );
    }
    Ok(UrlParts {
        server: format!("nats://{host}"),
        path,
        pairs,
    })
}

/// The NATS ends of a run, when `--input` or `--output` is a `nats://` URL.
pub fn parse_ends(input: &str, output: &str) -> Result<Option<NatsEnds>, String> {
    let (from, to) = (input.starts_with("nats://"), output.starts_with("nats://"));
    if !from && !to {
        return Ok(None);
    }
    if from != to {
        return Err(
            "a nats:// --input needs a nats:// --output and the other way round: a message is \
             acknowledged once its output is stored, which only an output stream confirms \
             (a file or standard output would make it at-least-once)"
                .into(),
        );
    }
    let UrlParts {
        server,
        path: stream,
        pairs,
    } = split_url("--input", input)?;
    let (mut consumer, mut group, mut partitions, mut lease) = (None, None, None, None);
    for (name, value) in pairs {
        let bad = |what: &str| format!("--input `{input}`: `{name}={value}`: {what}");
        match name {
            "consumer" => consumer = Some(value.to_string()),
            "group" if crate::nats::group::valid_name(value) => group = Some(value.to_string()),
            "group" => return Err(bad("a group's name is letters, digits, `-` and `_`")),
            "partitions" => match value.parse::<u32>() {
                Ok(p) if p > 0 => partitions = Some(p),
                _ => return Err(bad("not a number of partitions (1 or more)")),
            },
            "lease" => match humantime::parse_duration(value) {
                Ok(d) if d >= Duration::from_millis(100) => lease = Some(d),
                _ => return Err(bad("not a lease period of 100ms or more (`2s`, `500ms`)")),
            },
            other => {
                return Err(format!(
                    "--input `{input}`: `{other}` is not a parameter (consumer=NAME, group=NAME, \
                     partitions=P, lease=DURATION)"
                ))
            }
        }
    }
    let consumer = consumer
        .ok_or_else(|| format!("--input `{input}`: name the durable consumer: ?consumer=NAME"))?;
    let group = match (group, partitions) {
        (Some(name), Some(partitions)) => Some(GroupConfig {
            server: server.clone(),
            name,
            partitions,
            lease: lease.unwrap_or(Duration::from_secs(2)),
        }),
        (None, None) if lease.is_none() => None,
        _ => {
            return Err(format!(
                "--input `{input}`: a group needs both group=NAME and partitions=P (lease= \
                 only with them)"
            ))
        }
    };
    let UrlParts {
        server: out_server,
        path: subject,
        pairs,
    } = split_url("--output", output)?;
    if let Some((name, _)) = pairs.first() {
        return Err(format!("--output `{output}`: `{name}` is not a parameter"));
    }
    Ok(Some(NatsEnds {
        input: NatsInput {
            server,
            stream: stream.to_string(),
            consumer,
            group,
        },
        output: NatsOutput {
            server: out_server,
            subject: subject.to_string(),
        },
    }))
}

/// Dead-letter targets against the run's ends: with NATS ends each must be a subject on the
/// output's server, `nats://HOST:PORT/SUBJECT` (a dead letter is published, and its input
/// acknowledged after its publish ack, as an output is); without them none may be.
pub(crate) fn check_dead_letters(
    ends: Option<&NatsEnds>,
    targets: &[std::path::PathBuf],
) -> Result<(), String> {
    for target in targets {
        let text = target.to_string_lossy();
        let nats = text.starts_with("nats://");
        match ends {
            None if nats => {
                return Err(format!(
                    "dead-letter `{text}`: a nats:// dead-letter subject needs nats:// --input \
                     and --output"
                ))
            }
            None => {}
            Some(_) if !nats => {
                return Err(format!(
                    "dead-letter `{text}`: with nats:// --input and --output, dead letters go to \
                     a subject of the output's server, `dead-letter nats://HOST:PORT/SUBJECT` (a \
                     file is not acknowledged with the stream)"
                ))
            }
            Some(ends) => {
                let parts = split_url("dead-letter", &text)?;
                if parts.server != ends.output.server {
                    return Err(format!(
                        "dead-letter `{text}`: not on the output's server {}",
                        ends.output.server
                    ));
                }
                if let Some((name, _)) = parts.pairs.first() {
                    return Err(format!("dead-letter `{text}`: `{name}` is not a parameter"));
                }
            }
        }
    }
    Ok(())
}

/// The subject of a dead-letter target `nats://HOST:PORT/SUBJECT` (checked at start).
pub(crate) fn dead_letter_subject(target: &std::path::Path) -> Option<String> {
    let text = target.to_str()?.strip_prefix("nats://")?;
    Some(text.split_once('/')?.1.to_string())
}

/// What the summary says of the NATS ends.
#[derive(Debug, Default)]
pub struct NatsCounts {
    pub delivered: AtomicU64,
    pub redelivered: AtomicU64,
    pub published: AtomicU64,
    pub duplicates: AtomicU64,
    pub acked: AtomicU64,
    pub retried: AtomicU64,
    /// Outputs not published because their partition's lease was lost.
    pub fenced: AtomicU64,
    /// Partitions held now and at most, leases taken, leases lost or given up (in a group).
    pub partitions: AtomicU64,
    pub partitions_peak: AtomicU64,
    pub leases_gained: AtomicU64,
    pub leases_lost: AtomicU64,
}

impl NatsCounts {
    fn stored(&self, stored: Published) {
        self.published.fetch_add(1, Ordering::Relaxed);
        if stored == Published::Duplicate {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn line(&self, group: bool) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let group = if group {
            format!(
                "  group: held up to {} partitions; {} leases taken, {} lost or given up; {} \
                 outputs fenced (not published: their lease was lost)\n",
                get(&self.partitions_peak),
                get(&self.leases_gained),
                get(&self.leases_lost),
                get(&self.fenced),
            )
        } else {
            String::new()
        };
        group
            + &format!(
            "  nats: {} delivered ({} redelivered), {} published ({} duplicates dropped by the \
             output stream), {} acknowledged, {} publishes or acks tried again\n",
            get(&self.delivered),
            get(&self.redelivered),
            get(&self.published),
            get(&self.duplicates),
            get(&self.acked),
            get(&self.retried),
        )
    }
}

/// A delivery handed to the reader, with the lease it was read under (in a group).
struct Entry {
    delivery: Delivery,
    /// The partition and the lease's epoch.
    lease: Option<(u32, u64)>,
}

/// Deliveries handed to the reader and not yet acknowledged, by line number, and the group's
/// leases that decide whether their outputs may still be published.
pub struct Pending {
    deliveries: Mutex<HashMap<u64, Entry>>,
    leases: Option<Arc<Leases>>,
}

/// Whether a line's output may be published.
enum Ready {
    /// Yes, with this `Nats-Msg-Id`.
    Publish(String),
    /// No: its partition's lease was lost; the next owner reads it again.
    Fenced,
    /// The line has no delivery (the run is stopping).
    Gone,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.deliveries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, line: u64) -> Option<Entry> {
        self.lock().remove(&line)
    }

    /// Whether the lease a delivery was read under is still held (always, outside a group).
    fn lease_holds(&self, lease: Option<(u32, u64)>) -> bool {
        match (lease, &self.leases) {
            (Some((p, epoch)), Some(leases)) => leases.holds(p, epoch),
            _ => true,
        }
    }

    /// Whether a delivery read under `lease` (from the same consumer) is still in the table.
    fn holds_from(&self, lease: Option<(u32, u64)>) -> bool {
        self.lock().values().any(|e| e.lease == lease)
    }

    fn ready(&self, line: u64) -> Ready {
        let mut deliveries = self.lock();
        let Some(entry) = deliveries.get(&line) else {
            return Ready::Gone;
        };
        if self.lease_holds(entry.lease) {
            Ready::Publish(entry.delivery.msg_id())
        } else {
            deliveries.remove(&line);
            Ready::Fenced
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, EnrichError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| EnrichError::Usage(format!("cannot start the NATS thread: {e}")))
}

/// The reader's side of the input thread: payloads as lines; the end of input when the run
/// is asked to stop or the input thread ends.
pub(crate) struct ChannelLines {
    rx: flume::Receiver<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
    stop: Arc<Stop>,
}

impl Read for ChannelLines {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChannelLines {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.at == self.current.len() {
            if self.stop.requested() {
                return Ok(&[]);
            }
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    self.current = line;
                    self.at = 0;
                }
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => return Ok(&[]),
            }
        }
        Ok(&self.current[self.at..])
    }

    fn consume(&mut self, amt: usize) {
        self.at += amt;
    }
}

/// The input thread, kept until the output thread is done: in a group it renews the leases
/// the outputs still in flight are published under, and leaves the group at the end.
pub(crate) struct InputThread {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl InputThread {
    /// Called once every output is published and acknowledged: leaves the group (unless the
    /// run stops at once) and ends the thread.
    pub(crate) fn finish(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the input thread runs: one source, or a group's partitions.
enum Sources {
    One(Box<Opened>),
    Group(Box<Partitions>),
}

/// A group's side of the input: its membership, and what opens a partition's consumer.
struct Partitions {
    group: Group,
    js: jetstream::Context,
    config: SourceConfig,
    subject: Box<dyn Fn(u32) -> String + Send>,
}

/// Starts the input thread: connects (said at once if it cannot) and, in a group, joins it;
/// then pulls until the reader is gone. Returns the reader's input and the deliveries' table.
pub(crate) fn start_input(
    input: &NatsInput,
    max_ack_pending: usize,
    ack_all: bool,
    counts: Arc<NatsCounts>,
    stop: Arc<Stop>,
) -> Result<(ChannelLines, InputThread, Arc<Pending>), EnrichError> {
    let config = SourceConfig {
        server: input.server.clone(),
        stream: input.stream.clone(),
        consumer: input.consumer.clone(),
        max_ack_pending,
        ack_wait: Duration::from_secs(30),
        resume_in_order: true,
        filter_subject: None,
        ack_all,
    };
    let rt = runtime()?;
    let usage = |e: NatsError| EnrichError::Usage(format!("--input: {e}"));
    let sources = match &input.group {
        None => Sources::One(Box::new(
            rt.block_on(async {
                let js = crate::nats::connect(&config.server).await?;
                let source = JetStreamSource::open(&js, &config).await?;
                Ok(Opened {
                    source,
                    js,
                    config: config.clone(),
                })
            })
            .map_err(usage)?,
        )),
        Some(spec) => rt
            .block_on(async {
                let js = crate::nats::connect(&config.server).await?;
                let subject =
                    crate::nats::partition_subjects(&js, &config.server, &config.stream).await?;
                let group = Group::join(&js, spec, &member_id()).await?;
                Ok(Sources::Group(Box::new(Partitions {
                    group,
                    js,
                    config: config.clone(),
                    subject: Box::new(subject),
                })))
            })
            .map_err(usage)?,
    };
    let leases = match &sources {
        Sources::Group(partitions) => Some(partitions.group.leases()),
        Sources::One(_) => None,
    };
    let pending = Arc::new(Pending {
        deliveries: Mutex::default(),
        leases,
    });
    let (tx, rx) = flume::bounded::<Vec<u8>>(256);
    let done = Arc::new(AtomicBool::new(false));
    let feed = Feed {
        tx,
        ack_all,
        pending: pending.clone(),
        counts,
        stop: stop.clone(),
        done: done.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("sluice-nats-in".into())
        .spawn(move || rt.block_on(feed.run(sources)))
        .map_err(|e| EnrichError::Usage(format!("cannot start the NATS thread: {e}")))?;
    let lines = ChannelLines {
        rx,
        current: Vec::new(),
        at: 0,
        stop,
    };
    let thread = InputThread {
        done,
        thread: Some(thread),
    };
    Ok((lines, thread, pending))
}

/// This process's name in a group: host, process id and a random part.
fn member_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("{host}-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

/// A delivery on its way from a source's task to the reader, with its lease.
type Pulled = (Delivery, Option<(u32, u64)>);

/// The input thread's state.
struct Feed {
    tx: flume::Sender<Vec<u8>>,
    /// The consumers' ack policy is `all` (an ordered run).
    ack_all: bool,
    pending: Arc<Pending>,
    counts: Arc<NatsCounts>,
    stop: Arc<Stop>,
    done: Arc<AtomicBool>,
}

impl Feed {
    /// Hands deliveries to the reader as numbered lines until the reader is gone; in a group,
    /// then keeps the leases until the outputs are done.
    async fn run(self, sources: Sources) {
        let (dtx, mut drx) = tokio::sync::mpsc::channel::<Pulled>(256);
        let leases = match sources {
            Sources::One(opened) => {
                tokio::spawn(pull(*opened, None, dtx));
                None
            }
            Sources::Group(partitions) => Some(tokio::spawn(keep_leases(
                *partitions,
                dtx,
                self.counts.clone(),
                self.done.clone(),
                self.stop.clone(),
            ))),
        };
        let mut line = 0u64;
        while !self.tx.is_disconnected() {
            let next = tokio::time::timeout(Duration::from_millis(200), drx.recv()).await;
            let (delivery, lease) = match next {
                Err(_) => continue, // nothing for a while: is the reader still there?
                Ok(None) => break,
                Ok(Some(pulled)) => pulled,
            };
            self.counts.delivered.fetch_add(1, Ordering::Relaxed);
            if delivery.delivered > 1 {
                self.counts.redelivered.fetch_add(1, Ordering::Relaxed);
            }
            if delivery.payload.iter().all(u8::is_ascii_whitespace) {
                // With the `all` policy its ack would acknowledge the messages before it still
                // in flight: it is left to the ack of a later message (or, when none comes, to
                // its redelivery once they are done).
                if !self.ack_all || !self.pending.holds_from(lease) {
                    ack_until_done(&delivery, 1, &self.counts, &self.stop).await;
                }
                continue;
            }
            let mut text = Vec::with_capacity(delivery.payload.len() + 1);
            text.extend(delivery.payload.iter().map(|&b| {
                if b == b'\n' || b == b'\r' {
                    b' '
                } else {
                    b
                }
            }));
            text.push(b'\n');
            line += 1;
            self.pending.lock().insert(line, Entry { delivery, lease });
            // Bounded: waits for room; an error is the reader gone.
            if self.tx.send_async(text).await.is_err() {
                break;
            }
        }
        // The reader is gone: no more pulls. A group's leases are kept until the outputs in
        // flight are published.
        drop(drx);
        if let Some(leases) = leases {
            let _ = leases.await;
        }
    }
}

/// A source, with what opens it again.
struct Opened {
    source: JetStreamSource,
    js: jetstream::Context,
    config: SourceConfig,
}

/// Pulls a source's messages into `out`, each with `lease`, until `out` is closed (or the
/// task is aborted: its partition was lost). With the `all` ack policy, a message delivered
/// out of stream order (a redelivery: the server lost acks in a restart, or an ack wait ran
/// out) would break the prefix an ack stands for, so the consumer is opened again from its
/// acknowledgement floor and read on in order; what was already handed over finishes (its
/// outputs, published again, are dropped as duplicates).
async fn pull(opened: Opened, lease: Option<(u32, u64)>, out: tokio::sync::mpsc::Sender<Pulled>) {
    let Opened {
        mut source,
        js,
        config,
    } = opened;
    let mut last = 0u64;
    while let Some(next) = source.next().await {
        match next {
            Ok(delivery) if config.ack_all && delivery.sequence <= last => {
                eprintln!(
                    "sluice enrich: {} redelivered out of order: reading on from the \
                     consumer's acknowledgement floor",
                    delivery.msg_id()
                );
                source = reopen(&js, &config).await;
                last = 0;
            }
            Ok(delivery) => {
                last = delivery.sequence;
                if out.send((delivery, lease)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                eprintln!("sluice enrich: {e} (pulling again)");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Opens `config`'s consumer again (re-created from its acknowledgement floor), trying until
/// it opens.
async fn reopen(js: &jetstream::Context, config: &SourceConfig) -> JetStreamSource {
    let mut wait = Duration::from_millis(100);
    loop {
        match JetStreamSource::open(js, config).await {
            Ok(source) => return source,
            Err(e) => {
                eprintln!("sluice enrich: {e} (trying again)");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// A group member's lease loop: every lease period, renews, takes and gives up partitions,
/// starting a pull task (a durable consumer `<consumer>-p<P>` on the partition's subject) for
/// each partition taken and stopping it for each lost. Ends, leaving the group, once the
/// outputs are done.
async fn keep_leases(
    partitions: Partitions,
    out: tokio::sync::mpsc::Sender<Pulled>,
    counts: Arc<NatsCounts>,
    done: Arc<AtomicBool>,
    stop: Arc<Stop>,
) {
    let Partitions {
        mut group,
        js,
        config,
        subject,
    } = partitions;
    let leases = group.leases();
    let mut tasks: HashMap<u32, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut next_tick = tokio::time::Instant::now();
    while !done.load(Ordering::SeqCst) {
        if tokio::time::Instant::now() < next_tick {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        next_tick += group.period();
        let changes = group.tick().await;
        for p in changes.lost {
            counts.leases_lost.fetch_add(1, Ordering::Relaxed);
            if let Some(task) = tasks.remove(&p) {
                task.abort();
            }
            eprintln!("sluice enrich: partition {p} lost or given up");
        }
        for p in changes.gained {
            counts.leases_gained.fetch_add(1, Ordering::Relaxed);
            if out.is_closed() {
                continue; // the reader is gone: hold the lease, read nothing
            }
            let partition = SourceConfig {
                consumer: format!("{}-p{p}", config.consumer),
                filter_subject: Some(subject(p)),
                ..config.clone()
            };
            match JetStreamSource::open(&js, &partition).await {
                Ok(source) => {
                    let lease = Some((p, leases.epoch(p)));
                    let opened = Opened {
                        source,
                        js: js.clone(),
                        config: partition,
                    };
                    tasks.insert(p, tokio::spawn(pull(opened, lease, out.clone())));
                    eprintln!("sluice enrich: partition {p} taken");
                }
                // Not read: given back, for this member or another to take again.
                Err(e) => {
                    eprintln!("sluice enrich: partition {p}: {e} (giving it back)");
                    group.give_up(p).await;
                    counts.leases_lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let owned = leases.owned() as u64;
        counts.partitions.store(owned, Ordering::Relaxed);
        counts.partitions_peak.fetch_max(owned, Ordering::Relaxed);
    }
    for task in tasks.into_values() {
        task.abort();
    }
    if !stop.at_once() {
        counts
            .leases_lost
            .fetch_add(leases.owned() as u64, Ordering::Relaxed);
        group.leave().await;
    }
    counts.partitions.store(0, Ordering::Relaxed);
}

/// Acknowledges, trying again (with backoff) until the server confirms or the run is stopped
/// at once.
/// `covered`: the messages the ack acknowledges (more than one with the `all` ack policy).
async fn ack_until_done(delivery: &Delivery, covered: u64, counts: &NatsCounts, stop: &Stop) {
    let mut wait = Duration::from_millis(50);
    while let Err(e) = delivery.ack().await {
        if stop.at_once() {
            return;
        }
        counts.retried.fetch_add(1, Ordering::Relaxed);
        eprintln!(
            "sluice enrich: acknowledging {}: {e} (trying again)",
            delivery.msg_id()
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
    counts.acked.fetch_add(covered, Ordering::Relaxed);
}

/// What the writer tells the output thread about a line.
enum Outcome {
    /// Publish this output, then acknowledge the line's delivery.
    Publish(u64, Bytes),
    /// Publish this dead letter to this subject, then acknowledge the line's delivery.
    DeadLetter(u64, async_nats::Subject, Bytes),
    /// The line writes nothing: acknowledge its delivery.
    Done(u64),
}

/// The writer's side of the output thread: outcomes are handed over in batches, of what the
/// writer had at hand when the stage had nothing more ready (or `BATCH` of them), so a busy
/// run wakes the output thread once per batch, not once per record, and a trickle is handed
/// over record by record, without waiting.
pub(crate) struct OutputThread {
    batch: Vec<Outcome>,
    /// The dead-letter subjects, shared by their outcomes.
    subjects: Vec<async_nats::Subject>,
    tx: Option<tokio::sync::mpsc::Sender<Vec<Outcome>>>,
    thread: Option<JoinHandle<()>>,
}

/// Publish acks awaited at once, at most.
const PUBLISHES_IN_FLIGHT: usize = 256;

/// Outcomes in a batch, at most.
const BATCH: usize = 256;

impl OutputThread {
    /// `ack_all`: outcomes come in input order and the consumers' ack policy is `all`.
    pub(crate) fn start(
        output: &NatsOutput,
        dead_letters: &[String],
        ack_all: bool,
        pending: Arc<Pending>,
        counts: Arc<NatsCounts>,
        stop: Arc<Stop>,
    ) -> Result<OutputThread, EnrichError> {
        let rt = runtime()?;
        let sink = rt
            .block_on(JetStreamSink::connect(&output.server, &output.subject))
            .map_err(|e| EnrichError::Usage(format!("--output: {e}")))?;
        // Each subject published to must be a stream's, or its publishes are never stored.
        rt.block_on(sink.stream_of(None))
            .map_err(|e| EnrichError::Usage(format!("--output: {e}")))?;
        for subject in dead_letters {
            rt.block_on(sink.stream_of(Some(subject)))
                .map_err(|e| EnrichError::Usage(format!("dead-letter: {e}")))?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<Outcome>>(16);
        let out = Out {
            sink,
            pending,
            counts,
            stop,
        };
        let thread = std::thread::Builder::new()
            .name("sluice-nats-out".into())
            .spawn(move || rt.block_on(publish(Rc::new(out), ack_all, rx)))
            .map_err(|e| EnrichError::Usage(format!("cannot start the NATS thread: {e}")))?;
        Ok(OutputThread {
            batch: Vec::with_capacity(BATCH),
            subjects: Vec::new(),
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn push(&mut self, outcome: Outcome) {
        self.batch.push(outcome);
        if self.batch.len() >= BATCH {
            self.hand_over();
        }
    }

    pub(crate) fn publish(&mut self, line: u64, bytes: Vec<u8>) {
        self.push(Outcome::Publish(line, bytes.into()));
    }

    pub(crate) fn done(&mut self, line: u64) {
        self.push(Outcome::Done(line));
    }

    /// Line `line` is dead-lettered to `target` (`nats://HOST:PORT/SUBJECT`, checked at start).
    pub(crate) fn dead_letter(&mut self, line: u64, target: &std::path::Path, entry: String) {
        let subject = dead_letter_subject(target).unwrap_or_default();
        let subject = match self.subjects.iter().find(|s| s.as_str() == subject) {
            Some(s) => s.clone(),
            None => {
                let s = async_nats::Subject::from(subject);
                self.subjects.push(s.clone());
                s
            }
        };
        self.push(Outcome::DeadLetter(line, subject, entry.into()));
    }

    /// Hands the outcomes gathered so far to the output thread (waiting while it is
    /// `16 x BATCH` outcomes behind).
    pub(crate) fn hand_over(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        if let Some(tx) = &self.tx {
            let _ = tx.blocking_send(batch);
        }
    }

    /// Waits until every output handed over is published and its delivery acknowledged.
    pub(crate) fn finish(&mut self) {
        self.hand_over();
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the output thread's tasks share (one thread: an `Rc` per task).
struct Out {
    sink: JetStreamSink,
    pending: Arc<Pending>,
    counts: Arc<NatsCounts>,
    stop: Arc<Stop>,
}

async fn ack(out: Rc<Out>, delivery: Delivery, covered: u64) {
    ack_until_done(&delivery, covered, &out.counts, &out.stop).await;
}

/// With the `all` ack policy: per consumer (by the lease its messages were read under), the
/// last delivery done and how many were done since the last ack.
type Prefixes = HashMap<Option<(u32, u64)>, (Delivery, u64)>;

/// Completions between two acks of a consumer's prefix, at most, with the `all` ack policy.
const ACK_WINDOW: u64 = 128;

/// Sends line `line`'s output; the future returned waits for its publish ack (and publishes
/// again until it is stored) and gives the line back.
async fn send(
    out: &Rc<Out>,
    line: u64,
    subject: Option<async_nats::Subject>,
    id: String,
    bytes: Bytes,
) -> impl Future<Output = u64> {
    let first = out
        .sink
        .publish_to(subject.as_ref(), &id, bytes.clone())
        .await;
    let out = out.clone();
    async move {
        let stored = match first {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match stored {
            Ok(stored) => out.counts.stored(stored),
            // Rare: kept out of the common future, which is moved once per record.
            Err(_) => Box::pin(publish_until_done(&out, subject.as_ref(), &id, bytes)).await,
        }
        line
    }
}

/// Publishes in the order handed over (so an ordered run's outputs are stored in input order),
/// with up to `PUBLISHES_IN_FLIGHT` publish acks awaited at once, and acknowledges each
/// delivery after its output's ack: on its own, or with `ack_all` (outcomes in input order,
/// consumers acknowledging prefixes) one ack per consumer for every `ACK_WINDOW` lines done,
/// and whenever nothing is left in flight. Lines that write nothing take their turn in the
/// same queue, so a prefix acknowledged is done.
async fn publish(out: Rc<Out>, ack_all: bool, mut rx: tokio::sync::mpsc::Receiver<Vec<Outcome>>) {
    let mut publishes = FuturesOrdered::new();
    let mut acks = FuturesUnordered::new();
    let mut queue: VecDeque<Outcome> = VecDeque::new();
    let mut prefixes = Prefixes::new();
    let mut since_ack = 0u64;
    let mut open = true;
    loop {
        // Sent here, in the order handed over; only the acks are awaited together.
        while publishes.len() < PUBLISHES_IN_FLIGHT {
            match queue.pop_front() {
                Some(Outcome::Publish(line, bytes)) => match out.pending.ready(line) {
                    Ready::Publish(id) => {
                        let sent = send(&out, line, None, id, bytes).await;
                        publishes.push_back(Either::Left(sent))
                    }
                    Ready::Fenced => {
                        out.counts.fenced.fetch_add(1, Ordering::Relaxed);
                    }
                    Ready::Gone => {}
                },
                Some(Outcome::DeadLetter(line, subject, bytes)) => match out.pending.ready(line) {
                    Ready::Publish(id) => {
                        let sent = send(&out, line, Some(subject), id, bytes).await;
                        publishes.push_back(Either::Left(sent))
                    }
                    Ready::Fenced => {
                        out.counts.fenced.fetch_add(1, Ordering::Relaxed);
                    }
                    Ready::Gone => {}
                },
                Some(Outcome::Done(line)) => {
                    publishes.push_back(Either::Right(futures::future::ready(line)))
                }
                None => break,
            }
        }
        if ack_all && (since_ack >= ACK_WINDOW || (publishes.is_empty() && !prefixes.is_empty())) {
            for (lease, (delivery, covered)) in prefixes.drain() {
                // A lease lost since: its consumer may be another owner's now, and an ack from
                // here would move that one's floor; the new owner reads these again instead.
                if out.pending.lease_holds(lease) {
                    acks.push(ack(out.clone(), delivery, covered));
                }
            }
            since_ack = 0;
        }
        tokio::select! {
            batch = rx.recv(), if open && queue.is_empty() => match batch {
                Some(batch) => queue.extend(batch),
                None => open = false,
            },
            Some(line) = publishes.next(), if !publishes.is_empty() => {
                let Some(Entry { delivery, lease }) = out.pending.take(line) else { continue };
                if ack_all {
                    let covered = prefixes.remove(&lease).map_or(0, |(_, n)| n) + 1;
                    prefixes.insert(lease, (delivery, covered));
                    since_ack += 1;
                } else {
                    acks.push(ack(out.clone(), delivery, 1));
                }
            }
            Some(()) = acks.next(), if !acks.is_empty() => {}
            else => break,
        }
    }
}

/// Publishes with `Nats-Msg-Id` = `id` once more after a publish failed, trying again (with
/// backoff) until the output stream acknowledges or the run is stopped at once. A retried
/// output may be stored after outputs sent later (the broker was failing): each is still
/// stored once.
async fn publish_until_done(
    out: &Out,
    subject: Option<&async_nats::Subject>,
    id: &str,
    bytes: Bytes,
) {
    let mut wait = Duration::from_millis(50);
    loop {
        let sent = match out.sink.publish_to(subject, id, bytes.clone()).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(stored) => return out.counts.stored(stored),
            Err(_) if out.stop.at_once() => return,
            Err(e) => {
                out.counts.retried.fetch_add(1, Ordering::Relaxed);
                eprintln!("sluice enrich: publishing {id}: {e} (trying again)");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_urls_name_the_stream_consumer_and_subject() {
        let ends = parse_ends(
            "nats://127.0.0.1:4222/ORDERS?consumer=enrich",
            "nats://127.0.0.1:4222/orders.enriched",
        )
        .unwrap()
        .unwrap();
        assert_eq!(ends.input.server, "nats://127.0.0.1:4222");
        assert_eq!(
            (ends.input.stream.as_str(), ends.input.consumer.as_str()),
            ("ORDERS", "enrich")
        );
        assert_eq!(ends.output.subject, "orders.enriched");
        assert_eq!(parse_ends("in.jsonl", "-"), Ok(None));
        let half = parse_ends("nats://h:1/S?consumer=c", "out.jsonl").unwrap_err();
        assert!(half.contains("at-least-once"), "{half}");
        let no_consumer = parse_ends("nats://h:1/S", "nats://h:1/o").unwrap_err();
        assert!(no_consumer.contains("?consumer=NAME"), "{no_consumer}");
        let unknown = parse_ends("nats://h:1/S?consumer=c&x=1", "nats://h:1/o").unwrap_err();
        assert!(unknown.contains("`x`"), "{unknown}");
        assert!(parse_ends("nats://h:1?consumer=c", "nats://h:1/o")
            .unwrap_err()
            .contains("no /STREAM"));
    }

    #[test]
    fn a_group_needs_a_name_and_partitions() {
        let out = "nats://h:1/o";
        let ends = parse_ends("nats://h:1/S?consumer=c&group=g-1&partitions=6", out)
            .unwrap()
            .unwrap();
        let group = ends.input.group.unwrap();
        assert_eq!((group.name.as_str(), group.partitions), ("g-1", 6));
        assert_eq!(group.lease, Duration::from_secs(2));
        let ends = parse_ends(
            "nats://h:1/S?consumer=c&group=g&partitions=2&lease=500ms",
            out,
        )
        .unwrap()
        .unwrap();
        assert_eq!(ends.input.group.unwrap().lease, Duration::from_millis(500));
        for (url, says) in [
            (
                "nats://h:1/S?consumer=c&group=g",
                "both group=NAME and partitions=P",
            ),
            ("nats://h:1/S?consumer=c&partitions=3", "both group=NAME"),
            ("nats://h:1/S?consumer=c&lease=1s", "lease= only with them"),
            (
                "nats://h:1/S?consumer=c&group=a.b&partitions=3",
                "`group=a.b`",
            ),
            (
                "nats://h:1/S?consumer=c&group=g&partitions=0",
                "`partitions=0`",
            ),
            (
                "nats://h:1/S?consumer=c&group=g&partitions=2&lease=5ms",
                "`lease=5ms`",
            ),
        ] {
            let e = parse_ends(url, out).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
    }
}
