//! A route's authentication policy, compiled from `auth = ...`: the mode (none, optional,
//! required), the scopes it demands, and the claims it forwards as headers.

use http::HeaderName;
use toml::Spanned;

use crate::config::{AuthMode, AuthPolicyConfigOrMode, SpanError};

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
