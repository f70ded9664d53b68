//! Property tests: no decoder panics on any input, and encoding round-trips.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use sluice_cql::codec::{Decoder, Encoder, Envelope, Framing};
use sluice_cql::frame::{Header, Opcode};
use sluice_cql::request::{Extensions, Query, QueryParams};
use sluice_cql::segment::split_segment;
use sluice_cql::statement::parse;
use sluice_cql::wire::Value;
use sluice_cql::{murmur3, Compression, Request, Response};

fn framings() -> impl Strategy<Value = Framing> {
    prop_oneof![
        Just(Framing::Frames(Compression::None)),
        Just(Framing::Frames(Compression::Lz4)),
        Just(Framing::Frames(Compression::Snappy)),
        Just(Framing::Segments { lz4: false }),
        Just(Framing::Segments { lz4: true }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoders_never_panic(framing in framings(), data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut dec = Decoder::new(1 << 20);
        dec.set_framing(framing);
        let mut buf = BytesMut::from(&data[..]);
        for _ in 0..64 {
            match dec.decode(&mut buf) {
                Ok(Some(env)) => {
                    let (_, body) = match Extensions::split(&env.header, env.body.clone()) {
                        Ok(x) => x,
                        Err(_) => continue,
                    };
                    let _ = Request::decode(env.header.version, env.header.opcode, body.clone());
                    let _ = Response::decode(env.header.version, env.header.opcode, body);
                }
                Ok(None) => break,
                Err(e) if e.is_fatal() => break,
                Err(_) => {}
            }
        }
    }

    #[test]
    fn message_decoders_never_panic(version in 3u8..6, opcode in 0u8..0x12, body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let body = Bytes::from(body);
        let _ = Request::decode(version, opcode, body.clone());
        if let Ok(Response::Result(sluice_cql::response::ResultBody::Rows(rows))) = Response::decode(version, opcode, body) {
            let _ = rows.rows();
        }
    }

    #[test]
    fn segments_never_panic(lz4 in any::<bool>(), data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&data[..]);
        if let Ok(Some(seg)) = split_segment(&mut buf, lz4) {
            let _ = seg.data();
        }
    }

    #[test]
    fn garbage_inside_valid_segments_never_panics(lz4 in any::<bool>(), self_contained in any::<bool>(),
                                                  payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..4)) {
        let mut wire = BytesMut::new();
        for p in payloads {
            sluice_cql::segment::Segment::new(Bytes::from(p), self_contained, lz4).encode(&mut wire);
        }
        let mut dec = Decoder::new(1 << 16);
        dec.set_framing(Framing::Segments { lz4 });
        for _ in 0..64 {
            match dec.decode(&mut wire) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => break,
            }
        }
    }

    #[test]
    fn parser_never_panics(text in "\\PC{0,200}") {
        let _ = parse(&text);
    }

    #[test]
    fn parser_never_panics_on_cql_like_text(words in proptest::collection::vec(prop_oneof![
        Just("SELECT"), Just("INSERT"), Just("INTO"), Just("UPDATE"), Just("SET"), Just("WHERE"), Just("IF"),
        Just("BEGIN"), Just("BATCH"), Just("APPLY"), Just("k"), Just("="), Just("("), Just(")"), Just(","),
        Just("'x'"), Just("?"), Just("1"), Just("token"), Just("IN"), Just("FROM"), Just("VALUES"), Just(";"),
        Just("["), Just("]"), Just("{"), Just("}"), Just("NOT"), Just("EXISTS"), Just("AND"), Just("-"), Just("+"),
    ], 0..40)) {
        let _ = parse(&words.join(" "));
    }

    #[test]
    fn envelopes_round_trip(framing in framings(), bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8)) {
        let envs: Vec<Envelope> = bodies
            .into_iter()
            .enumerate()
            .map(|(i, b)| Envelope::new(Header::request(5, i as i16, Opcode::Query), Bytes::from(b)))
            .collect();
        let mut enc = Encoder::new();
        enc.set_framing(framing);
        let mut wire = BytesMut::new();
        enc.encode_all(&envs, &mut wire);
        let mut dec = Decoder::default();
        dec.set_framing(framing);
        let mut got = Vec::new();
        while let Some(e) = dec.decode(&mut wire).unwrap() {
            got.push(e);
        }
        prop_assert_eq!(got, envs);
    }

    #[test]
    fn query_round_trips(query in "\\PC{0,64}", consistency in any::<u16>(), page in proptest::option::of(any::<i32>()),
                         values in proptest::option::of(proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)), 0..5)),
                         v5 in any::<bool>()) {
        let version = if v5 { 5 } else { 4 };
        let mut params = QueryParams::new(consistency);
        params.page_size = page;
        params.values = values.map(|vs| vs.into_iter().map(|v| v.map_or(Value::Null, |b| Value::Set(Bytes::from(b)))).collect());
        params.flags = params.encoded_flags();
        let q = Request::Query(Query { query, params });
        let body = q.to_body(version);
        prop_assert_eq!(Request::decode(version, Opcode::Query as u8, body).unwrap(), q);
    }

    #[test]
    fn murmur3_is_total(key in proptest::collection::vec(any::<u8>(), 0..100)) {
        let t = murmur3::token(&key);
        prop_assert!(key.is_empty() || t != i64::MIN);
    }
}
