//! Session settings under transaction pooling: what a client has SET is replayed on whichever
//! backend it gets next.
//!
//! A client's startup parameters (application_name, DateStyle, `options=-c ...`) are not
//! settings here: its backends are opened with exactly those parameters (see
//! `backend::StartupParams`), so the server itself knows them as the session's reset values and
//! `RESET`, `RESET ALL` and `DISCARD ALL` restore them as on a direct connection. After any
//! request that ran SET, RESET, DISCARD or `set_config`, sluice asks the backend for its
//! session-level settings (`pg_settings` with `source = 'session'`, plus the custom `a.b`
//! settings the client named, which `pg_settings` hides), which is exact whatever the SQL looked
//! like, including SETs inside transactions that rolled back. When the client gets a backend
//! whose settings differ — or one another client may have changed — sluice sends `RESET ALL`
//! (and `DISCARD SEQUENCES`, so `currval` shows nothing of another client) and the client's
//! values with `set_config` first, and swallows the answers.

use std::sync::Arc;

use sluice_postgres::quote_literal as literal;

/// Session settings as (name, value) pairs, sorted by name. Shared between a client and the
/// backends that currently carry the same values.
pub type Settings = Arc<Vec<(String, String)>>;

/// No settings, shared: a new session's (a default `Arc` would be one allocation per client).
pub fn none() -> Settings {
    static NONE: std::sync::LazyLock<Settings> = std::sync::LazyLock::new(Settings::default);
    NONE.clone()
}

/// Startup parameters that are not passed on to backends: sluice sets user and database itself,
/// and protocol extensions (`_pq_.*`) are not negotiated through it.
const NOT_PASSED_ON: &[&str] = &["user", "database", "replication"];

/// The startup parameters a client's backends are opened with, in the client's order.
pub fn startup_params(params: &[(String, String)]) -> crate::postgres::backend::StartupParams {
    Arc::new(
        params
            .iter()
            .filter(|(k, _)| !NOT_PASSED_ON.contains(&k.as_str()) && !k.starts_with("_pq_."))
            .cloned()
            .collect(),
    )
}

/// Whether the startup parameters make every transaction serializable (as a parameter or as
/// `-c default_transaction_isolation=serializable` in `options`).
pub fn startup_serializable(params: &[(String, String)]) -> bool {
    let settings: Vec<(String, String)> = params
        .iter()
        .flat_map(|(k, v)| {
            if k == "options" {
                parse_options(v)
            } else {
                vec![(k.to_ascii_lowercase(), v.clone())]
            }
        })
        .collect();
    serializable(&settings)
}

/// The query that reads a backend's session-level settings, and the current values of the
/// custom settings in `custom` (never-set ones read as NULL and are left out). Its own
/// isolation level, because the session's default may be serializable, which a hot standby
/// refuses.
///
/// The `transaction_*` settings show as set in the session inside the capture's own
/// `BEGIN ... READ ONLY`: they belong to that transaction, not to the client. Replayed, they
/// made the client's next write fail with "read-only transaction" (pg_regress `namespace`).
pub fn read_settings_sql(custom: &[String]) -> String {
    let mut sql = String::from(
        "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY; \
         SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' \
         AND name NOT IN ('transaction_isolation', 'transaction_read_only', 'transaction_deferrable')",
    );
    if !custom.is_empty() {
        let names: Vec<String> = custom.iter().map(|n| literal(n)).collect();
        sql.push_str(&format!(
            " UNION ALL SELECT n, v FROM (SELECT n, pg_catalog.current_setting(n, true) AS v \
             FROM pg_catalog.unnest(ARRAY[{}]::text[]) AS n) AS c WHERE v IS NOT NULL",
            names.join(", ")
        ));
    }
    sql.push_str(" ORDER BY 1; COMMIT");
    sql
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
/// hot standby). `foreign`: the backend last served another client, whose sequence values
/// (`currval`, `lastval`) must not be visible either.
pub fn replay_sql(settings: &[(String, String)], foreign: bool) -> Vec<String> {
    let reset = if foreign {
        "RESET ALL; DISCARD SEQUENCES"
    } else {
        "RESET ALL"
    };
    let mut out = vec![reset.to_string()];
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
    fn startup_parameters_pass_on() {
        let params = p(&[
            ("user", "app"),
            ("database", "app"),
            ("application_name", "psql"),
            ("DateStyle", "ISO"),
            (
                "options",
                "-c search_path=a,b --default-transaction-isolation=serializable",
            ),
            ("_pq_.extension", "1"),
        ]);
        assert_eq!(
            *startup_params(&params),
            p(&[
                ("application_name", "psql"),
                ("DateStyle", "ISO"),
                (
                    "options",
                    "-c search_path=a,b --default-transaction-isolation=serializable"
                ),
            ])
        );
        assert!(startup_serializable(&params));
        assert!(!startup_serializable(&p(&[(
            "options",
            "-c x\\ y=1 -cwork_mem=64MB"
        )])));
        assert_eq!(
            parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=64MB -c x\\ y=1"),
            p(&[
                ("search_path", "a,b"),
                ("statement_timeout", "5s"),
                ("work_mem", "64MB"),
                ("x y", "1"),
            ])
        );
    }

    #[test]
    fn custom_settings_are_read_by_name() {
        let sql = read_settings_sql(&["app.tenant_id".to_string()]);
        assert!(sql.contains("ARRAY['app.tenant_id']::text[]"), "{sql}");
        assert!(!read_settings_sql(&[]).contains("unnest"));
    }

    #[test]
    fn replay_quotes_values() {
        assert_eq!(replay_sql(&[], false), ["RESET ALL"]);
        assert_eq!(replay_sql(&[], true), ["RESET ALL; DISCARD SEQUENCES"]);
        assert_eq!(
            replay_sql(&p(&[("search_path", "it's"), ("x", "a\\b")]), false),
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
