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

/// The HMAC secret of [`hs256_gateway`].
const SECRET: &str = "trust-test-secret-0123456789abcdef";

/// A gateway verifying HS256 tokens signed with [`SECRET`]; `auth` adds to `[auth]`, `rest`
/// follows it (routes, a store).
fn hs256_gateway(upstream: &Upstream, auth: &str, rest: &str) -> Gateway {
    Gateway::start(&config_for(
        &[&upstream.url()],
        &format!(
            r#"
[auth]
realm = "test"
{auth}
[[auth.providers]]
algorithms = ["HS256"]
secret = "{SECRET}"
{rest}
"#
        ),
    ))
}

/// A gateway that admits one request a minute per client IP on `/__headers`, with more
/// `[server]` settings.
fn one_a_minute_gateway(upstream: &Upstream, server: &str) -> Gateway {
    let config = config_for(
        &[&upstream.url()],
        r#"
[[routes]]
path = "/__headers"
rate_limit = { limits = [ { rate = "1/minute", burst = 1, key = "ip" } ] }
"#,
    );
    Gateway::start(&with_server_settings(&config, server))
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
    let gateway = one_a_minute_gateway(
        &upstream,
        "case_insensitive_paths = true\npath_parameters = \"strip\"",
    );
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

/// A gateway caching `/__headers` (which echoes what the origin received) for a minute.
fn echo_cache_gateway(upstream: &Upstream, server: &str, rule: &str) -> Gateway {
    let config = config_for(
        &[&upstream.url()],
        &format!(
            r#"
[[routes]]
path = "/__headers"
methods = ["GET", "HEAD"]
cache = {{ ttl = "60s" {rule} }}
"#
        ),
    );
    Gateway::start(&with_server_settings(&config, server))
}

/// Headers that make origins act on another method, URL, scheme or host never reach the origin
/// from a client (in any spelling), so they cannot poison what the cache stores for everyone.
#[tokio::test]
async fn override_and_forwarding_headers_cannot_poison_the_cache() {
    let upstream = Upstream::start();
    let gateway = echo_cache_gateway(&upstream, "", "");
    let hostile = [
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
        ("x-forwarded-prefix", "/evil"),
        ("x-forwarded-scheme", "http"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-server", "evil.example"),
        ("x-forwarded-port", "1"),
        ("x_forwarded_host", "evil.example"),
        ("x_http_method_override", "DELETE"),
        ("forwarded", "for=1.2.3.4;host=evil.example;proto=http"),
        ("x-forwarded-for", "1.2.3.4"),
        ("x-real-ip", "1.2.3.4"),
    ];
    let first = Client::new()
        .send(Method::GET, &gateway.url("/__headers"), &hostile, "")
        .await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let seen = first.json()["headers"].clone();
    for (name, _) in hostile {
        if name == "x-forwarded-for" || name == "x-forwarded-host" {
            continue;
        }
        assert!(
            seen.get(name).is_none(),
            "{name} reached the origin: {seen}"
        );
    }
    assert_eq!(
        seen["x-forwarded-for"],
        json!(["127.0.0.1"]),
        "replaced, not appended"
    );
    assert_eq!(
        seen["x-forwarded-host"],
        json!([format!("127.0.0.1:{}", gateway.port)])
    );
    let clean = Client::new().get(&gateway.url("/__headers")).await;
    assert_eq!(clean.header("x-cache"), Some("HIT"));
    assert_eq!(
        clean.json()["headers"],
        seen,
        "what was stored is the clean answer"
    );
}

/// An override header the operator lets through reaches the origin, and then the cache stays
/// out of the way unless the rule keys on it.
#[tokio::test]
async fn a_forwarded_override_header_bypasses_the_cache_unless_keyed() {
    let upstream = Upstream::start();
    let gateway = echo_cache_gateway(
        &upstream,
        r#"forward_override_headers = ["X-HTTP-Method-Override"]"#,
        "",
    );
    let client = Client::new();
    let overridden = client
        .send(
            Method::GET,
            &gateway.url("/__headers"),
            &[("x-http-method-override", "PUT")],
            "",
        )
        .await;
    assert_eq!(overridden.header("x-cache"), Some("BYPASS"));
    assert_eq!(
        overridden.json()["headers"]["x-http-method-override"],
        json!(["PUT"])
    );
    assert_eq!(
        client
            .get(&gateway.url("/__headers"))
            .await
            .header("x-cache"),
        Some("MISS")
    );

    let keyed = echo_cache_gateway(&upstream, "", r#", vary = ["x-http-method-override"]"#);
    let keyed_url = keyed.url("/__headers");
    let send = |value: &'static str| {
        let (client, url) = (client.clone(), keyed_url.clone());
        async move {
            let headers: &[(&str, &str)] = if value.is_empty() {
                &[]
            } else {
                &[("x-http-method-override", value)]
            };
            client.send(Method::GET, &url, headers, "").await
        }
    };
    assert_eq!(send("PUT").await.header("x-cache"), Some("MISS"));
    assert_eq!(send("PUT").await.header("x-cache"), Some("HIT"));
    let clean = send("").await;
    assert_eq!(
        clean.header("x-cache"),
        Some("MISS"),
        "keyed: the variants are apart"
    );
    assert!(clean.json()["headers"]
        .get("x-http-method-override")
        .is_none());
}

/// A GET with a body goes to the origin uncached and stores nothing; a request with a cookie
/// stores nothing on a shared rule unless the rule allows cookies.
#[tokio::test]
async fn fat_gets_and_cookies_do_not_fill_the_shared_cache() {
    let upstream = Upstream::start();
    let gateway = echo_cache_gateway(&upstream, "", "");
    let client = Client::new();
    let fat = client
        .send(
            Method::GET,
            &gateway.url("/__headers"),
            &[],
            "{\"role\":\"admin\"}",
        )
        .await;
    assert_eq!(fat.header("x-cache"), Some("BYPASS"));
    let with_cookie = client
        .send(
            Method::GET,
            &gateway.url("/__headers"),
            &[("cookie", "session=alice")],
            "",
        )
        .await;
    assert_eq!(with_cookie.status, 200);
    let anonymous = client.get(&gateway.url("/__headers")).await;
    assert_eq!(
        anonymous.header("x-cache"),
        Some("MISS"),
        "nothing was stored before"
    );
    assert!(anonymous.json()["headers"].get("cookie").is_none());
    let cookie_again = client
        .send(
            Method::GET,
            &gateway.url("/__headers"),
            &[("cookie", "session=bob")],
            "",
        )
        .await;
    assert_ne!(
        cookie_again.header("x-cache"),
        Some("HIT"),
        "a cookie is not served the shared entry"
    );
    assert_eq!(
        cookie_again.json()["headers"]["cookie"],
        json!(["session=bob"])
    );

    let allowing = echo_cache_gateway(&upstream, "", ", allow_cookies = true");
    let url = allowing.url("/__headers");
    let cookie = [("cookie", "theme=dark")];
    assert_eq!(
        client
            .send(Method::GET, &url, &cookie, "")
            .await
            .header("x-cache"),
        Some("MISS")
    );
    assert_eq!(client.get(&url).await.header("x-cache"), Some("HIT"));
}

/// A request the gateway authenticated is authorised for RFC 9111 §3.5 even when its token is
/// removed before the origin (`strip_authorization`) or came from a cookie: its answer is not
/// shared with other users.
#[tokio::test]
async fn authenticated_answers_stay_out_of_the_shared_tier() {
    let upstream = Upstream::start();
    let gateway = hs256_gateway(
        &upstream,
        r#"cookie = "session""#,
        r#"
[[routes]]
path = "/__headers"
auth = { mode = "required", strip_authorization = true, forward_claims = { sub = "X-User-Id" } }
cache = { ttl = "60s" }
"#,
    );
    let client = Client::new();
    let url = gateway.url("/__headers");
    for (user, how) in [
        ("alice", "header"),
        ("bob", "header"),
        ("carol", "cookie"),
        ("dave", "cookie"),
    ] {
        let token = hs256_token(SECRET, user);
        let (name, value) = match how {
            "header" => ("authorization", format!("Bearer {token}")),
            _ => ("cookie", format!("session={token}")),
        };
        let resp = client.send(Method::GET, &url, &[(name, &value)], "").await;
        assert_eq!(resp.status, 200, "{user}: {:?}", resp.body);
        assert_eq!(
            resp.header("x-cache"),
            Some("MISS"),
            "{user}: never answered from another's entry"
        );
        assert_eq!(
            resp.json()["headers"]["x-user-id"],
            json!([user]),
            "{user} got its own answer"
        );
        assert!(resp.json()["headers"].get("authorization").is_none());
    }
}

/// Query strings are keyed decoded and in order: `?a=1&b=2` and `?b=2&a=1` are two entries,
/// `?a=1&b=%32` is the first; a listed parameter counts in any spelling.
#[tokio::test]
async fn query_keys_keep_order_and_compare_decoded() {
    let upstream = Upstream::start();
    let gateway = echo_cache_gateway(&upstream, "", "");
    let client = Client::new();
    let x_cache = |path: &'static str| {
        let url = gateway.url(path);
        let client = client.clone();
        async move { client.get(&url).await.header("x-cache").map(str::to_owned) }
    };
    assert_eq!(x_cache("/__headers?a=1&b=2").await.as_deref(), Some("MISS"));
    assert_eq!(x_cache("/__headers?b=2&a=1").await.as_deref(), Some("MISS"));
    assert_eq!(
        x_cache("/__headers?a=1&b=%32").await.as_deref(),
        Some("HIT")
    );
    assert_eq!(
        x_cache("/__headers?a=1&b=2&a=1").await.as_deref(),
        Some("MISS")
    );

    let listed = echo_cache_gateway(&upstream, "", r#", query = ["page"]"#);
    let x_cache = |path: &'static str| {
        let url = listed.url(path);
        let client = client.clone();
        async move { client.get(&url).await.header("x-cache").map(str::to_owned) }
    };
    assert_eq!(x_cache("/__headers").await.as_deref(), Some("MISS"));
    assert_eq!(
        x_cache("/__headers?pag%65=9").await.as_deref(),
        Some("MISS"),
        "not the page-less entry"
    );
    assert_eq!(
        x_cache("/__headers?page=9&utm=x").await.as_deref(),
        Some("HIT")
    );
}

/// Headers the gateway sets survive anything the client sends: a `Connection` header naming
/// one, an underscore spelling, several `Content-Length` values.
#[tokio::test]
async fn gateway_headers_and_framing_cannot_be_tampered_with() {
    let upstream = Upstream::start();
    let gateway = hs256_gateway(
        &upstream,
        "",
        r#"
[[routes]]
path = "/__headers"
auth = { mode = "required", forward_claims = { sub = "X-User-Id" } }
"#,
    );
    let port = gateway.port;
    let token = hs256_token(SECRET, "alice");
    let base = format!(
        "POST /__headers HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {token}"
    );

    let resp = raw_request(
        port,
        &format!("{base}\r\nconnection: close, X-User-Id, X-Request-Id\r\nX_User_Id: mallory\r\nx-user-id: mallory\r\ncontent-length: 2"),
        b"{}",
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let seen = resp.json()["headers"].clone();
    assert_eq!(seen["x-user-id"], json!(["alice"]), "{seen}");
    assert!(seen.get("x_user_id").is_none(), "{seen}");
    assert!(seen.get("x-request-id").is_some());
    // Naming `X-Forwarded-For` in `Connection` is refused outright, or has no effect.
    let resp = raw_request(
        port,
        &format!("{base}\r\nconnection: close, X-Forwarded-For\r\ncontent-length: 2"),
        b"{}",
    )
    .await;
    match resp.status {
        400 => {}
        200 => assert_eq!(
            resp.json()["headers"]["x-forwarded-for"],
            json!(["127.0.0.1"])
        ),
        other => panic!("unexpected {other}: {}", resp.body),
    }

    // Equal values in separate fields go on as one.
    let resp = raw_request(
        port,
        &format!("{base}\r\ncontent-length: 2\r\ncontent-length: 2"),
        b"{}",
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(
        resp.json()["headers"]["content-length"],
        json!(["2"]),
        "one Content-Length goes on"
    );

    // A listed value (even of equal lengths) and different values are refused (RFC 9112 §6.3
    // lets a server reject any invalid Content-Length), and never forwarded.
    let before = upstream.served("ANY /__headers").await;
    for framing in [
        "content-length: 2, 2",
        "content-length: 2\r\ncontent-length: 3",
        "content-length: 2, 3",
    ] {
        let resp = raw_request(port, &format!("{base}\r\n{framing}"), b"{}").await;
        assert_eq!(resp.status, 400, "{framing}: {}", resp.body);
        assert_eq!(
            upstream.served("ANY /__headers").await,
            before,
            "{framing}: ambiguous framing is never forwarded"
        );
    }
}

/// Absolute-form targets (with a query) are routed like origin-form ones, their authority is the
/// Host; absurd numbers from the origin (`max-age`, `Age`, `s-maxage`, far `Expires`) neither
/// crash the gateway nor wrap around into nonsense.
#[tokio::test]
async fn absolute_form_and_absurd_numbers_do_not_break_anything() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(
        &[&upstream.url()],
        r#"
[[routes]]
path = "/__respond"
cache = { ttl = "60s", stale_while_revalidate = "10s", stale_if_error = "10s" }
"#,
    ));
    let port = gateway.port;
    let resp = raw_request(
        port,
        &format!(
            "GET http://127.0.0.1:{port}/__headers?x=1&y=%20 HTTP/1.1\r\nhost: 127.0.0.1:{port}"
        ),
        b"",
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(
        resp.json()["uri"],
        "/__headers?x=1&y=%20",
        "origin-form upstream"
    );
    assert_eq!(
        resp.json()["headers"]["host"],
        json!([format!("127.0.0.1:{port}")])
    );
    let resp = raw_request(
        port,
        &format!(
            "GET http://127.0.0.1:{port}/x/../__headers?x=1 HTTP/1.1\r\nhost: 127.0.0.1:{port}"
        ),
        b"",
    )
    .await;
    assert_eq!(resp.json()["uri"], "/__headers?x=1");
    // A target authority that disagrees with Host is ambiguous: refused, never forwarded.
    let before = upstream.served("ANY /__headers").await;
    let resp = raw_request(
        port,
        &format!("GET http://127.0.0.1:{port}/__headers?x=1 HTTP/1.1\r\nhost: elsewhere.example"),
        b"",
    )
    .await;
    assert_eq!(resp.status, 400);
    assert_eq!(
        resp.header("content-type"),
        Some("application/problem+json"),
        "{}",
        resp.body
    );
    assert_eq!(upstream.served("ANY /__headers").await, before);

    // Raw non-ASCII bytes beside dots in a path (found by the property tests: a panic once).
    for target in ["/\u{e9}../__headers", "/\u{1f600}%2e/x", "/a/\u{1f600}..;x"] {
        let resp = raw_request(port, &format!("GET {target} HTTP/1.1\r\nhost: x"), b"").await;
        assert!(
            matches!(resp.status, 200 | 400 | 404),
            "{target}: {}",
            resp.status
        );
    }

    let client = Client::new();
    for query in [
        "cache-control=max-age%3D18446744073709551616&age=18446744073709551615",
        "cache-control=s-maxage%3D99999999999999999999999999%2C%20stale-while-revalidate%3D18446744073709551615",
        "expires=Fri%2C%2031%20Dec%209999%2023%3A59%3A59%20GMT&age=4000",
        "cache-control=max-age%3D2147483648&age=3a",
        "cache-control=stale-if-error%3D18446744073709551615%2C%20max-age%3D0&etag=%22v%22",
    ] {
        for round in 0..2 {
            let resp = client.get(&gateway.url(&format!("/__respond?{query}"))).await;
            assert_eq!(resp.status, 200, "{query} (round {round})");
            // On a miss the origin's own `Age` passes through; what the cache computes is bounded.
            if resp.header("x-cache") != Some("MISS") {
                let age: u64 = resp.header("age").unwrap().parse().expect("Age is a number");
                assert!(age <= 1 << 31, "{query}: Age {age}");
            }
            if round == 1 && (query.starts_with("cache-control=s-maxage") || query.starts_with("expires")) {
                assert_eq!(resp.header("x-cache"), Some("HIT"), "{query}: a huge lifetime is just long");
            }
        }
    }
    assert_eq!(
        client.get(&gateway.url("/__headers")).await.status,
        200,
        "still serving"
    );
}

/// IPv6 clients are limited by their /64 (by default): rotating through the addresses of one
/// network does not buy more requests; another network has its own budget.
#[tokio::test]
async fn ipv6_clients_are_limited_by_their_network() {
    let upstream = Upstream::start();
    let gateway = one_a_minute_gateway(&upstream, r#"trusted_proxies = ["127.0.0.1"]"#);
    let client = Client::new();
    let from = |ip: &'static str| {
        let (client, url) = (client.clone(), gateway.url("/__headers"));
        async move {
            client
                .send(Method::GET, &url, &[("x-forwarded-for", ip)], "")
                .await
                .status
        }
    };
    assert_eq!(from("2001:db8:1:2::1").await, 200);
    assert_eq!(from("2001:db8:1:2::2").await, 429, "same /64");
    assert_eq!(
        from("2001:db8:1:2:ffff:ffff:ffff:ffff").await,
        429,
        "same /64"
    );
    assert_eq!(from("2001:db8:1:3::1").await, 200, "another /64");
}

/// Secrets stay out of the logs: a Redis password in the store URL, the tokens clients send.
#[tokio::test]
async fn secrets_stay_out_of_the_logs() {
    let upstream = Upstream::start();
    let dead = free_port();
    let gateway = hs256_gateway(
        &upstream,
        "",
        &format!(
            r#"
[[routes]]
path = "/__headers"
auth = "required"
[store]
redis_url = "redis://cachegate:hunter2-redis@127.0.0.1:{dead}/0"
"#
        ),
    );
    let token = hs256_token(SECRET, "alice");
    let resp = Client::new()
        .send(
            Method::GET,
            &gateway.url("/__headers"),
            &[("authorization", &format!("Bearer {token}"))],
            "",
        )
        .await;
    assert_eq!(resp.status, 200);
    let bad = Client::new()
        .send(
            Method::GET,
            &gateway.url("/__headers"),
            &[("authorization", "Bearer not.a-valid.token-secret-x")],
            "",
        )
        .await;
    assert_eq!(bad.status, 401);
    assert!(
        eventually(std::time::Duration::from_secs(5), || async {
            gateway.logs().contains("Redis is not reachable")
        })
        .await,
        "the store's failure is logged: {}",
        gateway.logs()
    );
    let logs = gateway.logs();
    for secret in [
        "hunter2-redis",
        &token,
        "not.a-valid.token-secret-x",
        SECRET,
    ] {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }
}

/// Requests whose framing or header syntax two HTTP parsers could read differently are refused
/// and never reach the origin (RFC 9112 §5, §6): obs-fold, whitespace before a colon, a bare CR,
/// a transfer coding that does not end in chunked, a length that is not plain digits.
#[tokio::test]
async fn ambiguous_messages_are_refused_and_never_forwarded() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(&[&upstream.url()], ""));
    let port = gateway.port;
    let before = upstream.served("ANY /__headers").await;
    for (extra, body) in [
        ("content-length: 2\r\nx-a: 1\r\n 2", "{}"),
        ("content-length: 2\r\nx-a : 1", "{}"),
        ("content-length: 2\r\nx-a: 1\r2", "{}"),
        ("transfer-encoding: gzip", "{}"),
        ("transfer-encoding: chunked, gzip", "2\r\n{}\r\n0\r\n\r\n"),
        ("content-length: +2", "{}"),
        ("content-length: 0x2", "{}"),
        ("content-length: 2\r\ncontent-length: 3", "{}"),
        // Chunked twice.
        (
            "transfer-encoding: chunked, chunked",
            "2\r\n{}\r\n0\r\n\r\n",
        ),
        (
            "transfer-encoding: chunked\r\ntransfer-encoding: chunked",
            "2\r\n{}\r\n0\r\n\r\n",
        ),
    ] {
        let resp = raw_request(
            port,
            &format!("POST /__headers HTTP/1.1\r\nhost: x\r\n{extra}"),
            body.as_bytes(),
        )
        .await;
        assert_eq!(resp.status, 400, "{extra:?}: {}", resp.body);
    }
    assert_eq!(upstream.served("ANY /__headers").await, before);

    // Both framings at once (request smuggling's classic), in either order: hyper's parser takes
    // the other course RFC 9112 §6.1 allows — chunked wins, Content-Length is dropped, and the
    // connection closes after the response. The origin sees one unambiguous framing, and what
    // follows the chunked body is never read as another request.
    for framing in [
        "content-length: 2\r\ntransfer-encoding: chunked",
        "transfer-encoding: chunked\r\ncontent-length: 2",
    ] {
        let before = upstream.served("ANY /__headers").await;
        let resp = raw_request(
            port,
            &format!("POST /__headers HTTP/1.1\r\nhost: x\r\n{framing}\r\nconnection: keep-alive"),
            b"2\r\n{}\r\n0\r\n\r\nGET /__headers?smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await;
        match resp.status {
            400 => {}
            200 => {
                let seen = &resp.json()["headers"];
                assert!(seen.get("content-length").is_none(), "{seen}");
                assert_eq!(seen["transfer-encoding"], json!(["chunked"]), "{seen}");
                assert_eq!(resp.header("connection"), Some("close"), "{framing:?}");
            }
            other => panic!("unexpected {other}: {}", resp.body),
        }
        assert_eq!(
            upstream.served("ANY /__headers").await,
            before + u64::from(resp.status == 200),
            "{framing:?}: the request after the body was not smuggled through"
        );
    }
}
