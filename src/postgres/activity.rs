//! What the clients and databases of one cluster are doing, for the admin console: connected
//! clients, transactions in flight per database (what `PAUSE` waits for), and per-database
//! totals (`SHOW STATS`).
//!
//! Sessions update these with relaxed atomics, a few per transaction; the console reads them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::striped::Striped;

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// One logged-in client.
pub struct ClientInfo {
    /// The session id (unique in the cluster).
    pub id: u64,
    /// Shared by the clients of the same user (see `Activity::names`).
    pub user: Arc<str>,
    pub database: Arc<str>,
    pub addr: SocketAddr,
    pub local: Option<SocketAddr>,
    pub tls: bool,
    /// Its startup parameters (shared by the clients that sent the same ones).
    pub startup: crate::postgres::backend::StartupParams,
    /// When the client connected, in microseconds since the Unix epoch.
    pub connect_time: u64,
    /// When its current request started waiting for a backend (or for a `RESUME`); 0 when it
    /// is not waiting.
    pub wait_since: AtomicU64,
    /// When it last started a request.
    pub request_time: AtomicU64,
    /// Set while it holds a backend for a request or transaction (a flag, not a count: the
    /// record is part of every idle client's cost, and 7 bytes of it made it a size class
    /// larger).
    pub active: AtomicBool,
    /// Where its cancel requests go (see `Cluster::try_register_cancel`).
    pub cancel: crate::postgres::cluster::CancelState,
}

impl ClientInfo {
    /// The application_name the client logged in with.
    pub fn application_name(&self) -> &str {
        self.startup
            .iter()
            .find(|(k, _)| k == "application_name")
            .map_or("", |(_, v)| v)
    }
}

/// Totals of one database since sluice started (`SHOW STATS`), striped by runtime thread
/// (every transaction adds to several of them).
#[derive(Default)]
pub struct DbTotals {
    /// Transactions (a request or explicit transaction, from its first message to the
    /// ReadyForQuery that ends it).
    pub xacts: Striped,
    /// Simple-protocol queries and extended-protocol Executes.
    pub queries: Striped,
    /// Times a backend was assigned to a client.
    pub assignments: Striped,
    /// Bytes received from clients.
    pub received: Striped,
    /// Bytes sent to clients.
    pub sent: Striped,
    /// Microseconds spent in transactions.
    pub xact_us: Striped,
    /// Microseconds clients waited for a backend (or for `RESUME`).
    pub wait_us: Striped,
}

/// A copy of [`DbTotals`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub xacts: u64,
    pub queries: u64,
    pub assignments: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_us: u64,
    pub wait_us: u64,
}

impl DbTotals {
    pub fn read(&self) -> Totals {
        let r = |a: &Striped| a.load(Ordering::Relaxed);
        Totals {
            xacts: r(&self.xacts),
            queries: r(&self.queries),
            assignments: r(&self.assignments),
            received: r(&self.received),
            sent: r(&self.sent),
            xact_us: r(&self.xact_us),
            wait_us: r(&self.wait_us),
        }
    }
}

/// Averages over one stats period (`SHOW STATS` `avg_*` columns).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Averages {
    /// Transactions per second.
    pub xact_count: u64,
    /// Queries per second.
    pub query_count: u64,
    /// Backend assignments per second.
    pub server_assignment_count: u64,
    /// Bytes per second from clients.
    pub recv: u64,
    /// Bytes per second to clients.
    pub sent: u64,
    /// Microseconds per transaction.
    pub xact_time: u64,
    /// Microseconds waited per backend assignment.
    pub wait_time: u64,
}

impl Averages {
    /// The averages between two readings `elapsed` apart.
    pub fn between(old: &Totals, new: &Totals, elapsed: Duration) -> Averages {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| (b.saturating_sub(a) as f64 / secs).round() as u64;
        let per = |total: u64, count: u64| total.checked_div(count).unwrap_or(0);
        let xacts = new.xacts.saturating_sub(old.xacts);
        let assignments = new.assignments.saturating_sub(old.assignments);
        Averages {
            xact_count: rate(old.xacts, new.xacts),
            query_count: rate(old.queries, new.queries),
            server_assignment_count: rate(old.assignments, new.assignments),
            recv: rate(old.received, new.received),
            sent: rate(old.sent, new.sent),
            xact_time: per(new.xact_us.saturating_sub(old.xact_us), xacts),
            wait_time: per(new.wait_us.saturating_sub(old.wait_us), assignments),
        }
    }
}

/// How long one stats period lasts (PgBouncer's default `stats_period`).
pub const STATS_PERIOD: Duration = Duration::from_secs(60);

/// One database of one cluster.
pub struct DbActivity {
    pub name: String,
    /// Transactions in flight: what `PAUSE` waits for. (Striped: every transaction adds and
    /// subtracts one; with SeqCst on both sides, PAUSE's sum still pairs with its flag.)
    pub busy: Striped,
    pub totals: DbTotals,
    /// The start of the current stats period with the totals then, and the averages of the
    /// last complete period.
    period: Mutex<(Instant, Totals, Averages)>,
}

impl DbActivity {
    /// The averages of the last complete stats period (of the time so far during the first
    /// one). Periods roll when this is called.
    pub fn averages(&self) -> Averages {
        let now = Instant::now();
        let totals = self.totals.read();
        let mut p = self.period.lock().expect("stats period lock");
        let elapsed = now.duration_since(p.0);
        if elapsed >= STATS_PERIOD {
            p.2 = Averages::between(&p.1, &totals, elapsed);
            *p = (now, totals, p.2);
            p.2
        } else if p.2 == Averages::default() {
            Averages::between(&p.1, &totals, elapsed)
        } else {
            p.2
        }
    }
}

/// A transaction in flight on a database; ends (and is counted) when dropped.
pub struct Busy {
    db: Arc<DbActivity>,
    since: Instant,
}

impl Busy {
    /// Marks a transaction of `db` in flight.
    pub fn start(db: &Arc<DbActivity>) -> Busy {
        // SeqCst, with the pause flag read after it: see `Console::enter`.
        db.busy.fetch_add(1, Ordering::SeqCst);
        Busy {
            db: db.clone(),
            since: Instant::now(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.db.busy.fetch_sub(1, Ordering::SeqCst);
        let t = &self.db.totals;
        t.xacts.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        t.xact_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// The clients and databases of one cluster.
#[derive(Default)]
pub struct Activity {
    clients: Mutex<HashMap<u64, Arc<ClientInfo>>>,
    databases: Mutex<HashMap<String, Arc<DbActivity>>>,
    /// User and database names, shared by the clients that use them.
    pub names: crate::common::intern::Interner<str>,
    /// Startup parameters, shared by the clients that sent the same ones.
    pub startups: crate::common::intern::Interner<Vec<(String, String)>>,
}

/// Removes a client from its cluster's list when its session ends.
pub struct Registered {
    pub info: Arc<ClientInfo>,
    activity: std::sync::Weak<crate::postgres::cluster::Cluster>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(c) = self.activity.upgrade() {
            c.activity
                .clients
                .lock()
                .expect("clients lock")
                .remove(&self.info.id);
        }
    }
}

impl Activity {
    /// The activity record of `database` (made on first use).
    pub fn database(&self, database: &str) -> Arc<DbActivity> {
        let mut dbs = self.databases.lock().expect("databases lock");
        if let Some(d) = dbs.get(database) {
            return d.clone();
        }
        let d = Arc::new(DbActivity {
            name: database.to_string(),
            busy: Striped::default(),
            totals: DbTotals::default(),
            period: Mutex::new((Instant::now(), Totals::default(), Averages::default())),
        });
        dbs.insert(database.to_string(), d.clone());
        d
    }

    /// Every database clients have used, by name.
    pub fn databases(&self) -> Vec<Arc<DbActivity>> {
        let mut v: Vec<_> = self
            .databases
            .lock()
            .expect("databases lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Every logged-in client, oldest first.
    pub fn clients(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<_> = self
            .clients
            .lock()
            .expect("clients lock")
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Lists a logged-in client until the returned guard drops.
    pub fn register(cluster: &Arc<crate::postgres::cluster::Cluster>, info: ClientInfo) -> Registered {
        let info = Arc::new(info);
        cluster
            .activity
            .clients
            .lock()
            .expect("clients lock")
            .insert(info.id, info.clone());
        Registered {
            info,
            activity: Arc::downgrade(cluster),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_are_rates_and_means() {
        let old = Totals::default();
        let new = Totals {
            xacts: 120,
            queries: 240,
            assignments: 60,
            received: 6000,
            sent: 12000,
            xact_us: 1200,
            wait_us: 600,
        };
        let a = Averages::between(&old, &new, Duration::from_secs(60));
        assert_eq!(a.xact_count, 2);
        assert_eq!(a.query_count, 4);
        assert_eq!(a.server_assignment_count, 1);
        assert_eq!(a.recv, 100);
        assert_eq!(a.sent, 200);
        assert_eq!(a.xact_time, 10);
        assert_eq!(a.wait_time, 10);
        assert_eq!(Averages::between(&new, &new, Duration::ZERO), Averages::default());
    }

    #[test]
    fn busy_counts_in_flight_and_totals() {
        let a = Activity::default();
        let db = a.database("app");
        let b1 = Busy::start(&db);
        let b2 = Busy::start(&a.database("app"));
        assert_eq!(db.busy.load(Ordering::SeqCst), 2);
        drop(b1);
        drop(b2);
        assert_eq!(db.busy.load(Ordering::SeqCst), 0);
        assert_eq!(db.totals.read().xacts, 2);
        assert_eq!(a.databases().len(), 1);
    }
}
