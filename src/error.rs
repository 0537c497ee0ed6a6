//! Errors, one type per subsystem, each saying what failed, on which record, and what to do.
//!
//! Owns: the error vocabulary of the public API. Programmer errors (broken invariants) are
//! panics with the invariant's name, never values of these types.

use std::time::Duration;

/// The stage stopped because a record could not be completed, or a shard died.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// A record's timeout (which covers every attempt) expired and the function's `timeout`
    /// handler chose to fail.
    #[error(
        "record #{seq} timed out after {timeout:?} (all attempts included); input: {input}. \
         Raise the timeout, or override AsyncFunction::timeout to emit a fallback"
    )]
    Timeout {
        seq: u64,
        input: String,
        timeout: Duration,
    },
    /// The function failed and neither the retry policy nor `on_error` recovered it.
    #[error(
        "record #{seq} failed on attempt {attempts}: {source}; input: {input}. \
         Retry such errors with RetryPolicy::on_error, or override AsyncFunction::on_error"
    )]
    Function {
        seq: u64,
        input: String,
        attempts: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A shard's thread panicked (in the user's function or factory).
    #[error("shard {shard} panicked: {message}")]
    ShardPanicked { shard: usize, message: String },
    /// A sink running on a shard could not take its outputs (`ShardSink::write` or `finish`).
    #[error("shard {shard}'s sink failed: {source}")]
    Sink {
        shard: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The stage could not be built or started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A setting is out of range.
    #[error("invalid setting `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// A shard's glommio executor could not be created.
    #[error(
        "shard {shard}: could not start its executor: {reason}. io_uring needs a kernel >= 5.8 \
         and a locked-memory limit (ulimit -l) of at least 512 KiB per shard"
    )]
    Executor { shard: usize, reason: String },
    /// The shards would lock more memory than the process may (`ulimit -l`).
    #[error(
        "{shards} shards need {needed_kib} KiB of locked memory for io_uring (3 x io_memory \
         each) but the limit is {limit_kib} KiB: raise it (`ulimit -l`, or LimitMEMLOCK= in a \
         systemd unit), or run {fit} shard(s) or fewer"
    )]
    LockedMemory {
        shards: usize,
        needed_kib: u64,
        limit_kib: u64,
        fit: usize,
    },
    /// The checkpoint directory could not be read, or its checkpoint does not fit this stage.
    #[error("restoring from the checkpoint directory: {0}")]
    Checkpoint(#[source] crate::checkpoint::CheckpointError),
}

/// A record or watermark could not be pushed: the stage has stopped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PushError<T> {
    /// The stage failed or its consumer was dropped; the element is handed back, not lost.
    /// Read the consumer to its end to learn why the stage stopped.
    #[error("the stage has stopped (it failed, or its consumer was dropped); element handed back")]
    Closed(T),
}

/// Debug-formats an input for an error message, cut to a readable length.
pub(crate) fn describe_input(input: &dyn std::fmt::Debug) -> String {
    const LIMIT: usize = 256;
    let mut text = format!("{input:?}");
    if text.len() > LIMIT {
        let mut cut = LIMIT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}
