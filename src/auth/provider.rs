//! Key providers: where a token's verification keys come from (a secret, a PEM file, a JWKS URL
//! or an OpenID issuer), each pinned to a list of algorithms so a token can never choose how it
//! is verified (no `alg: none`).

use crate::config::Invalid;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey};

use super::jwks::JwksSource;
use super::keys::{KeyKind, VerifyKey};
use crate::config::{ProviderConfig, SpanError};

pub enum KeySource {
    /// A secret or a PEM key from the configuration.
    Static(Arc<VerifyKey>),
    Jwks(Arc<JwksSource>),
}

pub struct Provider {
    pub name: String,
    pub algorithms: Vec<Algorithm>,
    /// With a static key: only tokens with this `kid` (or none) use it.
    pub kid: Option<String>,
    pub source: KeySource,
    /// Environment variables whose fallback supplied the secret (to warn about).
    pub defaulted_secret: Vec<String>,
    /// The claim naming the user of the tokens this provider verifies (`sub` by default).
    pub user_claim: String,
}

fn parse_algorithm(name: &str) -> Result<Algorithm, Invalid> {
    if name.eq_ignore_ascii_case("none") {
        return Err(Invalid::new(
            "`none` is never accepted: unsigned tokens prove nothing",
        ));
    }
    name.parse::<Algorithm>().map_err(|_| {
        Invalid(format!("unknown algorithm {name:?}: use HS256/384/512, RS256/384/512, PS256/384/512, ES256, ES384 or EdDSA"))
    })
}

impl Provider {
    pub fn compile(index: usize, config: &ProviderConfig) -> Result<Provider, Vec<SpanError>> {
        let mut errors = Vec::new();
        let mut algorithms = Vec::new();
        for name in config.algorithms.get_ref() {
            match parse_algorithm(name.get_ref()) {
                Ok(alg) => algorithms.push(alg),
                Err(message) => errors.push(SpanError::new(name.span(), message)),
            }
        }
        if config.algorithms.get_ref().is_empty() {
            errors.push(SpanError::new(
                config.algorithms.span(),
                "pin at least one algorithm, e.g. algorithms = [\"RS256\"]",
            ));
        }

        let sources = [
            config.secret.as_ref().map(|s| ("secret", s.span())),
            config
                .public_key_file
                .as_ref()
                .map(|s| ("public_key_file", s.span())),
            config.jwks_url.as_ref().map(|s| ("jwks_url", s.span())),
            config
                .oidc_issuer
                .as_ref()
                .map(|s| ("oidc_issuer", s.span())),
        ];
        let given: Vec<_> = sources.iter().flatten().collect();
        if given.len() != 1 {
            let span = given
                .get(1)
                .map_or(config.algorithms.span(), |(_, s)| s.clone());
            errors.push(SpanError::new(
                span,
                "a provider needs exactly one of `secret`, `public_key_file`, `jwks_url` or `oidc_issuer`",
            ));
            return Err(errors);
        }
        let (source_key, source_span) = given[0].clone();

        let mut defaulted_secret = Vec::new();
        let (source, kind) = match source_key {
            "secret" => {
                let secret = config.secret.as_ref().expect("checked above").get_ref();
                defaulted_secret = secret.defaulted.clone();
                if secret.value.is_empty() {
                    errors.push(SpanError::new(
                        source_span.clone(),
                        "the HMAC secret is empty",
                    ));
                }
                let key = VerifyKey {
                    kid: config.kid.clone(),
                    kind: KeyKind::Hmac,
                    alg: None,
                    key: DecodingKey::from_secret(secret.value.as_bytes()),
                };
                (KeySource::Static(Arc::new(key)), Some(KeyKind::Hmac))
            }
            "public_key_file" => {
                let path = config
                    .public_key_file
                    .as_ref()
                    .expect("checked above")
                    .get_ref()
                    .as_str();
                match load_public_key(path) {
                    Ok((key, kind)) => (
                        KeySource::Static(Arc::new(VerifyKey {
                            kid: config.kid.clone(),
                            kind,
                            alg: None,
                            key,
                        })),
                        Some(kind),
                    ),
                    Err(error) => {
                        errors.push(SpanError::new(source_span.clone(), error.to_string()));
                        return Err(errors);
                    }
                }
            }
            _ => {
                let (url, discover) = match (&config.jwks_url, &config.oidc_issuer) {
                    (Some(url), _) => (url.get_ref().as_str().to_owned(), false),
                    (None, Some(issuer)) => (issuer.get_ref().as_str().to_owned(), true),
                    _ => unreachable!("one source is given"),
                };
                let ca_file = config.tls_ca_file.as_ref().map(|f| f.get_ref().as_str());
                match JwksSource::new(
                    &url,
                    discover,
                    ca_file,
                    config.refresh_interval.0,
                    config.min_refresh_interval.0,
                ) {
                    Ok(source) => (KeySource::Jwks(Arc::new(source)), None),
                    Err(message) => {
                        errors.push(SpanError::new(source_span.clone(), message.to_string()));
                        return Err(errors);
                    }
                }
            }
        };

        // Pin algorithms to what the key material can verify.
        for (alg, name) in algorithms.iter().zip(config.algorithms.get_ref()) {
            let compatible = match kind {
                Some(kind) => kind.verifies(*alg),
                // A JWKS holds public keys only: no HMAC.
                None => !KeyKind::Hmac.verifies(*alg),
            };
            if !compatible {
                let what = kind.map_or("a JWKS (public keys only)", KeyKind::describe);
                errors.push(SpanError::new(
                    name.span(),
                    format!(
                        "{} cannot be verified with {what}; pin algorithms that match the key",
                        name.get_ref()
                    ),
                ));
            }
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Provider {
            name: config
                .name
                .clone()
                .unwrap_or_else(|| format!("{source_key} provider #{}", index + 1)),
            algorithms,
            kid: config.kid.clone(),
            source,
            defaulted_secret,
            user_claim: config
                .user_claim
                .clone()
                .unwrap_or_else(|| "sub".to_owned()),
        })
    }
}

/// Loads a PEM public key, telling RSA, EC and Ed25519 apart.
fn load_public_key(path: &str) -> Result<(DecodingKey, KeyKind), Invalid> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, KeyKind::Rsa));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((key, KeyKind::Ec));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((key, KeyKind::Ed25519));
    }
    Err(Invalid(format!(
        "{path:?} holds no RSA, EC or Ed25519 public key in PEM form (-----BEGIN PUBLIC KEY-----)"
    )))
}
