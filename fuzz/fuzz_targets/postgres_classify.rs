//! The statement classifier on any bytes: it must never panic or hang, and a write appended
//! after a statement it has fully read must make the whole string a write.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_postgres::{Class, Classifier};

fn classifiers() -> &'static [Classifier; 2] {
    static C: OnceLock<[Classifier; 2]> = OnceLock::new();
    C.get_or_init(|| {
        [
            Classifier::new(Vec::<String>::new()),
            Classifier::new(["audit_log", "Bump"]),
        ]
    })
}

fuzz_target!(|sql: &[u8]| {
    for c in classifiers() {
        let a = c.classify(sql);
        let b = c.classify_with(sql, false);
        assert_eq!(a, c.classify(sql), "classification is deterministic");
        // Without quotes, comments, dollar quotes, escapes or brackets, the lexer cannot still
        // be inside something when the input ends, so a following INSERT is its own statement.
        let plain = !sql.iter().any(|b| {
            matches!(
                b,
                b'\'' | b'"' | b'$' | b'-' | b'/' | b'\\' | b'(' | b')' | b'[' | b']' | 0
            )
        });
        if plain {
            let mut more = sql.to_vec();
            more.extend_from_slice(b";INSERT INTO t VALUES (1)");
            assert_eq!(
                c.classify(&more).class,
                Class::Write,
                "{:?}",
                String::from_utf8_lossy(&more)
            );
            assert_eq!(c.classify_with(&more, false).class, Class::Write);
        }
        let _ = b;
    }
});
