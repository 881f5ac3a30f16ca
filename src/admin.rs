//! The admin listener: a separate address (loopback by default) for operators and
//! orchestrators, never for clients.
//!
//! - `GET /healthz`: the process is alive.
//! - `GET /readyz`: `200` when every configured dependency is usable, else `503` with a JSON
//!   body that names what is not ready (a JWKS never loaded, Redis unreachable).

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::snapshot::SharedSnapshot;
use crate::store::Store;

pub struct Admin {
    snapshot: SharedSnapshot,
    store: Arc<dyn Store>,
}

impl Admin {
    pub fn new(snapshot: SharedSnapshot, store: Arc<dyn Store>) -> Admin {
        Admin { snapshot, store }
    }

    /// Each readiness check by name, with `None` when it passes or the reason it does not.
    fn readiness(&self) -> Vec<(&'static str, Option<String>)> {
        let snapshot = self.snapshot.load();
        let mut checks = vec![("config", None)];
        checks.push(("store", self.store.health().err()));
        if let Some(auth) = &snapshot.auth {
            checks.push(("auth", auth.ready().err()));
        }
        checks
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Vec<u8>> {
    let body = serde_json::to_vec(&body).expect("JSON values serialize");
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("a valid response")
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        if req.method != http::Method::GET && req.method != http::Method::HEAD {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "the admin endpoints here answer GET"}),
            );
        }
        match req.uri.path() {
            "/healthz" => json_response(StatusCode::OK, json!({"status": "alive"})),
            "/readyz" => {
                let checks = self.readiness();
                let ready = checks.iter().all(|(_, problem)| problem.is_none());
                let detail: serde_json::Map<String, serde_json::Value> = checks
                    .into_iter()
                    .map(|(name, problem)| {
                        (
                            name.to_owned(),
                            json!(problem.unwrap_or_else(|| "ok".to_owned())),
                        )
                    })
                    .collect();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_response(status, json!({"ready": ready, "checks": detail}))
            }
            other => json_response(
                StatusCode::NOT_FOUND,
                json!({"error": format!("no admin endpoint at {other}; try /healthz or /readyz")}),
            ),
        }
    }
}
