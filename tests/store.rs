//! The store boundary against a real redis-server: the Redis store round-trips values, the
//! gateway starts on either store, and Redis is never required to start.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cachegate::store::{RedisOptions, RedisStore, Store};
use common::{config_for, free_port, Client, Gateway, Redis, Upstream};
use hyper::StatusCode;

/// Polls `condition` every 50 ms for up to `timeout`.
fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

#[tokio::test]
async fn redis_store_round_trips_values_with_expiry() {
    let redis = Redis::start();
    let store = RedisStore::connect(&redis.url(), RedisOptions::default()).unwrap();
    assert_eq!(store.kind(), "redis");

    store
        .set(
            "cachegate:test:k",
            Bytes::from_static(b"\x00binary\xff"),
            Duration::from_secs(5),
        )
        .await
        .expect("SET through the store");
    assert_eq!(
        store.get("cachegate:test:k").await.unwrap().as_deref(),
        Some(&b"\x00binary\xff"[..])
    );
    let ttl: i64 = redis.cli(&["PTTL", "cachegate:test:k"]).parse().unwrap();
    assert!(
        (1..=5000).contains(&ttl),
        "the entry carries its expiry in Redis: PTTL {ttl}"
    );
    assert!(store.delete("cachegate:test:k").await.unwrap());
    assert_eq!(store.get("cachegate:test:k").await.unwrap(), None);
    assert!(!store.delete("cachegate:test:k").await.unwrap());
}

#[tokio::test]
async fn redis_store_reports_unavailable_instead_of_hanging() {
    let port = free_port();
    let store = RedisStore::connect(
        &format!("redis://127.0.0.1:{port}"),
        RedisOptions::default(),
    )
    .unwrap();
    let started = Instant::now();
    let err = store.get("k").await.expect_err("nothing listens there");
    assert!(
        matches!(err, cachegate::store::StoreError::Unavailable(_)),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    // When Redis appears, the same store starts working by itself.
    let _redis = Redis::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if store.ping().await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the store never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn gateway_runs_on_the_memory_store_by_default() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(&[&upstream.url()], ""));
    let resp = Client::new().get(&gateway.url("/products/1")).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert!(
        gateway.logs().contains("store=\"memory\""),
        "{}",
        gateway.logs()
    );
}

#[tokio::test]
async fn gateway_connects_to_redis_when_configured() {
    let redis = Redis::start();
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(
        &[&upstream.url()],
        &format!("[store]\nredis_url = \"{}\"\n", redis.url()),
    ));
    assert!(
        eventually(Duration::from_secs(10), || gateway
            .logs()
            .contains("store: connected to Redis")),
        "{}",
        gateway.logs()
    );
    assert!(gateway.logs().contains("store=\"redis\""));
    // redis-cli's own connection plus the gateway's.
    let clients = redis.cli(&["CLIENT", "LIST"]).lines().count();
    assert!(
        clients >= 2,
        "the gateway holds a Redis connection: {clients} clients"
    );
    let resp = Client::new().get(&gateway.url("/products/1")).await;
    assert_eq!(resp.status, StatusCode::OK);
}

#[tokio::test]
async fn gateway_starts_without_redis_and_connects_when_it_comes_up() {
    let upstream = Upstream::start();
    let redis_port = free_port();
    let gateway = Gateway::start(&config_for(
        &[&upstream.url()],
        &format!("[store]\nredis_url = \"redis://127.0.0.1:{redis_port}\"\n"),
    ));
    let resp = Client::new().get(&gateway.url("/products/1")).await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "serving does not wait for Redis"
    );
    assert!(
        eventually(Duration::from_secs(10), || gateway
            .logs()
            .contains("Redis is not reachable yet")),
        "{}",
        gateway.logs()
    );

    let _redis = Redis::start_on(redis_port);
    assert!(
        eventually(Duration::from_secs(10), || gateway
            .logs()
            .contains("store: connected to Redis")),
        "{}",
        gateway.logs()
    );
}
