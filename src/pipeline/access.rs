//! Access: the authentication step (the route's policy, the failed-attempt throttle) and the
//! rate-limit step. Both answer refused requests themselves (`401`/`403`, `429`).

use std::ops::ControlFlow;

use http::header::{RETRY_AFTER, WWW_AUTHENTICATE};
use http::request::Parts;
use http::Response;

use super::body::Body;
use super::context::{RequestCtx, Step};
use super::{respond, Gateway};
use crate::auth::{self, Rejection};
use crate::header_rules::{RATELIMIT, RATELIMIT_POLICY};
use crate::problem::Problem;
use crate::ratelimit::{Limiter, RequestFacts, Verdict};

impl Gateway {
    /// The authentication step: checks the token against the route's policy, and either
    /// forwards the identity or answers 401/403 itself.
    pub(super) async fn authenticate(&self, head: &mut Parts, ctx: &mut RequestCtx) -> Step {
        Self::check_credentials(Some(&self.limiter), head, ctx).await
    }

    /// The authentication step's body. `limiter` throttles addresses that fail too often and
    /// counts this request's failure; `None` is a dry run (`explain`), which changes nothing.
    pub(super) async fn check_credentials(
        limiter: Option<&Limiter>,
        head: &mut Parts,
        ctx: &mut RequestCtx,
    ) -> Step {
        // `Authorization` is a singleton field: with two, the gateway and the origin could each
        // believe a different one.
        if head
            .headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .nth(1)
            .is_some()
        {
            return ControlFlow::Break(respond::problem(
                ctx,
                Problem::new(
                    400,
                    "the request carries more than one Authorization header; send exactly one",
                ),
            ));
        }
        let snapshot = ctx.snapshot.clone();
        let Some(authenticator) = &snapshot.auth else {
            return ControlFlow::Continue(());
        };
        let policy = &snapshot.routes.policy(ctx.route.id).auth;
        // An address that has failed too often may not try new tokens for a while.
        let guard = limiter
            .filter(|l| policy.mode != crate::config::AuthMode::None && l.limits_auth_failures());
        let new_token = |limiter| {
            authenticator
                .token_from(&head.headers)
                .is_some_and(|t| !authenticator.is_remembered(t))
                .then_some(limiter)
        };
        if let Some(limiter) = guard.and_then(new_token) {
            if let Some(verdict) = limiter.auth_failures_exhausted(ctx.client_ip).await {
                ctx.auth_failure = Some("throttled");
                let problem = Problem::new(
                    429,
                    "too many failed authentication attempts from this address; try again later",
                );
                return ControlFlow::Break(limited(ctx, problem, &verdict));
            }
        }
        match authenticator.check(policy, &head.headers).await {
            Ok(identity) => {
                auth::forward(policy, identity.as_deref(), &mut head.headers);
                ctx.identity = identity;
                ControlFlow::Continue(())
            }
            Err(rejection) => {
                ctx.auth_failure = Some(rejection.label());
                if let Some(limiter) =
                    limiter.filter(|_| matches!(rejection, Rejection::Invalid(_)))
                {
                    limiter.record_auth_failure(ctx.client_ip).await;
                }
                let problem = Problem::new(rejection.status(), rejection.detail())
                    .with_header(WWW_AUTHENTICATE, rejection.challenge(&authenticator.realm));
                ControlFlow::Break(respond::problem(ctx, problem))
            }
        }
    }

    /// The rate-limit step: counts the request against its route's limits and answers `429`
    /// itself when one is exhausted.
    pub(super) async fn rate_limit(&self, head: &Parts, ctx: &mut RequestCtx) -> Step {
        let snapshot = ctx.snapshot.clone();
        let Some(policy) = &snapshot.routes.policy(ctx.route.id).rate_limit else {
            return ControlFlow::Continue(());
        };
        let facts = RequestFacts {
            client_ip: ctx.client_ip,
            subject: ctx.identity.as_ref().and_then(|i| i.subject.as_deref()),
            headers: &head.headers,
        };
        let verdict = self.limiter.check(policy, &facts).await;
        if verdict.allowed {
            ctx.rate_limit = Some(verdict);
            return ControlFlow::Continue(());
        }
        let problem = Problem::new(
            429,
            "rate limit exceeded; retry after the time in Retry-After",
        );
        let response = limited(ctx, problem, &verdict);
        ctx.rate_limit = Some(verdict);
        ControlFlow::Break(response)
    }
}

/// A `429` with `Retry-After` and the limit's headers.
pub(super) fn limited(ctx: &RequestCtx, problem: Problem, verdict: &Verdict) -> Response<Body> {
    let mut problem = problem.with_header(RETRY_AFTER, verdict.retry_after_secs.to_string());
    if !verdict.policy_header.is_empty() {
        problem = problem
            .with_header(RATELIMIT_POLICY, verdict.policy_header.clone())
            .with_header(RATELIMIT, verdict.status_header.clone());
    }
    respond::problem(ctx, problem)
}
