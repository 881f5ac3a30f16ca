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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::Value;

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

/// What an operation requires of its caller, as far as the gateway can check it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Access {
    /// No requirement.
    Public,
    /// A bearer token if present (one requirement is the empty `{}`).
    OptionalToken,
    /// A bearer token with these scopes.
    Token(Vec<String>),
    /// Credentials only the origin can check (API keys, HTTP basic, mutual TLS).
    OriginChecked,
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

/// The `[auth]` table: an OpenID Connect scheme's issuer when the document names one, else an
/// HMAC secret from the environment to replace with the identity provider's keys.
fn auth_section(schemes: &serde_json::Map<String, Value>) -> String {
    let oidc = schemes.values().find_map(|s| {
        let url = s.get("openIdConnectUrl")?.as_str()?;
        Some(
            url.strip_suffix("/.well-known/openid-configuration")
                .unwrap_or(url)
                .to_owned(),
        )
    });
    match oidc {
        Some(issuer) => format!(
            "# Bearer tokens are verified with the keys the OpenID provider publishes.\n\
             [auth]\nissuer = {issuer}\n\n\
             [[auth.providers]]\nname = \"oidc\"\nalgorithms = [\"RS256\"]\noidc_issuer = {issuer}\n",
            issuer = quote(&issuer)
        ),
        None => {
            // drf-spectacular names Django REST Framework simplejwt's scheme `jwtAuth`; simplejwt
            // names the user `user_id`.
            let user_claim = if schemes.contains_key("jwtAuth") {
                "# simplejwt (Django REST Framework) names the user in `user_id`.\n\
                 user_claim = \"user_id\"\n"
            } else {
                ""
            };
            format!(
                "# Bearer tokens (the document's OAuth2 / bearer schemes). This verifies HS256 tokens\n\
                 # signed with JWT_SECRET; for your identity provider use `jwks_url` or `oidc_issuer`\n\
                 # with its algorithms instead (see the README's [[auth.providers]]).\n\
                 [auth]\n\n\
                 [[auth.providers]]\nname = \"local-hmac\"\nalgorithms = [\"HS256\"]\n\
                 secret = \"${{JWT_SECRET:-dev-only-secret}}\"\n{user_claim}"
            )
        }
    }
}

fn write_access(out: &mut String, access: &Access) {
    let _ = match access {
        Access::Public => Ok(()),
        Access::OptionalToken => writeln!(out, "auth = \"optional\""),
        Access::Token(scopes) if scopes.is_empty() => writeln!(out, "auth = \"required\""),
        Access::Token(scopes) => {
            let scopes: Vec<String> = scopes.iter().map(|s| quote(s)).collect();
            writeln!(
                out,
                "auth = {{ mode = \"required\", scopes = [{}] }}",
                scopes.join(", ")
            )
        }
        Access::OriginChecked => writeln!(
            out,
            "# The origin checks this route's credentials (API key or basic): passed through."
        ),
    };
}

/// How the gateway sees one security scheme of the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SchemeKind {
    /// A JWT in `Authorization: Bearer` the gateway verifies: OAuth2, OpenID Connect, and HTTP
    /// bearer with `bearerFormat: JWT`.
    Jwt,
    /// A credential the gateway cannot verify but can see — it travels in `Authorization`
    /// (HTTP basic, an opaque bearer key) or in a cookie — so requests carrying it never share
    /// cached answers with anyone (RFC 9111 §3.5, and the cache's cookie rule).
    Visible,
    /// A credential the gateway cannot verify and cannot tell apart from no credential: an API
    /// key in another header or in the query.
    Hidden,
}

fn scheme_kind(scheme: Option<&Value>) -> SchemeKind {
    let Some(scheme) = scheme else {
        return SchemeKind::Hidden;
    };
    let field = |name: &str| scheme.get(name).and_then(Value::as_str).unwrap_or_default();
    match field("type") {
        "oauth2" | "openIdConnect" => SchemeKind::Jwt,
        "http" if field("scheme").eq_ignore_ascii_case("bearer") => {
            if field("bearerFormat").eq_ignore_ascii_case("jwt") {
                SchemeKind::Jwt
            } else {
                // An opaque bearer key (as large AI APIs issue): verifying it as a JWT would
                // refuse every key.
                SchemeKind::Visible
            }
        }
        "http" => SchemeKind::Visible,
        "apiKey" if field("in") == "cookie" => SchemeKind::Visible,
        _ => SchemeKind::Hidden,
    }
}

/// What `security` (a list of alternative requirements) asks of a caller.
///
/// The gateway demands a token only when every alternative needs a JWT; any other credential
/// the document accepts is left for the origin to check (API-key holders are not locked out).
/// Reads stay cacheable only where every caller the origin could tell apart is one the gateway
/// can tell apart too.
fn access_of(security: Option<&Value>, schemes: &serde_json::Map<String, Value>) -> Access {
    let Some(requirements) = security.and_then(Value::as_array) else {
        return Access::Public;
    };
    if requirements.is_empty() {
        return Access::Public;
    }
    let mut anonymous = false;
    let mut jwt_scopes: Option<Vec<String>> = None;
    let (mut visible, mut hidden, mut opaque_bearer) = (false, false, false);
    for requirement in requirements.iter().filter_map(Value::as_object) {
        if requirement.is_empty() {
            anonymous = true;
            continue;
        }
        let kinds: Vec<SchemeKind> = requirement
            .keys()
            .map(|name| scheme_kind(schemes.get(name)))
            .collect();
        if kinds.iter().all(|k| *k == SchemeKind::Jwt) {
            // Alternatives are "any of"; the gateway's scopes are "all of": the first JWT
            // requirement is the closest single policy.
            if jwt_scopes.is_none() {
                jwt_scopes = Some(
                    requirement
                        .values()
                        .filter_map(Value::as_array)
                        .flatten()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect(),
                );
            }
            continue;
        }
        hidden |= kinds.contains(&SchemeKind::Hidden);
        visible |= kinds.contains(&SchemeKind::Visible);
        opaque_bearer |= requirement.keys().any(|name| {
            schemes.get(name).is_some_and(|s| {
                s.get("scheme")
                    .and_then(Value::as_str)
                    .is_some_and(|scheme| scheme.eq_ignore_ascii_case("bearer"))
            })
        });
    }
    match jwt_scopes {
        // Callers told apart only by the origin, or an opaque bearer key that would look like a
        // bad JWT: the gateway neither checks nor caches.
        _ if hidden => Access::OriginChecked,
        Some(_) if opaque_bearer => Access::OriginChecked,
        Some(scopes) if !anonymous && !visible => Access::Token(scopes),
        Some(_) => Access::OptionalToken,
        // Basic or cookie credentials beside anonymous access: requests that carry them never
        // share answers, the rest do.
        None if anonymous => Access::Public,
        None => Access::OriginChecked,
    }
}

/// The path template as the gateway writes it: `{id}` becomes `{id:int}` when the document
/// types the parameter as an integer; a last parameter that may hold slashes (GitHub's
/// `x-multi-segment`, as in `/contents/{path}` for `docs/readme.md`) becomes a catch-all
/// `{*path}`; several parameters in one segment (`{base}...{head}`) become one (`{base_head}`),
/// since a route parameter is a whole segment.
fn gateway_template(document: &Value, path: &str, item: &Value) -> String {
    let mut integers = BTreeSet::new();
    let mut multi_segment = BTreeSet::new();
    let operations = ["get", "head", "post", "put", "patch", "delete"]
        .iter()
        .filter_map(|m| item.get(*m));
    let lists = std::iter::once(item).chain(operations);
    for list in lists.filter_map(|v| v.get("parameters").and_then(Value::as_array)) {
        for parameter in list {
            let parameter = resolve(document, parameter);
            if parameter.get("in").and_then(Value::as_str) != Some("path") {
                continue;
            }
            let Some(name) = parameter.get("name").and_then(Value::as_str) else {
                continue;
            };
            let kind = parameter
                .pointer("/schema/type")
                .or_else(|| parameter.get("type"));
            let is_integer = match kind {
                Some(Value::String(t)) => t == "integer",
                // 3.1: `type: [integer, "null"]`.
                Some(Value::Array(types)) => types.iter().any(|t| t == "integer"),
                _ => false,
            };
            if is_integer {
                integers.insert(name.to_owned());
            }
            if parameter.get("x-multi-segment").and_then(Value::as_bool) == Some(true) {
                multi_segment.insert(name.to_owned());
            }
        }
    }
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len() - 1;
    let written: Vec<String> = segments
        .iter()
        .enumerate()
        .map(|(at, segment)| {
            let names = segment_params(segment);
            match names.as_slice() {
                [] => (*segment).to_owned(),
                [name] if *segment == format!("{{{name}}}") => {
                    if at == last && multi_segment.contains(*name) {
                        format!("{{*{name}}}")
                    } else if integers.contains(*name) {
                        format!("{{{name}:int}}")
                    } else {
                        (*segment).to_owned()
                    }
                }
                several => format!("{{{}}}", several.join("_")),
            }
        })
        .collect();
    written.join("/")
}

/// The parameter names in one path segment: `{base}...{head}` → `base`, `head`.
fn segment_params(segment: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = segment;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        names.push(&rest[open + 1..open + close]);
        rest = &rest[open + close + 1..];
    }
    names
}

/// Gives parameters at one position of the path tree one name (the first seen):
/// `/attestations/{attestation_id}` beside `/attestations/{subject_digest}` both use
/// `{attestation_id}`, since a router position holds one parameter.
fn unify_parameter_names(templates: &mut BTreeMap<String, String>) {
    let mut named: BTreeMap<String, String> = BTreeMap::new();
    for template in templates.values_mut() {
        let mut prefix = String::new();
        let mut segments = Vec::new();
        for segment in template.split('/') {
            let written = match segment
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .filter(|inner| !inner.starts_with('*'))
            {
                Some(inner) => {
                    let (name, kind) = inner
                        .split_once(':')
                        .map_or((inner, None), |(n, k)| (n, Some(k)));
                    let position = format!("{prefix}/{{}}");
                    let name = named
                        .entry(position)
                        .or_insert_with(|| name.to_owned())
                        .clone();
                    match kind {
                        Some(kind) => format!("{{{name}:{kind}}}"),
                        None => format!("{{{name}}}"),
                    }
                }
                None => segment.to_owned(),
            };
            prefix.push('/');
            prefix.push_str(&untyped(&written));
            segments.push(written);
        }
        *template = segments.join("/");
    }
}

/// A catch-all (`{*branch}`) where another path has a parameter at the same position
/// (`/branches/{branch}/protection`) would swallow that path: it becomes a plain parameter, whose
/// value then cannot hold a slash (clients send one as `%2F`, which needs `[server]
/// encoded_slash = "keep"`).
fn demote_blocking_catch_alls(templates: &mut BTreeMap<String, String>) {
    let all: Vec<String> = templates.values().map(|t| untyped(t)).collect();
    for template in templates.values_mut() {
        let Some(at) = template.rfind("/{*") else {
            continue;
        };
        let prefix = untyped(&template[..=at]);
        let blocked = all.iter().any(|other| {
            other
                .strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with('{') && !rest.starts_with("{*"))
        });
        if blocked {
            template.replace_range(at + 1..at + 3, "{");
        }
    }
}

/// Paths as the gateway routes them: a query in a path key (`/responses?beta=true`) dropped,
/// the operations of keys that then coincide merged (the first key's operation per method).
fn merged_paths(document: &Value) -> BTreeMap<String, Value> {
    let mut merged: BTreeMap<String, Value> = BTreeMap::new();
    let Some(paths) = document.get("paths").and_then(Value::as_object) else {
        return merged;
    };
    for (key, item) in paths {
        let path = key.split('?').next().unwrap_or(key).to_owned();
        match (merged.get_mut(&path), item.as_object()) {
            (Some(Value::Object(into)), Some(from)) => {
                for (name, value) in from {
                    into.entry(name.clone()).or_insert_with(|| value.clone());
                }
            }
            _ => {
                merged.entry(path).or_insert_with(|| item.clone());
            }
        }
    }
    merged
}

/// `{"$ref": "#/components/parameters/Id"}` → the object it points at (local references only).
fn resolve<'a>(document: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => reference
            .strip_prefix('#')
            .and_then(|pointer| document.pointer(pointer))
            .unwrap_or(value),
        None => value,
    }
}

/// Health and status endpoints, whose answers a cache would make stale.
fn is_probe(template: &str) -> bool {
    let last = template.rsplit('/').next().unwrap_or_default();
    matches!(
        last.to_ascii_lowercase().as_str(),
        "health" | "healthz" | "livez" | "ready" | "readyz" | "status" | "ping" | "metrics"
    )
}

/// The list a write to an item changes, as a purge path (parameters untyped: purge templates
/// name parameters, the route types them): `/products/{id:int}` → `/products` when the
/// document has that path, also spelled `/products/` (FastAPI's and Django REST Framework's
/// collections).
fn collection_of(template: &str, templates: &BTreeSet<String>) -> Option<String> {
    let (parent, last) = template.trim_end_matches('/').rsplit_once('/')?;
    if !last.starts_with('{') || parent.is_empty() {
        return None;
    }
    let found = templates
        .iter()
        .find(|t| t.as_str() != "/" && t.trim_end_matches('/') == parent)?;
    Some(untyped(found))
}

/// `/users/{user_id:int}/orders` → `/users/{user_id}/orders`.
fn untyped(template: &str) -> String {
    template.replace(":int}", "}")
}

/// `/shops/{shop}/products/{id:int}` → `shops-shop-products-id`.
fn route_name(template: &str) -> String {
    let words: Vec<String> = template
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|segment| {
            let segment = segment.trim_matches(|c| c == '{' || c == '}');
            let segment = segment.split(':').next().unwrap_or(segment);
            segment
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .collect()
        })
        .collect();
    if words.is_empty() {
        "root".to_owned()
    } else {
        words.join("-")
    }
}

fn unique(names: &mut BTreeSet<String>, name: String) -> String {
    let mut candidate = name.clone();
    let mut n = 2;
    while !names.insert(candidate.clone()) {
        candidate = format!("{name}-{n}");
        n += 1;
    }
    candidate
}

/// The document's server URLs, in order, with `{variables}` at their defaults.
fn server_urls(document: &Value) -> Vec<String> {
    let Some(servers) = document.get("servers").and_then(Value::as_array) else {
        return Vec::new();
    };
    servers
        .iter()
        .filter_map(|server| {
            let mut url = server.get("url")?.as_str()?.to_owned();
            if let Some(variables) = server.get("variables").and_then(Value::as_object) {
                for (name, variable) in variables {
                    if let Some(default) = variable.get("default").and_then(Value::as_str) {
                        url = url.replace(&format!("{{{name}}}"), default);
                    }
                }
            }
            Some(url)
        })
        .collect()
}

/// The first server URL that names a host (relative ones name the document's own host).
fn server_url(document: &Value) -> Option<String> {
    server_urls(document)
        .iter()
        // A variable without a default (`http://{hostname}`) names no host yet.
        .filter(|url| !url.contains('{'))
        .filter_map(|url| url.parse::<http::Uri>().ok())
        // The gateway forwards the request's own path: the origin is scheme and authority.
        .find_map(|uri| Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?)))
}

/// The path the first server URL puts before every path of the document (`/v2` for
/// `https://host/v2/` or `/v2`), without a trailing slash; empty when there is none.
fn base_path(document: &Value) -> String {
    let Some(url) = server_urls(document).into_iter().next() else {
        return String::new();
    };
    let url = url.split(['?', '#']).next().unwrap_or_default();
    // What follows the authority of an absolute URL (`http://{hostname}/api` → `/api`, even
    // with a variable left in the host).
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("", |at| &rest[at..]),
        None => url,
    };
    let path = path.trim_end_matches('/');
    if path.starts_with('/') {
        path.to_owned()
    } else {
        String::new()
    }
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
