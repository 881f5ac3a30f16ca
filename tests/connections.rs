//! Connections on both sides of the gateway: client connections stay usable across every kind
//! of answer the gateway writes itself, HTTP/2 works with prior knowledge (h2c), and pooled
//! upstream connections that the origin closed while idle never surface as errors.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{config_for, Gateway, Upstream};
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// One HTTP/1.1 connection to the gateway, reused for every request.
async fn connection(port: u16) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the gateway accepts connections");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("an HTTP/1.1 handshake");
    tokio::spawn(conn);
    sender
}

/// Sends `GET path` on `sender`; returns the status, `X-Cache` and the body.
async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
) -> (StatusCode, String, Bytes) {
    sender
        .ready()
        .await
        .expect("the connection is still usable");
    let request = Request::get(path)
        .header("host", "gateway.test")
        .body(Empty::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .expect("a response on the same connection");
    let status = response.status();
    let x_cache = response
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, x_cache, body)
}

#[tokio::test]
async fn ten_requests_share_one_connection_across_a_revalidation() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(
        &[&upstream.url()],
        r#"
[[routes]]
path = "/__respond"
cache = { ttl = "1s", keep = "10m" }
"#,
    ));
    let path = "/__respond?case=keepalive&etag=%22v1%22";
    let mut sender = connection(gateway.port).await;
    let mut seen = Vec::new();
    for i in 0..10 {
        if i == 3 || i == 7 {
            // Past the TTL: the next request revalidates the kept entry with the origin (304).
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let (status, x_cache, _) = get_on(&mut sender, path).await;
        assert_eq!(status, StatusCode::OK, "request {i} ({x_cache})");
        seen.push(x_cache);
    }
    assert_eq!(seen[0], "MISS");
    assert_eq!(
        seen.iter().filter(|x| *x == "REVALIDATED").count(),
        2,
        "{seen:?}"
    );
    assert!(!sender.is_closed(), "the connection is still open");
}

#[tokio::test]
async fn problems_and_hits_keep_the_client_connection() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(
        &[&upstream.url()],
        r#"
[defaults]
unmatched = "deny"

[[routes]]
path = "/products/{id}"
cache = { ttl = "60s" }
"#,
    ));
    let mut sender = connection(gateway.port).await;
    for (path, status, x_cache) in [
        ("/products/1", StatusCode::OK, "MISS"),
        ("/products/1", StatusCode::OK, "HIT"),
        ("/nowhere", StatusCode::NOT_FOUND, "-"),
        ("/products/a%00b", StatusCode::BAD_REQUEST, "-"),
        ("/products/1", StatusCode::OK, "HIT"),
    ] {
        let got = get_on(&mut sender, path).await;
        assert_eq!((got.0, got.1.as_str()), (status, x_cache), "{path}");
    }
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served_on_a_plain_listener() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(&[&upstream.url()], ""));
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", gateway.port))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("an h2c handshake");
    tokio::spawn(conn);
    for _ in 0..3 {
        let request = Request::get(format!(
            "http://127.0.0.1:{}/__headers?via=h2c",
            gateway.port
        ))
        .body(Empty::<Bytes>::new())
        .unwrap();
        let response = sender.send_request(request).await.expect("an h2 response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["uri"], "/__headers?via=h2c", "origin-form upstream");
        assert_eq!(
            seen["headers"]["host"],
            serde_json::json!([format!("127.0.0.1:{}", gateway.port)]),
            ":authority is the Host the origin sees"
        );
    }
}

/// The origin closes keep-alive connections idle for 500 ms (Node and uvicorn do it after 5 s).
/// Bursts of requests arrive after pauses around that time, so some find a pooled connection the
/// origin has just closed: each must be sent again on a fresh one, never answered 502.
#[tokio::test]
async fn upstream_connections_closed_while_idle_never_become_errors() {
    let upstream = Upstream::start_with(&["--seed", "20", "--keep-alive-timeout-ms", "500"]);
    let gateway = Gateway::start(&config_for(&[&upstream.url()], ""));
    let client = common::Client::new();
    let mut failures = Vec::new();
    let mut sent = 0;
    for pause_ms in (470..=590).step_by(10) {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        let burst = (0..4).map(|i| {
            let (client, url) = (client.clone(), gateway.url(&format!("/products/{}", i + 1)));
            async move { client.get(&url).await }
        });
        for response in futures_util::future::join_all(burst).await {
            sent += 1;
            if response.status != StatusCode::OK {
                failures.push((pause_ms, response.status));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?} of {sent}");
    let connections = upstream.stats().await["connections"].as_u64().unwrap();
    assert!(
        connections > 4,
        "the origin closed idle connections ({connections} opened), so the test exercised reuse after a close"
    );
}

/// The pool uses an idle connection only while its origin surely still holds it open:
/// `[upstream] idle_timeout` (1.5 s by default, below gunicorn's 2 s), or what the origin
/// announces in `Keep-Alive: timeout=N` less a second. A write sent on a connection the origin
/// is closing cannot be sent again.
#[tokio::test]
async fn idle_upstream_connections_are_used_only_while_the_origin_keeps_them() {
    let client = common::Client::new();
    // Says nothing, closes nothing: the gateway's default decides.
    let quiet = Upstream::start_with(&["--seed", "5"]);
    let gateway = Gateway::start(&config_for(&[&quiet.url()], ""));
    let before = connections(&quiet).await;
    assert_eq!(
        client.get(&gateway.url("/products/1")).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        client.get(&gateway.url("/products/2")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        connections(&quiet).await - before,
        2,
        "one reused (the stats request is one)"
    );
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        client.get(&gateway.url("/products/3")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        connections(&quiet).await - before,
        4,
        "a connection idle past idle_timeout is not used"
    );

    // Node's way: closes after 5 s and says so, so the pool keeps connections for 4 s.
    let node = Upstream::start_with(&[
        "--seed",
        "5",
        "--keep-alive-timeout-ms",
        "5000",
        "--announce-keep-alive",
    ]);
    let gateway = Gateway::start(&config_for(&[&node.url()], ""));
    let before = connections(&node).await;
    assert_eq!(
        client.get(&gateway.url("/products/1")).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        client.get(&gateway.url("/products/2")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        connections(&node).await - before,
        2,
        "the announced keep-alive is trusted (the stats request is one)"
    );
}

/// Connections an upstream-example accepted; each look opens one more.
async fn connections(upstream: &Upstream) -> u64 {
    upstream.stats().await["connections"].as_u64().unwrap()
}
