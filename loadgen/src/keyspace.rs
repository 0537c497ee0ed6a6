//! `Keyspace`: the server's deterministic data set, `keys` users with JSON profiles that look
//! like the seeds' enrichment data (country, state, zip, ...).
//!
//! Owns: key names and values. Invariants: key `i` is `user:user_{i:06}` for `i < keys`; its
//! value depends only on `i` and `value_size` (same bytes on every run and every shard) and is
//! exactly `value_size` bytes long when `value_size` exceeds the bare JSON.

use std::sync::Arc;

const COUNTRIES: [(&str, &[&str]); 5] = [
    ("USA", &["CA", "NY", "TX", "WA", "FL"]),
    ("NLD", &["NH", "ZH", "UT"]),
    ("IND", &["MH", "KA", "DL"]),
    ("BRA", &["SP", "RJ"]),
    ("DEU", &["BY", "BE", "HH"]),
];
const SEGMENTS: [&str; 4] = ["retail", "pro", "institutional", "employee"];

/// The user id of key `i` (as in the seeds: `user_001`).
pub fn user_id(i: u64) -> String {
    format!("user_{i:06}")
}

/// The key of user `i`.
pub fn key(i: u64) -> String {
    format!("user:{}", user_id(i))
}

/// The key index of a key name, if it is one of ours.
pub fn index_of(key: &[u8]) -> Option<u64> {
    let digits = key.strip_prefix(b"user:user_")?;
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The JSON profile of user `i`, padded to `value_size` bytes. Over 70 lines: the profile is
/// written field by field in the order it appears in the value.
pub fn value(i: u64, value_size: usize) -> Vec<u8> {
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (country, states) = COUNTRIES[(h % COUNTRIES.len() as u64) as usize];
    let state = states[((h >> 8) % states.len() as u64) as usize];
    let mut json = format!(
        "{{\"user_id\":\"{}\",\"country_of_purchase\":\"{country}\",\"state_of_purchase\":\"{state}\",\
         \"zip\":\"{:05}\",\"segment\":\"{}\",\"signup_year\":{}",
        user_id(i),
        (h >> 16) % 100_000,
        SEGMENTS[((h >> 40) % SEGMENTS.len() as u64) as usize],
        2010 + (h >> 48) % 15,
    );
    // `,"pad":""}` is 10 bytes.
    if json.len() + 10 < value_size {
        json.push_str(",\"pad\":\"");
        json.extend(std::iter::repeat_n('x', value_size - json.len() - 2));
        json.push_str("\"}");
    } else {
        json.push('}');
    }
    json.into_bytes()
}

/// All values, computed once and shared by the server's shards: one contiguous arena with an
/// offset per key, so a lookup of a random key touches the offsets (8 bytes per key) and the
/// value, not a boxed value per key behind a 16-byte pointer (a cache miss more per GET: the
/// lookup was 11% of the server thread's samples with boxed values).
#[derive(Clone)]
pub struct Keyspace {
    /// `values[offsets[i]..offsets[i + 1]]` is key `i`'s value; `offsets.len() == keys + 1`.
    offsets: Arc<[usize]>,
    values: Arc<[u8]>,
}

impl Keyspace {
    /// `keys` users with values of about `value_size` bytes.
    pub fn new(keys: u64, value_size: usize) -> Self {
        let mut offsets = Vec::with_capacity(keys as usize + 1);
        let mut values = Vec::with_capacity(keys as usize * value_size);
        offsets.push(0);
        for i in 0..keys {
            values.extend_from_slice(&value(i, value_size));
            offsets.push(values.len());
        }
        Keyspace {
            offsets: offsets.into(),
            values: values.into(),
        }
    }

    /// Number of keys.
    pub fn len(&self) -> u64 {
        self.offsets.len() as u64 - 1
    }

    /// True when there are no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of `key`, if it exists.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let i = usize::try_from(index_of(key)?).ok()?;
        let (start, end) = (*self.offsets.get(i)?, *self.offsets.get(i + 1)?);
        Some(&self.values[start..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_values_are_padded_json() {
        assert_eq!(index_of(key(42).as_bytes()), Some(42));
        assert_eq!(index_of(b"user:user_"), None);
        assert_eq!(index_of(b"other:1"), None);
        let v = value(7, 256);
        assert_eq!(v.len(), 256);
        let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(parsed["user_id"], "user_000007");
        assert!(parsed["country_of_purchase"].is_string());
        assert_eq!(value(7, 256), v, "deterministic");
        let small = value(7, 10);
        assert!(serde_json::from_slice::<serde_json::Value>(&small).is_ok());
        let ks = Keyspace::new(10, 64);
        assert_eq!(ks.len(), 10);
        for i in 0..10 {
            assert_eq!(
                ks.get(key(i).as_bytes()),
                Some(&value(i, 64)[..]),
                "key {i}"
            );
        }
        assert!(ks.get(key(10).as_bytes()).is_none());
        assert!(Keyspace::new(0, 64).is_empty());
    }
}
