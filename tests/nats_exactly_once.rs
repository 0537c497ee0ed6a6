//! A stage between two JetStream streams, exactly once through a crash between a publish and
//! its source's acknowledgement: the first run publishes outputs for 350 of 500 messages but
//! acknowledges only the first 250 and then drops everything (its connections close without
//! another word); the second run, on the same durable consumer, gets the other 250 redelivered
//! or delivered, publishes them all (100 of them a second time, dropped by the output stream
//! as duplicates of their `Nats-Msg-Id`), and the output stream holds each input once, in
//! input order. Against the NATS server at `NATS_URL` or 127.0.0.1:4222; skipped, saying so,
//! when none answers, unless SLUICE_REQUIRE_NATS=1.

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use sluice::nats::{Delivery, JetStreamSink, JetStreamSource, Published, SourceConfig};
use sluice::{from_fn, Output, OutputMode, Outputs, Stage};
use std::collections::HashMap;
use std::time::Duration;

mod real_nats;
use real_nats::nats_url;

const MESSAGES: u64 = 500;

/// Enriches `{"n":N,...}` with `"segment"` on a one-shard ordered stage.
fn stage() -> Stage<(String, Bytes), (String, Bytes)> {
    Stage::builder(|_| {
        from_fn(|(id, payload): &(String, Bytes)| {
            let (id, payload) = (id.clone(), payload.clone());
            async move {
                let mut record: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                let n = record["n"].as_u64().unwrap();
                record["segment"] = format!("s{}", n % 3).into();
                Ok::<_, std::io::Error>(Outputs::One((
                    id,
                    Bytes::from(serde_json::to_vec(&record).unwrap()),
                )))
            }
        })
    })
    .shards(1)
    .capacity(32)
    .mode(OutputMode::Ordered)
    .start()
    .unwrap()
}

/// One process's run: feeds the source's messages to the stage, publishes its outputs, and
/// acknowledges a source message after its output's publish ack, for the first `ack_up_to`
/// outputs; stops after `publish_up_to` outputs. Returns (published, duplicates, acked).
async fn run(
    source_config: &SourceConfig,
    url: &str,
    out_subject: &str,
    publish_up_to: u64,
    ack_up_to: u64,
) -> (u64, u64, u64) {
    let mut source = JetStreamSource::connect(source_config).await.unwrap();
    let sink = JetStreamSink::connect(url, out_subject).await.unwrap();
    let (mut producer, mut consumer, handle) = stage().split();
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(64);
    let drain = std::thread::spawn(move || {
        while let Some(item) = consumer.recv() {
            if let Output::Record { value, .. } = item.unwrap() {
                if out_tx.blocking_send(value).is_err() {
                    break;
                }
            }
        }
    });
    let deliveries = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<String, Delivery>::new()));
    let feeding = {
        let deliveries = deliveries.clone();
        tokio::spawn(async move {
            while let Some(delivery) = source.next().await {
                let delivery = delivery.unwrap();
                let id = delivery.msg_id();
                let payload = delivery.payload.clone();
                deliveries.lock().unwrap().insert(id.clone(), delivery);
                if producer.push_async((id, payload)).await.is_err() {
                    break;
                }
            }
        })
    };
    let (mut published, mut duplicates, mut acked) = (0, 0, 0);
    while published < publish_up_to {
        let Some((id, payload)) = out_rx.recv().await else {
            break;
        };
        let stored = sink.publish(&id, payload).await.unwrap().await.unwrap();
        published += 1;
        if stored == Published::Duplicate {
            duplicates += 1;
        }
        if published <= ack_up_to {
            let delivery = deliveries.lock().unwrap().remove(&id).unwrap();
            delivery.ack_confirmed().await.unwrap();
            acked += 1;
        }
    }
    // The crash: nothing more is acknowledged; the connections close.
    feeding.abort();
    drop(out_rx);
    drop(deliveries);
    drop(handle);
    let _ = drain.join();
    (published, duplicates, acked)
}

#[test]
fn outputs_are_stored_once_through_a_crash_between_publish_and_ack() {
    let Some(url) = nats_url() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tag = std::process::id();
        let (stream_in, stream_out) = (format!("SLUICE_IN_{tag}"), format!("SLUICE_OUT_{tag}"));
        let out_subject = format!("sluice.out.{tag}");
        let js = jetstream::new(async_nats::connect(&url).await.unwrap());
        for name in [&stream_in, &stream_out] {
            let _ = js.delete_stream(name).await;
        }
        js.create_stream(jetstream::stream::Config {
            name: stream_in.clone(),
            subjects: vec![format!("sluice.in.{tag}")],
            ..Default::default()
        })
        .await
        .unwrap();
        js.create_stream(jetstream::stream::Config {
            name: stream_out.clone(),
            subjects: vec![out_subject.clone()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();
        for n in 0..MESSAGES {
            js.publish(
                format!("sluice.in.{tag}"),
                format!(r#"{{"n":{n},"user":"u{}"}}"#, n % 7).into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        let source = SourceConfig {
            server: url.clone(),
            stream: stream_in.clone(),
            consumer: "enrich".into(),
            max_ack_pending: 200,
            ack_wait: Duration::from_secs(30),
            resume_in_order: true,
            filter_subject: None,
            ack_all: false,
        };
        let first = run(&source, &url, &out_subject, 350, 250).await;
        assert_eq!(first, (350, 0, 250));
        let second = run(&source, &url, &out_subject, MESSAGES - 250, MESSAGES - 250).await;
        assert_eq!(second.0, 250);
        assert_eq!(
            second.1, 100,
            "the 100 published but not acknowledged were dropped as duplicates"
        );
        // The output stream: every input once, in input order.
        let out = js.get_stream(&stream_out).await.unwrap();
        let reader = out
            .create_consumer(jetstream::consumer::pull::Config {
                ack_policy: jetstream::consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = reader
            .fetch()
            .max_messages(MESSAGES as usize + 10)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .unwrap();
        let mut ns = vec![];
        while let Some(m) = messages.next().await {
            let record: serde_json::Value = serde_json::from_slice(&m.unwrap().payload).unwrap();
            let n = record["n"].as_u64().unwrap();
            assert_eq!(record["segment"], format!("s{}", n % 3));
            ns.push(n);
        }
        assert_eq!(ns, (0..MESSAGES).collect::<Vec<_>>());
        for name in [&stream_in, &stream_out] {
            let _ = js.delete_stream(name).await;
        }
    });
}
