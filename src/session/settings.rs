//! Session settings under transaction pooling: what a client has SET is replayed on whichever
//! backend it gets next.
//!
//! A client's settings start as the parameters of its startup packet (application_name,
//! DateStyle, `options=-c ...`). After any request that ran SET, RESET or DISCARD, sluice asks
//! the backend for its session-level settings (`pg_settings` with `source = 'session'`), which
//! is exact whatever the SQL looked like, including SETs inside transactions that rolled back.
//! When the client gets a backend whose settings differ, sluice sends `RESET ALL` and the
//! client's values with `set_config` first and swallows the answers.

use std::sync::Arc;

/// Session settings as (name, value) pairs, sorted by name. Shared between a client and the
/// backends that currently carry the same values.
pub type Settings = Arc<Vec<(String, String)>>;

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "options", "replication"];

/// The query that reads a backend's session-level settings. Its own isolation level, because
/// the session's default may be serializable, which a hot standby refuses.
pub const READ_SETTINGS: &str = "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY; \
     SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' ORDER BY name; COMMIT";

/// The settings a client asked for in its startup packet, including `-c name=value` and
/// `--name=value` in `options`.
pub fn from_startup(params: &[(String, String)]) -> Settings {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |name: &str, value: &str| {
        let name = name.to_ascii_lowercase();
        out.retain(|(n, _)| *n != name);
        out.push((name, value.to_string()));
    };
    for (k, v) in params {
        if k == "options" {
            for (name, value) in parse_options(v) {
                set(&name, &value);
            }
        } else if !NOT_SETTINGS.contains(&k.as_str()) && !k.starts_with("_pq_.") {
            set(k, v);
        }
    }
    out.sort();
    Arc::new(out)
}

/// `-c name=value`, `-cname=value` and `--name=value` from a libpq `options` string.
/// Backslash escapes a space, as in libpq.
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let assignment = if w == "-c" {
            it.next()
        } else {
            w.strip_prefix("-c")
                .or_else(|| w.strip_prefix("--"))
                .map(str::to_string)
        };
        if let Some((n, v)) = assignment.as_deref().and_then(|a| a.split_once('=')) {
            out.push((n.replace('-', "_"), v.to_string()));
        }
    }
    out
}

/// The simple queries that make a backend's session settings equal to `settings`: `RESET ALL`
/// first, on its own, so that the `set_config` transaction starts from the defaults (a
/// previous client's `default_transaction_isolation = serializable` would make it fail on a
/// hot standby).
pub fn replay_sql(settings: &[(String, String)]) -> Vec<String> {
    let mut out = vec!["RESET ALL".to_string()];
    if !settings.is_empty() {
        let calls: Vec<String> = settings
            .iter()
            .map(|(name, value)| {
                format!(
                    "pg_catalog.set_config({}, {}, false)",
                    literal(name),
                    literal(value)
                )
            })
            .collect();
        out.push(format!("SELECT {}", calls.join(", ")));
    }
    out
}

/// Whether these settings make every transaction serializable, which a hot standby refuses.
pub fn serializable(settings: &[(String, String)]) -> bool {
    settings.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("default_transaction_isolation") && v.eq_ignore_ascii_case("serializable")
    })
}

/// A string literal that means the same whatever `standard_conforming_strings` is.
fn literal(s: &str) -> String {
    let quoted = s.replace('\'', "''");
    if s.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn startup_parameters_become_settings() {
        let s = from_startup(&p(&[
            ("user", "app"),
            ("database", "app"),
            ("application_name", "psql"),
            ("DateStyle", "ISO"),
            (
                "options",
                "-c search_path=a,b --statement-timeout=5s -cwork_mem=64MB -c x\\ y=1",
            ),
            ("_pq_.extension", "1"),
        ]));
        assert_eq!(
            *s,
            p(&[
                ("application_name", "psql"),
                ("datestyle", "ISO"),
                ("search_path", "a,b"),
                ("statement_timeout", "5s"),
                ("work_mem", "64MB"),
                ("x y", "1"),
            ])
        );
    }

    #[test]
    fn replay_quotes_values() {
        assert_eq!(replay_sql(&[]), ["RESET ALL"]);
        assert_eq!(
            replay_sql(&p(&[("search_path", "it's"), ("x", "a\\b")])),
            [
                "RESET ALL",
                "SELECT pg_catalog.set_config('search_path', 'it''s', false), \
                 pg_catalog.set_config('x', E'a\\\\b', false)"
            ]
        );
        assert!(serializable(&p(&[(
            "default_transaction_isolation",
            "serializable"
        )])));
        assert!(!serializable(&p(&[(
            "default_transaction_isolation",
            "read committed"
        )])));
    }
}
