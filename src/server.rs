//! Starting and stopping the gateway: listeners, the pingora server, the background runtime.
//!
//! pingora retries a failed bind for 30 s and then panics inside its service task, leaving a
//! process that runs with nothing listening. We bind every listener address ourselves first and
//! exit with a message naming the address instead.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings;
use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::cache::Cache;
use crate::config::LoadedConfig;
use crate::proxy::Gateway;
use crate::purge::Purger;
use crate::ratelimit::{self, Limiter};
use crate::reload::{reload_on_sighup, Reloader};
use crate::snapshot::Snapshot;
use crate::store;

/// Serves until SIGTERM (graceful: stop accepting, drain for `server.grace_period`) or SIGINT
/// (fast). Returns an error message, naming what failed, if the gateway cannot start.
pub fn run(loaded: LoadedConfig, snapshot: Snapshot) -> Result<(), String> {
    let config = &loaded.config;
    let admin_address = config.admin.as_ref().map(|a| a.address.get_ref().as_str());
    let addresses = config
        .listeners
        .get_ref()
        .iter()
        .map(|l| l.address.get_ref().as_str())
        .chain(admin_address);
    for address in addresses {
        TcpListener::bind(address).map_err(|e| {
            format!(
                "cannot listen on {address}: {e}; stop whatever uses that address or change it in the configuration"
            )
        })?;
    }

    // One TLS crypto provider for every rustls user in the process (pingora, the JWKS client,
    // rediss://). Installing fails only if one is installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();

    // Background work (store connections and health checks) runs on its own small runtime;
    // pingora gives each service its own.
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(crate::store::BACKGROUND_THREADS)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the background runtime: {e}"))?;
    let store = {
        let _guard = control.enter();
        store::from_config(config.store.as_ref()).map_err(|e| e.to_string())?
    };
    let auth_failures = match &config.rate_limit.auth_failures {
        Some(rate) => {
            let (count, period) = crate::config::values::parse_rate(rate.get_ref())?;
            Some(ratelimit::Limit {
                name: "auth-failures".to_owned(),
                count,
                period,
                burst: count,
                key: vec![ratelimit::KeyPart::Ip],
            })
        }
        None => None,
    };
    let limiter = Limiter::new(
        store.clone(),
        &config.rate_limit.prefix,
        config.rate_limit.instances,
        auth_failures,
        *config.rate_limit.ipv6_prefix.get_ref(),
    );
    tracing::info!(store = store.kind(), "store ready");
    if let Some(auth) = &snapshot.auth {
        let _guard = control.enter();
        auth.start_background_tasks();
        for name in auth.defaulted_secrets() {
            tracing::warn!(
                "auth: the JWT secret comes from the built-in default of ${{{name}:-...}} because {name} is not set; \
                 anyone who can read the configuration can mint tokens. Set {name} before exposing this gateway"
            );
        }
    }

    let first_address = config.listeners.get_ref()[0].address.get_ref().as_str();
    let server_conf = ServerConf {
        threads: config
            .server
            .threads
            .as_ref()
            .map(|t| *t.get_ref())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        grace_period_seconds: Some(config.server.grace_period.0.as_secs()),
        graceful_shutdown_timeout_seconds: Some(config.server.shutdown_timeout.0.as_secs()),
        upgrade_sock: config.server.upgrade_sock.as_ref().map_or_else(
            || {
                format!(
                    "/tmp/cachegate-{}.sock",
                    first_address.replace([':', '[', ']'], "_")
                )
            },
            |s| s.as_str().to_owned(),
        ),
        ca_file: config
            .upstream
            .tls_ca_file
            .as_ref()
            .map(|f| f.get_ref().as_str().to_owned()),
        ..ServerConf::default()
    };

    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();

    let shared = Arc::new(ArcSwap::from_pointee(snapshot));
    let purger = {
        // Its subscription to the other instances' purges runs on the control runtime.
        let _guard = control.enter();
        Purger::new(Some(store.clone()))
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
    control.spawn(reload_on_sighup(reloader.clone()));
    if let Some(address) = admin_address {
        let token = config
            .admin
            .as_ref()
            .and_then(|a| a.token.as_ref())
            .map(|t| t.as_str().to_owned());
        let mut admin = Service::new(
            "cachegate admin".to_owned(),
            Admin::new(
                shared.clone(),
                store.clone(),
                cache.clone(),
                purger.clone(),
                reloader,
                token,
            ),
        );
        admin.add_tcp(address);
        server.add_service(admin);
        tracing::info!(address, "admin listening");
    }
    let gateway = Gateway::new(shared, limiter, cache, purger);
    let mut service = http_proxy_service_with_name(&server.configuration, gateway, "cachegate");
    for listener in config.listeners.get_ref() {
        let address = listener.address.get_ref().as_str();
        match &listener.tls {
            None => service.add_tcp(address),
            Some(tls) => {
                let mut settings = TlsSettings::intermediate(
                    tls.cert_file.get_ref().as_str(),
                    tls.key_file.get_ref().as_str(),
                )
                .map_err(|e| format!("cannot set up TLS for {address}: {e}"))?;
                if tls.http2 {
                    settings.enable_h2();
                }
                service.add_tls_with_settings(address, None, settings);
            }
        }
        tracing::info!(address, tls = listener.tls.is_some(), "listening");
    }
    server.add_service(service);
    server.run(RunArgs::default());

    control.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("stopped");
    Ok(())
}
