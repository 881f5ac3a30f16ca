//! Minting HS256 tokens for local use (`cachegate token`), so the quickstart can call protected
//! routes without an identity provider.

use crate::config::Invalid;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};

use crate::config::{AuthConfig, LoadedConfig};

/// What goes into a minted token.
#[derive(Debug, Default, Clone)]
pub struct TokenRequest {
    pub secret: Option<String>,
    pub subject: String,
    pub scope: Option<String>,
    pub ttl: Duration,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub kid: Option<String>,
    /// More claims (`user_id=1`, `token_type=access`), for origins that check their own shape.
    pub claims: Vec<(String, Value)>,
    /// Environment variables whose fallback supplied the configuration's secret.
    pub defaulted_secret: Vec<String>,
}

/// `name=value` from the command line: the value as JSON when it is a number, `true`, `false`
/// or quoted, else as a string (`user_id=1` is the number 1, `token_type=access` a string).
pub fn parse_claim(text: &str) -> Result<(String, Value), Invalid> {
    let (name, value) = text
        .split_once('=')
        .filter(|(name, _)| !name.is_empty())
        .ok_or_else(|| format!("--claim {text:?}: write it as NAME=VALUE, e.g. user_id=1"))?;
    let value = match serde_json::from_str::<Value>(value) {
        Ok(json @ (Value::Number(_) | Value::Bool(_) | Value::String(_))) => json,
        _ => Value::String(value.to_owned()),
    };
    Ok((name.to_owned(), value))
}

/// Why `cachegate token` could not mint a token.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("{config} has no [auth] table")]
    NoAuth { config: String },
    #[error("{config} has no provider with an HMAC `secret`")]
    NoHmacProvider { config: String },
    #[error("no secret: pass --secret or --config with an HMAC provider")]
    NoSecret,
    #[error("signing failed: {0}")]
    Signing(jsonwebtoken::errors::Error),
}

impl TokenRequest {
    /// Fills what the command line left out from a configuration's `[auth]`: the first HMAC
    /// provider's secret (and kid), the first issuer and the first audience.
    pub fn complete_from(&mut self, loaded: &LoadedConfig) -> Result<(), MintError> {
        let auth: &AuthConfig = loaded
            .config
            .auth
            .as_ref()
            .map(|a| a.get_ref())
            .ok_or_else(|| MintError::NoAuth {
                config: loaded.path.display().to_string(),
            })?;
        if self.secret.is_none() {
            let provider = auth
                .providers
                .get_ref()
                .iter()
                .find(|p| p.secret.is_some())
                .ok_or_else(|| MintError::NoHmacProvider {
                    config: loaded.path.display().to_string(),
                })?;
            self.secret = provider.secret.as_ref().map(|s| s.get_ref().value.clone());
            self.defaulted_secret = provider
                .secret
                .as_ref()
                .map(|s| s.get_ref().defaulted.clone())
                .unwrap_or_default();
            if self.kid.is_none() {
                self.kid = provider.kid.clone();
            }
        }
        if self.issuer.is_none() {
            self.issuer = auth
                .issuer
                .as_ref()
                .and_then(|i| i.to_vec().first().map(|s| s.value.clone()));
        }
        if self.audience.is_none() {
            self.audience = auth
                .audience
                .as_ref()
                .and_then(|a| a.to_vec().first().map(|s| s.value.clone()));
        }
        Ok(())
    }

    /// Signs the token with HS256.
    pub fn mint(&self) -> Result<String, MintError> {
        let secret = self.secret.as_deref().ok_or(MintError::NoSecret)?;
        let now = jsonwebtoken::get_current_timestamp();
        let mut claims = Map::new();
        claims.insert("sub".into(), json!(self.subject));
        claims.insert("iat".into(), json!(now));
        claims.insert("exp".into(), json!(now + self.ttl.as_secs()));
        if let Some(scope) = &self.scope {
            claims.insert("scope".into(), json!(scope));
        }
        if let Some(aud) = &self.audience {
            claims.insert("aud".into(), json!(aud));
        }
        if let Some(iss) = &self.issuer {
            claims.insert("iss".into(), json!(iss));
        }
        for (name, value) in &self.claims {
            claims.insert(name.clone(), value.clone());
        }
        let mut header = Header::new(Algorithm::HS256);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(
            &header,
            &Value::Object(claims),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .map_err(MintError::Signing)
    }
}
