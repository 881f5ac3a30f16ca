//! cachegate in front of the web frameworks people run, configured by `cachegate init` from the
//! framework's own OpenAPI document and run with that output unchanged (ports through init's
//! flags). The apps live in tests/backends/ and are written the way each framework's tutorial
//! writes them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::{cachegate_bin, free_port, x_cache, Client, Framework, Gateway};
use hyper::{Method, StatusCode};

/// `cachegate init` against the app's served document, then `cachegate check` on the result.
fn init_and_check(document_url: &str, port: u16, admin: u16, dir: &Path) -> PathBuf {
    let config = dir.join("cachegate.toml");
    let out = Command::new(cachegate_bin())
        .args(["init", "--openapi", document_url])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .arg("-o")
        .arg(&config)
        .output()
        .expect("running cachegate init");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "init failed: {said}");
    assert!(said.contains("routes:"), "init prints a summary: {said}");
    let checked = Command::new(cachegate_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("running cachegate check");
    assert!(
        checked.status.success(),
        "check refused init's output:\n{}\n{}",
        String::from_utf8_lossy(&checked.stderr),
        std::fs::read_to_string(&config).unwrap_or_default()
    );
    config
}

fn gateway_on(config: &Path, port: u16) -> Gateway {
    let text = std::fs::read_to_string(config).expect("reading init's output");
    Gateway::start_on(port, &text)
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
async fn fastapi_behind_inits_output_caches_purges_and_never_loops() {
    let app = Framework::python("fastapi_app");
    let dir = tempfile::TempDir::new().unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = init_and_check(
        &format!("{}/openapi.json", app.url()),
        port,
        admin,
        dir.path(),
    );
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains(r#"path = "/items/""#) && text.contains(r#"paths = ["/items/"]"#),
        "the collection keeps FastAPI's spelling and item writes purge it:\n{text}"
    );
    let gw = gateway_on(&config, port);
    // No redirect following: a loop would show as a 307 here.
    let client = Client::new();

    // Both spellings of the collection reach FastAPI's `/items/` (no 307) and share one entry.
    let list = client.get(&gw.url("/items/")).await;
    assert_eq!(list.status, StatusCode::OK, "{:?}", list.body);
    assert_eq!(x_cache(&list), "MISS");
    let other_spelling = client.get(&gw.url("/items")).await;
    assert_eq!(other_spelling.status, StatusCode::OK);
    assert_eq!(x_cache(&other_spelling), "HIT");

    // Items: MISS, HIT, conditional, HEAD.
    let first = client.get(&gw.url("/items/1")).await;
    assert_eq!((first.status, x_cache(&first)), (StatusCode::OK, "MISS"));
    let etag = first.header("etag").expect("FastAPI's ETag").to_owned();
    assert_eq!(x_cache(&client.get(&gw.url("/items/01")).await), "HIT");
    let not_modified = client
        .send(
            Method::GET,
            &gw.url("/items/1"),
            &[("if-none-match", &etag)],
            Bytes::new(),
        )
        .await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    let head = client
        .send(Method::HEAD, &gw.url("/items/1"), &[], Bytes::new())
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());

    // A write refreshes the item and its list at once.
    let patched = client
        .send(
            Method::PATCH,
            &gw.url("/items/1"),
            &[JSON],
            r#"{"stock": 40}"#,
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);
    let item = client.get(&gw.url("/items/1")).await;
    assert_eq!(
        item.json()["stock"],
        40,
        "the item is fresh after the write"
    );
    let list = client.get(&gw.url("/items/")).await;
    assert_eq!(
        list.json()[0]["stock"],
        40,
        "the list is fresh after the write"
    );

    // Read-after-create: a 404 looked up before the create does not outlive it (FastAPI says
    // nowhere where it created the item).
    let missing = client.get(&gw.url("/items/3")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);

    // Creating through either spelling reaches FastAPI's `/items/` and refreshes the list.
    let created = client
        .send(
            Method::POST,
            &gw.url("/items"),
            &[JSON],
            r#"{"name": "cup"}"#,
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let list = client.get(&gw.url("/items/")).await;
    assert_eq!(list.json().as_array().map(Vec::len), Some(3));
    assert_eq!(created.json()["id"], 3);
    let found = client.get(&gw.url("/items/3")).await;
    assert_eq!(
        found.status,
        StatusCode::OK,
        "a read after the create finds it"
    );

    // Validation errors are FastAPI's own 422s.
    let invalid = client
        .send(
            Method::PATCH,
            &gw.url("/items/1"),
            &[JSON],
            r#"{"stock": "many"}"#,
        )
        .await;
    assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);

    // Orders need a token with FastAPI's scope: refused at the gateway, unseen by the app.
    let seen = app.requests_seen().await;
    let anonymous = client.get(&gw.url("/users/1/orders/")).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.requests_seen().await,
        seen,
        "the gateway answered the 401 itself"
    );
    // A token from FastAPI's own `/token`, through the gateway.
    let login = client
        .send(
            Method::POST,
            &gw.url("/token"),
            &[JSON],
            r#"{"username": "alice", "password": "secret"}"#,
        )
        .await;
    assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
    let bearer = format!("Bearer {}", login.json()["access_token"].as_str().unwrap());
    let orders = client
        .send(
            Method::GET,
            &gw.url("/users/1/orders"),
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await;
    assert_eq!(orders.status, StatusCode::OK, "{:?}", orders.body);
    assert_eq!(x_cache(&orders), "MISS");
    let again = client
        .send(
            Method::GET,
            &gw.url("/users/1/orders/"),
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await;
    assert_eq!(x_cache(&again), "HIT");
    // A valid token without FastAPI's scope: 403 at the gateway, unseen by the app.
    let seen = app.requests_seen().await;
    let unscoped = format!(
        "Bearer {}",
        common::mint_token(&config, &["--sub", "1", "--scope", "items:read"])
    );
    let forbidden = client
        .send(
            Method::GET,
            &gw.url("/users/1/orders/"),
            &[("authorization", &unscoped)],
            Bytes::new(),
        )
        .await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    assert_eq!(
        app.requests_seen().await,
        seen,
        "the gateway answered the 403 itself"
    );

    // The framework's docs and document are routed.
    assert_eq!(client.get(&gw.url("/docs")).await.status, StatusCode::OK);
    assert_eq!(
        client.get(&gw.url("/openapi.json")).await.status,
        StatusCode::OK
    );
}

/// uvicorn closes idle connections after 5 s; the gateway's pool must never hand a request to
/// one it closed.
#[tokio::test]
async fn fastapi_keep_alive_with_idle_pauses_longer_than_uvicorns() {
    let app = Framework::python("fastapi_app");
    let dir = tempfile::TempDir::new().unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = init_and_check(
        &format!("{}/openapi.json", app.url()),
        port,
        admin,
        dir.path(),
    );
    let gw = gateway_on(&config, port);
    let client = Client::new();
    let mut failures = Vec::new();
    for round in 0..3 {
        for n in 0..20 {
            let resp = client
                .send(
                    Method::PATCH,
                    &gw.url("/items/2"),
                    &[JSON],
                    format!(r#"{{"stock": {}}}"#, round * 100 + n),
                )
                .await;
            if resp.status != StatusCode::OK {
                failures.push((round, n, resp.status));
            }
        }
        tokio::time::sleep(Duration::from_millis(5_300)).await;
    }
    assert!(failures.is_empty(), "{failures:?}\n{}", gw.logs());
}

#[tokio::test]
async fn django_rest_framework_behind_inits_output_with_its_own_tokens() {
    let app = Framework::python("drf_app");
    let dir = tempfile::TempDir::new().unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = init_and_check(
        &format!("{}/api/schema/", app.url()),
        port,
        admin,
        dir.path(),
    );
    let text = std::fs::read_to_string(&config).unwrap();
    for expected in [
        r#"path = "/books/{id:int}/""#,
        r#"paths = ["/books/"]"#,
        r#"user_claim = "user_id""#,
        r#"anonymous = "shared""#,
    ] {
        assert!(
            text.contains(expected),
            "{expected} in init's output:\n{text}"
        );
    }
    let gw = gateway_on(&config, port);
    let client = Client::new();

    // Anonymous reads are shared, in either spelling (Django would 301 the one without slash).
    let list = client.get(&gw.url("/books/")).await;
    assert_eq!((list.status, x_cache(&list)), (StatusCode::OK, "MISS"));
    assert_eq!(x_cache(&client.get(&gw.url("/books")).await), "HIT");
    let book = client.get(&gw.url("/books/1")).await;
    assert_eq!((book.status, x_cache(&book)), (StatusCode::OK, "MISS"));
    assert_eq!(x_cache(&client.get(&gw.url("/books/1/")).await), "HIT");
    let head = client
        .send(Method::HEAD, &gw.url("/books/1"), &[], Bytes::new())
        .await;
    assert_eq!((head.status, x_cache(&head)), (StatusCode::OK, "HIT"));
    assert!(head.body.is_empty());
    // Django sends no validators: a conditional request gets the full answer, never a 304 the
    // entry cannot justify.
    let conditional = client
        .send(
            Method::GET,
            &gw.url("/books/1/"),
            &[("if-none-match", "\"x\"")],
            Bytes::new(),
        )
        .await;
    assert_eq!(conditional.status, StatusCode::OK);

    // simplejwt's own token endpoint, through the gateway.
    let login = client
        .send(
            Method::POST,
            &gw.url("/api/token"),
            &[JSON],
            r#"{"username": "alice", "password": "secret"}"#,
        )
        .await;
    assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
    let bearer = format!("Bearer {}", login.json()["access"].as_str().unwrap());
    let auth = ("authorization", bearer.as_str());

    // A bad token is refused at the gateway; the app never sees it.
    let seen = app.requests_seen().await;
    let forged = client
        .send(
            Method::PATCH,
            &gw.url("/books/1/"),
            &[JSON, ("authorization", "Bearer e30.e30.c2ln")],
            r#"{"stock": 1}"#,
        )
        .await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.requests_seen().await, seen);

    // A write in the other spelling is applied (not redirected) and refreshes item and list.
    let patched = client
        .send(
            Method::PATCH,
            &gw.url("/books/1"),
            &[JSON, auth],
            r#"{"stock": 30}"#,
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);
    assert_eq!(client.get(&gw.url("/books/1/")).await.json()["stock"], 30);
    assert_eq!(client.get(&gw.url("/books/")).await.json()[0]["stock"], 30);

    // The token's holder is the user simplejwt names in `user_id`: cached for them alone.
    let mine = client
        .send(Method::GET, &gw.url("/books/"), &[auth], Bytes::new())
        .await;
    assert_eq!(x_cache(&mine), "MISS");
    let again = client
        .send(Method::GET, &gw.url("/books/"), &[auth], Bytes::new())
        .await;
    assert_eq!(x_cache(&again), "HIT");

    // A local token in simplejwt's shape works against Django too; cachegate token says the
    // secret is the configuration's fallback.
    let minted = Command::new(cachegate_bin())
        .args(["token", "--config"])
        .arg(&config)
        .args([
            "--claim",
            "user_id=1",
            "--claim",
            "token_type=access",
            "--claim",
            "jti=t1",
        ])
        .env_remove("JWT_SECRET")
        .output()
        .expect("running cachegate token");
    assert!(minted.status.success());
    assert!(
        String::from_utf8_lossy(&minted.stderr).contains("JWT_SECRET is not set"),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let local = format!("Bearer {}", String::from_utf8_lossy(&minted.stdout).trim());
    let with_local = client
        .send(
            Method::PATCH,
            &gw.url("/books/1/"),
            &[JSON, ("authorization", &local)],
            r#"{"stock": 31}"#,
        )
        .await;
    assert_eq!(with_local.status, StatusCode::OK, "{:?}", with_local.body);

    // DRF's Basic authentication still works: the gateway leaves it to Django.
    let basic = client
        .send(
            Method::PATCH,
            &gw.url("/books/2/"),
            &[JSON, ("authorization", "Basic YWxpY2U6c2VjcmV0")],
            r#"{"stock": 7}"#,
        )
        .await;
    assert_eq!(basic.status, StatusCode::OK, "{:?}", basic.body);
    assert_eq!(client.get(&gw.url("/books/2")).await.json()["stock"], 7);
}

/// gunicorn closes idle connections after 2 s: writes paced around that never meet a pooled
/// connection it has closed.
#[tokio::test]
async fn django_behind_gunicorns_two_second_keep_alive_without_errors() {
    let app = Framework::python("drf_app");
    let dir = tempfile::TempDir::new().unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = init_and_check(
        &format!("{}/api/schema/", app.url()),
        port,
        admin,
        dir.path(),
    );
    let gw = gateway_on(&config, port);
    let client = Client::new();
    let basic = ("authorization", "Basic YWxpY2U6c2VjcmV0");
    let mut failures = Vec::new();
    for n in 0..14u64 {
        let resp = client
            .send(
                Method::PATCH,
                &gw.url("/books/1/"),
                &[JSON, basic],
                format!(r#"{{"stock": {n}}}"#),
            )
            .await;
        if resp.status != StatusCode::OK {
            failures.push((n, resp.status));
        }
        // Around gunicorn's 2 s, on both sides of it.
        tokio::time::sleep(Duration::from_millis(1_900 + (n % 5) * 40)).await;
    }
    assert!(failures.is_empty(), "{failures:?}\n{}", gw.logs());
}

/// Express, configured by hand: its router ignores a trailing slash, so the templates have none.
const EXPRESS_ROUTES: &str = r#"
[defaults]
unmatched = "deny"

[[routes]]
path = "/notes"
methods = ["GET", "HEAD"]
cache = { ttl = "30s" }

[[routes]]
path = "/notes"
methods = ["POST"]

[[routes]]
path = "/notes/{id:int}"
methods = ["GET", "HEAD"]
cache = { ttl = "30s" }

[[routes]]
path = "/notes/{id:int}"
methods = ["PUT", "DELETE"]
purge = ["/notes"]
"#;

#[tokio::test]
async fn express_configured_by_hand_caches_purges_and_keeps_connections_alive() {
    let app = Framework::node("express_app.js");
    let gw = Gateway::start(&common::config_for(&[&app.url()], EXPRESS_ROUTES));
    let client = Client::new();

    let list = client.get(&gw.url("/notes/")).await;
    assert_eq!((list.status, x_cache(&list)), (StatusCode::OK, "MISS"));
    assert_eq!(x_cache(&client.get(&gw.url("/notes")).await), "HIT");
    let note = client.get(&gw.url("/notes/1")).await;
    assert_eq!((note.status, x_cache(&note)), (StatusCode::OK, "MISS"));
    let etag = note.header("etag").expect("Express's ETag").to_owned();
    let revalidated = client
        .send(
            Method::GET,
            &gw.url("/notes/1/"),
            &[("if-none-match", &etag)],
            Bytes::new(),
        )
        .await;
    assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED);

    // A PUT refreshes the note and the list; a POST (its Location names the new note) the list.
    let put = client
        .send(
            Method::PUT,
            &gw.url("/notes/1"),
            &[JSON],
            r#"{"text": "buy coffee"}"#,
        )
        .await;
    assert_eq!(put.status, StatusCode::OK);
    assert_eq!(
        client.get(&gw.url("/notes/1")).await.json()["text"],
        "buy coffee"
    );
    assert_eq!(
        client.get(&gw.url("/notes")).await.json()[0]["text"],
        "buy coffee"
    );
    let created = client
        .send(
            Method::POST,
            &gw.url("/notes/"),
            &[JSON],
            r#"{"text": "water plants"}"#,
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let list = client.get(&gw.url("/notes")).await;
    assert_eq!(list.json().as_array().map(Vec::len), Some(3));

    // Node closes idle connections after 5 s and says so; writes across such pauses never fail.
    let mut failures = Vec::new();
    for round in 0..3 {
        for n in 0..5 {
            let resp = client
                .send(
                    Method::PUT,
                    &gw.url("/notes/2"),
                    &[JSON],
                    format!(r#"{{"text": "round {round} write {n}"}}"#),
                )
                .await;
            if resp.status != StatusCode::OK {
                failures.push((round, n, resp.status));
            }
        }
        tokio::time::sleep(Duration::from_millis(4_000 + round * 600)).await;
    }
    assert!(failures.is_empty(), "{failures:?}\n{}", gw.logs());
    assert!(app.requests_seen().await > 15);
}
