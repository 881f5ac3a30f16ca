//! The edge: what a hostile client can do to the gateway's front door. Smuggling doors (framing,
//! `Host`, `h2c`), the clocks every connection runs on (first request, request head, keep-alive,
//! send stalls, slow bodies), and the bounds on memory and connections (request-head buffers,
//! origin connections, the open-file limit, the in-process tier's real size).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{config_for, raw_request, Client, Gateway, Upstream};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A gateway in front of `upstream` with `[limits]` set to `limits` and `extra` after it.
fn gateway_with(upstream: &Upstream, limits: &str, extra: &str) -> Gateway {
    Gateway::start(&config_for(
        &[&upstream.url()],
        &format!("[limits]\n{limits}\n{extra}"),
    ))
}

/// Waits (up to `limit`) for the server to close `stream`; how long it took, or `None` when it
/// stayed open. Whatever the server sends before closing is read and dropped.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the gateway accepts connections")
}

/// Sockets the process `pid` holds open.
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// A connection that has had one request answered (`200`) and is now between requests.
async fn after_one_request(port: u16) -> TcpStream {
    let mut stream = connect(port).await;
    stream
        .write_all(b"GET /__headers HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 1024];
    let n = stream.read(&mut answer).await.unwrap();
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
    stream
}

/// RFC 9112 §6.1, §3.2: a transfer coding other than `chunked` (even before it), a missing or
/// doubled `Host`, are answered by the gateway with problem+json and never reach the origin.
#[tokio::test]
async fn framing_and_host_doors_are_shut() {
    let upstream = Upstream::start();
    let gateway = gateway_with(&upstream, "", "");
    let port = gateway.port;
    let body = "2\r\n{}\r\n0\r\n\r\n";
    let before = upstream.served("ANY /__headers").await;
    for (head, status) in [
        (
            "host: x\r\ntransfer-encoding: x\r\ntransfer-encoding: chunked",
            501,
        ),
        ("host: x\r\ntransfer-encoding: x, chunked", 501),
        ("host: x\r\ntransfer-encoding: gzip, chunked", 501),
        (
            "host: x\r\ntransfer-encoding: x\r\ntransfer-encoding: chunked\r\ncontent-length: 2",
            400,
        ),
        (
            "host: x\r\ncontent-length: 2\r\ntransfer-encoding: x\r\ntransfer-encoding: chunked",
            400,
        ),
        ("transfer-encoding: chunked", 400),
        ("host: x\r\nhost: y\r\ntransfer-encoding: chunked", 400),
        ("host: x\r\nhost: x\r\ntransfer-encoding: chunked", 400),
    ] {
        let resp = raw_request(
            port,
            &format!("POST /__headers HTTP/1.1\r\n{head}"),
            body.as_bytes(),
        )
        .await;
        assert!(
            resp.status == status || (status == 400 && resp.status == 501),
            "{head:?}: {} {}",
            resp.status,
            resp.body
        );
        if resp.header("content-type") == Some("application/problem+json") {
            assert!(resp.json()["request_id"].is_string(), "{head:?}");
        } else {
            panic!("{head:?}: not problem+json: {resp:?}");
        }
    }
    assert_eq!(upstream.served("ANY /__headers").await, before);

    // A request without Host pipelined behind a body whose framing the first head left in doubt
    // never reaches the origin either.
    let resp = raw_request(
        port,
        "POST /__headers HTTP/1.1\r\nhost: x\r\ncontent-length: 33",
        b"GET /__headers HTTP/1.1\r\nx: y\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(upstream.served("ANY /__headers").await, before + 1);
    let mut stream = connect(port).await;
    stream
        .write_all(
            b"GET /__headers HTTP/1.1\r\nhost: x\r\n\r\nGET /__headers HTTP/1.1\r\nx: y\r\n\r\n",
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut seen)).await;
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(
        seen.contains("HTTP/1.1 400"),
        "the Host-less second request: {seen}"
    );
    assert_eq!(upstream.served("ANY /__headers").await, before + 2);

    // Whitespace after a chunk size (RFC 9112 §7.1 allows it only before `;`): the body fails at
    // that line, the origin never gets a complete request, the client gets problem+json.
    let completed = upstream.served("POST /__sink completed").await;
    let resp = raw_request(
        port,
        "POST /__sink HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked",
        b"5\r\nhello\r\n5 \r\nworld\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 400, "{}", resp.body);
    assert!(resp.json()["detail"]
        .as_str()
        .unwrap()
        .contains("whitespace after a chunk size"));
    assert_eq!(upstream.served("POST /__sink completed").await, completed);
    let resp = raw_request(
        port,
        "POST /__sink HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked",
        b"5 ;ext=1\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(
        resp.status, 200,
        "whitespace before an extension is allowed: {}",
        resp.body
    );
    assert_eq!(resp.json()["bytes"], 5);

    // HTTP/1.0 needs no Host.
    let resp = raw_request(port, "GET /__headers HTTP/1.0", b"").await;
    assert_eq!(resp.status, 200, "{}", resp.body);
}

/// `h2c` (and any protocol the route does not allow) is never asked of the origin: `Upgrade`
/// keeps only the allowed protocols, `HTTP2-Settings` goes; WebSocket stays allowed by default
/// and can be refused per route.
#[tokio::test]
async fn only_allowed_upgrades_reach_the_origin() {
    let upstream = Upstream::start();
    let gateway = gateway_with(
        &upstream,
        "",
        "[[routes]]\npath = \"/__headers\"\nmethods = [\"GET\"]\n\n[[routes]]\npath = \"/__headers\"\nmethods = [\"POST\"]\nupgrades = []\n",
    );
    let port = gateway.port;
    let h2c = "GET /__headers HTTP/1.1\r\nhost: x\r\nconnection: close, Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA";
    let resp = raw_request(port, h2c, b"").await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let seen = &resp.json()["headers"];
    for gone in ["upgrade", "http2-settings", "connection"] {
        assert!(
            seen.get(gone).is_none(),
            "{gone} reached the origin: {seen}"
        );
    }
    let mixed = "GET /__headers HTTP/1.1\r\nhost: x\r\nconnection: close, upgrade\r\nupgrade: h2c, websocket/13";
    let resp = raw_request(port, mixed, b"").await;
    assert_eq!(resp.json()["headers"]["upgrade"], json!(["websocket/13"]));
    let closed = "POST /__headers HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close, upgrade\r\nupgrade: websocket";
    let resp = raw_request(port, closed, b"").await;
    assert!(
        resp.json()["headers"].get("upgrade").is_none(),
        "{}",
        resp.body
    );

    // `check` refuses a configuration that allows h2c.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h2c.toml");
    std::fs::write(
        &path,
        config_for(
            &[&upstream.url()],
            "[defaults]\nupgrades = [\"websocket\", \"H2C\"]\n",
        )
        .replace("{port}", "1"),
    )
    .unwrap();
    let out = common::run_cachegate(&["check", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("h2c") && stderr.contains(":"), "{stderr}");
}

/// The origin receives the query the cache keyed: spellings that origins read differently
/// (`+`, `%20`) are separate entries, each filled by its own spelling; spellings every origin
/// reads alike (`%61` and `a`) share one.
#[tokio::test]
async fn the_origin_receives_the_query_the_cache_keyed() {
    let upstream = Upstream::start();
    let gateway = gateway_with(
        &upstream,
        "",
        "[[routes]]\npath = \"/__headers\"\ncache = { ttl = \"60s\" }\n",
    );
    let client = Client::new();
    let get = |q: &'static str| {
        let url = gateway.url(&format!("/__headers?{q}"));
        let client = client.clone();
        async move { client.get(&url).await }
    };
    let plus = get("q=a+b").await;
    assert_eq!(plus.header("x-cache"), Some("MISS"));
    assert_eq!(plus.json()["uri"], "/__headers?q=a+b");
    let space = get("q=a%20b").await;
    assert_eq!(space.header("x-cache"), Some("MISS"), "not the + entry");
    assert_eq!(space.json()["uri"], "/__headers?q=a%20b");
    let encoded_plus = get("q=a%2bb").await;
    assert_eq!(encoded_plus.header("x-cache"), Some("MISS"));
    assert_eq!(get("q=a+b").await.header("x-cache"), Some("HIT"));
    assert_eq!(
        get("q=%61+b").await.header("x-cache"),
        Some("HIT"),
        "%61 is a"
    );
    assert_eq!(
        get("q=a%2Bb").await.header("x-cache"),
        Some("HIT"),
        "hex case"
    );
}

/// Each connection runs on a clock: no first request, a head that never ends, a connection idle
/// between requests, a TLS handshake or HTTP/2 preface that stalls — each closed at its deadline.
#[tokio::test]
async fn every_connection_is_on_a_clock() {
    let upstream = Upstream::start();
    let gateway = gateway_with(
        &upstream,
        "request_head_timeout = \"1s\"\nkeepalive_timeout = \"2s\"\nsend_timeout = \"2s\"",
        "",
    );
    let port = gateway.port;
    let bound = Duration::from_secs(6);

    // Nothing sent at all.
    let mut idle = connect(port).await;
    let took = closed_within(&mut idle, bound)
        .await
        .expect("an idle socket is closed");
    assert!(took >= Duration::from_millis(900), "{took:?}");

    // Half an HTTP/2 preface.
    let mut h2c = connect(port).await;
    h2c.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(
        closed_within(&mut h2c, bound).await.is_some(),
        "a stalled preface is closed"
    );

    // An HTTP/2 connection that never sends a request.
    let mut h2 = connect(port).await;
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    assert!(
        closed_within(&mut h2, bound).await.is_some(),
        "no request: closed"
    );

    // A head that trickles and never ends (slowloris), on the first request and on a later one.
    let mut slow = connect(port).await;
    slow.write_all(b"GET /__headers HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let trickle = async {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow.write_all(b"x-a: b\r\n").await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), trickle).await;
    assert!(
        closed_within(&mut slow, Duration::from_secs(1))
            .await
            .is_some(),
        "slowloris closed"
    );

    let mut later = after_one_request(port).await;
    later
        .write_all(b"GET /__headers HTTP/1.1\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut later, bound).await.is_some(),
        "a later head is on the clock too"
    );

    // Keep-alive: open between requests for keepalive_timeout, not for ever, and not less.
    let mut kept = after_one_request(port).await;
    let took = closed_within(&mut kept, bound)
        .await
        .expect("idle keep-alive is closed");
    assert!(
        took >= Duration::from_millis(1800),
        "kept {took:?}, keepalive_timeout is 2s"
    );

    // Requests within the keep-alive time keep one connection open across them.
    let mut sender = {
        let (sender, conn) =
            hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(
                hyper_util::rt::TokioIo::new(connect(port).await),
            )
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    };
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let request = hyper::Request::get("/__headers")
            .header("host", "x")
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = sender
            .send_request(request)
            .await
            .expect("the connection stayed open");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
}

/// A TLS handshake that stalls is closed at `tls_handshake_timeout`.
#[tokio::test]
async fn a_stalled_tls_handshake_is_closed() {
    let upstream = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = common::self_signed_cert(dir.path());
    let config = config_for(
        &[&upstream.url()],
        "[limits]\ntls_handshake_timeout = \"1s\"\n",
    )
    .replace(
        "address = \"127.0.0.1:{port}\"",
        &format!(
            "address = \"127.0.0.1:{{port}}\"\ntls = {{ cert_file = {:?}, key_file = {:?} }}",
            cert.to_str().unwrap(),
            key.to_str().unwrap()
        ),
    );
    let gateway = Gateway::start(&config);
    let mut stream = connect(gateway.port).await;
    // The first bytes of a ClientHello's record header, then nothing.
    stream.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let took = closed_within(&mut stream, Duration::from_secs(5))
        .await
        .expect("the handshake is cut off");
    assert!(took >= Duration::from_millis(900), "{took:?}");
}

/// A client that stops reading a large response — on HTTP/1.1 (the socket fills) and on HTTP/2
/// (its stream window stays at zero) — loses its connection at `send_timeout`, and the origin
/// connection its response held is closed with it.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_releases_the_origin() {
    let upstream = Upstream::start();
    let gateway = gateway_with(&upstream, "send_timeout = \"2s\"", "");
    let port = gateway.port;
    let baseline = open_sockets(upstream.process.pid());

    let mut h1 = connect(port).await;
    h1.write_all(b"GET /__bytes/200000000 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0u8; 256];
    let n = h1.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    // Stop reading: the kernel buffers fill, then the gateway's writes block.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        open_sockets(upstream.process.pid()) > baseline,
        "the origin is streaming"
    );
    let released = common::eventually(Duration::from_secs(8), || async {
        open_sockets(upstream.process.pid()) <= baseline
    })
    .await;
    assert!(
        released,
        "the origin connection is closed after the send stall"
    );
    drop(h1);

    // HTTP/2 with a 64 KiB stream window that is never given back.
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .handshake::<_, http_body_util::Empty<Bytes>>(hyper_util::rt::TokioIo::new(
                connect(port).await,
            ))
            .await
            .unwrap();
    let driver = tokio::spawn(conn);
    let mut held = Vec::new();
    for _ in 0..3 {
        let request = hyper::Request::get(format!("http://127.0.0.1:{port}/__bytes/50000000"))
            .body(http_body_util::Empty::new())
            .unwrap();
        held.push(sender.send_request(request).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        open_sockets(upstream.process.pid()) >= baseline + 3,
        "three streams in flight"
    );
    let released = common::eventually(Duration::from_secs(8), || async {
        open_sockets(upstream.process.pid()) <= baseline
    })
    .await;
    assert!(
        released,
        "the stalled HTTP/2 connection's origin connections are closed"
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), driver).await;
    assert!(ended.is_ok(), "the gateway closed the HTTP/2 connection");
    drop(held);
}

/// A request body that trickles in slower than `min_request_body_rate` is cut off with `408`.
#[tokio::test]
async fn a_trickling_request_body_is_cut_off() {
    let upstream = Upstream::start();
    let gateway = gateway_with(
        &upstream,
        "request_head_timeout = \"1s\"\nmin_request_body_rate = \"1KiB\"",
        "",
    );
    let mut stream = connect(gateway.port).await;
    stream
        .write_all(b"POST /__sink HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\nabc")
        .await
        .unwrap();
    let started = Instant::now();
    let mut seen = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
            // Keep trickling a byte now and then: still far below 1 KiB/s.
            let _ = stream.write_all(b"x").await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the gateway answers");
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.starts_with("HTTP/1.1 408"), "{seen}");
    assert!(seen.contains("application/problem+json"), "{seen}");
    assert!(started.elapsed() < Duration::from_secs(8));

    // A body at a normal pace passes.
    let resp = Client::new()
        .send(
            hyper::Method::POST,
            &gateway.url("/__sink"),
            &[],
            Bytes::from(vec![7u8; 500_000]),
        )
        .await;
    assert_eq!(resp.status, 200);
}

/// At most `max_connections` requests in flight to one origin; the next waits in a bounded
/// queue (up to `connect_timeout`) and is then refused with `503` problem+json.
#[tokio::test]
async fn origin_connections_are_capped_with_a_bounded_queue() {
    let upstream = Upstream::start();
    let config = config_for(&[&upstream.url()], "").replace(
        "connect_timeout = \"1s\"",
        "connect_timeout = \"1s\"\nmax_connections = 2\nmax_pending_requests = 1",
    );
    let gateway = Gateway::start(&config);
    let port = gateway.port;
    // Two slow uploads hold both slots.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(port).await;
        stream
            .write_all(b"POST /__sink HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\nabc")
            .await
            .unwrap();
        holders.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = Client::new();
    let started = Instant::now();
    let url = gateway.url("/__headers");
    let (queued, overflow) = tokio::join!(client.get(&url), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.get(&url).await
    });
    assert_eq!(overflow.status, 503, "the queue of one is full");
    assert!(overflow.header("retry-after").is_some());
    assert_eq!(overflow.json()["status"], 503);
    assert_eq!(queued.status, 503, "no slot freed within connect_timeout");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // A freed slot serves the next request.
    for mut holder in holders.drain(..1) {
        holder.write_all(&vec![b'x'; 997]).await.unwrap();
        let mut buf = vec![0u8; 512];
        let n = holder.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    assert_eq!(client.get(&gateway.url("/__headers")).await.status, 200);
}

/// Request heads are buffered up to `max_request_header_bytes` plus a margin, not hyper's
/// default megabyte: 200 connections sending endless heads barely move the gateway's memory.
#[tokio::test]
async fn unfinished_heads_cannot_buy_memory() {
    let upstream = Upstream::start();
    let gateway = gateway_with(&upstream, "max_request_header_bytes = \"16KiB\"", "");
    let port = gateway.port;
    assert_eq!(
        Client::new().get(&gateway.url("/__headers")).await.status,
        200
    );
    let baseline = gateway.process.peak_rss_kib();
    let line = format!("x-filler: {}\r\n", "a".repeat(1000));
    let mut streams = Vec::new();
    for _ in 0..200 {
        let mut stream = connect(port).await;
        let _ = stream
            .write_all(b"GET /__headers HTTP/1.1\r\nhost: x\r\n")
            .await;
        streams.push(stream);
    }
    for _ in 0..1000 {
        let mut open = 0;
        for stream in &mut streams {
            if tokio::time::timeout(Duration::from_millis(20), stream.write_all(line.as_bytes()))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                open += 1;
            }
        }
        if open == 0 {
            break;
        }
    }
    let growth = gateway.process.peak_rss_kib().saturating_sub(baseline);
    // 200 × (16 KiB + margin) is under 5 MiB; hyper's default would have been 200 MiB.
    assert!(growth < 40 * 1024, "peak RSS grew by {growth} KiB");
    // HTTP/2's header lists are bounded the same way: a 40 KiB list is refused, never buffered.
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, http_body_util::Empty<Bytes>>(hyper_util::rt::TokioIo::new(
                connect(port).await,
            ))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::get(format!("http://127.0.0.1:{port}/__headers"))
        .header("x-big", "a".repeat(40_000))
        .body(http_body_util::Empty::new())
        .unwrap();
    // The gateway advertises the limit in its SETTINGS: the list is refused (431 or a reset, or
    // by the client itself, which reads the setting), never answered 200.
    let status = sender.send_request(request).await.map(|resp| resp.status());
    assert!(
        matches!(status, Ok(s) if s == 431) || status.is_err(),
        "{status:?}"
    );
    // The head over the limit got an answer, not silence.
    let resp = raw_request(
        port,
        &format!(
            "GET /__headers HTTP/1.1\r\nhost: x\r\nx-big: {}",
            "a".repeat(20_000)
        ),
        b"",
    )
    .await;
    assert_eq!(resp.status, 431);
}

/// cachegate with `config` (its listener on `port`), started with 1,024 open files at most.
fn gateway_at_1024_descriptors(config: &str, port: u16) -> common::Process {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cachegate.toml");
    std::fs::write(&path, config).unwrap();
    let mut process = common::Process::spawn(
        "cachegate",
        std::path::Path::new("prlimit"),
        &[
            "--nofile=1024:1024",
            common::cachegate_bin().to_str().unwrap(),
            "run",
            "--config",
            path.to_str().unwrap(),
        ],
        dir,
    );
    process.wait_for_port(port);
    process
}

/// The soft open-file limit is raised to the hard one; with both at 1,024, a flood of idle
/// sockets neither locks normal clients out (idle connections yield under pressure) nor floods
/// the log, and the admin listener keeps answering.
#[tokio::test]
async fn a_flood_of_idle_sockets_at_1024_descriptors_locks_nobody_out() {
    let upstream = Upstream::start();
    let admin = common::free_port();
    let port = common::free_port();
    let config = config_for(
        &[&upstream.url()],
        &format!("[admin]\naddress = \"127.0.0.1:{admin}\"\n"),
    )
    .replace("{port}", &port.to_string());
    let mut process = gateway_at_1024_descriptors(&config, port);
    process.wait_for_port(admin);
    let logged = common::eventually(Duration::from_secs(5), || async {
        let logs = process.logs();
        logs.contains("open_files=1024") && logs.contains("max_connections=448")
    })
    .await;
    assert!(logged, "{}", process.logs());

    let flood = open_many(port, 1050).await;
    // The listener holds 448 and the kernel's backlog some more; the rest wait to connect.
    assert!(flood.len() >= 448, "{} sockets opened", flood.len());
    let client = Client::new();
    let url = format!("http://127.0.0.1:{port}/__headers");
    let mut served = 0;
    let started = Instant::now();
    for _ in 0..10 {
        let resp = tokio::time::timeout(Duration::from_secs(5), client.get(&url)).await;
        if resp.is_ok_and(|r| r.status == 200) {
            served += 1;
        }
    }
    assert_eq!(served, 10, "a normal client is served throughout");
    assert!(started.elapsed() < Duration::from_secs(30));
    let health = client
        .get(&format!("http://127.0.0.1:{admin}/healthz"))
        .await;
    assert_eq!(health.status, 200);
    drop(flood);
    let warnings = process
        .logs()
        .matches("accepting connections failed")
        .count();
    assert!(warnings <= 2, "{warnings} accept warnings");

    // With the listener allowed more connections than there are descriptors, accepts fail:
    // the gateway backs off and says so once per interval, not every 50 ms.
    drop(process);
    let config = config.replace("[admin]", "[limits]\nmax_connections = 5000\n\n[admin]");
    let process = gateway_at_1024_descriptors(&config, port);
    // More connections than descriptors, until the gateway runs out (a loaded machine may take
    // a while to accept them all).
    let mut flood = open_many(port, 1100).await;
    let started = Instant::now();
    while !process.logs().contains("accepting connections failed")
        && started.elapsed() < Duration::from_secs(30)
    {
        flood.extend(open_many(port, 100).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        process.logs().contains("accepting connections failed"),
        "out of descriptors ({} sockets open), the gateway says so: {}",
        flood.len(),
        process.logs()
    );
    // It keeps failing every 50 ms meanwhile, but says so once per 10 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let warnings = process
        .logs()
        .matches("accepting connections failed")
        .count();
    assert_eq!(warnings, 1, "{}", process.logs());
    drop(flood);
}

/// Opens up to `count` connections to `port` within a few seconds, keeping those that connect.
async fn open_many(port: u16, count: usize) -> Vec<TcpStream> {
    let connects = (0..count).map(|_| async {
        tokio::time::timeout(
            Duration::from_secs(3),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .ok()
        .and_then(Result::ok)
    });
    futures_util::future::join_all(connects)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The in-process tier's bound is a memory bound: 50,000 small entries through a 16 MiB tier
/// grow the process by about the tier's size, not by what hyper's read buffers would pin.
#[tokio::test]
async fn the_in_process_tier_is_bounded_in_real_memory() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(
        &config_for(
            &[&upstream.url()],
            "[cache]\nmemory_capacity = \"16MiB\"\n\n[[routes]]\npath = \"/__respond\"\ncache = { ttl = \"10m\" }\n",
        ),
    );
    let client = Client::new();
    let url = |i: usize| gateway.url(&format!("/__respond?n={i}&h.x-pad={}", "p".repeat(200)));
    assert_eq!(client.get(&url(0)).await.status, 200);
    let baseline = gateway.process.peak_rss_kib();
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let client = client.clone();
            let urls: Vec<String> = (1..=50_000).filter(|i| i % 8 == w).map(url).collect();
            tokio::spawn(async move {
                for url in urls {
                    assert_eq!(client.get(&url).await.status, 200);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let growth = gateway.process.peak_rss_kib().saturating_sub(baseline);
    eprintln!("50,000 entries through a 16 MiB tier: peak RSS grew by {growth} KiB");
    assert!(
        growth < (16 + 24) * 1024,
        "peak RSS grew by {growth} KiB for a 16 MiB tier"
    );
    assert_eq!(
        client.get(&url(50_001)).await.header("x-cache"),
        Some("MISS")
    );
    assert_eq!(
        client.get(&url(50_001)).await.header("x-cache"),
        Some("HIT")
    );
}

/// An origin that sends a valid head and then a broken body: the client gets a clean `502`
/// problem+json (not an empty reply) when the break comes with the head, and a cut-off response
/// (never a complete-looking one) when it comes later.
#[tokio::test]
async fn a_broken_body_right_after_a_valid_head_is_a_clean_502() {
    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_port = origin.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = origin.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = vec![0u8; 4096];
                let _ = stream.read(&mut head).await;
                let later = String::from_utf8_lossy(&head).contains("later");
                let answer: &[u8] = if later {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n"
                };
                let _ = stream.write_all(answer).await;
                if later {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = stream.write_all(b"zz\r\n").await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            });
        }
    });
    let gateway = Gateway::start(&config_for(
        &[&format!("http://127.0.0.1:{origin_port}")],
        "",
    ));
    let resp = raw_request(gateway.port, "GET /broken HTTP/1.1\r\nhost: x", b"").await;
    assert_eq!(resp.status, 502, "{resp:?}");
    assert_eq!(
        resp.header("content-type"),
        Some("application/problem+json")
    );
    assert!(resp.json()["request_id"].is_string());

    // Broken after the first bytes went out: the response is cut off, not ended cleanly.
    let mut stream = connect(gateway.port).await;
    stream
        .write_all(b"GET /later HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut seen)).await;
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(
        !seen.ends_with("0\r\n\r\n"),
        "no terminating chunk: {seen:?}"
    );
}
