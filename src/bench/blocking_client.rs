//! A blocking, one-request-at-a-time client over `std::net`, for the synchronous baselines
//! (Flink's `MapFunction` with a blocking client, and a pool of them): RESP2 `GET`, or HTTP/1.1
//! `GET /KEY` on a keep-alive connection.
//!
//! Owns: one socket and its read buffer. Invariant: exactly one request outstanding.

use crate::redis::{decode_reply, Reply};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

pub struct BlockingClient {
    stream: TcpStream,
    request: Vec<u8>,
    buf: Vec<u8>,
    end: usize,
    http: bool,
}

impl BlockingClient {
    pub fn connect(addr: SocketAddr, http: bool) -> io::Result<BlockingClient> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(BlockingClient {
            stream,
            request: Vec::with_capacity(64),
            buf: vec![0; 16 * 1024],
            end: 0,
            http,
        })
    }

    /// Reads more bytes into the buffer (growing it when full); an error at the end.
    fn read_more(&mut self) -> io::Result<()> {
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.stream.read(&mut self.buf[self.end..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed",
            ));
        }
        self.end += n;
        Ok(())
    }

    /// `GET /KEY` over HTTP: the body's length for 200, `None` for 404.
    fn http_get(&mut self, key: &[u8]) -> io::Result<Option<usize>> {
        use crate::http::response::{parse_head, Framing};
        self.request.clear();
        self.request.extend_from_slice(b"GET /");
        self.request.extend_from_slice(key);
        self.request
            .extend_from_slice(b" HTTP/1.1\r\nHost: bench\r\n\r\n");
        self.stream.write_all(&self.request)?;
        let head = loop {
            if let Some(head) = parse_head(&self.buf[..self.end]).map_err(io::Error::other)? {
                break head;
            }
            self.read_more()?;
        };
        let Framing::Length(len) = head.framing else {
            return Err(io::Error::other("a response without Content-Length"));
        };
        while self.end < head.len + len {
            self.read_more()?;
        }
        let used = head.len + len;
        self.buf.copy_within(used..self.end, 0);
        self.end -= used;
        match head.status {
            200 => Ok(Some(len)),
            404 => Ok(None),
            status => Err(io::Error::other(format!("the server answered {status}"))),
        }
    }

    /// `GET key`: the value's length, or `None` when missing.
    pub fn get(&mut self, key: &[u8]) -> io::Result<Option<usize>> {
        if self.http {
            return self.http_get(key);
        }
        self.request.clear();
        self.request.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$");
        self.request
            .extend_from_slice(key.len().to_string().as_bytes());
        self.request.extend_from_slice(b"\r\n");
        self.request.extend_from_slice(key);
        self.request.extend_from_slice(b"\r\n");
        self.stream.write_all(&self.request)?;
        loop {
            match decode_reply(&self.buf[..self.end]) {
                Ok(Some((reply, used))) => {
                    self.buf.copy_within(used..self.end, 0);
                    self.end -= used;
                    return match reply.map_err(io::Error::other)? {
                        Reply::Bulk(value) => Ok(Some(value.len())),
                        Reply::Nil => Ok(None),
                        other => Err(io::Error::other(format!(
                            "unexpected reply to GET: {}",
                            other.describe()
                        ))),
                    };
                }
                Ok(None) => self.read_more()?,
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }
}
