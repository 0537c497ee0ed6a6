//! NATS JetStream in and out of a stage, exactly once (feature `nats`): a durable pull
//! consumer as the source ([`JetStreamSource`]), a subject of an output stream as the sink
//! ([`JetStreamSink`]), and the rule that joins them: a source message is acknowledged only
//! after the output it produced is acknowledged by the output stream. [`group`] splits a
//! stream's partitions between processes, with leases in a key-value bucket.
//!
//! Owns: the NATS side of a stage. The client (`async-nats`) runs on tokio, on the threads that
//! feed and drain the stage, never on a shard. Invariants:
//! - the source is a durable pull consumer with explicit acks and at most `max_ack_pending`
//!   messages unacknowledged, so a stage's memory bound is also the broker's redelivery bound;
//! - every output is published with `Nats-Msg-Id` = the source message's stream and sequence
//!   ([`Delivery::msg_id`]): a redelivered message enriched again publishes the same id, and
//!   the output stream drops it as a duplicate within its duplicate window;
//! - a source message is acknowledged only after its output's publish ack, so a crash at any
//!   moment leaves every message not acknowledged (or whose ack was lost) to be redelivered,
//!   and every acknowledged one published: exactly once in the output stream, as long as a
//!   redelivery comes within the duplicate window (size it above the consumer's `ack_wait`
//!   plus the longest a process may be down).

pub mod group;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// The header JetStream deduplicates publishes by.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// What went wrong talking to NATS: which step, and the client's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NATS at {server}: {step}: {reason}")]
pub struct NatsError {
    pub server: String,
    pub step: &'static str,
    pub reason: String,
}

fn failed<'a>(server: &'a str, step: &'static str) -> impl Fn(String) -> NatsError + 'a {
    move |reason| NatsError {
        server: server.to_string(),
        step,
        reason,
    }
}

/// Connects to `server` (`nats://HOST:PORT`) for JetStream.
pub async fn connect(server: &str) -> Result<jetstream::Context, NatsError> {
    let client = async_nats::connect(server)
        .await
        .map_err(|e| failed(server, "connect")(e.to_string()))?;
    Ok(jetstream::new(client))
}

/// The source's settings.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// `nats://HOST:PORT`.
    pub server: String,
    pub stream: String,
    /// The durable consumer's name: a restarted process with the same name goes on where the
    /// last one's acknowledgements ended.
    pub consumer: String,
    /// Messages handed out and not yet acknowledged, at most.
    pub max_ack_pending: usize,
    /// How long the server waits for an acknowledgement before it redelivers.
    pub ack_wait: Duration,
    /// Start again from the first message not acknowledged, in stream order: the consumer is
    /// re-created from its acknowledgement floor (what was acknowledged after it is delivered
    /// once more, and its outputs dropped as duplicates). Without it, messages a crashed run
    /// left unacknowledged are redelivered only after `ack_wait`, behind newer ones: right for
    /// an unordered stage, wrong for an ordered one. Only for a consumer this process owns
    /// alone.
    pub resume_in_order: bool,
    /// Only the stream's messages on this subject (a partition's), if given.
    pub filter_subject: Option<String>,
    /// Acknowledging a message acknowledges every one before it (the consumer's ack policy
    /// `all`): one ack per window of messages handled in order, for a program that finishes
    /// them in stream order. Otherwise each message is acknowledged on its own (`explicit`).
    pub ack_all: bool,
}

/// A message from the source, with what acknowledges it.
pub struct Delivery {
    pub payload: Bytes,
    /// The source's stream (shared by its deliveries).
    pub stream: Arc<str>,
    pub sequence: u64,
    /// 1 the first time, more on redelivery.
    pub delivered: i64,
    message: jetstream::Message,
}

impl Delivery {
    /// The output's `Nats-Msg-Id`: the source stream and sequence, the same on redelivery.
    pub fn msg_id(&self) -> String {
        format!("{}:{}", self.stream, self.sequence)
    }

    /// Acknowledges the message: the ack is sent, not confirmed, so one lost on the way (a
    /// crash, a dropped connection) brings the message back, and its output, published again
    /// with the same `msg_id`, is dropped by the output stream as a duplicate. One message
    /// each way per delivery is the cheapest exactly-once there is with JetStream.
    pub async fn ack(&self) -> Result<(), async_nats::Error> {
        self.message.ack().await
    }

    /// Acknowledges the message and waits for the server to confirm it (a double ack): once
    /// this returns, the message will not be redelivered. A round trip per message.
    pub async fn ack_confirmed(&self) -> Result<(), async_nats::Error> {
        self.message.double_ack().await
    }
}

/// A durable pull consumer on a stream; see the module documentation.
pub struct JetStreamSource {
    messages: pull::Stream,
    server: String,
    /// The stream's name, shared by its deliveries.
    stream: Arc<str>,
}

impl JetStreamSource {
    /// Connects, and creates the durable consumer if it is not there (or takes it as it is).
    pub async fn connect(config: &SourceConfig) -> Result<JetStreamSource, NatsError> {
        Self::open(&connect(&config.server).await?, config).await
    }

    /// As [`JetStreamSource::connect`], on a connection already made.
    pub async fn open(
        js: &jetstream::Context,
        config: &SourceConfig,
    ) -> Result<JetStreamSource, NatsError> {
        let server = config.server.as_str();
        let stream = js
            .get_stream(&config.stream)
            .await
            .map_err(|e| failed(server, "find the input stream")(e.to_string()))?;
        let mut deliver_policy = jetstream::consumer::DeliverPolicy::All;
        if config.resume_in_order {
            if let Ok(info) = stream.consumer_info(&config.consumer).await {
                deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: info.ack_floor.stream_sequence + 1,
                };
                stream
                    .delete_consumer(&config.consumer)
                    .await
                    .map_err(|e| failed(server, "re-create the consumer")(e.to_string()))?;
            }
        }
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                &config.consumer,
                pull::Config {
                    durable_name: Some(config.consumer.clone()),
                    ack_policy: if config.ack_all {
                        AckPolicy::All
                    } else {
                        AckPolicy::Explicit
                    },
                    ack_wait: config.ack_wait,
                    max_ack_pending: config.max_ack_pending as i64,
                    deliver_policy,
                    filter_subject: config.filter_subject.clone().unwrap_or_default(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| failed(server, "create the consumer")(e.to_string()))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(config.max_ack_pending.clamp(1, 1024))
            .messages()
            .await
            .map_err(|e| failed(server, "pull messages")(e.to_string()))?;
        Ok(JetStreamSource {
            messages,
            server: server.to_string(),
            stream: config.stream.as_str().into(),
        })
    }

    /// The next message (waiting for one); `None` when the subscription ended.
    pub async fn next(&mut self) -> Option<Result<Delivery, NatsError>> {
        let message = match self.messages.next().await? {
            Ok(m) => m,
            Err(e) => return Some(Err(failed(&self.server, "pull")(e.to_string()))),
        };
        // The consumer is on `self.stream`: its messages' stream is that one.
        let (sequence, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(e) => {
                return Some(Err(failed(&self.server, "read the reply subject")(
                    e.to_string(),
                )))
            }
        };
        Some(Ok(Delivery {
            payload: message.payload.clone(),
            stream: self.stream.clone(),
            sequence,
            delivered,
            message,
        }))
    }
}

/// The subject of partition `p` of a stream whose subjects end in a partition number: the
/// stream's first subject of the form `PREFIX.*` gives `PREFIX.<p>`.
pub async fn partition_subjects(
    js: &jetstream::Context,
    server: &str,
    stream: &str,
) -> Result<impl Fn(u32) -> String, NatsError> {
    let mut stream = js
        .get_stream(stream)
        .await
        .map_err(|e| failed(server, "find the input stream")(e.to_string()))?;
    let info = stream
        .info()
        .await
        .map_err(|e| failed(server, "find the input stream")(e.to_string()))?;
    let prefix = info
        .config
        .subjects
        .iter()
        .find_map(|s| s.strip_suffix(".*"))
        .map(str::to_string)
        .ok_or_else(|| {
            failed(server, "find the input stream's partitions")(format!(
                "stream {} has no subject PREFIX.* (its subjects: {:?}): a group needs \
                 subjects ending in a partition number",
                info.config.name, info.config.subjects
            ))
        })?;
    Ok(move |p: u32| format!("{prefix}.{p}"))
}

/// Publishes outputs to a subject of a stream, each with its `Nats-Msg-Id`.
#[derive(Clone)]
pub struct JetStreamSink {
    js: jetstream::Context,
    /// Shared, not copied, by every publish (and the server by every publish ack's error).
    subject: async_nats::Subject,
    server: Arc<str>,
}

/// How a publish ended: stored, or dropped as a duplicate of one stored before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Stored,
    Duplicate,
}

impl JetStreamSink {
    pub async fn connect(server: &str, subject: &str) -> Result<JetStreamSink, NatsError> {
        Ok(JetStreamSink {
            js: connect(server).await?,
            subject: subject.to_string().into(),
            server: server.into(),
        })
    }

    /// The stream that captures `subject` (the sink's when `None`): an error, naming the
    /// subject, when none does (a publish there would never be acknowledged).
    pub async fn stream_of(&self, subject: Option<&str>) -> Result<String, NatsError> {
        let subject = subject.unwrap_or(self.subject.as_str());
        self.js.stream_by_subject(subject).await.map_err(|e| {
            failed(&self.server, "find the stream of a subject")(format!("{subject}: {e}"))
        })
    }

    /// Sends one output; the returned future waits for the stream's ack. Sends made one after
    /// the other reach the stream in that order (one connection), so an ordered stage's
    /// outputs are stored in input order while several acks are awaited at once.
    pub async fn publish(
        &self,
        msg_id: &str,
        payload: Bytes,
    ) -> Result<impl std::future::Future<Output = Result<Published, NatsError>>, NatsError> {
        self.publish_to(None, msg_id, payload).await
    }

    /// As [`JetStreamSink::publish`], to `subject` instead of the sink's when given (a
    /// dead-letter subject of another stream on the same server).
    pub async fn publish_to(
        &self,
        subject: Option<&async_nats::Subject>,
        msg_id: &str,
        payload: Bytes,
    ) -> Result<impl std::future::Future<Output = Result<Published, NatsError>>, NatsError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(MSG_ID, msg_id);
        let subject = subject.unwrap_or(&self.subject).clone();
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| failed(&self.server, "publish")(e.to_string()))?;
        let server = self.server.clone();
        Ok(async move {
            let ack = ack
                .await
                .map_err(|e| failed(&server, "the publish ack")(e.to_string()))?;
            Ok(if ack.duplicate {
                Published::Duplicate
            } else {
                Published::Stored
            })
        })
    }
}
