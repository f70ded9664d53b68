//! The system tables a node serves: `system.local`, `system.peers`, `system.peers_v2` and the
//! `system_schema` / `system_virtual_schema` tables drivers read, with Cassandra 4.0's columns.

use bytes::Bytes;
use sluice_cql::types::ColumnType;

use crate::schema::{Column, Db, Kind};
use crate::values::{boolean, encode_collection, encode_map, inet, int, text, uuid};
use crate::Shared;

/// A table materialized as rows, for the SELECT evaluator.
pub struct RowSet {
    pub keyspace: String,
    pub table: String,
    pub columns: Vec<Column>,
    /// Rows in column order, with the token of their partition when it has one.
    pub rows: Vec<(Option<i64>, Vec<Option<Bytes>>)>,
}

fn cols(pk: &[(&str, ColumnType)], ck: &[(&str, ColumnType)], rest: &[(&str, ColumnType)]) -> Vec<Column> {
    let mut out = Vec::new();
    for (i, (n, t)) in pk.iter().enumerate() {
        out.push(Column {
            name: n.to_string(),
            typ: t.clone(),
            kind: Kind::PartitionKey(i),
        });
    }
    for (i, (n, t)) in ck.iter().enumerate() {
        out.push(Column {
            name: n.to_string(),
            typ: t.clone(),
            kind: Kind::Clustering(i),
        });
    }
    let mut rest: Vec<_> = rest.to_vec();
    rest.sort_by(|a, b| a.0.cmp(b.0));
    for (n, t) in rest {
        out.push(Column {
            name: n.to_string(),
            typ: t,
            kind: Kind::Regular,
        });
    }
    out
}

fn set_of(t: ColumnType) -> ColumnType {
    ColumnType::Set(Box::new(t))
}
fn list_of(t: ColumnType) -> ColumnType {
    ColumnType::List(Box::new(t))
}
fn map_of(k: ColumnType, v: ColumnType) -> ColumnType {
    ColumnType::Map(Box::new(k), Box::new(v))
}

use ColumnType::{Blob, Boolean, Double, Inet, Int, Uuid, Varchar as Text};

fn tokens_value(tokens: &[i64]) -> Option<Bytes> {
    let mut t: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    t.sort();
    Some(encode_collection(&t))
}

/// Fills rows for `columns` from named values; absent names are null.
fn row(columns: &[Column], values: &[(&str, Option<Bytes>)]) -> Vec<Option<Bytes>> {
    columns
        .iter()
        .map(|c| {
            values
                .iter()
                .find(|(n, _)| *n == c.name)
                .and_then(|(_, v)| v.clone())
        })
        .collect()
}

fn local(shared: &Shared, db: &Db, node: usize) -> RowSet {
    let columns = cols(
        &[("key", Text)],
        &[],
        &[
            ("bootstrapped", Text),
            ("broadcast_address", Inet),
            ("broadcast_port", Int),
            ("cluster_name", Text),
            ("cql_version", Text),
            ("data_center", Text),
            ("gossip_generation", Int),
            ("host_id", Uuid),
            ("listen_address", Inet),
            ("listen_port", Int),
            ("native_protocol_version", Text),
            ("partitioner", Text),
            ("rack", Text),
            ("release_version", Text),
            ("rpc_address", Inet),
            ("rpc_port", Int),
            ("schema_version", Uuid),
            ("tokens", set_of(Text)),
            ("truncated_at", map_of(Uuid, Blob)),
        ],
    );
    let n = &shared.nodes[node];
    let r = row(
        &columns,
        &[
            ("key", text("local")),
            ("bootstrapped", text("COMPLETED")),
            ("broadcast_address", inet(n.address)),
            ("broadcast_port", int(7000)),
            ("cluster_name", text(&shared.cluster_name)),
            ("cql_version", text(crate::CQL_VERSION)),
            ("data_center", text(&n.datacenter)),
            ("gossip_generation", int(1_700_000_000)),
            ("host_id", uuid(n.host_id)),
            ("listen_address", inet(n.address)),
            ("listen_port", int(7000)),
            ("native_protocol_version", text("5")),
            ("partitioner", text("org.apache.cassandra.dht.Murmur3Partitioner")),
            ("rack", text(&n.rack)),
            ("release_version", text(crate::RELEASE_VERSION)),
            ("rpc_address", inet(n.address)),
            ("rpc_port", int(i32::from(shared.port))),
            ("schema_version", uuid(db.schema_version)),
            ("tokens", tokens_value(&n.tokens)),
        ],
    );
    RowSet {
        keyspace: "system".into(),
        table: "local".into(),
        columns,
        rows: vec![(None, r)],
    }
}

fn peers(shared: &Shared, db: &Db, node: usize, v2: bool) -> RowSet {
    let columns = if v2 {
        cols(
            &[("peer", Inet)],
            &[("peer_port", Int)],
            &[
                ("data_center", Text),
                ("host_id", Uuid),
                ("native_address", Inet),
                ("native_port", Int),
                ("preferred_ip", Inet),
                ("preferred_port", Int),
                ("rack", Text),
                ("release_version", Text),
                ("schema_version", Uuid),
                ("tokens", set_of(Text)),
            ],
        )
    } else {
        cols(
            &[("peer", Inet)],
            &[],
            &[
                ("data_center", Text),
                ("host_id", Uuid),
                ("preferred_ip", Inet),
                ("rack", Text),
                ("release_version", Text),
                ("rpc_address", Inet),
                ("schema_version", Uuid),
                ("tokens", set_of(Text)),
            ],
        )
    };
    let rows = shared
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != node)
        .map(|(_, n)| {
            let r = row(
                &columns,
                &[
                    ("peer", inet(n.address)),
                    ("peer_port", int(7000)),
                    ("data_center", text(&n.datacenter)),
                    ("host_id", uuid(n.host_id)),
                    ("native_address", inet(n.address)),
                    ("native_port", int(i32::from(shared.port))),
                    ("rack", text(&n.rack)),
                    ("release_version", text(crate::RELEASE_VERSION)),
                    ("rpc_address", inet(n.address)),
                    ("schema_version", uuid(db.schema_version)),
                    ("tokens", tokens_value(&n.tokens)),
                ],
            );
            (None, r)
        })
        .collect();
    RowSet {
        keyspace: "system".into(),
        table: if v2 { "peers_v2" } else { "peers" }.into(),
        columns,
        rows,
    }
}

/// Keyspaces every node has besides the user's, with their replication.
const SYSTEM_KEYSPACES: [(&str, &str, Option<&str>); 5] = [
    ("system", "org.apache.cassandra.locator.LocalStrategy", None),
    (
        "system_schema",
        "org.apache.cassandra.locator.LocalStrategy",
        None,
    ),
    (
        "system_auth",
        "org.apache.cassandra.locator.SimpleStrategy",
        Some("1"),
    ),
    (
        "system_distributed",
        "org.apache.cassandra.locator.SimpleStrategy",
        Some("3"),
    ),
    (
        "system_traces",
        "org.apache.cassandra.locator.SimpleStrategy",
        Some("2"),
    ),
];

fn schema_keyspaces(db: &Db) -> RowSet {
    let columns = cols(
        &[("keyspace_name", Text)],
        &[],
        &[("durable_writes", Boolean), ("replication", map_of(Text, Text))],
    );
    let mut rows = Vec::new();
    for (name, class, rf) in SYSTEM_KEYSPACES {
        let mut m = vec![("class".to_string(), class.to_string())];
        if let Some(rf) = rf {
            m.push(("replication_factor".into(), rf.into()));
        }
        let r = row(
            &columns,
            &[
                ("keyspace_name", text(name)),
                ("durable_writes", boolean(true)),
                ("replication", Some(encode_map(&m))),
            ],
        );
        rows.push((None, r));
    }
    for ks in db.keyspaces.values() {
        let mut m = ks.replication.clone();
        m.sort();
        let r = row(
            &columns,
            &[
                ("keyspace_name", text(&ks.name)),
                ("durable_writes", boolean(ks.durable_writes)),
                ("replication", Some(encode_map(&m))),
            ],
        );
        rows.push((None, r));
    }
    rows.sort_by(|a, b| a.1[0].cmp(&b.1[0]));
    RowSet {
        keyspace: "system_schema".into(),
        table: "keyspaces".into(),
        columns,
        rows,
    }
}

fn text_map(pairs: &[(&str, &str)]) -> Option<Bytes> {
    Some(encode_map(pairs))
}

fn schema_tables(db: &Db) -> RowSet {
    let fm = || map_of(Text, Text);
    let columns = cols(
        &[("keyspace_name", Text)],
        &[("table_name", Text)],
        &[
            ("additional_write_policy", Text),
            ("bloom_filter_fp_chance", Double),
            ("caching", fm()),
            ("cdc", Boolean),
            ("comment", Text),
            ("compaction", fm()),
            ("compression", fm()),
            ("crc_check_chance", Double),
            ("dclocal_read_repair_chance", Double),
            ("default_time_to_live", Int),
            ("extensions", map_of(Text, Blob)),
            ("flags", set_of(Text)),
            ("gc_grace_seconds", Int),
            ("id", Uuid),
            ("max_index_interval", Int),
            ("memtable_flush_period_in_ms", Int),
            ("min_index_interval", Int),
            ("read_repair", Text),
            ("read_repair_chance", Double),
            ("speculative_retry", Text),
        ],
    );
    let dbl = |v: f64| Some(Bytes::copy_from_slice(&v.to_be_bytes()));
    let mut rows = Vec::new();
    for ks in db.keyspaces.values() {
        for t in ks.tables.values() {
            let r = row(
                &columns,
                &[
                    ("keyspace_name", text(&ks.name)),
                    ("table_name", text(&t.name)),
                    ("additional_write_policy", text("99p")),
                    ("bloom_filter_fp_chance", dbl(0.01)),
                    (
                        "caching",
                        text_map(&[("keys", "ALL"), ("rows_per_partition", "NONE")]),
                    ),
                    ("cdc", boolean(false)),
                    ("comment", text("")),
                    (
                        "compaction",
                        text_map(&[
                            (
                                "class",
                                "org.apache.cassandra.db.compaction.SizeTieredCompactionStrategy",
                            ),
                            ("max_threshold", "32"),
                            ("min_threshold", "4"),
                        ]),
                    ),
                    (
                        "compression",
                        text_map(&[
                            ("chunk_length_in_kb", "16"),
                            ("class", "org.apache.cassandra.io.compress.LZ4Compressor"),
                        ]),
                    ),
                    ("crc_check_chance", dbl(1.0)),
                    ("dclocal_read_repair_chance", dbl(0.0)),
                    ("default_time_to_live", int(0)),
                    ("extensions", Some(encode_map::<&[u8], &[u8]>(&[]))),
                    ("flags", Some(encode_collection(&["compound"]))),
                    ("gc_grace_seconds", int(864_000)),
                    ("id", uuid(t.id)),
                    ("max_index_interval", int(2048)),
                    ("memtable_flush_period_in_ms", int(0)),
                    ("min_index_interval", int(128)),
                    ("read_repair", text("BLOCKING")),
                    ("read_repair_chance", dbl(0.0)),
                    ("speculative_retry", text("99p")),
                ],
            );
            rows.push((None, r));
        }
    }
    RowSet {
        keyspace: "system_schema".into(),
        table: "tables".into(),
        columns,
        rows,
    }
}

fn schema_columns(db: &Db) -> RowSet {
    let columns = cols(
        &[("keyspace_name", Text)],
        &[("table_name", Text), ("column_name", Text)],
        &[
            ("clustering_order", Text),
            ("column_name_bytes", Blob),
            ("kind", Text),
            ("position", Int),
            ("type", Text),
        ],
    );
    let mut rows = Vec::new();
    for ks in db.keyspaces.values() {
        for t in ks.tables.values() {
            let mut defs: Vec<&Column> = t.columns.iter().collect();
            defs.sort_by(|a, b| a.name.cmp(&b.name));
            for c in defs {
                let (position, order) = match c.kind {
                    Kind::PartitionKey(i) => (i as i32, "none"),
                    Kind::Clustering(i) => (i as i32, "asc"),
                    _ => (-1, "none"),
                };
                let r = row(
                    &columns,
                    &[
                        ("keyspace_name", text(&ks.name)),
                        ("table_name", text(&t.name)),
                        ("column_name", text(&c.name)),
                        ("clustering_order", text(order)),
                        ("column_name_bytes", text(&c.name)),
                        ("kind", text(c.kind.name())),
                        ("position", int(position)),
                        ("type", text(&c.typ.cql_name())),
                    ],
                );
                rows.push((None, r));
            }
        }
    }
    RowSet {
        keyspace: "system_schema".into(),
        table: "columns".into(),
        columns,
        rows,
    }
}

fn empty(keyspace: &str, table: &str, columns: Vec<Column>) -> RowSet {
    RowSet {
        keyspace: keyspace.into(),
        table: table.into(),
        columns,
        rows: Vec::new(),
    }
}

/// The system table `keyspace.table` as seen from `node`, if there is one.
pub fn system_table(shared: &Shared, db: &Db, node: usize, keyspace: &str, table: &str) -> Option<RowSet> {
    let ks = || ("keyspace_name", Text);
    let lt = || list_of(Text);
    Some(match (keyspace, table) {
        ("system", "local") => local(shared, db, node),
        ("system", "peers") => peers(shared, db, node, false),
        ("system", "peers_v2") => peers(shared, db, node, true),
        ("system_schema", "keyspaces") => schema_keyspaces(db),
        ("system_schema", "tables") => schema_tables(db),
        ("system_schema", "columns") => schema_columns(db),
        ("system_schema", "types") => empty(
            keyspace,
            table,
            cols(
                &[ks()],
                &[("type_name", Text)],
                &[("field_names", lt()), ("field_types", lt())],
            ),
        ),
        ("system_schema", "functions") => empty(
            keyspace,
            table,
            cols(
                &[ks()],
                &[("function_name", Text), ("argument_types", lt())],
                &[
                    ("argument_names", lt()),
                    ("body", Text),
                    ("called_on_null_input", Boolean),
                    ("language", Text),
                    ("return_type", Text),
                ],
            ),
        ),
        ("system_schema", "aggregates") => empty(
            keyspace,
            table,
            cols(
                &[ks()],
                &[("aggregate_name", Text), ("argument_types", lt())],
                &[
                    ("final_func", Text),
                    ("initcond", Text),
                    ("return_type", Text),
                    ("state_func", Text),
                    ("state_type", Text),
                ],
            ),
        ),
        ("system_schema", "triggers") => empty(
            keyspace,
            table,
            cols(
                &[ks()],
                &[("table_name", Text), ("trigger_name", Text)],
                &[("options", map_of(Text, Text))],
            ),
        ),
        ("system_schema", "views") => empty(
            keyspace,
            table,
            cols(
                &[ks()],
                &[("view_name", Text)],
                &[
                    ("base_table_id", Uuid),
                    ("base_table_name", Text),
                    ("include_all_columns", Boolean),
                    ("where_clause", Text),
                ],
            ),
        ),
        ("system_schema", "indexes") => empty(
            keyspace,
            table,
            cols(
                &[ks()],
                &[("table_name", Text), ("index_name", Text)],
                &[("kind", Text), ("options", map_of(Text, Text))],
            ),
        ),
        ("system_virtual_schema", "keyspaces") => empty(keyspace, table, cols(&[ks()], &[], &[])),
        ("system_virtual_schema", "tables") => empty(
            keyspace,
            table,
            cols(&[ks()], &[("table_name", Text)], &[("comment", Text)]),
        ),
        ("system_virtual_schema", "columns") => empty(
            keyspace,
            table,
            cols(
                &[ks()],
                &[("table_name", Text), ("column_name", Text)],
                &[
                    ("clustering_order", Text),
                    ("column_name_bytes", Blob),
                    ("kind", Text),
                    ("position", Int),
                    ("type", Text),
                ],
            ),
        ),
        _ => return None,
    })
}

/// Whether a keyspace belongs to the server, not the user.
pub fn is_system_keyspace(name: &str) -> bool {
    SYSTEM_KEYSPACES.iter().any(|(k, _, _)| *k == name) || name == "system_virtual_schema"
}
