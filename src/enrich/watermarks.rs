//! Event-time watermarks for `sluice enrich --event-time`: Flink's bounded out-of-orderness.
//!
//! Owns: the largest event time seen and the last watermark emitted. Invariants: a watermark
//! is the largest event time so far minus the bound minus 1 ms; watermarks only rise; one goes
//! out at most every `WATERMARK_EVERY` records, and `last` gives the final one at the end.

/// A watermark goes out at most once per this many records with an event time.
pub(crate) const WATERMARK_EVERY: u32 = 100;
/// Bounded out-of-orderness watermarks over event times.
pub(crate) struct Watermarks {
    bound: u64,
    max_event: Option<u64>,
    last: Option<u64>,
    since: u32,
}

impl Watermarks {
    /// Watermarks that trail the largest event time by `bound` milliseconds.
    pub(crate) fn new(bound: u64) -> Watermarks {
        Watermarks {
            bound,
            max_event: None,
            last: None,
            since: 0,
        }
    }

    /// The watermark to emit after a record with event time `t`, if one is due.
    pub(crate) fn after(&mut self, t: u64) -> Option<u64> {
        let max = self.max_event.map_or(t, |m| m.max(t));
        self.max_event = Some(max);
        self.since += 1;
        let w = max.saturating_sub(self.bound + 1);
        (self.since >= WATERMARK_EVERY && self.last.is_none_or(|l| w > l)).then(|| {
            self.last = Some(w);
            self.since = 0;
            w
        })
    }

    /// The final watermark: everything read is at or before it.
    pub(crate) fn last(&self) -> Option<u64> {
        let w = self.max_event?.saturating_sub(self.bound + 1);
        self.last.is_none_or(|l| w > l).then_some(w)
    }
}
