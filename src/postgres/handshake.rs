//! A connection's start-up: the startup message, authentication (trust, cleartext password,
//! MD5, SCRAM-SHA-256) and the preparation of the lookup statements; and the reading of
//! backend messages from a socket, which the connection's driver goes on with.
//!
//! Owns: the exchanges before the first lookup. Generic over the socket (any futures
//! `AsyncRead + AsyncWrite`), so that a shard's glommio connection and `sluice enrich`'s
//! blocking preflight run the same code and refuse the same way. Invariants: a message longer
//! than `MAX_MESSAGE` is refused before it is buffered; a failed login or a statement the
//! server cannot prepare is `Refused` with the server's own words, naming which statement;
//! the statements are described once, so the connection knows each one's parameter count and
//! result columns before any lookup.

use super::row::Column;
use super::{PgEndpoint, PgError, Statements, Which};
use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use futures::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The longest backend message taken (a row is one record's enrichment).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

const READ_CHUNK: usize = 64 * 1024;

/// The names the statements are prepared under on every connection.
pub(crate) const QUERY: &str = "sluice_query";
pub(crate) const BATCH_QUERY: &str = "sluice_batch_query";

/// A prepared statement: its parameters and result columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub params: usize,
    pub columns: Vec<Column>,
}

/// What a connection prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub query: Statement,
    pub batch_query: Option<Statement>,
}

/// Backend messages read from a socket: bytes are read in chunks and split into messages.
pub struct Reader {
    buf: BytesMut,
    chunk: Box<[u8]>,
}

impl Reader {
    pub fn new() -> Reader {
        Reader {
            buf: BytesMut::with_capacity(READ_CHUNK),
            chunk: vec![0; READ_CHUNK].into_boxed_slice(),
        }
    }

    /// The next whole message read, if one is.
    pub(crate) fn parse(&mut self) -> io::Result<Option<Message>> {
        if self.buf.len() >= 5 {
            let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
            if len as usize > MAX_MESSAGE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a message of {len} bytes (at most {MAX_MESSAGE} are taken)"),
                ));
            }
        }
        Message::parse(&mut self.buf)
    }

    /// Reads what the socket has; an end of stream is an error (the server never closes a
    /// connection between messages without saying why first).
    pub(crate) fn poll_fill<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(stream).poll_read(cx, &mut self.chunk) {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ))),
            Poll::Ready(Ok(n)) => {
                self.buf.extend_from_slice(&self.chunk[..n]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Waits for the next message.
    pub(crate) async fn next<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> io::Result<Message> {
        loop {
            if let Some(m) = self.parse()? {
                return Ok(m);
            }
            std::future::poll_fn(|cx| self.poll_fill(stream, cx)).await?;
        }
    }
}

impl Default for Reader {
    fn default() -> Self {
        Reader::new()
    }
}

/// Connects over a blocking socket, logs in and prepares the statements, then hangs up: what a
/// tool checks before it starts (an unreachable server, a wrong password, a table that is not
/// there and a query the server cannot prepare are said before any record is read). The
/// same exchanges as a shard's connection, run on the calling thread.
pub fn check_blocking(
    endpoint: &PgEndpoint,
    statements: &Statements,
    timeout: std::time::Duration,
) -> Result<Prepared, PgError> {
    let failed = |e: io::Error| PgError::Connect {
        server: endpoint.host.clone(),
        reason: e.to_string(),
    };
    let stream = std::net::TcpStream::connect_timeout(&endpoint.addr, timeout).map_err(failed)?;
    stream.set_read_timeout(Some(timeout)).map_err(failed)?;
    stream.set_write_timeout(Some(timeout)).map_err(failed)?;
    let mut stream = futures::io::AllowStdIo::new(stream);
    futures::executor::block_on(handshake(
        &mut stream,
        &mut Reader::new(),
        endpoint,
        statements,
    ))
}

/// The server's error: its SQLSTATE and message (with the detail and hint when it gave them).
pub(crate) fn server_error(body: &ErrorResponseBody) -> PgError {
    let (mut code, mut message, mut extra) = (String::new(), String::new(), String::new());
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes());
        match field.type_() {
            b'C' => code = value.into_owned(),
            b'M' => message = value.into_owned(),
            b'D' => extra.push_str(&format!(" (detail: {value})")),
            b'H' => extra.push_str(&format!(" (hint: {value})")),
            _ => {}
        }
    }
    PgError::Server {
        code,
        message: message + &extra,
    }
}

fn unexpected(message: &Message, during: &str) -> String {
    let name = match message {
        Message::DataRow(_) => "a data row",
        Message::CommandComplete(_) => "CommandComplete",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::AuthenticationGss | Message::AuthenticationSspi => "GSSAPI/SSPI authentication",
        Message::AuthenticationKerberosV5 => "Kerberos authentication",
        Message::AuthenticationScmCredential => "SCM credential authentication",
        _ => "a message",
    };
    format!("unexpected {name} during {during}")
}

/// Starts up on `stream`, logs in and prepares `statements`. Errors: `Connect` when the socket
/// fails, `Refused` when the server says no (its message, and which statement).
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reader: &mut Reader,
    endpoint: &PgEndpoint,
    statements: &Statements,
) -> Result<Prepared, PgError> {
    let server = endpoint.host.clone();
    let lost = |e: io::Error| PgError::Connect {
        server: server.clone(),
        reason: e.to_string(),
    };
    let refused_at = |statement: Option<Which>| {
        move |reason: String| PgError::Refused {
            server: endpoint.host.clone(),
            reason,
            statement,
        }
    };
    let refused = refused_at(None);
    let mut out = BytesMut::new();
    frontend::startup_message(
        [
            ("user", endpoint.user.as_str()),
            ("database", endpoint.database.as_str()),
            ("application_name", "sluice"),
            ("client_encoding", "UTF8"),
        ],
        &mut out,
    )
    .map_err(|e| refused(format!("the startup message: {e}")))?;
    send(stream, &mut out).await.map_err(&lost)?;
    let password = || {
        endpoint.password.as_deref().ok_or_else(|| {
            refused(format!(
                "the server asks user {} for a password and none was given (in the URL or \
                 PGPASSWORD)",
                endpoint.user
            ))
        })
    };
    let mut scram: Option<ScramSha256> = None;
    loop {
        match reader.next(stream).await.map_err(&lost)? {
            Message::AuthenticationOk => break,
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(password()?.as_bytes(), &mut out)
                    .map_err(|e| refused(e.to_string()))?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = postgres_protocol::authentication::md5_hash(
                    endpoint.user.as_bytes(),
                    password()?.as_bytes(),
                    body.salt(),
                );
                frontend::password_message(hash.as_bytes(), &mut out)
                    .map_err(|e| refused(e.to_string()))?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut offered = vec![];
                while let Ok(Some(m)) = mechanisms.next() {
                    offered.push(m.to_string());
                }
                if !offered.iter().any(|m| m == SCRAM_SHA_256) {
                    return Err(refused(format!(
                        "the server offers SASL mechanisms {offered:?}; sluice speaks {SCRAM_SHA_256}"
                    )));
                }
                let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)
                    .map_err(|e| refused(e.to_string()))?;
                scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| refused("SCRAM continued before it began".into()))?;
                s.update(body.data())
                    .map_err(|e| refused(format!("SCRAM: {e}")))?;
                frontend::sasl_response(s.message(), &mut out)
                    .map_err(|e| refused(e.to_string()))?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| refused("SCRAM ended before it began".into()))?;
                s.finish(body.data()).map_err(|e| {
                    refused(format!(
                        "SCRAM: the server's signature does not verify: {e}"
                    ))
                })?;
            }
            Message::ErrorResponse(body) => {
                return Err(refused(server_error(&body).to_string()));
            }
            Message::NoticeResponse(_) => {}
            other => return Err(refused(unexpected(&other, "authentication"))),
        }
        if !out.is_empty() {
            send(stream, &mut out).await.map_err(&lost)?;
        }
    }
    // Parameter statuses and the key data, up to the first ReadyForQuery.
    loop {
        match reader.next(stream).await.map_err(&lost)? {
            Message::ReadyForQuery(_) => break,
            Message::ErrorResponse(body) => {
                return Err(refused(server_error(&body).to_string()));
            }
            Message::ParameterStatus(_)
            | Message::BackendKeyData(_)
            | Message::NoticeResponse(_) => {}
            other => return Err(refused(unexpected(&other, "start-up"))),
        }
    }
    let query = prepare(stream, reader, QUERY, &statements.query, "the query")
        .await
        .map_err(|e| e.into_error(&refused_at(Some(Which::Query)), &lost))?;
    let batch_query = match &statements.batch_query {
        None => None,
        Some(sql) => Some(
            prepare(stream, reader, BATCH_QUERY, sql, "the batch query")
                .await
                .map_err(|e| e.into_error(&refused_at(Some(Which::BatchQuery)), &lost))?,
        ),
    };
    Ok(Prepared { query, batch_query })
}

enum PrepareError {
    Io(io::Error),
    Refused(String),
}

impl PrepareError {
    fn into_error(
        self,
        refused: &impl Fn(String) -> PgError,
        lost: &impl Fn(io::Error) -> PgError,
    ) -> PgError {
        match self {
            PrepareError::Io(e) => lost(e),
            PrepareError::Refused(reason) => refused(reason),
        }
    }
}

/// Prepares `sql` as `name` and describes it.
async fn prepare<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reader: &mut Reader,
    name: &str,
    sql: &str,
    what: &str,
) -> Result<Statement, PrepareError> {
    let mut out = BytesMut::new();
    let io = PrepareError::Io;
    frontend::parse(name, sql, std::iter::empty(), &mut out).map_err(io)?;
    frontend::describe(b'S', name, &mut out).map_err(io)?;
    frontend::sync(&mut out);
    send(stream, &mut out).await.map_err(io)?;
    let mut params = None;
    let mut columns = None;
    let mut failure = None;
    loop {
        match reader.next(stream).await.map_err(io)? {
            Message::ParseComplete | Message::NoticeResponse(_) => {}
            Message::ParameterDescription(body) => {
                params = Some(body.parameters().count().map_err(io)?);
            }
            Message::RowDescription(body) => {
                let mut fields = body.fields();
                let mut found = vec![];
                while let Some(f) = fields.next().map_err(io)? {
                    found.push(Column::new(f.name(), f.type_oid()));
                }
                columns = Some(found);
            }
            Message::NoData => columns = Some(vec![]),
            Message::ErrorResponse(body) => failure = Some(server_error(&body)),
            Message::ReadyForQuery(_) => break,
            other => {
                return Err(PrepareError::Refused(unexpected(
                    &other,
                    &format!("preparing {what}"),
                )))
            }
        }
    }
    if let Some(e) = failure {
        return Err(PrepareError::Refused(format!("{what} `{sql}`: {e}")));
    }
    let (Some(params), Some(columns)) = (params, columns) else {
        return Err(PrepareError::Refused(format!(
            "{what} `{sql}` was not described"
        )));
    };
    if columns.is_empty() || (name == BATCH_QUERY && columns.len() < 2) {
        return Err(PrepareError::Refused(format!(
            "{what} `{sql}` returns no columns (a lookup is a SELECT, or a statement with \
             RETURNING; a batch query returns the key and at least one more)"
        )));
    }
    Ok(Statement { params, columns })
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut BytesMut) -> io::Result<()> {
    stream.write_all(out).await?;
    stream.flush().await?;
    out.clear();
    Ok(())
}
