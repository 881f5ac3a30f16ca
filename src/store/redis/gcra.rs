//! Rate limiting on Redis: the GCRA script for every limit of a request at once (on a cluster,
//! one call per limit, all sent together, and a refund when one refuses).

use super::{Backend, RedisStore};
use crate::store::gcra::{GcraOutcome, GcraRequest};
use crate::store::StoreError;

impl RedisStore {
    /// One `EVALSHA` (reloading on `NOSCRIPT`) for all limits on a single Redis. On a cluster the
    /// limits' keys live in different slots, so each limit is one `EVALSHA`, all sent at once
    /// (still one round trip of waiting, each limit exact); when one refuses, the units the
    /// others took are given back in a second round trip, so a refused request counts nowhere.
    pub(super) async fn gcra(
        &self,
        limits: &[GcraRequest],
        consume: bool,
    ) -> Result<Vec<GcraOutcome>, StoreError> {
        let script = &self.gcra;
        let budget = self.options.budget;
        // On a cluster, the breaker of the first limit's node guards the call.
        let first_key = limits.first().map_or("", |l| l.key.as_str());
        match &self.backend {
            Backend::Single { .. } => {
                let values: Vec<i64> = self
                    .guarded("rate_limit", budget, first_key, |mut c| async move {
                        let mut invocation = script.prepare_invoke();
                        invocation.arg(u8::from(consume));
                        for limit in limits {
                            invocation
                                .key(&limit.key)
                                .arg(limit.interval_us)
                                .arg(limit.burst);
                        }
                        invocation.invoke_async(&mut c).await
                    })
                    .await?;
                Ok(outcomes_from(&values))
            }
            Backend::Cluster { .. } => {
                let values: Vec<Vec<i64>> = self
                    .guarded("rate_limit", budget, first_key, |c| async move {
                        let calls = limits.iter().map(|limit| {
                            let mut c = c.clone();
                            async move {
                                script
                                    .key(&limit.key)
                                    .arg(u8::from(consume))
                                    .arg(limit.interval_us)
                                    .arg(limit.burst)
                                    .invoke_async::<Vec<i64>>(&mut c)
                                    .await
                            }
                        });
                        futures_util::future::try_join_all(calls).await
                    })
                    .await?;
                let outcomes: Vec<GcraOutcome> =
                    values.iter().flat_map(|v| outcomes_from(v)).collect();
                if consume && outcomes.iter().any(|o| !o.allowed) {
                    // All or nothing, as on a single Redis: give back what the admitting limits took.
                    let refund = &self.refund;
                    let admitted: Vec<&GcraRequest> = limits
                        .iter()
                        .zip(&outcomes)
                        .filter(|(_, o)| o.allowed)
                        .map(|(l, _)| l)
                        .collect();
                    let refunded = self
                        .guarded("rate_limit_refund", budget, first_key, |c| async move {
                            let calls = admitted.into_iter().map(|limit| {
                                let mut c = c.clone();
                                async move {
                                    refund
                                        .key(&limit.key)
                                        .arg(limit.interval_us)
                                        .invoke_async::<i64>(&mut c)
                                        .await
                                }
                            });
                            futures_util::future::try_join_all(calls).await
                        })
                        .await;
                    if let Err(e) = refunded {
                        tracing::debug!(error = %e, "rate limit: refund after a refusal failed");
                    }
                }
                Ok(outcomes)
            }
        }
    }
}

fn outcomes_from(values: &[i64]) -> Vec<GcraOutcome> {
    values
        .chunks_exact(4)
        .map(|v| GcraOutcome {
            allowed: v[0] == 1,
            remaining: u32::try_from(v[1].max(0)).unwrap_or(u32::MAX),
            reset_us: v[2].max(0) as u64,
            retry_after_us: v[3].max(0) as u64,
        })
        .collect()
}
