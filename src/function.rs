//! The user's asynchronous function (Flink's `AsyncFunction`) and what it hands back.
//!
//! Owns: the contract between the operator and user code.
//!
//! Invariants the operator keeps for the function:
//! - one instance per shard, created on the shard's thread by the user's factory, so it may hold
//!   `!Send` clients; `close` runs once, at shutdown, on that thread;
//! - `invoke` returns a future whose output completes the record **once**: a future yields one
//!   value and is then dropped, so a second completion cannot be expressed (Flink's
//!   "subsequent `complete` calls are ignored" becomes a type-level fact);
//! - `timeout` and `on_error` are synchronous and return the record's final outcome, so an
//!   override can never leave an entry hanging (FLINK-24686: an empty `timeout()` stalled ordered
//!   mode forever).

use std::fmt::Debug;
use std::future::Future;
use std::marker::PhantomData;

/// Zero or more outputs of one input record.
///
/// One output is stored inline (no allocation), which is the common case for enrichment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outputs<T> {
    /// The record produced nothing (filtered, or a missing key dropped by policy).
    None,
    /// Exactly one output.
    One(T),
    /// Several outputs, in the order they are emitted.
    Many(Vec<T>),
}

impl<T> Outputs<T> {
    /// No outputs.
    pub fn none() -> Self {
        Outputs::None
    }

    /// Number of outputs.
    pub fn len(&self) -> usize {
        match self {
            Outputs::None => 0,
            Outputs::One(_) => 1,
            Outputs::Many(v) => v.len(),
        }
    }

    /// True when there are no outputs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The outputs as a slice.
    pub fn as_slice(&self) -> &[T] {
        match self {
            Outputs::None => &[],
            Outputs::One(t) => std::slice::from_ref(t),
            Outputs::Many(v) => v,
        }
    }
}

impl<T> From<T> for Outputs<T> {
    fn from(t: T) -> Self {
        Outputs::One(t)
    }
}

impl<T> From<Vec<T>> for Outputs<T> {
    fn from(v: Vec<T>) -> Self {
        Outputs::Many(v)
    }
}

impl<T> From<Option<T>> for Outputs<T> {
    fn from(o: Option<T>) -> Self {
        match o {
            Some(t) => Outputs::One(t),
            None => Outputs::None,
        }
    }
}

impl<T> IntoIterator for Outputs<T> {
    type Item = T;
    type IntoIter = OutputsIter<T>;
    fn into_iter(self) -> OutputsIter<T> {
        match self {
            Outputs::None => OutputsIter::Inline(None),
            Outputs::One(t) => OutputsIter::Inline(Some(t)),
            Outputs::Many(v) => OutputsIter::Heap(v.into_iter()),
        }
    }
}

/// Iterator over [`Outputs`].
pub enum OutputsIter<T> {
    #[doc(hidden)]
    Inline(Option<T>),
    #[doc(hidden)]
    Heap(std::vec::IntoIter<T>),
}

impl<T> Iterator for OutputsIter<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        match self {
            OutputsIter::Inline(o) => o.take(),
            OutputsIter::Heap(it) => it.next(),
        }
    }
}

/// What a record whose time ran out (or whose call failed) becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback<T> {
    /// Fail the whole stage with an error naming the input (the default, as in Flink).
    Fail,
    /// Complete the record with these outputs (possibly none) and go on.
    Emit(Outputs<T>),
}

/// The per-record asynchronous call, created once per shard on the shard's own thread.
///
/// `invoke` must not block: it starts the request and returns a future. The future is polled
/// on the shard's thread only, so it may be `!Send`. It must be `'static`: clone what it needs
/// from the input (the input stays owned by the operator, which needs it for retries, for the
/// timeout handler and for snapshots).
pub trait AsyncFunction: 'static {
    /// An input record. `Debug` names it in errors.
    type In: Debug + 'static;
    /// An output record.
    type Out: 'static;
    /// The call's error. It crosses threads inside `StageError`, hence `Send + Sync`.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The future of one attempt.
    type Future: Future<Output = Result<Outputs<Self::Out>, Self::Error>> + 'static;

    /// Start one attempt for `input`.
    fn invoke(&self, input: &Self::In) -> Self::Future;

    /// Called once when the record's timeout (which covers all attempts) expires.
    /// The default fails the stage, as Flink's default `timeout()` does.
    fn timeout(&self, input: &Self::In) -> Fallback<Self::Out> {
        let _ = input;
        Fallback::Fail
    }

    /// Called once when an attempt fails and the retry policy does not retry it.
    /// The default fails the stage with the error and the input.
    fn on_error(&self, input: &Self::In, error: &Self::Error) -> Fallback<Self::Out> {
        let _ = (input, error);
        Fallback::Fail
    }

    /// Called once at shutdown on the shard's thread, after the last output left the shard
    /// (Flink's `RichAsyncFunction.close`).
    fn close(&mut self) {}

    /// Called on the shard's thread each time the operator publishes its metrics (every 1024
    /// records, when it goes idle, at most every 50 ms), for a function that publishes
    /// figures of its own at the same cadence. The default does nothing.
    fn metrics_published(&self) {}
}

/// An [`AsyncFunction`] made from a closure that returns a future: no trait impl, no boxing.
///
/// ```
/// use sluice::{from_fn, AsyncFunction, Outputs};
/// let f = from_fn(|x: &u64| {
///     let x = *x;
///     async move { Ok::<_, std::io::Error>(Outputs::One(x * 2)) }
/// });
/// # let _ = f.invoke(&1);
/// ```
pub fn from_fn<I, O, E, Fut, C>(call: C) -> FnFunction<I, C>
where
    I: Debug + 'static,
    O: 'static,
    E: std::error::Error + Send + Sync + 'static,
    Fut: Future<Output = Result<Outputs<O>, E>> + 'static,
    C: Fn(&I) -> Fut + 'static,
{
    FnFunction {
        call,
        _input: PhantomData,
    }
}

/// See [`from_fn`].
pub struct FnFunction<I, C> {
    call: C,
    _input: PhantomData<fn(&I)>,
}

impl<I, O, E, Fut, C> AsyncFunction for FnFunction<I, C>
where
    I: Debug + 'static,
    O: 'static,
    E: std::error::Error + Send + Sync + 'static,
    Fut: Future<Output = Result<Outputs<O>, E>> + 'static,
    C: Fn(&I) -> Fut + 'static,
{
    type In = I;
    type Out = O;
    type Error = E;
    type Future = Fut;

    fn invoke(&self, input: &I) -> Fut {
        (self.call)(input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_iterate_in_order_and_report_length() {
        let many: Outputs<u8> = vec![1, 2, 3].into();
        assert_eq!(many.len(), 3);
        assert_eq!(many.as_slice(), &[1, 2, 3]);
        assert_eq!(many.into_iter().collect::<Vec<_>>(), vec![1, 2, 3]);
        let one: Outputs<u8> = 7.into();
        assert_eq!(one.into_iter().collect::<Vec<_>>(), vec![7]);
        assert!(Outputs::<u8>::none().is_empty());
        assert_eq!(Outputs::<u8>::from(None).len(), 0);
    }
}
