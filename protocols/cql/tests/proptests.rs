//! Property tests: no decoder panics on any input, and encoding round-trips.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use sluice_cql::codec::{Decoder, Encoder, Envelope, Framing};
use sluice_cql::frame::{Header, Opcode};
use sluice_cql::request::{Execute, ExecutePeek, Extensions, Query, QueryParams};
use sluice_cql::ring::{self, Location, Ring};
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
    fn an_execute_peek_reads_what_the_decoder_reads(version in 4u8..6, id_len in 0u8..6, flags in any::<u16>(),
                                                     lens in proptest::collection::vec(-3i32..6, 0..4), extra_count in 0u16..3,
                                                     tail in proptest::collection::vec(prop_oneof![Just(0u8), Just(1), Just(0xff), any::<u8>()], 0..24),
                                                     cut in any::<prop::sample::Index>(), cut_it in any::<bool>()) {
        // Bodies with a plausible head (an id, a consistency, random flags), values of random
        // lengths (some invalid), a random rest, sometimes cut short: whenever the peek takes
        // one, the decoder accepts it and reads the same.
        let mut body = vec![0, id_len];
        body.extend(std::iter::repeat_n(7u8, usize::from(id_len)));
        if version >= 5 {
            body.extend([0, 1, 9]); // result metadata id
        }
        body.extend([0, 1]);
        if version >= 5 {
            body.extend(u32::from(flags & 0x1ff).to_be_bytes());
        } else {
            body.push(flags as u8);
        }
        if flags & 1 != 0 {
            body.extend((lens.len() as u16 + extra_count).to_be_bytes());
            for &n in &lens {
                body.extend(n.to_be_bytes());
                body.extend(std::iter::repeat_n(5u8, n.max(0) as usize));
            }
        }
        body.extend(tail);
        if cut_it {
            body.truncate(cut.index(body.len() + 1));
        }
        if let Some(p) = ExecutePeek::read(version, &body) {
            let Ok(Request::Execute(e)) = Request::decode(version, Opcode::Execute as u8, Bytes::from(body.clone())) else {
                return Err(TestCaseError::fail("the peek took a body the decoder refuses"));
            };
            prop_assert_eq!(p.id, &e.id[..]);
            prop_assert_eq!(p.flags, e.params.flags);
            let values = e.params.values.unwrap_or_default();
            prop_assert_eq!(p.len(), values.len());
            for (i, v) in values.iter().enumerate() {
                prop_assert_eq!(p.value(i), v.as_bytes().map(|b| &b[..]));
            }
            prop_assert_eq!(p.value(values.len()), None);
        }
    }

    #[test]
    fn an_execute_peek_reads_every_encoded_execute(id in proptest::collection::vec(any::<u8>(), 0..20), consistency in any::<u16>(),
                         page in proptest::option::of(any::<i32>()), timestamp in proptest::option::of(any::<i64>()),
                         paging in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
                         values in proptest::option::of(proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)), 0..5)),
                         unset in any::<bool>(), v5 in any::<bool>()) {
        let version = if v5 { 5 } else { 4 };
        let mut params = QueryParams::new(consistency);
        params.page_size = page;
        params.timestamp = timestamp;
        params.paging_state = paging.map(Bytes::from);
        params.values = values.map(|vs| vs.into_iter().map(|v| v.map_or(if unset { Value::Unset } else { Value::Null }, |b| Value::Set(Bytes::from(b)))).collect());
        params.flags = params.encoded_flags();
        let e = Request::Execute(Execute { id: Bytes::from(id.clone()), result_metadata_id: v5.then(|| Bytes::from_static(b"m")), params: params.clone() });
        let body = e.to_body(version);
        let p = ExecutePeek::read(version, &body).expect("an encoded EXECUTE is peeked");
        prop_assert_eq!(p.id, &id[..]);
        let values = params.values.unwrap_or_default();
        prop_assert_eq!(p.len(), values.len());
        for (i, v) in values.iter().enumerate() {
            prop_assert_eq!(p.value(i), v.as_bytes().map(|b| &b[..]));
        }
    }

    #[test]
    fn murmur3_is_total(key in proptest::collection::vec(any::<u8>(), 0..100)) {
        let t = murmur3::token(&key);
        prop_assert!(key.is_empty() || t != i64::MIN);
    }
}

/// NetworkTopologyStrategy as the ring code computed it before replica maps: sets of every
/// data center's nodes and racks built per request (the reference the faster walk and the
/// precomputed map must agree with).
fn nts_reference(ring_spec: &[(Location, Vec<i64>)], token: i64, dcs: &[(String, usize)]) -> Vec<usize> {
    use std::collections::{HashMap, HashSet};
    let mut entries: Vec<(i64, usize)> = {
        let mut by_token: HashMap<i64, usize> = HashMap::new();
        for (i, (_, tokens)) in ring_spec.iter().enumerate() {
            for t in tokens {
                by_token.insert(*t, i);
            }
        }
        by_token.into_iter().collect()
    };
    entries.sort_unstable();
    if entries.is_empty() {
        return Vec::new();
    }
    let mut nodes_in_dc: HashMap<&str, HashSet<usize>> = HashMap::new();
    let mut racks_in_dc: HashMap<&str, HashSet<&str>> = HashMap::new();
    for &(_, n) in &entries {
        let loc = &ring_spec[n].0;
        nodes_in_dc.entry(&loc.datacenter).or_default().insert(n);
        racks_in_dc.entry(&loc.datacenter).or_default().insert(&loc.rack);
    }
    let mut state: HashMap<&str, (usize, isize)> = HashMap::new();
    for (dc, rf) in dcs {
        let nodes = nodes_in_dc.get(dc.as_str()).map_or(0, HashSet::len);
        if *rf == 0 || nodes == 0 {
            continue;
        }
        let racks = racks_in_dc.get(dc.as_str()).map_or(0, HashSet::len);
        state.insert(dc.as_str(), ((*rf).min(nodes), *rf as isize - racks as isize));
    }
    let start = match entries.partition_point(|(t, _)| *t < token) {
        i if i == entries.len() => 0,
        i => i,
    };
    let mut to_fill = state.len();
    let mut out = Vec::new();
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    for k in 0..entries.len() {
        if to_fill == 0 {
            break;
        }
        let n = entries[(start + k) % entries.len()].1;
        let loc = &ring_spec[n].0;
        let Some(dc) = state.get_mut(loc.datacenter.as_str()) else {
            continue;
        };
        if dc.0 == 0 || out.contains(&n) {
            continue;
        }
        if seen.insert((&loc.datacenter, &loc.rack)) {
        } else if dc.1 > 0 {
            dc.1 -= 1;
        } else {
            continue;
        }
        dc.0 -= 1;
        out.push(n);
        if dc.0 == 0 {
            to_fill -= 1;
        }
    }
    out
}

fn ring_specs() -> impl proptest::strategy::Strategy<Value = Vec<(Location, Vec<i64>)>> {
    proptest::collection::vec(
        (
            0..3usize,
            0..3usize,
            proptest::collection::vec(-1000i64..1000, 0..6),
        ),
        0..9,
    )
    .prop_map(|nodes| {
        nodes
            .into_iter()
            .map(|(dc, rack, tokens)| {
                (
                    Location {
                        datacenter: format!("dc{dc}"),
                        rack: format!("r{rack}"),
                    },
                    tokens,
                )
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Replica placement agrees with the reference for any ring, replication and token, and
    /// a replica map made once answers as the walk does.
    #[test]
    fn replica_maps_agree_with_the_walk(
        spec in ring_specs(),
        rfs in proptest::collection::vec((0..4usize, 0..5usize), 0..4),
        simple_rf in 0..5usize,
        tokens in proptest::collection::vec(-1100i64..1100, 1..16),
    ) {
        let ring = Ring::new(&spec);
        let dcs: Vec<(String, usize)> = rfs.iter().map(|(dc, rf)| (format!("dc{dc}"), *rf)).collect();
        let strategies = [
            ring::Strategy::NetworkTopology { dcs: dcs.clone() },
            ring::Strategy::Simple { rf: simple_rf },
            ring::Strategy::Everywhere,
            ring::Strategy::Local,
        ];
        for strategy in &strategies {
            let map = ring.replica_map(strategy);
            for &t in &tokens {
                let walked = ring.replicas(t, strategy);
                if let ring::Strategy::NetworkTopology { dcs } = strategy {
                    prop_assert_eq!(&walked, &nts_reference(&spec, t, dcs));
                }
                let mut looked_up = vec![usize::MAX];
                map.replicas_into(&ring, t, &mut looked_up);
                prop_assert_eq!(&looked_up[1..], &walked[..], "{:?} token {}", strategy, t);
            }
        }
    }
}
