//! `upstream-example`: a real CRUD backend (products in SQLite) served over HTTP/1.1 with hyper.
//!
//! cachegate's quickstart and integration tests run against it. See `api.rs` for the endpoints.

mod api;
mod db;
mod idle;
mod stats;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::api::App;
use crate::db::Db;
use crate::stats::Stats;

#[derive(Parser, Debug)]
#[command(version, about = "Example products CRUD API for cachegate")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Products to create at start when the database is empty.
    #[arg(long, default_value_t = 1000)]
    seed: u64,
    /// Delay added before every database call, in milliseconds, to model a slow database.
    #[arg(long, default_value_t = 0)]
    db_latency_ms: u64,
    /// SQLite file to use; an in-memory database when absent.
    #[arg(long)]
    db: Option<String>,
    /// Close a keep-alive connection that has been idle this long between requests, as Node
    /// (5 s by default) and uvicorn do; 0 keeps idle connections open.
    #[arg(long, default_value_t = 0)]
    keep_alive_timeout_ms: u64,
    /// Say that timeout on every response, `Keep-Alive: timeout=N` (whole seconds), as Node does.
    #[arg(long)]
    announce_keep_alive: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("upstream-example: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> Result<(), String> {
    let db = Db::open(args.db.as_deref()).map_err(|e| format!("cannot open the database: {e}"))?;
    let products = db
        .seed(args.seed)
        .map_err(|e| format!("cannot seed the database: {e}"))?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let app = Arc::new(App {
        db: Arc::new(db),
        stats: Stats::default(),
        db_latency: Duration::from_millis(args.db_latency_ms),
    });
    println!(
        "upstream-example listening on http://{} ({products} products)",
        args.listen
    );

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        eprintln!("upstream-example: accept failed: {e}");
                        continue;
                    }
                };
                app.stats.connection_accepted();
                let app = app.clone();
                let keep_alive_timeout = Duration::from_millis(args.keep_alive_timeout_ms);
                let announced = args.announce_keep_alive.then(|| {
                    let seconds = keep_alive_timeout.as_secs();
                    hyper::header::HeaderValue::from_str(&format!("timeout={seconds}"))
                        .expect("digits are a valid header value")
                });
                tokio::spawn(async move {
                    let idle = idle::Idle::new();
                    let in_flight = idle.clone();
                    let service = service_fn(move |req| {
                        let (app, guard) = (app.clone(), in_flight.busy());
                        let announced = announced.clone();
                        async move {
                            let mut response = api::handle(app, req).await;
                            if let (Ok(response), Some(value)) = (&mut response, announced) {
                                response.headers_mut().insert("keep-alive", value);
                            }
                            drop(guard);
                            response
                        }
                    });
                    let conn = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(idle.watch(stream)), service);
                    // Errors here are client disconnects; nothing to report to anyone.
                    if keep_alive_timeout.is_zero() {
                        let _ = conn.await;
                    } else {
                        // Dropping the connection closes the socket, as Node does.
                        tokio::select! {
                            _ = conn => {}
                            _ = idle.expired(keep_alive_timeout) => {}
                        }
                    }
                });
            }
            _ = shutdown_signal() => return Ok(()),
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
