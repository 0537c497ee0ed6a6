//! A shard: one glommio `LocalExecutor` thread running one `AsyncWait` operator over its
//! ingress channel, sending what it emits to its egress channel.
//!
//! Owns: the shard's thread and the user function's life cycle. Invariants: the function is
//! created on the shard's thread and closed there after the last output; the shard always
//! ends its egress with `Finished` or `Failed` (a panic in user code becomes `Failed`), unless
//! the consumer is gone; when the consumer is gone the shard stops and drops its input, so the
//! producer's next push fails instead of blocking forever.

use super::merge::Egress;
use crate::clock::GlommioClock;
use crate::error::StageError;
use crate::function::AsyncFunction;
use crate::metrics::MetricsCell;
use crate::operator::{AsyncWait, Element, OperatorConfig};
use futures::{FutureExt, Stream, StreamExt};
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Most outputs sent to the merge in one message.
const MAX_EGRESS_BATCH: usize = 256;

/// The shard's input: takes every queued element in one lock (`drain`) and hands them out one
/// by one, so the producer and the shard meet on the channel's lock once per burst instead of
/// once per record. Holds at most the channel's capacity (the producer may block meanwhile).
pub(crate) struct BatchedIngress<T: 'static> {
    rx: flume::Receiver<T>,
    waiter: flume::r#async::RecvStream<'static, T>,
    buffer: VecDeque<T>,
}

impl<T: 'static> BatchedIngress<T> {
    pub(crate) fn new(rx: flume::Receiver<T>) -> Self {
        BatchedIngress {
            waiter: rx.clone().into_stream(),
            buffer: VecDeque::with_capacity(rx.capacity().unwrap_or(0)),
            rx,
        }
    }
}

impl<T: 'static> Stream for BatchedIngress<T> {
    type Item = T;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(item) = self.buffer.pop_front() {
            return Poll::Ready(Some(item));
        }
        let this = &mut *self;
        this.buffer.extend(this.rx.drain());
        if let Some(item) = this.buffer.pop_front() {
            return Poll::Ready(Some(item));
        }
        // Nothing queued: wait (or learn that the producer is gone).
        this.waiter.poll_next_unpin(cx)
    }
}

impl<T: 'static> Unpin for BatchedIngress<T> {}

/// What a shard learns about itself when its function is created.
#[derive(Debug, Clone, Copy)]
pub struct ShardContext {
    /// This shard's index, `0..shards`.
    pub index: usize,
    /// How many shards the stage has.
    pub shards: usize,
}

pub(crate) struct ShardParts<F: AsyncFunction> {
    pub(crate) context: ShardContext,
    pub(crate) ingress: flume::Receiver<Element<F::In>>,
    pub(crate) egress: flume::Sender<Egress<F::Out>>,
    pub(crate) config: OperatorConfig<F::Out, F::Error>,
    pub(crate) metrics: MetricsCell,
}

/// The body of a shard's executor.
pub(crate) async fn run_shard<F, Fac>(factory: std::sync::Arc<Fac>, parts: ShardParts<F>)
where
    F: AsyncFunction,
    Fac: Fn(ShardContext) -> F + Send + Sync + 'static,
{
    let ShardParts {
        context,
        ingress,
        egress,
        config,
        metrics,
    } = parts;
    let body = AssertUnwindSafe(async {
        let func = factory(context);
        let mut op = AsyncWait::with_metrics(
            BatchedIngress::new(ingress),
            func,
            config,
            GlommioClock,
            Some(metrics),
        );
        // Wait for one output, then take what else is ready now, and send them together.
        while let Some(first) = op.next().await {
            let mut batch = Vec::new();
            let mut failure = None;
            let mut next = Some(first);
            while let Some(item) = next.take() {
                match item {
                    Ok(emitted) => batch.push(emitted),
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
                if batch.len() < MAX_EGRESS_BATCH {
                    // A poll with a no-op waker; the next `op.next().await` polls again with
                    // the task's waker before the shard sleeps, so no wake-up is lost.
                    next = op.next().now_or_never().flatten();
                }
            }
            if !batch.is_empty() && egress.send_async(Egress::Items(batch)).await.is_err() {
                // The consumer is gone: stop; dropping `op` drops the input.
                op.close();
                return true;
            }
            if let Some(error) = failure {
                op.close();
                let _ = egress.send_async(Egress::Failed(error)).await;
                return false;
            }
        }
        op.close();
        true
    });
    match body.catch_unwind().await {
        Ok(true) => {
            let _ = egress.send_async(Egress::Finished).await;
        }
        Ok(false) => {}
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic payload".into());
            let _ = egress
                .send_async(Egress::Failed(StageError::ShardPanicked {
                    shard: context.index,
                    message,
                }))
                .await;
        }
    }
}
