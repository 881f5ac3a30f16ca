//! Rate limiting: per-route policies of one or more GCRA limits, counted in the store (so every
//! gateway instance on one Redis shares them), with the IETF `RateLimit` / `RateLimit-Policy`
//! headers, and a per-policy answer for when the store fails: limit in process, allow, or deny.
//!
//! This file is the [`Limiter`]: keys, the store call, and the fallback when the store fails.
//! The rest: `policy` (a route's compiled limits and what they count by), `headers` (the
//! verdict and its headers), `auth_failures` (the throttle on failed authentication). The GCRA
//! arithmetic stays in [`crate::store::gcra`]: each store runs it atomically itself (a table in
//! process, a Lua script in Redis), and the store must not import from the features above it.
//! The client's address comes from [`crate::client_ip`].

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::HeaderMap;

use crate::config::values::parse_rate;
use crate::config::{Invalid, OnStoreError, RateLimitConfig};
use crate::store::gcra::GcraRequest;

mod auth_failures;
mod headers;
mod policy;

use crate::store::{GcraTable, Store};
use headers::verdict;
pub use headers::Verdict;
use policy::credential_digest;
pub use policy::{ip_identity, KeyPart, Limit, RateLimitPolicy};

/// What the rate-limit phase knows about a request.
pub struct RequestFacts<'a> {
    pub client_ip: IpAddr,
    pub subject: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// Decides rate limits against the store, falling back per policy when it fails.
pub struct Limiter {
    store: Arc<dyn Store>,
    /// The in-process fallback, used when the store fails and a policy says `local`: keys start
    /// exhausted, and it is emptied each time the store starts failing.
    local: GcraTable,
    /// Whether the store answered the last rate-limit call.
    store_answered: std::sync::atomic::AtomicBool,
    /// Whether the local share was ever used (then it is consulted after the store too).
    fell_back: std::sync::atomic::AtomicBool,
    prefix: String,
    instances: u32,
    auth_failures: Option<Limit>,
    /// IPv6 clients are keyed by this many leading bits.
    ipv6_prefix: u8,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Limiter {
    pub fn new(
        store: Arc<dyn Store>,
        prefix: &str,
        instances: u32,
        auth_failures: Option<Limit>,
        ipv6_prefix: u8,
    ) -> Limiter {
        Limiter {
            store,
            local: GcraTable::starting_exhausted(),
            store_answered: std::sync::atomic::AtomicBool::new(true),
            fell_back: std::sync::atomic::AtomicBool::new(false),
            prefix: prefix.to_owned(),
            instances: instances.max(1),
            auth_failures,
            ipv6_prefix,
        }
    }

    /// The limiter `[rate_limit]` describes, counting in `store`. Fails only on an invalid
    /// `auth_failures` rate (which `cachegate check` reports first).
    pub fn from_config(
        store: Arc<dyn Store>,
        config: &RateLimitConfig,
    ) -> Result<Limiter, Invalid> {
        let auth_failures = match &config.auth_failures {
            Some(rate) => {
                let (count, period) = parse_rate(rate.get_ref())?;
                Some(Limit {
                    name: "auth-failures".to_owned(),
                    count,
                    period,
                    burst: count,
                    key: vec![KeyPart::Ip],
                })
            }
            None => None,
        };
        Ok(Limiter::new(
            store,
            &config.prefix,
            config.instances,
            auth_failures,
            *config.ipv6_prefix.get_ref(),
        ))
    }

    /// Each of a policy's limits with its store key for one request, without counting anything
    /// (for `cachegate explain`).
    pub fn keys<'p>(
        &self,
        policy: &'p RateLimitPolicy,
        facts: &RequestFacts<'_>,
    ) -> Vec<(&'p Limit, String)> {
        policy
            .limits
            .iter()
            .map(|limit| (limit, self.key(&policy.scope, limit, facts)))
            .collect()
    }

    /// The store key of a limit for one request. The braces are a Redis Cluster hash tag: one
    /// counter, one slot.
    fn key(&self, scope: &str, limit: &Limit, facts: &RequestFacts<'_>) -> String {
        let mut identity = String::new();
        for (i, part) in limit.key.iter().enumerate() {
            if i > 0 {
                identity.push('|');
            }
            match part {
                KeyPart::Ip => identity.push_str(&ip_identity(facts.client_ip, self.ipv6_prefix)),
                KeyPart::User => match facts.subject {
                    Some(sub) => {
                        identity.push_str("sub:");
                        identity.push_str(sub);
                    }
                    None => {
                        identity.push_str("ip:");
                        identity.push_str(&ip_identity(facts.client_ip, self.ipv6_prefix));
                    }
                },
                KeyPart::Route => identity.push_str(scope),
                KeyPart::Header(name) => {
                    let value = facts
                        .headers
                        .get(name)
                        .map(|v| v.as_bytes())
                        .unwrap_or_default();
                    identity.push_str(&String::from_utf8_lossy(value));
                }
                KeyPart::Credential(header) => {
                    let name = header.as_ref().unwrap_or(&http::header::AUTHORIZATION);
                    match facts.headers.get(name).filter(|v| !v.is_empty()) {
                        Some(value) => {
                            identity.push_str("cred:");
                            identity.push_str(&credential_digest(value.as_bytes()));
                        }
                        None => {
                            identity.push_str("ip:");
                            identity.push_str(&ip_identity(facts.client_ip, self.ipv6_prefix));
                        }
                    }
                }
            }
        }
        // `{` and `}` inside the identity would break the hash tag.
        let identity = identity.replace(['{', '}'], "_");
        format!("{}:{{{}:{}:{}}}", self.prefix, scope, limit.name, identity)
    }

    fn requests(
        &self,
        scope: &str,
        limits: &[Limit],
        facts: &RequestFacts<'_>,
        share: u32,
    ) -> Vec<GcraRequest> {
        limits
            .iter()
            .map(|limit| GcraRequest {
                key: self.key(scope, limit, facts),
                interval_us: limit.interval_us() * u64::from(share),
                burst: (limit.burst / share).max(1),
            })
            .collect()
    }

    /// Checks and counts a request against a policy.
    pub async fn check(&self, policy: &RateLimitPolicy, facts: &RequestFacts<'_>) -> Verdict {
        let requests = self.requests(&policy.scope, &policy.limits, facts, 1);
        match self.store.rate_limit(&requests, true).await {
            Ok(outcomes) => {
                self.store_answered.store(true, Ordering::Relaxed);
                let shared = verdict(&policy.limits, &outcomes, 1, "store");
                if !shared.allowed || !self.fell_back.load(Ordering::Relaxed) {
                    return shared;
                }
                // Back from a fallback: the shared bucket has not seen what this instance
                // admitted meanwhile, so until its local share has replenished, that must
                // admit too (or the fleet would admit a whole burst more).
                let share = self.instances;
                let requests = self.requests(&policy.scope, &policy.limits, facts, share);
                match self.local.check_live(&requests, true) {
                    Some(local) if local.iter().any(|o| !o.allowed) => {
                        verdict(&policy.limits, &local, share, "local")
                    }
                    _ => shared,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "rate limit: store failed; applying on_store_error");
                self.fell_back.store(true, Ordering::Relaxed);
                if self.store_answered.swap(false, Ordering::Relaxed) {
                    // A new outage: what the table knew from an earlier one is stale, and keys
                    // must start exhausted again (the shared bucket may be empty now).
                    self.local.clear();
                }
                match policy.on_store_error {
                    OnStoreError::Local => {
                        let share = self.instances;
                        let requests = self.requests(&policy.scope, &policy.limits, facts, share);
                        let outcomes = self.local.check(&requests, true);
                        verdict(&policy.limits, &outcomes, share, "local")
                    }
                    OnStoreError::Allow => Verdict {
                        allowed: true,
                        retry_after_secs: 0,
                        policy_header: String::new(),
                        status_header: String::new(),
                        decided_by: "allow",
                    },
                    OnStoreError::Deny => Verdict {
                        allowed: false,
                        retry_after_secs: 1,
                        policy_header: String::new(),
                        status_header: String::new(),
                        decided_by: "deny",
                    },
                }
            }
        }
    }
}
