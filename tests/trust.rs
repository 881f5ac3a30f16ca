//! Trust: every spelling of a URL gets its route's policy, and nothing a client sends reaches
//! the origin in a form the gateway did not judge. Black-box, against the real binaries: the
//! quickstart configuration in front of upstream-example.

mod common;

use common::*;
use hyper::Method;
use serde_json::json;

const QUICKSTART_SECRET: &str = "dev-only-secret";

/// A token the quickstart accepts: right issuer, audience and scope.
fn writer_token() -> String {
    let claims = json!({
        "sub": "alice",
        "iss": "cachegate-quickstart",
        "aud": "products-api",
        "scope": "products:write",
        "exp": jsonwebtoken::get_current_timestamp() + 600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(QUICKSTART_SECRET.as_bytes()),
    )
    .unwrap()
}

fn quickstart(upstream: &Upstream) -> Gateway {
    Gateway::start(&quickstart_config(&upstream.url(), free_port()))
}

/// Every spelling of every protected write is refused without a token, and none reaches the
/// origin: the spellings the origin reads as the route get the route's `401`; the ones the
/// gateway cannot read unambiguously get `400`; paths no route matches get `404`/`405`.
#[tokio::test]
async fn no_spelling_of_a_protected_write_escapes_its_route() {
    let upstream = Upstream::start();
    let gateway = quickstart(&upstream);
    let port = gateway.port;
    let before = upstream.total_served().await;

    // (method, target, expected status)
    let mut cases: Vec<(String, String, u16)> = Vec::new();
    for method in ["DELETE", "PATCH", "PUT"] {
        for target in [
            "/products/2",
            "/products/2/",
            "//products/2",
            "/products//2",
            "/products/./2",
            "/products/x/../2",
            "/products/%32",
            "/%70roducts/2",
            "/products/02",
            "/products/+2",
            "/products/2/.",
            "/products/%2e/2",
            &format!("http://127.0.0.1:{port}/products/2/"),
        ] {
            cases.push((method.into(), target.into(), 401));
        }
        for target in [
            "/products/2;x",
            "/products;x/2",
            "/products%2F2",
            "/products/2%2f",
        ] {
            cases.push((method.into(), target.into(), 400));
        }
        // The origin's paths are case-sensitive: `/PRODUCTS/2` is no resource there, and no
        // route here.
        cases.push((method.into(), "/PRODUCTS/2".into(), 404));
        cases.push((method.to_lowercase(), "/products/2/".into(), 401));
    }
    for target in [
        "/products",
        "/products/",
        "//products",
        "/./products",
        "/products/.",
    ] {
        cases.push(("POST".into(), target.into(), 401));
        cases.push(("post".into(), target.into(), 401));
    }
    cases.push(("POST".into(), "/products/2".into(), 405));
    cases.push(("POST".into(), "/elsewhere".into(), 404));

    let mut wrong = Vec::new();
    for (method, target, expected) in &cases {
        let head = format!(
            "{method} {target} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\ncontent-length: 13"
        );
        let resp = raw_request(port, &head, br#"{"stock":999}"#).await;
        let problem = resp
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/problem+json"));
        if resp.status != *expected || !problem {
            wrong.push(format!(
                "{method} {target}: {} {:?}",
                resp.status, resp.body
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "not refused as expected:\n{}",
        wrong.join("\n")
    );
    assert_eq!(
        upstream.total_served().await,
        before,
        "no refused request reached the origin"
    );
    let product = Client::new()
        .get(&format!("{}/products/2", upstream.url()))
        .await;
    assert_eq!(product.status, 200, "product 2 still exists");
}

/// A write in any spelling purges the canonical entry: `PATCH /products/02/` purges what
/// `GET /products/2` cached, and the read after the write shows it.
#[tokio::test]
async fn a_write_in_any_spelling_purges_the_canonical_entry() {
    let upstream = Upstream::start();
    let gateway = quickstart(&upstream);
    let client = Client::new();
    let url = gateway.url("/products/3");
    let read = || client.get(&url);
    assert_eq!(read().await.header("x-cache"), Some("MISS"));
    assert_eq!(read().await.header("x-cache"), Some("HIT"));
    let hit = client.get(&gateway.url("/products/003/")).await;
    assert_eq!(
        hit.header("x-cache"),
        Some("HIT"),
        "`/products/003/` is the same entry"
    );

    let auth = format!("Bearer {}", writer_token());
    let write = client
        .send(
            Method::PATCH,
            &gateway.url("/products/03/"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            r#"{"stock":4242}"#,
        )
        .await;
    assert_eq!(write.status, 200, "{:?}", write.body);
    // The quickstart's write-through stores the PATCH answer as the entry of `/products/3`.
    let after = read().await;
    assert_eq!(
        after.json()["stock"],
        4242,
        "the read after the write shows it"
    );
    let spelled = client.get(&gateway.url("/products/3/")).await;
    assert_eq!(spelled.json()["stock"], 4242);
}

/// The rate limit of a route holds for every spelling of its path, on an origin whose paths are
/// case-insensitive and which strips `;` parameters (as servlet containers do).
#[tokio::test]
async fn no_spelling_escapes_a_rate_limit() {
    let upstream = Upstream::start();
    let config = config_for(
        &[&upstream.url()],
        r#"
[[routes]]
path = "/__headers"
rate_limit = { limits = [ { rate = "1/minute", burst = 1, key = "ip" } ] }
"#,
    );
    let gateway = Gateway::start(&with_server_settings(
        &config,
        "case_insensitive_paths = true\npath_parameters = \"strip\"",
    ));
    let client = Client::new();
    let first = client.get(&gateway.url("/__HEADERS/")).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.json()["uri"],
        "/__headers",
        "the origin receives the canonical spelling"
    );
    for spelling in [
        "/__headers",
        "/__HEADERS",
        "/__headers/",
        "/__headers;x=1",
        "//__headers",
        "/%5F_headers",
        "/./__Headers/.",
        "/x/../__headers",
    ] {
        let resp = client.get(&gateway.url(spelling)).await;
        assert_eq!(resp.status, 429, "{spelling} escaped the limit");
    }
    assert_eq!(upstream.served("ANY /__headers").await, 1);
}
