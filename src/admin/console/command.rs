//! Parsing and running one console command (a simple-protocol query).

use bytes::BytesMut;
use sluice_postgres::server::{self, ErrorFields};
use tracing::{info, warn};

use super::show::{self, Table};
use super::{Access, Console, ServerCommand};

/// What the console connection does after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The connection ends (SHUTDOWN).
    Close,
}

/// The SQLSTATE of every console error: PgBouncer answers every console error with 08P01.
const CONSOLE_ERROR: &str = "08P01";

/// Settings some drivers SET on every connection; accepted and ignored, as PgBouncer does.
const IGNORED_SETTINGS: &[&str] = &[
    "client_encoding",
    "default_transaction_isolation",
    "standard_conforming_strings",
    "datestyle",
    "timezone",
    "extra_float_digits",
    "application_name",
];

/// The help text of `SHOW HELP`.
const HELP: &str = "\
SHOW POOLS|CLIENTS|SERVERS|STATS|DATABASES|USERS|CONFIG|VERSION|LISTS|NODES|RING|HELP
PAUSE [db]
RESUME [db]
RECONNECT [db]
RELOAD
SHUTDOWN";

/// A parsed command.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Empty,
    Show(String),
    Pause(Option<String>),
    Resume(Option<String>),
    Reconnect(Option<String>),
    Reload,
    Shutdown,
    Set(String),
}

/// One word or a double-quoted identifier (`""` inside quotes is one quote).
fn words(sql: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = sql.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&c) = chars.peek() else { return Some(out) };
        let mut w = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.next_if_eq(&'"').is_some() => w.push('"'),
                    '"' => break,
                    c => w.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                w.push(c);
            }
            // Unquoted names fold to lower case, as in SQL.
            w = w.to_lowercase();
        }
        out.push(w);
    }
}

fn parse(sql: &str) -> Result<Command, ()> {
    let sql = sql.trim();
    let sql = sql.strip_suffix(';').unwrap_or(sql).trim_end();
    let w = words(sql).ok_or(())?;
    let arg = |w: &[String]| -> Result<Option<String>, ()> {
        match w {
            [_] => Ok(None),
            [_, db] => Ok(Some(db.clone())),
            _ => Err(()),
        }
    };
    let Some(first) = w.first() else {
        return Ok(Command::Empty);
    };
    Ok(match first.as_str() {
        "show" if w.len() == 2 => Command::Show(w[1].clone()),
        "pause" => Command::Pause(arg(&w)?),
        "resume" => Command::Resume(arg(&w)?),
        "reconnect" => Command::Reconnect(arg(&w)?),
        "reload" if w.len() == 1 => Command::Reload,
        "shutdown" if w.len() == 1 => Command::Shutdown,
        "set" if w.len() >= 2 => Command::Set(w[1].split('=').next().unwrap_or_default().to_string()),
        _ => return Err(()),
    })
}

fn error(out: &mut BytesMut, message: &str) {
    server::error_response(
        out,
        &ErrorFields {
            severity: "ERROR",
            code: CONSOLE_ERROR,
            message,
            detail: None,
            hint: None,
        },
    );
}

fn notice(out: &mut BytesMut, message: &str, detail: Option<&str>) {
    server::notice_response(
        out,
        &ErrorFields {
            severity: "NOTICE",
            code: "00000",
            message,
            detail,
            hint: None,
        },
    );
}

fn table(out: &mut BytesMut, t: &Table) {
    server::row_description(out, &t.columns);
    for row in &t.rows {
        server::data_row(out, row);
    }
    server::command_complete(out, "SHOW");
}

/// Runs `sql` as `user` with `access`, appending the reply (without ReadyForQuery) to `out`.
pub async fn run(console: &Console, user: &str, access: Access, sql: &str, out: &mut BytesMut) -> Flow {
    let Ok(command) = parse(sql) else {
        error(out, &format!("invalid command '{}', use SHOW HELP;", sql.trim()));
        return Flow::Continue;
    };
    let admin_only = !matches!(command, Command::Show(_) | Command::Empty | Command::Set(_));
    if admin_only && access != Access::Admin {
        error(out, "admin access needed");
        return Flow::Continue;
    }
    match command {
        Command::Empty => server::empty_query_response(out),
        Command::Show(what) => {
            let t = match what.as_str() {
                "pools" => show::pools(console),
                "clients" => show::clients(console),
                "servers" => show::servers(console),
                "stats" => show::stats(console),
                "databases" => show::databases(console),
                "users" => show::users(console),
                "config" => show::config(console),
                "version" => show::version(),
                "lists" => show::lists(console),
                "nodes" => show::nodes(console),
                "ring" => show::ring(console),
                "help" => {
                    notice(out, "Console usage", Some(HELP));
                    server::command_complete(out, "SHOW");
                    return Flow::Continue;
                }
                other => {
                    error(out, &format!("unknown SHOW command '{other}', use SHOW HELP;"));
                    return Flow::Continue;
                }
            };
            table(out, &t);
        }
        Command::Set(key) if IGNORED_SETTINGS.contains(&key.as_str()) => {
            notice(out, "SET ignored", None);
            server::command_complete(out, "SET");
        }
        Command::Set(key) => error(
            out,
            &format!("unknown setting '{key}' (the console sets nothing)"),
        ),
        Command::Pause(db) => {
            info!(%user, database = db.as_deref().unwrap_or("(all)"), "console: PAUSE");
            match console.pause(db.as_deref()).await {
                Ok(()) => {
                    info!(
                        database = db.as_deref().unwrap_or("(all)"),
                        "paused: no transaction in flight"
                    );
                    server::command_complete(out, "PAUSE");
                }
                Err(e) => {
                    warn!(error = %e, "console: PAUSE did not complete");
                    error(out, &e);
                }
            }
        }
        Command::Resume(db) => {
            info!(%user, database = db.as_deref().unwrap_or("(all)"), "console: RESUME");
            match console.resume(db.as_deref()) {
                Ok(()) => server::command_complete(out, "RESUME"),
                Err(e) => error(out, &e),
            }
        }
        Command::Reconnect(db) => {
            info!(%user, database = db.as_deref().unwrap_or("(all)"), "console: RECONNECT");
            for c in console.view.clusters.load().iter() {
                match &db {
                    Some(d) => c.pools.drain_database(d),
                    None => c.pools.drain_all(),
                }
            }
            server::command_complete(out, "RECONNECT");
        }
        Command::Reload => {
            info!(%user, "console: RELOAD");
            let (tx, rx) = tokio::sync::oneshot::channel();
            let result = match console.send(ServerCommand::Reload(tx)) {
                Ok(()) => rx
                    .await
                    .unwrap_or_else(|_| Err(vec!["sluice is shutting down".into()])),
                Err(e) => Err(vec![e]),
            };
            match result {
                Ok(()) => server::command_complete(out, "RELOAD"),
                Err(errors) => error(
                    out,
                    &format!(
                        "RELOAD failed, the running configuration stays: {}",
                        errors.join("; ")
                    ),
                ),
            }
        }
        Command::Shutdown => {
            info!(%user, "console: SHUTDOWN");
            return match console.send(ServerCommand::Shutdown) {
                Ok(()) => {
                    server::command_complete(out, "SHUTDOWN");
                    Flow::Close
                }
                Err(e) => {
                    error(out, &e);
                    Flow::Continue
                }
            };
        }
    }
    Flow::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_like_pgbouncers() {
        assert_eq!(parse("SHOW POOLS;"), Ok(Command::Show("pools".into())));
        assert_eq!(parse("  show\tStats  ; "), Ok(Command::Show("stats".into())));
        assert_eq!(parse("PAUSE"), Ok(Command::Pause(None)));
        assert_eq!(parse("pause app"), Ok(Command::Pause(Some("app".into()))));
        assert_eq!(
            parse("RESUME \"My\"\"Db\""),
            Ok(Command::Resume(Some("My\"Db".into())))
        );
        assert_eq!(parse("reconnect"), Ok(Command::Reconnect(None)));
        assert_eq!(parse("RELOAD;"), Ok(Command::Reload));
        assert_eq!(parse("SHUTDOWN"), Ok(Command::Shutdown));
        assert_eq!(parse(""), Ok(Command::Empty));
        assert_eq!(parse(";"), Ok(Command::Empty));
        assert_eq!(
            parse("SET client_encoding = 'UTF8'"),
            Ok(Command::Set("client_encoding".into()))
        );
        assert_eq!(parse("set DateStyle='ISO'"), Ok(Command::Set("datestyle".into())));
        assert_eq!(parse("SELECT 1"), Err(()));
        assert_eq!(parse("PAUSE a b"), Err(()));
        assert_eq!(parse("SHOW"), Err(()));
        assert_eq!(parse("RESUME \"open"), Err(()));
    }
}
