//! Finding the entry that answers a request: the in-process tier, then the shared one, each
//! entry judged by its state (fresh, stale-while-revalidate, kept stale, gone) and by the purges
//! ([`Cache::lookup`]); then coalescing — one fetch per key in process, a fill lease across
//! instances — for what was not found ([`Cache::decide`]).

use std::sync::Arc;

use http::header::{HeaderName, AGE};
use http::Method;

use super::coalesce::{Flight, COALESCE_WAIT};
use super::directives::CacheControl;
use super::entry::Entry;
use super::key::CacheKey;
use super::policy::CachePolicy;
use super::{
    directives, freshness, now_ms, shared, Bounds, Bypass, Cache, CacheRequest, FlightGuard, Hit,
    Tier,
};
use crate::purge::Currency;

pub enum Lookup {
    Hit(Hit),
    /// Past freshness but inside stale-while-revalidate: serve it now, and refresh `primary` in
    /// the background (see `lead_or_follow`, so only once).
    StaleWhileRevalidate {
        hit: Hit,
        primary: CacheKey,
    },
    /// Not stored (or stale): forward, and maybe fill under `primary`. `stale` is a stale entry
    /// still kept: to revalidate if it has a validator, to answer with inside its
    /// stale-if-error window if the origin fails.
    Miss {
        primary: CacheKey,
        stale: Option<Arc<Entry>>,
    },
    /// The cache does not apply to this request; says why.
    Bypass(Bypass),
}

/// What the cache decides for one request, coalescing included (see [`Cache::decide`]).
pub enum Decision {
    /// A fresh entry answers: from a tier, or filled meanwhile by the request this one waited
    /// for (`tier` is then `coalesced`).
    Hit(Hit),
    /// Inside stale-while-revalidate: serve `hit` now. `refresh` is `Some` for the one request
    /// that should refresh it in the background (hold the guard until the refresh ends).
    Stale {
        hit: Hit,
        primary: CacheKey,
        refresh: Option<FlightGuard>,
    },
    /// Forward to the origin, and maybe fill under `primary` (see [`Lookup::Miss`] for `stale`).
    /// `flight`: held by the request that leads this key's fetch — dropping it wakes the waiting
    /// requests, so drop it as soon as the entry is stored or found not storable. `lease`: this
    /// instance holds the cross-instance fill lease; release it ([`Cache::release_lease`]) when
    /// the fill is written.
    Miss {
        primary: CacheKey,
        stale: Option<Arc<Entry>>,
        flight: Option<FlightGuard>,
        lease: bool,
    },
    Bypass(Bypass),
}

/// Where an entry stands at a moment (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Fresh,
    WhileRevalidate,
    /// Kept for revalidation or stale-if-error.
    Stale,
    Gone,
}

fn state(entry: &Entry, now: u64) -> State {
    let fresh_until = entry.fresh_until_ms();
    if now < fresh_until {
        State::Fresh
    } else if now < fresh_until.saturating_add(entry.stale_while_revalidate_ms) {
        State::WhileRevalidate
    } else if now < fresh_until.saturating_add(entry.retained_ms()) {
        State::Stale
    } else {
        State::Gone
    }
}

fn hit(tier: Tier, entry: Arc<Entry>, now: u64) -> Hit {
    let ttl_ms = i128::from(entry.fresh_until_ms()) - i128::from(now);
    Hit {
        tier,
        age_secs: age_at(&entry, now),
        // Rounded toward minus infinity: an entry 0.3 s past freshness has `ttl=-1`.
        ttl_secs: i64::try_from(ttl_ms.div_euclid(1000)).unwrap_or(i64::MAX),
        entry,
    }
}

/// The age of an entry at `now`, in seconds: its age when stored plus its time here.
pub(super) fn age_at(entry: &Entry, now: u64) -> u64 {
    let stored_age = entry
        .headers
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(directives::delta_seconds)
        .map_or(0, |d| d.as_secs());
    stored_age
        .saturating_add(now.saturating_sub(entry.stored_at_ms) / 1000)
        .min(directives::MAX_DELTA.as_secs())
}

impl Cache {
    /// Whether an in-process entry may be served: by what this instance knows of the purges
    /// when it holds its coherence lease, else by the marks in Redis (see
    /// [`crate::purge::coherence`]).
    async fn is_current(&self, entry: &Entry) -> bool {
        match self
            .purger
            .currency(entry.stamp, &entry.path, &entry.depends_on)
        {
            Currency::Current => true,
            Currency::Purged => false,
            Currency::Unverified => {
                self.purger
                    .verify(entry.stamp, &entry.path, &entry.depends_on)
                    .await
            }
        }
    }

    /// Finds a fresh entry for a request (in process, then in the shared tier), or says why the
    /// cache does not apply.
    pub async fn lookup(&self, policy: &CachePolicy, request: &CacheRequest<'_>) -> Lookup {
        let primary = match Cache::admit(policy, request) {
            Ok(primary) => primary,
            Err(reason) => return Lookup::Bypass(reason),
        };
        let Bounds {
            authorized: authorized_bound,
            cookie: cookie_bound,
        } = Cache::bounds(policy, request);
        let now = now_ms();
        let known_vary = self.memory.vary_of(primary.local());
        let vary: &[HeaderName] = known_vary.as_deref().map_or(&policy.vary, |v| v.as_slice());
        let variant = primary.variant(vary, request.headers);
        let for_this_request = |e: &Entry| {
            if !(cookie_bound || authorized_bound) {
                return true;
            }
            let cc = CacheControl::parse_response(&e.headers, &policy.targeted);
            (!cookie_bound || freshness::shared_for_everyone(&cc))
                && (!authorized_bound || freshness::shared_despite_authorization(&cc))
        };
        let in_memory = match self.memory.get(variant.local()) {
            Some(e) if state(&e, now) == State::Gone => {
                self.memory.remove(variant.local());
                None
            }
            Some(e) if for_this_request(&e) && self.is_current(&e).await => Some(e),
            _ => None,
        };
        if let Some(entry) = in_memory.as_ref().filter(|e| state(e, now) == State::Fresh) {
            return Lookup::Hit(hit(Tier::Memory, entry.clone(), now));
        }
        // Not fresh in process: another instance may have stored a newer one.
        let shared = match self
            .lookup_shared(&primary, known_vary.is_none(), variant, request)
            .await
            .filter(|(_, e)| state(e, now) != State::Gone && for_this_request(e))
        {
            Some((key, entry))
                if self
                    .purger
                    .is_current_shared(entry.stamp, &entry.path, &entry.depends_on)
                    .await =>
            {
                Some((key, entry))
            }
            _ => None,
        };
        let (tier, entry) = match (in_memory, shared) {
            (Some(local), Some((key, remote))) => {
                if remote.stored_at_ms > local.stored_at_ms {
                    self.memory.insert(key, remote.clone());
                    (Tier::Redis, remote)
                } else {
                    (Tier::Memory, local)
                }
            }
            (Some(local), None) => (Tier::Memory, local),
            (None, Some((key, remote))) => {
                self.memory.insert(key, remote.clone());
                (Tier::Redis, remote)
            }
            (None, None) => {
                return Lookup::Miss {
                    primary,
                    stale: None,
                }
            }
        };
        match state(&entry, now) {
            State::Fresh => Lookup::Hit(hit(tier, entry, now)),
            State::WhileRevalidate => Lookup::StaleWhileRevalidate {
                hit: hit(tier, entry, now),
                primary,
            },
            State::Stale | State::Gone => Lookup::Miss {
                primary,
                stale: Some(entry),
            },
        }
    }

    /// The cache's whole answer for a request: [`Cache::lookup`], then on a miss the coalescing —
    /// in this process one request per key leads the fetch and the others wait for its entry
    /// (bounded by [`COALESCE_WAIT`]); across instances the leader takes a lease, and when
    /// another instance holds it, waits for that instance's entry in the shared tier. A resource
    /// whose last answer could not be stored is fetched without waiting (hit-for-miss).
    pub async fn decide(&self, policy: &CachePolicy, request: &CacheRequest<'_>) -> Decision {
        let (primary, stale) = match self.lookup(policy, request).await {
            Lookup::Hit(hit) => return Decision::Hit(hit),
            Lookup::Bypass(reason) => return Decision::Bypass(reason),
            Lookup::StaleWhileRevalidate { hit, primary } => {
                let refresh = match self.lead_or_follow(&primary) {
                    Flight::Leader(guard) => Some(guard),
                    Flight::Follower(_) => None,
                };
                return Decision::Stale {
                    hit,
                    primary,
                    refresh,
                };
            }
            Lookup::Miss { primary, stale } => (primary, stale),
        };
        let fetching = *request.method == Method::GET;
        let mut lease = false;
        let flight = match self.join_flight(&primary) {
            None => None,
            // Waiting for another instance's entry that could not be used or stored would only
            // hold the read until the other's fill lease ends: fetch instead.
            Some(Flight::Leader(guard)) if fetching && !self.may_wait_for_others(&primary) => {
                Some(guard)
            }
            Some(Flight::Leader(guard)) if fetching => {
                lease = self.take_lease(&primary).await;
                if !lease {
                    if let Some(mut hit) = self.wait_for_shared(policy, request).await {
                        hit.tier = Tier::Coalesced;
                        return Decision::Hit(hit);
                    }
                }
                Some(guard)
            }
            Some(Flight::Leader(_)) => None,
            Some(Flight::Follower(mut done)) => {
                // The leader's sender is dropped the moment its entry is stored or found not
                // storable; then look again.
                let _ = tokio::time::timeout(COALESCE_WAIT, done.changed()).await;
                if let Lookup::Hit(mut hit) = self.lookup(policy, request).await {
                    hit.tier = Tier::Coalesced;
                    return Decision::Hit(hit);
                }
                None
            }
        };
        Decision::Miss {
            primary,
            stale,
            flight,
            lease,
        }
    }

    /// Whether waiting for another instance's fill can pay off: not while this instance has no
    /// coherence lease (it could not serve the other's entry unverified), nor while the shared
    /// tier's node for the entry is failing (the other could not store it).
    fn may_wait_for_others(&self, primary: &CacheKey) -> bool {
        let Some(store) = &self.shared else {
            return true;
        };
        self.purger.coherent() != Some(false) && !store.is_failing(&shared::entry_key(primary))
    }
}
