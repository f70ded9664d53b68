//! Users and their credentials: configured users (SCRAM secret derived once, or a stored
//! verifier or md5 hash), roles found by auth_query, and the node lookups run on.

use super::*;

/// See [`Cluster::credential`].
pub enum UserCredential<'a> {
    Configured(&'a Credential),
    Found(Option<Arc<User>>),
}

impl std::ops::Deref for UserCredential<'_> {
    type Target = Credential;
    fn deref(&self) -> &Credential {
        match self {
            UserCredential::Configured(c) => c,
            UserCredential::Found(u) => u.as_ref().map_or(&NO_CREDENTIAL, |u| &u.credential),
        }
    }
}

/// A configured user with its SCRAM secret derived once at start (or read from the stored
/// verifier it is configured with).
pub struct User {
    /// How sluice logs in to the servers as this user.
    pub credential: Credential,
    /// What clients prove with SCRAM; None for a user known by its md5 hash only, whose
    /// clients authenticate with md5.
    pub secret: Option<ScramSecret>,
}

impl User {
    /// A user known by what `pg_authid` stores: a SCRAM-SHA-256 verifier (SCRAM pass-through
    /// towards the servers) or an md5 hash (md5 both ways). None for anything else.
    pub fn from_stored(stored: &str) -> Option<User> {
        if let Some(secret) = ScramSecret::parse(stored) {
            return Some(User {
                credential: Credential::PassThrough(Arc::new(PassThrough::new(secret.server_key()))),
                secret: Some(secret),
            });
        }
        sluice_postgres::md5::is_stored_hash(stored).then(|| User {
            credential: Credential::Md5(stored.to_string()),
            secret: None,
        })
    }

    /// Whether the user was made from this stored verifier or hash.
    pub fn is_from(&self, stored: &str) -> bool {
        match (&self.credential, &self.secret) {
            (Credential::Md5(hash), _) => hash == stored,
            (Credential::PassThrough(_), Some(secret)) => secret.verifier() == stored,
            _ => false,
        }
    }
}

impl Cluster {
    /// The credential sluice logs in to servers with as `user`: a configured user's, or that
    /// of a role found by auth_query (its current verifier and key).
    pub fn credential(&self, user: &str) -> UserCredential<'_> {
        match self.users.get(user) {
            Some(u) => UserCredential::Configured(&u.credential),
            None => UserCredential::Found(self.dynamic.get(user)),
        }
    }

    /// The node sluice's own lookups go to (function catalog, auth_query): the primary, else
    /// any healthy node.
    pub fn lookup_node(&self) -> Option<String> {
        let snap = self.topology.load();
        let node = snap
            .primary()
            .or_else(|| snap.nodes.iter().position(|n| n.health.up))?;
        Some(snap.nodes[node].address.to_string())
    }
}

/// A random nonce of printable characters for SCRAM.
pub fn random_nonce() -> String {
    let mut rng = rand::rng();
    (0..24)
        .map(|_| rng.sample(rand::distr::Alphanumeric) as char)
        .collect()
}
