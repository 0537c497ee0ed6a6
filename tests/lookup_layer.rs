//! The lookup layer against a simulated backend on a glommio executor: coalescing, batching,
//! the cache, the limits and the breaker, each seen in the requests the backend received.

use bytes::Bytes;
use futures::future::join_all;
use sluice::lookup::{
    AdaptiveConfig, BatchLookup, BreakerConfig, CacheConfig, Concurrency, Eviction, LayerConfig,
    LookupError, Lookups, Values,
};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::num::{NonZeroU32, NonZeroUsize};
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Answers `value-of-KEY` after `delay`, `None` for keys starting with `missing`, and fails
/// every request while `failing` is set; records every request's keys and the most keys it
/// had in flight at once.
#[derive(Clone, Default)]
struct SimBackend {
    requests: Rc<RefCell<Vec<Vec<String>>>>,
    delay: Duration,
    failing: Rc<Cell<bool>>,
    in_flight: Rc<Cell<usize>>,
    max_in_flight: Rc<Cell<usize>>,
}

impl SimBackend {
    fn with_delay(delay: Duration) -> SimBackend {
        SimBackend {
            delay,
            ..SimBackend::default()
        }
    }
    fn requests(&self) -> Vec<Vec<String>> {
        self.requests.borrow().clone()
    }
}

impl BatchLookup for SimBackend {
    type Error = String;
    type Future = Pin<Box<dyn Future<Output = Result<Values, String>>>>;

    fn get_many(&self, keys: &[&[u8]]) -> Self::Future {
        let keys: Vec<String> = keys
            .iter()
            .map(|k| String::from_utf8(k.to_vec()).unwrap())
            .collect();
        self.requests.borrow_mut().push(keys.clone());
        let (delay, failing) = (self.delay, self.failing.get());
        let (in_flight, max) = (self.in_flight.clone(), self.max_in_flight.clone());
        in_flight.set(in_flight.get() + keys.len());
        max.set(max.get().max(in_flight.get()));
        Box::pin(async move {
            glommio::timer::sleep(delay).await;
            in_flight.set(in_flight.get() - keys.len());
            if failing {
                return Err("backend down".to_string());
            }
            Ok(keys
                .iter()
                .map(|k| (!k.starts_with("missing")).then(|| Bytes::from(format!("value-of-{k}"))))
                .collect())
        })
    }
}

fn run<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .spawn(f)
        .expect("executor starts")
        .join()
        .expect("executor ran")
}

fn batched(n: usize) -> LayerConfig {
    LayerConfig {
        batch_size: NonZeroUsize::new(n).unwrap(),
        ..LayerConfig::default()
    }
}

/// Once the layer is idle, every lookup was answered one way (`LayerStats`' invariant).
fn assert_accounted(stats: &sluice::lookup::LayerStats) {
    let ways =
        stats.cache_hits + stats.coalesced + stats.rejected + stats.keys_sent + stats.abandoned;
    assert_eq!(stats.lookups, ways, "{stats:?}");
}

fn found(key: &str) -> Result<Option<Bytes>, LookupError<String>> {
    Ok(Some(Bytes::from(format!("value-of-{key}"))))
}

#[test]
fn identical_keys_in_flight_share_one_request() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::from_millis(1));
        let layer = Lookups::new(backend.clone(), LayerConfig::default());
        let gets: Vec<_> = (0..50).map(|_| layer.get(b"hot")).collect();
        let answers = join_all(gets).await;
        assert!(answers.iter().all(|a| *a == found("hot")), "{answers:?}");
        assert_eq!(backend.requests(), vec![vec!["hot".to_string()]]);
        let stats = layer.stats();
        assert_eq!(
            (stats.lookups, stats.coalesced, stats.requests),
            (50, 49, 1)
        );
        // Once answered, the key is looked up afresh (no cache).
        assert_eq!(layer.get(b"hot").await, found("hot"));
        assert_eq!(backend.requests().len(), 2);
        assert_accounted(&layer.stats());
    });
}

#[test]
fn without_coalescing_every_lookup_is_a_request() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::from_millis(1));
        let config = LayerConfig {
            coalesce: false,
            ..LayerConfig::default()
        };
        let layer = Lookups::new(backend.clone(), config);
        let answers = join_all((0..10).map(|_| layer.get(b"hot"))).await;
        assert!(answers.iter().all(|a| *a == found("hot")));
        assert_eq!(backend.requests().len(), 10);
        assert_eq!(layer.stats().coalesced, 0);
    });
}

#[test]
fn keys_of_one_turn_go_out_in_full_batches_matched_to_their_values() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::from_millis(1));
        let layer = Lookups::new(backend.clone(), batched(64));
        let keys: Vec<String> = (0..100)
            .map(|i| {
                if i % 7 == 0 {
                    format!("missing{i}")
                } else {
                    format!("k{i}")
                }
            })
            .collect();
        let answers = join_all(keys.iter().map(|k| layer.get(k.as_bytes()))).await;
        for (k, a) in keys.iter().zip(&answers) {
            let expected = if k.starts_with("missing") {
                Ok(None)
            } else {
                found(k)
            };
            assert_eq!(*a, expected, "key {k}");
        }
        let sizes: Vec<usize> = backend.requests().iter().map(|r| r.len()).collect();
        assert_eq!(
            sizes,
            vec![64, 36],
            "one turn's keys, in batches of at most 64"
        );
        assert_eq!(backend.requests().concat(), keys, "sent in lookup order");
        let stats = layer.stats();
        assert_eq!((stats.requests, stats.keys_sent), (2, 100));
    });
}

#[test]
fn a_batch_holds_at_most_a_quarter_of_the_capacity_so_the_pipeline_stays_full() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::from_millis(1));
        let config = LayerConfig {
            capacity: NonZeroUsize::new(64),
            ..batched(64)
        };
        assert_eq!(config.batch_cap(None), 16);
        assert_eq!(
            config.batch_cap(Some(8)),
            2,
            "a quarter of the adaptive limit"
        );
        assert_eq!(config.batch_cap(Some(2)), 1);
        let layer = Lookups::new(backend.clone(), config);
        let keys: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
        let answers = join_all(keys.iter().map(|k| layer.get(k.as_bytes()))).await;
        assert!(keys.iter().zip(&answers).all(|(k, a)| *a == found(k)));
        let sizes: Vec<usize> = backend.requests().iter().map(|r| r.len()).collect();
        assert_eq!(sizes, vec![16; 4], "a full window in four requests");
        assert_eq!(backend.requests().concat(), keys, "sent in lookup order");
    });
}

#[test]
fn a_failed_batch_fails_each_of_its_records() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::from_millis(1));
        backend.failing.set(true);
        let layer = Lookups::new(backend.clone(), batched(16));
        let answers = join_all((0..5).map(|i| layer.get(format!("k{i}").as_bytes()))).await;
        for a in &answers {
            assert_eq!(*a, Err(LookupError::Backend("backend down".to_string())));
        }
        assert_eq!(backend.requests().len(), 1);
        assert_eq!(layer.stats().failed_requests, 1);
        // A retry (as the operator's policy issues it) is a lookup of its own.
        backend.failing.set(false);
        assert_eq!(layer.get(b"k0").await, found("k0"));
    });
}

#[test]
fn a_key_that_times_out_inside_a_batch_leaves_the_others_answered() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::from_millis(20));
        let layer = Lookups::new(backend.clone(), batched(8));
        let slow = layer.get(b"k-timed-out");
        let others: Vec<_> = (0..3)
            .map(|i| layer.get(format!("k{i}").as_bytes()))
            .collect();
        // The record's timeout drops its future while the batch is on the wire.
        let timed_out =
            glommio::timer::timeout(Duration::from_millis(5), async { Ok(slow.await) }).await;
        assert!(timed_out.is_err(), "the lookup outlived its timeout");
        let answers = join_all(others).await;
        for (i, a) in answers.iter().enumerate() {
            assert_eq!(*a, found(&format!("k{i}")));
        }
        assert_eq!(backend.requests().len(), 1);
    });
}

#[test]
fn a_key_every_record_gave_up_on_is_not_sent() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::from_millis(5));
        let config = LayerConfig {
            concurrency: Concurrency::Adaptive(AdaptiveConfig {
                initial: 1,
                min: 1,
                max: 1,
                ..AdaptiveConfig::for_capacity(1)
            }),
            ..LayerConfig::default()
        };
        let layer = Lookups::new(backend.clone(), config);
        let first = layer.get(b"a");
        drop(layer.get(b"b")); // queued behind the limit, then abandoned
        assert_eq!(first.await, found("a"));
        assert_eq!(layer.get(b"c").await, found("c"));
        let sent: Vec<String> = backend.requests().concat();
        assert_eq!(sent, vec!["a", "c"]);
        assert_eq!(layer.stats().abandoned, 1);
        assert_accounted(&layer.stats());
    });
}

/// Without batching or limits a record's lookup sends its own request; when that record is
/// gone first (a timeout), the records that joined its key still get the answer, and it is
/// cached; a lookup nobody waits for any more is dropped and the key is looked up afresh.
#[test]
fn a_lookup_whose_record_is_gone_still_answers_the_records_that_joined_it() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::from_millis(5));
        let config = LayerConfig {
            cache: Some(CacheConfig {
                entries: NonZeroUsize::new(100).unwrap(),
                max_bytes: 1 << 20,
                ttl: Duration::from_secs(60),
                missing_ttl: None,
                eviction: Eviction::Lru,
            }),
            ..LayerConfig::default()
        };
        let layer = Lookups::new(backend.clone(), config);
        let leader = layer.get(b"k");
        let followers: Vec<_> = (0..3).map(|_| layer.get(b"k")).collect();
        drop(leader);
        let answers = join_all(followers).await;
        assert!(answers.iter().all(|a| *a == found("k")), "{answers:?}");
        assert_eq!(layer.get(b"k").await, found("k"), "cached");
        assert_eq!(layer.stats().cache_hits, 1);
        // Nobody joined: the request is dropped, and the key is not pending any more.
        drop(layer.get(b"alone"));
        assert_eq!(layer.get(b"alone").await, found("alone"));
        assert_eq!(backend.requests().concat(), vec!["k", "alone", "alone"]);
        let stats = layer.stats();
        assert_eq!((stats.coalesced, stats.requests), (3, 3));
        assert_accounted(&stats);
    });
}

#[test]
fn linger_holds_a_batch_that_is_not_full() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::from_millis(1));
        let config = LayerConfig {
            linger: Duration::from_millis(20),
            ..batched(4)
        };
        let layer = Rc::new(Lookups::new(backend.clone(), config));
        let first = layer.get(b"a");
        let l = layer.clone();
        let later = glommio::spawn_local(async move {
            glommio::timer::sleep(Duration::from_millis(5)).await;
            l.get(b"b").await
        });
        let started = Instant::now();
        assert_eq!(first.await, found("a"));
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(later.await, found("b"));
        assert_eq!(
            backend.requests(),
            vec![vec!["a".to_string(), "b".to_string()]]
        );
    });
}

fn cached(ttl: Duration, missing_ttl: Option<Duration>) -> LayerConfig {
    LayerConfig {
        cache: Some(CacheConfig {
            entries: NonZeroUsize::new(1_000).unwrap(),
            max_bytes: 1 << 20,
            ttl,
            missing_ttl,
            eviction: Eviction::ClockPro,
        }),
        ..batched(16)
    }
}

#[test]
fn the_cache_answers_repeated_keys_until_they_expire() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::from_millis(1));
        let config = cached(Duration::from_millis(50), Some(Duration::from_millis(50)));
        let layer = Lookups::new(backend.clone(), config);
        assert_eq!(layer.get(b"k").await, found("k"));
        assert_eq!(layer.get(b"missing").await, Ok(None));
        for _ in 0..10 {
            assert_eq!(layer.get(b"k").await, found("k"));
            assert_eq!(layer.get(b"missing").await, Ok(None));
        }
        assert_eq!(backend.requests().len(), 2);
        assert_eq!(layer.stats().cache_hits, 20);
        glommio::timer::sleep(Duration::from_millis(60)).await;
        assert_eq!(layer.get(b"k").await, found("k"));
        assert_eq!(backend.requests().len(), 3, "expired: looked up again");
        assert_accounted(&layer.stats());
    });
}

#[test]
fn an_invalidated_key_is_looked_up_again_and_a_stale_answer_is_not_cached() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::from_millis(5));
        let layer = Lookups::new(backend.clone(), cached(Duration::from_secs(60), None));
        assert_eq!(layer.get(b"k").await, found("k"));
        layer.invalidate(b"k");
        assert_eq!(layer.cached(), 0);
        let in_flight = layer.get(b"k");
        layer.invalidate(b"k"); // written while the lookup is on the wire
        assert_eq!(in_flight.await, found("k"));
        assert_eq!(
            layer.cached(),
            0,
            "an answer older than the write is not cached"
        );
        assert_eq!(layer.get(b"k").await, found("k"));
        assert_eq!(layer.cached(), 1);
        layer.flush_cache();
        assert_eq!(layer.cached(), 0);
        assert_eq!(backend.requests().len(), 3);
    });
}

#[test]
fn the_adaptive_limit_bounds_the_keys_in_flight() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::from_millis(2));
        let config = LayerConfig {
            concurrency: Concurrency::Adaptive(AdaptiveConfig {
                initial: 4,
                min: 1,
                max: 8,
                ..AdaptiveConfig::for_capacity(8)
            }),
            ..batched(2)
        };
        let layer = Lookups::new(backend.clone(), config);
        let answers = join_all((0..200).map(|i| layer.get(format!("k{i}").as_bytes()))).await;
        assert!(answers.iter().all(|a| matches!(a, Ok(Some(_)))));
        assert!(
            backend.max_in_flight.get() <= 8,
            "{}",
            backend.max_in_flight.get()
        );
        let stats = layer.stats();
        assert!(stats.limit.unwrap() <= 8 && stats.limit_min.unwrap() >= 1);
    });
}

#[test]
fn the_rate_limit_spaces_the_keys_out() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::ZERO);
        let config = LayerConfig {
            max_rate: Some(1_000.0),
            ..batched(8)
        };
        let layer = Lookups::new(backend.clone(), config);
        let started = Instant::now();
        let answers = join_all((0..110).map(|i| layer.get(format!("k{i}").as_bytes()))).await;
        assert!(answers.iter().all(|a| matches!(a, Ok(Some(_)))));
        // A burst of 10, then 100 keys at 1,000/s.
        assert!(
            started.elapsed() >= Duration::from_millis(95),
            "{:?}",
            started.elapsed()
        );
    });
}

#[test]
fn an_open_breaker_fails_lookups_at_once_and_a_probe_closes_it() {
    run(|| async {
        let backend = SimBackend::with_delay(Duration::from_millis(1));
        backend.failing.set(true);
        let config = LayerConfig {
            breaker: Some(BreakerConfig {
                failures: NonZeroU32::new(3).unwrap(),
                cool_down: Duration::from_millis(30),
            }),
            ..LayerConfig::default()
        };
        let layer = Lookups::new(backend.clone(), config);
        for i in 0..3 {
            let a = layer.get(format!("k{i}").as_bytes()).await;
            assert!(matches!(a, Err(LookupError::Backend(_))), "{a:?}");
        }
        let started = Instant::now();
        for i in 0..100 {
            let a = layer.get(format!("r{i}").as_bytes()).await;
            assert!(
                matches!(a, Err(LookupError::CircuitOpen { failures: 3, .. })),
                "{a:?}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_millis(30),
            "refused at once"
        );
        assert_eq!(backend.requests().len(), 3, "nothing sent while open");
        backend.failing.set(false);
        glommio::timer::sleep(Duration::from_millis(35)).await;
        // Half-open: one probe goes; the others wait for it, then go.
        let answers = join_all((0..4).map(|i| layer.get(format!("p{i}").as_bytes()))).await;
        assert!(
            answers.iter().all(|a| matches!(a, Ok(Some(_)))),
            "{answers:?}"
        );
        let stats = layer.stats();
        assert_eq!(
            (stats.breaker_opened, stats.rejected, stats.breakers_tripped),
            (1, 100, 0)
        );
        assert!(!LookupError::<String>::CircuitOpen {
            failures: 3,
            cool_down: Duration::ZERO
        }
        .is_retryable(|_| true));
    });
}
