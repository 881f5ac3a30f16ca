//! A JWKS (RFC 7517) fetched over HTTP(S) with a hyper-util client, kept in memory, refreshed in
//! the background and on unknown key ids — with a floor between fetches, so a flood of made-up
//! `kid`s cannot hammer the identity provider. A failed fetch keeps the last good key set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::jwk::JwkSet;

use super::keys::VerifyKey;

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// While no key set was ever loaded, retry this often.
const RETRY_UNTIL_LOADED: Duration = Duration::from_secs(2);

type HttpsClient = crate::http_client::HttpsClient<Empty<Bytes>>;

pub struct JwksSource {
    /// The JWKS URL, or the OpenID issuer when `discover` is set.
    url: String,
    discover: bool,
    client: HttpsClient,
    keys: ArcSwap<Vec<Arc<VerifyKey>>>,
    loaded: AtomicBool,
    last_fetch: Mutex<Option<Instant>>,
    /// Serialises fetches, so concurrent unknown-kid requests share one.
    fetching: tokio::sync::Mutex<()>,
    pub refresh_interval: Duration,
    min_refresh_interval: Duration,
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksSource")
            .field("url", &self.url)
            .finish()
    }
}

/// Why a key set could not be fetched (the previous set, if any, stays in use).
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("invalid URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{url:?} must be an http:// or https:// URL")]
    NotHttp { url: String },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("GET {url} failed: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("GET {url} answered {status}")]
    Status {
        url: String,
        status: http::StatusCode,
    },
    #[error("GET {url} timed out after {FETCH_TIMEOUT:?}")]
    Timeout { url: String },
    #[error("{url} is not {expected}: {reason}")]
    Malformed {
        url: String,
        expected: &'static str,
        reason: String,
    },
    #[error("{url} names no jwks_uri")]
    NoJwksUri { url: String },
    #[error("{url} holds no usable public key")]
    NoKeys { url: String },
}

impl JwksSource {
    pub fn new(
        url: &str,
        discover: bool,
        ca_file: Option<&str>,
        refresh_interval: Duration,
        min_refresh_interval: Duration,
    ) -> Result<JwksSource, JwksError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| JwksError::BadUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(JwksError::NotHttp {
                url: url.to_owned(),
            });
        }
        Ok(JwksSource {
            url: url.trim_end_matches('/').to_owned(),
            discover,
            client: crate::http_client::client(ca_file)?,
            keys: ArcSwap::from_pointee(Vec::new()),
            loaded: AtomicBool::new(false),
            last_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            refresh_interval,
            min_refresh_interval,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn keys(&self) -> Arc<Vec<Arc<VerifyKey>>> {
        self.keys.load_full()
    }

    /// Takes over another source's key set (same URL, previous configuration), so a reload
    /// does not have to fetch before it can verify.
    pub fn adopt(&self, previous: &JwksSource) {
        if previous.is_loaded() {
            self.keys.store(previous.keys());
            self.loaded.store(true, Ordering::Relaxed);
            *self.last_fetch.lock().expect("jwks mutex") =
                *previous.last_fetch.lock().expect("jwks mutex");
        }
    }

    /// Whether a key set was ever loaded.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }

    async fn get_json(&self, url: &str) -> Result<serde_json::Value, JwksError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| JwksError::BadUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        let unreachable = |reason: String| JwksError::Unreachable {
            url: url.to_owned(),
            reason,
        };
        let request = async {
            let resp = self
                .client
                .get(uri)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            if !resp.status().is_success() {
                return Err(JwksError::Status {
                    url: url.to_owned(),
                    status: resp.status(),
                });
            }
            let body = Limited::new(resp.into_body(), MAX_DOCUMENT_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the body: {e}")))?
                .to_bytes();
            serde_json::from_slice(&body).map_err(|e| JwksError::Malformed {
                url: url.to_owned(),
                expected: "JSON",
                reason: e.to_string(),
            })
        };
        tokio::time::timeout(FETCH_TIMEOUT, request)
            .await
            .map_err(|_| JwksError::Timeout {
                url: url.to_owned(),
            })?
    }

    /// Fetches the key set now and swaps it in; on failure the previous set stays.
    pub async fn fetch(&self) -> Result<usize, JwksError> {
        let _one_at_a_time = self.fetching.lock().await;
        self.fetch_locked().await
    }

    /// [`JwksSource::fetch`], for a caller holding `fetching`.
    async fn fetch_locked(&self) -> Result<usize, JwksError> {
        *self.last_fetch.lock().expect("jwks mutex") = Some(Instant::now());
        let jwks_url = if self.discover {
            let discovery = format!("{}/.well-known/openid-configuration", self.url);
            let document = self.get_json(&discovery).await?;
            document["jwks_uri"]
                .as_str()
                .ok_or_else(|| JwksError::NoJwksUri {
                    url: discovery.clone(),
                })?
                .to_owned()
        } else {
            self.url.clone()
        };
        let document = self.get_json(&jwks_url).await?;
        let set: JwkSet = serde_json::from_value(document).map_err(|e| JwksError::Malformed {
            url: jwks_url.clone(),
            expected: "a JWK set",
            reason: e.to_string(),
        })?;
        let keys: Vec<Arc<VerifyKey>> = set
            .keys
            .iter()
            .filter_map(VerifyKey::from_jwk)
            .map(Arc::new)
            .collect();
        if keys.is_empty() {
            return Err(JwksError::NoKeys { url: jwks_url });
        }
        let count = keys.len();
        self.keys.store(Arc::new(keys));
        if !self.loaded.swap(true, Ordering::Relaxed) {
            tracing::info!(url = %jwks_url, keys = count, "auth: JWKS loaded");
        }
        Ok(count)
    }

    /// Fetches again if the last fetch is older than the floor; returns whether the key set may
    /// have changed since the caller looked (it fetched, or another caller fetched meanwhile).
    /// Called when a token names a key id the current set lacks. Single-flight: concurrent
    /// callers wait for one fetch instead of each starting their own.
    pub async fn refresh_for_unknown_kid(&self) -> bool {
        let asked_at = Instant::now();
        let _one_at_a_time = self.fetching.lock().await;
        let last = *self.last_fetch.lock().expect("jwks mutex");
        if last.is_some_and(|at| at >= asked_at) {
            return true;
        }
        if last.is_some_and(|at| at.elapsed() < self.min_refresh_interval) {
            return false;
        }
        match self.fetch_locked().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "auth: JWKS refresh failed; keeping the last good key set");
                false
            }
        }
    }

    /// Keeps the key set fresh until the source is dropped.
    pub async fn run(source: std::sync::Weak<JwksSource>) {
        loop {
            let Some(this) = source.upgrade() else { return };
            let wait = match this.fetch().await {
                Ok(_) => this.refresh_interval,
                Err(e) => {
                    tracing::warn!(url = %this.url, error = %e, "auth: JWKS fetch failed; keeping the last good key set");
                    if this.is_loaded() {
                        this.refresh_interval
                            .min(this.min_refresh_interval.max(RETRY_UNTIL_LOADED))
                    } else {
                        RETRY_UNTIL_LOADED
                    }
                }
            };
            drop(this);
            tokio::time::sleep(wait).await;
        }
    }
}
