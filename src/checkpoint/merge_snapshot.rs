//! `MergeSnapshot`: what the output merge holds at a checkpoint, as a checksummed rkyv archive
//! (same header as `ShardSnapshot`, magic `SLUICEMG`).
//!
//! Owns: the merge's part of a checkpoint. Invariant (checked by `Consumer` when it builds
//! one, and by the stage's restore): with the shards' snapshots it accounts for every
//! sequence number below `barrier_seq` exactly once. A sequence number is either
//! - released to the sink before the checkpoint (below `base_seq` in ordered mode, or listed
//!   in `released_in_flight` when it was also in a shard's snapshot, which restore then skips),
//! - held here (`held`: outputs the shards had emitted but the merge had not released), or
//! - in a shard's snapshot, to be re-issued.

use super::snapshot::{corrupt, frame, unframe};
use super::CheckpointError;
use rkyv::rancor;
use std::path::Path;

const MAGIC: &[u8; 8] = b"SLUICEMG";

/// An output the merge held at the checkpoint, or a watermark some shards had delivered.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct HeldEntry {
    pub seq: u64,
    /// `Some(timestamp)` for a watermark; `arrivals` shards had delivered it.
    pub watermark: Option<u64>,
    pub arrivals: u32,
    /// A record's outputs, each encoded by the embedder's output codec.
    pub outputs: Vec<Vec<u8>>,
}

/// The merge's state at a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MergeSnapshot {
    pub checkpoint_id: u64,
    /// The checkpoint barrier's own sequence number: inputs from here on come from the source.
    pub barrier_seq: u64,
    /// Shards of the stage that took the checkpoint (a restore needs the same number).
    pub shards: u32,
    /// The output mode (0 ordered, 1 unordered, 2 key-ordered); a restore needs the same.
    pub mode: u8,
    /// Ordered mode: the next sequence number to release.
    pub base_seq: u64,
    /// The merged watermark released so far.
    pub last_watermark: Option<u64>,
    /// Held outputs and partly delivered watermarks, in sequence order.
    pub held: Vec<HeldEntry>,
    /// Sequence numbers released between the first shard's barrier and the last: their
    /// outputs are in the sink, so restore does not re-issue them.
    pub released_in_flight: Vec<u64>,
}

impl MergeSnapshot {
    /// The file bytes: header, then the rkyv payload.
    pub fn encode(&self) -> Result<Vec<u8>, CheckpointError> {
        let payload =
            rkyv::to_bytes::<rancor::Error>(self).map_err(|e| CheckpointError::Encode {
                what: "merge snapshot",
                reason: e.to_string(),
            })?;
        Ok(frame(MAGIC, &payload))
    }

    /// Checks and decodes file bytes; `path` names the file in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<MergeSnapshot, CheckpointError> {
        let aligned = unframe(bytes, MAGIC, path)?;
        let archived = rkyv::access::<ArchivedMergeSnapshot, rancor::Error>(&aligned)
            .map_err(|e| corrupt(path, format!("invalid archive: {e}")))?;
        rkyv::deserialize::<MergeSnapshot, rancor::Error>(archived)
            .map_err(|e| corrupt(path, format!("cannot decode archive: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_every_truncation() {
        let s = MergeSnapshot {
            checkpoint_id: 3,
            barrier_seq: 40,
            shards: 2,
            mode: 0,
            base_seq: 30,
            last_watermark: Some(7),
            held: vec![
                HeldEntry {
                    seq: 31,
                    watermark: None,
                    arrivals: 0,
                    outputs: vec![b"a".to_vec(), b"bc".to_vec()],
                },
                HeldEntry {
                    seq: 33,
                    watermark: Some(9),
                    arrivals: 1,
                    outputs: vec![],
                },
            ],
            released_in_flight: vec![29],
        };
        let bytes = s.encode().unwrap();
        assert_eq!(MergeSnapshot::decode(&bytes, Path::new("m")).unwrap(), s);
        for len in 0..bytes.len() {
            assert!(MergeSnapshot::decode(&bytes[..len], Path::new("m")).is_err());
        }
        // A shard snapshot's bytes are not a merge snapshot.
        let shard = super::super::ShardSnapshot {
            checkpoint_id: 3,
            shard: 0,
            entries: vec![],
        };
        assert!(MergeSnapshot::decode(&shard.encode().unwrap(), Path::new("m")).is_err());
    }
}
