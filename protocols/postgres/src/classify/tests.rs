//! Table tests and properties for the classifier.

use super::*;
use proptest::prelude::*;

const R: Class = Class::Read;
const W: Class = Class::Write;

#[rustfmt::skip]
const CASES: &[(&str, Class)] = &[
    // Plain reads.
    ("SELECT 1", R),
    ("select * from t where id = $1", R),
    ("  \n\tSELECT 1;", R),
    ("SHOW search_path", R),
    ("TABLE t", R),
    ("VALUES (1), (2)", R),
    ("(SELECT 1)", R),
    ("((SELECT 1) UNION (SELECT 2))", R),
    ("SELECT count(*) FROM t GROUP BY a HAVING sum(b) > 3", R),
    ("SELECT set_config('a.b', 'c', false)", R),
    ("SELECT current_setting('search_path')", R),
    ("SELECT substring(a FROM 1 FOR 3) FROM t", R),
    ("SELECT update FROM t", R),
    // Keywords hidden in strings, identifiers and comments.
    ("SELECT 'insert'", R),
    ("CREATE SCHEMA test_ns_schema_1\n       CREATE UNIQUE INDEX abc_a_idx ON abc (a)\n       CREATE VIEW abc_view AS\n              SELECT a+1 AS a, b+1 AS b FROM abc\n       CREATE TABLE abc ( a serial, b int UNIQUE );", W),
    ("SELECT 'x'';DELETE FROM t;--'", R),
    ("SELECT E'\\';DELETE FROM t' AS x", R),
    ("SELECT \"update\" FROM t", R),
    ("SELECT \"into\" FROM t", R),
    ("SELECT 1 -- ; DELETE FROM t", R),
    ("SELECT 1 /* ; DELETE /* nested */ FROM t */", R),
    ("SELECT $$ ; DELETE FROM t $$", R),
    ("SELECT $fn$ it's $$ ; DROP TABLE t $fn$", R),
    ("SELECT 'nextval(1)'", R),
    ("SELECT a$b$ FROM t", R),
    // Write functions.
    ("SELECT nextval('s')", W),
    ("select public.nextval('s')", W),
    ("SELECT NEXTVAL ('s')", W),
    ("SELECT pg_catalog.\"nextval\"('s')", W),
    ("SELECT \"NEXTVAL\"('s')", R),
    ("SELECT pg_advisory_lock(1)", W),
    ("SELECT pg_try_advisory_xact_lock(1)", W),
    ("SELECT txid_current()", W),
    ("SELECT pg_notify('c', 'p')", W),
    ("SELECT lo_import('/tmp/x')", W),
    ("SELECT * FROM t WHERE id = currval('s')", R),
    ("SELECT nextval", R),
    ("VALUES (nextval('s'))", W),
    // Locking and SELECT INTO.
    ("SELECT * FROM t FOR UPDATE", W),
    ("SELECT * FROM t FOR NO KEY UPDATE NOWAIT", W),
    ("SELECT * FROM t for share", W),
    ("SELECT * FROM t FOR KEY SHARE SKIP LOCKED", W),
    ("SELECT 1 INTO t2", W),
    ("SELECT * INTO TEMP t2 FROM t", W),
    // CTEs.
    ("WITH x AS (SELECT 1) SELECT * FROM x", R),
    ("WITH RECURSIVE r(n) AS (VALUES (1) UNION SELECT n + 1 FROM r) SELECT * FROM r", R),
    ("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x", W),
    ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", W),
    ("WITH x AS (UPDATE t SET a = 1 RETURNING a) SELECT 1", W),
    ("WITH x AS (SELECT nextval('s')) SELECT * FROM x", W),
    ("WITH x AS (SELECT * FROM t FOR UPDATE) SELECT 1", W),
    // EXPLAIN.
    ("EXPLAIN SELECT 1", R),
    ("EXPLAIN ANALYZE SELECT 1", R),
    ("EXPLAIN ANALYZE INSERT INTO t VALUES (1)", W),
    ("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM t", R),
    ("EXPLAIN (ANALYZE, FORMAT JSON) DELETE FROM t", W),
    ("explain analyse verbose select 1", R),
    ("EXPLAIN VERBOSE UPDATE t SET a = 1", W),
    ("EXPLAIN WITH x AS (DELETE FROM t) SELECT 1", W),
    ("EXPLAIN", W),
    ("EXPLAIN EXECUTE p(1)", W),
    // Transactions.
    ("BEGIN", W),
    ("BEGIN READ ONLY", R),
    ("begin transaction read only", R),
    ("BEGIN ISOLATION LEVEL READ COMMITTED", W),
    ("BEGIN READ WRITE", W),
    ("BEGIN READ ONLY, READ WRITE", W),
    // A hot standby refuses SERIALIZABLE, READ ONLY or not.
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", W),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE", W),
    ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", R),
    ("START TRANSACTION", W),
    ("START", W),
    ("BEGIN; SELECT 1; COMMIT", W),
    ("BEGIN READ ONLY; SELECT 1; COMMIT", R),
    ("COMMIT", R),
    ("END", R),
    ("ROLLBACK", R),
    ("ABORT", R),
    ("SAVEPOINT a", R),
    ("RELEASE SAVEPOINT a", R),
    ("ROLLBACK TO SAVEPOINT a", R),
    ("PREPARE TRANSACTION 'x'", W),
    ("COMMIT PREPARED 'x'", W),
    ("ROLLBACK PREPARED 'x'", W),
    // Multi-statement.
    ("SELECT 1; SELECT 2", R),
    ("SELECT 1; DELETE FROM t", W),
    ("SELECT 1;;  ;", R),
    ("", R),
    (";", R),
    ("-- only a comment", R),
    ("SELECT 1; SELECT nextval('s')", W),
    // COPY.
    ("COPY t TO STDOUT", R),
    ("COPY t (a, b) TO STDOUT WITH (FORMAT csv)", R),
    ("COPY (SELECT * FROM t) TO STDOUT", R),
    ("COPY ((SELECT 1)) TO STDOUT", R),
    ("COPY (SELECT nextval('s')) TO STDOUT", W),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", W),
    ("COPY t FROM STDIN", W),
    ("COPY t (a) FROM STDIN", W),
    ("COPY t", W),
    ("COPY (SELECT 1", W),
    // Everything else.
    ("INSERT INTO t VALUES (1)", W),
    ("UPDATE t SET a = 1", W),
    ("DELETE FROM t", W),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", W),
    ("CREATE TABLE t (a int)", W),
    ("SET x = 1", W),
    ("SET search_path TO public", W),
    ("LISTEN c", W),
    ("DO $$ BEGIN NULL; END $$", W),
    ("CALL p()", W),
    ("DISCARD ALL", W),
    ("LOCK TABLE t", W),
    ("VACUUM t", W),
    ("FROBNICATE", W),
    ("1", W),
    ("'SELECT'", W),
    ("(", R),
    // Unterminated quoting is never trusted as a read.
    ("SELECT 'abc", W),
    ("SELECT 1 /* abc", W),
    ("SELECT $x$ abc", W),
];

#[test]
fn table() {
    let c = Classifier::default();
    assert!(CASES.len() >= 60);
    for (sql, want) in CASES {
        let got = c.classify(sql.as_bytes());
        assert_eq!(got.class, *want, "{sql:?}");
        assert_eq!(got.hint, None, "{sql:?}");
    }
}

#[test]
fn hints() {
    let c = Classifier::default();
    let cases = [
        (
            "/* sluice: replica */ INSERT INTO t VALUES (1)",
            W,
            Some(Hint::Replica),
        ),
        ("SELECT 1 -- sluice: primary", R, Some(Hint::Primary)),
        ("SELECT 1; /* SLUICE:REPLICA */ SELECT 2", R, Some(Hint::Replica)),
        ("/*sluice:primary*/SELECT 1", R, Some(Hint::Primary)),
        ("SELECT '/* sluice: primary */'", R, None),
        ("/* sluice: nowhere */ SELECT 1", R, None),
    ];
    for (sql, class, hint) in cases {
        let got = c.classify(sql.as_bytes());
        assert_eq!((got.class, got.hint), (class, hint), "{sql:?}");
    }
}

#[test]
fn session_effects() {
    let c = Classifier::default();
    let settings = |sql: &str| c.classify(sql.as_bytes()).effects.settings;
    let pin = |sql: &str| c.classify(sql.as_bytes()).effects.pin;
    for sql in [
        "SET search_path = app",
        "set session timezone to 'UTC'",
        "RESET ALL",
        "reset work_mem",
        "DISCARD ALL",
        "SELECT 1; SET statement_timeout = 5",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    ] {
        assert!(settings(sql), "{sql:?}");
        assert_eq!(pin(sql), None, "{sql:?}");
    }
    for sql in [
        "SET LOCAL search_path = app",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET CONSTRAINTS ALL DEFERRED",
        "SELECT 'SET x = 1'",
        "INSERT INTO t VALUES ('RESET')",
    ] {
        assert!(!settings(sql), "{sql:?}");
    }
    let cases = [
        ("LISTEN chan", Some(PinReason::Listen)),
        ("UNLISTEN *", None),
        ("CREATE TEMP TABLE x (a int)", Some(PinReason::TempObject)),
        (
            "create local temporary table x (a int)",
            Some(PinReason::TempObject),
        ),
        (
            "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
            Some(PinReason::TempObject),
        ),
        ("CREATE TABLE temp (a int)", None),
        ("SELECT pg_advisory_lock(1)", Some(PinReason::AdvisoryLock)),
        (
            "SELECT pg_try_advisory_lock_shared(1, 2)",
            Some(PinReason::AdvisoryLock),
        ),
        ("SELECT pg_advisory_xact_lock(1)", None),
        (
            "INSERT INTO t SELECT pg_advisory_lock(1)",
            Some(PinReason::AdvisoryLock),
        ),
        (
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            Some(PinReason::HoldCursor),
        ),
        ("DECLARE c NO SCROLL CURSOR WITHOUT HOLD FOR SELECT 1", None),
        ("DECLARE c CURSOR FOR SELECT 'WITH HOLD'", None),
        ("PREPARE q AS SELECT 1", Some(PinReason::Prepare)),
        ("PREPARE TRANSACTION 'tx1'", None),
        ("SET ROLE admin", Some(PinReason::Role)),
        ("SET SESSION AUTHORIZATION bob", Some(PinReason::Role)),
        ("LOAD 'auto_explain'", Some(PinReason::Load)),
        ("SELECT 1; LISTEN a", Some(PinReason::Listen)),
    ];
    for (sql, want) in cases {
        assert_eq!(pin(sql), want, "{sql:?}");
    }
    // A hot standby refuses serializable transactions and has no prepared transactions.
    assert_eq!(
        c.classify(b"BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY").class,
        Class::Write
    );
    assert_eq!(
        c.classify(b"BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ")
            .class,
        Class::Read
    );
    assert_eq!(
        c.classify(b"SELECT gid FROM pg_prepared_xacts").class,
        Class::Write
    );
    assert_eq!(
        c.classify(b"SELECT * FROM pg_catalog.pg_stat_replication").class,
        Class::Write
    );
    // Advisory locks still make the statement a write.
    assert_eq!(c.classify(b"SELECT pg_advisory_lock(1)").class, Class::Write);
}

#[test]
fn extra_write_functions() {
    let c = Classifier::new(["Audit_Log", "app.bump"]);
    assert_eq!(c.classify(b"SELECT audit_log(1)").class, W);
    assert_eq!(c.classify(b"SELECT myschema.AUDIT_LOG(1)").class, W);
    assert_eq!(c.classify(b"SELECT \"audit_log\"(1)").class, W);
    assert_eq!(c.classify(b"SELECT audit_logs(1)").class, R);
    assert_eq!(Classifier::default().classify(b"SELECT audit_log(1)").class, R);
    assert_eq!(c.classify(b"SELECT nextval('s')").class, W);
}

#[test]
fn standard_conforming_strings_off() {
    let c = Classifier::default();
    // With the setting off, PostgreSQL reads 'a\', ' as one string and runs the DELETE.
    let sql = b"SELECT 'a\\', '; DELETE FROM t; --'";
    assert_eq!(c.classify_with(sql, false).class, W);
    assert_eq!(c.classify_with(sql, true).class, R);
    assert_eq!(c.classify_with(b"SELECT 'it\\'s'", false).class, R);
}

#[test]
fn non_utf8_and_pathological_inputs() {
    let c = Classifier::default();
    assert_eq!(c.classify(b"SELECT '\xe9\xff' FROM \xc3t").class, R);
    assert_eq!(c.classify(b"\xff\xfe").class, W);
    // Deep nesting and long keyword chains must not recurse.
    let explain = "EXPLAIN ".repeat(100_000) + "SELECT 1";
    assert_eq!(c.classify(explain.as_bytes()).class, R);
    let parens = "(".repeat(100_000) + "SELECT 1" + &")".repeat(100_000);
    assert_eq!(c.classify(parens.as_bytes()).class, R);
    let copies = "COPY (".repeat(10_000);
    assert_eq!(c.classify(copies.as_bytes()).class, W);
    // Dollar-quote search stays linear with many near-miss closing tags.
    let dollars = format!("SELECT $abcdefgh${}", "$abcdefg".repeat(50_000));
    assert_eq!(c.classify(dollars.as_bytes()).class, W);
}

proptest! {
    #[test]
    fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let c = Classifier::new(["f"]);
        let _ = c.classify(&data);
        let _ = c.classify_with(&data, false);
    }

    #[test]
    fn never_panics_on_sqlish_text(parts in proptest::collection::vec(prop_oneof![
        Just("SELECT "), Just("WITH "), Just("EXPLAIN "), Just("COPY "), Just("BEGIN "), Just("READ "),
        Just("ONLY "), Just("("), Just(")"), Just(";"), Just("'"), Just("\""), Just("$$"), Just("$a$"),
        Just("/*"), Just("*/"), Just("--"), Just("\n"), Just("TO "), Just("FROM "), Just("FOR "),
        Just("UPDATE "), Just("nextval"), Just("E'\\'"), Just("x "),
    ], 0..40)) {
        let sql: String = parts.concat();
        let _ = Classifier::default().classify(sql.as_bytes());
    }

    #[test]
    fn appending_a_write_makes_a_write(prefix in "[a-zA-Z0-9 ,()*=]{0,40}") {
        // Whatever precedes it (without quotes or comments), a separate DELETE statement wins.
        let sql = format!("{prefix};\nDELETE FROM t");
        let c = Classifier::default().classify(sql.as_bytes());
        // An unbalanced '(' hides the ';' (PostgreSQL rejects such a string anyway).
        if !prefix.contains('(') {
            prop_assert_eq!(c.class, Class::Write);
        }
    }
}

#[test]
fn set_config_changes_settings() {
    let c = Classifier::default();
    let r = c.classify(b"SELECT set_config('app.tenant_id', 'a', false)");
    assert_eq!(r.class, Class::Read, "set_config runs on a standby");
    assert!(r.effects.settings);
    assert_eq!(r.effects.pin, None, "a literal name is carried over");
    let untracked = c.classify(b"SELECT pg_catalog.set_config($1, $2, false)");
    assert!(untracked.effects.settings);
    assert_eq!(
        untracked.effects.pin,
        Some(PinReason::UntrackedSetting),
        "a name sluice cannot know pins the client"
    );
    assert!(
        !c.classify(b"SELECT current_setting('app.tenant_id')")
            .effects
            .settings
    );
}

#[test]
fn custom_setting_names_are_found() {
    let names = |s: &str| crate::custom_setting_names(s.as_bytes());
    assert_eq!(
        names("SET app.tenant_id = 'a'"),
        Some(vec!["app.tenant_id".to_string()])
    );
    assert_eq!(
        names("set session \"App\".X to 1; SET search_path = x; SET LOCAL a.b = 1"),
        Some(vec!["app.x".to_string()])
    );
    assert_eq!(
        names("SELECT set_config('my.a', '1', false), pg_catalog.set_config(E'my.b', '2', false), set_config('work_mem', '1MB', false)"),
        Some(vec!["my.a".to_string(), "my.b".to_string()])
    );
    assert_eq!(
        names("SELECT set_config($$x.y$$, '1', false)"),
        Some(vec!["x.y".to_string()])
    );
    assert_eq!(names("SELECT set_config($1, $2, false)"), None);
    assert_eq!(names("RESET ALL"), Some(vec![]));
}

#[test]
fn with_a_catalog_only_known_safe_calls_are_reads() {
    let c = Classifier::new(["audit"]);
    let cat = c.catalog([
        ("lower", false),
        ("now", false),
        ("count", false),
        ("generate_series", false),
        ("random", true),
        ("lo_put", true),
        ("brin_summarize_new_values", true),
        ("my_writer", true),
        ("my_reader", false),
        ("audit", false),
        ("numeric", false),
    ]);
    let class = |sql: &str| c.classify_in(sql.as_bytes(), Some(&cat)).class;
    for read in [
        "SELECT lower(name), count(*), now(), random() FROM t WHERE id IN (1, 2) GROUP BY 1",
        "SELECT my_reader(1), pg_catalog.lower('x')",
        "SELECT x::numeric(10, 2), CAST(y AS varchar(3)), COALESCE(a, b), EXISTS (SELECT 1)",
        "SELECT * FROM generate_series(1, 3) AS g(n) JOIN generate_series(1, 2) h(m) ON (n = m)",
        "WITH w(a) AS (SELECT 1) SELECT a FROM w WHERE a = ANY (ARRAY[1])",
        "SELECT count(*) FILTER (WHERE a > 0) OVER (PARTITION BY b) FROM t",
    ] {
        assert_eq!(class(read), R, "{read}");
    }
    for write in [
        "SELECT lo_put(1, 0, 'x')",
        "SELECT brin_summarize_new_values('idx')",
        "SELECT my_writer()",
        "SELECT just_created_fn()",
        "SELECT \"lower\"(x), \"MyFunc\"(y)",
        "SELECT audit(1)",
        "COPY (SELECT my_writer()) TO STDOUT",
    ] {
        assert_eq!(class(write), W, "{write}");
    }
    // Without a catalog, only the built-in and configured lists make writes.
    assert_eq!(c.classify_in(b"SELECT my_writer()", None).class, R);
}
