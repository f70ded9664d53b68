//! `auth_user` + `auth_query` (PgBouncer's names): a role that is not in the configuration logs
//! in with its database password. sluice looks up the role's SCRAM verifier by running
//! `auth_query` as `auth_user`, checks the client against it, and logs in to the servers by
//! SCRAM pass-through (see `backend::Credential::PassThrough`). Lookups are cached briefly,
//! found or not; a failed lookup looks to the client exactly like a wrong password.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::postgres::backend::{own_startup_params, Backend, ConnectOptions};
use crate::postgres::cluster::{Cluster, User};

/// How long a lookup's answer (a verifier, or none) is used before the next lookup.
pub const CACHE_TTL: Duration = Duration::from_secs(15);

/// Negative answers kept at most (names that are not roles); older ones go first.
const MAX_NEGATIVE: usize = 10_000;

/// What the last lookup of one name found.
struct Entry {
    at: Instant,
    /// The role with its verifier; `None`: no such role, or no usable verifier.
    user: Option<Arc<User>>,
}

/// The roles found by `auth_query`, by name. A role stays while it exists, so that connected
/// clients keep getting server connections with the key of its last login.
#[derive(Default)]
pub struct DynamicUsers {
    entries: Mutex<HashMap<String, Entry>>,
}

impl DynamicUsers {
    /// The role `name` as last looked up, however long ago.
    pub fn get(&self, name: &str) -> Option<Arc<User>> {
        self.entries
            .lock()
            .expect("auth cache lock")
            .get(name)
            .and_then(|e| e.user.clone())
    }

    /// A cached answer younger than [`CACHE_TTL`].
    fn fresh(&self, name: &str) -> Option<Option<Arc<User>>> {
        let entries = self.entries.lock().expect("auth cache lock");
        let e = entries.get(name)?;
        (e.at.elapsed() < CACHE_TTL).then(|| e.user.clone())
    }

    /// Records a lookup's answer (a SCRAM verifier or an md5 hash, see `User::from_stored`).
    /// The same verifier as before keeps its `User` (and so the ClientKey it holds); a new one
    /// replaces it.
    fn store(&self, name: &str, stored: Option<&str>) -> Option<Arc<User>> {
        let mut entries = self.entries.lock().expect("auth cache lock");
        if entries.len() >= MAX_NEGATIVE {
            entries.retain(|_, e| e.user.is_some() || e.at.elapsed() < CACHE_TTL);
        }
        let previous = entries.get(name).and_then(|e| e.user.clone());
        let user = stored.and_then(|stored| match previous {
            Some(p) if p.is_from(stored) => Some(p),
            _ => User::from_stored(stored).map(Arc::new),
        });
        entries.insert(
            name.to_string(),
            Entry {
                at: Instant::now(),
                user: user.clone(),
            },
        );
        user
    }

    /// Roles found so far (for the console's SHOW USERS).
    pub fn names(&self) -> Vec<String> {
        let entries = self.entries.lock().expect("auth cache lock");
        let mut names: Vec<String> = entries
            .iter()
            .filter(|(_, e)| e.user.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }
}

impl Cluster {
    /// The role `name` for a client logging in to `database`: configured users are not looked
    /// up; others are, with `auth_query`, when `auth_user` is set. `None` for no such role (or
    /// no SCRAM verifier, or a lookup that failed: the client is refused like a wrong password).
    pub async fn lookup_user(&self, name: &str, database: &str) -> Option<Arc<User>> {
        let auth_user = self.pg.auth_user.as_deref()?;
        if let Some(answer) = self.dynamic.fresh(name) {
            return answer;
        }
        let verifier = match self.run_auth_query(auth_user, name, database).await {
            Ok(v) => v,
            Err(e) => {
                // Not cached: the next login tries again.
                warn!(cluster = %self.config.name, user = %name, error = %e, "auth_query lookup failed; the client is refused as with a wrong password");
                return None;
            }
        };
        let usable = verifier.as_deref().filter(|v| User::from_stored(v).is_some());
        if verifier.is_some() && usable.is_none() {
            debug!(user = %name, "auth_query returned neither a SCRAM-SHA-256 verifier nor an md5 hash");
        }
        self.dynamic.store(name, usable)
    }

    /// Runs `auth_query` for `name` as `auth_user`; the verifier column, if a row came back.
    async fn run_auth_query(
        &self,
        auth_user: &str,
        name: &str,
        database: &str,
    ) -> Result<Option<String>, String> {
        let addr = self.lookup_node().ok_or("no healthy node")?;
        let credential = match self.users.get(auth_user) {
            Some(u) => &u.credential,
            None => return Err(format!("auth_user {auth_user:?} is not configured")),
        };
        let params = own_startup_params();
        let database = self.pg.auth_dbname.as_deref().unwrap_or(database);
        let mut conn = Backend::connect(ConnectOptions {
            addr: &addr,
            user: auth_user,
            credential,
            database,
            params: &params,
            timeout: self.config.connect_timeout,
            tls: &self.backend_tls,
        })
        .await
        .map_err(|e| e.to_string())?;
        let sql = self
            .pg
            .auth_query
            .replace("$1", &sluice_postgres::quote_literal(name));
        let rows = tokio::time::timeout(self.config.connect_timeout, conn.simple_query(&sql))
            .await
            .map_err(|_| {
                format!(
                    "auth_query did not answer within {:?}",
                    self.config.connect_timeout
                )
            })?
            .map_err(|e| e.to_string())?;
        Ok(rows
            .into_iter()
            .next()
            .and_then(|row| row.into_iter().nth(1).flatten()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::backend::Credential;
    use sluice_postgres::scram::ScramSecret;

    #[test]
    fn the_same_verifier_keeps_its_key() {
        let users = DynamicUsers::default();
        let secret = ScramSecret::new("pw", b"0123456789abcdef", 4096);
        let first = users.store("r", Some(&secret.verifier())).unwrap();
        let Credential::PassThrough(keys) = &first.credential else {
            panic!("pass-through")
        };
        keys.remember([7; 32]);
        let again = users.store("r", Some(&secret.verifier())).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let changed = users
            .store(
                "r",
                Some(&ScramSecret::new("new", b"0123456789abcdef", 4096).verifier()),
            )
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &changed));
        assert_eq!(users.names(), ["r"]);
        assert!(users.store("r", None).is_none());
        assert!(users.get("r").is_none(), "a role that is gone is forgotten");
        assert!(
            matches!(users.fresh("r"), Some(None)),
            "the negative answer is cached"
        );
        assert!(users.fresh("other").is_none());
    }
}
