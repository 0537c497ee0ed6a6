//! `RedisError`: what can go wrong talking to Redis, and whether a retry may help.

use super::Server;

/// A failed Redis request.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisError {
    /// The connection could not be established.
    #[error("cannot connect to Redis at {addr}: {reason}. Is the server running and reachable?")]
    Connect { addr: Server, reason: String },
    /// The server was reached but refused the connection's set-up: its TLS certificate, or the
    /// login (`AUTH`, `SELECT`, `HELLO 3`). Retrying does not help until the setting is fixed.
    #[error("Redis at {addr} refused the connection: {reason}")]
    Refused { addr: Server, reason: String },
    /// The connection broke with this request in flight; it may or may not have been executed.
    #[error("connection to Redis at {addr} lost with the request in flight: {reason}")]
    ConnectionLost { addr: Server, reason: String },
    /// The connection is down and being re-established (with backoff).
    #[error("Redis at {addr} is unavailable (reconnecting after: {reason})")]
    Unavailable { addr: Server, reason: String },
    /// Redis answered with an error reply.
    #[error("Redis replied with an error: {message}")]
    ErrorReply { message: String },
    /// The server sent bytes that are not RESP2; the connection is closed.
    #[error("protocol error from Redis at {addr}: {reason}")]
    Protocol { addr: Server, reason: String },
    /// A reply of an unexpected type for the command.
    #[error("unexpected reply to {command}: {got}")]
    UnexpectedReply { command: &'static str, got: String },
    /// The `redis://` URL is malformed.
    #[error(
        "invalid Redis URL `{url}`: {reason}. Expected redis://[USER:PASSWORD@]HOST[:PORT][/DB] \
         or unix:///PATH[?db=N]"
    )]
    InvalidUrl { url: String, reason: String },
}

impl RedisError {
    /// Whether retrying the request may succeed: connection trouble and Redis's transient
    /// error replies (`LOADING`, `BUSY`, `TRYAGAIN`, `MASTERDOWN`).
    pub fn is_retryable(&self) -> bool {
        match self {
            RedisError::Connect { .. }
            | RedisError::ConnectionLost { .. }
            | RedisError::Unavailable { .. } => true,
            RedisError::ErrorReply { message } => ["LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN"]
                .iter()
                .any(|p| message.starts_with(p)),
            _ => false,
        }
    }
}
