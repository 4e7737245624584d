//! Prometheus metrics: per-tier hits, misses, evictions, bytes and chunks,
//! request counts and latency histograms, put outcomes.
//!
//! Tier counters live here and are handed to each tier ([`TierCounters`]), so
//! `Stat` and `/metrics` read the same numbers. Gauges (bytes, chunks) are
//! refreshed from the tiers at scrape time.

use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::tier::{TierKind, TierStats};

/// Counters owned by one tier.
#[derive(Clone)]
pub struct TierCounters {
    /// Reads answered by the tier.
    pub hits: IntCounter,
    /// Reads the tier could not answer.
    pub misses: IntCounter,
    /// Chunks dropped to stay in budget.
    pub evictions: IntCounter,
}

/// All server metrics and the registry they are exported from.
pub struct Metrics {
    registry: Registry,
    hits: IntCounterVec,
    misses: IntCounterVec,
    evictions: IntCounterVec,
    tier_bytes: IntGaugeVec,
    tier_capacity: IntGaugeVec,
    tier_chunks: IntGaugeVec,
    requests: IntCounterVec,
    latency: HistogramVec,
    /// Body bytes accepted by Put.
    pub put_bytes: IntCounter,
    /// Body bytes sent by Get.
    pub get_bytes: IntCounter,
    /// Puts that found the key already stored.
    pub put_noops: IntCounter,
    /// Puts refused, by reason.
    pub put_rejected: IntCounterVec,
    /// NVMe records dropped because they failed their checks (torn, truncated, corrupted).
    pub nvme_corrupt: IntCounter,
    /// Bytes the NVMe compactor copied forward.
    pub nvme_compacted_bytes: IntCounter,
    tier_segments: IntGaugeVec,
    tier_live: IntGaugeVec,
    /// Attention sessions opened.
    pub attend_opens: IntCounter,
    /// Attention sessions dropped after idling.
    pub attend_expired: IntCounter,
    /// Attention queries answered.
    pub attend_queries: IntCounter,
    /// Bytes of KV the attention workers read.
    pub attend_kv_bytes: IntCounter,
    /// Attention opens and queries refused, by kind and code.
    pub attend_errors: IntCounterVec,
    /// Open attention sessions.
    pub attend_sessions: IntGauge,
    /// Memory held by attention sessions.
    pub attend_session_bytes: IntGauge,
    /// Time to answer one attention step.
    pub attend_step_seconds: Histogram,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric names and labels are constants of this file: a failure here is a
    // programming error caught by the first test run, not a runtime condition.
    r.expect("static metric definition")
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("kvault".into()), None).expect("static prefix");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), &["tier"]));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let hits = counter("tier_hits_total", "Reads answered by a tier", &["tier"]);
        let misses = counter("tier_misses_total", "Reads a tier could not answer", &["tier"]);
        let evictions = counter(
            "tier_evictions_total",
            "Chunks evicted to stay in budget",
            &["tier"],
        );
        let requests = counter(
            "requests_total",
            "gRPC requests by method and status code",
            &["method", "code"],
        );
        let put_rejected = counter("put_rejected_total", "Puts refused, by reason", &["reason"]);
        let latency = must(HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "gRPC request latency by method")
                .buckets(prometheus::exponential_buckets(50e-6, 2.0, 18).expect("static buckets")),
            &["method"],
        ));
        must(registry.register(Box::new(latency.clone())));
        let single = |name: &str, help: &str| {
            let c = must(IntCounter::new(name, help));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let attend_errors = counter(
            "attend_errors_total",
            "Attention opens and queries refused, by kind and code",
            &["kind", "code"],
        );
        let int_gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let attend_step_seconds = must(Histogram::with_opts(
            HistogramOpts::new("attend_step_seconds", "Time to answer one attention step")
                .buckets(prometheus::exponential_buckets(20e-6, 2.0, 18).expect("static buckets")),
        ));
        must(registry.register(Box::new(attend_step_seconds.clone())));
        Metrics {
            attend_opens: single("attend_opens_total", "Attention sessions opened"),
            attend_expired: single("attend_expired_total", "Attention sessions dropped after idling"),
            attend_queries: single("attend_queries_total", "Attention queries answered"),
            attend_kv_bytes: single("attend_kv_bytes_total", "Bytes of KV read by attention workers"),
            attend_errors,
            attend_sessions: int_gauge("attend_sessions", "Open attention sessions"),
            attend_session_bytes: int_gauge("attend_session_bytes", "Memory held by attention sessions"),
            attend_step_seconds,
            hits,
            misses,
            evictions,
            tier_bytes: gauge("tier_bytes", "Bytes held by a tier"),
            tier_capacity: gauge("tier_capacity_bytes", "Byte budget of a tier"),
            tier_chunks: gauge("tier_chunks", "Chunks held by a tier"),
            requests,
            latency,
            put_bytes: single("put_bytes_total", "Chunk bytes accepted by Put"),
            get_bytes: single("get_bytes_total", "Chunk bytes sent by Get"),
            put_noops: single("put_noops_total", "Puts of keys already stored"),
            put_rejected,
            nvme_corrupt: single(
                "nvme_corrupt_total",
                "NVMe records dropped after failing their checksum or header checks",
            ),
            nvme_compacted_bytes: single(
                "nvme_compacted_bytes_total",
                "Bytes copied forward by the NVMe compactor",
            ),
            tier_segments: gauge("tier_segments", "Segment files of a tier"),
            tier_live: gauge(
                "tier_live_bytes",
                "Bytes of live chunks in a tier (the rest is reclaimable)",
            ),
            registry,
        }
    }

    /// The counters a tier updates.
    pub fn tier_counters(&self, kind: TierKind) -> TierCounters {
        let l = [kind.name()];
        TierCounters {
            hits: self.hits.with_label_values(&l),
            misses: self.misses.with_label_values(&l),
            evictions: self.evictions.with_label_values(&l),
        }
    }

    /// Starts timing a request; the guard records count and latency when dropped.
    pub fn request(&self, method: &'static str) -> RequestTimer<'_> {
        RequestTimer {
            metrics: self,
            method,
            start: Instant::now(),
            code: "unknown",
        }
    }

    /// Renders the text exposition, refreshing tier gauges first.
    pub fn render(&self, tiers: &[(TierKind, TierStats)]) -> String {
        for (kind, s) in tiers {
            let l = [kind.name()];
            self.tier_bytes.with_label_values(&l).set(s.bytes as i64);
            self.tier_capacity
                .with_label_values(&l)
                .set(s.capacity_bytes as i64);
            self.tier_chunks.with_label_values(&l).set(s.chunks as i64);
            self.tier_segments.with_label_values(&l).set(s.segments as i64);
            self.tier_live.with_label_values(&l).set(s.live_bytes as i64);
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

/// Records one request's outcome and latency on drop.
pub struct RequestTimer<'a> {
    metrics: &'a Metrics,
    method: &'static str,
    start: Instant,
    code: &'static str,
}

impl RequestTimer<'_> {
    /// Notes the outcome of the request from its result.
    pub fn finish<T>(&mut self, r: &Result<T, tonic::Status>) {
        self.code = match r {
            Ok(_) => "ok",
            Err(s) => code_name(s.code()),
        };
    }
}

impl Drop for RequestTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .requests
            .with_label_values(&[self.method, self.code])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[self.method])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "ok",
        Cancelled => "cancelled",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
        Unknown => "unknown",
    }
}
