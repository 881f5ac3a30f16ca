//! The attacks of `bench/dos`, replayed one at a time against a running gateway (loopback only,
//! every probe bounded in connections and time), while a normal client keeps reading a cached
//! product. For each probe it prints what the normal client saw (success ratio, p99), the
//! gateway's sockets still open when the probe's hold ends, the origin's sockets, and the
//! gateway's memory.
//!
//! ```text
//! dos GATEWAY_PORT TLS_PORT GATEWAY_PID UPSTREAM_PID HOLD_SECONDS
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

struct Target {
    port: u16,
    tls_port: u16,
    gateway_pid: u32,
    upstream_pid: u32,
    hold: Duration,
}

/// What the normal client saw during a probe.
#[derive(Default)]
struct Seen {
    ok: u64,
    failed: u64,
    latencies: Vec<Duration>,
}

fn sockets(pid: u32) -> usize {
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

fn rss_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

async fn connect(port: u16) -> Option<TcpStream> {
    tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .ok()?
    .ok()
}

/// The normal client: one GET of a cached product every 20 ms, each on a fresh connection half
/// of the time (new clients must get in, not only established ones).
async fn normal_client(port: u16, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let mut kept: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> = None;
    let mut fresh = false;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let attempt = async {
            if fresh || kept.as_ref().is_none_or(|s| s.is_closed()) {
                let stream = connect(port).await?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .ok()?;
                tokio::spawn(conn);
                kept = Some(sender);
            }
            let sender = kept.as_mut()?;
            sender.ready().await.ok()?;
            let request = hyper::Request::get("/products/1")
                .header("host", "bench")
                .body(Empty::new())
                .ok()?;
            let response = sender.send_request(request).await.ok()?;
            let ok = response.status() == 200;
            response.into_body().collect().await.ok()?;
            ok.then_some(())
        };
        let outcome = tokio::time::timeout(Duration::from_secs(5), attempt).await;
        let succeeded = matches!(outcome, Ok(Some(())));
        if !succeeded {
            kept = None;
        }
        {
            let mut seen = seen.lock().unwrap();
            if succeeded {
                seen.ok += 1;
                seen.latencies.push(started.elapsed());
            } else {
                seen.failed += 1;
            }
        }
        fresh = !fresh;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `attack` for the hold time beside the normal client, then reports.
async fn probe<F, Fut>(target: &Target, name: &str, attack: F)
where
    F: FnOnce(u16, u16) -> Fut,
    Fut: std::future::Future<Output = Vec<TcpStream>> + Send + 'static,
{
    let baseline_sockets = sockets(target.gateway_pid);
    let baseline_origin = sockets(target.upstream_pid);
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let client = tokio::spawn(normal_client(target.port, stop.clone(), seen.clone()));
    let started = Instant::now();
    let held = tokio::spawn(attack(target.port, target.tls_port));
    let mut peak_origin = 0;
    let mut peak_sockets = 0;
    while started.elapsed() < target.hold {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak_origin = peak_origin.max(sockets(target.upstream_pid));
        peak_sockets = peak_sockets.max(sockets(target.gateway_pid));
    }
    let open_at_end = sockets(target.gateway_pid).saturating_sub(baseline_sockets);
    let origin_at_end = sockets(target.upstream_pid).saturating_sub(baseline_origin);
    stop.store(true, Ordering::Relaxed);
    let _ = client.await;
    let attackers = held.await.map(|h| h.len()).unwrap_or(0);
    let (ok, failed, mut latencies) = {
        let seen = seen.lock().unwrap();
        (seen.ok, seen.failed, seen.latencies.clone())
    };
    latencies.sort();
    let p99 = latencies
        .get(
            latencies
                .len()
                .saturating_sub(1)
                .min(latencies.len() * 99 / 100),
        )
        .copied()
        .unwrap_or_default();
    let total = ok + failed;
    println!(
        "{name:<16} {attackers:>6} {:>8.1}% {:>9.1} {:>7} {:>9} {:>8} {:>8} {:>8.0} {:>8.0}",
        100.0 * ok as f64 / total.max(1) as f64,
        p99.as_secs_f64() * 1000.0,
        peak_sockets.saturating_sub(baseline_sockets),
        open_at_end,
        peak_origin.saturating_sub(baseline_origin),
        origin_at_end,
        rss_mib(target.gateway_pid, "VmRSS:"),
        rss_mib(target.gateway_pid, "VmHWM:"),
    );
    // Let everything the probe left close before the next one.
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Opens up to `count` connections, concurrently, keeping those that connect.
async fn open(port: u16, count: usize) -> Vec<TcpStream> {
    let mut set = JoinSet::new();
    for _ in 0..count {
        set.spawn(connect(port));
    }
    let mut streams = Vec::new();
    while let Some(joined) = set.join_next().await {
        if let Ok(Some(stream)) = joined {
            streams.push(stream);
        }
    }
    streams
}

/// Writes `bytes` to each stream (ignoring those the gateway closed).
async fn send_all(streams: &mut [TcpStream], bytes: &[u8]) {
    for stream in streams.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_millis(50), stream.write_all(bytes)).await;
    }
}

/// Keeps `streams` for `hold`, writing `every` (if given) each second.
async fn hold(
    mut streams: Vec<TcpStream>,
    hold: Duration,
    every: Option<&'static [u8]>,
) -> Vec<TcpStream> {
    let until = Instant::now() + hold;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(bytes) = every {
            send_all(&mut streams, bytes).await;
        }
    }
    streams
}

/// The smuggling probes: one request each, the status the gateway gave and whether the origin
/// saw anything.
async fn framing(port: u16, upstream_port: u16) {
    let cases: [(&str, &[u8]); 7] = [
        ("TE x + chunked", b"POST /__headers HTTP/1.1\r\nhost: x\r\ntransfer-encoding: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
        ("TE chunked, CL", b"POST /__headers HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\nconnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
        ("no Host", b"GET /__headers HTTP/1.1\r\nconnection: close\r\n\r\n"),
        ("two Hosts", b"GET /__headers HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n"),
        ("h2c upgrade", b"GET /__headers HTTP/1.1\r\nhost: x\r\nconnection: close, upgrade, http2-settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n"),
        ("chunk size + SP", b"POST /__headers HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n2 \r\n{}\r\n0\r\n\r\n"),
        ("CL, CL", b"POST /__headers HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 3\r\nconnection: close\r\n\r\n{}"),
    ];
    println!("\nframing probe        status  origin saw  upgrade forwarded");
    for (name, request) in cases {
        let before = origin_requests(upstream_port).await;
        let Some(mut stream) = connect(port).await else {
            continue;
        };
        let _ = stream.write_all(request).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        let status = answer.split(' ').nth(1).unwrap_or("-");
        let after = origin_requests(upstream_port).await;
        let upgrade = answer.contains("\"upgrade\"");
        println!(
            "{name:<20} {status:>6}  {:>10}  {upgrade}",
            after.saturating_sub(before)
        );
    }
}

async fn origin_requests(upstream_port: u16) -> u64 {
    let Some(stream) = connect(upstream_port).await else {
        return 0;
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return 0;
    };
    tokio::spawn(conn);
    let request = hyper::Request::get("/__stats")
        .header("host", "x")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let Ok(response) = sender.send_request(request).await else {
        return 0;
    };
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["requests"]["ANY /__headers"].as_u64())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 7 {
        eprintln!(
            "usage: dos GATEWAY_PORT TLS_PORT GATEWAY_PID UPSTREAM_PID UPSTREAM_PORT HOLD_SECONDS"
        );
        std::process::exit(2);
    }
    let arg = |i: usize| args[i].parse::<u64>().expect("numbers");
    let target = Target {
        port: arg(1) as u16,
        tls_port: arg(2) as u16,
        gateway_pid: arg(3) as u32,
        upstream_pid: arg(4) as u32,
        hold: Duration::from_secs(arg(6)),
    };
    let upstream_port = arg(5) as u16;
    let hold_for = target.hold;
    println!(
        "probe            attack  normal ok  p99 (ms)  gw conns peak  open at end  origin peak  origin at end  RSS MiB  peak RSS"
    );
    probe(&target, "baseline", |_, _| async { Vec::new() }).await;
    probe(&target, "idle-tcp x2000", move |port, _| async move {
        hold(open(port, 2000).await, hold_for, None).await
    })
    .await;
    probe(&target, "slowloris x500", move |port, _| async move {
        let mut streams = open(port, 500).await;
        send_all(&mut streams, b"GET /products/1 HTTP/1.1\r\nhost: x\r\n").await;
        hold(streams, hold_for, Some(b"x-a: b\r\n")).await
    })
    .await;
    probe(&target, "1MB-heads x300", move |port, _| async move {
        let mut streams = open(port, 300).await;
        send_all(&mut streams, b"GET /products/1 HTTP/1.1\r\nhost: x\r\n").await;
        let line = format!("x-filler: {}\r\n", "a".repeat(1000));
        for _ in 0..1000 {
            send_all(&mut streams, line.as_bytes()).await;
        }
        hold(streams, hold_for, None).await
    })
    .await;
    probe(&target, "tls-stall x200", move |_, tls| async move {
        let mut streams = open(tls, 200).await;
        send_all(&mut streams, &[0x16, 0x03, 0x01]).await;
        hold(streams, hold_for, None).await
    })
    .await;
    probe(&target, "h2c-preface x200", move |port, _| async move {
        let mut streams = open(port, 200).await;
        send_all(&mut streams, b"PRI * HTTP/2.0\r\n").await;
        hold(streams, hold_for, None).await
    })
    .await;
    probe(&target, "slow-read x50", move |port, _| async move {
        let mut streams = open(port, 50).await;
        send_all(
            &mut streams,
            b"GET /__bytes/50000000 HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await;
        hold(streams, hold_for, None).await
    })
    .await;
    probe(&target, "h2-0-window 5x200", move |port, _| async move {
        let mut keep = Vec::new();
        for _ in 0..5 {
            let Some(stream) = connect(port).await else {
                continue;
            };
            let Ok((mut sender, conn)) =
                hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .initial_stream_window_size(65_535)
                    .initial_connection_window_size(65_535)
                    .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await
            else {
                continue;
            };
            tokio::spawn(conn);
            for _ in 0..200 {
                let request =
                    hyper::Request::get(format!("http://127.0.0.1:{port}/__bytes/1000000"))
                        .body(Empty::new())
                        .unwrap();
                let sent = sender.send_request(request);
                keep.push(tokio::spawn(async move {
                    let response = sent.await;
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    drop(response);
                }));
            }
        }
        tokio::time::sleep(hold_for).await;
        for task in keep {
            task.abort();
        }
        Vec::new()
    })
    .await;
    probe(&target, "slow-post x500", move |port, _| async move {
        let mut streams = open(port, 500).await;
        send_all(
            &mut streams,
            b"POST /__sink HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n0123456789",
        )
        .await;
        hold(streams, hold_for, Some(b"x")).await
    })
    .await;
    framing(target.port, upstream_port).await;
}
