//! Verification keys. Every key is bound to one algorithm family (HMAC, RSA, EC, Ed25519), so a
//! token can never choose how it is verified (no HMAC-with-a-public-key); the providers they come
//! from are in [`super::provider`].

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};

/// The kind of key material, which decides the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Hmac,
    Rsa,
    Ec,
    Ed25519,
}

impl KeyKind {
    /// "an RSA public key", for messages.
    pub fn describe(self) -> &'static str {
        match self {
            KeyKind::Hmac => "an HMAC secret",
            KeyKind::Rsa => "an RSA public key",
            KeyKind::Ec => "an EC public key",
            KeyKind::Ed25519 => "an Ed25519 public key",
        }
    }

    pub fn verifies(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Hmac => matches!(alg, HS256 | HS384 | HS512),
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::Ec => matches!(alg, ES256 | ES384),
            KeyKind::Ed25519 => matches!(alg, EdDSA),
        }
    }
}

pub struct VerifyKey {
    pub kid: Option<String>,
    pub kind: KeyKind,
    /// An algorithm the key's publisher bound it to (JWK `alg`), if any.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .finish()
    }
}

impl VerifyKey {
    /// A key from a JWKS entry; `None` for kinds this gateway does not verify with (symmetric
    /// `oct` keys are refused: a JWKS is public).
    pub fn from_jwk(jwk: &Jwk) -> Option<VerifyKey> {
        let kind = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyKind::Rsa,
            AlgorithmParameters::EllipticCurve(_) => KeyKind::Ec,
            AlgorithmParameters::OctetKeyPair(_) => KeyKind::Ed25519,
            // Symmetric keys, and kinds added to the JWK format later.
            _ => return None,
        };
        let key = DecodingKey::from_jwk(jwk).ok()?;
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok());
        Some(VerifyKey {
            kid: jwk.common.key_id.clone(),
            kind,
            alg,
            key,
        })
    }
}
