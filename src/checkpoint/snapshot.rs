//! `ShardSnapshot`: what one shard holds at a checkpoint (the entries whose results have not
//! left it), as a checksummed rkyv archive.
//!
//! File layout (little endian, explicit widths):
//!
//! ```text
//!  0      8        10        12         20          24            24+len
//!  | magic | version | reserved | len: u64 | crc32: u32 | payload (rkyv) |
//!  "SLUICESN"  u16      u16 = 0
//! ```
//!
//! The merge's snapshot (`MergeSnapshot`) uses the same header with magic `SLUICEMG`.
//!
//! Invariants: the CRC-32 of the payload is checked, and the length and version too, before
//! `rkyv::access` sees a byte; `access` then validates the archive (bytecheck), so a truncated
//! or bit-flipped file is an error, never undefined behaviour or a panic. Every persisted
//! integer has an explicit width (`u64`, `u32`), never `usize`.

use super::CheckpointError;
use rkyv::rancor;
use std::path::Path;

const MAGIC: &[u8; 8] = b"SLUICESN";
/// The snapshot format this build writes and reads.
pub const SNAPSHOT_VERSION: u16 = 1;
const HEADER_LEN: usize = 24;

/// One in-flight entry: a record whose result has not left the shard, or a watermark still
/// queued behind records.
// serde too: the benchmark compares rkyv with serde JSON of the same entries.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct EntrySnapshot {
    /// The element's sequence number (input order).
    pub seq: u64,
    /// Its routing / ordering key (0 for a watermark).
    pub key: u64,
    /// Attempts made so far (informational; a restored entry starts a fresh attempt count).
    pub attempts: u32,
    /// `Some(timestamp)` for a watermark, whose `input` is empty.
    pub watermark: Option<u64>,
    /// The input, encoded by the embedder's codec.
    pub input: Vec<u8>,
}

/// A shard's state at a checkpoint.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct ShardSnapshot {
    pub checkpoint_id: u64,
    pub shard: u32,
    /// In-flight entries, in sequence order.
    pub entries: Vec<EntrySnapshot>,
}

impl ShardSnapshot {
    /// The file bytes: header, then the rkyv payload.
    pub fn encode(&self) -> Result<Vec<u8>, CheckpointError> {
        let payload =
            rkyv::to_bytes::<rancor::Error>(self).map_err(|e| CheckpointError::Encode {
                what: "shard snapshot",
                reason: e.to_string(),
            })?;
        Ok(frame(MAGIC, &payload))
    }

    /// Checks and decodes file bytes; `path` names the file in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<ShardSnapshot, CheckpointError> {
        let aligned = unframe(bytes, MAGIC, path)?;
        let archived = rkyv::access::<ArchivedShardSnapshot, rancor::Error>(&aligned)
            .map_err(|e| corrupt(path, format!("invalid archive: {e}")))?;
        rkyv::deserialize::<ShardSnapshot, rancor::Error>(archived)
            .map_err(|e| corrupt(path, format!("cannot decode archive: {e}")))
    }
}

pub(super) fn corrupt(path: &Path, reason: String) -> CheckpointError {
    CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

/// Puts the header (magic, version, length, CRC-32) in front of an rkyv payload.
pub(super) fn frame(magic: &[u8; 8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the header and the checksum, and returns the payload in an aligned buffer (rkyv
/// needs alignment) for `rkyv::access` to validate.
pub(super) fn unframe(
    bytes: &[u8],
    magic: &[u8; 8],
    path: &Path,
) -> Result<rkyv::util::AlignedVec<16>, CheckpointError> {
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(
            path,
            format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            ),
        ));
    }
    if &bytes[0..8] != magic {
        return Err(corrupt(
            path,
            format!(
                "not a sluice {} (bad magic)",
                String::from_utf8_lossy(magic)
            ),
        ));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != SNAPSHOT_VERSION {
        return Err(CheckpointError::Version {
            path: path.to_path_buf(),
            found: version,
            expected: SNAPSHOT_VERSION,
        });
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(corrupt(
            path,
            format!(
                "payload is {} bytes, the header says {len} (torn write?)",
                payload.len()
            ),
        ));
    }
    if crc32fast::hash(payload) != crc {
        return Err(corrupt(path, "checksum mismatch".into()));
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    Ok(aligned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ShardSnapshot {
        ShardSnapshot {
            checkpoint_id: 7,
            shard: 1,
            entries: (0..5)
                .map(|i| EntrySnapshot {
                    seq: i * 2,
                    key: i,
                    attempts: 1,
                    watermark: None,
                    input: format!("record {i}").into_bytes(),
                })
                .collect(),
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let bytes = s.encode().unwrap();
        assert_eq!(ShardSnapshot::decode(&bytes, Path::new("x")).unwrap(), s);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_detected() {
        let bytes = sample().encode().unwrap();
        for len in 0..bytes.len() {
            assert!(
                ShardSnapshot::decode(&bytes[..len], Path::new("x")).is_err(),
                "truncated to {len}"
            );
        }
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            // Flipping a reserved header bit is harmless; everything else must be caught.
            if (10..12).contains(&(bit / 8)) {
                continue;
            }
            assert!(
                ShardSnapshot::decode(&flipped, Path::new("x")).is_err(),
                "bit {bit} flipped"
            );
        }
    }
}
