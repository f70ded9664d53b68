//! Agreement with the recordings of a real Cassandra 4.0 cluster in `../shared/fixtures/cql`:
//! Murmur3 tokens and literal serialization (tokens.csv), ring ownership and replica lists
//! (ring.json), and the v4/v5 byte streams of real driver sessions, which must decode and
//! re-encode to the same bytes at every layer (segments, frames, messages).

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use serde_json::Value as Json;
use sluice_cql::codec::{Decoder, Framing};
use sluice_cql::frame::{split_frame, Opcode};
use sluice_cql::murmur3::{composite_key, token};
use sluice_cql::request::Extensions;
use sluice_cql::ring::{Location, Ring, Strategy};
use sluice_cql::segment::split_segment;
use sluice_cql::statement::{tokenize, Tok};
use sluice_cql::types::ColumnType;
use sluice_cql::value::{serialize, Literal};
use sluice_cql::{Compression, Request, Response};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/cql")
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// RFC 4180 rows (quoted fields with doubled quotes, LF line ends).
fn csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

/// The constants of a literal list, e.g. `('a', -1)` or a single `'a'`.
fn literals(text: &str) -> Vec<Literal> {
    tokenize(text)
        .expect("literal lexes")
        .into_iter()
        .filter_map(|t| match t {
            Tok::Lit(l) => Some(l),
            _ => None,
        })
        .collect()
}

#[test]
fn tokens_csv_matches_cassandra() {
    let text = std::fs::read_to_string(fixtures().join("tokens.csv")).expect("tokens.csv");
    let rows = csv(&text);
    assert_eq!(
        rows[0],
        ["cql_type", "value_as_cql_literal", "serialized_key_hex", "token"]
    );
    let mut serialized_checked = 0;
    for row in &rows[1..] {
        let (typ, literal, key_hex, want) = (&row[0], &row[1], &row[2], &row[3]);
        let key = unhex(key_hex);
        let want: i64 = want.parse().expect("token");
        assert_eq!(token(&key), want, "{typ} {literal}");

        // Serializing the literal the way sluice does for QUERY routing gives Cassandra's bytes.
        let lits = literals(literal);
        let types: Vec<ColumnType> = typ
            .trim_matches(|c| c == '(' || c == ')')
            .split(',')
            .map(|t| ColumnType::parse(t).expect("type"))
            .collect();
        assert_eq!(lits.len(), types.len(), "{literal}");
        let parts: Vec<Vec<u8>> = lits
            .iter()
            .zip(&types)
            .map(|(l, t)| serialize(l, t).unwrap_or_else(|| panic!("cannot serialize {l:?} as {t:?}")))
            .collect();
        assert_eq!(hex(&composite_key(&parts)), *key_hex, "{typ} {literal}");
        serialized_checked += 1;
    }
    assert_eq!(rows.len() - 1, 394);
    assert_eq!(serialized_checked, 394);
}

#[test]
fn ring_json_replicas_match_cassandra() {
    let text = std::fs::read_to_string(fixtures().join("ring.json")).expect("ring.json");
    let ring: Json = serde_json::from_str(&text).expect("json");
    let nodes = ring["nodes"].as_array().expect("nodes");
    let addresses: Vec<&str> = nodes.iter().map(|n| n["address"].as_str().unwrap()).collect();
    let spec: Vec<(Location, Vec<i64>)> = nodes
        .iter()
        .map(|n| {
            (
                Location {
                    datacenter: n["data_center"].as_str().unwrap().into(),
                    rack: n["rack"].as_str().unwrap().into(),
                },
                n["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_i64().unwrap())
                    .collect(),
            )
        })
        .collect();
    let r = Ring::new(&spec);
    // The recorded ring order agrees with ownership.
    for e in ring["ring"].as_array().unwrap() {
        let owner = r.owner(e["token"].as_i64().unwrap()).unwrap();
        assert_eq!(addresses[owner], e["address"].as_str().unwrap());
    }
    let mut checked = 0;
    for ks in ring["keyspaces"].as_array().unwrap() {
        let repl: Vec<(String, String)> = ks["replication"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let strategy = Strategy::from_replication(repl.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_ne!(strategy, Strategy::Local);
        let map = r.replica_map(&strategy);
        for key in ks["keys"].as_array().unwrap() {
            let t = token(&unhex(key["key_hex"].as_str().unwrap()));
            assert_eq!(t, key["token"].as_i64().unwrap());
            let got: Vec<&str> = r
                .replicas(t, &strategy)
                .into_iter()
                .map(|i| addresses[i])
                .collect();
            let want: Vec<&str> = key["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            assert_eq!(got, want, "{} {}", ks["name"], key["key"]);
            let mut looked_up = Vec::new();
            map.replicas_into(&r, t, &mut looked_up);
            let looked_up: Vec<&str> = looked_up.into_iter().map(|i| addresses[i]).collect();
            assert_eq!(looked_up, want, "replica map: {} {}", ks["name"], key["key"]);
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * 104);
}

fn jsonl(name: &str) -> Vec<Json> {
    let text = std::fs::read_to_string(fixtures().join("captures").join(name)).expect(name);
    text.lines()
        .map(|l| serde_json::from_str(l).expect("jsonl"))
        .collect()
}

/// Decodes a message body (after its extensions) and checks that it re-encodes identically.
/// Returns false when the message does not decode (only the recorded server quirk may).
fn message_round_trips(version: u8, flags: u8, stream: i16, opcode: u8, response: bool, body: &[u8]) -> bool {
    let header = sluice_cql::Header {
        version,
        response,
        flags,
        stream,
        opcode,
        length: body.len() as u32,
    };
    let (ext, msg) = Extensions::split(&header, Bytes::copy_from_slice(body)).expect("extensions");
    let mut out = BytesMut::new();
    ext.encode(&mut out);
    assert_eq!(ext.flags() & flags, ext.flags());
    if response {
        let Ok(r) = Response::decode(version, opcode, msg) else {
            return false;
        };
        r.encode(version, &mut out);
    } else {
        let r = Request::decode(version, opcode, msg).expect("every recorded request decodes");
        r.encode(version, &mut out);
    }
    assert_eq!(hex(&out), hex(body), "opcode {opcode:#x} stream {stream}");
    true
}

/// Checks one legacy frame record; returns whether its message decoded.
fn check_frame(rec: &Json, compression: Compression) -> bool {
    let wire = unhex(rec["hex"].as_str().unwrap());
    let mut buf = BytesMut::from(&wire[..]);
    let frame = split_frame(&mut buf, 1 << 28).unwrap().expect("a whole frame");
    assert!(buf.is_empty());
    let h = frame.header;
    assert_eq!(i64::from(h.version), rec["version"].as_i64().unwrap());
    assert_eq!(h.response, rec["is_response"].as_bool().unwrap());
    assert_eq!(i64::from(h.flags), rec["flags"].as_i64().unwrap());
    assert_eq!(i64::from(h.stream), rec["stream"].as_i64().unwrap());
    assert_eq!(i64::from(h.opcode), rec["opcode"].as_i64().unwrap());
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    assert_eq!(&out[..], &wire[..]);
    let body = if h.flags & 0x01 != 0 {
        let plain = compression
            .decompress(&frame.body, 1 << 28)
            .expect("decompresses");
        assert_eq!(hex(&plain), rec["body_decompressed_hex"].as_str().unwrap());
        // Our own compression of the same body comes back identical.
        let again = compression
            .decompress(&compression.compress(&plain), 1 << 28)
            .unwrap();
        assert_eq!(again, plain);
        plain
    } else {
        frame.body.to_vec()
    };
    if h.version < 3 {
        return true;
    }
    message_round_trips(h.version, h.flags, h.stream, h.opcode, h.response, &body)
}

/// Per (connection, direction): what was seen, in order.
type PerStream<T> = BTreeMap<(i64, String), Vec<T>>;

fn streams(chunks: &[Json]) -> PerStream<u8> {
    let mut out: PerStream<u8> = BTreeMap::new();
    for c in chunks {
        let key = (
            c["conn"].as_i64().unwrap(),
            c["dir"].as_str().unwrap().to_string(),
        );
        out.entry(key)
            .or_default()
            .extend(unhex(c["hex"].as_str().unwrap()));
    }
    out
}

/// Runs each recorded TCP stream through the connection decoder, switching framing where the
/// real peers did, and returns the opcodes of the envelopes per stream.
fn decode_streams(name: &str, version: u8, compression: Compression) -> PerStream<(i16, u8)> {
    let mut out = BTreeMap::new();
    for ((conn, dir), bytes) in streams(&jsonl(&format!("{name}.chunks.jsonl"))) {
        let mut dec = Decoder::default();
        // v4: the compression flag says which frames are compressed (READY already is).
        dec.set_framing(Framing::Frames(if version < 5 {
            compression
        } else {
            Compression::None
        }));
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in bytes.chunks(16_384) {
            buf.extend_from_slice(chunk);
            while let Some(env) = dec.decode(&mut buf).expect("stream decodes") {
                let op = env.header.opcode;
                got.push((env.header.stream, op));
                // v5: segments start after STARTUP (client) and READY (server).
                let handshake_done = (dir == "c2s" && op == Opcode::Startup as u8)
                    || (dir == "s2c" && op == Opcode::Ready as u8);
                if version >= 5 && handshake_done {
                    dec.set_framing(Framing::after_startup(version, compression));
                }
            }
        }
        assert!(
            buf.is_empty(),
            "{name} conn {conn} {dir}: {} bytes left over",
            buf.len()
        );
        out.insert((conn, dir), got);
    }
    out
}

fn expected_streams(records: &[Json]) -> PerStream<(i16, u8)> {
    let mut out: PerStream<(i64, i16, u8)> = BTreeMap::new();
    for r in records {
        let key = (
            r["conn"].as_i64().unwrap(),
            r["dir"].as_str().unwrap().to_string(),
        );
        let seq = r["seq"].as_i64().unwrap();
        out.entry(key).or_default().push((
            seq,
            r["stream"].as_i64().unwrap() as i16,
            r["opcode"].as_i64().unwrap() as u8,
        ));
    }
    out.into_iter()
        .map(|(k, mut v)| {
            v.sort();
            (k, v.into_iter().map(|(_, s, o)| (s, o)).collect())
        })
        .collect()
}

fn check_v4(name: &str, compression: Compression) {
    let frames = jsonl(&format!("{name}.frames.jsonl"));
    let mut undecoded = Vec::new();
    for rec in &frames {
        if !check_frame(rec, compression) {
            undecoded.push(rec["step"].as_str().unwrap().to_string());
        }
    }
    // Only the server's wrongly sized [string] (4-byte UTF-8 in a column name) may not decode.
    assert!(
        undecoded.iter().all(|s| s == "quirk_supplementary_char"),
        "{undecoded:?}"
    );
    let decoded = decode_streams(name, 4, compression);
    assert_eq!(decoded, expected_streams(&frames));
}

#[test]
fn capture_v4_round_trips() {
    check_v4("capture_v4", Compression::None);
}

#[test]
fn capture_v4_lz4_round_trips() {
    check_v4("capture_v4_lz4", Compression::Lz4);
}

#[test]
fn version_probe_frames_round_trip() {
    let frames = jsonl("capture_version_probe.frames.jsonl");
    for rec in &frames {
        check_frame(rec, Compression::None);
    }
    assert_eq!(frames.len(), 18);
}

fn check_v5(name: &str, lz4: bool) {
    let segments = jsonl(&format!("{name}.segments.jsonl"));
    let mut segment_count = 0;
    for rec in &segments {
        if rec["kind"] == "frame" {
            check_frame(rec, Compression::None);
            continue;
        }
        let wire = unhex(rec["hex"].as_str().unwrap());
        let mut buf = BytesMut::from(&wire[..]);
        let seg = split_segment(&mut buf, lz4)
            .expect("CRCs verify")
            .expect("a whole segment");
        assert!(buf.is_empty());
        assert_eq!(seg.self_contained, rec["self_contained"].as_bool().unwrap());
        assert_eq!(seg.payload.len() as i64, rec["payload_length"].as_i64().unwrap());
        seg.data().expect("payload decompresses");
        let mut out = BytesMut::new();
        seg.encode(&mut out);
        assert_eq!(&out[..], &wire[..]);
        segment_count += 1;
    }
    assert!(segment_count > 200, "{segment_count}");

    let envelopes = jsonl(&format!("{name}.envelopes.jsonl"));
    let mut undecoded = Vec::new();
    for rec in &envelopes {
        if !check_frame(rec, Compression::None) {
            undecoded.push(rec["step"].as_str().unwrap().to_string());
        }
    }
    assert!(
        undecoded.iter().all(|s| s == "quirk_supplementary_char"),
        "{undecoded:?}"
    );
    let decoded = decode_streams(name, 5, if lz4 { Compression::Lz4 } else { Compression::None });
    assert_eq!(decoded, expected_streams(&envelopes));
}

#[test]
fn capture_v5_round_trips() {
    check_v5("capture_v5", false);
}

#[test]
fn capture_v5_lz4_round_trips() {
    check_v5("capture_v5_lz4", true);
}

#[test]
fn recorded_prepared_results_carry_the_partition_key_indexes() {
    // INSERT INTO events (payload, ts, bucket, tenant, note): pk (tenant, bucket) = [3, 2];
    // INSERT INTO triple (val, seq, name, shard, id): pk (id, shard, name) = [4, 3, 2].
    let mut found = Vec::new();
    for rec in jsonl("capture_v4.frames.jsonl") {
        if rec["opcode"] != 8 || rec["dir"] != "s2c" {
            continue;
        }
        let body = unhex(rec["hex"].as_str().unwrap());
        let Ok(Response::Result(sluice_cql::response::ResultBody::Prepared(p))) =
            Response::decode(4, 8, Bytes::copy_from_slice(&body[9..]))
        else {
            continue;
        };
        found.push((p.metadata.columns.len(), p.metadata.pk_indexes.clone()));
    }
    assert!(found.contains(&(5, vec![3, 2])), "{found:?}");
    assert!(found.contains(&(5, vec![4, 3, 2])), "{found:?}");
}
