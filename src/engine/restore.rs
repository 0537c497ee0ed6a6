//! Restoring a stage: opening its checkpoint directory, checking that the newest valid
//! checkpoint fits the stage, and turning the shards' snapshots into the elements to re-issue.
//!
//! Owns: the restore-time checks. Invariants: a checkpoint of another shard count or mode is
//! refused with both named; every re-issued element lies below the checkpoint's barrier and
//! was not already released by the merge (`MergeSnapshot::released_in_flight`).

use super::merge::mode_code;
use crate::checkpoint::coordinator::Coordinator;
use crate::checkpoint::{
    CheckpointError, CheckpointStore, Checkpointing, Codec, RestoreInfo, Restored, SourcePosition,
};
use crate::error::BuildError;
use crate::operator::{element_of, Element, OutputMode};
use std::sync::Arc;

/// A stage's checkpoint directory, opened.
pub(crate) struct Opened {
    pub(crate) coordinator: Arc<Coordinator>,
    /// The newest valid checkpoint, if any.
    pub(crate) restored: Option<Restored>,
    pub(crate) info: Option<RestoreInfo>,
}

/// Opens the checkpoint directory and loads its newest valid checkpoint, checking that
/// it was taken by a stage of this shape.
pub(crate) fn open_checkpoints<I, O>(
    c: &Checkpointing<I, O>,
    shards: usize,
    mode: OutputMode,
) -> Result<Opened, BuildError> {
    let store = CheckpointStore::open(&c.dir, c.keep).map_err(BuildError::Checkpoint)?;
    let restored = store.restore().map_err(BuildError::Checkpoint)?;
    let next_id = restored
        .as_ref()
        .map_or(1, |r| r.manifest.checkpoint_id + 1);
    let info = match &restored {
        None => None,
        Some(r) => {
            let id = r.manifest.checkpoint_id;
            let mismatch = |found: String, expected: String| {
                BuildError::Checkpoint(CheckpointError::Mismatch {
                    checkpoint_id: id,
                    found,
                    expected,
                })
            };
            let merge = r.merge.as_ref().ok_or_else(|| {
                BuildError::Checkpoint(CheckpointError::Corrupt {
                    path: c.dir.clone(),
                    reason: format!("checkpoint {id} has no merge snapshot"),
                })
            })?;
            if merge.shards as usize != shards || r.snapshots.len() != shards {
                return Err(mismatch(
                    format!("{} shards", merge.shards),
                    format!("{shards} shards"),
                ));
            }
            if merge.mode != mode_code(mode) {
                let name = ["Ordered", "Unordered", "KeyOrdered"]
                    .get(merge.mode as usize)
                    .unwrap_or(&"an unknown");
                return Err(mismatch(format!("mode {name}"), format!("mode {mode:?}")));
            }
            if mode == OutputMode::Ordered && merge.base_seq > merge.barrier_seq {
                return Err(BuildError::Checkpoint(CheckpointError::Corrupt {
                    path: c.dir.clone(),
                    reason: format!("checkpoint {id}: merge position after its barrier"),
                }));
            }
            Some(RestoreInfo {
                checkpoint_id: id,
                source: SourcePosition {
                    offset: r.manifest.source_offset,
                    records: r.manifest.source_records,
                    digest: r.manifest.source_digest,
                },
                sink_position: r.manifest.sink_position,
                side_outputs: r.manifest.side_outputs.clone(),
                skipped: r.skipped.clone(),
                reissued: 0,
                held: 0,
            })
        }
    };
    let coordinator = Arc::new(Coordinator::new(store, shards, next_id));
    Ok(Opened {
        coordinator,
        restored,
        info,
    })
}

/// Each shard's elements to re-issue: its snapshot's entries that the merge had not
/// already released, decoded.
pub(crate) fn reissue<I>(
    input: &Codec<I>,
    restored: &Restored,
) -> Result<Vec<Vec<Element<I>>>, BuildError> {
    let merge = restored.merge.as_ref().expect("checked when opened");
    let released: std::collections::HashSet<u64> =
        merge.released_in_flight.iter().copied().collect();
    let now = std::time::Instant::now();
    let mut per_shard = Vec::with_capacity(restored.snapshots.len());
    for snapshot in &restored.snapshots {
        let mut elements = Vec::with_capacity(snapshot.entries.len());
        for entry in snapshot
            .entries
            .iter()
            .filter(|e| !released.contains(&e.seq))
        {
            assert!(
                entry.seq < merge.barrier_seq,
                "a shard snapshot holds only elements before its barrier"
            );
            let element = element_of(entry, now, |b| input.decode(b)).map_err(|reason| {
                BuildError::Checkpoint(CheckpointError::Decode {
                    checkpoint_id: merge.checkpoint_id,
                    what: "input of record",
                    seq: entry.seq,
                    reason,
                })
            })?;
            elements.push(element);
        }
        per_shard.push(elements);
    }
    Ok(per_shard)
}
