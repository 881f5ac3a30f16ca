//! The in-process cache tier against the real upstream: hits and misses proven by the origin's
//! own counters, RFC 9111 storability, variants, query rules, per-user isolation, and
//! authentication before the cache.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{free_port, get, x_cache, Client, Gateway, GatewayConfig, Response, Upstream};
use hyper::{Method, StatusCode};

const SECRET: &str = "cache-test-secret-0123456789abcdef";

fn token(sub: &str) -> String {
    common::hs256_token(SECRET, sub)
}

fn gateway(upstream: &Upstream, admin_port: u16, routes: &str) -> Gateway {
    GatewayConfig::new(&upstream.url())
        .admin_on(admin_port, "")
        .section(&format!(
            "[auth]\n[[auth.providers]]\nalgorithms = [\"HS256\"]\nsecret = \"{SECRET}\""
        ))
        .section(routes)
        .start()
}

#[tokio::test]
async fn a_miss_fills_and_then_hits_head_and_conditionals_are_answered() {
    let upstream = Upstream::start();
    let admin_port = free_port();
    let gw = gateway(
        &upstream,
        admin_port,
        "[[routes]]\npath = \"/products/{id}\"\ncache = { ttl = \"30s\" }\n",
    );

    let miss = get(&gw, "/products/1", &[]).await;
    assert_eq!((miss.status, x_cache(&miss)), (StatusCode::OK, "MISS"));
    assert_eq!(
        miss.header("cache-status"),
        Some("cachegate; fwd=miss; stored")
    );
    let hit = get(&gw, "/products/1", &[]).await;
    assert_eq!((hit.status, x_cache(&hit)), (StatusCode::OK, "HIT"));
    assert!(hit
        .header("cache-status")
        .unwrap()
        .starts_with("cachegate; hit; ttl="));
    assert!(hit.header("age").is_some());
    assert_eq!(hit.body, miss.body);
    assert_eq!(hit.header("etag"), miss.header("etag"));
    assert!(
        hit.header("x-request-id").is_some()
            && hit.header("x-request-id") != miss.header("x-request-id")
    );

    let head = Client::new()
        .send(Method::HEAD, &gw.url("/products/1"), &[], Bytes::new())
        .await;
    assert_eq!(
        (head.status, x_cache(&head)),
        (StatusCode::OK, "HIT"),
        "HEAD is answered from the stored GET"
    );
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        Some(miss.body.len().to_string().as_str())
    );

    let etag = miss.header("etag").unwrap().to_owned();
    let not_modified = get(&gw, "/products/1", &[("if-none-match", &etag)]).await;
    assert_eq!(
        (not_modified.status, x_cache(&not_modified)),
        (StatusCode::NOT_MODIFIED, "HIT")
    );
    assert!(not_modified.body.is_empty());
    let changed = get(&gw, "/products/1", &[("if-none-match", "\"other\"")]).await;
    assert_eq!(changed.status, StatusCode::OK);

    assert_eq!(
        upstream.served("GET /products/{id}").await,
        1,
        "one origin request for five answers"
    );
    let stats = Client::new()
        .get(&format!("http://127.0.0.1:{admin_port}/cache/stats"))
        .await
        .json();
    assert_eq!(stats["tiers"]["memory"]["entries"], 1);
    assert_eq!(
        (stats["hits"].as_u64(), stats["misses"].as_u64()),
        (Some(4), Some(1))
    );

    let metrics = Client::new()
        .get(&format!("http://127.0.0.1:{admin_port}/metrics"))
        .await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for line in [
        r#"cachegate_cache_results_total{result="hit",route="/products/{id}",tier="memory"} 4"#,
        r#"cachegate_cache_results_total{result="miss",route="/products/{id}",tier="memory"} 1"#,
        "cachegate_cache_memory_entries 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
}

#[tokio::test]
async fn the_memory_tier_stays_within_its_byte_bound() {
    let upstream = Upstream::start();
    let admin_port = free_port();
    let gw = gateway(
        &upstream,
        admin_port,
        "[cache]\nmemory_capacity = \"2KiB\"\n[[routes]]\npath = \"/products/{id}\"\ncache = { ttl = \"30s\" }\n",
    );
    for id in 1..=30 {
        assert_eq!(
            get(&gw, &format!("/products/{id}"), &[]).await.status,
            StatusCode::OK
        );
    }
    let stats = Client::new()
        .get(&format!("http://127.0.0.1:{admin_port}/cache/stats"))
        .await
        .json();
    let bytes = stats["tiers"]["memory"]["bytes"].as_u64().unwrap();
    assert!(bytes <= 2048, "{bytes} bytes held with a 2 KiB bound");
    assert!(stats["tiers"]["memory"]["entries"].as_u64().unwrap() < 30);
    let text = String::from_utf8(
        Client::new()
            .get(&format!("http://127.0.0.1:{admin_port}/metrics"))
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    let evicted: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("cachegate_cache_memory_evictions_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(evicted > 0.0, "evictions are counted:\n{text}");
}

#[tokio::test]
async fn entries_expire_with_their_freshness() {
    let upstream = Upstream::start();
    let gw = gateway(
        &upstream,
        free_port(),
        "[[routes]]\npath = \"/products/{id}\"\ncache = { ttl = \"1s\" }\n",
    );
    assert_eq!(x_cache(&get(&gw, "/products/2", &[]).await), "MISS");
    assert_eq!(x_cache(&get(&gw, "/products/2", &[]).await), "HIT");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_ne!(
        x_cache(&get(&gw, "/products/2", &[]).await),
        "HIT",
        "stale after the ttl: the origin is asked again"
    );
    assert_eq!(upstream.served("GET /products/{id}").await, 2);
}

#[tokio::test]
async fn stale_entries_are_revalidated_with_their_validators() {
    let upstream = Upstream::start();
    let gw = gateway(
        &upstream,
        free_port(),
        "[[routes]]\npath = \"/products/{id}\"\ncache = { ttl = \"1s\" }\n",
    );
    let first = get(&gw, "/products/2", &[]).await;
    assert_eq!(x_cache(&first), "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let revalidated = get(&gw, "/products/2", &[]).await;
    assert_eq!(
        (revalidated.status, x_cache(&revalidated)),
        (StatusCode::OK, "REVALIDATED")
    );
    assert_eq!(
        revalidated.body, first.body,
        "the stored body, not a refetch"
    );
    assert!(
        revalidated
            .header("cache-status")
            .unwrap()
            .starts_with("cachegate; fwd=stale; fwd-status=304; stored"),
        "{:?}",
        revalidated.header("cache-status")
    );
    assert_eq!(upstream.served("GET /products/{id} 304").await, 1);
    assert_eq!(
        x_cache(&get(&gw, "/products/2", &[]).await),
        "HIT",
        "the 304 made it fresh again"
    );

    // The client's own condition is answered from the revalidated entry.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let etag = first.header("etag").unwrap().to_owned();
    let conditional = get(&gw, "/products/2", &[("if-none-match", &etag)]).await;
    assert_eq!(
        (conditional.status, x_cache(&conditional)),
        (StatusCode::NOT_MODIFIED, "REVALIDATED")
    );
    assert_eq!(upstream.served("GET /products/{id} 304").await, 2);

    // Changed at the origin: the conditional request brings the new representation.
    let changed = Client::new()
        .send(
            Method::PATCH,
            &format!("{}/products/2", upstream.url()),
            &[("content-type", "application/json")],
            Bytes::from_static(br#"{"stock": 4242}"#),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fetched = get(&gw, "/products/2", &[]).await;
    assert_eq!(
        (fetched.status, x_cache(&fetched)),
        (StatusCode::OK, "MISS")
    );
    assert_eq!(fetched.body, changed.body);
    assert_eq!(x_cache(&get(&gw, "/products/2", &[]).await), "HIT");
    assert_eq!(upstream.served("GET /products/{id}").await, 4);
    assert_eq!(upstream.served("GET /products/{id} 304").await, 2);
}

#[tokio::test]
async fn no_cache_responses_are_stored_but_revalidated_before_each_use() {
    let upstream = Upstream::start();
    let gw = gateway(
        &upstream,
        free_port(),
        "[[routes]]\npath = \"/__respond\"\ncache = { ttl = \"30s\" }\n",
    );
    let path = "/__respond?cache-control=no-cache&etag=%22v1%22";
    let first = get(&gw, path, &[]).await;
    assert_eq!(
        first.header("cache-status"),
        Some("cachegate; fwd=miss; stored")
    );
    for round in 1..=2 {
        let again = get(&gw, path, &[]).await;
        assert_eq!(x_cache(&again), "REVALIDATED", "round {round}");
        assert_eq!(again.body, first.body);
        assert_eq!(upstream.served("GET /__respond 304").await, round);
    }
}

#[tokio::test]
async fn origin_5xx_answers_are_replaced_by_stale_entries_unless_the_origin_forbids_it() {
    let upstream = Upstream::start();
    let gw = gateway(
        &upstream,
        free_port(),
        "[[routes]]\npath = \"/__respond\"\ncache = { ttl = \"1s\", stale_if_error = \"30s\" }\n",
    );
    // `/__respond` answers 503 once it has answered `fail-after` times in all.
    let tolerant = "/__respond?case=tolerant&fail-after=2";
    let strict =
        "/__respond?case=strict&fail-after=2&cache-control=max-age%3D1%2C%20must-revalidate";
    let stored = get(&gw, tolerant, &[]).await;
    assert_eq!(x_cache(&stored), "MISS");
    assert_eq!(x_cache(&get(&gw, strict, &[]).await), "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let stale = get(&gw, tolerant, &[]).await;
    assert_eq!((stale.status, x_cache(&stale)), (StatusCode::OK, "STALE"));
    assert_eq!(stale.body, stored.body);
    assert_eq!(
        stale.header("cache-status"),
        Some("cachegate; fwd=stale; detail=stale-if-error")
    );
    let failed = get(&gw, strict, &[]).await;
    assert_eq!(
        failed.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "must-revalidate: a stale entry is never served"
    );
    assert_eq!(upstream.served("GET /__respond").await, 4);
}

#[tokio::test]
async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
    let upstream = Upstream::start();
    let gw = gateway(
        &upstream,
        free_port(),
        "[[routes]]\npath = \"/__respond\"\ncache = { ttl = \"1s\", stale_while_revalidate = \"30s\" }\n",
    );
    let first = get(&gw, "/__respond?case=swr", &[]).await;
    assert_eq!(x_cache(&first), "MISS");
    assert_eq!(first.json()["served"], 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let client = Client::new();
    let calls = (0..20).map(|_| {
        let (client, url) = (client.clone(), gw.url("/__respond?case=swr"));
        async move { client.get(&url).await }
    });
    // The refresh runs beside them and may land before the last of the twenty looks: those
    // are hits on the refreshed entry. None waits for the origin.
    let answers = futures_util::future::join_all(calls).await;
    let (refreshed, stale): (Vec<_>, Vec<_>) =
        answers.into_iter().partition(|r| x_cache(r) == "HIT");
    assert!(!stale.is_empty(), "the first requests are answered stale");
    for hit in refreshed {
        assert_eq!(hit.json()["served"], 2, "a hit is the refreshed entry");
    }
    for stale in stale {
        assert_eq!((stale.status, x_cache(&stale)), (StatusCode::OK, "STALE"));
        assert_eq!(stale.body, first.body, "served at once, without waiting");
        let status = stale.header("cache-status").unwrap();
        assert!(
            status.starts_with("cachegate; hit; ttl=-")
                && status.ends_with("detail=stale-while-revalidate"),
            "{status}"
        );
    }
    let refreshed = common::eventually(Duration::from_secs(5), || async {
        let resp = get(&gw, "/__respond?case=swr", &[]).await;
        x_cache(&resp) == "HIT" && resp.json()["served"] == 2
    })
    .await;
    assert!(refreshed, "the background refresh stored the new response");
    assert_eq!(
        upstream.served("GET /__respond").await,
        2,
        "twenty stale answers, one refresh"
    );
}

/// Requests `/__respond?{query}` twice; returns whether the second was a hit.
async fn second_is_hit(gw: &Gateway, query: &str) -> bool {
    let path = format!("/__respond?{query}");
    let first = get(gw, &path, &[]).await;
    assert_eq!(x_cache(&first), "MISS", "{query}");
    x_cache(&get(gw, &path, &[]).await) == "HIT"
}

#[tokio::test]
async fn the_origin_decides_what_a_shared_cache_may_store() {
    let upstream = Upstream::start();
    let gw = gateway(
        &upstream,
        free_port(),
        "[[routes]]\npath = \"/__respond\"\ncache = { ttl = \"30s\" }\n",
    );
    assert!(
        second_is_hit(&gw, "case=plain").await,
        "no origin headers: the rule's ttl"
    );
    assert!(second_is_hit(&gw, "cache-control=max-age%3D60").await);
    assert!(second_is_hit(&gw, "cache-control=public%2C%20s-maxage%3D60").await);
    assert!(
        !second_is_hit(&gw, "cache-control=no-store").await,
        "no-store is never stored"
    );
    assert!(
        !second_is_hit(&gw, "cache-control=private%2C%20max-age%3D60").await,
        "private is never shared"
    );
    assert!(
        !second_is_hit(&gw, "cache-control=no-cache").await,
        "no-cache must be revalidated before reuse"
    );
    assert!(
        !second_is_hit(&gw, "cache-control=s-maxage%3D0").await,
        "zero freshness"
    );
    assert!(
        !second_is_hit(&gw, "expires=Thu%2C%2001%20Jan%201970%2000%3A00%3A00%20GMT").await,
        "expired already"
    );
    assert!(
        !second_is_hit(&gw, "set-cookie=session%3Dabc").await,
        "Set-Cookie is not stored"
    );
    assert!(
        !second_is_hit(&gw, "vary=*").await,
        "Vary: * is never stored"
    );
    assert!(
        !second_is_hit(&gw, "status=500").await,
        "statuses outside the rule"
    );
    assert!(!second_is_hit(&gw, "status=201").await);
    assert_eq!(upstream.served("GET /__respond").await, 3 * 2 + 9 * 2 - 3);
}

#[tokio::test]
async fn rule_options_store_cookies_stripped_and_cap_freshness() {
    let upstream = Upstream::start();
    let routes = r#"
[[routes]]
path = "/__respond"
cache = { ttl = "30s", max_ttl = "2s", strip_set_cookie = true, honor_origin = true, statuses = [200, 404], negative_ttl = "30s" }
"#;
    let gw = gateway(&upstream, free_port(), routes);
    let path = "/__respond?set-cookie=session%3Dabc&cache-control=max-age%3D600";
    let first = get(&gw, path, &[]).await;
    assert_eq!(
        first.header("set-cookie"),
        Some("session=abc"),
        "the client that filled still gets its cookie"
    );
    let hit = get(&gw, path, &[]).await;
    assert_eq!(x_cache(&hit), "HIT");
    assert!(
        hit.header("set-cookie").is_none(),
        "the stored copy has no cookie"
    );
    // 2 s, not 1: the origin's `Date` may lag up to a second, so the entry can arrive a second old.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        x_cache(&get(&gw, path, &[]).await),
        "MISS",
        "max_ttl caps the origin's 600 s"
    );
    assert!(
        second_is_hit(&gw, "status=404").await,
        "404 is in the rule's statuses"
    );
}

#[tokio::test]
async fn variants_follow_vary_and_queries_normalise() {
    let upstream = Upstream::start();
    let routes = r#"
[[routes]]
path = "/__respond"
cache = { ttl = "30s", vary = ["accept-language"] }

[[routes]]
path = "/products"
cache = { ttl = "30s", query = ["page", "per_page"] }
"#;
    let gw = gateway(&upstream, free_port(), routes);
    // The origin varies on Accept; the rule adds Accept-Language.
    let path = "/__respond?vary=accept";
    let json = get(&gw, path, &[("accept", "application/json")]).await;
    assert_eq!(x_cache(&json), "MISS");
    let text = get(&gw, path, &[("accept", "text/plain")]).await;
    assert_eq!(x_cache(&text), "MISS", "another Accept is another variant");
    let json_again = get(&gw, path, &[("accept", "application/json")]).await;
    assert_eq!(x_cache(&json_again), "HIT");
    assert_eq!(json_again.json()["accept"], "application/json");
    let text_again = get(&gw, path, &[("accept", "text/plain")]).await;
    assert_eq!(
        (x_cache(&text_again), text_again.json()["accept"].as_str()),
        ("HIT", Some("text/plain"))
    );
    let french = get(
        &gw,
        path,
        &[("accept", "application/json"), ("accept-language", "fr")],
    )
    .await;
    assert_eq!(x_cache(&french), "MISS", "the rule's vary splits too");

    assert_eq!(
        x_cache(&get(&gw, "/products?page=1&per_page=3", &[]).await),
        "MISS"
    );
    assert_eq!(
        x_cache(&get(&gw, "/products?per_page=3&page=1", &[]).await),
        "MISS",
        "the order is kept: the origin may read it"
    );
    assert_eq!(
        x_cache(&get(&gw, "/products?page=1&utm_source=x&per_page=3", &[]).await),
        "HIT",
        "unlisted dropped"
    );
    assert_eq!(
        x_cache(&get(&gw, "/products?page=2&per_page=3", &[]).await),
        "MISS"
    );
    assert_eq!(upstream.served("GET /products").await, 3);
}

#[tokio::test]
async fn per_user_entries_are_never_shared() {
    let upstream = Upstream::start();
    let routes = r#"
[[routes]]
path = "/__headers"
auth = { mode = "optional", forward_claims = { sub = "X-User-Id" } }
cache = { ttl = "30s", scope = "user" }
"#;
    let gw = gateway(&upstream, free_port(), routes);
    let alice = format!("Bearer {}", token("alice"));
    let bob = format!("Bearer {}", token("bob"));
    let user_of = |r: &Response| {
        r.json()["headers"]["x-user-id"][0]
            .as_str()
            .map(str::to_owned)
    };

    let a1 = get(&gw, "/__headers", &[("authorization", &alice)]).await;
    let a2 = get(&gw, "/__headers", &[("authorization", &alice)]).await;
    assert_eq!((x_cache(&a1), x_cache(&a2)), ("MISS", "HIT"));
    assert_eq!(user_of(&a2).as_deref(), Some("alice"));
    let b1 = get(&gw, "/__headers", &[("authorization", &bob)]).await;
    assert_eq!(
        (x_cache(&b1), user_of(&b1).as_deref()),
        ("MISS", Some("bob")),
        "bob never gets alice's entry"
    );
    let anonymous = get(&gw, "/__headers", &[]).await;
    assert_eq!(
        x_cache(&anonymous),
        "BYPASS",
        "anonymous requests skip a per-user cache"
    );
    assert_eq!(user_of(&anonymous), None);
    assert_eq!(upstream.served("ANY /__headers").await, 3);
}

#[tokio::test]
async fn authentication_comes_before_the_cache() {
    let upstream = Upstream::start();
    let routes = r#"
[[routes]]
path = "/products/{id}"
auth = "required"
cache = { ttl = "30s", allow_authorized = true }

[[routes]]
path = "/products"
cache = { ttl = "30s" }
"#;
    let gw = gateway(&upstream, free_port(), routes);
    let alice = format!("Bearer {}", token("alice"));
    assert_eq!(
        x_cache(&get(&gw, "/products/3", &[("authorization", &alice)]).await),
        "MISS"
    );
    assert_eq!(
        get(&gw, "/products/3", &[]).await.status,
        StatusCode::UNAUTHORIZED,
        "cached, but not for the unauthenticated"
    );
    let forged = format!("Bearer {}x", token("alice"));
    assert_eq!(
        get(&gw, "/products/3", &[("authorization", &forged)])
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let bob = format!("Bearer {}", token("bob"));
    assert_eq!(
        x_cache(&get(&gw, "/products/3", &[("authorization", &bob)]).await),
        "HIT",
        "shared content the gateway authorised"
    );

    // A shared rule without allow_authorized stores an answer to a request carrying credentials
    // only when the origin says any client may have it (RFC 9111 §3.5); the list says nothing.
    let with_credentials = get(&gw, "/products", &[("authorization", "Basic dXNlcjpwYXNz")]).await;
    assert_eq!(x_cache(&with_credentials), "MISS");
    assert_eq!(
        x_cache(&get(&gw, "/products", &[]).await),
        "MISS",
        "the answer to the request with credentials was not stored"
    );
    assert_eq!(upstream.served("GET /products/{id}").await, 1);
}

#[tokio::test]
async fn bodies_above_max_object_stream_through_uncached() {
    let upstream = Upstream::start();
    let routes = r#"
[[routes]]
path = "/__bytes/{n}"
cache = { ttl = "30s", max_object = "1MiB" }
"#;
    let gw = gateway(&upstream, free_port(), routes);
    for _ in 0..2 {
        let big = get(&gw, "/__bytes/2000000", &[]).await;
        assert_eq!((big.status, big.body.len()), (StatusCode::OK, 2_000_000));
        assert_eq!(x_cache(&big), "MISS");
    }
    assert!(second_is_small_hit(&gw).await);
    assert_eq!(upstream.served("GET /__bytes/{n}").await, 3);
}

async fn second_is_small_hit(gw: &Gateway) -> bool {
    get(gw, "/__bytes/1000", &[]).await;
    let again = get(gw, "/__bytes/1000", &[]).await;
    x_cache(&again) == "HIT" && again.body.len() == 1000
}

/// Instances behind one load balancer see the same Host; the key includes it.
const SAME_HOST: &[(&str, &str)] = &[("host", "api.example.test")];

fn gateway_on_redis(upstream: &Upstream, admin_port: u16, redis: &common::Redis) -> Gateway {
    gateway(
        upstream,
        admin_port,
        &format!(
            "[store]\nredis_url = \"{}\"\ntimeout = \"200ms\"\n[[routes]]\npath = \"/products/{{id}}\"\ncache = {{ ttl = \"30s\" }}\n",
            redis.url()
        ),
    )
}

#[tokio::test]
async fn gateways_share_entries_through_redis_and_ignore_corrupt_ones() {
    let redis = common::Redis::start();
    let upstream = Upstream::start();
    let admin_b = free_port();
    let a = gateway_on_redis(&upstream, free_port(), &redis);
    let b = gateway_on_redis(&upstream, admin_b, &redis);

    let filled = get(&a, "/products/4", SAME_HOST).await;
    assert_eq!(x_cache(&filled), "MISS");
    // A writes to Redis after its client has the response: wait for the entry to land.
    let stored = common::eventually(Duration::from_secs(5), || async {
        redis
            .cli(&["KEYS", "cachegate:cache:*"])
            .lines()
            .any(|k| !k.contains(":vary:") && !k.is_empty())
    })
    .await;
    assert!(stored, "A stored the entry in Redis: {}", a.logs());
    let shared = get(&b, "/products/4", SAME_HOST).await;
    assert_eq!(x_cache(&shared), "HIT", "B finds what A stored, in Redis");
    assert_eq!(shared.body, filled.body);
    assert_eq!(x_cache(&get(&b, "/products/4", SAME_HOST).await), "HIT");
    assert_eq!(upstream.served("GET /products/{id}").await, 1);
    let stats = Client::new()
        .get(&format!("http://127.0.0.1:{admin_b}/cache/stats"))
        .await
        .json();
    assert_eq!(stats["tiers"]["redis"]["entries"], 1, "{stats}");
    assert!(stats["tiers"]["redis"]["bytes"].as_u64().unwrap() > filled.body.len() as u64);
    assert_eq!(stats["tiers"]["redis"]["hits"], 1);
    assert_eq!(stats["tiers"]["memory"]["entries"], 1);
    let text = String::from_utf8(
        Client::new()
            .get(&format!("http://127.0.0.1:{admin_b}/metrics"))
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains(
            r#"cachegate_cache_results_total{result="hit",route="/products/{id}",tier="redis"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"cachegate_cache_results_total{result="hit",route="/products/{id}",tier="memory"} 1"#
        ),
        "the Redis hit filled B's memory tier"
    );

    // Overwrite every stored entry with garbage: a gateway that has not seen it must treat it as a
    // miss and fetch from the origin, never fail.
    let keys = redis.cli(&["KEYS", "cachegate:cache:*"]);
    let entries: Vec<&str> = keys.lines().filter(|k| !k.contains(":vary:")).collect();
    assert_eq!(entries.len(), 1, "{keys}");
    for key in &entries {
        redis.cli(&["SET", key, "\u{1}garbage, not an entry", "PX", "30000"]);
    }
    let c = gateway_on_redis(&upstream, free_port(), &redis);
    let resp = get(&c, "/products/4", SAME_HOST).await;
    assert_eq!((resp.status, x_cache(&resp)), (StatusCode::OK, "MISS"));
    assert_eq!(resp.body, filled.body);
    assert_eq!(upstream.served("GET /products/{id}").await, 2);
}

#[tokio::test]
async fn gateways_coalesce_misses_across_instances_through_a_redis_lease() {
    let redis = common::Redis::start();
    let upstream = Upstream::start_with(&["--seed", "5", "--db-latency-ms", "300"]);
    let a = gateway_on_redis(&upstream, free_port(), &redis);
    let b = gateway_on_redis(&upstream, free_port(), &redis);
    let client = Client::new();
    let calls = (0..40).map(|i| {
        let gw = if i % 2 == 0 { &a } else { &b };
        let (client, url) = (client.clone(), gw.url("/products/3"));
        async move {
            client
                .send(Method::GET, &url, SAME_HOST, Bytes::new())
                .await
        }
    });
    let responses = futures_util::future::join_all(calls).await;
    assert!(responses.iter().all(|r| r.status == StatusCode::OK));
    assert!(responses.windows(2).all(|w| w[0].body == w[1].body));
    assert_eq!(
        upstream.served("GET /products/{id}").await,
        1,
        "40 concurrent misses on two instances, one origin request"
    );
    assert!(
        redis
            .cli(&["KEYS", "cachegate:cache-lease:*"])
            .trim()
            .is_empty(),
        "the lease is released once the entry is stored"
    );
}

#[tokio::test]
async fn large_entries_are_compressed_in_redis() {
    let redis = common::Redis::start();
    let upstream = Upstream::start();
    let routes = format!(
        "[store]\nredis_url = \"{}\"\n[cache]\ncompress_above = \"1KiB\"\n[[routes]]\npath = \"/__bytes/{{n}}\"\ncache = {{ ttl = \"30s\" }}\n",
        redis.url()
    );
    let a = gateway(&upstream, free_port(), &routes);
    let b = gateway(&upstream, free_port(), &routes);
    let filled = get(&a, "/__bytes/65536", SAME_HOST).await;
    assert_eq!((x_cache(&filled), filled.body.len()), ("MISS", 65536));
    let key = common::eventually_value(Duration::from_secs(5), || async {
        redis
            .cli(&["KEYS", "cachegate:cache:*"])
            .lines()
            .find(|k| !k.is_empty())
            .map(str::to_owned)
    })
    .await
    .expect("A stored the entry in Redis");
    let stored_len: usize = redis.cli(&["STRLEN", &key]).trim().parse().unwrap();
    assert!(stored_len < 65536 / 4, "stored in {stored_len} bytes");
    let shared = get(&b, "/__bytes/65536", SAME_HOST).await;
    assert_eq!(x_cache(&shared), "HIT");
    assert_eq!(shared.body, filled.body, "decompressed intact");
    assert_eq!(upstream.served("GET /__bytes/{n}").await, 1);
}

/// With `may_serve_stale_for`, the in-process tier keeps serving when Redis is gone (another
/// instance's write may then go unseen here for that long).
#[tokio::test]
async fn without_redis_the_cache_keeps_working_in_process() {
    let redis = common::Redis::start();
    let upstream = Upstream::start();
    let gw = gateway(
        &upstream,
        free_port(),
        &format!(
            "[store]\nredis_url = \"{}\"\ntimeout = \"200ms\"\nmay_serve_stale_for = \"1m\"\n[[routes]]\npath = \"/products/{{id}}\"\ncache = {{ ttl = \"30s\" }}\n",
            redis.url()
        ),
    );
    assert_eq!(x_cache(&get(&gw, "/products/5", &[]).await), "MISS");
    drop(redis);
    for id in [5, 6] {
        let resp = get(&gw, &format!("/products/{id}"), &[]).await;
        assert_eq!(
            resp.status,
            StatusCode::OK,
            "no client sees an error when Redis is gone"
        );
    }
    assert_eq!(
        x_cache(&get(&gw, "/products/5", &[]).await),
        "HIT",
        "the memory tier still serves"
    );
    assert_eq!(x_cache(&get(&gw, "/products/6", &[]).await), "HIT");
    assert_eq!(upstream.served("GET /products/{id}").await, 2);
}

/// Strict coherence (the default): with Redis gone, this instance cannot know whether another
/// wrote, so its in-process entries are not served — every read still answers, from the origin.
#[tokio::test]
async fn without_redis_strict_coherence_serves_from_the_origin() {
    let redis = common::Redis::start();
    let upstream = Upstream::start();
    let gw = gateway_on_redis(&upstream, free_port(), &redis);
    assert_eq!(x_cache(&get(&gw, "/products/5", &[]).await), "MISS");
    assert_eq!(x_cache(&get(&gw, "/products/5", &[]).await), "HIT");
    drop(redis);
    // The lease (500 ms) runs out.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for _ in 0..3 {
        let resp = get(&gw, "/products/5", &[]).await;
        assert_eq!(resp.status, StatusCode::OK, "no client sees an error");
        assert_ne!(
            x_cache(&resp),
            "HIT",
            "nothing served that cannot be verified"
        );
    }
    assert_eq!(upstream.served("GET /products/{id}").await, 4);
}

#[tokio::test]
async fn redis_killed_and_restarted_under_traffic_costs_no_client_an_error() {
    let redis_port = free_port();
    let redis = common::Redis::start_on(redis_port);
    let upstream = Upstream::start();
    let gw = gateway_on_redis(&upstream, free_port(), &redis);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, url) = (stop.clone(), gw.url(""));
        tokio::spawn(async move {
            let client = Client::new();
            let mut statuses = Vec::new();
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let path = format!("{url}/products/{}", 1 + i % 5);
                statuses.push(client.get(&path).await.status);
                i += 1;
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(redis);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let restarted = common::Redis::start_on(redis_port);
    // Shared writes resume by themselves: a new entry reaches the restarted Redis.
    let mut id = 7;
    let resumed = common::eventually(Duration::from_secs(10), || {
        // A new key each time: a write lost while reconnecting is not retried.
        id += 1;
        let (gw, restarted) = (&gw, &restarted);
        async move {
            get(gw, &format!("/products/{id}"), &[]).await;
            !restarted.cli(&["KEYS", "cachegate:cache:*"]).is_empty()
        }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = traffic.await.unwrap();
    assert!(statuses.len() > 20, "{} requests", statuses.len());
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "every request succeeded: {statuses:?}"
    );
    assert!(resumed, "the Redis tier is used again after the restart");
}

#[tokio::test]
async fn concurrent_misses_are_coalesced_into_one_origin_request() {
    let upstream = Upstream::start_with(&["--seed", "5", "--db-latency-ms", "300"]);
    let gw = gateway(
        &upstream,
        free_port(),
        "[[routes]]\npath = \"/products/{id}\"\ncache = { ttl = \"30s\" }\n",
    );
    let client = Client::new();
    let calls = (0..200).map(|_| {
        let (client, url) = (client.clone(), gw.url("/products/1"));
        async move { client.get(&url).await }
    });
    let responses = futures_util::future::join_all(calls).await;
    assert!(responses.iter().all(|r| r.status == StatusCode::OK));
    assert!(responses.windows(2).all(|w| w[0].body == w[1].body));
    assert_eq!(
        upstream.served("GET /products/{id}").await,
        1,
        "200 concurrent misses, one origin request"
    );
    let misses = responses.iter().filter(|r| x_cache(r) == "MISS").count();
    assert_eq!(
        misses, 1,
        "one request fetched; the others were answered from what it stored"
    );
}

#[tokio::test]
async fn a_stale_entry_answers_while_the_origin_is_unreachable() {
    let upstream = Upstream::start();
    let routes = "[[routes]]\npath = \"/products/{id}\"\ncache = { ttl = \"1s\", stale_if_error = \"30s\" }\n";
    let gw = gateway(&upstream, free_port(), routes);
    let fresh = get(&gw, "/products/1", &[]).await;
    assert_eq!(x_cache(&fresh), "MISS");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    drop(upstream);

    let stale = get(&gw, "/products/1", &[]).await;
    assert_eq!((stale.status, x_cache(&stale)), (StatusCode::OK, "STALE"));
    assert_eq!(
        stale.header("cache-status"),
        Some("cachegate; fwd=stale; detail=stale-if-error")
    );
    assert_eq!(stale.body, fresh.body);
    assert!(stale.header("age").unwrap().parse::<u64>().unwrap() >= 1);
    let never_cached = get(&gw, "/products/2", &[]).await;
    assert_eq!(
        never_cached.status,
        StatusCode::BAD_GATEWAY,
        "without a stale entry the failure shows"
    );
}

/// A resource whose answer could not be stored is not coalesced afterwards (hit-for-miss):
/// concurrent requests for it go to the origin side by side, not queued behind one another.
#[tokio::test]
async fn an_unstorable_answer_does_not_serialise_concurrent_requests() {
    let upstream = Upstream::start_with(&["--seed", "5", "--db-latency-ms", "1000"]);
    let gw = gateway(
        &upstream,
        free_port(),
        r#"
[[routes]]
path = "/products/{id}"
cache = { ttl = "30s", statuses = [203] }
"#,
    );
    assert_eq!(get(&gw, "/products/1", &[]).await.status, StatusCode::OK);
    let started = std::time::Instant::now();
    let requests = (0..6).map(|_| get(&gw, "/products/1", &[]));
    let responses = futures_util::future::join_all(requests).await;
    let elapsed = started.elapsed();
    for resp in &responses {
        assert_eq!(resp.status, StatusCode::OK);
    }
    assert_eq!(upstream.served("GET /products/{id}").await, 7);
    // One origin round trip is ~1 s; waiting for a leader first made it ~2 s.
    assert!(
        elapsed < Duration::from_millis(1700),
        "six uncacheable requests took {elapsed:?}"
    );
}
