//! `cachegate init --openapi`: a starter configuration from an API's OpenAPI 3.0/3.1 document.
//!
//! Each path template becomes up to two kinds of routes: its reads (`GET`, `HEAD`) cached with
//! a short TTL, and its writes, grouped by the security they require, purging their own path
//! and their collection's (`/products/{id}` → `/products`). Operations with a bearer-token
//! requirement (OAuth2, OpenID Connect, HTTP bearer) get `auth = "required"` with the first
//! requirement's scopes, and their cached reads are kept per user. Integer path parameters
//! become `{name:int}`, so `/products/07` and `/products/7` are one route, one entry, one
//! purge target. Paths are the document's paths under the first server URL's base path, as
//! clients request them (`/v2/orders` for `/orders` under `https://host/v2`). Anything the gateway cannot check itself (API keys, HTTP basic) is left to the
//! origin — and such reads are not cached, since the gateway cannot tell the callers apart;
//! that includes an API key offered as an alternative to a token or to no credentials at all.
//!
//! The output is a commented TOML file meant to be read and adjusted; `cachegate check`
//! accepts it as written.
//!
//! This file writes the configuration ([`starter_config`]); `paths` turns the document's paths
//! into route templates, names and collections; `security` reads what each operation requires
//! of its caller.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::Value;

mod paths;
mod security;

use paths::{
    base_path, collection_of, demote_blocking_catch_alls, gateway_template, is_probe, merged_paths,
    route_name, server_url, unify_parameter_names, unique, untyped,
};
use security::{access_of, auth_section, write_access, Access};

/// Freshness given to cached reads: short, since the document says nothing about how often
/// resources change.
const STARTER_TTL: &str = "10s";

/// Why a document could not be turned into a configuration.
#[derive(Debug)]
pub enum OpenApiError {
    /// Neither JSON nor YAML.
    Parse(String),
    /// Parsed, but not an OpenAPI 3 document.
    NotOpenApi(String),
}

impl std::fmt::Display for OpenApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenApiError::Parse(e) => write!(f, "the document is neither JSON nor YAML: {e}"),
            OpenApiError::NotOpenApi(e) => write!(f, "not an OpenAPI 3 document: {e}"),
        }
    }
}

impl std::error::Error for OpenApiError {}

/// Parses an OpenAPI document written in JSON or YAML.
pub fn parse(text: &str) -> Result<Value, OpenApiError> {
    let document: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(json) => serde_saphyr::from_str(text)
            .map_err(|yaml| OpenApiError::Parse(format!("as JSON: {json}; as YAML: {yaml}")))?,
    };
    let version = document
        .get("openapi")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !version.starts_with("3.") {
        return Err(OpenApiError::NotOpenApi(format!(
            "`openapi` is {:?}; 3.0 and 3.1 are supported (convert Swagger 2.0 first)",
            document.get("openapi").unwrap_or(&Value::Null)
        )));
    }
    if !document.get("paths").is_some_and(Value::is_object) {
        return Err(OpenApiError::NotOpenApi("it has no `paths` object".into()));
    }
    Ok(document)
}

/// What `cachegate init` was told besides the document.
#[derive(Debug, Clone)]
pub struct StarterOptions<'a> {
    /// Where the document came from (a file or a URL), named in the header comment.
    pub source: &'a str,
    /// The origin to proxy to. Default: the document's first absolute server URL, else the
    /// origin `source` was fetched from, else `http://127.0.0.1:3000`.
    pub upstream: Option<&'a str>,
    /// The gateway's listener and admin addresses.
    pub listen: &'a str,
    pub admin: &'a str,
    /// Pages of the origin that the document does not describe but clients use (the document's
    /// own URL, the framework's docs pages), routed as public and uncached.
    pub extra_pages: &'a [String],
}

/// How many routes of each kind a starter configuration has (printed by `cachegate init`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StarterSummary {
    pub routes: usize,
    /// Read routes cached for everyone.
    pub cached: usize,
    /// Read routes cached per user.
    pub per_user: usize,
    /// Routes whose credentials only the origin checks (not cached).
    pub origin_checked: usize,
    /// Paths written commented out, each with why.
    pub skipped: Vec<String>,
}

impl std::fmt::Display for StarterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} routes: {} reads cached for everyone, {} cached per user, {} checked by the origin only (not cached), {} skipped",
            self.routes,
            self.cached,
            self.per_user,
            self.origin_checked,
            self.skipped.len()
        )?;
        for reason in &self.skipped {
            write!(f, "\n  skipped: {reason}")?;
        }
        Ok(())
    }
}

/// The starter configuration for `document` (see the module docs), and its summary.
pub fn starter_config(document: &Value, options: &StarterOptions<'_>) -> (String, StarterSummary) {
    let mut summary = StarterSummary::default();
    let schemes = document
        .pointer("/components/securitySchemes")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let global_security = document.get("security");
    let mut paths = merged_paths(document);
    // The document's paths are relative to its server URL: `/orders` under `https://host/v2` is
    // requested as `/v2/orders`, and that is the path the gateway routes on.
    let base = base_path(document);
    let mut by_path: BTreeMap<String, String> = paths
        .iter()
        .map(|(path, item)| {
            let template = gateway_template(document, path, item);
            (path.clone(), format!("{base}{template}"))
        })
        .collect();
    unify_parameter_names(&mut by_path);
    demote_blocking_catch_alls(&mut by_path);
    unify_parameter_names(&mut by_path);
    // Paths that became one template (`{base}...{head}` beside `{basehead}`, differently named
    // parameters) are one route: the first path's operations, then the others' for methods it
    // lacks.
    let mut first_with: BTreeMap<String, String> = BTreeMap::new();
    let mut same_as: BTreeMap<String, String> = BTreeMap::new();
    for (path, template) in &by_path {
        let routed = untyped(template);
        match first_with.get(&routed) {
            Some(first) => {
                same_as.insert(path.clone(), first.clone());
            }
            None => {
                first_with.insert(routed, path.clone());
            }
        }
    }
    for (path, first) in &same_as {
        let operations = paths[path].as_object().cloned().unwrap_or_default();
        if let Some(Value::Object(into)) = paths.get_mut(first) {
            for (name, value) in operations {
                into.entry(name).or_insert(value);
            }
        }
    }
    // What the gateway's router would refuse is written commented out, with why.
    let mut router = matchit::Router::new();
    let mut refused: BTreeMap<String, String> = BTreeMap::new();
    for (path, template) in by_path.iter().filter(|(p, _)| !same_as.contains_key(*p)) {
        let routed = untyped(template);
        let routed = match routed.strip_suffix('/') {
            Some(stripped) if !stripped.is_empty() => stripped.to_owned(),
            _ => routed,
        };
        if let Err(e) = router.insert(routed, ()) {
            refused.insert(path.clone(), e.to_string());
        }
    }
    let templates: BTreeSet<String> = by_path
        .iter()
        .filter(|(path, _)| !refused.contains_key(*path) && !same_as.contains_key(*path))
        .map(|(_, template)| template.clone())
        .collect();

    let mut routes = String::new();
    let mut names = BTreeSet::new();
    let mut uses_tokens = false;
    for (path, item) in &paths {
        let template = by_path[path].clone();
        let relative = template[base.len()..].to_owned();
        if let Some(first) = same_as.get(path) {
            let _ = writeln!(
                routes,
                "# {path} is the route of {first} ({}): its operations are there.\n",
                quote(&template)
            );
            continue;
        }
        if let Some(reason) = refused.get(path) {
            summary.skipped.push(format!("{path}: {reason}"));
            let _ = writeln!(
                routes,
                "# Skipped {path}: the gateway cannot route it beside the paths above ({reason}).\n\
                 # [[routes]]\n# path = {}\n",
                quote(&template)
            );
            continue;
        }
        let mut reads: Vec<(&str, Access)> = Vec::new();
        let mut writes: BTreeMap<Access, Vec<&str>> = BTreeMap::new();
        for method in ["get", "head", "post", "put", "patch", "delete"] {
            let Some(operation) = item.get(method) else {
                continue;
            };
            let security = operation.get("security").or(global_security);
            let access = access_of(security, &schemes);
            uses_tokens |= matches!(access, Access::Token(_) | Access::OptionalToken);
            match method {
                "get" | "head" => reads.push((method, access)),
                _ => writes.entry(access).or_default().push(method),
            }
        }
        let name_stem = route_name(&relative);
        if let Some((_, access)) = reads.iter().max_by_key(|(_, a)| a.clone()) {
            summary.routes += 1;
            let name = unique(&mut names, format!("{name_stem}-read"));
            let _ = writeln!(routes, "[[routes]]\nname = {}", quote(&name));
            let _ = writeln!(routes, "path = {}", quote(&template));
            let _ = writeln!(routes, "methods = [\"GET\", \"HEAD\"]");
            write_access(&mut routes, access);
            match access {
                Access::Public if is_probe(&template) => {
                    let _ = writeln!(
                        routes,
                        "# Not cached: a health or status answer must be live."
                    );
                }
                Access::Public => {
                    summary.cached += 1;
                    let _ = writeln!(
                        routes,
                        "cache = {{ ttl = \"{STARTER_TTL}\", statuses = [200] }}"
                    );
                }
                Access::Token(_) => {
                    summary.per_user += 1;
                    let _ = writeln!(
                        routes,
                        "# Readers are authenticated: each user's answers are cached for that user only.\n\
                         cache = {{ ttl = \"{STARTER_TTL}\", scope = \"user\", statuses = [200] }}"
                    );
                }
                Access::OptionalToken => {
                    summary.per_user += 1;
                    let _ = writeln!(
                        routes,
                        "# A token is optional: anonymous readers share one answer, each user's is cached\n\
                         # for that user only.\n\
                         cache = {{ ttl = \"{STARTER_TTL}\", scope = \"user\", anonymous = \"shared\", statuses = [200] }}"
                    );
                }
                Access::OriginChecked => {
                    summary.origin_checked += 1;
                    let _ = writeln!(
                        routes,
                        "# Not cached: the origin checks credentials the gateway cannot tell apart."
                    );
                }
            }
            routes.push('\n');
        }
        for (access, methods) in &writes {
            summary.routes += 1;
            if *access == Access::OriginChecked {
                summary.origin_checked += 1;
            }
            let suffix = if writes.len() == 1 {
                "write".to_owned()
            } else {
                methods.join("-")
            };
            let name = unique(&mut names, format!("{name_stem}-{suffix}"));
            let methods: Vec<String> = methods
                .iter()
                .map(|m| quote(&m.to_ascii_uppercase()))
                .collect();
            let _ = writeln!(routes, "[[routes]]\nname = {}", quote(&name));
            let _ = writeln!(routes, "path = {}", quote(&template));
            let _ = writeln!(routes, "methods = [{}]", methods.join(", "));
            write_access(&mut routes, access);
            // A write purges its own path anyway; its collection's list changes too.
            match collection_of(&template, &templates) {
                Some(collection) => {
                    let _ = writeln!(routes, "purge = {{ paths = [{}] }}", quote(&collection));
                }
                None => {
                    let _ = writeln!(routes, "# A successful write purges this path.");
                }
            }
            routes.push('\n');
        }
    }

    let title = document
        .pointer("/info/title")
        .and_then(Value::as_str)
        .unwrap_or("the API");
    let version = document
        .pointer("/info/version")
        .and_then(Value::as_str)
        .unwrap_or("");
    let upstream = options
        .upstream
        .map(str::to_owned)
        .or_else(|| server_url(document))
        .or_else(|| origin_of(options.source))
        .unwrap_or_else(|| "http://127.0.0.1:3000".to_owned());
    for page in options
        .extra_pages
        .iter()
        .filter(|p| !templates.contains(*p))
    {
        summary.routes += 1;
        let name = unique(&mut names, format!("{}-page", route_name(page)));
        let _ = writeln!(
            routes,
            "[[routes]]\nname = {}\npath = {}\nmethods = [\"GET\", \"HEAD\"]\n\
             # Served by the origin beside the API (its documentation); not cached.\n",
            quote(&name),
            quote(page)
        );
    }

    let source = options.source;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# cachegate configuration for {title} {version}, generated by `cachegate init` from\n\
         # {source}.\n\
         # A starting point: reads are cached for {STARTER_TTL}, writes purge what they change. Adjust\n\
         # TTLs per route, then check a URL with `cachegate explain --config FILE URL` and the whole\n\
         # file with `cachegate check --config FILE`.\n\
         # Only 200 answers are cached (`statuses = [200]`): a 404 for a resource created a moment\n\
         # later would outlive the create, since an origin need not say where it created it.\n"
    );
    let _ = writeln!(
        out,
        "[[listeners]]\naddress = {}\n\n\
         [upstream]\naddresses = [{}]\n\n\
         # Health, readiness and metrics for operators; keep it on a private address.\n\
         [admin]\naddress = {}\n\n\
         # Paths the document does not describe are refused (404, or 405 for an undescribed\n\
         # method): nothing reaches the API unless a route below allows it. Use \"pass\" to\n\
         # forward them under these defaults instead.\n\
         [defaults]\nunmatched = \"deny\"\n",
        quote(options.listen),
        quote(&upstream),
        quote(options.admin)
    );
    if uses_tokens {
        let _ = writeln!(out, "{}", auth_section(&schemes));
    }
    out.push_str(&routes);
    (out, summary)
}

/// `http://127.0.0.1:8000` for a document fetched from `http://127.0.0.1:8000/openapi.json`.
fn origin_of(source: &str) -> Option<String> {
    let uri: http::Uri = source.parse().ok()?;
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?))
}

/// A TOML string literal.
fn quote(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_options() -> StarterOptions<'static> {
        StarterOptions {
            source: "test",
            upstream: None,
            listen: "127.0.0.1:8080",
            admin: "127.0.0.1:9901",
            extra_pages: &[],
        }
    }

    #[test]
    fn integer_parameters_typed_and_collections_found() {
        let doc = parse(
            r##"
openapi: 3.1.0
info: {title: Shop, version: "1"}
components:
  parameters:
    Id: {name: id, in: path, required: true, schema: {type: integer}}
paths:
  /products/{id}:
    parameters: [{$ref: "#/components/parameters/Id"}]
    get: {}
"##,
        )
        .unwrap();
        let item = &doc["paths"]["/products/{id}"];
        assert_eq!(
            gateway_template(&doc, "/products/{id}", item),
            "/products/{id:int}"
        );
        let templates: BTreeSet<String> = [
            "/products",
            "/products/{id:int}",
            "/items/",
            "/items/{item_id:int}",
            "/users/{user_id:int}/orders/",
            "/users/{user_id:int}/orders/{id:int}/",
        ]
        .map(str::to_owned)
        .into();
        let collection = |t: &str| collection_of(t, &templates);
        assert_eq!(
            collection("/products/{id:int}").as_deref(),
            Some("/products")
        );
        assert_eq!(collection("/products"), None);
        // The collection as the document spells it, its parameters untyped.
        assert_eq!(
            collection("/items/{item_id:int}").as_deref(),
            Some("/items/")
        );
        assert_eq!(
            collection("/users/{user_id:int}/orders/{id:int}/").as_deref(),
            Some("/users/{user_id}/orders/")
        );
        assert_eq!(collection("/things/{id}"), None);
        assert_eq!(
            route_name("/shops/{shop}/items/{id:int}"),
            "shops-shop-items-id"
        );
        assert_eq!(route_name("/"), "root");
    }

    #[test]
    fn real_document_shapes_become_routable_templates() {
        let doc: Value = serde_json::from_str(
            r#"{"openapi": "3.0.3", "paths": {
                "/contents/{path}": {"get": {"parameters": [
                    {"name": "path", "in": "path", "x-multi-segment": true}]}},
                "/branches/{branch}": {"get": {"parameters": [
                    {"name": "branch", "in": "path", "x-multi-segment": true}]}},
                "/branches/{branch}/protection": {"get": {}},
                "/compare/{base}...{head}": {"get": {}},
                "/compare/{basehead}": {"get": {}},
                "/attestations/{attestation_id}": {"delete": {"parameters": [
                    {"name": "attestation_id", "in": "path", "schema": {"type": "integer"}}]}},
                "/attestations/{subject_digest}": {"get": {}},
                "/responses?beta=true": {"post": {}},
                "/responses": {"get": {}}
            }}"#,
        )
        .unwrap();
        let (text, summary) = starter_config(&doc, &test_options());
        assert!(summary.skipped.is_empty(), "{summary}");
        for expected in [
            r#"path = "/contents/{*path}""#,
            // A catch-all here would swallow `/branches/{branch}/protection`.
            r#"path = "/branches/{branch}""#,
            "/compare/{base}...{head} is the route of /compare/{basehead}",
            "/attestations/{subject_digest} is the route of /attestations/{attestation_id}",
            r#"methods = ["POST"]"#,
        ] {
            assert!(text.contains(expected), "{expected} in:\n{text}");
        }
        assert!(!text.contains("?beta"), "{text}");
        // The merged attestation route has both operations.
        let attestations = text
            .split("[[routes]]")
            .filter(|r| r.contains(r#"path = "/attestations/{attestation_id:int}""#))
            .count();
        assert_eq!(attestations, 2, "a read and a write route:\n{text}");
    }

    #[test]
    fn security_requirements_map_to_policies() {
        let schemes: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"oauth": {"type": "oauth2"},
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "opaque": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic"},
                "session": {"type": "apiKey", "in": "cookie", "name": "sessionid"},
                "key": {"type": "apiKey", "in": "header", "name": "X-Key"}}"#,
        )
        .unwrap();
        let access = |json: &str| access_of(Some(&serde_json::from_str(json).unwrap()), &schemes);
        assert_eq!(access("[]"), Access::Public);
        assert_eq!(
            access(r#"[{"oauth": ["a:write"]}]"#),
            Access::Token(vec!["a:write".into()])
        );
        assert_eq!(access(r#"[{"bearer": []}]"#), Access::Token(vec![]));
        assert_eq!(access(r#"[{"bearer": []}, {}]"#), Access::OptionalToken);
        assert_eq!(access(r#"[{"key": []}]"#), Access::OriginChecked);
        // An optional API key: keyed callers and anonymous ones would share cached answers.
        assert_eq!(access(r#"[{"key": []}, {}]"#), Access::OriginChecked);
        assert_eq!(
            access(r#"[{"bearer": []}, {"key": []}, {}]"#),
            Access::OriginChecked
        );
        assert_eq!(access(r#"[{"undeclared": []}, {}]"#), Access::OriginChecked);
        // "API key or OAuth2" (Swagger Petstore): key holders reach the origin.
        assert_eq!(
            access(r#"[{"oauth": ["a:read"]}, {"key": []}]"#),
            Access::OriginChecked
        );
        // An opaque bearer key is the origin's to check, never verified as a JWT.
        assert_eq!(access(r#"[{"opaque": []}]"#), Access::OriginChecked);
        assert_eq!(
            access(r#"[{"bearer": []}, {"opaque": []}]"#),
            Access::OriginChecked
        );
        // Django REST Framework's defaults beside simplejwt: JWTs verified, the rest passed on.
        assert_eq!(
            access(r#"[{"bearer": []}, {"session": []}, {"basic": []}]"#),
            Access::OptionalToken
        );
        assert_eq!(
            access(r#"[{"bearer": []}, {"session": []}, {"basic": []}, {}]"#),
            Access::OptionalToken
        );
        assert_eq!(access(r#"[{"basic": []}, {}]"#), Access::Public);
        assert_eq!(access(r#"[{"basic": []}]"#), Access::OriginChecked);
        assert_eq!(access_of(None, &schemes), Access::Public);
    }

    #[test]
    fn paths_are_prefixed_with_the_servers_base_path() {
        let base = |servers: &str| {
            base_path(&serde_json::from_str(&format!(r#"{{"servers": {servers}}}"#)).unwrap())
        };
        assert_eq!(base(r#"[{"url": "https://api.example.com/v2/"}]"#), "/v2");
        assert_eq!(base(r#"[{"url": "/api/v1"}]"#), "/api/v1");
        assert_eq!(base(r#"[{"url": "http://127.0.0.1:3000"}]"#), "");
        assert_eq!(base(r#"[{"url": "/"}]"#), "");
        assert_eq!(base("[]"), "");
        assert_eq!(base(r#"[{"url": "http://{hostname}/api/"}]"#), "/api");
        let unnamed_host: Value =
            serde_json::from_str(r#"{"servers": [{"url": "http://{hostname}/api"}]}"#).unwrap();
        assert_eq!(
            server_url(&unnamed_host),
            None,
            "a variable without a default"
        );
        assert_eq!(
            base(
                r#"[{"url": "https://{host}/{base}", "variables":
                    {"host": {"default": "api.example.com"}, "base": {"default": "shop"}}}]"#
            ),
            "/shop"
        );
        let doc = parse(
            r#"
openapi: 3.0.3
info: {title: Orders, version: "2"}
servers: [{url: "https://localhost:8443/v2"}]
paths:
  /orders: {get: {}}
  /orders/{id}: {get: {}, delete: {}}
"#,
        )
        .unwrap();
        let (text, _) = starter_config(&doc, &test_options());
        for expected in [
            "addresses = [\"https://localhost:8443\"]",
            "path = \"/v2/orders/{id}\"",
            "purge = { paths = [\"/v2/orders\"] }",
            "name = \"orders-id-read\"",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn not_openapi_is_refused_with_the_reason() {
        let e = parse(r#"{"swagger": "2.0", "paths": {}}"#).unwrap_err();
        assert!(e.to_string().contains("3.0 and 3.1"), "{e}");
        let e = parse("{ not: [valid").unwrap_err();
        assert!(e.to_string().contains("neither JSON nor YAML"), "{e}");
    }
}
