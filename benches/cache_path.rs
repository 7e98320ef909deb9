//! The pure cache path of one request, piece by piece: key building, `Cache-Control` parsing,
//! a store lookup (index hit + slot read + key check) and entry decode, for 1 KiB and
//! 100 KiB entries. Run with `cargo bench -p edge-filter-benches`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edge_filter::cache::cache_control::CacheControl;
use edge_filter::cache::conditional;
use edge_filter::cache::entry::{self, EntryView, ResponseMeta};
use edge_filter::cache::key::CacheKey;
use edge_filter::cache::lookup;
use edge_filter::cache::policy::{self, RequestPolicy};
use edge_filter::cache::store::{Insert, Kind, Limits, MemoryShared, Policy, Store};

const SIZES: [(usize, &str); 2] = [(1024, "1KiB"), (100 * 1024, "100KiB")];

fn response_headers() -> Vec<(Vec<u8>, Vec<u8>)> {
    [
        ("content-type", "text/html; charset=utf-8"),
        (
            "cache-control",
            "public, max-age=3600, stale-while-revalidate=60",
        ),
        ("etag", "\"5f2b-1a2b3c4d\""),
        ("last-modified", "Tue, 15 Nov 1994 12:45:26 GMT"),
        ("date", "Sat, 28 Nov 2026 12:00:00 GMT"),
        ("server", "origin"),
        ("x-request-id", "0d3c6a1e-7f55-4c4e-9d1c-2f0b6c1d9a10"),
    ]
    .iter()
    .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
    .collect()
}

fn encoded(body_len: usize) -> Vec<u8> {
    let meta = ResponseMeta {
        status: 200,
        flags: 0,
        response_time: 1_764_331_200,
        initial_age: 0,
        lifetime: 3600,
    };
    entry::encode_response(
        1,
        "https://www.example.com/assets/app.js?v=42",
        "",
        &meta,
        &response_headers(),
        &vec![b'x'; body_len],
    )
}

/// A store with the filter's default limits, initialised.
fn default_store(mem: &MemoryShared) -> Store<&MemoryShared> {
    let mut store = Store::new(
        mem,
        "b",
        Limits {
            max_entries: 4096,
            max_total_bytes: 64 << 20,
            max_entry_bytes: 1 << 20,
            max_variants: 8,
            policy: Policy::S3Fifo,
        },
    );
    store.init().expect("init");
    store
}

fn key_building(c: &mut Criterion) {
    c.bench_function("key/build", |b| {
        b.iter(|| {
            CacheKey::new(
                black_box("https"),
                black_box("WWW.Example.com:443"),
                black_box("/assets/./app.js?v=42&lang=en%2dGB"),
            )
        })
    });
}

fn cache_control(c: &mut Criterion) {
    c.bench_function("cache_control/parse", |b| {
        b.iter(|| {
            CacheControl::parse([black_box(
                "public, max-age=3600, s-maxage=600, stale-while-revalidate=60, must-revalidate",
            )])
        })
    });
    let req = vec![
        ("cache-control".to_string(), "max-age=0".to_string()),
        ("accept".to_string(), "*/*".to_string()),
    ];
    c.bench_function("policy/request", |b| {
        b.iter(|| RequestPolicy::from_request(black_box(&req)))
    });
}

fn lookup_and_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("hit");
    for (len, name) in SIZES {
        let mem = MemoryShared::default();
        let mut store = default_store(&mem);
        let key = CacheKey::new("https", "www.example.com", "/assets/app.js?v=42").expect("key");
        let h = key.hash64();
        // Fill the index so lookups run against a realistic map.
        for i in 0..1000 {
            let k = CacheKey::new("https", "www.example.com", format!("/o/{i}")).expect("key");
            let v = entry::encode_response(0, k.as_str(), "", &ResponseMeta::default(), &[], b"o");
            let kh = k.hash64();
            store
                .insert(
                    vec![Insert {
                        hash: kh,
                        primary: kh,
                        kind: Kind::Response,
                        value: v,
                    }],
                    true,
                )
                .expect("insert");
        }
        let value = encoded(len);
        store
            .insert(
                vec![Insert {
                    hash: h,
                    primary: h,
                    kind: Kind::Response,
                    value: value.clone(),
                }],
                true,
            )
            .expect("insert");
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("lookup", name), &len, |b, _| {
            b.iter(|| store.get(h, key.as_str()).expect("hit"))
        });
        group.bench_with_input(BenchmarkId::new("decode", name), &value, |b, v| {
            b.iter(|| match entry::decode(black_box(v)) {
                Ok(EntryView::Response(r)) => r.body.len(),
                _ => 0,
            })
        });
        group.bench_with_input(
            BenchmarkId::new("decode+reuse+headers", name),
            &value,
            |b, v| {
                let req = RequestPolicy::default();
                b.iter(|| {
                    let Ok(EntryView::Response(r)) = entry::decode(black_box(v)) else {
                        return 0;
                    };
                    let policy::Reuse::Fresh { age, .. } =
                        policy::reuse(&r.meta, &req, 1_764_331_260)
                    else {
                        return 0;
                    };
                    let age = age.to_string();
                    policy::hit_headers(&r, &age).len()
                })
            },
        );
        // The store's values are copied out of the host on every read, as in Envoy.
        group.bench_with_input(BenchmarkId::new("encode", name), &len, |b, &len| {
            let headers = response_headers();
            let body = vec![b'x'; len];
            b.iter(|| {
                entry::encode_response(
                    0,
                    key.as_str(),
                    "",
                    &ResponseMeta::default(),
                    &headers,
                    &body,
                )
            })
        });
    }
    group.finish();
}

/// The decisions each new path adds on top of a lookup, on a 1 KiB entry: a client's
/// conditional answered 304, a stale entry served (stale-while-revalidate / stale-if-error),
/// and a coalesced waiter answered from the leader's stored response.
fn new_paths(c: &mut Criterion) {
    let value = encoded(1024);
    let now = 1_764_331_200 + 10;
    let conditional_req = vec![
        ("if-none-match".to_string(), "\"5f2b-1a2b3c4d\"".to_string()),
        ("accept".to_string(), "*/*".to_string()),
    ];
    c.bench_function("path/conditional_304", |b| {
        b.iter(|| {
            let Ok(EntryView::Response(r)) = entry::decode(black_box(&value)) else {
                return 0;
            };
            let req = RequestPolicy::from_request(&conditional_req);
            let policy::Reuse::Fresh { .. } = policy::reuse(&r.meta, &req, now) else {
                return 0;
            };
            match conditional::evaluate(&conditional_req, &r.headers, r.meta.response_time) {
                conditional::Evaluation::NotModified => {
                    conditional::not_modified_headers(&r.headers).len()
                }
                _ => 0,
            }
        })
    });
    c.bench_function("path/stale_serve", |b| {
        let req = RequestPolicy::default();
        b.iter(|| {
            let Ok(EntryView::Response(r)) = entry::decode(black_box(&value)) else {
                return None;
            };
            let cc = CacheControl::parse(edge_filter::field::values(&r.headers, "cache-control"));
            // One hour and 30 s old: inside the 60 s stale-while-revalidate window.
            policy::stale_allowed(
                &r.meta,
                &cc,
                &req,
                1_764_331_200 + 3630,
                policy::StaleReason::WhileRevalidate,
                0,
            )
        })
    });
    let mem = MemoryShared::default();
    let mut store = default_store(&mem);
    let key = CacheKey::new("https", "www.example.com", "/assets/app.js?v=42").expect("key");
    let h = key.hash64();
    store
        .insert(
            vec![Insert {
                hash: h,
                primary: h,
                kind: Kind::Response,
                value: value.clone(),
            }],
            true,
        )
        .expect("insert");
    let waiter = vec![("accept".to_string(), "*/*".to_string())];
    c.bench_function("path/coalesced_waiter", |b| {
        b.iter(|| {
            let lookup::Found::Response(hit) = lookup::lookup(&mut store, &key, &waiter) else {
                return 0;
            };
            let Ok(EntryView::Response(r)) = entry::decode(&hit.value) else {
                return 0;
            };
            let req = RequestPolicy::from_request(&waiter);
            match policy::reuse(&r.meta, &req, now) {
                policy::Reuse::Fresh { .. } => {
                    conditional::evaluate(&waiter, &r.headers, r.meta.response_time);
                    r.body.len()
                }
                _ => 0,
            }
        })
    });
}

criterion_group!(
    benches,
    key_building,
    cache_control,
    lookup_and_decode,
    new_paths
);
criterion_main!(benches);
