//! A blocking, one-request-at-a-time RESP2 client over `std::net`, for the synchronous
//! baselines (Flink's `MapFunction` with a blocking client, and a pool of them).
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
}

impl BlockingClient {
    pub fn connect(addr: SocketAddr) -> io::Result<BlockingClient> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(BlockingClient {
            stream,
            request: Vec::with_capacity(64),
            buf: vec![0; 16 * 1024],
            end: 0,
        })
    }

    /// `GET key`: the value's length, or `None` when missing.
    pub fn get(&mut self, key: &[u8]) -> io::Result<Option<usize>> {
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
                Ok(None) => {
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
                }
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }
}
