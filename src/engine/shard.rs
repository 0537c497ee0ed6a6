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
use futures::{FutureExt, StreamExt};
use std::panic::AssertUnwindSafe;

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
            ingress.into_stream(),
            func,
            config,
            GlommioClock,
            Some(metrics),
        );
        while let Some(item) = op.next().await {
            match item {
                Ok(emitted) => {
                    if egress.send_async(Egress::Item(emitted)).await.is_err() {
                        // The consumer is gone: stop; dropping `op` drops the input.
                        op.close();
                        return true;
                    }
                }
                Err(error) => {
                    op.close();
                    let _ = egress.send_async(Egress::Failed(error)).await;
                    return false;
                }
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
