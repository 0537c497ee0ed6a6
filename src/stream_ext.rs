//! `AsyncWaitExt`: the operator as a `futures::Stream` combinator on one thread, like
//! `buffered`/`buffer_unordered` but with a timeout per record, retries and metrics.
//!
//! Owns: tagging a plain stream of inputs with sequence numbers and flattening the outputs.
//! Invariant: the inner `AsyncWait` keeps every operator guarantee; this adapter only adds
//! `seq = position in the input` and removes the envelope.

use crate::clock::{Clock, GlommioClock};
use crate::error::StageError;
use crate::function::{AsyncFunction, OutputsIter};
use crate::operator::{AsyncWait, Element, Emitted, OperatorConfig};
use futures::Stream;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Tags each input with its position.
pub struct Tagged<S> {
    inner: S,
    next_seq: u64,
}

impl<S: Stream + Unpin> Stream for Tagged<S> {
    type Item = Element<S::Item>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(input)) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                Poll::Ready(Some(Element::Record {
                    seq,
                    key: seq,
                    input,
                    pushed_at: None,
                }))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// See [`AsyncWaitExt::async_wait`].
pub struct AsyncWaitStream<S: Stream, F: AsyncFunction<In = S::Item>, C: Clock> {
    op: AsyncWait<Tagged<S>, F, C>,
    current: Option<OutputsIter<F::Out>>,
}

impl<S, F, C> AsyncWaitStream<S, F, C>
where
    S: Stream + Unpin,
    F: AsyncFunction<In = S::Item>,
    C: Clock,
{
    /// The operator inside (metrics, occupancy).
    pub fn operator(&self) -> &AsyncWait<Tagged<S>, F, C> {
        &self.op
    }
}

impl<S, F, C> Stream for AsyncWaitStream<S, F, C>
where
    S: Stream + Unpin,
    F: AsyncFunction<In = S::Item>,
    C: Clock,
{
    type Item = Result<F::Out, StageError>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(out) = this.current.as_mut().and_then(Iterator::next) {
                return Poll::Ready(Some(Ok(out)));
            }
            this.current = None;
            match Pin::new(&mut this.op).poll_next(cx) {
                Poll::Ready(Some(Ok(Emitted::Record { outputs, .. }))) => {
                    this.current = Some(outputs.into_iter())
                }
                Poll::Ready(Some(Ok(Emitted::Watermark { .. }))) => {}
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    this.op.close();
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: Stream + Unpin, F: AsyncFunction<In = S::Item>, C: Clock> Unpin
    for AsyncWaitStream<S, F, C>
{
}

/// Adds [`async_wait`](AsyncWaitExt::async_wait) to every `Unpin` stream.
pub trait AsyncWaitExt: Stream + Unpin + Sized
where
    Self::Item: std::fmt::Debug + 'static,
{
    /// Calls `func` on each input with at most `config.capacity` calls in flight, inside a
    /// glommio executor, yielding outputs in `config.mode` order.
    fn async_wait<F>(
        self,
        func: F,
        config: OperatorConfig<F::Out, F::Error>,
    ) -> AsyncWaitStream<Self, F, GlommioClock>
    where
        F: AsyncFunction<In = Self::Item>,
    {
        self.async_wait_with_clock(func, config, GlommioClock)
    }

    /// As [`async_wait`](AsyncWaitExt::async_wait), timed by `clock`.
    fn async_wait_with_clock<F, C>(
        self,
        func: F,
        config: OperatorConfig<F::Out, F::Error>,
        clock: C,
    ) -> AsyncWaitStream<Self, F, C>
    where
        F: AsyncFunction<In = Self::Item>,
        C: Clock,
    {
        let input = Tagged {
            inner: self,
            next_seq: 0,
        };
        AsyncWaitStream {
            op: AsyncWait::new(input, func, config, clock),
            current: None,
        }
    }
}

impl<S> AsyncWaitExt for S
where
    S: Stream + Unpin + Sized,
    S::Item: std::fmt::Debug + 'static,
{
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SimClock;
    use crate::function::{from_fn, Outputs};
    use crate::operator::OutputMode;
    use futures::StreamExt;

    #[test]
    fn flattens_outputs_in_input_order() {
        let clock = SimClock::new();
        let c = clock.clone();
        let func = from_fn(move |&v: &u64| {
            let sleep = c.sleep(std::time::Duration::from_millis(10 - v));
            async move {
                sleep.await;
                Ok::<_, std::io::Error>(Outputs::Many(vec![v, v + 100]))
            }
        });
        let mut config = OperatorConfig::new();
        config.mode = OutputMode::Ordered;
        let mut s =
            futures::stream::iter(0..5u64).async_wait_with_clock(func, config, clock.clone());
        let mut out = vec![];
        futures::executor::block_on(async {
            loop {
                match futures::poll!(s.next()) {
                    Poll::Ready(Some(v)) => out.push(v.unwrap()),
                    Poll::Ready(None) => break,
                    Poll::Pending => clock.advance(std::time::Duration::from_millis(1)),
                }
            }
        });
        assert_eq!(out, vec![0, 100, 1, 101, 2, 102, 3, 103, 4, 104]);
    }
}
