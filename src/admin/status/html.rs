//! The status page (`GET /` on the admin listener): one server-rendered HTML page that the
//! browser reloads every 2 s. No scripts; every string that comes from outside sluice (node
//! names, addresses, errors, user and database names) is escaped.

use std::fmt::{self, Display, Write};

use super::{ClusterView, NodeRow, PoolRow, RingRow};

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2630;background:#f7f8fa}\
header{display:flex;align-items:baseline;gap:1em}h1{margin:0 0 .3em}\
header span,.meta{color:#5b6672}\
section{background:#fff;border:1px solid #d9dee4;border-radius:6px;padding:.4em 1.2em 1em;margin:1em 0}\
h2 .tag{font-size:.6em;font-weight:normal;border:1px solid #9aa5b1;border-radius:3px;padding:0 .4em;vertical-align:middle}\
h3{margin:1em 0 .3em;font-size:1em}\
table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:.25em .6em;border-bottom:1px solid #e6e9ed;white-space:nowrap}\
th{font-weight:600;color:#5b6672}td.num,th.num{text-align:right}\
.role{border-radius:3px;padding:0 .4em}.role.primary{background:#dbe9ff}.role.replica{background:#e3f4e1}\
.role.stale-primary,.role.read-only-primary,.role.unknown{background:#fde8c8}\
.health.up{color:#1f7a36;font-weight:600}.health.down{color:#b3261e;font-weight:600}\
.error{color:#b3261e;white-space:normal}.empty{color:#5b6672}\
.bar{display:inline-block;width:12em;height:.8em;background:#e6e9ed;border-radius:3px;vertical-align:middle;margin-right:.5em}\
.bar div{height:100%;background:#3b6fd4;border-radius:3px}";

/// The whole page for these clusters.
pub fn render(clusters: &[ClusterView]) -> String {
    let mut out = String::with_capacity(8 * 1024);
    page(&mut out, clusters).expect("writing to a String");
    out
}

fn page(out: &mut String, clusters: &[ClusterView]) -> fmt::Result {
    write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"2\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>sluice status</title><style>{STYLE}</style></head><body>\n\
         <header><h1>sluice</h1><span>{} · refreshes every 2 s · \
         <a href=\"/topology\">/topology</a> · <a href=\"/metrics\">/metrics</a></span></header>\n",
        env!("CARGO_PKG_VERSION")
    )?;
    if clusters.is_empty() {
        out.push_str("<p class=\"empty\">No clusters are configured.</p>\n");
    }
    for c in clusters {
        cluster(out, c)?;
    }
    out.push_str("</body></html>\n");
    Ok(())
}

fn cluster(out: &mut String, c: &ClusterView) -> fmt::Result {
    write!(
        out,
        "<section class=\"cluster\" data-cluster=\"{name}\">\n\
         <h2>{name} <span class=\"tag\">{protocol}</span></h2>\n\
         <p class=\"meta\">listening on {listen}{mode} · {clients} client{plural}</p>\n",
        name = Esc(&c.name),
        protocol = c.protocol,
        listen = Esc(&c.listen),
        mode = c.pool_mode.map(|m| format!(" · {m} pooling")).unwrap_or_default(),
        clients = c.clients,
        plural = if c.clients == 1 { "" } else { "s" },
    )?;
    if let Some(e) = &c.discovery_error {
        writeln!(
            out,
            "<p class=\"error\">discovery failing, serving the last known nodes: {}</p>",
            Esc(e)
        )?;
    }
    nodes(out, &c.nodes, c.protocol == "cql")?;
    if c.protocol == "postgres" {
        pools(out, &c.pools)?;
    } else {
        ring(out, &c.ring)?;
    }
    out.push_str("</section>\n");
    Ok(())
}

fn nodes(out: &mut String, nodes: &[NodeRow], cql: bool) -> fmt::Result {
    out.push_str("<h3>Nodes</h3>\n");
    if nodes.is_empty() {
        out.push_str("<p class=\"empty\">No nodes discovered yet.</p>\n");
        return Ok(());
    }
    writeln!(
        out,
        "<table class=\"nodes\"><thead><tr><th>node</th><th>address</th><th>role</th>\
         <th>health</th><th class=\"num\">lag (WAL)</th><th class=\"num\">lag (time)</th><th>LSN</th><th>zone</th>\
         <th class=\"num\">in flight</th><th class=\"num\">{}</th><th>error</th></tr></thead><tbody>",
        if cql {
            "open connections"
        } else {
            "idle connections"
        }
    )?;
    for n in nodes {
        let health = if n.healthy { "up" } else { "down" };
        writeln!(
            out,
            "<tr class=\"node\" data-node=\"{id}\" data-role=\"{role}\" data-health=\"{health}\">\
             <td>{id}</td><td>{address}</td><td><span class=\"role {role}\">{role}</span></td>\
             <td class=\"health {health}\">{health}</td><td class=\"num\"{lag_title}>{lag}</td><td class=\"num\">{lag_time}</td>\
             <td>{lsn}</td><td>{zone}</td><td class=\"num\">{in_flight}</td>\
             <td class=\"num\">{connections}</td><td class=\"error\">{error}</td></tr>",
            id = Esc(&n.id),
            address = Esc(&n.address),
            role = n.role,
            lag_title = n
                .lag_bytes
                .map(|b| format!(" title=\"{b} bytes of WAL\""))
                .unwrap_or_default(),
            lag = n.lag_bytes.map(bytes).unwrap_or_default(),
            lag_time = n
                .lag_ms
                .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
                .unwrap_or_default(),
            lsn = Esc(n.lsn.as_deref().unwrap_or("")),
            zone = Esc(n.zone.as_deref().unwrap_or("")),
            in_flight = n.in_flight,
            connections = n.connections,
            error = Esc(n.error.as_deref().unwrap_or("")),
        )?;
    }
    out.push_str("</tbody></table>\n");
    Ok(())
}

fn pools(out: &mut String, pools: &[PoolRow]) -> fmt::Result {
    out.push_str("<h3>Pools</h3>\n");
    if pools.is_empty() {
        out.push_str("<p class=\"empty\">No pools yet: no client has logged in.</p>\n");
        return Ok(());
    }
    out.push_str(
        "<table class=\"pools\"><thead><tr><th>database</th><th>user</th>\
         <th class=\"num\">clients active</th><th class=\"num\">clients waiting</th>\
         <th class=\"num\">longest wait</th><th class=\"num\">servers active</th>\
         <th class=\"num\">servers idle</th><th class=\"num\">servers opening</th></tr></thead><tbody>\n",
    );
    for p in pools {
        writeln!(
            out,
            "<tr class=\"pool\" data-database=\"{db}\" data-user=\"{user}\"><td>{db}</td><td>{user}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:.3} s</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            p.clients_active,
            p.clients_waiting,
            p.max_wait_us as f64 / 1e6,
            p.servers_active,
            p.servers_idle,
            p.servers_login,
            db = Esc(&p.database),
            user = Esc(&p.user),
        )?;
    }
    out.push_str("</tbody></table>\n");
    Ok(())
}

fn ring(out: &mut String, ring: &[RingRow]) -> fmt::Result {
    out.push_str("<h3>Ring</h3>\n");
    if ring.is_empty() {
        out.push_str("<p class=\"empty\">The ring is not known yet.</p>\n");
        return Ok(());
    }
    out.push_str(
        "<table class=\"ring\"><thead><tr><th>address</th><th>datacenter</th><th>rack</th>\
         <th>health</th><th class=\"num\">tokens</th><th>token ownership</th></tr></thead><tbody>\n",
    );
    for r in ring {
        let health = if r.up { "up" } else { "down" };
        let percent = r.ownership * 100.0;
        writeln!(
            out,
            "<tr class=\"ring-node\" data-address=\"{address}\"><td>{address}</td><td>{}</td><td>{}</td>\
             <td class=\"health {health}\">{health}</td><td class=\"num\">{}</td>\
             <td><div class=\"bar\"><div style=\"width:{percent:.2}%\"></div></div>{percent:.2}%</td></tr>",
            Esc(&r.datacenter),
            Esc(&r.rack),
            r.tokens,
            address = Esc(&r.address),
        )?;
    }
    out.push_str("</tbody></table>\n");
    Ok(())
}

/// A byte count for people: `0 B`, `512 B`, `1.5 KiB`, `16.0 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Text escaped for HTML content and double- or single-quoted attribute values.
struct Esc<'a>(&'a str);

impl Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '&' => f.write_str("&amp;")?,
                '<' => f.write_str("&lt;")?,
                '>' => f.write_str("&gt;")?,
                '"' => f.write_str("&quot;")?,
                '\'' => f.write_str("&#39;")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str) -> ClusterView {
        ClusterView {
            name: name.into(),
            protocol: "postgres",
            listen: "127.0.0.1:6432".into(),
            pool_mode: Some("transaction"),
            clients: 1,
            discovery_error: None,
            nodes: vec![NodeRow {
                id: "pg-<0>".into(),
                address: "127.0.0.1:5432".into(),
                role: "replica",
                healthy: false,
                lag_bytes: Some(3 * 1024 * 1024),
                lag_ms: Some(2500),
                lsn: Some("0/3000060".into()),
                timeline: None,
                zone: None,
                in_flight: 0,
                connections: 2,
                error: Some("connection refused <script>alert('x')</script> & \"more\"".into()),
            }],
            pools: vec![PoolRow {
                database: "app".into(),
                user: "o'brien".into(),
                clients_active: 1,
                ..PoolRow::default()
            }],
            ring: Vec::new(),
        }
    }

    #[test]
    fn strings_from_outside_are_escaped() {
        let page = render(&[cluster("a\"b")]);
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;more&quot;"));
        assert!(page.contains("data-node=\"pg-&lt;0&gt;\""), "{page}");
        assert!(page.contains("data-cluster=\"a&quot;b\""), "{page}");
        assert!(page.contains("o&#39;brien"), "{page}");
        assert!(page.contains("<meta http-equiv=\"refresh\" content=\"2\">"));
        assert!(page.contains("data-health=\"down\""));
        assert!(page.contains("3.0 MiB"));
        assert!(page.contains("2.5 s"));
    }

    #[test]
    fn the_ring_is_drawn_as_bars() {
        let mut c = cluster("ring");
        c.protocol = "cql";
        c.ring = vec![RingRow {
            address: "10.0.0.1:9042".into(),
            datacenter: "dc1".into(),
            rack: "r1".into(),
            up: true,
            tokens: 16,
            ownership: 1.0 / 3.0,
        }];
        let page = render(&[c]);
        assert!(page.contains("style=\"width:33.33%\""), "{page}");
        assert!(!page.contains("<h3>Pools</h3>"));
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(16 << 20), "16.0 MiB");
    }
}
