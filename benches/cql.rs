//! Benchmarks for the CQL pieces on the per-request hot path: v4 frame decode/encode, v5
//! segment decode/encode (uncompressed and LZ4), v4 LZ4 bodies, request routing parses, and the
//! Murmur3 token of 64-byte keys, and a token's replicas: walked on the ring per request or
//! looked up in a replica map made once.

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sluice_cql::codec::{Decoder, Encoder, Envelope, Framing};
use sluice_cql::frame::Header;
use sluice_cql::request::{Execute, Query, QueryParams};
use sluice_cql::ring::{Location, Ring, Strategy};
use sluice_cql::wire::Value;
use sluice_cql::{murmur3, Compression, Request};

/// A typical mix: 8 EXECUTEs with a partition key and a value, 2 QUERYs with a literal key.
fn requests(version: u8) -> Vec<Envelope> {
    (0..10i16)
        .map(|i| {
            let req = if i < 8 {
                let mut p = QueryParams::new(0x000a);
                p.values = Some(vec![
                    Value::Set(Bytes::from(format!("user:{i:04}"))),
                    Value::Set(Bytes::from_static(&[0, 0, 0, 42])),
                ]);
                p.page_size = Some(5000);
                Request::Execute(Execute {
                    id: Bytes::from_static(&[0x5a; 16]),
                    result_metadata_id: (version >= 5).then(|| Bytes::from_static(&[0xd4; 16])),
                    params: p,
                })
            } else {
                Request::Query(Query {
                    query: format!("SELECT k, v FROM ks.kv WHERE k = 'user:{i:04}'"),
                    params: QueryParams::new(0x000a),
                })
            };
            Envelope::new(Header::request(version, i, req.opcode()), req.to_body(version))
        })
        .collect()
}

fn wire(framing: Framing, envs: &[Envelope]) -> BytesMut {
    let mut enc = Encoder::new();
    enc.set_framing(framing);
    let mut out = BytesMut::new();
    enc.encode_all(envs, &mut out);
    out
}

fn bench_framing(c: &mut Criterion) {
    let cases = [
        ("v4_frames", 4u8, Framing::Frames(Compression::None)),
        ("v4_frames_lz4", 4, Framing::Frames(Compression::Lz4)),
        ("v5_segments", 5, Framing::Segments { lz4: false }),
        ("v5_segments_lz4", 5, Framing::Segments { lz4: true }),
    ];
    let mut group = c.benchmark_group("cql_framing");
    for (name, version, framing) in cases {
        let envs = requests(version);
        let bytes = wire(framing, &envs);
        group.throughput(Throughput::Elements(envs.len() as u64));
        group.bench_function(format!("decode_10_requests/{name}"), |b| {
            b.iter_batched(
                || bytes.clone(),
                |mut buf| {
                    let mut dec = Decoder::default();
                    dec.set_framing(framing);
                    while let Some(env) = dec.decode(&mut buf).unwrap() {
                        black_box(Request::decode(env.header.version, env.header.opcode, env.body).unwrap());
                    }
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_function(format!("encode_10_requests/{name}"), |b| {
            b.iter(|| black_box(wire(framing, black_box(&envs))))
        });
    }
    group.finish();
}

fn bench_lz4_body(c: &mut Criterion) {
    // A 4 KiB result-like body: repeated column values.
    let body: Vec<u8> = (0..4096u32)
        .map(|i| b"user:0042,42;"[(i % 13) as usize])
        .collect();
    let z = Compression::Lz4.compress(&body);
    let mut group = c.benchmark_group("cql_lz4_body_4k");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("compress", |b| {
        b.iter(|| black_box(Compression::Lz4.compress(black_box(&body))))
    });
    group.bench_function("decompress", |b| {
        b.iter(|| black_box(Compression::Lz4.decompress(black_box(&z), 1 << 20).unwrap()))
    });
    group.finish();
}

fn bench_murmur3(c: &mut Criterion) {
    let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
    let mut group = c.benchmark_group("murmur3");
    group.throughput(Throughput::Bytes(64));
    group.bench_function("token_64_byte_key", |b| {
        b.iter(|| black_box(murmur3::token(black_box(&key))))
    });
    group.finish();
}

fn bench_statement(c: &mut Criterion) {
    let q = "SELECT k, v FROM ks.kv WHERE k = 'user:0042' AND c > 10 LIMIT 100";
    let mut group = c.benchmark_group("cql_statement");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_select_with_key", |b| {
        b.iter(|| black_box(sluice_cql::statement::parse(black_box(q)).unwrap()))
    });
    group.finish();
}

/// A ring of `dcs` data centers × `nodes` nodes (three racks each), `vnodes` tokens per node
/// spread by a fixed pseudo-random sequence.
fn ring(dcs: usize, nodes: usize, vnodes: usize) -> Ring {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let spec: Vec<(Location, Vec<i64>)> = (0..dcs * nodes)
        .map(|i| {
            let loc = Location {
                datacenter: format!("dc{}", i / nodes),
                rack: format!("r{}", i % 3),
            };
            let tokens = (0..vnodes)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as i64
                })
                .collect();
            (loc, tokens)
        })
        .collect();
    Ring::new(&spec)
}

/// The replicas of one token: the ring walked per request (as before 2026-12-07) against a
/// lookup in the replica map made once per ring and schema (what requests do now).
fn bench_replicas(c: &mut Criterion) {
    let nts = Strategy::NetworkTopology {
        dcs: vec![("dc0".into(), 3), ("dc1".into(), 3)],
    };
    let simple = Strategy::Simple { rf: 3 };
    let mut group = c.benchmark_group("replicas");
    group.throughput(Throughput::Elements(1));
    for (name, ring) in [("6x16", ring(2, 3, 16)), ("60x256", ring(2, 30, 256))] {
        for (sname, strategy) in [("nts", &nts), ("simple", &simple)] {
            let map = ring.replica_map(strategy);
            let mut out = Vec::with_capacity(8);
            let mut t: i64 = 0;
            group.bench_function(format!("{sname}_{name}/walk"), |b| {
                b.iter(|| {
                    t = t.wrapping_add(0x2545_f491_4f6c_dd1d);
                    out.clear();
                    ring.replicas_into(black_box(t), strategy, &mut out);
                    black_box(out.len())
                })
            });
            group.bench_function(format!("{sname}_{name}/map"), |b| {
                b.iter(|| {
                    t = t.wrapping_add(0x2545_f491_4f6c_dd1d);
                    out.clear();
                    map.replicas_into(&ring, black_box(t), &mut out);
                    black_box(out.len())
                })
            });
        }
        group.bench_function(format!("build_nts_map_{name}"), |b| {
            b.iter(|| black_box(ring.replica_map(&nts)))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_framing, bench_lz4_body, bench_murmur3, bench_statement, bench_replicas
}
criterion_main!(benches);
