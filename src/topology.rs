//! The topology of one cluster: an immutable snapshot of its nodes, swapped atomically.
//!
//! Probes (and later discovery) build a new snapshot from the current one and store it with
//! `ArcSwap::rcu`; sessions load the current snapshot per request and never lock. A `watch`
//! channel carries the generation number so that requests waiting for a primary wake up.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

/// What a node is, according to the node itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
    Unknown,
}

/// One node as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `host:port`, also the node's identity.
    pub address: String,
    pub role: Role,
    /// The last probe (or connection attempt) succeeded.
    pub healthy: bool,
    /// WAL position: the current LSN on a primary, the replayed LSN on a replica.
    pub lsn: Option<u64>,
    /// Increases each time any node becomes primary; the newest primary wins a split brain.
    pub primary_epoch: u64,
    /// Why the node is unhealthy, for /topology.
    pub last_error: Option<String>,
}

impl Node {
    /// A node that has not been probed yet.
    pub fn new(address: String) -> Self {
        Node {
            address,
            role: Role::Unknown,
            healthy: false,
            lsn: None,
            primary_epoch: 0,
            last_error: None,
        }
    }
}

/// An immutable view of a cluster's nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub nodes: Vec<Node>,
}

impl Snapshot {
    /// The healthy primary; with more than one (during a promotion), the most recent.
    pub fn primary(&self) -> Option<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.healthy && n.role == Role::Primary)
            .max_by_key(|(_, n)| n.primary_epoch)
            .map(|(i, _)| i)
    }

    /// Whether any node can serve anything.
    pub fn any_healthy(&self) -> bool {
        self.nodes.iter().any(|n| n.healthy && n.role != Role::Unknown)
    }
}

/// What a probe learned about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Up { role: Role, lsn: Option<u64> },
    Down { error: String },
}

/// What changed for a node when an observation was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Change {
    pub role_changed: bool,
    pub health_changed: bool,
    pub became_primary: bool,
    pub lost_primary: bool,
}

/// The shared, atomically swapped topology of one cluster.
pub struct Topology {
    current: ArcSwap<Snapshot>,
    generation: watch::Sender<u64>,
}

impl Topology {
    /// A topology of unprobed nodes.
    pub fn new(addresses: &[String]) -> Self {
        let snap = Snapshot {
            generation: 0,
            nodes: addresses.iter().cloned().map(Node::new).collect(),
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

    /// Applies one observation of node `index` and publishes a new snapshot if anything changed.
    pub fn observe(&self, index: usize, obs: &Observation) -> Change {
        let mut change = Change::default();
        self.current.rcu(|cur| {
            let (next, c) = apply(cur, index, obs);
            change = c;
            next
        });
        let snap = self.current.load();
        if change != Change::default() {
            self.generation.send_replace(snap.generation);
        }
        change
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
fn apply(cur: &Snapshot, index: usize, obs: &Observation) -> (Arc<Snapshot>, Change) {
    let mut next = cur.clone();
    let Some(node) = next.nodes.get_mut(index) else {
        return (Arc::new(next), Change::default());
    };
    let before = node.clone();
    match obs {
        Observation::Up { role, lsn } => {
            node.role = *role;
            node.healthy = true;
            node.lsn = *lsn;
            node.last_error = None;
        }
        Observation::Down { error } => {
            node.healthy = false;
            node.last_error = Some(error.clone());
        }
    }
    let was_primary = before.healthy && before.role == Role::Primary;
    let is_primary = node.healthy && node.role == Role::Primary;
    let change = Change {
        role_changed: before.role != node.role,
        health_changed: before.healthy != node.healthy,
        became_primary: is_primary && !was_primary,
        lost_primary: was_primary && !is_primary,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn topo() -> Topology {
        Topology::new(&["a:1".into(), "b:2".into()])
    }

    fn up(role: Role) -> Observation {
        Observation::Up { role, lsn: Some(1) }
    }

    #[test]
    fn newest_primary_wins_during_promotion() {
        let t = topo();
        assert_eq!(t.load().primary(), None);
        assert!(t.observe(0, &up(Role::Primary)).became_primary);
        t.observe(1, &up(Role::Replica));
        assert_eq!(t.load().primary(), Some(0));
        // The replica is promoted while the old primary still answers.
        assert!(t.observe(1, &up(Role::Primary)).became_primary);
        assert_eq!(t.load().primary(), Some(1));
        let c = t.observe(1, &Observation::Down { error: "gone".into() });
        assert!(c.lost_primary && c.health_changed);
        assert_eq!(t.load().primary(), Some(0));
    }

    #[test]
    fn generation_moves_only_on_real_changes() {
        let t = topo();
        t.observe(0, &up(Role::Primary));
        let g = t.load().generation;
        t.observe(
            0,
            &Observation::Up {
                role: Role::Primary,
                lsn: Some(99),
            },
        );
        assert_eq!(t.load().generation, g);
        assert_eq!(t.load().nodes[0].lsn, Some(99));
        t.observe(0, &Observation::Down { error: "x".into() });
        assert_eq!(t.load().generation, g + 1);
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
        t.observe(1, &up(Role::Primary));
        assert_eq!(waiter.await.unwrap().unwrap().primary(), Some(1));
        let none = Topology::new(&["c:3".into()])
            .wait_for(Duration::from_secs(2), |s| s.primary().is_some())
            .await;
        assert!(none.is_none());
    }
}
