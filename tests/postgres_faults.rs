//! The PostgreSQL client against a server that misbehaves: one in this test speaks the start-up
//! and the statement preparation correctly, then answers lookups with a message that claims to
//! be 2 GiB, or with a row cut off by a closed connection. Lookups fail by policy (a protocol
//! error is not retried, a lost connection is) and the client reconnects; nothing panics or
//! hangs.

use sluice::postgres::{PgClient, PgConfig, PgEndpoint, PgError, RowsPolicy, Statements};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn ready() -> Vec<u8> {
    message(b'Z', b"I")
}

/// One text column named `v`.
fn row_description() -> Vec<u8> {
    let mut body = 1i16.to_be_bytes().to_vec();
    body.extend_from_slice(b"v\0");
    body.extend_from_slice(&0i32.to_be_bytes()); // table
    body.extend_from_slice(&0i16.to_be_bytes()); // column
    body.extend_from_slice(&25i32.to_be_bytes()); // text
    body.extend_from_slice(&(-1i16).to_be_bytes());
    body.extend_from_slice(&(-1i32).to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    message(b'T', &body)
}

/// Reads client messages until a Sync; returns false when the client hung up.
fn read_until_sync(stream: &mut TcpStream) -> bool {
    loop {
        let mut head = [0u8; 5];
        if stream.read_exact(&mut head).is_err() {
            return false;
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        if stream.read_exact(&mut body).is_err() {
            return false;
        }
        if head[0] == b'S' {
            return true;
        }
    }
}

/// Start-up (trust) and one statement prepared with one parameter; then `lookups` answers
/// the first window of lookups.
fn serve(mut stream: TcpStream, lookups: fn(&mut TcpStream)) {
    let mut len = [0u8; 4];
    if stream.read_exact(&mut len).is_err() {
        return;
    }
    let mut startup = vec![0u8; u32::from_be_bytes(len) as usize - 4];
    stream.read_exact(&mut startup).unwrap();
    let mut hello = message(b'R', &0i32.to_be_bytes());
    hello.extend(ready());
    stream.write_all(&hello).unwrap();
    if !read_until_sync(&mut stream) {
        return;
    }
    let mut params = 1i16.to_be_bytes().to_vec();
    params.extend_from_slice(&25i32.to_be_bytes());
    let mut prepared = message(b'1', b"");
    prepared.extend(message(b't', &params));
    prepared.extend(row_description());
    prepared.extend(ready());
    stream.write_all(&prepared).unwrap();
    if read_until_sync(&mut stream) {
        lookups(&mut stream);
    }
}

fn server(lookups: fn(&mut TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve(stream, lookups));
        }
    });
    addr
}

/// Three lookups issued together, then (after the failure) one more; each with a deadline so
/// that a hang fails the test instead of stalling it.
fn lookups_against(addr: SocketAddr) -> (Vec<Result<usize, PgError>>, Option<PgError>) {
    let endpoint = PgEndpoint::parse(&format!("postgres://test@{addr}/db")).unwrap();
    let config = PgConfig::new(Statements {
        query: "SELECT v FROM t WHERE k = $1".into(),
        batch_query: None,
        rows: RowsPolicy::First,
    });
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .spawn(move || async move {
            let client = PgClient::new(endpoint, &config);
            let deadline = Duration::from_secs(10);
            let first = futures::future::join_all([b"a", b"b", b"c"].map(|k| {
                glommio::timer::timeout(deadline, async {
                    Ok(client.get(k).await.map(|v| v.len()))
                })
            }))
            .await;
            let first = first
                .into_iter()
                .map(|r| r.expect("a lookup answered or failed, not hung"))
                .collect();
            let again = glommio::timer::timeout(deadline, async { Ok(client.get(b"d").await) })
                .await
                .expect("a later lookup answered or failed, not hung");
            (first, again.err())
        })
        .unwrap()
        .join()
        .unwrap()
}

#[test]
fn a_message_claiming_two_gigabytes_is_a_protocol_error_not_an_allocation() {
    let addr = server(|stream| {
        let mut huge = vec![b'2']; // BindComplete...
        huge.extend_from_slice(&4u32.to_be_bytes());
        huge.push(b'D'); // ...then a row of 2 GiB
        huge.extend_from_slice(&0x7fff_fff0u32.to_be_bytes());
        let _ = stream.write_all(&huge);
        std::thread::sleep(Duration::from_secs(2));
    });
    let (first, _) = lookups_against(addr);
    for answer in &first {
        match answer {
            Err(e @ PgError::Protocol { reason, .. }) => {
                assert!(reason.contains("bytes"), "{reason}");
                assert!(!e.is_retryable());
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_connection_closed_mid_row_fails_its_lookups_retryably_and_reconnects() {
    let addr = server(|stream| {
        let mut cut = message(b'2', b"");
        cut.extend_from_slice(&message(b'D', b"\x00\x01\x00\x00\x00\x05hello")[..8]);
        let _ = stream.write_all(&cut);
        // Dropped: the connection closes in the middle of the row.
    });
    let (first, again) = lookups_against(addr);
    for answer in &first {
        match answer {
            Err(e @ PgError::ConnectionLost { .. }) => assert!(e.is_retryable()),
            other => panic!("{other:?}"),
        }
    }
    // The reconnected connection fails the same way (this server always cuts), retryably.
    assert!(again.as_ref().is_none_or(|e| e.is_retryable()), "{again:?}");
}
