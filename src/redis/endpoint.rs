//! `Endpoint`: which Redis to talk to and how to log in, from a URL as redis-cli and redis-rs
//! take it: `redis://[user[:password]@]host[:port][/db]` or `unix:///path/redis.sock[?db=N]`.
//!
//! Owns: URL parsing, the connection's set-up commands (`AUTH`, `SELECT`) and its TLS settings
//! (`rediss://`). Invariants: the password never appears in a `Display`, a `Debug` or an error
//! message; a URL that cannot be used is refused with what was wrong in it.

use super::RedisError;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Server::Tcp(addr) => write!(f, "{addr}"),
            Server::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl From<SocketAddr> for Server {
    fn from(addr: SocketAddr) -> Server {
        Server::Tcp(addr)
    }
}

/// TLS to the server (`rediss://`): the roots to trust (the system's, or only the CA in
/// `ca_file`) and a client certificate (`cert_file` with `key_file`), all PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// A server and the login on it. `Debug` and `Display` leave the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub server: Server,
    /// The host as written in the URL: the name TLS checks the certificate against (SNI).
    pub host: String,
    /// `Some` for `rediss://`.
    pub tls: Option<Tls>,
    /// An ACL user (with `password`); `None` with a password is Redis's `default` user.
    pub username: Option<String>,
    pub password: Option<String>,
    /// The database `SELECT`ed on every connection (0: none sent).
    pub db: u32,
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Endpoint {
        Endpoint {
            server: Server::Tcp(addr),
            host: addr.ip().to_string(),
            tls: None,
            username: None,
            password: None,
            db: 0,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let login = match (&self.username, &self.password) {
            (Some(user), _) => format!("{user}@"),
            (None, Some(_)) => "(password)@".to_string(),
            (None, None) => String::new(),
        };
        let tls = if self.tls.is_some() { "tls " } else { "" };
        write!(f, "{tls}{login}{}", self.server)?;
        if self.db != 0 {
            write!(f, " db {}", self.db)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("server", &self.server)
            .field("host", &self.host)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "(hidden)"))
            .field("db", &self.db)
            .finish()
    }
}

/// `url` with its password replaced by `***` (a URL without one is returned as it is).
pub fn redact_url(url: &str) -> String {
    if let Some((path, query)) = url.split_once('?') {
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k @ ("pass" | "password"), _)) => format!("{k}=***"),
                _ => pair.to_string(),
            })
            .collect();
        return format!("{path}?{}", query.join("&"));
    }
    let Some((before, after)) = url.rsplit_once('@') else {
        return url.to_string();
    };
    let (scheme, login) = match before.split_once("://") {
        Some((s, l)) => (format!("{s}://"), l),
        None => (String::new(), before),
    };
    match login.split_once(':') {
        Some((user, _)) => format!("{scheme}{user}:***@{after}"),
        None => url.to_string(),
    }
}

/// `%XX` escapes decoded (user names and passwords in URLs).
fn percent_decode(s: &str) -> Result<String, String> {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a `%` not followed by two hex digits")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "escapes that are not UTF-8".to_string())
}

impl Endpoint {
    /// Parses `redis://[user[:password]@]host[:port][/db]` (`HOST:PORT` alone is taken as
    /// `redis://HOST:PORT`) or `unix:///path/redis.sock[?db=N]` (also `redis+unix://`).
    pub fn parse(url: &str) -> Result<Endpoint, RedisError> {
        let shown = redact_url(url);
        let invalid = |reason: &str| RedisError::InvalidUrl {
            url: shown.clone(),
            reason: reason.to_string(),
        };
        if let Some(rest) = url
            .strip_prefix("unix://")
            .or_else(|| url.strip_prefix("redis+unix://"))
        {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            if path.is_empty() {
                return Err(invalid("no socket path after unix://"));
            }
            let mut endpoint = Endpoint {
                server: Server::Unix(PathBuf::from(path)),
                host: String::new(),
                tls: None,
                username: None,
                password: None,
                db: 0,
            };
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some(("db", n)) => {
                        endpoint.db = n.parse().map_err(|_| invalid("db is not a number"))?
                    }
                    Some(("user", u)) => {
                        endpoint.username = Some(percent_decode(u).map_err(|e| invalid(&e))?)
                    }
                    Some(("pass" | "password", p)) => {
                        endpoint.password = Some(percent_decode(p).map_err(|e| invalid(&e))?)
                    }
                    _ => return Err(invalid("the query may hold db, user and password only")),
                }
            }
            return Ok(endpoint);
        }
        let (rest, tls) = match url.split_once("://") {
            Some(("redis", rest)) => (rest, None),
            Some(("rediss", rest)) => (rest, Some(Tls::default())),
            Some((scheme, _)) => {
                return Err(invalid(&format!(
                    "the scheme `{scheme}` is not redis://, rediss:// or unix://"
                )))
            }
            None => (url, None),
        };
        let (authority, db) = match rest.split_once('/') {
            Some((a, db)) => (a, db),
            None => (rest, ""),
        };
        let db = match db {
            "" => 0,
            n => n
                .parse()
                .map_err(|_| invalid("the database after `/` is not a number"))?,
        };
        let (login, hostport) = match authority.rsplit_once('@') {
            Some((login, hostport)) => (Some(login), hostport),
            None => (None, authority),
        };
        let (username, password) = match login {
            None => (None, None),
            Some(login) => {
                let (user, password) = match login.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (login, None),
                };
                let user = percent_decode(user).map_err(|e| invalid(&e))?;
                let password = password
                    .map(percent_decode)
                    .transpose()
                    .map_err(|e| invalid(&e))?;
                match (user.is_empty(), password) {
                    // `redis://:password@host`: the default user.
                    (true, Some(p)) => (None, Some(p)),
                    // `redis://password@host` is read by redis-rs as a user; say so.
                    (false, None) => {
                        return Err(invalid(
                            "a user without a password; write redis://:PASSWORD@HOST for the \
                             default user's password",
                        ))
                    }
                    (false, Some(p)) => (Some(user), Some(p)),
                    (true, None) => (None, None),
                }
            }
        };
        if hostport.is_empty() {
            return Err(invalid("no host"));
        }
        // The host without its port (and an IPv6 literal without its brackets), for SNI.
        let host = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => hostport,
        }
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
        let hostport = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:6379")
        };
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| invalid(&e.to_string()))?
            .next()
            .ok_or_else(|| invalid("the host resolves to no address"))?;
        Ok(Endpoint {
            server: Server::Tcp(addr),
            host,
            tls,
            username,
            password,
            db,
        })
    }

    /// The commands a new connection sends before any request, each with how it is named in
    /// errors (never with the password): `AUTH`, then `SELECT` when the database is not 0.
    pub(crate) fn login(&self) -> Vec<(String, Vec<Vec<u8>>)> {
        let mut commands = vec![];
        if let Some(password) = &self.password {
            let mut auth = vec![b"AUTH".to_vec()];
            let label = match &self.username {
                Some(user) => {
                    auth.push(user.as_bytes().to_vec());
                    format!("AUTH as `{user}`")
                }
                None => "AUTH".to_string(),
            };
            auth.push(password.as_bytes().to_vec());
            commands.push((label, auth));
        }
        if self.db != 0 {
            let db = self.db.to_string();
            commands.push((
                format!("SELECT {db}"),
                vec![b"SELECT".to_vec(), db.into_bytes()],
            ));
        }
        commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_as_redis_cli_takes_them() {
        let e = Endpoint::parse("redis://alice:s%40cret@127.0.0.1:7000/3").unwrap();
        assert_eq!(e.server, Server::Tcp("127.0.0.1:7000".parse().unwrap()));
        assert_eq!(
            (e.username.as_deref(), e.password.as_deref(), e.db),
            (Some("alice"), Some("s@cret"), 3)
        );
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("cret"), "{shown}");
        let e = Endpoint::parse("redis://:pw@127.0.0.1").unwrap();
        assert_eq!((e.username, e.password.as_deref()), (None, Some("pw")));
        assert_eq!(e.server, Server::Tcp("127.0.0.1:6379".parse().unwrap()));
        let e = Endpoint::parse("127.0.0.1:7001").unwrap();
        assert_eq!((e.db, e.password, e.tls), (0, None, None));
        let e = Endpoint::parse("rediss://localhost:7002/1").unwrap();
        assert_eq!(
            (e.host.as_str(), e.tls, e.db),
            ("localhost", Some(Tls::default()), 1)
        );
        let e = Endpoint::parse("unix:///tmp/r.sock?db=2&password=x").unwrap();
        assert_eq!(e.server, Server::Unix("/tmp/r.sock".into()));
        assert_eq!((e.db, e.password.as_deref()), (2, Some("x")));
        let login: Vec<String> = e.login().into_iter().map(|(l, _)| l).collect();
        assert_eq!(login, ["AUTH", "SELECT 2"]);
    }

    #[test]
    fn bad_urls_say_what_is_wrong_without_the_password() {
        let error = |url: &str| Endpoint::parse(url).unwrap_err().to_string();
        assert!(error("redis://u:hunter2@127.0.0.1:1/x").contains("not a number"));
        assert!(!error("redis://u:hunter2@127.0.0.1:1/x").contains("hunter2"));
        assert!(error("http://h:1").contains("scheme `http`"));
        assert!(error("redis://alice@127.0.0.1").contains("without a password"));
        assert!(error("unix://").contains("socket path"));
        assert!(error("redis://u:%zz@127.0.0.1").contains("hex"));
    }
}
