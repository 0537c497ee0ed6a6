//! `RedisCluster`: lookups in a Redis Cluster from a shard — the slot map discovered from any
//! node (`CLUSTER SLOTS`), each key sent to the node that owns its hash slot, `MOVED` followed
//! (the map refreshed) and `ASK` followed (`ASKING`, then the command, on one connection).
//!
//! Owns: the shard's slot map and its clients, one per node (each with its connections, its
//! login and its TLS, as the seed's URL says). Invariants: a key's slot is CRC16 of the key, or
//! of its hash tag (the text between the first `{` and the next `}`, when not empty), modulo
//! 16384, as Redis computes it; an `MGET` holds keys of one slot only (Redis refuses keys of
//! several slots with `CROSSSLOT`); a request is redirected at most `MAX_REDIRECTS` times, then
//! fails with the last redirection as its error; a request whose node cannot be reached reads
//! the map again once and goes to the slot's owner then (a failover), else fails with the
//! connection's error for the retry policy to decide; a map refresh replaces the whole map.

use super::{
    get_values, ClientConfig, Endpoint, Invalidated, RedisClient, RedisError, Reply, ReplyFuture,
    Server,
};
use bytes::Bytes;
use smallvec::SmallVec;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::rc::Rc;

/// A cluster lookup's answer: one value per key, in key order.
pub type Lookup = Pin<Box<dyn Future<Output = Result<Vec<Option<Bytes>>, RedisError>>>>;

/// A routed command's reply.
pub type Routed = Pin<Box<dyn Future<Output = Result<Reply, RedisError>>>>;

/// Hash slots in a cluster.
pub const SLOTS: usize = 16384;
/// Redirections (`MOVED`, `ASK`) followed for one request before it fails.
pub const MAX_REDIRECTS: usize = 5;

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash slot of `key`, hash tags included.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS as u16
}

/// A redirection in an error reply: `MOVED 3999 127.0.0.1:6381` or `ASK 3999 127.0.0.1:6381`.
#[derive(Debug, PartialEq, Eq)]
enum Redirect {
    Moved(SocketAddr),
    Ask(SocketAddr),
}

fn redirect(error: &RedisError) -> Option<Redirect> {
    let RedisError::ErrorReply { message } = error else {
        return None;
    };
    let mut words = message.split_whitespace();
    let kind = words.next()?;
    let _slot = words.next()?;
    let addr = words.next()?.to_socket_addrs().ok()?.next()?;
    match kind {
        "MOVED" => Some(Redirect::Moved(addr)),
        "ASK" => Some(Redirect::Ask(addr)),
        _ => None,
    }
}

/// The slot ranges and their masters, from a `CLUSTER SLOTS` reply.
fn parse_slots(reply: &Reply) -> Result<Vec<(u16, u16, SocketAddr)>, String> {
    let Reply::Array(ranges) = reply else {
        return Err(format!("CLUSTER SLOTS answered {}", reply.describe()));
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let bad = || {
            format!("CLUSTER SLOTS: a range that is not [start, end, [ip, port, ...]]: {range:?}")
        };
        let Reply::Array(parts) = range else {
            return Err(bad());
        };
        let (Some(Reply::Int(start)), Some(Reply::Int(end)), Some(Reply::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return Err(bad());
        };
        let host = match master.first() {
            Some(Reply::Bulk(h)) => String::from_utf8_lossy(h).into_owned(),
            _ => return Err(bad()),
        };
        let Some(Reply::Int(port)) = master.get(1) else {
            return Err(bad());
        };
        let addr = (host.as_str(), *port as u16)
            .to_socket_addrs()
            .map_err(|e| format!("CLUSTER SLOTS: node {host}:{port}: {e}"))?
            .next()
            .ok_or_else(bad)?;
        if !(0..SLOTS as i64).contains(start) || !(*start..SLOTS as i64).contains(end) {
            return Err(bad());
        }
        out.push((*start as u16, *end as u16, addr));
    }
    Ok(out)
}

struct Topology {
    /// The node index of each slot (`None`: no owner known).
    slots: Vec<Option<u16>>,
    nodes: Vec<(SocketAddr, Rc<RedisClient>)>,
}

struct Inner {
    seed: Endpoint,
    config: ClientConfig,
    topology: RefCell<Topology>,
    /// `MOVED` and `ASK` redirections followed, and slot map reads.
    moved: Cell<u64>,
    asked: Cell<u64>,
    refreshes: Cell<u64>,
}

/// See the module documentation. Create one per shard; `!Send`, like the clients it holds.
pub struct RedisCluster {
    inner: Rc<Inner>,
}

impl RedisCluster {
    /// A cluster reached through `seed` (any node). Nothing is connected until the first
    /// lookup, which discovers the slot map.
    pub fn new(seed: Endpoint, config: &ClientConfig) -> RedisCluster {
        RedisCluster {
            inner: Rc::new(Inner {
                seed,
                config: config.clone(),
                topology: RefCell::new(Topology {
                    slots: vec![None; SLOTS],
                    nodes: Vec::new(),
                }),
                moved: Cell::new(0),
                asked: Cell::new(0),
                refreshes: Cell::new(0),
            }),
        }
    }

    /// `MOVED` and `ASK` redirections followed, and reads of the slot map, so far.
    pub fn redirections(&self) -> (u64, u64, u64) {
        let i = &self.inner;
        (i.moved.get(), i.asked.get(), i.refreshes.get())
    }

    /// Adds every node's wire times to `total`.
    pub fn add_wire_latency_to(&self, total: &mut hdrhistogram::Histogram<u64>) {
        for (_, client) in &self.inner.topology.borrow().nodes {
            total
                .add(client.wire_latency())
                .expect("wire histograms share their bounds");
        }
    }

    /// The nodes known so far.
    pub fn nodes(&self) -> Vec<SocketAddr> {
        let t = self.inner.topology.borrow();
        t.nodes.iter().map(|(a, _)| *a).collect()
    }

    /// Looks `keys` up: `GET` for one key when `single`, else `MGET` per slot. Each slot's
    /// request is sent now to the node the map says (pipelined, in slot order of first
    /// appearance); a slot whose node redirects or cannot be reached, or has no owner known
    /// yet, is then looked up through the map and its redirections.
    pub fn lookup(&self, keys: &[&[u8]], single: bool) -> Lookup {
        let batch = Batch::new(keys);
        let sent = self.inner.send_known(&batch, single);
        let inner = self.inner.clone();
        Box::pin(async move { inner.finish(batch, sent, single).await })
    }

    /// Sends `args`, a command about `key` (`HGETALL key`), to the node serving the key's slot,
    /// following redirections: its reply.
    pub fn command_for_key(&self, key: &[u8], args: Vec<Vec<u8>>) -> Routed {
        let inner = self.inner.clone();
        let slot = key_slot(key);
        Box::pin(async move {
            let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            inner.routed(slot, &args, 1).await
        })
    }

    /// What the nodes' connections heard from client tracking (with `ClientConfig::tracking`).
    pub fn invalidated(&self) -> Option<Invalidated> {
        let t = self.inner.topology.borrow();
        let mut keys = Vec::new();
        let mut any = false;
        for (_, client) in &t.nodes {
            match client.invalidations().and_then(|i| i.take()) {
                Some(Invalidated::All) => return Some(Invalidated::All),
                Some(Invalidated::Keys(k)) => {
                    any = true;
                    keys.extend(k);
                }
                None => {}
            }
        }
        any.then_some(Invalidated::Keys(keys))
    }
}

impl Inner {
    /// The client for the node at `addr`, created (with the seed's login and TLS) if new.
    fn node(&self, addr: SocketAddr) -> (u16, Rc<RedisClient>) {
        let mut t = self.topology.borrow_mut();
        if let Some(i) = t.nodes.iter().position(|(a, _)| *a == addr) {
            return (i as u16, t.nodes[i].1.clone());
        }
        let mut endpoint = self.seed.clone();
        endpoint.server = Server::Tcp(addr);
        let client = Rc::new(RedisClient::new(endpoint, &self.config));
        t.nodes.push((addr, client.clone()));
        ((t.nodes.len() - 1) as u16, client)
    }

    /// Reads the slot map from the seed, or else from a node known before.
    async fn refresh(&self) -> Result<(), RedisError> {
        let mut candidates: Vec<Rc<RedisClient>> = Vec::new();
        if let Server::Tcp(seed) = self.seed.server {
            candidates.push(self.node(seed).1);
        } else {
            candidates.push(Rc::new(RedisClient::new(self.seed.clone(), &self.config)));
        }
        candidates.extend(self.topology.borrow().nodes.iter().map(|(_, c)| c.clone()));
        let mut last = None;
        for client in candidates {
            match client.command(&[b"CLUSTER", b"SLOTS"]).await {
                Ok(reply) => {
                    let ranges = parse_slots(&reply).map_err(|reason| RedisError::Protocol {
                        addr: self.seed.server.clone(),
                        reason,
                    })?;
                    let mut slots = vec![None; SLOTS];
                    for (start, end, addr) in ranges {
                        let (node, _) = self.node(addr);
                        for slot in &mut slots[start as usize..=end as usize] {
                            *slot = Some(node);
                        }
                    }
                    self.topology.borrow_mut().slots = slots;
                    self.refreshes.set(self.refreshes.get() + 1);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least the seed was asked"))
    }

    /// The client owning `slot`, refreshing the map once if no owner is known.
    async fn owner(&self, slot: u16) -> Result<Rc<RedisClient>, RedisError> {
        for _ in 0..2 {
            let owner = {
                let t = self.topology.borrow();
                t.slots[slot as usize].map(|n| t.nodes[n as usize].1.clone())
            };
            if let Some(client) = owner {
                return Ok(client);
            }
            self.refresh().await?;
        }
        Err(RedisError::Protocol {
            addr: self.seed.server.clone(),
            reason: format!("no node of the cluster serves hash slot {slot}"),
        })
    }

    /// One slot's keys, redirected as the cluster says.
    /// One slot's keys, redirected as the cluster says.
    async fn slot_lookup(
        &self,
        slot: u16,
        keys: &[&[u8]],
        single: bool,
    ) -> Result<Vec<Option<Bytes>>, RedisError> {
        let command: &[u8] = if single { b"GET" } else { b"MGET" };
        let mut args: Vec<&[u8]> = Vec::with_capacity(keys.len() + 1);
        args.push(command);
        args.extend_from_slice(keys);
        get_values(self.routed(slot, &args, keys.len()).await?, single)
    }

    /// `args`, about keys of `slot` (`weight` of them), to the slot's node, following `MOVED`,
    /// `ASK` and a failover; the reply.
    async fn routed(&self, slot: u16, args: &[&[u8]], weight: usize) -> Result<Reply, RedisError> {
        let mut client = self.owner(slot).await?;
        let mut asking = false;
        let mut redirects = 0;
        let mut failed_over = false;
        loop {
            let reply = if asking {
                client.command_after_asking(args).await
            } else {
                client.command_of_keys(args, weight).await
            };
            let error = match reply {
                Ok(reply) => return Ok(reply),
                Err(e) => e,
            };
            if is_connection(&error) && !failed_over {
                // The node may be gone for good (a replica took its slots over): read the map
                // again, once, and go to whoever serves the slot now. Reads may be repeated.
                failed_over = true;
                if self.refresh().await.is_ok() {
                    client = self.owner(slot).await?;
                    asking = false;
                    continue;
                }
            }
            let Some(to) = redirect(&error) else {
                return Err(error);
            };
            redirects += 1;
            if redirects > MAX_REDIRECTS {
                return Err(error);
            }
            match to {
                Redirect::Moved(addr) => {
                    self.moved.set(self.moved.get() + 1);
                    // The map is out of date: read it again, and go where the server said.
                    let _ = self.refresh().await;
                    client = self.node(addr).1;
                    asking = false;
                }
                Redirect::Ask(addr) => {
                    self.asked.set(self.asked.get() + 1);
                    client = self.node(addr).1;
                    asking = true;
                }
            }
        }
    }

    /// Sends each slot's request whose owner is known; `None` for the others.
    fn send_known(&self, batch: &Batch, single: bool) -> Vec<Option<ReplyFuture>> {
        let command: &[u8] = if single { b"GET" } else { b"MGET" };
        let t = self.topology.borrow();
        let mut args: Vec<&[u8]> = Vec::with_capacity(batch.keys.len() + 1);
        batch
            .groups
            .iter()
            .map(|(slot, members)| {
                let node = t.slots[*slot as usize]?;
                args.clear();
                args.push(command);
                args.extend(members.iter().map(|&i| batch.key(i as usize)));
                Some(
                    t.nodes[node as usize]
                        .1
                        .command_of_keys(&args, members.len()),
                )
            })
            .collect()
    }

    /// Collects the answers of what `send_known` sent, and looks up the rest (or what was
    /// redirected, or lost with its node) through the map.
    async fn finish(
        &self,
        batch: Batch,
        sent: Vec<Option<ReplyFuture>>,
        single: bool,
    ) -> Result<Vec<Option<Bytes>>, RedisError> {
        let mut values = vec![None; batch.keys.len()];
        for ((slot, members), request) in batch.groups.iter().zip(sent) {
            let first = match request {
                Some(reply) => match reply.await {
                    Ok(reply) => Some(get_values(reply, single)?),
                    // A redirection or a lost node: through the map below (read again first
                    // when the slot moved for good).
                    Err(e) if redirect(&e).is_some() || is_connection(&e) => {
                        if let Some(Redirect::Moved(_)) = redirect(&e) {
                            self.moved.set(self.moved.get() + 1);
                            let _ = self.refresh().await;
                        }
                        None
                    }
                    Err(e) => return Err(e),
                },
                None => None,
            };
            let answer = match first {
                Some(a) => a,
                None => {
                    let keys: Vec<&[u8]> = members.iter().map(|&i| batch.key(i as usize)).collect();
                    self.slot_lookup(*slot, &keys, single).await?
                }
            };
            if answer.len() != members.len() {
                return Err(RedisError::UnexpectedReply {
                    command: "MGET",
                    got: format!("{} values for {} keys", answer.len(), members.len()),
                });
            }
            for (&i, v) in members.iter().zip(answer) {
                values[i as usize] = v;
            }
        }
        Ok(values)
    }
}

/// A batch's keys in one buffer, grouped by slot in order of first appearance.
struct Batch {
    bytes: Vec<u8>,
    keys: Vec<(u32, u32)>,
    groups: Vec<(u16, SmallVec<[u32; 4]>)>,
}

impl Batch {
    fn new(keys: &[&[u8]]) -> Batch {
        let mut batch = Batch {
            bytes: Vec::with_capacity(keys.iter().map(|k| k.len()).sum()),
            keys: Vec::with_capacity(keys.len()),
            groups: Vec::new(),
        };
        for (i, key) in keys.iter().enumerate() {
            let start = batch.bytes.len() as u32;
            batch.bytes.extend_from_slice(key);
            batch.keys.push((start, batch.bytes.len() as u32));
            let slot = key_slot(key);
            match batch.groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, members)) => members.push(i as u32),
                None => batch.groups.push((slot, smallvec::smallvec![i as u32])),
            }
        }
        batch
    }

    fn key(&self, i: usize) -> &[u8] {
        let (start, end) = self.keys[i];
        &self.bytes[start as usize..end as usize]
    }
}

/// Whether `e` says the node could not be reached (rather than answered).
fn is_connection(e: &RedisError) -> bool {
    matches!(
        e,
        RedisError::Connect { .. }
            | RedisError::ConnectionLost { .. }
            | RedisError::Unavailable { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_as_redis_computes_them() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"a"), 15495);
        assert_eq!(key_slot(b"b"), 3300);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
    }

    #[test]
    fn redirections_and_slot_maps_parse() {
        let moved = RedisError::ErrorReply {
            message: "MOVED 3999 127.0.0.1:6381".into(),
        };
        assert_eq!(
            redirect(&moved),
            Some(Redirect::Moved("127.0.0.1:6381".parse().unwrap()))
        );
        let other = RedisError::ErrorReply {
            message: "WRONGTYPE x".into(),
        };
        assert_eq!(redirect(&other), None);
        let node = |port| {
            Reply::Array(vec![
                Reply::Bulk(b"127.0.0.1".to_vec()),
                Reply::Int(port),
                Reply::Bulk(b"id".to_vec()),
            ])
        };
        let reply = Reply::Array(vec![
            Reply::Array(vec![Reply::Int(0), Reply::Int(5460), node(7000)]),
            Reply::Array(vec![Reply::Int(5461), Reply::Int(16383), node(7001)]),
        ]);
        let ranges = parse_slots(&reply).unwrap();
        assert_eq!(ranges[1], (5461, 16383, "127.0.0.1:7001".parse().unwrap()));
        assert!(parse_slots(&Reply::Int(1)).is_err());
    }
}
