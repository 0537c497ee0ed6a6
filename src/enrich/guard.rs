//! Checks before a run touches a file: one run per checkpoint directory, no output that is an
//! input, and no resume under other settings.
//!
//! Owns: the checkpoint directory's `lock` and `settings.json`. Invariants:
//! - while a run holds `DirLock`, no other run can use the directory (an exclusive `flock`,
//!   released by the kernel when the process ends, however it ends); the lock file names the
//!   holder's process id for the message the second run prints;
//! - the output, each dead-letter file and the input are pairwise different files (by device
//!   and inode, so also through links), checked before any of them is opened for writing;
//! - a run that resumes a checkpoint has the settings that shaped its output (recorded by the
//!   run that started it), or is refused with the settings that differ.

use super::EnrichError;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// An exclusive lock on a checkpoint directory, held for the run.
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock on `dir` (creating the directory), or says which process holds it. Also
    /// proves the directory writable: the lock file is written and fsynced.
    pub(crate) fn acquire(dir: &Path) -> Result<DirLock, EnrichError> {
        let unwritable = |e: std::io::Error| {
            EnrichError::dir(
                dir,
                format!("not writable: {e}; checkpoints could not be taken"),
            )
        };
        std::fs::create_dir_all(dir).map_err(unwritable)?;
        let path = dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(unwritable)?;
        // SAFETY: flock on a file descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another process".to_string()
            } else {
                format!("another sluice enrich (process {holder})")
            };
            return Err(EnrichError::dir(
                dir,
                format!(
                    "in use by {who}: two runs on one directory would corrupt the output; wait \
                     for it to finish, or stop it"
                ),
            ));
        }
        file.set_len(0).map_err(unwritable)?;
        writeln!(file, "{}", std::process::id()).map_err(unwritable)?;
        file.sync_all().map_err(unwritable)?;
        Ok(DirLock { _file: file })
    }
}

/// A file the run reads or writes, by what it is to the run.
pub(crate) struct Role<'a> {
    pub what: &'a str,
    pub path: &'a Path,
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Refuses two roles on one file (`--output` that is the `--input`, a dead-letter file that is
/// the output, ...). A file that does not exist yet is a file of its own, unless two roles
/// name the same path.
pub(crate) fn distinct_files(roles: &[Role<'_>]) -> Result<(), EnrichError> {
    for (i, a) in roles.iter().enumerate() {
        for b in &roles[i + 1..] {
            let same = a.path == b.path
                || matches!((identity(a.path), identity(b.path)), (Some(x), Some(y)) if x == y);
            // Two policies may share one dead-letter file on purpose.
            if same && !(a.what == b.what && a.what.starts_with("dead-letter")) {
                return Err(EnrichError::Usage(format!(
                    "{} {} and {} {} are the same file: writing one would destroy the other; \
                     give them different files",
                    a.what,
                    a.path.display(),
                    b.what,
                    b.path.display()
                )));
            }
        }
    }
    Ok(())
}

/// The settings that shape a run's output, one `name = value` per line.
pub(crate) fn settings_path(dir: &Path) -> PathBuf {
    dir.join("settings.json")
}

/// Records `settings` for a run that starts afresh in `dir` (durably).
pub(crate) fn record_settings(dir: &Path, settings: &serde_json::Value) -> Result<(), EnrichError> {
    let text = serde_json::to_string_pretty(settings).map_err(|e| EnrichError::dir(dir, e))?;
    crate::checkpoint::replace_durably(dir, "settings.json", text.as_bytes())
        .map_err(|e| EnrichError::dir(dir, e))
}

/// Refuses to resume checkpoint `id` in `dir` with settings other than those recorded.
pub(crate) fn check_settings(
    dir: &Path,
    id: u64,
    settings: &serde_json::Value,
) -> Result<(), EnrichError> {
    let path = settings_path(dir);
    let file = || format!("settings file {}", path.display());
    let recorded: serde_json::Value = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            EnrichError::file(file(), format!("{e}; remove the checkpoint directory"))
        })?,
        // A directory without one (written by an older build) is not checked.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(EnrichError::file(file(), e)),
    };
    let (Some(then), Some(now)) = (recorded.as_object(), settings.as_object()) else {
        return Err(EnrichError::file(file(), "not a JSON object"));
    };
    let differ: Vec<String> = now
        .iter()
        .filter(|(k, v)| then.get(*k) != Some(v))
        .map(|(k, v)| {
            let was = then.get(k).map_or("(unset)".to_string(), |w| w.to_string());
            format!("{k} {v} (checkpoint {id} was taken with {was})")
        })
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(EnrichError::dir(
        dir,
        format!(
            "cannot resume with other settings than the run that took the checkpoint: {}; run \
             with the same settings, or remove the checkpoint directory to start afresh",
            differ.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_file_in_two_roles_is_refused_also_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        std::fs::write(&input, "{}\n").unwrap();
        let link = dir.path().join("link.jsonl");
        std::fs::hard_link(&input, &link).unwrap();
        let out = dir.path().join("out.jsonl");
        let role = |what, path| Role { what, path };
        let e = distinct_files(&[role("input", &input), role("output", &link)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("same file") && e.contains("link.jsonl"), "{e}");
        assert!(distinct_files(&[role("input", &input), role("output", &out)]).is_ok());
        let e = distinct_files(&[role("output", &out), role("dead-letter file", &out)]);
        assert!(e.is_err());
        let shared = [
            role("dead-letter file", &out),
            role("dead-letter file", &out),
        ];
        assert!(distinct_files(&shared).is_ok());
    }

    #[test]
    fn a_second_lock_is_refused_with_the_holder_named() {
        let dir = tempfile::tempdir().unwrap();
        let _held = DirLock::acquire(dir.path()).unwrap();
        let e = DirLock::acquire(dir.path()).err().unwrap().to_string();
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        assert!(e.contains("in use"), "{e}");
    }

    #[test]
    fn settings_that_differ_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = serde_json::json!({"key": "user:{id}", "mode": "ordered"});
        record_settings(dir.path(), &a).unwrap();
        assert!(check_settings(dir.path(), 3, &a).is_ok());
        let b = serde_json::json!({"key": "user:{uid}", "mode": "ordered"});
        let e = check_settings(dir.path(), 3, &b).unwrap_err().to_string();
        assert!(
            e.contains("key") && e.contains("user:{id}") && e.contains("checkpoint 3"),
            "{e}"
        );
    }
}
