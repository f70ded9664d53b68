//! What a new client is told at login: the server parameters the primary announced to a
//! connection opened with the same startup parameters.

use super::*;

/// ParameterStatus values a backend announced.
pub type ServerParams = Arc<Vec<(String, String)>>;

/// What a primary announced to a connection opened as (user, database) with these startup
/// parameters: what the next such client is told at login while that node is the primary.
pub(super) struct KnownParams {
    node: Arc<str>,
    startup: StartupParams,
    params: ServerParams,
}

/// Parameter sets remembered per (user, database); clients with more distinct startup
/// parameters than this still log in, with a backend connection each time.
pub(super) const KNOWN_PARAMS_PER_DATABASE: usize = 32;

impl Cluster {
    /// The ParameterStatus values to announce to a client logging in as (user, database) with
    /// these startup parameters: those of the node that serves its writes, as a direct
    /// connection to the primary would announce them. Remembered per primary; when they are not
    /// known (or `fresh`), a connection is checked out and returned with them, for the session
    /// to keep. With no primary at all, a replica's values are announced as a primary's
    /// (`in_hot_standby = off`): the listener takes writes, which wait for a primary.
    pub async fn login_params(
        &self,
        user: &str,
        database: &str,
        startup: &StartupParams,
        fresh: bool,
    ) -> Result<(ServerParams, Option<Checkout>), AttachError> {
        let multi_active = self.pg.topology == TopologyKind::MultiActive;
        let primary = {
            let snap = self.topology.load();
            snap.primary().map(|i| snap.nodes[i].address.clone())
        };
        let key = (user.to_string(), database.to_string());
        if let (Some(node), false) = (&primary, fresh) {
            let map = self.server_params.lock().expect("params lock");
            let known = map.get(&key).and_then(|v| {
                v.iter()
                    .find(|k| *k.node == **node && same_startup(&k.startup, startup))
            });
            if let Some(k) = known {
                return Ok((k.params.clone(), None));
            }
        }
        let intent = if primary.is_some() || multi_active || fresh {
            Intent::Primary
        } else {
            Intent::Replica
        };
        let mut checkout = self
            .attach(intent, user, database, startup, None, &mut None)
            .await?;
        let mut params = checkout.conn.conn().params.clone();
        if checkout.role != Role::Primary && !multi_active {
            for (k, v) in params.iter_mut() {
                if k == "in_hot_standby" || k == "default_transaction_read_only" {
                    *v = "off".to_string();
                }
            }
        }
        let params = Arc::new(params);
        if checkout.role == Role::Primary {
            let mut map = self.server_params.lock().expect("params lock");
            let known = map.entry(key).or_default();
            known.retain(|k| !same_startup(&k.startup, startup));
            if known.len() >= KNOWN_PARAMS_PER_DATABASE {
                known.remove(0);
            }
            known.push(KnownParams {
                node: Arc::from(checkout.conn.node()),
                startup: startup.clone(),
                params: params.clone(),
            });
        }
        Ok((params, Some(checkout)))
    }
}
