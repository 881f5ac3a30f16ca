//! TLS termination with HTTP/2 by ALPN, and `https://` upstreams verified against a configured CA.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{self_signed_cert, GatewayConfig, Upstream};
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A client that trusts only `cert_der` and offers h2 and http/1.1.
fn tls_client(
    cert_der: &[u8],
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_der.to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

#[tokio::test]
async fn tls_listener_negotiates_http2_and_https_upstreams_work() {
    let upstream = Upstream::start();
    let dir = tempfile::TempDir::new().unwrap();
    let (cert, key, cert_der) = self_signed_cert(dir.path());

    // Gateway A terminates TLS in front of the plain-HTTP example.
    let tls_gateway = GatewayConfig::new(&upstream.url()).tls(&cert, &key).start();

    let client = tls_client(&cert_der);
    let resp = client
        .request(
            Request::get(format!("https://127.0.0.1:{}/__headers", tls_gateway.port))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .expect("TLS request through the gateway");
    assert_eq!(resp.version(), Version::HTTP_2, "ALPN chose HTTP/2");
    assert_eq!(resp.status(), StatusCode::OK);
    let body: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["headers"]["x-forwarded-proto"][0], "https");
    assert_eq!(
        body["headers"]["host"][0],
        format!("127.0.0.1:{}", tls_gateway.port),
        "the HTTP/2 :authority became the HTTP/1.1 Host"
    );
    assert_eq!(
        body["uri"], "/__headers",
        "the origin got an origin-form target"
    );

    // Gateway B proxies to gateway A over https, trusting A's certificate through tls_ca_file.
    let through_tls = format!("https://127.0.0.1:{}", tls_gateway.port);
    let https_client_gateway = GatewayConfig::new(&through_tls)
        .upstream_setting(&format!("tls_ca_file = {:?}", cert.display().to_string()))
        .start();
    let resp = common::Client::new()
        .get(&https_client_gateway.url("/products/2"))
        .await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(resp.json()["id"], 2);
    assert_eq!(upstream.served("GET /products/{id}").await, 1);

    // Without the CA, the upstream certificate is rejected: 502, never a silent downgrade.
    let untrusting = GatewayConfig::new(&through_tls).start();
    let resp = common::Client::new()
        .get(&untrusting.url("/products/2"))
        .await;
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY);
    assert_eq!(upstream.served("GET /products/{id}").await, 1);
}

/// The scheme is part of the cache key: with a plain and a TLS listener, an answer stored for
/// `https` (which an origin may make a redirect or give https links) never serves `http`, and
/// the other way round — even for the same Host. HTTP/2's `:authority` is the key's host.
#[tokio::test]
async fn the_scheme_and_the_http2_authority_are_in_the_cache_key() {
    let upstream = Upstream::start();
    let dir = tempfile::TempDir::new().unwrap();
    let (cert, key, cert_der) = self_signed_cert(dir.path());
    let tls_port = common::free_port();
    let gateway = GatewayConfig::new(&upstream.url())
        .listener(&format!(
            "address = \"127.0.0.1:{tls_port}\"\ntls = {{ cert_file = {:?}, key_file = {:?} }}",
            cert.display().to_string(),
            key.display().to_string()
        ))
        .section("[[routes]]\npath = \"/__headers\"\ncache = { ttl = \"60s\" }")
        .start();
    let authority = format!("127.0.0.1:{tls_port}");
    let tls = tls_client(&cert_der);
    let over_tls = || async {
        let resp = tls
            .request(
                Request::get(format!("https://{authority}/__headers"))
                    .body(Empty::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.version(), Version::HTTP_2);
        let x_cache = resp.headers()["x-cache"].to_str().unwrap().to_owned();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        (x_cache, body)
    };
    let (first, body) = over_tls().await;
    assert_eq!(first, "MISS");
    assert_eq!(body["headers"]["host"][0], authority.as_str());
    assert_eq!(over_tls().await.0, "HIT", "h2 requests share an entry");

    let plain = common::Client::new()
        .send(
            hyper::Method::GET,
            &gateway.url("/__headers"),
            &[("host", authority.as_str())],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        plain.header("x-cache"),
        Some("MISS"),
        "http is not served the https entry"
    );
    assert_eq!(plain.json()["headers"]["x-forwarded-proto"][0], "http");
}
