//! What an operation requires of its caller, read from its `security` and the document's
//! security schemes — a token the gateway can verify, credentials only the origin can check, or
//! nothing — and the `[auth]` table and route `auth` it becomes.

use std::fmt::Write as _;

use serde_json::Value;

use super::quote;

/// What an operation requires of its caller, as far as the gateway can check it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Access {
    /// No requirement.
    Public,
    /// A bearer token if present (one requirement is the empty `{}`).
    OptionalToken,
    /// A bearer token with these scopes.
    Token(Vec<String>),
    /// Credentials only the origin can check (API keys, HTTP basic, mutual TLS).
    OriginChecked,
}

/// The `[auth]` table: an OpenID Connect scheme's issuer when the document names one, else an
/// HMAC secret from the environment to replace with the identity provider's keys.
pub(super) fn auth_section(schemes: &serde_json::Map<String, Value>) -> String {
    let oidc = schemes.values().find_map(|s| {
        let url = s.get("openIdConnectUrl")?.as_str()?;
        Some(
            url.strip_suffix("/.well-known/openid-configuration")
                .unwrap_or(url)
                .to_owned(),
        )
    });
    match oidc {
        Some(issuer) => format!(
            "# Bearer tokens are verified with the keys the OpenID provider publishes.\n\
             [auth]\nissuer = {issuer}\n\n\
             [[auth.providers]]\nname = \"oidc\"\nalgorithms = [\"RS256\"]\noidc_issuer = {issuer}\n",
            issuer = quote(&issuer)
        ),
        None => {
            // drf-spectacular names Django REST Framework simplejwt's scheme `jwtAuth`; simplejwt
            // names the user `user_id`.
            let user_claim = if schemes.contains_key("jwtAuth") {
                "# simplejwt (Django REST Framework) names the user in `user_id`.\n\
                 user_claim = \"user_id\"\n"
            } else {
                ""
            };
            format!(
                "# Bearer tokens (the document's OAuth2 / bearer schemes). This verifies HS256 tokens\n\
                 # signed with JWT_SECRET; for your identity provider use `jwks_url` or `oidc_issuer`\n\
                 # with its algorithms instead (see the README's [[auth.providers]]).\n\
                 [auth]\n\n\
                 [[auth.providers]]\nname = \"local-hmac\"\nalgorithms = [\"HS256\"]\n\
                 secret = \"${{JWT_SECRET:-dev-only-secret}}\"\n{user_claim}"
            )
        }
    }
}

pub(super) fn write_access(out: &mut String, access: &Access) {
    let _ = match access {
        Access::Public => Ok(()),
        Access::OptionalToken => writeln!(out, "auth = \"optional\""),
        Access::Token(scopes) if scopes.is_empty() => writeln!(out, "auth = \"required\""),
        Access::Token(scopes) => {
            let scopes: Vec<String> = scopes.iter().map(|s| quote(s)).collect();
            writeln!(
                out,
                "auth = {{ mode = \"required\", scopes = [{}] }}",
                scopes.join(", ")
            )
        }
        Access::OriginChecked => writeln!(
            out,
            "# The origin checks this route's credentials (API key or basic): passed through."
        ),
    };
}

/// How the gateway sees one security scheme of the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SchemeKind {
    /// A JWT in `Authorization: Bearer` the gateway verifies: OAuth2, OpenID Connect, and HTTP
    /// bearer with `bearerFormat: JWT`.
    Jwt,
    /// A credential the gateway cannot verify but can see — it travels in `Authorization`
    /// (HTTP basic, an opaque bearer key) or in a cookie — so requests carrying it never share
    /// cached answers with anyone (RFC 9111 §3.5, and the cache's cookie rule).
    Visible,
    /// A credential the gateway cannot verify and cannot tell apart from no credential: an API
    /// key in another header or in the query.
    Hidden,
}

fn scheme_kind(scheme: Option<&Value>) -> SchemeKind {
    let Some(scheme) = scheme else {
        return SchemeKind::Hidden;
    };
    let field = |name: &str| scheme.get(name).and_then(Value::as_str).unwrap_or_default();
    match field("type") {
        "oauth2" | "openIdConnect" => SchemeKind::Jwt,
        "http" if field("scheme").eq_ignore_ascii_case("bearer") => {
            if field("bearerFormat").eq_ignore_ascii_case("jwt") {
                SchemeKind::Jwt
            } else {
                // An opaque bearer key (as large AI APIs issue): verifying it as a JWT would
                // refuse every key.
                SchemeKind::Visible
            }
        }
        "http" => SchemeKind::Visible,
        "apiKey" if field("in") == "cookie" => SchemeKind::Visible,
        _ => SchemeKind::Hidden,
    }
}

/// What `security` (a list of alternative requirements) asks of a caller.
///
/// The gateway demands a token only when every alternative needs a JWT; any other credential
/// the document accepts is left for the origin to check (API-key holders are not locked out).
/// Reads stay cacheable only where every caller the origin could tell apart is one the gateway
/// can tell apart too.
pub(super) fn access_of(
    security: Option<&Value>,
    schemes: &serde_json::Map<String, Value>,
) -> Access {
    let Some(requirements) = security.and_then(Value::as_array) else {
        return Access::Public;
    };
    if requirements.is_empty() {
        return Access::Public;
    }
    let mut anonymous = false;
    let mut jwt_scopes: Option<Vec<String>> = None;
    let (mut visible, mut hidden, mut opaque_bearer) = (false, false, false);
    for requirement in requirements.iter().filter_map(Value::as_object) {
        if requirement.is_empty() {
            anonymous = true;
            continue;
        }
        let kinds: Vec<SchemeKind> = requirement
            .keys()
            .map(|name| scheme_kind(schemes.get(name)))
            .collect();
        if kinds.iter().all(|k| *k == SchemeKind::Jwt) {
            // Alternatives are "any of"; the gateway's scopes are "all of": the first JWT
            // requirement is the closest single policy.
            if jwt_scopes.is_none() {
                jwt_scopes = Some(
                    requirement
                        .values()
                        .filter_map(Value::as_array)
                        .flatten()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect(),
                );
            }
            continue;
        }
        hidden |= kinds.contains(&SchemeKind::Hidden);
        visible |= kinds.contains(&SchemeKind::Visible);
        opaque_bearer |= requirement.keys().any(|name| {
            schemes.get(name).is_some_and(|s| {
                s.get("scheme")
                    .and_then(Value::as_str)
                    .is_some_and(|scheme| scheme.eq_ignore_ascii_case("bearer"))
            })
        });
    }
    match jwt_scopes {
        // Callers told apart only by the origin, or an opaque bearer key that would look like a
        // bad JWT: the gateway neither checks nor caches.
        _ if hidden => Access::OriginChecked,
        Some(_) if opaque_bearer => Access::OriginChecked,
        Some(scopes) if !anonymous && !visible => Access::Token(scopes),
        Some(_) => Access::OptionalToken,
        // Basic or cookie credentials beside anonymous access: requests that carry them never
        // share answers, the rest do.
        None if anonymous => Access::Public,
        None => Access::OriginChecked,
    }
}
