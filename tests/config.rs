//! `cachegate check` reports each kind of mistake at `file:line:col` in plain words, and start-up
//! failures end the process quickly with a message that names the problem.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use common::{cachegate_bin, free_port, run_cachegate, Process};

const VALID_BASE: &str = r#"[[listeners]]
address = "127.0.0.1:8080"

[upstream]
addresses = ["http://127.0.0.1:3000"]
"#;

/// Runs `cachegate check` on `toml`; returns (success, stderr, config path).
fn check(toml: &str) -> (bool, String, String) {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(cachegate_bin())
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("CACHEGATE_TEST_UNSET")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path.display().to_string(),
    )
}

/// Asserts that checking `toml` fails with `message` at `line:col`.
fn assert_error(toml: &str, line: usize, col: usize, message: &str) {
    let (ok, stderr, path) = check(toml);
    assert!(!ok, "the check should fail for:\n{toml}");
    let location = format!("{path}:{line}:{col}: ");
    let found = stderr
        .lines()
        .any(|l| l.starts_with(&location) && l.contains(message));
    assert!(found, "expected `{location}...{message}...` in:\n{stderr}");
}

#[test]
fn valid_configuration_passes() {
    let (ok, stderr, _) = check(VALID_BASE);
    assert!(ok, "{stderr}");
}

#[test]
fn every_shipped_example_passes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // The container example names compose services; point them at loopback here.
            let out = Command::new(cachegate_bin())
                .arg("check")
                .arg("--config")
                .arg(&path)
                .env("UPSTREAM_URL", "http://127.0.0.1:3000")
                .env("REDIS_URL", "redis://127.0.0.1:6379")
                .env("ADMIN_TOKEN", "example-admin-token")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 1,
        "no example configurations found in {}",
        dir.display()
    );
}

#[test]
fn unknown_key() {
    // Appended after [upstream], the key belongs to that table.
    assert_error(
        &format!("{VALID_BASE}colour = \"blue\"\n"),
        6,
        1,
        "unknown field `colour`, expected one of `addresses`",
    );
    assert_error(
        &format!("colour = \"blue\"\n{VALID_BASE}"),
        1,
        1,
        "unknown field `colour`",
    );
    assert_error(
        "[[listeners]]\naddress = \"127.0.0.1:8080\"\nport = 1\n[upstream]\naddresses = [\"http://a:1\"]\n",
        3,
        1,
        "unknown field `port`",
    );
}

#[test]
fn toml_syntax_error() {
    assert_error("[[listeners]\naddress = \"x\"\n", 1, 13, "");
}

#[test]
fn bad_duration() {
    assert_error(
        &VALID_BASE.replace(
            "addresses = [\"http://127.0.0.1:3000\"]",
            "addresses = [\"http://127.0.0.1:3000\"]\nconnect_timeout = \"5 parsecs\"",
        ),
        6,
        19,
        "invalid duration \"5 parsecs\"",
    );
}

#[test]
fn bad_size() {
    assert_error(
        &format!("{VALID_BASE}[limits]\nmax_request_body_bytes = \"12 potatoes\"\n"),
        7,
        26,
        "invalid size unit",
    );
}

#[test]
fn bad_route_template() {
    assert_error(
        &format!("{VALID_BASE}[[routes]]\npath = \"/products/{{id\"\n"),
        7,
        8,
        "invalid route template `/products/{id`",
    );
    assert_error(
        &format!("{VALID_BASE}[[routes]]\npath = \"products\"\n"),
        7,
        8,
        "must start with `/`",
    );
}

#[test]
fn duplicate_route() {
    let toml = format!(
        "{VALID_BASE}[[routes]]\nname = \"first\"\npath = \"/products/{{id}}\"\nmethods = [\"GET\", \"PUT\"]\n\n[[routes]]\npath = \"/products/{{id}}\"\nmethods = [\"PUT\"]\n"
    );
    assert_error(
        &toml,
        12,
        8,
        "duplicate route: `/products/{id}` is already defined for PUT by route `first`",
    );
}

#[test]
fn conflicting_route_parameters() {
    let toml = format!("{VALID_BASE}[[routes]]\npath = \"/products/{{id}}\"\n[[routes]]\npath = \"/products/{{name}}\"\n");
    assert_error(&toml, 9, 8, "cannot be used");
}

#[test]
fn trailing_slash_spellings_that_can_loop() {
    // Both spellings of one path: refused.
    assert_error(
        &format!(
            "{VALID_BASE}\n[[routes]]\npath = \"/items/\"\nmethods = [\"GET\"]\n\n[[routes]]\npath = \"/items\"\nmethods = [\"POST\"]\n"
        ),
        12,
        8,
        "spell one path with and without a trailing slash",
    );
    // A collection without the slash its items have: valid, with a located warning.
    let (ok, stderr, path) = check(&format!(
        "{VALID_BASE}\n[[routes]]\npath = \"/books\"\n\n[[routes]]\npath = \"/books/{{id}}/\"\n"
    ));
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "warning: {path}:8:8: `/books` has no trailing slash but `/books/{{id}}/`"
        )),
        "{stderr}"
    );
    let (ok, stderr, _) = check(VALID_BASE);
    assert!(ok && !stderr.contains("warning"), "{stderr}");
}

#[test]
fn lowercase_method() {
    assert_error(
        &format!("{VALID_BASE}[[routes]]\npath = \"/a\"\nmethods = [\"get\"]\n"),
        8,
        12,
        "method `get` must be written in upper case: `GET`",
    );
}

#[test]
fn unknown_upstream_scheme() {
    assert_error(
        &VALID_BASE.replace("http://127.0.0.1:3000", "ftp://127.0.0.1:3000"),
        5,
        14,
        "unknown upstream scheme `ftp`",
    );
}

#[test]
fn upstream_with_a_path() {
    assert_error(
        &VALID_BASE.replace("http://127.0.0.1:3000", "http://127.0.0.1:3000/api"),
        5,
        14,
        "has a path",
    );
}

#[test]
fn invalid_listener_address() {
    assert_error(
        &VALID_BASE.replace("127.0.0.1:8080", "localhost"),
        2,
        11,
        "invalid listener address \"localhost\"",
    );
}

#[test]
fn missing_environment_variable() {
    assert_error(
        &VALID_BASE.replace(
            "http://127.0.0.1:3000",
            "http://${CACHEGATE_TEST_UNSET}:3000",
        ),
        5,
        13, // the toml parser locates errors inside an array at the array
        "environment variable `CACHEGATE_TEST_UNSET` is not set",
    );
    let (ok, stderr, _) =
        check(&VALID_BASE.replace("127.0.0.1:3000", "${CACHEGATE_TEST_UNSET:-127.0.0.1:3000}"));
    assert!(ok, "a default makes the variable optional: {stderr}");
}

#[test]
fn bad_purge_rules() {
    assert_error(
        &format!("{VALID_BASE}[[routes]]\npath = \"/a/{{id}}\"\npurge = [\"/b/{{user}}\"]\n"),
        8,
        10,
        "template \"/b/{user}\" uses `{user}`, but the route's path parameters are: id",
    );
    assert_error(
        &format!("{VALID_BASE}[[routes]]\npath = \"/a\"\npurge = {{ paths = [\"/b\"], tag = [\"x\"] }}\n"),
        8,
        27,
        "unknown field `tag`",
    );
    assert_error(
        &format!("{VALID_BASE}[[routes]]\npath = \"/a\"\ncache = {{ ttl = \"1m\", tags = [\"p:{{id}}\"] }}\n"),
        8,
        31,
        "uses `{id}`, but the route's path has no parameters",
    );
}

#[test]
fn purge_method_needs_the_admin_token() {
    assert_error(
        &format!("{VALID_BASE}[admin]\naddress = \"127.0.0.1:9901\"\npurge_method = true\n"),
        8,
        16,
        "purge_method needs [admin] token",
    );
}

#[test]
fn missing_tls_files() {
    assert_error(
        &VALID_BASE.replace(
            "address = \"127.0.0.1:8080\"",
            "address = \"127.0.0.1:8443\"\ntls = { cert_file = \"/nonexistent/cert.pem\", key_file = \"/nonexistent/key.pem\" }",
        ),
        3,
        21,
        "cannot read \"/nonexistent/cert.pem\"",
    );
}

#[test]
fn bad_redis_url() {
    assert_error(
        &format!("{VALID_BASE}[store]\nredis_url = \"postgres://x\"\n"),
        7,
        13,
        "invalid redis_url",
    );
}

#[test]
fn several_mistakes_are_reported_together() {
    let toml =
        VALID_BASE.replace("http://127.0.0.1:3000", "ftp://x:1") + "[[routes]]\npath = \"nope\"\n";
    let (ok, stderr, _) = check(&toml);
    assert!(!ok);
    assert!(
        stderr.contains("unknown upstream scheme") && stderr.contains("must start with `/`"),
        "{stderr}"
    );
}

#[test]
fn missing_file_is_reported() {
    let out = run_cachegate(&["check", "--config", "/nonexistent/cachegate.toml"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/cachegate.toml: cannot read the configuration file"),
        "{stderr}"
    );
}

#[test]
fn version_flag() {
    let out = run_cachegate(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("cachegate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn run_with_an_invalid_config_exits_with_the_same_messages() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, VALID_BASE.replace("http://", "gopher://")).unwrap();
    let out = run_cachegate(&["run", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!(
        "{}:5:14: unknown upstream scheme `gopher`",
        path.display()
    )));
}

#[test]
fn listen_address_in_use_exits_at_once_naming_it() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        VALID_BASE.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let mut gateway = Process::spawn(
        "cachegate",
        &cachegate_bin(),
        &["run", "--config", path.to_str().unwrap()],
        tempfile::TempDir::new().unwrap(),
    );
    let status = gateway
        .wait_exit(Duration::from_secs(5))
        .expect("cachegate must exit, not keep running without a listener");
    assert!(!status.success());
    let logs = gateway.logs();
    assert!(
        logs.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{logs}"
    );
    drop(taken);
}

#[test]
fn no_arguments_explains_what_to_pass() {
    let out = Command::new(cachegate_bin()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
    let _ = free_port();
}

const AUTH_BASE: &str = "[[listeners]]\naddress = \"127.0.0.1:8080\"\n[upstream]\naddresses = [\"http://127.0.0.1:3000\"]\n[auth]\n[[auth.providers]]\n";

#[test]
fn auth_algorithm_must_match_the_key() {
    let pem = format!(
        "{}/tests/fixtures/keys/rsa.pub.pem",
        env!("CARGO_MANIFEST_DIR")
    );
    assert_error(
        &format!("{AUTH_BASE}algorithms = [\"RS256\", \"HS256\"]\npublic_key_file = \"{pem}\"\n"),
        7,
        24,
        "HS256 cannot be verified with an RSA public key",
    );
    assert_error(
        &format!("{AUTH_BASE}algorithms = [\"RS256\"]\nsecret = \"s\"\n"),
        7,
        15,
        "RS256 cannot be verified with an HMAC secret",
    );
    assert_error(
        &format!("{AUTH_BASE}algorithms = [\"HS256\"]\njwks_url = \"https://idp.test/jwks\"\n"),
        7,
        15,
        "a JWKS (public keys only)",
    );
}

#[test]
fn auth_none_algorithm_is_rejected() {
    assert_error(
        &format!("{AUTH_BASE}algorithms = [\"none\"]\nsecret = \"s\"\n"),
        7,
        15,
        "`none` is never accepted",
    );
}

#[test]
fn auth_provider_needs_exactly_one_key_source() {
    assert_error(
        &format!("{AUTH_BASE}algorithms = [\"HS256\"]\nsecret = \"s\"\njwks_url = \"https://idp.test/jwks\"\n"),
        9,
        12,
        "exactly one of `secret`, `public_key_file`, `jwks_url` or `oidc_issuer`",
    );
}

#[test]
fn auth_policy_without_auth_table() {
    assert_error(
        &format!("{VALID_BASE}[[routes]]\npath = \"/a\"\nauth = \"required\"\n"),
        8,
        8,
        "there is no [auth] table",
    );
}

#[test]
fn auth_unknown_mode() {
    assert_error(
        &format!("{VALID_BASE}[[routes]]\npath = \"/a\"\nauth = \"mandatory\"\n"),
        8,
        8,
        "unknown auth mode \"mandatory\"",
    );
}

#[test]
fn bad_rate() {
    assert_error(
        &format!("{VALID_BASE}[[routes]]\npath = \"/a\"\nrate_limit = {{ limits = [ {{ rate = \"100 per minute\" }} ] }}\n"),
        8,
        36,
        "invalid rate \"100 per minute\"",
    );
}

#[test]
fn unknown_rate_limit_key() {
    assert_error(
        &format!("{VALID_BASE}[[routes]]\npath = \"/a\"\nrate_limit = {{ limits = [ {{ rate = \"1/s\", key = \"cookie\" }} ] }}\n"),
        8,
        49,
        "unknown rate-limit key \"cookie\"",
    );
}

#[test]
fn bad_trusted_proxy() {
    assert_error(
        &format!("[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n{VALID_BASE}"),
        2,
        20,
        "invalid trusted proxy \"10.0.0.0/33\"",
    );
}

#[test]
fn unknown_on_store_error() {
    assert_error(
        &format!("{VALID_BASE}[defaults]\nrate_limit = {{ limits = [ {{ rate = \"1/s\" }} ], on_store_error = \"panic\" }}\n"),
        7,
        64,
        "unknown variant `panic`",
    );
}

#[test]
fn bad_cache_rules() {
    assert_error(
        &format!(
            "{VALID_BASE}[[routes]]\npath = \"/a\"\ncache = {{ ttl = \"1m\", query = \"some\" }}\n"
        ),
        8,
        31,
        "unknown query rule \"some\"",
    );
    assert_error(
        &format!("{VALID_BASE}[[routes]]\npath = \"/a\"\ncache = {{ ttl = \"1m\", scope = \"everyone\" }}\n"),
        8,
        31,
        "unknown variant `everyone`, expected `shared` or `user`",
    );
    assert_error(
        &format!(
            "{VALID_BASE}[[routes]]\npath = \"/a\"\ncache = {{ ttl = \"1m\", tll = \"30s\" }}\n"
        ),
        8,
        23,
        "unknown field `tll`",
    );
}

#[test]
fn an_exposed_admin_listener_needs_a_token_and_secrets_stay_out_of_messages() {
    let exposed = format!("{VALID_BASE}\n[admin]\naddress = \"0.0.0.0:9901\"\n");
    let (ok, stderr, _) = check(&exposed);
    assert!(
        !ok && stderr.contains("reachable from other machines but has no token"),
        "{stderr}"
    );
    let (ok, stderr, _) = check(&format!(
        "{VALID_BASE}\n[admin]\naddress = \"127.0.0.1:9901\"\n"
    ));
    assert!(ok, "loopback without a token is fine: {stderr}");
    let (ok, stderr, _) = check(&format!(
        "{VALID_BASE}\n[admin]\naddress = \"0.0.0.0:9901\"\ntoken = \"s3cret-admin\"\n"
    ));
    assert!(ok, "{stderr}");

    let (ok, stderr, _) = check(&format!(
        "{VALID_BASE}\n[store]\nredis_cluster = [\"nonsense://:hunter2@h\"]\n"
    ));
    assert!(!ok && stderr.contains("redis_cluster"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    // The container and cluster examples expose the admin listener: without ADMIN_TOKEN set they
    // do not pass.
    let docker = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/docker.toml");
    let out = Command::new(cachegate_bin())
        .args(["check", "--config"])
        .arg(&docker)
        .env("UPSTREAM_URL", "http://127.0.0.1:3000")
        .env("REDIS_URL", "redis://127.0.0.1:6379")
        .env_remove("ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ADMIN_TOKEN"));
}
