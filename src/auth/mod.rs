//! JWT authentication: token extraction (`Authorization: Bearer`, optionally a cookie),
//! verification against pinned keys (HMAC secrets, PEM public keys, JWKS with rotation), claim
//! checks, per-route scopes, and the claims forwarded upstream as headers.
//!
//! A verified token is remembered by its SHA-256 until it expires (bounded), so an RS256 token
//! is verified once, not on every request. The header's `jku`, `x5u`, `jwk` and `x5c` fields are
//! never read: keys come from the configuration only.
//!
//! This file is the facade, [`Authenticator`]: compiled once per configuration, it applies a
//! route's policy to a request ([`Authenticator::check`]). The rest:
//! - `policy`: a route's compiled [`AuthPolicy`];
//! - `token`: where a request's token is, and the operator token gate ([`bears_token`]);
//! - `verify`: header, keys, signature, claims, and the cache of verified tokens;
//! - `identity`: the verified [`Identity`] and the claims forwarded as headers;
//! - `rejection`: why credentials were refused, and what the client is told;
//! - `provider`, `keys`, `jwks`: where verification keys come from; `mint`: `cachegate token`.

mod identity;
mod jwks;
mod keys;
pub mod mint;
mod policy;
mod provider;
mod rejection;
mod token;
mod verify;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderMap;
use moka::sync::Cache;
use serde_json::Value;

use self::provider::{KeySource, Provider};
use crate::config::{AuthConfig, AuthMode, SpanError};

pub use self::identity::{forward, Identity};
pub use self::jwks::JwksSource;
pub use self::policy::AuthPolicy;
pub use self::rejection::{Reason, Rejection};
pub use self::token::bears_token;
use self::verify::RememberUntil;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// A verified token is trusted again without re-verification for at most this long.
const MAX_REMEMBER: Duration = Duration::from_secs(300);

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::Algorithm;

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
}
