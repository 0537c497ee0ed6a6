//! Input lines: a line's bytes to a `Line` (a record with its key and event time, a bad record
//! with its reason, or nothing for a blank line).
//!
//! Owns: what counts as a record and why a line is bad. Invariants:
//! - a record's fields keep the bytes they came as (`Fields` holds each value as raw JSON), so
//!   a number of any precision, an escape or a nested value leaves exactly as it came;
//! - a bad line's reason names the field where there is one, and the text keeps the line;
//! - a UTF-8 byte order mark before the first line and a trailing CR are not part of a line,
//!   and a line of only white space is blank (not a record, not a bad record).

pub use super::fields::Fields;
use super::template::KeyTemplate;
use serde_json::value::RawValue;
use std::fmt;

/// A parsed input line on its way to a lookup.
pub struct Record {
    /// 1-based line number in the input.
    pub line: u64,
    pub key: String,
    pub fields: Fields,
    /// What this line reserved in the run's budget (nothing for a line restored from a
    /// checkpoint: it reserved nothing in this run).
    pub held: Reservation,
}

/// A line's bytes in the run's budget: all it reserved, of which `for_value` for its value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reservation {
    pub bytes: u64,
    pub for_value: u64,
}

impl Reservation {
    /// What a value of `len` bytes adds beyond the reservation.
    pub fn beyond(&self, len: u64) -> u64 {
        len.saturating_sub(self.for_value)
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} (key {:?})", self.line, self.key)
    }
}

/// A line that is not a record: the reason names the field where there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    pub line: u64,
    pub reason: String,
    /// The line as read (invalid UTF-8 replaced).
    pub text: String,
    /// As `Record::held`.
    pub held: Reservation,
}

/// What the stage carries: a record to look up, or a bad record that passes through it
/// untouched, so that the writer handles every line in input order (a bad record's
/// dead-letter entry and a failure at it come after everything before it).
#[derive(Debug)]
pub enum Line {
    Record(Record),
    Bad(BadRecord),
}

impl Line {
    pub fn line(&self) -> u64 {
        match self {
            Line::Record(r) => r.line,
            Line::Bad(b) => b.line,
        }
    }

    /// What the line reserved in the run's budget.
    pub fn held(&self) -> Reservation {
        match self {
            Line::Record(r) => r.held,
            Line::Bad(b) => b.held,
        }
    }

    pub(crate) fn set_held(&mut self, bytes: Reservation) {
        match self {
            Line::Record(r) => r.held = bytes,
            Line::Bad(b) => b.held = bytes,
        }
    }
}

/// A line read: what it holds, and its event time (milliseconds) if the run has one.
pub(crate) enum Parsed {
    Blank,
    Line(Line, Option<u64>),
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The line's content: without its line ending (LF or CRLF), and for the first line of the
/// input without a byte order mark.
pub(crate) fn content(bytes: &[u8], first_of_input: bool) -> &[u8] {
    let mut bytes = bytes;
    if first_of_input {
        bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    }
    if let [rest @ .., b'\n'] = bytes {
        bytes = rest;
    }
    if let [rest @ .., b'\r'] = bytes {
        bytes = rest;
    }
    bytes
}

/// What a line needs to become a record.
pub(crate) struct LineFormat<'a> {
    pub key: &'a KeyTemplate,
    pub event_time: Option<&'a str>,
}

/// Parses one line's content (see `content`).
pub(crate) fn parse(format: &LineFormat<'_>, line: u64, bytes: &[u8]) -> Parsed {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Parsed::Blank;
    }
    let bad = |reason: String| {
        Parsed::Line(
            Line::Bad(BadRecord {
                line,
                reason,
                text: String::from_utf8_lossy(bytes).into_owned(),
                held: Reservation::default(),
            }),
            None,
        )
    };
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            return bad(format!(
                "not UTF-8 (invalid byte at column {})",
                e.valid_up_to() + 1
            ))
        }
    };
    let fields = match parse_object(text) {
        Ok(fields) => fields,
        Err(reason) => return bad(reason),
    };
    let key = match format.key.render(&fields) {
        Ok(k) => k,
        Err(e) => return bad(e.to_string()),
    };
    let event_time = match format.event_time {
        None => None,
        Some(field) => match event_time_of(&fields, field) {
            Ok(t) => Some(t),
            Err(reason) => return bad(reason),
        },
    };
    let record = Record {
        line,
        key,
        fields,
        held: Reservation::default(),
    };
    Parsed::Line(Line::Record(record), event_time)
}

/// A JSON object's fields, or why the text is not one. Parsed once when it is an object (the
/// common case); only a line that is not one is parsed again, to say what it is.
fn parse_object(text: &str) -> Result<Fields, String> {
    let error = match Fields::parse(text) {
        Ok(fields) => return Ok(fields),
        Err(e) => e,
    };
    let starts_an_object = text.trim_start().starts_with('{');
    let kind = match serde_json::from_str::<&RawValue>(text) {
        Ok(raw) if !starts_an_object => match raw.get().as_bytes().first() {
            Some(b'[') => "an array",
            Some(b'"') => "a string",
            Some(b't' | b'f') => "a boolean",
            Some(b'n') => "null",
            _ => "a number",
        },
        _ => return Err(format!("not valid JSON: {error}")),
    };
    Err(format!("not a JSON object but {kind}"))
}

fn event_time_of(fields: &Fields, field: &str) -> Result<u64, String> {
    let raw = fields
        .get(field)
        .ok_or_else(|| format!("event time field `{field}` is missing"))?;
    let value: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| format!("event time field `{field}`: {e}"))?;
    event_time_ms(&value).ok_or_else(|| {
        format!(
            "event time field `{field}` is {raw}, not epoch seconds, epoch milliseconds or RFC 3339"
        )
    })
}

/// Reads an event time: epoch seconds or milliseconds (numbers above 1e11 are taken as
/// milliseconds), or an RFC 3339 string. Returns milliseconds.
fn event_time_ms(value: &serde_json::Value) -> Option<u64> {
    match value {
        serde_json::Value::Number(n) => {
            let v = n.as_f64()?;
            if !(0.0..1e15).contains(&v) {
                return None;
            }
            Some(if v > 1e11 {
                v as u64
            } else {
                (v * 1000.0) as u64
            })
        }
        serde_json::Value::String(s) => {
            let t = humantime::parse_rfc3339_weak(s).ok()?;
            Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
        }
        _ => None,
    }
}

/// `fields` as one JSON object on one line (raw values as they came).
pub(crate) fn to_json(fields: &Fields) -> String {
    fields.to_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(key: &KeyTemplate) -> LineFormat<'_> {
        LineFormat {
            key,
            event_time: Some("ts"),
        }
    }

    #[test]
    fn numbers_and_escapes_pass_through_as_written() {
        let key = KeyTemplate::parse("{id}").unwrap();
        let text = r#"{"id":1,"big":123456789012345678901234567890,"p":0.1000000000000000055511151231257827,"s":"\u00e9","ts":1602603592993}"#;
        let Parsed::Line(Line::Record(r), Some(ts)) = parse(&format(&key), 1, text.as_bytes())
        else {
            panic!("not a record")
        };
        assert_eq!(ts, 1602603592993);
        assert_eq!(to_json(&r.fields), text);
    }

    #[test]
    fn bom_crlf_and_blank_lines() {
        assert_eq!(content(b"\xEF\xBB\xBF{}\r\n", true), b"{}");
        assert_eq!(content(b"\xEF\xBB\xBF{}\n", false), b"\xEF\xBB\xBF{}");
        let key = KeyTemplate::parse("{id}").unwrap();
        assert!(matches!(parse(&format(&key), 3, b"  \t"), Parsed::Blank));
        assert!(matches!(parse(&format(&key), 3, b""), Parsed::Blank));
    }

    #[test]
    fn bad_lines_say_why() {
        let key = KeyTemplate::parse("{id}").unwrap();
        let reason = |text: &[u8]| match parse(&format(&key), 9, text) {
            Parsed::Line(Line::Bad(b), _) => b.reason,
            _ => panic!("not bad: {text:?}"),
        };
        assert!(reason(b"[1]").contains("an array"));
        assert!(reason(b"{\"id\":").contains("not valid JSON"));
        assert!(reason(b"{\"x\":1,\"ts\":1}").contains("`id` is missing"));
        assert!(reason(b"{\"id\":1,\"ts\":\"soon\"}").contains("event time field `ts`"));
        assert!(reason(b"{\"id\":\"\xff\"}").contains("not UTF-8"));
    }
}
