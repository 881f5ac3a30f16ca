//! Responses the gateway writes itself — problems and stored entries — and the headers every
//! response gets on its way out (request id, rate-limit state). One way to build each.

use http::header::{HeaderMap, HeaderValue, CONTENT_RANGE};
use http::Response;

use super::body::Body;
use super::context::RequestCtx;
use crate::cache::serve::Served;
use crate::header_rules::{RATELIMIT, RATELIMIT_POLICY, REQUEST_ID};
use crate::problem::Problem;

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

/// A stored entry as the response (see [`Served::response`]), with the request id and
/// rate-limit headers; a `Range` outside it is a `416` problem.
pub fn entry(ctx: &RequestCtx, served: &Served) -> Response<Body> {
    match served.response() {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            finish_headers(ctx, &mut parts.headers);
            Response::from_parts(parts, body.map_or_else(Body::empty, Body::full))
        }
        Err(unsatisfiable) => {
            let range = format!("bytes */{}", unsatisfiable.length);
            let problem =
                Problem::new(416, unsatisfiable.to_string()).with_header(CONTENT_RANGE, range);
            self::problem(ctx, problem)
        }
    }
}
