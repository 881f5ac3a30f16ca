//! JWT authentication end to end: the real gateway, the real upstream, tokens signed with every
//! supported algorithm family, every refusal checked to have left the upstream untouched.

mod common;

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::{
    config_for, eventually, free_port, readyz, Client, Gateway, GatewayConfig, JwksServer,
    Response, Upstream,
};
use hyper::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &str = "test-secret-0123456789abcdef0123456789";
const ISSUER: &str = "https://issuer.test";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Standard claims for `sub` with `scope`, valid for ten minutes.
fn claims(sub: &str, scope: &str) -> Value {
    json!({"sub": sub, "scope": scope, "iss": ISSUER, "aud": "api", "exp": now() + 600, "iat": now()})
}

fn encoding_key(alg: Algorithm) -> EncodingKey {
    let pem = |name: &str| std::fs::read(fixture(name)).unwrap();
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(SECRET.as_bytes())
        }
        Algorithm::RS256 | Algorithm::PS256 => {
            EncodingKey::from_rsa_pem(&pem("rsa.key.pem")).unwrap()
        }
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem("ec256.key.pem")).unwrap(),
        Algorithm::ES384 => EncodingKey::from_ec_pem(&pem("ec384.key.pem")).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem("ed25519.key.pem")).unwrap(),
        other => panic!("no test key for {other:?}"),
    }
}

fn sign(alg: Algorithm, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &encoding_key(alg)).unwrap()
}

fn sign_with_header(header: &Header, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(header, claims, key).unwrap()
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

const ROUTES: &str = r#"
[[routes]]
path = "/__headers"
methods = ["GET"]
auth = { mode = "required", scopes = ["read"], forward_claims = { sub = "X-User-Id", scope = "X-User-Scopes" } }

[[routes]]
path = "/__headers"
methods = ["POST"]

[[routes]]
path = "/__headers"
methods = ["PATCH"]
auth = { mode = "required", strip_authorization = true, forward_claims = { sub = "X-User-Id" } }

[[routes]]
path = "/products/{id}"
methods = ["GET"]
auth = "optional"

[[routes]]
path = "/products/{id}"
methods = ["PUT", "PATCH", "DELETE"]
auth = { mode = "required", scopes = ["products:write"] }
"#;

/// A gateway with static keys of every family (HMAC, RSA, EC P-256 and P-384, Ed25519).
fn static_keys_gateway(upstream: &Upstream) -> Gateway {
    GatewayConfig::new(&upstream.url())
        .section(&format!(
            r#"
[limits]
max_request_header_bytes = "256KiB"

[auth]
realm = "test"
issuer = "{ISSUER}"
audience = ["api", "other-api"]
leeway = "30s"
cookie = "session"

[[auth.providers]]
algorithms = ["HS256", "HS384", "HS512"]
secret = "{SECRET}"

[[auth.providers]]
algorithms = ["RS256", "PS256"]
public_key_file = "{rsa}"

[[auth.providers]]
algorithms = ["ES256"]
public_key_file = "{ec256}"

[[auth.providers]]
algorithms = ["ES384"]
public_key_file = "{ec384}"

[[auth.providers]]
algorithms = ["EdDSA"]
public_key_file = "{ed}"
{ROUTES}
"#,
            rsa = fixture("rsa.pub.pem"),
            ec256 = fixture("ec256.pub.pem"),
            ec384 = fixture("ec384.pub.pem"),
            ed = fixture("ed25519.pub.pem"),
        ))
        .start()
}

async fn call(
    gateway: &Gateway,
    method: Method,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> Response {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(b) = &bearer {
        headers.push(("authorization", b));
    }
    Client::new()
        .send(method, &gateway.url(path), &headers, Bytes::new())
        .await
}

/// Asserts a 401 `invalid_token` whose description contains `reason`, and that the token does
/// not appear in the response.
fn assert_invalid(resp: &Response, reason: &str, token: &str) {
    assert_eq!(
        resp.status,
        StatusCode::UNAUTHORIZED,
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    let challenge = resp
        .header("www-authenticate")
        .expect("a WWW-Authenticate challenge");
    assert!(
        challenge.starts_with("Bearer realm=\"test\", error=\"invalid_token\""),
        "{challenge}"
    );
    assert!(
        challenge.contains(reason),
        "expected {reason:?} in {challenge}"
    );
    assert_eq!(
        resp.header("content-type"),
        Some("application/problem+json")
    );
    let detail = resp.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains(reason), "expected {reason:?} in {detail}");
    let body = String::from_utf8_lossy(&resp.body);
    if token.len() > 8 {
        assert!(
            !body.contains(token) && !challenge.contains(token),
            "the token must not be echoed"
        );
    }
}

#[tokio::test]
async fn valid_tokens_of_every_algorithm_family_are_accepted() {
    let upstream = Upstream::start();
    let gateway = static_keys_gateway(&upstream);
    let algorithms = [
        Algorithm::HS256,
        Algorithm::HS384,
        Algorithm::HS512,
        Algorithm::RS256,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];
    for alg in algorithms {
        let sub = format!("user-{alg:?}");
        let token = sign(alg, &claims(&sub, "read extra"));
        let resp = call(&gateway, Method::GET, "/__headers", Some(&token), &[]).await;
        assert_eq!(
            resp.status,
            StatusCode::OK,
            "{alg:?}: {:?}",
            String::from_utf8_lossy(&resp.body)
        );
        let seen = &resp.json()["headers"];
        assert_eq!(seen["x-user-id"][0], sub.as_str(), "{alg:?}");
        assert_eq!(seen["x-user-scopes"][0], "extra read", "{alg:?}");
    }
    assert_eq!(
        upstream.served("ANY /__headers").await,
        algorithms.len() as u64
    );
}

#[tokio::test]
async fn claim_checks_refuse_and_the_upstream_never_sees_it() {
    let upstream = Upstream::start();
    let gateway = static_keys_gateway(&upstream);
    let base = claims("alice", "read");
    let with = |changes: Value| {
        let mut c = base.clone();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        sign(Algorithm::RS256, &c)
    };
    let cases = [
        (with(json!({"exp": now() - 120})), "expired"),
        (with(json!({"nbf": now() + 120})), "not valid yet"),
        (with(json!({"iss": "https://evil.test"})), "issuer"),
        (with(json!({"aud": "someone-else"})), "audience"),
        (with(json!({"aud": null})), "audience"),
        (with(json!({"exp": null})), "`exp`"),
    ];
    for (token, reason) in &cases {
        let resp = call(&gateway, Method::GET, "/__headers", Some(token), &[]).await;
        assert_invalid(&resp, reason, token);
    }
    assert_eq!(
        upstream.total_served().await,
        0,
        "no refused request reached the upstream"
    );

    // Inside the leeway, and an audience list naming an accepted audience, pass.
    let within_leeway = with(json!({"exp": now() - 10}));
    assert_eq!(
        call(
            &gateway,
            Method::GET,
            "/__headers",
            Some(&within_leeway),
            &[]
        )
        .await
        .status,
        StatusCode::OK
    );
    let audience_list = with(json!({"aud": ["nobody", "other-api"]}));
    assert_eq!(
        call(
            &gateway,
            Method::GET,
            "/__headers",
            Some(&audience_list),
            &[]
        )
        .await
        .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn signature_and_algorithm_attacks_are_refused() {
    let upstream = Upstream::start();
    let gateway = static_keys_gateway(&upstream);
    let good = sign(Algorithm::RS256, &claims("alice", "read"));

    // Tampered payload: same header and signature, different claims.
    let parts: Vec<&str> = good.split('.').collect();
    let forged_payload = b64(claims("admin", "read admin").to_string().as_bytes());
    let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert_invalid(
        &call(&gateway, Method::GET, "/__headers", Some(&tampered), &[]).await,
        "signature",
        &tampered,
    );

    // Signed by a key the gateway does not know.
    let stranger =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa2.key.pem")).unwrap()).unwrap();
    let foreign = sign_with_header(
        &Header::new(Algorithm::RS256),
        &claims("alice", "read"),
        &stranger,
    );
    assert_invalid(
        &call(&gateway, Method::GET, "/__headers", Some(&foreign), &[]).await,
        "signature",
        &foreign,
    );

    // alg none, in every casing, with and without a signature part.
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = b64(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes());
        let payload = b64(claims("alice", "read").to_string().as_bytes());
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}.c2ln"),
        ] {
            assert_invalid(
                &call(&gateway, Method::GET, "/__headers", Some(&token), &[]).await,
                "alg none",
                &token,
            );
        }
    }

    // HS256 keyed with the RSA public key (classic algorithm confusion). The HMAC provider has
    // its own secret, and the RSA provider never verifies HS256.
    let public_pem = std::fs::read(fixture("rsa.pub.pem")).unwrap();
    let confused = sign_with_header(
        &Header::new(Algorithm::HS256),
        &claims("alice", "read"),
        &EncodingKey::from_secret(&public_pem),
    );
    assert_invalid(
        &call(&gateway, Method::GET, "/__headers", Some(&confused), &[]).await,
        "signature",
        &confused,
    );

    // Header tricks: jku / x5u pointing at an attacker's JWKS, an embedded jwk of the attacker's
    // key, and a path-like kid. None is followed; the attacker's server is never contacted.
    let attacker = JwksServer::start(json!({"keys": [serde_json::from_str::<Value>(&std::fs::read_to_string(fixture("rsa2.jwk.json")).unwrap()).unwrap()]})).await;
    let mut header = Header::new(Algorithm::RS256);
    header.jku = Some(attacker.url());
    header.x5u = Some(attacker.url());
    header.jwk = Some(
        serde_json::from_str(&std::fs::read_to_string(fixture("rsa2.jwk.json")).unwrap()).unwrap(),
    );
    let trick = sign_with_header(&header, &claims("alice", "read"), &stranger);
    assert_invalid(
        &call(&gateway, Method::GET, "/__headers", Some(&trick), &[]).await,
        "signature",
        &trick,
    );
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("../../../../dev/null".to_owned());
    let kid_trick = sign_with_header(
        &header,
        &claims("alice", "read"),
        &EncodingKey::from_secret(b""),
    );
    let resp = call(&gateway, Method::GET, "/__headers", Some(&kid_trick), &[]).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(attacker.hits(), 0, "jku/x5u were never fetched");

    assert_eq!(upstream.total_served().await, 0);
}

#[tokio::test]
async fn malformed_tokens_are_refused_without_echo() {
    let upstream = Upstream::start();
    let gateway = static_keys_gateway(&upstream);
    let huge = format!(
        "{}.{}.{}",
        "a".repeat(50_000),
        "b".repeat(50_000),
        "c".repeat(2_000)
    );
    let cases = ["abc", "a.b", "a.b.c.d", "!!!.###.$$$", huge.as_str()];
    for token in cases {
        let resp = call(&gateway, Method::GET, "/__headers", Some(token), &[]).await;
        assert_invalid(&resp, "malformed", token);
    }
    // A valid header over a garbage payload: the signature is checked before the payload is
    // decoded, so it fails there.
    let garbage_payload = "eyJhbGciOiJIUzI1NiJ9.%%%%.abc";
    let resp = call(
        &gateway,
        Method::GET,
        "/__headers",
        Some(garbage_payload),
        &[],
    )
    .await;
    assert_invalid(&resp, "signature", garbage_payload);
    assert_eq!(upstream.total_served().await, 0);
}

#[tokio::test]
async fn missing_token_and_scopes() {
    let upstream = Upstream::start();
    let gateway = static_keys_gateway(&upstream);

    let missing = call(&gateway, Method::GET, "/__headers", None, &[]).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        missing.header("www-authenticate"),
        Some("Bearer realm=\"test\""),
        "no error code without a token (RFC 6750 §3.1)"
    );

    let reader = sign(Algorithm::HS256, &claims("alice", "read"));
    let denied = call(&gateway, Method::PUT, "/products/1", Some(&reader), &[]).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let challenge = denied.header("www-authenticate").unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\"")
            && challenge.contains("scope=\"products:write\""),
        "{challenge}"
    );
    assert!(denied.json()["detail"]
        .as_str()
        .unwrap()
        .contains("products:write"));
    assert_eq!(
        upstream.total_served().await,
        0,
        "neither refusal reached the upstream"
    );

    // scp as a list counts as scopes too.
    let writer = sign(
        Algorithm::HS256,
        &json!({"sub": "w", "scp": ["products:write"], "iss": ISSUER, "aud": "api", "exp": now() + 60}),
    );
    let allowed = Client::new()
        .send(
            Method::PATCH,
            &gateway.url("/products/1"),
            &[("authorization", &format!("Bearer {writer}"))],
            r#"{"stock":1}"#,
        )
        .await;
    assert_eq!(allowed.status, StatusCode::OK);

    // Optional: anonymous passes, an invalid token does not.
    assert_eq!(
        call(&gateway, Method::GET, "/products/1", None, &[])
            .await
            .status,
        StatusCode::OK
    );
    let expired = sign(
        Algorithm::HS256,
        &json!({"sub": "x", "iss": ISSUER, "aud": "api", "exp": now() - 3600}),
    );
    assert_invalid(
        &call(&gateway, Method::GET, "/products/1", Some(&expired), &[]).await,
        "expired",
        &expired,
    );
    assert_eq!(upstream.served("GET /products/{id}").await, 1);
}

#[tokio::test]
async fn gateway_headers_cannot_be_spoofed_and_authorization_can_be_dropped() {
    let upstream = Upstream::start();
    let gateway = static_keys_gateway(&upstream);
    let spoof = [("x-user-id", "admin"), ("x-user-scopes", "everything")];

    // A route without auth still never passes client-sent identity headers on.
    let open = call(&gateway, Method::POST, "/__headers", None, &spoof).await;
    let seen = &open.json()["headers"];
    assert!(
        seen.get("x-user-id").is_none() && seen.get("x-user-scopes").is_none(),
        "{seen}"
    );

    // On an authenticated route the header holds the token's subject only.
    let token = sign(Algorithm::ES256, &claims("alice", "read"));
    let authed = call(&gateway, Method::GET, "/__headers", Some(&token), &spoof).await;
    let seen = &authed.json()["headers"];
    assert_eq!(seen["x-user-id"], json!(["alice"]));
    assert_eq!(seen["x-user-scopes"], json!(["read"]));
    assert!(
        seen["authorization"][0]
            .as_str()
            .unwrap()
            .starts_with("Bearer "),
        "kept by default"
    );

    let stripped = call(&gateway, Method::PATCH, "/__headers", Some(&token), &[]).await;
    let seen = &stripped.json()["headers"];
    assert!(
        seen.get("authorization").is_none(),
        "strip_authorization removes it: {seen}"
    );
    assert_eq!(seen["x-user-id"], json!(["alice"]));

    // The token may come from the configured cookie.
    let cookie = format!("theme=dark; session={token}");
    let from_cookie = call(
        &gateway,
        Method::GET,
        "/__headers",
        None,
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(from_cookie.status, StatusCode::OK);
    assert_eq!(from_cookie.json()["headers"]["x-user-id"], json!(["alice"]));
}

fn jwks_config(upstream: &Upstream, admin_port: u16, provider: &str) -> String {
    let auth = format!(
        r#"
[auth]
realm = "test"
issuer = "{ISSUER}"
audience = "api"
[[auth.providers]]
algorithms = ["RS256"]
refresh_interval = "1h"
min_refresh_interval = "1s"
{provider}
{ROUTES}
"#
    );
    GatewayConfig::new(&upstream.url())
        .admin_on(admin_port, "")
        .section(&auth)
        .to_toml()
}

fn rsa_jwk(file: &str, kid: &str) -> Value {
    let mut jwk: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(file)).unwrap()).unwrap();
    jwk["kid"] = json!(kid);
    jwk["alg"] = json!("RS256");
    jwk["use"] = json!("sig");
    jwk
}

fn sign_kid(key_file: &str, kid: &str, sub: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let key = EncodingKey::from_rsa_pem(&std::fs::read(fixture(key_file)).unwrap()).unwrap();
    sign_with_header(&header, &claims(sub, "read"), &key)
}

#[tokio::test]
async fn jwks_rotation_is_followed_and_an_outage_keeps_the_last_keys() {
    let upstream = Upstream::start();
    let mut jwks = JwksServer::start(json!({"keys": [rsa_jwk("rsa.jwk.json", "k1")]})).await;
    let admin_port = free_port();
    let gateway = Gateway::start(&jwks_config(
        &upstream,
        admin_port,
        &format!("jwks_url = \"{}\"", jwks.url()),
    ));
    gateway.wait_ready().await;

    let old = sign_kid("rsa.key.pem", "k1", "alice");
    assert_eq!(
        call(&gateway, Method::GET, "/__headers", Some(&old), &[])
            .await
            .status,
        StatusCode::OK
    );

    // The identity provider rotates to a new key; a token naming it triggers a refetch.
    jwks.set(json!({"keys": [rsa_jwk("rsa2.jwk.json", "k2")]}));
    tokio::time::sleep(Duration::from_millis(1100)).await; // the configured floor between fetches
    let new = sign_kid("rsa2.key.pem", "k2", "bob");
    let resp = call(&gateway, Method::GET, "/__headers", Some(&new), &[]).await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(resp.json()["headers"]["x-user-id"], json!(["bob"]));

    // A flood of made-up kids refetches at most once per floor interval.
    let before = jwks.hits();
    for i in 0..20 {
        let bogus = sign_kid("rsa2.key.pem", &format!("random-{i}"), "mallory");
        let resp = call(&gateway, Method::GET, "/__headers", Some(&bogus), &[]).await;
        assert_invalid(&resp, "unknown key id", &bogus);
    }
    assert!(
        jwks.hits() - before <= 1,
        "{} fetches for 20 unknown kids",
        jwks.hits() - before
    );

    // The JWKS endpoint goes down: the last good key set keeps working.
    jwks.stop();
    let during_outage = sign_kid("rsa2.key.pem", "k2", "carol");
    let resp = call(
        &gateway,
        Method::GET,
        "/__headers",
        Some(&during_outage),
        &[],
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        readyz(admin_port).await.0,
        StatusCode::OK,
        "a loaded key set stays ready"
    );
}

#[tokio::test]
async fn gateway_starts_without_its_jwks_and_is_not_ready_until_it_loads() {
    let upstream = Upstream::start();
    let mut jwks = JwksServer::start(json!({"keys": [rsa_jwk("rsa.jwk.json", "k1")]})).await;
    jwks.stop();
    let admin_port = free_port();
    // Discovered through the issuer's OpenID configuration.
    let gateway = Gateway::start(&jwks_config(
        &upstream,
        admin_port,
        &format!("oidc_issuer = \"{}\"", jwks.issuer()),
    ));

    let (status, body) = readyz(admin_port).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["checks"]["auth"]
            .as_str()
            .unwrap()
            .contains("not loaded"),
        "{body}"
    );
    let token = sign_kid("rsa.key.pem", "k1", "alice");
    assert_eq!(
        call(&gateway, Method::GET, "/__headers", Some(&token), &[])
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(upstream.total_served().await, 0);

    jwks.resume().await;
    gateway.wait_ready().await;
    let token = sign_kid("rsa.key.pem", "k1", "dave");
    assert_eq!(
        call(&gateway, Method::GET, "/__headers", Some(&token), &[])
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn token_subcommand_mints_what_the_gateway_accepts() {
    let upstream = Upstream::start();
    let gateway = static_keys_gateway(&upstream);
    let out = std::process::Command::new(common::cachegate_bin())
        .args(["token", "--config"])
        .arg(&gateway.config)
        .args([
            "--sub",
            "erin",
            "--scope",
            "read products:write",
            "--ttl",
            "5m",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let resp = call(&gateway, Method::GET, "/__headers", Some(&token), &[]).await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(resp.json()["headers"]["x-user-id"], json!(["erin"]));
}

#[tokio::test]
async fn a_default_secret_is_used_with_a_loud_warning() {
    let upstream = Upstream::start();
    let gateway = GatewayConfig::new(&upstream.url())
        .section(
            r#"
[auth]
[[auth.providers]]
algorithms = ["HS256"]
secret = "${CACHEGATE_TEST_NEVER_SET_SECRET:-dev-only-secret}"
[[routes]]
path = "/__headers"
auth = "required"
"#,
        )
        .start();
    // The log is written by its own thread: poll for the line.
    let warned = eventually(Duration::from_secs(5), || async {
        let logs = gateway.logs();
        logs.contains("WARN") && logs.contains("CACHEGATE_TEST_NEVER_SET_SECRET is not set")
    })
    .await;
    assert!(warned, "{}", gateway.logs());
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "dev", "exp": now() + 60}),
        &EncodingKey::from_secret(b"dev-only-secret"),
    )
    .unwrap();
    assert_eq!(
        call(&gateway, Method::GET, "/__headers", Some(&token), &[])
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn jwks_is_fetched_over_https_with_a_private_ca() {
    let upstream = Upstream::start();
    let jwks = JwksServer::start(json!({"keys": [rsa_jwk("rsa.jwk.json", "k1")]})).await;
    let dir = tempfile::TempDir::new().unwrap();
    let (cert, key, _) = common::self_signed_cert(dir.path());
    // Serve the JWKS over TLS by putting a TLS-terminating gateway in front of it.
    let tls_front = GatewayConfig::new(&jwks.issuer()).tls(&cert, &key).start();
    let admin_port = free_port();
    let provider = format!(
        "jwks_url = \"https://127.0.0.1:{}/jwks.json\"\ntls_ca_file = \"{}\"",
        tls_front.port,
        cert.display()
    );
    let gateway = Gateway::start(&jwks_config(&upstream, admin_port, &provider));
    gateway.wait_ready().await;
    let token = sign_kid("rsa.key.pem", "k1", "tls-user");
    assert_eq!(
        call(&gateway, Method::GET, "/__headers", Some(&token), &[])
            .await
            .status,
        StatusCode::OK
    );
    assert!(jwks.hits() >= 1);
}

#[tokio::test]
async fn jwks_is_refreshed_on_its_interval() {
    let upstream = Upstream::start();
    let jwks = JwksServer::start(json!({"keys": [rsa_jwk("rsa.jwk.json", "k1")]})).await;
    let admin_port = free_port();
    // Unknown kids may not trigger a fetch (floor of an hour): only the interval refreshes.
    let config = jwks_config(
        &upstream,
        admin_port,
        &format!("jwks_url = \"{}\"", jwks.url()),
    )
    .replace("refresh_interval = \"1h\"", "refresh_interval = \"1s\"")
    .replace(
        "min_refresh_interval = \"1s\"",
        "min_refresh_interval = \"1h\"",
    );
    let gateway = Gateway::start(&config);
    gateway.wait_ready().await;
    jwks.set(json!({"keys": [rsa_jwk("rsa2.jwk.json", "k2")]}));
    let mut attempt = 0;
    assert!(
        eventually(Duration::from_secs(10), || {
            attempt += 1;
            let token = sign_kid("rsa2.key.pem", "k2", &format!("interval-{attempt}"));
            let gateway = &gateway;
            async move {
                call(gateway, Method::GET, "/__headers", Some(&token), &[])
                    .await
                    .status
                    == StatusCode::OK
            }
        })
        .await,
        "the rotated key was never picked up by the periodic refresh"
    );
}

/// With `issuer` and `audience` set, a token must carry both claims (every algorithm family); a
/// header `crit` naming any extension is refused (RFC 7515 §4.1.11); two `Authorization` headers
/// are a `400`. None of it reaches the origin.
#[tokio::test]
async fn configured_claims_are_required_crit_is_refused_and_one_authorization_only() {
    let upstream = Upstream::start();
    let gateway = static_keys_gateway(&upstream);
    let before = upstream.served("ANY /__headers").await;
    for alg in [Algorithm::RS256, Algorithm::ES256, Algorithm::HS256] {
        let mut no_iss = claims("alice", "read");
        no_iss.as_object_mut().unwrap().remove("iss");
        let token = sign(alg, &no_iss);
        let resp = call(&gateway, Method::GET, "/__headers", Some(&token), &[]).await;
        assert_invalid(&resp, "issuer", &token);

        let mut no_aud = claims("alice", "read");
        no_aud.as_object_mut().unwrap().remove("aud");
        let token = sign(alg, &no_aud);
        let resp = call(&gateway, Method::GET, "/__headers", Some(&token), &[]).await;
        assert_invalid(&resp, "audience", &token);

        let mut header = Header::new(alg);
        header.crit = Some(vec!["urn:example:unknown".to_owned()]);
        let token = sign_with_header(&header, &claims("alice", "read"), &encoding_key(alg));
        let resp = call(&gateway, Method::GET, "/__headers", Some(&token), &[]).await;
        assert_invalid(&resp, "crit", &token);
    }

    let good = format!(
        "Bearer {}",
        sign(Algorithm::HS256, &claims("alice", "read"))
    );
    let resp = Client::new()
        .send(
            Method::GET,
            &gateway.url("/__headers"),
            &[("authorization", &good), ("authorization", "Bearer forged")],
            Bytes::new(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&resp.body).contains("more than one Authorization"));
    assert_eq!(upstream.served("ANY /__headers").await, before);
    let resp = call(&gateway, Method::GET, "/__headers", Some(&good[7..]), &[]).await;
    assert_eq!(resp.status, StatusCode::OK, "the good token alone passes");
}

/// With no `audience` configured, a token meant for some audience is refused.
#[tokio::test]
async fn a_token_for_an_audience_is_refused_when_none_is_configured() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(
        &[&upstream.url()],
        &format!(
            r#"
[auth]
realm = "test"
[[auth.providers]]
algorithms = ["HS256"]
secret = "{SECRET}"
[[routes]]
path = "/__headers"
auth = "required"
"#
        ),
    ));
    let with_aud = sign(Algorithm::HS256, &claims("alice", "read"));
    let resp = call(&gateway, Method::GET, "/__headers", Some(&with_aud), &[]).await;
    assert_invalid(&resp, "audience", &with_aud);
    let mut without = claims("alice", "read");
    without.as_object_mut().unwrap().remove("aud");
    let token = sign(Algorithm::HS256, &without);
    let resp = call(&gateway, Method::GET, "/__headers", Some(&token), &[]).await;
    assert_eq!(resp.status, StatusCode::OK);
}

/// Fifty concurrent tokens with made-up key ids cause at most one JWKS fetch per
/// `min_refresh_interval`: the unknown-kid refresh is single-flight.
#[tokio::test]
async fn concurrent_unknown_kids_share_one_jwks_fetch() {
    let upstream = Upstream::start();
    let jwks = JwksServer::start(json!({"keys": [rsa_jwk("rsa.jwk.json", "k1")]})).await;
    let admin_port = free_port();
    let gateway = Gateway::start(&jwks_config(
        &upstream,
        admin_port,
        &format!("jwks_url = \"{}\"", jwks.url()),
    ));
    gateway.wait_ready().await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the configured floor
    let before = jwks.hits();
    let calls = (0..50).map(|i| {
        let token = sign_kid("rsa2.key.pem", &format!("made-up-{i}"), "mallory");
        let gateway = &gateway;
        async move {
            let resp = call(gateway, Method::GET, "/__headers", Some(&token), &[]).await;
            assert_invalid(&resp, "unknown key id", &token);
        }
    });
    futures_util::future::join_all(calls).await;
    let fetches = jwks.hits() - before;
    assert!(
        fetches <= 1,
        "{fetches} JWKS fetches for 50 concurrent unknown kids"
    );
}
