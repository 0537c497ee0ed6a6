//! Checkpoints on disk: shard snapshots (rkyv) and a manifest per checkpoint, made durable in
//! order, kept for the last `K` checkpoints, and restored with validation and fallback.
//!
//! This is the storage layer of exactly-once (issue 5). The checkpoint barrier through the
//! shards and the merge, the operator's snapshot and re-issue of in-flight entries, and the
//! `sluice enrich` integration build on it and are not done yet.
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

mod manifest;
mod snapshot;
mod store;

pub use manifest::{Manifest, ManifestFile, MANIFEST_VERSION};
pub use snapshot::{EntrySnapshot, ShardSnapshot, SNAPSHOT_VERSION};
pub use store::{CheckpointStore, Restored};

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
}

impl CheckpointError {
    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            CheckpointError::NoSpace { path }
        } else {
            CheckpointError::Io { path, source }
        }
    }
}
