//! Node probes: one task per node asks for its role, WAL position and writability every
//! `probe_interval`; what they observe (and what failed connections observe) is applied to the
//! topology here.

use super::*;

impl Cluster {
    /// Keeps exactly one probe task per member node.
    pub(super) async fn supervise_probes(self: Arc<Self>) {
        let mut probes = ProbeTasks::default();
        let probes = &mut probes.0;
        let mut changes = self.topology.subscribe();
        loop {
            let snap = self.topology.load();
            probes.retain(|id, task| {
                let keep = snap.index_of(id).is_some();
                if !keep {
                    task.abort();
                }
                keep
            });
            for n in &snap.nodes {
                if !probes.contains_key(&n.id) {
                    let c = self.clone();
                    let id = n.id.clone();
                    probes.insert(n.id.clone(), tokio::spawn(async move { c.probe_loop(id).await }));
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Applies an observation to the topology and reacts to what changed.
    pub fn observe(&self, id: &str, obs: &Observation) {
        let change = self.topology.observe(id, obs);
        let snap = self.topology.load();
        let Some(node) = snap.index_of(id).map(|i| &snap.nodes[i]) else {
            return;
        };
        let labels = NodeLabels {
            cluster: self.config.name.clone(),
            node: node.address.clone(),
        };
        self.metrics
            .node_primary
            .get_or_create(&labels)
            .set(i64::from(node.health.up && node.role == Role::Primary));
        // `sluice_node_healthy` moves with the health report: every change, the first
        // observation of a node included, goes through `announce`.
        if change.health_changed {
            if let Some(verdict) = obs.verdict() {
                health::announce(
                    &self.metrics,
                    "PostgreSQL",
                    &self.config.name,
                    &node.address,
                    &verdict,
                );
            }
        }
        if change.role_changed {
            info!(node = %node.address, role = ?node.role, healthy = node.health.up, generation = snap.generation, "node role changed");
        }
        if change.role_changed || change.health_changed || change.writable_changed {
            self.track_hold();
        }
        // The node has the last word on its role; a label that says otherwise is counted
        // (once per disagreement) and logged, never followed.
        let disagrees =
            node.health.up && node.role != Role::Unknown && node.labeled_role.is_some_and(|l| l != node.role);
        let was = self
            .metrics
            .role_disagreement
            .get_or_create(&labels)
            .set(i64::from(disagrees));
        // Created at 0 with the node, so that the series exists before the first disagreement.
        let started = self.metrics.role_disagreements.get_or_create_owned(&labels);
        if disagrees && was == 0 {
            started.inc();
            warn!(node = %node.address, id = %node.id, labeled = ?node.labeled_role, probed = ?node.role, "the node's role label disagrees with the node; following the node");
        }
        if change.lost_primary
            || (change.health_changed && !node.health.up)
            || (change.role_changed && node.role != Role::Primary)
        {
            // Idle connections to a demoted or dead node must not serve anyone again.
            self.pools.drain(&node.address);
        }
    }

    pub(super) async fn probe_loop(self: Arc<Self>, id: String) {
        let probe_user = self
            .pg
            .probe_user
            .clone()
            .or_else(|| self.config.users.first().map(|u| u.name.clone()))
            .unwrap_or_default();
        let credential = self
            .users
            .get(&probe_user)
            .map_or(&NO_CREDENTIAL, |u| &u.credential);
        let mut conn: Option<Backend> = None;
        let startup = own_startup_params();
        let mut ticker = tokio::time::interval(self.config.probe_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut again = false;
        // Whether this node's probes are late now (logged when that starts and ends).
        let mut slow = false;
        let mut last_refusals = self.refusals.load(Ordering::SeqCst);
        loop {
            if !std::mem::take(&mut again) {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = self.probe_now.notified() => {}
                }
            }
            let refusals = self.refusals.load(Ordering::SeqCst);
            if refusals != last_refusals {
                // A refused write: ask on a new connection. A server process forked after the
                // refusal has the configuration the refusing one had (the postmaster reloads
                // before it signals its children), while this probe's own process may not have
                // been signalled yet.
                last_refusals = refusals;
                conn = None;
            }
            let snap = self.topology.load();
            let Some(index) = snap.index_of(&id) else { return };
            let address = snap.nodes[index].address.clone();
            if conn.as_ref().is_some_and(|c| c.addr != address) {
                conn = None;
            }
            let opts = ConnectOptions {
                addr: &address,
                user: &probe_user,
                credential,
                database: &self.pg.probe_database,
                params: &startup,
                timeout: self.config.connect_timeout,
                tls: &self.backend_tls,
            };
            let obs = match self.probe_patiently(&mut conn, opts, &mut slow).await {
                Ok(p) => Observation::Up {
                    role: p.role,
                    lsn: p.lsn,
                    timeline: p.timeline,
                    replay_lag_ms: p.replay_lag_ms,
                    read_only: p.read_only,
                },
                Err(error) => {
                    conn = None;
                    Observation::Down {
                        source: Source::Probe,
                        error,
                    }
                }
            };
            if matches!(obs, Observation::Up { .. }) && self.refusals.load(Ordering::SeqCst) != refusals {
                // A write was refused while this probe ran: its answer may predate the cause.
                again = true;
                continue;
            }
            self.count_probe(
                &address,
                if matches!(obs, Observation::Up { .. }) {
                    "ok"
                } else {
                    "error"
                },
            );
            self.observe(&id, &obs);
        }
    }

    /// Runs one probe; `Err` says why the node is down. The answer is due within
    /// `probe_timeout`, but a late answer alone does not make a node down: while the node's
    /// pooled connections keep reading bytes from it, it is answering its clients, and the
    /// probe waits on (a saturated machine keeps a probe's query waiting for seconds: up to
    /// 2 s measured here under `pgbench -c 16`, directly against PostgreSQL as well as through
    /// sluice). The node is down once the probe has waited `probe_timeout` and nothing came
    /// from the node in the last half of it: a node that freezes is marked down within
    /// `probe_timeout` of its last answer to anyone. `slow` is whether this node's probes are
    /// late now: late probes are logged when that starts and when it ends, not per probe.
    async fn probe_patiently(
        &self,
        conn: &mut Option<Backend>,
        opts: ConnectOptions<'_>,
        slow: &mut bool,
    ) -> Result<Probed, String> {
        let timeout = self.pg.probe_timeout;
        let step = timeout / 2;
        let mut probe = std::pin::pin!(probe_once(conn, opts));
        let mut seen = self.pools.progress(opts.addr);
        let mut waited = Duration::ZERO;
        let result = loop {
            match tokio::time::timeout(step, probe.as_mut()).await {
                Ok(r) => break r.map_err(|e| e.to_string()),
                Err(_) => {
                    waited += step;
                    let now = self.pools.progress(opts.addr);
                    let answering = now != seen;
                    seen = now;
                    if waited < timeout {
                        continue;
                    }
                    if !answering {
                        break Err(format!("probe timed out after {waited:?}"));
                    }
                    if !std::mem::replace(slow, true) {
                        warn!(node = %opts.addr, probe_timeout = ?timeout, "the node has not answered its probe within probe_timeout but is answering its clients; not marking it down");
                    }
                    self.count_probe(opts.addr, "slow");
                }
            }
        };
        match &result {
            Ok(_) if waited < timeout && std::mem::take(slow) => {
                info!(node = %opts.addr, "the node answers its probe within probe_timeout again");
            }
            // Marked down: the health report says so.
            Err(_) => *slow = false,
            Ok(_) => {}
        }
        result
    }

    fn count_probe(&self, node: &str, result: &'static str) {
        self.metrics
            .probes
            .get_or_create(&ResultLabels {
                cluster: self.config.name.clone(),
                node: node.to_string(),
                result,
            })
            .inc();
    }
}

/// The probe tasks of a cluster, aborted when the supervisor that owns them stops.
#[derive(Default)]
pub(super) struct ProbeTasks(HashMap<String, tokio::task::JoinHandle<()>>);

impl Drop for ProbeTasks {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

/// What one probe found.
pub(super) struct Probed {
    role: Role,
    lsn: Option<u64>,
    timeline: Option<u32>,
    replay_lag_ms: Option<u64>,
    /// `transaction_read_only` of the probe's own transaction: on for a replica, and on a
    /// primary while `default_transaction_read_only` is (a planned switchover).
    read_only: bool,
}

/// One probe: (re)connect if needed, then ask the node what it is.
pub(super) async fn probe_once(
    conn: &mut Option<Backend>,
    opts: ConnectOptions<'_>,
) -> Result<Probed, BackendError> {
    if conn.is_none() {
        *conn = Some(Backend::connect(opts).await?);
    }
    let c = conn.as_mut().expect("just connected");
    let rows = c
        .simple_query(
            "SELECT pg_is_in_recovery(), \
             CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
             CASE WHEN pg_is_in_recovery() THEN NULL ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END, \
             CASE WHEN NOT pg_is_in_recovery() THEN NULL \
                  WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
                  ELSE (1000 * extract(epoch FROM now() - pg_last_xact_replay_timestamp()))::int8 END, \
             current_setting('transaction_read_only')",
        )
        .await?;
    let row = rows.first().ok_or_else(|| BackendError::Protocol {
        addr: opts.addr.to_string(),
        reason: "probe returned no row".into(),
    })?;
    let role = match row.first().and_then(|v| v.as_deref()) {
        Some("f") => Role::Primary,
        Some("t") => Role::Replica,
        _ => Role::Unknown,
    };
    let lsn = row.get(1).and_then(|v| v.as_deref()).and_then(parse_lsn);
    // The first 8 hex digits of a WAL file name are its timeline.
    let timeline = row
        .get(2)
        .and_then(|v| v.as_deref())
        .and_then(|t| u32::from_str_radix(t, 16).ok());
    // 0 when the replica has replayed everything it received (an idle primary writes
    // nothing, and the age of the last replayed transaction would grow for no reason).
    let replay_lag_ms = row
        .get(3)
        .and_then(|v| v.as_deref())
        .and_then(|ms| ms.parse::<i64>().ok())
        .map(|ms| ms.max(0) as u64);
    let read_only = row.get(4).and_then(|v| v.as_deref()) == Some("on");
    Ok(Probed {
        role,
        lsn,
        timeline,
        replay_lag_ms,
        read_only,
    })
}

/// Parses PostgreSQL's `XXXXXXXX/YYYYYYYY` LSN text.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_parses() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x3000060));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("nope"), None);
    }
}
