//! Starting and stopping the gateway: the runtimes, the listeners ([`listener`]), the admin
//! listener, and the drain.
//!
//! Every listener address is bound before the store, the cache or any listener starts, so an
//! address in use ends the process at once with a message naming it; the signal handlers are in
//! place before that, so a signal sent as soon as the port answers is never lost. Requests are served on a multi-thread tokio
//! runtime with `[server] threads` workers; store connections, health checks and reloads run on
//! a small runtime of their own, so a busy data path never delays them.
//!
//! `SIGTERM` drains: the listeners close, open connections finish their in-flight requests
//! (HTTP/1.1 connections close after their current response, HTTP/2 ones get `GOAWAY`) for up to
//! `[server] grace_period`, then the process exits 0. `SIGINT` exits at once.
//!
//! At start the soft limit on open files is raised to the hard limit and logged
//! ([`crate::descriptors`]). Each listener then holds at most `[limits] max_connections` (by
//! default its share of half the limit); the admin listener has [`ADMIN_MAX_CONNECTIONS`] of its
//! own, so it answers while the others are flooded.

pub mod clock;
pub mod listener;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};

use crate::admin::Admin;
use crate::cache::Cache;
use crate::config::LoadedConfig;
use crate::pipeline::Gateway;
use crate::purge::{CoherenceSettings, Purger};
use crate::ratelimit::Limiter;
use crate::reload::{reload_on_sighup, Reloader};
use crate::snapshot::Snapshot;
use crate::store;

/// Connections the admin listener holds at most.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Why the gateway could not start; each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the {which} runtime: {source}")]
    Runtime {
        which: &'static str,
        source: std::io::Error,
    },
    #[error("cannot watch {signal}: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    #[error("cannot listen on {address}: {source}; stop whatever uses that address or change it in the configuration")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("cannot set up {address}: {source}")]
    Setup {
        address: String,
        source: std::io::Error,
    },
    #[error("cannot set up TLS for {address}: {source}")]
    Tls {
        address: String,
        source: Box<crate::tls::TlsError>,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    RateLimit(#[from] crate::config::Invalid),
    #[error(transparent)]
    Exporter(#[from] crate::trace::ExporterError),
}

/// Serves until SIGTERM (graceful: stop accepting, drain for `server.grace_period`) or SIGINT
/// (fast). Returns an error message, naming what failed, if the gateway cannot start.
pub fn run(loaded: LoadedConfig, snapshot: Snapshot) -> Result<(), StartError> {
    let config = &loaded.config;
    let admin_address = config.admin.as_ref().map(|a| a.address.get_ref().as_str());
    // One TLS crypto provider for every rustls user in the process (the listeners, upstream TLS, the JWKS client,
    // rediss://). Installing fails only if one is installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();

    // Before anything listens: a warning about the configuration is in the log by the time the
    // port answers.
    for name in snapshot
        .auth
        .iter()
        .flat_map(|auth| auth.defaulted_secrets())
    {
        tracing::warn!(
            "auth: the JWT secret comes from the built-in default of ${{{name}:-...}} because {name} is not set; \
             anyone who can read the configuration can mint tokens. Set {name} before exposing this gateway"
        );
    }

    // Background work (store connections and health checks) runs on its own small runtime;
    // requests are served on the request runtime.
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(crate::store::BACKGROUND_THREADS)
        .enable_all()
        .build()
        .map_err(|source| StartError::Runtime {
            which: "background",
            source,
        })?;
    let threads = config
        .server
        .threads
        .as_ref()
        .map(|t| *t.get_ref())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // tokio's multi-thread scheduler even for one worker: a current-thread runtime measured
    // slower here (hits 0.74× vs 0.79–0.82× of the bare-hyper floor, pass-through 0.95× vs 1.13×;
    // see the README's Benchmarks).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("cachegate-worker")
        .enable_all()
        .build()
        .map_err(|source| StartError::Runtime {
            which: "request",
            source,
        })?;

    // Signal handlers before the listeners: a SIGHUP or SIGTERM sent as soon as the port
    // answers must reload or drain, not meet the default action (which ends the process).
    use tokio::signal::unix::{signal, SignalKind};
    let hangups = {
        let _guard = control.enter();
        signal(SignalKind::hangup()).map_err(|source| StartError::Signal {
            signal: "SIGHUP",
            source,
        })?
    };
    let terminate = {
        let _guard = runtime.enter();
        signal(SignalKind::terminate()).map_err(|source| StartError::Signal {
            signal: "SIGTERM",
            source,
        })?
    };

    let mut bound = Vec::new();
    for listener in config.listeners.get_ref() {
        let address = listener.address.get_ref().as_str();
        bound.push(bind(address)?);
    }
    let admin_listener = admin_address.map(bind).transpose()?;

    let store = {
        let _guard = control.enter();
        store::from_config(config.store.as_ref())?
    };
    let limiter = Limiter::from_config(store.clone(), &config.rate_limit)?;
    tracing::info!(store = store.kind(), "store ready");
    if let Some(auth) = &snapshot.auth {
        let _guard = control.enter();
        auth.start_background_tasks();
    }
    if let Some(endpoint) = &config.telemetry.otlp_endpoint {
        // Exports run beside the store's work, never on a request thread.
        let _guard = control.enter();
        crate::trace::start_exporter(endpoint.get_ref().as_str(), &config.telemetry.service_name)?;
    }

    let shared = Arc::new(ArcSwap::from_pointee(snapshot));
    let purger = {
        // Its subscription to the other instances' purges runs on the control runtime.
        let _guard = control.enter();
        Purger::new(
            Some(store.clone()),
            coherence_settings(config.store.as_ref()),
        )
    };
    let cache = Arc::new(Cache::new(
        config.cache.memory_capacity.0,
        config.cache.compress_above.0,
        Some(store.clone()),
        purger.clone(),
    ));
    let reloader = Arc::new(Reloader::new(
        loaded.path.clone(),
        loaded.source.clone(),
        shared.clone(),
        control.handle().clone(),
    ));
    control.spawn(reload_on_sighup(reloader.clone(), hangups));
    let admin = admin_listener.map(|listener| {
        let token = config
            .admin
            .as_ref()
            .and_then(|a| a.token.as_ref())
            .map(|t| t.as_str().to_owned());
        let admin = Arc::new(Admin::new(
            shared.clone(),
            store.clone(),
            cache.clone(),
            purger.clone(),
            reloader,
            token,
        ));
        (listener, admin)
    });
    let gateway = Gateway::new(shared, limiter, cache, purger.clone());
    let mut listeners = Vec::new();
    for (listener, std_listener) in config.listeners.get_ref().iter().zip(bound) {
        let address = listener.address.get_ref().as_str();
        let tls = match &listener.tls {
            None => None,
            Some(tls) => Some(
                listener::tls_acceptor(
                    tls.cert_file.get_ref().as_str(),
                    tls.key_file.get_ref().as_str(),
                    tls.http2,
                )
                .map_err(|source| StartError::Tls {
                    address: address.to_owned(),
                    source: Box::new(source),
                })?,
            ),
        };
        let http2 = listener.tls.as_ref().is_none_or(|t| t.http2);
        listeners.push((address.to_owned(), std_listener, tls, http2));
    }
    let open_files = crate::descriptors::raise_open_file_limit();
    let max_connections = config
        .limits
        .max_connections
        .unwrap_or_else(|| crate::descriptors::half_share(open_files, listeners.len()));
    tracing::info!(
        open_files,
        max_connections,
        "open-file limit (each connection takes one); connections per listener"
    );
    let limits = &config.limits;
    let connections = Connections {
        timeouts: clock::Timeouts {
            request_head: limits.request_head_timeout.0,
            keepalive: limits.keepalive_timeout.0,
            send: limits.send_timeout.0,
        },
        tls_handshake_timeout: limits.tls_handshake_timeout.0,
        max_request_header_bytes: limits.max_request_header_bytes.get_ref().0,
        max_connections,
    };
    let grace_period = config.server.grace_period.0;
    let served = runtime.block_on(serve(
        gateway,
        listeners,
        admin,
        connections,
        grace_period,
        terminate,
    ));
    // Drained: writes elsewhere stop waiting for this instance's acknowledgements at once,
    // not one lease later.
    control.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(1), purger.leave()).await;
    });
    runtime.shutdown_timeout(config.server.shutdown_timeout.0);
    control.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("stopped");
    served
}

/// Binds `address` now, so a clash is reported before anything starts.
/// The coherence settings of `[store]` (the defaults without one).
fn coherence_settings(store: Option<&crate::config::StoreConfig>) -> CoherenceSettings {
    match store {
        Some(store) => CoherenceSettings {
            lease: store.coherence_lease.0,
            may_serve_stale_for: store.may_serve_stale_for.0,
            max_write_hold: store.max_write_hold.0,
        },
        None => CoherenceSettings::default(),
    }
}

fn bind(address: &str) -> Result<std::net::TcpListener, StartError> {
    let listener = std::net::TcpListener::bind(address).map_err(|source| StartError::Bind {
        address: address.to_owned(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| StartError::Setup {
            address: address.to_owned(),
            source,
        })?;
    Ok(listener)
}

type ListenerSetup = (
    String,
    std::net::TcpListener,
    Option<tokio_rustls::TlsAcceptor>,
    bool,
);

/// How client connections are held: `[limits]` as read at start.
struct Connections {
    timeouts: clock::Timeouts,
    tls_handshake_timeout: Duration,
    max_request_header_bytes: u64,
    max_connections: usize,
}

/// Serves until a signal; see the module docs for what each does.
async fn serve(
    gateway: Arc<Gateway>,
    listeners: Vec<ListenerSetup>,
    admin: Option<(std::net::TcpListener, Arc<Admin>)>,
    connections: Connections,
    grace_period: Duration,
    mut terminate: tokio::signal::unix::Signal,
) -> Result<(), StartError> {
    let (drain, draining) = watch::channel(false);
    let (open, mut closed) = mpsc::channel::<()>(1);
    let serving = Arc::new(listener::Serving {
        gateway,
        draining: draining.clone(),
        open,
        timeouts: connections.timeouts,
        tls_handshake_timeout: connections.tls_handshake_timeout,
        max_request_header_bytes: connections.max_request_header_bytes,
    });
    for (address, std_listener, tls, http2) in listeners {
        let tcp = tokio::net::TcpListener::from_std(std_listener).map_err(|source| {
            StartError::Setup {
                address: address.clone(),
                source,
            }
        })?;
        tracing::info!(address, tls = tls.is_some(), "listening");
        let load = clock::Load::new(connections.max_connections);
        tokio::spawn(listener::accept_loop(
            tcp,
            tls,
            http2,
            serving.clone(),
            load,
        ));
    }
    if let Some((std_listener, admin)) = admin {
        let tcp = tokio::net::TcpListener::from_std(std_listener).map_err(|source| {
            StartError::Setup {
                address: "the admin address".to_owned(),
                source,
            }
        })?;
        tracing::info!(address = %tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin listening");
        tokio::spawn(serve_admin(tcp, admin, draining, connections.timeouts));
    }
    drop(serving);

    tokio::select! {
        _ = terminate.recv() => {
            tracing::info!(grace_period = ?grace_period, "SIGTERM: draining");
            let _ = drain.send(true);
            // Every connection holds a sender; `recv` returns `None` when the last one is gone.
            if tokio::time::timeout(grace_period, closed.recv()).await.is_err() {
                tracing::warn!("the grace period ended with requests still in flight");
            }
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT: stopping now");
        }
    }
    Ok(())
}

/// The admin listener: HTTP/1.1, one small service, on the same clocks as client connections
/// and with [`ADMIN_MAX_CONNECTIONS`] of its own.
async fn serve_admin(
    listener: tokio::net::TcpListener,
    admin: Arc<Admin>,
    mut draining: watch::Receiver<bool>,
    timeouts: clock::Timeouts,
) {
    let load = clock::Load::new(ADMIN_MAX_CONNECTIONS);
    let mut failures = listener::AcceptFailures::default();
    loop {
        let (accepted, slot) = tokio::select! {
            accepted = async {
                let slot = load.admit().await;
                (listener.accept().await, slot)
            } => accepted,
            _ = draining.changed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                failures.record(&e);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        let load = load.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let clock = clock::Clock::new(timeouts);
            let requests = clock.clone();
            let service = hyper::service::service_fn(move |request| {
                let in_flight = requests.request_started();
                let admin = admin.clone();
                async move {
                    let (parts, body) = admin.serve(request).await.into_parts();
                    let body = in_flight.watch(http_body_util::Full::new(bytes::Bytes::from(body)));
                    Ok::<_, std::convert::Infallible>(hyper::Response::from_parts(parts, body))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(clock.io(stream)), service);
            tokio::select! {
                _ = conn => {}
                _ = clock.expired(&load) => {}
            }
        });
    }
}
