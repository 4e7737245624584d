//! Which node of a set holds a chunk: weighted rendezvous (highest random
//! weight) hashing of chunk keys.
//!
//! Every key scores every node with a hash of (node id, key); the node with
//! the highest score owns the key. Nothing is stored and nothing is
//! coordinated: any process that knows the node set computes the same owner.
//! When a node joins, only the keys it now wins move (to it); when a node
//! leaves, only its keys move, spread over the others. Weights (capacities)
//! use the logarithmic method (`score = -w / ln(u)`, u uniform in (0, 1)),
//! under which a node's share of keys is its share of the total weight.
//!
//! The sidecar spreads its upstreams this way; a cluster of servers (a later
//! step) builds its membership on the same function, so the client library,
//! the sidecar and the servers agree on owners.

use kvault_proto::ChunkKey;
use thiserror::Error;

/// A node set that cannot be used for placement.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum PlacementError {
    /// No nodes at all.
    #[error("placement needs at least one node")]
    Empty,
    /// Two nodes share an id (they would own the same keys).
    #[error("node id {0:?} appears twice")]
    DuplicateId(String),
    /// A weight that is zero, negative or not finite.
    #[error("node {id:?} has weight {weight}; weights must be finite and > 0")]
    BadWeight {
        /// The node.
        id: String,
        /// Its weight.
        weight: f64,
    },
}

/// One node: a stable id (its address, usually) and its capacity weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Stable identity; the hash input, so renaming a node moves its keys.
    pub id: String,
    /// Relative capacity (e.g. bytes of RAM + NVMe); a node of weight 2 owns
    /// twice the keys of a node of weight 1.
    pub weight: f64,
}

impl Node {
    /// A node of weight 1.
    pub fn new(id: impl Into<String>) -> Node {
        Node {
            id: id.into(),
            weight: 1.0,
        }
    }
}

/// A validated node set.
#[derive(Debug, Clone)]
pub struct Placement {
    nodes: Vec<Node>,
}

/// A uniform number in the open interval (0, 1) from the hash of (node, key).
fn unit_hash(node: &str, key: &ChunkKey) -> f64 {
    let mut h = blake3::Hasher::new();
    h.update(b"kvault-placement-v1\0");
    h.update(&(node.len() as u32).to_le_bytes());
    h.update(node.as_bytes());
    h.update(&key.0);
    let b = h.finalize();
    let mut x = [0u8; 8];
    x.copy_from_slice(&b.as_bytes()[..8]);
    // 53 bits of mantissa, shifted half a step off zero so ln(u) is finite and < 0.
    ((u64::from_le_bytes(x) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

impl Placement {
    /// Checks the node set: non-empty, unique ids, finite positive weights.
    pub fn new(nodes: Vec<Node>) -> Result<Placement, PlacementError> {
        if nodes.is_empty() {
            return Err(PlacementError::Empty);
        }
        let mut seen = std::collections::HashSet::new();
        for n in &nodes {
            if !(n.weight.is_finite() && n.weight > 0.0) {
                return Err(PlacementError::BadWeight {
                    id: n.id.clone(),
                    weight: n.weight,
                });
            }
            if !seen.insert(n.id.as_str()) {
                return Err(PlacementError::DuplicateId(n.id.clone()));
            }
        }
        Ok(Placement { nodes })
    }

    /// Equal-weight nodes with these ids.
    pub fn uniform<S: Into<String>>(ids: impl IntoIterator<Item = S>) -> Result<Placement, PlacementError> {
        Placement::new(ids.into_iter().map(Node::new).collect())
    }

    /// The nodes, in the order given.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Score of node `i` for `key`; higher wins.
    fn score(&self, i: usize, key: &ChunkKey) -> f64 {
        let n = &self.nodes[i];
        -n.weight / unit_hash(&n.id, key).ln()
    }

    /// Index (into [`Placement::nodes`]) of the node that owns `key`.
    /// Ties (astronomically unlikely) go to the smaller id, so the answer
    /// does not depend on the order nodes were listed in.
    pub fn owner(&self, key: &ChunkKey) -> usize {
        let mut best = 0;
        let mut best_score = self.score(0, key);
        for i in 1..self.nodes.len() {
            let s = self.score(i, key);
            if s > best_score || (s == best_score && self.nodes[i].id < self.nodes[best].id) {
                best = i;
                best_score = s;
            }
        }
        best
    }

    /// Every node index, best first: the owner, then where the key would go
    /// if the owner left, and so on (for replicas and failover).
    pub fn ranked(&self, key: &ChunkKey) -> Vec<usize> {
        let mut v: Vec<(f64, usize)> = (0..self.nodes.len()).map(|i| (self.score(i, key), i)).collect();
        v.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then_with(|| self.nodes[a.1].id.cmp(&self.nodes[b.1].id))
        });
        v.into_iter().map(|(_, i)| i).collect()
    }

    /// The `r` best nodes for `key`, best first (all of them when `r` is at
    /// least the node count): the replicas of a key.
    pub fn owners(&self, key: &ChunkKey, r: usize) -> Vec<usize> {
        if r <= 1 {
            return vec![self.owner(key)];
        }
        let mut v = self.ranked(key);
        v.truncate(r);
        v
    }

    /// Splits `keys` by owner: for each node index, the positions (into
    /// `keys`) it owns, in order.
    pub fn group(&self, keys: &[ChunkKey]) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.nodes.len()];
        for (pos, k) in keys.iter().enumerate() {
            out[self.owner(k)].push(pos);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvault_proto::NamespaceId;
    use proptest::prelude::*;

    fn key(i: u32) -> ChunkKey {
        ChunkKey::derive(&NamespaceId([9; 32]), None, &[i])
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:7070")).collect()
    }

    #[test]
    fn bad_node_sets_are_refused() {
        assert_eq!(Placement::new(vec![]).err(), Some(PlacementError::Empty));
        assert!(matches!(
            Placement::uniform(["a", "a"]),
            Err(PlacementError::DuplicateId(_))
        ));
        for w in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let r = Placement::new(vec![Node {
                id: "a".into(),
                weight: w,
            }]);
            assert!(matches!(r, Err(PlacementError::BadWeight { .. })), "{w}");
        }
    }

    #[test]
    fn owner_is_stable_and_independent_of_listing_order() {
        let a = Placement::uniform(ids(5)).unwrap();
        let mut rev = ids(5);
        rev.reverse();
        let b = Placement::uniform(rev).unwrap();
        for i in 0..2000 {
            let k = key(i);
            assert_eq!(a.nodes()[a.owner(&k)].id, b.nodes()[b.owner(&k)].id);
            assert_eq!(a.owner(&k), a.ranked(&k)[0]);
        }
    }

    #[test]
    fn pinned_owners_do_not_drift() {
        // The function is a contract between processes and releases: a
        // change here moves every stored key. These values were computed once.
        let p = Placement::uniform(["a", "b", "c"]).unwrap();
        let got: Vec<usize> = (0..12).map(|i| p.owner(&key(i))).collect();
        assert_eq!(got, PINNED);
    }
    const PINNED: [usize; 12] = [0, 2, 0, 1, 0, 2, 2, 2, 2, 1, 2, 0];

    #[test]
    fn uniform_nodes_share_keys_evenly() {
        let p = Placement::uniform(ids(4)).unwrap();
        let n = 40_000;
        let mut counts = [0usize; 4];
        for i in 0..n {
            counts[p.owner(&key(i))] += 1;
        }
        for c in counts {
            let share = c as f64 / n as f64;
            assert!((share - 0.25).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn weights_set_the_shares() {
        let p = Placement::new(vec![
            Node {
                id: "small".into(),
                weight: 1.0,
            },
            Node {
                id: "big".into(),
                weight: 3.0,
            },
        ])
        .unwrap();
        let n = 40_000;
        let big = (0..n).filter(|i| p.owner(&key(*i)) == 1).count();
        let share = big as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "big node owns {share}");
    }

    #[test]
    fn group_covers_every_key_once() {
        let p = Placement::uniform(ids(3)).unwrap();
        let keys: Vec<ChunkKey> = (0..100).map(key).collect();
        let g = p.group(&keys);
        let mut all: Vec<usize> = g.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        for (node, positions) in g.iter().enumerate() {
            assert!(positions.iter().all(|&i| p.owner(&keys[i]) == node));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A joining node takes keys only for itself, and about its share.
        #[test]
        fn join_moves_only_keys_to_the_new_node(n in 1usize..7, seed in any::<u32>()) {
            let before = Placement::uniform(ids(n)).unwrap();
            let after = Placement::uniform(ids(n + 1)).unwrap();
            let total = 3000u32;
            let mut moved = 0;
            for i in 0..total {
                let k = key(seed.wrapping_add(i));
                let (a, b) = (before.owner(&k), after.owner(&k));
                if a != b {
                    prop_assert_eq!(b, n, "a key moved between old nodes");
                    moved += 1;
                }
            }
            let expect = total as f64 / (n + 1) as f64;
            prop_assert!((moved as f64 - expect).abs() < expect * 0.25 + 30.0, "moved {} expected ~{}", moved, expect);
        }

        /// A leaving node's keys spread over the others; nobody else's move.
        #[test]
        fn leave_moves_only_the_leavers_keys(n in 2usize..7, gone in 0usize..7, seed in any::<u32>()) {
            let gone = gone % n;
            let all = ids(n);
            let before = Placement::uniform(all.clone()).unwrap();
            let rest: Vec<String> = all.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, s)| s.clone()).collect();
            let after = Placement::uniform(rest).unwrap();
            for i in 0..2000u32 {
                let k = key(seed.wrapping_add(i));
                let a = &before.nodes()[before.owner(&k)].id;
                let b = &after.nodes()[after.owner(&k)].id;
                if a != &all[gone] {
                    prop_assert_eq!(a, b);
                } else {
                    // Its new owner is the runner-up of the old ranking.
                    let second = &before.nodes()[before.ranked(&k)[1]].id;
                    prop_assert_eq!(b, second);
                }
            }
        }
    }
}
