//! The throttle on failed authentication attempts: an address that presents too many bad
//! tokens may not try new ones for a while (`[rate_limit] auth_failures`). Counted in the
//! store like any limit; consulted only for tokens the gateway has not verified before.

use std::net::IpAddr;

use http::header::HeaderMap;

use super::headers::verdict;
use super::{Limit, Limiter, RequestFacts, Verdict};
use crate::store::GcraRequest;

impl Limiter {
    fn auth_failure_request(&self, ip: IpAddr) -> Option<(Limit, Vec<GcraRequest>)> {
        let limit = self.auth_failures.clone()?;
        let facts = RequestFacts {
            client_ip: ip,
            subject: None,
            headers: &HeaderMap::new(),
        };
        let requests = self.requests("auth-failures", std::slice::from_ref(&limit), &facts, 1);
        Some((limit, requests))
    }

    /// Whether failed authentication attempts are limited at all.
    pub fn limits_auth_failures(&self) -> bool {
        self.auth_failures.is_some()
    }

    /// Whether `ip` has used up its failed authentication attempts (looks, counts nothing).
    /// `None` when it has not, or when there is no such limit or the store cannot tell.
    pub async fn auth_failures_exhausted(&self, ip: IpAddr) -> Option<Verdict> {
        let (limit, requests) = self.auth_failure_request(ip)?;
        let outcomes = self.store.rate_limit(&requests, false).await.ok()?;
        let verdict = verdict(std::slice::from_ref(&limit), &outcomes, 1, "store");
        (!verdict.allowed).then_some(verdict)
    }

    /// Counts one failed authentication attempt from `ip`.
    pub async fn record_auth_failure(&self, ip: IpAddr) {
        if let Some((_, requests)) = self.auth_failure_request(ip) {
            if let Err(e) = self.store.rate_limit(&requests, true).await {
                tracing::debug!(error = %e, "rate limit: could not count a failed authentication attempt");
            }
        }
    }
}
