//! Bad input from one client gets a CQL protocol ERROR (or a clean close after one), and the
//! other clients' streams carry on untouched.

use bytes::{BufMut, BytesMut};
use sluice_cql::frame::{Header, Opcode};
use sluice_cql::response::error_code;
use sluice_cql::segment::Segment;
use sluice_cql::{Compression, Response};

use crate::client::{error_of, execute, int, text, Client};
use crate::support::bounded;
use crate::Env;

fn frame(version: u8, stream: i16, opcode: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    Header {
        version,
        response: false,
        flags: 0,
        stream,
        opcode,
        length: 0,
    }
    .encode(body.len(), &mut out);
    out.put_slice(body);
    out.to_vec()
}

/// Sends `bytes` on a fresh connection and returns the protocol error it gets, and whether
/// the connection was then closed.
async fn probe(env: &Env, bytes: &[u8]) -> (String, bool) {
    let mut c = Client::raw(env.addr()).await;
    c.send_bytes(bytes).await;
    let (_, r) = c.recv().await.expect("an ERROR before any close");
    let e = error_of(&r);
    assert_eq!(e.code, error_code::PROTOCOL_ERROR, "{e:?}");
    let closed = c.recv_envelope().await.is_none();
    (e.message.clone(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_protocol_errors_and_spares_other_clients() {
    let env = Env::start(3, "", "");
    bounded(60, async {
        let mut good = Client::connect(env.addr(), 5, Compression::Lz4).await;
        good.ok(
            "CREATE KEYSPACE bad WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
        )
        .await;
        good.ok("CREATE TABLE bad.kv (k text PRIMARY KEY, v int)").await;
        let ins = good.prepare("INSERT INTO bad.kv (k, v) VALUES (?, ?)").await;
        // A well-behaved client keeps a pipeline going while the others misbehave.
        let background = tokio::spawn(async move {
            let mut all = Vec::new();
            for round in 0..20 {
                let reqs = (0..50)
                    .map(|i| execute(&ins, vec![text(&format!("g{round}-{i}")), int(i)]))
                    .collect();
                all.extend(good.pipeline(reqs).await);
            }
            all
        });

        // Unsupported versions: v1/v2 (8-byte header), v3, v6, an HTTP request.
        for (bytes, header_version) in [
            (vec![0x01u8, 0, 0, 5, 0, 0, 0, 0], 0x81u8),
            (vec![0x02, 0, 0, 5, 0, 0, 0, 0], 0x82),
            (frame(3, 0, 5, b""), 0x83),
            (frame(6, 0, 5, b""), 0x85),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 0x85),
        ] {
            let mut c = Client::raw(env.addr()).await;
            c.send_bytes(&bytes).await;
            let raw = c.read_to_end().await;
            assert_eq!(raw.first(), Some(&header_version), "{bytes:?} -> {raw:?}");
            let text = String::from_utf8_lossy(&raw);
            assert!(text.contains("Invalid or unsupported protocol version"), "{text}");
        }

        // A body length beyond the 256 MiB limit.
        let mut huge = frame(4, 7, Opcode::Options as u8, b"");
        huge[5..9].copy_from_slice(&(300u32 << 20).to_be_bytes());
        let (msg, _) = probe(&env, &huge).await;
        assert!(msg.contains("exceeds the limit"), "{msg}");

        // Malformed bodies, an unknown opcode and a response frame: an ERROR on that stream,
        // and the connection keeps working.
        let mut c = Client::connect(env.addr(), 4, Compression::None).await;
        for (bytes, stream) in [
            (
                frame(4, 11, Opcode::Query as u8, &[0, 0, 0x7f, 0xff, b'S']),
                11i16,
            ),
            (frame(4, 12, 0x42, b""), 12),
            (frame(4, 13, Opcode::Execute as u8, &[0, 16, 1, 2]), 13),
            (frame(4, 14, Opcode::Batch as u8, &[9, 0xff, 0xff]), 14),
            (frame(4 | 0x80, 15, Opcode::Result as u8, b""), 15),
        ] {
            c.send_bytes(&bytes).await;
            let (s, r) = c.recv().await.expect("an answer");
            assert_eq!(s, stream);
            assert_eq!(error_of(&r).code, error_code::PROTOCOL_ERROR, "{r:?}");
        }
        assert!(matches!(
            c.query("SELECT * FROM bad.kv WHERE k = 'x'").await,
            Response::Result(_)
        ));

        // Requests before STARTUP.
        let (msg, _) = probe(
            &env,
            &frame(4, 1, Opcode::Query as u8, &[0, 0, 0, 1, b'x', 0, 1, 0]),
        )
        .await;
        assert!(msg.contains("Unexpected message"), "{msg}");

        // v5 segments: a corrupted CRC is an ERROR and a close; the stream cannot resync.
        let mut c = Client::connect(env.addr(), 5, Compression::None).await;
        let mut seg = BytesMut::new();
        Segment::new(frame(5, 3, Opcode::Options as u8, b"").into(), true, false).encode(&mut seg);
        let last = seg.len() - 1;
        seg[last] ^= 0xff;
        c.send_bytes(&seg).await;
        let (_, r) = c.recv().await.expect("an ERROR");
        assert!(error_of(&r).message.contains("CRC32"), "{r:?}");
        assert!(c.recv_envelope().await.is_none(), "closed after a bad CRC");

        let all = background.await.unwrap();
        assert_eq!(all.len(), 1000);
        assert!(
            all.iter().all(|r| matches!(r, Response::Result(_))),
            "the good client was affected"
        );
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// A client over `max_client_connections` gets OVERLOADED on its first request, in the CQL
/// protocol (drivers then try another contact point), not a silently closed socket; the
/// clients already connected carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_the_connection_limit_is_told_overloaded() {
    let env = Env::start(3, "max_client_connections = 1", "");
    bounded(60, async {
        let mut first = Client::connect(env.addr(), 4, Compression::None).await;
        for version in [4u8, 5] {
            let mut extra = Client::raw(env.addr()).await;
            extra
                .send_bytes(&frame(version, 7, Opcode::Options as u8, b""))
                .await;
            let env_ = extra.recv_envelope().await.expect("an ERROR before the close");
            assert_eq!(env_.header.stream, 7);
            let r = crate::client::decode(&env_).expect("decodes");
            let e = error_of(&r);
            assert_eq!(e.code, error_code::OVERLOADED, "{e:?}");
            assert!(e.message.contains("max_client_connections = 1"), "{}", e.message);
            assert!(extra.recv_envelope().await.is_none(), "closed after the error");
        }
        first.ok("SELECT release_version FROM system.local").await;
        let refused = env
            .sluice
            .metric("sluice_errors_total{cluster=\"ring\",reason=\"too_many_clients\"}");
        assert_eq!(refused, Some(2.0));
    })
    .await;
}
