//! The in-process tier's candidate maps, side by side: moka (which the tier used until it
//! measured slower) and pingora's TinyUFO (which it uses), with a std `HashMap` as the floor.
//! Random-order lookups of 1 KiB values under cache-key-like strings, one thread.
//!
//!     cargo run --release --example l1_tiers -- 10000
//!
//! TinyUFO's time includes hashing the string key to the 64-bit key it takes (as the tier does).

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let lookups = 5_000_000u64;
    let keys: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "4:http14:127.0.0.1:8080{}:/products/{i}0:0:s",
                11 + i.to_string().len()
            )
        })
        .collect();
    let value = Arc::new(vec![7u8; 1024]);
    // A fixed pseudo-random order over the keys.
    let order: Vec<usize> = (0..lookups)
        .map(|i| ((i * 2_654_435_761) % n) as usize)
        .collect();
    let mut found = 0usize;

    let moka: moka::sync::Cache<String, Arc<Vec<u8>>> = moka::sync::Cache::builder()
        .max_capacity(256 * 1024 * 1024)
        .weigher(|k: &String, v: &Arc<Vec<u8>>| (k.len() + v.len()) as u32)
        .build();
    for k in &keys {
        moka.insert(k.clone(), value.clone());
    }
    moka.run_pending_tasks();
    let started = Instant::now();
    for &i in &order {
        found += moka.get(keys[i].as_str()).map_or(0, |v| v.len());
    }
    let moka_ns = started.elapsed().as_nanos() as f64 / lookups as f64;

    let ufo: tinyufo::TinyUfo<u64, Arc<Vec<u8>>> = tinyufo::TinyUfo::new(256 * 1024, n as usize);
    let hasher = std::hash::RandomState::new();
    for k in &keys {
        ufo.force_put(hasher.hash_one(k), value.clone(), 2);
    }
    let started = Instant::now();
    for &i in &order {
        found += ufo.get(&hasher.hash_one(&keys[i])).map_or(0, |v| v.len());
    }
    let ufo_ns = started.elapsed().as_nanos() as f64 / lookups as f64;

    let map: std::collections::HashMap<&str, Arc<Vec<u8>>> =
        keys.iter().map(|k| (k.as_str(), value.clone())).collect();
    let started = Instant::now();
    for &i in &order {
        found += map.get(keys[i].as_str()).map_or(0, |v| v.len());
    }
    let map_ns = started.elapsed().as_nanos() as f64 / lookups as f64;

    println!(
        "{n} keys, ns per lookup: moka {moka_ns:.0}, TinyUFO {ufo_ns:.0}, HashMap {map_ns:.0} ({found} bytes found)"
    );
}
