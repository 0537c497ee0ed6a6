//! Logging in to PostgreSQL with a password, by each method a server asks for: cleartext
//! `password`, `md5` and `scram-sha-256`. The test runs a PostgreSQL server of its own (initdb
//! in a temporary directory, on a free port of 127.0.0.1, as user postgres when the test runs
//! as root), whose pg_hba.conf asks each user for a different method; it skips, saying so,
//! where the server binaries are not installed, unless SLUICE_REQUIRE_POSTGRES=1.

use sluice::postgres::handshake::check_blocking;
use sluice::postgres::{PgClient, PgConfig, PgEndpoint, PgError, RowsPolicy, Statements};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The directory of initdb, pg_ctl and psql.
fn server_binaries() -> Option<PathBuf> {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    debian.sort();
    from_pg_config
        .into_iter()
        .chain(debian.into_iter().rev())
        .find(|d| d.join("initdb").exists())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A command run as the server's owner: initdb and postgres refuse to run as root.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A server of the test's own, stopped when dropped.
struct OwnServer {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl OwnServer {
    fn start(bin: PathBuf) -> OwnServer {
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(ok.success(), "chown the server's directory to postgres");
        }
        let data = dir.path().join("data");
        let out = as_owner(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {out:?}");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all plain_user 127.0.0.1/32 password\n\
             host all md5_user 127.0.0.1/32 md5\n\
             host all scram_user 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.path().display()
        );
        let out = as_owner(&bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("log"))
            .args(["-o", &options, "-w", "start"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl start: {out:?}");
        let server = OwnServer {
            bin,
            data,
            port,
            _dir: dir,
        };
        server.psql(
            "SET password_encryption = 'md5'; \
             CREATE ROLE md5_user LOGIN PASSWORD 'md5 pw'; \
             SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE scram_user LOGIN PASSWORD 's€cret:@/'; \
             CREATE ROLE plain_user LOGIN PASSWORD 'plain pw';",
        );
        server
    }

    /// Runs SQL over the unix socket (trust) as postgres.
    fn psql(&self, sql: &str) {
        let socket_dir = self.data.parent().unwrap();
        let out = as_owner(&self.bin.join("psql"))
            .arg("-h")
            .arg(socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-qc", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql: {out:?}");
    }

    fn endpoint(&self, user: &str, password: Option<&str>) -> PgEndpoint {
        let mut e = PgEndpoint::parse(&format!(
            "postgres://{user}@127.0.0.1:{}/postgres",
            self.port
        ))
        .unwrap();
        e.password = password.map(str::to_string);
        e
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = as_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

fn statements() -> Statements {
    Statements {
        query: "SELECT current_user AS who, $1::int + 1 AS next".into(),
        batch_query: None,
        rows: RowsPolicy::First,
    }
}

#[test]
fn password_md5_and_scram_logins_succeed_and_wrong_ones_are_refused() {
    let Some(bin) = server_binaries() else {
        if std::env::var("SLUICE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
            panic!("SLUICE_REQUIRE_POSTGRES=1 but PostgreSQL's server binaries are not installed");
        }
        eprintln!("SKIPPED: PostgreSQL's server binaries (initdb) are not installed");
        return;
    };
    let server = OwnServer::start(bin);
    let wait = Duration::from_secs(5);
    for (user, password) in [
        ("plain_user", "plain pw"),
        ("md5_user", "md5 pw"),
        ("scram_user", "s€cret:@/"),
    ] {
        let prepared = check_blocking(&server.endpoint(user, Some(password)), &statements(), wait)
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        assert_eq!(prepared.query.params, 1);
        let wrong =
            check_blocking(&server.endpoint(user, Some("wrong")), &statements(), wait).unwrap_err();
        assert!(
            matches!(&wrong, PgError::Refused { reason, .. }
                if reason.contains("password authentication failed")),
            "{user}: {wrong}"
        );
        assert!(!wrong.is_retryable());
        let none = check_blocking(&server.endpoint(user, None), &statements(), wait).unwrap_err();
        assert!(
            none.to_string().contains("none was given"),
            "{user}: {none}"
        );
    }
    // The shard's client logs in the same way, and its lookups run as that user.
    let endpoint = server.endpoint("scram_user", Some("s€cret:@/"));
    let answer = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .spawn(move || async move {
            let client = PgClient::new(endpoint, &PgConfig::new(statements()));
            client.get(b"41").await
        })
        .unwrap()
        .join()
        .unwrap();
    let value = answer.unwrap().pop().unwrap().unwrap();
    assert_eq!(&value[..], br#"{"who":"scram_user","next":42}"#);
    // And `sluice enrich` takes the password from PGPASSWORD.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["enrich", "--postgres"])
        .arg(format!(
            "postgres://scram_user@127.0.0.1:{}/postgres",
            server.port
        ))
        .args(["--query", "SELECT $1::int * 2 AS twice", "--params", "{n}"])
        .env("PGPASSWORD", "s€cret:@/")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b"{\"n\":21}\n")?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"n\":21,\"twice\":42}\n"
    );
}
