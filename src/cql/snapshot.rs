//! An immutable view of one CQL cluster: its nodes (address, data center, rack, tokens, up or
//! down), the token ring, each keyspace's replication and each table's partition key. The
//! control connection builds a new one on every change; requests read the current one.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::common::health::{Health, Verdict};

use sluice_cql::ring::{Location, ReplicaMap, ReplicaMaps, Ring, Strategy};
use sluice_cql::types::ColumnType;

/// Hashed with foldhash: the router looks a keyspace up on every request (SipHash, std's
/// default, cost ~170 instructions per lookup).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Replication of each keyspace.
pub type Keyspaces = HashMap<String, Strategy>;
/// Partition key columns (name and type, in order) of each (keyspace, table).
pub type PartitionKeys = HashMap<(String, String), Vec<(String, ColumnType)>>;

/// One node as sluice last saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// The native transport address, also the node's identity.
    pub addr: SocketAddr,
    pub host_id: Option<[u8; 16]>,
    pub datacenter: String,
    pub rack: String,
    pub tokens: Vec<i64>,
    /// Up until something finds it down (with the reason, for /topology).
    pub health: Health,
    /// The pod (discovered member) at this node's IP, and its zone, when discovery knows it.
    pub pod: Option<String>,
    pub zone: Option<String>,
}

impl NodeInfo {
    /// A configured seed nothing is known about yet (assumed up until proven otherwise).
    pub fn seed(addr: SocketAddr) -> NodeInfo {
        NodeInfo {
            addr,
            host_id: None,
            datacenter: String::new(),
            rack: String::new(),
            tokens: Vec::new(),
            health: Health::assumed(true),
            pod: None,
            zone: None,
        }
    }
}

/// What `system.local` / `system.peers` say about a node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub addr: SocketAddr,
    pub host_id: Option<[u8; 16]>,
    pub datacenter: String,
    pub rack: String,
    pub tokens: Vec<i64>,
}

/// Cluster-wide facts from `system.local`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterInfo {
    pub cluster_name: String,
    pub partitioner: String,
    pub release_version: String,
    pub cql_version: String,
    pub schema_version: Option<[u8; 16]>,
}

/// The current view of a cluster.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub nodes: Vec<NodeInfo>,
    pub ring: Ring,
    pub info: ClusterInfo,
    /// Replication of each keyspace (set through [`Snapshot::with_schema`], which also makes
    /// the replica maps requests use).
    pub keyspaces: Keyspaces,
    /// Partition key columns of each (keyspace, table), in order.
    pub tables: PartitionKeys,
    /// Whether the ring has been read at least once.
    pub ring_known: bool,
    /// The highest protocol version the cluster accepted.
    pub max_version: u8,
    /// The backend wants PasswordAuthenticator logins.
    pub auth_required: bool,
    /// Each keyspace's replicas of every token range of `ring` (keyspaces with the same
    /// replication share one), made whenever the ring or the schema changes: a request looks
    /// its replicas up instead of walking the ring.
    placements: HashMap<String, Arc<ReplicaMap>>,
}

impl Snapshot {
    /// A snapshot of the configured seeds only.
    pub fn seeds(addrs: &[SocketAddr]) -> Snapshot {
        Snapshot {
            nodes: addrs.iter().copied().map(NodeInfo::seed).collect(),
            max_version: 5,
            ..Snapshot::default()
        }
    }

    /// The index of the node with this native address.
    pub fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr == addr)
    }

    fn rebuild_ring(&mut self) {
        let spec: Vec<(Location, Vec<i64>)> = self
            .nodes
            .iter()
            .map(|n| {
                (
                    Location {
                        datacenter: n.datacenter.clone(),
                        rack: n.rack.clone(),
                    },
                    n.tokens.clone(),
                )
            })
            .collect();
        self.ring = Ring::new(&spec);
    }

    /// Makes `placements` for the current ring and keyspaces.
    fn rebuild_placements(&mut self) {
        let mut maps = ReplicaMaps::default();
        self.placements = self
            .keyspaces
            .iter()
            .filter(|(_, strategy)| **strategy != Strategy::Local)
            .map(|(name, strategy)| (name.clone(), maps.get(&self.ring, strategy)))
            .collect();
    }

    /// The next snapshot after reading the ring: `rows` are every node (local + peers). Nodes
    /// that are no longer listed go away unless they are seeds; up/down state is kept.
    pub fn with_ring(&self, rows: &[NodeRow], info: ClusterInfo, seeds: &[SocketAddr]) -> Snapshot {
        let mut next = self.clone();
        let mut nodes: Vec<NodeInfo> = Vec::new();
        for r in rows {
            let old = self.nodes.iter().find(|n| n.addr == r.addr);
            nodes.push(NodeInfo {
                addr: r.addr,
                host_id: r.host_id,
                datacenter: r.datacenter.clone(),
                rack: r.rack.clone(),
                tokens: r.tokens.clone(),
                health: old.map_or(Health::assumed(true), |o| o.health.clone()),
                pod: old.and_then(|o| o.pod.clone()),
                zone: old.and_then(|o| o.zone.clone()),
            });
        }
        for s in seeds {
            if !nodes.iter().any(|n| n.addr == *s) {
                let old = self.nodes.iter().find(|n| n.addr == *s).cloned();
                let mut n = old.unwrap_or_else(|| NodeInfo::seed(*s));
                n.tokens.clear();
                nodes.push(n);
            }
        }
        next.nodes = nodes;
        next.info = info;
        next.ring_known = true;
        next.rebuild_ring();
        if next.ring != self.ring {
            next.rebuild_placements();
        }
        if next.nodes != self.nodes || next.info != self.info || !self.ring_known {
            next.generation = self.generation + 1;
        }
        next
    }

    /// The next snapshot with each node's pod and zone looked up by its IP (`None` if nothing
    /// changes).
    pub fn with_pods(
        &self,
        lookup: impl Fn(std::net::IpAddr) -> Option<(String, Option<String>)>,
    ) -> Option<Snapshot> {
        let mut next = self.clone();
        for n in &mut next.nodes {
            let (pod, zone) = match lookup(n.addr.ip()) {
                Some((pod, zone)) => (Some(pod), zone),
                None => (None, None),
            };
            n.pod = pod;
            n.zone = zone;
        }
        if next.nodes == self.nodes {
            return None;
        }
        next.generation = self.generation + 1;
        Some(next)
    }

    /// The next snapshot after reading the schema.
    pub fn with_schema(&self, keyspaces: Keyspaces, tables: PartitionKeys) -> Snapshot {
        let mut next = self.clone();
        next.keyspaces = keyspaces;
        next.tables = tables;
        // A table's DDL refreshes the schema too: the maps are made again only when some
        // keyspace's replication changed.
        if next.keyspaces != self.keyspaces {
            next.rebuild_placements();
        }
        next.generation = self.generation + 1;
        next
    }

    /// The next snapshot with a verdict on a node's health applied; `None` if nothing changes
    /// (a node found down again for another reason does change: /topology shows the latest).
    pub fn with_verdict(&self, addr: SocketAddr, verdict: &Verdict) -> Option<Snapshot> {
        let i = self.index_of(addr)?;
        let mut health = self.nodes[i].health.clone();
        health.apply(verdict);
        if health == self.nodes[i].health {
            return None;
        }
        let mut next = self.clone();
        next.nodes[i].health = health;
        next.generation = self.generation + 1;
        Some(next)
    }

    /// Replicas (node indexes, ring order) of `token` in `keyspace`; empty when unknown.
    #[cfg(test)]
    pub fn replicas(&self, keyspace: &str, token: i64) -> Vec<usize> {
        let mut out = Vec::new();
        self.replicas_into(keyspace, token, &mut out);
        out
    }

    /// [`Self::replicas`], appended to `out`.
    pub fn replicas_into(&self, keyspace: &str, token: i64, out: &mut Vec<usize>) {
        out.extend(self.replica_slice(keyspace, token).iter().map(|&n| n as usize));
    }

    /// [`Self::replicas`], borrowed from the keyspace's replica map.
    pub fn replica_slice(&self, keyspace: &str, token: i64) -> &[u32] {
        match self.placements.get(keyspace) {
            Some(m) => m.replicas(&self.ring, token),
            None => &[],
        }
    }

    /// Whether any node is believed up.
    pub fn any_up(&self) -> bool {
        self.nodes.iter().any(|n| n.health.up)
    }

    /// The data center of the first up node that has one (used when none is configured).
    pub fn first_datacenter(&self) -> Option<&str> {
        self.nodes
            .iter()
            .filter(|n| !n.datacenter.is_empty())
            .map(|n| n.datacenter.as_str())
            .next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::health::Source;

    fn row(ip: &str, dc: &str, tokens: &[i64]) -> NodeRow {
        NodeRow {
            addr: format!("{ip}:9042").parse().unwrap(),
            host_id: None,
            datacenter: dc.into(),
            rack: "r1".into(),
            tokens: tokens.to_vec(),
        }
    }

    #[test]
    fn ring_keeps_status_and_seeds() {
        let seed: SocketAddr = "127.0.0.1:9042".parse().unwrap();
        let s = Snapshot::seeds(&[seed]);
        let s = s
            .with_verdict(seed, &Verdict::down(Source::Connect, "refused"))
            .unwrap();
        let s = s.with_ring(
            &[row("127.0.0.1", "dc1", &[0]), row("127.0.0.2", "dc1", &[100])],
            ClusterInfo::default(),
            &[seed],
        );
        assert_eq!(s.nodes.len(), 2);
        assert!(!s.nodes[0].health.up && s.nodes[1].health.up);
        let mut ks = HashMap::default();
        ks.insert("k".to_string(), Strategy::Simple { rf: 1 });
        let s = s.with_schema(ks, HashMap::default());
        assert_eq!(s.replicas("k", 50), vec![1]);
        assert_eq!(s.replicas("k", 150), vec![0]);
        assert!(s.replicas("unknown", 1).is_empty());
        let g = s.generation;
        assert!(s
            .with_verdict("127.0.0.2:9042".parse().unwrap(), &Verdict::up(Source::Probe))
            .is_none());
        let s2 = s
            .with_verdict(
                "127.0.0.2:9042".parse().unwrap(),
                &Verdict::down(Source::Probe, "x"),
            )
            .unwrap();
        assert_eq!(s2.generation, g + 1);
    }

    /// Replicas are looked up in maps made from the ring and the schema: a new ring or a new
    /// schema makes new ones (no request sees the replicas of a ring that has changed).
    #[test]
    fn replicas_follow_ring_and_schema_changes() {
        let ring = |a: &[i64], b: &[i64]| [row("127.0.0.1", "dc1", a), row("127.0.0.2", "dc2", b)];
        let s = Snapshot::seeds(&[]).with_ring(&ring(&[0], &[100]), ClusterInfo::default(), &[]);
        let mut ks = HashMap::default();
        ks.insert("one".to_string(), Strategy::Simple { rf: 1 });
        ks.insert("two".to_string(), Strategy::Simple { rf: 2 });
        ks.insert(
            "nts".to_string(),
            Strategy::NetworkTopology {
                dcs: vec![("dc2".into(), 1)],
            },
        );
        ks.insert("local".to_string(), Strategy::Local);
        let s = s.with_schema(ks.clone(), HashMap::default());
        assert_eq!(s.replicas("one", 50), vec![1]);
        assert_eq!(s.replicas("two", 50), vec![1, 0]);
        assert_eq!(s.replicas("nts", 50), vec![1]);
        assert!(s.replicas("local", 50).is_empty());
        // The same replication again (a table's DDL): the maps are kept, not made again;
        // keyspaces with the same replication share one.
        let again = s.with_schema(ks.clone(), HashMap::default());
        assert!(Arc::ptr_eq(&s.placements["one"], &again.placements["one"]));
        assert_eq!(again.replicas("two", 50), vec![1, 0]);
        let mut same = ks.clone();
        same.insert("uno".to_string(), Strategy::Simple { rf: 1 });
        let shared = s.with_schema(same, HashMap::default());
        assert!(Arc::ptr_eq(&shared.placements["one"], &shared.placements["uno"]));
        // Node 0 takes over the range (token 60): the maps follow the new ring.
        let s = s.with_ring(&ring(&[0, 60], &[100]), ClusterInfo::default(), &[]);
        assert_eq!(s.replicas("one", 50), vec![0]);
        assert_eq!(s.replicas("two", 50), vec![0, 1]);
        assert_eq!(s.replicas("nts", 50), vec![1]);
        // A schema change replaces them too.
        ks.insert("one".to_string(), Strategy::Simple { rf: 2 });
        ks.remove("nts");
        let s = s.with_schema(ks, HashMap::default());
        assert_eq!(s.replicas("one", 50), vec![0, 1]);
        assert!(s.replicas("nts", 50).is_empty());
    }
}
