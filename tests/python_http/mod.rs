//! Python's `http.server` as a server that is not ours, for the HTTP tests: python3 is on every
//! machine here (and `.ci/run` installs it); without it a test says that it skipped, unless
//! `SLUICE_REQUIRE_PYTHON` is set.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `python3 -m http.server` on a free port, serving `dir`; `None` when python3 is missing.
/// Its listen backlog is 5: more connections at once than that wait for TCP's retry.
pub fn python_server(dir: &Path) -> Option<(Child, u16)> {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Ok(mut child) = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        assert!(
            std::env::var_os("SLUICE_REQUIRE_PYTHON").is_none(),
            "SLUICE_REQUIRE_PYTHON is set and python3 cannot be started"
        );
        eprintln!("SKIPPED: python3 is not installed; the test against http.server did not run");
        return None;
    };
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((child, port));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("python3 -m http.server did not start on port {port}");
}
