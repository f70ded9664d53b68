//! The admin console: the virtual database `sluice` (alias `pgbouncer`) on every PostgreSQL
//! listener, where `[admin] admin_users` and `stats_users` run PgBouncer's SHOW commands and
//! `PAUSE`/`RESUME`/`RECONNECT`/`RELOAD`/`SHUTDOWN`.
//!
//! This module holds what the console shares with every session: who may use it, and the pause
//! state that sessions consult when a transaction starts (see [`Console::enter`]).

mod command;
mod session;
mod show;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};

pub use session::{serve, Login};

use crate::admin::http::AdminState;
use crate::config::AdminConfig;
use crate::postgres::activity::{Busy, DbActivity};

/// The names clients connect to for the console.
pub const DATABASES: [&str; 2] = ["sluice", "pgbouncer"];

/// What a console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `admin_users`: everything.
    Admin,
    /// `stats_users`: SHOW commands only.
    Stats,
}

/// Requests from the console to the server's main loop.
pub enum ServerCommand {
    /// Reload the configuration file as on SIGHUP; answers with the errors, if any.
    Reload(oneshot::Sender<Result<(), Vec<String>>>),
    /// Shut down gracefully as on SIGTERM.
    Shutdown,
}

/// What is paused.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Paused {
    /// Every database.
    all: bool,
    databases: BTreeSet<String>,
}

impl Paused {
    fn covers(&self, database: &str) -> bool {
        self.all || self.databases.contains(database)
    }
}

/// Why a transaction was not let through.
#[derive(Debug, thiserror::Error)]
#[error("sluice: database {database:?} is paused (waited {waited:?} for RESUME)")]
pub struct PausedError {
    pub database: String,
    pub waited: Duration,
}

/// The console's shared state.
pub struct Console {
    settings: ArcSwap<AdminConfig>,
    paused: Mutex<Paused>,
    /// Fast path for every transaction: nothing is paused.
    paused_any: AtomicBool,
    /// Bumped on every PAUSE and RESUME: held transactions look again.
    changes: watch::Sender<u64>,
    commands: mpsc::UnboundedSender<ServerCommand>,
    /// The running clusters and everything else the admin listener shows.
    pub view: Arc<AdminState>,
}

impl Console {
    pub fn new(
        settings: AdminConfig,
        view: Arc<AdminState>,
        commands: mpsc::UnboundedSender<ServerCommand>,
    ) -> Arc<Console> {
        Arc::new(Console {
            settings: ArcSwap::from_pointee(settings),
            paused: Mutex::new(Paused::default()),
            paused_any: AtomicBool::new(false),
            changes: watch::Sender::new(0),
            commands,
            view,
        })
    }

    /// Takes the `[admin]` settings of a reloaded configuration.
    pub fn configure(&self, settings: AdminConfig) {
        self.settings.store(Arc::new(settings));
    }

    /// The `[admin]` settings in force.
    pub fn settings(&self) -> Arc<AdminConfig> {
        self.settings.load_full()
    }

    /// Whether `database` is the console's.
    pub fn is_console_database(&self, database: &str) -> bool {
        let s = self.settings.load();
        // Without console users, `sluice` is an ordinary database name.
        (!s.admin_users.is_empty() || !s.stats_users.is_empty()) && DATABASES.contains(&database)
    }

    /// What `user` may do on the console, if anything.
    pub fn access(&self, user: &str) -> Option<Access> {
        let s = self.settings.load();
        if s.admin_users.iter().any(|u| u == user) {
            Some(Access::Admin)
        } else if s.stats_users.iter().any(|u| u == user) {
            Some(Access::Stats)
        } else {
            None
        }
    }

    fn is_paused(&self, database: &str) -> bool {
        self.paused_any.load(Ordering::SeqCst) && self.paused.lock().expect("pause lock").covers(database)
    }

    /// Waits while `database` is paused, up to `pause_timeout` from `start`.
    pub async fn wait_while_paused(
        &self,
        database: &str,
        start: tokio::time::Instant,
    ) -> Result<(), PausedError> {
        loop {
            // Subscribed before looking, so that a RESUME right after the look is not missed.
            let mut changes = self.changes.subscribe();
            if !self.is_paused(database) {
                return Ok(());
            }
            let deadline = start + self.settings.load().pause_timeout;
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let woken = tokio::time::timeout(remaining, changes.changed()).await;
            if woken.is_err() || remaining.is_zero() {
                return Err(PausedError {
                    database: database.to_string(),
                    waited: start.elapsed(),
                });
            }
        }
    }

    /// Starts a transaction on `db` if it is not paused (the fast path of [`Console::enter`]).
    pub fn try_enter(&self, db: &Arc<DbActivity>) -> Option<Busy> {
        let busy = Busy::start(db);
        (!self.is_paused(&db.name)).then_some(busy)
    }

    /// Starts a transaction on `db`: at once unless the database is paused, else once it is
    /// resumed (up to `pause_timeout`). The transaction counts as in flight (what `PAUSE`
    /// waits for) until the returned guard drops.
    pub async fn enter(&self, db: &Arc<DbActivity>) -> Result<Busy, PausedError> {
        let start = tokio::time::Instant::now();
        loop {
            // Counted first, then the flag read (both SeqCst), while `pause` sets the flag first
            // and then reads the count: either PAUSE sees this transaction or it sees the flag.
            if let Some(busy) = self.try_enter(db) {
                return Ok(busy);
            }
            self.wait_while_paused(&db.name, start).await?;
        }
    }

    /// `PAUSE [db]`: new transactions of the database (or of all) are held from now on; returns
    /// once the transactions in flight have ended, and closes the server connections of the
    /// database. A transaction still running after `pause_timeout` makes it fail, the pause
    /// staying in place.
    pub async fn pause(&self, database: Option<&str>) -> Result<(), String> {
        {
            let mut p = self.paused.lock().expect("pause lock");
            match database {
                None if p.all => return Err("already paused".into()),
                None => p.all = true,
                Some(d) if p.covers(d) => return Err(format!("database {d:?} is already paused")),
                Some(d) => {
                    p.databases.insert(d.to_string());
                }
            }
            self.paused_any.store(true, Ordering::SeqCst);
        }
        self.changes.send_modify(|g| *g += 1);
        let deadline = tokio::time::Instant::now() + self.settings.load().pause_timeout;
        loop {
            let busy = self.in_flight(database);
            if busy == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{busy} transaction(s) still in flight after pause_timeout; the pause stays in place (RESUME undoes it)"
                ));
            }
            // An admin command: a short poll is simpler than a wake-up on every transaction end.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for c in self.view.clusters.load().iter() {
            match database {
                Some(d) => c.pools.drain_database(d),
                None => c.pools.drain_all(),
            }
        }
        Ok(())
    }

    /// `RESUME [db]`.
    pub fn resume(&self, database: Option<&str>) -> Result<(), String> {
        {
            let mut p = self.paused.lock().expect("pause lock");
            match database {
                None if *p == Paused::default() => return Err("not paused".into()),
                None => *p = Paused::default(),
                Some(d) if p.all => {
                    return Err(format!(
                        "all databases are paused; RESUME without a name resumes them (database {d:?})"
                    ))
                }
                Some(d) => {
                    if !p.databases.remove(d) {
                        return Err(format!("database {d:?} is not paused"));
                    }
                }
            }
            self.paused_any.store(*p != Paused::default(), Ordering::SeqCst);
        }
        self.changes.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Whether `database` is paused (for SHOW DATABASES).
    pub fn paused(&self, database: &str) -> bool {
        self.is_paused(database)
    }

    /// Transactions in flight on `database` (or on all), over every cluster.
    fn in_flight(&self, database: Option<&str>) -> usize {
        self.view
            .clusters
            .load()
            .iter()
            .flat_map(|c| c.activity.databases())
            .filter(|d| database.is_none_or(|n| n == d.name))
            .map(|d| d.busy.load(Ordering::SeqCst) as usize)
            .sum()
    }

    /// Asks the server's main loop to do something.
    fn send(&self, command: ServerCommand) -> Result<(), String> {
        self.commands
            .send(command)
            .map_err(|_| "sluice is shutting down".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console() -> Arc<Console> {
        let (tx, _rx) = mpsc::unbounded_channel();
        let settings = AdminConfig {
            admin_users: vec!["boss".into()],
            stats_users: vec!["viewer".into()],
            pause_timeout: Duration::from_secs(5),
            ..AdminConfig::default()
        };
        Console::new(settings, Arc::new(AdminState::empty()), tx)
    }

    #[test]
    fn access_follows_the_lists() {
        let c = console();
        assert_eq!(c.access("boss"), Some(Access::Admin));
        assert_eq!(c.access("viewer"), Some(Access::Stats));
        assert_eq!(c.access("app"), None);
        assert!(c.is_console_database("sluice") && c.is_console_database("pgbouncer"));
        assert!(!c.is_console_database("app"));
        c.configure(AdminConfig::default());
        assert!(
            !c.is_console_database("sluice"),
            "no console users: an ordinary name"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_database_holds_transactions_until_resume_or_timeout() {
        let c = console();
        let activity = crate::postgres::activity::Activity::default();
        let db = activity.database("app");
        let other = activity.database("other");
        c.pause(Some("app")).await.expect("nothing in flight");
        assert!(c.pause(Some("app")).await.is_err(), "already paused");
        // Another database is not held.
        drop(c.enter(&other).await.expect("not paused"));
        // Held, then released by RESUME.
        let held = {
            let (c, db) = (c.clone(), db.clone());
            tokio::spawn(async move { c.enter(&db).await.map(drop) })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!held.is_finished());
        assert_eq!(
            db.busy.load(Ordering::SeqCst),
            0,
            "a held transaction is not in flight"
        );
        c.resume(Some("app")).unwrap();
        held.await.unwrap().expect("released by RESUME");
        assert!(c.resume(Some("app")).is_err(), "not paused any more");
        // Held past pause_timeout: refused.
        c.pause(None).await.unwrap();
        let err = c.enter(&db).await.map(drop).unwrap_err();
        assert!(err.waited >= Duration::from_secs(5), "{err}");
        c.resume(None).unwrap();
    }
}
