//! What sluice remembers about each prepared statement, by id: enough to route its EXECUTEs
//! (partition-key bind indexes and keyspace) and to prepare it again on a node that answers
//! UNPREPARED.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use sluice_cql::codec::Envelope;
use sluice_cql::frame::{Header, Opcode};
use sluice_cql::request::Prepare;
use sluice_cql::response::{Prepared, ResultBody};
use sluice_cql::statement::{parse, Statement};
use sluice_cql::{Request, Response};

use super::backend::{decode_response, RequestError};
use super::pool::PoolKey;
use super::CqlCluster;

/// Statements remembered at most; past this the cache starts over (clients re-prepare on
/// UNPREPARED, so forgetting is safe, only slower).
const MAX_ENTRIES: usize = 100_000;

/// A prepared statement as sluice knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedInfo {
    pub query: String,
    /// The keyspace the statement was prepared in (the client's USE or v5 keyspace): the
    /// keyspace of the backend connection to prepare it again on.
    pub prepare_keyspace: Option<String>,
    /// v5 PREPARE flags and keyspace, to replay the PREPARE exactly.
    pub v5_keyspace: Option<String>,
    /// Bind indexes of the partition key components, in partition-key order.
    pub pk_indexes: Vec<u16>,
    /// The keyspace whose replication places the statement's partitions (shared with every
    /// request's route).
    pub keyspace: Option<std::sync::Arc<str>>,
    pub lwt: bool,
    /// Reads only (safe to retry on another node).
    pub read: bool,
    /// The parsed text, for statements whose key is (partly) literal.
    pub statement: Option<Statement>,
    /// Set for statements on `system.local`/`peers`/`peers_v2`, which sluice answers itself.
    pub virtual_table: Option<&'static str>,
}

impl PreparedInfo {
    /// Builds the entry from a PREPARE and its result.
    pub fn new(
        query: &str,
        prepare_keyspace: Option<String>,
        v5_keyspace: Option<String>,
        result: &Prepared,
    ) -> PreparedInfo {
        let stmt = parse(query).ok();
        let meta = &result.metadata;
        let keyspace = meta
            .global_spec
            .as_ref()
            .map(|(k, _)| k.clone())
            .or_else(|| meta.columns.first().map(|c| c.keyspace.clone()))
            .or_else(|| {
                stmt.as_ref()
                    .and_then(|s| s.table())
                    .and_then(|t| t.keyspace.clone())
            })
            .or_else(|| prepare_keyspace.clone())
            .map(std::sync::Arc::from);
        PreparedInfo {
            query: query.to_string(),
            prepare_keyspace,
            v5_keyspace,
            pk_indexes: meta.pk_indexes.clone(),
            keyspace,
            lwt: stmt.as_ref().is_some_and(Statement::is_lwt),
            read: stmt.as_ref().is_some_and(Statement::is_read),
            statement: stmt,
            virtual_table: None,
        }
    }
}

/// Prepared statements by id, shared by every client of a cluster (looked up on every
/// EXECUTE: ids are the nodes' digests, so a fast seeded hash is enough).
#[derive(Default)]
pub struct Cache {
    map: RwLock<std::collections::HashMap<Bytes, Arc<PreparedInfo>, foldhash::fast::RandomState>>,
}

impl Cache {
    /// The entry for an id.
    pub fn get(&self, id: &[u8]) -> Option<Arc<PreparedInfo>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Remembers an entry.
    pub fn insert(&self, id: Bytes, info: PreparedInfo) {
        let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_ENTRIES && !m.contains_key(&id) {
            m.clear();
        }
        m.insert(id, Arc::new(info));
    }

    /// How many statements are remembered.
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Prepares a statement on one node again. `Err(Some(_))`: no answer (the connection was
/// lost, or could not be opened, or the request timed out); `Err(None)`: the node answered
/// with something else than PREPARED.
pub(super) async fn prepare_on(
    cluster: &CqlCluster,
    key: &PoolKey,
    version: u8,
    addr: SocketAddr,
    info: &PreparedInfo,
) -> Result<(), Option<RequestError>> {
    let key = PoolKey {
        keyspace: info.prepare_keyspace.clone(),
        ..key.clone()
    };
    let Ok(conn) = cluster.pools.get(addr, &key, super::CQL_VERSION).await else {
        return Err(Some(RequestError::Lost));
    };
    let req = Request::Prepare(Prepare {
        query: info.query.clone(),
        flags: u32::from(info.v5_keyspace.is_some()),
        keyspace: info.v5_keyspace.clone(),
    });
    let env = Envelope::new(Header::request(version, 0, Opcode::Prepare), req.to_body(version));
    match conn.request(&env, cluster.cql.request_timeout).await {
        Ok(r) => match decode_response(&r) {
            Ok(Response::Result(ResultBody::Prepared(_))) => Ok(()),
            _ => Err(None),
        },
        Err(e) => Err(Some(e)),
    }
}

/// Caches a PREPARE's result (sent on a connection bound to `key`) and prepares it on the
/// other nodes in the background.
pub(super) fn remember_prepared(
    cluster: &Arc<CqlCluster>,
    key: &PoolKey,
    version: u8,
    p: &Prepare,
    resp: &Envelope,
) {
    let Ok(Response::Result(ResultBody::Prepared(result))) = decode_response(resp) else {
        return;
    };
    let prepare_keyspace = if p.keyspace.is_some() {
        None
    } else {
        key.keyspace.clone()
    };
    let info = PreparedInfo::new(&p.query, prepare_keyspace, p.keyspace.clone(), &result);
    cluster.prepared.insert(result.id.clone(), info.clone());
    let (cluster, key) = (cluster.clone(), key.clone());
    tokio::spawn(async move {
        let snap = cluster.snapshot();
        for n in snap.nodes.iter().filter(|n| n.health.up) {
            let prepare = prepare_on(&cluster, &key, version, n.addr, &info);
            let _ = tokio::time::timeout(Duration::from_secs(5), prepare).await;
        }
    });
}
