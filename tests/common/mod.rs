//! Test harness: starts the real `cachegate` and `upstream-example` binaries and a real
//! `redis-server`, each on a free loopback port; waits until they answer; stops them by PID when
//! dropped. Also a small hyper client for talking to them.
#![allow(dead_code)] // each test file uses a different part of the harness

use std::convert::Infallible;
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use tempfile::TempDir;

pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub fn cachegate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cachegate"))
}

/// A token from `cachegate token --config CONFIG` with `args` (`--scope`, `--sub`, ...).
pub fn mint_token(config: &Path, args: &[&str]) -> String {
    let out = Command::new(cachegate_bin())
        .arg("token")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("running cachegate token");
    assert!(
        out.status.success(),
        "cachegate token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("a token is text")
        .trim()
        .to_owned()
}

/// `upstream-example` is built by `cargo test --workspace` (its own tests need it) into the same
/// directory as `cachegate`.
pub fn upstream_bin() -> PathBuf {
    let path = cachegate_bin().with_file_name("upstream-example");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p upstream-example` first)",
        path.display()
    );
    path
}

/// A port that was free a moment ago on 127.0.0.1, and not handed out before in this test
/// binary (the kernel may give the same ephemeral port twice once it is released, and two
/// servers of one test must not be told to share it).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("binding an ephemeral port")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// A child process killed (by PID) and reaped when dropped; its output goes to a log file.
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    _dir: Option<TempDir>,
}

impl Process {
    pub fn spawn(name: &str, program: &Path, args: &[&str], dir: TempDir) -> Process {
        Process::spawn_with_env(name, program, args, &[], dir)
    }

    /// [`Process::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        dir: TempDir,
    ) -> Process {
        let log = dir.path().join(format!("{name}.log"));
        let out = File::create(&log).expect("creating a log file");
        let err = out.try_clone().expect("cloning the log file handle");
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Process {
            name: name.to_owned(),
            child,
            log,
            _dir: Some(dir),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls until `port` accepts connections; panics with the process log if it exits first.
    pub fn wait_for_port(&mut self, port: u16) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before listening on {port}:\n{}",
                    self.name,
                    self.logs()
                );
            }
            if port_open(port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} did not listen on {port} within {READY_TIMEOUT:?}:\n{}",
            self.name,
            self.logs()
        );
    }

    /// Waits for the process to exit by itself, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends a signal by PID (`"TERM"`, `"STOP"`, ...).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Peak resident memory so far, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what its servers said: the log's directory goes with it.
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(LOG_TAIL_LINES).collect();
            eprintln!(
                "--- the last {} lines of {} (pid {}) ---",
                tail.len(),
                self.name,
                self.child.id()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// How much of each server's log a failing test prints.
const LOG_TAIL_LINES: usize = 80;

/// A running `upstream-example`.
pub struct Upstream {
    pub process: Process,
    pub port: u16,
}

impl Upstream {
    pub fn start() -> Upstream {
        Upstream::start_with(&["--seed", "50"])
    }

    pub fn start_with(args: &[&str]) -> Upstream {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut all = vec!["--listen", listen.as_str()];
        all.extend_from_slice(args);
        let dir = TempDir::new().expect("temp dir");
        let mut process = Process::spawn("upstream-example", &upstream_bin(), &all, dir);
        process.wait_for_port(port);
        Upstream { process, port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn stats(&self) -> serde_json::Value {
        let resp = Client::new().get(&format!("{}/__stats", self.url())).await;
        assert_eq!(resp.status, StatusCode::OK);
        resp.json()
    }

    /// Requests the upstream served for a route label such as `"GET /products/{id}"`.
    pub async fn served(&self, route: &str) -> u64 {
        self.stats().await["requests"][route].as_u64().unwrap_or(0)
    }

    pub async fn total_served(&self) -> u64 {
        self.stats().await["total"].as_u64().unwrap_or(0)
    }
}

/// A running `cachegate`.
pub struct Gateway {
    pub process: Process,
    pub port: u16,
    pub config: PathBuf,
}

impl Gateway {
    /// Starts cachegate with `config`, in which `{port}` is replaced by a free port.
    pub fn start(config: &str) -> Gateway {
        let port = free_port();
        Gateway::start_on(port, &config.replace("{port}", &port.to_string()))
    }

    /// Starts cachegate with a config that already names its listener `port`.
    pub fn start_on(port: u16, config: &str) -> Gateway {
        let dir = TempDir::new().expect("temp dir");
        let path = dir.path().join("cachegate.toml");
        std::fs::write(&path, config).expect("writing the config");
        let path_text = path.to_str().expect("utf-8 temp path").to_owned();
        let mut process = Process::spawn(
            "cachegate",
            &cachegate_bin(),
            &["run", "--config", &path_text],
            dir,
        );
        process.wait_for_port(port);
        // The admin listener is a separate service that may come up a moment later.
        if let Some(admin_port) = admin_port(config) {
            process.wait_for_port(admin_port);
        }
        Gateway {
            process,
            port,
            config: path,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// The admin listener's port; panics when the configuration has none.
    pub fn admin_port(&self) -> u16 {
        let config = std::fs::read_to_string(&self.config).expect("reading the config");
        admin_port(&config).expect("the configuration has an [admin] address")
    }

    /// Waits until `/readyz` answers `200` (with Redis that includes hearing the other
    /// instances' purges); panics with the gateway's logs after [`READY_TIMEOUT`].
    pub async fn wait_ready(&self) {
        let admin_port = self.admin_port();
        let ready = eventually(READY_TIMEOUT, || async {
            readyz(admin_port).await.0 == StatusCode::OK
        })
        .await;
        assert!(ready, "never ready:\n{}", self.logs());
    }
}

/// `GET /readyz` on an admin listener: its status and its JSON.
pub async fn readyz(admin_port: u16) -> (StatusCode, serde_json::Value) {
    let resp = Client::new()
        .get(&format!("http://127.0.0.1:{admin_port}/readyz"))
        .await;
    (resp.status, resp.json())
}

/// Runs a `cachegate` subcommand (`check`, `init`, `token`, `explain`, ...) to its end.
pub fn run_cachegate(args: &[&str]) -> std::process::Output {
    Command::new(cachegate_bin())
        .args(args)
        .output()
        .expect("running cachegate")
}

/// `GET path` on a gateway with extra request `headers`, on a fresh keep-alive client.
pub async fn get(gateway: &Gateway, path: &str, headers: &[(&str, &str)]) -> Response {
    Client::new()
        .send(Method::GET, &gateway.url(path), headers, Bytes::new())
        .await
}

/// A response's `X-Cache` (`HIT`, `MISS`, ...), `-` when absent.
pub fn x_cache(resp: &Response) -> &str {
    resp.header("x-cache").unwrap_or("-")
}

/// The admin listener's port in a configuration, if it has one.
fn admin_port(config: &str) -> Option<u16> {
    let table: toml::Table = toml::from_str(config).ok()?;
    let address = table.get("admin")?.get("address")?.as_str()?;
    address.rsplit(':').next()?.parse().ok()
}

/// The usual test configuration: one listener, one upstream, one worker thread, short grace
/// and timeouts.
pub fn config_for(upstreams: &[&str], extra: &str) -> String {
    GatewayConfig::upstreams(upstreams)
        .server("shutdown_timeout = \"1s\"")
        .upstream_setting("connect_timeout = \"1s\"")
        .upstream_setting("read_timeout = \"5s\"")
        .section(extra)
        .to_toml()
}

/// Sets a `key = value` line in a table's lines: TOML refuses a key written twice.
fn set_line(lines: &mut Vec<String>, line: &str) {
    let key = |l: &str| l.split('=').next().unwrap_or_default().trim().to_owned();
    lines.retain(|l| key(l) != key(line));
    lines.push(line.to_owned());
}

/// A gateway's configuration, built from the tests' defaults (one worker thread, one second of
/// grace, a listener on `{port}`) so each test writes only what it is about.
///
/// ```ignore
/// let gateway = GatewayConfig::new(&upstream.url())
///     .admin()
///     .redis(&redis.url())
///     .section("[[routes]]\npath = \"/products/{id}\"\ncache = { ttl = \"60s\" }")
///     .start();
/// ```
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    server: Vec<String>,
    listener: Vec<String>,
    more_listeners: Vec<String>,
    upstreams: Vec<String>,
    upstream: Vec<String>,
    admin: Option<Vec<String>>,
    store: Option<Vec<String>>,
    sections: Vec<String>,
}

impl GatewayConfig {
    /// In front of the origin at `upstream` (a URL).
    pub fn new(upstream: &str) -> GatewayConfig {
        GatewayConfig::upstreams(&[upstream])
    }

    /// In front of these origins.
    pub fn upstreams(urls: &[&str]) -> GatewayConfig {
        GatewayConfig {
            server: vec!["threads = 1".into(), "grace_period = \"1s\"".into()],
            listener: vec!["address = \"127.0.0.1:{port}\"".into()],
            more_listeners: Vec::new(),
            upstreams: urls.iter().map(|u| format!("{u:?}")).collect(),
            upstream: Vec::new(),
            admin: None,
            store: None,
            sections: Vec::new(),
        }
    }

    /// A `key = value` line of `[server]` (replacing a default for the same key).
    pub fn server(mut self, line: &str) -> GatewayConfig {
        set_line(&mut self.server, line);
        self
    }

    /// TLS on the main listener.
    pub fn tls(mut self, cert: &Path, key: &Path) -> GatewayConfig {
        self.listener.push(format!(
            "tls = {{ cert_file = {:?}, key_file = {:?} }}",
            cert.display().to_string(),
            key.display().to_string()
        ));
        self
    }

    /// Another `[[listeners]]` table (its lines).
    pub fn listener(mut self, lines: &str) -> GatewayConfig {
        self.more_listeners.push(lines.to_owned());
        self
    }

    /// A `key = value` line of `[upstream]`.
    pub fn upstream_setting(mut self, line: &str) -> GatewayConfig {
        set_line(&mut self.upstream, line);
        self
    }

    /// An admin listener on a free port.
    pub fn admin(self) -> GatewayConfig {
        self.admin_with("")
    }

    /// An admin listener on a free port, with these lines of `[admin]` too.
    pub fn admin_with(self, lines: &str) -> GatewayConfig {
        self.admin_on(free_port(), lines)
    }

    /// An admin listener on `port`, with these lines of `[admin]` too.
    pub fn admin_on(mut self, port: u16, lines: &str) -> GatewayConfig {
        let mut admin = vec![format!("address = \"127.0.0.1:{port}\"")];
        admin.extend(lines.lines().map(str::to_owned));
        self.admin = Some(admin);
        self
    }

    /// `[store]` on one Redis at `url`, with a short request budget.
    pub fn redis(self, url: &str) -> GatewayConfig {
        self.store(&format!("redis_url = {url:?}\ntimeout = \"200ms\""))
    }

    /// `[store]` with these lines.
    pub fn store(mut self, lines: &str) -> GatewayConfig {
        self.store = Some(lines.lines().map(str::to_owned).collect());
        self
    }

    /// Any other tables (`[auth]`, `[[routes]]`, `[limits]`, ...), as TOML text.
    pub fn section(mut self, toml: &str) -> GatewayConfig {
        self.sections.push(toml.to_owned());
        self
    }

    /// The configuration file's text (`{port}` still to be replaced, see [`Gateway::start`]).
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let mut table = |name: &str, lines: &[String]| {
            out.push_str(name);
            out.push('\n');
            for line in lines {
                out.push_str(line);
                out.push('\n');
            }
        };
        table("[server]", &self.server);
        table("[[listeners]]", &self.listener);
        for listener in &self.more_listeners {
            table("[[listeners]]", std::slice::from_ref(listener));
        }
        let mut upstream = vec![format!("addresses = [{}]", self.upstreams.join(", "))];
        upstream.extend(self.upstream.iter().cloned());
        table("[upstream]", &upstream);
        if let Some(admin) = &self.admin {
            table("[admin]", admin);
        }
        if let Some(store) = &self.store {
            table("[store]", store);
        }
        for section in &self.sections {
            out.push_str(section);
            out.push('\n');
        }
        out
    }

    /// Starts a gateway on this configuration.
    pub fn start(&self) -> Gateway {
        Gateway::start(&self.to_toml())
    }
}

/// A framework app of tests/backends/, run from the virtualenv `scripts/install-deps
/// --with-frameworks` makes (the README's test command runs it first).
pub struct Framework {
    pub process: Process,
    pub port: u16,
}

impl Framework {
    /// `python -m {module} --port N` on the project's Python, the module from tests/backends/,
    /// listening on a free port.
    pub fn python(module: &str) -> Framework {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = root.join(".deps/python/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run `scripts/install-deps --with-frameworks` (the README's test command does)",
            python.display()
        );
        let port = free_port();
        let backends = root.join("tests/backends");
        let dir = TempDir::new().expect("temp dir");
        let port_text = port.to_string();
        let mut process = Process::spawn_with_env(
            module,
            &python,
            &["-m", module, "--port", &port_text],
            &[("PYTHONPATH", backends.to_str().expect("utf-8 path"))],
            dir,
        );
        process.wait_for_port(port);
        Framework { process, port }
    }

    /// `node tests/backends/{script} --port N`, its packages from `.deps/node`.
    pub fn node(script: &str) -> Framework {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let modules = root.join(".deps/node/node_modules");
        assert!(
            modules.exists(),
            "{} is missing: run `scripts/install-deps --with-frameworks` (the README's test command does)",
            modules.display()
        );
        let port = free_port();
        let script = root.join("tests/backends").join(script);
        let dir = TempDir::new().expect("temp dir");
        let port_text = port.to_string();
        let mut process = Process::spawn_with_env(
            "node",
            Path::new("node"),
            &[script.to_str().expect("utf-8 path"), "--port", &port_text],
            &[("NODE_PATH", modules.to_str().expect("utf-8 path"))],
            dir,
        );
        process.wait_for_port(port);
        Framework { process, port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many requests reached the app (its `GET /__stats`).
    pub async fn requests_seen(&self) -> u64 {
        let stats = Client::new().get(&format!("{}/__stats", self.url())).await;
        stats.json()["requests"].as_u64().expect("a request count")
    }
}

/// A running `redis-server` with persistence off.
pub struct Redis {
    pub process: Process,
    pub port: u16,
}

pub fn redis_server_bin() -> PathBuf {
    let found = Command::new("sh")
        .args(["-c", "command -v redis-server"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    found.expect(
        "redis-server is not installed; the Redis tests never skip. Run `scripts/test` (it installs it) or `apt-get install -y redis-server`",
    )
}

impl Redis {
    pub fn start() -> Redis {
        let port = free_port();
        Redis::start_on(port)
    }

    pub fn start_on(port: u16) -> Redis {
        Redis::start_with(port, &["--port", &port.to_string()])
    }

    /// Starts redis-server with persistence off plus `args`, which must make it listen on
    /// `port` (`--port`, or `--port 0 --tls-port`), and waits until it accepts connections.
    pub fn start_with(port: u16, args: &[&str]) -> Redis {
        let dir = TempDir::new().expect("temp dir");
        let dir_text = dir.path().to_str().expect("utf-8 temp path").to_owned();
        let mut all = vec![
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir_text,
        ];
        all.extend_from_slice(args);
        let mut process = Process::spawn("redis-server", &redis_server_bin(), &all, dir);
        process.wait_for_port(port);
        Redis { process, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command with `redis-cli` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    BoxBody::new(Full::new(bytes.into()))
}

/// A response read whole.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: hyper::Version,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An HTTP/1.1 client with keep-alive.
#[derive(Clone)]
pub struct Client {
    inner: HyperClient<HttpConnector, Body>,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Client {
        Client {
            inner: HyperClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn get(&self, url: &str) -> Response {
        self.send(Method::GET, url, &[], Bytes::new()).await
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Response {
        let mut builder = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        self.request(builder.body(full(body)).expect("valid request"))
            .await
    }

    pub async fn request(&self, req: Request<Body>) -> Response {
        let resp = tokio::time::timeout(Duration::from_secs(60), self.inner.request(req))
            .await
            .expect("the request timed out")
            .expect("the request failed");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("reading the body").to_bytes();
        Response {
            status: parts.status,
            headers: parts.headers,
            body,
            version: parts.version,
        }
    }

    /// Sends a request and returns the response with its body still streaming.
    pub async fn stream(&self, req: Request<Body>) -> hyper::Response<hyper::body::Incoming> {
        self.inner.request(req).await.expect("the request failed")
    }
}

/// Writes a self-signed certificate for `localhost` and `127.0.0.1` into `dir`; returns
/// (cert path, key path, cert DER).
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("generating a certificate");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).expect("writing the certificate");
    std::fs::write(&key_path, certified.key_pair.serialize_pem()).expect("writing the key");
    (cert_path, key_path, certified.cert.der().to_vec())
}

/// A JWKS and OpenID discovery server for auth tests: serves `/jwks.json` and
/// `/.well-known/openid-configuration` from a document the test can replace, counts requests,
/// and can be stopped (connection refused) and started again on the same port.
pub struct JwksServer {
    pub port: u16,
    pub document: std::sync::Arc<std::sync::Mutex<serde_json::Value>>,
    pub hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl JwksServer {
    pub async fn start(document: serde_json::Value) -> JwksServer {
        let mut server = JwksServer {
            port: free_port(),
            document: std::sync::Arc::new(std::sync::Mutex::new(document)),
            hits: Default::default(),
            task: None,
        };
        server.resume().await;
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/jwks.json", self.port)
    }

    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set(&self, document: serde_json::Value) {
        *self.document.lock().unwrap() = document;
    }

    /// Stops answering: the port refuses connections.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    pub async fn resume(&mut self) {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("binding the JWKS port");
        let document = self.document.clone();
        let hits = self.hits.clone();
        let port = self.port;
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let document = document.clone();
                let hits = hits.clone();
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = match req.uri().path() {
                        "/.well-known/openid-configuration" => serde_json::json!({
                            "issuer": format!("http://127.0.0.1:{port}"),
                            "jwks_uri": format!("http://127.0.0.1:{port}/jwks.json"),
                        }),
                        _ => document.lock().unwrap().clone(),
                    };
                    async move {
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body.to_string())))
                                .unwrap(),
                        )
                    }
                });
                // No keep-alive, so stopping the accept loop really takes the server away.
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls an async condition every 50 ms for up to `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `probe` until it yields a value or `timeout` passes.
pub async fn eventually_value<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Redis Cluster of three masters on loopback, created with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    /// Three masters, no replicas.
    pub fn start() -> RedisCluster {
        RedisCluster::start_with_replicas(0)
    }

    /// Three masters with `replicas` replicas each (`cluster-node-timeout 2000`, so a replica
    /// takes over a dead master within a few seconds).
    pub fn start_with_replicas(replicas: usize) -> RedisCluster {
        let nodes: Vec<Redis> = (0..3 * (1 + replicas))
            .map(|_| {
                // A cluster node also listens on its port + 10000 (the cluster bus).
                let port = std::iter::repeat_with(free_port)
                    .find(|p| *p <= 55_000)
                    .expect("a free port");
                let port_text = port.to_string();
                let args = [
                    "--port",
                    &port_text,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    // A replica takes over however long ago it last heard its master.
                    "--cluster-replica-validity-factor",
                    "0",
                ];
                Redis::start_with(port, &args)
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("running redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        assert!(
            cluster.wait_ok(&[], READY_TIMEOUT),
            "the cluster never reached cluster_state:ok"
        );
        // Replicas count once their first sync is done (a replica that never synced cannot
        // take over).
        let deadline = Instant::now() + READY_TIMEOUT;
        while cluster
            .nodes
            .iter()
            .filter(|n| {
                n.cli(&["INFO", "replication"])
                    .contains("master_link_status:up")
            })
            .count()
            < 3 * replicas
        {
            assert!(Instant::now() < deadline, "replicas never synced");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    /// Waits until every node but those in `skip` reports `cluster_state:ok`.
    pub fn wait_ok(&self, skip: &[usize], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| !skip.contains(i))
                .all(|(_, n)| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            if ok {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The index of the node that is master of `key`'s slot now.
    pub fn master_of(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .parse()
            .expect("a slot");
        for (i, node) in self.nodes.iter().enumerate() {
            let info = node.cli(&["CLUSTER", "NODES"]);
            // A dead node answers nothing.
            let Some(myself) = info.lines().find(|l| l.contains("myself")) else {
                continue;
            };
            if !myself.contains("master") {
                continue;
            }
            let owns = myself.split_whitespace().skip(8).any(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                match (start.parse::<u16>(), end.parse::<u16>()) {
                    (Ok(start), Ok(end)) => (start..=end).contains(&slot),
                    _ => false,
                }
            });
            if owns {
                return i;
            }
        }
        panic!("no master owns slot {slot}");
    }

    /// Seed URLs for `[store] redis_cluster`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }

    /// Keys matching `pattern` across every node.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.nodes
            .iter()
            .flat_map(|n| {
                n.cli(&["KEYS", pattern])
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter(|k| !k.is_empty())
            .collect()
    }
}

/// An HS256 token for `sub`, valid for ten minutes, signed with `secret`.
pub fn hs256_token(secret: &str, sub: &str) -> String {
    let claims =
        serde_json::json!({"sub": sub, "exp": jsonwebtoken::get_current_timestamp() + 600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing a test token")
}

/// A response to a hand-written request, read until the server closes the connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Lower-case names, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// Sends `head` (request line and headers, `\r\n`-separated, without the blank line) and `body`
/// over a fresh connection, byte for byte as written, with `Connection: close` added unless the
/// head has a `Connection` of its own (which must then say `close`); for the spellings a
/// well-behaved client library will not produce.
pub async fn raw_request(port: u16, head: &str, body: &[u8]) -> RawResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connecting");
    let close = if head.to_ascii_lowercase().contains("\nconnection:") {
        ""
    } else {
        "\r\nconnection: close"
    };
    let mut request = format!("{head}{close}\r\n\r\n").into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).await.expect("writing");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("the response timed out")
        .expect("reading");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<Vec<_>>();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    RawResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The quickstart configuration (config/quickstart.toml) with its listener on `{port}`, its
/// admin listener on `admin_port` and `upstream` as its origin: the tests run what users run.
pub fn quickstart_config(upstream: &str, admin_port: u16) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/quickstart.toml");
    std::fs::read_to_string(path)
        .expect("reading config/quickstart.toml")
        .replace("127.0.0.1:8080", "127.0.0.1:{port}")
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin_port}"))
        .replace("${UPSTREAM_URL:-http://127.0.0.1:3000}", upstream)
        .replace("threads = 2", "threads = 1")
}

/// A [`config_for`] configuration with more `[server]` settings.
pub fn with_server_settings(config: &str, settings: &str) -> String {
    config.replacen("[server]\n", &format!("[server]\n{settings}\n"), 1)
}
