//! The console's SHOW commands: result sets with PgBouncer's column names and meanings where
//! PgBouncer has the column, plus a `cluster` column (one sluice serves several clusters) and
//! sluice's own `SHOW NODES` and `SHOW RING`.

use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use sluice_postgres::server::ColumnType::{self, Int8, Text};

use super::Console;
use crate::admin::status::{self, pool_mode};
use crate::postgres::activity::now_micros;

/// A result set: column names and types, and rows of text values (`None` is NULL).
pub struct Table {
    pub columns: Vec<(&'static str, ColumnType)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl Table {
    fn new(columns: &[(&'static str, ColumnType)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<Option<String>>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }
}

/// A text value.
fn s(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

/// PgBouncer's timestamp format (`2026-01-02 03:04:05 UTC`) for microseconds since the epoch.
fn timestamp(micros: u64) -> Option<String> {
    if micros == 0 {
        return None;
    }
    let t = UNIX_EPOCH + Duration::from_micros(micros);
    let text = humantime::format_rfc3339_seconds(t).to_string();
    Some(text.replacen('T', " ", 1).replace('Z', " UTC"))
}

/// Host and port of `address` ("host:port").
fn host_port(address: &str) -> (Option<String>, Option<String>) {
    match address.rsplit_once(':') {
        Some((h, p)) => (s(h.trim_matches(['[', ']'])), s(p)),
        None => (s(address), None),
    }
}

/// `SHOW POOLS`: one row per (cluster, database, user), over every node of the cluster.
pub fn pools(console: &Console) -> Table {
    let mut t = Table::new(&[
        ("database", Text),
        ("user", Text),
        ("cl_active", Int8),
        ("cl_waiting", Int8),
        ("cl_active_cancel_req", Int8),
        ("cl_waiting_cancel_req", Int8),
        ("sv_active", Int8),
        ("sv_active_cancel", Int8),
        ("sv_being_canceled", Int8),
        ("sv_idle", Int8),
        ("sv_used", Int8),
        ("sv_tested", Int8),
        ("sv_login", Int8),
        ("maxwait", Int8),
        ("maxwait_us", Int8),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
        ("cluster", Text),
    ]);
    for c in console.view.clusters.load().iter() {
        for r in status::pg_pools(c) {
            t.push(vec![
                s(r.database),
                s(r.user),
                s(r.clients_active),
                s(r.clients_waiting),
                s(0),
                s(0),
                s(r.servers_active),
                s(0),
                s(0),
                s(r.servers_idle),
                s(0),
                s(0),
                s(r.servers_login),
                s(r.max_wait_us / 1_000_000),
                s(r.max_wait_us % 1_000_000),
                s(pool_mode(c.pg.pool_mode)),
                None,
                s(&c.config.name),
            ]);
        }
    }
    t
}

/// The columns PgBouncer shows for clients and servers (`SHOW CLIENTS`, `SHOW SERVERS`).
const SOCKET_COLUMNS: &[(&str, ColumnType)] = &[
    ("type", Text),
    ("user", Text),
    ("database", Text),
    ("replication", Text),
    ("state", Text),
    ("addr", Text),
    ("port", Int8),
    ("local_addr", Text),
    ("local_port", Int8),
    ("connect_time", Text),
    ("request_time", Text),
    ("wait", Int8),
    ("wait_us", Int8),
    ("close_needed", Int8),
    ("ptr", Text),
    ("link", Text),
    ("remote_pid", Int8),
    ("tls", Text),
    ("application_name", Text),
    ("prepared_statements", Int8),
    ("id", Int8),
    ("cluster", Text),
];

/// `SHOW CLIENTS`: every logged-in client (console sessions included, as in PgBouncer).
pub fn clients(console: &Console) -> Table {
    let mut t = Table::new(SOCKET_COLUMNS);
    let now = now_micros();
    for c in console.view.clusters.load().iter() {
        for cl in c.activity.clients() {
            let since = cl.wait_since.load(Ordering::Relaxed);
            let active = cl.active.load(Ordering::Relaxed);
            let state = match (since, active) {
                (0, true) => "active",
                (0, false) => "idle",
                _ => "waiting",
            };
            let wait = if since == 0 { 0 } else { now.saturating_sub(since) };
            t.push(vec![
                s("C"),
                s(cl.user()),
                s(cl.database()),
                s("none"),
                s(state),
                s(cl.addr.ip()),
                s(cl.addr.port()),
                cl.local.map(|a| a.ip().to_string()),
                cl.local.map(|a| a.port().to_string()),
                timestamp(u64::from(cl.connect_time) * 1_000_000),
                timestamp(u64::from(cl.request_time.load(Ordering::Relaxed)) * 1_000_000),
                s(wait / 1_000_000),
                s(wait % 1_000_000),
                s(0),
                s(format!("{:#x}", cl.id)),
                s(""),
                s(0),
                s(if cl.tls { "TLS" } else { "" }),
                s(cl.application_name()),
                s(0),
                s(cl.id),
                s(&c.config.name),
            ]);
        }
    }
    t
}

/// `SHOW SERVERS`: every server connection sluice holds (idle in a pool, or with a client).
pub fn servers(console: &Console) -> Table {
    let mut t = Table::new(SOCKET_COLUMNS);
    for c in console.view.clusters.load().iter() {
        for p in c.pools.stats() {
            let (host, port) = host_port(&p.node);
            for sv in p.servers {
                t.push(vec![
                    s("S"),
                    s(&p.user),
                    s(&p.database),
                    s("none"),
                    s(if sv.idle { "idle" } else { "active" }),
                    host.clone(),
                    port.clone(),
                    sv.local.map(|a| a.ip().to_string()),
                    sv.local.map(|a| a.port().to_string()),
                    timestamp(sv.connect_time),
                    None,
                    s(0),
                    s(0),
                    s(u8::from(sv.close_needed)),
                    s(format!("{:#x}", sv.id)),
                    s(""),
                    s(sv.pid),
                    s(if sv.tls { "TLS" } else { "" }),
                    s(""),
                    s(sv.prepared),
                    s(sv.id),
                    s(&c.config.name),
                ]);
            }
        }
    }
    t
}

/// `SHOW STATS`: per (cluster, database) totals since start and averages of the last stats
/// period (60 s).
pub fn stats(console: &Console) -> Table {
    let mut t = Table::new(&[
        ("database", Text),
        ("total_xact_count", Int8),
        ("total_query_count", Int8),
        ("total_server_assignment_count", Int8),
        ("total_received", Int8),
        ("total_sent", Int8),
        ("total_xact_time", Int8),
        ("total_wait_time", Int8),
        ("avg_xact_count", Int8),
        ("avg_query_count", Int8),
        ("avg_server_assignment_count", Int8),
        ("avg_recv", Int8),
        ("avg_sent", Int8),
        ("avg_xact_time", Int8),
        ("avg_wait_time", Int8),
        ("cluster", Text),
    ]);
    for c in console.view.clusters.load().iter() {
        for d in c.activity.databases() {
            let total = d.totals.read();
            let avg = d.averages();
            t.push(vec![
                s(&d.name),
                s(total.xacts),
                s(total.queries),
                s(total.assignments),
                s(total.received),
                s(total.sent),
                s(total.xact_us),
                s(total.wait_us),
                s(avg.xact_count),
                s(avg.query_count),
                s(avg.server_assignment_count),
                s(avg.recv),
                s(avg.sent),
                s(avg.xact_time),
                s(avg.wait_time),
                s(&c.config.name),
            ]);
        }
    }
    t
}

/// `SHOW DATABASES`: each database clients have used, per cluster; `host`/`port` are the
/// current primary's.
pub fn databases(console: &Console) -> Table {
    let mut t = Table::new(&[
        ("name", Text),
        ("host", Text),
        ("port", Int8),
        ("database", Text),
        ("force_user", Text),
        ("pool_size", Int8),
        ("min_pool_size", Int8),
        ("reserve_pool_size", Int8),
        ("server_lifetime", Int8),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
        ("max_connections", Int8),
        ("current_connections", Int8),
        ("max_client_connections", Int8),
        ("current_client_connections", Int8),
        ("paused", Int8),
        ("disabled", Int8),
        ("cluster", Text),
    ]);
    for c in console.view.clusters.load().iter() {
        let snap = c.topology.load();
        let (host, port) = snap
            .primary()
            .map_or((None, None), |i| host_port(&snap.nodes[i].address));
        let pools = c.pools.stats();
        let clients = c.activity.clients();
        for d in c.activity.databases() {
            let servers: usize = pools
                .iter()
                .filter(|p| p.database == d.name)
                .map(|p| p.active + p.idle + p.connecting)
                .sum();
            let connected = clients.iter().filter(|cl| cl.database() == d.name).count();
            t.push(vec![
                s(&d.name),
                host.clone(),
                port.clone(),
                s(&d.name),
                None,
                s(c.pg.pool_size),
                s(0),
                s(0),
                s(c.pg.max_lifetime.as_secs()),
                s(pool_mode(c.pg.pool_mode)),
                None,
                s(0),
                s(servers),
                s(c.config.max_client_connections),
                s(connected),
                s(u8::from(console.paused(&d.name))),
                s(0),
                s(&c.config.name),
            ]);
        }
    }
    t
}

/// `SHOW USERS`: the configured users of each PostgreSQL cluster, and the roles found by
/// `auth_query`.
pub fn users(console: &Console) -> Table {
    let mut t = Table::new(&[
        ("name", Text),
        ("pool_size", Text),
        ("reserve_pool_size", Text),
        ("pool_mode", Text),
        ("max_user_connections", Int8),
        ("current_connections", Int8),
        ("max_user_client_connections", Int8),
        ("current_client_connections", Int8),
        ("cluster", Text),
    ]);
    for c in console.view.clusters.load().iter() {
        let pools = c.pools.stats();
        let clients = c.activity.clients();
        // Configured users, then the roles auth_query found.
        let names = c
            .config
            .users
            .iter()
            .map(|u| u.name.clone())
            .chain(c.dynamic.names());
        for name in names {
            let servers: usize = pools
                .iter()
                .filter(|p| p.user == name)
                .map(|p| p.active + p.idle + p.connecting)
                .sum();
            let connected = clients.iter().filter(|cl| cl.user() == name).count();
            t.push(vec![
                s(&name),
                s(""),
                s(""),
                None,
                s(0),
                s(servers),
                s(0),
                s(connected),
                s(&c.config.name),
            ]);
        }
    }
    t
}

/// `SHOW CONFIG`: the settings in force (`key` is `admin.…` or `<cluster>.…`).
pub fn config(console: &Console) -> Table {
    let mut t = Table::new(&[
        ("key", Text),
        ("value", Text),
        ("default", Text),
        ("changeable", Text),
    ]);
    let d = |v: Duration| humantime::format_duration(v).to_string();
    let a = console.settings();
    let list = |v: &[String]| v.join(",");
    t.push(vec![
        s("admin.listen"),
        s(a.listen),
        s(crate::config::DEFAULT_ADMIN_LISTEN),
        s("yes"),
    ]);
    t.push(vec![
        s("admin.admin_users"),
        s(list(&a.admin_users)),
        s(""),
        s("yes"),
    ]);
    t.push(vec![
        s("admin.stats_users"),
        s(list(&a.stats_users)),
        s(""),
        s("yes"),
    ]);
    t.push(vec![
        s("admin.pause_timeout"),
        s(d(a.pause_timeout)),
        s("30s"),
        s("yes"),
    ]);
    for c in console.view.clusters.load().iter() {
        let k = &c.config;
        let p = &c.pg;
        let consistency = match p.consistency {
            crate::config::Consistency::Eventual => "eventual",
            crate::config::Consistency::ReadYourWrites => "read-your-writes",
            crate::config::Consistency::Primary => "primary",
        };
        let entries: [(&str, String, &str); 13] = [
            ("listen", k.listen.to_string(), ""),
            ("pool_mode", pool_mode(p.pool_mode).into(), "transaction"),
            ("consistency", consistency.into(), "eventual"),
            ("pool_size", p.pool_size.to_string(), "20"),
            (
                "max_client_connections",
                k.max_client_connections.to_string(),
                "10000",
            ),
            ("checkout_timeout", d(p.checkout_timeout), "5s"),
            ("connect_timeout", d(k.connect_timeout), "3s"),
            ("login_timeout", d(k.login_timeout), "10s"),
            ("idle_timeout", d(p.idle_timeout), "10m"),
            ("max_lifetime", d(p.max_lifetime), "1h"),
            ("probe_interval", d(k.probe_interval), "1s"),
            ("failover_wait", d(p.failover_wait), "5s"),
            ("write_hold", p.write_hold.map_or_else(|| "off".into(), d), "off"),
        ];
        for (key, value, default) in entries {
            // A changed cluster setting takes effect by RELOAD (the cluster is rebuilt).
            t.push(vec![
                s(format!("{}.{key}", k.name)),
                s(value),
                s(default),
                s("yes"),
            ]);
        }
    }
    t
}

/// `SHOW VERSION`.
pub fn version() -> Table {
    let mut t = Table::new(&[("version", Text)]);
    t.push(vec![s(format!("sluice {}", env!("CARGO_PKG_VERSION")))]);
    t
}

/// `SHOW LISTS`: counts, as (list, items) rows.
pub fn lists(console: &Console) -> Table {
    let mut t = Table::new(&[("list", Text), ("items", Int8)]);
    let clusters = console.view.clusters.load();
    let mut databases = 0;
    let mut users = 0;
    let mut pools = 0;
    let mut used_clients = 0;
    let mut login_clients = 0;
    let mut used_servers = 0;
    let mut nodes = 0;
    for c in clusters.iter() {
        databases += c.activity.databases().len();
        users += c.config.users.len();
        let stats = c.pools.stats();
        pools += stats.len();
        used_servers += stats.iter().map(|p| p.servers.len()).sum::<usize>();
        let logged_in = c.activity.clients().len();
        used_clients += logged_in;
        login_clients += c.clients.load(Ordering::Relaxed).saturating_sub(logged_in);
        nodes += c.topology.load().nodes.len();
    }
    for (name, n) in [
        ("databases", databases),
        ("users", users),
        ("pools", pools),
        ("free_clients", 0),
        ("used_clients", used_clients),
        ("login_clients", login_clients),
        ("free_servers", 0),
        ("used_servers", used_servers),
        ("clusters", clusters.len() + console.view.cql.load().len()),
        ("nodes", nodes),
    ] {
        t.push(vec![s(name), s(n)]);
    }
    t
}

/// `SHOW NODES`: every node of every cluster with its role, health, replication lag and zone.
pub fn nodes(console: &Console) -> Table {
    let mut t = Table::new(&[
        ("cluster", Text),
        ("id", Text),
        ("address", Text),
        ("role", Text),
        ("healthy", Text),
        ("lag_bytes", Int8),
        ("lsn", Text),
        ("timeline", Int8),
        ("zone", Text),
        ("in_flight", Int8),
        ("idle_connections", Int8),
        ("error", Text),
    ]);
    let clusters = console.view.clusters.load();
    let cql = console.view.cql.load();
    let all = clusters
        .iter()
        .map(|c| (&c.config.name, status::pg_nodes(c)))
        .chain(cql.iter().map(|c| (&c.config.name, status::cql_nodes(c))));
    for (cluster, nodes) in all {
        for n in nodes {
            t.push(vec![
                s(cluster),
                s(n.id),
                s(n.address),
                s(n.role),
                s(if n.healthy { "yes" } else { "no" }),
                n.lag_bytes.map(|l| l.to_string()),
                n.lsn,
                n.timeline.map(|x| x.to_string()),
                n.zone,
                s(n.in_flight),
                s(n.connections),
                n.error,
            ]);
        }
    }
    t
}

/// `SHOW RING`: the nodes of each CQL cluster with their tokens and the share of the token
/// range they own (each token owns the range from the previous token, exclusive, to itself).
pub fn ring(console: &Console) -> Table {
    let mut t = Table::new(&[
        ("cluster", Text),
        ("address", Text),
        ("datacenter", Text),
        ("rack", Text),
        ("up", Text),
        ("tokens", Int8),
        ("ownership", Text),
    ]);
    for c in console.view.cql.load().iter() {
        for r in status::cql_ring(c) {
            t.push(vec![
                s(&c.config.name),
                s(r.address),
                s(r.datacenter),
                s(r.rack),
                s(if r.up { "yes" } else { "no" }),
                s(r.tokens),
                s(format!("{:.2}%", r.ownership * 100.0)),
            ]);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_look_like_pgbouncers() {
        assert_eq!(timestamp(0), None);
        assert_eq!(timestamp(1_000_000).as_deref(), Some("1970-01-01 00:00:01 UTC"));
    }

    #[test]
    fn host_and_port_split() {
        assert_eq!(host_port("127.0.0.1:5432"), (s("127.0.0.1"), s("5432")));
        assert_eq!(host_port("[::1]:5432"), (s("::1"), s("5432")));
    }
}
