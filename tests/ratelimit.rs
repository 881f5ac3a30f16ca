//! Rate limiting against a real redis-server (and a real three-node Redis Cluster): exact limits
//! across gateway instances, standard headers, keys, trusted proxies, and Redis failures.

mod common;

use std::time::{Duration, Instant};

use common::{
    eventually, free_port, get, Client, Gateway, GatewayConfig, Redis, RedisCluster, Upstream,
};
use hyper::StatusCode;

const SECRET: &str = "rate-limit-test-secret-0123456789";

/// A gateway config with the given `[server]` lines, store section and routes.
fn config(upstream: &Upstream, server: &str, store: &str, routes: &str) -> String {
    let config = server
        .lines()
        .fold(GatewayConfig::new(&upstream.url()), GatewayConfig::server);
    config
        .section(store)
        .section(&format!(
            "[auth]\n[[auth.providers]]\nalgorithms = [\"HS256\"]\nsecret = \"{SECRET}\""
        ))
        .section(routes)
        .to_toml()
}

fn redis_store(redis: &Redis) -> String {
    format!("[store]\nredis_url = \"{}\"\ntimeout = \"50ms\"\ncircuit_failures = 2\ncircuit_open = \"300ms\"\n", redis.url())
}

fn token(sub: &str) -> String {
    common::hs256_token(SECRET, sub)
}

/// Sends `n` requests and returns how many were admitted (200).
async fn admitted(gateway: &Gateway, path: &str, headers: &[(&str, &str)], n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        let resp = get(gateway, path, headers).await;
        match resp.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!(
                "unexpected {other}: {:?}",
                String::from_utf8_lossy(&resp.body)
            ),
        }
    }
    ok
}

const PER_IP_5: &str = r#"
[[routes]]
name = "item"
path = "/products/{id}"
rate_limit = { limits = [ { rate = "5/minute", key = "ip", name = "per-ip" } ] }
"#;

async fn limit_triggers_exactly_at_n(store: &str, upstream: &Upstream) {
    let gateway = Gateway::start(&config(upstream, "", store, PER_IP_5));
    for expected_remaining in (0..5).rev() {
        let resp = get(&gateway, "/products/1", &[]).await;
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.header("ratelimit-policy"), Some("\"per-ip\";q=5;w=60"));
        let status = resp.header("ratelimit").unwrap();
        assert!(
            status.starts_with(&format!("\"per-ip\";r={expected_remaining};t=")),
            "{status}"
        );
    }
    let refused = get(&gateway, "/products/1", &[]).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=12).contains(&retry),
        "one request frees up every 12 s: Retry-After {retry}"
    );
    assert!(refused.header("ratelimit").unwrap().contains("r=0"));
    assert_eq!(
        upstream.served("GET /products/{id}").await,
        5,
        "the refused request never reached the upstream"
    );
}

#[tokio::test]
async fn limit_triggers_exactly_at_n_on_redis() {
    let redis = Redis::start();
    let upstream = Upstream::start();
    limit_triggers_exactly_at_n(&redis_store(&redis), &upstream).await;
    let keys = redis.cli(&["KEYS", "cachegate:rl:*"]);
    assert!(
        keys.contains("cachegate:rl:{item:per-ip:127.0.0.1}"),
        "the counter lives in Redis: {keys}"
    );
}

#[tokio::test]
async fn limit_triggers_exactly_at_n_on_the_memory_store() {
    let upstream = Upstream::start();
    limit_triggers_exactly_at_n("", &upstream).await;
}

/// `RateLimit-Policy` states each limit's quota as configured, whatever its burst
/// (draft-ietf-httpapi-ratelimit-headers); `RateLimit` gives what may be sent now; `Retry-After`
/// on a 429 is the time until one more request is admitted.
#[tokio::test]
async fn headers_state_the_configured_quota_and_retry_after_the_next_admission() {
    let upstream = Upstream::start();
    let routes = r#"
[[routes]]
path = "/products/{id}"
rate_limit = { limits = [ { rate = "50/10s", burst = 1, key = "ip", name = "fast" }, { rate = "600/minute", burst = 10, key = "ip", name = "minute" } ] }
"#;
    let gateway = Gateway::start(&config(&upstream, "", "", routes));
    let first = get(&gateway, "/products/1", &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"fast\";q=50;w=10, \"minute\";q=600;w=60")
    );
    let state = first.header("ratelimit").unwrap();
    assert!(
        state.starts_with("\"fast\";r=0;t=") && state.contains("\"minute\";r=9;t="),
        "{state}"
    );
    let refused = get(&gateway, "/products/1", &[]).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused.header("retry-after"),
        Some("1"),
        "one request per 200 ms, rounded up to a second"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        get(&gateway, "/products/1", &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn two_gateways_on_one_redis_admit_exactly_n_together() {
    let redis = Redis::start();
    let upstream = Upstream::start();
    let routes = r#"
[[routes]]
name = "item"
path = "/products/{id}"
rate_limit = { limits = [ { rate = "10/minute", key = "route" } ] }
"#;
    // A patient budget: this test is about exactness across instances, and a loaded machine
    // (the whole suite in parallel) can hold a first Redis call past 50 ms, which would hand the
    // decision to the local fallback — that behaviour has its own test below.
    let store = format!(
        "[store]\nredis_url = \"{}\"\ntimeout = \"2s\"\n",
        redis.url()
    );
    let a = Gateway::start(&config(&upstream, "", &store, routes));
    let b = Gateway::start(&config(&upstream, "", &store, routes));
    // 40 concurrent requests, half through each gateway.
    let client = Client::new();
    let calls = (0..40).map(|i| {
        let url = if i % 2 == 0 {
            a.url("/products/1")
        } else {
            b.url("/products/1")
        };
        let client = client.clone();
        async move { client.get(&url).await.status }
    });
    let statuses = futures_util::future::join_all(calls).await;
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let limited = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(
        (ok, limited),
        (10, 30),
        "exactly the limit in total, not per instance"
    );
    assert_eq!(upstream.served("GET /products/{id}").await, 10);
}

#[tokio::test]
async fn per_ip_and_per_user_keys_are_independent() {
    let redis = Redis::start();
    let upstream = Upstream::start();
    let routes = r#"
[[routes]]
name = "item"
path = "/products/{id}"
auth = "optional"
rate_limit = { limits = [ { rate = "2/minute", key = "user" } ] }

[[routes]]
name = "listing"
path = "/products"
rate_limit = { limits = [ { rate = "3/minute", key = "ip" }, { rate = "100/hour", key = ["route", "header:x-api-key"] } ] }
"#;
    let gateway = Gateway::start(&config(&upstream, "", &redis_store(&redis), routes));
    let alice = format!("Bearer {}", token("alice"));
    let bob = format!("Bearer {}", token("bob"));
    assert_eq!(
        admitted(&gateway, "/products/1", &[("authorization", &alice)], 4).await,
        2
    );
    assert_eq!(
        admitted(&gateway, "/products/1", &[("authorization", &bob)], 4).await,
        2,
        "bob has his own budget"
    );
    assert_eq!(
        admitted(&gateway, "/products/1", &[], 4).await,
        2,
        "anonymous requests count by IP"
    );
    // A separate route with a per-IP limit has its own counters too.
    assert_eq!(
        admitted(&gateway, "/products", &[("x-api-key", "k1")], 5).await,
        3
    );
    let listed = get(&gateway, "/products", &[("x-api-key", "k1")]).await;
    let status = listed.header("ratelimit").unwrap();
    assert!(
        status.contains("\"ip-3-per-1m\";r=0")
            && status.contains("\"route+header:x-api-key-100-per-1h\";r=97"),
        "{status}"
    );
}

/// API-key clients are limited per key, as Kong's key-auth users expect, without the key ever
/// becoming a Redis key: the counter is keyed by the credential's hash.
#[tokio::test]
async fn credentials_the_origin_checks_are_limited_per_credential_by_their_hash() {
    let redis = Redis::start();
    let upstream = Upstream::start();
    let routes = r#"
[[routes]]
name = "keyed"
path = "/products/{id}"
rate_limit = { limits = [ { rate = "2/minute", key = "credential:x-api-key" } ] }

[[routes]]
name = "opaque"
path = "/products"
rate_limit = { limits = [ { rate = "3/minute", key = "credential" } ] }
"#;
    let gateway = Gateway::start(&config(&upstream, "", &redis_store(&redis), routes));
    let key = |k: &'static str| [("x-api-key", k)];
    assert_eq!(
        admitted(&gateway, "/products/1", &key("key-one"), 4).await,
        2
    );
    assert_eq!(
        admitted(&gateway, "/products/1", &key("key-two"), 4).await,
        2,
        "another key has its own budget"
    );
    assert_eq!(
        admitted(&gateway, "/products/1", &[], 3).await,
        2,
        "requests without a key count by IP"
    );
    let opaque = [("authorization", "Bearer sk-opaque-1")];
    assert_eq!(admitted(&gateway, "/products", &opaque, 5).await, 3);
    assert_eq!(
        admitted(
            &gateway,
            "/products",
            &[("authorization", "Bearer sk-opaque-2")],
            1
        )
        .await,
        1
    );
    let keys = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--scan"])
        .output()
        .expect("running redis-cli");
    let keys = String::from_utf8_lossy(&keys.stdout);
    assert!(keys.contains("cred:"), "{keys}");
    for secret in ["key-one", "key-two", "sk-opaque"] {
        assert!(!keys.contains(secret), "{secret} in a Redis key: {keys}");
    }
}

#[tokio::test]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    let redis = Redis::start();
    let upstream = Upstream::start();
    let routes = r#"
[[routes]]
path = "/products/{id}"
rate_limit = { limits = [ { rate = "2/minute", key = "ip" } ] }
"#;
    // Untrusted peer: a spoofed X-Forwarded-For changes nothing.
    let untrusting = Gateway::start(&config(&upstream, "", &redis_store(&redis), routes));
    assert_eq!(
        admitted(
            &untrusting,
            "/products/1",
            &[("x-forwarded-for", "198.51.100.1")],
            2
        )
        .await,
        2
    );
    assert_eq!(
        admitted(
            &untrusting,
            "/products/1",
            &[("x-forwarded-for", "198.51.100.2")],
            2
        )
        .await,
        0,
        "same peer, same budget"
    );
    drop(untrusting);

    // Loopback trusted as a proxy: each forwarded client has its own budget.
    let redis2 = Redis::start();
    let trusting = Gateway::start(&config(
        &upstream,
        "trusted_proxies = [\"127.0.0.1/32\"]",
        &redis_store(&redis2),
        routes,
    ));
    assert_eq!(
        admitted(
            &trusting,
            "/products/1",
            &[("x-forwarded-for", "198.51.100.1")],
            3
        )
        .await,
        2
    );
    assert_eq!(
        admitted(
            &trusting,
            "/products/1",
            &[("x-forwarded-for", "198.51.100.2")],
            3
        )
        .await,
        2
    );
    assert_eq!(
        admitted(
            &trusting,
            "/products/1",
            &[("forwarded", "for=198.51.100.3")],
            3
        )
        .await,
        2
    );
}

#[tokio::test]
async fn redis_failures_follow_on_store_error_within_the_budget_and_recover() {
    let redis_port = free_port();
    let redis = Redis::start_on(redis_port);
    let upstream = Upstream::start();
    let routes = r#"
[rate_limit]
instances = 2

[[routes]]
name = "local"
path = "/products/{id}"
methods = ["GET"]
rate_limit = { limits = [ { rate = "4/minute", key = "ip", name = "l" } ], on_store_error = "local" }

[[routes]]
name = "allow"
path = "/products"
methods = ["GET"]
rate_limit = { limits = [ { rate = "1/minute", key = "ip", name = "a" } ], on_store_error = "allow" }

[[routes]]
name = "deny"
path = "/health"
rate_limit = { limits = [ { rate = "100/minute", key = "ip", name = "d" } ], on_store_error = "deny" }
"#;
    let gateway = Gateway::start(&config(&upstream, "", &redis_store(&redis), routes));
    assert_eq!(get(&gateway, "/health", &[]).await.status, StatusCode::OK);
    assert_eq!(
        get(&gateway, "/products/1", &[])
            .await
            .header("ratelimit-policy"),
        Some("\"l\";q=4;w=60")
    );

    // Redis hangs (stopped, so connections open but nothing answers): every request is decided
    // within the budget, by each route's on_store_error.
    redis.process.signal("STOP");
    let mut slowest = Duration::ZERO;
    let mut timed = |started: Instant| slowest = slowest.max(started.elapsed());
    // The local share (4 / 2 instances) starts used up: the shared bucket may have been empty
    // when Redis failed, and a fresh burst on every instance would exceed the limit. Its first
    // unit comes back after one interval of the share (60 s / 2).
    for _ in 0..5 {
        let started = Instant::now();
        let resp = get(&gateway, "/products/1", &[]).await;
        timed(started);
        assert_eq!(resp.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            resp.header("ratelimit-policy"),
            Some("\"l\";q=2;w=60"),
            "decided by the local share"
        );
        let retry: u64 = resp.header("retry-after").unwrap().parse().unwrap();
        assert!((25..=30).contains(&retry), "retry after {retry} s");
    }
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(
            get(&gateway, "/products", &[]).await.status,
            StatusCode::OK,
            "allow admits everything"
        );
        timed(started);
        let started = Instant::now();
        assert_eq!(
            get(&gateway, "/health", &[]).await.status,
            StatusCode::TOO_MANY_REQUESTS,
            "deny refuses everything"
        );
        timed(started);
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a request waited {slowest:?} for a hung Redis (budget 50 ms)"
    );

    // Redis killed and restarted empty on the same port: shared limiting resumes by itself.
    redis.process.signal("CONT");
    drop(redis);
    let _restarted = Redis::start_on(redis_port);
    assert!(
        eventually(Duration::from_secs(15), || async {
            get(&gateway, "/products/1", &[])
                .await
                .header("ratelimit-policy")
                == Some("\"l\";q=4;w=60")
        })
        .await,
        "shared limiting never resumed:\n{}",
        gateway.logs()
    );
    assert_eq!(get(&gateway, "/health", &[]).await.status, StatusCode::OK);
    assert_ne!(upstream.served("GET /health").await, 0);
}

#[tokio::test]
async fn failed_authentication_attempts_are_throttled_per_ip() {
    let redis = Redis::start();
    let upstream = Upstream::start();
    let routes = r#"
[rate_limit]
auth_failures = "3/minute"

[[routes]]
path = "/products/{id}"
auth = "required"
"#;
    let gateway = Gateway::start(&config(&upstream, "", &redis_store(&redis), routes));
    let valid = format!("Bearer {}", token("alice"));
    assert_eq!(
        get(&gateway, "/products/1", &[("authorization", &valid)])
            .await
            .status,
        StatusCode::OK
    );
    for i in 0..3 {
        let bad = format!("Bearer {}x", token(&format!("guess-{i}")));
        assert_eq!(
            get(&gateway, "/products/1", &[("authorization", &bad)])
                .await
                .status,
            StatusCode::UNAUTHORIZED
        );
    }
    let bad = format!("Bearer {}x", token("guess-4"));
    let throttled = get(&gateway, "/products/1", &[("authorization", &bad)]).await;
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(throttled.header("retry-after").is_some());
    // New tokens from that address are not even checked now; one already verified still works.
    let fresh = format!("Bearer {}", token("bob"));
    assert_eq!(
        get(&gateway, "/products/1", &[("authorization", &fresh)])
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        get(&gateway, "/products/1", &[("authorization", &valid)])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(upstream.served("GET /products/{id}").await, 2);
}

#[tokio::test]
async fn a_redis_cluster_enforces_the_limit_across_gateways() {
    let cluster = RedisCluster::start();
    let upstream = Upstream::start();
    let seeds: Vec<String> = cluster.seeds().iter().map(|s| format!("{s:?}")).collect();
    let store = format!(
        "[store]\nredis_cluster = [{}]\ntimeout = \"200ms\"\n",
        seeds.join(", ")
    );
    let routes = r#"
[[routes]]
name = "item"
path = "/products/{id}"
auth = "optional"
rate_limit = { limits = [ { rate = "6/minute", key = "route", name = "route" }, { rate = "4/minute", key = "user", name = "user" } ] }
"#;
    let a = Gateway::start(&config(&upstream, "", &store, routes));
    let b = Gateway::start(&config(&upstream, "", &store, routes));
    for gateway in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(15), || async {
                gateway.logs().contains("store: connected to Redis")
            })
            .await,
            "{}",
            gateway.logs()
        );
    }
    let alice = format!("Bearer {}", token("alice"));
    let bob = format!("Bearer {}", token("bob"));
    // Per user: 4 for alice across both gateways.
    let mut alice_ok = 0;
    for i in 0..6 {
        let gateway = if i % 2 == 0 { &a } else { &b };
        alice_ok += admitted(gateway, "/products/1", &[("authorization", &alice)], 1).await;
    }
    assert_eq!(alice_ok, 4);
    // The route-wide limit of 6 leaves 2 for bob.
    assert_eq!(
        admitted(&b, "/products/1", &[("authorization", &bob)], 4).await,
        2
    );
    assert_eq!(upstream.served("GET /products/{id}").await, 6);
    let keys = cluster.keys("cachegate:rl:*");
    assert_eq!(
        keys.len(),
        3,
        "route, alice and bob counters spread over the cluster: {keys:?}"
    );
}

#[tokio::test]
async fn a_password_protected_redis_is_used_through_its_url() {
    let port = free_port();
    let _redis = Redis::start_with(
        port,
        &["--port", &port.to_string(), "--requirepass", "s3cret-pw"],
    );
    let upstream = Upstream::start();
    let store = format!(
        "[store]\nredis_url = \"redis://:s3cret-pw@127.0.0.1:{port}\"\ntimeout = \"200ms\"\n"
    );
    let gateway = Gateway::start(&config(&upstream, "", &store, PER_IP_5));
    assert!(
        eventually(Duration::from_secs(10), || async {
            gateway.logs().contains("store: connected to Redis")
        })
        .await
    );
    assert!(
        !gateway.logs().contains("s3cret-pw"),
        "the password never reaches the log"
    );
    assert_eq!(admitted(&gateway, "/products/1", &[], 7).await, 5);
    let keys = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &port.to_string(),
            "-a",
            "s3cret-pw",
            "--no-auth-warning",
            "KEYS",
            "cachegate:rl:*",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&keys.stdout).contains("per-ip"),
        "counted in the protected Redis"
    );
}

#[tokio::test]
async fn rediss_with_a_private_ca_and_an_acl_user() {
    let dir = tempfile::TempDir::new().unwrap();
    let (cert, key, _) = common::self_signed_cert(dir.path());
    let port = free_port();
    let port_text = port.to_string();
    let _redis = Redis::start_with(
        port,
        &[
            "--port",
            "0",
            "--tls-port",
            &port_text,
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-ca-cert-file",
            cert.to_str().unwrap(),
            "--tls-auth-clients",
            "no",
            "--user",
            "default",
            "off",
            "--user",
            "gateway",
            "on",
            ">gw-pass",
            "~*",
            "&*",
            "+@all",
        ],
    );
    let upstream = Upstream::start();
    let store = format!(
        "[store]\nredis_url = \"rediss://gateway:gw-pass@127.0.0.1:{port}\"\ntls_ca_file = \"{}\"\ntimeout = \"300ms\"\n",
        cert.display()
    );
    let gateway = Gateway::start(&config(&upstream, "", &store, PER_IP_5));
    assert!(
        eventually(Duration::from_secs(10), || async {
            gateway.logs().contains("store: connected to Redis")
        })
        .await,
        "{}",
        gateway.logs()
    );
    assert_eq!(
        admitted(&gateway, "/products/1", &[], 7).await,
        5,
        "the limit is counted in the TLS Redis"
    );
}

#[tokio::test]
async fn the_memory_store_is_exact_under_concurrency() {
    let upstream = Upstream::start();
    let config = config(
        &upstream,
        "",
        "",
        r#"
[[routes]]
name = "item"
path = "/products/{id}"
rate_limit = { limits = [ { rate = "10/minute", key = "route" }, { rate = "1000/minute", key = "ip" } ] }
"#,
    )
    .replace("threads = 1", "threads = 2");
    let gateway = Gateway::start(&config);
    let client = Client::new();
    let calls = (0..60).map(|_| {
        let (client, url) = (client.clone(), gateway.url("/products/1"));
        async move { client.get(&url).await.status }
    });
    let statuses = futures_util::future::join_all(calls).await;
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(
        ok, 10,
        "two worker threads, one in-process limit: exactly 10 admitted"
    );
    assert_eq!(upstream.served("GET /products/{id}").await, 10);
}
