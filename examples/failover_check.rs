//! The black-box checker of `bench/failover`: writers and readers through random gateway
//! instances (loopback only, bounded in time), a failure injected by a shell command, and what
//! clients saw before, during and after it.
//!
//! ```text
//! failover_check UPSTREAM_URL SECONDS FAIL_AT_SECONDS 'FAIL COMMAND' 'OK PROBE COMMAND' GATEWAY_URL...
//! ```
//!
//! Writers `PATCH /products/{1..4}` and readers `GET` them; a read that started after a write
//! of the same product had returned must see that write's version or a later one (a *stale*
//! read otherwise). Four more clients saturate `GET /products` (a route limited to 10 a second
//! shared by the fleet): the fleet's admissions are run through that limit's own GCRA, and the
//! report says how far past its burst they went. At `FAIL_AT_SECONDS` the fail command runs;
//! then the probe command is run every 100 ms until it succeeds (the store reports healthy).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Clone, Copy)]
struct Op {
    product: u64,
    started: Duration,
    finished: Duration,
    version: u64,
    status: u16,
    write: bool,
}

async fn send(
    client: &HttpClient,
    method: hyper::Method,
    url: &str,
    body: &str,
) -> (u16, Option<serde_json::Value>) {
    let request = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("host", "api.example.test")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("a valid request");
    match tokio::time::timeout(Duration::from_secs(30), client.request(request)).await {
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (status, serde_json::from_slice(&body).ok())
        }
        _ => (599, None),
    }
}

fn percentile(mut values: Vec<Duration>, q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort();
    values[((values.len() - 1) as f64 * q) as usize]
}

/// Reads of one product that reached the origin (cache misses and refreshes).
async fn origin_reads(client: &HttpClient, upstream: &str) -> u64 {
    let (_, stats) = send(
        client,
        hyper::Method::GET,
        &format!("{upstream}/__stats"),
        "",
    )
    .await;
    stats.and_then(|s| s["total"].as_u64()).unwrap_or_default()
}

fn run_shell(command: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", command])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 6 {
        eprintln!("usage: failover_check UPSTREAM_URL SECONDS FAIL_AT 'FAIL CMD' 'OK PROBE' GATEWAY_URL...");
        std::process::exit(2);
    }
    let upstream = args[0].clone();
    let length = Duration::from_secs_f64(args[1].parse().expect("SECONDS"));
    let fail_at = Duration::from_secs_f64(args[2].parse().expect("FAIL_AT"));
    let (fail, probe) = (args[3].clone(), args[4].clone());
    let gateways: Arc<Vec<String>> = Arc::new(args[5..].to_vec());
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    let origin_start = origin_reads(&client, &upstream).await;
    let start = Instant::now();
    let ops = Arc::new(Mutex::new(Vec::<Op>::new()));
    let admitted = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16u64 {
        let (client, gateways, ops, admitted) = (
            client.clone(),
            gateways.clone(),
            ops.clone(),
            admitted.clone(),
        );
        tasks.spawn(async move {
            let mut pick = worker.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut n = worker * 1_000_000;
            while start.elapsed() < length {
                pick ^= pick << 13;
                pick ^= pick >> 7;
                pick ^= pick << 17;
                let gateway = &gateways[(pick % gateways.len() as u64) as usize];
                if worker >= 12 {
                    let (status, _) = send(
                        &client,
                        hyper::Method::GET,
                        &format!("{gateway}/products"),
                        "",
                    )
                    .await;
                    if status == 200 {
                        admitted.lock().unwrap().push(start.elapsed());
                    }
                    continue;
                }
                let write = worker < 4;
                let product = 1 + (pick >> 8) % 4;
                let url = format!("{gateway}/products/{product}");
                let started = start.elapsed();
                let (status, body) = if write {
                    n += 1;
                    let body = format!(r#"{{"stock": {}}}"#, n % 1000);
                    send(&client, hyper::Method::PATCH, &url, &body).await
                } else {
                    send(&client, hyper::Method::GET, &url, "").await
                };
                let version = body.and_then(|b| b["version"].as_u64()).unwrap_or(0);
                ops.lock().unwrap().push(Op {
                    product,
                    started,
                    finished: start.elapsed(),
                    version,
                    status,
                    write,
                });
            }
        });
    }

    // The failure, then the probe until the store is healthy again.
    tokio::time::sleep(fail_at.saturating_sub(start.elapsed())).await;
    let origin_before = origin_reads(&client, &upstream).await;
    let failed_at = start.elapsed();
    tokio::task::spawn_blocking(move || run_shell(&fail))
        .await
        .expect("the fail command ran");
    let mut ok_at = None;
    while start.elapsed() < length {
        let probe = probe.clone();
        if tokio::task::spawn_blocking(move || run_shell(&probe))
            .await
            .unwrap_or(false)
        {
            ok_at = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let origin_at_ok = origin_reads(&client, &upstream).await;
    while tasks.join_next().await.is_some() {}
    let origin_end = origin_reads(&client, &upstream).await;
    let ok_at = ok_at.unwrap_or(length);

    let ops = ops.lock().unwrap().clone();
    let (writes, reads): (Vec<Op>, Vec<Op>) = ops.iter().partition(|o| o.write);
    let stale = reads
        .iter()
        .filter(|r| {
            writes
                .iter()
                .filter(|w| w.product == r.product && w.finished < r.started && w.status == 200)
                .map(|w| w.version)
                .max()
                .is_some_and(|newest| r.version < newest && r.status == 200)
        })
        .count();
    let server_errors = ops.iter().filter(|o| o.status >= 500).count();
    let phase = |o: &Op| {
        if o.started < failed_at {
            0
        } else if o.started < ok_at {
            1
        } else {
            2
        }
    };
    println!(
        "failure at {:.1} s; the store reported healthy again at {:.1} s ({:.1} s later)",
        failed_at.as_secs_f64(),
        ok_at.as_secs_f64(),
        (ok_at - failed_at).as_secs_f64()
    );
    println!(
        "writes {}, reads {}: stale reads {stale}, 5xx (or no answer) {server_errors}",
        writes.len(),
        reads.len()
    );
    let spans = [
        failed_at,
        ok_at - failed_at,
        length.saturating_sub(ok_at).max(Duration::from_millis(1)),
    ];
    for (i, name) in ["before", "during", "after"].iter().enumerate() {
        let of = |list: &[Op]| -> Vec<Duration> {
            list.iter()
                .filter(|o| phase(o) == i)
                .map(|o| o.finished - o.started)
                .collect()
        };
        let (r, w) = (of(&reads), of(&writes));
        println!(
            "{name:>6}: reads/s {:>8.0}  read p99 {:>8.1} ms  write p99 {:>8.1} ms",
            r.len() as f64 / spans[i].as_secs_f64(),
            percentile(r, 0.99).as_secs_f64() * 1e3,
            percentile(w, 0.99).as_secs_f64() * 1e3
        );
    }
    // Read throughput after the store is back, in 250 ms buckets, against the rate before.
    let before_rate =
        reads.iter().filter(|o| phase(o) == 0).count() as f64 / failed_at.as_secs_f64().max(0.001);
    let mut recovered = None;
    let mut at = ok_at;
    while at + Duration::from_millis(250) <= length {
        let count = reads
            .iter()
            .filter(|o| o.started >= at && o.started < at + Duration::from_millis(250))
            .count() as f64;
        if count * 4.0 >= 0.9 * before_rate {
            recovered = Some(at - ok_at);
            break;
        }
        at += Duration::from_millis(250);
    }
    let series: Vec<String> = (0..24)
        .map(|i| {
            let from =
                ok_at.saturating_sub(Duration::from_secs(1)) + Duration::from_millis(250) * i;
            let count = reads
                .iter()
                .filter(|o| o.started >= from && o.started < from + Duration::from_millis(250))
                .count();
            format!("{:.0}", count as f64 * 4.0)
        })
        .collect();
    println!(
        "reads/s in 250 ms steps from 1 s before the store's recovery: {}",
        series.join(" ")
    );
    match recovered {
        Some(after) => println!(
            "read throughput back to 90% of before within {:.2} s of the store's recovery",
            after.as_secs_f64()
        ),
        None => println!("read throughput did not come back to 90% of before"),
    }
    let before_rate = (origin_before - origin_start) as f64 / failed_at.as_secs_f64();
    let after_rate = (origin_end - origin_at_ok) as f64 / spans[2].as_secs_f64();
    let during = (origin_at_ok - origin_before) as f64;
    println!(
        "origin reads/s: before {before_rate:.0}, during {:.0}, after {after_rate:.0} ({:.0} more during the failure than at the rate before it)",
        during / spans[1].as_secs_f64(),
        during - before_rate * spans[1].as_secs_f64()
    );
    let mut admitted = admitted.lock().unwrap().clone();
    admitted.sort();
    let interval = Duration::from_millis(100);
    let (mut tat, mut worst) = (Duration::ZERO, 0.0f64);
    for at in &admitted {
        tat = tat.max(*at) + interval;
        worst = worst.max((tat - *at).as_secs_f64() / interval.as_secs_f64() - 10.0);
    }
    println!(
        "rate limit 10/s shared: {} admitted in {:.0} s, at most {worst:.1} past the burst",
        admitted.len(),
        length.as_secs_f64()
    );
}
