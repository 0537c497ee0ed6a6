//! CPU time of the client side of a benchmark: the process's user + system time
//! (`getrusage(RUSAGE_SELF)`, which includes threads that already exited) minus the time of
//! the in-process server's threads (`/proc/self/task/*/schedstat`, threads named `lg-server*`).
//!
//! Invariant: a reading is monotonic per thread; the client figure is a difference of two
//! readings taken around one benchmark point.

use std::time::Duration;

/// User + system CPU time of the whole process so far.
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we own; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CPU time of this process's live threads whose name starts with `prefix`.
pub fn threads_cpu(prefix: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let mut total = Duration::ZERO;
    for task in tasks.flatten() {
        let path = task.path();
        let named = std::fs::read_to_string(path.join("comm"))
            .map(|c| c.trim_end().starts_with(prefix))
            .unwrap_or(false);
        if !named {
            continue;
        }
        // schedstat: "<ns on cpu> <ns waiting> <timeslices>".
        if let Some(ns) = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
            })
        {
            total += Duration::from_nanos(ns);
        }
    }
    total
}

/// A snapshot for measuring client CPU over an interval.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    process: Duration,
    server: Duration,
}

/// Thread-name prefix of loadgen's server executors.
pub const SERVER_THREADS: &str = "lg-server";

impl CpuMark {
    pub fn now() -> CpuMark {
        CpuMark {
            process: process_cpu(),
            server: threads_cpu(SERVER_THREADS),
        }
    }

    /// Client CPU (process minus server threads) since `self`.
    pub fn client_since(&self) -> Duration {
        let later = CpuMark::now();
        let process = later.process.saturating_sub(self.process);
        let server = later.server.saturating_sub(self.server);
        process.saturating_sub(server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's own CPU time, from the kernel's per-thread clock (independent of the
    /// `getrusage` and `/proc` figures under test).
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for the call to fill.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn busy_work_shows_up_as_process_cpu() {
        // Spin until this thread has used 50 ms of CPU (not of wall time: on a loaded machine
        // 50 ms of wall time can hold much less CPU, which made this test flaky).
        let mark = CpuMark::now();
        let start = thread_cpu();
        let mut x = 0u64;
        while thread_cpu() - start < Duration::from_millis(50) {
            for _ in 0..1000 {
                x = x.wrapping_mul(31).wrapping_add(7);
            }
        }
        std::hint::black_box(x);
        let client = mark.client_since();
        assert!(client >= Duration::from_millis(45), "{client:?}");
    }
}
