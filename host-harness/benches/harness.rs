//! Criterion benches of the harness: one host call round trip, instantiating a VM from a
//! compiled module, and whole requests through a no-op SDK filter and through
//! edge-filter's hit and miss paths.
//!
//! Needs the release `.wasm` files:
//! `cargo build --release --target wasm32-wasip1 -p edge-filter -p proxy-wasm-harness-noop`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use proxy_wasm_harness::{CallReply, Harness, HttpCallResponse, Request, Response};
use std::path::PathBuf;

fn wasm(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("wasm32-wasip1/release").join(name);
    assert!(
        p.is_file(),
        "{} missing: cargo build --release --target wasm32-wasip1 -p edge-filter -p proxy-wasm-harness-noop",
        p.display()
    );
    p
}

/// A guest that calls `proxy_get_current_time_nanoseconds` `n` times.
const LOOP_WAT: &str = r#"(module
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "malloc") (param i32) (result i32) i32.const 1024)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "calls") (param $n i32) (result i32)
    (block $done (loop $l
      (br_if $done (i32.eqz (local.get $n)))
      (drop (call $now (i32.const 16)))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $l)))
    i32.const 0))"#;

fn host_call(c: &mut Criterion) {
    let h = Harness::from_bytes(wat::parse_str(LOOP_WAT).unwrap())
        .build()
        .unwrap();
    let mut vm = h.new_vm().unwrap();
    let mut g = c.benchmark_group("host_call");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("get_current_time_x1000", |b| {
        b.iter(|| vm.call_export(1, "calls", &[1000]).unwrap())
    });
    g.finish();
}

fn edge() -> Harness {
    Harness::from_file(wasm("edge_filter.wasm"))
        .vm_id("edge-filter")
        .plugin_config("{}")
        .cluster("upstream", |_| {
            CallReply::now(HttpCallResponse::new(200, "ok"))
        })
        .build()
        .unwrap()
}

fn instantiate(c: &mut Criterion) {
    let noop = Harness::from_file(wasm("noop_filter.wasm"))
        .build()
        .unwrap();
    let edge = edge();
    let mut g = c.benchmark_group("instantiate");
    g.bench_function("noop_filter", |b| b.iter(|| noop.new_vm().unwrap()));
    g.bench_function("edge_filter", |b| b.iter(|| edge.new_vm().unwrap()));
    g.finish();
}

/// Guest work per request, in fuel (about one unit per Wasm instruction): explains the
/// gap between the no-op filter and edge-filter's hit path.
fn guest_work(name: &str, req: &Request, reply: &Response) -> u64 {
    let h = Harness::from_file(wasm(name))
        .vm_id("edge-filter")
        .plugin_config("{}")
        .fuel(u64::MAX / 2)
        .build()
        .unwrap();
    let mut vm = h.new_vm().unwrap();
    vm.exchange(req, &mut |_| Some(reply.clone()), false)
        .unwrap();
    let before = vm.fuel_consumed();
    for _ in 0..100 {
        vm.exchange(req, &mut |_| Some(reply.clone()), false)
            .unwrap();
    }
    (vm.fuel_consumed() - before) / 100
}

fn requests(c: &mut Criterion) {
    let body = "x".repeat(1024);
    let reply = Response::ok(&body).header("cache-control", "max-age=3600");
    let noop = Harness::from_file(wasm("noop_filter.wasm"))
        .build()
        .unwrap();
    let mut noop_vm = noop.new_vm().unwrap();
    let edge = edge();
    let mut edge_vm = edge.new_vm().unwrap();
    let req = Request::get("/bench").header("accept", "*/*");
    // Store the entry the hit path serves.
    edge_vm
        .exchange(&req, &mut |_| Some(reply.clone()), false)
        .unwrap();
    for name in ["noop_filter.wasm", "edge_filter.wasm"] {
        eprintln!(
            "guest work per request (fuel, second and later requests): {name}: {}",
            guest_work(name, &req, &reply)
        );
    }
    let mut g = c.benchmark_group("request");
    g.bench_function("noop_filter_1KiB", |b| {
        b.iter(|| {
            let ex = noop_vm
                .exchange(&req, &mut |_| Some(reply.clone()), false)
                .unwrap();
            noop_vm.forget_finished();
            ex
        })
    });
    g.bench_function("edge_filter_hit_1KiB", |b| {
        b.iter(|| {
            let ex = edge_vm.exchange(&req, &mut |_| None, false).unwrap();
            assert_eq!(ex.client.body.len(), 1024);
            edge_vm.forget_finished();
            ex
        })
    });
    let mut n = 0u64;
    g.bench_function("edge_filter_miss_1KiB", |b| {
        b.iter(|| {
            n += 1;
            let miss = Request::get(&format!("/miss/{n}"));
            let ex = edge_vm
                .exchange(&miss, &mut |_| Some(reply.clone()), false)
                .unwrap();
            edge_vm.forget_finished();
            ex
        })
    });
    g.finish();
}

criterion_group!(benches, host_call, instantiate, requests);
criterion_main!(benches);
