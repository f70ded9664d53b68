//! The PostgreSQL bytes a client controls: startup-phase packets, tagged message framing, the
//! peeks sluice routes on (with their re-encoders), and the SCRAM exchange.
//!
//! The input is read the way a login reads a connection: startup packets until a
//! StartupMessage, then tagged messages; the first two 'p' messages go through SCRAM. The
//! whole input is also framed as tagged messages from its first byte.

#![no_main]

use std::sync::OnceLock;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sluice_postgres::scram::{ScramSecret, ScramServer};
use sluice_postgres::startup::StartupPacket;
use sluice_postgres::{peek, server, split_message, split_startup};

/// A split_message cap small enough to be hit by fuzz inputs (sluice uses 16 KiB during
/// authentication and 64 MiB after).
const MAX_LEN: usize = 16 * 1024;

fn secret() -> ScramSecret {
    static SECRET: OnceLock<ScramSecret> = OnceLock::new();
    SECRET
        .get_or_init(|| ScramSecret::new("app-secret", b"0123456789abcdef", 2))
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // Startup phase: negotiation packets, then the StartupMessage.
    loop {
        let before = buf.len();
        match split_startup(&mut buf) {
            Ok(Some(packet)) => {
                assert_eq!(before - buf.len(), packet.len());
                match StartupPacket::parse(&packet) {
                    Ok(p @ StartupPacket::Startup { .. }) => {
                        assert!(p.param("user").is_some(), "a startup packet always has a user");
                        let _ = p.param("database");
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => return,
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    messages(buf, data.len());
    messages(BytesMut::from(data), data.len());
});

/// Frames tagged messages and peeks into each one, as a session does.
fn messages(mut buf: BytesMut, input_len: usize) {
    let mut scram = ScramServer::new(secret());
    let mut auth_step = 0;
    loop {
        let before = buf.len();
        let msg = match split_message(&mut buf, MAX_LEN) {
            Ok(Some(m)) => m,
            Ok(None) => {
                // An incomplete message never makes the buffer hold what its length claims.
                let bound = 2 * input_len.max(before) + 2 * 64 * 1024;
                assert!(
                    buf.capacity() <= bound,
                    "over-reserved: {} > {bound}",
                    buf.capacity()
                );
                return;
            }
            Err(_) => return,
        };
        let body = msg.body();
        assert_eq!(msg.raw().len(), body.len() + 5);
        assert!(msg.raw().len() - 1 <= MAX_LEN);
        match msg.tag() {
            b'Q' => {
                let _ = peek::query(body);
            }
            b'P' => {
                if let Ok(p) = peek::parse(body) {
                    let mut again = BytesMut::new();
                    peek::encode_parse(&mut again, p.name, p.query, p.rest);
                    assert_eq!(&again[..], &msg.raw()[..], "Parse re-encodes to itself");
                }
            }
            b'B' => {
                if let Ok(b) = peek::bind(body) {
                    let mut again = BytesMut::new();
                    peek::encode_bind(&mut again, b.portal, b.statement, b.rest);
                    assert_eq!(&again[..], &msg.raw()[..], "Bind re-encodes to itself");
                }
            }
            tag @ (b'D' | b'C') => {
                if let Ok(t) = peek::target(body) {
                    let mut again = BytesMut::new();
                    peek::encode_target(&mut again, tag, t.kind, t.name);
                    assert_eq!(&again[..], &msg.raw()[..], "Describe/Close re-encodes to itself");
                }
            }
            b'Z' => {
                let _ = peek::ready_status(body);
            }
            b'E' | b'N' => {
                let _ = peek::error_code_and_message(body);
            }
            b'p' if auth_step == 0 => {
                auth_step = 1;
                if let Ok((_mechanism, data)) = server::decode_sasl_initial_response(body) {
                    let _ = scram.client_first(&data, "fuzzservernonce0123456789");
                }
            }
            b'p' if auth_step == 1 => {
                auth_step = 2;
                let _ = scram.client_final(body);
            }
            _ => {}
        }
    }
}
