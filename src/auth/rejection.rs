//! Why a request's credentials were refused: the [`Reason`] a token failed (for logs and the
//! metric label), and the [`Rejection`] the client gets (`401`/`403` with an RFC 6750
//! challenge).

use std::fmt;

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

#[cfg(test)]
mod tests {
    use super::*;

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
