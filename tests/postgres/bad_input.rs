//! Garbage from one client gets an ErrorResponse and a closed socket; others carry on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::raw::{raw_login, startup_message};
use crate::support::{bounded, describe, simple_column};
use crate::Env;

/// Sends `bytes` and reads until EOF (2 s at most); returns everything sluice sent back.
async fn send_and_read_to_eof(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("send");
    let mut reply = Vec::new();
    match tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut reply)).await {
        Ok(Ok(_)) => reply,
        // A reset after the reply still closes the connection.
        Ok(Err(e)) if !reply.is_empty() => {
            eprintln!("read ended with {e} after {} bytes", reply.len());
            reply
        }
        Ok(Err(e)) => panic!("read failed before any reply to {bytes:?}: {e}"),
        Err(_) => panic!("no EOF within 2 s after {bytes:?}; got {reply:?}"),
    }
}

/// Checks `reply` is exactly one well-formed ErrorResponse; returns its fields.
fn error_fields(reply: &[u8], what: &str) -> Vec<(u8, String)> {
    assert_eq!(reply.first(), Some(&b'E'), "{what}: reply is {reply:?}");
    assert!(reply.len() >= 5, "{what}: truncated reply {reply:?}");
    let len = u32::from_be_bytes(reply[1..5].try_into().unwrap()) as usize;
    assert_eq!(
        1 + len,
        reply.len(),
        "{what}: not one message then EOF: {reply:?}"
    );
    let mut fields = Vec::new();
    let mut body = &reply[5..];
    while let Some((&kind, rest)) = body.split_first() {
        if kind == 0 {
            break;
        }
        let end = rest.iter().position(|&b| b == 0).expect("NUL-terminated field");
        fields.push((kind, String::from_utf8_lossy(&rest[..end]).into_owned()));
        body = &rest[end + 1..];
    }
    assert!(
        fields.iter().any(|(k, _)| *k == b'C') && fields.iter().any(|(k, _)| *k == b'M'),
        "{what}: ErrorResponse without code or message: {fields:?}"
    );
    eprintln!("{what}: {fields:?}");
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_an_error_and_others_are_unaffected() {
    let env = Env::start(1, "");
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        // A well-behaved client keeps querying throughout.
        let client = Arc::new(env.app_client().await);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let worker = {
            let (client, stop, done) = (client.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let n: i32 = client
                        .query_one("SELECT $1::int", &[&7i32])
                        .await
                        .unwrap_or_else(|e| panic!("bystander query: {}", describe(&e)))
                        .get(0);
                    assert_eq!(n, 7);
                    done.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };

        let http = send_and_read_to_eof(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        error_fields(&http, "HTTP request");

        let huge = send_and_read_to_eof(addr, &[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]).await;
        error_fields(&huge, "length 0x7fffffff");

        let tiny = send_and_read_to_eof(addr, &[0, 0, 0, 4]).await;
        error_fields(&tiny, "length 4");

        let bad_version = send_and_read_to_eof(addr, &[0, 0, 0, 9, 0, 9, 0, 9, 0]).await;
        error_fields(&bad_version, "protocol version 9.9");

        // SSLRequest without TLS configured: 'N', then the startup goes on in plain text.
        let mut ssl = TcpStream::connect(addr).await.unwrap();
        ssl.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .unwrap();
        let mut answer = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(2), ssl.read_exact(&mut answer))
            .await
            .expect("no answer to SSLRequest within 2 s")
            .expect("read SSLRequest answer");
        assert_eq!(&answer, b"N");
        ssl.write_all(&startup_message("app", "app")).await.unwrap();
        let mut first = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(2), ssl.read_exact(&mut first))
            .await
            .expect("no answer to the startup message within 2 s")
            .expect("read startup answer");
        assert_eq!(&first, b"R", "expected an authentication request");
        drop(ssl);

        // After a successful login: an unknown message type, and a huge length prefix.
        for (what, junk) in [
            ("unknown message type '@'", &[b'@', 0, 0, 0, 4][..]),
            ("Query of length 0x7fffffff", &[b'Q', 0x7f, 0xff, 0xff, 0xff][..]),
        ] {
            let mut stream = raw_login(addr).await;
            stream.write_all(junk).await.unwrap();
            let mut reply = Vec::new();
            tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut reply))
                .await
                .unwrap_or_else(|_| panic!("{what}: no EOF within 2 s, got {reply:?}"))
                .ok();
            error_fields(&reply, what);
        }

        stop.store(true, Ordering::Relaxed);
        worker.await.expect("bystander task");
        assert!(done.load(Ordering::Relaxed) > 0, "bystander never ran");
        assert_eq!(simple_column(&client, "SELECT 2").await, ["2"]);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}
