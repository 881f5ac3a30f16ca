//! `cachegate init --openapi`: the configuration generated from upstream-example's own
//! `/openapi.json` is valid as written and, run in front of upstream-example, caches the reads,
//! asks writes for a token with the document's scope, and purges the list a write changes.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::{free_port, mint_token, run_cachegate, x_cache, Client, Gateway, Upstream};
use hyper::{Method, StatusCode};

fn init(args: &[&str]) -> std::process::Output {
    run_cachegate(&[&["init"], args].concat())
}

fn check(config: &Path) {
    let out = run_cachegate(&["check", "--config", config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "cachegate check refused the generated file:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(config).unwrap()
    );
}

#[tokio::test]
async fn the_config_generated_from_the_apis_openapi_runs_end_to_end() {
    let upstream = Upstream::start();
    let dir = tempfile::TempDir::new().unwrap();
    let generated = dir.path().join("cachegate.toml");
    let out = init(&[
        "--openapi",
        &format!("{}/openapi.json", upstream.url()),
        "--upstream",
        &upstream.url(),
        "-o",
        generated.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check(&generated);
    let text = std::fs::read_to_string(&generated).unwrap();
    assert!(text.contains("path = \"/products/{id:int}\""), "{text}");
    assert!(
        text.contains("scopes = [\"products:write\"]"),
        "the OAuth2 scope is carried over:\n{text}"
    );

    // Never over an existing file.
    let again = init(&[
        "--openapi",
        &format!("{}/openapi.json", upstream.url()),
        "-o",
        generated.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));

    // Run it as generated, on free ports.
    let port = free_port();
    let admin = free_port();
    let config = text
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin}"));
    let gateway = Gateway::start_on(port, &config);
    let client = Client::new();

    // Reads are cached; /products/07 is /products/7.
    let read = |path: &'static str| {
        let client = &client;
        let url = gateway.url(path);
        async move { client.get(&url).await }
    };
    assert_eq!(x_cache(&read("/products/7").await), "MISS");
    assert_eq!(x_cache(&read("/products/07").await), "HIT");
    assert_eq!(x_cache(&read("/products").await), "MISS");
    assert_eq!(x_cache(&read("/products").await), "HIT");
    // Paths the document does not describe are refused.
    assert_eq!(read("/__stats").await.status, StatusCode::NOT_FOUND);

    // Writes need a token with the document's scope.
    let body = Bytes::from_static(br#"{"name":"Lamp","price":12.5,"stock":3}"#);
    let json = ("content-type", "application/json");
    let anonymous = client
        .send(
            Method::PUT,
            &gateway.url("/products/7"),
            &[json],
            body.clone(),
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let mint = |scope: &str| {
        format!(
            "Bearer {}",
            mint_token(&gateway.config, &["--scope", scope])
        )
    };
    let reader = mint("products:read");
    let wrong_scope = client
        .send(
            Method::PUT,
            &gateway.url("/products/7"),
            &[json, ("authorization", &reader)],
            body.clone(),
        )
        .await;
    assert_eq!(wrong_scope.status, StatusCode::FORBIDDEN);
    let writer = mint("products:write");
    let put = client
        .send(
            Method::PUT,
            &gateway.url("/products/7"),
            &[json, ("authorization", &writer)],
            body,
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{:?}", put.json());

    // The write purged the product and the list.
    let after = read("/products/7").await;
    assert_eq!(x_cache(&after), "MISS");
    assert_eq!(after.json()["name"], "Lamp");
    assert_eq!(x_cache(&read("/products").await), "MISS");
}

#[test]
fn a_yaml_document_with_bearer_and_api_key_schemes() {
    let dir = tempfile::TempDir::new().unwrap();
    let document = dir.path().join("openapi.yaml");
    std::fs::write(
        &document,
        r#"
openapi: 3.0.3
info: {title: Orders, version: "2"}
servers: [{url: "https://localhost:8443/v2"}]
components:
  securitySchemes:
    jwt: {type: http, scheme: bearer, bearerFormat: JWT}
    key: {type: apiKey, in: header, name: X-Api-Key}
security: [{jwt: []}]
paths:
  /orders:
    get: {responses: {"200": {description: ok}}}
    post: {responses: {"201": {description: created}}}
  /orders/{orderId}:
    parameters: [{name: orderId, in: path, required: true, schema: {type: string}}]
    get: {responses: {"200": {description: ok}}}
    delete: {responses: {"204": {description: gone}}}
  /reports:
    get:
      security: [{key: []}]
      responses: {"200": {description: ok}}
  /catalog:
    get:
      security: [{key: []}, {}]
      responses: {"200": {description: ok}}
  /health:
    get: {security: [], responses: {"200": {description: ok}}}
"#,
    )
    .unwrap();
    let out = init(&["--openapi", document.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let config = dir.path().join("orders.toml");
    std::fs::write(&config, &text).unwrap();
    check(&config);
    for expected in [
        // The server's scheme and authority; its base path is part of every request's path.
        "addresses = [\"https://localhost:8443\"]",
        // Global bearer security: reads cached per user, writes require a token.
        "path = \"/v2/orders/{orderId}\"",
        "cache = { ttl = \"10s\", scope = \"user\", statuses = [200] }",
        "auth = \"required\"",
        "purge = { paths = [\"/v2/orders\"] }",
        // An API key the gateway cannot check: passed through, never cached.
        "Not cached: the origin checks credentials",
        "Not cached: a health or status answer must be live.",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    // An optional API key: a keyed caller's answer must not reach an anonymous one.
    let catalog = text
        .split("\n\n")
        .find(|block| block.contains("path = \"/v2/catalog\""))
        .unwrap_or_else(|| panic!("no /catalog route in:\n{text}"));
    assert!(
        catalog.contains("Not cached") && !catalog.contains("cache = {"),
        "{catalog}"
    );

    let bad = dir.path().join("swagger.json");
    std::fs::write(&bad, r#"{"swagger": "2.0", "paths": {}}"#).unwrap();
    let out = init(&["--openapi", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("3.0 and 3.1"));
}

/// init on real documents (installed pinned by `scripts/install-deps --with-frameworks`): its
/// output passes `check` as written, nothing is skipped, and the shapes those documents use
/// are routed: parameters carrying slashes, several parameters in one segment, differently named
/// parameters at one position, an API key as an alternative to OAuth2.
#[test]
fn real_openapi_documents_give_configurations_check_accepts() {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/node/node_modules");
    assert!(
        modules.exists(),
        "{} is missing: run `scripts/install-deps --with-frameworks` (the README's test command does)",
        modules.display()
    );
    let dir = tempfile::TempDir::new().unwrap();
    let documents = [
        ("github", "@octokit/openapi/generated/api.github.com.json"),
        ("ghes", "@octokit/openapi/generated/ghes-3.19.json"),
        ("petstore", "@readme/oas-examples/3.0/json/petstore.json"),
    ];
    let mut generated = std::collections::HashMap::new();
    for (name, document) in documents {
        let config = dir.path().join(format!("{name}.toml"));
        let out = init(&[
            "--openapi",
            modules.join(document).to_str().unwrap(),
            "-o",
            config.to_str().unwrap(),
        ]);
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{name}: {said}");
        assert!(said.contains(", 0 skipped"), "{name}: {said}");
        // Offline: the documents' servers are not resolved by check.
        check(&config);
        generated.insert(name, std::fs::read_to_string(&config).unwrap());
    }
    let github = &generated["github"];
    for expected in [
        // `docs/readme.md` reaches the origin whole.
        r#"path = "/repos/{owner}/{repo}/contents/{*path}""#,
        // A catch-all would swallow `/branches/{branch}/protection`: a plain parameter.
        r#"path = "/repos/{owner}/{repo}/branches/{branch}/protection""#,
        "is the route of /repos/{owner}/{repo}/compare/{basehead}",
    ] {
        assert!(github.contains(expected), "{expected}");
    }
    // Swagger Petstore: `api_key` alone is the origin's to check, and not cached.
    let petstore = &generated["petstore"];
    let pet = petstore
        .split("[[routes]]")
        .find(|r| r.contains(r#"name = "pet-petid-read""#))
        .expect("the pet read route");
    assert!(!pet.contains("auth =") && !pet.contains("cache ="), "{pet}");
}
