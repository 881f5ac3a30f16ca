//! Responses the gateway writes itself — problems and stored entries — and the headers every
//! response gets on its way out (request id, rate-limit state). One way to build each.

use http::header::{
    HeaderMap, HeaderValue, AGE, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, TRANSFER_ENCODING,
};
use http::{Response, StatusCode};

use super::body::Body;
use super::RequestCtx;
use crate::cache::entry::Entry;
use crate::cache::range::RangeAnswer;
use crate::header_rules::{RATELIMIT, RATELIMIT_POLICY, REQUEST_ID};
use crate::problem::Problem;

pub use crate::header_rules::{CACHE_STATUS, X_CACHE};

/// A problem+json response carrying the request id (and the rate-limit state, when checked).
pub fn problem(ctx: &RequestCtx, problem: Problem) -> Response<Body> {
    let mut response = problem.into_response(&ctx.request_id).map(Body::full);
    add_rate_limit(ctx, response.headers_mut());
    response
}

/// The headers every proxied response gets: the request id and the rate-limit state.
pub fn finish_headers(ctx: &RequestCtx, headers: &mut HeaderMap) {
    add_rate_limit(ctx, headers);
    // Targeted cache-control fields are for the gateway's cache (RFC 9213), not its clients.
    if let Some(policy) = ctx.route_policy().cache.as_ref() {
        for name in policy.targeted.iter() {
            headers.remove(name);
        }
    }
    if let Ok(id) = HeaderValue::from_str(&ctx.request_id) {
        headers.insert(REQUEST_ID, id);
    }
}

fn add_rate_limit(ctx: &RequestCtx, headers: &mut HeaderMap) {
    if let Some(verdict) = ctx
        .rate_limit
        .as_ref()
        .filter(|v| !v.policy_header.is_empty())
    {
        if let (Ok(policy), Ok(state)) = (
            HeaderValue::from_str(&verdict.policy_header),
            HeaderValue::from_str(&verdict.status_header),
        ) {
            headers.insert(RATELIMIT_POLICY, policy);
            headers.insert(RATELIMIT, state);
        }
    }
}

/// How a stored entry is being served, for its labels.
pub struct Serving<'a> {
    pub status: u16,
    pub age_secs: u64,
    pub cache_status: &'a str,
    pub x_cache: &'static str,
    /// `304`: no body, no body headers.
    pub not_modified: bool,
    /// `HEAD`: headers only.
    pub head_only: bool,
    /// The part of the body the request's `Range` asks for.
    pub range: RangeAnswer,
}

/// A stored entry as the response: its headers (recomputed `Age` and length), the cache labels,
/// the request id and rate-limit headers, and the body unless HEAD or 304. The stored `Date` is
/// kept: a cache does not rewrite it (RFC 9110 §6.6.1); `Age` says how old the response is.
pub fn entry(ctx: &RequestCtx, entry: &Entry, serving: Serving<'_>) -> Response<Body> {
    let length = entry.body.len() as u64;
    if serving.range == RangeAnswer::Unsatisfiable {
        let problem = Problem::new(
            416,
            format!("the requested range is outside the representation's {length} bytes"),
        )
        .with_header(CONTENT_RANGE, format!("bytes */{length}"));
        return self::problem(ctx, problem);
    }
    let mut headers = HeaderMap::with_capacity(entry.headers.len() + 6);
    for (name, value) in &entry.headers {
        let drop = name == AGE
            || name == TRANSFER_ENCODING
            || name == CONTENT_LENGTH
            || (serving.not_modified && name == CONTENT_TYPE);
        if !drop {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(AGE, HeaderValue::from(serving.age_secs));
    if let Ok(status) = HeaderValue::from_str(serving.cache_status) {
        headers.insert(CACHE_STATUS, status);
    }
    headers.insert(X_CACHE, HeaderValue::from_static(serving.x_cache));
    finish_headers(ctx, &mut headers);
    let (status, body) = match serving.range {
        RangeAnswer::Partial { first, last } => {
            if let Ok(range) = HeaderValue::from_str(&format!("bytes {first}-{last}/{length}")) {
                headers.insert(CONTENT_RANGE, range);
            }
            // Bounded by the body's length (see `range::answer`).
            let part = entry.body.slice(first as usize..=last as usize);
            (StatusCode::PARTIAL_CONTENT, part)
        }
        _ => (
            StatusCode::from_u16(serving.status).unwrap_or(StatusCode::OK),
            entry.body.clone(),
        ),
    };
    if !serving.not_modified {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let body = if serving.not_modified || serving.head_only {
        Body::empty()
    } else {
        Body::full(body)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}
