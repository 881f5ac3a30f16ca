//! `cachegate explain` reports what the gateway does with a request — and what it reports is what
//! the running gateway then does: the same canonical path, route, rate-limit counter, cache
//! entry and purges, checked against a real gateway, upstream-example and redis-server.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    config_for, get, mint_token, run_cachegate, x_cache, Client, Gateway, Redis, Upstream,
};
use hyper::{Method, StatusCode};
use serde_json::Value;

/// Runs `cachegate explain --json` with `args` against `config`; the parsed report.
fn explain(config: &Path, args: &[&str]) -> Value {
    let config = config.to_str().unwrap();
    let out = run_cachegate(&[&["explain", "--json", "--config", config], args].concat());
    assert!(
        out.status.success(),
        "explain {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("explain --json prints JSON")
}

fn write_config(dir: &tempfile::TempDir, toml: &str) -> std::path::PathBuf {
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

const ROUTES: &str = r#"
[auth]
issuer = "test"
audience = "api"

[[auth.providers]]
name = "local"
algorithms = ["HS256"]
secret = "explain-test-secret-0123456789abcdef"

[[routes]]
name = "product-read"
path = "/products/{id:int}"
methods = ["GET", "HEAD"]
rate_limit = { limits = [ { name = "reads", rate = "100/minute", key = "ip" } ] }
cache = { ttl = "30s", vary = ["accept-language"], tags = ["product:{id}"] }

[[routes]]
name = "product-write"
path = "/products/{id:int}"
methods = ["PUT", "PATCH", "DELETE"]
auth = { mode = "required", scopes = ["products:write"], forward_claims = { sub = "X-User-Id" } }
rate_limit = { limits = [ { name = "writes", rate = "10/second", key = "user" } ] }
purge = { paths = ["/products"], tags = ["product:{id}"] }

[[routes]]
name = "mine"
path = "/me"
methods = ["GET"]
auth = "optional"
cache = { ttl = "30s", scope = "user" }
"#;

/// What explain says about a read is what the gateway does with it: the rate-limit counter it
/// names is the one counted in Redis, the shared-tier key it names is where the entry lands, and
/// the canonical path is what the origin is asked for.
#[tokio::test]
async fn a_read_is_counted_and_stored_under_the_keys_explain_names() {
    let upstream = Upstream::start();
    let redis = Redis::start();
    let config = config_for(
        &[&upstream.url()],
        &format!("[store]\nredis_url = \"{}\"\n{ROUTES}", redis.url()),
    );
    let gateway = Gateway::start(&config);

    let report = explain(
        &gateway.config,
        &["-H", "Accept-Language: de", &gateway.url("/products/0003/")],
    );
    assert_eq!(report["canonical_path"], "/products/3");
    assert_eq!(report["route"]["name"], "product-read");
    assert_eq!(report["auth"]["mode"], "none");
    assert_eq!(report["refused"], Value::Null);
    assert_eq!(report["upstream_request"], "GET /products/3");
    assert_eq!(report["cache"]["bypass"], Value::Null);
    assert_eq!(report["cache"]["tags"][0], "product:3");
    let limit_key = report["rate_limits"][0]["key"].as_str().unwrap().to_owned();
    let entry_key = report["cache"]["shared_key"].as_str().unwrap().to_owned();
    assert_eq!(redis.cli(&["EXISTS", &limit_key]), "0");
    assert_eq!(redis.cli(&["EXISTS", &entry_key]), "0");

    let first = get(&gateway, "/products/0003/", &[("accept-language", "de")]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(x_cache(&first), "MISS");
    assert_eq!(
        redis.cli(&["EXISTS", &limit_key]),
        "1",
        "the counter explain named"
    );
    // The shared-tier write happens when the response has ended.
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.cli(&["EXISTS", &entry_key]) != "1" {
        assert!(
            Instant::now() < deadline,
            "no shared entry under {entry_key}; keys: {}",
            redis.cli(&["KEYS", "cachegate:cache:*"])
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another language is another variant: another key, per explain as in the store.
    let other = explain(
        &gateway.config,
        &["-H", "Accept-Language: fr", &gateway.url("/products/3")],
    );
    assert_ne!(other["cache"]["shared_key"], entry_key);
}

/// A write: the token is verified and the claims it forwards are named; the keys explain says it
/// purges are the ones the gateway purges (the cached read and the list are misses afterwards).
#[tokio::test]
async fn a_write_names_its_token_and_purges_what_the_gateway_purges() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(&[&upstream.url()], ROUTES));
    let token = mint_token(
        &gateway.config,
        &["--scope", "products:write", "--sub", "ada"],
    );
    let bearer = format!("Authorization: Bearer {token}");

    let report = explain(
        &gateway.config,
        &["-X", "PUT", "-H", &bearer, &gateway.url("/products/03")],
    );
    assert_eq!(report["route"]["name"], "product-write");
    assert_eq!(report["auth"]["token"]["valid"], true);
    assert_eq!(report["auth"]["token"]["subject"], "ada");
    assert_eq!(
        report["auth"]["token"]["forwarded"],
        serde_json::json!([["x-user-id", "ada"]])
    );
    assert_eq!(
        report["rate_limits"][0]["key"],
        "cachegate:rl:{product-write:writes:sub:ada}"
    );
    assert_eq!(
        report["purge"]["keys"],
        serde_json::json!(["path:/products", "path:/products/3", "tag:product:3"])
    );
    assert_eq!(report["cache"], Value::Null);

    // Without the token: refused where the gateway refuses it, with the same status.
    let anonymous = explain(&gateway.config, &["-X", "DELETE", "/products/3"]);
    assert_eq!(anonymous["refused"]["step"], "auth");
    assert_eq!(anonymous["refused"]["status"], 401);
    assert_eq!(anonymous["purge"], Value::Null);
    let resp = Client::new()
        .send(
            Method::DELETE,
            &gateway.url("/products/3"),
            &[],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);

    // The purge explain announced: the cached read of /products/3 is gone after the PUT.
    assert_eq!(x_cache(&get(&gateway, "/products/3", &[]).await), "MISS");
    assert_eq!(x_cache(&get(&gateway, "/products/3", &[]).await), "HIT");
    let body = r#"{"name":"renamed","price":1.5,"stock":3}"#;
    let resp = Client::new()
        .send(
            Method::PUT,
            &gateway.url("/products/03"),
            &[
                ("authorization", &format!("Bearer {token}")),
                ("content-type", "application/json"),
            ],
            bytes::Bytes::from(body),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{:?}", resp.json());
    assert_eq!(x_cache(&get(&gateway, "/products/3", &[]).await), "MISS");
}

/// Requests the gateway refuses or does not cache say so, with the reason, for several configs.
#[test]
fn refusals_and_bypasses_say_why() {
    let dir = tempfile::TempDir::new().unwrap();
    let offline =
        |extra: &str| config_for(&["http://127.0.0.1:9"], extra).replace("{port}", "8080");
    let config = write_config(&dir, &offline(ROUTES));

    // Ambiguous framing never reaches routing.
    let framing = explain(
        &config,
        &[
            "-H",
            "Content-Length: 3",
            "-H",
            "Transfer-Encoding: chunked",
            "/products/1",
        ],
    );
    assert_eq!(framing["refused"]["step"], "request");
    assert_eq!(framing["refused"]["status"], 400);
    // An encoded slash has no canonical form under the default rules.
    let slash = explain(&config, &["/products%2F1"]);
    assert_eq!(slash["refused"]["status"], 400);
    // A GET with a body, a user-scoped rule without a user.
    let body = explain(&config, &["-H", "Content-Length: 2", "/products/1"]);
    assert_eq!(body["cache"]["bypass"], "body");
    let anonymous = explain(&config, &["/me"]);
    assert_eq!(anonymous["cache"]["bypass"], "anonymous");
    // Credentials on a shared rule: the key applies only to answers the origin made public.
    let plain = explain(&config, &["/products/1"]);
    assert_eq!(plain["cache"]["only"], Value::Null);
    let authorized = explain(&config, &["-H", "Authorization: Basic YTpi", "/products/1"]);
    assert!(
        authorized["cache"]["only"]
            .as_str()
            .is_some_and(|o| o.contains("RFC 9111 §3.5")),
        "{authorized}"
    );
    // Unmatched paths: the defaults, or 404 when unmatched requests are denied.
    let unmatched = explain(&config, &["/elsewhere"]);
    assert_eq!(unmatched["route"], Value::Null);
    assert_eq!(unmatched["upstream_request"], "GET /elsewhere");
    let denied = write_config(
        &dir,
        &offline(&format!("[defaults]\nunmatched = \"deny\"\n{ROUTES}")),
    );
    let refused = explain(&denied, &["/elsewhere"]);
    assert_eq!(refused["refused"]["step"], "route");
    assert_eq!(refused["refused"]["status"], 404);
    let wrong_method = explain(&denied, &["-X", "POST", "/products/1"]);
    assert_eq!(wrong_method["refused"]["status"], 405);

    // The quickstart as shipped: the text form names each step.
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/quickstart.toml");
    let out = run_cachegate(&[
        "explain",
        "--config",
        quickstart.to_str().unwrap(),
        "http://localhost:8080/products/07",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for expected in [
        "canonical path  /products/7",
        "route           product-read",
        "rate limit",
        "cache           ttl 30s",
        "upstream        GET /products/7",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }

    // Input it cannot explain: a clear message, failure status.
    let config = config.to_str().unwrap();
    let out = run_cachegate(&[
        "explain",
        "--config",
        config,
        "-H",
        "no colon",
        "/products/1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("'Name: value'"));
}
