//! Protocol semantics through transaction pooling: pipelined batches, implicit transactions,
//! protocol errors answered like PostgreSQL answers them, cancel requests, COPY failures.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::SinkExt;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

use crate::raw::{raw_login, read_until_ready, read_until_tag, sqlstate, tags};
use crate::support::{bounded, describe, exec, simple_column};
use crate::Env;

fn parse(buf: &mut BytesMut, name: &str, sql: &str) {
    frontend::parse(name, sql, std::iter::empty(), buf).unwrap();
}

fn bind(buf: &mut BytesMut, portal: &str, statement: &str) {
    frontend::bind(
        portal,
        statement,
        std::iter::empty::<i16>(),
        std::iter::empty::<i32>(),
        |_: i32,
         _: &mut BytesMut|
         -> Result<postgres_protocol::IsNull, Box<dyn std::error::Error + Sync + Send>> {
            unreachable!()
        },
        std::iter::empty::<i16>(),
        buf,
    )
    .map_err(|_| ())
    .unwrap();
}

fn execute(buf: &mut BytesMut, portal: &str) {
    frontend::execute(portal, 0, buf).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batches_and_protocol_errors_behave_like_postgres() {
    let env = Env::start(1, "pool_size = 2");
    bounded(60, async {
        let setup = env.app_client().await;
        exec(&setup, "CREATE TABLE pipe (id int PRIMARY KEY)").await;
        let mut s: TcpStream = raw_login(env.sluice.listen_addr()).await;

        // Two batches (named statement, then unnamed) in one write, each ending with Sync.
        let mut b = BytesMut::new();
        parse(&mut b, "ins", "INSERT INTO pipe VALUES (1)");
        bind(&mut b, "", "ins");
        execute(&mut b, "");
        unnamed(&mut b, "SELECT count(*) FROM pipe");
        frontend::sync(&mut b);
        bind(&mut b, "", "ins"); // duplicate key: fails, and the rest of this batch is skipped
        execute(&mut b, "");
        parse(&mut b, "", "SELECT 1");
        frontend::sync(&mut b);
        s.write_all(&b).await.unwrap();
        let replies = read_until_ready(&mut s, 2).await;
        assert_eq!(tags(&replies), "12C12DCZ2EZ", "{replies:?}");
        let err = replies.iter().find(|(t, _)| *t == b'E').unwrap();
        assert_eq!(sqlstate(&err.1), "23505");

        // An implicit transaction (several statements in one Query) is atomic.
        let mut b = BytesMut::new();
        frontend::query("INSERT INTO pipe VALUES (2); SELECT 1/0", &mut b).unwrap();
        s.write_all(&b).await.unwrap();
        let replies = read_until_ready(&mut s, 1).await;
        let err = replies
            .iter()
            .find(|(t, _)| *t == b'E')
            .expect("division by zero");
        assert_eq!(sqlstate(&err.1), "22012");
        assert_eq!(
            simple_column(&setup, "/* sluice: primary */ SELECT count(*) FROM pipe").await,
            ["1"]
        );

        // Bind before Parse, and Execute of an unknown portal: PostgreSQL's own errors, in
        // order, and the connection stays usable.
        let mut b = BytesMut::new();
        bind(&mut b, "", "never_parsed");
        frontend::sync(&mut b);
        execute(&mut b, "no_such_portal");
        frontend::sync(&mut b);
        frontend::query("SELECT 42", &mut b).unwrap();
        s.write_all(&b).await.unwrap();
        let replies = read_until_ready(&mut s, 3).await;
        assert_eq!(tags(&replies), "EZEZTDCZ", "{replies:?}");
        let codes: Vec<String> = replies
            .iter()
            .filter(|(t, _)| *t == b'E')
            .map(|(_, b)| sqlstate(b))
            .collect();
        assert_eq!(codes, ["26000", "34000"]);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// A client that pipelines more than the sockets hold, reading as it writes (libpq's pipeline
/// mode, asyncpg's executemany): the server stops reading while its replies are not read, so
/// sluice must relay replies while it still writes requests, or both sides wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pipeline_streams_both_ways() {
    use tokio::io::AsyncReadExt;
    const QUERIES: usize = 2000;
    for mode in ["session", "transaction"] {
        let env = Env::start(0, &format!("pool_mode = \"{mode}\""));
        bounded(120, async {
            let stream = raw_login(env.sluice.listen_addr()).await;
            let (mut rd, mut wr) = stream.into_split();
            // 8 KiB per request, 16 KiB per reply: 16 MB each way, beyond any socket buffer.
            let padding = "x".repeat(8192);
            let mut requests = BytesMut::new();
            for _ in 0..QUERIES {
                frontend::query(
                    &format!("SELECT repeat('y', 16384) /* {padding} */"),
                    &mut requests,
                )
                .unwrap();
            }
            let writer = tokio::spawn(async move {
                wr.write_all(&requests).await.expect("write the pipeline");
                wr
            });
            let (mut ready, mut rows, mut buf) = (0, 0, BytesMut::new());
            loop {
                while buf.len() >= 5 {
                    let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
                    if buf.len() < 1 + len {
                        break;
                    }
                    let m = buf.split_to(1 + len);
                    match m[0] {
                        b'Z' => ready += 1,
                        b'D' => rows += 1,
                        b'E' => panic!("{mode}: error {:?}", String::from_utf8_lossy(&m)),
                        _ => {}
                    }
                }
                if ready == QUERIES {
                    break;
                }
                let n = tokio::time::timeout(Duration::from_secs(20), rd.read_buf(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("{mode}: stalled after {ready} of {QUERIES} replies"))
                    .expect("read");
                assert!(n > 0, "{mode}: EOF after {ready} replies");
            }
            assert_eq!(rows, QUERIES, "{mode}");
            writer.await.expect("writer");
        })
        .await;
        env.sluice.assert_no_unexpected_errors(&[]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_only_the_right_query() {
    let env = Env::start(1, "consistency = \"primary\"");
    bounded(60, async {
        let victim = env.app_client().await;
        let bystander = env.app_client().await;
        let token = victim.cancel_token();
        let slow = tokio::spawn(async move { victim.simple_query("SELECT pg_sleep(30)").await });
        let other = tokio::spawn(async move {
            let t = Instant::now();
            bystander
                .simple_query("SELECT pg_sleep(2)")
                .await
                .map(|_| t.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(500)).await;

        // A cancel with a key sluice never issued does nothing.
        let mut bogus = BytesMut::new();
        frontend::cancel_request(12345, 67890, &mut bogus);
        let mut c = TcpStream::connect(env.sluice.listen_addr()).await.unwrap();
        c.write_all(&bogus).await.unwrap();
        drop(c);

        let started = Instant::now();
        token.cancel_query(NoTls).await.expect("send cancel");
        let err = slow.await.unwrap().expect_err("the query was cancelled");
        assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{}", describe(&err));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "cancel took {:?}",
            started.elapsed()
        );
        let took = other
            .await
            .unwrap()
            .expect("the other client's query must not be cancelled");
        assert!(
            took >= Duration::from_secs(2),
            "bystander finished early: {took:?}"
        );
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// Drivers send COPY data and CopyDone right behind the COPY, before the server's
/// CopyInResponse (asyncpg's copy_to_table): the COPY is over when that response arrives, and
/// the client's next request is answered (it once hung: sluice thought COPY was still on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_data_sent_before_the_servers_response() {
    for mode in ["session", "transaction"] {
        let env = Env::start(
            1,
            &format!("pool_mode = \"{mode}\"\nconsistency = \"read-your-writes\""),
        );
        bounded(60, async {
            let mut s = raw_login(env.sluice.listen_addr()).await;
            crate::raw::query(&mut s, "CREATE TABLE IF NOT EXISTS cp_early (a int)").await;
            let copy = |table: &str| {
                let mut out = BytesMut::new();
                frontend::query(&format!("COPY {table} FROM STDIN"), &mut out).unwrap();
                frontend::CopyData::new(&b"1\n"[..]).unwrap().write(&mut out);
                frontend::copy_done(&mut out);
                out
            };
            for (table, want) in [("cp_early", "GCZ"), ("cp_missing", "EZ"), ("cp_early", "GCZ")] {
                s.write_all(&copy(table)).await.unwrap();
                let r = read_until_ready(&mut s, 1).await;
                assert_eq!(tags(&r), want, "{mode} {table}: {r:?}");
            }
            for _ in 0..3 {
                let mut out = BytesMut::new();
                parse(&mut out, "", "SELECT count(*)::text FROM cp_early");
                bind(&mut out, "", "");
                frontend::execute("", 0, &mut out).unwrap();
                frontend::sync(&mut out);
                s.write_all(&out).await.unwrap();
                let r = read_until_ready(&mut s, 1).await;
                assert_eq!(tags(&r), "12DCZ", "{mode}: {r:?}");
            }
            let r = crate::raw::query(&mut s, "DROP TABLE cp_early").await;
            assert_eq!(tags(&r), "CZ", "{mode}: {r:?}");
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_errors_leave_the_connection_usable() {
    let env = Env::start(1, "");
    bounded(60, async {
        let c = env.app_client().await;
        exec(&c, "CREATE TABLE cp (x int)").await;

        // A malformed row mid-COPY: the server's error, nothing inserted.
        let sink = c.copy_in("COPY cp FROM STDIN").await.expect("copy in");
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"1\n2\n")).await.unwrap();
        sink.send(bytes::Bytes::from_static(b"not a number\n"))
            .await
            .unwrap();
        let err = sink.finish().await.expect_err("bad row");
        assert_eq!(err.code().map(|c| c.code()), Some("22P02"), "{}", describe(&err));

        // The client gives up mid-COPY (CopyFail, simple protocol): the server's error, nothing
        // inserted, and the same connection goes on.
        let mut raw = raw_login(env.sluice.listen_addr()).await;
        let mut b = BytesMut::new();
        frontend::query("COPY cp FROM STDIN", &mut b).unwrap();
        raw.write_all(&b).await.unwrap();
        let mut head = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut raw, &mut head)
            .await
            .unwrap();
        assert_eq!(head[0], b'G', "expected CopyInResponse");
        let mut rest = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut raw, &mut rest)
            .await
            .unwrap();
        let mut skip = vec![0u8; u32::from_be_bytes(rest) as usize - 4];
        tokio::io::AsyncReadExt::read_exact(&mut raw, &mut skip)
            .await
            .unwrap();
        let mut b = BytesMut::new();
        frontend::CopyData::new(&b"3\n"[..]).unwrap().write(&mut b);
        frontend::copy_fail("client changed its mind", &mut b).unwrap();
        frontend::query("SELECT 1", &mut b).unwrap();
        raw.write_all(&b).await.unwrap();
        let replies = read_until_ready(&mut raw, 2).await;
        assert_eq!(tags(&replies), "EZTDCZ", "{replies:?}");
        assert_eq!(sqlstate(&replies[0].1), "57014");

        assert_eq!(
            simple_column(&c, "/* sluice: primary */ SELECT count(*) FROM cp").await,
            ["0"]
        );
        // A large COPY streams through in both directions.
        let sink = c.copy_in("COPY cp FROM STDIN").await.expect("copy in");
        futures_util::pin_mut!(sink);
        for chunk in 0..50 {
            let rows: String = (0..2000).map(|i| format!("{}\n", chunk * 2000 + i)).collect();
            sink.send(bytes::Bytes::from(rows)).await.unwrap();
        }
        assert_eq!(sink.finish().await.unwrap(), 100_000);
        // COPY TO is a read; read our own write on the primary.
        let out = c
            .copy_out("/* sluice: primary */ COPY cp TO STDOUT")
            .await
            .unwrap();
        futures_util::pin_mut!(out);
        let mut bytes = 0;
        while let Some(chunk) = futures_util::StreamExt::next(&mut out).await {
            bytes += chunk.unwrap().len();
        }
        assert!(bytes > 500_000, "copied out {bytes} bytes");
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rows_stream_through_intact() {
    let env = Env::start(1, "");
    bounded(60, async {
        let c = env.app_client().await;
        // Rows far larger than sluice's streaming threshold, in both protocols.
        for size in [100_000usize, 5_000_000] {
            let sql = format!("SELECT repeat('ab', {}) || 'end'", size / 2);
            let rows = simple_column(&c, &sql).await;
            assert_eq!(rows[0].len(), size + 3);
            assert!(rows[0].ends_with("abend"));
            let row = c.query_one(&sql, &[]).await.unwrap();
            assert_eq!(row.get::<_, String>(0).len(), size + 3);
        }
        // Small queries right after still frame correctly.
        assert_eq!(simple_column(&c, "SELECT 'after'").await, ["after"]);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// Parse, Bind and Execute of `sql` as the unnamed statement and portal.
/// A FunctionCall of function `oid` with no arguments, asking for a text result.
fn function_call(buf: &mut BytesMut, oid: u32) {
    buf.extend_from_slice(b"F");
    buf.extend_from_slice(&14i32.to_be_bytes());
    buf.extend_from_slice(&oid.to_be_bytes());
    buf.extend_from_slice(&0i16.to_be_bytes()); // argument format codes
    buf.extend_from_slice(&0i16.to_be_bytes()); // arguments
    buf.extend_from_slice(&0i16.to_be_bytes()); // result format: text
}

fn unnamed(buf: &mut BytesMut, sql: &str) {
    parse(buf, "", sql);
    bind(buf, "", "");
    execute(buf, "");
}

/// asyncpg prepares with Parse, Describe and Flush, and runs with Bind, Execute and Sync; when
/// it cannot encode an argument it sends nothing more for that statement, and the batch stays
/// open. Its next request, a write, must reach the primary, not the replica the batch's reads
/// went to (asyncpg's own suite, test_codecs.test_composites: "cannot execute DROP TYPE in a
/// read-only transaction"). An error in the batch makes the server skip the client's messages
/// up to its Sync: a write after it runs nowhere, through sluice as directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_an_unsynced_batch_of_reads_reaches_the_primary() {
    let env = Env::start(1, "pool_size = 1\ncheckout_timeout = \"2s\"");
    let primary = env.cluster.primary_port();
    bounded(60, async {
        let setup = env.app_client().await;
        exec(&setup, "CREATE TABLE unsynced (a int)").await;
        let mut s: TcpStream = raw_login(env.sluice.listen_addr()).await;
        let on_replica = "SELECT pg_is_in_recovery()";

        // A read, left open after Flush, then a simple Query that writes.
        let mut b = BytesMut::new();
        unnamed(&mut b, on_replica);
        frontend::flush(&mut b);
        s.write_all(&b).await.unwrap();
        let r = read_until_tag(&mut s, b'C').await;
        assert_eq!(tags(&r), "12DC");
        assert_eq!(r[2].1[6..], *b"t", "the read ran on the replica");
        let r = crate::raw::query(&mut s, "INSERT INTO unsynced VALUES (1)").await;
        assert_eq!(tags(&r), "CZ", "simple Query after an open batch: {r:?}");

        // Parse, Describe, Flush of a read (asyncpg's prepare), then a write's Parse, Bind,
        // Execute and Sync: the batch moves to the primary.
        let mut b = BytesMut::new();
        parse(&mut b, "reads", on_replica);
        frontend::describe(b'S', "reads", &mut b).unwrap();
        frontend::flush(&mut b);
        s.write_all(&b).await.unwrap();
        assert_eq!(tags(&read_until_tag(&mut s, b'T').await), "1tT");
        let mut b = BytesMut::new();
        unnamed(&mut b, "INSERT INTO unsynced VALUES (2)");
        frontend::sync(&mut b);
        s.write_all(&b).await.unwrap();
        let r = read_until_ready(&mut s, 1).await;
        assert_eq!(tags(&r), "12CZ", "extended write after an open batch: {r:?}");
        // The statement prepared on the replica still runs, wherever it lands.
        let mut b = BytesMut::new();
        bind(&mut b, "", "reads");
        execute(&mut b, "");
        frontend::sync(&mut b);
        s.write_all(&b).await.unwrap();
        assert_eq!(tags(&read_until_ready(&mut s, 1).await), "2DCZ");

        // An error in the open batch: the write behind it is skipped up to the Sync.
        let mut b = BytesMut::new();
        unnamed(&mut b, "SELECT pg_is_in_recovery(), 1/0");
        frontend::flush(&mut b);
        s.write_all(&b).await.unwrap();
        let r = read_until_tag(&mut s, b'E').await;
        assert_eq!(sqlstate(&r.last().unwrap().1), "22012");
        let mut b = BytesMut::new();
        unnamed(&mut b, "INSERT INTO unsynced VALUES (3)");
        frontend::sync(&mut b);
        s.write_all(&b).await.unwrap();
        let r = read_until_ready(&mut s, 1).await;
        assert_eq!(tags(&r), "Z", "skipped up to the Sync, as directly: {r:?}");
        assert_eq!(r[0].1, b"I");
        // The same with the error still to come when the write arrives (one write).
        let mut b = BytesMut::new();
        unnamed(&mut b, on_replica);
        frontend::flush(&mut b);
        s.write_all(&b).await.unwrap();
        assert_eq!(tags(&read_until_tag(&mut s, b'C').await), "12DC");
        let mut b = BytesMut::new();
        unnamed(&mut b, "SELECT pg_is_in_recovery(), 1/0");
        unnamed(&mut b, "INSERT INTO unsynced VALUES (3)");
        frontend::sync(&mut b);
        s.write_all(&b).await.unwrap();
        let r = read_until_ready(&mut s, 1).await;
        // (1/0 of constants fails when the Bind plans the statement.)
        assert_eq!(tags(&r), "1EZ", "skipped up to the Sync, as directly: {r:?}");
        assert_eq!(sqlstate(&r[1].1), "22012");

        // A write's batch open on the primary, ended by a Query: the connection is free
        // again for another client (pool_size = 1).
        let mut b = BytesMut::new();
        parse(&mut b, "w", "INSERT INTO unsynced VALUES (4)");
        frontend::describe(b'S', "w", &mut b).unwrap();
        frontend::flush(&mut b);
        s.write_all(&b).await.unwrap();
        assert_eq!(tags(&read_until_tag(&mut s, b'n').await), "1tn");
        let r = crate::raw::query(&mut s, "SELECT 1").await;
        assert_eq!(tags(&r), "TDCZ");
        let other = env.app_client().await;
        exec(&other, "INSERT INTO unsynced VALUES (5)").await;

        let direct = env.cluster.superuser_client(primary).await;
        let rows = simple_column(&direct, "SELECT a FROM unsynced ORDER BY a").await;
        assert_eq!(rows, ["1", "2", "5"], "what the primary has");
    })
    .await;
}

/// After an error in an extended-protocol batch the server skips every message up to the
/// Sync, a simple Query too: the Query gets no answer, and the connection serves the next
/// client once the Sync is answered (pool_size = 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_inside_a_failed_batch_is_skipped_like_the_server_skips_it() {
    let env = Env::start(0, "pool_size = 1\ncheckout_timeout = \"3s\"");
    bounded(60, async {
        let other = env.app_client().await;
        skipping_through_sluice(&env, Some(&other)).await;
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// The same in session mode: the replies match PostgreSQL's, and when the client leaves, its
/// backend is clean (every reply accounted for) and serves the next client, not closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_session_mode_a_query_inside_a_failed_batch_is_skipped_too() {
    let env = Env::start(
        0,
        "pool_mode = \"session\"\npool_size = 1\ncheckout_timeout = \"5s\"",
    );
    bounded(60, async {
        let mut s = skipping_through_sluice(&env, None).await;
        let pid = |r: &[(u8, Vec<u8>)]| String::from_utf8_lossy(&r[1].1[6..]).into_owned();
        let before = pid(&crate::raw::query(&mut s, "SELECT pg_backend_pid()").await);
        drop(s);
        let mut next: TcpStream = raw_login(env.sluice.listen_addr()).await;
        let after = pid(&crate::raw::query(&mut next, "SELECT pg_backend_pid()").await);
        assert_eq!(after, before, "the backend was reset and reused, not closed");
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// Runs [`skipping_script`] against PostgreSQL directly, then through sluice (with `other`
/// taking the only backend between steps): the replies must be the same, and the ones
/// expected. Returns the connection through sluice.
async fn skipping_through_sluice(env: &Env, other: Option<&tokio_postgres::Client>) -> TcpStream {
    let setup = env.app_client().await;
    exec(&setup, "CREATE TABLE skipped_direct (a int)").await;
    exec(&setup, "CREATE TABLE skipped (a int)").await;
    drop(setup);
    let primary = SocketAddr::from(([127, 0, 0, 1], env.cluster.primary_port()));
    let want = skipping_script(&mut raw_login(primary).await, "skipped_direct", None).await;
    let mut s: TcpStream = raw_login(env.sluice.listen_addr()).await;
    let got = skipping_script(&mut s, "skipped", other).await;
    assert_eq!(got, want, "through sluice (left) and directly (right)");
    assert_eq!(
        want,
        [
            "1E", "ZTDCZ", "0", "TDCZ", "TDCZ", "0", "1EZTDCZ", "0", "1EZTDCZ", "0", "12CTDCZZ", "2",
            "12DCEZZ"
        ]
    );
    s
}

/// The messages of the test above on `s`, with `table`: each reply's message tags and the
/// counts it read. With `other`, another client takes the (only) backend between steps.
async fn skipping_script(
    s: &mut TcpStream,
    table: &str,
    other: Option<&tokio_postgres::Client>,
) -> Vec<String> {
    let mut out = Vec::new();
    let count = format!("SELECT count(*) FROM {table}");
    let insert = |v: u32| format!("INSERT INTO {table} VALUES ({v})");
    let query = |b: &mut BytesMut, sql: &str| frontend::query(sql, b).unwrap();
    // The error is known before the Query arrives: skipped by the server, no answer, no row,
    // no setting.
    let mut b = BytesMut::new();
    unnamed(&mut b, "SELECT 1/0");
    frontend::flush(&mut b);
    s.write_all(&b).await.unwrap();
    out.push(tags(&read_until_tag(s, b'E').await));
    let mut b = BytesMut::new();
    query(
        &mut b,
        &format!("{}; SET application_name = 'skipped'", insert(1)),
    );
    frontend::sync(&mut b);
    query(&mut b, &count);
    skipping_step(s, b, 2, Some(2), None, &mut out).await;
    let r = crate::raw::query(s, "SHOW application_name").await;
    out.push(tags(&r));
    assert!(!r[1].1.ends_with(b"skipped"), "{r:?}");
    let mut b = BytesMut::new();
    query(&mut b, &count);
    skipping_step(s, b, 1, Some(1), other, &mut out).await;
    // The same in one write: the Query is on its way before the error is known.
    let mut b = BytesMut::new();
    unnamed(&mut b, "SELECT 1/0");
    query(&mut b, &insert(3));
    frontend::sync(&mut b);
    query(&mut b, &count);
    skipping_step(s, b, 2, Some(4), other, &mut out).await;
    // Two Queries and a FunctionCall behind the failing batch, then the Sync.
    let mut b = BytesMut::new();
    unnamed(&mut b, "SELECT 1/0");
    query(&mut b, &insert(3));
    query(&mut b, &insert(4));
    function_call(&mut b, 2108); // skipped: which function does not matter
    frontend::sync(&mut b);
    query(&mut b, &count);
    skipping_step(s, b, 2, Some(4), other, &mut out).await;
    // A batch that did not fail: the Query runs (and commits the batch's work with its own),
    // then the Sync has its own ReadyForQuery.
    let mut b = BytesMut::new();
    unnamed(&mut b, &format!("{}, (6)", insert(5)));
    query(&mut b, &count);
    frontend::sync(&mut b);
    skipping_step(s, b, 2, Some(4), None, &mut out).await;
    // A Query whose own statement fails after a good batch: its error, then the Sync's.
    let mut b = BytesMut::new();
    unnamed(&mut b, "SELECT 1");
    query(&mut b, "SELECT 1/0");
    frontend::sync(&mut b);
    skipping_step(s, b, 2, None, other, &mut out).await;
    out
}

/// Sends `b`, reads up to its `ready`-th ReadyForQuery and records the replies' tags (and the
/// value of the DataRow at `value_at`); then `other`, if any, must get the only backend at once.
async fn skipping_step(
    s: &mut TcpStream,
    b: BytesMut,
    ready: usize,
    value_at: Option<usize>,
    other: Option<&tokio_postgres::Client>,
    out: &mut Vec<String>,
) {
    s.write_all(&b).await.unwrap();
    let r = read_until_ready(s, ready).await;
    out.push(tags(&r));
    if let Some(i) = value_at {
        out.push(String::from_utf8_lossy(&r[i].1[6..]).into_owned());
    }
    if let Some(other) = other {
        exec(other, "SELECT 1").await;
    }
}

/// The unnamed statement outlives its transaction: a client may bind it again later. sluice's
/// own simple queries between two requests (the WAL position after a write, with
/// read-your-writes; the settings after a SET) drop the backend's copy, as any simple Query
/// does, and the client's statement must still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_survives_sluices_own_queries() {
    let env = Env::start(1, "pool_size = 1\nconsistency = \"read-your-writes\"");
    bounded(60, async {
        let setup = env.app_client().await;
        exec(&setup, "CREATE TABLE again (a int)").await;
        drop(setup);
        let mut s: TcpStream = raw_login(env.sluice.listen_addr()).await;
        let mut b = BytesMut::new();
        unnamed(&mut b, "INSERT INTO again VALUES (1)");
        frontend::sync(&mut b);
        s.write_all(&b).await.unwrap();
        assert_eq!(tags(&read_until_ready(&mut s, 1).await), "12CZ");
        for _ in 0..3 {
            let mut b = BytesMut::new();
            bind(&mut b, "", "");
            execute(&mut b, "");
            frontend::sync(&mut b);
            s.write_all(&b).await.unwrap();
            let r = read_until_ready(&mut s, 1).await;
            assert_eq!(tags(&r), "2CZ", "{r:?}");
        }
        // After a SET (its settings are read back) too.
        let r = crate::raw::query(&mut s, "SET application_name = 'again'").await;
        assert_eq!(tags(&r), "CSZ");
        let mut b = BytesMut::new();
        bind(&mut b, "", "");
        execute(&mut b, "");
        frontend::sync(&mut b);
        s.write_all(&b).await.unwrap();
        let r = read_until_ready(&mut s, 1).await;
        // (The SET was a simple Query: it dropped the unnamed statement, as directly.)
        assert_eq!(sqlstate(&r[0].1), "26000", "{r:?}");
    })
    .await;
}
