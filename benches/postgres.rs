//! Benchmarks for the PostgreSQL codec pieces on the per-message hot path: framing and statement
//! classification. (`ScramSecret::new` is slow by design and not benchmarked.)

use std::hint::black_box;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sluice_postgres::{split_message, Classifier};

fn message(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.put_u8(tag);
    buf.put_i32(4 + body.len() as i32);
    buf.put_slice(body);
}

/// One extended-protocol round trip and one simple query, as a client sends them, followed by
/// the backend's typical reply (row description, data rows, completion, ready).
fn typical_stream() -> (BytesMut, u64) {
    let mut b = BytesMut::new();
    let mut n = 0;
    let mut m = |buf: &mut BytesMut, tag: u8, body: &[u8]| {
        message(buf, tag, body);
        n += 1;
    };
    m(
        &mut b,
        b'P',
        b"s1\0SELECT id, name, email FROM users WHERE id = $1\0\x00\x01\x00\x00\x00\x17",
    );
    m(
        &mut b,
        b'B',
        b"\0s1\0\x00\x00\x00\x01\x00\x00\x00\x0412345\x00\x00",
    );
    m(&mut b, b'D', b"P\0");
    m(&mut b, b'E', b"\0\x00\x00\x00\x00");
    m(&mut b, b'S', b"");
    m(
        &mut b,
        b'Q',
        b"SELECT count(*) FROM orders WHERE created_at > now() - interval '1 day'\0",
    );
    m(
        &mut b,
        b'T',
        &[
            0x00, 0x01, b'c', b'o', b'u', b'n', b't', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x14, 0, 8, 0xff,
            0xff, 0xff, 0xff, 0, 0,
        ],
    );
    for _ in 0..10 {
        m(
            &mut b,
            b'D',
            b"\x00\x03\x00\x00\x00\x0512345\x00\x00\x00\x05alice\x00\x00\x00\x11alice@example.com",
        );
    }
    m(&mut b, b'C', b"SELECT 10\0");
    m(&mut b, b'Z', b"I");
    (b, n)
}

fn bench_split_message(c: &mut Criterion) {
    let (stream, count) = typical_stream();
    let mut group = c.benchmark_group("split_message");
    group.throughput(Throughput::Elements(count));
    group.bench_function("typical_stream", |b| {
        b.iter_batched(
            || stream.clone(),
            |mut buf| {
                while let Some(m) = split_message(&mut buf, 1 << 30).unwrap() {
                    black_box(m);
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// A realistic mix: ORM reads, writes, transaction control, a hinted query, a CTE.
const MIX: &[&str] = &[
    "SELECT u.id, u.name, u.email FROM users u WHERE u.id = $1 AND u.deleted_at IS NULL LIMIT 1",
    "INSERT INTO events (user_id, kind, payload) VALUES ($1, $2, $3) RETURNING id",
    "UPDATE accounts SET balance = balance - $1 WHERE id = $2",
    "BEGIN",
    "COMMIT",
    "SELECT o.id, o.total FROM orders o JOIN users u ON u.id = o.user_id WHERE u.email = 'a@b.c' ORDER BY o.created_at DESC",
    "/* sluice: replica */ SELECT count(*) FROM page_views WHERE day = current_date",
    "WITH recent AS (SELECT * FROM orders WHERE created_at > now() - interval '1 hour') SELECT count(*) FROM recent",
    "SELECT * FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 10 FOR UPDATE SKIP LOCKED",
    "SELECT nextval('orders_id_seq')",
];

fn bench_classify(c: &mut Criterion) {
    let classifier = Classifier::default();
    let mut group = c.benchmark_group("classify");
    group.throughput(Throughput::Elements(MIX.len() as u64));
    group.bench_function("mix_of_10_statements", |b| {
        b.iter(|| {
            for sql in MIX {
                black_box(classifier.classify(black_box(sql.as_bytes())));
            }
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("select_by_id_90_bytes", |b| {
        b.iter(|| black_box(classifier.classify(black_box(MIX[0].as_bytes()))))
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_split_message, bench_classify
}
criterion_main!(benches);
