//! The HTTP API: products CRUD, health, and the diagnostic `/__*` endpoints tests rely on.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET, HEAD | `/health` | `200 {"status":"ok"}` |
//! | GET | `/products?page=&per_page=` | `200 {"items":[..],"page","per_page","total"}` |
//! | POST | `/products` | `201` + `Location`, the new product |
//! | GET, HEAD | `/products/{id}` | `200` with an `ETag`, `304` on a matching `If-None-Match`, or `404` |
//! | PUT | `/products/{id}` | `200`, every field required |
//! | PATCH | `/products/{id}` | `200`, any subset of fields |
//! | DELETE | `/products/{id}` | `204`, then `404` |
//! | GET | `/__stats` | requests served per route and connections accepted |
//! | any | `/__headers` | the request's method and headers as JSON |
//! | POST | `/__sink` | streams the body through SHA-256: `{"bytes":N,"sha256":".."}`; counted again as `POST /__sink completed` once the whole body arrived |
//! | GET | `/__bytes/{n}` | `n` bytes of the pattern `i % 251`, streamed |
//! | any | `/__respond[/...]?status=&cache-control=&expires=&age=&date=&vary=&set-cookie=&etag=&last-modified=&cache-groups=&surrogate-key=&cache-group-invalidation=&location=&content-location=&fail-after=&h.NAME=` | a response with those headers (`h.NAME=value`: any header `NAME`) (`304` when `If-None-Match` equals `etag`; `503` once this endpoint has answered more than `fail-after` times); the body says how many times this endpoint answered and echoes the request's `Accept` and `Accept-Language` |
//!
//! Errors are JSON `{"error": code, "message": text}`; validation errors add `"fields"`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, ETAG, IF_NONE_MATCH, LOCATION};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::db::{Db, Product, ProductFields};
use crate::stats::Stats;

/// This API's OpenAPI 3.1 description, served at `/openapi.json` (what `cachegate init
/// --openapi` reads).
const OPENAPI: &str = include_str!("../openapi.json");

pub type ResponseBody = BoxBody<Bytes, Infallible>;

/// Largest JSON request body the products API accepts.
const MAX_JSON_BODY: usize = 1 << 20;
const MAX_PER_PAGE: u64 = 1000;

pub struct App {
    pub db: Arc<Db>,
    pub stats: Stats,
    /// Added before every database call, to model a slow database.
    pub db_latency: Duration,
}

/// Answers one request; never fails (errors become JSON responses).
pub async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let read = method == Method::GET || method == Method::HEAD;

    let response = match (segments.as_slice(), &method) {
        (["health"], _) if read => {
            app.stats.record("GET /health");
            json_response(StatusCode::OK, &json!({"status": "ok"}))
        }
        (["openapi.json"], _) if read => {
            app.stats.record("GET /openapi.json");
            let mut resp = Response::new(BoxBody::new(Full::new(Bytes::from_static(
                OPENAPI.as_bytes(),
            ))));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        (["__stats"], &Method::GET) => json_response(StatusCode::OK, &app.stats.to_json()),
        (["__headers"], _) => {
            app.stats.record("ANY /__headers");
            echo_headers(&req)
        }
        (["__sink"], &Method::POST) => {
            app.stats.record("POST /__sink");
            let resp = sink(req.into_body()).await;
            if resp.status() == StatusCode::OK {
                app.stats.record("POST /__sink completed");
            }
            resp
        }
        (["__respond", ..], &Method::GET) => {
            app.stats.record("GET /__respond");
            respond_as_asked(&app, &req)
        }
        (["__respond", ..], _) => {
            app.stats.record("WRITE /__respond");
            respond_as_asked(&app, &req)
        }
        (["__bytes", n], &Method::GET) => {
            app.stats.record("GET /__bytes/{n}");
            match n.parse::<u64>() {
                Ok(n) => pattern_response(n),
                Err(_) => error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "size must be a whole number of bytes",
                ),
            }
        }
        (["products"], _) if read => {
            app.stats.record("GET /products");
            list_products(&app, req.uri().query()).await
        }
        (["products"], &Method::POST) => {
            app.stats.record("POST /products");
            create_product(&app, req.into_body()).await
        }
        (["products"], _) => method_not_allowed("GET, HEAD, POST"),
        (["products", id], _) => {
            let Some(id) = parse_id(id) else {
                return Ok(error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "product id must be a positive integer",
                ));
            };
            match method {
                Method::GET | Method::HEAD => {
                    app.stats.record("GET /products/{id}");
                    let if_none_match = req.headers().get(IF_NONE_MATCH).cloned();
                    get_product(&app, id, if_none_match).await
                }
                Method::PUT => {
                    app.stats.record("PUT /products/{id}");
                    update_product(&app, id, req.into_body(), true).await
                }
                Method::PATCH => {
                    app.stats.record("PATCH /products/{id}");
                    update_product(&app, id, req.into_body(), false).await
                }
                Method::DELETE => {
                    app.stats.record("DELETE /products/{id}");
                    delete_product(&app, id).await
                }
                _ => method_not_allowed("GET, HEAD, PUT, PATCH, DELETE"),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no resource at {path}"),
        ),
    };
    Ok(response)
}

fn parse_id(raw: &str) -> Option<i64> {
    raw.parse::<i64>().ok().filter(|id| *id > 0)
}

/// Runs a blocking database call on tokio's blocking pool, after the configured latency.
async fn run_db<T: Send + 'static>(
    app: &App,
    op: impl FnOnce(&Db) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, Response<ResponseBody>> {
    if !app.db_latency.is_zero() {
        tokio::time::sleep(app.db_latency).await;
    }
    let db = app.db.clone();
    match tokio::task::spawn_blocking(move || op(&db)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "database_error",
            &e.to_string(),
        )),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            &e.to_string(),
        )),
    }
}

async fn list_products(app: &App, query: Option<&str>) -> Response<ResponseBody> {
    let mut page = 1u64;
    let mut per_page = 20u64;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let target = match key {
            "page" => &mut page,
            "per_page" => &mut per_page,
            _ => continue,
        };
        match value.parse::<u64>() {
            Ok(v) if v >= 1 => *target = v,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("{key} must be a whole number of at least 1, got {value:?}"),
                )
            }
        }
    }
    if per_page > MAX_PER_PAGE {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("per_page must be at most {MAX_PER_PAGE}, got {per_page}"),
        );
    }
    match run_db(app, move |db| db.list(page, per_page)).await {
        Ok((items, total)) => json_response(
            StatusCode::OK,
            &json!({"items": items, "page": page, "per_page": per_page, "total": total}),
        ),
        Err(resp) => resp,
    }
}

fn etag(product: &Product) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{}-{}\"", product.id, product.version))
        .expect("etag is ASCII")
}

fn product_response(status: StatusCode, product: &Product) -> Response<ResponseBody> {
    let mut resp = json_response(status, &json!(product));
    resp.headers_mut().insert(ETAG, etag(product));
    resp
}

async fn get_product(
    app: &App,
    id: i64,
    if_none_match: Option<HeaderValue>,
) -> Response<ResponseBody> {
    match run_db(app, move |db| db.get(id)).await {
        Ok(Some(product)) => {
            let tag = etag(&product);
            let matches = if_none_match
                .and_then(|v| v.to_str().ok().map(str::to_owned))
                .is_some_and(|v| {
                    v.split(',')
                        .any(|t| t.trim() == "*" || t.trim().trim_start_matches("W/") == tag)
                });
            if matches {
                app.stats.record("GET /products/{id} 304");
                let mut resp = Response::new(empty());
                *resp.status_mut() = StatusCode::NOT_MODIFIED;
                resp.headers_mut().insert(ETAG, tag);
                return resp;
            }
            product_response(StatusCode::OK, &product)
        }
        Ok(None) => not_found(id),
        Err(resp) => resp,
    }
}

async fn create_product(app: &App, body: Incoming) -> Response<ResponseBody> {
    let fields = match read_fields(body, true).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    match run_db(app, move |db| db.create(&fields)).await {
        Ok(product) => {
            let mut resp = product_response(StatusCode::CREATED, &product);
            resp.headers_mut().insert(
                LOCATION,
                HeaderValue::from_str(&format!("/products/{}", product.id))
                    .expect("location is ASCII"),
            );
            resp
        }
        Err(resp) => resp,
    }
}

async fn update_product(
    app: &App,
    id: i64,
    body: Incoming,
    replace: bool,
) -> Response<ResponseBody> {
    let fields = match read_fields(body, replace).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    match run_db(app, move |db| db.update(id, &fields)).await {
        Ok(Some(product)) => product_response(StatusCode::OK, &product),
        Ok(None) => not_found(id),
        Err(resp) => resp,
    }
}

async fn delete_product(app: &App, id: i64) -> Response<ResponseBody> {
    match run_db(app, move |db| db.delete(id)).await {
        Ok(true) => {
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp
        }
        Ok(false) => not_found(id),
        Err(resp) => resp,
    }
}

/// Reads and validates a product JSON body. With `complete`, every required field must be present
/// (POST, PUT); otherwise any non-empty subset is accepted (PATCH).
async fn read_fields(
    body: Incoming,
    complete: bool,
) -> Result<ProductFields, Response<ResponseBody>> {
    let bytes = match Limited::new(body, MAX_JSON_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                &format!("product bodies are limited to {MAX_JSON_BODY} bytes"),
            ))
        }
    };
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_json",
            &format!("request body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(object) = value else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "request body must be a JSON object",
        ));
    };
    validate_fields(&object, complete).map_err(|fields| {
        let body = json!({
            "error": "validation_failed",
            "message": "the product has invalid or missing fields",
            "fields": fields,
        });
        json_response(StatusCode::UNPROCESSABLE_ENTITY, &body)
    })
}

fn validate_fields(
    object: &Map<String, Value>,
    complete: bool,
) -> Result<ProductFields, Vec<Value>> {
    let mut problems = Vec::new();
    let mut fields = ProductFields::default();
    for (key, value) in object {
        match key.as_str() {
            "name" => match value.as_str() {
                Some(s) if !s.trim().is_empty() && s.len() <= 200 => fields.name = Some(s.to_owned()),
                _ => problems.push(json!({"field": "name", "message": "must be a non-empty string of at most 200 bytes"})),
            },
            "description" => match value.as_str() {
                Some(s) if s.len() <= 10_000 => fields.description = Some(s.to_owned()),
                _ => problems.push(json!({"field": "description", "message": "must be a string of at most 10000 bytes"})),
            },
            "price" => match value.as_f64() {
                Some(p) if p >= 0.0 && p.is_finite() => fields.price = Some(p),
                _ => problems.push(json!({"field": "price", "message": "must be a number >= 0"})),
            },
            "stock" => match value.as_i64() {
                Some(s) if s >= 0 => fields.stock = Some(s),
                _ => problems.push(json!({"field": "stock", "message": "must be a whole number >= 0"})),
            },
            "id" | "version" => problems.push(json!({"field": key, "message": "is assigned by the server"})),
            other => problems.push(json!({"field": other, "message": "is not a product field"})),
        }
    }
    if complete {
        for (name, present) in [
            ("name", fields.name.is_some()),
            ("price", fields.price.is_some()),
            ("stock", fields.stock.is_some()),
        ] {
            if !present && !problems.iter().any(|p| p["field"] == name) {
                problems.push(json!({"field": name, "message": "is required"}));
            }
        }
    } else if object.is_empty() {
        problems.push(json!({"field": null, "message": "a PATCH must change at least one field"}));
    }
    if problems.is_empty() {
        Ok(fields)
    } else {
        Err(problems)
    }
}

/// A response shaped by the query string, for cache tests: `status` and any of the listed
/// headers, with a body counting this endpoint's answers.
fn respond_as_asked(app: &App, req: &Request<Incoming>) -> Response<ResponseBody> {
    let served = app.stats.count("GET /__respond");
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let body = json!({"served": served, "accept": header("accept"), "accept-language": header("accept-language")});
    let mut resp = json_response(StatusCode::OK, &body);
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match name {
            "status" => {
                if let Some(status) = value
                    .parse()
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                {
                    *resp.status_mut() = status;
                }
            }
            "fail-after" if value.parse::<u64>().is_ok_and(|n| served > n) => {
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            "cache-control"
            | "expires"
            | "age"
            | "date"
            | "vary"
            | "set-cookie"
            | "etag"
            | "last-modified"
            | "cache-groups"
            | "surrogate-key"
            | "cache-group-invalidation"
            | "location"
            | "content-location" => append_header(&mut resp, name, &value),
            // Any other response header, for conformance tests: `h.cdn-cache-control=max-age%3D5`.
            _ => {
                if let Some(name) = name.strip_prefix("h.") {
                    append_header(&mut resp, name, &value);
                }
            }
        }
    }
    let etag_matches = resp.headers().get(ETAG).is_some_and(|etag| {
        req.headers()
            .get(IF_NONE_MATCH)
            .is_some_and(|condition| condition == etag)
    });
    if etag_matches && resp.status() == StatusCode::OK {
        app.stats.record("GET /__respond 304");
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        *resp.body_mut() = empty();
        resp.headers_mut().remove(CONTENT_TYPE);
    }
    resp
}

fn append_header(resp: &mut Response<ResponseBody>, name: &str, value: &str) {
    if let (Ok(name), Ok(value)) = (
        hyper::header::HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        resp.headers_mut().append(name, value);
    }
}

/// Decodes `%XX` escapes and `+` (the test clients encode header values in the query).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn echo_headers(req: &Request<Incoming>) -> Response<ResponseBody> {
    let mut headers = Map::new();
    for (name, value) in req.headers() {
        let value = Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned());
        match headers.get_mut(name.as_str()) {
            Some(Value::Array(list)) => list.push(value),
            _ => {
                headers.insert(name.as_str().to_owned(), Value::Array(vec![value]));
            }
        }
    }
    json_response(
        StatusCode::OK,
        &json!({"method": req.method().as_str(), "uri": req.uri().to_string(), "headers": headers}),
    )
}

async fn sink(mut body: Incoming) -> Response<ResponseBody> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    total += data.len() as u64;
                    hasher.update(data);
                }
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "body_error",
                    &format!("reading the body failed: {e}"),
                )
            }
        }
    }
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    json_response(StatusCode::OK, &json!({"bytes": total, "sha256": digest}))
}

/// A body of `len` bytes where byte `i` is `i % 251`, produced chunk by chunk as it is sent.
struct PatternBody {
    offset: u64,
    len: u64,
}

const PATTERN_CHUNK: u64 = 64 * 1024;

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.offset >= self.len {
            return Poll::Ready(None);
        }
        let n = PATTERN_CHUNK.min(self.len - self.offset);
        let chunk: Vec<u8> = (self.offset..self.offset + n)
            .map(|i| (i % 251) as u8)
            .collect();
        self.offset += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset >= self.len
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len - self.offset)
    }
}

fn pattern_response(len: u64) -> Response<ResponseBody> {
    let mut resp = Response::new(BoxBody::new(PatternBody { offset: 0, len }));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

fn empty() -> ResponseBody {
    BoxBody::new(Full::new(Bytes::new()))
}

fn json_response(status: StatusCode, value: &Value) -> Response<ResponseBody> {
    let body = serde_json::to_vec(value).expect("JSON values serialize");
    let mut resp = Response::new(BoxBody::new(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<ResponseBody> {
    json_response(status, &json!({"error": code, "message": message}))
}

fn not_found(id: i64) -> Response<ResponseBody> {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("product {id} does not exist"),
    )
}

fn method_not_allowed(allow: &'static str) -> Response<ResponseBody> {
    let mut resp = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("allowed methods: {allow}"),
    );
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}
