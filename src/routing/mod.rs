//! Routing: a request's path is first made [`canonical`], then matched once against path
//! templates compiled into a [`matchit`] router — most specific path first, then the first route
//! (in file order) whose methods include the request's.
//!
//! A template may type its parameters (`/products/{id:int}`): the origin parses `07` and `+7` as
//! `7`, so the gateway rewrites the path to `/products/7` before anything keys on it, and a write
//! to `/products/07` purges what a read of `/products/7` cached.
//!
//! The pipeline's route step calls [`RouteTable::resolve`] once per request; its [`Matched`]
//! (the route, the route a read of the same path takes, the path's parameters) travels with the
//! request, and every later step — tags, purges, write-through — reads it instead of matching
//! again. Only a *different* path (a `Location` target) is matched on its own.
//!
//! This file is the [`RouteTable`]: compiled once per configuration (route by route, grouped by
//! template), matched once per request. [`canonical`] makes paths canonical; `template` turns
//! templates into the router's form and rewrites typed parameters; `policy` compiles a route's
//! per-request [`Policy`].

pub mod canonical;
mod policy;
mod template;

use http::{HeaderName, Method};

use self::canonical::PathRules;
pub use self::policy::Policy;
pub use self::template::ParamType;
use self::template::{check_router_template, check_template, CompiledTemplate};
use crate::config::{Invalid, PolicyConfig, RouteConfig, SpanError, Unmatched};
use crate::metrics::RouteMetrics;

#[derive(Debug)]
pub struct Route {
    /// Name for logs and metrics.
    pub name: String,
    /// The template as written, e.g. `/products/{id:int}`.
    pub template: String,
    /// `None` means every method.
    pub methods: Option<Vec<Method>>,
    pub policy: Policy,
    /// Its per-request metrics, labelled with `name`.
    pub metrics: RouteMetrics,
}

impl Route {
    fn accepts(&self, method: &Method) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method))
    }
}

/// Index of a route in its [`RouteTable`].
pub type RouteId = usize;

/// Routes sharing one template, in file order.
#[derive(Debug, Clone)]
struct TemplateRoutes {
    ids: Vec<RouteId>,
    template: CompiledTemplate,
    /// Some route here expands its parameters (cache tags, purge paths or tags): the match
    /// keeps them.
    wants_params: bool,
    /// The route a `GET` of this template takes: the read a write here purges or writes through.
    read_route: Option<RouteId>,
}

/// One request's match, made once by the route step and carried with the request.
#[derive(Debug, Default, Clone)]
pub struct Matched {
    /// The matched route; `None` for the defaults.
    pub id: Option<RouteId>,
    /// The route a `GET` of the same path takes (whose cache a write purges and writes through).
    pub read_id: Option<RouteId>,
    /// The path's parameters (name, canonical value), kept when a route on the template expands
    /// them; empty otherwise.
    pub params: Vec<(String, String)>,
}

/// How many times this process matched a path against the router. Debug builds only: it lets a
/// test prove that a request is matched once.
#[cfg(debug_assertions)]
pub static MATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[inline]
fn count_match() {
    #[cfg(debug_assertions)]
    MATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Where a request's canonical path and method lead.
#[derive(Debug, Default)]
pub struct Resolution {
    /// The matched route, the read route and the parameters.
    pub matched: Matched,
    /// The path with its typed parameters in canonical form, when that changed it.
    pub rewritten: Option<String>,
    /// When the path matched a template but no route there takes the method: the methods that
    /// would be routed.
    pub allowed: Vec<Method>,
    /// Whether the matched template spells the path with a trailing slash (which the canonical
    /// path drops); `None` when the path matched no template.
    pub template_slash: Option<bool>,
}

impl Resolution {
    /// The path the origin receives for `canonical` when that is not `canonical` itself (or
    /// its rewrite): with a trailing slash where the matched template has one, or, for a path
    /// no template matches, where the client sent one (`sent_slash`). Trailing slashes are
    /// dropped from canonical paths only when `[server] trailing_slash = "ignore"`.
    pub fn origin_path(&self, canonical: &str, sent_slash: bool) -> Option<String> {
        let slash = self.template_slash.unwrap_or(sent_slash) && canonical != "/";
        let path = self.rewritten.as_deref().unwrap_or(canonical);
        slash.then(|| format!("{path}/"))
    }
}

#[derive(Debug)]
pub struct RouteTable {
    router: matchit::Router<TemplateRoutes>,
    routes: Vec<Route>,
    default_policy: Policy,
    /// The metrics of requests no route matched (route `-`).
    unmatched_metrics: RouteMetrics,
    /// How paths are made canonical before they are matched.
    pub paths: PathRules,
    /// What happens to requests that match no route.
    pub unmatched: Unmatched,
    /// Every header the gateway sets from token claims, on any route. Removed from every incoming
    /// request so a client can never supply them itself.
    gateway_headers: Vec<HeaderName>,
    /// What `check` warns about (the configuration works, but likely not as meant).
    pub warnings: Vec<SpanError>,
}

impl RouteTable {
    /// Compiles the routes of a configuration; every error points at the offending value.
    pub fn compile(
        configs: &[RouteConfig],
        defaults: &PolicyConfig,
        auth_configured: bool,
        paths: PathRules,
    ) -> Result<RouteTable, Vec<SpanError>> {
        let mut table = Builder::default();
        let default_policy = Policy::compile(None, defaults, auth_configured, &paths)
            .unwrap_or_else(|e| {
                table.errors.extend(e);
                Policy::default()
            });
        for config in configs {
            table.add(config, defaults, auth_configured, &paths);
        }
        let (router, routes, warnings, errors) = table.finish();
        if !errors.is_empty() {
            return Err(errors);
        }
        let gateway_headers =
            gateway_headers(routes.iter().map(|r| &r.policy).chain([&default_policy]));
        Ok(RouteTable {
            router,
            routes,
            default_policy,
            unmatched_metrics: RouteMetrics::new("-"),
            paths,
            unmatched: defaults.unmatched,
            gateway_headers,
            warnings,
        })
    }

    /// Routes a request by its canonical path: the route, the path with typed parameters in
    /// canonical form, and, when only the method failed to match, the methods that would. The
    /// pipeline calls this once per request (see [`Matched`]).
    pub fn resolve(&self, method: &Method, path: &str) -> Resolution {
        count_match();
        let Ok(matched) = self.router.at(path) else {
            return Resolution::default();
        };
        let entry = matched.value;
        let route = entry
            .ids
            .iter()
            .copied()
            .find(|&id| self.routes[id].accepts(method));
        let allowed = match route {
            Some(_) => Vec::new(),
            None => entry
                .ids
                .iter()
                .flat_map(|&id| self.routes[id].methods.clone().unwrap_or_default())
                .collect(),
        };
        let rewritten = if entry.template.types.is_empty() {
            None
        } else {
            entry.template.rewrite(&matched.params)
        };
        let params = if entry.wants_params {
            entry.template.canonical_params(&matched.params)
        } else {
            Vec::new()
        };
        Resolution {
            matched: Matched {
                id: route,
                read_id: entry.read_route,
                params,
            },
            rewritten,
            allowed,
            template_slash: Some(entry.template.trailing_slash),
        }
    }

    /// Another path (a `Location` target, a path to purge) as the gateway keys and purges it:
    /// canonical, with typed parameters rewritten. `None` when the path has no canonical form.
    /// Matches that path: never call it for the request's own path, which the route step
    /// already matched.
    pub fn canonical_target(&self, path: &str) -> Option<String> {
        let path = canonical::canonical_path(path, &self.paths).ok()?;
        count_match();
        let rewritten = self.router.at(&path).ok().and_then(|matched| {
            let template = &matched.value.template;
            (!template.types.is_empty())
                .then(|| template.rewrite(&matched.params))
                .flatten()
        });
        Some(rewritten.unwrap_or_else(|| path.into_owned()))
    }

    pub fn route(&self, id: RouteId) -> &Route {
        &self.routes[id]
    }

    /// The per-request metrics for a request: its route's, or those of unmatched requests.
    pub fn metrics(&self, id: Option<RouteId>) -> &RouteMetrics {
        id.map_or(&self.unmatched_metrics, |id| &self.routes[id].metrics)
    }

    /// Makes every cache rule obey `targeted` (see [`crate::cache::policy::CachePolicy::targeted`]).
    pub fn target_cache_control(&mut self, targeted: &std::sync::Arc<[HeaderName]>) {
        for policy in self
            .routes
            .iter_mut()
            .map(|r| &mut r.policy)
            .chain([&mut self.default_policy])
        {
            if let Some(cache) = policy.cache.as_mut() {
                cache.targeted = targeted.clone();
            }
        }
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

/// A route table being compiled: routes in file order, grouped by template, with the errors
/// found so far.
#[derive(Default)]
struct Builder {
    routes: Vec<Route>,
    /// Routes by template, kept in insertion order.
    by_template: Vec<TemplateRoutes>,
    /// Each route's template span, for errors found later.
    spans: Vec<std::ops::Range<usize>>,
    errors: Vec<SpanError>,
}

impl Builder {
    /// Compiles one `[[routes]]` entry (template, methods, policy) and files it under its
    /// template; a mistake is recorded and the route left out.
    fn add(
        &mut self,
        config: &RouteConfig,
        defaults: &PolicyConfig,
        auth_configured: bool,
        paths: &PathRules,
    ) {
        let template = config.path.get_ref();
        let compiled = match check_template(template)
            .and_then(|()| CompiledTemplate::new(template, paths))
            .and_then(|c| check_router_template(&c.path).map(|()| c))
        {
            Ok(compiled) => compiled,
            Err(message) => {
                self.errors.push(SpanError::new(
                    config.path.span(),
                    format!("invalid route template `{template}`: {message}"),
                ));
                return;
            }
        };
        let methods = config.methods.as_ref().map(|list| {
            let mut methods = Vec::new();
            for m in list {
                match parse_method(m.get_ref()) {
                    Ok(method) => methods.push(method),
                    Err(message) => self.errors.push(SpanError::new(m.span(), message)),
                }
            }
            methods
        });
        let policy = match Policy::compile(Some(config), defaults, auth_configured, paths) {
            Ok(policy) => policy,
            Err(e) => {
                self.errors.extend(e);
                return;
            }
        };
        let route = Route {
            name: config.display_name().to_owned(),
            template: template.clone(),
            methods,
            policy,
            metrics: RouteMetrics::new(config.display_name()),
        };
        match self.place(compiled, &route) {
            Ok(()) => {
                self.spans.push(config.path.span());
                self.routes.push(route);
            }
            Err(message) => self
                .errors
                .push(SpanError::new(config.path.span(), message)),
        }
    }

    /// Files `route` under its template: a new template, or beside the routes already there
    /// when it spells the path the same way, types it the same way and takes other methods.
    fn place(&mut self, compiled: CompiledTemplate, route: &Route) -> Result<(), Invalid> {
        let id = self.routes.len();
        let routes = &self.routes;
        let template = &route.template;
        let Some(shared) = self
            .by_template
            .iter_mut()
            .find(|t| t.template.path == compiled.path)
        else {
            self.by_template.push(TemplateRoutes {
                ids: vec![id],
                template: compiled,
                wants_params: false,
                read_route: None,
            });
            return Ok(());
        };
        let first = &routes[shared.ids[0]].name;
        if shared.template.trailing_slash != compiled.trailing_slash {
            return Err(Invalid(format!(
                "`{template}` and route `{first}` spell one path with and without a trailing slash; the origin answers one spelling (the other usually redirects), so write it the origin's way on every route"
            )));
        }
        if shared.template.types != compiled.types {
            return Err(Invalid(format!(
                "`{template}` types its parameters differently from route `{first}` on the same path; declare them the same way on every route"
            )));
        }
        if let Some(&other) = shared
            .ids
            .iter()
            .find(|&&other| overlap(&routes[other], route))
        {
            return Err(Invalid(format!(
                "duplicate route: `{template}` is already defined for {} by route `{}`; give the routes disjoint `methods` or remove one",
                describe_overlap(&routes[other], route),
                routes[other].name
            )));
        }
        shared.ids.push(id);
        Ok(())
    }

    /// The router, the routes, the warnings and every error: what each template's routes need
    /// at match time (the read route, whether to keep parameters) is settled here.
    fn finish(
        mut self,
    ) -> (
        matchit::Router<TemplateRoutes>,
        Vec<Route>,
        Vec<SpanError>,
        Vec<SpanError>,
    ) {
        let routes = &self.routes;
        for entry in &mut self.by_template {
            entry.read_route = entry
                .ids
                .iter()
                .copied()
                .find(|&id| routes[id].accepts(&Method::GET));
            entry.wants_params = entry.ids.iter().any(|&id| {
                let policy = &routes[id].policy;
                policy.cache.as_ref().is_some_and(|c| !c.tags.is_empty())
                    || policy.purge.expands_params()
            });
        }
        let warnings = slash_conventions(&self.by_template, routes, &self.spans);
        let mut router = matchit::Router::new();
        for entry in self.by_template {
            let template = entry.template.path.clone();
            let first = entry.ids[0];
            if let Err(e) = router.insert(template.as_str(), entry) {
                self.errors.push(SpanError::new(
                    self.spans[first].clone(),
                    format!(
                        "route template `{template}` cannot be used: {e}. Static segments may overlap parameters, but a `{{param}}` and a `{{*catch_all}}` (or two differently named parameters) cannot share a position"
                    ),
                ));
            }
        }
        (router, self.routes, warnings, self.errors)
    }
}

/// Every header the gateway sets from token claims on any route: removed from every incoming
/// request, so a client can never supply them itself.
fn gateway_headers<'a>(policies: impl Iterator<Item = &'a Policy>) -> Vec<HeaderName> {
    let mut headers: Vec<HeaderName> = Vec::new();
    for policy in policies {
        for (_, header) in &policy.auth.forward_claims {
            if !headers.contains(header) {
                headers.push(header.clone());
            }
        }
    }
    headers
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

/// Warnings for a template without a trailing slash under which others have one (`/books`
/// beside `/books/{id}/`): an origin that spells its paths with the slash (Django REST
/// Framework, FastAPI's collections) redirects `/books`, and a client that follows the redirect
/// comes back to the same route and loops.
fn slash_conventions(
    templates: &[TemplateRoutes],
    routes: &[Route],
    spans: &[std::ops::Range<usize>],
) -> Vec<SpanError> {
    let mut warnings = Vec::new();
    for bare in templates.iter().filter(|t| !t.template.trailing_slash) {
        let under = format!("{}/", bare.template.path);
        let slashed = templates
            .iter()
            .find(|t| t.template.trailing_slash && t.template.path.starts_with(&under));
        if let Some(slashed) = slashed {
            let first = bare.ids[0];
            let span = spans.get(first).cloned().unwrap_or_default();
            warnings.push(SpanError::new(
                span,
                format!(
                    "`{}` has no trailing slash but `{}` under it has one: if the origin spells this path `{}/`, it redirects `{}` and clients loop; write the template the way the origin spells it",
                    routes[first].template,
                    routes[slashed.ids[0]].template,
                    bare.template.path,
                    bare.template.path
                ),
            ));
        }
    }
    warnings
}

fn parse_method(text: &str) -> Result<Method, Invalid> {
    if text != text.to_ascii_uppercase() {
        return Err(Invalid(format!(
            "method `{text}` must be written in upper case: `{}`",
            text.to_ascii_uppercase()
        )));
    }
    Method::from_bytes(text.as_bytes())
        .map_err(|_| Invalid(format!("`{text}` is not a valid HTTP method name")))
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
            upgrades: None,
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
            PathRules::default(),
        )
        .unwrap();
        assert_eq!(
            table.resolve(&Method::GET, "/products/7").matched.id,
            Some(1)
        );
        assert_eq!(
            table.resolve(&Method::DELETE, "/products/7").matched.id,
            Some(2)
        );
        assert_eq!(table.resolve(&Method::POST, "/products/7").matched.id, None);
        assert_eq!(
            table.resolve(&Method::GET, "/products/special").matched.id,
            Some(3)
        );
        assert_eq!(
            table.resolve(&Method::GET, "/files/a/b").matched.id,
            Some(0)
        );
        assert_eq!(
            table.resolve(&Method::GET, "/files/readme").matched.id,
            Some(4)
        );
        assert_eq!(table.resolve(&Method::GET, "/other").matched.id, None);
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
            PathRules::default(),
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
    fn the_origin_receives_its_own_trailing_slash_spelling() {
        let table = RouteTable::compile(
            &[
                route("/items/", Some(&["GET", "POST"])),
                route("/items/{id:int}/", Some(&["GET"])),
                route("/plain/{id}", None),
            ],
            &PolicyConfig::default(),
            false,
            PathRules::default(),
        )
        .unwrap();
        let origin = |method: &Method, canonical: &str, sent_slash: bool| {
            table
                .resolve(method, canonical)
                .origin_path(canonical, sent_slash)
        };
        // One route and one key for both spellings; the origin gets the template's.
        assert_eq!(table.resolve(&Method::GET, "/items").matched.id, Some(0));
        assert_eq!(
            origin(&Method::GET, "/items", false).as_deref(),
            Some("/items/")
        );
        assert_eq!(
            origin(&Method::POST, "/items", true).as_deref(),
            Some("/items/")
        );
        assert_eq!(
            origin(&Method::GET, "/items/07", false).as_deref(),
            Some("/items/7/")
        );
        // Without a slash in the template, the canonical path as it is.
        assert_eq!(origin(&Method::GET, "/plain/a", true), None);
        // A method no route takes on a routed path still has the path's spelling.
        assert_eq!(
            origin(&Method::DELETE, "/items", false).as_deref(),
            Some("/items/")
        );
        // Unrouted paths keep the client's slash.
        assert_eq!(
            origin(&Method::GET, "/docs", true).as_deref(),
            Some("/docs/")
        );
        assert_eq!(origin(&Method::GET, "/docs", false), None);
        assert_eq!(origin(&Method::GET, "/", true), None);

        let errors = RouteTable::compile(
            &[
                route("/items/", Some(&["GET"])),
                route("/items", Some(&["POST"])),
            ],
            &PolicyConfig::default(),
            false,
            PathRules::default(),
        )
        .unwrap_err();
        assert!(errors[0].message.contains("trailing slash"), "{errors:?}");
    }

    #[test]
    fn typed_parameters_are_rewritten_to_their_canonical_form() {
        let table = RouteTable::compile(
            &[
                route("/products/{id:int}", Some(&["GET"])),
                route("/products/{id:int}", Some(&["PUT"])),
                route("/Files/{*rest}/", None),
            ],
            &PolicyConfig::default(),
            false,
            PathRules {
                case_insensitive: true,
                ..PathRules::default()
            },
        )
        .unwrap();
        let r = table.resolve(&Method::PUT, "/products/007");
        assert_eq!(r.matched.id, Some(1));
        assert_eq!(r.rewritten.as_deref(), Some("/products/7"));
        assert_eq!(
            table
                .resolve(&Method::GET, "/products/+7")
                .rewritten
                .as_deref(),
            Some("/products/7")
        );
        assert_eq!(table.resolve(&Method::GET, "/products/7").rewritten, None);
        assert_eq!(table.resolve(&Method::GET, "/products/abc").rewritten, None);
        let r = table.resolve(&Method::DELETE, "/products/7");
        assert_eq!(
            (r.matched.id, r.allowed),
            (None, vec![Method::GET, Method::PUT])
        );
        assert_eq!(
            table.resolve(&Method::GET, "/files/a/b").matched.id,
            Some(2),
            "templates are folded too"
        );
        assert_eq!(
            table.canonical_target("/Products/0012/").as_deref(),
            Some("/products/12")
        );

        let errors = RouteTable::compile(
            &[
                route("/a/{id:int}", Some(&["GET"])),
                route("/a/{id}", Some(&["PUT"])),
                route("/b/{x:uuid}", None),
            ],
            &PolicyConfig::default(),
            false,
            PathRules::default(),
        )
        .unwrap_err();
        assert!(
            errors[0]
                .message
                .contains("types its parameters differently"),
            "{errors:?}"
        );
        assert!(
            errors[1].message.contains("unknown parameter type `uuid`"),
            "{errors:?}"
        );
    }
}
