//! Pass-through behaviour against the real upstream-example: CRUD, headers, errors, limits,
//! load balancing and connection reuse.

mod common;

use bytes::Bytes;
use common::{config_for, eventually, free_port, full, Client, Gateway, Upstream};
use hyper::{Method, Request, StatusCode};

fn gateway_for(upstream: &Upstream) -> Gateway {
    Gateway::start(&config_for(&[&upstream.url()], ""))
}

fn assert_problem(resp: &common::Response, status: u16) -> serde_json::Value {
    assert_eq!(
        resp.status.as_u16(),
        status,
        "body: {:?}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(
        resp.header("content-type"),
        Some("application/problem+json")
    );
    let body = resp.json();
    assert_eq!(body["status"], status);
    let request_id = resp
        .header("x-request-id")
        .expect("problem responses carry x-request-id");
    assert_eq!(
        body["request_id"], request_id,
        "the body names the same request id"
    );
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    body
}

#[tokio::test]
async fn every_crud_method_passes_through() {
    let upstream = Upstream::start();
    let gateway = gateway_for(&upstream);
    let client = Client::new();

    let created = client
        .send(
            Method::POST,
            &gateway.url("/products"),
            &[("content-type", "application/json")],
            r#"{"name":"Lamp","price":12.5,"stock":3}"#,
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let location = created
        .header("location")
        .expect("201 carries Location")
        .to_owned();
    let id = created.json()["id"].as_i64().unwrap();
    assert_eq!(location, format!("/products/{id}"));

    let fetched = client.get(&gateway.url(&location)).await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.json()["name"], "Lamp");

    let head = client
        .send(Method::HEAD, &gateway.url(&location), &[], Bytes::new())
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());

    let replaced = client
        .send(
            Method::PUT,
            &gateway.url(&location),
            &[],
            r#"{"name":"Desk lamp","price":20,"stock":1}"#,
        )
        .await;
    assert_eq!(replaced.status, StatusCode::OK);
    assert_eq!(replaced.json()["version"], 2);

    let patched = client
        .send(
            Method::PATCH,
            &gateway.url(&location),
            &[],
            r#"{"stock":9}"#,
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK);
    assert_eq!(patched.json()["stock"], 9);
    assert_eq!(patched.json()["name"], "Desk lamp");

    let invalid = client
        .send(
            Method::PATCH,
            &gateway.url(&location),
            &[],
            r#"{"price":-1}"#,
        )
        .await;
    assert_eq!(
        invalid.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "origin errors pass through unchanged"
    );

    let listed = client
        .get(&gateway.url("/products?page=2&per_page=5"))
        .await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.json()["items"][0]["id"], 6);

    let deleted = client
        .send(Method::DELETE, &gateway.url(&location), &[], Bytes::new())
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let gone = client.get(&gateway.url(&location)).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);

    let stats = upstream.stats().await;
    assert_eq!(stats["requests"]["POST /products"], 1);
    assert_eq!(stats["requests"]["PUT /products/{id}"], 1);
    assert_eq!(stats["requests"]["PATCH /products/{id}"], 2);
    assert_eq!(stats["requests"]["DELETE /products/{id}"], 1);
    assert_eq!(stats["requests"]["GET /products/{id}"], 3);
}

#[tokio::test]
async fn any_method_including_extensions_reaches_the_origin() {
    let upstream = Upstream::start();
    let gateway = gateway_for(&upstream);
    let client = Client::new();
    for method in ["OPTIONS", "REPORT", "PURGE", "DELETE"] {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let resp = client
            .send(m, &gateway.url("/__headers"), &[], Bytes::new())
            .await;
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.json()["method"], method);
    }
}

#[tokio::test]
async fn request_id_is_generated_or_passed_on_both_ways() {
    let upstream = Upstream::start();
    let gateway = gateway_for(&upstream);
    let client = Client::new();

    let generated = client.get(&gateway.url("/__headers")).await;
    let id = generated
        .header("x-request-id")
        .expect("generated request id")
        .to_owned();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "32 hex digits: {id}"
    );
    let next = client.get(&gateway.url("/__headers")).await;
    assert_ne!(next.header("x-request-id"), Some(id.as_str()), "unique");
    assert_eq!(
        generated.json()["headers"]["x-request-id"][0],
        id.as_str(),
        "upstream saw the same id"
    );

    let given = client
        .send(
            Method::GET,
            &gateway.url("/__headers"),
            &[("x-request-id", "client-abc-123")],
            Bytes::new(),
        )
        .await;
    assert_eq!(given.header("x-request-id"), Some("client-abc-123"));
    assert_eq!(given.json()["headers"]["x-request-id"][0], "client-abc-123");

    let oversized = "x".repeat(300);
    let replaced = client
        .send(
            Method::GET,
            &gateway.url("/__headers"),
            &[("x-request-id", &oversized)],
            Bytes::new(),
        )
        .await;
    let id = replaced.header("x-request-id").unwrap();
    assert_ne!(id, oversized);
    assert_eq!(id.len(), 32);
}

#[tokio::test]
async fn forwarded_headers_are_added_and_hop_by_hop_headers_removed() {
    let upstream = Upstream::start();
    let gateway = gateway_for(&upstream);
    let resp = Client::new()
        .send(
            Method::GET,
            &gateway.url("/__headers"),
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("connection", "x-private"),
                ("x-private", "secret"),
                ("keep-alive", "timeout=5"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                ("te", "gzip"),
                ("x-kept", "yes"),
            ],
            Bytes::new(),
        )
        .await;
    let seen = &resp.json()["headers"];
    assert_eq!(
        seen["x-forwarded-for"][0], "127.0.0.1",
        "an untrusted peer's X-Forwarded-For is replaced, not extended"
    );
    assert_eq!(seen["x-forwarded-proto"][0], "http");
    assert_eq!(
        seen["x-forwarded-host"][0],
        format!("127.0.0.1:{}", gateway.port)
    );
    assert_eq!(seen["x-kept"][0], "yes");
    for hop in ["x-private", "keep-alive", "proxy-authorization", "te"] {
        assert!(
            seen.get(hop).is_none(),
            "{hop} must not reach the origin: {seen}"
        );
    }
}

#[tokio::test]
async fn dot_segments_are_resolved_before_routing_and_forwarding() {
    let upstream = Upstream::start();
    let gateway = gateway_for(&upstream);
    let resp = Client::new()
        .get(&gateway.url("/products/%2e%2e//__headers?x=1"))
        .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.json()["uri"], "/__headers?x=1");
}

#[tokio::test]
async fn unreachable_upstream_is_502_problem_json() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gateway = Gateway::start(&config_for(&[&dead], ""));
    let resp = Client::new().get(&gateway.url("/products/1")).await;
    let body = assert_problem(&resp, 502);
    let port = dead.rsplit(':').next().unwrap();
    assert!(
        !resp.body.windows(port.len()).any(|w| w == port.as_bytes()),
        "the origin's address stays out of the answer: {body}"
    );
    assert!(
        eventually(std::time::Duration::from_secs(5), || async {
            gateway.logs().contains(&dead[7..])
        })
        .await,
        "it is in the gateway's log instead: {}",
        gateway.logs()
    );
}

#[tokio::test]
async fn slow_upstream_is_504_problem_json() {
    let upstream = Upstream::start_with(&["--seed", "5", "--db-latency-ms", "3000"]);
    let config = config_for(&[&upstream.url()], "")
        .replace(r#"read_timeout = "5s""#, r#"read_timeout = "300ms""#);
    let gateway = Gateway::start(&config);
    let resp = Client::new().get(&gateway.url("/products/1")).await;
    assert_problem(&resp, 504);
}

#[tokio::test]
async fn oversized_body_is_413_and_never_reaches_the_upstream() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(
        &[&upstream.url()],
        "[limits]\nmax_request_body_bytes = \"1KiB\"\n",
    ));
    let client = Client::new();

    let small = client
        .send(Method::POST, &gateway.url("/__sink"), &[], vec![7u8; 1024])
        .await;
    assert_eq!(small.status, StatusCode::OK, "a body at the limit passes");

    let declared = client
        .send(Method::POST, &gateway.url("/__sink"), &[], vec![7u8; 4096])
        .await;
    assert_problem(&declared, 413);
    assert_eq!(
        upstream.served("POST /__sink").await,
        1,
        "the oversized request did not reach the upstream"
    );
    assert_eq!(upstream.served("POST /__sink completed").await, 1);
}

#[tokio::test]
async fn oversized_chunked_body_is_cut_off_with_413() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(
        &[&upstream.url()],
        "[limits]\nmax_request_body_bytes = \"64KiB\"\n",
    ));
    // No Content-Length: the body is sent chunked and only counting reveals its size.
    let chunks: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = (0..8)
        .map(|_| Ok(hyper::body::Frame::data(Bytes::from(vec![1u8; 16 * 1024]))))
        .collect();
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
    let req = Request::post(gateway.url("/__sink"))
        .body(http_body_util::combinators::BoxBody::new(body))
        .unwrap();
    let resp = Client::new().request(req).await;
    assert_problem(&resp, 413);
    // The body streams, so the origin sees its start; the gateway then aborts that upstream
    // request, and the origin never receives a complete body.
    assert_eq!(
        upstream.served("POST /__sink completed").await,
        0,
        "the origin never got the whole body"
    );
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(
        &[&upstream.url()],
        "[limits]\nmax_request_header_bytes = \"2KiB\"\n",
    ));
    let big = "v".repeat(4096);
    let resp = Client::new()
        .send(
            Method::GET,
            &gateway.url("/products/1"),
            &[("x-big", &big)],
            Bytes::new(),
        )
        .await;
    assert_problem(&resp, 431);
    assert_eq!(upstream.total_served().await, 0);
}

#[tokio::test]
async fn origins_are_used_in_round_robin_and_a_dead_one_is_skipped() {
    let a = Upstream::start();
    let b = Upstream::start();
    let gateway = Gateway::start(&config_for(&[&a.url(), &b.url()], ""));
    let client = Client::new();
    for _ in 0..10 {
        assert_eq!(
            client.get(&gateway.url("/health")).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(a.served("GET /health").await, 5);
    assert_eq!(b.served("GET /health").await, 5);
    drop(gateway);

    let dead = format!("http://127.0.0.1:{}", free_port());
    let gateway = Gateway::start(&config_for(&[&dead, &a.url()], ""));
    for _ in 0..6 {
        let resp = client
            .send(Method::POST, &gateway.url("/__sink"), &[], "x")
            .await;
        assert_eq!(
            resp.status,
            StatusCode::OK,
            "a refused connection moves on to the next origin"
        );
    }
    assert_eq!(
        a.served("POST /__sink").await,
        6,
        "each write reached the live origin exactly once"
    );
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let upstream = Upstream::start();
    let gateway = gateway_for(&upstream);
    let client = Client::new();
    for _ in 0..30 {
        assert_eq!(
            client.get(&gateway.url("/products/1")).await.status,
            StatusCode::OK
        );
    }
    let stats = upstream.stats().await;
    let connections = stats["connections"].as_u64().unwrap();
    // One for the stats call itself, and the gateway's pooled connection(s).
    assert!(
        connections <= 3,
        "30 sequential requests opened {connections} upstream connections"
    );
    assert_eq!(stats["requests"]["GET /products/{id}"], 30);
}

#[tokio::test]
async fn full_body_helper_sanity() {
    // The client helper streams what it is given; a mismatch here would void the tests above.
    let upstream = Upstream::start();
    let resp = Client::new()
        .request(
            Request::post(format!("{}/__sink", upstream.url()))
                .body(full("abc"))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.json()["bytes"], 3);
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_cleanly() {
    let upstream = Upstream::start_with(&["--seed", "5", "--db-latency-ms", "1500"]);
    let config = config_for(&[&upstream.url()], "")
        .replace(r#"grace_period = "1s""#, r#"grace_period = "3s""#);
    let mut gateway = Gateway::start(&config);
    let url = gateway.url("/products/1");
    let in_flight = tokio::spawn(async move { Client::new().get(&url).await });
    // Wait until the request is at the origin, then ask the gateway to stop.
    while upstream.served("GET /products/{id}").await == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    gateway.process.signal("TERM");
    let resp = in_flight.await.unwrap();
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "the in-flight request completed during the grace period"
    );
    let status = gateway
        .process
        .wait_exit(std::time::Duration::from_secs(15))
        .expect("the gateway exits after the grace period");
    assert!(status.success(), "exit status {status}");
    assert!(!common::port_open(gateway.port), "the listener is closed");
}
