//! Schema of the `[rate_limit]` table (shared settings) and of the per-route `rate_limit` policy.

use serde::Deserialize;
use toml::Spanned;

/// Settings shared by every rate-limit policy.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Prefix of every rate-limit key in the store.
    pub prefix: String,
    /// Gateway instances sharing the limits. When the store fails and a policy falls back to
    /// `local`, each instance admits `limit / instances`, so the fleet stays near the limit.
    pub instances: u32,
    /// Failed authentication attempts allowed per client IP, e.g. `"10/minute"`; past it the
    /// gateway answers `429` without checking tokens. Unset: no such limit.
    #[schemars(with = "Option<String>")]
    pub auth_failures: Option<Spanned<String>>,
    /// IPv6 clients are counted by this prefix of their address (one /64 is typically one
    /// subscriber, who can pick any address in it). 1 to 128; IPv4 clients by their address.
    #[schemars(with = "u8")]
    pub ipv6_prefix: Spanned<u8>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            prefix: "cachegate:rl".to_owned(),
            instances: 1,
            auth_failures: None,
            ipv6_prefix: Spanned::new(0..0, 64),
        }
    }
}

/// What to do when the store cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Limit in process, with each limit divided by `[rate_limit] instances`.
    #[default]
    Local,
    /// Admit every request.
    Allow,
    /// Refuse every request with `429`.
    Deny,
}

/// A route's `rate_limit`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPolicyConfig {
    /// Every limit must admit a request; a request is counted against all of them.
    pub limits: Vec<LimitConfig>,
    #[serde(default)]
    pub on_store_error: OnStoreError,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Name in the `RateLimit` headers. Default: derived from the key and rate.
    pub name: Option<String>,
    /// `"100/minute"`, `"10/second"`, `"1000/hour"`, `"5/day"`, or `"N/<duration>"` like `"50/10s"`.
    #[schemars(with = "String")]
    pub rate: Spanned<String>,
    /// Requests that may arrive at once. Default: the rate's count.
    pub burst: Option<u32>,
    /// What to count by: `"ip"`, `"user"` (JWT subject, else IP), `"header:<name>"`, `"route"`,
    /// `"credential"` / `"credential:<header>"` (the hash of the `Authorization` value or of an
    /// API-key header, else IP), or a list of these combined, e.g. `["route", "user"]`.
    /// Default: `"ip"`.
    #[serde(default)]
    #[schemars(with = "Option<KeyConfig>")]
    pub key: Option<Spanned<KeyConfig>>,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum KeyConfig {
    One(String),
    Combined(Vec<String>),
}
