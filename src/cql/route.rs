//! Routing, as pure functions of the request, the client's keyspace and the cluster snapshot:
//! the token of the partition a request addresses (EXECUTE bound values, literal or bound
//! partition-key equality in simple statements, single-partition batches), then the nodes to
//! try in order.

use std::net::SocketAddr;
use std::sync::Arc;

use sluice_cql::murmur3::{composite_key, token};
use sluice_cql::request::{Batch, BatchTarget, ExecutePeek, QueryParams};
use sluice_cql::statement::{Bind, Statement, Term};
use sluice_cql::value::serialize;
use sluice_cql::wire::Value;

use super::prepared::{Cache, PreparedInfo};
use super::snapshot::Snapshot;

/// Where a request should go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    /// Keyspace and token of the one partition the request addresses (the keyspace shared
    /// with the prepared statement's entry: no copy per request).
    pub partition: Option<(Arc<str>, i64)>,
    /// A lightweight transaction: goes to the first replica in ring order.
    pub lwt: bool,
    /// Only reads: safe to send again to another node if a connection is lost.
    pub read: bool,
}

fn bound<'a>(values: &'a [Value], names: Option<&[String]>, b: &Bind) -> Option<&'a [u8]> {
    let i = match (b, names) {
        (Bind::Named(n, _), Some(names)) => names.iter().position(|x| x.eq_ignore_ascii_case(n))?,
        (Bind::Named(_, i), None) | (Bind::Positional(i), _) => *i,
    };
    values.get(i)?.as_bytes().map(|b| &b[..])
}

/// The keyspace and token of a simple statement's partition, if its key is fully bound.
pub fn statement_partition(
    snap: &Snapshot,
    default_keyspace: Option<&str>,
    stmt: &Statement,
    values: &[Value],
    names: Option<&[String]>,
) -> Option<(Arc<str>, i64)> {
    let table = stmt.table()?;
    let keyspace = table.keyspace.as_deref().or(default_keyspace)?;
    let pk = snap.tables.get(&(keyspace.to_string(), table.table.clone()))?;
    let pk_names: Vec<String> = pk.iter().map(|(n, _)| n.clone()).collect();
    let terms = stmt.partition_key_terms(&pk_names)?;
    let mut parts: Vec<Vec<u8>> = Vec::with_capacity(terms.len());
    for (term, (_, typ)) in terms.iter().zip(pk) {
        let bytes = match term {
            Term::Literal(l) => serialize(l, typ)?,
            Term::Bind(b) => bound(values, names, b)?.to_vec(),
            _ => return None,
        };
        parts.push(bytes);
    }
    let key = composite_key(&parts);
    // Cassandra refuses empty single-column keys; do not pretend to route them.
    if key.is_empty() {
        return None;
    }
    Some((Arc::from(keyspace), token(&key)))
}

/// Route of a QUERY (`stmt` is `None` when the text does not parse).
pub fn for_query(
    snap: &Snapshot,
    keyspace: Option<&str>,
    stmt: Option<&Statement>,
    params: &QueryParams,
) -> Route {
    let Some(stmt) = stmt else {
        return Route::default();
    };
    let keyspace = params.keyspace.as_deref().or(keyspace);
    let values = params.values.as_deref().unwrap_or(&[]);
    Route {
        partition: statement_partition(snap, keyspace, stmt, values, params.names.as_deref()),
        lwt: stmt.is_lwt(),
        read: stmt.is_read(),
    }
}

/// The partition an EXECUTE addresses through its prepared statement's key indexes.
fn prepared_partition(info: &PreparedInfo, values: &[Value]) -> Option<(Arc<str>, i64)> {
    partition_of_values(info, |i| values.get(i)?.as_bytes().map(|b| &b[..]))
}

/// [`prepared_partition`] over values read by `value` (the bytes of value `i`; `None` when it
/// is missing, null or unset).
fn partition_of_values<'v>(
    info: &PreparedInfo,
    value: impl Fn(usize) -> Option<&'v [u8]>,
) -> Option<(Arc<str>, i64)> {
    let part = |i: u16| value(usize::from(i));
    let t = match info.pk_indexes[..] {
        [] => return None,
        // A one-column key is its value as it is: hashed in place, no copy.
        [i] => token(part(i).filter(|k| !k.is_empty())?),
        ref many => {
            let parts: Option<Vec<&[u8]>> = many.iter().map(|&i| part(i)).collect();
            let key = composite_key(&parts?);
            if key.is_empty() {
                return None;
            }
            token(&key)
        }
    };
    Some((info.keyspace.clone()?, t))
}

/// Route of an EXECUTE of a statement sluice saw prepared (`None`: unknown id). When the
/// node reported no partition-key indexes (a literal key component), the statement text is
/// used with the bound values.
pub fn for_execute(snap: &Snapshot, info: Option<&PreparedInfo>, params: &QueryParams) -> Route {
    let Some(info) = info else {
        return Route::default();
    };
    let values = params.values.as_deref().unwrap_or(&[]);
    let partition = prepared_partition(info, values).or_else(|| {
        let stmt = info.statement.as_ref()?;
        statement_partition(
            snap,
            info.keyspace.as_deref(),
            stmt,
            values,
            params.names.as_deref(),
        )
    });
    Route {
        partition,
        lwt: info.lwt,
        read: info.read,
    }
}

/// Route of an EXECUTE read in place ([`ExecutePeek`]), as [`for_execute`] would route it
/// decoded; `None` when that needs the statement's text (no key indexes from the node).
pub fn for_peeked_execute(info: Option<&PreparedInfo>, e: &ExecutePeek<'_>) -> Option<Route> {
    let Some(info) = info else {
        return Some(Route::default());
    };
    let partition = partition_of_values(info, |i| e.value(i));
    if partition.is_none() && info.statement.is_some() {
        return None;
    }
    Some(Route {
        partition,
        lwt: info.lwt,
        read: info.read,
    })
}

/// Route of a BATCH: its partition when every statement addresses the same one.
pub fn for_batch(snap: &Snapshot, keyspace: Option<&str>, cache: &Cache, b: &Batch) -> Route {
    let keyspace = b.keyspace.as_deref().or(keyspace);
    let mut lwt = false;
    let mut partition: Option<(Arc<str>, i64)> = None;
    let mut routable = !b.statements.is_empty();
    for s in &b.statements {
        let p = match &s.target {
            BatchTarget::Query(q) => match sluice_cql::statement::parse(q) {
                Ok(stmt) => {
                    lwt |= stmt.is_lwt();
                    statement_partition(snap, keyspace, &stmt, &s.values, None)
                }
                Err(_) => None,
            },
            BatchTarget::Prepared(id) => match cache.get(id) {
                Some(info) => {
                    lwt |= info.lwt;
                    prepared_partition(&info, &s.values).or_else(|| {
                        let stmt = info.statement.as_ref()?;
                        statement_partition(snap, info.keyspace.as_deref(), stmt, &s.values, None)
                    })
                }
                None => None,
            },
        };
        match (&partition, p) {
            (_, None) => routable = false,
            (None, Some(p)) => partition = Some(p),
            (Some(cur), Some(p)) if *cur != p => routable = false,
            _ => {}
        }
    }
    Route {
        partition: partition.filter(|_| routable),
        lwt,
        read: false,
    }
}

/// The nodes to try, best first. Replicas of the request's token come first: for an LWT the
/// first up replica in ring order; otherwise replicas in the local data center before the
/// others, then those whose pod is in `local_zone` (the cluster's `zone`, matched against the
/// zones discovery found), each group by fewest requests in flight. Every other up node
/// follows as a fallback; down nodes come last, so a request still goes somewhere when
/// everything looks down. A zone no node is in changes nothing.
pub fn candidates(
    snap: &Snapshot,
    route: &Route,
    local_dc: Option<&str>,
    local_zone: Option<&str>,
    inflight: impl Fn(SocketAddr) -> usize,
) -> Vec<usize> {
    candidates_and_replicas(snap, route, local_dc, local_zone, inflight).0
}

/// [`candidates`], with how many of them (at the front) are live replicas of the route's
/// partition.
pub fn candidates_and_replicas(
    snap: &Snapshot,
    route: &Route,
    local_dc: Option<&str>,
    local_zone: Option<&str>,
    inflight: impl Fn(SocketAddr) -> usize,
) -> (Vec<usize>, usize) {
    let key = rank(snap, local_dc, local_zone, &inflight);
    let up = |i: usize| snap.nodes[i].health.up;
    // One vector, three groups: live replicas, other live nodes, down nodes.
    let mut out: Vec<usize> = Vec::with_capacity(snap.nodes.len());
    if let Some((ks, t)) = &route.partition {
        snap.replicas_into(ks, *t, &mut out);
        out.retain(|&i| up(i));
    }
    let replicas = out.len();
    if !route.lwt {
        out.sort_by_key(|&i| key(i));
    }
    for i in 0..snap.nodes.len() {
        if up(i) && !out[..replicas].contains(&i) {
            out.push(i);
        }
    }
    let live = out.len();
    out[replicas..].sort_by_key(|&i| key(i));
    out.extend((0..snap.nodes.len()).filter(|&i| !up(i)));
    out[live..].sort_by_key(|&i| key(i));
    (out, replicas)
}

/// The order of [`candidates`] within each group, as a sort key of node `i` (lowest first):
/// nodes in the local data center, then in `local_zone`, then by fewest requests in flight.
fn rank<'a>(
    snap: &'a Snapshot,
    local_dc: Option<&'a str>,
    local_zone: Option<&'a str>,
    inflight: &'a impl Fn(SocketAddr) -> usize,
) -> impl Fn(usize) -> (bool, bool, usize, usize) + 'a {
    move |i| {
        let n = &snap.nodes[i];
        let remote = local_dc.is_some_and(|dc| n.datacenter != dc);
        let other_zone = local_zone.is_some_and(|z| n.zone.as_deref() != Some(z));
        (remote, other_zone, inflight(n.addr), i)
    }
}

/// The first node of [`candidates_and_replicas`] and whether it is a live replica, found
/// without building the list (no allocation, no sort, one load lookup per node looked at):
/// the node nearly every request goes to. `None` when the snapshot has no nodes.
pub fn best_candidate(
    snap: &Snapshot,
    route: &Route,
    local_dc: Option<&str>,
    local_zone: Option<&str>,
    inflight: impl Fn(SocketAddr) -> usize,
) -> Option<(usize, bool)> {
    let rank = rank(snap, local_dc, local_zone, &inflight);
    let key = |i: &usize| rank(*i);
    let up = |i: &usize| snap.nodes[*i].health.up;
    if let Some((ks, t)) = &route.partition {
        let mut live = snap.replica_slice(ks, *t).iter().map(|&n| n as usize).filter(up);
        let best = if route.lwt {
            live.next()
        } else {
            live.min_by_key(key)
        };
        if let Some(i) = best {
            return Some((i, true));
        }
    }
    let all = 0..snap.nodes.len();
    let best = all
        .clone()
        .filter(up)
        .min_by_key(key)
        .or_else(|| all.min_by_key(key));
    best.map(|i| (i, false))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use sluice_cql::request::BatchStatement;
    use sluice_cql::ring::Strategy;
    use sluice_cql::types::ColumnType;

    use super::super::snapshot::{ClusterInfo, Keyspaces, NodeRow, PartitionKeys};
    use super::*;
    use crate::common::health::{Source, Verdict};

    fn snap() -> Snapshot {
        let rows: Vec<NodeRow> = [(1, "dc1", -100), (2, "dc1", 0), (3, "dc2", 100)]
            .iter()
            .map(|(n, dc, t)| NodeRow {
                addr: format!("127.0.0.{n}:9042").parse().unwrap(),
                host_id: None,
                datacenter: dc.to_string(),
                rack: "r".into(),
                tokens: vec![*t],
            })
            .collect();
        let s = Snapshot::seeds(&[]).with_ring(&rows, ClusterInfo::default(), &[]);
        let mut ks = Keyspaces::default();
        ks.insert("ks".to_string(), Strategy::Simple { rf: 2 });
        let mut tables = PartitionKeys::default();
        tables.insert(
            ("ks".to_string(), "kv".to_string()),
            vec![("k".to_string(), ColumnType::Varchar)],
        );
        tables.insert(
            ("ks".to_string(), "ev".to_string()),
            vec![
                ("tenant".to_string(), ColumnType::Varchar),
                ("bucket".to_string(), ColumnType::Int),
            ],
        );
        s.with_schema(ks, tables)
    }

    fn q(text: &str) -> Statement {
        sluice_cql::statement::parse(text).unwrap()
    }

    #[test]
    fn literal_and_bound_keys_route_alike() {
        let s = snap();
        let p = QueryParams::new(1);
        let a = for_query(
            &s,
            Some("ks"),
            Some(&q("SELECT * FROM kv WHERE k = 'user:1'")),
            &p,
        );
        let mut p2 = QueryParams::new(1);
        p2.values = Some(vec![Value::Set(Bytes::from_static(b"user:1"))]);
        let b = for_query(&s, None, Some(&q("SELECT * FROM ks.kv WHERE k = ?")), &p2);
        assert_eq!(a.partition, b.partition);
        assert_eq!(a.partition, Some(("ks".into(), token(b"user:1"))));
        assert!(a.read && !a.lwt);
        let c = for_query(
            &s,
            Some("ks"),
            Some(&q("INSERT INTO ev (tenant, bucket, x) VALUES ('t', 3, 1)")),
            &p,
        );
        let key = composite_key(&[b"t".to_vec(), 3i32.to_be_bytes().to_vec()]);
        assert_eq!(c.partition, Some(("ks".into(), token(&key))));
        // Unknown table, missing component, function call: no token.
        for text in [
            "SELECT * FROM other WHERE k = 'a'",
            "SELECT * FROM ev WHERE tenant = 't'",
            "SELECT * FROM kv WHERE k = now()",
        ] {
            assert_eq!(
                for_query(&s, Some("ks"), Some(&q(text)), &p).partition,
                None,
                "{text}"
            );
        }
    }

    #[test]
    fn a_peeked_execute_routes_as_the_decoded_one() {
        use sluice_cql::request::{Execute, Request};
        let s = snap();
        let info = |query: &str, pk_indexes: Vec<u16>| PreparedInfo {
            query: query.into(),
            prepare_keyspace: Some("ks".into()),
            v5_keyspace: None,
            pk_indexes,
            keyspace: Some("ks".into()),
            lwt: false,
            read: true,
            statement: sluice_cql::statement::parse(query).ok(),
            virtual_table: None,
        };
        let by_index = info("SELECT * FROM kv WHERE k = ?", vec![0]);
        let composite = info("SELECT * FROM ev WHERE bucket = ? AND tenant = ?", vec![1, 0]);
        let no_indexes = info("SELECT * FROM kv WHERE k = ?", vec![]);
        let t = Value::Set(Bytes::from_static(b"t"));
        let three = Value::Set(Bytes::copy_from_slice(&3i32.to_be_bytes()));
        for (info, values, peeked) in [
            (
                Some(&by_index),
                vec![Value::Set(Bytes::from_static(b"user:1"))],
                true,
            ),
            (Some(&composite), vec![three, t], true),
            (Some(&by_index), vec![Value::Null], false), // no key: the statement's text decides
            (
                Some(&no_indexes),
                vec![Value::Set(Bytes::from_static(b"user:1"))],
                false,
            ),
            (None, vec![], true),
        ] {
            let mut params = QueryParams::new(1);
            params.values = Some(values);
            params.flags = params.encoded_flags();
            for version in [4, 5] {
                let body = Request::Execute(Execute {
                    id: Bytes::from_static(b"id"),
                    result_metadata_id: (version == 5).then(|| Bytes::from_static(b"m")),
                    params: params.clone(),
                })
                .to_body(version);
                let e = ExecutePeek::read(version, &body).expect("peeked");
                let decoded = for_execute(&s, info, &params);
                match for_peeked_execute(info, &e) {
                    Some(r) => {
                        assert!(peeked, "{:?}", info.map(|i| &i.query));
                        assert_eq!(
                            (r.partition, r.lwt, r.read),
                            (decoded.partition, decoded.lwt, decoded.read)
                        );
                    }
                    None => assert!(!peeked),
                }
            }
        }
    }

    #[test]
    fn lwt_goes_to_the_first_replica_and_others_by_load() {
        let s = snap();
        let t = 50; // owned by node 2 (token 100), then node 0 (wraps).
        let route = Route {
            partition: Some(("ks".into(), t)),
            lwt: true,
            read: false,
        };
        let busy = |a: SocketAddr| if a.ip().to_string() == "127.0.0.3" { 10 } else { 0 };
        assert_eq!(candidates(&s, &route, None, None, busy), vec![2, 0, 1]);
        let plain = Route { lwt: false, ..route };
        assert_eq!(candidates(&s, &plain, None, None, busy), vec![0, 2, 1]);
        assert_eq!(candidates(&s, &plain, Some("dc2"), None, busy), vec![2, 0, 1]);
        let down = s
            .with_verdict(
                "127.0.0.3:9042".parse().unwrap(),
                &Verdict::down(Source::Probe, "x"),
            )
            .unwrap();
        assert_eq!(candidates(&down, &plain, None, None, |_| 0), vec![0, 1, 2]);
    }

    #[test]
    fn replicas_in_the_clients_zone_come_first_after_the_local_dc() {
        // Pods: node 0 in zone-a, node 1 in zone-b, node 2 in zone-b (but in dc2).
        let zones = |ip: std::net::IpAddr| match ip.to_string().as_str() {
            "127.0.0.1" => Some(("cass-0".to_string(), Some("zone-a".to_string()))),
            "127.0.0.2" => Some(("cass-1".to_string(), Some("zone-b".to_string()))),
            "127.0.0.3" => Some(("cass-2".to_string(), Some("zone-b".to_string()))),
            _ => None,
        };
        let s = snap().with_pods(zones).unwrap();
        assert_eq!(s.nodes[1].pod.as_deref(), Some("cass-1"));
        let mut ks = s.keyspaces.clone();
        ks.insert("ks3".to_string(), Strategy::Simple { rf: 3 });
        let s = s.with_schema(ks, s.tables.clone());
        let route = Route {
            partition: Some(("ks3".into(), -150)), // replicas in ring order: 0, 1, 2
            lwt: false,
            read: true,
        };
        let busy_b = |a: SocketAddr| usize::from(a.ip().to_string() == "127.0.0.2") * 5;
        // No zone: fewest in flight.
        assert_eq!(candidates(&s, &route, None, None, busy_b), vec![0, 2, 1]);
        // zone-b: its replicas first, even when busier, by load among them.
        assert_eq!(
            candidates(&s, &route, None, Some("zone-b"), busy_b),
            vec![2, 1, 0]
        );
        // The local data center still comes before the zone.
        assert_eq!(
            candidates(&s, &route, Some("dc1"), Some("zone-b"), busy_b),
            vec![1, 0, 2]
        );
        // A zone no pod is in, or nodes without pods: unchanged.
        assert_eq!(
            candidates(&s, &route, None, Some("zone-x"), busy_b),
            vec![0, 2, 1]
        );
        let no_pods = snap().with_schema(s.keyspaces.clone(), s.tables.clone());
        assert_eq!(
            candidates(&no_pods, &route, None, Some("zone-b"), busy_b),
            vec![0, 2, 1]
        );
        // An LWT keeps ring order.
        let lwt = Route { lwt: true, ..route };
        assert_eq!(candidates(&s, &lwt, None, Some("zone-b"), busy_b), vec![0, 1, 2]);
    }

    #[test]
    fn the_best_candidate_is_the_first_of_the_list() {
        let zones = |ip: std::net::IpAddr| match ip.to_string().as_str() {
            "127.0.0.1" => Some(("cass-0".to_string(), Some("zone-a".to_string()))),
            "127.0.0.2" | "127.0.0.3" => Some(("cass-x".to_string(), Some("zone-b".to_string()))),
            _ => None,
        };
        let s = snap().with_pods(zones).unwrap();
        let mut ks = s.keyspaces.clone();
        ks.insert("ks3".to_string(), Strategy::Simple { rf: 3 });
        let s = s.with_schema(ks, s.tables.clone());
        let mut partitions: Vec<Option<(Arc<str>, i64)>> = vec![None, Some(("nope".into(), 0))];
        for t in [-150, -100, -1, 0, 50, 100, 101] {
            partitions.push(Some(("ks".into(), t)));
            partitions.push(Some(("ks3".into(), t)));
        }
        let addrs: Vec<SocketAddr> = s.nodes.iter().map(|n| n.addr).collect();
        let mut checked = 0;
        for down in 0..8u32 {
            let mut d = s.clone();
            for (i, &a) in addrs.iter().enumerate() {
                if down & (1 << i) != 0 {
                    d = d.with_verdict(a, &Verdict::down(Source::Probe, "x")).unwrap();
                }
            }
            for loads in 0..27usize {
                let load = |a: SocketAddr| {
                    let i = addrs.iter().position(|&x| x == a).unwrap();
                    loads / 3usize.pow(i as u32) % 3
                };
                for partition in &partitions {
                    for lwt in [false, true] {
                        let route = Route {
                            partition: partition.clone(),
                            lwt,
                            read: !lwt,
                        };
                        for dc in [None, Some("dc1"), Some("dc2"), Some("dc9")] {
                            for zone in [None, Some("zone-a"), Some("zone-b")] {
                                let (list, replicas) = candidates_and_replicas(&d, &route, dc, zone, load);
                                let best = best_candidate(&d, &route, dc, zone, load);
                                assert_eq!(
                                    best,
                                    Some((list[0], replicas > 0)),
                                    "{route:?} {dc:?} {zone:?} {down} {loads}"
                                );
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 8 * 27 * 16 * 2 * 4 * 3);
        let empty = Snapshot::seeds(&[]);
        assert_eq!(best_candidate(&empty, &Route::default(), None, None, |_| 0), None);
    }

    #[test]
    fn batches_route_only_within_one_partition() {
        let s = snap();
        let cache = Cache::default();
        let stmt = |k: &str| BatchStatement {
            target: BatchTarget::Query(format!("INSERT INTO kv (k, v) VALUES ('{k}', 1)")),
            values: vec![],
            names: None,
        };
        let mut b = Batch {
            kind: 0,
            statements: vec![stmt("a"), stmt("a")],
            consistency: 1,
            flags: 0,
            serial_consistency: None,
            timestamp: None,
            keyspace: None,
            now_in_seconds: None,
        };
        assert_eq!(
            for_batch(&s, Some("ks"), &cache, &b).partition,
            Some(("ks".into(), token(b"a")))
        );
        b.statements.push(stmt("b"));
        assert_eq!(for_batch(&s, Some("ks"), &cache, &b).partition, None);
    }
}
