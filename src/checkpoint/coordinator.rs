//! `Coordinator`: one stage's checkpoint protocol state, shared by its producer (which begins a
//! checkpoint), its shards (which write their snapshots with io_uring and report the files)
//! and its consumer (which commits once the sink has made its output durable).
//!
//! Owns: the checkpoint ids and the one checkpoint in progress. Invariants:
//! - at most one checkpoint is in progress; `begin` refuses another until it is committed or
//!   aborted, so barriers of two checkpoints never interleave in a channel;
//! - a checkpoint is committed only with a durable file from every shard and from the merge,
//!   and the manifest last (see `CheckpointStore::commit`); anything else aborts it and
//!   removes its files, so nothing partial is ever restored;
//! - an fsync failure is returned as `CheckpointError::Fsync` and its files are left alone:
//!   the caller must stop the process.

use super::{
    snapshot_name, CheckpointError, CheckpointStore, Codec, ManifestFile, MergeSnapshot,
    ShardSnapshot, SinkPosition, SourcePosition,
};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Turns checkpointing on for a stage (`StageBuilder::checkpointing`).
pub struct Checkpointing<I, O> {
    /// Where checkpoints live; an existing checkpoint there is restored when the stage starts.
    pub dir: PathBuf,
    /// Checkpoints kept (at least 1); older ones are removed after a newer one is durable.
    pub keep: usize,
    /// Inputs in flight go into the shards' snapshots with this codec.
    pub input: Codec<I>,
    /// Outputs the merge holds (ordered mode) go into its snapshot with this codec.
    pub output: Codec<O>,
}

impl<I, O> Checkpointing<I, O> {
    /// Checkpoints in `dir`, keeping the last 2.
    pub fn new(dir: impl Into<PathBuf>, input: Codec<I>, output: Codec<O>) -> Self {
        Checkpointing {
            dir: dir.into(),
            keep: 2,
            input,
            output,
        }
    }
}

/// Why `Producer::checkpoint` did not start a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointRefused {
    #[error("checkpointing is not configured for this stage (StageBuilder::checkpointing)")]
    NotConfigured,
    /// The previous one has not been committed yet (the consumer commits it after the sink
    /// saw `Output::Checkpoint`); try again later.
    #[error("checkpoint {id} is still in progress")]
    InProgress { id: u64 },
    #[error("the stage has stopped")]
    Closed,
}

/// What a stage restored when it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreInfo {
    pub checkpoint_id: u64,
    /// Resume the source here.
    pub source: SourcePosition,
    /// Cut the sink back to this position before writing.
    pub sink_position: u64,
    /// Cut each of the sink's side outputs back to its position before writing.
    pub side_outputs: std::collections::BTreeMap<String, u64>,
    /// Newer checkpoints that failed validation, and why.
    pub skipped: Vec<String>,
    /// Inputs re-issued to the shards (and watermarks re-sent).
    pub reissued: usize,
    /// Outputs the merge held, released again after the restore.
    pub held: usize,
}

/// A shard's answer: its snapshot file is durable (or why not).
pub(crate) struct ShardReport {
    pub(crate) id: u64,
    pub(crate) shard: usize,
    pub(crate) result: Result<ManifestFile, CheckpointError>,
}

struct State {
    next_id: u64,
    in_progress: Option<(u64, SourcePosition)>,
}

/// A shard has this long to report its snapshot file once the merge has aligned.
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// See the module documentation.
pub(crate) struct Coordinator {
    store: CheckpointStore,
    shards: usize,
    state: Mutex<State>,
    reports_tx: flume::Sender<ShardReport>,
    reports_rx: flume::Receiver<ShardReport>,
}

impl Coordinator {
    pub(crate) fn new(store: CheckpointStore, shards: usize, next_id: u64) -> Self {
        // A shard reports once per checkpoint and one checkpoint is in progress at a time; an
        // aborted one may still report late, hence twice the shards.
        let (reports_tx, reports_rx) = flume::bounded(2 * shards);
        Coordinator {
            store,
            shards,
            state: Mutex::new(State {
                next_id,
                in_progress: None,
            }),
            reports_tx,
            reports_rx,
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        self.store.dir()
    }

    pub(crate) fn reports(&self) -> flume::Sender<ShardReport> {
        self.reports_tx.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts checkpoint `id` (returned) whose source resumes at `source`.
    pub(crate) fn begin(&self, source: SourcePosition) -> Result<u64, CheckpointRefused> {
        let mut state = self.state();
        if let Some((id, _)) = state.in_progress {
            return Err(CheckpointRefused::InProgress { id });
        }
        let id = state.next_id;
        state.next_id += 1;
        state.in_progress = Some((id, source));
        Ok(id)
    }

    /// Gives up checkpoint `id` and removes its files.
    pub(crate) fn abort(&self, id: u64) {
        let mut state = self.state();
        if state.in_progress.is_some_and(|(i, _)| i == id) {
            state.in_progress = None;
        }
        drop(state);
        self.store.discard(id);
    }

    /// Commits the checkpoint the merge aligned: waits for every shard's file, writes the
    /// merge's, then the manifest. `sink` must already be durable in the sink.
    pub(crate) fn commit(
        &self,
        merge: &MergeSnapshot,
        sink: &SinkPosition,
    ) -> Result<(), CheckpointError> {
        let id = merge.checkpoint_id;
        let source = match self.state().in_progress {
            Some((i, source)) if i == id => source,
            other => panic!(
                "checkpoint {id} committed while {:?} is in progress",
                other.map(|(i, _)| i)
            ),
        };
        let result = self
            .write_files(merge)
            .and_then(|files| self.store.commit(id, source, sink, files));
        match &result {
            // Leave the files of a failed fsync alone: the process is about to stop.
            Ok(()) | Err(CheckpointError::Fsync { .. }) => self.state().in_progress = None,
            Err(_) => self.abort(id),
        }
        result
    }

    fn write_files(&self, merge: &MergeSnapshot) -> Result<Vec<ManifestFile>, CheckpointError> {
        let id = merge.checkpoint_id;
        let mut files: Vec<Option<ManifestFile>> = vec![None; self.shards];
        while let Some(shard) = files.iter().position(Option::is_none) {
            match self.reports_rx.recv_timeout(REPORT_TIMEOUT) {
                Ok(report) if report.id == id => files[report.shard] = Some(report.result?),
                Ok(_) => {} // a late report of an aborted checkpoint
                Err(e) => {
                    return Err(CheckpointError::ShardMissing {
                        checkpoint_id: id,
                        shard,
                        reason: e.to_string(),
                    })
                }
            }
        }
        let mut files: Vec<ManifestFile> = files.into_iter().flatten().collect();
        files.push(self.store.write_merge(merge)?);
        Ok(files)
    }
}

/// Writes a shard's snapshot with glommio's io_uring file I/O and fsyncs it, on the shard's
/// executor, while the shard goes on processing.
pub(crate) async fn write_shard_snapshot(
    dir: PathBuf,
    snapshot: ShardSnapshot,
) -> Result<ManifestFile, CheckpointError> {
    let name = snapshot_name(snapshot.checkpoint_id, snapshot.shard);
    let path = dir.join(&name);
    let bytes = snapshot.encode()?;
    let io = |e: glommio::GlommioError<()>| CheckpointError::io(&path, e.into());
    let file = glommio::io::BufferedFile::create(&path).await.map_err(io)?;
    let mut written = 0;
    while written < bytes.len() {
        let n = file
            .write_at(bytes[written..].to_vec(), written as u64)
            .await
            .map_err(io)?;
        if n == 0 {
            return Err(CheckpointError::io(
                &path,
                std::io::Error::from(std::io::ErrorKind::WriteZero),
            ));
        }
        written += n;
    }
    file.fdatasync().await.map_err(|e| CheckpointError::Fsync {
        path: path.clone(),
        source: e.into(),
    })?;
    file.close().await.map_err(io)?;
    Ok(ManifestFile::of(name, &bytes))
}
