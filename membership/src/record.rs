//! The node record each server keeps in etcd, and where records live.

use serde::{Deserialize, Serialize};

use crate::{MembershipError, Result};

/// One server as the cluster sees it. Stored as JSON under
/// `PREFIX/nodes/ID` while the server's lease lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Stable identity and placement hash input (the advertised URL by
    /// default): every client places keys on `id`, so renaming moves keys.
    pub id: String,
    /// gRPC URL clients connect to (`http://host:port`).
    pub addr: String,
    /// Capacity weight (the server's RAM + NVMe budget in bytes).
    pub weight: f64,
    /// When this server process first registered (Unix ms, the server's
    /// clock). Kept across re-registrations after an etcd outage, so only a
    /// restarted process ramps up again.
    pub registered_unix_ms: u64,
    /// Over how long after `registered_unix_ms` the node's weight ramps from
    /// nothing to `weight` (0: at once). Chosen by the server and carried
    /// in the record, so every client ramps it the same way.
    pub ramp_ms: u64,
}

impl NodeRecord {
    /// Checks what a peer could get wrong: an empty id, a weight that is
    /// not finite and positive, an address that is not an http(s) URL.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() || self.id.len() > 1024 {
            return Err("id must be 1..=1024 bytes".into());
        }
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return Err(format!("weight {} must be finite and > 0", self.weight));
        }
        let rest = self
            .addr
            .strip_prefix("http://")
            .or_else(|| self.addr.strip_prefix("https://"));
        match rest {
            Some(r) if !r.is_empty() => Ok(()),
            _ => Err(format!("addr {:?} is not an http(s) URL", self.addr)),
        }
    }

    /// The record as etcd stores it.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and numbers always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and validates a stored record.
    pub fn from_json(key: &str, value: &[u8]) -> Result<NodeRecord> {
        let bad = |reason: String| MembershipError::BadRecord {
            key: key.to_string(),
            reason,
        };
        let r: NodeRecord = serde_json::from_slice(value).map_err(|e| bad(e.to_string()))?;
        r.validate().map_err(bad)?;
        Ok(r)
    }

    /// The fraction of its weight the node carries at `now_unix_ms`, rounded
    /// down to a multiple of `1 / steps` (at least one step): placement
    /// changes in a few steps rather than continuously, and keys only ever
    /// move *to* a ramping node as its weight grows.
    pub fn ramp_fraction(&self, now_unix_ms: u64, steps: u32) -> f64 {
        if self.ramp_ms == 0 {
            return 1.0;
        }
        let age = now_unix_ms.saturating_sub(self.registered_unix_ms);
        if age >= self.ramp_ms {
            return 1.0;
        }
        let steps = steps.max(1) as u64;
        let done = (age as u128 * steps as u128 / self.ramp_ms as u128) as u64;
        (done + 1).min(steps) as f64 / steps as f64
    }

    /// Unix ms at which the ramp next changes the node's weight, if it does.
    pub fn next_ramp_change(&self, now_unix_ms: u64, steps: u32) -> Option<u64> {
        if self.ramp_ms == 0 {
            return None;
        }
        let age = now_unix_ms.saturating_sub(self.registered_unix_ms);
        if age >= self.ramp_ms {
            return None;
        }
        let steps = steps.max(1) as u64;
        let done = age as u128 * steps as u128 / self.ramp_ms as u128;
        let next = (done + 1) * self.ramp_ms as u128 / steps as u128;
        Some(self.registered_unix_ms + next as u64)
    }
}

/// Where a cluster's records live: `PREFIX/nodes/ID` and
/// `PREFIX/replicas/MODEL_ID` (a decimal replication factor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (a trailing `/` is dropped; empty means `/kvault`).
    pub fn new(prefix: &str) -> Keys {
        let p = prefix.trim_end_matches('/');
        Keys {
            prefix: if p.is_empty() { "/kvault".into() } else { p.into() },
        }
    }

    /// The whole cluster's prefix (ends in `/`).
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// Prefix of the node records.
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// Key of one node's record.
    pub fn node(&self, id: &str) -> String {
        format!("{}{id}", self.nodes())
    }

    /// Prefix of the replication factors.
    pub fn replicas(&self) -> String {
        format!("{}/replicas/", self.prefix)
    }

    /// Key of one model id's replication factor.
    pub fn replica(&self, model_id: &str) -> String {
        format!("{}{model_id}", self.replicas())
    }
}

/// Largest replication factor a record may ask for.
pub const MAX_REPLICAS: u32 = 16;

/// Parses a stored replication factor (`1..=MAX_REPLICAS`).
pub fn parse_replicas(key: &str, value: &[u8]) -> Result<u32> {
    let bad = |reason: String| MembershipError::BadRecord {
        key: key.to_string(),
        reason,
    };
    let s = std::str::from_utf8(value).map_err(|_| bad("not UTF-8".into()))?;
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| bad(format!("{s:?} is not a number")))?;
    if n == 0 || n > MAX_REPLICAS {
        return Err(bad(format!("replicas {n} outside 1..={MAX_REPLICAS}")));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ramp_ms: u64) -> NodeRecord {
        NodeRecord {
            id: "http://10.0.0.1:7070".into(),
            addr: "http://10.0.0.1:7070".into(),
            weight: 8.0e9,
            registered_unix_ms: 1_000_000,
            ramp_ms,
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let r = rec(30_000);
        assert_eq!(NodeRecord::from_json("k", &r.to_json()).unwrap(), r);
        for bad in [
            &b"not json"[..],
            br#"{"id":"","addr":"http://a:1","weight":1,"registered_unix_ms":0,"ramp_ms":0}"#,
            br#"{"id":"a","addr":"ftp://a","weight":1,"registered_unix_ms":0,"ramp_ms":0}"#,
            br#"{"id":"a","addr":"http://a:1","weight":0,"registered_unix_ms":0,"ramp_ms":0}"#,
            br#"{"id":"a","addr":"http://a:1","weight":-3,"registered_unix_ms":0,"ramp_ms":0}"#,
            br#"{"id":"a","addr":"http://a:1"}"#,
        ] {
            let e = NodeRecord::from_json("/kvault/nodes/a", bad).unwrap_err();
            assert!(matches!(e, MembershipError::BadRecord { .. }), "{e}");
        }
    }

    #[test]
    fn ramp_rises_in_steps_and_ends_at_full_weight() {
        let r = rec(8_000);
        let t0 = r.registered_unix_ms;
        assert_eq!(r.ramp_fraction(t0, 8), 1.0 / 8.0);
        assert_eq!(r.ramp_fraction(t0 + 999, 8), 1.0 / 8.0);
        assert_eq!(r.ramp_fraction(t0 + 1000, 8), 2.0 / 8.0);
        assert_eq!(r.ramp_fraction(t0 + 7999, 8), 1.0);
        assert_eq!(r.ramp_fraction(t0 + 9000, 8), 1.0);
        // A clock behind the server's reads as age 0, not as a panic.
        assert_eq!(r.ramp_fraction(t0 - 5, 8), 1.0 / 8.0);
        assert_eq!(r.next_ramp_change(t0 + 10, 8), Some(t0 + 1000));
        assert_eq!(r.next_ramp_change(t0 + 7500, 8), Some(t0 + 8000));
        assert_eq!(r.next_ramp_change(t0 + 8000, 8), None);
        assert_eq!(rec(0).ramp_fraction(0, 8), 1.0);
        assert_eq!(rec(0).next_ramp_change(0, 8), None);
    }

    #[test]
    fn key_layout() {
        let k = Keys::new("/prod/kv/");
        assert_eq!(k.node("http://a:1"), "/prod/kv/nodes/http://a:1");
        assert_eq!(k.replica("m"), "/prod/kv/replicas/m");
        assert_eq!(Keys::new("").root(), "/kvault/");
        assert_eq!(parse_replicas("k", b"3").unwrap(), 3);
        assert!(parse_replicas("k", b"0").is_err());
        assert!(parse_replicas("k", b"99").is_err());
        assert!(parse_replicas("k", b"x").is_err());
    }
}
