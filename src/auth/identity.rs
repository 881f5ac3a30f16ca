//! A verified token's identity — subject, scopes, claims — and the claims a route forwards to
//! the origin as headers.

use std::collections::BTreeSet;

use http::header::AUTHORIZATION;

use serde_json::{Map, Value};

use super::AuthPolicy;

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
