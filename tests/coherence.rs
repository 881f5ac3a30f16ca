//! Coherence through Redis failures: four gateway instances on a real Redis (a six-node Redis
//! Cluster, or one server), concurrent writers and readers through random instances, and a
//! failure in the middle — a master SIGKILLed, Redis restarted with its data lost, one instance
//! cut off from Redis. The check: a read that starts after a write returned sees that write's
//! version or a later one; no 5xx.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, Client, Gateway, RedisCluster, Upstream};
use hyper::{Method, StatusCode};

const ROUTES: &str = r#"
[[routes]]
path = "/products/{id}"
methods = ["GET", "HEAD"]
cache = { ttl = "30s" }
[[routes]]
path = "/products/{id}"
methods = ["PUT", "PATCH"]
purge = []
"#;

const HOST: &[(&str, &str)] = &[("host", "api.example.test")];

fn gateway(upstream: &Upstream, store: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
[server]
threads = 1
grace_period = "1s"
[[listeners]]
address = "127.0.0.1:{{port}}"
[admin]
address = "127.0.0.1:{}"
[upstream]
addresses = ["{}"]
{store}
{ROUTES}
"#,
        free_port(),
        upstream.url()
    ))
}

fn on_cluster(cluster: &RedisCluster) -> String {
    let seeds: Vec<String> = cluster.seeds().iter().map(|s| format!("{s:?}")).collect();
    format!(
        "[store]\nredis_cluster = [{}]\ntimeout = \"100ms\"\n",
        seeds.join(", ")
    )
}

async fn ready(gw: &Gateway) {
    let url = format!("http://127.0.0.1:{}/readyz", gw.admin_port());
    let ready = common::eventually(Duration::from_secs(20), || async {
        Client::new().get(&url).await.status == StatusCode::OK
    })
    .await;
    assert!(ready, "not ready: {}", gw.logs());
}

/// One operation the checker saw.
#[derive(Debug, Clone, Copy)]
struct Observed {
    product: u64,
    started: Instant,
    finished: Instant,
    version: u64,
    status: u16,
    hit: bool,
}

/// What a run saw: writes and reads, each with when it started and ended.
struct Run {
    start: Instant,
    writes: Vec<Observed>,
    reads: Vec<Observed>,
}

impl Run {
    /// Reads that started after a write of the same product had returned and still saw an
    /// older version.
    fn stale(&self) -> Vec<(Observed, u64)> {
        self.reads
            .iter()
            .filter_map(|read| {
                let newest_done = self
                    .writes
                    .iter()
                    .filter(|w| w.product == read.product && w.finished < read.started)
                    .map(|w| w.version)
                    .max()?;
                (read.version < newest_done).then_some((*read, newest_done))
            })
            .collect()
    }

    fn failed(&self) -> usize {
        self.writes
            .iter()
            .chain(&self.reads)
            .filter(|o| o.status != 200)
            .count()
    }

    fn assert_coherent(&self, what: &str, gateways: &[Arc<Gateway>]) {
        let stale = self.stale();
        let logs = || {
            gateways
                .iter()
                .map(|g| g.logs())
                .collect::<Vec<_>>()
                .join("\n----\n")
        };
        assert!(
            self.writes.len() > 40 && self.reads.len() > 400,
            "{what}: too little traffic ({} writes, {} reads)",
            self.writes.len(),
            self.reads.len()
        );
        let hits = self.reads.iter().filter(|r| r.hit).count();
        let mut write_times: Vec<Duration> =
            self.writes.iter().map(|w| w.finished - w.started).collect();
        write_times.sort();
        let at = |q: f64| write_times[((write_times.len() - 1) as f64 * q) as usize];
        let slow: Vec<u128> = self
            .writes
            .iter()
            .filter(|w| w.finished - w.started > Duration::from_millis(300))
            .map(|w| (w.started - self.start).as_millis())
            .collect();
        eprintln!("{what}: writes over 300 ms started at (ms) {slow:?}");
        eprintln!(
            "{what}: {} writes (p50 {:?}, p99 {:?}, slowest {:?}), {} reads ({hits} hits)",
            self.writes.len(),
            at(0.5),
            at(0.99),
            at(1.0),
            self.reads.len()
        );
        assert!(
            hits * 4 > self.reads.len(),
            "{what}: the cache was hardly used ({hits} hits)"
        );
        assert_eq!(self.failed(), 0, "{what}: requests failed\n{}", logs());
        assert!(
            stale.is_empty(),
            "{what}: {} of {} reads saw a version older than a write that returned before they started, e.g. {:?}\n{}",
            stale.len(),
            self.reads.len(),
            &stale[..stale.len().min(5)],
            logs()
        );
    }
}

/// Four writers and eight readers on products 1–4 through random instances for `length`;
/// `failure` runs (on a blocking thread) at `fail_at`.
async fn check(
    gateways: &[Arc<Gateway>],
    length: Duration,
    fail_at: Duration,
    failure: impl FnOnce() + Send + 'static,
) -> Run {
    let start = Instant::now();
    let until = start + length;
    let failing = tokio::spawn(async move {
        tokio::time::sleep(fail_at).await;
        tokio::task::spawn_blocking(failure).await.unwrap();
    });
    let mut tasks = Vec::new();
    for worker in 0..12u64 {
        let gateways: Vec<Arc<Gateway>> = gateways.to_vec();
        let writer = worker < 4;
        tasks.push(tokio::spawn(async move {
            let client = Client::new();
            let mut seen = Vec::new();
            let mut n = worker * 1_000_000;
            let mut pick = worker.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            while Instant::now() < until {
                // xorshift: a different instance and product each time, no shared state.
                pick ^= pick << 13;
                pick ^= pick >> 7;
                pick ^= pick << 17;
                let gw = &gateways[(pick % gateways.len() as u64) as usize];
                let product = 1 + (pick >> 8) % 4;
                let path = format!("/products/{product}");
                let started = Instant::now();
                let resp = if writer {
                    n += 1;
                    let mut headers = HOST.to_vec();
                    headers.push(("content-type", "application/json"));
                    client
                        .send(
                            Method::PATCH,
                            &gw.url(&path),
                            &headers,
                            Bytes::from(format!(r#"{{"stock": {}}}"#, n % 1000)),
                        )
                        .await
                } else {
                    client
                        .send(Method::GET, &gw.url(&path), HOST, Bytes::new())
                        .await
                };
                let version = if resp.status == StatusCode::OK {
                    resp.json()["version"].as_u64().expect("a version")
                } else {
                    0
                };
                seen.push(Observed {
                    product,
                    started,
                    finished: Instant::now(),
                    version,
                    status: resp.status.as_u16(),
                    hit: resp.header("x-cache") == Some("HIT"),
                });
            }
            (writer, seen)
        }));
    }
    let mut run = Run {
        start,
        writes: Vec::new(),
        reads: Vec::new(),
    };
    for task in tasks {
        let (writer, seen) = task.await.unwrap();
        if writer {
            run.writes.extend(seen);
        } else {
            run.reads.extend(seen);
        }
    }
    failing.await.unwrap();
    run
}

async fn four_gateways(upstream: &Upstream, store: &str) -> Vec<Arc<Gateway>> {
    let gateways: Vec<Arc<Gateway>> = (0..4).map(|_| Arc::new(gateway(upstream, store))).collect();
    for gw in &gateways {
        ready(gw).await;
    }
    gateways
}

/// The master holding the purge sequence dies: writes wait for the replica to take over, and
/// no instance serves what a returned write replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stale_read_while_the_purge_master_fails_over() {
    let mut cluster = RedisCluster::start_with_replicas(1);
    let upstream = Upstream::start_with(&["--seed", "5", "--db-latency-ms", "5"]);
    let gateways = four_gateways(&upstream, &on_cluster(&cluster)).await;
    let victim = cluster.master_of("{cachegate-purge}:seq");
    let pid = cluster.nodes[victim].process.pid();
    let run = check(
        &gateways,
        Duration::from_secs(12),
        Duration::from_secs(3),
        move || {
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .expect("kill");
        },
    )
    .await;
    assert!(
        cluster.wait_ok(&[victim], Duration::from_secs(10)),
        "the replica took over"
    );
    assert_ne!(cluster.master_of("{cachegate-purge}:seq"), victim);
    run.assert_coherent("purge master killed", &gateways);
    cluster.nodes.remove(victim);
}

/// A master holding cache entries (not the purge sequence) dies: the rest of the cluster keeps
/// working, and no instance serves what a returned write replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stale_read_while_another_master_fails_over() {
    let mut cluster = RedisCluster::start_with_replicas(1);
    let upstream = Upstream::start_with(&["--seed", "5", "--db-latency-ms", "5"]);
    let gateways = four_gateways(&upstream, &on_cluster(&cluster)).await;
    let purge_master = cluster.master_of("{cachegate-purge}:seq");
    let victim = (0..cluster.nodes.len())
        .find(|&i| {
            i != purge_master
                && cluster.nodes[i]
                    .cli(&["CLUSTER", "NODES"])
                    .lines()
                    .any(|l| l.contains("myself") && l.contains("master"))
        })
        .expect("another master");
    let pid = cluster.nodes[victim].process.pid();
    let run = check(
        &gateways,
        Duration::from_secs(12),
        Duration::from_secs(3),
        move || {
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .expect("kill");
        },
    )
    .await;
    assert!(cluster.wait_ok(&[victim], Duration::from_secs(10)));
    run.assert_coherent("another master killed", &gateways);
    cluster.nodes.remove(victim);
}
