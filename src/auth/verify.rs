//! Verification: the token's header read strictly (`alg` pinned, `kid`), the candidate keys of
//! the providers that accept the algorithm, signature and claim checks, and the cache that
//! remembers a verified token by its SHA-256 until it expires.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::keys::VerifyKey;
use super::provider::{KeySource, Provider};
use super::{Authenticator, Identity, Reason, MAX_REMEMBER, MAX_TOKEN_BYTES};

pub(super) struct RememberUntil;

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

impl Authenticator {
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

    #[test]
    fn scopes_come_from_any_of_the_usual_claims() {
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"scope":"a b","scp":["c"],"scopes":"d"}"#).unwrap();
        let scopes: Vec<_> = scopes_of(&claims).into_iter().collect();
        assert_eq!(scopes, ["a", "b", "c", "d"]);
    }
}
