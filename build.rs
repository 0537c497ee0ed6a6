//! Build script: records the commit the binary was built from, for `sluice bench`'s JSON
//! report (`git_commit`). Owns nothing else. Invariant: the variable is always set; it is
//! empty when git or the repository is missing (a crate tarball), and ends in `-dirty` when
//! tracked files differ from the commit.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    // Re-run when the checked-out commit or any source changes, so the dirty mark follows.
    for path in [
        ".git/HEAD",
        ".git/index",
        "src",
        "loadgen/src",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
        println!("cargo:rerun-if-changed=.git/{head}");
    }
    let commit = match git(&["rev-parse", "HEAD"]) {
        Some(hash) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{hash}-dirty")
            } else {
                hash
            }
        }
        None => String::new(),
    };
    println!("cargo:rustc-env=SLUICE_GIT_COMMIT={commit}");
}
