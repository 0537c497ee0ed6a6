//! PostgreSQL lookups from a shard: `PgClient` (pipelined connections over glommio's io_uring
//! TCP, `connection.rs`), the start-up and authentication every connection and the preflight
//! share (`handshake.rs`), and a row as a JSON object (`row.rs`). The message codec and the
//! MD5 / SCRAM-SHA-256 exchanges are `postgres-protocol`'s, the crate tokio-postgres is built on.
//!
//! Owns: speaking the extended query protocol to one server. Invariants: plain TCP only (no
//! TLS, no unix sockets: a URL asking for either is refused when it is parsed); a lookup is one
//! execution of a statement prepared once per connection, with its parameters in text form (the
//! server casts them, as it would a literal); its rows come back in text form and become one
//! JSON object per row ([`row`]); no row is a missing key.

mod client;
mod connection;
pub mod handshake;
pub mod row;

pub use client::{PgClient, PgFuture};
pub use handshake::Prepared;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Between the parameters of one lookup's key (a text parameter cannot hold a NUL byte).
pub const PARAM_SEPARATOR: u8 = 0;

/// Where lookups go and who logs in: `postgres://USER[:PASSWORD]@HOST[:PORT][/DATABASE]`.
#[derive(Clone, PartialEq, Eq)]
pub struct PgEndpoint {
    pub addr: SocketAddr,
    /// The host and port as written (for messages).
    pub host: String,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
}

impl fmt::Display for PgEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "postgres://{}@{}/{}",
            self.user, self.host, self.database
        )
    }
}

/// The password is never printed.
impl fmt::Debug for PgEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgEndpoint({self})")
    }
}

/// Percent-decodes a URL part (a password may hold `@`, `:` or `/` written as `%40`...).
fn percent_decode(part: &str) -> Result<String, String> {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = part
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("`{part}` has a `%` not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{part}` decodes to bytes that are not UTF-8"))
}

impl PgEndpoint {
    /// Parses a `postgres://` (or `postgresql://`) URL. The database defaults to the user's
    /// name, as with libpq. `sslmode=disable`, `allow` and `prefer` are taken as plain TCP;
    /// a mode that needs TLS is refused, as is any other query parameter.
    pub fn parse(url: &str) -> Result<PgEndpoint, String> {
        let rest = match url.split_once("://") {
            Some(("postgres" | "postgresql", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "`{url}`: scheme `{scheme}` is not postgres (postgres://USER@HOST:PORT/DB)"
                ))
            }
            None => {
                return Err(format!(
                    "`{url}` is not a URL (postgres://USER@HOST:PORT/DB)"
                ))
            }
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, database) = rest.split_once('/').unwrap_or((rest, ""));
        let Some((login, host)) = authority.rsplit_once('@') else {
            return Err(format!(
                "`{url}` names no user (postgres://USER@HOST:PORT/DB)"
            ));
        };
        let (user, password) = match login.split_once(':') {
            Some((u, p)) => (percent_decode(u)?, Some(percent_decode(p)?)),
            None => (percent_decode(login)?, None),
        };
        if user.is_empty() {
            return Err(format!("`{url}` names no user"));
        }
        if host.is_empty() || host.starts_with('/') {
            return Err(format!(
                "`{url}`: the host is missing (unix sockets are not supported: give HOST:PORT)"
            ));
        }
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", "disable" | "allow" | "prefer")) => {}
                Some(("sslmode", mode)) => {
                    return Err(format!(
                        "`{url}`: sslmode={mode} needs TLS, which sluice's PostgreSQL client \
                         does not speak (plain TCP only)"
                    ))
                }
                _ => {
                    return Err(format!(
                        "`{url}`: the URL parameter `{pair}` is not supported (only sslmode)"
                    ))
                }
            }
        }
        let (addr, with_port) = crate::http::resolve(url, host, 5432)?;
        let database = if database.is_empty() {
            user.clone()
        } else {
            percent_decode(database)?
        };
        Ok(PgEndpoint {
            addr,
            host: with_port,
            user,
            password,
            database,
        })
    }
}

/// What a lookup whose statement returns several rows answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowsPolicy {
    /// The first row (the server stops after it).
    First,
    /// A JSON array of every row.
    Array,
    /// An error (not retryable): the key was expected to be unique.
    Error,
}

impl RowsPolicy {
    pub fn parse(s: &str) -> Result<RowsPolicy, String> {
        match s {
            "first" => Ok(RowsPolicy::First),
            "array" => Ok(RowsPolicy::Array),
            "error" => Ok(RowsPolicy::Error),
            other => Err(format!(
                "`{other}` is not a rows policy: first, array or error"
            )),
        }
    }

    /// The rows one execution asks for: enough to apply the policy and no more.
    pub(crate) fn max_rows(self) -> i32 {
        match self {
            RowsPolicy::First => 1,
            RowsPolicy::Error => 2,
            RowsPolicy::Array => 0, // all
        }
    }
}

/// The statements a client prepares on every connection, and how it uses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statements {
    /// One key's lookup: `$1..$n` are the key's parameters.
    pub query: String,
    /// Many keys' lookup in one execution: `$1` is a text array of the keys, and the first
    /// column of each row is the key it answers, as the key was written (`SELECT id, name ...
    /// WHERE id = ANY($1)`); the value is the other columns, as `query` would answer them.
    pub batch_query: Option<String>,
    pub rows: RowsPolicy,
}

impl Statements {
    /// Refuses settings that cannot answer every key: a batch answers each key a value, so the
    /// `error` rows policy, which answers a key an error, needs one execution per key.
    pub fn check(&self) -> Result<(), String> {
        if self.batch_query.is_some() && self.rows == RowsPolicy::Error {
            return Err(
                "the rows policy `error` fails one key, which a batch query cannot: \
                        use `first` or `array` with a batch query"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A client's settings.
#[derive(Debug, Clone)]
pub struct PgConfig {
    pub statements: Statements,
    /// Connections per client (per shard), each with its own server process; at least 1.
    pub connections: usize,
    pub connect_timeout: Duration,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
}

impl PgConfig {
    pub fn new(statements: Statements) -> PgConfig {
        PgConfig {
            statements,
            connections: 1,
            connect_timeout: Duration::from_secs(5),
            reconnect_initial: Duration::from_millis(10),
            reconnect_max: Duration::from_secs(1),
        }
    }
}

/// One of the statements a connection prepares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Query,
    BatchQuery,
}

/// Why a lookup got no answer to use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    #[error("cannot connect to PostgreSQL at {server}: {reason}")]
    Connect { server: String, reason: String },
    /// Start-up failed at the server: the login, the database, or preparing a statement
    /// (`statement` says which). Retrying does not help until the setting is fixed.
    #[error("PostgreSQL at {server} refused the connection: {reason}")]
    Refused {
        server: String,
        reason: String,
        statement: Option<Which>,
    },
    /// The connection broke with this lookup sent; it is sent again only by a retry policy.
    #[error("connection to PostgreSQL at {server} lost with the lookup in flight: {reason}")]
    ConnectionLost { server: String, reason: String },
    /// The connection is down and being re-established (with backoff).
    #[error("PostgreSQL at {server} is unavailable (reconnecting after: {reason})")]
    Unavailable { server: String, reason: String },
    /// The server failed this execution (`code` is its SQLSTATE).
    #[error("PostgreSQL error {code}: {message}")]
    Server { code: String, message: String },
    /// A lookup's parameters do not fit the prepared statement.
    #[error("the statement takes {expected} parameters and the key gave {got}: {why}")]
    Params {
        expected: usize,
        got: usize,
        why: &'static str,
    },
    /// Several rows answered one key under the `error` rows policy.
    #[error("the query returned more than one row for the key (rows policy: error)")]
    Rows,
    /// The server sent what the protocol does not allow here; the connection is closed.
    #[error("protocol error from PostgreSQL at {server}: {reason}")]
    Protocol { server: String, reason: String },
}

impl PgError {
    /// Connection trouble, and the server's transient conditions: SQLSTATE classes 08
    /// (connection exception), 40 (transaction rollback: serialization, deadlock), 53
    /// (insufficient resources), 57 (operator intervention: shutdown, cancel) and 55P03 (lock
    /// not available). A bad parameter (22xxx) or query (42xxx) is not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            PgError::Connect { .. }
            | PgError::ConnectionLost { .. }
            | PgError::Unavailable { .. } => true,
            PgError::Server { code, .. } => {
                ["08", "40", "53", "57"].iter().any(|c| code.starts_with(c)) || code == "55P03"
            }
            PgError::Refused { .. }
            | PgError::Params { .. }
            | PgError::Rows
            | PgError::Protocol { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_user_password_host_and_database() {
        let e = PgEndpoint::parse("postgres://app:s%40cret@127.0.0.1:5433/shop").unwrap();
        assert_eq!(e.addr, "127.0.0.1:5433".parse::<SocketAddr>().unwrap());
        assert_eq!(
            (e.user.as_str(), e.password.as_deref(), e.database.as_str()),
            ("app", Some("s@cret"), "shop")
        );
        assert!(!format!("{e:?} {e}").contains("s@cret"));
        let e = PgEndpoint::parse("postgresql://root@127.0.0.1?sslmode=disable").unwrap();
        assert_eq!((e.addr.port(), e.database.as_str()), (5432, "root"));
        assert!(PgEndpoint::parse("postgres://127.0.0.1/db")
            .unwrap_err()
            .contains("no user"));
        assert!(PgEndpoint::parse("postgres://u@h/db?sslmode=require")
            .unwrap_err()
            .contains("TLS"));
        assert!(PgEndpoint::parse("postgres://u@127.0.0.1/db?x=1")
            .unwrap_err()
            .contains("`x=1`"));
        assert!(PgEndpoint::parse("mysql://u@h/db")
            .unwrap_err()
            .contains("mysql"));
        assert!(PgEndpoint::parse("postgres://u:%zz@h/db")
            .unwrap_err()
            .contains("hex"));
    }

    #[test]
    fn transient_server_errors_are_retryable_and_bad_input_is_not() {
        let server = |code: &str| PgError::Server {
            code: code.into(),
            message: String::new(),
        };
        assert!(server("40001").is_retryable());
        assert!(server("57P01").is_retryable());
        assert!(server("53300").is_retryable());
        assert!(!server("22P02").is_retryable());
        assert!(!server("42P01").is_retryable());
        assert!(!PgError::Rows.is_retryable());
    }
}
