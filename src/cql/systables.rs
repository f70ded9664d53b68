//! The topology drivers see: sluice answers `system.local`, `system.peers` and
//! `system.peers_v2` itself, as a one-node cluster at the address the client connected to,
//! owning the whole token range, so that drivers never learn (or try) the nodes' own addresses.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};
use sluice_cql::response::{error_code, ColumnSpec, ErrorBody, Rows, RowsMetadata};
use sluice_cql::statement::{Op, Select, Selector, Term};
use sluice_cql::types::ColumnType;
use sluice_cql::value::Literal;

/// What sluice says about itself.
pub struct LocalView<'a> {
    /// The address the client connected to.
    pub address: SocketAddr,
    pub cluster_name: &'a str,
    pub cql_version: &'a str,
    pub release_version: &'a str,
    pub partitioner: &'a str,
    pub datacenter: &'a str,
    pub schema_version: Option<[u8; 16]>,
    /// The highest native protocol version sluice speaks to clients (what a Cassandra node
    /// reports in `native_protocol_version`, whatever version the connection uses).
    pub protocol_version: u8,
}

/// A stable host id for a sluice listener.
pub fn host_id(listen: SocketAddr, cluster: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = DefaultHasher::new();
        (i, listen, cluster, "sluice").hash(&mut h);
        chunk.copy_from_slice(&h.finish().to_be_bytes());
    }
    out[6] = (out[6] & 0x0f) | 0x40;
    out[8] = (out[8] & 0x3f) | 0x80;
    out
}

fn text(s: &str) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(s.as_bytes()))
}

fn int(v: i32) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(&v.to_be_bytes()))
}

fn inet(ip: IpAddr) -> Option<Bytes> {
    Some(match ip {
        IpAddr::V4(a) => Bytes::copy_from_slice(&a.octets()),
        IpAddr::V6(a) => Bytes::copy_from_slice(&a.octets()),
    })
}

fn set_of_text(items: &[&str]) -> Option<Bytes> {
    let mut out = BytesMut::new();
    out.put_i32(items.len() as i32);
    for i in items {
        out.put_i32(i.len() as i32);
        out.put_slice(i.as_bytes());
    }
    Some(out.freeze())
}

fn set_t() -> ColumnType {
    ColumnType::Set(Box::new(ColumnType::Varchar))
}

/// Columns of `system.local` (Cassandra 4.0), in `SELECT *` order.
fn local_columns() -> Vec<(&'static str, ColumnType)> {
    use ColumnType::*;
    vec![
        ("key", Varchar),
        ("bootstrapped", Varchar),
        ("broadcast_address", Inet),
        ("broadcast_port", Int),
        ("cluster_name", Varchar),
        ("cql_version", Varchar),
        ("data_center", Varchar),
        ("gossip_generation", Int),
        ("host_id", Uuid),
        ("listen_address", Inet),
        ("listen_port", Int),
        ("native_protocol_version", Varchar),
        ("partitioner", Varchar),
        ("rack", Varchar),
        ("release_version", Varchar),
        ("rpc_address", Inet),
        ("rpc_port", Int),
        ("schema_version", Uuid),
        ("tokens", set_t()),
        ("truncated_at", Map(Box::new(Uuid), Box::new(Blob))),
    ]
}

fn peers_columns(v2: bool) -> Vec<(&'static str, ColumnType)> {
    use ColumnType::*;
    if v2 {
        vec![
            ("peer", Inet),
            ("peer_port", Int),
            ("data_center", Varchar),
            ("host_id", Uuid),
            ("native_address", Inet),
            ("native_port", Int),
            ("preferred_ip", Inet),
            ("preferred_port", Int),
            ("rack", Varchar),
            ("release_version", Varchar),
            ("schema_version", Uuid),
            ("tokens", set_t()),
        ]
    } else {
        vec![
            ("peer", Inet),
            ("data_center", Varchar),
            ("host_id", Uuid),
            ("preferred_ip", Inet),
            ("rack", Varchar),
            ("release_version", Varchar),
            ("rpc_address", Inet),
            ("schema_version", Uuid),
            ("tokens", set_t()),
        ]
    }
}

fn local_row(v: &LocalView<'_>) -> Vec<Option<Bytes>> {
    let ip = v.address.ip();
    let id = host_id(v.address, v.cluster_name);
    let min_token = i64::MIN.to_string();
    let version = v.protocol_version.to_string();
    let values: Vec<(&str, Option<Bytes>)> = vec![
        ("key", text("local")),
        ("bootstrapped", text("COMPLETED")),
        ("broadcast_address", inet(ip)),
        ("broadcast_port", int(7000)),
        ("cluster_name", text(v.cluster_name)),
        ("cql_version", text(v.cql_version)),
        ("data_center", text(v.datacenter)),
        ("gossip_generation", int(1)),
        ("host_id", Some(Bytes::copy_from_slice(&id))),
        ("listen_address", inet(ip)),
        ("listen_port", int(7000)),
        ("native_protocol_version", text(&version)),
        ("partitioner", text(v.partitioner)),
        ("rack", text("rack1")),
        ("release_version", text(v.release_version)),
        ("rpc_address", inet(ip)),
        ("rpc_port", int(i32::from(v.address.port()))),
        (
            "schema_version",
            v.schema_version.map(|s| Bytes::copy_from_slice(&s)),
        ),
        ("tokens", set_of_text(&[&min_token])),
    ];
    local_columns()
        .iter()
        .map(|(n, _)| values.iter().find(|(k, _)| k == n).and_then(|(_, v)| v.clone()))
        .collect()
}

/// The type of a column of a virtual table.
pub fn column_type(table: &str, column: &str) -> Option<ColumnType> {
    let cols = match table {
        "local" => local_columns(),
        "peers" => peers_columns(false),
        _ => peers_columns(true),
    };
    cols.into_iter().find(|(n, _)| *n == column).map(|(_, t)| t)
}

/// A stable prepared statement id for a virtual-table query.
pub fn prepared_id(keyspace: Option<&str>, query: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = DefaultHasher::new();
        (i, keyspace, query, "sluice virtual table").hash(&mut h);
        chunk.copy_from_slice(&h.finish().to_be_bytes());
    }
    out
}

/// Which virtual table a SELECT reads, if it reads one.
pub fn virtual_table(sel: &Select, keyspace: Option<&str>) -> Option<&'static str> {
    let ks = sel.table.keyspace.as_deref().or(keyspace)?;
    if ks != "system" {
        return None;
    }
    match sel.table.table.as_str() {
        "local" => Some("local"),
        "peers" => Some("peers"),
        "peers_v2" => Some("peers_v2"),
        _ => None,
    }
}

fn invalid(msg: String) -> ErrorBody {
    ErrorBody::new(error_code::INVALID, msg)
}

/// Answers a SELECT on one of the virtual tables.
pub fn answer(sel: &Select, table: &str, view: &LocalView<'_>) -> Result<Rows, ErrorBody> {
    let columns = match table {
        "local" => local_columns(),
        "peers" => peers_columns(false),
        _ => peers_columns(true),
    };
    let mut rows: Vec<Vec<Option<Bytes>>> = if table == "local" {
        vec![local_row(view)]
    } else {
        Vec::new()
    };
    // `WHERE key = 'local'` (or any other key) filters the one row; a bound key matches.
    for r in &sel.relations {
        if r.column == "key" && r.op == Op::Eq {
            if let [Term::Literal(Literal::Str(k))] = r.terms.as_slice() {
                if k != "local" {
                    rows.clear();
                }
            }
        }
    }
    let mut out_cols: Vec<(String, ColumnType, Option<usize>)> = Vec::new();
    if sel.items.is_empty() {
        for (i, (n, t)) in columns.iter().enumerate() {
            out_cols.push((n.to_string(), t.clone(), Some(i)));
        }
    }
    let mut count = false;
    for item in &sel.items {
        match &item.selector {
            Selector::Column(c) => {
                let i = columns
                    .iter()
                    .position(|(n, _)| n == c)
                    .ok_or_else(|| invalid(format!("Undefined column name {c}")))?;
                let name = item.alias.clone().unwrap_or_else(|| c.clone());
                out_cols.push((name, columns[i].1.clone(), Some(i)));
            }
            Selector::Count => {
                count = true;
                out_cols.push((
                    item.alias.clone().unwrap_or_else(|| "count".into()),
                    ColumnType::Bigint,
                    None,
                ));
            }
            _ => {
                return Err(invalid(
                    "sluice answers system.local/peers itself and supports only column selections".into(),
                ))
            }
        }
    }
    let rows: Vec<Vec<Option<Bytes>>> = if count {
        let n = rows.len() as i64;
        vec![out_cols
            .iter()
            .map(|(_, _, i)| match i {
                Some(i) => rows.first().and_then(|r| r[*i].clone()),
                None => Some(Bytes::copy_from_slice(&n.to_be_bytes())),
            })
            .collect()]
    } else {
        rows.iter()
            .map(|r| {
                out_cols
                    .iter()
                    .map(|(_, _, i)| i.and_then(|i| r[i].clone()))
                    .collect()
            })
            .collect()
    };
    let specs = out_cols
        .into_iter()
        .map(|(n, t, _)| ColumnSpec::new("system", table, &n, t))
        .collect();
    Ok(Rows::from_values(RowsMetadata::new(specs), &rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_cql::statement::{parse, Statement};

    fn view() -> LocalView<'static> {
        LocalView {
            address: "10.1.2.3:19042".parse().unwrap(),
            cluster_name: "c",
            cql_version: "3.4.5",
            release_version: "4.0",
            partitioner: "org.apache.cassandra.dht.Murmur3Partitioner",
            datacenter: "dc1",
            schema_version: Some([7; 16]),
            protocol_version: 5,
        }
    }

    fn select(q: &str) -> Select {
        match parse(q).unwrap() {
            Statement::Select(s) => s,
            _ => panic!(),
        }
    }

    #[test]
    fn local_is_sluice_itself() {
        let s =
            select("SELECT rpc_address, rpc_port, tokens, data_center FROM system.local WHERE key='local'");
        assert_eq!(virtual_table(&s, None), Some("local"));
        let rows = answer(&s, "local", &view()).unwrap();
        let r = &rows.rows().unwrap()[0];
        assert_eq!(r[0].as_deref(), Some(&[10u8, 1, 2, 3][..]));
        assert_eq!(r[1].as_deref(), Some(&19042i32.to_be_bytes()[..]));
        assert_eq!(r[3].as_deref(), Some(&b"dc1"[..]));
        let all = answer(&select("SELECT * FROM system.local"), "local", &view()).unwrap();
        assert_eq!(all.metadata.columns.len(), 20);
        assert!(answer(&select("SELECT nope FROM system.local"), "local", &view()).is_err());
        let v = answer(
            &select("SELECT native_protocol_version FROM system.local"),
            "local",
            &view(),
        )
        .unwrap();
        assert_eq!(
            v.rows().unwrap()[0][0].as_deref(),
            Some(&b"5"[..]),
            "the highest version, as Cassandra 4.0 reports"
        );
    }

    #[test]
    fn peers_are_empty_and_other_tables_pass_through() {
        let s = select("SELECT peer, native_address FROM system.peers_v2");
        assert_eq!(answer(&s, "peers_v2", &view()).unwrap().rows_count, 0);
        assert_eq!(
            virtual_table(&select("SELECT * FROM peers"), Some("system")),
            Some("peers")
        );
        assert_eq!(
            virtual_table(&select("SELECT * FROM system.size_estimates"), None),
            None
        );
        assert_eq!(virtual_table(&select("SELECT * FROM ks.local"), None), None);
    }
}
