//! One full routing decision, as a session makes it per request, on a primary + 2 replicas
//! topology: peek at the client's message, classify (or look up the prepared statement's
//! class), derive the intent, load the topology snapshot and the nodes' load, choose a node.
//! `cargo bench --bench routing`. The router and the topology snapshot are pure (no I/O), so
//! the bench calls them exactly as a session does.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_postgres::{peek, split_message, Classification, Classifier, Message};

use sluice::common::topology::{Member, Node, Role, Snapshot};
use sluice::config::Consistency;
use sluice::postgres::router::{self, Intent, Policy};

/// A framed client message, as the session's framing hands it over.
fn message(tag: u8, body: &[u8]) -> Message {
    let mut b = BytesMut::new();
    b.put_u8(tag);
    b.put_i32(4 + body.len() as i32);
    b.put_slice(body);
    split_message(&mut b, 1 << 20).expect("framed").expect("whole")
}

/// What a session holds for one decision.
struct Env {
    classifier: Classifier,
    statements: HashMap<Bytes, Classification>,
    topology: ArcSwap<Snapshot>,
    tiebreak: AtomicUsize,
}

impl Env {
    fn new() -> Env {
        let node = |addr: &str, role: Role| Node {
            role,
            health: sluice::common::health::Health::assumed(true),
            primary_epoch: u64::from(role == Role::Primary),
            ..Node::new(Member::at(addr))
        };
        let snap = Snapshot {
            generation: 1,
            nodes: vec![
                node("10.0.0.1:5432", Role::Primary),
                node("10.0.0.2:5432", Role::Replica),
                node("10.0.0.3:5432", Role::Replica),
            ],
        };
        let classifier = Classifier::new(Vec::<String>::new());
        let mut statements = HashMap::new();
        statements.insert(
            Bytes::from_static(b"get_user"),
            classifier.classify(b"SELECT id, name, email FROM users WHERE id = $1"),
        );
        Env {
            classifier,
            statements,
            topology: ArcSwap::from_pointee(snap),
            tiebreak: AtomicUsize::new(0),
        }
    }

    /// The decision for one client message.
    fn route(&self, m: &Message) -> usize {
        let class = match m.tag() {
            b'Q' => self.classifier.classify(peek::query(m.body()).expect("query")),
            b'B' => {
                let b = peek::bind(m.body()).expect("bind");
                self.statements
                    .get(b.statement)
                    .copied()
                    .unwrap_or(Classification::WRITE)
            }
            _ => Classification::WRITE,
        };
        let intent = Intent::of(class, Consistency::Eventual);
        let snap = self.topology.load();
        let mut loads = [0u32; 16];
        for (l, n) in loads.iter_mut().zip(&snap.nodes) {
            *l = n.load.load(Ordering::Relaxed);
        }
        let tiebreak = self.tiebreak.fetch_add(1, Ordering::Relaxed);
        router::choose(
            intent,
            &snap,
            &loads[..snap.nodes.len()],
            tiebreak,
            &Policy::default(),
        )
        .expect("a node")
    }
}

fn bench_route(c: &mut Criterion) {
    let env = Env::new();
    // Bind of the prepared statement "get_user" to the unnamed portal, one text parameter.
    let execute = message(b'B', b"\0get_user\0\x00\x00\x00\x01\x00\x00\x00\x0512345\x00\x00");
    let select = message(b'Q', b"SELECT id, name, email FROM users WHERE id = 12345\0");
    let insert = message(
        b'Q',
        b"INSERT INTO orders (user_id, total, created_at) VALUES (12345, 99.50, now())\0",
    );
    let replica = |i: usize| i == 1 || i == 2;
    assert!(replica(env.route(&execute)));
    assert!(replica(env.route(&select)));
    assert_eq!(env.route(&insert), 0);
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    group.bench_function("prepared_execute_to_replica", |b| {
        b.iter(|| env.route(black_box(&execute)))
    });
    group.bench_function("select_to_replica", |b| b.iter(|| env.route(black_box(&select))));
    group.bench_function("insert_to_primary", |b| b.iter(|| env.route(black_box(&insert))));
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_route
}
criterion_main!(benches);
