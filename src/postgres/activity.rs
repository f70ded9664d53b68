//! What the clients and databases of one cluster are doing, for the admin console: connected
//! clients, transactions in flight per database (what `PAUSE` waits for), and per-database
//! totals (`SHOW STATS`).
//!
//! Sessions update these with relaxed atomics, a few per transaction; the console reads them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::striped::Striped;

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// What a client logged in as: shared by the clients that logged in with the same user,
/// database and startup parameters (one pointer in each client's record instead of three).
#[derive(PartialEq)]
pub struct Identity {
    pub user: Arc<str>,
    pub database: Arc<str>,
    /// Its startup parameters.
    pub startup: crate::postgres::backend::StartupParams,
}

/// A socket address in 19 bytes: `SocketAddr` takes 32 for IPv6's flow information and scope
/// id, which nothing here shows, and every client record holds two.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CompactAddr {
    ip: IpAddr,
    /// Big-endian (a `u16` would align the struct to 2 bytes and pad it to 20).
    port: [u8; 2],
}

impl CompactAddr {
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    pub fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }

    pub fn get(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port())
    }
}

impl From<SocketAddr> for CompactAddr {
    fn from(a: SocketAddr) -> Self {
        CompactAddr {
            ip: a.ip(),
            port: a.port().to_be_bytes(),
        }
    }
}

impl std::fmt::Display for CompactAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

/// One logged-in client (or admin console session): the record the console lists and cancel
/// requests find by the client's key.
///
/// Every idle client holds one, so it is kept small: 120 bytes, which with the `Arc`'s counts
/// and the allocator's header is a 144-byte chunk (216 bytes and a 240-byte chunk when it held
/// its names, addresses and times at full width).
pub struct ClientInfo {
    /// The session id (unique in the cluster).
    pub id: u64,
    /// Who it logged in as.
    pub who: Arc<Identity>,
    /// The key of its cancel requests, as told to it in BackendKeyData (set by
    /// `Activity::register`, unique among the cluster's clients).
    pub cancel_key: (i32, i32),
    /// When its current request started waiting for a backend (or for a `RESUME`), in
    /// microseconds since the Unix epoch; 0 when it is not waiting.
    pub wait_since: AtomicU64,
    /// When the client connected, in seconds since the Unix epoch (the console shows seconds).
    pub connect_time: u32,
    /// When it last started a request, in seconds since the Unix epoch.
    pub request_time: AtomicU32,
    /// Where its cancel requests go.
    pub cancel: crate::postgres::cluster::CancelState,
    pub addr: CompactAddr,
    pub local: Option<CompactAddr>,
    pub tls: bool,
    /// Set while it holds a backend for a request or transaction (a flag, not a count).
    pub active: AtomicBool,
}

impl ClientInfo {
    /// A record for a client that has just logged in (its cancel key is chosen when it is
    /// registered).
    pub fn new(
        id: u64,
        who: Arc<Identity>,
        addr: SocketAddr,
        local: Option<SocketAddr>,
        tls: bool,
    ) -> ClientInfo {
        ClientInfo {
            id,
            who,
            cancel_key: (0, 0),
            wait_since: 0.into(),
            connect_time: now_secs(),
            request_time: 0.into(),
            cancel: Default::default(),
            addr: addr.into(),
            local: local.map(Into::into),
            tls,
            active: false.into(),
        }
    }

    pub fn user(&self) -> &str {
        &self.who.user
    }

    pub fn database(&self) -> &str {
        &self.who.database
    }

    /// The application_name the client logged in with.
    pub fn application_name(&self) -> &str {
        self.who
            .startup
            .iter()
            .find(|(k, _)| k == "application_name")
            .map_or("", |(_, v)| v)
    }
}

/// Seconds since the Unix epoch, now (as kept in [`ClientInfo`]).
pub fn now_secs() -> u32 {
    secs(now_micros())
}

/// Microseconds since the Unix epoch as the seconds [`ClientInfo`] keeps (saturates in 2106).
pub fn secs(micros: u64) -> u32 {
    u32::try_from(micros / 1_000_000).unwrap_or(u32::MAX)
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
    /// Its functions, for classification (see `functions.rs`).
    pub functions: crate::postgres::functions::CatalogSlot,
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
    /// Logged-in clients by cancel key: one map serves both the console's list and cancel
    /// requests (a second one, by session id, cost every idle client ~28 bytes of table).
    clients: Mutex<HashMap<(i32, i32), Arc<ClientInfo>>>,
    databases: Mutex<HashMap<String, Arc<DbActivity>>>,
    /// User and database names, shared by the clients that use them.
    names: crate::common::intern::Interner<str>,
    /// Startup parameters, shared by the clients that sent the same ones.
    startups: crate::common::intern::Interner<Vec<(String, String)>>,
    /// Whole identities, shared likewise (see [`Activity::identity`]).
    identities: crate::common::intern::Interner<Identity>,
}

/// Keeps a console session listed until it drops (a client's session unlists itself when it
/// ends: see `Session`'s `Drop`).
pub struct Listed<'a> {
    activity: &'a Activity,
    pub info: Arc<ClientInfo>,
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        self.activity.unregister(&self.info);
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
            functions: Default::default(),
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

    /// Who logged in as `user` to `database` with these startup parameters, shared with the
    /// clients that logged in the same way.
    pub fn identity(
        &self,
        user: &str,
        database: &str,
        startup: crate::postgres::backend::StartupParams,
    ) -> Arc<Identity> {
        self.identities.share(Arc::new(Identity {
            user: self.names.share_str(user),
            database: self.names.share_str(database),
            startup: self.startups.share(startup),
        }))
    }

    /// Lists a logged-in client under a cancel key: `preferred` if no other client holds it
    /// (keys of backends on different servers may coincide), else a random one. The client
    /// stays listed until [`Activity::unregister`].
    pub fn register(&self, mut info: ClientInfo, preferred: Option<(i32, i32)>) -> Arc<ClientInfo> {
        use rand::Rng;
        let mut clients = self.clients.lock().expect("clients lock");
        let mut key = preferred;
        loop {
            let k = key.take().unwrap_or_else(|| {
                let mut rng = rand::rng();
                (rng.random::<i32>() & 0x7fff_ffff, rng.random::<i32>())
            });
            if let std::collections::hash_map::Entry::Vacant(v) = clients.entry(k) {
                info.cancel_key = k;
                let info = Arc::new(info);
                v.insert(info.clone());
                return info;
            }
        }
    }

    /// Lists a console session until the returned guard drops.
    pub fn register_console(&self, info: ClientInfo) -> Listed<'_> {
        Listed {
            activity: self,
            info: self.register(info, None),
        }
    }

    /// Takes a client off the list (and forgets its cancel key).
    pub fn unregister(&self, info: &Arc<ClientInfo>) {
        let mut clients = self.clients.lock().expect("clients lock");
        if clients
            .get(&info.cancel_key)
            .is_some_and(|c| Arc::ptr_eq(c, info))
        {
            clients.remove(&info.cancel_key);
        }
    }

    /// The client with this cancel key, if it is connected.
    pub fn by_cancel_key(&self, key: (i32, i32)) -> Option<Arc<ClientInfo>> {
        self.clients.lock().expect("clients lock").get(&key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(a: &Activity, id: u64, app: &str) -> ClientInfo {
        let startup = Arc::new(vec![("application_name".to_string(), app.to_string())]);
        let who = a.identity("alice", "app", startup);
        ClientInfo::new(id, who, "[::1]:40000".parse().unwrap(), None, false)
    }

    #[test]
    fn a_cancel_key_is_the_preferred_one_unless_taken() {
        let a = Activity::default();
        let first = a.register(client(&a, 1, "x"), Some((7, 9)));
        assert_eq!(first.cancel_key, (7, 9));
        // Backends on different servers may have the same key: the second client gets another.
        let second = a.register(client(&a, 2, "x"), Some((7, 9)));
        assert_ne!(second.cancel_key, (7, 9));
        assert!(Arc::ptr_eq(&a.by_cancel_key((7, 9)).unwrap(), &first));
        assert!(Arc::ptr_eq(&a.by_cancel_key(second.cancel_key).unwrap(), &second));
        assert_eq!(a.clients().iter().map(|c| c.id).collect::<Vec<_>>(), [1, 2]);
        // Same login, same identity; another application_name, another.
        assert!(Arc::ptr_eq(&first.who, &second.who));
        let third = a.register(client(&a, 3, "y"), None);
        assert!(!Arc::ptr_eq(&first.who, &third.who));
        assert_eq!(third.application_name(), "y");
        a.unregister(&first);
        assert!(a.by_cancel_key((7, 9)).is_none());
        {
            let _console = a.register_console(client(&a, 4, "console"));
            assert_eq!(a.clients().len(), 3);
        }
        assert_eq!(a.clients().iter().map(|c| c.id).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn compact_addresses_keep_ip_and_port() {
        for text in ["127.0.0.1:5432", "[::1]:6432", "[2001:db8::7]:1"] {
            let addr: SocketAddr = text.parse().unwrap();
            let c = CompactAddr::from(addr);
            assert_eq!((c.ip(), c.port(), c.get()), (addr.ip(), addr.port(), addr));
            assert_eq!(c.to_string(), text);
        }
        assert_eq!(std::mem::size_of::<Option<CompactAddr>>(), 19);
    }

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
