//! Where a key lives now and where it may still be found: the current
//! placement, and the placements in force during the last grace period.
//!
//! When the node set changes, keys move (to a node that joined, away from
//! one that left). A read first asks the key's current owners; a miss there
//! falls back to the owners the key had under each recent placement, newest
//! first, so moved keys stay readable while they are copied forward. Past
//! placements older than the grace period are forgotten: a key not copied by
//! then is a miss, never an error.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use kvault_proto::ChunkKey;

use crate::placement::{Node, Placement};

/// A node as placement sees it: id (the hash input), address, and the
/// weight it carries now (its capacity, scaled down while it ramps up).
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Stable id.
    pub id: String,
    /// gRPC URL.
    pub addr: String,
    /// Effective weight now.
    pub weight: f64,
}

struct Past {
    placement: Placement,
    ended: Instant,
}

/// A snapshot of routing: immutable, swapped whole when membership changes.
pub struct Routes {
    current: Option<Placement>,
    members: Vec<Member>,
    addrs: HashMap<String, String>,
    past: Vec<Past>,
    replicas: BTreeMap<String, u32>,
    default_replicas: u32,
    grace: Duration,
}

impl Routes {
    /// Routing over `members` with no history.
    pub fn new(
        members: Vec<Member>,
        replicas: BTreeMap<String, u32>,
        default_replicas: u32,
        grace: Duration,
    ) -> Routes {
        let mut r = Routes {
            current: None,
            members: Vec::new(),
            addrs: HashMap::new(),
            past: Vec::new(),
            replicas,
            default_replicas: default_replicas.max(1),
            grace,
        };
        r.set_members(members);
        r
    }

    fn set_members(&mut self, members: Vec<Member>) {
        // Members come from validated records or a checked static list; a set
        // that placement refuses (no nodes) routes nothing.
        self.current = Placement::new(
            members
                .iter()
                .map(|m| Node {
                    id: m.id.clone(),
                    weight: m.weight,
                })
                .collect(),
        )
        .ok();
        for m in &members {
            self.addrs.insert(m.id.clone(), m.addr.clone());
        }
        self.members = members;
    }

    /// Whether `members` and `replicas` route exactly as this snapshot does now.
    pub fn same(&self, members: &[Member], replicas: &BTreeMap<String, u32>) -> bool {
        let mut a: Vec<&Member> = self.members.iter().collect();
        let mut b: Vec<&Member> = members.iter().collect();
        a.sort_by(|x, y| x.id.cmp(&y.id));
        b.sort_by(|x, y| x.id.cmp(&y.id));
        a == b && &self.replicas == replicas
    }

    /// The next snapshot: `members` become current, this one's placement
    /// joins the history (which drops what is older than the grace period).
    pub fn next(&self, members: Vec<Member>, replicas: BTreeMap<String, u32>, now: Instant) -> Routes {
        let mut past: Vec<Past> = Vec::with_capacity(self.past.len() + 1);
        if let Some(p) = &self.current {
            past.push(Past {
                placement: p.clone(),
                ended: now,
            });
        }
        past.extend(
            self.past
                .iter()
                .filter(|p| now.duration_since(p.ended) < self.grace)
                .map(|p| Past {
                    placement: p.placement.clone(),
                    ended: p.ended,
                }),
        );
        let mut addrs = self.addrs.clone();
        // Forget addresses no placement mentions any more.
        addrs.retain(|id, _| {
            members.iter().any(|m| &m.id == id)
                || past
                    .iter()
                    .any(|p| p.placement.nodes().iter().any(|n| &n.id == id))
        });
        let mut r = Routes {
            current: None,
            members: Vec::new(),
            addrs,
            past,
            replicas,
            default_replicas: self.default_replicas,
            grace: self.grace,
        };
        r.set_members(members);
        r
    }

    /// The current members.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Address of node `id` (current or from a placement still in grace).
    pub fn addr(&self, id: &str) -> Option<&str> {
        self.addrs.get(id).map(String::as_str)
    }

    /// Replication factor of `model_id` (capped by the node count).
    pub fn replicas(&self, model_id: &str) -> usize {
        let r = self
            .replicas
            .get(model_id)
            .copied()
            .unwrap_or(self.default_replicas);
        (r as usize).clamp(1, self.members.len().max(1))
    }

    /// The key's current owners, best first (empty when there are no nodes).
    pub fn owners(&self, key: &ChunkKey, model_id: &str) -> Vec<&str> {
        let Some(p) = &self.current else {
            return Vec::new();
        };
        let r = self.replicas(model_id);
        p.owners(key, r)
            .into_iter()
            .map(|i| p.nodes()[i].id.as_str())
            .collect()
    }

    /// Where to look for `key`: its current owners (rotated by `prefer`, so
    /// that readers spread over replicas), then its owners under each
    /// placement still in grace at `now`, newest first, each node once.
    pub fn candidates(&self, key: &ChunkKey, model_id: &str, prefer: usize, now: Instant) -> Vec<&str> {
        let mut out = self.owners(key, model_id);
        if !out.is_empty() {
            let k = prefer % out.len();
            out.rotate_left(k);
        }
        let r = self.replicas(model_id);
        for p in self
            .past
            .iter()
            .filter(|p| now.duration_since(p.ended) < self.grace)
        {
            for i in p.placement.owners(key, r) {
                let id = p.placement.nodes()[i].id.as_str();
                if !out.contains(&id) {
                    out.push(id);
                }
            }
        }
        out
    }

    /// Placements kept for fallback reads at `now`.
    pub fn history(&self, now: Instant) -> usize {
        self.past
            .iter()
            .filter(|p| now.duration_since(p.ended) < self.grace)
            .count()
    }

    /// Every key's expected share per current node (weights normalised).
    pub fn shares(&self) -> Vec<(String, f64)> {
        let total: f64 = self.members.iter().map(|m| m.weight).sum();
        self.members
            .iter()
            .map(|m| (m.id.clone(), if total > 0.0 { m.weight / total } else { 0.0 }))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvault_proto::NamespaceId;

    fn key(i: u32) -> ChunkKey {
        ChunkKey::derive(&NamespaceId([3; 32]), None, &[i])
    }

    fn members(ids: &[&str]) -> Vec<Member> {
        ids.iter()
            .map(|id| Member {
                id: id.to_string(),
                addr: format!("http://{id}"),
                weight: 1.0,
            })
            .collect()
    }

    #[test]
    fn a_moved_key_is_looked_for_at_its_previous_owner_during_grace() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let a = Routes::new(members(&["a", "b"]), BTreeMap::new(), 1, grace);
        let b = a.next(members(&["a", "b", "c"]), BTreeMap::new(), t0);
        let mut moved = 0;
        for i in 0..500 {
            let k = key(i);
            let before = a.owners(&k, "m")[0];
            let now = b.owners(&k, "m")[0];
            let c = b.candidates(&k, "m", 0, t0);
            assert_eq!(c[0], now);
            if before != now {
                moved += 1;
                assert_eq!(now, "c", "a join only moves keys to the new node");
                assert_eq!(c, vec!["c", before]);
                // After the grace period only the current owner is asked.
                assert_eq!(b.candidates(&k, "m", 0, t0 + grace), vec!["c"]);
            } else {
                assert_eq!(c, vec![now]);
            }
        }
        assert!(
            (100..240).contains(&moved),
            "{moved} of 500 keys moved to a third node"
        );
        assert_eq!(b.addr("a"), Some("http://a"));
    }

    #[test]
    fn replicas_are_distinct_nodes_and_capped() {
        let mut rep = BTreeMap::new();
        rep.insert("hot".to_string(), 2);
        rep.insert("huge".to_string(), 9);
        let r = Routes::new(members(&["a", "b", "c"]), rep, 1, Duration::from_secs(1));
        for i in 0..100 {
            let k = key(i);
            let o = r.owners(&k, "hot");
            assert_eq!(o.len(), 2);
            assert_ne!(o[0], o[1]);
            assert_eq!(
                o[0],
                r.owners(&k, "cold")[0],
                "the first replica is the single owner"
            );
            assert_eq!(r.owners(&k, "huge").len(), 3);
            let c = r.candidates(&k, "hot", 1, Instant::now());
            assert_eq!(c, vec![o[1], o[0]], "prefer rotates the replicas");
        }
    }

    #[test]
    fn no_nodes_route_nothing_and_left_nodes_stay_reachable_in_grace() {
        let t0 = Instant::now();
        let r = Routes::new(Vec::new(), BTreeMap::new(), 1, Duration::from_secs(5));
        assert!(r.owners(&key(1), "m").is_empty());
        let r2 = r.next(members(&["a"]), BTreeMap::new(), t0);
        let r3 = r2.next(Vec::new(), BTreeMap::new(), t0);
        assert!(r3.owners(&key(1), "m").is_empty());
        assert_eq!(r3.candidates(&key(1), "m", 0, t0), vec!["a"]);
        assert_eq!(r3.addr("a"), Some("http://a"));
        assert!(r3.same(&[], &BTreeMap::new()));
        assert!(!r3.same(&members(&["a"]), &BTreeMap::new()));
    }
}
