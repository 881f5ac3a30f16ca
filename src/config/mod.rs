//! Configuration: the TOML schema, parsing with `${ENV}` interpolation, and validation whose
//! errors name `file:line:col`.
//!
//! Parsing gives a [`Config`], which mirrors the file. Compiling it into what requests use (the
//! route table, the upstream group) happens in [`crate::snapshot`]; errors from there are located
//! in the same file through the spans kept here.

mod auth;
mod cache;
mod error;
mod purge;
mod ratelimit;
mod validate;
pub mod values;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

pub use auth::{
    AuthConfig, AuthMode, AuthPolicyConfig, AuthPolicyConfigOrMode, OneOrMany, ProviderConfig,
};
pub use cache::{AnonymousCache, CacheConfig, CachePolicyConfig, CacheScope, QueryConfig};
pub use error::{line_col, ConfigError, ConfigErrors, Invalid, SpanError};
pub use purge::{PurgeConfig, PurgeConfigOrPaths};
pub use ratelimit::{KeyConfig, LimitConfig, OnStoreError, RateLimitConfig, RateLimitPolicyConfig};
pub use values::{ByteSize, Dur, EnvString};

/// The JSON Schema of the configuration file (`cachegate schema`), generated from the types the
/// loader deserializes, so the two cannot disagree on a key. Editors using taplo validate and
/// complete the file from it (`#:schema ./cachegate.schema.json` on its first line).
pub fn json_schema() -> String {
    let mut schema = schemars::schema_for!(Config);
    schema.insert("title".to_owned(), "cachegate configuration".into());
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema serializes");
    text.push('\n');
    text
}

/// The largest `max_request_header_bytes` accepted: hyper's read buffer is sized just above it.
pub const MAX_HEADER_LIMIT: u64 = 1_048_575;

/// The whole configuration file.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// Where clients connect. At least one.
    #[schemars(with = "Vec<ListenerConfig>")]
    pub listeners: Spanned<Vec<ListenerConfig>>,
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Shared state (cache entries, rate counters). Without it: the in-process memory store.
    pub store: Option<StoreConfig>,
    /// The policy for requests no route matches; routes start from it.
    #[serde(default)]
    pub defaults: PolicyConfig,
    /// Routes in order. The most specific path wins; for equal paths, the first whose methods match.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Token verification for routes whose `auth` asks for it.
    #[schemars(with = "Option<AuthConfig>")]
    pub auth: Option<Spanned<AuthConfig>>,
    /// The in-process cache tier.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Settings shared by the rate-limit policies.
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    /// The admin listener (health, readiness). Absent: no admin listener.
    pub admin: Option<AdminConfig>,
    /// Tracing: span export.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// Trace export (W3C trace context is always propagated; see [`crate::trace`]).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP endpoint receiving one span per request, e.g. `http://127.0.0.1:4318` (the
    /// `/v1/traces` path is added when the URL has none). Unset: no export. Read at start.
    #[schemars(with = "Option<EnvString>")]
    pub otlp_endpoint: Option<Spanned<EnvString>>,
    /// The `service.name` of the exported spans.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "cachegate".to_owned(),
        }
    }
}

/// A separate listener for operators.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `ip:port`; keep it on loopback or a private network.
    #[schemars(with = "EnvString")]
    pub address: Spanned<EnvString>,
    /// Bearer token for `/metrics` and for anything that changes state (`POST /reload`).
    /// Without it, state-changing endpoints are refused. `/healthz` and `/readyz` stay open.
    pub token: Option<EnvString>,
    /// Also accept `PURGE <url>` on the main listeners, authorised by this token as a bearer
    /// token. Off by default; needs `token`.
    #[schemars(with = "Option<bool>")]
    pub purge_method: Option<Spanned<bool>>,
}

/// Process-level settings for the server.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Worker threads serving requests. Default: the number of CPUs.
    #[schemars(with = "Option<usize>")]
    pub threads: Option<Spanned<usize>>,
    /// On SIGTERM, how long in-flight requests may keep running after listeners close.
    pub grace_period: Dur,
    /// After the grace period, how long the runtime gets to finish before the process exits.
    pub shutdown_timeout: Dur,
    /// `"text"` (the default) or `"json"`; `--log-format` overrides it.
    pub log_format: Option<LogFormat>,
    /// Peers (CIDRs) whose `X-Forwarded-For` / `Forwarded` headers name the real client. From
    /// anyone else those headers are ignored when deciding the client IP.
    #[schemars(with = "Vec<String>")]
    pub trusted_proxies: Vec<Spanned<String>>,
    /// Paths differing only in letter case are one resource to the origin (`/Kit/RL` is
    /// `/kit/rl`); the origin then receives them in lower case.
    pub case_insensitive_paths: bool,
    /// `"ignore"` (default) or `"significant"`.
    pub trailing_slash: TrailingSlash,
    /// `"reject"` (default) or `"strip"`.
    pub path_parameters: PathParameters,
    /// `"reject"` (default) or `"keep"`.
    pub encoded_slash: EncodedSlash,
    /// Method- and URL-override headers (`X-HTTP-Method-Override`, `X-Original-URL`, ...) the
    /// origin relies on. Others are removed; a cached route's request carrying one of these
    /// bypasses the cache unless the rule's `vary` names it.
    pub forward_override_headers: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            threads: None,
            grace_period: Dur(std::time::Duration::from_secs(10)),
            shutdown_timeout: Dur(std::time::Duration::from_secs(5)),
            log_format: None,
            trusted_proxies: Vec::new(),
            case_insensitive_paths: false,
            trailing_slash: TrailingSlash::default(),
            path_parameters: PathParameters::default(),
            encoded_slash: EncodedSlash::default(),
            forward_override_headers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `ip:port` to listen on, for example `"127.0.0.1:8080"` or `"[::]:443"`.
    #[schemars(with = "EnvString")]
    pub address: Spanned<EnvString>,
    /// Terminate TLS on this listener.
    pub tls: Option<TlsListenerConfig>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsListenerConfig {
    /// PEM certificate chain, leaf first.
    #[schemars(with = "EnvString")]
    pub cert_file: Spanned<EnvString>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[schemars(with = "EnvString")]
    pub key_file: Spanned<EnvString>,
    /// Offer HTTP/2 by ALPN (HTTP/1.1 is always offered).
    #[serde(default = "default_true")]
    pub http2: bool,
}

pub(crate) fn default_true() -> bool {
    true
}

/// The one upstream group requests are proxied to.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Origin URLs, `http://host:port` or `https://host:port`, used in round robin.
    #[schemars(with = "Vec<EnvString>")]
    pub addresses: Spanned<Vec<Spanned<EnvString>>>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Longest wait for any read from the upstream (headers or a body chunk); past it: `504`.
    #[serde(default = "default_io_timeout")]
    pub read_timeout: Dur,
    /// Longest wait for any write to the upstream.
    #[serde(default = "default_io_timeout")]
    pub write_timeout: Dur,
    /// How long an idle keep-alive connection to the upstream is used, unless the origin
    /// announces its own limit (`Keep-Alive: timeout=N`: then N less a second). Below the idle
    /// timeouts of common origin servers (gunicorn 2 s, uvicorn and Node 5 s): a request sent on
    /// a connection the origin is closing fails, and a write cannot be sent again.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
    /// PEM file of CA certificates trusted for `https://` upstreams instead of the system roots.
    #[schemars(with = "Option<EnvString>")]
    pub tls_ca_file: Option<Spanned<EnvString>>,
    /// Most requests in flight to one origin address (each on its own connection). Default:
    /// 1024, or the origin's share of half the open-file limit when that is smaller.
    pub max_connections: Option<usize>,
    /// Most requests waiting (up to `connect_timeout`) for one of those; past it: `503`.
    #[serde(default = "default_max_pending")]
    pub max_pending_requests: usize,
}

fn default_max_pending() -> usize {
    1024
}

fn default_connect_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(2))
}
fn default_io_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}
fn default_idle_timeout() -> Dur {
    Dur(std::time::Duration::from_millis(1500))
}

/// Request size limits, enforced before anything reaches the upstream.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Request line plus headers; larger requests get `431`.
    #[schemars(with = "ByteSize")]
    pub max_request_header_bytes: Spanned<ByteSize>,
    /// Request body; larger bodies get `413`.
    pub max_request_body_bytes: ByteSize,
    /// A request body must arrive at least this fast (bytes per second, on average from the first
    /// time it waits for the client, after a grace of `request_head_timeout`); slower: `408`.
    /// `"0"`: no minimum.
    pub min_request_body_rate: ByteSize,
    /// From accept to the first request's complete head, and from a later head's first byte to
    /// its end; past it the connection is closed.
    pub request_head_timeout: Dur,
    /// From accept to the end of the TLS handshake.
    pub tls_handshake_timeout: Dur,
    /// How long a client connection with nothing in flight stays open.
    pub keepalive_timeout: Dur,
    /// How long a client may read nothing of a response before its connection is closed.
    pub send_timeout: Dur,
    /// Connections each listener holds at most. Default: half the open-file limit (raised to its
    /// hard limit at start) shared among the listeners.
    pub max_connections: Option<usize>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let secs = |s| Dur(std::time::Duration::from_secs(s));
        LimitsConfig {
            max_request_header_bytes: Spanned::new(0..0, ByteSize(64 * 1024)),
            max_request_body_bytes: ByteSize(100 * 1024 * 1024),
            min_request_body_rate: ByteSize(500),
            request_head_timeout: secs(30),
            tls_handshake_timeout: secs(10),
            keepalive_timeout: secs(75),
            send_timeout: secs(30),
            max_connections: None,
        }
    }
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    #[schemars(with = "Option<EnvString>")]
    pub redis_url: Option<Spanned<EnvString>>,
    /// Seed nodes of a Redis Cluster, instead of `redis_url`.
    #[schemars(with = "Option<Vec<EnvString>>")]
    pub redis_cluster: Option<Spanned<Vec<EnvString>>>,
    /// PEM CA certificates trusted for `rediss://` instead of the system roots.
    #[schemars(with = "Option<EnvString>")]
    pub tls_ca_file: Option<Spanned<EnvString>>,
    /// Longest a request waits for the store; past it the store counts as failed for that request.
    #[serde(default = "default_store_timeout")]
    pub timeout: Dur,
    /// Consecutive failures that open the circuit: the store is then not asked at all...
    #[serde(default = "default_circuit_failures")]
    pub circuit_failures: u32,
    /// ...for this long, after which one request tries it again.
    #[serde(default = "default_circuit_open")]
    pub circuit_open: Dur,
    /// How long an instance trusts that it has heard every purge since it last proved so to
    /// Redis (it proves it several times per lease). A write whose purge an instance did not
    /// acknowledge is held until that instance's lease has run out.
    #[serde(default = "default_coherence_lease")]
    pub coherence_lease: Dur,
    /// `"0s"` (the default): a read that starts after a write returned never sees older data,
    /// whatever Redis does; writes wait while Redis is unreachable. Longer: while Redis is
    /// unreachable, instances may serve what they hold, and writes return without reaching the
    /// other instances, for at most this long.
    #[serde(default)]
    pub may_serve_stale_for: Dur,
    /// Longest a write waits for its purge to reach Redis (before it is sent to the origin, and
    /// after); past it the client gets a 503 problem saying what happened.
    #[serde(default = "default_max_write_hold")]
    pub max_write_hold: Dur,
}

fn default_coherence_lease() -> Dur {
    Dur(std::time::Duration::from_millis(500))
}
fn default_max_write_hold() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}

fn default_store_timeout() -> Dur {
    Dur(std::time::Duration::from_millis(25))
}
fn default_circuit_failures() -> u32 {
    3
}
fn default_circuit_open() -> Dur {
    Dur(std::time::Duration::from_secs(2))
}

/// Per-request policy sections. Later versions fill these; today each is rejected when present.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `"required"`, `"optional"`, `"none"` (the default), or a table with scopes and claims to forward.
    #[schemars(with = "Option<AuthPolicyConfigOrMode>")]
    pub auth: Option<Spanned<AuthPolicyConfigOrMode>>,
    /// Limits every request of the route must fit in.
    #[schemars(with = "Option<RateLimitPolicyConfig>")]
    pub rate_limit: Option<Spanned<RateLimitPolicyConfig>>,
    /// Serve GET/HEAD from cache under this rule.
    #[schemars(with = "Option<CachePolicyConfig>")]
    pub cache: Option<Spanned<CachePolicyConfig>>,
    /// What a successful write invalidates.
    #[schemars(with = "Option<PurgeConfigOrPaths>")]
    pub purge: Option<Spanned<PurgeConfigOrPaths>>,
    /// Protocols a request may ask the origin to switch to (`Upgrade`), by name. Default:
    /// `["websocket"]`; `[]` passes none. `h2c` is never passed on.
    #[schemars(with = "Option<Vec<String>>")]
    pub upgrades: Option<Spanned<Vec<String>>>,
    /// `"pass"` (the default): requests no route matches are proxied under this policy.
    /// `"deny"`: they are refused with `404` (`405` when the path has routes for other methods).
    #[serde(default)]
    pub unmatched: Unmatched,
}

/// What happens to a request no route matches (`[defaults] unmatched`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// It is proxied under the `[defaults]` policy.
    #[default]
    Pass,
    /// It is refused: `404`, or `405` with `Allow` when its path has routes for other methods.
    Deny,
}

/// Whether `/a/` and `/a` are one resource to the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TrailingSlash {
    /// One resource (Express, Starlette, Rails and most frameworks): `/a/` is routed, keyed and
    /// forwarded as `/a`.
    #[default]
    Ignore,
    /// Two resources: the slash is kept.
    Significant,
}

/// What the gateway does with `;` path parameters (`/a;jsessionid=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PathParameters {
    /// `400`: origins disagree on what they mean.
    #[default]
    Reject,
    /// Removed from every segment, as servlet containers do, before routing and forwarding.
    Strip,
}

/// What the gateway does with an encoded slash (`%2F`) or a backslash in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodedSlash {
    /// `400`: some origins decode it into a separator.
    #[default]
    Reject,
    /// Kept as data inside its segment (for origins that never decode it).
    Keep,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in logs and metrics. Default: the path template.
    pub name: Option<String>,
    /// Path template: `/products`, `/products/{id}`, `/files/{*rest}`.
    #[schemars(with = "String")]
    pub path: Spanned<String>,
    /// Methods this route applies to, upper case. Default: all methods.
    #[schemars(with = "Option<Vec<String>>")]
    pub methods: Option<Vec<Spanned<String>>>,
    /// Replaces `defaults.auth` for this route.
    #[schemars(with = "Option<AuthPolicyConfigOrMode>")]
    pub auth: Option<Spanned<AuthPolicyConfigOrMode>>,
    /// Replaces `defaults.rate_limit` for this route.
    #[schemars(with = "Option<RateLimitPolicyConfig>")]
    pub rate_limit: Option<Spanned<RateLimitPolicyConfig>>,
    /// Replaces `defaults.cache` for this route.
    #[schemars(with = "Option<CachePolicyConfig>")]
    pub cache: Option<Spanned<CachePolicyConfig>>,
    /// Replaces `defaults.purge` for this route.
    #[schemars(with = "Option<PurgeConfigOrPaths>")]
    pub purge: Option<Spanned<PurgeConfigOrPaths>>,
    /// Replaces `defaults.upgrades` for this route.
    #[schemars(with = "Option<Vec<String>>")]
    pub upgrades: Option<Spanned<Vec<String>>>,
}

impl RouteConfig {
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.path.get_ref())
    }
}

/// A parsed file together with its source, so later stages can locate their errors.
#[derive(Debug)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub source: String,
    pub config: Config,
}

impl LoadedConfig {
    /// Reads and parses the file at `path`.
    pub fn from_file(path: &Path) -> Result<LoadedConfig, ConfigErrors> {
        let source = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors::whole_file(path, format!("cannot read the configuration file: {e}"))
        })?;
        Self::from_source(path, source)
    }

    /// Parses `source` as if read from `path`; [`LoadedConfig::validate`] checks the values.
    pub fn from_source(path: &Path, source: String) -> Result<LoadedConfig, ConfigErrors> {
        let config: Config = match toml::from_str(&source) {
            Ok(config) => config,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let message = e.message().trim_end().replace('\n', " ");
                return Err(ConfigErrors::located(
                    path,
                    &source,
                    vec![SpanError::new(span, message)],
                ));
            }
        };
        Ok(LoadedConfig {
            path: path.to_owned(),
            source,
            config,
        })
    }

    /// Checks that need no compilation: values in range, files present, sections supported.
    pub fn validate(&self) -> Vec<SpanError> {
        validate::validate(&self.config)
    }

    /// Locates errors found by later compilation stages in this file.
    pub fn errors(&self, errors: Vec<SpanError>) -> ConfigErrors {
        ConfigErrors::located(&self.path, &self.source, errors)
    }
}
