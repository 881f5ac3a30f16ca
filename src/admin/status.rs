//! The status page: `GET /` on the admin listener serves one self-contained HTML page (no
//! external scripts, styles or fonts: it works offline and under a strict CSP), which polls
//! `GET /status.json` every two seconds and draws requests/s and the hit ratio from the
//! differences between polls. The JSON is read from the same counters `/metrics` exports, so
//! the page and Prometheus never disagree.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use prometheus::proto::Metric;
use serde_json::{json, Value};

use crate::cache::Cache;
use crate::metrics::metrics;
use crate::purge::Purger;
use crate::store::Store;

const PAGE: &str = include_str!("status.html");

/// The page, told whether its data needs the admin token (so it asks before polling).
pub fn page(token_required: bool) -> Vec<u8> {
    PAGE.replacen(
        "data-token-required=\"TOKEN_REQUIRED\"",
        &format!("data-token-required=\"{token_required}\""),
        1,
    )
    .into_bytes()
}

/// Per-route counters, summed over the label sets of each metric.
#[derive(Default)]
struct RouteCounts {
    requests: u64,
    by_class: [u64; 5],
    limited: u64,
    auth_failures: u64,
    cache_hits: u64,
    cache_lookups: u64,
    upstream: Option<(f64, f64)>,
}

fn label<'a>(metric: &'a Metric, name: &str) -> &'a str {
    metric
        .get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

/// The `q` quantile of a cumulative histogram (Prometheus's `histogram_quantile`: linear within
/// the bucket), in milliseconds; `None` with no observations.
fn quantile_ms(metric: &Metric, q: f64) -> Option<f64> {
    let histogram = metric.get_histogram();
    let total = histogram.get_sample_count();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for bucket in histogram.get_bucket() {
        let (upper, count) = (bucket.upper_bound(), bucket.cumulative_count());
        if count as f64 >= rank {
            let within = (count - below).max(1) as f64;
            return Some((lower + (upper - lower) * (rank - below as f64) / within) * 1000.0);
        }
        (lower, below) = (upper, count);
    }
    // Above the last bucket: its bound is what is known.
    Some(lower * 1000.0)
}

/// What `/status.json` answers.
pub fn snapshot(cache: &Cache, store: &dyn Store, purger: &Purger, started: Instant) -> Value {
    let m = metrics();
    let mut routes: BTreeMap<String, RouteCounts> = BTreeMap::new();
    for family in m.requests.collect() {
        for metric in family.get_metric() {
            let counts = routes.entry(label(metric, "route").to_owned()).or_default();
            let n = metric.get_counter().get_value() as u64;
            let status: u16 = label(metric, "status").parse().unwrap_or(0);
            counts.requests += n;
            if (100..600).contains(&status) {
                counts.by_class[usize::from(status / 100) - 1] += n;
            }
            match status {
                429 => counts.limited += n,
                401 | 403 => counts.auth_failures += n,
                _ => {}
            }
        }
    }
    for family in m.cache_results.collect() {
        for metric in family.get_metric() {
            let counts = routes.entry(label(metric, "route").to_owned()).or_default();
            let n = metric.get_counter().get_value() as u64;
            match label(metric, "result") {
                "hit" | "stale" | "revalidated" => {
                    counts.cache_hits += n;
                    counts.cache_lookups += n;
                }
                "miss" => counts.cache_lookups += n,
                _ => {}
            }
        }
    }
    for family in m.upstream_duration.collect() {
        for metric in family.get_metric() {
            let counts = routes.entry(label(metric, "route").to_owned()).or_default();
            counts.upstream = quantile_ms(metric, 0.5).zip(quantile_ms(metric, 0.99));
        }
    }
    let routes: Vec<Value> = routes
        .into_iter()
        .map(|(route, c)| {
            json!({
                "route": route,
                "requests": c.requests,
                "status": {"1xx": c.by_class[0], "2xx": c.by_class[1], "3xx": c.by_class[2], "4xx": c.by_class[3], "5xx": c.by_class[4]},
                "rate_limited": c.limited,
                "auth_failures": c.auth_failures,
                "cache_hits": c.cache_hits,
                "cache_lookups": c.cache_lookups,
                "upstream_p50_ms": c.upstream.map(|u| u.0),
                "upstream_p99_ms": c.upstream.map(|u| u.1),
            })
        })
        .collect();
    let (entries, bytes) = cache.memory_stats();
    let unix_ms =
        |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let purges: Vec<Value> = purger
        .recent()
        .iter()
        .rev()
        .map(|p| {
            json!({
                "at_ms": unix_ms(p.at),
                "keys": p.keys,
                "sequence": p.report.seq,
                "instances_told": p.report.told,
                "instances_acknowledged": p.report.acknowledged,
            })
        })
        .collect();
    #[allow(unused_mut)]
    let mut status = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "now_ms": unix_ms(SystemTime::now()),
        "uptime_secs": started.elapsed().as_secs(),
        "routes": routes,
        "memory_tier": {"entries": entries, "bytes": bytes},
        "store": {
            "kind": store.kind(),
            "health": store.health().err().map_or_else(|| "ok".to_owned(), |e| e.to_string()),
            "circuit_open": m.store_circuit_open.get() != 0,
            "coherent": purger.coherent(),
            "incoherent_seconds": m.incoherent_seconds.get(),
        },
        "purges": purges,
    });
    // Debug builds only: how often paths were matched, so a test can prove one match a request.
    #[cfg(debug_assertions)]
    {
        let matches = crate::routing::MATCHES.load(std::sync::atomic::Ordering::Relaxed);
        status["debug"] = json!({ "route_matches": matches });
    }
    status
}
