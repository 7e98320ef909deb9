//! Hit ratio of the store's eviction policies on a skewed trace: LRU against S3-FIFO, on the
//! policy model (one index over every entry, `edge_filter::cache::eviction`) and through the
//! real store (sharded indexes, ledger, values in shared data, buffered accesses).
//!
//! `cargo bench -p edge-filter-benches --bench eviction` replays 1,000,000 requests over
//! 100,000 keys drawn from a Zipf distribution, for several cache sizes, and prints a table
//! of hit ratios and the index's bytes of overhead per entry.

use edge_filter::cache::entry::{self, ResponseMeta};
use edge_filter::cache::eviction::{Index, Kind, Policy, GHOST_BYTES, RECORD_BYTES};
use edge_filter::cache::key::hash64;
use edge_filter::cache::store::{Insert, Limits, MemoryShared, Store};
use std::collections::HashMap;
use std::time::Instant;

const KEYS: usize = 100_000;
const REQUESTS: usize = 1_000_000;
/// Every object has the same size, so the entry limit is the one that binds.
const OBJECT_BYTES: u32 = 1000;

/// xorshift64*: deterministic, so every run replays the same trace.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Keys 0..KEYS with P(k) proportional to 1 / (k + 1)^alpha, sampled by inverse CDF.
fn zipf_trace(alpha: f64, seed: u64) -> Vec<u64> {
    let mut cdf = Vec::with_capacity(KEYS);
    let mut sum = 0.0;
    for k in 0..KEYS {
        sum += 1.0 / ((k + 1) as f64).powf(alpha);
        cdf.push(sum);
    }
    let mut rng = Rng(seed);
    (0..REQUESTS)
        .map(|_| {
            let u = rng.next_f64() * sum;
            let k = cdf.partition_point(|&c| c < u);
            // Spread the key into a hash as the store sees them (never 0: the ghost's "empty").
            (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
        })
        .collect()
}

fn simulate(trace: &[u64], entries: u32, policy: Policy) -> f64 {
    let mut index = Index::empty(entries);
    index.index_ghosts();
    let total_bytes = u64::from(entries) * u64::from(OBJECT_BYTES);
    let mut slots: HashMap<u64, u32> = HashMap::with_capacity(entries as usize);
    let mut hits = 0usize;
    let mut just_freed: Vec<u32> = Vec::new();
    for &h in trace {
        if let Some(&slot) = slots.get(&h) {
            hits += 1;
            let generation = index.record(slot).map_or(0, |r| r.generation);
            index.touch(slot, generation, policy);
            continue;
        }
        just_freed.clear();
        while index.usage().entries >= entries {
            let victim = index
                .victim(policy, total_bytes)
                .expect("a full cache has a victim");
            if let Some(r) = index.record(victim) {
                slots.remove(&r.hash);
            }
            index.remove(victim);
            just_freed.push(victim);
        }
        let slot = index.free_slot(&[], &just_freed).expect("a free slot");
        index.place(slot, h, 0, OBJECT_BYTES, Kind::Response, policy);
        slots.insert(h, slot);
    }
    hits as f64 / trace.len() as f64
}

/// The same trace through the real store: a lookup per request, an insert per miss, accesses
/// folded in as the filter's tick would (every 10,000 requests; a worker's own inserts fold
/// in its accesses to that shard at once). Requests go round-robin to `workers` stores over
/// one shared data, as Envoy's workers share it. Every value has the same size, and the
/// byte limit is that size times the entries.
fn simulate_store(trace: &[u64], entries: u32, policy: Policy, workers: usize) -> f64 {
    let mem = MemoryShared::default();
    let body = vec![b'x'; 900];
    let value_of = |k: &str| entry::encode_response(0, k, "", &ResponseMeta::default(), &[], &body);
    let value_len = value_of(&key_text(0)).len() as u64;
    let limits = Limits {
        max_entries: entries,
        max_total_bytes: u64::from(entries) * value_len,
        max_entry_bytes: value_len,
        max_variants: 1,
        policy,
    };
    let mut stores: Vec<Store<&MemoryShared>> = (0..workers)
        .map(|_| Store::new(&mem, "z", limits))
        .collect();
    for s in &mut stores {
        s.init().expect("init");
    }
    let mut hits = 0usize;
    for (i, &k) in trace.iter().enumerate() {
        let store = &mut stores[i % workers];
        let key = key_text(k);
        let h = hash64(key.as_bytes());
        if store.get(h, &key).is_some() {
            hits += 1;
        } else {
            let item = Insert {
                hash: h,
                primary: h,
                kind: Kind::Response,
                value: value_of(&key),
            };
            store.insert(vec![item], true).expect("insert");
        }
        if i % 10_000 == 0 {
            for s in &mut stores {
                s.flush_touches();
            }
        }
    }
    hits as f64 / trace.len() as f64
}

/// A fixed-width key, so every value has the same size.
fn key_text(k: u64) -> String {
    format!("http://h/{k:020}")
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench`-less arguments: keep it quick.
    let quick = std::env::args().any(|a| a == "--test");
    let sizes: &[u32] = if quick {
        &[1_000]
    } else {
        &[1_000, 5_000, 10_000, 20_000]
    };
    let alphas: &[f64] = if quick { &[0.9] } else { &[0.7, 0.9, 1.1] };
    println!(
        "eviction: {REQUESTS} requests, {KEYS} keys, Zipf; index overhead {} bytes per entry",
        RECORD_BYTES + GHOST_BYTES
    );
    println!(
        "| Zipf alpha | cache size (entries) | LRU hit ratio | S3-FIFO hit ratio | difference | store, LRU | store, S3-FIFO | store, S3-FIFO, 4 workers |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &alpha in alphas {
        let trace = zipf_trace(alpha, 0x5eed_0000 + (alpha * 100.0) as u64);
        for &size in sizes {
            let t0 = Instant::now();
            let lru = simulate(&trace, size, Policy::Lru);
            let s3 = simulate(&trace, size, Policy::S3Fifo);
            let store_lru = simulate_store(&trace, size, Policy::Lru, 1);
            let store_s3 = simulate_store(&trace, size, Policy::S3Fifo, 1);
            let store_s3_4 = simulate_store(&trace, size, Policy::S3Fifo, 4);
            println!(
                "| {alpha} | {size} ({:.0} % of keys) | {:.2} % | {:.2} % | {:+.2} points | {:.2} % | {:.2} % | {:.2} % | ({:.1} s)",
                f64::from(size) * 100.0 / KEYS as f64,
                lru * 100.0,
                s3 * 100.0,
                (s3 - lru) * 100.0,
                store_lru * 100.0,
                store_s3 * 100.0,
                store_s3_4 * 100.0,
                t0.elapsed().as_secs_f64()
            );
        }
    }
}
