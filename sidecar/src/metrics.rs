//! Prometheus metrics of the sidecar: local cache hits and misses, lookups
//! answered from local knowledge, shared-region slots and leases, request
//! latency. The upstream cluster handle registers its own here
//! (`kvault_sidecar_upstream_*`: calls by node and outcome, breakers, the
//! node set and whether etcd is current).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use kvault_server::metrics::TierCounters;
use kvault_server::tier::TierStats;

use crate::region::RegionStats;

/// Every sidecar metric and the registry it is exported from.
pub struct Metrics {
    registry: Registry,
    /// Local RAM cache counters (handed to the server's RAM tier code).
    pub local: TierCounters,
    /// Lookups answered from local knowledge because upstream was slow or down.
    pub lookup_degraded: IntCounter,
    /// Chunks fetched from upstream into the local cache.
    pub fetched_chunks: IntCounter,
    /// Chunk bytes fetched from upstream.
    pub fetched_bytes: IntCounter,
    /// Chunks asked for whose upstream was down or slow (answered as misses).
    pub upstream_misses: IntCounter,
    /// Prefetched chunks by outcome (local, fetched, missing).
    pub prefetch: IntCounterVec,
    /// Decoded bytes written into the shared region.
    pub shm_bytes: IntCounter,
    /// Leases that ran out of time.
    pub leases_expired: IntCounter,
    /// GetInto calls answered from a decoded run already in the region.
    pub shm_run_hits: IntCounter,
    requests: IntCounterVec,
    latency: HistogramVec,
    local_bytes: IntGauge,
    local_chunks: IntGauge,
    region_slots: IntGauge,
    region_free: IntGauge,
    region_leases: IntGauge,
    region_runs: IntGauge,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Names and labels are constants of this file: a failure is a
    // programming error caught by the first test run.
    r.expect("static metric definition")
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("kvault_sidecar".into()), None).expect("static prefix");
        let counter = |name: &str, help: &str| {
            let c = must(IntCounter::new(name, help));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let latency = must(HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Request latency by method")
                .buckets(prometheus::exponential_buckets(10e-6, 2.0, 20).expect("static buckets")),
            &["method"],
        ));
        must(registry.register(Box::new(latency.clone())));
        Metrics {
            local: TierCounters {
                hits: counter("local_hits_total", "Chunk reads answered by the local RAM cache"),
                misses: counter(
                    "local_misses_total",
                    "Chunk reads the local RAM cache could not answer",
                ),
                evictions: counter("local_evictions_total", "Chunks evicted from the local RAM cache"),
            },
            lookup_degraded: counter(
                "lookup_degraded_total",
                "Lookups answered from local knowledge because upstream was slow or down",
            ),
            fetched_chunks: counter("fetched_chunks_total", "Chunks fetched from upstream"),
            fetched_bytes: counter("fetched_bytes_total", "Chunk bytes fetched from upstream"),
            upstream_misses: counter(
                "upstream_misses_total",
                "Chunks not fetched because their upstream was down or slow",
            ),
            prefetch: counter_vec(
                "prefetch_chunks_total",
                "Prefetched chunks by outcome (local, fetched, missing)",
                &["outcome"],
            ),
            shm_bytes: counter("shm_bytes_total", "Decoded bytes written into the shared region"),
            leases_expired: counter("leases_expired_total", "Leases that ran out of time"),
            shm_run_hits: counter(
                "shm_run_hits_total",
                "GetInto calls answered from decoded chunks already in the region (no fetch, no decode)",
            ),
            requests: counter_vec(
                "requests_total",
                "Requests by method and status code",
                &["method", "code"],
            ),
            latency,
            local_bytes: gauge("local_bytes", "Bytes held by the local RAM cache"),
            local_chunks: gauge("local_chunks", "Chunks held by the local RAM cache"),
            region_slots: gauge("region_slots", "Slots of the shared region"),
            region_free: gauge("region_free_slots", "Slots of the shared region not leased"),
            region_leases: gauge("region_leases", "Live leases of the shared region"),
            region_runs: gauge("region_runs", "Decoded runs kept in the shared region for reuse"),
            registry,
        }
    }

    /// The registry (the upstream cluster handle registers its metrics here).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Records one request's outcome and latency.
    pub fn request(&self, method: &str, code: tonic::Code, secs: f64) {
        self.requests
            .with_label_values(&[method, &format!("{code:?}")])
            .inc();
        self.latency.with_label_values(&[method]).observe(secs);
    }

    /// Renders the text exposition, refreshing gauges first.
    pub fn render(&self, local: TierStats, region: Option<RegionStats>) -> String {
        self.local_bytes.set(local.bytes as i64);
        self.local_chunks.set(local.chunks as i64);
        if let Some(r) = region {
            self.region_slots.set(r.slots as i64);
            self.region_free.set(r.free_slots as i64);
            self.region_leases.set(r.leases as i64);
            self.region_runs.set(r.runs as i64);
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
