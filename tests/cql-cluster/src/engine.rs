//! Request handling on a coordinator node: QUERY, PREPARE, EXECUTE and BATCH, with the
//! availability check for the consistency level and the coordination record.

use std::sync::Arc;

use bytes::Bytes;
use sluice_cql::frame::Opcode;
use sluice_cql::request::{query_flags, Batch, BatchTarget, Execute, Prepare, Query, QueryParams};
use sluice_cql::response::{error_code as ec, ErrorBody, Response, ResultBody, SchemaChange};
use sluice_cql::result::rows_flags;
use sluice_cql::ring::Strategy;
use sluice_cql::statement::{parse, Statement};

use crate::exec::{self, invalid, Binder, ReadOptions};
use crate::prepare::{prepare, PreparedStatement};
use crate::schema::{execute_ddl, Db};
use crate::systables::is_system_keyspace;
use crate::{Record, Shared};

/// Per-connection state the engine needs.
pub struct Session {
    pub keyspace: Option<String>,
    pub version: u8,
    pub conn: u64,
}

/// What to send back, and what to announce.
pub struct Reply {
    pub response: Response,
    pub warnings: Vec<String>,
    pub events: Vec<SchemaChange>,
}

impl Reply {
    fn ok(r: ResultBody) -> Reply {
        Reply {
            response: Response::Result(r),
            warnings: Vec::new(),
            events: Vec::new(),
        }
    }

    fn error(e: ErrorBody) -> Reply {
        Reply {
            response: Response::Error(e),
            warnings: Vec::new(),
            events: Vec::new(),
        }
    }
}

/// Where a request went, for the record.
#[derive(Default)]
struct Route {
    keyspace: Option<String>,
    table: Option<String>,
    token: Option<i64>,
    lwt: bool,
}

/// Replicas needed for a consistency level out of `rf`.
fn required(consistency: u16, rf: usize) -> usize {
    match consistency {
        0 | 1 | 10 => 1,
        2 => 2,
        3 => 3,
        5 => rf,
        _ => rf / 2 + 1,
    }
}

fn replicas(shared: &Shared, db: &Db, ks: &str, token: i64) -> Vec<usize> {
    match db.keyspaces.get(ks) {
        Some(k) if k.strategy != Strategy::Local => shared.replicas(&k.strategy, token),
        _ => Vec::new(),
    }
}

/// UNAVAILABLE unless enough replicas of `token` are alive for `consistency`.
fn check_available(
    shared: &Shared,
    db: &Db,
    ks: &str,
    token: i64,
    consistency: u16,
) -> Result<(), ErrorBody> {
    let reps = replicas(shared, db, ks, token);
    if reps.is_empty() {
        return Ok(());
    }
    let alive = reps.iter().filter(|&&n| shared.is_up(n)).count();
    let need = required(consistency, reps.len());
    if alive < need {
        return Err(ErrorBody::unavailable(consistency, need as i32, alive as i32));
    }
    Ok(())
}

/// Runs one request and records it.
pub fn handle(shared: &Shared, node: usize, s: &mut Session, opcode: Opcode, req: Request<'_>) -> Reply {
    let mut route = Route::default();
    let (query, reply) = match req {
        Request::Query(q) => (q.query.clone(), query(shared, node, s, q, &mut route)),
        Request::Prepare(p) => (p.query.clone(), prepare_request(shared, node, s, p, &mut route)),
        Request::Execute(e) => execute(shared, node, s, e, &mut route),
        Request::Batch(b) => ("BATCH".to_string(), batch(shared, node, s, b, &mut route)),
    };
    let error = match &reply.response {
        Response::Error(e) => Some(e.code),
        _ => None,
    };
    let db = shared.db.lock().unwrap_or_else(|e| e.into_inner());
    let reps = match (&route.keyspace, route.token) {
        (Some(ks), Some(t)) => replicas(shared, &db, ks, t),
        _ => Vec::new(),
    };
    drop(db);
    shared.record(Record {
        node,
        address: shared.nodes[node].address,
        conn: s.conn,
        opcode,
        query,
        keyspace: route.keyspace,
        table: route.table,
        token: route.token,
        replicas: reps,
        lwt: route.lwt,
        error,
    });
    reply
}

/// A request the engine runs.
pub enum Request<'a> {
    Query(&'a Query),
    Prepare(&'a Prepare),
    Execute(&'a Execute),
    Batch(&'a Batch),
}

fn read_options(p: &QueryParams, version: u8, metadata_matches: bool) -> ReadOptions {
    ReadOptions {
        page_size: p.page_size,
        paging_state: p.paging_state.clone(),
        skip_metadata: p.flags & query_flags::SKIP_METADATA != 0 && (version < 5 || metadata_matches),
    }
}

fn query(shared: &Shared, node: usize, s: &mut Session, q: &Query, route: &mut Route) -> Reply {
    let stmt = match parse(&q.query) {
        Ok(st) => st,
        Err(e) => return Reply::error(ErrorBody::new(ec::SYNTAX_ERROR, format!("line 1: {e}"))),
    };
    let keyspace = q.params.keyspace.clone().or_else(|| s.keyspace.clone());
    let binder = Binder {
        values: q.params.values.as_deref().unwrap_or(&[]),
        names: q.params.names.as_deref(),
    };
    if let Statement::Use(ks) = &stmt {
        let db = shared.db.lock().unwrap_or_else(|e| e.into_inner());
        if db.keyspaces.contains_key(ks) || is_system_keyspace(ks) {
            s.keyspace = Some(ks.clone());
            route.keyspace = Some(ks.clone());
            return Reply::ok(ResultBody::SetKeyspace(ks.clone()));
        }
        return Reply::error(invalid(format!("Keyspace '{ks}' does not exist")));
    }
    if let Statement::Other(_) = &stmt {
        let mut db = shared.db.lock().unwrap_or_else(|e| e.into_inner());
        return match execute_ddl(&mut db, keyspace.as_deref(), &q.query) {
            Ok(out) => {
                drop(db);
                for ev in out.events.iter().filter(|e| e.change == "DROPPED") {
                    evict(shared, &ev.keyspace, ev.name.as_deref());
                }
                route.keyspace = out.result.as_ref().map(|c| c.keyspace.clone());
                let mut r = Reply::ok(match out.result {
                    Some(c) => ResultBody::SchemaChange(c),
                    None => ResultBody::Void,
                });
                r.events = out.events;
                r
            }
            Err(e) => Reply::error(e),
        };
    }
    run(
        shared,
        node,
        s,
        &stmt,
        keyspace.as_deref(),
        binder,
        &q.params,
        true,
        route,
    )
}

#[allow(clippy::too_many_arguments)]
fn run(
    shared: &Shared,
    node: usize,
    s: &Session,
    stmt: &Statement,
    keyspace: Option<&str>,
    binder: Binder<'_>,
    params: &QueryParams,
    metadata_matches: bool,
    route: &mut Route,
) -> Reply {
    let mut db = shared.db.lock().unwrap_or_else(|e| e.into_inner());
    route.lwt = stmt.is_lwt();
    if let Some(t) = stmt.table() {
        route.keyspace = t.keyspace.clone().or_else(|| keyspace.map(str::to_string));
        route.table = Some(t.table.clone());
    }
    let partition = exec::statement_partition(&db, stmt, keyspace, binder);
    route.token = partition.as_ref().map(|p| p.1.token);
    if let Some((ks, p)) = &partition {
        let cl = if route.lwt {
            params.serial_consistency.unwrap_or(8)
        } else {
            params.consistency
        };
        if let Err(e) = check_available(shared, &db, ks, p.token, cl) {
            return Reply::error(e);
        }
    }
    match stmt {
        Statement::Select(sel) => {
            let opts = read_options(params, s.version, metadata_matches);
            match exec::select(shared, &db, node, sel, keyspace, binder, &opts) {
                Ok((body, pk_restricted)) => {
                    let mut r = Reply::ok(body);
                    let aggregate = sel
                        .items
                        .iter()
                        .any(|i| i.selector == sluice_cql::statement::Selector::Count);
                    if aggregate && !pk_restricted {
                        r.warnings
                            .push("Aggregation query used without partition key".into());
                    }
                    r
                }
                Err(e) => Reply::error(e),
            }
        }
        Statement::Batch(block) => {
            let stmts: Vec<(&Statement, Binder<'_>)> =
                block.statements.iter().map(|st| (st, binder)).collect();
            batch_plans(&mut db, &stmts, keyspace, block.kind == 1, route)
        }
        _ => {
            let plan = match exec::plan_write(&db, stmt, keyspace, binder) {
                Ok(p) => p,
                Err(e) => return Reply::error(e),
            };
            match exec::check_condition(&db, &plan) {
                Ok((true, body)) => {
                    exec::apply(&mut db, &plan.mutation);
                    Reply::ok(body)
                }
                Ok((false, body)) => Reply::ok(body),
                Err(e) => Reply::error(e),
            }
        }
    }
}

/// Cassandra's `unlogged_batch_across_partitions_warn_threshold`.
const UNLOGGED_BATCH_WARN_PARTITIONS: usize = 10;

fn batch_plans(
    db: &mut Db,
    stmts: &[(&Statement, Binder<'_>)],
    keyspace: Option<&str>,
    unlogged: bool,
    route: &mut Route,
) -> Reply {
    let mut warnings = Vec::new();
    let mut reply = batch_plans_inner(db, stmts, keyspace, unlogged, route, &mut warnings);
    reply.warnings = warnings;
    reply
}

fn batch_plans_inner(
    db: &mut Db,
    stmts: &[(&Statement, Binder<'_>)],
    keyspace: Option<&str>,
    unlogged: bool,
    route: &mut Route,
    warnings: &mut Vec<String>,
) -> Reply {
    let mut plans = Vec::new();
    for (st, b) in stmts {
        if !matches!(
            st,
            Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_)
        ) {
            return Reply::error(invalid(
                "Only INSERT, UPDATE and DELETE statements are allowed in a batch",
            ));
        }
        match exec::plan_write(db, st, keyspace, *b) {
            Ok(p) => plans.push(p),
            Err(e) => return Reply::error(e),
        }
    }
    let tokens: Vec<i64> = plans.iter().map(|p| p.mutation.partition.token).collect();
    let first = plans
        .first()
        .map(|p| (p.mutation.keyspace.clone(), p.mutation.table.clone()));
    route.keyspace = first.as_ref().map(|f| f.0.clone());
    route.table = first.map(|f| f.1);
    route.token = tokens.first().copied().filter(|t| tokens.iter().all(|x| x == t));
    route.lwt = stmts.iter().any(|(s, _)| s.is_lwt());
    if route.lwt && route.token.is_none() {
        return Reply::error(invalid("Batch with conditions cannot span multiple partitions"));
    }
    let mut all_ok = true;
    let mut last = ResultBody::Void;
    for p in &plans {
        match exec::check_condition(db, p) {
            Ok((ok, body)) => {
                all_ok &= ok;
                if !matches!(body, ResultBody::Void) {
                    last = body;
                }
            }
            Err(e) => return Reply::error(e),
        }
    }
    if all_ok {
        for p in &plans {
            exec::apply(db, &p.mutation);
        }
    }
    let mut partitions: Vec<(&str, &str, i64, &[u8])> = plans
        .iter()
        .map(|p| {
            (
                p.mutation.keyspace.as_str(),
                p.mutation.table.as_str(),
                p.mutation.partition.token,
                &p.mutation.partition.key[..],
            )
        })
        .collect();
    partitions.sort();
    partitions.dedup();
    if unlogged && partitions.len() > UNLOGGED_BATCH_WARN_PARTITIONS {
        let mut tables: Vec<String> = partitions.iter().map(|p| format!("{}.{}", p.0, p.1)).collect();
        tables.dedup();
        warnings.push(format!(
            "Unlogged batch covering {} partitions detected against table{} [{}]. You should use a logged batch for atomicity, or asynchronous writes for performance.",
            partitions.len(),
            if tables.len() > 1 { "s" } else { "" },
            tables.join(", ")
        ));
    }
    if route.lwt && !all_ok {
        return Reply::ok(last);
    }
    Reply::ok(if route.lwt { last } else { ResultBody::Void })
}

/// Forgets prepared statements on a dropped table (or keyspace), on every node, as Cassandra
/// does: their next EXECUTE gets UNPREPARED.
fn evict(shared: &Shared, keyspace: &str, table: Option<&str>) {
    for cache in &shared.prepared {
        cache.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, ps| {
            let Some(t) = ps.statement.table() else {
                return true;
            };
            let ks = t.keyspace.as_deref().or(ps.keyspace.as_deref());
            !(ks == Some(keyspace) && table.is_none_or(|n| n == t.table))
        });
    }
}

fn prepare_request(shared: &Shared, node: usize, s: &Session, p: &Prepare, route: &mut Route) -> Reply {
    let keyspace = p.keyspace.clone().or_else(|| s.keyspace.clone());
    let db = shared.db.lock().unwrap_or_else(|e| e.into_inner());
    route.keyspace = keyspace.clone();
    match prepare(shared, &db, node, &p.query, keyspace.as_deref(), s.version) {
        Ok(ps) => {
            let result = ps.result.clone();
            shared.prepared[node]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ps.id.clone(), Arc::new(ps));
            Reply::ok(ResultBody::Prepared(result))
        }
        Err(e) => Reply::error(e),
    }
}

fn lookup(shared: &Shared, node: usize, id: &Bytes) -> Result<Arc<PreparedStatement>, ErrorBody> {
    shared.prepared[node]
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(id)
        .cloned()
        .ok_or_else(|| ErrorBody::unprepared(id))
}

fn execute(shared: &Shared, node: usize, s: &Session, e: &Execute, route: &mut Route) -> (String, Reply) {
    let ps = match lookup(shared, node, &e.id) {
        Ok(p) => p,
        Err(err) => return (String::new(), Reply::error(err)),
    };
    let binder = Binder {
        values: e.params.values.as_deref().unwrap_or(&[]),
        names: e.params.names.as_deref(),
    };
    let current = ps.result.result_metadata_id.clone();
    let matches = current.is_none() || current == e.result_metadata_id;
    let mut reply = match &ps.statement {
        Statement::Other(_) | Statement::Use(_) => {
            let q = Query {
                query: ps.query.clone(),
                params: e.params.clone(),
            };
            let mut sess = Session {
                keyspace: ps.keyspace.clone(),
                version: s.version,
                conn: s.conn,
            };
            return (ps.query.clone(), query(shared, node, &mut sess, &q, route));
        }
        st => run(
            shared,
            node,
            s,
            st,
            ps.keyspace.as_deref(),
            binder,
            &e.params,
            matches,
            route,
        ),
    };
    // v5: tell a client holding stale result metadata about the new one.
    if s.version >= 5 && !matches {
        if let Response::Result(ResultBody::Rows(rows)) = &mut reply.response {
            rows.metadata.new_metadata_id = current;
            rows.metadata.flags &= !rows_flags::NO_METADATA;
        }
    }
    (ps.query.clone(), reply)
}

fn batch(shared: &Shared, _node: usize, s: &Session, b: &Batch, route: &mut Route) -> Reply {
    let keyspace = b.keyspace.clone().or_else(|| s.keyspace.clone());
    let mut owned: Vec<(Statement, Option<String>)> = Vec::new();
    for st in &b.statements {
        match &st.target {
            BatchTarget::Query(q) => match parse(q) {
                Ok(p) => owned.push((p, keyspace.clone())),
                Err(e) => return Reply::error(ErrorBody::new(ec::SYNTAX_ERROR, format!("line 1: {e}"))),
            },
            BatchTarget::Prepared(id) => match lookup(shared, _node, id) {
                Ok(ps) => owned.push((
                    ps.statement.clone(),
                    ps.keyspace.clone().or_else(|| keyspace.clone()),
                )),
                Err(e) => return Reply::error(e),
            },
        }
    }
    let mut db = shared.db.lock().unwrap_or_else(|e| e.into_inner());
    // Statements may come from different keyspaces; plan each with its own.
    let mut reply = None;
    let stmts: Vec<(&Statement, Binder<'_>)> = owned
        .iter()
        .zip(&b.statements)
        .map(|((st, _), raw)| {
            (
                st,
                Binder {
                    values: &raw.values,
                    names: None,
                },
            )
        })
        .collect();
    let ks = owned.first().and_then(|o| o.1.clone()).or(keyspace);
    if let Some((ksn, p)) = stmts
        .first()
        .and_then(|(st, bd)| exec::statement_partition(&db, st, ks.as_deref(), *bd))
    {
        let cl = if stmts.iter().any(|(s, _)| s.is_lwt()) {
            b.serial_consistency.unwrap_or(8)
        } else {
            b.consistency
        };
        if let Err(e) = check_available(shared, &db, &ksn, p.token, cl) {
            reply = Some(Reply::error(e));
        }
    }
    reply.unwrap_or_else(|| batch_plans(&mut db, &stmts, ks.as_deref(), b.kind == 1, route))
}
