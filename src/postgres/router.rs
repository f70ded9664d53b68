//! The router: pure functions from (statement class, hint, session, configuration) to an
//! [`Intent`], and from (intent, policy, topology) to a node. Every routing rule is here.
//!
//! No I/O and no clocks, so every rule is a unit test. Load (queries in flight per node) and a
//! tie-breaking counter are passed in by the caller.

use sluice_postgres::{Class, Classification, Hint};

use crate::common::topology::{Role, Snapshot};
use crate::config::{ClusterConfig, Consistency, PoolMode, PostgresConfig, TopologyKind};

/// Where a request must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Only the primary will do.
    Primary,
    /// A healthy replica, else the primary.
    Replica,
}

impl Intent {
    /// The intent for a classified statement under a consistency policy. Hints win over the
    /// class; `consistency = "primary"` wins over everything. A statement that pins the client
    /// to its connection (`SELECT set_config($1, ...)`, whose setting sluice cannot carry over,
    /// LISTEN, a temporary table, ...) runs on the primary whatever its class or hint: the
    /// pinned connection serves every later request of the client, writes included.
    pub fn of(c: Classification, consistency: Consistency) -> Intent {
        if consistency == Consistency::Primary || c.effects.pin.is_some() {
            return Intent::Primary;
        }
        match (c.hint, c.class) {
            (Some(Hint::Primary), _) => Intent::Primary,
            (Some(Hint::Replica), _) => Intent::Replica,
            (None, Class::Write) => Intent::Primary,
            (None, Class::Read) => Intent::Replica,
        }
    }

    /// The intent for a client's next request: in session pooling the whole session runs on
    /// the primary; a hot standby refuses serializable transactions, so a client whose
    /// transactions are serializable stays on the primary; otherwise [`Intent::of`].
    pub fn for_request(c: Classification, pg: &PostgresConfig, serializable: bool) -> Intent {
        if Intent::depends_on_class(pg, serializable) {
            Intent::of(c, pg.consistency)
        } else {
            Intent::Primary
        }
    }

    /// Whether [`Intent::for_request`] can give different intents for different statement
    /// classes: only in transaction pooling, for a client whose transactions are not
    /// serializable, under a consistency that lets reads go to replicas. Otherwise every request
    /// goes to the primary, and a caller need not classify a request (or scan the rest of its
    /// batch) to route it.
    ///
    /// A function of the configuration and the session rather than of an `Intent`: both
    /// intents also come out of class-dependent rules, so an intent alone cannot tell.
    pub fn depends_on_class(pg: &PostgresConfig, serializable: bool) -> bool {
        pg.pool_mode == PoolMode::Transaction && !serializable && pg.consistency != Consistency::Primary
    }

    /// The label used in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Intent::Primary => "primary",
            Intent::Replica => "replica",
        }
    }
}

/// The rules a choice follows beyond the intent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy<'a> {
    /// Every healthy node takes reads and writes (CockroachDB, YugabyteDB YSQL).
    pub multi_active: bool,
    /// Reads only from replicas that have replayed at least this WAL position
    /// (read-your-writes: the client's last commit).
    pub min_lsn: Option<u64>,
    /// Reads only from replicas at most this many WAL bytes behind the primary.
    pub max_lag: Option<u64>,
    /// Prefer nodes in this zone.
    pub zone: Option<&'a str>,
    /// Writes only to a primary confirmed writable (`write_hold`: see
    /// `Snapshot::writable_primary`); reads may still fall back to any primary.
    pub writable_only: bool,
}

impl<'a> Policy<'a> {
    /// The cluster's policy; `min_lsn` (the client's last commit) applies under
    /// `consistency = "read-your-writes"` only.
    pub fn of(config: &'a ClusterConfig, pg: &PostgresConfig, min_lsn: Option<u64>) -> Policy<'a> {
        Policy {
            multi_active: pg.topology == TopologyKind::MultiActive,
            min_lsn: min_lsn.filter(|_| pg.consistency == Consistency::ReadYourWrites),
            max_lag: pg.max_replica_lag,
            zone: config.zone.as_deref(),
            writable_only: false,
        }
    }
}

/// Why no node could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute {
    /// No healthy node reports itself as primary.
    NoPrimary,
    /// No healthy node at all.
    NoNode,
}

/// Chooses a node index in `snap` for `intent`.
///
/// Reads go to the eligible replica with the fewest queries in flight (`load[i]`), same-zone
/// replicas first, ties broken by rotating from `tiebreak`; with no eligible replica they fall
/// back to the primary. In a multi-active cluster every healthy node is eligible for anything.
pub fn choose(
    intent: Intent,
    snap: &Snapshot,
    load: &[u32],
    tiebreak: usize,
    policy: &Policy<'_>,
) -> Result<usize, NoRoute> {
    if policy.multi_active {
        return least_loaded(snap, load, tiebreak, policy, |n| {
            n.health.up && n.role != Role::Unknown
        })
        .ok_or(NoRoute::NoNode);
    }
    let primary = snap.primary();
    match intent {
        Intent::Primary if policy.writable_only => snap.writable_primary().ok_or(NoRoute::NoPrimary),
        Intent::Primary => primary.ok_or(NoRoute::NoPrimary),
        Intent::Replica => {
            let primary_lsn = primary.and_then(|p| snap.nodes[p].lsn);
            let caught_up = |lsn: Option<u64>| {
                let floor = policy.min_lsn.is_none_or(|min| lsn.is_some_and(|l| l >= min));
                let lag = match (policy.max_lag, primary_lsn) {
                    (Some(max), Some(p)) => lsn.is_some_and(|l| p.saturating_sub(l) <= max),
                    _ => true,
                };
                floor && lag
            };
            least_loaded(snap, load, tiebreak, policy, |n| {
                n.health.up && n.role == Role::Replica && caught_up(n.lsn)
            })
            .or(primary)
            .ok_or(NoRoute::NoNode)
        }
    }
}

/// The eligible node with the lowest (other zone, load), scanning from `tiebreak`.
fn least_loaded(
    snap: &Snapshot,
    load: &[u32],
    tiebreak: usize,
    policy: &Policy<'_>,
    eligible: impl Fn(&crate::common::topology::Node) -> bool,
) -> Option<usize> {
    let n = snap.nodes.len();
    let mut best: Option<((bool, u32), usize)> = None;
    for k in 0..n {
        let i = (tiebreak + k) % n;
        let node = &snap.nodes[i];
        if !eligible(node) {
            continue;
        }
        let other_zone = policy.zone.is_some_and(|z| node.zone.as_deref() != Some(z));
        let key = (other_zone, load.get(i).copied().unwrap_or(0));
        if best.is_none_or(|(b, _)| key < b) {
            best = Some((key, i));
        }
    }
    best.map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::topology::{Member, Node};
    use sluice_postgres::Effects;

    fn node(role: Role, healthy: bool) -> Node {
        Node {
            role,
            health: crate::common::health::Health::assumed(healthy),
            primary_epoch: u64::from(role == Role::Primary),
            ..Node::new(Member::at("x:1"))
        }
    }

    fn at(mut n: Node, lsn: u64, zone: Option<&str>) -> Node {
        n.lsn = Some(lsn);
        n.zone = zone.map(str::to_string);
        n
    }

    fn snap(nodes: Vec<Node>) -> Snapshot {
        Snapshot { generation: 1, nodes }
    }

    fn cls(class: Class, hint: Option<Hint>) -> Classification {
        Classification {
            class,
            hint,
            effects: Effects::default(),
        }
    }

    const ANY: Policy<'static> = Policy {
        multi_active: false,
        min_lsn: None,
        max_lag: None,
        zone: None,
        writable_only: false,
    };

    #[test]
    fn intent_rules() {
        use Consistency::*;
        assert_eq!(Intent::of(cls(Class::Read, None), Eventual), Intent::Replica);
        assert_eq!(Intent::of(cls(Class::Write, None), Eventual), Intent::Primary);
        assert_eq!(
            Intent::of(cls(Class::Read, Some(Hint::Primary)), Eventual),
            Intent::Primary
        );
        assert_eq!(
            Intent::of(cls(Class::Write, Some(Hint::Replica)), Eventual),
            Intent::Replica
        );
        assert_eq!(
            Intent::of(cls(Class::Read, Some(Hint::Replica)), Primary),
            Intent::Primary
        );
        assert_eq!(
            Intent::of(cls(Class::Read, None), ReadYourWrites),
            Intent::Replica
        );
        // A read that pins the client to its connection: on a replica, the pinned client's
        // writes would fail there.
        let pinning = |hint| Classification {
            effects: Effects {
                pin: Some(sluice_postgres::PinReason::UntrackedSetting),
                ..Effects::default()
            },
            ..cls(Class::Read, hint)
        };
        assert_eq!(Intent::of(pinning(None), Eventual), Intent::Primary);
        assert_eq!(
            Intent::of(pinning(Some(Hint::Replica)), ReadYourWrites),
            Intent::Primary
        );
    }

    #[test]
    fn reads_pick_least_loaded_healthy_replica() {
        let s = snap(vec![
            node(Role::Primary, true),
            node(Role::Replica, true),
            node(Role::Replica, true),
            node(Role::Replica, false),
        ]);
        assert_eq!(choose(Intent::Replica, &s, &[0, 5, 2, 0], 0, &ANY), Ok(2));
        assert_eq!(choose(Intent::Replica, &s, &[0, 1, 2, 0], 0, &ANY), Ok(1));
        // Ties rotate with the tie-breaker.
        assert_eq!(choose(Intent::Replica, &s, &[0, 0, 0, 0], 0, &ANY), Ok(1));
        assert_eq!(choose(Intent::Replica, &s, &[0, 0, 0, 0], 2, &ANY), Ok(2));
        assert_eq!(choose(Intent::Primary, &s, &[9, 0, 0, 0], 0, &ANY), Ok(0));
    }

    #[test]
    fn reads_fall_back_to_primary_and_writes_need_one() {
        let s = snap(vec![node(Role::Primary, true), node(Role::Replica, false)]);
        assert_eq!(choose(Intent::Replica, &s, &[], 0, &ANY), Ok(0));
        let s = snap(vec![node(Role::Primary, false), node(Role::Replica, true)]);
        assert_eq!(choose(Intent::Primary, &s, &[], 0, &ANY), Err(NoRoute::NoPrimary));
        assert_eq!(choose(Intent::Replica, &s, &[], 0, &ANY), Ok(1));
        let s = snap(vec![node(Role::Unknown, true), node(Role::Replica, false)]);
        assert_eq!(choose(Intent::Replica, &s, &[], 0, &ANY), Err(NoRoute::NoNode));
    }

    #[test]
    fn read_your_writes_and_lag_limits() {
        let s = snap(vec![
            at(node(Role::Primary, true), 1000, None),
            at(node(Role::Replica, true), 400, None),
            at(node(Role::Replica, true), 900, None),
        ]);
        let ryw = |min| Policy {
            min_lsn: Some(min),
            ..ANY
        };
        // Only the replica that replayed the client's commit qualifies, even if busier.
        assert_eq!(choose(Intent::Replica, &s, &[0, 0, 7], 0, &ryw(800)), Ok(2));
        // None has: the primary.
        assert_eq!(choose(Intent::Replica, &s, &[0, 0, 0], 0, &ryw(950)), Ok(0));
        // max_replica_lag excludes the replica 600 bytes behind.
        let lag = Policy {
            max_lag: Some(500),
            ..ANY
        };
        assert_eq!(choose(Intent::Replica, &s, &[0, 0, 9], 0, &lag), Ok(2));
        let tight = Policy {
            max_lag: Some(10),
            ..ANY
        };
        assert_eq!(choose(Intent::Replica, &s, &[0, 0, 0], 0, &tight), Ok(0));
    }

    #[test]
    fn zones_and_multi_active() {
        let s = snap(vec![
            at(node(Role::Primary, true), 1, Some("a")),
            at(node(Role::Replica, true), 1, Some("a")),
            at(node(Role::Replica, true), 1, Some("b")),
        ]);
        let zone_b = Policy {
            zone: Some("b"),
            ..ANY
        };
        assert_eq!(
            choose(Intent::Replica, &s, &[0, 0, 5], 0, &zone_b),
            Ok(2),
            "same zone first"
        );
        let multi = Policy {
            multi_active: true,
            zone: Some("a"),
            ..ANY
        };
        // Writes too go anywhere healthy; the local zone first, then the least loaded.
        assert_eq!(choose(Intent::Primary, &s, &[3, 1, 0], 0, &multi), Ok(1));
        let down = snap(vec![node(Role::Primary, false)]);
        assert_eq!(
            choose(
                Intent::Primary,
                &down,
                &[],
                0,
                &Policy {
                    multi_active: true,
                    ..ANY
                }
            ),
            Err(NoRoute::NoNode)
        );
    }

    fn cluster(keys: &str) -> ClusterConfig {
        let text = format!(
            "[[clusters]]\nname = \"pg\"\nprotocol = \"postgres\"\nlisten = \"127.0.0.1:6432\"\n{keys}\n\
             [clusters.discovery]\nstatic = [\"127.0.0.1:5432\"]\n\
             [[clusters.users]]\nname = \"app\"\npassword = \"pw\"\n"
        );
        let mut c = crate::config::Config::parse(&text).expect("valid config");
        c.clusters.remove(0)
    }

    fn pg(c: &ClusterConfig) -> &PostgresConfig {
        c.postgres().expect("a postgres cluster")
    }

    #[test]
    fn the_request_intent_follows_pool_mode_isolation_and_consistency() {
        let read = cls(Class::Read, None);
        let write = cls(Class::Write, None);
        let tx = cluster("");
        assert_eq!(Intent::for_request(read, pg(&tx), false), Intent::Replica);
        assert_eq!(Intent::for_request(write, pg(&tx), false), Intent::Primary);
        // A hot standby refuses serializable transactions.
        assert_eq!(Intent::for_request(read, pg(&tx), true), Intent::Primary);
        let session = cluster("pool_mode = \"session\"");
        assert_eq!(Intent::for_request(read, pg(&session), false), Intent::Primary);
        let primary = cluster("consistency = \"primary\"");
        assert_eq!(
            Intent::for_request(cls(Class::Read, Some(Hint::Replica)), pg(&primary), false),
            Intent::Primary
        );
    }

    #[test]
    fn the_class_matters_only_where_the_intent_can_change_with_it() {
        let every_class = [
            cls(Class::Read, None),
            cls(Class::Write, None),
            cls(Class::Read, Some(Hint::Primary)),
            cls(Class::Write, Some(Hint::Replica)),
        ];
        for keys in [
            "",
            "consistency = \"primary\"",
            "consistency = \"read-your-writes\"",
            "pool_mode = \"session\"",
            "pool_mode = \"session\"\nconsistency = \"eventual\"",
        ] {
            let c = cluster(keys);
            for serializable in [false, true] {
                let intents: Vec<Intent> = every_class
                    .iter()
                    .map(|&class| Intent::for_request(class, pg(&c), serializable))
                    .collect();
                let varies = intents.iter().any(|&i| i != intents[0]);
                assert_eq!(
                    Intent::depends_on_class(pg(&c), serializable),
                    varies,
                    "{keys:?}, serializable = {serializable}"
                );
                if !varies {
                    assert_eq!(intents[0], Intent::Primary, "{keys:?}");
                }
            }
        }
    }

    #[test]
    fn the_policy_takes_the_clients_lsn_only_under_read_your_writes() {
        assert_eq!(Policy::of(&cluster(""), pg(&cluster("")), Some(7)).min_lsn, None);
        let ryw = cluster("consistency = \"read-your-writes\"\nzone = \"a\"\nmax_replica_lag = 100");
        let p = Policy::of(&ryw, pg(&ryw), Some(7));
        assert_eq!(
            (p.min_lsn, p.max_lag, p.zone, p.multi_active),
            (Some(7), Some(100), Some("a"), false)
        );
        let multi = cluster("topology = \"multi-active\"");
        assert!(Policy::of(&multi, pg(&multi), None).multi_active);
    }

    #[test]
    fn with_write_hold_writes_need_a_writable_primary_and_reads_do_not() {
        let mut primary = at(node(Role::Primary, true), 1, None);
        primary.read_only = true;
        let s = snap(vec![primary, at(node(Role::Replica, true), 1, None)]);
        let hold = Policy {
            writable_only: true,
            ..ANY
        };
        assert_eq!(
            choose(Intent::Primary, &s, &[0, 0], 0, &hold),
            Err(NoRoute::NoPrimary)
        );
        assert_eq!(
            choose(Intent::Primary, &s, &[0, 0], 0, &ANY),
            Ok(0),
            "off: as before"
        );
        assert_eq!(choose(Intent::Replica, &s, &[0, 0], 0, &hold), Ok(1));
        let alone = snap(vec![s.nodes[0].clone()]);
        assert_eq!(
            choose(Intent::Replica, &alone, &[0], 0, &hold),
            Ok(0),
            "reads are not held"
        );
    }
}
