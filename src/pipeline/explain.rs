//! `cachegate explain`: what the gateway would do with one request, without sending it.
//!
//! It runs the pipeline's own steps on the request — framing and size checks, the canonical
//! path, routing, sanitising, the token check — and then asks each later concern what it
//! *would* do: the rate limiter for each limit's key, the cache for its admission decision and
//! key ([`Cache::admit`], the first thing every lookup does), the purge rule for the keys a
//! successful write purges. Nothing is counted, stored, purged or forwarded; the only traffic is
//! a JWKS fetch when a token has to be verified against a provider's key set.

use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Uri};
use http_body_util::BodyExt;
use serde::Serialize;

use super::context::{Connection, RequestCtx};
use super::Gateway;
use crate::auth::AuthPolicy;
use crate::cache::Cache;
use crate::config::{AuthMode, CacheScope};
use crate::purge;
use crate::ratelimit::{Limiter, RequestFacts};
use crate::snapshot::Snapshot;

/// The request to explain.
#[derive(Debug, Clone)]
pub struct Question {
    pub method: Method,
    /// Absolute (`http://api.example/products/1`) or origin-form (`/products/1`).
    pub url: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The client's address, for IP-keyed limits and trusted-proxy decisions.
    pub client_ip: IpAddr,
}

/// What the gateway would do, step by step. Later steps are absent once one refuses.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub method: String,
    pub target: String,
    /// The path every later step (and the origin) sees, once the request passed the checks.
    pub canonical_path: Option<String>,
    /// The matched route's name and template; `None`: no route, the `[defaults]` apply.
    pub route: Option<RouteReport>,
    pub auth: Option<AuthReport>,
    pub rate_limits: Vec<LimitReport>,
    pub cache: Option<CacheReport>,
    /// For writes: what a triggering answer purges.
    pub purge: Option<PurgeReport>,
    /// The gateway would answer itself, at this step.
    pub refused: Option<Refusal>,
    /// The request line the origin would receive.
    pub upstream_request: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RouteReport {
    pub name: String,
    pub template: String,
}

#[derive(Debug, Serialize)]
pub struct AuthReport {
    /// `none`, `optional` or `required`.
    pub mode: &'static str,
    pub scopes: Vec<String>,
    /// Present when the request carries a token (or needs one).
    pub token: Option<TokenReport>,
}

#[derive(Debug, Serialize)]
pub struct TokenReport {
    pub valid: bool,
    pub subject: Option<String>,
    /// Headers set from the token's claims for the origin.
    pub forwarded: Vec<(String, String)>,
    /// Why the token was refused.
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LimitReport {
    pub name: String,
    /// Requests per period, e.g. `600/1m`.
    pub rate: String,
    pub burst: u32,
    /// The counter this request is counted in.
    pub key: String,
}

#[derive(Debug, Serialize)]
pub struct CacheReport {
    /// Fallback freshness, e.g. `30s`; `None`: only what the origin declares.
    pub ttl: Option<String>,
    pub scope: &'static str,
    pub vary: Vec<String>,
    /// The cache key material (in-process tier) of the primary entry.
    pub key: Option<String>,
    /// The entry's key in the shared tier (Redis), when the store is shared.
    pub shared_key: Option<String>,
    /// Why this request is neither answered from nor stored in the cache.
    pub bypass: Option<&'static str>,
    /// When the key applies only to some entries: which (credentials or a cookie on a shared
    /// rule).
    pub only: Option<&'static str>,
    pub tags: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PurgeReport {
    /// Purge keys: `path:/products/1`, `tag:product:1`, ...
    pub keys: Vec<String>,
    /// When they are purged.
    pub on: String,
}

#[derive(Debug, Serialize)]
pub struct Refusal {
    pub step: &'static str,
    pub status: u16,
    pub detail: String,
}

/// The URL to explain is not a request target.
#[derive(Debug)]
pub struct BadTarget {
    pub url: String,
    pub error: http::uri::InvalidUri,
}

impl std::fmt::Display for BadTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} is not a request target ({}); give a URL such as http://localhost:8080/products/1 or a path such as /products/1",
            self.url, self.error
        )
    }
}

impl std::error::Error for BadTarget {}

/// Explains `question` under `snapshot`, whose `[rate_limit]` settings are in `limiter`.
pub async fn explain(
    snapshot: Arc<Snapshot>,
    limiter: &Limiter,
    question: Question,
) -> Result<Explanation, BadTarget> {
    let uri: Uri = question.url.parse().map_err(|error| BadTarget {
        url: question.url.clone(),
        error,
    })?;
    let mut request = Request::new(());
    *request.method_mut() = question.method.clone();
    *request.uri_mut() = uri;
    for (name, value) in question.headers {
        request.headers_mut().append(name, value);
    }
    let (mut head, ()) = request.into_parts();
    let connection = Connection {
        peer: SocketAddr::new(question.client_ip, 0),
        tls: head.uri.scheme_str() == Some("https"),
    };
    let trace = crate::trace::TraceContext::from_headers(&head.headers);
    let mut ctx = RequestCtx::new(snapshot.clone(), "explain".to_owned(), connection, trace);
    let mut report = Explanation {
        method: head.method.to_string(),
        target: question.url,
        canonical_path: None,
        route: None,
        auth: None,
        rate_limits: Vec::new(),
        cache: None,
        purge: None,
        refused: None,
        upstream_request: None,
    };

    if let ControlFlow::Break(answer) = Gateway::before_route(&mut head, &mut ctx) {
        report.refused = Some(refusal("request", answer).await);
        return Ok(report);
    }
    report.canonical_path = Some(head.uri.path().to_owned());
    if let ControlFlow::Break(answer) = Gateway::route(&mut head, &mut ctx) {
        report.refused = Some(refusal("route", answer).await);
        return Ok(report);
    }
    report.canonical_path = Some(head.uri.path().to_owned());
    report.route = ctx.route.id.map(|id| {
        let route = snapshot.routes.route(id);
        RouteReport {
            name: route.name.clone(),
            template: route.template.clone(),
        }
    });
    Gateway::identify_and_sanitize(&mut head, &mut ctx);
    let policy = snapshot.routes.policy(ctx.route.id);

    let (auth, refused) = explain_auth(&snapshot, &policy.auth, &mut head, &mut ctx).await;
    report.auth = Some(auth);
    if refused.is_some() {
        report.refused = refused;
        return Ok(report);
    }

    if let Some(limits) = &policy.rate_limit {
        let facts = RequestFacts {
            client_ip: ctx.client_ip,
            subject: ctx.identity.as_ref().and_then(|i| i.subject.as_deref()),
            headers: &head.headers,
        };
        report.rate_limits = limiter
            .keys(limits, &facts)
            .into_iter()
            .map(|(limit, key)| LimitReport {
                name: limit.name.clone(),
                rate: format!(
                    "{}/{}",
                    limit.count,
                    humantime::format_duration(limit.period)
                ),
                burst: limit.burst,
                key,
            })
            .collect();
    }

    if let Some(rule) = &policy.cache {
        if !rule.tags.is_empty() {
            ctx.cache_tags = rule
                .tags
                .iter()
                .map(|t| t.expand(&ctx.route.params))
                .collect();
        }
        let request = ctx.cache_request(&head);
        let admitted = Cache::admit(rule, &request);
        let bounds = Cache::bounds(rule, &request);
        let only = match (bounds.authorized, bounds.cookie) {
            (true, _) => Some(
                "the request carries credentials: answered and stored only when the origin marks the answer public, s-maxage or must-revalidate (RFC 9111 §3.5)",
            ),
            (false, true) => Some(
                "the request carries a cookie: answered and stored only when the origin marks the answer public or s-maxage",
            ),
            (false, false) => None,
        };
        let (key, shared_key, bypass) = match admitted {
            Ok(primary) => {
                let variant = primary.variant(&rule.vary, &head.headers);
                (
                    Some(variant.local().to_owned()),
                    Some(crate::cache::shared_entry_key(&variant)),
                    None,
                )
            }
            Err(reason) => (None, None, Some(reason)),
        };
        report.cache = Some(CacheReport {
            ttl: rule
                .rule
                .ttl
                .map(|t| humantime::format_duration(t).to_string()),
            scope: match rule.scope {
                CacheScope::Shared => "shared",
                CacheScope::User => "user",
            },
            vary: rule.vary.iter().map(|h| h.as_str().to_owned()).collect(),
            key,
            shared_key,
            only: only.filter(|_| bypass.is_none()),
            bypass: bypass.map(crate::cache::Bypass::as_str),
            tags: std::mem::take(&mut ctx.cache_tags),
        });
    }

    if purge::is_write(&head.method) {
        let mut keys = policy.purge.keys_for(head.uri.path(), &ctx.route.params);
        keys.sort_unstable();
        keys.dedup();
        report.purge = Some(PurgeReport {
            keys,
            on: policy.purge.trigger_description(),
        });
    }

    let origin_uri = ctx.origin_uri(&head.uri);
    report.upstream_request = Some(format!(
        "{} {}",
        head.method,
        origin_uri
            .path_and_query()
            .map_or_else(|| origin_uri.path(), |p| p.as_str())
    ));
    Ok(report)
}

/// The auth step, run dry (no throttling, nothing counted) and reported: the route's mode and
/// scopes, and the token's fate when there is one.
async fn explain_auth(
    snapshot: &Snapshot,
    policy: &AuthPolicy,
    head: &mut Parts,
    ctx: &mut RequestCtx,
) -> (AuthReport, Option<Refusal>) {
    let mut report = AuthReport {
        mode: match policy.mode {
            AuthMode::None => "none",
            AuthMode::Optional => "optional",
            AuthMode::Required => "required",
        },
        scopes: policy.scopes.clone(),
        token: None,
    };
    let presented = snapshot
        .auth
        .as_ref()
        .is_some_and(|a| policy.mode != AuthMode::None && a.token_from(&head.headers).is_some());
    let before = head.headers.clone();
    if let ControlFlow::Break(answer) = Gateway::check_credentials(None, head, ctx).await {
        let refused = refusal("auth", answer).await;
        report.token = presented.then(|| TokenReport {
            valid: false,
            subject: None,
            forwarded: Vec::new(),
            error: Some(refused.detail.clone()),
        });
        return (report, Some(refused));
    }
    if let Some(identity) = &ctx.identity {
        let forwarded = policy
            .forward_claims
            .iter()
            .filter_map(|(_, name)| {
                let value = head.headers.get(name)?;
                (before.get(name) != Some(value)).then(|| {
                    (
                        name.as_str().to_owned(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
            })
            .collect();
        report.token = Some(TokenReport {
            valid: true,
            subject: identity.subject.clone(),
            forwarded,
            error: None,
        });
    }
    (report, None)
}

/// The status and problem detail of a response a step would have sent.
async fn refusal(step: &'static str, answer: http::Response<super::body::Body>) -> Refusal {
    let status = answer.status().as_u16();
    let body = answer
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let detail = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("detail")?.as_str().map(str::to_owned))
        .unwrap_or_default();
    Refusal {
        step,
        status,
        detail,
    }
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} {}", self.method, self.target)?;
        if let Some(path) = &self.canonical_path {
            writeln!(f, "  canonical path  {path}")?;
        }
        if self.canonical_path.is_some() && self.refused.as_ref().is_none_or(|r| r.step != "route")
        {
            match &self.route {
                Some(route) => {
                    writeln!(f, "  route           {} ({})", route.name, route.template)?
                }
                None => writeln!(f, "  route           no route: [defaults]")?,
            }
        }
        if let Some(auth) = &self.auth {
            write!(f, "  auth            {}", auth.mode)?;
            if !auth.scopes.is_empty() {
                write!(f, ", scopes: {}", auth.scopes.join(" "))?;
            }
            writeln!(f)?;
            if let Some(token) = &auth.token {
                if token.valid {
                    writeln!(
                        f,
                        "    token         verifies; subject {}",
                        token.subject.as_deref().unwrap_or("(none)")
                    )?;
                    for (name, value) in &token.forwarded {
                        writeln!(f, "    forwards      {name}: {value}")?;
                    }
                } else {
                    writeln!(
                        f,
                        "    token         refused: {}",
                        token.error.as_deref().unwrap_or("")
                    )?;
                }
            }
        }
        for limit in &self.rate_limits {
            writeln!(
                f,
                "  rate limit      {} ({}, burst {})\n    key           {}",
                limit.name, limit.rate, limit.burst, limit.key
            )?;
        }
        if let Some(cache) = &self.cache {
            write!(
                f,
                "  cache           ttl {}, scope {}",
                cache.ttl.as_deref().unwrap_or("from the origin"),
                cache.scope
            )?;
            if !cache.vary.is_empty() {
                write!(f, ", vary {}", cache.vary.join(", "))?;
            }
            writeln!(f)?;
            match cache.bypass {
                Some(reason) => writeln!(f, "    bypass        {reason}")?,
                None => {
                    if let Some(key) = &cache.key {
                        writeln!(f, "    key           {}", key.escape_debug())?;
                    }
                    if let Some(key) = &cache.shared_key {
                        writeln!(f, "    shared key    {key}")?;
                    }
                    if let Some(only) = cache.only {
                        writeln!(f, "    only          {only}")?;
                    }
                }
            }
            if !cache.tags.is_empty() {
                writeln!(f, "    tags          {}", cache.tags.join(", "))?;
            }
        } else if self.auth.is_some() && self.refused.is_none() {
            writeln!(f, "  cache           no rule: forwarded")?;
        }
        if let Some(purge) = &self.purge {
            writeln!(
                f,
                "  purges          {} ({})",
                purge.keys.join(", "),
                purge.on
            )?;
        }
        if let Some(refused) = &self.refused {
            writeln!(
                f,
                "  refused         {} at the {} step: {}",
                refused.status, refused.step, refused.detail
            )?;
        }
        if let Some(line) = &self.upstream_request {
            writeln!(f, "  upstream        {line}")?;
        }
        Ok(())
    }
}
