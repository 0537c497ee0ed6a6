//! Helpers the integration tests share: running the `sluice` binary, reading JSON Lines, and
//! running a future on a glommio executor of its own.

#![allow(dead_code)]

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// Runs `sluice ARGS` to the end, echoing its stderr (shown when the test fails).
pub fn sluice(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A JSON Lines file's records.
pub fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs the future `make` makes on a glommio executor of its own (it may hold `Rc`s).
pub fn run<T, Fut>(make: impl FnOnce() -> Fut + Send + 'static) -> T
where
    T: Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .spawn(make)
        .unwrap()
        .join()
        .unwrap()
}
