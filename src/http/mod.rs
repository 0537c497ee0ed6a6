//! HTTP/1.1 lookups from a shard: `HttpClient` (a keep-alive connection pool over glommio's
//! io_uring TCP, `client.rs`) and the response reader (`response.rs`, on `httparse`).
//!
//! Owns: speaking HTTP to one server. Invariant: plain `http://` only (no TLS, no HTTP/2, no
//! redirects, no proxies): what is supported is what this module says, and a URL asking for
//! more is refused when it is parsed, naming what is not supported.

mod client;
pub mod response;

pub use client::{HttpClient, HttpConfig, HttpError};

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

/// Where requests go: `http://HOST[:PORT]`, resolved once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpEndpoint {
    pub addr: SocketAddr,
    /// The `Host` header: the URL's host and port as written.
    pub host_header: String,
}

impl fmt::Display for HttpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.host_header)
    }
}

/// Resolves a URL's `HOST[:PORT]` (`default_port` when it names none): the address, and the
/// host with its port as a string. Errors name the URL.
pub(crate) fn resolve(
    url: &str,
    authority: &str,
    default_port: u16,
) -> Result<(SocketAddr, String), String> {
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("`{url}`: cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("`{url}`: {authority} resolves to no address"))?;
    Ok((addr, with_port))
}

/// A URL split into the endpoint and the request target (path and query, `/` when empty).
pub fn parse_url(url: &str) -> Result<(HttpEndpoint, String), String> {
    let rest = match url.split_once("://") {
        Some(("http", rest)) => rest,
        Some(("https", _)) => {
            return Err(format!(
                "`{url}`: https is not supported (plain http:// only; put a TLS proxy in front)"
            ))
        }
        Some((scheme, _)) => return Err(format!("`{url}`: scheme `{scheme}` is not http")),
        None => return Err(format!("`{url}` is not a URL (http://HOST:PORT/PATH)")),
    };
    let (authority, target) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!(
            "`{url}`: the host is missing or has user info (not supported)"
        ));
    }
    let (addr, _) = resolve(url, authority, 80)?;
    let target = if target.starts_with('?') {
        format!("/{target}")
    } else {
        target.to_string()
    };
    Ok((
        HttpEndpoint {
            addr,
            host_header: authority.to_string(),
        },
        target,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_endpoint_and_target() {
        let (e, t) = parse_url("http://127.0.0.1:8080/users/{id}?full=1").unwrap();
        assert_eq!(e.addr, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(e.host_header, "127.0.0.1:8080");
        assert_eq!(t, "/users/{id}?full=1");
        let (e, t) = parse_url("http://127.0.0.1").unwrap();
        assert_eq!((e.addr.port(), t.as_str()), (80, "/"));
        assert!(parse_url("https://x/").unwrap_err().contains("https"));
        assert!(parse_url("ftp://x/").unwrap_err().contains("ftp"));
        assert!(parse_url("localhost:80/x")
            .unwrap_err()
            .contains("not a URL"));
        assert!(parse_url("http://u:p@127.0.0.1/")
            .unwrap_err()
            .contains("user info"));
    }
}
