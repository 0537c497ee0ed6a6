//! `Manifest`: one checkpoint's id, source offset, sink position and files, as checksummed JSON.
//!
//! Layout: one line `sluice-manifest v<version> crc32=<hex>` then the JSON body; the CRC covers
//! the body. Invariant: a manifest that parses has a matching checksum and version.

use super::CheckpointError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The manifest format this build writes and reads.
pub const MANIFEST_VERSION: u16 = 1;

/// A file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// File name inside the checkpoint directory.
    pub name: String,
    pub len: u64,
    pub crc32: u32,
}

impl ManifestFile {
    /// The entry for file `name` holding `bytes`.
    pub fn of(name: String, bytes: &[u8]) -> ManifestFile {
        ManifestFile {
            name,
            len: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        }
    }
}

/// A checkpoint's description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u16,
    pub checkpoint_id: u64,
    /// Where the source resumes (for a file source: its byte offset).
    pub source_offset: u64,
    /// Source records before `source_offset` (for a file source: lines), so numbering
    /// resumes where it stopped.
    #[serde(default)]
    pub source_records: u64,
    /// The source's check value of what came before `source_offset` (0: none kept).
    #[serde(default)]
    pub source_digest: u64,
    /// What the sink had committed (for a file sink: its length).
    pub sink_position: u64,
    /// The sink's side outputs by name, and what each had committed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub side_outputs: BTreeMap<String, u64>,
    pub files: Vec<ManifestFile>,
}

impl Manifest {
    pub fn encode(&self) -> Result<Vec<u8>, CheckpointError> {
        let body = serde_json::to_vec_pretty(self).map_err(|e| CheckpointError::Encode {
            what: "manifest",
            reason: e.to_string(),
        })?;
        let mut out = format!(
            "sluice-manifest v{MANIFEST_VERSION} crc32={:08x}\n",
            crc32fast::hash(&body)
        )
        .into_bytes();
        out.extend_from_slice(&body);
        Ok(out)
    }

    pub fn decode(bytes: &[u8], path: &Path) -> Result<Manifest, CheckpointError> {
        let corrupt = |reason: String| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let newline = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| corrupt("no header line (torn write?)".into()))?;
        let header = std::str::from_utf8(&bytes[..newline])
            .map_err(|_| corrupt("header is not text".into()))?;
        let body = &bytes[newline + 1..];
        let rest = header
            .strip_prefix("sluice-manifest v")
            .ok_or_else(|| corrupt("not a sluice manifest".into()))?;
        let (version, crc) = rest
            .split_once(" crc32=")
            .ok_or_else(|| corrupt("header lacks its checksum".into()))?;
        let version: u16 = version
            .parse()
            .map_err(|_| corrupt(format!("bad version `{version}`")))?;
        if version != MANIFEST_VERSION {
            return Err(CheckpointError::Version {
                path: path.to_path_buf(),
                found: version,
                expected: MANIFEST_VERSION,
            });
        }
        let crc =
            u32::from_str_radix(crc, 16).map_err(|_| corrupt(format!("bad checksum `{crc}`")))?;
        if crc32fast::hash(body) != crc {
            return Err(corrupt("checksum mismatch (torn or altered)".into()));
        }
        let manifest: Manifest =
            serde_json::from_slice(body).map_err(|e| corrupt(format!("bad JSON: {e}")))?;
        if manifest.format_version != MANIFEST_VERSION {
            return Err(corrupt("body and header disagree on the version".into()));
        }
        Ok(manifest)
    }
}
