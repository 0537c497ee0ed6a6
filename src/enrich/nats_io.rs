//! `sluice enrich` between two JetStream streams: `--input nats://HOST:PORT/STREAM?consumer=NAME`
//! and `--output nats://HOST:PORT/SUBJECT`.
//!
//! Owns: the two NATS threads of a run (each a tokio current-thread runtime: the NATS client
//! never runs on a shard) and the table of deliveries not yet acknowledged. The input thread
//! pulls messages and hands their payloads to the reader as lines (a payload's newlines become
//! spaces: JSON white space), numbered in delivery order, so line `n` is delivery `n`; the
//! writer hands each line's outcome to the output thread. Invariants:
//! - a delivery is acknowledged (sent, not confirmed: a lost ack is a redelivery whose output
//!   the output stream drops) only after its output's publish ack (`Nats-Msg-Id` = the
//!   source's stream and sequence), or, for a line that writes nothing (dropped, skipped,
//!   dead-lettered), after the writer decided so and flushed its dead letters; so a crash at
//!   any moment leaves each message either acknowledged with its output stored, or
//!   redelivered, and its output, published again, dropped as a duplicate;
//! - the consumer is re-created from its acknowledgement floor at start, so a restarted run
//!   resumes in stream order (an ordered run's outputs stay in input order across a crash);
//! - a blank payload is acknowledged at once and never becomes a line;
//! - outputs are sent in the order the writer handed them over (input order in ordered mode)
//!   and only their acks are awaited together, so a healthy broker stores them in that order;
//! - a publish or an ack that fails (NATS restarting) is tried again with backoff until it
//!   succeeds or the run is stopped at once: the duplicate window makes a publish sent twice
//!   count once (a retried output may then land after later ones);
//! - the reader sees the end of its input when the run is asked to stop (a signal); NATS
//!   input has no other end.

use super::{EnrichError, Stop};
use crate::nats::{Delivery, JetStreamSink, JetStreamSource, Published, SourceConfig};
use bytes::Bytes;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::StreamExt;
use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// `--input nats://HOST:PORT/STREAM?consumer=NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsInput {
    pub server: String,
    pub stream: String,
    pub consumer: String,
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
    let mut consumer = None;
    for (name, value) in pairs {
        match name {
            "consumer" => consumer = Some(value.to_string()),
            other => {
                return Err(format!(
                    "--input `{input}`: `{other}` is not a parameter (consumer=NAME)"
                ))
            }
        }
    }
    let consumer = consumer
        .ok_or_else(|| format!("--input `{input}`: name the durable consumer: ?consumer=NAME"))?;
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
        },
        output: NatsOutput {
            server: out_server,
            subject: subject.to_string(),
        },
    }))
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
}

impl NatsCounts {
    fn stored(&self, stored: Published) {
        self.published.fetch_add(1, Ordering::Relaxed);
        if stored == Published::Duplicate {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn line(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
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

/// Deliveries handed to the reader and not yet acknowledged, by line number.
#[derive(Default)]
pub struct Pending {
    deliveries: Mutex<HashMap<u64, Delivery>>,
}

impl Pending {
    fn take(&self, line: u64) -> Option<Delivery> {
        self.deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&line)
    }

    fn msg_id(&self, line: u64) -> Option<String> {
        self.deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&line)
            .map(Delivery::msg_id)
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
    rx: Receiver<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
    stop: Arc<Stop>,
    closed: Arc<AtomicBool>,
}

impl Drop for ChannelLines {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
    }
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
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(&[]),
            }
        }
        Ok(&self.current[self.at..])
    }

    fn consume(&mut self, amt: usize) {
        self.at += amt;
    }
}

/// Starts the input thread: connects (said at once if it cannot), then pulls until the
/// reader is gone. Returns the reader's input.
pub(crate) fn start_input(
    input: &NatsInput,
    max_ack_pending: usize,
    pending: Arc<Pending>,
    counts: Arc<NatsCounts>,
    stop: Arc<Stop>,
) -> Result<(ChannelLines, JoinHandle<()>), EnrichError> {
    let config = SourceConfig {
        server: input.server.clone(),
        stream: input.stream.clone(),
        consumer: input.consumer.clone(),
        max_ack_pending,
        ack_wait: Duration::from_secs(30),
        resume_in_order: true,
    };
    let rt = runtime()?;
    let source = rt
        .block_on(JetStreamSource::connect(&config))
        .map_err(|e| EnrichError::Usage(format!("--input: {e}")))?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(256);
    let closed = Arc::new(AtomicBool::new(false));
    let reader_closed = closed.clone();
    let reader_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("sluice-nats-in".into())
        .spawn(move || rt.block_on(pull(source, tx, pending, counts, closed, reader_stop)))
        .map_err(|e| EnrichError::Usage(format!("cannot start the NATS thread: {e}")))?;
    Ok((
        ChannelLines {
            rx,
            current: Vec::new(),
            at: 0,
            stop,
            closed: reader_closed,
        },
        thread,
    ))
}

async fn pull(
    mut source: JetStreamSource,
    tx: SyncSender<Vec<u8>>,
    pending: Arc<Pending>,
    counts: Arc<NatsCounts>,
    closed: Arc<AtomicBool>,
    stop: Arc<Stop>,
) {
    let mut line = 0u64;
    while !closed.load(Ordering::SeqCst) {
        let next = tokio::time::timeout(Duration::from_millis(200), source.next()).await;
        let delivery = match next {
            Err(_) => continue, // nothing for a while: look at `closed` again
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                eprintln!("sluice enrich: {e} (pulling again)");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Ok(Some(Ok(d))) => d,
        };
        counts.delivered.fetch_add(1, Ordering::Relaxed);
        if delivery.delivered > 1 {
            counts.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        if delivery.payload.iter().all(u8::is_ascii_whitespace) {
            ack_until_done(&delivery, &counts, &stop).await;
            continue;
        }
        let mut text: Vec<u8> = delivery
            .payload
            .iter()
            .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b })
            .collect();
        text.push(b'\n');
        line += 1;
        pending
            .deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(line, delivery);
        // The channel is bounded: wait for room, unless the reader is gone.
        let mut text = Some(text);
        while let Some(t) = text.take() {
            match tx.try_send(t) {
                Ok(()) => {}
                Err(std::sync::mpsc::TrySendError::Full(t)) => {
                    if closed.load(Ordering::SeqCst) {
                        return;
                    }
                    text = Some(t);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

/// Acknowledges, trying again (with backoff) until the server confirms or the run is stopped
/// at once.
async fn ack_until_done(delivery: &Delivery, counts: &NatsCounts, stop: &Stop) {
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
    counts.acked.fetch_add(1, Ordering::Relaxed);
}

/// What the writer tells the output thread about a line.
enum Outcome {
    /// Publish this output, then acknowledge the line's delivery.
    Publish(u64, Bytes),
    /// The line writes nothing: acknowledge its delivery.
    Done(u64),
}

/// The writer's side of the output thread.
pub(crate) struct OutputThread {
    tx: Option<tokio::sync::mpsc::Sender<Outcome>>,
    thread: Option<JoinHandle<()>>,
}

/// Publish acks awaited at once, at most.
const PUBLISHES_IN_FLIGHT: usize = 256;

impl OutputThread {
    pub(crate) fn start(
        output: &NatsOutput,
        pending: Arc<Pending>,
        counts: Arc<NatsCounts>,
        stop: Arc<Stop>,
    ) -> Result<OutputThread, EnrichError> {
        let rt = runtime()?;
        let sink = rt
            .block_on(JetStreamSink::connect(&output.server, &output.subject))
            .map_err(|e| EnrichError::Usage(format!("--output: {e}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Outcome>(1024);
        let ends = Ends {
            pending,
            counts,
            stop,
        };
        let thread = std::thread::Builder::new()
            .name("sluice-nats-out".into())
            .spawn(move || rt.block_on(publish(sink, rx, ends)))
            .map_err(|e| EnrichError::Usage(format!("cannot start the NATS thread: {e}")))?;
        Ok(OutputThread {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub(crate) fn publish(&self, line: u64, bytes: Vec<u8>) {
        if let Some(tx) = &self.tx {
            let _ = tx.blocking_send(Outcome::Publish(line, bytes.into()));
        }
    }

    pub(crate) fn done(&self, line: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.blocking_send(Outcome::Done(line));
        }
    }

    /// Waits until every output handed over is published and its delivery acknowledged.
    pub(crate) fn finish(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the output thread's tasks share.
#[derive(Clone)]
struct Ends {
    pending: Arc<Pending>,
    counts: Arc<NatsCounts>,
    stop: Arc<Stop>,
}

impl Ends {
    async fn ack_line(self, line: u64) {
        if let Some(delivery) = self.pending.take(line) {
            ack_until_done(&delivery, &self.counts, &self.stop).await;
        }
    }
}

/// Publishes in the order handed over (so an ordered run's outputs are stored in input order),
/// with up to `PUBLISHES_IN_FLIGHT` publish acks awaited at once, and acknowledges each
/// delivery after its output's ack.
async fn publish(sink: JetStreamSink, mut rx: tokio::sync::mpsc::Receiver<Outcome>, ends: Ends) {
    let mut publishes = FuturesOrdered::new();
    let mut acks = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            outcome = rx.recv(), if open && publishes.len() < PUBLISHES_IN_FLIGHT => match outcome {
                Some(Outcome::Publish(line, bytes)) => {
                    let Some(id) = ends.pending.msg_id(line) else { continue };
                    // Sent here, in the order handed over; only the acks are awaited together.
                    let first = sink.publish(&id, bytes.clone()).await;
                    let (sink, ends) = (sink.clone(), ends.clone());
                    publishes.push_back(async move {
                        let stored = match first {
                            Ok(ack) => ack.await,
                            Err(e) => Err(e),
                        };
                        match stored {
                            Ok(stored) => ends.counts.stored(stored),
                            Err(_) => publish_until_done(&sink, &id, bytes, &ends).await,
                        }
                        line
                    });
                }
                Some(Outcome::Done(line)) => acks.push(ends.clone().ack_line(line)),
                None => open = false,
            },
            Some(line) = publishes.next(), if !publishes.is_empty() => {
                acks.push(ends.clone().ack_line(line));
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
async fn publish_until_done(sink: &JetStreamSink, id: &str, bytes: Bytes, ends: &Ends) {
    let mut wait = Duration::from_millis(50);
    loop {
        let sent = match sink.publish(id, bytes.clone()).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(stored) => return ends.counts.stored(stored),
            Err(_) if ends.stop.at_once() => return,
            Err(e) => {
                ends.counts.retried.fetch_add(1, Ordering::Relaxed);
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
}
