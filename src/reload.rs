//! Hot reload: re-read the configuration file, validate and compile it, and swap the snapshot
//! atomically. Requests in flight finish on the snapshot they started with; an invalid file is
//! refused with the same messages `cachegate check` prints, and the old snapshot keeps serving.
//!
//! What reloads: routes and their policies (cache rules included), the upstream group, limits,
//! `[auth]`, trusted proxies. What needs a restart: `[server]` (other than `trusted_proxies`),
//! listeners, `[admin]`, `[store]`, `[rate_limit]` and `[cache]`; a reload that changes them says
//! so in the log. Cached entries survive a reload.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::config::ConfigErrors;
use crate::metrics::metrics;
use crate::snapshot::{self, SharedSnapshot};

/// Sections read only at start.
const RESTART_ONLY: [&str; 6] = [
    "listeners",
    "admin",
    "store",
    "rate_limit",
    "cache",
    "server",
];

pub struct Reloader {
    path: PathBuf,
    snapshot: SharedSnapshot,
    /// Where background tasks of a new snapshot (JWKS refresh) run.
    runtime: tokio::runtime::Handle,
    /// The source in force, to notice changes to restart-only sections.
    source: Mutex<String>,
}

/// What a successful reload installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub routes: usize,
    /// Sections that changed but need a restart to take effect.
    pub needs_restart: Vec<String>,
}

fn section(source: &str, name: &str) -> Option<toml::Value> {
    let table: toml::Table = toml::from_str(source).ok()?;
    let mut value = table.get(name).cloned();
    // trusted_proxies reloads; the rest of [server] does not.
    if let (Some(toml::Value::Table(server)), "server") = (&mut value, name) {
        server.remove("trusted_proxies");
    }
    value
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        source: String,
        snapshot: SharedSnapshot,
        runtime: tokio::runtime::Handle,
    ) -> Reloader {
        Reloader {
            path,
            snapshot,
            runtime,
            source: Mutex::new(source),
        }
    }

    /// Loads the file again and swaps it in, or explains why not. Blocking (file reads, DNS).
    pub fn reload(&self) -> Result<Reloaded, ConfigErrors> {
        let (loaded, fresh) = match snapshot::load(&self.path) {
            Ok(ok) => ok,
            Err(errors) => {
                metrics().config_reloads.with_label_values(&["error"]).inc();
                tracing::warn!(errors = %errors, "reload refused; the previous configuration keeps serving");
                return Err(errors);
            }
        };
        let previous = self.snapshot.load_full();
        if let Some(auth) = &fresh.auth {
            if let Some(old) = &previous.auth {
                auth.adopt_keys_from(old);
            }
            let _guard = self.runtime.enter();
            auth.start_background_tasks();
        }
        let routes = fresh.routes.len();
        self.snapshot.store(Arc::new(fresh));

        let mut source = self.source.lock().expect("reload mutex poisoned");
        let needs_restart: Vec<String> = RESTART_ONLY
            .iter()
            .filter(|name| section(&source, name) != section(&loaded.source, name))
            .map(|name| format!("[{name}]"))
            .collect();
        *source = loaded.source;
        metrics().config_reloads.with_label_values(&["ok"]).inc();
        if needs_restart.is_empty() {
            tracing::info!(routes, path = %self.path.display(), "configuration reloaded");
        } else {
            tracing::warn!(
                routes,
                path = %self.path.display(),
                "configuration reloaded, but changes to {} take effect only after a restart",
                needs_restart.join(", ")
            );
        }
        Ok(Reloaded {
            routes,
            needs_restart,
        })
    }
}

/// Reloads on every SIGHUP until the process ends.
pub async fn reload_on_sighup(reloader: Arc<Reloader>, mut hangups: tokio::signal::unix::Signal) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        let reloader = reloader.clone();
        // The outcome is logged and counted by `reload` itself.
        let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
    }
}
