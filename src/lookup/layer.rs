//! `Lookups`: a shard's lookup layer over a [`BatchLookup`] backend, and [`Get`], the future of
//! one record's lookup.
//!
//! Owns: the keys waiting to be sent (`queue`), the keys pending (queued or in flight) for
//! coalescing, the cache, the limits and the breaker, and the driver task that sends batches
//! and hands their answers out. Invariants:
//! - a lookup is answered from the cache, joins a pending request for its key (coalescing), is
//!   refused (open breaker), or is queued; a queued key is sent in one batch of at most
//!   `LayerConfig::batch_cap` keys (the batch size, capped at a share of the window), or
//!   dropped unsent when every record waiting for it is gone;
//! - every waiting record gets its key's answer: the value, missing, or the request's error
//!   (cloned), once; a failed batch fails each of its records, which the operator then retries
//!   or fails one by one under its own policy;
//! - at most `limit` keys are in flight to the backend, and sending respects the rate limit
//!   and the breaker; keys wait in `queue`, in arrival order, for room;
//! - a key invalidated while its request is in flight is answered but not cached (its answer
//!   may predate the write); what the backend says was written (`BatchLookup::invalidated`)
//!   is dropped from the cache before any lookup is answered from it;
//! - the driver sends what was queued in the current turn of the shard: it runs after the task
//!   that looked the keys up yields, so with zero linger a batch holds what one turn issued.

use super::breaker::{Admit, Breaker};
use super::cache::Cache;
use super::limit::Limiter;
use super::rate::TokenBucket;
use super::{BatchLookup, Concurrency, Invalidated, LayerConfig, LayerStats, LookupError, Values};
use crate::clock::{Clock, GlommioClock, Timer};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use smallvec::SmallVec;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

type Answer<E> = Result<Option<Bytes>, LookupError<E>>;

/// One key's pending lookup, shared by the records waiting for it.
struct Waiting<E> {
    answer: RefCell<Option<Answer<E>>>,
    /// One slot per `Get` (its index is the `Get`'s), so a re-poll replaces its own waker.
    wakers: RefCell<SmallVec<[Option<Waker>; 1]>>,
    /// `Get`s alive and unanswered.
    waiters: Cell<usize>,
    /// Invalidated while pending: answer, but do not cache.
    stale: Cell<bool>,
}

impl<E: Clone> Waiting<E> {
    fn new() -> Rc<Waiting<E>> {
        Rc::new(Waiting {
            answer: RefCell::new(None),
            wakers: RefCell::new(SmallVec::new()),
            waiters: Cell::new(0),
            stale: Cell::new(false),
        })
    }

    fn answer(&self, answer: Answer<E>) {
        *self.answer.borrow_mut() = Some(answer);
        for w in self.wakers.borrow_mut().drain(..).flatten() {
            w.wake();
        }
    }
}

struct Queued<E> {
    key: Rc<[u8]>,
    waiting: Rc<Waiting<E>>,
    /// When it was queued (read only with a linger).
    at: Option<Instant>,
}

/// The keys pending, for coalescing. Keys come from the input, so a keyed hash that resists
/// flooding, at a fraction of SipHash's cost per lookup.
type Pending<E> = HashMap<Rc<[u8]>, Rc<Waiting<E>>, ahash::RandomState>;

/// The clock, read at most once per call and only when something needs it (a read per record
/// showed in the profile).
struct Now(Option<Instant>);

impl Now {
    fn get(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}

struct State<E> {
    pending: Pending<E>,
    queue: VecDeque<Queued<E>>,
    keys_in_flight: usize,
    cache: Option<Cache>,
    limiter: Option<Limiter>,
    breaker: Option<Breaker>,
    bucket: Option<TokenBucket>,
    stats: LayerStats,
    driver: Option<Waker>,
    closed: bool,
}

/// Requests the driver takes over from records that led them and were dropped first (a
/// timeout) while other records wait for their answer.
type Adopted<B> = Vec<InFlight<<B as BatchLookup>::Error, <B as BatchLookup>::Future>>;

impl<E> State<E> {
    fn invalidate(&mut self, key: &[u8]) {
        if let Some(cache) = &mut self.cache {
            cache.remove(key);
        }
        if let Some(w) = self.pending.get(key) {
            w.stale.set(true);
        }
    }

    fn flush_cache(&mut self) {
        if let Some(cache) = &mut self.cache {
            cache.clear();
        }
        for w in self.pending.values() {
            w.stale.set(true);
        }
    }

    /// What the backend said was written.
    fn apply(&mut self, invalidated: Invalidated) {
        match invalidated {
            Invalidated::Keys(keys) => {
                self.stats.invalidated += keys.len() as u64;
                for key in keys {
                    self.invalidate(&key);
                }
            }
            Invalidated::All => {
                self.stats.cache_flushes += 1;
                self.flush_cache();
            }
        }
    }
}

struct Shared<B: BatchLookup> {
    backend: B,
    config: LayerConfig,
    /// No part needs the driver to send (no batching, linger, limits or breaker): a lookup
    /// sends its own request and its record's `Get` polls it (see `Lead`).
    direct: bool,
    state: RefCell<State<B::Error>>,
    adopted: RefCell<Adopted<B>>,
}

/// See the module documentation. Dropping it lets the driver finish what is in flight and end.
pub struct Lookups<B: BatchLookup> {
    shared: Rc<Shared<B>>,
}

impl<B: BatchLookup> Lookups<B> {
    /// The layer over `backend`, with its driver spawned on the current glommio executor.
    pub fn new(backend: B, config: LayerConfig) -> Lookups<B> {
        let now = Instant::now();
        let state = State {
            pending: HashMap::default(),
            queue: VecDeque::new(),
            keys_in_flight: 0,
            cache: config.cache.clone().map(Cache::new),
            limiter: match &config.concurrency {
                Concurrency::Fixed => None,
                Concurrency::Adaptive(a) => Some(Limiter::new(a.clone())),
            },
            breaker: config.breaker.clone().map(Breaker::new),
            bucket: config.max_rate.map(|r| TokenBucket::new(r, now)),
            stats: LayerStats::default(),
            driver: None,
            closed: false,
        };
        let direct = config.batch_size.get() == 1
            && config.linger.is_zero()
            && state.limiter.is_none()
            && state.bucket.is_none()
            && state.breaker.is_none();
        let shared = Rc::new(Shared {
            backend,
            config,
            direct,
            state: RefCell::new(state),
            adopted: RefCell::new(Vec::new()),
        });
        glommio::spawn_local(drive(shared.clone())).detach();
        Lookups { shared }
    }

    pub fn backend(&self) -> &B {
        &self.shared.backend
    }

    pub fn config(&self) -> &LayerConfig {
        &self.shared.config
    }

    /// Looks `key` up.
    pub fn get(&self, key: &[u8]) -> Get<B> {
        let shared = &self.shared;
        let mut st = shared.state.borrow_mut();
        let st = &mut *st;
        st.stats.lookups += 1;
        let mut now = Now(None);
        if st.cache.is_some() {
            if let Some(invalidated) = shared.backend.invalidated() {
                st.apply(invalidated);
            }
        }
        if let Some(cache) = &mut st.cache {
            if let Some(value) = cache.get(key, now.get()) {
                st.stats.cache_hits += 1;
                return Get::ready(Ok(value));
            }
        }
        if shared.config.coalesce {
            if let Some(w) = st.pending.get(key) {
                st.stats.coalesced += 1;
                return Get::waiting(w.clone());
            }
        }
        if let Some(breaker) = &mut st.breaker {
            if breaker.is_open(now.get()) {
                st.stats.rejected += 1;
                return Get::ready(Err(open_error(breaker)));
            }
        }
        if shared.direct {
            return self.lead(st, key);
        }
        let key: Rc<[u8]> = Rc::from(key);
        let waiting = Waiting::new();
        if shared.config.coalesce {
            st.pending.insert(key.clone(), waiting.clone());
        }
        let get = Get::waiting(waiting.clone());
        st.queue.push_back(Queued {
            key,
            waiting,
            at: (!shared.config.linger.is_zero()).then(|| now.get()),
        });
        if let Some(w) = &st.driver {
            w.wake_by_ref();
        }
        get
    }

    /// Sends `key`'s request now, for the record's `Get` to poll: no hand-over to the driver
    /// and back. Records that look the key up meanwhile join it (coalescing).
    fn lead(&self, st: &mut State<B::Error>, key: &[u8]) -> Get<B> {
        let shared = &self.shared;
        st.stats.requests += 1;
        st.stats.keys_sent += 1;
        let request = shared.backend.get_one(key);
        let shares = shared.config.coalesce || st.cache.is_some();
        let (key, waiting) = if shares {
            let key: Rc<[u8]> = Rc::from(key);
            let waiting = Waiting::new();
            if shared.config.coalesce {
                st.pending.insert(key.clone(), waiting.clone());
            }
            (Some(key), Some(waiting))
        } else {
            (None, None)
        };
        Get {
            inner: GetInner::Leading(Some(Lead {
                shared: shared.clone(),
                request,
                key,
                waiting,
            })),
        }
    }

    /// Drops `key` from the cache; a lookup of it in flight is answered but not cached.
    pub fn invalidate(&self, key: &[u8]) {
        self.shared.state.borrow_mut().invalidate(key);
    }

    /// Drops every cached entry (and marks every pending lookup stale).
    pub fn flush_cache(&self) {
        self.shared.state.borrow_mut().flush_cache();
    }

    /// What the layer did so far.
    pub fn stats(&self) -> LayerStats {
        let st = self.shared.state.borrow();
        let mut stats = st.stats.clone();
        if let Some(l) = &st.limiter {
            let (min, max) = l.range();
            stats.limit = Some(l.limit() as u64);
            stats.limit_min = Some(min as u64);
            stats.limit_max = Some(max as u64);
        }
        if let Some(b) = &st.breaker {
            stats.breaker_opened = b.times_opened();
            stats.breakers_tripped = u64::from(b.is_tripped());
        }
        stats
    }

    /// The adaptive limit now, if there is one.
    pub fn limit(&self) -> Option<usize> {
        self.shared
            .state
            .borrow()
            .limiter
            .as_ref()
            .map(|l| l.limit())
    }

    /// Entries in the cache (0 without one).
    pub fn cached(&self) -> usize {
        let st = self.shared.state.borrow();
        st.cache.as_ref().map_or(0, |c| c.len())
    }
}

impl<B: BatchLookup> Drop for Lookups<B> {
    fn drop(&mut self) {
        let mut st = self.shared.state.borrow_mut();
        st.closed = true;
        if let Some(w) = st.driver.take() {
            w.wake();
        }
    }
}

fn open_error<E>(breaker: &Breaker) -> LookupError<E> {
    LookupError::CircuitOpen {
        failures: breaker.config().failures.get(),
        cool_down: breaker.config().cool_down,
    }
}

/// One record's lookup: the value, `None` for a missing key, or why it failed.
pub struct Get<B: BatchLookup> {
    inner: GetInner<B>,
}

/// A request a record's `Get` sent itself and polls: the key and the records sharing it
/// when the answer is cached or shared (coalescing).
struct Lead<B: BatchLookup> {
    shared: Rc<Shared<B>>,
    request: B::Future,
    key: Option<Rc<[u8]>>,
    waiting: Option<Rc<Waiting<B::Error>>>,
}

enum GetInner<B: BatchLookup> {
    Ready(Option<Answer<B::Error>>),
    Waiting {
        waiting: Rc<Waiting<B::Error>>,
        slot: Option<usize>,
        done: bool,
    },
    /// `None` once answered.
    Leading(Option<Lead<B>>),
}

impl<B: BatchLookup> Get<B> {
    fn ready(answer: Answer<B::Error>) -> Get<B> {
        Get {
            inner: GetInner::Ready(Some(answer)),
        }
    }

    fn waiting(waiting: Rc<Waiting<B::Error>>) -> Get<B> {
        waiting.waiters.set(waiting.waiters.get() + 1);
        Get {
            inner: GetInner::Waiting {
                waiting,
                slot: None,
                done: false,
            },
        }
    }
}

// Nothing in a `Get` is structurally pinned (the backend's future is `Unpin`).
impl<B: BatchLookup> Unpin for Get<B> {}

impl<B: BatchLookup> Future for Get<B> {
    type Output = Answer<B::Error>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer<B::Error>> {
        match &mut self.get_mut().inner {
            GetInner::Ready(answer) => Poll::Ready(answer.take().expect("polled after completion")),
            GetInner::Leading(lead) => {
                let l = lead.as_mut().expect("polled after completion");
                let Poll::Ready(result) = Pin::new(&mut l.request).poll(cx) else {
                    return Poll::Pending;
                };
                let l = lead.take().expect("present above");
                Poll::Ready(l.shared.finish_lead(l.key, l.waiting, result))
            }
            GetInner::Waiting {
                waiting,
                slot,
                done,
            } => {
                if let Some(answer) = waiting.answer.borrow().as_ref() {
                    assert!(!*done, "polled after completion");
                    *done = true;
                    waiting.waiters.set(waiting.waiters.get() - 1);
                    return Poll::Ready(answer.clone());
                }
                let mut wakers = waiting.wakers.borrow_mut();
                match *slot {
                    Some(i) => wakers[i] = Some(cx.waker().clone()),
                    None => {
                        *slot = Some(wakers.len());
                        wakers.push(Some(cx.waker().clone()));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl<B: BatchLookup> Drop for Get<B> {
    fn drop(&mut self) {
        match &mut self.inner {
            GetInner::Waiting {
                waiting,
                slot,
                done: false,
            } => {
                waiting.waiters.set(waiting.waiters.get() - 1);
                if let Some(i) = *slot {
                    if let Some(w) = waiting.wakers.borrow_mut().get_mut(i) {
                        *w = None;
                    }
                }
            }
            GetInner::Leading(lead) => {
                if let Some(l) = lead.take() {
                    let shared = l.shared.clone();
                    shared.abandon_lead(l);
                }
            }
            _ => {}
        }
    }
}

/// A batch on its way: its keys, when it left (with an adaptive limit), the keys in flight
/// then, and the request.
struct InFlight<E, F> {
    keys: Vec<Queued<E>>,
    sent_at: Option<Instant>,
    in_flight: usize,
    request: F,
}

type Done<E> = (Vec<Queued<E>>, Option<Instant>, usize, Result<Values, E>);

impl<E, F> Unpin for InFlight<E, F> {}

impl<E, F: Future<Output = Result<Values, E>> + Unpin> Future for InFlight<E, F> {
    type Output = Done<E>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Done<E>> {
        let this = self.get_mut();
        Pin::new(&mut this.request).poll(cx).map(|r| {
            (
                std::mem::take(&mut this.keys),
                this.sent_at,
                this.in_flight,
                r,
            )
        })
    }
}

/// What the driver does next after sending what it could.
enum Next {
    /// Nothing to send until a request is answered or a key is looked up.
    Idle,
    /// Sending must wait for a linger or for the rate limit's next token.
    At(Instant),
}

/// The driver: sends batches as the limits allow and hands answers out, until the layer is
/// dropped and nothing is left in flight.
async fn drive<B: BatchLookup>(shared: Rc<Shared<B>>) {
    let mut in_flight = FuturesUnordered::new();
    let mut timer = GlommioClock.timer();
    std::future::poll_fn(|cx| loop {
        let mut progress = false;
        for adopted in shared.adopted.borrow_mut().drain(..) {
            in_flight.push(adopted);
        }
        while let Poll::Ready(Some(done)) = in_flight.poll_next_unpin(cx) {
            shared.complete(done);
            progress = true;
        }
        let (sent, next) = shared.send(&mut in_flight);
        progress |= sent;
        if let Next::At(at) = next {
            if timer.poll_at(at, cx).is_ready() {
                continue;
            }
        }
        if progress {
            continue;
        }
        let mut st = shared.state.borrow_mut();
        if st.closed && st.queue.is_empty() && in_flight.is_empty() {
            return Poll::Ready(());
        }
        st.driver = Some(cx.waker().clone());
        return Poll::Pending;
    })
    .await
}

impl<B: BatchLookup> Shared<B> {
    /// A led request's answer: shared with the records that joined it, cached, counted.
    fn finish_lead(
        &self,
        key: Option<Rc<[u8]>>,
        waiting: Option<Rc<Waiting<B::Error>>>,
        result: Result<Values, B::Error>,
    ) -> Answer<B::Error> {
        let answer = match result {
            Ok(mut values) if values.len() == 1 => Ok(values.pop().expect("one value")),
            Ok(values) => Err(LookupError::Answer {
                expected: 1,
                got: values.len(),
            }),
            Err(e) => Err(LookupError::Backend(e)),
        };
        let mut st = self.state.borrow_mut();
        let st = &mut *st;
        if answer.is_err() {
            st.stats.failed_requests += 1;
        }
        if let (Some(key), Some(waiting)) = (key, waiting) {
            forget(&mut st.pending, &key, &waiting);
            if let (Ok(value), Some(cache)) = (&answer, &mut st.cache) {
                if !waiting.stale.get() {
                    cache.insert(key, value.clone(), Instant::now());
                }
            }
            if waiting.waiters.get() > 0 {
                waiting.answer(answer.clone());
            }
        }
        answer
    }

    /// A led request whose record is gone: the driver finishes it for the records that joined
    /// it, if any; otherwise it is dropped (the backend discards its answer).
    fn abandon_lead(&self, lead: Lead<B>) {
        let Lead {
            request,
            key,
            waiting,
            ..
        } = lead;
        let (Some(key), Some(waiting)) = (key, waiting) else {
            return;
        };
        let mut st = self.state.borrow_mut();
        if waiting.waiters.get() == 0 {
            forget(&mut st.pending, &key, &waiting);
            return;
        }
        st.keys_in_flight += 1;
        self.adopted.borrow_mut().push(InFlight {
            keys: vec![Queued {
                key,
                waiting,
                at: None,
            }],
            sent_at: None,
            in_flight: st.keys_in_flight,
            request,
        });
        if let Some(w) = &st.driver {
            w.wake_by_ref();
        }
    }

    /// Sends every batch the limits allow now.
    fn send(
        &self,
        in_flight: &mut FuturesUnordered<InFlight<B::Error, B::Future>>,
    ) -> (bool, Next) {
        let mut st = self.state.borrow_mut();
        let st = &mut *st;
        let batching = self.config.batch_size.get() > 1;
        let mut sent = false;
        loop {
            // Keys whose records all timed out are not sent.
            while let Some(q) = st.queue.front() {
                if q.waiting.waiters.get() > 0 {
                    break;
                }
                let q = st.queue.pop_front().expect("front exists");
                st.stats.abandoned += 1;
                forget(&mut st.pending, &q.key, &q.waiting);
            }
            let Some(oldest) = st.queue.front().map(|q| q.at) else {
                return (sent, Next::Idle);
            };
            let mut now = Now(None);
            let mut probe = false;
            if let Some(breaker) = &mut st.breaker {
                match breaker.admit(now.get()) {
                    Admit::Yes => {}
                    Admit::Probe => probe = true,
                    Admit::Hold => return (sent, Next::Idle),
                    Admit::No => {
                        let error = open_error(breaker);
                        for q in std::mem::take(&mut st.queue) {
                            st.stats.rejected += 1;
                            forget(&mut st.pending, &q.key, &q.waiting);
                            q.waiting.answer(Err(error.clone()));
                        }
                        return (sent, Next::Idle);
                    }
                }
            }
            let limit = st.limiter.as_ref().map(Limiter::limit);
            let room = limit.map_or(usize::MAX, |l| l.saturating_sub(st.keys_in_flight));
            let batch_size = self.config.batch_cap(limit);
            let mut take = batch_size.min(st.queue.len()).min(room);
            if let Some(bucket) = &mut st.bucket {
                take = take.min(bucket.available(now.get()));
                if take == 0 {
                    return (sent, Next::At(bucket.next_token_at()));
                }
            }
            if take == 0 {
                return (sent, Next::Idle);
            }
            if let Some(oldest) = oldest.filter(|_| take < batch_size) {
                let linger_until = oldest + self.config.linger;
                if now.get() < linger_until {
                    return (sent, Next::At(linger_until));
                }
            }
            let keys: Vec<Queued<B::Error>> = st.queue.drain(..take).collect();
            let request = if !batching {
                self.backend.get_one(&keys[0].key)
            } else {
                let slices: Vec<&[u8]> = keys.iter().map(|q| &*q.key).collect();
                self.backend.get_many(&slices)
            };
            if let Some(bucket) = &mut st.bucket {
                bucket.spend(take);
            }
            st.keys_in_flight += take;
            st.stats.requests += 1;
            st.stats.keys_sent += take as u64;
            in_flight.push(InFlight {
                keys,
                sent_at: st.limiter.is_some().then(|| now.get()),
                in_flight: st.keys_in_flight,
                request,
            });
            sent = true;
            // The probe goes alone; the breaker holds the rest until it is answered.
            if probe {
                return (sent, Next::Idle);
            }
        }
    }

    /// Hands a batch's answers out, caches them, and feeds the limit and the breaker.
    fn complete(&self, (keys, sent_at, in_flight, result): Done<B::Error>) {
        let mut st = self.state.borrow_mut();
        let st = &mut *st;
        let mut now = Now(None);
        st.keys_in_flight -= keys.len();
        let timed_out = keys.iter().any(|q| q.waiting.waiters.get() == 0);
        let result = match result {
            Ok(values) if values.len() == keys.len() => Ok(values),
            Ok(values) => Err(LookupError::Answer {
                expected: keys.len(),
                got: values.len(),
            }),
            Err(e) => Err(LookupError::Backend(e)),
        };
        match result {
            Ok(values) => {
                if let Some(b) = &mut st.breaker {
                    b.on_success();
                }
                if let (Some(l), Some(sent_at)) = (&mut st.limiter, sent_at) {
                    if timed_out {
                        l.on_drop(sent_at, now.get());
                    } else {
                        l.on_answer(now.get() - sent_at, in_flight);
                    }
                }
                for (q, value) in keys.into_iter().zip(values) {
                    forget(&mut st.pending, &q.key, &q.waiting);
                    if let Some(cache) = &mut st.cache {
                        if !q.waiting.stale.get() {
                            cache.insert(q.key.clone(), value.clone(), now.get());
                        }
                    }
                    q.waiting.answer(Ok(value));
                }
            }
            Err(error) => {
                st.stats.failed_requests += 1;
                if let Some(b) = &mut st.breaker {
                    b.on_failure(now.get());
                }
                if let (Some(l), Some(sent_at)) = (&mut st.limiter, sent_at) {
                    l.on_drop(sent_at, now.get());
                }
                for q in keys {
                    forget(&mut st.pending, &q.key, &q.waiting);
                    q.waiting.answer(Err(error.clone()));
                }
            }
        }
    }
}

/// Removes `key` from the pending map if `waiting` is still its lookup there.
fn forget<E>(pending: &mut Pending<E>, key: &[u8], waiting: &Rc<Waiting<E>>) {
    if pending.get(key).is_some_and(|w| Rc::ptr_eq(w, waiting)) {
        pending.remove(key);
    }
}
