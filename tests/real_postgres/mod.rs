//! The PostgreSQL server the tests look up in: `PG_URL`, else 127.0.0.1:5432 (user postgres,
//! database test) when it answers; the tests that need one skip (saying so) when none does,
//! unless SLUICE_REQUIRE_POSTGRES=1 makes that a failure. Each test works in a schema of its
//! own, made with tokio-postgres (a client that is not sluice's) and dropped at the end.

#![allow(dead_code)]

use std::net::ToSocketAddrs;
use std::time::Duration;

/// The server's URL, if one answers.
pub fn url() -> Option<String> {
    let url = std::env::var("PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let endpoint = sluice::postgres::PgEndpoint::parse(&url).expect("PG_URL is a postgres:// URL");
    let reachable = endpoint
        .host
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
    if !reachable {
        if std::env::var("SLUICE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
            panic!("SLUICE_REQUIRE_POSTGRES=1 but no PostgreSQL answers at {url}");
        }
        eprintln!("SKIPPED: no PostgreSQL answers at {url} (set PG_URL)");
        return None;
    }
    Some(url)
}

/// Runs SQL statements with tokio-postgres.
pub fn execute(url: &str, sql: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("tokio-postgres connects");
        let task = tokio::spawn(conn);
        client
            .batch_execute(sql)
            .await
            .expect("the set-up SQL runs");
        drop(client);
        let _ = task.await;
    });
}

/// A schema of the test's own (its name unique to the process and the tag), dropped with it.
pub struct Schema {
    pub url: String,
    pub name: String,
}

impl Schema {
    pub fn create(url: &str, tag: &str, sql: &str) -> Schema {
        let name = format!("sluice_{tag}_{}", std::process::id());
        execute(
            url,
            &format!("DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}; SET search_path TO {name}; {sql}"),
        );
        Schema {
            url: url.to_string(),
            name,
        }
    }

    /// `table` qualified with the schema.
    pub fn table(&self, table: &str) -> String {
        format!("{}.{table}", self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        execute(
            &self.url,
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        );
    }
}
