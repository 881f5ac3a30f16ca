//! Operating the gateway: health and readiness, Prometheus metrics, JSON access logs, hot reload
//! under load, and refused reloads.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{
    eventually, free_port, readyz, Client, Gateway, GatewayConfig, Redis, Response, Upstream,
};
use hyper::{Method, StatusCode};

const ADMIN_TOKEN: &str = "admin-test-token";

fn ops_config(upstream_url: &str, admin_port: u16, extra: &str, policy_name: &str) -> String {
    let sections = format!(
        r#"
{extra}
[auth]
[[auth.providers]]
algorithms = ["HS256"]
secret = "operations-test-secret-0123456789"

[[routes]]
name = "item"
path = "/products/{{id}}"
rate_limit = {{ limits = [ {{ rate = "1000000/minute", name = "{policy_name}" }} ] }}

[[routes]]
name = "private"
path = "/__headers"
auth = "required"

[[routes]]
name = "scarce"
path = "/health"
rate_limit = {{ limits = [ {{ rate = "1/minute", name = "scarce" }} ] }}
"#
    );
    GatewayConfig::new(upstream_url)
        .server("log_format = \"json\"")
        .admin_on(admin_port, &format!("token = \"{ADMIN_TOKEN}\""))
        .upstream_setting("connect_timeout = \"300ms\"")
        .section(&sections)
        .to_toml()
}

async fn admin(port: u16, method: Method, path: &str, token: Option<&str>) -> Response {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("authorization", b.as_str()))
        .collect();
    Client::new()
        .send(
            method,
            &format!("http://127.0.0.1:{port}{path}"),
            &headers,
            Bytes::new(),
        )
        .await
}

#[tokio::test]
async fn readiness_follows_redis_and_the_upstream() {
    let redis_port = free_port();
    let redis = Redis::start_on(redis_port);
    let upstream = Upstream::start();
    let admin_port = free_port();
    let store = format!("[store]\nredis_url = \"redis://127.0.0.1:{redis_port}\"\n");
    let _gateway = Gateway::start(&ops_config(&upstream.url(), admin_port, &store, "v1"));

    assert_eq!(
        admin(admin_port, Method::GET, "/healthz", None)
            .await
            .status,
        StatusCode::OK
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            readyz(admin_port).await.0 == StatusCode::OK
        })
        .await
    );

    drop(redis);
    // The purge subscription notices at once, the store's health check within its interval.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let (status, body) = readyz(admin_port).await;
            status == StatusCode::SERVICE_UNAVAILABLE && body["checks"]["store"] != "ok"
        })
        .await
    );
    let (_, body) = readyz(admin_port).await;
    assert!(
        body["checks"]["store"]
            .as_str()
            .unwrap()
            .contains("not reachable"),
        "{body}"
    );
    assert_eq!(body["checks"]["upstream"], "ok");
    assert_eq!(
        admin(admin_port, Method::GET, "/healthz", None)
            .await
            .status,
        StatusCode::OK,
        "alive all along"
    );

    let _redis = Redis::start_on(redis_port);
    assert!(
        eventually(Duration::from_secs(10), || async {
            readyz(admin_port).await.0 == StatusCode::OK
        })
        .await
    );

    drop(upstream);
    let (status, body) = readyz(admin_port).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["checks"]["upstream"]
            .as_str()
            .unwrap()
            .contains("no origin accepts connections"),
        "{body}"
    );
}

/// `/metrics` once `series` has reached `value`. Metrics are recorded when a request's logging
/// phase runs, just after its response was sent, so a test that has the response polls.
async fn metrics_once(admin_port: u16, series: &str, value: f64) -> String {
    let fetch = || async {
        let resp = admin(admin_port, Method::GET, "/metrics", Some(ADMIN_TOKEN)).await;
        String::from_utf8(resp.body.to_vec()).unwrap()
    };
    let reached = eventually(Duration::from_secs(5), || async {
        fetch()
            .await
            .lines()
            .any(|l| l == format!("{series} {value}"))
    })
    .await;
    let text = fetch().await;
    assert!(reached, "{series} never reached {value}:\n{text}");
    text
}

/// The value of the metric line starting with `series ` (name and labels exactly).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no metric {series} in:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let redis = Redis::start();
    let upstream = Upstream::start();
    let admin_port = free_port();
    let store = format!("[store]\nredis_url = \"{}\"\n", redis.url());
    let gateway = Gateway::start(&ops_config(&upstream.url(), admin_port, &store, "v1"));
    let client = Client::new();
    for path in ["/products/1", "/products/2", "/products/99999"] {
        client.get(&gateway.url(path)).await;
    }
    assert_eq!(
        client.get(&gateway.url("/__headers")).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        client.get(&gateway.url("/health")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        client.get(&gateway.url("/health")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    assert_eq!(
        admin(admin_port, Method::GET, "/metrics", None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        admin(admin_port, Method::GET, "/metrics", Some("wrong"))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    // The last request's metrics are in once its series shows.
    let text = metrics_once(
        admin_port,
        r#"cachegate_requests_total{method="GET",route="scarce",status="429"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &text,
            r#"cachegate_requests_total{method="GET",route="item",status="200"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            r#"cachegate_requests_total{method="GET",route="item",status="404"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"cachegate_requests_total{method="GET",route="private",status="401"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"cachegate_requests_total{method="GET",route="scarce",status="429"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(&text, r#"cachegate_auth_failures_total{reason="missing"}"#),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"cachegate_rate_limit_decisions_total{decided_by="store",outcome="allowed",route="item"}"#
        ),
        3.0
    );
    assert_eq!(
        metric(
            &text,
            r#"cachegate_rate_limit_decisions_total{decided_by="store",outcome="limited",route="scarce"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"cachegate_upstream_duration_seconds_count{route="item"}"#
        ),
        3.0
    );
    assert_eq!(
        metric(
            &text,
            r#"cachegate_request_duration_seconds_count{route="scarce"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            r#"cachegate_store_operations_total{op="rate_limit",result="ok"}"#
        ),
        5.0
    );
    assert_eq!(metric(&text, "cachegate_store_circuit_open"), 0.0);
    assert_eq!(
        metric(
            &text,
            &format!(
                "cachegate_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );

    // An unreachable origin is counted by kind.
    drop(upstream);
    assert_eq!(
        client.get(&gateway.url("/products/1")).await.status,
        StatusCode::BAD_GATEWAY
    );
    metrics_once(
        admin_port,
        r#"cachegate_upstream_errors_total{kind="ConnectRefused"}"#,
        1.0,
    )
    .await;
}

#[tokio::test]
async fn access_log_is_one_json_event_per_request() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&ops_config(&upstream.url(), free_port(), "", "v1"));
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "alice", "exp": jsonwebtoken::get_current_timestamp() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(b"operations-test-secret-0123456789"),
    )
    .unwrap();
    let bearer = format!("Bearer {token}");
    let resp = Client::new()
        .send(
            Method::GET,
            &gateway.url("/__headers"),
            &[("authorization", &bearer), ("x-request-id", "log-test-1")],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK);
    Client::new().get(&gateway.url("/products/3")).await;

    let find = |id: &str| -> Option<serde_json::Value> {
        gateway
            .logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|event| event["target"] == "access" && event["request_id"] == id)
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            find("log-test-1").is_some()
        })
        .await,
        "{}",
        gateway.logs()
    );
    let event = find("log-test-1").unwrap();
    assert_eq!(event["method"], "GET");
    assert_eq!(event["path"], "/__headers");
    assert_eq!(event["route"], "private");
    assert_eq!(event["status"], 200);
    assert_eq!(event["client_ip"], "127.0.0.1");
    assert_eq!(event["subject"], "alice");
    assert_eq!(event["cache"], "-");
    assert_eq!(event["rate_limit"], "-");
    assert!(event["bytes"].as_u64().unwrap() > 0);
    assert!(
        event["duration_ms"].as_f64().is_some() && event["upstream_ms"].as_f64().is_some(),
        "{event}"
    );
    assert!(
        !gateway.logs().contains(&token),
        "the token never reaches the log"
    );

    // The event is written after the response is sent: poll for it.
    let item_event = || {
        gateway
            .logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["target"] == "access" && e["path"] == "/products/3")
    };
    assert!(eventually(Duration::from_secs(5), || async { item_event().is_some() }).await);
    let item = item_event().unwrap();
    assert_eq!(item["rate_limit"], "allowed");
    assert_eq!(item["route"], "item");
}

#[tokio::test]
async fn reload_under_load_fails_no_request() {
    let upstream = Upstream::start();
    let admin_port = free_port();
    let port = free_port();
    let config_v1 =
        ops_config(&upstream.url(), admin_port, "", "v1").replace("{port}", &port.to_string());
    let config_v2 =
        ops_config(&upstream.url(), admin_port, "", "v2").replace("{port}", &port.to_string());
    let gateway = Gateway::start_on(port, &config_v1);

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, served, url) = (stop.clone(), served.clone(), gateway.url("/products/1"));
        load.push(tokio::spawn(async move {
            let client = Client::new();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let resp = client.get(&url).await;
                if resp.status != StatusCode::OK {
                    failures.push(resp.status);
                }
                served.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }

    // Alternate the two files, reloading by SIGHUP and by the admin endpoint.
    for round in 0..6 {
        let config = if round % 2 == 0 {
            &config_v2
        } else {
            &config_v1
        };
        std::fs::write(&gateway.config, config).unwrap();
        if round % 2 == 0 {
            gateway.process.signal("HUP");
        } else {
            let resp = admin(admin_port, Method::POST, "/reload", Some(ADMIN_TOKEN)).await;
            assert_eq!(
                resp.status,
                StatusCode::OK,
                "{:?}",
                String::from_utf8_lossy(&resp.body)
            );
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        assert_eq!(
            task.await.unwrap(),
            Vec::<StatusCode>::new(),
            "requests failed during reloads"
        );
    }
    assert!(
        served.load(Ordering::Relaxed) > 50,
        "the load ran: {} requests",
        served.load(Ordering::Relaxed)
    );

    // The last reload (round 5, v1 by POST) is in force; then v2 by SIGHUP.
    std::fs::write(&gateway.config, &config_v2).unwrap();
    gateway.process.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || async {
            Client::new()
                .get(&gateway.url("/products/1"))
                .await
                .header("ratelimit-policy")
                .is_some_and(|p| p.starts_with("\"v2\""))
        })
        .await
    );
    metrics_once(
        admin_port,
        r#"cachegate_config_reloads_total{result="ok"}"#,
        7.0,
    )
    .await;
}

#[tokio::test]
async fn an_invalid_reload_is_refused_and_the_old_rules_keep_serving() {
    let upstream = Upstream::start();
    let admin_port = free_port();
    let gateway = Gateway::start(&ops_config(&upstream.url(), admin_port, "", "v1"));
    let port = gateway.port;
    let broken = ops_config(&upstream.url(), admin_port, "", "v2")
        .replace("{port}", &port.to_string())
        .replace("path = \"/health\"", "path = \"health\"");
    std::fs::write(&gateway.config, broken).unwrap();

    let resp = admin(admin_port, Method::POST, "/reload", Some(ADMIN_TOKEN)).await;
    assert_eq!(resp.status, StatusCode::UNPROCESSABLE_ENTITY);
    let errors = resp.json()["errors"].as_array().unwrap().clone();
    let expected = format!("{}:", gateway.config.display());
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().starts_with(&expected)
                && e.as_str().unwrap().contains("must start with `/`")),
        "the same messages as `cachegate check`: {errors:?}"
    );
    gateway.process.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || async {
            gateway.logs().matches("reload refused").count() >= 2
        })
        .await
    );

    let resp = Client::new().get(&gateway.url("/products/1")).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert!(
        resp.header("ratelimit-policy")
            .unwrap()
            .starts_with("\"v1\""),
        "the old rules still serve"
    );

    // Without the token, or with none configured, reload is refused.
    assert_eq!(
        admin(admin_port, Method::POST, "/reload", None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let text = String::from_utf8(
        admin(admin_port, Method::GET, "/metrics", Some(ADMIN_TOKEN))
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    assert_eq!(
        metric(&text, r#"cachegate_config_reloads_total{result="error"}"#),
        2.0
    );
}

#[tokio::test]
async fn reload_needs_a_configured_token() {
    let upstream = Upstream::start();
    let admin_port = free_port();
    let config = ops_config(&upstream.url(), admin_port, "", "v1")
        .replace(&format!("token = \"{ADMIN_TOKEN}\"\n"), "");
    let _gateway = Gateway::start(&config);
    let resp = admin(admin_port, Method::POST, "/reload", Some(ADMIN_TOKEN)).await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN);
    assert!(resp.json()["error"]
        .as_str()
        .unwrap()
        .contains("set [admin] token"));
    assert_eq!(
        admin(admin_port, Method::GET, "/metrics", None)
            .await
            .status,
        StatusCode::OK,
        "metrics are open without a token"
    );
}

/// A signal sent the moment the port answers finds its handler in place: SIGHUP reloads, it does
/// not end the process (the default action of an unhandled SIGHUP).
#[tokio::test]
async fn a_sighup_as_soon_as_the_port_answers_reloads_and_never_kills() {
    let upstream = Upstream::start();
    for _ in 0..3 {
        let admin_port = free_port();
        let gateway = Gateway::start(&ops_config(&upstream.url(), admin_port, "", "v1"));
        gateway.process.signal("HUP");
        let resp = Client::new().get(&gateway.url("/products/1")).await;
        assert_eq!(resp.status, StatusCode::OK, "the gateway is still serving");
    }
}

/// The label names a PromQL expression groups or filters by (`by (a, b)`, `{a="x", b=~"y"}`).
fn promql_labels(expr: &str) -> Vec<String> {
    let mut labels = Vec::new();
    for (open, close) in [("by (", ')'), ("{", '}')] {
        let mut rest = expr;
        while let Some(start) = rest.find(open) {
            let inner = &rest[start + open.len()..];
            let end = inner.find(close).expect("balanced PromQL");
            for part in inner[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    labels.push(name);
                }
            }
            rest = &inner[end..];
        }
    }
    labels
}

/// The shipped Grafana dashboard queries only metrics and labels that `/metrics` exports once
/// the gateway has served every kind of traffic the dashboard shows, and the shipped Prometheus
/// configuration scrapes the admin listener's `/metrics` with the admin token.
#[tokio::test]
async fn the_grafana_dashboard_queries_what_the_gateway_exports() {
    let redis = Redis::start();
    let upstream = Upstream::start();
    let admin_port = free_port();
    let extra = format!(
        "[store]\nredis_url = \"{}\"\n\n[[routes]]\nname = \"list\"\npath = \"/products\"\n\
         methods = [\"GET\", \"HEAD\"]\ncache = {{ ttl = \"30s\" }}\n",
        redis.url()
    );
    let gateway = Gateway::start(&ops_config(&upstream.url(), admin_port, &extra, "v1"));
    let client = Client::new();
    for path in [
        "/products",
        "/products",
        "/products/1",
        "/__headers",
        "/health",
        "/health",
    ] {
        client.get(&gateway.url(path)).await;
    }
    let created = client
        .send(
            Method::POST,
            &gateway.url("/products"),
            &[("content-type", "application/json")],
            Bytes::from_static(br#"{"name":"Lamp","price":1,"stock":1}"#),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let reload = admin(admin_port, Method::POST, "/reload", Some(ADMIN_TOKEN)).await;
    assert_eq!(reload.status, StatusCode::OK);
    drop(upstream);
    assert_eq!(
        client.get(&gateway.url("/products/2")).await.status,
        StatusCode::BAD_GATEWAY
    );
    let text = metrics_once(
        admin_port,
        r#"cachegate_upstream_errors_total{kind="ConnectRefused"}"#,
        1.0,
    )
    .await;

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/grafana");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("cachegate-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let metrics: Vec<&str> = expr
                .match_indices("cachegate_")
                .map(|(at, _)| {
                    let rest = &expr[at..];
                    let end = rest
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len());
                    &rest[..end]
                })
                .collect();
            assert!(!metrics.is_empty(), "{expr} queries no cachegate metric");
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| {
                    metrics.iter().any(|m| {
                        l.strip_prefix(m)
                            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                    })
                })
                .collect();
            for metric in &metrics {
                assert!(
                    lines.iter().any(|l| l.starts_with(metric)),
                    "{metric} (queried by {:?}) is not in /metrics:\n{text}",
                    panel["title"]
                );
            }
            // `instance` and `job` are Prometheus's own target labels.
            for label in promql_labels(expr) {
                if ["instance", "job", "le"].contains(&label.as_str()) {
                    continue;
                }
                assert!(
                    lines.iter().any(|l| l.contains(&format!("{label}=\""))),
                    "label {label} (in {expr}) is on none of {metrics:?} in /metrics"
                );
            }
            queried += 1;
        }
    }
    assert!(queried >= 20, "the dashboard has {queried} queries");

    let scrape = std::fs::read_to_string(root.join("prometheus.yml")).unwrap();
    let scrape = &yaml_rust2::YamlLoader::load_from_str(&scrape).unwrap()[0];
    let job = &scrape["scrape_configs"][0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    assert_eq!(job["authorization"]["type"].as_str(), Some("Bearer"));
    assert!(job["static_configs"][0]["targets"][0].as_str().is_some());
}
