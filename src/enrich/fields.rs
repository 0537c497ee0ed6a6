//! `Fields`: a JSON object's fields in input order, each value kept as the raw JSON text it
//! came as.
//!
//! Owns: the representation of a record between parsing and writing. Invariants: fields keep
//! their input order and their values' bytes; `get` answers for the last field of a name (as a
//! JSON parser that keeps one value per name would), and `insert` replaces every field of that
//! name in place of the first, or appends. A vector, not a map: records have a few fields, so
//! a scan is cheaper than hashing every name on parse.

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Fields(Vec<(String, Box<RawValue>)>);

impl Fields {
    /// The value of field `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<&RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| &**v)
    }

    /// Sets field `name`: in place of its first occurrence (others of the name are removed),
    /// or at the end.
    pub fn insert(&mut self, name: String, value: Box<RawValue>) {
        match self.0.iter().position(|(k, _)| *k == name) {
            Some(first) => {
                let mut seen = false;
                self.0.retain(|(k, _)| {
                    let keep = *k != name || !seen;
                    seen |= *k == name;
                    keep
                });
                self.0[first].1 = value;
            }
            None => self.0.push((name, value)),
        }
    }

    /// The fields in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), &**v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Extend<(String, Box<RawValue>)> for Fields {
    fn extend<T: IntoIterator<Item = (String, Box<RawValue>)>>(&mut self, iter: T) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl IntoIterator for Fields {
    type Item = (String, Box<RawValue>);
    type IntoIter = std::vec::IntoIter<(String, Box<RawValue>)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                    fields.push(entry);
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    #[test]
    fn keeps_order_and_bytes_and_replaces_in_place() {
        let mut f: Fields = serde_json::from_str(r#"{"a":1.50,"b":"x","a":2}"#).unwrap();
        assert_eq!(f.get("a").unwrap().get(), "2", "the last of a name");
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"a":1.50,"b":"x","a":2}"#
        );
        f.insert("a".into(), raw("3"));
        f.insert("c".into(), raw("[1]"));
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"a":3,"b":"x","c":[1]}"#
        );
        assert!(serde_json::from_str::<Fields>("[1]").is_err());
    }
}
