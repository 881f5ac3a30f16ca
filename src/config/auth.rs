//! Schema of the `[auth]` table (token verification) and of the per-route `auth` policy.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, value::MapAccessDeserializer, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::{Dur, EnvString};

/// How tokens are verified, for every route that asks for authentication.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `realm` of the `WWW-Authenticate` challenge.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Accepted `iss` values; unset: any issuer.
    pub issuer: Option<OneOrMany<EnvString>>,
    /// Accepted `aud` values (the token must name one); unset: tokens carrying `aud` are refused.
    pub audience: Option<OneOrMany<EnvString>>,
    /// Refuse tokens without `exp`.
    #[serde(default = "super::default_true")]
    pub require_exp: bool,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway: Dur,
    /// Claims that must be present with exactly these values, e.g. `{ tenant = "acme" }`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub required_claims: BTreeMap<String, toml::Value>,
    /// Also read the token from this cookie when there is no `Authorization: Bearer` header.
    pub cookie: Option<String>,
    /// Verified tokens remembered (by hash, until they expire) so a signature is checked once.
    #[serde(default = "default_token_cache_size")]
    pub token_cache_size: u64,
    /// Where keys come from. Each provider pins the algorithms its keys may verify.
    #[schemars(with = "Vec<ProviderConfig>")]
    pub providers: Spanned<Vec<ProviderConfig>>,
}

fn default_realm() -> String {
    "cachegate".to_owned()
}
fn default_leeway() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}
fn default_token_cache_size() -> u64 {
    10_000
}

/// One source of verification keys: exactly one of `secret`, `public_key_file`, `jwks_url` and
/// `oidc_issuer`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name for logs. Default: the kind of provider and its position.
    pub name: Option<String>,
    /// Algorithms this provider's keys may verify, e.g. `["HS256"]`, `["RS256", "ES256"]`.
    #[schemars(with = "Vec<String>")]
    pub algorithms: Spanned<Vec<Spanned<String>>>,
    /// HMAC secret (HS256/384/512); use `${ENV}` to keep it out of the file.
    #[schemars(with = "Option<EnvString>")]
    pub secret: Option<Spanned<EnvString>>,
    /// PEM public key: RSA (RS*/PS*), EC P-256/P-384 (ES256/ES384) or Ed25519 (EdDSA).
    #[schemars(with = "Option<EnvString>")]
    pub public_key_file: Option<Spanned<EnvString>>,
    /// JWKS document URL (RFC 7517), `https://` or `http://`.
    #[schemars(with = "Option<EnvString>")]
    pub jwks_url: Option<Spanned<EnvString>>,
    /// OpenID issuer whose `/.well-known/openid-configuration` names the JWKS URL.
    #[schemars(with = "Option<EnvString>")]
    pub oidc_issuer: Option<Spanned<EnvString>>,
    /// Only tokens whose header `kid` equals this use this provider's static key.
    pub kid: Option<String>,
    /// How often a JWKS is fetched again.
    #[serde(default = "default_refresh")]
    pub refresh_interval: Dur,
    /// Least time between two fetches triggered by unknown `kid`s.
    #[serde(default = "default_min_refresh")]
    pub min_refresh_interval: Dur,
    /// PEM CA certificates trusted for an `https://` JWKS instead of the system roots.
    #[schemars(with = "Option<EnvString>")]
    pub tls_ca_file: Option<Spanned<EnvString>>,
    /// The claim that names the user (per-user cache entries, rate limits by user). Default
    /// `sub`; Django REST Framework's simplejwt uses `user_id`. A string or an integer.
    pub user_claim: Option<String>,
}

fn default_refresh() -> Dur {
    Dur(std::time::Duration::from_secs(300))
}
fn default_min_refresh() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}

/// A value written either alone or as a list.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<&T> {
        match self {
            OneOrMany::One(v) => vec![v],
            OneOrMany::Many(v) => v.iter().collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No token needed; none is checked.
    None,
    /// A token is checked when present; requests without one pass anonymously.
    Optional,
    /// A valid token is needed.
    Required,
}

/// A route's `auth`: `"required"`, or a table with the mode and more.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthPolicyConfig {
    pub mode: AuthMode,
    /// Every one of these scopes must be granted (`scope`, `scp` or `scopes` claim).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Claim → request header sent upstream, e.g. `{ sub = "X-User-Id", scope = "X-User-Scopes" }`.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    /// Remove `Authorization` before the request goes upstream.
    #[serde(default)]
    pub strip_authorization: bool,
}

/// What `auth = ...` holds in the file; normalised to an [`AuthPolicyConfig`].
#[derive(Debug, Clone)]
pub struct AuthPolicyConfigOrMode(pub AuthPolicyConfig);

impl<'de> Deserialize<'de> for AuthPolicyConfigOrMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PolicyVisitor;
        impl<'de> Visitor<'de> for PolicyVisitor {
            type Value = AuthPolicyConfigOrMode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"required\", \"optional\", \"none\", or a table like { mode = \"required\", scopes = [...] }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let mode = match v {
                    "none" => AuthMode::None,
                    "optional" => AuthMode::Optional,
                    "required" => AuthMode::Required,
                    other => {
                        return Err(E::custom(format!(
                        "unknown auth mode {other:?}: use \"required\", \"optional\" or \"none\""
                    )))
                    }
                };
                Ok(AuthPolicyConfigOrMode(AuthPolicyConfig {
                    mode,
                    scopes: Vec::new(),
                    forward_claims: BTreeMap::new(),
                    strip_authorization: false,
                }))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                AuthPolicyConfig::deserialize(MapAccessDeserializer::new(map))
                    .map(AuthPolicyConfigOrMode)
            }
        }
        deserializer.deserialize_any(PolicyVisitor)
    }
}

impl schemars::JsonSchema for AuthPolicyConfigOrMode {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "AuthPolicy".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let table = generator.subschema_for::<AuthPolicyConfig>();
        schemars::json_schema!({
            "description": "\"required\", \"optional\", \"none\", or a table like { mode = \"required\", scopes = [...] }",
            "anyOf": [
                {"type": "string", "enum": ["none", "optional", "required"]},
                table
            ]
        })
    }
}
