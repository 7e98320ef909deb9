//! The store at 4 K, 64 K and 1 M entries: a lookup that misses, a hit (from a worker that
//! knows the slot, and from one that does not), and an insert into a full store, which
//! evicts. The store is sharded, so each should cost the same at every size; a regression
//! that makes an operation grow with `max_entries` shows here without a proxy.
//! `cargo bench -p edge-filter-benches --bench store`.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use edge_filter::cache::entry::{self, ResponseMeta};
use edge_filter::cache::key::hash64;
use edge_filter::cache::store::{Insert, Kind, Limits, MemoryShared, Policy, SharedData, Store};

const SIZES: [(u32, &str); 3] = [(4096, "4K"), (65_536, "64K"), (1_000_000, "1M")];
/// Body of every stored value: small, so a million fit in memory; the value's copy out of
/// the host is not what these benches measure.
const BODY: usize = 64;

fn key(i: u64) -> String {
    format!("https://www.example.com/catalogue/item/{i}")
}

fn item(k: &str) -> Insert {
    let h = hash64(k.as_bytes());
    let meta = ResponseMeta {
        status: 200,
        lifetime: 3600,
        ..ResponseMeta::default()
    };
    Insert {
        hash: h,
        primary: h,
        kind: Kind::Response,
        value: entry::encode_response(0, k, "", &meta, &[], &[b'x'; BODY]),
    }
}

fn limits(entries: u32) -> Limits {
    let value_len = item(&key(0)).value.len() as u64 + 8;
    Limits {
        max_entries: entries,
        max_total_bytes: u64::from(entries) * value_len,
        max_entry_bytes: 1 << 20,
        max_variants: 8,
        policy: Policy::S3Fifo,
    }
}

/// A store filled to its entry limit with keys `0..entries`.
fn full_store(mem: &MemoryShared, entries: u32) -> Store<&MemoryShared> {
    let mut s = Store::new(mem, "b", limits(entries));
    s.init().expect("init");
    for i in 0..u64::from(entries) {
        s.insert(vec![item(&key(i))], true).expect("fill");
    }
    s
}

fn store_ops(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    for (entries, name) in SIZES {
        let mem = MemoryShared::default();
        let mut store = full_store(&mem, entries);
        // Keys present at the end of the fill (the last ones inserted survive eviction).
        let present: Vec<(u64, String)> = (u64::from(entries) - 1000..u64::from(entries))
            .map(|i| (hash64(key(i).as_bytes()), key(i)))
            .filter(|(h, k)| store.get(*h, k).is_some())
            .collect();
        assert!(present.len() > 900, "{} present", present.len());
        let absent: Vec<(u64, String)> = (0..1000u64)
            .map(|i| key(10_000_000 + i))
            .map(|k| (hash64(k.as_bytes()), k))
            .collect();
        let mut n = 0usize;
        // The host side alone: one read of a shard index from the in-memory shared data. Its
        // map grows with the entries (cache misses), which is most of what grows below.
        let shards = store.shards();
        let host = &mem;
        group.bench_function(BenchmarkId::new("host_get_index", name), |b| {
            b.iter(|| {
                n = (n + 7919) % shards as usize;
                black_box(SharedData::get(&host, &format!("b/h/{n}")))
            })
        });
        group.bench_function(BenchmarkId::new("lookup_miss", name), |b| {
            b.iter(|| {
                n = (n + 1) % absent.len();
                let (h, k) = &absent[n];
                black_box(store.get(*h, k))
            })
        });
        group.bench_function(BenchmarkId::new("lookup_hit", name), |b| {
            b.iter(|| {
                n = (n + 1) % present.len();
                let (h, k) = &present[n];
                black_box(store.get(*h, k))
            })
        });
        // Another worker, which has not seen these slots: shard index, then value.
        group.bench_function(BenchmarkId::new("lookup_hit_cold", name), |b| {
            b.iter_batched_ref(
                || Store::new(&mem, "b", limits(entries)),
                |other| {
                    n = (n + 1) % present.len();
                    let (h, k) = &present[n];
                    black_box(other.get(*h, k))
                },
                BatchSize::SmallInput,
            )
        });
        let mut next = 20_000_000u64;
        group.bench_function(BenchmarkId::new("insert_evict", name), |b| {
            b.iter_batched(
                || {
                    next += 1;
                    item(&key(next))
                },
                |it| store.insert(vec![it], true).expect("insert"),
                BatchSize::SmallInput,
            )
        });
        drop(store);
    }
    group.finish();
}

criterion_group!(benches, store_ops);
criterion_main!(benches);
