//! Prometheus metrics of a cluster handle: node calls by outcome, breakers,
//! the node set and whether it is current, fallback reads and copies.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Every metric of one [`super::Cluster`]. Names are `STEM_...` in the
/// registry given (the sidecar uses stem `upstream` in its registry; a
/// standalone client `kvault_cluster`).
pub struct ClusterMetrics {
    /// Calls by node, operation and outcome (ok, refused, unavailable, timeout, breaker_open).
    pub calls: IntCounterVec,
    /// Breaker position per node (0 closed, 1 open, 2 half-open).
    pub breaker_state: IntGaugeVec,
    /// Times a breaker opened, per node.
    pub breaker_opened: IntCounterVec,
    /// Nodes in the current node set.
    pub nodes: IntGauge,
    /// 1 while the membership source (etcd) cannot be read and the last
    /// known node set is in use.
    pub membership_stale: IntGauge,
    /// Times the node set (or a node's ramped weight) changed.
    pub membership_changes: IntCounter,
    /// Failed reads of the membership source.
    pub membership_errors: IntCounter,
    /// Reads that went past the first candidate, by outcome (hit, miss).
    pub fallback_reads: IntCounterVec,
    /// Chunks copied forward to their current owner, by outcome (copied, dropped, failed).
    pub copy_forward: IntCounterVec,
    /// Bytes copied forward.
    pub copy_forward_bytes: IntCounter,
    /// Writes a node could not take (down), counted per chunk and node.
    pub writes_unavailable: IntCounter,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Names and labels are constants of this file (plus a stem the caller
    // chose once): a failure is a programming error seen on the first run.
    r.expect("static metric definition")
}

impl ClusterMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry, stem: &str) -> ClusterMetrics {
        let n = |s: &str| format!("{stem}_{s}");
        let counter = |name: &str, help: &str| {
            let c = must(IntCounter::new(n(name), help));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(n(name), help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(n(name), help));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let breaker_state = must(IntGaugeVec::new(
            Opts::new(
                n("breaker_state"),
                "Circuit breaker per node: 0 closed, 1 open, 2 half-open",
            ),
            &["node"],
        ));
        must(registry.register(Box::new(breaker_state.clone())));
        ClusterMetrics {
            calls: counter_vec(
                "calls_total",
                "Node calls by node, operation and outcome",
                &["node", "op", "outcome"],
            ),
            breaker_state,
            breaker_opened: counter_vec("breaker_opened_total", "Times a node's breaker opened", &["node"]),
            nodes: gauge("nodes", "Nodes in the current node set"),
            membership_stale: gauge(
                "membership_stale",
                "1 while etcd cannot be read and the last known node set is used",
            ),
            membership_changes: counter(
                "membership_changes_total",
                "Changes of the node set or of a ramping node's weight",
            ),
            membership_errors: counter(
                "membership_errors_total",
                "Failed reads of the membership source (etcd)",
            ),
            fallback_reads: counter_vec(
                "fallback_reads_total",
                "Reads that went past the first candidate node, by outcome",
                &["outcome"],
            ),
            copy_forward: counter_vec(
                "copy_forward_total",
                "Chunks copied to their current owner after a fallback read, by outcome",
                &["outcome"],
            ),
            copy_forward_bytes: counter("copy_forward_bytes_total", "Bytes copied forward"),
            writes_unavailable: counter(
                "writes_unavailable_total",
                "Chunk writes a down owner could not take (the chunk stays uncached there)",
            ),
        }
    }
}
