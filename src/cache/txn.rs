//! One request's transaction with the cache, from lookup to stored entry.
//!
//! ```text
//! Cache::begin ──▶ Off | Bypass                        (nothing more to do)
//!              ├─▶ Hit | Stale ──▶ Served              (answered; Stale may refresh)
//!              └─▶ Miss ──upstream_request()──▶ (validators of a kept entry)
//!                       ──response()──────────▶ Served (304 confirmed it / stale-if-error)
//!                                          └──▶ fill planned, labels on the response
//!                       ──body()…end()────────▶ stored in process, waiters woken
//!                       ──finish()────────────▶ AfterResponse (shared-tier write, lease)
//! ```
//!
//! The pipeline calls these in order and knows nothing of fills, flights or leases: it hands
//! over the origin's status, headers and body chunks, and serves what it is given back.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};

use super::entry::Entry;
use super::key::CacheKey;
use super::policy::CachePolicy;
use super::serve::{add_validators, Served};
use super::{Bypass, Cache, CacheRequest, Decision, Fill, FillStart, FlightGuard, SharedWrite};
use crate::header_rules::{CACHE_STATUS, X_CACHE};

/// Where a request stands with the cache.
#[derive(Default)]
pub enum Transaction {
    /// The route has no cache rule.
    #[default]
    Off,
    Bypass(Bypass),
    Hit,
    /// Served stale inside stale-while-revalidate (refreshed in the background).
    Stale,
    /// Forwarded to the origin.
    Miss(Box<Miss>),
}

/// A request the cache forwarded to the origin.
pub struct Miss {
    primary: CacheKey,
    /// When the request was forwarded, and the purge sequence then.
    start: FillStart,
    /// Captures the response when it may be stored.
    fill: Option<Fill>,
    /// Held while this request leads the fetch for its key. Dropped — waking the requests that
    /// wait for it — as soon as its entry is stored, or the response turns out not storable.
    flight: Option<FlightGuard>,
    /// A stale entry still kept: revalidated with the origin when it has a validator, served
    /// when the origin fails inside its stale-if-error window.
    stale: Option<Arc<Entry>>,
    /// The upstream request carries the stale entry's validators.
    revalidating: bool,
    /// This instance holds the cross-instance fill lease for the key.
    lease: bool,
    /// A stored entry answered instead of the origin's response: `Some(true)` the origin
    /// confirmed it (`304`), `Some(false)` stale-if-error.
    answered: Option<bool>,
    /// Stored in process; to be written to the shared tier when the request ends.
    shared_write: Option<SharedWrite>,
}

/// What [`Cache::begin`] decided.
pub enum Begun {
    /// A stored entry answers.
    Serve {
        served: Served,
        /// Inside stale-while-revalidate, for the one request that refreshes it: what the
        /// refresh needs (see [`super::refresh`]).
        refresh: Option<RefreshTicket>,
    },
    /// Go to the origin.
    Forward,
}

/// The right to refresh one stale entry in the background.
pub struct RefreshTicket {
    pub primary: CacheKey,
    pub stale: Arc<Entry>,
    /// The purge sequence when the refresh was decided: a purge from now on makes it stale.
    pub stamp: u64,
    /// Held to the refresh's end, so this instance refreshes the key once at a time.
    pub flight: FlightGuard,
}

/// What is left to do once the response is over: the shared-tier write (unless it failed), then
/// the end of the fill lease.
pub struct AfterResponse {
    shared_write: Option<SharedWrite>,
    lease: Option<CacheKey>,
}

impl AfterResponse {
    pub async fn run(self, cache: Arc<Cache>) {
        if let Some(write) = self.shared_write {
            cache.store_shared(write).await;
        }
        if let Some(primary) = self.lease {
            cache.release_lease(&primary).await;
        }
    }
}

impl Cache {
    /// Starts a request's transaction: asks [`Cache::decide`] (which owns coalescing and
    /// leases) and, on a hit, says which entry answers.
    pub async fn begin(
        &self,
        policy: &CachePolicy,
        request: &CacheRequest<'_>,
    ) -> (Transaction, Begun) {
        match self.decide(policy, request).await {
            Decision::Hit(hit) => {
                let served = Served::hit(request, hit, false);
                let begun = Begun::Serve {
                    served,
                    refresh: None,
                };
                (Transaction::Hit, begun)
            }
            Decision::Stale {
                hit,
                primary,
                refresh,
            } => {
                let refresh = refresh.map(|flight| RefreshTicket {
                    primary,
                    stale: hit.entry.clone(),
                    stamp: self.fill_start().stamp,
                    flight,
                });
                let served = Served::hit(request, hit, true);
                let begun = Begun::Serve { served, refresh };
                (Transaction::Stale, begun)
            }
            Decision::Miss {
                primary,
                stale,
                flight,
                lease,
            } => {
                let miss = Miss {
                    primary,
                    start: self.fill_start(),
                    fill: None,
                    flight,
                    stale,
                    revalidating: false,
                    lease,
                    answered: None,
                    shared_write: None,
                };
                (Transaction::Miss(Box::new(miss)), Begun::Forward)
            }
            Decision::Bypass(reason) => (Transaction::Bypass(reason), Begun::Forward),
        }
    }

    /// Write-through: the response to a write that carries the target's full new
    /// representation, to be captured as the target's GET entry (`request` is the write seen as
    /// a GET), stamped with the write's purge sequence `stamp`. `None` when it may not be stored.
    pub fn write_through(
        &self,
        policy: &CachePolicy,
        request: &CacheRequest<'_>,
        response: &HeaderMap,
        stamp: u64,
    ) -> Option<Transaction> {
        let start = FillStart {
            sent_at: std::time::SystemTime::now(),
            stamp,
        };
        let (primary, fill) = self.plan_write_through(policy, request, response, start)?;
        Some(Transaction::Miss(Box::new(Miss {
            primary,
            start,
            fill: Some(fill),
            flight: None,
            stale: None,
            revalidating: false,
            lease: false,
            answered: None,
            shared_write: None,
        })))
    }
}

impl Transaction {
    /// For the access log and traces.
    pub fn label(&self) -> &'static str {
        match self {
            Transaction::Off => "-",
            Transaction::Bypass(_) => "bypass",
            Transaction::Hit => "hit",
            Transaction::Stale => "stale",
            Transaction::Miss(miss) => match miss.answered {
                Some(true) => "revalidated",
                Some(false) => "stale",
                None => "miss",
            },
        }
    }

    /// Whether the steps after the upstream read the client's request headers (a miss plans its
    /// fill from them).
    pub fn needs_request_headers(&self) -> bool {
        matches!(self, Transaction::Miss(_))
    }

    /// The upstream request is about to go: on a miss with a kept stale entry that has a
    /// validator, it becomes a revalidation — the entry's `ETag` / `Last-Modified` replace the
    /// client's own conditions (the client's are answered from the refreshed entry).
    pub fn upstream_request(&mut self, upstream_headers: &mut HeaderMap) {
        if let Transaction::Miss(miss) = self {
            if let Some(entry) = miss.stale.as_ref().filter(|e| e.has_validator()) {
                add_validators(entry, upstream_headers);
                miss.revalidating = true;
            }
        }
    }

    /// stale-if-error when the origin could not be reached or timed out (`status` 502 or 504):
    /// the stale entry kept for that answers. `None` when there is none.
    pub fn origin_failed(&mut self, request: &CacheRequest<'_>, status: u16) -> Option<Served> {
        if !matches!(status, 502 | 504) {
            return None;
        }
        let Transaction::Miss(miss) = self else {
            return None;
        };
        let entry = miss.stale.clone().filter(|e| Cache::usable_on_error(e))?;
        miss.answered = Some(false);
        miss.flight = None;
        Some(Served::stale_on_error(request, entry))
    }

    /// The origin's response head arrived: plans the fill and labels the response
    /// (`Cache-Status`, `X-Cache`). Returns the stored entry that answers instead of the
    /// origin's response, when one does (a `304` to a revalidation, stale-if-error on a 5xx).
    pub fn response(
        &mut self,
        cache: &Cache,
        policy: &CachePolicy,
        request: &CacheRequest<'_>,
        status: u16,
        headers: &mut HeaderMap,
    ) -> Option<Served> {
        match self {
            Transaction::Miss(miss) => {
                if let Some(entry) = miss.stale.clone() {
                    if miss.revalidating && status == 304 {
                        let (entry, shared) = cache.revalidated(
                            policy,
                            &miss.primary,
                            request,
                            &entry,
                            headers,
                            miss.start,
                        );
                        miss.answered = Some(true);
                        miss.shared_write = shared;
                        miss.flight = None;
                        return Some(Served::revalidated(request, entry));
                    }
                    if status >= 500 && Cache::usable_on_error(&entry) {
                        miss.answered = Some(false);
                        miss.flight = None;
                        return Some(Served::stale_on_error(request, entry));
                    }
                }
                let fill =
                    cache.plan_fill(policy, &miss.primary, request, status, headers, miss.start);
                let label = if fill.is_some() {
                    "cachegate; fwd=miss; stored"
                } else {
                    "cachegate; fwd=miss"
                };
                headers.insert(CACHE_STATUS, HeaderValue::from_static(label));
                headers.insert(X_CACHE, HeaderValue::from_static("MISS"));
                cache.note_storable(&miss.primary, fill.is_some());
                if fill.is_none() {
                    // Nothing will be stored: the waiting requests go to the origin now.
                    miss.flight = None;
                }
                miss.fill = fill;
            }
            Transaction::Bypass(reason) => {
                if let Ok(value) =
                    HeaderValue::from_str(&format!("cachegate; fwd=bypass; detail={reason}"))
                {
                    headers.insert(CACHE_STATUS, value);
                }
                headers.insert(X_CACHE, HeaderValue::from_static("BYPASS"));
            }
            Transaction::Off | Transaction::Hit | Transaction::Stale => {}
        }
        None
    }

    /// A body chunk of the origin's response: captured for the fill, which is given up past
    /// `max_object`.
    pub fn body(&mut self, chunk: &Bytes) {
        if let Transaction::Miss(miss) = self {
            if let Some(fill) = miss.fill.as_mut() {
                if !fill.push(chunk) {
                    miss.fill = None;
                    miss.flight = None;
                }
            }
        }
    }

    /// The origin's body ended: the entry is stored in process — before the client has read
    /// it — and the requests waiting for this fill wake at once.
    pub fn end(&mut self, cache: &Cache) {
        if let Transaction::Miss(miss) = self {
            if let Some(mut fill) = miss.fill.take() {
                fill.complete = true;
                miss.shared_write = cache.store_local(fill).and_then(|(_, shared)| shared);
            }
            miss.flight = None;
        }
    }

    /// The request is over (`failed`: its response did not reach the client whole): what
    /// remains for the cache, if anything (see [`AfterResponse`]).
    pub fn finish(&mut self, failed: bool) -> Option<AfterResponse> {
        let Transaction::Miss(miss) = self else {
            return None;
        };
        miss.flight = None;
        let shared_write = miss.shared_write.take().filter(|_| !failed);
        let lease = std::mem::take(&mut miss.lease).then(|| miss.primary.clone());
        (shared_write.is_some() || lease.is_some()).then_some(AfterResponse {
            shared_write,
            lease,
        })
    }
}
