//! Coherence through Redis failures: four gateway instances on a real Redis (a six-node Redis
//! Cluster, or one server), concurrent writers and readers through random instances, and a
//! failure in the middle — a master SIGKILLed, Redis restarted with its data lost, one instance
//! cut off from Redis. The check: a read that starts after a write returned sees that write's
//! version or a later one; no 5xx.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, Client, Gateway, GatewayConfig, Redis, RedisCluster, Upstream};
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
    GatewayConfig::new(&upstream.url())
        .admin()
        .section(store)
        .section(ROUTES)
        .start()
}

fn on_cluster(cluster: &RedisCluster) -> String {
    let seeds: Vec<String> = cluster.seeds().iter().map(|s| format!("{s:?}")).collect();
    format!(
        "[store]\nredis_cluster = [{}]\ntimeout = \"100ms\"\n",
        seeds.join(", ")
    )
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
/// `failure` runs (on a blocking thread) at `fail_at`, and what it returns is kept until the
/// end.
async fn check<T: Send + 'static>(
    gateways: &[Arc<Gateway>],
    length: Duration,
    fail_at: Duration,
    failure: impl FnOnce() -> T + Send + 'static,
) -> (Run, T) {
    let start = Instant::now();
    let until = start + length;
    let failing = tokio::spawn(async move {
        tokio::time::sleep(fail_at).await;
        tokio::task::spawn_blocking(failure).await.unwrap()
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
    let kept = failing.await.unwrap();
    (run, kept)
}

async fn four_gateways(upstream: &Upstream, store: &str) -> Vec<Arc<Gateway>> {
    let gateways: Vec<Arc<Gateway>> = (0..4).map(|_| Arc::new(gateway(upstream, store))).collect();
    for gw in &gateways {
        gw.wait_ready().await;
    }
    gateways
}

/// Four instances on a six-node cluster, writers and readers for 12 s, and at 3 s the master
/// `pick` chooses is SIGKILLed. Returns what the run saw, the instances, the cluster and the
/// victim's index.
async fn run_with_a_master_killed(
    pick: impl FnOnce(&RedisCluster) -> usize,
) -> (Run, Vec<Arc<Gateway>>, RedisCluster, usize) {
    let cluster = RedisCluster::start_with_replicas(1);
    let upstream = Upstream::start_with(&["--seed", "5", "--db-latency-ms", "5"]);
    let gateways = four_gateways(&upstream, &on_cluster(&cluster)).await;
    let victim = pick(&cluster);
    let pid = cluster.nodes[victim].process.pid();
    let (run, ()) = check(
        &gateways,
        Duration::from_secs(12),
        Duration::from_secs(3),
        move || kill(pid),
    )
    .await;
    (run, gateways, cluster, victim)
}

/// The master holding the purge sequence dies: writes wait for the replica to take over, and
/// no instance serves what a returned write replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stale_read_while_the_purge_master_fails_over() {
    let (run, gateways, cluster, victim) =
        run_with_a_master_killed(|cluster| cluster.master_of("{cachegate-purge}:seq")).await;
    assert!(
        cluster.wait_ok(&[victim], Duration::from_secs(10)),
        "the replica took over"
    );
    assert_ne!(cluster.master_of("{cachegate-purge}:seq"), victim);
    run.assert_coherent("purge master killed", &gateways);
}

/// A master holding cache entries (not the purge sequence) dies: the rest of the cluster keeps
/// working, and no instance serves what a returned write replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stale_read_while_another_master_fails_over() {
    let (run, gateways, cluster, victim) = run_with_a_master_killed(|cluster| {
        let purge_master = cluster.master_of("{cachegate-purge}:seq");
        (0..cluster.nodes.len())
            .find(|&i| {
                i != purge_master
                    && cluster.nodes[i]
                        .cli(&["CLUSTER", "NODES"])
                        .lines()
                        .any(|l| l.contains("myself") && l.contains("master"))
            })
            .expect("another master")
    })
    .await;
    assert!(cluster.wait_ok(&[victim], Duration::from_secs(10)));
    run.assert_coherent("another master killed", &gateways);
}

fn on_redis(port: u16) -> String {
    format!("[store]\nredis_url = \"redis://127.0.0.1:{port}\"\ntimeout = \"100ms\"\n")
}

fn kill(pid: u32) {
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
}

/// The only Redis dies and comes back empty a second later: the purge sequence, the marks and
/// the shared entries are gone, and no instance serves what a returned write replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stale_read_when_redis_restarts_with_its_data_lost() {
    let port = free_port();
    let redis = Redis::start_on(port);
    let upstream = Upstream::start_with(&["--seed", "5", "--db-latency-ms", "5"]);
    let gateways = four_gateways(&upstream, &on_redis(port)).await;
    let pid = redis.process.pid();
    let (run, _restarted) = check(
        &gateways,
        Duration::from_secs(10),
        Duration::from_secs(3),
        move || {
            kill(pid);
            std::thread::sleep(Duration::from_secs(1));
            Redis::start_on(port)
        },
    )
    .await;
    drop(redis);
    run.assert_coherent("Redis restarted empty", &gateways);
}

/// A TCP relay between one instance and Redis that the test can stall: while cut, bytes stop
/// flowing both ways (connections stay open, as in a network partition).
struct Relay {
    port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn start(to: u16) -> Relay {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let flag = flag.clone();
                tokio::spawn(async move {
                    while flag.load(Ordering::Acquire) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, flag.clone()));
                    tokio::spawn(pump(sr, cw, flag));
                });
            }
        });
        Relay { port, cut }
    }
}

/// Copies `from` to `to`, holding the bytes while `cut` is set.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while cut.load(std::sync::atomic::Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// One instance is cut off from Redis for three seconds while the others are not: it stops
/// serving what it cannot verify, its writes wait, the others' writes wait one lease for it,
/// and no read anywhere sees what a returned write replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stale_read_while_one_instance_is_cut_off_from_redis() {
    let redis = Redis::start();
    let relay = Relay::start(redis.port).await;
    let upstream = Upstream::start_with(&["--seed", "5", "--db-latency-ms", "5"]);
    let mut gateways = vec![Arc::new(gateway(&upstream, &on_redis(relay.port)))];
    gateways.extend((0..3).map(|_| Arc::new(gateway(&upstream, &on_redis(redis.port)))));
    for gw in &gateways {
        gw.wait_ready().await;
    }
    let cut = relay.cut.clone();
    let (run, ()) = check(
        &gateways,
        Duration::from_secs(10),
        Duration::from_secs(3),
        move || {
            cut.store(true, std::sync::atomic::Ordering::Release);
            std::thread::sleep(Duration::from_secs(3));
            cut.store(false, std::sync::atomic::Ordering::Release);
        },
    )
    .await;
    run.assert_coherent("one instance cut off", &gateways);
}

/// A limit of 10 a second shared by four instances through a Redis Cluster, saturated from
/// every instance, while the master holding its key fails over: in every one-second window
/// the fleet admits what it admits while Redis is healthy — no fresh burst per instance when
/// each falls back to its local share.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shared_rate_limit_holds_while_its_master_fails_over() {
    let cluster = RedisCluster::start_with_replicas(1);
    let upstream = Upstream::start();
    let routes = r#"
[rate_limit]
instances = 4
[[routes]]
path = "/products"
methods = ["GET"]
rate_limit = { limits = [ { rate = "10/second", key = "ip", name = "fleet" } ], on_store_error = "local" }
"#;
    let config = format!("{}{routes}", on_cluster(&cluster));
    let gateways: Vec<Arc<Gateway>> = (0..4)
        .map(|_| {
            Arc::new(
                GatewayConfig::new(&upstream.url())
                    .admin()
                    .section(&config)
                    .start(),
            )
        })
        .collect();
    for gw in &gateways {
        gw.wait_ready().await;
    }
    let client = Client::new();
    client.get(&gateways[0].url("/products")).await;
    let key = cluster
        .keys("*fleet*")
        .pop()
        .expect("the limit's key in Redis");
    let victim = cluster.master_of(&key);
    let pid = cluster.nodes[victim].process.pid();

    let start = Instant::now();
    let until = start + Duration::from_secs(8);
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        kill(pid);
    });
    let mut tasks = Vec::new();
    for worker in 0..8usize {
        let gateways = gateways.clone();
        tasks.push(tokio::spawn(async move {
            let client = Client::new();
            let mut admitted = Vec::new();
            let mut other = Vec::new();
            let mut i = worker;
            while Instant::now() < until {
                i += 1;
                let resp = client.get(&gateways[i % 4].url("/products")).await;
                match resp.status.as_u16() {
                    200 => admitted.push(start.elapsed()),
                    429 => {}
                    status => other.push(status),
                }
            }
            (admitted, other)
        }));
    }
    let mut admitted = Vec::new();
    for task in tasks {
        let (mut a, other) = task.await.unwrap();
        assert!(
            other.is_empty(),
            "answers other than 200 and 429: {other:?}"
        );
        admitted.append(&mut a);
    }
    killer.await.unwrap();
    admitted.sort();
    // The fleet's admissions, run through the limit itself (GCRA: a burst of 10, then one per
    // 100 ms): how far past its burst the fleet ever went. A healthy shared limit goes nowhere
    // past it; the local shares may each admit one early where their intervals fall.
    let interval = Duration::from_millis(100);
    let mut tat = Duration::ZERO;
    let (mut worst, mut worst_at) = (0.0f64, Duration::ZERO);
    for at in &admitted {
        tat = tat.max(*at) + interval;
        let used = (tat - *at).as_secs_f64() / interval.as_secs_f64();
        if used - 10.0 > worst {
            worst = used - 10.0;
            worst_at = *at;
        }
    }
    eprintln!(
        "rate limit: {} admitted in 8 s; at most {worst:.1} past the burst (at {worst_at:?})",
        admitted.len()
    );
    assert!(
        worst <= 4.0,
        "the fleet admitted {worst:.1} past the limit's burst at {worst_at:?}"
    );
}

/// Redis dies and comes back a second later with its data (an append-only file, fsynced on
/// every write): the sequence and the marks survive, and no instance serves what a returned
/// write replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stale_read_when_redis_restarts_with_its_data_kept() {
    let port = free_port();
    let data = tempfile::TempDir::new().expect("a data directory");
    let dir = data.path().to_str().expect("utf-8 path").to_owned();
    let port_text = port.to_string();
    let args: Vec<String> = [
        "--port",
        &port_text,
        "--dir",
        &dir,
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let start = move |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Redis::start_with(port, &args)
    };
    let redis = start(&args);
    let upstream = Upstream::start_with(&["--seed", "5", "--db-latency-ms", "5"]);
    let gateways = four_gateways(&upstream, &on_redis(port)).await;
    let pid = redis.process.pid();
    let (run, restarted) = check(
        &gateways,
        Duration::from_secs(10),
        Duration::from_secs(3),
        move || {
            kill(pid);
            std::thread::sleep(Duration::from_secs(1));
            start(&args)
        },
    )
    .await;
    let seq = restarted.cli(&["GET", "{cachegate-purge}:seq"]);
    assert!(
        seq.parse::<u64>().is_ok_and(|s| s > 100),
        "the sequence survived the restart: {seq:?}"
    );
    drop(redis);
    run.assert_coherent("Redis restarted with its data", &gateways);
}

/// Every instance's purge subscription is cut again and again (`CLIENT KILL TYPE pubsub`), so
/// purges published meanwhile never reach them: each notices the gap or the missing purge, and
/// no read sees what a returned write replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stale_read_when_purge_messages_are_lost() {
    let redis = Redis::start();
    let upstream = Upstream::start_with(&["--seed", "5", "--db-latency-ms", "5"]);
    let gateways = four_gateways(&upstream, &on_redis(redis.port)).await;
    let port = redis.port;
    let (run, ()) = check(
        &gateways,
        Duration::from_secs(10),
        Duration::from_secs(2),
        move || {
            for _ in 0..12 {
                std::process::Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "CLIENT", "KILL", "TYPE", "pubsub"])
                    .output()
                    .expect("redis-cli");
                std::thread::sleep(Duration::from_millis(400));
            }
        },
    )
    .await;
    run.assert_coherent("purge messages lost", &gateways);
}
