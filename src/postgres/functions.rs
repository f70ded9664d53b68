//! Each database's functions, learnt from `pg_proc` so that a call of a volatile function —
//! built-in (`lo_put`, `brin_summarize_range`, ...) or user-defined — routes as a write, while
//! `random()` and stable functions stay reads (see `sluice_postgres::FunctionCatalog`).
//!
//! A database's catalog is loaded when its first client logs in (that login waits for it, so
//! no request is ever classified without it once it can be had), and again in the background
//! when a client logs in more than [`REFRESH`] after the last load, or after a client changed
//! functions (`CREATE`/`ALTER`/`DROP FUNCTION|PROCEDURE`). Functions created since the last load
//! are unknown, and a call of an unknown function is a write, so a new function never reaches a
//! replica before sluice has seen its volatility.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use sluice_postgres::{Classifier, FunctionCatalog};
use tracing::{debug, warn};

use crate::postgres::backend::{Backend, BackendError, ConnectOptions};

/// A catalog older than this is reloaded in the background at the next login.
pub const REFRESH: Duration = Duration::from_secs(30);

/// Every function name with whether any of its overloads is volatile.
const FUNCTIONS_SQL: &str =
    "SELECT proname, bool_or(provolatile = 'v') FROM pg_catalog.pg_proc GROUP BY proname";

/// One database's catalog, shared by its sessions and swapped whole when reloaded.
#[derive(Default)]
pub struct CatalogSlot {
    current: ArcSwapOption<FunctionCatalog>,
    /// When the last load finished (successfully or not).
    loaded: Mutex<Option<Instant>>,
    loading: AtomicBool,
}

impl CatalogSlot {
    /// The catalog, if one has been loaded.
    pub fn get(&self) -> arc_swap::Guard<Option<Arc<FunctionCatalog>>> {
        self.current.load()
    }

    /// Makes the next login reload it.
    pub fn invalidate(&self) {
        *self.loaded.lock().expect("catalog lock") = None;
    }

    fn needs_load(&self) -> bool {
        self.loaded
            .lock()
            .expect("catalog lock")
            .is_none_or(|at| at.elapsed() > REFRESH)
    }
}

/// Loads `slot` over a connection opened with `source` (sluice's own startup parameters)
/// unless another load is running; a failure keeps the previous catalog (without one,
/// classification uses the built-in write functions only).
pub async fn load(slot: &CatalogSlot, classifier: &Classifier, source: ConnectOptions<'_>) {
    if slot.loading.swap(true, Ordering::AcqRel) {
        return;
    }
    let result = read(classifier, &source).await;
    match result {
        Ok(catalog) => {
            debug!(database = %source.database, safe = catalog.len(), "function catalog loaded");
            slot.current.store(Some(Arc::new(catalog)));
        }
        Err(e) => {
            warn!(database = %source.database, error = %e, "could not read the database's functions; reads calling functions are routed by the built-in list")
        }
    }
    *slot.loaded.lock().expect("catalog lock") = Some(Instant::now());
    slot.loading.store(false, Ordering::Release);
}

/// Whether `slot` should be loaded now: never loaded, or stale.
pub fn due(slot: &CatalogSlot) -> bool {
    slot.needs_load() && !slot.loading.load(Ordering::Acquire)
}

async fn read(classifier: &Classifier, s: &ConnectOptions<'_>) -> Result<FunctionCatalog, BackendError> {
    let mut conn = Backend::connect(*s).await?;
    let rows = tokio::time::timeout(s.timeout, conn.simple_query(FUNCTIONS_SQL))
        .await
        .map_err(|_| BackendError::Timeout {
            addr: s.addr.to_string(),
            after: s.timeout,
        })??;
    Ok(classifier.catalog(rows.iter().filter_map(|r| match r.as_slice() {
        [Some(name), volatile] => Some((name.as_str(), volatile.as_deref() != Some("f"))),
        _ => None,
    })))
}

/// Whether a statement changes the database's functions (so its catalog should be reloaded).
pub fn changes_functions(sql: &[u8]) -> bool {
    let sql = sql.trim_ascii_start();
    let starts = |w: &[u8]| sql.len() >= w.len() && sql[..w.len()].eq_ignore_ascii_case(w);
    if !(starts(b"CREATE") || starts(b"ALTER") || starts(b"DROP")) {
        return false;
    }
    let has = |w: &[u8]| sql.windows(w.len()).any(|x| x.eq_ignore_ascii_case(w));
    has(b"FUNCTION") || has(b"PROCEDURE") || has(b"EXTENSION") || has(b"SCHEMA")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_ddl_is_noticed() {
        assert!(changes_functions(
            b"CREATE OR REPLACE FUNCTION f() RETURNS int ..."
        ));
        assert!(changes_functions(b"  alter function f() volatile"));
        assert!(changes_functions(b"DROP EXTENSION lo"));
        assert!(!changes_functions(b"SELECT 'create function'"));
        assert!(!changes_functions(b"CREATE TABLE t (a int)"));
    }

    #[test]
    fn a_slot_is_due_until_loaded() {
        let slot = CatalogSlot::default();
        assert!(due(&slot));
        *slot.loaded.lock().unwrap() = Some(Instant::now());
        assert!(!due(&slot));
        slot.invalidate();
        assert!(due(&slot));
    }
}
