//! `RedisLookup`: Redis as a [`BatchLookup`] for the value kind a user's keys hold — strings
//! (`GET`/`MGET`, as `RedisClient` itself), whole hashes (`HGETALL`) or some fields of hashes
//! (`HMGET`) — on one server or a cluster (`RedisCluster`, which is also a `BatchLookup` of
//! strings on its own).
//!
//! Owns: turning hash replies into values, and choosing the commands for a value kind. Invariants: a hash's value is a JSON object of its
//! fields, each value a JSON string, in the order Redis answered (text that is not UTF-8 is
//! replaced, as `sluice enrich` does with lines); a key with no hash (an empty `HGETALL`, or
//! every `HMGET` field nil) is missing; there is no multi-key `HGETALL`, so a batch of hash keys
//! goes out as that many commands pipelined in one write, and fails as a whole if one of them
//! fails (each record then gets the error, as with a failed `MGET`).

use super::redis::RedisValues;
use super::{BatchLookup, Invalidated, Values};
use crate::redis::cluster::{RedisCluster, Routed};
use crate::redis::{RedisClient, RedisError, Reply, ReplyFuture};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What the keys hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ValueKind {
    /// Strings: `GET`, or `MGET` when batching.
    #[default]
    String,
    /// Hashes, whole: `HGETALL`.
    Hash,
    /// These fields of hashes: `HMGET`.
    HashFields(Vec<String>),
}

impl std::str::FromStr for ValueKind {
    type Err = String;
    /// `string`, `hash`, or `hash:FIELD,FIELD,...`.
    fn from_str(s: &str) -> Result<ValueKind, String> {
        match s.split_once(':') {
            None if s == "string" => Ok(ValueKind::String),
            None if s == "hash" => Ok(ValueKind::Hash),
            Some(("hash", fields)) => {
                let fields: Vec<String> = fields.split(',').map(str::to_string).collect();
                if fields.iter().any(String::is_empty) {
                    return Err(format!("`{s}`: an empty field name in hash:FIELD,FIELD"));
                }
                Ok(ValueKind::HashFields(fields))
            }
            _ => Err(format!(
                "`{s}`: expected string, hash, or hash:FIELD,FIELD,..."
            )),
        }
    }
}

/// See the module documentation.
pub struct RedisLookup {
    target: Target,
    value: ValueKind,
}

/// One server, or a cluster's nodes.
enum Target {
    One(RedisClient),
    Cluster(RedisCluster),
}

impl RedisLookup {
    pub fn new(client: RedisClient, value: ValueKind) -> RedisLookup {
        RedisLookup {
            target: Target::One(client),
            value,
        }
    }

    /// Lookups in a cluster, each key at its slot's node.
    pub fn cluster(cluster: RedisCluster, value: ValueKind) -> RedisLookup {
        RedisLookup {
            target: Target::Cluster(cluster),
            value,
        }
    }

    /// Every answered request's time on the wire, over the clients of every node.
    pub fn wire_latency(&self) -> hdrhistogram::Histogram<u64> {
        match &self.target {
            Target::One(client) => client.wire_latency(),
            Target::Cluster(c) => {
                let mut total = crate::redis::wire_histogram();
                c.add_wire_latency_to(&mut total);
                total
            }
        }
    }

    fn hashes(target: &Target, value: &ValueKind, keys: &[&[u8]]) -> HashValues {
        let requests = keys
            .iter()
            .map(|key| {
                let mut args: Vec<&[u8]> = match value {
                    ValueKind::HashFields(_) => vec![b"HMGET", key],
                    _ => vec![b"HGETALL", key],
                };
                if let ValueKind::HashFields(fields) = value {
                    args.extend(fields.iter().map(|f| f.as_bytes()));
                }
                match target {
                    Target::One(client) => Request::One(client.command(&args)),
                    Target::Cluster(c) => {
                        let owned = args.iter().map(|a| a.to_vec()).collect();
                        Request::Routed(c.command_for_key(key, owned))
                    }
                }
            })
            .map(Pending::Waiting)
            .collect();
        HashValues {
            requests,
            fields: match value {
                ValueKind::HashFields(f) => Some(f.clone()),
                _ => None,
            },
        }
    }
}

impl BatchLookup for RedisLookup {
    type Error = RedisError;
    type Future = LookupFuture;

    fn get_many(&self, keys: &[&[u8]]) -> LookupFuture {
        match (&self.target, &self.value) {
            (Target::Cluster(c), ValueKind::String) => LookupFuture::Cluster(c.get_many(keys)),
            (Target::One(client), ValueKind::String) => {
                LookupFuture::Strings(client.get_many(keys))
            }
            (target, value) => LookupFuture::Hashes(Self::hashes(target, value, keys)),
        }
    }

    fn get_one(&self, key: &[u8]) -> LookupFuture {
        match (&self.target, &self.value) {
            (Target::Cluster(c), ValueKind::String) => LookupFuture::Cluster(c.get_one(key)),
            (Target::One(client), ValueKind::String) => LookupFuture::Strings(client.get_one(key)),
            (target, value) => LookupFuture::Hashes(Self::hashes(target, value, &[key])),
        }
    }

    fn invalidated(&self) -> Option<Invalidated> {
        match &self.target {
            Target::Cluster(c) => BatchLookup::invalidated(c),
            Target::One(client) => client.invalidated(),
        }
    }
}

impl BatchLookup for RedisCluster {
    type Error = RedisError;
    type Future = ClusterValues;

    /// `MGET` per hash slot, to each slot's node.
    fn get_many(&self, keys: &[&[u8]]) -> Self::Future {
        self.lookup(keys, false)
    }

    fn get_one(&self, key: &[u8]) -> Self::Future {
        self.lookup(&[key], true)
    }

    fn invalidated(&self) -> Option<Invalidated> {
        RedisCluster::invalidated(self)
    }
}

/// The values of a `RedisLookup` request.
pub enum LookupFuture {
    Strings(RedisValues),
    Hashes(HashValues),
    Cluster(ClusterValues),
}

/// The values of a cluster request (slots to their nodes, redirections followed).
pub type ClusterValues = crate::redis::cluster::Lookup;

impl Future for LookupFuture {
    type Output = Result<Values, RedisError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            LookupFuture::Strings(f) => Pin::new(f).poll(cx),
            LookupFuture::Hashes(f) => Pin::new(f).poll(cx),
            LookupFuture::Cluster(f) => f.as_mut().poll(cx),
        }
    }
}

enum Pending {
    Waiting(Request),
    Answered(Option<Bytes>),
}

/// One hash's command: to the one server, or routed to its slot's node.
enum Request {
    One(ReplyFuture),
    Routed(Routed),
}

impl Future for Request {
    type Output = Result<Reply, RedisError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Request::One(f) => Pin::new(f).poll(cx),
            Request::Routed(f) => f.as_mut().poll(cx),
        }
    }
}

/// The hashes of a batch, one command per key.
pub struct HashValues {
    requests: Vec<Pending>,
    /// The fields asked for (`HMGET`), else every field (`HGETALL`).
    fields: Option<Vec<String>>,
}

impl Future for HashValues {
    type Output = Result<Values, RedisError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut pending = false;
        for request in &mut this.requests {
            if let Pending::Waiting(reply) = request {
                match Pin::new(reply).poll(cx) {
                    Poll::Pending => pending = true,
                    Poll::Ready(reply) => {
                        *request = Pending::Answered(object(reply?, this.fields.as_deref())?)
                    }
                }
            }
        }
        if pending {
            return Poll::Pending;
        }
        Poll::Ready(Ok(this
            .requests
            .iter_mut()
            .map(|r| match std::mem::replace(r, Pending::Answered(None)) {
                Pending::Answered(v) => v,
                Pending::Waiting(_) => unreachable!("every request answered above"),
            })
            .collect()))
    }
}

fn text(reply: &Reply) -> Option<String> {
    match reply {
        Reply::Bulk(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Reply::Status(s) => Some(s.clone()),
        _ => None,
    }
}

/// A hash reply as a JSON object; `None` when the key holds no hash.
fn object(reply: Reply, fields: Option<&[String]>) -> Result<Option<Bytes>, RedisError> {
    let unexpected = |got: &Reply| RedisError::UnexpectedReply {
        command: if fields.is_some() { "HMGET" } else { "HGETALL" },
        got: got.describe(),
    };
    let pairs: Vec<(String, String)> = match (reply, fields) {
        // RESP3 answers HGETALL with a map, RESP2 with an array of field, value, ...
        (Reply::Map(map), None) => map
            .iter()
            .map(|(k, v)| Some((text(k)?, text(v)?)))
            .collect::<Option<_>>()
            .ok_or_else(|| unexpected(&Reply::Map(map.clone())))?,
        (Reply::Array(items), None) if items.len() % 2 == 0 => items
            .chunks(2)
            .map(|kv| Some((text(&kv[0])?, text(&kv[1])?)))
            .collect::<Option<_>>()
            .ok_or_else(|| unexpected(&Reply::Array(items.clone())))?,
        (Reply::Array(items), Some(names)) if items.len() == names.len() => names
            .iter()
            .zip(&items)
            .filter_map(|(name, v)| match v {
                Reply::Nil => None,
                v => Some(text(v).map(|t| (name.clone(), t))),
            })
            .collect::<Option<_>>()
            .ok_or_else(|| unexpected(&Reply::Array(items.clone())))?,
        (other, _) => return Err(unexpected(&other)),
    };
    if pairs.is_empty() {
        return Ok(None);
    }
    let map: serde_json::Map<String, serde_json::Value> = pairs
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    let json = serde_json::to_vec(&map).expect("a map of strings serialises");
    Ok(Some(Bytes::from(json)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(s.as_bytes().to_vec())
    }

    #[test]
    fn hashes_become_json_objects_and_empty_ones_are_missing() {
        let all = Reply::Array(vec![bulk("tier"), bulk("gold"), bulk("q\""), bulk("1")]);
        let json = object(all, None).unwrap().unwrap();
        assert_eq!(&json[..], br#"{"tier":"gold","q\"":"1"}"#);
        let map = Reply::Map(vec![(bulk("a"), bulk("b"))]);
        assert_eq!(&object(map, None).unwrap().unwrap()[..], br#"{"a":"b"}"#);
        assert_eq!(object(Reply::Array(vec![]), None).unwrap(), None);
        let fields = ["tier".to_string(), "zip".to_string()];
        let some = Reply::Array(vec![bulk("gold"), Reply::Nil]);
        assert_eq!(
            &object(some, Some(&fields)).unwrap().unwrap()[..],
            br#"{"tier":"gold"}"#
        );
        let none = Reply::Array(vec![Reply::Nil, Reply::Nil]);
        assert_eq!(object(none, Some(&fields)).unwrap(), None);
        assert!(object(Reply::Int(3), None).is_err());
    }

    #[test]
    fn value_kinds_parse_or_say_why_not() {
        assert_eq!("hash".parse(), Ok(ValueKind::Hash));
        assert_eq!(
            "hash:a,b".parse(),
            Ok(ValueKind::HashFields(vec!["a".into(), "b".into()]))
        );
        assert!("hash:a,,b"
            .parse::<ValueKind>()
            .unwrap_err()
            .contains("empty field"));
        assert!("list"
            .parse::<ValueKind>()
            .unwrap_err()
            .contains("expected string"));
    }
}
