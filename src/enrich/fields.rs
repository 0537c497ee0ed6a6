//! `Fields`: a JSON object's fields in input order, each value kept as the raw JSON text it
//! came as, all in one buffer.
//!
//! Owns: the representation of a record between parsing and writing. Invariants: fields keep
//! their input order and their values' bytes; every value is a valid JSON text (it was parsed,
//! or the caller of `insert` made it with a JSON writer); `get` answers for the last field of a
//! name (as a JSON parser that keeps one value per name would), and `insert` replaces every
//! field of that name in place of the first, or appends. One `String` holds the line as read
//! plus anything inserted or unescaped later, and each field is two ranges into it: parsing a
//! line allocates twice (the buffer and the ranges), not twice per field, and writing copies
//! the bytes back out without re-serialising them. A vector, not a map: records have a few
//! fields, so a scan is cheaper than hashing every name on parse.

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;
use std::ops::Range;

/// A field: where its (unescaped) name and its value's JSON text are in `Fields::text`.
#[derive(Debug, Clone, Copy)]
struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

fn range((start, end): (u32, u32)) -> Range<usize> {
    start as usize..end as usize
}

/// See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    text: String,
    spans: Vec<Span>,
}

/// A map key as the parser gives it: borrowed from the input when it has no escapes.
enum Name<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Name<'de>, E> {
                Ok(Name::Borrowed(s))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Name<'de>, E> {
                Ok(Name::Owned(s.to_owned()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Name<'de>, E> {
                Ok(Name::Owned(s))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

/// The fields of the object at `base`: spans into `base` (names with escapes unescaped into
/// `extra`, at offsets past `base`'s end).
struct Parsed {
    spans: Vec<Span>,
    extra: String,
}

/// Parses an object whose text starts at address `base` and is `len` bytes long.
struct ObjectVisitor {
    base: usize,
    len: usize,
}

impl ObjectVisitor {
    fn offsets(&self, s: &str) -> (u32, u32) {
        let start = s.as_ptr() as usize - self.base;
        (start as u32, (start + s.len()) as u32)
    }
}

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = Parsed;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parsed, A::Error> {
        let mut parsed = Parsed {
            spans: Vec::with_capacity(map.size_hint().unwrap_or(8).max(8)),
            extra: String::new(),
        };
        while let Some(name) = map.next_key::<Name<'de>>()? {
            let value: &'de RawValue = map.next_value()?;
            let name = match name {
                Name::Borrowed(s) => self.offsets(s),
                Name::Owned(s) => {
                    let start = self.len + parsed.extra.len();
                    parsed.extra.push_str(&s);
                    (start as u32, (start + s.len()) as u32)
                }
            };
            parsed.spans.push(Span {
                name,
                value: self.offsets(value.get()),
            });
        }
        Ok(parsed)
    }
}

/// Parses the object `text` into spans relative to its start.
fn parse_spans(text: &str) -> Result<Parsed, serde_json::Error> {
    if text.len() > u32::MAX as usize / 2 {
        return Err(de::Error::custom("a record over 2 GiB"));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = de.deserialize_map(ObjectVisitor {
        base: text.as_ptr() as usize,
        len: text.len(),
    })?;
    de.end()?;
    Ok(parsed)
}

impl Fields {
    /// The fields of the JSON object `text`, or the parser's error.
    pub fn parse(text: &str) -> Result<Fields, serde_json::Error> {
        let parsed = parse_spans(text)?;
        let mut buffer = String::with_capacity(text.len() + parsed.extra.len());
        buffer.push_str(text);
        buffer.push_str(&parsed.extra);
        Ok(Fields {
            text: buffer,
            spans: parsed.spans,
        })
    }

    fn name(&self, span: &Span) -> &str {
        &self.text[range(span.name)]
    }

    fn value(&self, span: &Span) -> &str {
        &self.text[range(span.value)]
    }

    /// The value of field `name` as JSON text, if there is one.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.spans
            .iter()
            .rev()
            .find(|s| self.name(s) == name)
            .map(|s| self.value(s))
    }

    /// Appends `s` to the buffer; its range.
    fn append(&mut self, s: &str) -> Result<(u32, u32), String> {
        let start = self.text.len();
        if start + s.len() > u32::MAX as usize {
            return Err("a record over 4 GiB".into());
        }
        self.text.push_str(s);
        Ok((start as u32, self.text.len() as u32))
    }

    /// Sets field `name` to `value`, a valid JSON text: in place of its first occurrence
    /// (others of the name are removed), or at the end. Fails only past 4 GiB of record.
    pub fn insert(&mut self, name: &str, value: &str) -> Result<(), String> {
        let value = self.append(value)?;
        match self.spans.iter().position(|s| self.name(s) == name) {
            Some(first) => {
                let mut at = 0;
                let text = &self.text;
                self.spans.retain(|s| {
                    let keep = at <= first || &text[range(s.name)] != name;
                    at += 1;
                    keep
                });
                self.spans[first].value = value;
            }
            None => {
                let name = self.append(name)?;
                self.spans.push(Span { name, value });
            }
        }
        Ok(())
    }

    /// Merges the JSON object `object` in: each of its fields as `insert` would, in order.
    /// `Ok(false)`, with nothing changed, when it is not a JSON object.
    pub fn merge_object(&mut self, object: &str) -> Result<bool, String> {
        let Ok(parsed) = parse_spans(object) else {
            return Ok(false);
        };
        for span in &parsed.spans {
            let text = |(start, end): (u32, u32)| {
                let (start, end) = (start as usize, end as usize);
                if start >= object.len() {
                    &parsed.extra[start - object.len()..end - object.len()]
                } else {
                    &object[start..end]
                }
            };
            self.insert(text(span.name), text(span.value))?;
        }
        Ok(true)
    }

    /// Makes room for `bytes` more of inserted names and values (one reallocation instead of
    /// one per field inserted).
    pub fn reserve(&mut self, bytes: usize) {
        self.text.reserve(bytes);
    }

    /// The fields in order: name, and value as JSON text.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.spans.iter().map(|s| (self.name(s), self.value(s)))
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Bytes held: the buffer and the field ranges.
    pub fn heap_bytes(&self) -> usize {
        self.text.capacity() + self.spans.capacity() * std::mem::size_of::<Span>()
    }

    /// Appends the fields as one JSON object (values as they came, names escaped as JSON
    /// needs).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.reserve(self.text.len() + 2);
        out.push(b'{');
        for (i, (name, value)) in self.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let plain = name.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
            if plain {
                out.push(b'"');
                out.extend_from_slice(name.as_bytes());
                out.push(b'"');
            } else {
                serde_json::to_writer(&mut *out, name).expect("a string serialises");
            }
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
        }
        out.push(b'}');
    }

    /// The fields as one JSON object.
    pub fn to_json(&self) -> String {
        let mut out = Vec::new();
        self.write_json(&mut out);
        String::from_utf8(out).expect("names and values are UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_bytes_and_replaces_in_place() {
        let mut f = Fields::parse(r#"{"a":1.50, "b" : "x","a":2}"#).unwrap();
        assert_eq!(f.get("a"), Some("2"), "the last of a name");
        assert_eq!(f.to_json(), r#"{"a":1.50,"b":"x","a":2}"#);
        f.insert("a", "3").unwrap();
        f.insert("c", "[1]").unwrap();
        assert_eq!(f.to_json(), r#"{"a":3,"b":"x","c":[1]}"#);
        assert!(f
            .merge_object(r#"{"b":{"n":1},"d":null,"b":true}"#)
            .unwrap());
        assert_eq!(f.to_json(), r#"{"a":3,"b":true,"c":[1],"d":null}"#);
        assert!(Fields::parse("[1]").is_err());
        assert!(Fields::parse(r#"{"a":1} x"#).is_err(), "trailing text");
        let before = f.to_json();
        assert!(!f.merge_object("[1]").unwrap());
        assert!(!f.merge_object(r#"{"x":1"#).unwrap());
        assert_eq!(f.to_json(), before, "nothing merged from a non-object");
    }

    #[test]
    fn escaped_names_are_unescaped_and_written_escaped_again() {
        let mut f = Fields::parse(r#"{"a\"b":1,"\u00e9":"\u00e9","tab\t":2}"#).unwrap();
        assert_eq!(f.get("a\"b"), Some("1"));
        assert_eq!(f.get("é"), Some(r#""\u00e9""#), "values stay as written");
        assert_eq!(f.get("tab\t"), Some("2"));
        assert!(f.merge_object(r#"{"a\"b":3,"new\\":4}"#).unwrap());
        let json = f.to_json();
        assert_eq!(json, r#"{"a\"b":3,"é":"\u00e9","tab\t":2,"new\\":4}"#);
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["tab\t"], 2);
    }
}
