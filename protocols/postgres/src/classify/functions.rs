//! What a database says about its functions, for routing: a call is a read only if the function
//! is known not to write.
//!
//! Learnt from `pg_proc` (built-in and user-defined functions alike, as Pgpool-II does): a name
//! whose every overload is `IMMUTABLE` or `STABLE` is safe on a hot standby, and so are the
//! volatile built-ins in [`READ_SAFE_VOLATILE`] (`random()`, `clock_timestamp()`, ...). Any other
//! call — a volatile function, or a name the catalog does not know (created a moment ago) — makes
//! the statement a write.

use std::collections::HashSet;

/// Volatile built-ins (and common extensions') that change nothing and run on a hot standby.
pub const READ_SAFE_VOLATILE: &[&str] = &[
    "random",
    "random_normal",
    "setseed",
    "array_shuffle",
    "array_sample",
    "clock_timestamp",
    "timeofday",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "gen_random_bytes",
    "gen_salt",
    // A session setting: tracked by sluice, allowed on a standby.
    "set_config",
    "pg_is_in_recovery",
    "pg_last_wal_replay_lsn",
    "pg_last_wal_receive_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_is_wal_replay_paused",
    "pg_get_wal_replay_pause_state",
    "pg_database_size",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_table_size",
    "pg_indexes_size",
    "pg_tablespace_size",
    "pg_stat_clear_snapshot",
    "pg_blocking_pids",
    "pg_safe_snapshot_blocking_pids",
    "pg_isolation_test_session_is_blocked",
    "pg_jit_available",
    "pg_notification_queue_usage",
    "pg_current_logfile",
    "pg_stat_file",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_control_checkpoint",
    "pg_control_system",
    "pg_control_init",
    "pg_control_recovery",
    "pg_xact_commit_timestamp",
    "pg_last_committed_xact",
];

/// Words that may stand before `(` in a query without being a function call: keywords, type
/// names with a precision (`varchar(10)`, `timestamp(3)`), SQL constructs that look like calls.
const NOT_CALLS: &[&str] = &[
    "all",
    "and",
    "any",
    "array",
    "as",
    "between",
    "bit",
    "by",
    "case",
    "cast",
    "char",
    "character",
    "coalesce",
    "cube",
    "current_time",
    "current_timestamp",
    "cycle",
    "dec",
    "decimal",
    "default",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "exists",
    "explain",
    "extract",
    "fetch",
    "filter",
    "float",
    "from",
    "greatest",
    "group",
    "grouping",
    "having",
    "ilike",
    "in",
    "intersect",
    "interval",
    "into",
    "is",
    "join",
    "lateral",
    "least",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "materialized",
    "nchar",
    "normalize",
    "not",
    "nullif",
    "numeric",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "over",
    "overlay",
    "partition",
    "position",
    "precision",
    "recursive",
    "repeatable",
    "returning",
    "rollup",
    "row",
    "search",
    "select",
    "sets",
    "similar",
    "some",
    "substring",
    "table",
    "tablesample",
    "then",
    "time",
    "timestamp",
    "to",
    "treat",
    "trim",
    "union",
    "using",
    "values",
    "varchar",
    "varying",
    "when",
    "where",
    "window",
    "with",
    "within",
    "xmlattributes",
    "xmlconcat",
    "xmlelement",
    "xmlexists",
    "xmlforest",
    "xmlparse",
    "xmlpi",
    "xmlroot",
    "xmlserialize",
    "xmltable",
];

/// The functions of one database that a read may call.
#[derive(Debug, Clone, Default)]
pub struct FunctionCatalog {
    /// Names as in `pg_proc` (case-sensitive).
    safe: HashSet<Box<[u8]>>,
}

impl FunctionCatalog {
    /// Builds the catalog from `(proname, any overload volatile)` rows. `writes` (the
    /// configuration's `write_functions`) are never safe, whatever their volatility.
    pub fn new<'a>(rows: impl IntoIterator<Item = (&'a str, bool)>, writes: &[Box<[u8]>]) -> Self {
        let mut safe: HashSet<Box<[u8]>> = rows
            .into_iter()
            .filter(|(name, volatile)| !volatile || READ_SAFE_VOLATILE.contains(name))
            .map(|(name, _)| name.as_bytes().into())
            .collect();
        for w in writes {
            safe.remove(w.as_ref());
        }
        for w in super::DEFAULT_WRITE_FUNCTIONS {
            safe.remove(*w);
        }
        FunctionCatalog { safe }
    }

    /// How many function names are safe.
    pub fn len(&self) -> usize {
        self.safe.len()
    }

    /// Whether no function is known.
    pub fn is_empty(&self) -> bool {
        self.safe.is_empty()
    }

    /// Whether calling `name` (as written: folded to lower case unless `quoted`) is safe.
    pub fn is_safe(&self, name: &[u8], quoted: bool) -> bool {
        if quoted || !name.iter().any(u8::is_ascii_uppercase) {
            return self.safe.contains(name);
        }
        // Identifiers are at most 63 bytes; a longer one is no function name.
        let mut lower = [0u8; 64];
        let Some(buf) = lower.get_mut(..name.len()) else {
            return false;
        };
        for (d, s) in buf.iter_mut().zip(name) {
            *d = s.to_ascii_lowercase();
        }
        self.safe.contains(&*buf)
    }
}

/// Whether the unquoted word `w` before `(` is no function call, given the token before it:
/// a keyword or type name, a column list after an alias (`AS t(a, b)`, `f() t(a)`), a type after
/// `::`, or a CTE name after `WITH`.
pub(super) fn not_a_call(w: &[u8], before: Option<super::Tok<'_>>) -> bool {
    use super::Tok;
    match before {
        Some(Tok::Punct(b')' | b':')) => return true,
        // Schema-qualified: a call.
        Some(Tok::Punct(b'.')) => return false,
        Some(Tok::Word(b)) if super::kw(b, b"AS") || super::kw(b, b"WITH") || super::kw(b, b"RECURSIVE") => {
            return true
        }
        _ => {}
    }
    NOT_CALLS.iter().any(|k| super::kw(w, k.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volatile_functions_are_unsafe_unless_known_read_safe() {
        let cat = FunctionCatalog::new(
            [
                ("lower", false),
                ("random", true),
                ("lo_put", true),
                ("my_writer", true),
                ("Mixed", false),
            ],
            &[b"audit".to_vec().into_boxed_slice()],
        );
        assert!(cat.is_safe(b"LOWER", false));
        assert!(cat.is_safe(b"random", false));
        assert!(!cat.is_safe(b"lo_put", false));
        assert!(!cat.is_safe(b"my_writer", false));
        assert!(!cat.is_safe(b"unknown_fn", false), "unknown: a write");
        assert!(cat.is_safe(b"Mixed", true));
        assert!(!cat.is_safe(b"Mixed", false), "unquoted folds to mixed");
        assert!(!cat.is_safe(&[b'a'; 70], false));
    }
}
