//! Where shards run: one core each when there are enough cores, otherwise unpinned.
//!
//! Owns: the placement policy. Pinning is a placement choice, never a precondition: with more
//! shards than usable cores every shard runs unpinned, and the plan says so (`reason`), so a
//! 4-shard stage still runs on a 2-core machine.

use std::fmt;

/// How shards are placed on cores.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Pinning {
    /// Pin shard `i` to the `i`-th core this process may use, if there is one for every shard;
    /// otherwise run all shards unpinned.
    #[default]
    Auto,
    /// Never pin.
    Off,
    /// Pin shard `i` to `cores[i]` (must name one core per shard).
    Cores(Vec<usize>),
}

/// Where one shard runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlacement {
    /// The shard's index.
    pub shard: usize,
    /// The core it is pinned to, or `None` when unpinned.
    pub core: Option<usize>,
    /// Why it is unpinned, when it is.
    pub reason: Option<String>,
}

impl fmt::Display for ShardPlacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.core, &self.reason) {
            (Some(core), _) => write!(f, "shard {} pinned to core {core}", self.shard),
            (None, Some(reason)) => write!(f, "shard {} unpinned: {reason}", self.shard),
            (None, None) => write!(f, "shard {} unpinned", self.shard),
        }
    }
}

/// The cores this process may run on (its affinity mask), in ascending order.
pub fn usable_cores() -> Vec<usize> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort_unstable();
    ids
}

/// The number of shards a stage gets by default: one per usable core, but no more than the
/// locked-memory limit lets start with the default `io_memory` (see [`shards_that_fit`]).
pub fn default_shards() -> usize {
    default_shards_for(crate::DEFAULT_IO_MEMORY)
}

/// As [`default_shards`], for shards registering `io_memory` bytes each.
pub(crate) fn default_shards_for(io_memory: usize) -> usize {
    let cores = usable_cores().len().max(1);
    match shards_that_fit(memlock_limit(), io_memory) {
        Some(fit) => cores.min(fit).max(1),
        None => cores,
    }
}

/// Locked memory one shard's executor registers with io_uring: `io_memory` with each of
/// glommio's three rings.
pub fn locked_memory_per_shard(io_memory: usize) -> u64 {
    3 * io_memory as u64
}

/// How many shards fit under a locked-memory `limit` (`None`: no limit applies, any number).
pub fn shards_that_fit(limit: Option<u64>, io_memory: usize) -> Option<usize> {
    limit.map(|l| (l / locked_memory_per_shard(io_memory).max(1)) as usize)
}

/// The locked-memory limit that applies to this process (`ulimit -l`, in bytes), or `None`
/// when there is none: unlimited, or the process holds `CAP_IPC_LOCK`, which lifts it.
pub fn memlock_limit() -> Option<u64> {
    const CAP_IPC_LOCK: u32 = 14;
    let may_lock_any = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0);
    if may_lock_any {
        return None;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return None;
    }
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Plans where each of `shards` shards runs, given the usable `cores`.
pub fn plan(shards: usize, pinning: &Pinning, cores: &[usize]) -> Vec<ShardPlacement> {
    let unpinned = |reason: Option<String>| -> Vec<ShardPlacement> {
        (0..shards)
            .map(|shard| ShardPlacement {
                shard,
                core: None,
                reason: reason.clone(),
            })
            .collect()
    };
    match pinning {
        Pinning::Off => unpinned(Some("pinning is off".into())),
        Pinning::Auto if shards > cores.len() => unpinned(Some(format!(
            "{shards} shards but {} usable core(s); shards share cores, the OS places them",
            cores.len()
        ))),
        Pinning::Auto => (0..shards)
            .map(|shard| ShardPlacement {
                shard,
                core: Some(cores[shard]),
                reason: None,
            })
            .collect(),
        Pinning::Cores(list) => (0..shards)
            .map(|shard| match list.get(shard) {
                Some(&core) if cores.contains(&core) => ShardPlacement {
                    shard,
                    core: Some(core),
                    reason: None,
                },
                Some(&core) => ShardPlacement {
                    shard,
                    core: None,
                    reason: Some(format!("core {core} is not usable by this process")),
                },
                None => ShardPlacement {
                    shard,
                    core: None,
                    reason: Some("no core listed for this shard".into()),
                },
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_fit_the_locked_memory_limit() {
        let kib = |n: u64| n * 1024;
        assert_eq!(locked_memory_per_shard(256 * 1024), kib(768));
        assert_eq!(shards_that_fit(Some(kib(8192)), 256 * 1024), Some(10));
        assert_eq!(shards_that_fit(Some(kib(700)), 256 * 1024), Some(0));
        assert_eq!(shards_that_fit(None, 256 * 1024), None);
    }

    #[test]
    fn more_shards_than_cores_falls_back_to_unpinned_with_a_reason() {
        let p = plan(4, &Pinning::Auto, &[0, 1]);
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|s| s.core.is_none()));
        assert!(p[0].reason.as_deref().unwrap().contains("4 shards but 2"));
    }

    #[test]
    fn enough_cores_pins_one_shard_per_core() {
        let p = plan(2, &Pinning::Auto, &[3, 5]);
        assert_eq!(
            p.iter().map(|s| s.core).collect::<Vec<_>>(),
            vec![Some(3), Some(5)]
        );
        let p = plan(2, &Pinning::Cores(vec![5, 9]), &[3, 5]);
        assert_eq!(p[0].core, Some(5));
        assert!(p[1].core.is_none() && p[1].reason.is_some());
    }
}
