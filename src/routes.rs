//! Route matching: path templates compiled into a [`matchit`] router, most specific path first,
//! then the first route (in file order) whose methods include the request's.
//!
//! Every later phase reads the matched route's policy; nothing re-matches paths.

use std::borrow::Cow;

use http::{HeaderName, Method};

use crate::auth::AuthPolicy;
use crate::cache::policy::CachePolicy;
use crate::config::{PolicyConfig, RouteConfig, SpanError};
use crate::purge::template::path_params;
use crate::purge::PurgeRule;
use crate::ratelimit::RateLimitPolicy;

/// A route's per-request policy; a request that matches no route gets the table's default.
#[derive(Debug, Default, Clone)]
pub struct Policy {
    pub auth: AuthPolicy,
    pub rate_limit: Option<RateLimitPolicy>,
    pub cache: Option<CachePolicy>,
    /// What a successful write on this route purges besides its own path.
    pub purge: PurgeRule,
}

impl Policy {
    /// A route's policy: each section it sets replaces the default's.
    fn compile(
        route: Option<&RouteConfig>,
        defaults: &PolicyConfig,
        auth_configured: bool,
    ) -> Result<Policy, Vec<SpanError>> {
        let mut errors = Vec::new();
        let params = route.map_or_else(Vec::new, |r| path_params(r.path.get_ref()));
        let auth = route
            .and_then(|r| r.auth.as_ref())
            .or(defaults.auth.as_ref());
        let auth = match auth {
            Some(config) => AuthPolicy::compile(config, auth_configured).unwrap_or_else(|e| {
                errors.extend(e);
                AuthPolicy::default()
            }),
            None => AuthPolicy::default(),
        };
        // Counters are scoped by route name: routes sharing a name share counters.
        let (rate_limit, scope) = match route.and_then(|r| r.rate_limit.as_ref()) {
            Some(config) => (
                Some(config),
                route.map_or("default", RouteConfig::display_name),
            ),
            None => (defaults.rate_limit.as_ref(), "default"),
        };
        let rate_limit = rate_limit.and_then(|config| {
            RateLimitPolicy::compile(config, scope)
                .map_err(|e| errors.extend(e))
                .ok()
        });
        let cache = route
            .and_then(|r| r.cache.as_ref())
            .or(defaults.cache.as_ref())
            .and_then(|config| {
                CachePolicy::compile(config, &params)
                    .map_err(|e| errors.extend(e))
                    .ok()
            });
        let purge = route
            .and_then(|r| r.purge.as_ref())
            .or(defaults.purge.as_ref())
            .map(|config| {
                PurgeRule::compile(config, &params).unwrap_or_else(|e| {
                    errors.extend(e);
                    PurgeRule::default()
                })
            })
            .unwrap_or_default();
        if errors.is_empty() {
            Ok(Policy {
                auth,
                rate_limit,
                cache,
                purge,
            })
        } else {
            Err(errors)
        }
    }
}

#[derive(Debug)]
pub struct Route {
    /// Name for logs and metrics.
    pub name: String,
    /// The template as written, e.g. `/products/{id}`.
    pub template: String,
    /// `None` means every method.
    pub methods: Option<Vec<Method>>,
    pub policy: Policy,
}

impl Route {
    fn accepts(&self, method: &Method) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method))
    }
}

/// Index of a route in its [`RouteTable`].
pub type RouteId = usize;

#[derive(Debug)]
pub struct RouteTable {
    /// Template → indices of the routes sharing it, in file order.
    router: matchit::Router<Vec<RouteId>>,
    routes: Vec<Route>,
    default_policy: Policy,
    /// Every header the gateway sets from token claims, on any route. Removed from every incoming
    /// request so a client can never supply them itself.
    gateway_headers: Vec<HeaderName>,
}

impl RouteTable {
    /// Compiles the routes of a configuration; every error points at the offending value.
    pub fn compile(
        configs: &[RouteConfig],
        defaults: &PolicyConfig,
        auth_configured: bool,
    ) -> Result<RouteTable, Vec<SpanError>> {
        let mut errors = Vec::new();
        let default_policy = Policy::compile(None, defaults, auth_configured).unwrap_or_else(|e| {
            errors.extend(e);
            Policy::default()
        });
        let mut routes: Vec<Route> = Vec::new();
        // Template → (route ids, span of the first route with it), kept in insertion order.
        let mut by_template: Vec<(String, Vec<RouteId>)> = Vec::new();
        let mut spans = Vec::new();

        for config in configs {
            let template = config.path.get_ref();
            if let Err(message) = check_template(template) {
                errors.push(SpanError::new(config.path.span(), message));
                continue;
            }
            let methods = match &config.methods {
                None => None,
                Some(list) => {
                    let mut methods = Vec::new();
                    for m in list {
                        match parse_method(m.get_ref()) {
                            Ok(method) => methods.push(method),
                            Err(message) => errors.push(SpanError::new(m.span(), message)),
                        }
                    }
                    Some(methods)
                }
            };
            let policy = match Policy::compile(Some(config), defaults, auth_configured) {
                Ok(policy) => policy,
                Err(e) => {
                    errors.extend(e);
                    continue;
                }
            };
            let id = routes.len();
            let route = Route {
                name: config.display_name().to_owned(),
                template: template.clone(),
                methods,
                policy,
            };
            match by_template.iter_mut().find(|(t, _)| t == template) {
                Some((_, ids)) => {
                    if let Some(&other) = ids.iter().find(|&&other| overlap(&routes[other], &route))
                    {
                        errors.push(SpanError::new(
                            config.path.span(),
                            format!(
                                "duplicate route: `{template}` is already defined for {} by route `{}`; give the routes disjoint `methods` or remove one",
                                describe_overlap(&routes[other], &route),
                                routes[other].name
                            ),
                        ));
                        continue;
                    }
                    ids.push(id);
                }
                None => by_template.push((template.clone(), vec![id])),
            }
            spans.push(config.path.span());
            routes.push(route);
        }

        let mut router = matchit::Router::new();
        for (template, ids) in by_template {
            if let Err(e) = router.insert(template.as_str(), ids.clone()) {
                errors.push(SpanError::new(
                    spans[ids[0]].clone(),
                    format!(
                        "route template `{template}` cannot be used: {e}. Static segments may overlap parameters, but a `{{param}}` and a `{{*catch_all}}` (or two differently named parameters) cannot share a position"
                    ),
                ));
            }
        }

        let mut gateway_headers: Vec<HeaderName> = Vec::new();
        for policy in routes.iter().map(|r| &r.policy).chain([&default_policy]) {
            for (_, header) in &policy.auth.forward_claims {
                if !gateway_headers.contains(header) {
                    gateway_headers.push(header.clone());
                }
            }
        }

        if errors.is_empty() {
            Ok(RouteTable {
                router,
                routes,
                default_policy,
                gateway_headers,
            })
        } else {
            Err(errors)
        }
    }

    /// The route for a request, or `None` when the default policy applies.
    pub fn find(&self, method: &Method, path: &str) -> Option<RouteId> {
        let matched = self.router.at(path).ok()?;
        matched
            .value
            .iter()
            .copied()
            .find(|&id| self.routes[id].accepts(method))
    }

    /// The path parameters of `path` by the route template it matches (name, value).
    pub fn params(&self, path: &str) -> Vec<(String, String)> {
        match self.router.at(path) {
            Ok(matched) => matched
                .params
                .iter()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    pub fn route(&self, id: RouteId) -> &Route {
        &self.routes[id]
    }

    /// The policy for a request: its route's, or the default.
    pub fn policy(&self, id: Option<RouteId>) -> &Policy {
        id.map_or(&self.default_policy, |id| &self.routes[id].policy)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Headers only the gateway may set (see [`RouteTable::compile`]).
    pub fn gateway_headers(&self) -> &[HeaderName] {
        &self.gateway_headers
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

fn overlap(a: &Route, b: &Route) -> bool {
    match (&a.methods, &b.methods) {
        (Some(x), Some(y)) => x.iter().any(|m| y.contains(m)),
        _ => true,
    }
}

fn describe_overlap(a: &Route, b: &Route) -> String {
    match (&a.methods, &b.methods) {
        (Some(x), Some(y)) => {
            let shared: Vec<&str> = x
                .iter()
                .filter(|m| y.contains(m))
                .map(Method::as_str)
                .collect();
            shared.join(", ")
        }
        _ => "every method".to_owned(),
    }
}

fn check_template(template: &str) -> Result<(), String> {
    if !template.starts_with('/') {
        return Err(format!(
            "invalid route template `{template}`: it must start with `/`"
        ));
    }
    if template.contains('?') || template.contains('#') {
        return Err(format!(
            "invalid route template `{template}`: templates match paths only; remove the query or fragment"
        ));
    }
    let mut depth = 0i32;
    for c in template.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(format!(
                "invalid route template `{template}`: braces must pair up, as in `/products/{{id}}` or `/files/{{*rest}}`"
            ));
        }
    }
    if depth != 0 {
        return Err(format!(
            "invalid route template `{template}`: unclosed `{{`; write parameters as `{{id}}` or `{{*rest}}`"
        ));
    }
    // Let the router judge the rest (empty names, catch-all placement) with its own words.
    matchit::Router::<()>::new()
        .insert(template, ())
        .map_err(|e| format!("invalid route template `{template}`: {e}"))
}

fn parse_method(text: &str) -> Result<Method, String> {
    if text != text.to_ascii_uppercase() {
        return Err(format!(
            "method `{text}` must be written in upper case: `{}`",
            text.to_ascii_uppercase()
        ));
    }
    Method::from_bytes(text.as_bytes())
        .map_err(|_| format!("`{text}` is not a valid HTTP method name"))
}

/// Normalises a request path for matching and forwarding: decodes percent-encoded unreserved
/// characters, removes `.` and `..` segments (RFC 3986 §5.2.4) and merges repeated slashes, so
/// `/products/../admin` cannot match a `/products/{id}` rule while reaching `/admin` upstream.
/// Returns the input unchanged (and unallocated) in the common case.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let needs_work =
        path.contains("//") || path.contains("/.") || path.contains('%') || !path.starts_with('/');
    if !needs_work {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    if out.is_empty() || (trailing && !segments.is_empty()) {
        out.push('/');
    }
    if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    }
}

/// Decodes `%XX` only where XX is an unreserved character (letters, digits, `-._~`); everything
/// else, such as an encoded `/`, stays encoded so it cannot create new path segments.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        if let (b'%', Some(Ok(value))) = (bytes[i], hex.map(|h| u8::from_str_radix(h, 16))) {
            let c = value as char;
            if c.is_ascii_alphanumeric() || "-._~".contains(c) {
                out.push(c);
            } else {
                out.push('%');
                out.push_str(&hex.unwrap_or_default().to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        // Request paths are ASCII (the URI parser guarantees it); keep any other byte as is.
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use toml::Spanned;

    fn route(path: &str, methods: Option<&[&str]>) -> RouteConfig {
        RouteConfig {
            name: None,
            path: Spanned::new(0..0, path.to_owned()),
            methods: methods.map(|m| {
                m.iter()
                    .map(|s| Spanned::new(0..0, s.to_string()))
                    .collect()
            }),
            auth: None,
            rate_limit: None,
            cache: None,
            purge: None,
        }
    }

    #[test]
    fn most_specific_path_wins_then_first_matching_method() {
        let table = RouteTable::compile(
            &[
                route("/files/{*rest}", None),
                route("/products/{id}", Some(&["GET"])),
                route("/products/{id}", Some(&["PUT", "DELETE"])),
                route("/products/special", None),
                route("/files/readme", None),
            ],
            &PolicyConfig::default(),
            false,
        )
        .unwrap();
        assert_eq!(table.find(&Method::GET, "/products/7"), Some(1));
        assert_eq!(table.find(&Method::DELETE, "/products/7"), Some(2));
        assert_eq!(table.find(&Method::POST, "/products/7"), None);
        assert_eq!(table.find(&Method::GET, "/products/special"), Some(3));
        assert_eq!(table.find(&Method::GET, "/files/a/b"), Some(0));
        assert_eq!(table.find(&Method::GET, "/files/readme"), Some(4));
        assert_eq!(table.find(&Method::GET, "/other"), None);
    }

    #[test]
    fn duplicates_and_bad_templates_are_errors() {
        let errors = RouteTable::compile(
            &[
                route("/a", Some(&["GET", "PUT"])),
                route("/a", Some(&["PUT"])),
                route("a", None),
                route("/b/{id", None),
                route("/c", Some(&["get"])),
            ],
            &PolicyConfig::default(),
            false,
        )
        .unwrap_err();
        let text: Vec<_> = errors.iter().map(|e| e.message.as_str()).collect();
        assert!(
            text[0].contains("duplicate route") && text[0].contains("PUT"),
            "{text:?}"
        );
        assert!(text[1].contains("must start with `/`"), "{text:?}");
        assert!(text[2].contains("unclosed"), "{text:?}");
        assert!(text[3].contains("upper case"), "{text:?}");
    }

    #[test]
    fn paths_are_normalised() {
        assert_eq!(normalize_path("/products/7"), "/products/7");
        assert_eq!(normalize_path("/products/../admin"), "/admin");
        assert_eq!(normalize_path("//products///7/"), "/products/7/");
        assert_eq!(normalize_path("/products/%2e%2e/admin"), "/admin");
        assert_eq!(normalize_path("/a/%2f/b"), "/a/%2F/b");
        assert_eq!(normalize_path("/a/./b/."), "/a/b/");
        assert_eq!(normalize_path("/.."), "/");
        assert_eq!(normalize_path("/%41bc"), "/Abc");
        assert_eq!(normalize_path("/100%"), "/100%");
    }
}
