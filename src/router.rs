//! The router: a pure function from (statement class, hint, policy, topology) to a node.
//!
//! No I/O and no clocks, so every rule is a unit test. Load (queries in flight per node) and a
//! tie-breaking counter are passed in by the caller.

use sluice_postgres::{Class, Classification, Hint};

use crate::config::Consistency;
use crate::topology::{Role, Snapshot};

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
    /// class; `consistency = "primary"` wins over everything.
    pub fn of(c: Classification, consistency: Consistency) -> Intent {
        if consistency == Consistency::Primary {
            return Intent::Primary;
        }
        match (c.hint, c.class) {
            (Some(Hint::Primary), _) => Intent::Primary,
            (Some(Hint::Replica), _) => Intent::Replica,
            (None, Class::Write) => Intent::Primary,
            (None, Class::Read) => Intent::Replica,
        }
    }

    /// The label used in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Intent::Primary => "primary",
            Intent::Replica => "replica",
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
/// Reads go to the healthy replica with the fewest queries in flight (`load[i]`), ties broken
/// by rotating from `tiebreak`; with no healthy replica they fall back to the primary.
pub fn choose(intent: Intent, snap: &Snapshot, load: &[u32], tiebreak: usize) -> Result<usize, NoRoute> {
    let primary = snap.primary();
    match intent {
        Intent::Primary => primary.ok_or(NoRoute::NoPrimary),
        Intent::Replica => {
            let n = snap.nodes.len();
            let mut best: Option<(u32, usize)> = None;
            for k in 0..n {
                let i = (tiebreak + k) % n;
                let node = &snap.nodes[i];
                if !node.healthy || node.role != Role::Replica {
                    continue;
                }
                let l = load.get(i).copied().unwrap_or(0);
                if best.is_none_or(|(bl, _)| l < bl) {
                    best = Some((l, i));
                }
            }
            best.map(|(_, i)| i).or(primary).ok_or(NoRoute::NoNode)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Member, Node};

    fn node(role: Role, healthy: bool) -> Node {
        Node {
            role,
            healthy,
            primary_epoch: u64::from(role == Role::Primary),
            ..Node::new(Member::at("x:1"))
        }
    }

    fn snap(nodes: Vec<Node>) -> Snapshot {
        Snapshot { generation: 1, nodes }
    }

    fn cls(class: Class, hint: Option<Hint>) -> Classification {
        Classification { class, hint }
    }

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
    }

    #[test]
    fn reads_pick_least_loaded_healthy_replica() {
        let s = snap(vec![
            node(Role::Primary, true),
            node(Role::Replica, true),
            node(Role::Replica, true),
            node(Role::Replica, false),
        ]);
        assert_eq!(choose(Intent::Replica, &s, &[0, 5, 2, 0], 0), Ok(2));
        assert_eq!(choose(Intent::Replica, &s, &[0, 1, 2, 0], 0), Ok(1));
        // Ties rotate with the tie-breaker.
        assert_eq!(choose(Intent::Replica, &s, &[0, 0, 0, 0], 0), Ok(1));
        assert_eq!(choose(Intent::Replica, &s, &[0, 0, 0, 0], 2), Ok(2));
        assert_eq!(choose(Intent::Primary, &s, &[9, 0, 0, 0], 0), Ok(0));
    }

    #[test]
    fn reads_fall_back_to_primary_and_writes_need_one() {
        let s = snap(vec![node(Role::Primary, true), node(Role::Replica, false)]);
        assert_eq!(choose(Intent::Replica, &s, &[], 0), Ok(0));
        let s = snap(vec![node(Role::Primary, false), node(Role::Replica, true)]);
        assert_eq!(choose(Intent::Primary, &s, &[], 0), Err(NoRoute::NoPrimary));
        assert_eq!(choose(Intent::Replica, &s, &[], 0), Ok(1));
        let s = snap(vec![node(Role::Unknown, true), node(Role::Replica, false)]);
        assert_eq!(choose(Intent::Replica, &s, &[], 0), Err(NoRoute::NoNode));
    }
}
