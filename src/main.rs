//! The `cachegate` command: `run` (the default) serves, `check` validates a configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use cachegate::config::LogFormat;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "cachegate",
    version,
    about = "A reverse-proxy caching gateway for HTTP CRUD APIs",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand, `cachegate --config FILE` runs the gateway.
    #[command(flatten)]
    run: Option<RunArgs>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve with the given configuration (the default).
    Run(RunArgs),
    /// Validate a configuration file and exit: 0 when valid, 1 with `file:line:col: message`
    /// lines when not.
    Check(RunArgs),
    /// Mint an HS256 token for local use and print it.
    Token(TokenArgs),
    /// Show what the gateway would do with a request — canonical path, route, auth, rate-limit
    /// keys, cache key or bypass, purges — without sending anything upstream.
    Explain(ExplainArgs),
    /// Write a starter configuration from the API's OpenAPI 3 document (JSON or YAML).
    Init(InitArgs),
    /// Print the configuration's JSON Schema (for editors: `#:schema ./cachegate.schema.json`).
    Schema,
}

#[derive(Args, Debug)]
struct InitArgs {
    /// The OpenAPI document: a file, or an `http(s)://` URL such as
    /// http://127.0.0.1:3000/openapi.json.
    #[arg(long, value_name = "FILE|URL")]
    openapi: String,
    /// The origin to proxy to. Default: the document's first absolute server URL, else
    /// http://127.0.0.1:3000.
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Write the configuration here (never over an existing file) instead of to stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
    /// The address the gateway listens on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: String,
    /// The admin listener's address (health, readiness, metrics).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9901")]
    admin: String,
}

#[derive(Args, Debug)]
struct ExplainArgs {
    /// Path to the TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// The request method.
    #[arg(
        short = 'X',
        long = "request",
        value_name = "METHOD",
        default_value = "GET"
    )]
    method: String,
    /// A request header, `Name: value`; repeat for more.
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    headers: Vec<String>,
    /// The client's address (IP-keyed limits, trusted proxies).
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    client_ip: std::net::IpAddr,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// `http://host/path?query` or `/path?query`.
    url: String,
}

#[derive(Args, Debug)]
struct TokenArgs {
    /// Take the secret (first HMAC provider), issuer and audience from this configuration.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// HMAC secret; overrides the configuration's.
    #[arg(long)]
    secret: Option<String>,
    /// Subject (`sub` claim).
    #[arg(long, default_value = "dev-user")]
    sub: String,
    /// Space-separated scopes (`scope` claim), e.g. "products:write".
    #[arg(long)]
    scope: Option<String>,
    /// Lifetime, e.g. "15m", "1h".
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
    /// Audience (`aud` claim); overrides the configuration's first.
    #[arg(long)]
    aud: Option<String>,
    /// Issuer (`iss` claim); overrides the configuration's first.
    #[arg(long)]
    iss: Option<String>,
    /// Another claim, NAME=VALUE (repeatable): numbers and true/false are JSON, the rest text,
    /// e.g. `--claim user_id=1 --claim token_type=access` for a simplejwt origin.
    #[arg(long = "claim", value_name = "NAME=VALUE", value_parser = cachegate::auth::mint::parse_claim)]
    claims: Vec<(String, serde_json::Value)>,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Path to the TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// Log as human-readable text or one JSON object per line; overrides `[server] log_format`.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

/// mimalloc instead of glibc's allocator: measured faster on the request path (see the README's
/// Benchmarks). It changes nothing about panics, which still unwind per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check(args)) => check(&args),
        Some(Command::Run(args)) => run(&args),
        Some(Command::Token(args)) => token(args),
        Some(Command::Explain(args)) => explain(args),
        Some(Command::Init(args)) => init(args),
        Some(Command::Schema) => {
            print!("{}", cachegate::config::json_schema());
            ExitCode::SUCCESS
        }
        None => match cli.run {
            Some(args) => run(&args),
            None => {
                eprintln!("cachegate: missing --config FILE; try `cachegate run --config config/quickstart.toml` or `cachegate --help`");
                ExitCode::from(2)
            }
        },
    }
}

fn check(args: &RunArgs) -> ExitCode {
    match cachegate::snapshot::check(&args.config) {
        Ok((snapshot, warnings)) => {
            for warning in &warnings.0 {
                eprintln!("warning: {warning}");
            }
            println!(
                "{}: configuration is valid ({} routes, {} upstream addresses; host names are resolved when it runs)",
                args.config.display(),
                snapshot.routes.len(),
                snapshot.upstream.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}

fn token(args: TokenArgs) -> ExitCode {
    let mut request = cachegate::auth::mint::TokenRequest {
        secret: args.secret,
        subject: args.sub,
        scope: args.scope,
        ttl: args.ttl,
        audience: args.aud,
        issuer: args.iss,
        kid: None,
        claims: args.claims,
        defaulted_secret: Vec::new(),
    };
    if let Some(path) = &args.config {
        let loaded = match cachegate::config::LoadedConfig::from_file(path) {
            Ok(loaded) => loaded,
            Err(errors) => {
                eprintln!("{errors}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(message) = request.complete_from(&loaded) {
            eprintln!("cachegate token: {message}");
            return ExitCode::FAILURE;
        }
        for variable in &request.defaulted_secret {
            eprintln!(
                "cachegate token: warning: {variable} is not set, so this token is signed with the configuration's fallback secret; set {variable} to the secret the gateway runs with"
            );
        }
    }
    match request.mint() {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("cachegate token: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init(args: InitArgs) -> ExitCode {
    let fail = |message: String| {
        eprintln!("cachegate init: {message}");
        ExitCode::FAILURE
    };
    if let Some(path) = args.output.as_ref().filter(|p| p.exists()) {
        return fail(format!(
            "{} exists; remove it or choose another file with -o",
            path.display()
        ));
    }
    let text = if args.openapi.starts_with("http://") || args.openapi.starts_with("https://") {
        match fetch_text(&args.openapi) {
            Ok(text) => text,
            Err(message) => return fail(message.to_string()),
        }
    } else {
        match std::fs::read_to_string(&args.openapi) {
            Ok(text) => text,
            Err(e) => return fail(format!("cannot read {}: {e}", args.openapi)),
        }
    };
    let document = match cachegate::openapi::parse(&text) {
        Ok(document) => document,
        Err(e) => return fail(format!("{}: {e}", args.openapi)),
    };
    // A document served by the origin is a page clients fetch through the gateway, and so are
    // the framework's documentation pages beside it.
    let extra_pages = match args.openapi.parse::<http::Uri>() {
        Ok(uri) if uri.scheme().is_some() => served_pages(&uri),
        _ => Vec::new(),
    };
    let (config, summary) = cachegate::openapi::starter_config(
        &document,
        &cachegate::openapi::StarterOptions {
            source: &args.openapi,
            upstream: args.upstream.as_deref(),
            listen: &args.listen,
            admin: &args.admin,
            extra_pages: &extra_pages,
        },
    );
    eprintln!("cachegate init: {summary}");
    match &args.output {
        Some(path) => {
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .and_then(|mut file| std::io::Write::write_all(&mut file, config.as_bytes()));
            if let Err(e) = written {
                return fail(format!("cannot write {}: {e}", path.display()));
            }
            eprintln!(
                "wrote {}; check it with `cachegate check --config {}`",
                path.display(),
                path.display()
            );
        }
        None => print!("{config}"),
    }
    ExitCode::SUCCESS
}

/// Documentation pages web frameworks serve beside their OpenAPI document (FastAPI's `/docs` and
/// `/redoc`, drf-spectacular's and springdoc's Swagger UI pages).
const DOCS_PAGES: &[&str] = &[
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/swagger-ui/",
    "/swagger-ui.html",
    "/api/schema/swagger-ui/",
    "/api/schema/redoc/",
];

/// The document's own path, and the [`DOCS_PAGES`] its origin answers `200` for.
fn served_pages(document: &http::Uri) -> Vec<String> {
    let mut pages = vec![document.path().to_owned()];
    let origin = match (document.scheme_str(), document.authority()) {
        (Some(scheme), Some(authority)) => format!("{scheme}://{authority}"),
        _ => return pages,
    };
    for page in DOCS_PAGES {
        if fetch_text(&format!("{origin}{page}")).is_ok() {
            pages.push((*page).to_owned());
        }
    }
    pages
}

/// What went wrong fetching a document, for the message `init` prints.
type FetchError = Box<dyn std::error::Error + Send + Sync>;

/// GETs a document (an OpenAPI description) over HTTP(S).
fn fetch_text(url: &str) -> Result<String, FetchError> {
    use http_body_util::BodyExt;
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime
        .block_on(async {
            let client =
                cachegate::http_client::client::<http_body_util::Empty<bytes::Bytes>>(None)
                    .map_err(|e| e.to_string())?;
            let fetch = async {
                let response = client
                    .get(uri)
                    .await
                    .map_err(|e| format!("GET {url} failed: {e}"))?;
                if !response.status().is_success() {
                    return Err(format!("GET {url} answered {}", response.status()));
                }
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("reading {url} failed: {e}"))?
                    .to_bytes();
                String::from_utf8(body.to_vec()).map_err(|_| format!("{url} is not UTF-8 text"))
            };
            tokio::time::timeout(std::time::Duration::from_secs(30), fetch)
                .await
                .map_err(|_| format!("GET {url} timed out after 30 s"))?
        })
        .map_err(FetchError::from)
}

fn explain(args: ExplainArgs) -> ExitCode {
    use cachegate::pipeline::explain::{self, Question};
    let fail = |message: String| {
        eprintln!("cachegate explain: {message}");
        ExitCode::FAILURE
    };
    let (loaded, snapshot) = match cachegate::snapshot::load(&args.config) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let Ok(method) = http::Method::from_bytes(args.method.as_bytes()) else {
        return fail(format!("{:?} is not an HTTP method", args.method));
    };
    let mut headers = Vec::new();
    for header in &args.headers {
        let parsed = header.split_once(':').and_then(|(name, value)| {
            let name = http::HeaderName::from_bytes(name.trim().as_bytes()).ok()?;
            let value = http::HeaderValue::from_str(value.trim()).ok()?;
            Some((name, value))
        });
        match parsed {
            Some(pair) => headers.push(pair),
            None => {
                return fail(format!(
                    "{header:?} is not a header; write it as 'Name: value'"
                ))
            }
        }
    }
    // A bare path is asked as a client of the first listener would ask it: with that `Host`.
    let has_host = headers.iter().any(|(name, _)| name == http::header::HOST);
    if args.url.starts_with('/') && !has_host {
        if let Some(listener) = loaded.config.listeners.get_ref().first() {
            if let Ok(host) = http::HeaderValue::from_str(listener.address.get_ref().as_str()) {
                headers.push((http::header::HOST, host));
            }
        }
    }
    // Rate-limit keys are computed, never counted: no store connection is needed.
    let store: std::sync::Arc<dyn cachegate::store::Store> =
        std::sync::Arc::new(cachegate::store::MemoryStore::new());
    let limiter = match cachegate::ratelimit::Limiter::from_config(store, &loaded.config.rate_limit)
    {
        Ok(limiter) => limiter,
        Err(message) => return fail(message.into()),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(format!("cannot start a runtime: {e}")),
    };
    let question = Question {
        method,
        url: args.url,
        headers,
        client_ip: args.client_ip,
    };
    let explanation = match runtime.block_on(explain::explain(
        std::sync::Arc::new(snapshot),
        &limiter,
        question,
    )) {
        Ok(explanation) => explanation,
        Err(e) => return fail(e.to_string()),
    };
    if args.json {
        match serde_json::to_string_pretty(&explanation) {
            Ok(json) => println!("{json}"),
            Err(e) => return fail(e.to_string()),
        }
    } else {
        print!("{explanation}");
    }
    ExitCode::SUCCESS
}

fn run(args: &RunArgs) -> ExitCode {
    // Before the configuration is compiled: the origins' default connection caps are shares of
    // the limit in force.
    cachegate::descriptors::raise_open_file_limit();
    let (loaded, snapshot) = match cachegate::snapshot::load(&args.config) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let format = args
        .log_format
        .or(loaded.config.server.log_format)
        .unwrap_or(LogFormat::Text);
    // Held until the gateway has stopped: dropping it flushes the log lines still queued.
    let _log_writer = init_logging(format);
    match cachegate::server::run(loaded, snapshot) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cachegate: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default: warnings, plus cachegate's own info events
/// and the access log).
///
/// Lines are written by a dedicated thread, never by the thread serving a request: a slow or
/// blocked stderr (a full pipe, a stalled log shipper) must not stall traffic. The queue is
/// bounded (128k lines); when it is full, lines are dropped rather than requests delayed.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,cachegate=info,access=info"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    guard
}
