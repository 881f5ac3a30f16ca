//! A request's telemetry, written once at its end: the route's metrics, the access-log line, and
//! the exported span. Called by the pipeline's end step (`Gateway::end`).

use crate::metrics::metrics;

use super::context::RequestCtx;

/// What the client was sent, beside the request's context.
pub struct Sent {
    pub status: u16,
    pub method: http::Method,
    pub uri: http::Uri,
    /// Body bytes handed to the client.
    pub bytes: u64,
    /// Why the exchange failed, when it did (a `cachegate_upstream_errors_total` kind).
    pub error: Option<&'static str>,
}

/// Records a finished request.
pub fn record(ctx: &RequestCtx, f: &Sent) {
    let route = ctx.route_name();
    let duration = ctx.started.elapsed();

    let m = metrics();
    let route_metrics = ctx.snapshot.routes.metrics(ctx.route.id);
    route_metrics.request(&f.method, f.status, duration);
    if let Some(upstream) = ctx.upstream_elapsed {
        route_metrics.upstream(upstream);
    }
    if let Some(kind) = f.error {
        m.upstream_errors.with_label_values(&[kind]).inc();
    }
    if let Some(reason) = ctx.auth_failure {
        m.auth_failures.with_label_values(&[reason]).inc();
    }
    let rate_limit = match &ctx.rate_limit {
        Some(v) => {
            let outcome = if v.allowed { "allowed" } else { "limited" };
            m.rate_limit_decisions
                .with_label_values(&[route, outcome, v.decided_by])
                .inc();
            outcome
        }
        None => "-",
    };

    if crate::trace::exporting() {
        let end = std::time::SystemTime::now();
        crate::trace::export(crate::trace::SpanRecord {
            trace: ctx.trace,
            name: format!("{} {route}", f.method),
            start: end.checked_sub(duration).unwrap_or(end),
            end,
            method: f.method.to_string(),
            path: f.uri.path().to_owned(),
            route: route.to_owned(),
            status: f.status,
            cache: ctx.cache.label(),
            request_id: ctx.request_id.clone(),
        });
    }

    tracing::info!(
        target: "access",
        request_id = %ctx.request_id,
        trace_id = %ctx.trace.trace_id(),
        client_ip = %ctx.client_ip,
        method = %f.method,
        path = %f.uri.path(),
        route,
        status = f.status,
        bytes = f.bytes,
        duration_ms = duration.as_secs_f64() * 1000.0,
        upstream_ms = ctx.upstream_elapsed.map(|d| d.as_secs_f64() * 1000.0),
        cache = ctx.cache.label(),
        rate_limit,
        subject = ctx.identity.as_ref().and_then(|i| i.subject.as_deref()),
        auth_failure = ctx.auth_failure,
        purge = ctx.purged.and_then(|p| p.seq),
        error = f.error,
    );
}
