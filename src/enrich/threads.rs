//! The threads of a `sluice enrich` run beside the writer: the reader, and the watcher that
//! ends the input when a signal arrives.
//!
//! Owns: starting and stopping them. Invariants: a signal ends the stage's input even while the
//! reader is blocked reading an idle pipe (the watcher takes the producer); after a failure or
//! a second signal the reader is halted; the reader is joined unless the run stops at once.

use super::budget::Budget;
use super::reader::{self, ReaderContext, ReaderState};
use super::{EnrichConfig, EnrichError, Line, Stop};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the signal watcher looks at the stop flag.
const WATCH_EVERY: Duration = Duration::from_millis(20);

/// The reader thread and the signal watcher of a run.
pub(crate) struct Threads {
    pub(crate) state: Arc<ReaderState>,
    reader: std::thread::JoinHandle<()>,
    watcher: std::thread::JoinHandle<()>,
    finished: Arc<AtomicBool>,
}

impl Threads {
    pub(crate) fn start(
        config: &EnrichConfig,
        producer: crate::Producer<Arc<Line>>,
        input: reader::ReaderInput,
        budget: &Arc<Budget>,
        stop: &Arc<Stop>,
    ) -> Result<Threads, EnrichError> {
        // Shared so that a signal can end the input even while the reader is blocked reading
        // an idle pipe: the watcher takes the producer, the stage drains, the writer finishes.
        let producer = Arc::new(Mutex::new(Some(producer)));
        let finished = Arc::new(AtomicBool::new(false));
        let watcher = spawn_watcher(producer.clone(), stop.clone(), finished.clone());
        let state = Arc::new(ReaderState::default());
        let context = ReaderContext {
            key: config.key.clone(),
            event_time: config.event_time.clone(),
            max_out_of_orderness: config.max_out_of_orderness,
            checkpoint_interval: config
                .checkpoint_dir
                .as_ref()
                .map(|_| config.checkpoint_interval),
            producer,
            state: state.clone(),
            budget: budget.clone(),
            stop: stop.clone(),
        };
        let reader = std::thread::Builder::new()
            .name("sluice-reader".into())
            .spawn(move || context.run(input))
            .map_err(|e| EnrichError::Stage(format!("cannot start the reader thread: {e}")))?;
        Ok(Threads {
            state,
            reader,
            watcher,
            finished,
        })
    }

    /// Stops the reader after a failure (or a second signal) and waits for what should end.
    pub(crate) fn stop(self, failed: bool, at_once: bool, stop: &Stop) -> Result<(), EnrichError> {
        if failed || at_once {
            stop.halt();
        }
        self.finished.store(true, Ordering::Relaxed);
        let _ = self.watcher.join();
        // After a signal the reader may be blocked reading an idle pipe, and after a second
        // one the shards may wait on a stalled server: leave them (the process is about to
        // exit).
        let wait = !at_once && (!stop.interrupted() || self.reader.is_finished());
        if wait && self.reader.join().is_err() {
            return Err(EnrichError::Stage("the reader thread panicked".into()));
        }
        Ok(())
    }
}

/// Takes the producer when a signal arrives, so that the input ends even while the reader is
/// blocked reading.
fn spawn_watcher(
    producer: Arc<Mutex<Option<crate::Producer<Arc<Line>>>>>,
    stop: Arc<Stop>,
    finished: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !finished.load(Ordering::Relaxed) {
            if stop.requested() {
                producer.lock().unwrap_or_else(|p| p.into_inner()).take();
                return;
            }
            std::thread::sleep(WATCH_EVERY);
        }
    })
}
