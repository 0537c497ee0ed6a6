//! Checkpoints on disk: shard snapshots (rkyv) and a manifest per checkpoint, made durable in
//! order, kept for the last `K` checkpoints, and restored with validation and fallback.
//!
//! The protocol that fills it (a barrier from the producer through every shard to the merge,
//! see `docs/architecture.md`) lives in `coordinator.rs` and the engine; this module owns the
//! files.
//!
//! Owns: the checkpoint directory. Invariants:
//! - a checkpoint exists only once its manifest is durable: snapshot files are written and
//!   fsynced first, then the manifest is written to a temporary name, fsynced, renamed, and the
//!   directory fsynced; a crash at any point leaves either the previous checkpoints or the new
//!   one, never a manifest naming missing or partial files;
//! - older checkpoints are removed only after a newer one is durable;
//! - restore checks every file's length and checksum (and the snapshot's own header and
//!   archive) before using it, and falls back to the previous checkpoint, saying why;
//! - an fsync error is `CheckpointError::Fsync`, which the caller must treat as fatal: the
//!   file's state is unknown and retrying fsync on it can report success falsely (fsyncgate).

mod codec;
pub(crate) mod coordinator;
mod manifest;
mod merge_snapshot;
mod snapshot;
mod store;

pub use codec::Codec;
pub use coordinator::{CheckpointRefused, Checkpointing, RestoreInfo};
pub use manifest::{Manifest, ManifestFile, MANIFEST_VERSION};
pub use merge_snapshot::{HeldEntry, MergeSnapshot};
pub use snapshot::{EntrySnapshot, ShardSnapshot, SNAPSHOT_VERSION};
// `replace_durably` also writes the tools' own files (enrich's completed marker and settings).
#[cfg_attr(not(feature = "tools"), allow(unused_imports))]
pub(crate) use store::{replace_durably, snapshot_name, write_file_durably};
pub use store::{CheckpointStore, Restored};

/// Where a source resumes after a restore: an offset in its own terms (a file's byte
/// position, a log's offset) and how many records came before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourcePosition {
    pub offset: u64,
    pub records: u64,
    /// The source's own check value of what came before `offset`, so that a resume can tell
    /// that the source was not changed (for a file: the CRC-32 of its first `offset` bytes);
    /// 0 for a source that keeps none.
    pub digest: u64,
}

/// What a sink had made durable when a checkpoint was committed: its main position (for a
/// file: its length) and, by name, the positions of its side outputs (for example dead-letter
/// files), each cut back to on resume like the main output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkPosition {
    pub position: u64,
    pub side_outputs: std::collections::BTreeMap<String, u64>,
}

impl From<u64> for SinkPosition {
    fn from(position: u64) -> Self {
        SinkPosition {
            position,
            side_outputs: Default::default(),
        }
    }
}

use std::path::PathBuf;

/// A checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Reading, writing, renaming or listing failed.
    #[error("checkpoint I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// fsync failed: fatal; abort the process, do not retry on the same file.
    #[error("fsync of {path} failed: {source}; the checkpoint is aborted and the process must stop (an fsync error cannot be retried safely)")]
    Fsync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The disk is full: nothing of this checkpoint was committed.
    #[error("no space left writing {path}: the checkpoint was not committed; free space and the next checkpoint will retry")]
    NoSpace { path: PathBuf },
    /// A file fails its checks.
    #[error("checkpoint file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A file written by another format version.
    #[error(
        "checkpoint file {path} has format version {found}; this build reads version {expected}"
    )]
    Version {
        path: PathBuf,
        found: u16,
        expected: u16,
    },
    /// Serialising failed.
    #[error("cannot encode the {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    /// A restored input or output could not be decoded by the embedder's codec.
    #[error("checkpoint {checkpoint_id}: cannot decode {what} #{seq}: {reason}")]
    Decode {
        checkpoint_id: u64,
        what: &'static str,
        seq: u64,
        reason: String,
    },
    /// The checkpoint was taken by a stage of another shape.
    #[error("checkpoint {checkpoint_id} was taken with {found}; this stage has {expected}. Restart with the same setting, or move the checkpoint directory away to start afresh")]
    Mismatch {
        checkpoint_id: u64,
        found: String,
        expected: String,
    },
    /// A shard did not deliver its snapshot file (it stopped, or its write hung).
    #[error("checkpoint {checkpoint_id}: shard {shard} did not report its snapshot: {reason}")]
    ShardMissing {
        checkpoint_id: u64,
        shard: usize,
        reason: String,
    },
}

impl CheckpointError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            CheckpointError::NoSpace { path }
        } else {
            CheckpointError::Io { path, source }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_no_space_and_other_errors_are_io() {
        let full = CheckpointError::io("f", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(full, CheckpointError::NoSpace { .. }), "{full:?}");
        assert!(full.to_string().contains("not committed"));
        let other = CheckpointError::io("f", std::io::Error::from_raw_os_error(libc::EACCES));
        assert!(matches!(other, CheckpointError::Io { .. }), "{other:?}");
    }
}
