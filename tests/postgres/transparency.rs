//! A client must not be able to tell sluice from a direct connection: session settings that are
//! its own (and only its own), the login it would get from the primary, one error per death,
//! PostgreSQL's rules for prepared statement names, cancels that reach queued queries.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::raw::{query, read_until_ready, sqlstate, tags, Reply};
use crate::support::{bounded, describe, exec, simple_column, simple_rows};
use crate::Env;

/// Logs in over a raw socket as `user` with these extra startup parameters; returns the stream
/// and every message up to the first ReadyForQuery (ParameterStatus among them).
async fn raw_login_with(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
    params: &[(&str, &str)],
) -> (TcpStream, Vec<Reply>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut all = vec![("user", user), ("database", db)];
    all.extend_from_slice(params);
    let mut out = BytesMut::new();
    frontend::startup_message(all.iter().copied(), &mut out).unwrap();
    stream.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    let mut seen = Vec::new();
    loop {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() < 1 + len {
                break;
            }
            let raw = buf.split_to(1 + len);
            let mut one = BytesMut::from(&raw[..]);
            let msg = Message::parse(&mut one).expect("parse").expect("whole message");
            let mut reply = BytesMut::new();
            match msg {
                Message::AuthenticationSasl(_) => {
                    frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut reply).unwrap()
                }
                Message::AuthenticationSaslContinue(body) => {
                    scram.update(body.data()).expect("server-first message");
                    frontend::sasl_response(scram.message(), &mut reply).unwrap();
                }
                Message::AuthenticationSaslFinal(body) => scram.finish(body.data()).expect("signature"),
                Message::ReadyForQuery(_) => {
                    seen.push((raw[0], raw[5..].to_vec()));
                    return (stream, seen);
                }
                Message::ErrorResponse(_) => panic!("login refused: {:?}", String::from_utf8_lossy(&raw)),
                _ => {}
            }
            seen.push((raw[0], raw[5..].to_vec()));
            if !reply.is_empty() {
                stream.write_all(&reply).await.unwrap();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read_buf(&mut buf))
            .await
            .expect("login stalled")
            .expect("read");
        assert!(n > 0, "EOF during login");
    }
}

/// The ParameterStatus pairs among login messages.
fn parameter_statuses(msgs: &[Reply]) -> Vec<(String, String)> {
    msgs.iter()
        .filter(|(t, _)| *t == b'S')
        .map(|(_, body)| {
            let mut parts = body.split(|b| *b == 0);
            let k = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
            let v = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
            (k, v)
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A Bind of `statement` to the unnamed portal, without parameters.
fn bind_no_params(statement: &str, out: &mut BytesMut) {
    let body = [b"\0", statement.as_bytes(), b"\0\0\0\0\0\0\0"].concat();
    out.extend_from_slice(b"B");
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&body);
}

/// The text of the first column of each DataRow.
fn first_column(replies: &[Reply]) -> Vec<Option<String>> {
    replies
        .iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, body)| {
            let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
            (len >= 0).then(|| String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_settings_never_leak_between_clients() {
    let env = Env::start(1, "pool_size = 1\nconsistency = \"primary\"");
    bounded(60, async {
        let a = env.app_client().await;
        let b = env.app_client().await;
        exec(&a, "SET app.tenant_id = 'tenant-A'").await;
        exec(&b, "SELECT set_config('app.tenant_id', 'tenant-B', false)").await;
        for _ in 0..5 {
            assert_eq!(
                simple_column(&a, "SELECT current_setting('app.tenant_id', true)").await,
                ["tenant-A"]
            );
            assert_eq!(
                simple_column(&b, "SELECT current_setting('app.tenant_id', true)").await,
                ["tenant-B"]
            );
        }
        // A client that never set it sees no other client's value on the shared backend.
        let c = env.app_client().await;
        let seen = simple_rows(
            &c,
            "SELECT coalesce(current_setting('app.tenant_id', true), '<null>')",
        )
        .await;
        assert!(seen == [["<null>"]] || seen == [[""]], "{seen:?}");
        // Nor another client's sequence position.
        exec(&a, "CREATE SEQUENCE IF NOT EXISTS leak_seq").await;
        exec(&a, "SELECT nextval('leak_seq')").await;
        let err = c.simple_query("SELECT currval('leak_seq')").await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("55000"), "{err}");
        // RESET puts the client's value back to nothing, as directly.
        exec(&a, "RESET app.tenant_id").await;
        assert_eq!(
            simple_column(&a, "SELECT current_setting('app.tenant_id', true)").await,
            [""]
        );
        assert_eq!(
            simple_column(&b, "SELECT current_setting('app.tenant_id', true)").await,
            ["tenant-B"]
        );
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_and_discard_restore_the_startup_values() {
    for mode in ["transaction", "session"] {
        let env = Env::start(1, &format!("pool_mode = \"{mode}\"\nconsistency = \"primary\""));
        let addr = env.sluice.listen_addr();
        bounded(60, async {
            let params = [
                ("application_name", "myapp"),
                ("TimeZone", "America/Los_Angeles"),
                ("DateStyle", "SQL, DMY"),
                (
                    "options",
                    "-c search_path=pg_catalog,public -c app.origin=startup",
                ),
            ];
            let (mut s, _) = raw_login_with(addr, "app", "app-secret", "app", &params).await;
            let show = "SELECT current_setting('TimeZone'), current_setting('application_name'), \
                        current_setting('DateStyle'), current_setting('search_path'), \
                        current_setting('app.origin', true)";
            let row = |r: &[Reply]| -> Vec<String> {
                let (_, body) = r.iter().find(|(t, _)| *t == b'D').expect("a row");
                let mut out = Vec::new();
                let mut at = 2;
                while at < body.len() {
                    let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap()) as usize;
                    out.push(String::from_utf8_lossy(&body[at + 4..at + 4 + len]).into_owned());
                    at += 4 + len;
                }
                out
            };
            let startup = vec![
                "America/Los_Angeles",
                "myapp",
                "SQL, DMY",
                "pg_catalog,public",
                "startup",
            ];
            assert_eq!(row(&query(&mut s, show).await), startup, "{mode}: at login");
            query(
                &mut s,
                "SET TimeZone = 'UTC'; SET application_name = 'other'; SET DateStyle = 'ISO'",
            )
            .await;
            assert_eq!(
                row(&query(&mut s, show).await)[..3],
                ["UTC", "other", "ISO, DMY"],
                "{mode}"
            );
            for reset in [
                "RESET ALL",
                "DISCARD ALL",
                "RESET TimeZone; RESET application_name; RESET DateStyle",
            ] {
                query(&mut s, "SET TimeZone = 'UTC'; SET application_name = 'other'").await;
                let r = query(&mut s, reset).await;
                assert!(!r.iter().any(|(t, _)| *t == b'E'), "{mode} {reset}: {r:?}");
                assert_eq!(row(&query(&mut s, show).await), startup, "{mode}: after {reset}");
            }
            // And the same on other connections of the pool (several clients in turn).
            for _ in 0..3 {
                let (mut other, _) = raw_login_with(addr, "app", "app-secret", "app", &[]).await;
                query(&mut other, "SET TimeZone = 'Asia/Tokyo'").await;
                assert_eq!(
                    first_column(&query(&mut other, "SHOW application_name").await),
                    [Some(String::new())],
                    "{mode}: a client that set no application_name sees none"
                );
                assert_eq!(
                    row(&query(&mut s, show).await),
                    startup,
                    "{mode}: after another client"
                );
            }
        })
        .await;
        env.sluice.assert_no_unexpected_errors(&[]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_is_the_primarys_and_echoes_the_clients_parameters() {
    let env = Env::start(1, "consistency = \"eventual\"");
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        let (_s, msgs) = raw_login_with(
            addr,
            "app",
            "app-secret",
            "app",
            &[
                ("client_encoding", "'utf-8'"),
                ("application_name", "asyncpg-like"),
            ],
        )
        .await;
        let params = parameter_statuses(&msgs);
        assert_eq!(param(&params, "in_hot_standby"), Some("off"), "{params:?}");
        assert_eq!(param(&params, "default_transaction_read_only"), Some("off"));
        assert_eq!(
            param(&params, "client_encoding"),
            Some("UTF8"),
            "normalised by the server"
        );
        assert_eq!(param(&params, "application_name"), Some("asyncpg-like"));
        let (_s, msgs) = raw_login_with(addr, "app", "app-secret", "app", &[]).await;
        assert_eq!(param(&parameter_statuses(&msgs), "application_name"), Some(""));
    })
    .await;
    // libpq's own check of a read-write primary, and of a standby.
    let port = addr.port();
    let psql = |attrs: &str| {
        std::process::Command::new(crate::support::pg_bin("psql"))
            .args(["-X", "-At", "-c", "SELECT 1"])
            .arg(format!(
                "host=127.0.0.1 port={port} user=app dbname=app target_session_attrs={attrs} connect_timeout=10"
            ))
            .env("PGPASSWORD", "app-secret")
            .output()
            .expect("run psql")
    };
    for attrs in ["read-write", "primary"] {
        let out = psql(attrs);
        assert!(
            out.status.success(),
            "{attrs}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = psql("standby");
    assert!(!out.status.success(), "sluice is not a standby");
    // A database created a moment ago is there at once (the login asks the primary).
    bounded(60, async {
        let su = env.cluster.superuser_client(env.cluster.primary_port()).await;
        exec(&su, "CREATE DATABASE fresh_db OWNER app").await;
        let c = crate::support::connect(addr, "app", "app-secret", "fresh_db").await;
        assert_eq!(simple_column(&c, "SELECT current_database()").await, ["fresh_db"]);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// Parse / Describe / Flush, then Bind / Execute / Sync (asyncpg's pattern), a second Parse of
/// the same name, and one text under two names, in both pool modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_names_follow_postgres_rules() {
    for mode in ["session", "transaction"] {
        let env = Env::start(1, &format!("pool_mode = \"{mode}\"\npool_size = 2"));
        let addr = env.sluice.listen_addr();
        bounded(60, async {
            for _ in 0..5 {
                let (mut s, _) = raw_login_with(addr, "app", "app-secret", "app", &[]).await;
                let mut out = BytesMut::new();
                frontend::parse("stmt_1", "SELECT 1", None, &mut out).unwrap();
                frontend::describe(b'S', "stmt_1", &mut out).unwrap();
                frontend::flush(&mut out);
                s.write_all(&out).await.unwrap();
                let mut got = Vec::new();
                let mut buf = BytesMut::new();
                while got.len() < 3 {
                    tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf))
                        .await
                        .expect("answer to Flush")
                        .unwrap();
                    while buf.len() >= 5 {
                        let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
                        if buf.len() < 1 + len {
                            break;
                        }
                        let m = buf.split_to(1 + len);
                        got.push(m[0]);
                    }
                }
                assert_eq!(got, b"1tT", "{mode}");
                out.clear();
                bind_no_params("stmt_1", &mut out);
                frontend::execute("", 0, &mut out).unwrap();
                frontend::sync(&mut out);
                // The same name again: 42P05 naming the client's name; the same text under a
                // second name works.
                frontend::parse("stmt_1", "SELECT 1", None, &mut out).unwrap();
                frontend::sync(&mut out);
                frontend::parse("stmt_2", "SELECT 1", None, &mut out).unwrap();
                bind_no_params("stmt_2", &mut out);
                frontend::execute("", 0, &mut out).unwrap();
                frontend::sync(&mut out);
                s.write_all(&out).await.unwrap();
                let r = read_until_ready(&mut s, 3).await;
                assert_eq!(tags(&r), "2DCZEZ12DCZ", "{mode}: {r:?}");
                let (_, err) = r.iter().find(|(t, _)| *t == b'E').unwrap();
                assert_eq!(sqlstate(err), "42P05");
                let text = String::from_utf8_lossy(err);
                assert!(
                    text.contains("prepared statement \"stmt_1\" already exists"),
                    "{mode}: {text}"
                );
                assert!(!text.contains("sluice_"), "{text}");
                // SQL EXECUTE sees the protocol-level statement, as directly.
                out.clear();
                frontend::parse("plus_one", "SELECT $1::int + 1", None, &mut out).unwrap();
                frontend::sync(&mut out);
                s.write_all(&out).await.unwrap();
                read_until_ready(&mut s, 1).await;
                let r = query(&mut s, "EXECUTE plus_one(41)").await;
                assert_eq!(first_column(&r), [Some("42".to_string())], "{mode}: {r:?}");
                // ... through the extended protocol too (asyncpg's fetchval('EXECUTE name')),
                // unnamed and under a name of its own.
                for name in ["", "exec_plus_one"] {
                    out.clear();
                    frontend::parse(name, "EXECUTE plus_one(41)", None, &mut out).unwrap();
                    bind_no_params(name, &mut out);
                    frontend::execute("", 0, &mut out).unwrap();
                    frontend::sync(&mut out);
                    s.write_all(&out).await.unwrap();
                    let r = read_until_ready(&mut s, 1).await;
                    assert_eq!(tags(&r), "12DCZ", "{mode} {name:?}: {r:?}");
                    assert_eq!(first_column(&r), [Some("42".to_string())], "{mode}: {r:?}");
                }
                let r = query(&mut s, "DEALLOCATE plus_one").await;
                assert_eq!(tags(&r), "CZ", "{mode}: {r:?}");
            }
        })
        .await;
        env.sluice.assert_no_unexpected_errors(&[]);
    }
}

/// A setting changed by a read (`set_config` in a SELECT, sent to a replica) moves with the
/// client to the primary for its next write, and only that setting: the capture's own
/// `BEGIN READ ONLY` once travelled along as `transaction_read_only = on` and made the write
/// fail (pg_regress `namespace`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_made_by_a_read_does_not_make_the_next_write_read_only() {
    for consistency in ["eventual", "primary"] {
        let env = Env::start(1, &format!("consistency = \"{consistency}\"\npool_size = 2"));
        let addr = env.sluice.listen_addr();
        bounded(60, async {
            for i in 0..10 {
                let c = crate::support::connect(addr, "app", "app-secret", "app").await;
                exec(&c, "SELECT pg_catalog.set_config('search_path', 'public', false)").await;
                exec(
                    &c,
                    &format!("CREATE SCHEMA set_then_write_{i} CREATE TABLE t (a int)"),
                )
                .await;
                assert_eq!(simple_column(&c, "SHOW search_path").await, ["public"]);
                exec(&c, &format!("DROP SCHEMA set_then_write_{i} CASCADE")).await;
                // A read and writes pipelined without waiting: the writes wait for the read's
                // replica to answer, then go to the primary.
                let (mut s, _) = raw_login_with(addr, "app", "app-secret", "app", &[]).await;
                let mut out = BytesMut::new();
                for sql in [
                    "SELECT 1".to_string(),
                    format!("CREATE TABLE piped_{i} (a int)"),
                    format!("DROP TABLE piped_{i}"),
                ] {
                    frontend::query(&sql, &mut out).unwrap();
                }
                s.write_all(&out).await.unwrap();
                let r = read_until_ready(&mut s, 3).await;
                assert_eq!(tags(&r), "TDCZCZCZ", "{consistency}: {r:?}");
            }
        })
        .await;
        env.sluice.assert_no_unexpected_errors(&[]);
    }
}

/// `set_config` with the setting's name as a parameter (row-level security's
/// `set_config($1, $2, false)`): sluice cannot know the name to carry it over, so the client
/// stays on its connection. That connection must be the primary's, read though the statement
/// is: pinned to a replica, every later write of the client failed there with 25006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_named_by_a_parameter_pins_the_client_to_the_primary() {
    let env = Env::start(1, "consistency = \"eventual\"\npool_size = 2");
    bounded(60, async {
        let c = env.app_client().await;
        exec(&c, "CREATE TABLE pinned_writes (tenant text)").await;
        c.query_one(
            "SELECT pg_catalog.set_config($1, $2, false)",
            &[&"app.tenant", &"t1"],
        )
        .await
        .unwrap_or_else(|e| panic!("set_config: {}", describe(&e)));
        for _ in 0..3 {
            c.execute(
                "INSERT INTO pinned_writes SELECT current_setting('app.tenant')",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("a write after set_config($1, ...): {}", describe(&e)));
        }
        let rows = simple_column(&c, "SELECT tenant FROM pinned_writes").await;
        assert_eq!(rows, ["t1", "t1", "t1"]);
        let recovery = simple_column(&c, "SELECT pg_is_in_recovery()").await;
        assert_eq!(recovery, ["f"], "the pinned client reads on the primary");
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// Session mode: the client keeps one server process, so BackendKeyData is that process's own
/// key, as directly: `pg_backend_pid()`, the pid of its own NOTIFY, and `pg_terminate_backend`
/// of it all agree (asyncpg's listener tests, psycopg2's `backend_pid`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_clients_know_their_server_process() {
    let env = Env::start(1, "pool_mode = \"session\"\npool_size = 4");
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        for _ in 0..3 {
            let (mut s, msgs) = raw_login_with(addr, "app", "app-secret", "app", &[]).await;
            let (_, key) = msgs.iter().find(|(t, _)| *t == b'K').expect("BackendKeyData");
            let pid = i32::from_be_bytes(key[..4].try_into().unwrap());
            let r = query(&mut s, "SELECT pg_backend_pid()").await;
            assert_eq!(first_column(&r), [Some(pid.to_string())]);
            let r = query(&mut s, "LISTEN sess_chan; NOTIFY sess_chan, 'hi'").await;
            let (_, note) = r.iter().find(|(t, _)| *t == b'A').expect("own notification");
            assert_eq!(i32::from_be_bytes(note[..4].try_into().unwrap()), pid);
            // Another client terminates this one by the pid it was told.
            let other = crate::support::connect(addr, "app", "app-secret", "app").await;
            let killed = simple_column(&other, &format!("SELECT pg_terminate_backend({pid})")).await;
            assert_eq!(killed, ["t"]);
            let mut all = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
                .await
                .expect("closed")
                .ok();
            let text = String::from_utf8_lossy(&all);
            assert!(text.contains("57P01"), "{text}");
        }
    })
    .await;
}

/// Another client's unnamed statement left on the shared backend stays invisible even when
/// this client's own Parse of the unnamed statement was skipped after an error (differential
/// seed 277): the Bind that follows fails with 26000 as directly, not with the other
/// statement's parameter count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_unnamed_parse_never_exposes_another_clients_statement() {
    let env = Env::start(0, "pool_size = 1");
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        let (mut a, _) = raw_login_with(addr, "app", "app-secret", "app", &[]).await;
        let mut out = BytesMut::new();
        frontend::parse("", "SELECT 1", None, &mut out).unwrap();
        frontend::sync(&mut out);
        a.write_all(&out).await.unwrap();
        assert_eq!(tags(&read_until_ready(&mut a, 1).await), "1Z");
        let (mut b, _) = raw_login_with(addr, "app", "app-secret", "app", &[]).await;
        out.clear();
        bind_no_params("never", &mut out);
        frontend::parse("", "SELECT $1::int", None, &mut out).unwrap();
        frontend::sync(&mut out);
        // One parameter, bound to the unnamed statement the client does not have.
        let body = [&b"\0\0\0\0\0\x01\0\0\0\x011\0\0"[..]].concat();
        out.extend_from_slice(b"B");
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(&body);
        frontend::execute("", 0, &mut out).unwrap();
        frontend::sync(&mut out);
        b.write_all(&out).await.unwrap();
        let r = read_until_ready(&mut b, 2).await;
        assert_eq!(tags(&r), "EZEZ", "{r:?}");
        assert_eq!(sqlstate(&r[0].1), "26000");
        assert_eq!(
            sqlstate(&r[2].1),
            "26000",
            "{:?}",
            String::from_utf8_lossy(&r[2].1)
        );
        drop(a);
    })
    .await;
}

/// A DISCARD ALL the server refuses (inside a transaction block) drops nothing: not the
/// client's statements, and not what sluice knows its server connection holds, which the next
/// client on that connection relies on (it used to get 42P05 for a statement sluice thought
/// gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_discard_all_keeps_the_statements_for_this_client_and_the_next() {
    let env = Env::start(0, "pool_size = 1");
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        let (mut a, _) = raw_login_with(addr, "app", "app-secret", "app", &[]).await;
        let mut out = BytesMut::new();
        frontend::parse("s1", "SELECT 2", None, &mut out).unwrap();
        frontend::sync(&mut out);
        a.write_all(&out).await.unwrap();
        assert_eq!(tags(&read_until_ready(&mut a, 1).await), "1Z");
        assert_eq!(tags(&query(&mut a, "BEGIN").await), "CZ");
        let r = query(&mut a, "DISCARD ALL").await;
        assert_eq!(tags(&r), "EZ", "{r:?}");
        assert_eq!(sqlstate(&r[0].1), "25001");
        assert_eq!(tags(&query(&mut a, "ROLLBACK").await), "CZ");
        out.clear();
        bind_no_params("s1", &mut out);
        frontend::execute("", 0, &mut out).unwrap();
        frontend::sync(&mut out);
        a.write_all(&out).await.unwrap();
        let r = read_until_ready(&mut a, 1).await;
        assert_eq!(tags(&r), "2DCZ", "{r:?}");
        assert_eq!(first_column(&r), [Some("2".to_string())]);
        drop(a);

        // The next client gets the same server connection (pool_size = 1) and prepares the
        // same text under its own name.
        let (mut b, _) = raw_login_with(addr, "app", "app-secret", "app", &[]).await;
        out.clear();
        frontend::parse("other", "SELECT 2", None, &mut out).unwrap();
        bind_no_params("other", &mut out);
        frontend::execute("", 0, &mut out).unwrap();
        frontend::sync(&mut out);
        b.write_all(&out).await.unwrap();
        let r = read_until_ready(&mut b, 1).await;
        assert_eq!(tags(&r), "12DCZ", "{r:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_a_query_waiting_for_a_backend() {
    let env = Env::start(0, "pool_size = 1\ncheckout_timeout = \"30s\"");
    bounded(60, async {
        let holder = env.app_client().await;
        exec(&holder, "BEGIN").await;
        exec(&holder, "SELECT 1").await;
        let waiter = env.app_client().await;
        let token = waiter.cancel_token();
        let started = Instant::now();
        let queued = tokio::spawn(async move { waiter.simple_query("SELECT 'waited'").await.map(|_| ()) });
        // Cancel until it takes: the query must be waiting in sluice first.
        let err = loop {
            token
                .cancel_query(tokio_postgres::NoTls)
                .await
                .expect("send cancel");
            if queued.is_finished() {
                break queued.await.unwrap().expect_err("cancelled");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "not the checkout timeout"
        );
        exec(&holder, "COMMIT").await;
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backend_is_reported_once() {
    for mode in ["session", "transaction"] {
        let env = Env::start(0, &format!("pool_mode = \"{mode}\""));
        let addr = env.sluice.listen_addr();
        bounded(60, async {
            let (mut s, _) = raw_login_with(addr, "app", "app-secret", "app", &[]).await;
            let r = query(&mut s, "SELECT pg_backend_pid()::text").await;
            let pid = first_column(&r)[0].clone().unwrap();
            if mode == "transaction" {
                // Keep the backend: an open transaction.
                query(&mut s, "BEGIN").await;
            }
            let su = env.cluster.superuser_client(env.cluster.primary_port()).await;
            exec(&su, &format!("SELECT pg_terminate_backend({pid})")).await;
            let mut all = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
                .await
                .expect("closed")
                .ok();
            let text = String::from_utf8_lossy(&all);
            assert!(text.contains("57P01"), "{mode}: {text}");
            assert!(!text.contains("08006"), "{mode}: one error, the server's: {text}");
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_before_startup_closes_silently() {
    let env = Env::start(0, "");
    bounded(30, async {
        let mut s = TcpStream::connect(env.sluice.listen_addr()).await.unwrap();
        s.write_all(b"X\0\0\0\x04").await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
            .await
            .expect("closed")
            .ok();
        assert!(all.is_empty(), "no word: {:?}", String::from_utf8_lossy(&all));
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_database_is_not_blocked_by_pooled_connections() {
    let env = Env::start(0, "pool_size = 4");
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        let su = env.cluster.superuser_client(env.cluster.primary_port()).await;
        exec(&su, "ALTER ROLE app CREATEDB").await;
        let admin = env.app_client().await;
        for round in 0..2 {
            exec(&admin, "CREATE DATABASE scratch").await;
            {
                let users: Vec<_> = futures_util::future::join_all(
                    (0..3).map(|_| crate::support::connect(addr, "app", "app-secret", "scratch")),
                )
                .await;
                for u in &users {
                    exec(u, "SELECT 1").await;
                }
            }
            // Every client has left; sluice's pooled connections to scratch must not block.
            let r = admin.simple_query("DROP DATABASE scratch").await;
            assert!(
                r.is_ok(),
                "round {round}: {:?}",
                r.err().map(|e| crate::support::describe(&e))
            );
        }
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saslprep_passwords_log_in_in_either_form() {
    let env = Env::start_with(
        0,
        "",
        "\n[[clusters.users]]\nname = \"roman\"\npassword = \"IX-\u{2168}\"\n",
    );
    bounded(60, async {
        let su = env.cluster.superuser_client(env.cluster.primary_port()).await;
        exec(
            &su,
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE roman LOGIN PASSWORD 'IX-\u{2168}'",
        )
        .await;
        for password in ["IX-\u{2168}", "IX-IX"] {
            let c = crate::support::connect(env.sluice.listen_addr(), "roman", password, "app").await;
            assert_eq!(
                simple_column(&c, "SELECT current_user").await,
                ["roman"],
                "{password}"
            );
        }
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// A prepared statement whose rows change type (ALTER TABLE ... TYPE) fails with 0A000 "cached
/// plan must not change result type" on the server connection it was prepared on, and the
/// driver prepares it again. On another server connection, where sluice prepares it anew, it
/// must fail the same way, not return rows of the new shape under the old description (asyncpg
/// then failed with "insufficient data in buffer" on every later use). Reads are prepared on
/// the replica and transactions run on the primary (`pool_size = 1`): which server connection
/// holds what is known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_rows_changed_type_fails_as_on_its_own_connection() {
    let env = Env::start(1, "consistency = \"eventual\"\npool_size = 1");
    bounded(60, async {
        let direct = env.cluster.superuser_client(env.cluster.primary_port()).await;
        let mut c = env.app_client().await;
        exec(
            &c,
            "CREATE TABLE shapes (a int, b int); INSERT INTO shapes VALUES (1, 2)",
        )
        .await;
        env.cluster.wait_replicated().await;
        // `own`: prepared on the primary, in a transaction; `moved`: a read, on the replica.
        let tx = c.transaction().await.unwrap();
        let own = tx.prepare("SELECT * FROM shapes").await.unwrap();
        assert_eq!(tx.query_one(&own, &[]).await.unwrap().get::<_, i32>(1), 2);
        tx.commit().await.unwrap();
        let moved = c.prepare("SELECT a, b FROM shapes").await.unwrap();
        assert_eq!(c.query_one(&moved, &[]).await.unwrap().get::<_, i32>(1), 2);
        exec(&direct, "ALTER TABLE shapes ALTER COLUMN b TYPE text").await;
        // On its own server connection: PostgreSQL's own error, which aborts the transaction.
        exec(&c, "BEGIN").await;
        let err = c.query_one(&own, &[]).await.expect_err("the server refuses it");
        assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{err}");
        exec(&c, "ROLLBACK").await;
        // On the primary, where sluice prepares it anew: the same error, the same abort.
        exec(&c, "BEGIN").await;
        let err = c.query_one(&moved, &[]).await.expect_err("the rows changed type");
        assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{err}");
        let db = err.as_db_error().expect("a server error");
        assert_eq!(db.message(), "cached plan must not change result type");
        // asyncpg tells this 0A000 from others by the function, and then prepares again.
        assert_eq!(
            (db.file(), db.routine()),
            (Some("plancache.c"), Some("RevalidateCachedQuery"))
        );
        let err = c.query_one("SELECT 1", &[]).await.expect_err("aborted");
        assert_eq!(err.code().map(|c| c.code()), Some("25P02"), "{err}");
        exec(&c, "ROLLBACK").await;
        // Prepared again, it reads the new rows.
        let tx = c.transaction().await.unwrap();
        let again = tx.prepare("SELECT a, b FROM shapes").await.unwrap();
        assert_eq!(tx.query_one(&again, &[]).await.unwrap().get::<_, String>(1), "2");
        tx.commit().await.unwrap();
    })
    .await;
}

/// The other side of the same check: a server connection may hold another client's copy of
/// the statement text, prepared before a column's type changed. A client that prepared the
/// text afterwards gets its rows, as directly: sluice prepares the statement afresh there
/// instead of letting the server refuse the stale copy with 0A000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clients_copy_of_a_statement_from_before_a_change_is_not_used() {
    let env = Env::start(1, "consistency = \"eventual\"\npool_size = 1");
    bounded(60, async {
        let direct = env.cluster.superuser_client(env.cluster.primary_port()).await;
        exec(
            &direct,
            "CREATE TABLE stale (a int, b int); INSERT INTO stale VALUES (1, 2)",
        )
        .await;
        exec(&direct, "GRANT ALL ON stale TO app").await;
        // B's copy, on the primary's one pooled connection, from before the change.
        let mut b = env.app_client().await;
        let tx = b.transaction().await.unwrap();
        let old = tx.prepare("SELECT * FROM stale").await.unwrap();
        assert_eq!(tx.query_one(&old, &[]).await.unwrap().get::<_, i32>(1), 2);
        tx.commit().await.unwrap();
        exec(&direct, "ALTER TABLE stale ALTER COLUMN b TYPE text").await;
        env.cluster.wait_replicated().await;
        // A prepares the text afterwards, as a read: on the replica.
        let a = env.app_client().await;
        let new = a.prepare("SELECT * FROM stale").await.unwrap();
        // In a transaction it runs on the primary's connection, which holds B's copy.
        exec(&a, "BEGIN").await;
        let row = a
            .query_one(&new, &[])
            .await
            .unwrap_or_else(|e| panic!("A's statement where B's old copy is: {}", describe(&e)));
        assert_eq!(row.get::<_, String>(1), "2");
        exec(&a, "COMMIT").await;
        drop(b);
    })
    .await;
}
