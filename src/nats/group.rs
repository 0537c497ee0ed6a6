//! A group of processes that split a stream's partitions between them, with a lease per
//! partition in a JetStream key-value bucket (NATS 2.9 has no consumer groups of its own).
//!
//! Owns: this process's membership and leases. The bucket `sluice_group_<GROUP>` holds a key
//! `member.<ID>` per live process and `partition.<P>` = the owner's ID per leased partition,
//! and its `max_age` is the lease's time to live (TTL = 3 lease periods): a key not written
//! again within the TTL expires, so a dead process's membership and leases go by themselves.
//! Invariants:
//! - a lease is taken with a create (only where no live key is) and renewed with an update
//!   conditional on its last revision: two processes never both renew one lease, and a process
//!   whose renewal is refused has lost it;
//! - a process counts its lease valid for 2 periods after it *sent* its last successful renewal
//!   (so at least one period before the key can expire on the server, whatever the round
//!   trip), and fences itself ([`Leases::holds`] turns false) when that passes: a lease that
//!   could have been taken by another is never used for publishing; a lapsed lease is given
//!   up, never renewed, so within one lease (one epoch) no output is published after one that
//!   was fenced;
//! - a lease given up is fenced first and deleted after, so its next owner starts after this
//!   process has stopped publishing for it;
//! - each member takes at most its fair share, ceil(partitions / live members), and gives up
//!   what it holds beyond it; it takes nothing until it has been a member for one period, so
//!   processes started together see one another before they take partitions.

use super::{failed, NatsError};
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A group's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// `nats://HOST:PORT`.
    pub server: String,
    /// The group's name: the bucket is `sluice_group_<name>`.
    pub name: String,
    /// How many partitions the stream has (subjects ending `.0` .. `.<partitions - 1>`).
    pub partitions: u32,
    /// How often leases are renewed; they expire after 3 periods without a renewal. Taken
    /// from the bucket when it exists already (all members must agree).
    pub lease: Duration,
}

/// Which partitions this process may publish for: per partition, the lease's epoch (0 when
/// not held, else the lease's revision when it was taken) and until when it is valid (2 lease
/// periods after the last renewal was sent). Shared with the threads that publish, which ask
/// [`Leases::holds`] before each publish: a process that stalls (stopped, starved, cut off
/// from NATS) finds its leases lapsed when it wakes, before its lease loop has run again.
#[derive(Debug)]
pub struct Leases {
    base: Instant,
    epochs: Vec<AtomicU64>,
    /// Milliseconds after `base`.
    valid_until: Vec<AtomicU64>,
}

impl Leases {
    fn new(partitions: u32) -> Leases {
        Leases {
            base: Instant::now(),
            epochs: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            valid_until: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The lease's epoch if this process holds partition `p`'s lease, else 0.
    pub fn epoch(&self, p: u32) -> u64 {
        self.epochs
            .get(p as usize)
            .map_or(0, |e| e.load(Ordering::SeqCst))
    }

    /// Whether this process still holds the lease it took at `epoch`, and it has not lapsed.
    pub fn holds(&self, p: u32, epoch: u64) -> bool {
        epoch != 0
            && self.epoch(p) == epoch
            && self.millis(Instant::now()) < self.valid_until[p as usize].load(Ordering::SeqCst)
    }

    /// How many partitions this process holds.
    pub fn owned(&self) -> usize {
        self.epochs
            .iter()
            .filter(|e| e.load(Ordering::SeqCst) != 0)
            .count()
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_millis() as u64
    }

    fn set(&self, p: u32, epoch: u64, valid_until: Instant) {
        self.valid_until[p as usize].store(self.millis(valid_until), Ordering::SeqCst);
        self.epochs[p as usize].store(epoch, Ordering::SeqCst);
    }

    fn clear(&self, p: u32) {
        self.epochs[p as usize].store(0, Ordering::SeqCst);
        self.valid_until[p as usize].store(0, Ordering::SeqCst);
    }
}

/// What a [`Group::tick`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Partitions taken (start reading them).
    pub gained: Vec<u32>,
    /// Partitions lost or given up (already fenced: stop reading them).
    pub lost: Vec<u32>,
}

struct Held {
    revision: u64,
    /// When the last renewal that succeeded was sent.
    renewed: Instant,
}

/// This process's membership of a group; see the module documentation.
pub struct Group {
    kv: kv::Store,
    server: String,
    partitions: u32,
    period: Duration,
    member: String,
    joined: Instant,
    held: BTreeMap<u32, Held>,
    leases: Arc<Leases>,
}

/// The bucket's description: how many partitions the group splits.
fn describe(partitions: u32) -> String {
    format!("sluice group of {partitions} partitions")
}

fn member_key(id: &str) -> String {
    format!("member.{id}")
}

fn partition_key(p: u32) -> String {
    format!("partition.{p}")
}

/// A name NATS accepts in a bucket name and a key (letters, digits, `-`, `_`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Group {
    /// Joins the group (creating its bucket if it is not there) as member `member`.
    pub async fn join(
        js: &jetstream::Context,
        config: &GroupConfig,
        member: &str,
    ) -> Result<Group, NatsError> {
        let server = config.server.as_str();
        let bucket = format!("sluice_group_{}", config.name);
        // The bucket's stream made here, as `create_key_value` would: that call first reads
        // the account's information, whose reply from a 2.9 server async-nats cannot parse.
        // Creating a stream that is there with the same settings is not an error.
        let created = js
            .create_stream(jetstream::stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age: config.lease * 3,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: jetstream::stream::DiscardPolicy::New,
                description: Some(describe(config.partitions)),
                ..Default::default()
            })
            .await;
        let kv = js.get_key_value(&bucket).await.map_err(|e| {
            let created = match created {
                Ok(_) => String::new(),
                Err(e) => format!(" (creating it: {e})"),
            };
            failed(server, "open the group's bucket")(format!("{bucket}: {e}{created}"))
        })?;
        let status = kv
            .status()
            .await
            .map_err(|e| failed(server, "read the group's bucket")(e.to_string()))?;
        // Members that disagree on the partitions would leave some unread or read some twice.
        if let Some(said) = &status.info.config.description {
            if *said != describe(config.partitions) {
                return Err(failed(server, "join the group")(format!(
                    "bucket {bucket} is a group of other partitions ({said}); this process was \
                     given {}: give every member the same partitions=P",
                    config.partitions
                )));
            }
        }
        let ttl = status.info.config.max_age;
        if ttl.is_zero() {
            return Err(failed(server, "read the group's bucket")(format!(
                "bucket {bucket} has no max_age: its keys would never expire"
            )));
        }
        kv.put(member_key(member), member.to_string().into())
            .await
            .map_err(|e| failed(server, "join the group")(e.to_string()))?;
        Ok(Group {
            kv,
            server: server.to_string(),
            partitions: config.partitions,
            period: ttl / 3,
            member: member.to_string(),
            joined: Instant::now(),
            held: BTreeMap::new(),
            leases: Arc::new(Leases::new(config.partitions)),
        })
    }

    /// The leases, for the threads that publish.
    pub fn leases(&self) -> Arc<Leases> {
        self.leases.clone()
    }

    /// How often [`Group::tick`] should run.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Renews membership and leases, fences the leases that lapsed, gives up what is beyond
    /// the fair share and takes free partitions up to it. Faults talking to NATS are reported
    /// and leave the leases to lapse by time; a tick never fails.
    pub async fn tick(&mut self) -> Changes {
        let mut changes = Changes::default();
        if let Err(e) = self
            .kv
            .put(member_key(&self.member), self.member.clone().into())
            .await
        {
            eprintln!(
                "sluice enrich: NATS at {}: renewing group membership: {e}",
                self.server
            );
        }
        let owned: Vec<u32> = self.held.keys().copied().collect();
        for p in owned {
            // Lapsed (a stall, NATS out of reach): its outputs were fenced, so it is not renewed
            // into the same epoch, where a later output could be published after a fenced one.
            if self.held[&p].renewed.elapsed() >= self.period * 2 {
                self.give_up(p).await;
                changes.lost.push(p);
                continue;
            }
            let sent = Instant::now();
            let revision = self.held[&p].revision;
            let renewed = self
                .kv
                .update(partition_key(p), self.member.clone().into(), revision)
                .await;
            match renewed {
                Ok(revision) => {
                    let held = self.held.get_mut(&p).expect("held");
                    held.revision = revision;
                    held.renewed = sent;
                    let epoch = self.leases.epoch(p);
                    self.leases.set(p, epoch, sent + self.period * 2);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    self.fence(p);
                    changes.lost.push(p);
                }
                // Left to lapse: the next tick gives it up if it has.
                Err(e) => eprintln!(
                    "sluice enrich: NATS at {}: renewing the lease of partition {p}: {e}",
                    self.server
                ),
            }
        }
        if self.joined.elapsed() < self.period {
            return changes;
        }
        let Some(members) = self.members().await else {
            return changes;
        };
        let share = self.partitions.div_ceil(members.max(1));
        while let Some(&p) = self.held.keys().next_back() {
            if self.held.len() <= share as usize {
                break;
            }
            self.give_up(p).await;
            changes.lost.push(p);
        }
        // Start from a place of this member's own, so members do not all race for partition 0.
        let start = self.member.bytes().map(u32::from).sum::<u32>() % self.partitions.max(1);
        for i in 0..self.partitions {
            if self.held.len() >= share as usize {
                break;
            }
            let p = (start + i) % self.partitions;
            if self.held.contains_key(&p) {
                continue;
            }
            let sent = Instant::now();
            if let Ok(revision) = self
                .kv
                .create(partition_key(p), self.member.clone().into())
                .await
            {
                self.held.insert(
                    p,
                    Held {
                        revision,
                        renewed: sent,
                    },
                );
                self.leases.set(p, revision, sent + self.period * 2);
                changes.gained.push(p);
            }
        }
        changes
    }

    /// How many members the bucket holds (this one included), or `None` when NATS does not
    /// answer.
    async fn members(&self) -> Option<u32> {
        let mut keys = match self.kv.keys().await {
            Ok(keys) => keys,
            Err(e) => {
                eprintln!(
                    "sluice enrich: NATS at {}: listing the group: {e}",
                    self.server
                );
                return None;
            }
        };
        let mut members = 0;
        while let Some(key) = keys.next().await {
            match key {
                Ok(key) if key.starts_with("member.") => members += 1,
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        Some(members)
    }

    /// Gives up partition `p`'s lease: fenced first, the key deleted after.
    pub async fn give_up(&mut self, p: u32) {
        if let Some(held) = self.held.get(&p) {
            let revision = held.revision;
            self.fence(p);
            let _ = self
                .kv
                .delete_expect_revision(partition_key(p), Some(revision))
                .await;
        }
    }

    fn fence(&mut self, p: u32) {
        self.leases.clear(p);
        self.held.remove(&p);
    }

    /// Leaves the group: fences every lease, then deletes the keys, so the others take the
    /// partitions at their next tick instead of after the TTL.
    pub async fn leave(&mut self) {
        let held: Vec<(u32, u64)> = self.held.iter().map(|(&p, h)| (p, h.revision)).collect();
        for &(p, _) in &held {
            self.fence(p);
        }
        for (p, revision) in held {
            let _ = self
                .kv
                .delete_expect_revision(partition_key(p), Some(revision))
                .await;
        }
        let _ = self.kv.delete(member_key(&self.member)).await;
    }
}
