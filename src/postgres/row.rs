//! A row in text form as a JSON object, and keys as a text array literal.
//!
//! Owns: the mapping of SQL types to JSON. Invariant: what [`write_row`] writes is one valid
//! JSON object whatever the server sent: numbers (`int2/4/8`, `oid`, `float4/8`, `numeric`)
//! stay numbers, except `NaN` and the infinities, which JSON has not, as strings; `bool` is
//! `true`/`false`; `json`/`jsonb` are embedded as they are (the server validated them); NULL is
//! `null`; every other type (text, dates, UUIDs, arrays, bytea as `\x..`) is its text form as a
//! JSON string. Column names are the fields, in the statement's order.

use std::ops::Range;

/// How a column's text becomes JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonKind {
    Number,
    Bool,
    Json,
    String,
}

impl JsonKind {
    /// The mapping for a type OID (pg_type's built-in OIDs).
    pub fn of(type_oid: u32) -> JsonKind {
        match type_oid {
            20 | 21 | 23 | 26 | 700 | 701 | 1700 => JsonKind::Number,
            16 => JsonKind::Bool,
            114 | 3802 => JsonKind::Json,
            _ => JsonKind::String,
        }
    }
}

/// A result column: its name as a JSON key with the colon (`"name":`), and its mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub key: Vec<u8>,
    pub kind: JsonKind,
}

impl Column {
    pub fn new(name: &str, type_oid: u32) -> Column {
        let mut key = Vec::with_capacity(name.len() + 3);
        write_string(&mut key, name.as_bytes());
        key.push(b':');
        Column {
            key,
            kind: JsonKind::of(type_oid),
        }
    }
}

/// Appends `text` as a JSON string (invalid UTF-8 replaced, which a UTF-8 session never sends).
pub fn write_string(out: &mut Vec<u8>, text: &[u8]) {
    let text = String::from_utf8_lossy(text);
    // Writing a str into a Vec cannot fail.
    serde_json::to_writer(&mut *out, text.as_ref()).expect("a str serialises");
}

/// Whether `text` is a JSON number as PostgreSQL prints one (`NaN`, `Infinity` are not).
fn is_json_number(text: &[u8]) -> bool {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    digits.first().is_some_and(u8::is_ascii_digit)
        && digits
            .iter()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
}

/// Appends one row as a JSON object: `fields` are the row's values (`None` is NULL) as ranges
/// of `buf`, in `columns`' order.
pub fn write_row(
    out: &mut Vec<u8>,
    columns: &[Column],
    buf: &[u8],
    fields: impl IntoIterator<Item = Option<Range<usize>>>,
) {
    out.push(b'{');
    for (i, (column, field)) in columns.iter().zip(fields).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&column.key);
        let Some(range) = field else {
            out.extend_from_slice(b"null");
            continue;
        };
        let text = &buf[range];
        match column.kind {
            JsonKind::Number if is_json_number(text) => out.extend_from_slice(text),
            JsonKind::Bool if text == b"t" => out.extend_from_slice(b"true"),
            JsonKind::Bool if text == b"f" => out.extend_from_slice(b"false"),
            JsonKind::Json => out.extend_from_slice(text),
            _ => write_string(out, text),
        }
    }
    out.push(b'}');
}

/// Appends `keys` as a text array literal (`{"a","b\"c"}`), the parameter of a batch query's
/// `= ANY($1)`: every element quoted, so that commas, braces, spaces and `NULL` stay text.
pub fn write_text_array(out: &mut Vec<u8>, keys: &[&[u8]]) {
    out.push(b'{');
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        for &b in key.iter() {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(columns: &[Column], values: &[Option<&str>]) -> serde_json::Value {
        let mut buf = Vec::new();
        let mut ranges = Vec::new();
        for v in values {
            ranges.push(v.map(|v| {
                let start = buf.len();
                buf.extend_from_slice(v.as_bytes());
                start..buf.len()
            }));
        }
        let mut out = Vec::new();
        write_row(&mut out, columns, &buf, ranges);
        serde_json::from_slice(&out).expect("valid JSON")
    }

    #[test]
    fn sql_types_map_to_json() {
        let columns = [
            Column::new("id", 23),
            Column::new("score", 701),
            Column::new("ok", 16),
            Column::new("doc", 3802),
            Column::new("name \"q\"", 25),
            Column::new("gone", 25),
            Column::new("amount", 1700),
        ];
        let v = row(
            &columns,
            &[
                Some("42"),
                Some("NaN"),
                Some("t"),
                Some(r#"{"a": [1, 2]}"#),
                Some("Ann \\ \"x\"\n"),
                None,
                Some("-12.50"),
            ],
        );
        assert_eq!(
            v,
            serde_json::json!({
                "id": 42, "score": "NaN", "ok": true, "doc": {"a": [1, 2]},
                "name \"q\"": "Ann \\ \"x\"\n", "gone": null, "amount": -12.50
            })
        );
        assert_eq!(
            row(&columns[1..2], &[Some("-Infinity")])["score"],
            "-Infinity"
        );
        assert_eq!(row(&columns[1..2], &[Some("1.5e+20")])["score"], 1.5e20);
    }

    #[test]
    fn keys_become_a_quoted_text_array() {
        let mut out = Vec::new();
        write_text_array(&mut out, &[b"1", b"a,b", b"q\"\\", b"NULL"]);
        assert_eq!(out, br#"{"1","a,b","q\"\\","NULL"}"#);
    }
}
