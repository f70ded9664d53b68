//! The topology of one cluster: an immutable snapshot of its nodes, swapped atomically.
//!
//! Probes (and later discovery) build a new snapshot from the current one and store it with
//! `ArcSwap::rcu`; sessions load the current snapshot per request and never lock. A `watch`
//! channel carries the generation number so that requests waiting for a primary wake up.

use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use super::health::{Health, Source, Verdict};

/// What a node is, according to the node itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
    Unknown,
}

/// A node as discovery describes it: where it is and what it is supposed to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Stable identity: the pod name under Kubernetes, else the address. A pod that comes back
    /// with a new IP keeps its id (and its place).
    pub id: String,
    /// `host:port` to connect to.
    pub address: String,
    /// Zone (topology.kubernetes.io/zone, from the EndpointSlice) when known.
    pub zone: Option<String>,
    /// The Kubernetes node the pod runs on, when known.
    pub node: Option<String>,
    /// The role a label claims. Only the probe decides routing; disagreements are counted.
    pub labeled_role: Option<Role>,
}

impl Member {
    /// A member known only by its address (static configuration, DNS).
    pub fn at(address: &str) -> Member {
        Member {
            id: address.to_string(),
            address: address.to_string(),
            zone: None,
            node: None,
            labeled_role: None,
        }
    }
}

/// One node as last seen.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    /// `host:port`.
    pub address: String,
    pub zone: Option<String>,
    /// The Kubernetes node the pod runs on, when known.
    pub node: Option<String>,
    pub labeled_role: Option<Role>,
    pub role: Role,
    /// Up when the last probe succeeded; down (with the reason, for /topology) after a failed
    /// probe or connection attempt.
    pub health: Health,
    /// WAL position: the current LSN on a primary, the replayed LSN on a replica.
    pub lsn: Option<u64>,
    /// On a replica, how far its replay is behind in time, in milliseconds: 0 when it has
    /// replayed all it received, else the age of the last transaction it replayed.
    pub replay_lag_ms: Option<u64>,
    /// The primary's WAL timeline: every promotion starts a new, higher one, so of two nodes
    /// that both say they are primary, the one on the higher timeline is the real one (an old
    /// primary restarted after a failover is still on the old timeline).
    pub timeline: Option<u32>,
    /// Increases each time any node becomes primary; breaks ties between equal timelines.
    pub primary_epoch: u64,
    /// A primary whose probe found `transaction_read_only` on (`default_transaction_read_only`
    /// set for a planned switchover): it is still the primary, but takes no writes.
    pub read_only: bool,
    /// Something suggested the node stopped taking writes (a 25006 from it): unconfirmed until
    /// its next probe answers.
    pub unconfirmed: bool,
    /// Requests in flight on this node, shared by every snapshot that has the node.
    pub load: Arc<AtomicU32>,
}

impl Node {
    /// A node that has not been probed yet.
    pub fn new(member: Member) -> Self {
        Node {
            id: member.id,
            address: member.address,
            zone: member.zone,
            node: member.node,
            labeled_role: member.labeled_role,
            role: Role::Unknown,
            health: Health::assumed(false),
            lsn: None,
            replay_lag_ms: None,
            timeline: None,
            primary_epoch: 0,
            read_only: false,
            unconfirmed: false,
            load: Arc::default(),
        }
    }
}

/// An immutable view of a cluster's nodes.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub nodes: Vec<Node>,
}

impl Snapshot {
    /// The healthy primary; with more than one (during a promotion, or an old primary
    /// restarted after a failover), the one on the highest timeline, then the most recent.
    pub fn primary(&self) -> Option<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.health.up && n.role == Role::Primary)
            .max_by_key(|(_, n)| (n.timeline, n.primary_epoch))
            .map(|(i, _)| i)
    }

    /// The primary, if it is confirmed to take writes: its probe found it writable (not
    /// read-only, nothing since suggesting otherwise), and no role label names another node as
    /// the primary or this one as a replica. None during a planned role change, which
    /// `write_hold` waits out.
    pub fn writable_primary(&self) -> Option<usize> {
        let i = self.primary()?;
        let p = &self.nodes[i];
        let labels_agree = p.labeled_role != Some(Role::Replica)
            && !self
                .nodes
                .iter()
                .enumerate()
                .any(|(j, n)| j != i && n.labeled_role == Some(Role::Primary));
        (!p.read_only && !p.unconfirmed && labels_agree).then_some(i)
    }

    /// Why there is no confirmed writable primary (for the log), or None if there is one.
    pub fn hold_reason(&self) -> Option<&'static str> {
        if self.writable_primary().is_some() {
            return None;
        }
        Some(match self.primary().map(|i| &self.nodes[i]) {
            None => "no primary answers",
            Some(p) if p.read_only => "the primary is read-only",
            Some(p) if p.unconfirmed => "the primary refused a write; probing it",
            Some(_) => "a role label names a primary the probes have not confirmed",
        })
    }

    /// The index of the node with this id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// Whether any node can serve anything.
    pub fn any_healthy(&self) -> bool {
        self.nodes.iter().any(|n| n.health.up && n.role != Role::Unknown)
    }
}

/// What a probe or a connection attempt learned about one PostgreSQL node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// The probe's answer (the node is up, and this is what it said).
    Up {
        role: Role,
        lsn: Option<u64>,
        /// A primary's WAL timeline.
        timeline: Option<u32>,
        /// A replica's replay delay in milliseconds.
        replay_lag_ms: Option<u64>,
        /// `transaction_read_only` (always on for a replica).
        read_only: bool,
    },
    /// The node answered a write with 25006 (read-only transaction): its writability is
    /// unconfirmed until the next probe.
    Suspect,
    /// The probe failed, or opening a connection to the node did.
    Down { source: Source, error: String },
}

impl Observation {
    /// What the observation says about the node's health, if anything.
    pub fn verdict(&self) -> Option<Verdict> {
        match self {
            Observation::Up { .. } => Some(Verdict::up(Source::Probe)),
            Observation::Down { source, error } => Some(Verdict::down(*source, error.clone())),
            Observation::Suspect => None,
        }
    }
}

/// What changed for a node when an observation was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Change {
    pub role_changed: bool,
    pub health_changed: bool,
    pub became_primary: bool,
    pub lost_primary: bool,
    /// Whether the node takes writes changed (read-only or unconfirmed).
    pub writable_changed: bool,
}

/// The shared, atomically swapped topology of one cluster.
pub struct Topology {
    current: ArcSwap<Snapshot>,
    generation: watch::Sender<u64>,
}

impl Topology {
    /// A topology of unprobed nodes.
    pub fn new(members: Vec<Member>) -> Self {
        let snap = Snapshot {
            generation: 0,
            nodes: members.into_iter().map(Node::new).collect(),
        };
        Topology {
            current: ArcSwap::from_pointee(snap),
            generation: watch::channel(0).0,
        }
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Applies one observation of node `id` and publishes a new snapshot if anything changed.
    pub fn observe(&self, id: &str, obs: &Observation) -> Change {
        let mut change = Change::default();
        self.current.rcu(|cur| {
            let (next, c) = apply(cur, id, obs);
            change = c;
            next
        });
        if change != Change::default() {
            self.generation.send_replace(self.current.load().generation);
        }
        change
    }

    /// Replaces the member list (from discovery). Nodes that stay keep their state; a node
    /// whose address changed is probed afresh. Returns the addresses that are no longer used.
    pub fn set_members(&self, members: &[Member]) -> Vec<String> {
        let mut gone = Vec::new();
        let mut changed = false;
        self.current.rcu(|cur| {
            let (next, g, c) = merge_members(cur, members);
            gone = g;
            changed = c;
            next
        });
        if changed {
            self.generation.send_replace(self.current.load().generation);
        }
        gone
    }

    /// A receiver that sees every generation change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Waits until `ready` holds for the current snapshot, or `timeout` passes.
    pub async fn wait_for<F>(&self, timeout: Duration, ready: F) -> Option<Arc<Snapshot>>
    where
        F: Fn(&Snapshot) -> bool,
    {
        let mut rx = self.generation.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let snap = self.load();
            if ready(&snap) {
                return Some(snap);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    let snap = self.load();
                    return ready(&snap).then_some(snap);
                }
            }
        }
    }
}

/// The pure core of `observe`: the next snapshot and what changed.
fn apply(cur: &Snapshot, id: &str, obs: &Observation) -> (Arc<Snapshot>, Change) {
    let mut next = cur.clone();
    let Some(index) = cur.index_of(id) else {
        return (Arc::new(next), Change::default());
    };
    let node = &mut next.nodes[index];
    let before = node.clone();
    match obs {
        Observation::Up {
            role,
            lsn,
            timeline,
            replay_lag_ms,
            read_only,
        } => {
            node.role = *role;
            node.read_only = *read_only && *role == Role::Primary;
            node.unconfirmed = false;
            node.lsn = *lsn;
            node.replay_lag_ms = *replay_lag_ms;
            node.timeline = *timeline;
        }
        Observation::Down { .. } => {}
        Observation::Suspect => node.unconfirmed = true,
    }
    let health_changed = obs.verdict().is_some_and(|v| node.health.apply(&v));
    let was_primary = before.health.up && before.role == Role::Primary;
    let is_primary = node.health.up && node.role == Role::Primary;
    let change = Change {
        role_changed: before.role != node.role,
        health_changed,
        became_primary: is_primary && !was_primary,
        lost_primary: was_primary && !is_primary,
        writable_changed: (before.read_only, before.unconfirmed) != (node.read_only, node.unconfirmed),
    };
    if change.became_primary {
        let epoch = cur.nodes.iter().map(|n| n.primary_epoch).max().unwrap_or(0) + 1;
        next.nodes[index].primary_epoch = epoch;
    }
    // LSN updates alone do not bump the generation: they arrive every probe interval.
    if change != Change::default() {
        next.generation = cur.generation + 1;
    }
    (Arc::new(next), change)
}

/// The pure core of `set_members`: (next snapshot, addresses no longer used, changed).
fn merge_members(cur: &Snapshot, members: &[Member]) -> (Arc<Snapshot>, Vec<String>, bool) {
    let mut nodes = Vec::with_capacity(members.len());
    let mut gone = Vec::new();
    for m in members {
        match cur.nodes.iter().find(|n| n.id == m.id) {
            Some(old) if old.address == m.address => {
                let mut n = old.clone();
                n.zone = m.zone.clone();
                n.node = m.node.clone();
                n.labeled_role = m.labeled_role;
                nodes.push(n);
            }
            Some(old) => {
                // Same pod, new IP: keep the load counter, forget what the old address said.
                gone.push(old.address.clone());
                let mut n = Node::new(m.clone());
                n.load = old.load.clone();
                nodes.push(n);
            }
            None => nodes.push(Node::new(m.clone())),
        }
    }
    for old in &cur.nodes {
        if !members.iter().any(|m| m.id == old.id) {
            gone.push(old.address.clone());
        }
    }
    let same = nodes.len() == cur.nodes.len()
        && nodes.iter().zip(&cur.nodes).all(|(a, b)| {
            a.id == b.id
                && a.address == b.address
                && a.zone == b.zone
                && a.node == b.node
                && a.labeled_role == b.labeled_role
        });
    let generation = if same { cur.generation } else { cur.generation + 1 };
    (Arc::new(Snapshot { generation, nodes }), gone, !same)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo() -> Topology {
        Topology::new(vec![Member::at("a:1"), Member::at("b:2")])
    }

    fn up(role: Role) -> Observation {
        Observation::Up {
            role,
            lsn: Some(1),
            timeline: Some(1),
            replay_lag_ms: None,
            read_only: false,
        }
    }

    #[test]
    fn newest_primary_wins_during_promotion() {
        let t = topo();
        assert_eq!(t.load().primary(), None);
        assert!(t.observe("a:1", &up(Role::Primary)).became_primary);
        t.observe("b:2", &up(Role::Replica));
        assert_eq!(t.load().primary(), Some(0));
        // The replica is promoted while the old primary still answers.
        assert!(t.observe("b:2", &up(Role::Primary)).became_primary);
        assert_eq!(t.load().primary(), Some(1));
        let c = t.observe(
            "b:2",
            &Observation::Down {
                source: Source::Probe,
                error: "gone".into(),
            },
        );
        assert!(c.lost_primary && c.health_changed);
        assert_eq!(t.load().primary(), Some(0));
    }

    #[test]
    fn an_old_primary_restarted_after_failover_loses_to_the_higher_timeline() {
        let t = topo();
        let primary_on = |tl| Observation::Up {
            role: Role::Primary,
            lsn: Some(1),
            timeline: Some(tl),
            replay_lag_ms: None,
            read_only: false,
        };
        t.observe("a:1", &primary_on(1));
        t.observe("b:2", &up(Role::Replica));
        // b is promoted (timeline 2); a crashes.
        t.observe("b:2", &primary_on(2));
        t.observe(
            "a:1",
            &Observation::Down {
                source: Source::Probe,
                error: "killed".into(),
            },
        );
        assert_eq!(t.load().primary(), Some(1));
        // a comes back as a primary on its old timeline: observed last, but b stays primary.
        t.observe("a:1", &primary_on(1));
        assert_eq!(t.load().primary(), Some(1));
    }

    #[test]
    fn generation_moves_only_on_real_changes() {
        let t = topo();
        t.observe("a:1", &up(Role::Primary));
        let g = t.load().generation;
        t.observe(
            "a:1",
            &Observation::Up {
                role: Role::Primary,
                lsn: Some(99),
                timeline: Some(1),
                replay_lag_ms: None,
                read_only: false,
            },
        );
        assert_eq!(t.load().generation, g);
        assert_eq!(t.load().nodes[0].lsn, Some(99));
        t.observe(
            "a:1",
            &Observation::Down {
                source: Source::Probe,
                error: "x".into(),
            },
        );
        assert_eq!(t.load().generation, g + 1);
    }

    #[test]
    fn membership_changes_keep_state_of_nodes_that_stay() {
        let t = topo();
        t.observe("a:1", &up(Role::Primary));
        let g = t.load().generation;
        assert!(t.set_members(&[Member::at("a:1"), Member::at("b:2")]).is_empty());
        assert_eq!(t.load().generation, g, "same members: no new generation");
        // b leaves, c joins, and pod "p" moves from one IP to another.
        let pod = |addr: &str| Member {
            id: "p".into(),
            address: addr.into(),
            zone: Some("z1".into()),
            node: None,
            labeled_role: Some(Role::Replica),
        };
        let gone = t.set_members(&[Member::at("a:1"), Member::at("c:3"), pod("10.0.0.1:5432")]);
        assert_eq!(gone, vec!["b:2".to_string()]);
        let s = t.load();
        assert_eq!(s.primary(), Some(0), "a keeps its probed role");
        assert!(!s.nodes[1].health.up, "c is new and unprobed");
        let load = s.nodes[2].load.clone();
        load.store(3, std::sync::atomic::Ordering::Relaxed);
        t.observe("p", &up(Role::Replica));
        let gone = t.set_members(&[Member::at("a:1"), Member::at("c:3"), pod("10.0.0.9:5432")]);
        assert_eq!(gone, vec!["10.0.0.1:5432".to_string()]);
        let s = t.load();
        let p = &s.nodes[2];
        assert_eq!((p.address.as_str(), p.health.up), ("10.0.0.9:5432", false));
        assert_eq!(p.load.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    #[test]
    fn a_read_only_or_unconfirmed_primary_or_a_label_change_is_no_writable_primary() {
        let t = topo();
        t.observe("a:1", &up(Role::Primary));
        t.observe("b:2", &up(Role::Replica));
        assert_eq!(t.load().writable_primary(), Some(0));
        let g = t.load().generation;
        let read_only = Observation::Up {
            role: Role::Primary,
            lsn: Some(2),
            timeline: Some(1),
            replay_lag_ms: None,
            read_only: true,
        };
        assert!(t.observe("a:1", &read_only).writable_changed);
        let s = t.load();
        assert_eq!((s.primary(), s.writable_primary()), (Some(0), None));
        assert_eq!(s.generation, g + 1, "waiters wake on it");
        assert_eq!(s.hold_reason(), Some("the primary is read-only"));
        t.observe("a:1", &up(Role::Primary));
        assert_eq!(t.load().writable_primary(), Some(0));
        // A 25006 makes the primary unconfirmed until its next probe.
        assert!(t.observe("a:1", &Observation::Suspect).writable_changed);
        assert_eq!(t.load().writable_primary(), None);
        t.observe("a:1", &up(Role::Primary));
        assert_eq!(t.load().writable_primary(), Some(0));
        // A replica's read-only flag means nothing.
        assert!(!t.load().nodes[1].read_only);
        // A label naming b the primary before its probe confirms it.
        let labeled = |id: &str, role| Member {
            labeled_role: Some(role),
            ..Member::at(id)
        };
        t.set_members(&[labeled("a:1", Role::Replica), labeled("b:2", Role::Primary)]);
        assert_eq!(t.load().writable_primary(), None);
        t.observe("a:1", &up(Role::Replica));
        t.observe("b:2", &up(Role::Primary));
        assert_eq!(t.load().writable_primary(), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_wakes_on_change_and_times_out() {
        let t = Arc::new(topo());
        let t2 = t.clone();
        let waiter = tokio::spawn(async move {
            t2.wait_for(Duration::from_secs(5), |s| s.primary().is_some())
                .await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        t.observe("b:2", &up(Role::Primary));
        assert_eq!(waiter.await.unwrap().unwrap().primary(), Some(1));
        let none = Topology::new(vec![Member::at("c:3")])
            .wait_for(Duration::from_secs(2), |s| s.primary().is_some())
            .await;
        assert!(none.is_none());
    }
}
