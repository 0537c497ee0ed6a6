//! Property tests against a plain model (`common::check_merged`): random inputs, seeded
//! latencies, failures and timeouts, 1, 2 and 4 shards, every mode, on a simulated clock.
//!
//! Properties: ordered output equals input order; unordered output is the input multiset with
//! every record between the right watermarks; key-ordered keeps per-key order; in-flight never
//! exceeds capacity (asserted by `SimStage` at every step); nothing lost, nothing duplicated;
//! the merged output keeps the watermark barrier across shards.

mod common;

use common::{check_merged, In, Out};
use futures::future::LocalBoxFuture;
use proptest::prelude::*;
use sluice::clock::SimClock;
use sluice::sim::SimStage;
use sluice::{AsyncFunction, Fallback, Output, OutputMode, Outputs, RetryPolicy};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
struct Lookup {
    id: u64,
    key: u64,
    latency_ms: u64,
    failures: u32,
}

/// Fails the first `failures` attempts of a record, answers after `latency_ms`; a record whose
/// latency exceeds the timeout gets its id as the fallback, so every record yields its id once.
struct SimLookup {
    clock: SimClock,
    attempts: RefCell<HashMap<u64, u32>>,
}

#[derive(Debug, thiserror::Error)]
#[error("injected failure")]
struct Injected;

impl AsyncFunction for SimLookup {
    type In = Lookup;
    type Out = u64;
    type Error = Injected;
    type Future = LocalBoxFuture<'static, Result<Outputs<u64>, Injected>>;

    fn invoke(&self, input: &Lookup) -> Self::Future {
        let attempt = {
            let mut a = self.attempts.borrow_mut();
            let n = a.entry(input.id).or_insert(0);
            *n += 1;
            *n
        };
        let sleep = self.clock.sleep(Duration::from_millis(input.latency_ms));
        let (id, fails) = (input.id, attempt <= input.failures);
        Box::pin(async move {
            sleep.await;
            if fails {
                Err(Injected)
            } else {
                Ok(Outputs::One(id))
            }
        })
    }

    fn timeout(&self, input: &Lookup) -> Fallback<u64> {
        Fallback::Emit(Outputs::One(input.id))
    }
}

#[derive(Debug, Clone)]
enum Gen {
    Record {
        key: u64,
        latency_ms: u64,
        failures: u32,
    },
    Watermark,
}

fn gen_element() -> impl Strategy<Value = Gen> {
    prop_oneof![
        6 => (0u64..4, prop_oneof![0u64..20, 100u64..130], 0u32..3)
            .prop_map(|(key, latency_ms, failures)| Gen::Record { key, latency_ms, failures }),
        1 => Just(Gen::Watermark),
    ]
}

fn mode() -> impl Strategy<Value = OutputMode> {
    prop_oneof![
        Just(OutputMode::Ordered),
        Just(OutputMode::Unordered),
        Just(OutputMode::KeyOrdered)
    ]
}

fn simulate(mode: OutputMode, shards: usize, capacity: usize, elements: &[Gen]) -> (usize, usize) {
    let clock = SimClock::new();
    let mut config = sluice::OperatorConfig::new();
    config.capacity = std::num::NonZeroUsize::new(capacity).unwrap();
    config.mode = mode;
    config.timeout = Duration::from_millis(100);
    config.retry = RetryPolicy::fixed(3, Duration::from_millis(2)).on_any_error();
    let key: Arc<dyn Fn(&Lookup) -> u64 + Send + Sync> = Arc::new(|l: &Lookup| l.key);
    let use_key = mode == OutputMode::KeyOrdered || shards % 2 == 0;
    let c = clock.clone();
    let mut stage = SimStage::new(&clock, shards, config, use_key.then_some(key), move |_| {
        SimLookup {
            clock: c.clone(),
            attempts: RefCell::new(HashMap::new()),
        }
    })
    .expect("shards and capacity are in range");
    let mut pushed = vec![];
    let (mut ts, mut next_id) = (0, 0);
    for e in elements {
        match *e {
            Gen::Record {
                key,
                latency_ms,
                failures,
            } => {
                let id = next_id;
                next_id += 1;
                let seq = stage.push(Lookup {
                    id,
                    key,
                    latency_ms,
                    failures,
                });
                pushed.push(In::Rec { seq, key });
            }
            Gen::Watermark => {
                ts += 1;
                let seq = stage.push_watermark(ts);
                pushed.push(In::Wm { seq, ts });
            }
        }
    }
    stage.finish();
    let (output, error) = stage.run(Duration::from_millis(1), 100_000);
    assert!(error.is_none(), "no stage error expected: {error:?}");
    // Map record ids back to sequence numbers for the model.
    let seq_of_id: Vec<u64> = pushed
        .iter()
        .filter_map(|p| match p {
            In::Rec { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    let merged: Vec<Out> = output
        .iter()
        .map(|o| match o {
            Output::Record { seq, value } => {
                assert_eq!(
                    seq_of_id[*value as usize], *seq,
                    "output carries its input's seq"
                );
                Out::Rec(*seq)
            }
            Output::Watermark(ts) => Out::Wm(*ts),
            Output::Checkpoint(id) => panic!("checkpoint {id} from a stage without checkpoints"),
        })
        .collect();
    check_merged(mode, &pushed, &merged);
    (stage.max_occupied(), seq_of_id.len())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, .. ProptestConfig::default() })]

    #[test]
    fn merged_output_matches_the_model(
        mode in mode(),
        shards in prop_oneof![Just(1usize), Just(2), Just(4)],
        capacity in 1usize..8,
        elements in prop::collection::vec(gen_element(), 0..60),
    ) {
        let (max_occupied, _) = simulate(mode, shards, capacity, &elements);
        prop_assert!(max_occupied <= capacity);
    }
}

#[test]
fn capacity_is_really_used_under_load() {
    let elements: Vec<Gen> = (0..50)
        .map(|i| Gen::Record {
            key: i % 4,
            latency_ms: 10,
            failures: 0,
        })
        .collect();
    let (max_occupied, records) = simulate(OutputMode::Unordered, 2, 5, &elements);
    assert_eq!(records, 50);
    assert_eq!(max_occupied, 5, "a saturated shard fills its capacity");
}
