//! Where tokens are: the bearer token of a request (`Authorization: Bearer`, else the configured
//! cookie), and the operator token gate of the admin listener and of `PURGE`.

use http::header::{HeaderMap, AUTHORIZATION, COOKIE};

use super::Authenticator;

impl Authenticator {
    /// The bearer token of a request: `Authorization: Bearer ...`, else the configured cookie.
    pub fn token_from<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        if let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
            let (scheme, token) = value.trim().split_once(' ')?;
            return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim());
        }
        let name = self.cookie.as_deref()?;
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.trim())
    }
}

/// Whether `headers` carry `Authorization: Bearer <token>` (compared in constant time): the
/// operator token gate of the admin listener and of `PURGE`.
pub fn bears_token(headers: &http::HeaderMap, token: &str) -> bool {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes()))
}

/// Compares secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
