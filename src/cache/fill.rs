//! Filling: deciding from the origin's response whether it is stored and for how long
//! ([`Cache::plan_fill`]), capturing the body as it streams ([`Fill`]), storing it in process
//! ([`Cache::store_local`]), and updating a stored entry from a `304` ([`Cache::revalidated`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, AGE, SET_COOKIE, VARY};

use super::directives::{self, CacheControl};
use super::entry::{self, Entry};
use super::freshness::{initial_age, storable, Exchange};
use super::key::CacheKey;
use super::policy::CachePolicy;
use super::shared::SharedWrite;
use super::{millis_since_epoch, now_ms, Cache, CacheRequest};
use crate::config::CacheScope;
use crate::purge;

/// Response headers never stored: they describe one exchange, not the resource.
const PER_EXCHANGE: [&str; 5] = [
    "x-request-id",
    "ratelimit",
    "ratelimit-policy",
    "cache-status",
    "x-cache",
];

/// When a request went to the origin, and the purge sequence number known then: a purge after
/// it makes what it brings back stale (see [`crate::purge`]).
#[derive(Debug, Clone, Copy)]
pub struct FillStart {
    pub sent_at: SystemTime,
    pub stamp: u64,
}

/// A response being captured for the cache while it streams to the client.
pub struct Fill {
    variant: CacheKey,
    primary: CacheKey,
    vary: Vec<HeaderName>,
    /// How many of `vary`'s names are the rule's own (the rest the origin's `Vary` added).
    rule_vary: usize,
    status: u16,
    headers: HeaderMap,
    stored_at_ms: u64,
    fresh_for_ms: u64,
    stale_while_revalidate_ms: u64,
    stale_if_error_ms: u64,
    keep_ms: u64,
    stamp: u64,
    path: String,
    depends_on: Vec<String>,
    max_object: u64,
    body: BytesMut,
    /// The whole body arrived.
    pub complete: bool,
}

impl Fill {
    /// Adds a body chunk; `false` once the body outgrows `max_object` (then drop the fill).
    pub fn push(&mut self, chunk: &Bytes) -> bool {
        if (self.body.len() + chunk.len()) as u64 > self.max_object {
            return false;
        }
        self.body.extend_from_slice(chunk);
        true
    }
}

fn vary_names(response: &HeaderMap) -> Vec<HeaderName> {
    response
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes()).ok())
        .collect()
}

/// Response headers a `304` must not change in the stored response (RFC 9111 §3.2): the body's
/// framing and coding stay those of the stored body.
const KEPT_ON_UPDATE: [HeaderName; 3] = [
    http::header::CONTENT_LENGTH,
    http::header::TRANSFER_ENCODING,
    http::header::CONTENT_ENCODING,
];

impl Cache {
    /// Write-through: the response to a write that carries the target's full new
    /// representation, planned as the GET entry for the same URL (`request` is the write, seen
    /// as a GET). `start` must carry the write's own purge sequence number, so the entry is
    /// current after that purge and stale after any later one.
    pub fn plan_write_through(
        &self,
        policy: &CachePolicy,
        request: &CacheRequest<'_>,
        response: &HeaderMap,
        start: FillStart,
    ) -> Option<(CacheKey, Fill)> {
        if policy.scope == CacheScope::User && request.user.is_none() {
            return None;
        }
        let primary = Cache::primary_key(policy, request);
        let fill = self.plan_fill(policy, &primary, request, 200, response, start)?;
        Some((primary, fill))
    }

    /// Decides whether the response to a missed request is stored; if so, returns the [`Fill`]
    /// that captures it.
    pub fn plan_fill(
        &self,
        policy: &CachePolicy,
        primary: &CacheKey,
        request: &CacheRequest<'_>,
        status: u16,
        response: &HeaderMap,
        start: FillStart,
    ) -> Option<Fill> {
        let FillStart { sent_at, stamp } = start;
        let received_at = SystemTime::now();
        let request_cc = if policy.honor_client_cache_control {
            CacheControl::parse(request.headers)
        } else {
            CacheControl::default()
        };
        let response_cc = CacheControl::parse_response(response, &policy.targeted);
        let exchange = Exchange {
            method: request.method,
            request: request.headers,
            authorized: request.authorized,
            request_cc: &request_cc,
            status,
            response,
            response_cc: &response_cc,
        };
        let mut rule = policy.rule_for(status);
        // A per-user rule's anonymous entry is shared by every anonymous caller.
        rule.per_user &= request.user.is_some();
        let lifetime = storable(&exchange, &rule, received_at).ok()?;
        let age = initial_age(response, sent_at, received_at);
        // `no-cache`: stored, but revalidated before every reuse.
        let fresh_for = if response_cc.no_cache {
            Duration::ZERO
        } else {
            lifetime.saturating_sub(age)
        };
        // Stale serving, unless the origin forbids it (§4.2.4, §5.2.2.2, §5.2.2.8); the
        // origin's own RFC 5861 directives win over the rule's when the origin is honoured.
        let may_serve_stale =
            !(response_cc.no_cache || response_cc.must_revalidate || response_cc.proxy_revalidate);
        let window = |origin: Option<Duration>, rule: Option<Duration>| {
            let window = if policy.rule.honor_origin {
                origin.or(rule)
            } else {
                rule
            };
            match window {
                Some(w) if may_serve_stale => directives::millis(w),
                _ => 0,
            }
        };
        let stale_while_revalidate_ms = window(
            response_cc.stale_while_revalidate,
            policy.stale_while_revalidate,
        );
        let stale_if_error_ms = window(response_cc.stale_if_error, policy.stale_if_error);
        let keep_ms = directives::millis(policy.keep);
        let has_validator = response.contains_key(http::header::ETAG)
            || response.contains_key(http::header::LAST_MODIFIED);
        if fresh_for.is_zero() && !(has_validator && keep_ms > 0) {
            // Could never be used.
            return None;
        }
        let declared = response
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > policy.max_object) {
            return None;
        }

        let mut headers = response.clone();
        for name in PER_EXCHANGE {
            headers.remove(name);
        }
        headers.remove(SET_COOKIE);
        headers.remove(purge::SURROGATE_KEY);
        // `no-cache="f"` and `private="f"` (§5.2.2.4, §5.2.2.7): the entry is kept without those
        // fields (a per-user entry is private already and keeps `private` ones).
        for name in &response_cc.no_cache_fields {
            headers.remove(name.as_str());
        }
        if policy.scope == CacheScope::Shared {
            for name in &response_cc.private_fields {
                headers.remove(name.as_str());
            }
        }
        let mut depends_on = vec![purge::path_key(request.path)];
        depends_on.extend(request.tags.iter().map(|t| purge::tag_key(t)));
        depends_on.extend(purge::response_tags(response).map(|t| purge::tag_key(&t)));
        depends_on.dedup();
        headers.insert(AGE, age.as_secs().into());
        let mut vary = policy.vary.clone();
        for name in vary_names(response) {
            if !vary.contains(&name) {
                vary.push(name);
            }
        }
        Some(Fill {
            variant: primary.variant(&vary, request.headers),
            primary: primary.clone(),
            rule_vary: policy.vary.len(),
            vary,
            status,
            headers,
            stored_at_ms: millis_since_epoch(received_at),
            fresh_for_ms: directives::millis(fresh_for),
            stale_while_revalidate_ms,
            stale_if_error_ms,
            keep_ms,
            stamp,
            path: request.path.to_owned(),
            depends_on,
            max_object: policy.max_object,
            body: BytesMut::new(),
            complete: false,
        })
    }

    /// Stores a completely captured response in process, at once, and returns what remains to
    /// be written to the shared tier (if there is one) with [`Cache::store_shared`]. Called when
    /// the last body chunk arrives from the origin, before it is passed on, so the entry exists
    /// by the time the client has the response.
    pub fn store_local(&self, fill: Fill) -> Option<(Arc<Entry>, Option<SharedWrite>)> {
        if !fill.complete {
            return None;
        }
        let entry = Entry {
            status: fill.status,
            headers: entry::owned_headers(fill.headers),
            body: entry::owned_body(fill.body),
            stored_at_ms: fill.stored_at_ms,
            fresh_for_ms: fill.fresh_for_ms,
            stale_while_revalidate_ms: fill.stale_while_revalidate_ms,
            stale_if_error_ms: fill.stale_if_error_ms,
            keep_ms: fill.keep_ms,
            stamp: fill.stamp,
            path: fill.path,
            depends_on: fill.depends_on,
            vary: fill.vary.clone(),
        };
        let shared = self.shared.as_ref().map(|_| {
            SharedWrite::new(
                &fill.variant,
                &fill.primary,
                &entry,
                &fill.vary,
                self.compress_above,
            )
        });
        let entry = Arc::new(entry);
        let origin_varies = fill.vary.len() > fill.rule_vary;
        self.memory.set_vary(
            fill.primary.local().to_owned(),
            origin_varies.then_some(fill.vary),
        );
        self.memory
            .insert(fill.variant.local().to_owned(), entry.clone());
        Some((entry, shared))
    }

    /// A stale entry the origin confirmed with `304 Not Modified`: the stored response updated
    /// with the `304`'s headers (§4.3.4) and stored again with new freshness when it still may
    /// be. Returns the entry to serve and what remains for the shared tier.
    pub fn revalidated(
        &self,
        policy: &CachePolicy,
        primary: &CacheKey,
        request: &CacheRequest<'_>,
        stale: &Entry,
        not_modified: &HeaderMap,
        start: FillStart,
    ) -> (Arc<Entry>, Option<SharedWrite>) {
        let mut headers = stale.headers.clone();
        for name in not_modified.keys() {
            if KEPT_ON_UPDATE.contains(name) || PER_EXCHANGE.contains(&name.as_str()) {
                continue;
            }
            headers.remove(name);
            for value in not_modified.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        if !not_modified.contains_key(AGE) {
            headers.remove(AGE);
        }
        let stored = self
            .plan_fill(policy, primary, request, stale.status, &headers, start)
            .and_then(|mut fill| {
                fill.body = BytesMut::from(stale.body.as_ref());
                fill.complete = true;
                self.store_local(fill)
            });
        match stored {
            Some((entry, shared)) => (entry, shared),
            // No longer storable: it answers this request only.
            None => (
                Arc::new(Entry {
                    headers,
                    fresh_for_ms: 0,
                    stored_at_ms: now_ms(),
                    ..stale.clone()
                }),
                None,
            ),
        }
    }
}
