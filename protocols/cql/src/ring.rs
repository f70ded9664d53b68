//! The token ring and replica placement: SimpleStrategy and NetworkTopologyStrategy (with
//! racks), computed the way Cassandra 4.0 does, so that the order matches `nodetool
//! getendpoints` (the first replica owns the first ring token >= the key's token).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Where a node is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    pub datacenter: String,
    pub rack: String,
}

/// A keyspace's replication strategy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    /// `replication_factor` consecutive distinct nodes in ring order.
    Simple { rf: usize },
    /// Per data center replication factors, spread across racks.
    NetworkTopology { dcs: Vec<(String, usize)> },
    /// Every node (DSE's EverywhereStrategy).
    Everywhere,
    /// Node-local data (system keyspaces) or an unknown class: no replica set to route to.
    Local,
}

fn parse_rf(s: &str) -> Option<usize> {
    // Transient replication writes "3/1": total replicas first.
    s.split('/').next()?.trim().parse().ok()
}

impl Strategy {
    /// The strategy of a `system_schema.keyspaces.replication` map.
    pub fn from_replication<'a, I>(map: I) -> Strategy
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let map: Vec<(&str, &str)> = map.into_iter().collect();
        let class = map
            .iter()
            .find(|(k, _)| *k == "class")
            .map(|(_, v)| *v)
            .unwrap_or("");
        let short = class.rsplit('.').next().unwrap_or(class);
        match short {
            "SimpleStrategy" => {
                match map
                    .iter()
                    .find(|(k, _)| *k == "replication_factor")
                    .and_then(|(_, v)| parse_rf(v))
                {
                    Some(rf) => Strategy::Simple { rf },
                    None => Strategy::Local,
                }
            }
            "NetworkTopologyStrategy" => Strategy::NetworkTopology {
                dcs: map
                    .iter()
                    .filter(|(k, _)| *k != "class" && *k != "replication_factor")
                    .filter_map(|(k, v)| Some((k.to_string(), parse_rf(v)?)))
                    .collect(),
            },
            "EverywhereStrategy" => Strategy::Everywhere,
            _ => Strategy::Local,
        }
    }
}

/// A ring of nodes (identified by their index) and their tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ring {
    /// (token, node index), sorted by token.
    entries: Vec<(i64, usize)>,
    locations: Vec<Location>,
    /// How many nodes own tokens: no walk needs to go on once it has met them all.
    owners: usize,
}

impl Ring {
    /// A ring of `nodes`, each with its location and tokens. A token claimed twice goes to the
    /// node listed last (as a newer gossip state would).
    pub fn new(nodes: &[(Location, Vec<i64>)]) -> Ring {
        let mut by_token: HashMap<i64, usize> = HashMap::new();
        for (i, (_, tokens)) in nodes.iter().enumerate() {
            for t in tokens {
                by_token.insert(*t, i);
            }
        }
        let mut entries: Vec<(i64, usize)> = by_token.into_iter().collect();
        entries.sort_unstable();
        let owners = entries.iter().map(|&(_, n)| n).collect::<HashSet<usize>>().len();
        Ring {
            entries,
            locations: nodes.iter().map(|(l, _)| l.clone()).collect(),
            owners,
        }
    }

    /// Whether the ring has no tokens.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The number of nodes (with or without tokens).
    pub fn node_count(&self) -> usize {
        self.locations.len()
    }

    /// The location of node `i`.
    pub fn location(&self, i: usize) -> Option<&Location> {
        self.locations.get(i)
    }

    /// The ring position of the first token >= `token`, wrapping around.
    fn start(&self, token: i64) -> usize {
        let i = self.entries.partition_point(|(t, _)| *t < token);
        if i == self.entries.len() {
            0
        } else {
            i
        }
    }

    fn walk(&self, token: i64) -> impl Iterator<Item = usize> + '_ {
        let start = self.start(token);
        let n = self.entries.len();
        (0..n).map(move |k| self.entries[(start + k) % n].1)
    }

    /// The node owning `token` (the primary replica under any strategy).
    pub fn owner(&self, token: i64) -> Option<usize> {
        self.walk(token).next()
    }

    /// The replicas of `token`, in Cassandra's order.
    pub fn replicas(&self, token: i64, strategy: &Strategy) -> Vec<usize> {
        let mut out = Vec::new();
        self.replicas_into(token, strategy, &mut out);
        out
    }

    /// [`Self::replicas`], appended to `out` (whose own entries are not looked at): a router
    /// that builds its whole list of nodes in one vector allocates once per request.
    pub fn replicas_into(&self, token: i64, strategy: &Strategy, out: &mut Vec<usize>) {
        let start = out.len();
        match strategy {
            Strategy::Local => {}
            Strategy::Everywhere => {
                for n in self.walk(token) {
                    if out.len() - start == self.owners {
                        break;
                    }
                    if !out[start..].contains(&n) {
                        out.push(n);
                    }
                }
            }
            Strategy::Simple { rf } => {
                for n in self.walk(token) {
                    if out.len() - start >= (*rf).min(self.owners) {
                        break;
                    }
                    if !out[start..].contains(&n) {
                        out.push(n);
                    }
                }
            }
            Strategy::NetworkTopology { dcs } => self.nts_replicas(token, dcs, out),
        }
    }

    /// NetworkTopologyStrategy as in Cassandra 4.0: walk the ring; in each data center take a
    /// node from every rack not seen yet, and accept nodes from seen racks only while the
    /// data center has more replicas to place than it has racks.
    fn nts_replicas(&self, token: i64, dcs: &[(String, usize)], out: &mut Vec<usize>) {
        NtsPlan::new(self, dcs).place(self, self.start(token), out, &mut Vec::new());
    }

    /// Every token range's replicas under `strategy`, computed once: a request then looks
    /// its replicas up ([`ReplicaMap::replicas_into`]) instead of walking the ring (for
    /// NetworkTopologyStrategy the walk first sorts every node of the ring into data centers
    /// and racks).
    pub fn replica_map(&self, strategy: &Strategy) -> ReplicaMap {
        let mut map = ReplicaMap::default();
        let mut one = Vec::new();
        let plan = match strategy {
            Strategy::NetworkTopology { dcs } => Some(NtsPlan::new(self, dcs)),
            _ => None,
        };
        let mut scratch = Vec::new();
        for pos in 0..self.entries.len() {
            one.clear();
            match &plan {
                Some(plan) => plan.place(self, pos, &mut one, &mut scratch),
                None => self.replicas_into(self.entries[pos].0, strategy, &mut one),
            }
            map.nodes.extend(one.iter().map(|&n| n as u32));
            map.ends.push(map.nodes.len() as u32);
        }
        map
    }
}

/// What NetworkTopologyStrategy's walk needs of a ring, worked out once per ring: each node's
/// data center (as an index into the replication factors) and rack (as a small number).
struct NtsPlan {
    /// Per node: the index of its data center in `dcs`, if that one gets replicas.
    node_dc: Vec<Option<usize>>,
    /// Per node: its (data center, rack) as a number below `racks`.
    node_rack: Vec<usize>,
    racks: usize,
    /// Per data center that gets replicas: (replicas to place, placements allowed on racks
    /// already used).
    dcs: Vec<(usize, isize)>,
}

impl NtsPlan {
    fn new(ring: &Ring, dcs: &[(String, usize)]) -> NtsPlan {
        // Only nodes that own tokens count, as in Cassandra's token metadata.
        let mut nodes_in_dc: HashMap<&str, HashSet<usize>> = HashMap::new();
        let mut racks_in_dc: HashMap<&str, HashSet<&str>> = HashMap::new();
        for &(_, n) in &ring.entries {
            let loc = &ring.locations[n];
            nodes_in_dc.entry(&loc.datacenter).or_default().insert(n);
            racks_in_dc.entry(&loc.datacenter).or_default().insert(&loc.rack);
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut plan = NtsPlan {
            node_dc: vec![None; ring.locations.len()],
            node_rack: vec![0; ring.locations.len()],
            racks: 0,
            dcs: Vec::new(),
        };
        for (dc, rf) in dcs {
            let nodes = nodes_in_dc.get(dc.as_str()).map_or(0, HashSet::len);
            if *rf == 0 || nodes == 0 {
                continue;
            }
            let racks = racks_in_dc.get(dc.as_str()).map_or(0, HashSet::len);
            let placing = ((*rf).min(nodes), *rf as isize - racks as isize);
            // A data center named twice: the last factor counts (as in a map).
            match index.get(dc.as_str()) {
                Some(&i) => plan.dcs[i] = placing,
                None => {
                    index.insert(dc.as_str(), plan.dcs.len());
                    plan.dcs.push(placing);
                }
            }
        }
        let mut rack_ids: HashMap<(&str, &str), usize> = HashMap::new();
        for (n, loc) in ring.locations.iter().enumerate() {
            plan.node_dc[n] = index.get(loc.datacenter.as_str()).copied();
            let next = rack_ids.len();
            plan.node_rack[n] = *rack_ids.entry((&loc.datacenter, &loc.rack)).or_insert(next);
        }
        plan.racks = rack_ids.len();
        plan
    }

    /// Appends the replicas of the range at ring position `start` to `out` (`seen` is scratch
    /// space for the racks used).
    fn place(&self, ring: &Ring, start: usize, out: &mut Vec<usize>, seen: &mut Vec<bool>) {
        let first = out.len();
        let mut left = self.dcs.clone();
        let mut to_fill = left.len();
        seen.clear();
        seen.resize(self.racks, false);
        let n = ring.entries.len();
        for k in 0..n {
            if to_fill == 0 {
                break;
            }
            let node = ring.entries[(start + k) % n].1;
            let Some(d) = self.node_dc[node] else {
                continue;
            };
            let dc = &mut left[d];
            if dc.0 == 0 || out[first..].contains(&node) {
                continue;
            }
            let rack = self.node_rack[node];
            if !seen[rack] {
                seen[rack] = true;
            } else if dc.1 > 0 {
                dc.1 -= 1;
            } else {
                continue;
            }
            dc.0 -= 1;
            out.push(node);
            if dc.0 == 0 {
                to_fill -= 1;
            }
        }
    }
}

/// The replica maps of one ring, one per distinct replication, made on first use: keyspaces
/// with the same replication share one.
#[derive(Debug, Default)]
pub struct ReplicaMaps {
    made: Vec<(Strategy, Arc<ReplicaMap>)>,
}

impl ReplicaMaps {
    /// The map of `strategy` on `ring` (which must be the same ring on every call).
    pub fn get(&mut self, ring: &Ring, strategy: &Strategy) -> Arc<ReplicaMap> {
        if let Some((_, m)) = self.made.iter().find(|(s, _)| s == strategy) {
            return m.clone();
        }
        let m = Arc::new(ring.replica_map(strategy));
        self.made.push((strategy.clone(), m.clone()));
        m
    }
}

/// The replicas of each token range of one ring under one strategy ([`Ring::replica_map`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaMap {
    /// Where ring position i's replicas end in `nodes` (they start where i - 1's end).
    ends: Vec<u32>,
    nodes: Vec<u32>,
}

impl ReplicaMap {
    /// Appends the replicas of `token` to `out`, as [`Ring::replicas_into`] would; `ring`
    /// must be the one the map was made from.
    pub fn replicas_into(&self, ring: &Ring, token: i64, out: &mut Vec<usize>) {
        out.extend(self.replicas(ring, token).iter().map(|&n| n as usize));
    }

    /// The replicas of `token` (node indexes in ring order), as [`Ring::replicas_into`] finds
    /// them, borrowed from the map: a router that needs only the best of them copies nothing.
    pub fn replicas(&self, ring: &Ring, token: i64) -> &[u32] {
        if ring.entries.len() != self.ends.len() || self.ends.is_empty() {
            return &[];
        }
        let pos = ring.start(token);
        let from = if pos == 0 { 0 } else { self.ends[pos - 1] as usize };
        let to = self.ends[pos] as usize;
        &self.nodes[from..to]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(dc: &str, rack: &str) -> Location {
        Location {
            datacenter: dc.into(),
            rack: rack.into(),
        }
    }

    #[test]
    fn simple_strategy_walks_distinct_nodes() {
        let ring = Ring::new(&[
            (loc("dc1", "r1"), vec![0, 300]),
            (loc("dc1", "r1"), vec![100]),
            (loc("dc1", "r1"), vec![200]),
        ]);
        assert_eq!(ring.replicas(50, &Strategy::Simple { rf: 2 }), [1, 2]);
        assert_eq!(ring.replicas(250, &Strategy::Simple { rf: 2 }), [0, 1]);
        assert_eq!(ring.replicas(301, &Strategy::Simple { rf: 5 }), [0, 1, 2]);
        assert_eq!(ring.replicas(300, &Strategy::Simple { rf: 1 }), [0]);
        assert!(ring.replicas(1, &Strategy::Local).is_empty());
    }

    #[test]
    fn network_topology_spreads_racks_then_repeats() {
        // dc1: nodes 0 (r1), 1 (r1), 2 (r2); dc2: node 3.
        let ring = Ring::new(&[
            (loc("dc1", "r1"), vec![10]),
            (loc("dc1", "r1"), vec![20]),
            (loc("dc1", "r2"), vec![30]),
            (loc("dc2", "r1"), vec![25]),
        ]);
        let nts = |a: usize, b: usize| Strategy::NetworkTopology {
            dcs: vec![("dc1".into(), a), ("dc2".into(), b)],
        };
        // RF 2 in dc1 with two racks: node 1 (second r1) is skipped for node 2 (r2).
        assert_eq!(ring.replicas(5, &nts(2, 1)), [0, 3, 2]);
        // RF 3 with two racks: one rack repeat allowed, taken as soon as met.
        assert_eq!(ring.replicas(5, &nts(3, 0)), [0, 1, 2]);
        // RF above the node count is capped.
        assert_eq!(ring.replicas(21, &nts(9, 9)), [3, 2, 0, 1]);
        assert_eq!(
            Strategy::from_replication([
                ("class", "org.apache.cassandra.locator.NetworkTopologyStrategy"),
                ("dc1", "3"),
                ("dc2", "2/1")
            ]),
            Strategy::NetworkTopology {
                dcs: vec![("dc1".into(), 3), ("dc2".into(), 2)]
            }
        );
    }
}
