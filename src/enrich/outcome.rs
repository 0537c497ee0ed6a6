//! What happens to a line once its lookup is done: the policies of `sluice enrich` applied to
//! an `Enriched`, and the enriched record's bytes.
//!
//! Owns: the mapping from (line, lookup outcome, policy) to one `Action`. Invariants: every
//! line yields exactly one action; a record's fields leave as the bytes they came as, with the
//! looked-up value merged in (an object's fields replace same-named ones in place, others are
//! appended) or placed under one field.

use super::options::{OnBadRecord, OnFailedLookup, OnMissing};
use super::record::{to_json, BadRecord, Fields, Line, Record};
use super::summary::Count;
use super::{EnrichError, Enriched, Lookup, Placement};
use std::path::PathBuf;
use std::sync::Arc;

/// The policies that decide an outcome.
pub(crate) struct Policies {
    pub placement: Placement,
    pub on_missing: OnMissing,
    pub missing_marker: Option<String>,
    pub on_bad_record: OnBadRecord,
    pub on_timeout: OnFailedLookup,
    pub on_error: OnFailedLookup,
}

/// What the writer does with one line.
pub(crate) enum Action {
    /// Write this record to the output.
    Write(Fields, Count),
    /// Write this entry to a dead-letter file.
    DeadLetter(PathBuf, String, Count),
    /// Nothing to write; count it.
    Drop(Count),
    /// Stop the run here: everything before this line has been handled.
    Fail(EnrichError),
}

/// A dead-letter entry: `{"line","error","input"}`.
fn dead_letter_entry(line: u64, error: &str, input: &str) -> String {
    serde_json::json!({"line": line, "error": error, "input": input}).to_string()
}

impl Policies {
    /// The policies `config` sets.
    pub(crate) fn of(config: &super::EnrichConfig) -> Policies {
        Policies {
            placement: config.placement.clone(),
            on_missing: config.on_missing,
            missing_marker: config.missing_marker.clone(),
            on_bad_record: config.on_bad_record.clone(),
            on_timeout: config.on_timeout.clone(),
            on_error: config.on_error.clone(),
        }
    }

    /// The action for one line and its lookup. The line is taken over without a copy when
    /// the writer holds its last reference (as it does unless a timed-out attempt still runs).
    pub(crate) fn decide(&self, enriched: Enriched) -> Action {
        let line = Arc::try_unwrap(enriched.line).unwrap_or_else(|shared| match &*shared {
            Line::Record(r) => Line::Record(Record {
                line: r.line,
                key: r.key.clone(),
                fields: r.fields.clone(),
                held: r.held,
            }),
            Line::Bad(b) => Line::Bad(b.clone()),
        });
        match (line, enriched.lookup) {
            (Line::Bad(bad), _) => self.bad(&bad),
            (Line::Record(r), Lookup::NotNeeded) => Action::Fail(EnrichError::line(
                r.line,
                "a record came back without a lookup",
            )),
            (Line::Record(r), Lookup::Found(value)) => {
                let line = r.line;
                match self.merged(r, &value) {
                    Ok((fields, object)) => {
                        let count = if object {
                            Count::Enriched
                        } else {
                            Count::EnrichedNotObject
                        };
                        Action::Write(fields, count)
                    }
                    Err(e) => Action::Fail(EnrichError::line(line, e)),
                }
            }
            (Line::Record(r), Lookup::Missing) => self.missing(r),
            (Line::Record(r), Lookup::TimedOut) => self.failed(
                r,
                &self.on_timeout,
                "lookup timed out",
                "--on-timeout",
                [
                    Count::TimeoutEmitted,
                    Count::TimeoutDropped,
                    Count::TimeoutDeadLettered,
                ],
            ),
            (Line::Record(r), Lookup::Failed(why)) => self.failed(
                r,
                &self.on_error,
                &format!("lookup failed: {why}"),
                "--on-error",
                [
                    Count::ErrorEmitted,
                    Count::ErrorDropped,
                    Count::ErrorDeadLettered,
                ],
            ),
        }
    }

    fn bad(&self, bad: &BadRecord) -> Action {
        match &self.on_bad_record {
            OnBadRecord::Fail => {
                let shown: String = bad.text.chars().take(200).collect();
                Action::Fail(EnrichError::line(
                    bad.line,
                    format!(
                        "bad record: {}: {shown} (--on-bad-record skip or dead-letter FILE lets \
                         the run go on)",
                        bad.reason
                    ),
                ))
            }
            OnBadRecord::Skip => Action::Drop(Count::BadSkipped),
            OnBadRecord::DeadLetter(path) => Action::DeadLetter(
                path.clone(),
                dead_letter_entry(bad.line, &bad.reason, &bad.text),
                Count::BadDeadLettered,
            ),
        }
    }

    fn missing(&self, r: Record) -> Action {
        match self.on_missing {
            OnMissing::Keep => {
                let mut out = r.fields;
                if let Some(marker) = &self.missing_marker {
                    if let Err(e) = out.insert(marker, "true") {
                        return Action::Fail(EnrichError::line(r.line, e));
                    }
                }
                Action::Write(out, Count::MissingKept)
            }
            OnMissing::Drop => Action::Drop(Count::MissingDropped),
            OnMissing::Fail => Action::Fail(EnrichError::line(
                r.line,
                format!(
                    "key {:?} has no value (--on-missing fail; keep or drop lets the run go on)",
                    r.key
                ),
            )),
        }
    }

    /// A timeout or a failed lookup; `counts` are (emitted, dropped, dead-lettered).
    fn failed(
        &self,
        r: Record,
        policy: &OnFailedLookup,
        what: &str,
        flag: &str,
        [emitted, dropped, dead_lettered]: [Count; 3],
    ) -> Action {
        match policy {
            OnFailedLookup::Emit => Action::Write(r.fields, emitted),
            OnFailedLookup::Drop => Action::Drop(dropped),
            OnFailedLookup::DeadLetter(path) => Action::DeadLetter(
                path.clone(),
                dead_letter_entry(r.line, what, &to_json(&r.fields)),
                dead_lettered,
            ),
            OnFailedLookup::Fail => Action::Fail(EnrichError::line(
                r.line,
                format!(
                    "{what} (key {:?}; {flag} emit, drop or dead-letter FILE lets the run go on)",
                    r.key
                ),
            )),
        }
    }

    /// The record with `value` placed as `--merge` or `--into` says, and whether the value was
    /// a JSON object. Fails only for a record past 4 GiB.
    fn merged(&self, r: Record, value: &[u8]) -> Result<(Fields, bool), String> {
        let mut out = r.fields;
        out.reserve(value.len() + 16);
        // An object, merged in place or kept as its bytes (it parsed, so it is valid JSON).
        if let (Some(b'{'), Ok(text)) = (value.first(), std::str::from_utf8(value)) {
            match &self.placement {
                Placement::Merge => {
                    // A value that is not an object after all leaves the record as it was.
                    if out.merge_object(text)? {
                        return Ok((out, true));
                    }
                }
                Placement::Into(field) => {
                    if Fields::parse(text).is_ok() {
                        out.insert(field, text)?;
                        return Ok((out, true));
                    }
                }
            }
        }
        let field = match &self.placement {
            Placement::Into(f) => f.as_str(),
            Placement::Merge => "value",
        };
        let text = String::from_utf8_lossy(value);
        let quoted = serde_json::to_string(&*text).unwrap_or_else(|_| "\"\"".into());
        out.insert(field, &quoted)?;
        Ok((out, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies(placement: Placement) -> Policies {
        Policies {
            placement,
            on_missing: OnMissing::Keep,
            missing_marker: Some("missing".into()),
            on_bad_record: OnBadRecord::Fail,
            on_timeout: OnFailedLookup::Emit,
            on_error: OnFailedLookup::Fail,
        }
    }

    fn enriched(fields: &str, lookup: Lookup) -> Enriched {
        Enriched {
            line: Arc::new(Line::Record(Record {
                line: 5,
                key: "k".into(),
                fields: Fields::parse(fields).unwrap(),
                held: Default::default(),
            })),
            lookup,
        }
    }

    fn written(action: Action) -> String {
        match action {
            Action::Write(fields, _) => to_json(&fields),
            _ => panic!("not written"),
        }
    }

    #[test]
    fn merge_keeps_the_record_bytes_and_replaces_in_place() {
        let p = policies(Placement::Merge);
        let value = br#"{"a":2,"c":0.30000000000000004441}"#.to_vec();
        let out = written(p.decide(enriched(
            r#"{"a":1,"big":123456789012345678901234567890}"#,
            Lookup::Found(value.into()),
        )));
        assert_eq!(
            out,
            r#"{"a":2,"big":123456789012345678901234567890,"c":0.30000000000000004441}"#
        );
        let out = written(p.decide(enriched(
            r#"{"a":1}"#,
            Lookup::Found(b"plain".to_vec().into()),
        )));
        assert_eq!(out, r#"{"a":1,"value":"plain"}"#);
        let out = written(p.decide(enriched(r#"{"a":1}"#, Lookup::Missing)));
        assert_eq!(out, r#"{"a":1,"missing":true}"#);
    }

    #[test]
    fn into_and_failures() {
        let p = policies(Placement::Into("profile".into()));
        let out = written(p.decide(enriched(
            r#"{"a":1}"#,
            Lookup::Found(br#"{"x":1.0}"#.to_vec().into()),
        )));
        assert_eq!(out, r#"{"a":1,"profile":{"x":1.0}}"#);
        let out = written(p.decide(enriched(r#"{"a":1}"#, Lookup::TimedOut)));
        assert_eq!(out, r#"{"a":1}"#);
        let Action::Fail(why) =
            p.decide(enriched(r#"{"a":1}"#, Lookup::Failed("WRONGTYPE".into())))
        else {
            panic!("not a failure")
        };
        assert!(matches!(why, EnrichError::Line { line: 5, .. }), "{why}");
        let why = why.to_string();
        assert!(
            why.contains("line 5") && why.contains("--on-error"),
            "{why}"
        );
    }
}
