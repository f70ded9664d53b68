use super::*;

fn pk(cols: &[&str]) -> Vec<String> {
    cols.iter().map(|c| c.to_string()).collect()
}

fn lit_str(s: &str) -> Term {
    Term::Literal(Literal::Str(s.into()))
}

#[test]
fn select_with_literal_key() {
    let s = parse("SELECT k, v AS value, token(k), count(*) FROM ks.kv WHERE k = 'a' LIMIT 10;").unwrap();
    let Statement::Select(sel) = &s else {
        panic!("{s:?}")
    };
    assert_eq!(sel.table.keyspace.as_deref(), Some("ks"));
    assert_eq!(sel.items.len(), 4);
    assert_eq!(sel.items[2].selector, Selector::Token(vec!["k".into()]));
    assert_eq!(sel.items[3].selector, Selector::Count);
    assert_eq!(s.partition_key_terms(&pk(&["k"])), Some(vec![&lit_str("a")]));
    assert!(!s.is_lwt());
    assert!(s.is_read());
}

#[test]
fn composite_keys_and_markers() {
    let s = parse("select * from events where tenant = ? and bucket = 3 and ts > ?").unwrap();
    let terms = s.partition_key_terms(&pk(&["tenant", "bucket"])).unwrap();
    assert_eq!(terms[0], &Term::Bind(Bind::Positional(0)));
    assert_eq!(terms[1], &Term::Literal(Literal::Int("3".into())));
    assert_eq!(s.partition_key_terms(&pk(&["tenant", "other"])), None);

    let s = parse("INSERT INTO triple (val, seq, name, shard, id) VALUES (?,?,?,?,?) USING TTL 10").unwrap();
    let terms = s.partition_key_terms(&pk(&["id", "shard", "name"])).unwrap();
    assert_eq!(
        terms,
        [
            &Term::Bind(Bind::Positional(4)),
            &Term::Bind(Bind::Positional(3)),
            &Term::Bind(Bind::Positional(2))
        ]
    );
}

#[test]
fn lwt_forms() {
    for q in [
        "INSERT INTO kv (k, v) VALUES ('a', 1) IF NOT EXISTS",
        "UPDATE kv SET v = 2 WHERE k = 'a' IF v = 1",
        "UPDATE kv SET v = 2 WHERE k = 'a' IF EXISTS",
        "DELETE FROM kv WHERE k = 'a' IF v > 1 AND v < 5",
    ] {
        let s = parse(q).unwrap();
        assert!(s.is_lwt(), "{q}");
        assert_eq!(
            s.partition_key_terms(&pk(&["k"])),
            Some(vec![&lit_str("a")]),
            "{q}"
        );
    }
}

#[test]
fn updates_with_collections_and_counters() {
    let s = parse(
        "UPDATE ks.t USING TIMESTAMP 5 SET c = c + 1, m['x'] = 2, l = [1, 2], s = {'a'} WHERE \"Key\" = 0x01",
    )
    .unwrap();
    let Statement::Update(u) = &s else { panic!() };
    assert_eq!(u.assignments.len(), 4);
    assert!(u.assignments.iter().all(|(_, t)| *t == Term::Other));
    assert_eq!(
        s.partition_key_terms(&pk(&["Key"])),
        Some(vec![&Term::Literal(Literal::Blob(vec![1]))])
    );
}

#[test]
fn batches_use_and_others() {
    let s = parse(
        "BEGIN UNLOGGED BATCH USING TIMESTAMP 1 INSERT INTO kv (k, v) VALUES ('a', 1); \
         DELETE v FROM kv WHERE k = 'a'; APPLY BATCH",
    )
    .unwrap();
    let Statement::Batch(b) = &s else { panic!() };
    assert_eq!((b.kind, b.statements.len()), (1, 2));
    assert_eq!(parse("USE \"MyKs\"").unwrap(), Statement::Use("MyKs".into()));
    assert_eq!(parse("use myks;").unwrap(), Statement::Use("myks".into()));
    assert_eq!(
        parse("CREATE TABLE t (k int PRIMARY KEY)").unwrap(),
        Statement::Other("create table".into())
    );
    assert!(parse("SELEC k FROM kv").is_ok_and(|s| matches!(s, Statement::Other(_))));
    assert!(parse("SELECT FROM").is_err());
    assert!(parse("INSERT INTO kv (k) VALUES (1, 2)").is_err());
}

#[test]
fn in_with_one_value_routes_and_token_relations_do_not() {
    let s = parse("SELECT * FROM kv WHERE k IN ('x')").unwrap();
    assert_eq!(s.partition_key_terms(&pk(&["k"])), Some(vec![&lit_str("x")]));
    let s = parse("SELECT * FROM kv WHERE k IN ('x', 'y')").unwrap();
    assert_eq!(s.partition_key_terms(&pk(&["k"])), None);
    let s = parse("SELECT * FROM kv WHERE token(k) > 5").unwrap();
    assert_eq!(s.partition_key_terms(&pk(&["k"])), None);
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let q = format!(
        "SELECT * FROM t WHERE k = {}1{}",
        "f(".repeat(10_000),
        ")".repeat(10_000)
    );
    assert!(parse(&q).is_err());
    let q = format!("SELECT {}k{} FROM t", "f(".repeat(10_000), ")".repeat(10_000));
    assert!(parse(&q).is_err());
}
