//! Rate limiting: per-route policies of one or more GCRA limits, counted in the store (so every
//! gateway instance on one Redis shares them), with the IETF `RateLimit` / `RateLimit-Policy`
//! headers, and a per-policy answer for when the store fails: limit in process, allow, or deny.
//!
//! Also the client IP: the socket peer, unless the peer is a configured trusted proxy, in which
//! case `X-Forwarded-For` (or `Forwarded`) is read from the right, skipping trusted hops.

use crate::config::Invalid;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName};
use ipnet::IpNet;
use toml::Spanned;

use crate::config::values::{parse_cidr, parse_rate};
use crate::config::{KeyConfig, OnStoreError, RateLimitConfig, RateLimitPolicyConfig, SpanError};
use crate::store::gcra::{GcraOutcome, GcraRequest};
use crate::store::{GcraTable, Store};

/// Peers allowed to tell us who the client is.
#[derive(Debug, Default, Clone)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn compile(entries: &[Spanned<String>]) -> TrustedProxies {
        // Validated with the configuration.
        TrustedProxies(
            entries
                .iter()
                .filter_map(|e| parse_cidr(e.get_ref()).ok())
                .collect(),
        )
    }

    /// Whether `ip` is a configured trusted proxy.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address for a request from `peer`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let mut hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        if hops.is_empty() {
            hops = headers
                .get_all("forwarded")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split([',', ';']))
                .filter_map(|p| {
                    p.trim()
                        .strip_prefix("for=")
                        .or_else(|| p.trim().strip_prefix("For="))
                })
                .filter_map(|v| {
                    let v = v.trim_matches('"');
                    let v = v
                        .strip_prefix('[')
                        .map_or(v, |v| v.split(']').next().unwrap_or(v));
                    v.parse::<IpAddr>()
                        .ok()
                        .or_else(|| v.rsplit_once(':').and_then(|(ip, _)| ip.parse().ok()))
                })
                .collect();
        }
        // The rightmost address not added by one of our own proxies is the client.
        hops.into_iter()
            .rev()
            .find(|ip| !self.trusts(*ip))
            .unwrap_or(peer)
    }
}

/// What a limit counts by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    Ip,
    /// The JWT subject; the client IP for anonymous requests.
    User,
    Header(HeaderName),
    /// A credential the origin checks (an API key, an opaque bearer key), counted by its
    /// SHA-256 so the secret never becomes a store key or appears in `explain`: the
    /// `Authorization` value, or the named header's; the client IP for requests without one.
    Credential(Option<HeaderName>),
    Route,
}

/// One limit: `count` requests per `period`, `burst` at once.
#[derive(Debug, Clone)]
pub struct Limit {
    pub name: String,
    pub count: u32,
    pub period: Duration,
    pub burst: u32,
    pub key: Vec<KeyPart>,
}

impl Limit {
    fn interval_us(&self) -> u64 {
        ((self.period.as_micros() as u64) / u64::from(self.count.max(1))).max(1)
    }
}

fn parse_key_part(text: &str) -> Result<KeyPart, Invalid> {
    match text {
        "ip" => Ok(KeyPart::Ip),
        "user" => Ok(KeyPart::User),
        "route" => Ok(KeyPart::Route),
        "credential" => Ok(KeyPart::Credential(None)),
        other => {
            let header = |name: &str| {
                HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| format!("invalid header name in key {other:?}"))
            };
            if let Some(name) = other.strip_prefix("header:") {
                Ok(header(name).map(KeyPart::Header)?)
            } else if let Some(name) = other.strip_prefix("credential:") {
                Ok(header(name).map(|h| KeyPart::Credential(Some(h)))?)
            } else {
                Err(Invalid(format!(
                    "unknown rate-limit key {other:?}: use \"ip\", \"user\", \"route\", \"header:<name>\", \"credential\" or \"credential:<header>\""
                )))
            }
        }
    }
}

/// A credential as a counter key: the first 16 bytes of its SHA-256, in hex, under a label
/// of this use (the same on every instance, so the count is shared).
fn credential_digest(secret: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"cachegate rate-limit credential\0")
        .chain_update(secret)
        .finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A route's rate-limit policy, compiled.
#[derive(Debug, Clone)]
pub struct RateLimitPolicy {
    /// Scope of the counters: the route's name, or `default`.
    pub scope: String,
    pub limits: Vec<Limit>,
    pub on_store_error: OnStoreError,
}

impl RateLimitPolicy {
    pub fn compile(
        config: &Spanned<RateLimitPolicyConfig>,
        scope: &str,
    ) -> Result<RateLimitPolicy, Vec<SpanError>> {
        let mut errors = Vec::new();
        let mut limits = Vec::new();
        if config.get_ref().limits.is_empty() {
            errors.push(SpanError::new(
                config.span(),
                "rate_limit needs at least one entry in `limits`",
            ));
        }
        for limit in &config.get_ref().limits {
            let (count, period) = match parse_rate(limit.rate.get_ref()) {
                Ok(rate) => rate,
                Err(message) => {
                    errors.push(SpanError::new(limit.rate.span(), message));
                    continue;
                }
            };
            let (texts, key_span) = match &limit.key {
                None => (vec!["ip".to_owned()], limit.rate.span()),
                Some(k) => match k.get_ref() {
                    KeyConfig::One(one) => (vec![one.clone()], k.span()),
                    KeyConfig::Combined(many) => (many.clone(), k.span()),
                },
            };
            let mut key = Vec::new();
            for text in &texts {
                match parse_key_part(text) {
                    Ok(part) => key.push(part),
                    Err(message) => errors.push(SpanError::new(key_span.clone(), message)),
                }
            }
            let burst = limit.burst.unwrap_or(count);
            if burst == 0 {
                errors.push(SpanError::new(
                    limit.rate.span(),
                    "burst must be at least 1",
                ));
            }
            let name = limit.name.clone().unwrap_or_else(|| {
                format!(
                    "{}-{}-per-{}",
                    texts.join("+"),
                    count,
                    humantime::format_duration(period)
                )
            });
            limits.push(Limit {
                name,
                count,
                period,
                burst,
                key,
            });
        }
        if errors.is_empty() {
            Ok(RateLimitPolicy {
                scope: scope.to_owned(),
                limits,
                on_store_error: config.get_ref().on_store_error,
            })
        } else {
            Err(errors)
        }
    }
}

/// What the rate-limit phase knows about a request.
pub struct RequestFacts<'a> {
    pub client_ip: IpAddr,
    pub subject: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// How a request fared, with the headers to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// Whole seconds to wait, for `Retry-After` on a refusal.
    pub retry_after_secs: u64,
    /// `RateLimit-Policy` and `RateLimit` values; empty when unknown (store failed, `allow`).
    pub policy_header: String,
    pub status_header: String,
    /// `store`, `local` (fallback), `allow` or `deny` (store failed), for logs.
    pub decided_by: &'static str,
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

/// A client address as a rate-limit identity: IPv4 whole, IPv6 by its first `ipv6_prefix` bits
/// (an IPv4-mapped IPv6 address is its IPv4 address), so a client cannot escape its limit by
/// rotating through the addresses of its own network.
pub fn ip_identity(ip: IpAddr, ipv6_prefix: u8) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None if ipv6_prefix >= 128 => v6.to_string(),
            None => {
                let bits = u128::from(v6);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(ipv6_prefix))
                    .unwrap_or(0);
                format!("{}/{ipv6_prefix}", std::net::Ipv6Addr::from(bits & mask))
            }
        },
    }
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

/// Builds the verdict and its headers (draft-ietf-httpapi-ratelimit-headers), one item per limit.
///
/// `RateLimit-Policy` states each limit as configured: `q` requests per `w` seconds (`"600/minute"`
/// is `q=600;w=60`, whatever its `burst`; with the local fallback, this instance's share of it).
/// GCRA has no fixed windows, so `RateLimit` describes its state as a client can use it: `r` is
/// how many requests would be admitted right now, back to back (at most `burst`), and `t` the
/// seconds until `r` is back to `burst` if nothing is sent. A client that sends at most `r` now and
/// then paces at `q` per `w` is never refused. `Retry-After` on a refusal is the seconds (rounded
/// up) until one more request would be admitted.
fn verdict(
    limits: &[Limit],
    outcomes: &[GcraOutcome],
    share: u32,
    decided_by: &'static str,
) -> Verdict {
    let mut policy_header = String::new();
    let mut status_header = String::new();
    let allowed = outcomes.iter().all(|o| o.allowed);
    let mut retry_after_us = 0;
    for (limit, outcome) in limits.iter().zip(outcomes) {
        // A refused request is counted by no limit, so those that would have admitted it still
        // have the unit it would have used.
        let (remaining, reset_us) = if !allowed && outcome.allowed {
            let interval = limit.interval_us() * u64::from(share);
            (
                outcome.remaining + 1,
                outcome.reset_us.saturating_sub(interval),
            )
        } else {
            (outcome.remaining, outcome.reset_us)
        };
        if !policy_header.is_empty() {
            policy_header.push_str(", ");
            status_header.push_str(", ");
        }
        let quota = (limit.count / share).max(1);
        policy_header.push_str(&format!(
            "\"{}\";q={};w={}",
            limit.name,
            quota,
            limit.period.as_secs().max(1)
        ));
        status_header.push_str(&format!(
            "\"{}\";r={};t={}",
            limit.name,
            remaining,
            reset_us.div_ceil(1_000_000)
        ));
        if !outcome.allowed {
            retry_after_us = retry_after_us.max(outcome.retry_after_us);
        }
    }
    Verdict {
        allowed,
        retry_after_secs: retry_after_us.div_ceil(1_000_000).max(u64::from(!allowed)),
        policy_header,
        status_header,
        decided_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_words_and_durations() {
        assert_eq!(
            parse_rate("100/minute").unwrap(),
            (100, Duration::from_secs(60))
        );
        assert_eq!(
            parse_rate("10/second").unwrap(),
            (10, Duration::from_secs(1))
        );
        assert_eq!(parse_rate("50/10s").unwrap(), (50, Duration::from_secs(10)));
        assert!(parse_rate("0/minute").is_err());
        assert!(parse_rate("ten/minute").is_err());
        assert!(parse_rate("100 per minute").is_err());
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_peers() {
        let trusted = TrustedProxies(vec![parse_cidr("10.0.0.0/8").unwrap()]);
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.1, 10.0.0.5".parse().unwrap(),
        );
        let proxy: IpAddr = "10.1.1.1".parse().unwrap();
        let stranger: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            trusted.client_ip(proxy, &headers),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            trusted.client_ip(stranger, &headers),
            stranger,
            "untrusted peers cannot claim an address"
        );

        let mut forwarded = HeaderMap::new();
        forwarded.insert(
            "forwarded",
            "for=192.0.2.60;proto=http, for=\"[2001:db8::1]:4711\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            trusted.client_ip(proxy, &forwarded),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_network() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(ip_identity(ip("203.0.113.7"), 64), "203.0.113.7");
        assert_eq!(
            ip_identity(ip("2001:db8:1:2:aaaa::1"), 64),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            ip_identity(ip("2001:db8:1:2:aaaa::1"), 64),
            ip_identity(ip("2001:db8:1:2:ffff::9"), 64)
        );
        assert_ne!(
            ip_identity(ip("2001:db8:1:2::1"), 64),
            ip_identity(ip("2001:db8:1:3::1"), 64)
        );
        assert_eq!(ip_identity(ip("2001:db8::1"), 128), "2001:db8::1");
        assert_eq!(ip_identity(ip("::ffff:198.51.100.1"), 64), "198.51.100.1");
        assert_eq!(ip_identity(ip("2001:db8::1"), 1), "::/1");
    }
}
