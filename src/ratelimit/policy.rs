//! A route's rate-limit policy, compiled from `rate_limit = ...`: its limits (`count` per
//! `period`, `burst`), what each counts by (IP, user, a header, a credential, the route), and
//! how a client address becomes an identity.

use std::net::IpAddr;
use std::time::Duration;

use http::header::HeaderName;
use toml::Spanned;

use crate::config::values::parse_rate;
use crate::config::{Invalid, KeyConfig, OnStoreError, RateLimitPolicyConfig, SpanError};

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
    pub(super) fn interval_us(&self) -> u64 {
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
pub(super) fn credential_digest(secret: &[u8]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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
