//! JWT authentication: token extraction (`Authorization: Bearer`, optionally a cookie),
//! verification against pinned keys (HMAC secrets, PEM public keys, JWKS with rotation), claim
//! checks, per-route scopes, and the claims forwarded upstream as headers.
//!
//! A verified token is remembered by its SHA-256 until it expires (bounded), so an RS256 token
//! is verified once, not on every request. The header's `jku`, `x5u`, `jwk` and `x5c` fields are
//! never read: keys come from the configuration only.

mod jwks;
mod keys;
pub mod mint;
mod provider;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use http::header::{HeaderMap, HeaderName, AUTHORIZATION, COOKIE};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use moka::sync::Cache;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use toml::Spanned;

use self::keys::VerifyKey;
use self::provider::{KeySource, Provider};
use crate::config::{AuthConfig, AuthMode, AuthPolicyConfigOrMode, SpanError};

pub use self::jwks::JwksSource;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// A verified token is trusted again without re-verification for at most this long.
const MAX_REMEMBER: Duration = Duration::from_secs(300);

/// A route's authentication policy, compiled.
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    pub mode: AuthMode,
    pub scopes: Vec<String>,
    /// (claim, header) pairs forwarded upstream.
    pub forward_claims: Vec<(String, HeaderName)>,
    pub strip_authorization: bool,
}

impl Default for AuthPolicy {
    fn default() -> Self {
        AuthPolicy {
            mode: AuthMode::None,
            scopes: Vec::new(),
            forward_claims: Vec::new(),
            strip_authorization: false,
        }
    }
}

impl AuthPolicy {
    pub fn compile(
        config: &Spanned<AuthPolicyConfigOrMode>,
        auth_configured: bool,
    ) -> Result<AuthPolicy, Vec<SpanError>> {
        let policy = &config.get_ref().0;
        let span = config.span();
        let mut errors = Vec::new();
        if policy.mode != AuthMode::None && !auth_configured {
            errors.push(SpanError::new(
                span.clone(),
                "this policy checks tokens, but there is no [auth] table with providers to verify them",
            ));
        }
        let mut forward_claims = Vec::new();
        for (claim, header) in &policy.forward_claims {
            match HeaderName::from_bytes(header.as_bytes()) {
                Ok(name) => forward_claims.push((claim.clone(), name)),
                Err(_) => errors.push(SpanError::new(
                    span.clone(),
                    format!("forward_claims: {header:?} is not a valid header name"),
                )),
            }
        }
        if policy
            .scopes
            .iter()
            .any(|s| s.is_empty() || s.contains(' '))
        {
            errors.push(SpanError::new(
                span.clone(),
                "scopes must be non-empty and contain no spaces",
            ));
        }
        if errors.is_empty() {
            Ok(AuthPolicy {
                mode: policy.mode,
                scopes: policy.scopes.clone(),
                forward_claims,
                strip_authorization: policy.strip_authorization,
            })
        } else {
            Err(errors)
        }
    }
}

/// Sets the request headers a policy derives from a verified identity, and removes
/// `Authorization` when the policy says so. Call after removing every gateway-set header.
pub fn forward(policy: &AuthPolicy, identity: Option<&Identity>, headers: &mut http::HeaderMap) {
    if let Some(identity) = identity {
        for (claim, header) in &policy.forward_claims {
            let value = identity
                .claim_text(claim)
                .and_then(|v| http::HeaderValue::from_str(&v).ok());
            if let Some(value) = value {
                headers.insert(header.clone(), value);
            }
        }
    }
    if policy.strip_authorization {
        headers.remove(AUTHORIZATION);
    }
}

/// Who a verified token speaks for.
#[derive(Debug)]
pub struct Identity {
    pub subject: Option<String>,
    pub claims: Map<String, Value>,
    pub scopes: BTreeSet<String>,
}

impl Identity {
    /// A claim as a header value: strings as they are, lists joined by spaces, others as JSON.
    pub fn claim_text(&self, claim: &str) -> Option<String> {
        let value = match claim {
            // Forwarding "scope" means the granted scopes, whichever claim carried them.
            "scope" | "scopes" | "scp" if !self.scopes.is_empty() => {
                return Some(self.scopes.iter().cloned().collect::<Vec<_>>().join(" "))
            }
            _ => self.claims.get(claim)?,
        };
        Some(match value {
            Value::String(s) => s.clone(),
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(" "),
            other => other.to_string(),
        })
    }
}

/// The JWKS documents that have never loaded (see [`Authenticator::ready`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksNotLoaded {
    pub urls: Vec<String>,
}

impl std::fmt::Display for JwksNotLoaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, url) in self.urls.iter().enumerate() {
            let sep = if i > 0 { "; " } else { "" };
            write!(f, "{sep}JWKS {url} not loaded yet")?;
        }
        Ok(())
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Malformed(&'static str),
    Unsigned,
    AlgorithmNotAllowed(String),
    UnknownKeyId,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    MissingClaim(String),
    ClaimMismatch(String),
}

impl Reason {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Malformed(_) => "malformed",
            Reason::Unsigned => "unsigned",
            Reason::AlgorithmNotAllowed(_) => "algorithm_not_allowed",
            Reason::UnknownKeyId => "unknown_kid",
            Reason::BadSignature => "bad_signature",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::WrongIssuer => "wrong_issuer",
            Reason::WrongAudience => "wrong_audience",
            Reason::MissingClaim(_) => "missing_claim",
            Reason::ClaimMismatch(_) => "claim_mismatch",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Malformed(what) => write!(f, "the token is malformed: {what}"),
            Reason::Unsigned => f.write_str("unsigned tokens (alg none) are never accepted"),
            Reason::AlgorithmNotAllowed(alg) => {
                write!(f, "the token's algorithm {alg} is not accepted")
            }
            Reason::UnknownKeyId => f.write_str("the token was signed with an unknown key id"),
            Reason::BadSignature => f.write_str("the token's signature is invalid"),
            Reason::Expired => f.write_str("the token has expired"),
            Reason::NotYetValid => f.write_str("the token is not valid yet (nbf)"),
            Reason::WrongIssuer => {
                f.write_str("the token was issued by an issuer this gateway does not accept")
            }
            Reason::WrongAudience => f.write_str("the token is not meant for this audience"),
            Reason::MissingClaim(c) => write!(f, "the token lacks the required claim `{c}`"),
            Reason::ClaimMismatch(c) => write!(
                f,
                "the token's `{c}` claim does not have the required value"
            ),
        }
    }
}

/// The outcome of a refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// No token on a route that requires one.
    Missing,
    Invalid(Reason),
    /// A valid token without every required scope; lists the scopes the route needs.
    InsufficientScope(Vec<String>),
}

impl Rejection {
    pub fn status(&self) -> u16 {
        match self {
            Rejection::InsufficientScope(_) => 403,
            _ => 401,
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 §3).
    pub fn challenge(&self, realm: &str) -> String {
        match self {
            Rejection::Missing => format!("Bearer realm=\"{realm}\""),
            Rejection::Invalid(reason) => format!(
                "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{}\"",
                reason.to_string().replace('"', "'")
            ),
            Rejection::InsufficientScope(scopes) => format!(
                "Bearer realm=\"{realm}\", error=\"insufficient_scope\", scope=\"{}\"",
                scopes.join(" ")
            ),
        }
    }

    pub fn detail(&self) -> String {
        match self {
            Rejection::Missing => {
                "this route requires a bearer token in the Authorization header".to_owned()
            }
            Rejection::Invalid(reason) => reason.to_string(),
            Rejection::InsufficientScope(scopes) => {
                format!(
                    "the token lacks a scope this route requires: {}",
                    scopes.join(" ")
                )
            }
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Missing => "missing",
            Rejection::Invalid(reason) => reason.label(),
            Rejection::InsufficientScope(_) => "insufficient_scope",
        }
    }
}

/// Verifies tokens for every route; built once per configuration.
pub struct Authenticator {
    pub realm: String,
    cookie: Option<String>,
    providers: Vec<Provider>,
    issuers: Vec<String>,
    audiences: Vec<String>,
    require_exp: bool,
    leeway: u64,
    required_claims: Vec<(String, Value)>,
    verified: Cache<[u8; 32], Arc<Identity>>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "providers",
                &self.providers.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

struct RememberUntil;

impl moka::Expiry<[u8; 32], Arc<Identity>> for RememberUntil {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        identity: &Arc<Identity>,
        _: Instant,
    ) -> Option<Duration> {
        let now = jsonwebtoken::get_current_timestamp();
        let remaining = identity
            .claims
            .get("exp")
            .and_then(Value::as_u64)
            .map_or(MAX_REMEMBER, |exp| {
                Duration::from_secs(exp.saturating_sub(now))
            });
        Some(remaining.min(MAX_REMEMBER))
    }
}

fn toml_to_json(value: &toml::Value) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

impl Authenticator {
    pub fn compile(config: &AuthConfig) -> Result<Authenticator, Vec<SpanError>> {
        let mut errors = Vec::new();
        let mut providers = Vec::new();
        for (index, provider) in config.providers.get_ref().iter().enumerate() {
            match Provider::compile(index, provider) {
                Ok(p) => providers.push(p),
                Err(e) => errors.extend(e),
            }
        }
        if config.providers.get_ref().is_empty() {
            errors.push(SpanError::new(
                config.providers.span(),
                "[auth] needs at least one provider, e.g. [[auth.providers]] with algorithms and a secret, public_key_file or jwks_url",
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let strings =
            |v: &Option<crate::config::OneOrMany<crate::config::EnvString>>| -> Vec<String> {
                v.as_ref()
                    .map(|v| v.to_vec().into_iter().map(|s| s.value.clone()).collect())
                    .unwrap_or_default()
            };
        Ok(Authenticator {
            realm: config.realm.clone(),
            cookie: config.cookie.clone(),
            providers,
            issuers: strings(&config.issuer),
            audiences: strings(&config.audience),
            require_exp: config.require_exp,
            leeway: config.leeway.0.as_secs(),
            required_claims: config
                .required_claims
                .iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
            verified: Cache::builder()
                .max_capacity(config.token_cache_size)
                .expire_after(RememberUntil)
                .build(),
        })
    }

    /// Starts the background refresh of every JWKS provider on the current runtime.
    pub fn start_background_tasks(&self) {
        for provider in &self.providers {
            if let KeySource::Jwks(source) = &provider.source {
                tokio::spawn(JwksSource::run(Arc::downgrade(source)));
            }
        }
    }

    /// Reuses the key sets the previous configuration's JWKS providers already loaded.
    pub fn adopt_keys_from(&self, previous: &Authenticator) {
        for provider in &self.providers {
            let KeySource::Jwks(fresh) = &provider.source else {
                continue;
            };
            for old in &previous.providers {
                if let KeySource::Jwks(old) = &old.source {
                    if old.url() == fresh.url() {
                        fresh.adopt(old);
                    }
                }
            }
        }
    }

    /// Environment variables whose built-in fallback is serving as an HMAC secret.
    pub fn defaulted_secrets(&self) -> Vec<String> {
        self.providers
            .iter()
            .flat_map(|p| p.defaulted_secret.iter().cloned())
            .collect()
    }

    /// `Err` naming each JWKS that has never loaded.
    pub fn ready(&self) -> Result<(), JwksNotLoaded> {
        let urls: Vec<String> = self
            .providers
            .iter()
            .filter_map(|p| match &p.source {
                KeySource::Jwks(s) if !s.is_loaded() => Some(s.url().to_owned()),
                _ => None,
            })
            .collect();
        if urls.is_empty() {
            Ok(())
        } else {
            Err(JwksNotLoaded { urls })
        }
    }

    /// The bearer token of a request: `Authorization: Bearer ...`, else the configured cookie.
    pub fn token_from<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        if let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
            let (scheme, token) = value.trim().split_once(' ')?;
            return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim());
        }
        let name = self.cookie.as_deref()?;
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.trim())
    }

    /// Applies a route's policy: `Ok(None)` for an anonymous request that may pass,
    /// `Ok(Some(identity))` for a verified one, `Err` for one to refuse.
    pub async fn check(
        &self,
        policy: &AuthPolicy,
        headers: &HeaderMap,
    ) -> Result<Option<Arc<Identity>>, Rejection> {
        if policy.mode == AuthMode::None {
            return Ok(None);
        }
        let Some(token) = self.token_from(headers).filter(|t| !t.is_empty()) else {
            return match policy.mode {
                AuthMode::Required => Err(Rejection::Missing),
                _ => Ok(None),
            };
        };
        let identity = self.verify(token).await.map_err(Rejection::Invalid)?;
        let missing: Vec<String> = policy
            .scopes
            .iter()
            .filter(|s| !identity.scopes.contains(*s))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(Rejection::InsufficientScope(policy.scopes.clone()));
        }
        Ok(Some(identity))
    }

    /// Whether `token` was verified recently and is remembered (no signature check needed).
    pub fn is_remembered(&self, token: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.verified.contains_key(&digest)
    }

    /// Verifies a token, or answers from the cache of verified tokens.
    pub async fn verify(&self, token: &str) -> Result<Arc<Identity>, Reason> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Reason::Malformed("it is larger than 8 KiB"));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(identity) = self.verified.get(&digest) {
            // Cached entries expire with the token; `exp` is checked again to the second.
            let now = jsonwebtoken::get_current_timestamp();
            let expired = identity
                .claims
                .get("exp")
                .and_then(Value::as_u64)
                .is_some_and(|exp| exp + self.leeway < now);
            if !expired {
                return Ok(identity);
            }
            self.verified.invalidate(&digest);
        }
        let identity = Arc::new(self.verify_uncached(token).await?);
        self.verified.insert(digest, identity.clone());
        Ok(identity)
    }

    async fn verify_uncached(&self, token: &str) -> Result<Identity, Reason> {
        let (alg, kid) = read_header(token)?;
        let accepting: Vec<&Provider> = self
            .providers
            .iter()
            .filter(|p| p.algorithms.contains(&alg))
            .collect();
        if accepting.is_empty() {
            return Err(Reason::AlgorithmNotAllowed(format!("{alg:?}")));
        }

        let mut candidates = candidate_keys(&accepting, alg, kid.as_deref());
        if candidates.is_empty() && kid.is_some() {
            // A new kid may mean the identity provider rotated its keys.
            let mut refreshed = false;
            for provider in &accepting {
                if let KeySource::Jwks(source) = &provider.source {
                    refreshed |= source.refresh_for_unknown_kid().await;
                }
            }
            if refreshed {
                candidates = candidate_keys(&accepting, alg, kid.as_deref());
            }
        }
        if candidates.is_empty() {
            return Err(Reason::UnknownKeyId);
        }

        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.validate_exp = true;
        // A configured issuer or audience is a claim the token must carry, not one it may omit.
        let mut required = Vec::new();
        if self.require_exp {
            required.push("exp");
        }
        if !self.issuers.is_empty() {
            required.push("iss");
        }
        if !self.audiences.is_empty() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        if self.issuers.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&self.issuers);
        }
        // With no audience configured, `aud` stays validated against none: a token meant for
        // some audience is not meant for this gateway (RFC 7519 §4.1.3).
        if !self.audiences.is_empty() {
            validation.set_audience(&self.audiences);
        }

        let mut outcome = Err(Reason::BadSignature);
        for (key, provider) in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
                Ok(data) => {
                    outcome = Ok((data.claims, provider));
                    break;
                }
                Err(e) => {
                    let reason = reason_for(e.kind());
                    if reason != Reason::BadSignature {
                        // The signature was good (claims are checked after it): final answer.
                        outcome = Err(reason);
                        break;
                    }
                }
            }
        }
        let (claims, provider) = outcome?;

        for (name, expected) in &self.required_claims {
            match claims.get(name) {
                None => return Err(Reason::MissingClaim(name.clone())),
                Some(actual) if actual != expected => {
                    return Err(Reason::ClaimMismatch(name.clone()))
                }
                Some(_) => {}
            }
        }
        // simplejwt's `user_id` is a number; either way it names one user.
        let subject = match claims.get(&provider.user_claim) {
            Some(Value::String(name)) => Some(name.clone()),
            Some(Value::Number(number)) => Some(number.to_string()),
            _ => None,
        };
        Ok(Identity {
            subject,
            scopes: scopes_of(&claims),
            claims,
        })
    }
}

/// Keys of the accepting providers that may have signed a token with this `alg` and `kid`,
/// each with its provider.
fn candidate_keys<'p>(
    providers: &[&'p Provider],
    alg: Algorithm,
    kid: Option<&str>,
) -> Vec<(Arc<VerifyKey>, &'p Provider)> {
    let mut keys = Vec::new();
    for provider in providers {
        match &provider.source {
            KeySource::Static(key) => {
                let kid_ok = match (&provider.kid, kid) {
                    (Some(expected), Some(kid)) => expected == kid,
                    (Some(_), None) => false,
                    (None, _) => true,
                };
                if kid_ok && key.kind.verifies(alg) {
                    keys.push((key.clone(), *provider));
                }
            }
            KeySource::Jwks(source) => {
                for key in source.keys().iter() {
                    let kid_ok = match kid {
                        Some(kid) => key.kid.as_deref() == Some(kid),
                        None => true,
                    };
                    if kid_ok && key.kind.verifies(alg) && key.alg.is_none_or(|a| a == alg) {
                        keys.push((key.clone(), *provider));
                    }
                }
            }
        }
    }
    keys
}

/// A token header's `alg` and `kid`.
type TokenHeader = (Algorithm, Option<String>);

/// Reads `alg` and `kid` from the token's header, refusing anything that is not a compact JWS
/// with a known algorithm.
fn read_header(token: &str) -> Result<TokenHeader, Reason> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Reason::Malformed("a JWT has three dot-separated parts"));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| Reason::Malformed("the header is not base64url"))?;
    let header: Map<String, Value> = serde_json::from_slice(&bytes)
        .map_err(|_| Reason::Malformed("the header is not a JSON object"))?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(Reason::Malformed("the header has no alg"))?;
    if alg.eq_ignore_ascii_case("none") {
        return Err(Reason::Unsigned);
    }
    // RFC 7515 §4.1.11: a recipient must refuse a token whose `crit` names an extension it does
    // not understand; this gateway understands none.
    if header.contains_key("crit") {
        return Err(Reason::Malformed(
            "the header lists critical extensions (crit) this gateway does not understand",
        ));
    }
    let alg = alg
        .parse::<Algorithm>()
        .map_err(|_| Reason::AlgorithmNotAllowed(alg.chars().take(16).collect()))?;
    let kid = header.get("kid").and_then(Value::as_str).map(str::to_owned);
    Ok((alg, kid))
}

fn reason_for(kind: &ErrorKind) -> Reason {
    match kind {
        ErrorKind::ExpiredSignature => Reason::Expired,
        ErrorKind::ImmatureSignature => Reason::NotYetValid,
        ErrorKind::InvalidIssuer => Reason::WrongIssuer,
        ErrorKind::InvalidAudience => Reason::WrongAudience,
        // A configured issuer or audience the token does not name is the wrong one.
        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => Reason::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => Reason::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => Reason::MissingClaim(claim.clone()),
        ErrorKind::InvalidSignature => Reason::BadSignature,
        ErrorKind::InvalidAlgorithm => Reason::AlgorithmNotAllowed("for this key".to_owned()),
        ErrorKind::InvalidClaimFormat(_) => {
            Reason::Malformed("a registered claim has the wrong type")
        }
        ErrorKind::Base64(_) => Reason::Malformed("a part is not base64url"),
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            Reason::Malformed("the claims are not a JSON object")
        }
        _ => Reason::Malformed("it could not be decoded"),
    }
}

/// Granted scopes: `scope` (space-separated), `scp` (list or string), `scopes` (list).
fn scopes_of(claims: &Map<String, Value>) -> BTreeSet<String> {
    let mut scopes = BTreeSet::new();
    for name in ["scope", "scp", "scopes"] {
        match claims.get(name) {
            Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_owned)),
            Some(Value::Array(items)) => {
                scopes.extend(items.iter().filter_map(Value::as_str).map(str::to_owned))
            }
            _ => {}
        }
    }
    scopes
}

/// Whether `headers` carry `Authorization: Bearer <token>` (compared in constant time): the
/// operator token gate of the admin listener and of `PURGE`.
pub fn bears_token(headers: &http::HeaderMap, token: &str) -> bool {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes()))
}

/// Compares secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_tricks_are_refused_before_verification() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for alg in ["none", "None", "NONE", "nOnE"] {
            let token = format!("{}.{}.", b64(&format!(r#"{{"alg":"{alg}"}}"#)), b64("{}"));
            assert_eq!(read_header(&token), Err(Reason::Unsigned), "{alg}");
        }
        assert!(matches!(read_header("a.b"), Err(Reason::Malformed(_))));
        assert!(matches!(read_header("a.b.c.d"), Err(Reason::Malformed(_))));
        assert!(matches!(read_header("%%%.b.c"), Err(Reason::Malformed(_))));
        let weird = format!("{}.e30.sig", b64(r#"{"alg":"XX999"}"#));
        assert!(matches!(
            read_header(&weird),
            Err(Reason::AlgorithmNotAllowed(_))
        ));
    }

    fn hmac_authenticator() -> Authenticator {
        let source = r#"
[[listeners]]
address = "127.0.0.1:1"
[upstream]
addresses = ["http://127.0.0.1:1"]
[auth]
token_cache_size = 100
required_claims = { tenant = "acme", tier = 2 }
[[auth.providers]]
algorithms = ["HS256"]
secret = "unit-test-secret"
"#;
        let loaded =
            crate::config::LoadedConfig::from_source("unit.toml".as_ref(), source.into()).unwrap();
        Authenticator::compile(loaded.config.auth.as_ref().unwrap().get_ref()).unwrap()
    }

    #[tokio::test]
    async fn a_verified_token_is_remembered_until_it_expires() {
        let auth = hmac_authenticator();
        let now = jsonwebtoken::get_current_timestamp();
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "a", "exp": now + 60, "tenant": "acme", "tier": 2}),
            &jsonwebtoken::EncodingKey::from_secret(b"unit-test-secret"),
        )
        .unwrap();
        let first = auth.verify(&token).await.unwrap();
        let second = auth.verify(&token).await.unwrap();
        assert!(
            Arc::ptr_eq(&first, &second),
            "the second verification came from the cache"
        );

        let expired = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "a", "exp": now - 3600}),
            &jsonwebtoken::EncodingKey::from_secret(b"unit-test-secret"),
        )
        .unwrap();
        assert_eq!(auth.verify(&expired).await.unwrap_err(), Reason::Expired);
        assert_eq!(
            auth.verify(&expired).await.unwrap_err(),
            Reason::Expired,
            "failures are not cached as successes"
        );
    }

    #[tokio::test]
    async fn required_claims_must_be_present_with_their_values() {
        let auth = hmac_authenticator();
        let now = jsonwebtoken::get_current_timestamp();
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(b"unit-test-secret"),
            )
            .unwrap()
        };
        let wrong = sign(serde_json::json!({"exp": now + 60, "tenant": "globex", "tier": 2}));
        assert_eq!(
            auth.verify(&wrong).await.unwrap_err(),
            Reason::ClaimMismatch("tenant".into())
        );
        let missing = sign(serde_json::json!({"exp": now + 60, "tenant": "acme"}));
        assert_eq!(
            auth.verify(&missing).await.unwrap_err(),
            Reason::MissingClaim("tier".into())
        );
        let typed = sign(serde_json::json!({"exp": now + 60, "tenant": "acme", "tier": "2"}));
        assert_eq!(
            auth.verify(&typed).await.unwrap_err(),
            Reason::ClaimMismatch("tier".into()),
            "2 is not \"2\""
        );
    }

    #[test]
    fn scopes_come_from_any_of_the_usual_claims() {
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"scope":"a b","scp":["c"],"scopes":"d"}"#).unwrap();
        let scopes: Vec<_> = scopes_of(&claims).into_iter().collect();
        assert_eq!(scopes, ["a", "b", "c", "d"]);
    }

    #[test]
    fn challenges_follow_rfc_6750() {
        assert_eq!(Rejection::Missing.challenge("api"), "Bearer realm=\"api\"");
        let expired = Rejection::Invalid(Reason::Expired).challenge("api");
        assert_eq!(
            expired,
            "Bearer realm=\"api\", error=\"invalid_token\", error_description=\"the token has expired\""
        );
        let scope = Rejection::InsufficientScope(vec!["products:write".into()]);
        assert_eq!(scope.status(), 403);
        assert!(scope
            .challenge("api")
            .contains("error=\"insufficient_scope\", scope=\"products:write\""));
    }
}
