//! Purge on write against the real upstream and a real Redis: each write method purges what it
//! must and nothing more, tags from the rule and from the origin, `Location`, failed writes,
//! two instances, the admin API, Redis stalling during a write, and a concurrency checker for
//! stale reads after writes.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, Client, Gateway, GatewayConfig, Redis, Response, Upstream};
use hyper::{Method, StatusCode};

/// The list's routes: cached reads tagged `products`, creates that purge the tag.
macro_rules! list_routes {
    () => {
        r#"
[[routes]]
path = "/products"
methods = ["GET", "HEAD"]
cache = { ttl = "60s", tags = ["products"] }
[[routes]]
path = "/products"
methods = ["POST"]
purge = { tags = ["products"] }
"#
    };
}

/// Cached reads of products and the list, writes that purge the list too.
const PRODUCT_ROUTES: &str = concat!(
    list_routes!(),
    r#"
[[routes]]
path = "/products/{id}"
methods = ["GET", "HEAD"]
cache = { ttl = "60s", statuses = [200, 404] }
[[routes]]
path = "/products/{id}"
methods = ["PUT", "PATCH", "DELETE"]
purge = ["/products"]
"#
);

/// A gateway with two worker threads and an admin listener (on a free port unless `extra` has
/// its own `[admin]`).
fn gateway(upstream: &Upstream, extra: &str, routes: &str) -> Gateway {
    let config = GatewayConfig::new(&upstream.url()).server("threads = 2");
    let config = if extra.contains("[admin]") {
        config
    } else {
        config.admin()
    };
    config.section(extra).section(routes).start()
}

fn on_redis(redis: &Redis) -> String {
    format!(
        "[store]\nredis_url = \"{}\"\ntimeout = \"200ms\"\n",
        redis.url()
    )
}

/// Instances behind one load balancer see the same Host.
const HOST: &[(&str, &str)] = &[("host", "api.example.test")];

async fn send(gw: &Gateway, method: Method, path: &str, body: &str) -> Response {
    let mut headers = HOST.to_vec();
    if !body.is_empty() {
        headers.push(("content-type", "application/json"));
    }
    Client::new()
        .send(
            method,
            &gw.url(path),
            &headers,
            Bytes::from(body.to_owned()),
        )
        .await
}

async fn get(gw: &Gateway, path: &str) -> Response {
    send(gw, Method::GET, path, "").await
}

fn x_cache(resp: &Response) -> &str {
    resp.header("x-cache").unwrap_or("-")
}

/// GETs `path` until it is a hit (at most twice); panics otherwise.
async fn warm(gw: &Gateway, path: &str) {
    get(gw, path).await;
    let again = get(gw, path).await;
    assert_eq!(x_cache(&again), "HIT", "{path} should be cached");
}

#[tokio::test]
async fn each_write_method_purges_what_it_changed_and_nothing_more() {
    let upstream = Upstream::start();
    let gw = gateway(&upstream, "", PRODUCT_ROUTES);
    for path in ["/products", "/products/1", "/products/2", "/products/3"] {
        warm(&gw, path).await;
    }

    let patched = send(&gw, Method::PATCH, "/products/1", r#"{"stock": 99}"#).await;
    assert_eq!(patched.status, StatusCode::OK);
    let read = get(&gw, "/products/1").await;
    assert_eq!(x_cache(&read), "MISS", "PATCH purged its own path");
    assert_eq!(read.json()["stock"], 99);
    assert_eq!(
        x_cache(&get(&gw, "/products").await),
        "MISS",
        "and the list"
    );
    assert_eq!(x_cache(&get(&gw, "/products/2").await), "HIT", "not others");

    let put = send(
        &gw,
        Method::PUT,
        "/products/2",
        r#"{"name": "Renamed", "description": "d", "price": 1.5, "stock": 3}"#,
    )
    .await;
    assert_eq!(put.status, StatusCode::OK);
    let read = get(&gw, "/products/2").await;
    assert_eq!(
        (x_cache(&read), read.json()["name"].as_str()),
        ("MISS", Some("Renamed"))
    );
    assert_eq!(x_cache(&get(&gw, "/products/3").await), "HIT");
    assert_eq!(x_cache(&get(&gw, "/products/1").await), "HIT");

    let deleted = send(&gw, Method::DELETE, "/products/3", "").await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let gone = get(&gw, "/products/3").await;
    assert_eq!(
        (gone.status, x_cache(&gone)),
        (StatusCode::NOT_FOUND, "MISS")
    );

    // POST: the list goes by tag, and the new resource's URL (Location) by RFC 9111 §4.4 — its
    // cached 404 must not outlive the creation.
    warm(&gw, "/products").await;
    let next_id = 51;
    let missing = get(&gw, &format!("/products/{next_id}")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(
        x_cache(&get(&gw, &format!("/products/{next_id}")).await),
        "HIT",
        "the 404 is cached"
    );
    let created = send(
        &gw,
        Method::POST,
        "/products",
        r#"{"name": "New", "description": "d", "price": 2, "stock": 1}"#,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(
        created.header("location"),
        Some(format!("/products/{next_id}").as_str())
    );
    assert_eq!(x_cache(&get(&gw, "/products").await), "MISS");
    let now_there = get(&gw, &format!("/products/{next_id}")).await;
    assert_eq!(now_there.status, StatusCode::OK, "Location was purged");
    assert_eq!(x_cache(&get(&gw, "/products/1").await), "HIT");

    // A failed write purges nothing.
    warm(&gw, "/products").await;
    let refused = send(&gw, Method::PATCH, "/products/1", r#"{"stock": -1}"#).await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(x_cache(&get(&gw, "/products/1").await), "HIT");
    assert_eq!(x_cache(&get(&gw, "/products").await), "HIT");
    let missing = send(&gw, Method::DELETE, "/products/9999", "").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(x_cache(&get(&gw, "/products").await), "HIT");
}

#[tokio::test]
async fn tags_from_the_origin_and_invalidation_headers_on_writes() {
    let upstream = Upstream::start();
    let gw = gateway(
        &upstream,
        "",
        "[[routes]]\npath = \"/__respond/{*rest}\"\ncache = { ttl = \"60s\" }\n",
    );
    let grouped = "/__respond/a?cache-groups=%22group-1%22%2C%20%22shared%22";
    let surrogate = "/__respond/b?surrogate-key=group-2%20shared";
    let untagged = "/__respond/c";
    for path in [grouped, surrogate, untagged] {
        warm(&gw, path).await;
    }
    let hit = get(&gw, surrogate).await;
    assert!(
        hit.header("surrogate-key").is_none(),
        "Surrogate-Key is for caches, never sent to clients"
    );
    assert!(get(&gw, grouped).await.header("cache-groups").is_some());

    let write = send(
        &gw,
        Method::POST,
        "/__respond/w?cache-group-invalidation=%22group-1%22",
        "{}",
    )
    .await;
    assert_eq!(write.status, StatusCode::OK);
    assert_eq!(
        x_cache(&get(&gw, grouped).await),
        "MISS",
        "Cache-Groups tag"
    );
    assert_eq!(x_cache(&get(&gw, surrogate).await), "HIT");
    assert_eq!(x_cache(&get(&gw, untagged).await), "HIT");

    send(
        &gw,
        Method::DELETE,
        "/__respond/w?cache-group-invalidation=%22shared%22",
        "",
    )
    .await;
    assert_eq!(x_cache(&get(&gw, grouped).await), "MISS");
    assert_eq!(
        x_cache(&get(&gw, surrogate).await),
        "MISS",
        "Surrogate-Key tag"
    );
    assert_eq!(x_cache(&get(&gw, untagged).await), "HIT");

    // A failing write's invalidation header is ignored.
    send(
        &gw,
        Method::POST,
        "/__respond/w?status=500&cache-group-invalidation=%22shared%22",
        "{}",
    )
    .await;
    assert_eq!(x_cache(&get(&gw, surrogate).await), "HIT");
    // Content-Location on the same host is purged too.
    send(
        &gw,
        Method::PUT,
        "/__respond/w?content-location=/__respond/c",
        "{}",
    )
    .await;
    assert_eq!(x_cache(&get(&gw, untagged).await), "MISS");
}

#[tokio::test]
async fn a_write_through_one_instance_is_seen_at_once_through_another() {
    let redis = Redis::start();
    let upstream = Upstream::start();
    let a = gateway(&upstream, &on_redis(&redis), PRODUCT_ROUTES);
    let b = gateway(&upstream, &on_redis(&redis), PRODUCT_ROUTES);
    a.wait_ready().await;
    b.wait_ready().await;
    for round in 0..10 {
        warm(&b, "/products/4").await;
        let (via, other) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let written = send(
            via,
            Method::PATCH,
            "/products/4",
            &format!(r#"{{"stock": {round}}}"#),
        )
        .await;
        assert_eq!(written.status, StatusCode::OK);
        let read = get(other, "/products/4").await;
        assert_eq!(
            read.json()["stock"],
            round,
            "round {round}: the other instance served {}",
            x_cache(&read)
        );
    }
    let metrics = Client::new()
        .get(&format!("http://127.0.0.1:{}/metrics", a.admin_port()))
        .await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.contains(r#"cachegate_purges_total{outcome="ok"} 5"#),
        "every purge acknowledged by both instances: {text}"
    );
}

fn admin_gateway(upstream: &Upstream, admin_port: u16, token: Option<&str>) -> Gateway {
    let token = token.map_or(String::new(), |t| format!("token = \"{t}\"\n"));
    gateway(
        upstream,
        &format!("[admin]\naddress = \"127.0.0.1:{admin_port}\"\n{token}"),
        r#"
[[routes]]
path = "/products/{id}"
cache = { ttl = "60s", tags = ["product:{id}", "products"] }
"#,
    )
}

async fn admin_purge(admin_port: u16, token: Option<&str>, body: &str) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a), ("content-type", "application/json")])
        .unwrap_or_default();
    Client::new()
        .send(
            Method::POST,
            &format!("http://127.0.0.1:{admin_port}/purge"),
            &headers,
            Bytes::from(body.to_owned()),
        )
        .await
}

#[tokio::test]
async fn the_admin_api_purges_by_url_tag_prefix_and_everything() {
    let upstream = Upstream::start();
    let admin_port = free_port();
    let token = "purge-token-0123456789";
    let gw = admin_gateway(&upstream, admin_port, Some(token));
    let all = ["/products/1", "/products/2", "/products/3"];
    for path in all {
        warm(&gw, path).await;
    }

    let refused = admin_purge(admin_port, None, r#"{"all": true}"#).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let wrong = admin_purge(admin_port, Some("wrong"), r#"{"all": true}"#).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    for path in all {
        assert_eq!(
            x_cache(&get(&gw, path).await),
            "HIT",
            "nothing purged without the token"
        );
    }
    let bad = admin_purge(admin_port, Some(token), r#"{"everything": 1}"#).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&bad.body).contains(r#"{\"tag\": \"products\"}"#));

    let by_url = admin_purge(
        admin_port,
        Some(token),
        r#"{"url": "http://api.example.test/products/1?x=1"}"#,
    )
    .await;
    assert_eq!(by_url.status, StatusCode::OK);
    assert_eq!(by_url.json()["memory_entries_removed"], 1);
    assert_eq!(x_cache(&get(&gw, "/products/1").await), "MISS");
    assert_eq!(x_cache(&get(&gw, "/products/2").await), "HIT");

    let by_tag = admin_purge(admin_port, Some(token), r#"{"tag": "product:2"}"#).await;
    assert_eq!(by_tag.json()["memory_entries_removed"], 1);
    assert_eq!(x_cache(&get(&gw, "/products/2").await), "MISS");
    assert_eq!(x_cache(&get(&gw, "/products/3").await), "HIT");

    let by_prefix = admin_purge(admin_port, Some(token), r#"{"prefix": "/products/"}"#).await;
    assert_eq!(by_prefix.json()["memory_entries_removed"], 3);
    for path in all {
        assert_eq!(x_cache(&get(&gw, path).await), "MISS", "{path}");
    }
    let everything = admin_purge(admin_port, Some(token), r#"{"all": true}"#).await;
    assert_eq!(everything.json()["memory_entries_removed"], 3);
    assert_eq!(x_cache(&get(&gw, "/products/3").await), "MISS");

    // Without a configured token the endpoint is off.
    let other_admin = free_port();
    let _open = admin_gateway(&upstream, other_admin, None);
    assert_eq!(
        admin_purge(other_admin, None, r#"{"all": true}"#)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
}

/// With `may_serve_stale_for`, availability first: a write while Redis stalls returns after
/// that long, purged here, and the purge is replayed when Redis answers.
#[tokio::test]
async fn a_write_while_redis_stalls_still_purges_and_is_replayed_when_it_returns() {
    let redis = Redis::start();
    let upstream = Upstream::start();
    let available = format!("{}may_serve_stale_for = \"1s\"\n", on_redis(&redis));
    let a = gateway(&upstream, &available, PRODUCT_ROUTES);
    a.wait_ready().await;
    warm(&a, "/products/5").await;
    // The entry is in Redis too.
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            !redis.cli(&["KEYS", "cachegate:cache:*"]).is_empty()
        })
        .await
    );

    redis.process.signal("STOP");
    let written = send(&a, Method::PATCH, "/products/5", r#"{"stock": 555}"#).await;
    assert_eq!(written.status, StatusCode::OK, "the write is delivered");
    let read = get(&a, "/products/5").await;
    assert_eq!(read.json()["stock"], 555, "purged in process at once");
    redis.process.signal("CONT");

    // The purge reaches Redis when it answers again: an instance that never saw the write does
    // not serve the entry stored in Redis before it.
    let replayed = common::eventually(Duration::from_secs(10), || async {
        !redis
            .cli(&["GET", "{cachegate-purge}:mark:path:/products/5"])
            .is_empty()
    })
    .await;
    assert!(replayed, "the purge was replayed: {}", a.logs());
    let fresh = gateway(&upstream, &on_redis(&redis), PRODUCT_ROUTES);
    fresh.wait_ready().await;
    let read = get(&fresh, "/products/5").await;
    assert_eq!(read.json()["stock"], 555);
    let text = String::from_utf8_lossy(
        &Client::new()
            .get(&format!("http://127.0.0.1:{}/metrics", a.admin_port()))
            .await
            .body,
    )
    .into_owned();
    assert!(
        text.contains(r#"cachegate_purges_total{outcome="store_error"} 1"#),
        "{text}"
    );
}

/// Strict coherence (the default): a write while Redis stalls is held until Redis takes its
/// purge, and no instance serves the version it replaced meanwhile.
#[tokio::test]
async fn a_write_while_redis_stalls_is_held_until_redis_takes_its_purge() {
    let redis = Redis::start();
    let upstream = Upstream::start();
    let a = Arc::new(gateway(&upstream, &on_redis(&redis), PRODUCT_ROUTES));
    let b = gateway(&upstream, &on_redis(&redis), PRODUCT_ROUTES);
    a.wait_ready().await;
    b.wait_ready().await;
    warm(&b, "/products/5").await;
    let before = get(&b, "/products/5").await.json()["stock"].clone();
    let admin = |path: &str| format!("http://127.0.0.1:{}{path}", b.admin_port());
    let status = Client::new().get(&admin("/status.json")).await.json();
    assert_eq!(status["store"]["coherent"], true, "{status}");
    assert!(metric(&b, "cachegate_coherent 1").await);

    redis.process.signal("STOP");
    let started = Instant::now();
    let writer = a.clone();
    let write = tokio::spawn(async move {
        send(&writer, Method::PATCH, "/products/5", r#"{"stock": 556}"#).await
    });
    // While Redis stalls, B's lease runs out: it no longer serves its copy unasked.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!write.is_finished(), "the write is held while Redis stalls");
    let during = get(&b, "/products/5").await;
    assert_ne!(x_cache(&during), "HIT", "B serves nothing it cannot verify");
    let readyz = Client::new().get(&admin("/readyz")).await.json();
    assert_eq!(readyz["coherent"], false, "{readyz}");
    assert!(metric(&b, "cachegate_coherent 0").await);
    redis.process.signal("CONT");

    let written = write.await.unwrap();
    assert_eq!(written.status, StatusCode::OK, "{}", a.logs());
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let after = get(&b, "/products/5").await;
    assert_eq!(after.json()["stock"], 556, "before: {before}");
}

/// Live instances are members in Redis (a write waits for each one's acknowledgement); one that
/// stops on SIGTERM leaves at once, so writes elsewhere do not wait a lease for it.
#[tokio::test]
async fn a_stopping_instance_leaves_the_live_members() {
    let redis = Redis::start();
    let upstream = Upstream::start();
    // A long lease: without leaving, B would stay a member for seconds.
    let store = format!("{}coherence_lease = \"5s\"\n", on_redis(&redis));
    let a = gateway(&upstream, &store, PRODUCT_ROUTES);
    let mut b = gateway(&upstream, &store, PRODUCT_ROUTES);
    a.wait_ready().await;
    b.wait_ready().await;
    let members = || {
        redis
            .cli(&["ZRANGE", "{cachegate-purge}:members", "0", "-1"])
            .lines()
            .filter(|l| !l.is_empty())
            .count()
    };
    assert!(
        common::eventually(Duration::from_secs(5), || async { members() == 2 }).await,
        "both instances are members"
    );
    b.process.signal("TERM");
    assert!(b.process.wait_exit(Duration::from_secs(10)).is_some());
    assert_eq!(members(), 1, "B left when it stopped: {}", b.logs());
    let written = send(&a, Method::PATCH, "/products/5", r#"{"stock": 9}"#).await;
    assert_eq!(written.status, StatusCode::OK);
}

/// One observed operation of the concurrency checker.
#[derive(Debug, Clone, Copy)]
struct Observed {
    started: Instant,
    finished: Instant,
    version: u64,
}

#[tokio::test]
async fn no_read_that_starts_after_a_write_returns_sees_an_older_version() {
    let redis = Redis::start();
    // Slow origin reads widen the window in which a fill can straddle a write.
    let upstream = Upstream::start_with(&["--seed", "5", "--db-latency-ms", "15"]);
    let a = Arc::new(gateway(&upstream, &on_redis(&redis), PRODUCT_ROUTES));
    let b = Arc::new(gateway(&upstream, &on_redis(&redis), PRODUCT_ROUTES));
    a.wait_ready().await;
    b.wait_ready().await;
    let until = Instant::now() + Duration::from_secs(3);

    let mut tasks = Vec::new();
    for worker in 0..6 {
        let gw = if worker % 2 == 0 {
            a.clone()
        } else {
            b.clone()
        };
        let writer = worker < 2;
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut n = 0;
            while Instant::now() < until {
                let started = Instant::now();
                let resp = if writer {
                    n += 1;
                    send(
                        &gw,
                        Method::PATCH,
                        "/products/1",
                        &format!(r#"{{"stock": {n}}}"#),
                    )
                    .await
                } else {
                    get(&gw, "/products/1").await
                };
                assert_eq!(resp.status, StatusCode::OK);
                let version = resp.json()["version"].as_u64().expect("a version");
                seen.push(Observed {
                    started,
                    finished: Instant::now(),
                    version,
                });
            }
            (writer, seen)
        }));
    }
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    for task in tasks {
        let (writer, seen) = task.await.unwrap();
        if writer {
            writes.extend(seen);
        } else {
            reads.extend(seen);
        }
    }
    assert!(
        writes.len() > 20 && reads.len() > 100,
        "{} writes, {} reads",
        writes.len(),
        reads.len()
    );
    let hits = reads.len();
    let mut stale = Vec::new();
    for read in &reads {
        let newest_done = writes
            .iter()
            .filter(|w| w.finished < read.started)
            .map(|w| w.version)
            .max()
            .unwrap_or(0);
        if read.version < newest_done {
            stale.push((read.version, newest_done));
        }
    }
    assert!(
        stale.is_empty(),
        "{} of {hits} reads returned a version older than a write completed before they started: {:?}",
        stale.len(),
        &stale[..stale.len().min(10)]
    );
}

#[tokio::test]
async fn write_through_makes_the_next_read_a_hit_with_the_new_body() {
    let upstream = Upstream::start();
    let gw = gateway(
        &upstream,
        "",
        r#"
[[routes]]
path = "/products/{id}"
methods = ["GET", "HEAD"]
cache = { ttl = "60s" }
[[routes]]
path = "/products/{id}"
methods = ["PATCH"]
purge = { write_through = true }
[[routes]]
path = "/__respond/{*rest}"
cache = { ttl = "60s" }
"#,
    );
    warm(&gw, "/products/1").await;
    // Writers usually carry credentials; they do not stop the entry being stored for readers.
    let written = Client::new()
        .send(
            Method::PATCH,
            &gw.url("/products/1"),
            &[
                HOST[0],
                ("content-type", "application/json"),
                ("authorization", "Bearer writer"),
            ],
            Bytes::from_static(br#"{"stock": 7}"#),
        )
        .await;
    assert_eq!(written.status, StatusCode::OK);
    let read = get(&gw, "/products/1").await;
    assert_eq!(x_cache(&read), "HIT", "stored from the write's response");
    assert_eq!(read.body, written.body);
    assert_eq!(read.json()["stock"], 7);
    assert_eq!(upstream.served("GET /products/{id}").await, 1);

    // A write without write-through on the same resource supersedes it.
    let put = send(
        &gw,
        Method::PUT,
        "/products/1",
        r#"{"name": "Replaced", "description": "d", "price": 1, "stock": 1}"#,
    )
    .await;
    assert_eq!(put.status, StatusCode::OK);
    let read = get(&gw, "/products/1").await;
    assert_eq!(
        (x_cache(&read), read.json()["name"].as_str()),
        ("MISS", Some("Replaced"))
    );

    // Without the rule, a Content-Location naming the target also says the body is the resource.
    let target = "/__respond/doc?content-location=/__respond/doc";
    warm(&gw, target).await;
    let written = send(&gw, Method::PUT, target, "{}").await;
    assert_eq!(written.status, StatusCode::OK);
    let read = get(&gw, target).await;
    assert_eq!(x_cache(&read), "HIT");
    assert_eq!(
        read.body, written.body,
        "the write's response, not the old entry"
    );
}

/// How many times the gateway matched a path against its routes (debug builds report it).
async fn route_matches(gw: &Gateway) -> u64 {
    let url = format!("http://127.0.0.1:{}/status.json", gw.admin_port());
    let status = Client::new().get(&url).await.json();
    status["debug"]["route_matches"]
        .as_u64()
        .expect("debug builds report debug.route_matches")
}

#[tokio::test]
async fn every_request_matches_its_route_once() {
    let upstream = Upstream::start();
    let gw = gateway(
        &upstream,
        "",
        concat!(
            list_routes!(),
            r#"
[[routes]]
path = "/products/{id:int}"
methods = ["GET", "HEAD"]
cache = { ttl = "60s", tags = ["product:{id}"] }
[[routes]]
path = "/products/{id:int}"
methods = ["PUT", "PATCH", "DELETE"]
purge = { paths = ["/products"], tags = ["product:{id}"], write_through = true }
"#
        ),
    );
    gw.wait_ready().await;
    let before = route_matches(&gw).await;
    // A miss, a hit (through a typed parameter's other spelling), a write that purges by path
    // and tag and writes through, a read of what it wrote, and the list: one match each.
    get(&gw, "/products/1").await;
    assert_eq!(x_cache(&get(&gw, "/products/01").await), "HIT");
    let patched = send(&gw, Method::PATCH, "/products/1", r#"{"stock": 3}"#).await;
    assert_eq!(patched.status, StatusCode::OK);
    assert_eq!(x_cache(&get(&gw, "/products/1").await), "HIT");
    get(&gw, "/products").await;
    assert_eq!(
        route_matches(&gw).await - before,
        5,
        "one match per request"
    );

    // A create names another path in `Location`: that path is matched too (for its canonical
    // form), the request's own path still once.
    let before = route_matches(&gw).await;
    let created = send(
        &gw,
        Method::POST,
        "/products",
        r#"{"name": "N", "description": "d", "price": 1, "stock": 1}"#,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert!(created.header("location").is_some());
    assert_eq!(route_matches(&gw).await - before, 2);
}

#[tokio::test]
async fn the_purge_method_on_the_main_port_is_off_unless_configured_and_needs_the_token() {
    let upstream = Upstream::start();
    let token = "purge-token-0123456789";
    let purge = Method::from_bytes(b"PURGE").unwrap();
    let on = admin_gateway_with(
        &upstream,
        &format!("token = \"{token}\"\npurge_method = true\n"),
    );
    warm(&on, "/products/1").await;
    warm(&on, "/products/2").await;
    let refused = send(&on, purge.clone(), "/products/1", "").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(x_cache(&get(&on, "/products/1").await), "HIT");
    let auth = format!("Bearer {token}");
    let purged = Client::new()
        .send(
            purge.clone(),
            &on.url("/products/1"),
            &[HOST[0], ("authorization", &auth)],
            Bytes::new(),
        )
        .await;
    assert_eq!(purged.status, StatusCode::OK);
    assert_eq!(purged.json()["memory_entries_removed"], 1);
    assert_eq!(x_cache(&get(&on, "/products/1").await), "MISS");
    assert_eq!(x_cache(&get(&on, "/products/2").await), "HIT");

    // Off by default: PURGE is just another write method, passed to the origin.
    let off = admin_gateway_with(&upstream, &format!("token = \"{token}\"\n"));
    let passed = Client::new()
        .send(
            purge,
            &off.url("/products/1"),
            &[HOST[0], ("authorization", &auth)],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        passed.status,
        StatusCode::METHOD_NOT_ALLOWED,
        "the origin's answer"
    );
}

fn admin_gateway_with(upstream: &Upstream, admin: &str) -> Gateway {
    gateway(
        upstream,
        &format!("[admin]\naddress = \"127.0.0.1:{}\"\n{admin}", free_port()),
        "[[routes]]\npath = \"/products/{id}\"\ncache = { ttl = \"60s\" }\n",
    )
}

#[tokio::test]
async fn purges_and_shared_entries_work_on_a_redis_cluster() {
    let cluster = common::RedisCluster::start();
    let upstream = Upstream::start();
    let seeds: Vec<String> = cluster.seeds().iter().map(|s| format!("{s:?}")).collect();
    let store = format!(
        "[store]\nredis_cluster = [{}]\ntimeout = \"200ms\"\n",
        seeds.join(", ")
    );
    let admin_a = free_port();
    let with_admin = format!(
        "{store}[admin]\naddress = \"127.0.0.1:{admin_a}\"\ntoken = \"cluster-token-0123\"\n"
    );
    let a = gateway(&upstream, &with_admin, PRODUCT_ROUTES);
    let b = gateway(&upstream, &store, PRODUCT_ROUTES);
    a.wait_ready().await;
    b.wait_ready().await;
    // The cluster connection comes up in the background: wait until B shares A's entries.
    get(&a, "/products/2").await;
    let shared = common::eventually(Duration::from_secs(10), || async {
        x_cache(&get(&b, "/products/2").await) == "HIT"
    })
    .await;
    assert!(shared, "B reads A's entry from the cluster: {}", b.logs());
    for round in 1..=3 {
        warm(&b, "/products/2").await;
        let written = send(
            &a,
            Method::PATCH,
            "/products/2",
            &format!(r#"{{"stock": {round}}}"#),
        )
        .await;
        assert_eq!(written.status, StatusCode::OK);
        let read = get(&b, "/products/2").await;
        assert_eq!(read.json()["stock"], round, "round {round}");
    }
    // Both instances subscribe where the purge script publishes, so both are counted and both
    // acknowledge.
    let report = admin_purge(
        admin_a,
        Some("cluster-token-0123"),
        r#"{"tag": "products"}"#,
    )
    .await;
    assert_eq!(
        (
            report.json()["instances_told"].as_u64(),
            report.json()["instances_acknowledged"].as_u64()
        ),
        (Some(2), Some(2)),
        "{:?}",
        report.json()
    );
}

async fn metric(gw: &Gateway, line: &str) -> bool {
    let text = String::from_utf8_lossy(
        &Client::new()
            .get(&format!("http://127.0.0.1:{}/metrics", gw.admin_port()))
            .await
            .body,
    )
    .into_owned();
    text.lines().any(|l| l == line)
}

#[tokio::test]
async fn a_redis_restart_with_its_data_lost_does_not_reset_the_purge_sequence() {
    let redis_port = free_port();
    let redis = Redis::start_on(redis_port);
    let upstream = Upstream::start();
    let a = gateway(&upstream, &on_redis(&redis), PRODUCT_ROUTES);
    let b = gateway(&upstream, &on_redis(&redis), PRODUCT_ROUTES);
    a.wait_ready().await;
    b.wait_ready().await;
    for round in 1..=3 {
        send(
            &a,
            Method::PATCH,
            "/products/3",
            &format!(r#"{{"stock": {round}}}"#),
        )
        .await;
    }
    warm(&b, "/products/3").await;

    drop(redis);
    let _restarted = Redis::start_on(redis_port);
    for gw in [&a, &b] {
        let resubscribed = common::eventually(Duration::from_secs(10), || {
            metric(gw, r#"cachegate_purges_total{outcome="resubscribed"} 1"#)
        })
        .await;
        assert!(resubscribed, "{}", gw.logs());
        gw.wait_ready().await;
    }
    // The restarted Redis counts on from where the instances were, so this purge outranks
    // the entry B stored before the restart.
    let written = send(&a, Method::PATCH, "/products/3", r#"{"stock": 4}"#).await;
    assert_eq!(written.status, StatusCode::OK);
    let read = get(&b, "/products/3").await;
    assert_eq!(
        read.json()["stock"],
        4,
        "{} / A: {} / B: {}",
        x_cache(&read),
        a.logs(),
        b.logs()
    );
}
