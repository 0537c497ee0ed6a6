//! `CheckpointStore`: writes checkpoints durably and restores the newest valid one.
//!
//! Names: `chk-<id, 20 digits>.manifest`, `chk-<id>-shard-<n>.snap` and `chk-<id>-merge.snap`,
//! so lexical order is checkpoint order. See the module above for the invariants.

use super::{
    CheckpointError, Manifest, ManifestFile, MergeSnapshot, ShardSnapshot, SinkPosition,
    SourcePosition, MANIFEST_VERSION,
};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A restored checkpoint.
#[derive(Debug)]
pub struct Restored {
    pub manifest: Manifest,
    /// The shards' snapshots, in shard order.
    pub snapshots: Vec<ShardSnapshot>,
    /// The merge's snapshot (absent in checkpoints written by [`CheckpointStore::write`]).
    pub merge: Option<MergeSnapshot>,
    /// Why newer checkpoints were skipped (torn or corrupt), newest first.
    pub skipped: Vec<String>,
}

/// See the module documentation.
pub struct CheckpointStore {
    dir: PathBuf,
    keep: usize,
}

fn manifest_name(id: u64) -> String {
    format!("chk-{id:020}.manifest")
}

/// The file name of shard `shard`'s snapshot in checkpoint `id`.
pub(crate) fn snapshot_name(id: u64, shard: u32) -> String {
    format!("chk-{id:020}-shard-{shard}.snap")
}

fn merge_name(id: u64) -> String {
    format!("chk-{id:020}-merge.snap")
}

fn fsync(file: &File, path: &Path) -> Result<(), CheckpointError> {
    file.sync_all().map_err(|source| CheckpointError::Fsync {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes file `name` in `dir` durably and describes it for a manifest.
pub(crate) fn write_file_durably(
    dir: &Path,
    name: String,
    bytes: &[u8],
) -> Result<ManifestFile, CheckpointError> {
    write_durably(&dir.join(&name), bytes)?;
    Ok(ManifestFile::of(name, bytes))
}

/// Makes `dir/name` hold `bytes` atomically and durably: written to a temporary name and
/// fsynced, renamed over `name`, then the directory fsynced. A crash leaves the old file or the
/// new one, never a part.
pub(crate) fn replace_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
    let temp = dir.join(format!("{name}.tmp"));
    write_durably(&temp, bytes)?;
    let final_path = dir.join(name);
    fs::rename(&temp, &final_path).map_err(|e| CheckpointError::io(&final_path, e))?;
    let handle = File::open(dir).map_err(|e| CheckpointError::io(dir, e))?;
    fsync(&handle, dir)
}

/// Writes a whole file and fsyncs it.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| CheckpointError::io(path, e))?;
    f.write_all(bytes)
        .map_err(|e| CheckpointError::io(path, e))?;
    fsync(&f, path)
}

impl CheckpointStore {
    /// A store in `dir` (created if missing) keeping the last `keep` (at least 1) checkpoints.
    pub fn open(dir: impl Into<PathBuf>, keep: usize) -> Result<CheckpointStore, CheckpointError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| CheckpointError::io(&dir, e))?;
        Ok(CheckpointStore {
            dir,
            keep: keep.max(1),
        })
    }

    /// Checkpoint ids with a manifest, ascending.
    fn checkpoint_ids(&self) -> Result<Vec<u64>, CheckpointError> {
        let mut ids: Vec<u64> = fs::read_dir(&self.dir)
            .map_err(|e| CheckpointError::io(&self.dir, e))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("chk-")?
                    .strip_suffix(".manifest")?
                    .parse()
                    .ok()
            })
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// The directory holding the checkpoints.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes checkpoint `id` from this thread: the snapshots, then the manifest, each made
    /// durable in order; then removes checkpoints older than the last `keep`. (A running stage
    /// writes its shards' files on the shards, with io_uring, and then calls [`Self::commit`].)
    pub fn write(
        &self,
        id: u64,
        source_offset: u64,
        sink_position: u64,
        snapshots: &[ShardSnapshot],
    ) -> Result<(), CheckpointError> {
        let mut files = Vec::with_capacity(snapshots.len());
        for snapshot in snapshots {
            assert_eq!(
                snapshot.checkpoint_id, id,
                "a snapshot belongs to its checkpoint"
            );
            let name = snapshot_name(id, snapshot.shard);
            files.push(self.write_file(name, &snapshot.encode()?)?);
        }
        let source = SourcePosition {
            offset: source_offset,
            ..SourcePosition::default()
        };
        self.commit(id, source, &sink_position.into(), files)
    }

    /// Writes the merge's snapshot of checkpoint `id`, durably.
    pub fn write_merge(&self, snapshot: &MergeSnapshot) -> Result<ManifestFile, CheckpointError> {
        self.write_file(merge_name(snapshot.checkpoint_id), &snapshot.encode()?)
    }

    fn write_file(&self, name: String, bytes: &[u8]) -> Result<ManifestFile, CheckpointError> {
        write_file_durably(&self.dir, name, bytes)
    }

    /// Makes checkpoint `id` exist: its `files` must already be durable. Writes the manifest
    /// to a temporary name, fsyncs it, renames it, fsyncs the directory, then removes
    /// checkpoints older than the last `keep`.
    pub fn commit(
        &self,
        id: u64,
        source: SourcePosition,
        sink: &SinkPosition,
        files: Vec<ManifestFile>,
    ) -> Result<(), CheckpointError> {
        let manifest = Manifest {
            format_version: MANIFEST_VERSION,
            checkpoint_id: id,
            source_offset: source.offset,
            source_records: source.records,
            source_digest: source.digest,
            sink_position: sink.position,
            side_outputs: sink.side_outputs.clone(),
            files,
        };
        replace_durably(&self.dir, &manifest_name(id), &manifest.encode()?)?;
        self.remove_older_than_kept()
    }

    /// Removes the files of a checkpoint that was not committed (best effort: a leftover file
    /// without a manifest is ignored by restore and removed with older checkpoints).
    pub fn discard(&self, id: u64) {
        let prefix = format!("chk-{id:020}");
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().into_string().unwrap_or_default();
                if name.starts_with(&prefix) && !name.ends_with(".manifest") {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }

    fn remove_older_than_kept(&self) -> Result<(), CheckpointError> {
        let ids = self.checkpoint_ids()?;
        if ids.len() <= self.keep {
            return Ok(());
        }
        let oldest_kept = ids[ids.len() - self.keep];
        for entry in fs::read_dir(&self.dir)
            .map_err(|e| CheckpointError::io(&self.dir, e))?
            .flatten()
        {
            let name = entry.file_name().into_string().unwrap_or_default();
            let id = name
                .strip_prefix("chk-")
                .and_then(|r| r.get(..20))
                .and_then(|d| d.parse::<u64>().ok());
            if id.is_some_and(|id| id < oldest_kept) {
                // Manifest first: a checkpoint without its manifest no longer exists.
                let path = entry.path();
                fs::remove_file(&path).map_err(|e| CheckpointError::io(&path, e))?;
            }
        }
        Ok(())
    }

    fn load(&self, id: u64) -> Result<Restored, CheckpointError> {
        let path = self.dir.join(manifest_name(id));
        let bytes = fs::read(&path).map_err(|e| CheckpointError::io(&path, e))?;
        let manifest = Manifest::decode(&bytes, &path)?;
        if manifest.checkpoint_id != id {
            return Err(CheckpointError::Corrupt {
                path,
                reason: format!(
                    "names checkpoint {} in the file of {id}",
                    manifest.checkpoint_id
                ),
            });
        }
        let mut snapshots = Vec::with_capacity(manifest.files.len());
        let mut merge = None;
        for file in &manifest.files {
            let path = self.dir.join(&file.name);
            let bytes = fs::read(&path).map_err(|e| CheckpointError::io(&path, e))?;
            if bytes.len() as u64 != file.len || crc32fast::hash(&bytes) != file.crc32 {
                return Err(CheckpointError::Corrupt {
                    path,
                    reason: format!(
                        "{} bytes with crc32 {:08x}; the manifest says {} bytes, {:08x}",
                        bytes.len(),
                        crc32fast::hash(&bytes),
                        file.len,
                        file.crc32
                    ),
                });
            }
            if file.name == merge_name(id) {
                merge = Some(MergeSnapshot::decode(&bytes, &path)?);
            } else {
                snapshots.push(ShardSnapshot::decode(&bytes, &path)?);
            }
        }
        snapshots.sort_by_key(|s| s.shard);
        Ok(Restored {
            manifest,
            snapshots,
            merge,
            skipped: vec![],
        })
    }

    /// The newest checkpoint that passes every check, or `None` if there is none. A newer
    /// checkpoint that fails is skipped with its reason in `Restored::skipped`.
    pub fn restore(&self) -> Result<Option<Restored>, CheckpointError> {
        let mut skipped = vec![];
        for id in self.checkpoint_ids()?.into_iter().rev() {
            match self.load(id) {
                Ok(restored) => {
                    return Ok(Some(Restored {
                        skipped,
                        ..restored
                    }))
                }
                Err(
                    e @ (CheckpointError::Corrupt { .. }
                    | CheckpointError::Version { .. }
                    | CheckpointError::Io { .. }),
                ) => {
                    skipped.push(format!("checkpoint {id} skipped: {e}"));
                }
                Err(other) => return Err(other),
            }
        }
        if skipped.is_empty() {
            Ok(None)
        } else {
            Err(CheckpointError::Corrupt {
                path: self.dir.clone(),
                reason: format!("no valid checkpoint: {}", skipped.join("; ")),
            })
        }
    }
}
