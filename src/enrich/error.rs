//! `EnrichError`: why a run of `sluice enrich` could not start, or why it stopped.
//!
//! Owns: the command's error vocabulary. Invariant: every message names where it went wrong
//! (the input line, the file with its role, the checkpoint directory, the backend, or the
//! flags that conflict) and, where there is one, what the user can do about it.

use serde::{Serialize, Serializer};
use std::fmt;
use std::path::PathBuf;

/// See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrichError {
    /// A line ends the run: a `fail` policy applied to it, or it could not be read.
    Line { line: u64, reason: String },
    /// A file could not be opened, read, written or made durable. `file` names its role and
    /// path (`output file out.jsonl`, `dead-letter file bad.jsonl`).
    File { file: String, reason: String },
    /// The checkpoint directory cannot hold this run (locked by another run, not writable, or
    /// written by a run with other settings).
    CheckpointDir { dir: PathBuf, reason: String },
    /// The backend does not answer (as Redis or HTTP does).
    Backend {
        /// The server's address as the user gave it.
        server: String,
        /// The flag that named it (`--redis`, `--http`).
        flag: &'static str,
        reason: String,
    },
    /// Flags that cannot go together (two roles on one file, checkpoints without files).
    Usage(String),
    /// The stage could not start or failed, or a thread of the run did.
    Stage(String),
}

impl EnrichError {
    /// A file error: `file` is the role and path, `reason` what went wrong.
    pub(crate) fn file(file: impl Into<String>, reason: impl fmt::Display) -> Self {
        EnrichError::File {
            file: file.into(),
            reason: reason.to_string(),
        }
    }

    /// A checkpoint directory error.
    pub(crate) fn dir(dir: &std::path::Path, reason: impl fmt::Display) -> Self {
        EnrichError::CheckpointDir {
            dir: dir.to_path_buf(),
            reason: reason.to_string(),
        }
    }

    /// A line error; `line` counts from 1.
    pub(crate) fn line(line: u64, reason: impl fmt::Display) -> Self {
        EnrichError::Line {
            line,
            reason: reason.to_string(),
        }
    }
}

impl fmt::Display for EnrichError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnrichError::Line { line, reason } => write!(f, "line {line}: {reason}"),
            EnrichError::File { file, reason } => write!(f, "{file}: {reason}"),
            EnrichError::CheckpointDir { dir, reason } => {
                write!(f, "checkpoint directory {}: {reason}", dir.display())
            }
            EnrichError::Backend {
                server,
                flag,
                reason,
            } => write!(f, "server at {server} ({flag}): {reason}"),
            EnrichError::Usage(reason) | EnrichError::Stage(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for EnrichError {}

/// The summary's JSON carries the message, as the terminal shows it.
impl Serialize for EnrichError {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_names_where() {
        let line = EnrichError::line(7, "key \"user:1\" has no value");
        assert_eq!(line.to_string(), "line 7: key \"user:1\" has no value");
        let file = EnrichError::file("output file /dev/full", "No space left on device");
        assert_eq!(
            file.to_string(),
            "output file /dev/full: No space left on device"
        );
        let dir = EnrichError::dir(std::path::Path::new("ck"), "in use by process 12");
        assert_eq!(
            dir.to_string(),
            "checkpoint directory ck: in use by process 12"
        );
        let json = serde_json::to_string(&line).unwrap();
        assert_eq!(json, "\"line 7: key \\\"user:1\\\" has no value\"");
    }
}
