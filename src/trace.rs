//! W3C Trace Context and span export.
//!
//! Every request belongs to a trace. A valid `traceparent` from the client (W3C Trace Context
//! Level 1) is continued: the gateway's own span gets a new span id, the client's becomes its
//! parent, and the origin receives `traceparent` naming the gateway's span, with `tracestate`
//! passed on as it came. An absent or invalid `traceparent` starts a new trace (and an
//! accompanying `tracestate` is dropped, as the recommendation says). The trace id goes into
//! the access log.
//!
//! With `[telemetry] otlp_endpoint`, each request's span is exported over OTLP/HTTP (JSON
//! encoding) by a background task, in batches. The request path only offers the span to a
//! bounded queue: when the collector is slow or down, spans are dropped (and counted), never
//! waited for. Sampling follows the parent: a trace the client marked unsampled is not exported;
//! traces the gateway starts are sampled.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::Full;
use serde_json::json;
use tokio::sync::mpsc;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The `sampled` trace flag.
const SAMPLED: u8 = 0x01;
/// Spans waiting for export; past this, new ones are dropped.
const QUEUE: usize = 8192;
/// Spans per export request.
const BATCH: usize = 512;
/// Longest a span waits for its batch to fill.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// A request's place in its trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// The gateway's span for this request.
    pub span_id: u64,
    /// The client's span, when the request continued a trace.
    pub parent_id: Option<u64>,
    pub flags: u8,
}

/// Unique ids without a random draw per request: a per-process random seed, and a counter
/// scrambled by a bijection (so distinct counts give distinct ids that look random).
fn next_id() -> u64 {
    static SEED: OnceLock<(u64, u64)> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let (seed, _) = *SEED.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair());
    let mut z = COUNTER
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(seed)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    // Zero is the invalid id.
    (z ^ (z >> 31)).max(1)
}

fn process_trace_prefix() -> u64 {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().1 | 1)
}

impl TraceContext {
    /// Continues the request's trace, or starts one.
    pub fn from_headers(headers: &HeaderMap) -> TraceContext {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let parsed = match (values.next(), values.next()) {
            (Some(value), None) => parse_traceparent(value.as_bytes()),
            _ => None,
        };
        match parsed {
            Some((trace_id, parent_id, flags)) => TraceContext {
                trace_id,
                span_id: next_id(),
                parent_id: Some(parent_id),
                flags,
            },
            None => TraceContext {
                trace_id: (u128::from(process_trace_prefix()) << 64) | u128::from(next_id()),
                span_id: next_id(),
                parent_id: None,
                flags: SAMPLED,
            },
        }
    }

    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The `traceparent` the origin receives: this trace, the gateway's span.
    pub fn traceparent(&self) -> HeaderValue {
        // Written by hand: this runs on every proxied request, and `format!` cost a visible
        // share of a pass-through's CPU.
        fn hex(out: &mut [u8], value: u128) {
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            let mut value = value;
            for byte in out.iter_mut().rev() {
                *byte = DIGITS[(value & 0xf) as usize];
                value >>= 4;
            }
        }
        let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex(&mut text[3..35], self.trace_id);
        hex(&mut text[36..52], u128::from(self.span_id));
        hex(&mut text[53..55], u128::from(self.flags));
        HeaderValue::from_bytes(&text).expect("hex is a valid header value")
    }

    /// Sets the origin's `traceparent`; a `tracestate` belongs to the client's trace, so it is
    /// removed when that trace was not continued.
    pub fn propagate(&self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent());
        if self.parent_id.is_none() {
            headers.remove(TRACESTATE);
        }
    }

    /// The trace id for logs: 32 hex digits, written without an allocation.
    pub fn trace_id(&self) -> TraceId {
        TraceId(self.trace_id)
    }
}

/// A trace id, displayed as 32 lower-case hex digits.
pub struct TraceId(u128);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// `version-traceid-parentid-flags` (W3C Trace Context §3.2): lower-case hex, ids not all zero,
/// version `ff` invalid; a version above `00` may carry more fields after a `-`.
fn parse_traceparent(value: &[u8]) -> Option<(u128, u64, u8)> {
    if value.len() < 55 {
        return None;
    }
    fn hex(bytes: &[u8]) -> Option<&str> {
        bytes
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            .then(|| std::str::from_utf8(bytes).ok())
            .flatten()
    }
    let version = u8::from_str_radix(hex(&value[0..2])?, 16).ok()?;
    if version == 0xff || (version == 0 && value.len() != 55) {
        return None;
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    if value.len() > 55 && value[55] != b'-' {
        return None;
    }
    let trace_id = u128::from_str_radix(hex(&value[3..35])?, 16).ok()?;
    let parent_id = u64::from_str_radix(hex(&value[36..52])?, 16).ok()?;
    let flags = u8::from_str_radix(hex(&value[53..55])?, 16).ok()?;
    (trace_id != 0 && parent_id != 0).then_some((trace_id, parent_id, flags))
}

/// One finished request, as a span.
#[derive(Debug)]
pub struct SpanRecord {
    pub trace: TraceContext,
    /// `GET product-read`: the method and the route (low cardinality, as OpenTelemetry asks).
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub method: String,
    pub path: String,
    pub route: String,
    pub status: u16,
    pub cache: &'static str,
    pub request_id: String,
}

/// Where finished spans go (set once at start-up when `[telemetry] otlp_endpoint` is set).
static EXPORTER: OnceLock<mpsc::Sender<SpanRecord>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Whether spans are exported at all (so the request path builds none otherwise).
pub fn exporting() -> bool {
    EXPORTER.get().is_some()
}

/// Offers a finished span for export; never waits. Unsampled spans are not exported.
pub fn export(span: SpanRecord) {
    let Some(sender) = EXPORTER.get() else {
        return;
    };
    if !span.trace.sampled() {
        return;
    }
    if sender.try_send(span).is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why the span exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    #[error("otlp_endpoint {endpoint:?} is not a URL: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("the span exporter is already running")]
    AlreadyRunning,
}

/// Starts the exporter task (on the current runtime) sending to `endpoint`, an OTLP/HTTP URL
/// (`http://collector:4318` gets the standard `/v1/traces` path).
pub fn start_exporter(endpoint: &str, service_name: &str) -> Result<(), ExporterError> {
    let mut endpoint = endpoint.trim_end_matches('/').to_owned();
    let uri: http::Uri =
        endpoint
            .parse()
            .map_err(|e: http::uri::InvalidUri| ExporterError::BadEndpoint {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            })?;
    if uri.path() == "/" || uri.path().is_empty() {
        endpoint.push_str("/v1/traces");
    }
    let client = crate::http_client::client::<Full<Bytes>>(None)?;
    let (sender, receiver) = mpsc::channel(QUEUE);
    if EXPORTER.set(sender).is_err() {
        return Err(ExporterError::AlreadyRunning);
    }
    tokio::spawn(run_exporter(
        receiver,
        client,
        endpoint,
        service_name.to_owned(),
    ));
    Ok(())
}

async fn run_exporter(
    mut receiver: mpsc::Receiver<SpanRecord>,
    client: crate::http_client::HttpsClient<Full<Bytes>>,
    endpoint: String,
    service_name: String,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut reported_failure = false;
    loop {
        let Some(first) = receiver.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let body = otlp_json(&service_name, &batch);
        batch.clear();
        let request = http::Request::post(&endpoint)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)));
        let Ok(request) = request else {
            return;
        };
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, client.request(request)).await;
        let failure = match sent {
            Ok(Ok(resp)) if resp.status().is_success() => None,
            Ok(Ok(resp)) => Some(format!("the collector answered {}", resp.status())),
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {EXPORT_TIMEOUT:?}")),
        };
        match failure {
            // Said once per outage, not once per batch.
            Some(error) if !reported_failure => {
                tracing::warn!(%endpoint, %error, "trace export failed; spans are dropped until it works again");
                reported_failure = true;
            }
            Some(_) => {}
            None if reported_failure => {
                tracing::info!(%endpoint, dropped = DROPPED.load(Ordering::Relaxed), "trace export works again");
                reported_failure = false;
            }
            None => {}
        }
    }
}

fn unix_nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_string()
}

/// An OTLP `ExportTraceServiceRequest` in the OTLP/JSON encoding (ids as hex, 64-bit integers
/// as strings).
fn otlp_json(service_name: &str, spans: &[SpanRecord]) -> Vec<u8> {
    let attribute = |key: &str, value: serde_json::Value| json!({"key": key, "value": value});
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": format!("{:032x}", s.trace.trace_id),
                "spanId": format!("{:016x}", s.trace.span_id),
                "name": s.name,
                "kind": 2,
                "startTimeUnixNano": unix_nanos(s.start),
                "endTimeUnixNano": unix_nanos(s.end),
                "attributes": [
                    attribute("http.request.method", json!({"stringValue": s.method})),
                    attribute("url.path", json!({"stringValue": s.path})),
                    attribute("http.route", json!({"stringValue": s.route})),
                    attribute("http.response.status_code", json!({"intValue": s.status.to_string()})),
                    attribute("cachegate.cache", json!({"stringValue": s.cache})),
                    attribute("cachegate.request_id", json!({"stringValue": s.request_id})),
                ],
                // ERROR for 5xx (a server span's 4xx is the client's error, not ours).
                "status": {"code": if s.status >= 500 { 2 } else { 0 }},
            });
            if let Some(parent) = s.trace.parent_id {
                span["parentSpanId"] = json!(format!("{parent:016x}"));
            }
            span
        })
        .collect();
    let request = json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                attribute("service.name", json!({"stringValue": service_name})),
                attribute("service.version", json!({"stringValue": env!("CARGO_PKG_VERSION")})),
            ]},
            "scopeSpans": [{
                "scope": {"name": "cachegate", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }],
    });
    serde_json::to_vec(&request).expect("JSON values serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Option<(u128, u64, u8)> {
        parse_traceparent(text.as_bytes())
    }

    #[test]
    fn traceparent_as_w3c_writes_it() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse(ok),
            Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1))
        );
        // A later version may add fields; version 00 may not.
        assert!(parse(&format!("01{}-extra", &ok[2..])).is_some());
        assert!(parse(&format!("{ok}-extra")).is_none());
        let written = TraceContext {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
            parent_id: None,
            flags: 1,
        }
        .traceparent();
        assert_eq!(written, ok);
        for bad in [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_continued_trace_gets_a_new_span_and_a_started_one_a_new_trace() {
        let mut headers = HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        let continued = TraceContext::from_headers(&headers);
        assert_eq!(continued.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(continued.parent_id, Some(0x00f067aa0ba902b7));
        assert_ne!(continued.span_id, 0x00f067aa0ba902b7);
        assert!(!continued.sampled());
        let a = TraceContext::from_headers(&HeaderMap::new());
        let b = TraceContext::from_headers(&HeaderMap::new());
        assert_ne!(a.trace_id, b.trace_id);
        assert!(a.sampled() && a.parent_id.is_none());
        assert_eq!(
            parse(a.traceparent().to_str().unwrap()).unwrap().0,
            a.trace_id
        );
    }
}
