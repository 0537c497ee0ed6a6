//! The files the writer appends lines to: the output and the dead-letter files.
//!
//! Owns: buffering, durability and what the summary may count as written. Invariants:
//! - a line is counted in the summary only once its bytes were handed to the file (a flush
//!   succeeded); lines buffered when a write fails are counted as not written, never as
//!   written;
//! - only the writer thread appends (bad records reach it through the stage), so a file's
//!   length at a checkpoint is exactly what the lines before the checkpoint produced;
//! - `make_durable` flushes and fsyncs and returns the length, which a checkpoint commits (or
//!   `flush_for_checkpoint` returns the length and the fsync, for another thread to run before
//!   the commit); on resume each file is cut back to its committed length
//!   (`resume::open_appending`).

use super::summary::{Count, Summary};
use super::EnrichError;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

/// Bytes a file buffers before it writes them out.
pub(crate) const FILE_BUFFER: usize = 256 * 1024;

/// Where a file's bytes go.
pub(crate) enum Target {
    Stdout(std::io::Stdout),
    File(File),
}

impl Target {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Target::Stdout(w) => w.write_all(bytes).and_then(|()| w.flush()),
            Target::File(f) => f.write_all(bytes),
        }
    }
}

/// A file of JSON lines, each counted in the summary once it reached the file.
pub(crate) struct LineFile {
    /// Names the file in errors: `output enriched.jsonl`, `dead-letter file bad.jsonl`.
    name: String,
    target: Target,
    buffer: Vec<u8>,
    /// Lines in `buffer`, by what they count as.
    pending: Vec<Count>,
}

impl LineFile {
    pub(crate) fn new(name: String, target: Target) -> LineFile {
        LineFile {
            name,
            target,
            buffer: Vec::with_capacity(FILE_BUFFER),
            pending: Vec::new(),
        }
    }

    /// Appends one line (a newline is added) that counts as `count` once written.
    pub(crate) fn push(
        &mut self,
        line: &[u8],
        count: Count,
        summary: &mut Summary,
    ) -> Result<(), EnrichError> {
        self.buffer.extend_from_slice(line);
        self.buffer.push(b'\n');
        self.pending.push(count);
        if self.buffer.len() >= FILE_BUFFER {
            self.flush(summary)?;
        }
        Ok(())
    }

    /// Appends a record as one JSON line that counts as `count` once written.
    pub(crate) fn push_record(
        &mut self,
        fields: &super::record::Fields,
        count: Count,
        summary: &mut Summary,
    ) -> Result<(), EnrichError> {
        fields.write_json(&mut self.buffer);
        self.buffer.push(b'\n');
        self.pending.push(count);
        if self.buffer.len() >= FILE_BUFFER {
            self.flush(summary)?;
        }
        Ok(())
    }

    /// Appends bytes that count as nothing (a watermark line).
    pub(crate) fn push_uncounted(&mut self, line: &[u8]) {
        self.buffer.extend_from_slice(line);
        self.buffer.push(b'\n');
    }

    /// Writes the buffer out; counts its lines as written, or as not written if that failed.
    pub(crate) fn flush(&mut self, summary: &mut Summary) -> Result<(), EnrichError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let result = self.target.write_all(&self.buffer);
        self.buffer.clear();
        match result {
            Ok(()) => {
                for count in self.pending.drain(..) {
                    summary.add(count, 1);
                }
                Ok(())
            }
            Err(e) => {
                summary.unwritten_after_failure += self.pending.len() as u64;
                self.pending.clear();
                Err(EnrichError::file(self.name.clone(), e))
            }
        }
    }

    /// Flushes and fsyncs a file; returns its length, now durable.
    pub(crate) fn make_durable(&mut self, summary: &mut Summary) -> Result<u64, EnrichError> {
        let (position, sync) = self.flush_for_checkpoint(summary)?;
        sync.sync()?;
        Ok(position)
    }

    /// Flushes a file; returns its length and what fsyncs it (on another thread, if need be):
    /// the length is durable once that succeeded.
    pub(crate) fn flush_for_checkpoint(
        &mut self,
        summary: &mut Summary,
    ) -> Result<(u64, PendingSync), EnrichError> {
        self.flush(summary)?;
        let Target::File(file) = &mut self.target else {
            return Err(EnrichError::file(
                self.name.clone(),
                "standard output cannot be made durable",
            ));
        };
        let position = file
            .stream_position()
            .map_err(|e| EnrichError::file(self.name.clone(), e))?;
        let file = file
            .try_clone()
            .map_err(|e| EnrichError::file(self.name.clone(), e))?;
        let name = self.name.clone();
        Ok((position, PendingSync { name, file }))
    }
}

/// A file's fsync, to run where it does not hold up the writing (the descriptor is a
/// duplicate: the same open file).
pub(crate) struct PendingSync {
    name: String,
    file: File,
}

impl PendingSync {
    pub(crate) fn sync(self) -> Result<(), EnrichError> {
        self.file.sync_data().map_err(|e| {
            EnrichError::file(
                self.name,
                format!("fsync failed: {e}; stopping (a failed fsync cannot be retried safely)"),
            )
        })
    }
}

/// The dead-letter files of a run, one `LineFile` per distinct path (policies may share one).
#[derive(Default)]
pub(crate) struct DeadLetters {
    files: BTreeMap<PathBuf, LineFile>,
}

impl DeadLetters {
    /// The name a dead-letter file's committed length goes under in a checkpoint.
    pub(crate) fn side_output_name(path: &Path) -> String {
        format!("dead-letter:{}", path.display())
    }

    pub(crate) fn insert(&mut self, path: PathBuf, file: File) {
        let name = format!("dead-letter file {}", path.display());
        self.files
            .insert(path, LineFile::new(name, Target::File(file)));
    }

    pub(crate) fn push(
        &mut self,
        path: &Path,
        entry: &[u8],
        count: Count,
        summary: &mut Summary,
    ) -> Result<(), EnrichError> {
        let file = self.files.get_mut(path).ok_or_else(|| {
            EnrichError::file(
                format!("dead-letter file {}", path.display()),
                "was not opened",
            )
        })?;
        file.push(entry, count, summary)
    }

    pub(crate) fn flush(&mut self, summary: &mut Summary) -> Result<(), EnrichError> {
        let mut first_error = None;
        for file in self.files.values_mut() {
            if let Err(e) = file.flush(summary) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Flushes and fsyncs every file; returns their lengths by side-output name.
    pub(crate) fn make_durable(
        &mut self,
        summary: &mut Summary,
    ) -> Result<BTreeMap<String, u64>, EnrichError> {
        let (positions, syncs) = self.flush_for_checkpoint(summary)?;
        syncs.into_iter().try_for_each(PendingSync::sync)?;
        Ok(positions)
    }

    /// Flushes every file; returns their lengths by side-output name and their fsyncs.
    pub(crate) fn flush_for_checkpoint(
        &mut self,
        summary: &mut Summary,
    ) -> Result<(BTreeMap<String, u64>, Vec<PendingSync>), EnrichError> {
        let mut positions = BTreeMap::new();
        let mut syncs = Vec::with_capacity(self.files.len());
        for (path, file) in &mut self.files {
            let (position, sync) = file.flush_for_checkpoint(summary)?;
            positions.insert(Self::side_output_name(path), position);
            syncs.push(sync);
        }
        Ok((positions, syncs))
    }
}
