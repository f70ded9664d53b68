//! Raw protocol access for tests that need to send exact message sequences.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Logs in as `app` over a raw socket (SCRAM-SHA-256) and waits for ReadyForQuery.
pub async fn raw_login(addr: SocketAddr) -> TcpStream {
    raw_login_on(TcpStream::connect(addr).await.expect("connect")).await
}

/// [`raw_login`] on a connected stream.
pub async fn raw_login_on(mut stream: TcpStream) -> TcpStream {
    stream.write_all(&startup_message("app", "app")).await.unwrap();
    let mut buf = BytesMut::new();
    let mut scram = ScramSha256::new(b"app-secret", ChannelBinding::unsupported());
    loop {
        let message = loop {
            if let Some(m) = Message::parse(&mut buf).expect("parse backend message") {
                break m;
            }
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read_buf(&mut buf))
                .await
                .expect("login stalled")
                .expect("read");
            assert!(n > 0, "EOF during login");
        };
        let mut out = BytesMut::new();
        match message {
            Message::AuthenticationSasl(_) => {
                frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut out).unwrap()
            }
            Message::AuthenticationSaslContinue(body) => {
                scram.update(body.data()).expect("server-first message");
                frontend::sasl_response(scram.message(), &mut out).unwrap();
            }
            Message::AuthenticationSaslFinal(body) => {
                scram.finish(body.data()).expect("server signature");
            }
            Message::ReadyForQuery(_) => return stream,
            Message::ErrorResponse(_) => panic!("raw login refused"),
            _ => {}
        }
        stream.write_all(&out).await.unwrap();
    }
}

pub fn startup_message(user: &str, db: &str) -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// One backend message as (tag, body).
pub type Reply = (u8, Vec<u8>);

/// Reads whole messages until `n` ReadyForQuery have arrived; returns them all.
pub async fn read_until_ready(stream: &mut TcpStream, n: usize) -> Vec<Reply> {
    read_until(stream, b'Z', n, false).await
}

/// Reads whole messages until the `n`th with tag `last` has arrived; returns them all. Asserts
/// that nothing more came with it (the replies of a batch ended by Flush have no
/// ReadyForQuery to wait for).
pub async fn read_until_tag(stream: &mut TcpStream, last: u8) -> Vec<Reply> {
    read_until(stream, last, 1, true).await
}

async fn read_until(stream: &mut TcpStream, last: u8, n: usize, nothing_after: bool) -> Vec<Reply> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut seen = 0;
    while seen < n {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() < 1 + len {
                break;
            }
            let m = buf.split_to(1 + len);
            if m[0] == last {
                seen += 1;
            }
            out.push((m[0], m[5..].to_vec()));
        }
        if seen >= n {
            assert!(
                !nothing_after || buf.is_empty(),
                "more after {:?}: {out:?} then {buf:?}",
                char::from(last)
            );
            break;
        }
        let r = tokio::time::timeout(Duration::from_secs(10), stream.read_buf(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {:?} within 10 s; got {out:?}", char::from(last)))
            .expect("read");
        assert!(r > 0, "EOF while waiting for {:?}; got {out:?}", char::from(last));
    }
    out
}

/// Sends one simple Query and returns every reply up to its ReadyForQuery.
pub async fn query(stream: &mut TcpStream, sql: &str) -> Vec<Reply> {
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out).unwrap();
    stream.write_all(&out).await.unwrap();
    read_until_ready(stream, 1).await
}

/// The SQLSTATE of an ErrorResponse body.
pub fn sqlstate(body: &[u8]) -> String {
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        if kind == b'C' {
            return String::from_utf8_lossy(&tail[..end]).into_owned();
        }
        rest = &tail[(end + 1).min(tail.len())..];
    }
    String::new()
}

/// The tags of the replies, as a string ("12CZ" ...), for order assertions.
pub fn tags(replies: &[Reply]) -> String {
    replies.iter().map(|(t, _)| char::from(*t)).collect()
}
