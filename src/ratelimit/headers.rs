//! The verdict on a request and its headers: `RateLimit-Policy`, `RateLimit` and, on a
//! refusal, `Retry-After`.

use super::Limit;
use crate::store::GcraOutcome;

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

/// Builds the verdict and its headers (draft-ietf-httpapi-ratelimit-headers), one item per limit.
///
/// `RateLimit-Policy` states each limit as configured: `q` requests per `w` seconds (`"600/minute"`
/// is `q=600;w=60`, whatever its `burst`; with the local fallback, this instance's share of it).
/// GCRA has no fixed windows, so `RateLimit` describes its state as a client can use it: `r` is
/// how many requests would be admitted right now, back to back (at most `burst`), and `t` the
/// seconds until `r` is back to `burst` if nothing is sent. A client that sends at most `r` now and
/// then paces at `q` per `w` is never refused. `Retry-After` on a refusal is the seconds (rounded
/// up) until one more request would be admitted.
pub(super) fn verdict(
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
