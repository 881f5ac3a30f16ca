//! W3C trace context through the gateway, the trace id in the access log, and one span per
//! request exported over OTLP/HTTP to a small receiver run by the test.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{config_for, eventually, Client, Gateway, GatewayConfig, Upstream};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use serde_json::Value;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// An OTLP/HTTP receiver on a free loopback port: every request body, parsed.
async fn otlp_receiver() -> (u16, Arc<Mutex<Vec<Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(Mutex::new(Vec::new()));
    let store = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(req.method(), Method::POST);
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        store
                            .lock()
                            .unwrap()
                            .push(serde_json::from_slice(&body).expect("OTLP JSON"));
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    (port, received)
}

/// Every exported span, flattened.
fn spans(received: &Mutex<Vec<Value>>) -> Vec<Value> {
    received
        .lock()
        .unwrap()
        .iter()
        .flat_map(|request| {
            request["resourceSpans"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|rs| rs["scopeSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|ss| ss["spans"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn attribute<'a>(span: &'a Value, key: &str) -> &'a Value {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn trace_context_reaches_the_origin_the_log_and_the_collector() {
    let (otlp_port, received) = otlp_receiver().await;
    let upstream = Upstream::start();
    let gateway = GatewayConfig::new(&upstream.url())
        .server("log_format = \"json\"")
        .section(&format!(
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{otlp_port}\"\nservice_name = \"shop-gateway\"\n"
        ))
        .start();
    let client = Client::new();
    let echo = |headers: Vec<(&'static str, &'static str)>| {
        let client = &client;
        let url = gateway.url("/__headers");
        async move {
            let resp = client.send(Method::GET, &url, &headers, Bytes::new()).await;
            resp.json()["headers"].clone()
        }
    };

    // A client unsampled trace first: it must never be exported.
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let seen = echo(vec![("traceparent", unsampled)]).await;
    assert!(seen["traceparent"][0]
        .as_str()
        .unwrap()
        .starts_with("00-11111111111111111111111111111111-"));

    // Continued: same trace, the gateway's span as the parent, tracestate passed on.
    let seen = echo(vec![
        ("traceparent", PARENT),
        ("tracestate", "vendor=opaque"),
    ])
    .await;
    let forwarded = seen["traceparent"][0].as_str().unwrap().to_owned();
    let fields: Vec<&str> = forwarded.split('-').collect();
    assert_eq!(fields.len(), 4, "{forwarded}");
    assert_eq!(fields[0], "00");
    assert_eq!(fields[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(fields[2], "00f067aa0ba902b7", "the gateway's own span");
    assert_eq!(fields[2].len(), 16);
    assert_eq!(fields[3], "01");
    assert_eq!(seen["tracestate"][0], "vendor=opaque");
    let gateway_span = fields[2].to_owned();

    // Absent or invalid: a new trace, and a tracestate without its traceparent is dropped.
    let fresh = echo(vec![]).await["traceparent"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let other = echo(vec![]).await["traceparent"][0]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(fresh[3..35], other[3..35], "each request a new trace");
    let invalid = echo(vec![
        (
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ),
        ("tracestate", "vendor=opaque"),
    ])
    .await;
    assert!(!invalid["traceparent"][0]
        .as_str()
        .unwrap()
        .contains("00000000000000000000000000000000"));
    assert_eq!(invalid["tracestate"], Value::Null);

    // The access log names the trace.
    assert!(
        eventually(Duration::from_secs(5), || async {
            gateway
                .logs()
                .contains("\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\"")
        })
        .await,
        "{}",
        gateway.logs()
    );

    // The collector gets the gateway's span, child of the client's.
    assert!(
        eventually(Duration::from_secs(10), || async {
            spans(&received)
                .iter()
                .any(|s| s["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736")
        })
        .await,
        "no span exported: {:?}",
        received.lock().unwrap()
    );
    let all = spans(&received);
    let span = all
        .iter()
        .find(|s| s["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736")
        .unwrap();
    assert_eq!(span["spanId"], gateway_span.as_str());
    assert_eq!(span["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(span["kind"], 2);
    assert_eq!(span["name"], "GET -");
    assert_eq!(
        attribute(span, "http.response.status_code")["intValue"],
        "200"
    );
    assert_eq!(attribute(span, "url.path")["stringValue"], "/__headers");
    let start: u128 = span["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
    let end: u128 = span["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(start > 0 && start <= end);
    let resource = &received.lock().unwrap()[0]["resourceSpans"][0]["resource"];
    assert_eq!(
        attribute(resource, "service.name")["stringValue"],
        "shop-gateway"
    );
    // Batches arrive in order: the unsampled request, sent first, was never exported.
    assert!(!all
        .iter()
        .any(|s| s["traceId"] == "11111111111111111111111111111111"));
}

#[tokio::test]
async fn an_unreachable_collector_never_slows_or_fails_requests() {
    let dead = common::free_port();
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(
        &[&upstream.url()],
        &format!("[telemetry]\notlp_endpoint = \"http://127.0.0.1:{dead}/v1/traces\"\n"),
    ));
    let client = Client::new();
    for _ in 0..200 {
        let resp = client.get(&gateway.url("/products/1")).await;
        assert_eq!(resp.status, hyper::StatusCode::OK);
    }
}

/// A stale-while-revalidate refresh runs after its client has been answered; the origin still
/// sees it as part of the request that triggered it: that trace, the gateway's span as parent.
#[tokio::test]
async fn a_background_refresh_carries_the_triggering_requests_trace() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(
        &[&upstream.url()],
        "[[routes]]\npath = \"/__headers\"\ncache = { ttl = \"1s\", stale_while_revalidate = \"30s\" }\n",
    ));
    let first = common::get(&gateway, "/__headers", &[]).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let stale = common::get(&gateway, "/__headers", &[("traceparent", PARENT)]).await;
    assert_eq!(stale.header("x-cache"), Some("STALE"));
    let refreshed = common::eventually_value(Duration::from_secs(5), || async {
        let resp = common::get(&gateway, "/__headers", &[]).await;
        (resp.header("x-cache") == Some("HIT") && resp.body != first.body).then(|| resp.json())
    })
    .await
    .expect("the background refresh stored a new response");
    let seen = refreshed["headers"]["traceparent"][0].as_str().unwrap();
    assert!(
        seen.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "the triggering request's trace: {seen}"
    );
    assert!(
        !seen.contains("00f067aa0ba902b7"),
        "the gateway's span, not the client's: {seen}"
    );
}
