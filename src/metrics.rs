//! Prometheus metrics: one registry per process, served as text by the admin listener at
//! `/metrics`. Names follow Prometheus conventions (`_total` counters, `_seconds` histograms).
//! Label values are bounded: routes are configured names (`-` for none), methods outside the
//! standard set are `OTHER`.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// `cachegate_requests_total{route, method, status}`
    pub requests: IntCounterVec,
    /// `cachegate_request_duration_seconds{route}`: first byte in to last byte out.
    pub request_duration: HistogramVec,
    /// `cachegate_upstream_duration_seconds{route}`: upstream chosen to its response header.
    pub upstream_duration: HistogramVec,
    /// `cachegate_upstream_errors_total{kind}`: connect refused, timeouts, broken responses...
    pub upstream_errors: IntCounterVec,
    /// `cachegate_auth_failures_total{reason}`
    pub auth_failures: IntCounterVec,
    /// `cachegate_cache_results_total{route, result, tier}`: hit, miss or bypass.
    pub cache_results: IntCounterVec,
    /// `cachegate_cache_memory_entries` and `_bytes`: the in-process tier, read at scrape time.
    pub cache_memory_entries: IntGauge,
    pub cache_memory_bytes: IntGauge,
    /// `cachegate_cache_memory_evictions_total`: entries pushed out for room.
    pub cache_memory_evictions: prometheus::IntCounter,
    /// `cachegate_purges_total{outcome}`: ok, unacknowledged, local, store_error, resubscribed.
    pub purges: IntCounterVec,
    /// `cachegate_rate_limit_decisions_total{route, outcome, decided_by}`
    pub rate_limit_decisions: IntCounterVec,
    /// `cachegate_store_operations_total{op, result}`
    pub store_operations: IntCounterVec,
    /// `cachegate_store_operation_duration_seconds{op}`
    pub store_duration: HistogramVec,
    /// `cachegate_store_circuit_open`: 1 while failures keep the store bypassed.
    pub store_circuit_open: IntGauge,
    /// `cachegate_coherent`: 1 while this instance knows it has heard every purge (with a
    /// shared store), so it serves its in-process entries without asking Redis.
    pub coherent: IntGauge,
    /// `cachegate_incoherent_seconds_total`: time spent not coherent.
    pub incoherent_seconds: prometheus::Counter,
    /// `cachegate_write_hold_seconds`: how long writes waited for their purge to be confirmed
    /// by every live instance (or for their leases to run out).
    pub write_hold: Histogram,
    /// `cachegate_config_reloads_total{result}`
    pub config_reloads: IntCounterVec,
    /// `cachegate_build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let store_circuit_open = IntGauge::new(
            "cachegate_store_circuit_open",
            "1 while repeated store failures keep the store bypassed",
        )
        .expect("valid metric");
        registry
            .register(Box::new(store_circuit_open.clone()))
            .expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let cache_memory_entries = gauge(
            "cachegate_cache_memory_entries",
            "Entries in the in-process cache tier",
        );
        let cache_memory_bytes = gauge(
            "cachegate_cache_memory_bytes",
            "Bytes in the in-process cache tier",
        );
        let cache_memory_evictions = prometheus::IntCounter::new(
            "cachegate_cache_memory_evictions_total",
            "Entries evicted from the in-process cache tier for room",
        )
        .expect("valid metric");
        registry
            .register(Box::new(cache_memory_evictions.clone()))
            .expect("unique metric");
        let coherent = gauge(
            "cachegate_coherent",
            "1 while this instance has heard every purge (with a shared store)",
        );
        let incoherent_seconds = prometheus::Counter::new(
            "cachegate_incoherent_seconds_total",
            "Time this instance was not sure to have heard every purge",
        )
        .expect("valid metric");
        registry
            .register(Box::new(incoherent_seconds.clone()))
            .expect("unique metric");
        let write_hold = Histogram::with_opts(
            HistogramOpts::new(
                "cachegate_write_hold_seconds",
                "Time writes waited for their purge to reach every live instance",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        registry
            .register(Box::new(write_hold.clone()))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new("cachegate_build_info", "Build information"),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Metrics {
            requests: counter(
                &registry,
                "cachegate_requests_total",
                "Requests answered",
                &["route", "method", "status"],
            ),
            request_duration: histogram(
                &registry,
                "cachegate_request_duration_seconds",
                "Time from request start to response end",
                &["route"],
                LATENCY_BUCKETS,
            ),
            upstream_duration: histogram(
                &registry,
                "cachegate_upstream_duration_seconds",
                "Time from choosing an origin to its response header",
                &["route"],
                LATENCY_BUCKETS,
            ),
            upstream_errors: counter(
                &registry,
                "cachegate_upstream_errors_total",
                "Upstream failures by kind",
                &["kind"],
            ),
            auth_failures: counter(
                &registry,
                "cachegate_auth_failures_total",
                "Refused authentications by reason",
                &["reason"],
            ),
            cache_results: counter(
                &registry,
                "cachegate_cache_results_total",
                "Cache lookups by result and tier",
                &["route", "result", "tier"],
            ),
            purges: counter(
                &registry,
                "cachegate_purges_total",
                "Purges by outcome",
                &["outcome"],
            ),
            rate_limit_decisions: counter(
                &registry,
                "cachegate_rate_limit_decisions_total",
                "Rate-limit decisions",
                &["route", "outcome", "decided_by"],
            ),
            store_operations: counter(
                &registry,
                "cachegate_store_operations_total",
                "Store calls by result",
                &["op", "result"],
            ),
            store_duration: histogram(
                &registry,
                "cachegate_store_operation_duration_seconds",
                "Store call latency",
                &["op"],
                STORE_BUCKETS,
            ),
            store_circuit_open,
            coherent,
            incoherent_seconds,
            write_hold,
            cache_memory_entries,
            cache_memory_bytes,
            cache_memory_evictions,
            config_reloads: counter(
                &registry,
                "cachegate_config_reloads_total",
                "Configuration reloads by result",
                &["result"],
            ),
            build_info,
            registry,
        }
    }

    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("encoding metrics to memory");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// One route's per-request metrics, each resolved on first use and then kept: a request
/// increments them without hashing label values (`with_label_values` per request was about 1% of
/// a hit). Rebuilt with the route table on reload; the underlying series are the registry's, so
/// counts carry on.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    route: String,
    request_duration: OnceLock<Histogram>,
    upstream_duration: OnceLock<Histogram>,
    get_ok: OnceLock<IntCounter>,
    head_ok: OnceLock<IntCounter>,
    memory_hits: OnceLock<IntCounter>,
}

impl RouteMetrics {
    /// The metrics of the route named `route` (`-` for requests no route matched).
    pub fn new(route: &str) -> RouteMetrics {
        RouteMetrics {
            route: route.to_owned(),
            ..RouteMetrics::default()
        }
    }

    /// Counts an answered request and its duration.
    pub fn request(&self, method: &http::Method, status: u16, duration: Duration) {
        let m = metrics();
        let route = self.route.as_str();
        let counter = match (method, status) {
            (&http::Method::GET, 200) => Some(&self.get_ok),
            (&http::Method::HEAD, 200) => Some(&self.head_ok),
            _ => None,
        };
        match counter {
            Some(cell) => cell
                .get_or_init(|| {
                    m.requests
                        .with_label_values(&[route, method_label(method), "200"])
                })
                .inc(),
            None => {
                let status = status.min(999).to_string();
                m.requests
                    .with_label_values(&[route, method_label(method), &status])
                    .inc();
            }
        }
        self.request_duration
            .get_or_init(|| m.request_duration.with_label_values(&[route]))
            .observe(duration.as_secs_f64());
    }

    pub fn upstream(&self, duration: Duration) {
        self.upstream_duration
            .get_or_init(|| {
                metrics()
                    .upstream_duration
                    .with_label_values(&[&self.route])
            })
            .observe(duration.as_secs_f64());
    }

    /// Counts a hit in the in-process tier: the hot path, its counter looked up once.
    pub fn memory_hit(&self) {
        self.memory_hits
            .get_or_init(|| {
                metrics()
                    .cache_results
                    .with_label_values(&[&self.route, "hit", "memory"])
            })
            .inc();
    }

    /// Counts a cache result (`hit`, `miss`, ...) in `tier` (see [`Self::memory_hit`]).
    pub fn cache_result(&self, result: &str, tier: &str) {
        metrics()
            .cache_results
            .with_label_values(&[&self.route, result, tier])
            .inc();
    }
}

/// A method as a bounded label value.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}
