//! The CQL connection decoder (v4 frames with lz4/snappy bodies, v5 segments with CRCs and lz4)
//! and the messages inside, on any bytes delivered in any chunking.
//!
//! Input: byte 0 picks the framing (bits 0-1 frame compression: none, lz4, snappy; bit 2
//! start in v5 segments; bit 3 lz4 segments; bit 4 switch to segments after STARTUP/READY as a
//! v5 handshake does), byte 1 the chunk size (0: all at once), the rest is the stream.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use sluice_cql::request::{ExecutePeek, Extensions};
use sluice_cql::{Compression, Decoder, Framing, Opcode, Request, Response};

/// A body cap small enough to be hit (sluice's default is far larger).
const MAX_BODY: usize = 256 * 1024;

fuzz_target!(|data: &[u8]| {
    let [mode, chunk, stream @ ..] = data else {
        return;
    };
    let compression = match mode & 3 {
        1 => Compression::Lz4,
        2 => Compression::Snappy,
        _ => Compression::None,
    };
    let segments_lz4 = mode & 8 != 0;
    let handshake_switch = mode & 16 != 0;
    let mut dec = Decoder::new(MAX_BODY);
    dec.set_framing(if mode & 4 != 0 {
        Framing::Segments { lz4: segments_lz4 }
    } else {
        Framing::Frames(compression)
    });
    let chunk = if *chunk == 0 {
        stream.len().max(1)
    } else {
        usize::from(*chunk)
    };
    let mut buf = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(env)) => {
                    assert!(env.body.len() <= MAX_BODY, "body over the cap");
                    let h = env.header;
                    message(h, env.body.clone());
                    let op = h.opcode;
                    if handshake_switch && (op == Opcode::Startup as u8 || op == Opcode::Ready as u8) {
                        dec.set_framing(Framing::after_startup(
                            5,
                            if segments_lz4 {
                                Compression::Lz4
                            } else {
                                Compression::None
                            },
                        ));
                    }
                }
                Ok(None) => break,
                Err(e) if e.is_fatal() => {
                    // A lost stream stays lost.
                    assert!(dec.decode(&mut buf).is_err());
                    return;
                }
                Err(_) => continue,
            }
        }
    }
});

/// Decodes one message: a response re-encodes stably as `request` says of requests, and an
/// EXECUTE is also checked by `peek_agrees`.
fn message(h: sluice_cql::Header, body: Bytes) {
    if h.version < 3 {
        return;
    }
    let Ok((_ext, msg)) = Extensions::split(&h, body) else {
        return;
    };
    let (v, op) = (h.version, h.opcode);
    if h.response {
        if let Ok(r) = Response::decode(v, op, msg) {
            let once = encode(|out| r.encode(v, out));
            let again = Response::decode(v, op, once.clone()).expect("re-encoded response decodes");
            assert_eq!(
                encode(|out| again.encode(v, out)),
                once,
                "response re-encoding is stable"
            );
        }
    } else {
        if op == Opcode::Execute as u8 {
            peek_agrees(v, &msg);
        }
        request(v, op, msg);
    }
}

/// An EXECUTE the routing peek takes is one the decoder accepts, with the same id, flags and
/// values (sluice routes it from the peek and relays the client's bytes).
fn peek_agrees(v: u8, body: &Bytes) {
    let Some(p) = ExecutePeek::read(v, body) else {
        return;
    };
    let Ok(Request::Execute(e)) = Request::decode(v, Opcode::Execute as u8, body.clone()) else {
        panic!("the peek took an EXECUTE the decoder refuses");
    };
    assert_eq!(p.id, &e.id[..]);
    assert_eq!(p.flags, e.params.flags);
    let values = e.params.values.unwrap_or_default();
    assert_eq!(p.len(), values.len());
    for (i, value) in values.iter().enumerate() {
        assert_eq!(p.value(i), value.as_bytes().map(|b| &b[..]));
    }
}

/// A decoded message re-encodes to bytes that decode and re-encode to the same bytes again
/// (the first encoding may normalise what the peer sent, e.g. drop flags that carry nothing).
fn request(v: u8, op: u8, msg: Bytes) {
    if let Ok(r) = Request::decode(v, op, msg) {
        let once = encode(|out| r.encode(v, out));
        let again = Request::decode(v, op, once.clone()).expect("re-encoded request decodes");
        assert_eq!(
            encode(|out| again.encode(v, out)),
            once,
            "request re-encoding is stable"
        );
    }
}

fn encode(f: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::new();
    f(&mut out);
    out.freeze()
}
