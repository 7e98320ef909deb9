//! Every host call, through a small WAT filter: the filter exports a trampoline
//! `h_<call>` per host call, so each test runs a call at the moment it chooses (inside a
//! paused stream, on the root context) and checks the status and what was written.
//! Also traps, limits, malformed modules, ABI 0.1.0 and parallel harnesses.

use proxy_wasm_harness::abi::shared_data::CasMode;
use proxy_wasm_harness::abi::{pairs, Status};
use proxy_wasm_harness::{
    headers, Action, CallReply, Error, FailurePolicy, Harness, HttpCallResponse, Request, Response,
    TrapKind, Vm,
};
use std::time::Duration;

/// (import module, name, params, has result); `j` is an i64 parameter.
const IMPORTS: &[(&str, &str, &str, bool)] = &[
    ("env", "proxy_log", "iii", true),
    ("env", "proxy_get_log_level", "i", true),
    ("env", "proxy_get_current_time_nanoseconds", "i", true),
    ("env", "proxy_set_tick_period_milliseconds", "i", true),
    ("env", "proxy_get_buffer_bytes", "iiiii", true),
    ("env", "proxy_get_buffer_status", "iii", true),
    ("env", "proxy_set_buffer_bytes", "iiiii", true),
    ("env", "proxy_get_header_map_pairs", "iii", true),
    ("env", "proxy_set_header_map_pairs", "iii", true),
    ("env", "proxy_get_header_map_value", "iiiii", true),
    ("env", "proxy_add_header_map_value", "iiiii", true),
    ("env", "proxy_replace_header_map_value", "iiiii", true),
    ("env", "proxy_remove_header_map_value", "iii", true),
    ("env", "proxy_get_header_map_size", "ii", true),
    ("env", "proxy_get_property", "iiii", true),
    ("env", "proxy_set_property", "iiii", true),
    ("env", "proxy_send_local_response", "iiiiiiii", true),
    ("env", "proxy_continue_stream", "i", true),
    ("env", "proxy_close_stream", "i", true),
    ("env", "proxy_http_call", "iiiiiiiiii", true),
    ("env", "proxy_grpc_call", "iiiiiiiiiiii", true),
    ("env", "proxy_grpc_stream", "iiiiiiiii", true),
    ("env", "proxy_grpc_send", "iiii", true),
    ("env", "proxy_grpc_cancel", "i", true),
    ("env", "proxy_grpc_close", "i", true),
    ("env", "proxy_get_status", "iii", true),
    ("env", "proxy_get_shared_data", "iiiii", true),
    ("env", "proxy_set_shared_data", "iiiii", true),
    ("env", "proxy_register_shared_queue", "iii", true),
    ("env", "proxy_resolve_shared_queue", "iiiii", true),
    ("env", "proxy_enqueue_shared_queue", "iii", true),
    ("env", "proxy_dequeue_shared_queue", "iii", true),
    ("env", "proxy_define_metric", "iiii", true),
    ("env", "proxy_increment_metric", "ij", true),
    ("env", "proxy_record_metric", "ij", true),
    ("env", "proxy_get_metric", "ii", true),
    ("env", "proxy_call_foreign_function", "iiiiii", true),
    ("env", "proxy_set_effective_context", "i", true),
    ("env", "proxy_done", "", true),
    ("wasi_snapshot_preview1", "fd_write", "iiii", true),
    ("wasi_snapshot_preview1", "random_get", "ii", true),
    ("wasi_snapshot_preview1", "clock_time_get", "iji", true),
    ("wasi_snapshot_preview1", "environ_sizes_get", "ii", true),
    ("wasi_snapshot_preview1", "environ_get", "ii", true),
    ("wasi_snapshot_preview1", "proc_exit", "i", false),
];

fn wat_types(p: &str) -> String {
    p.chars()
        .map(|c| if c == 'j' { " i64" } else { " i32" })
        .collect()
}

/// The test filter: trampolines, a bump allocator, and callbacks whose action the test
/// sets with `set_act`.
fn filter_wat(abi: &str) -> String {
    let mut w = String::from("(module\n");
    for (m, n, p, r) in IMPORTS {
        if abi == "0_1_0"
            && (*n == "proxy_continue_stream"
                || *n == "proxy_close_stream"
                || *n == "proxy_get_log_level")
        {
            continue;
        }
        let res = if *r { " (result i32)" } else { "" };
        w += &format!(
            "(import \"{m}\" \"{n}\" (func ${n} (param{}){res}))\n",
            wat_types(p)
        );
    }
    if abi == "0_1_0" {
        w += "(import \"env\" \"proxy_continue_request\" (func $proxy_continue_request (result i32)))\n";
    }
    w += r#"
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (global $act (mut i32) (i32.const 0))
  (global $ticks (mut i32) (i32.const 0))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (local $p i32)
    global.get $heap local.set $p
    global.get $heap local.get $n i32.add global.set $heap
    local.get $p)
  (func (export "set_act") (param i32) local.get 0 global.set $act)
  (func (export "ticks") (result i32) global.get $ticks)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
  (func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 1)
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) global.get $act)
  (func (export "proxy_on_request_trailers") (param i32 i32) (result i32) global.get $act)
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) i32.const 0)
  (func (export "proxy_on_tick") (param i32) global.get $ticks i32.const 1 i32.add global.set $ticks)
  (func (export "proxy_on_queue_ready") (param i32 i32) (i32.store (i32.const 100) (local.get 1)))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (i32.store (i32.const 104) (local.get 1))
    (i32.store (i32.const 108) (local.get 2))
    (i32.store (i32.const 112) (local.get 3))
    (i32.store (i32.const 124)
      (call $proxy_get_buffer_bytes (i32.const 4) (i32.const 0) (local.get 3) (i32.const 116) (i32.const 120))))
  (func (export "proxy_on_done") (param i32) (result i32) i32.const 1)
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32))
  (func $do_unreachable (export "do_unreachable") unreachable)
  (func (export "do_oob") (result i32) i32.const -16 i32.load)
  (func (export "do_loop") (loop $l br $l))
  (func (export "grow") (param i32) (result i32) local.get 0 memory.grow)
"#;
    if abi == "0_1_0" {
        w += r#"  (func (export "proxy_on_request_headers") (param i32 i32) (result i32) global.get $act)
  (func (export "proxy_on_response_headers") (param i32 i32) (result i32) i32.const 0)
  (func (export "h_continue_request") (result i32) call $proxy_continue_request)
"#;
    } else {
        w += r#"  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) global.get $act)
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) i32.const 0)
"#;
    }
    for (_, n, p, r) in IMPORTS {
        if abi == "0_1_0"
            && (*n == "proxy_continue_stream"
                || *n == "proxy_close_stream"
                || *n == "proxy_get_log_level")
        {
            continue;
        }
        let short = n.trim_start_matches("proxy_");
        let gets: String = (0..p.len()).map(|i| format!(" (local.get {i})")).collect();
        let res = if *r { " (result i32)" } else { "" };
        w += &format!(
            "  (func (export \"h_{short}\") (param{}){res} (call ${n}{gets}))\n",
            wat_types(p)
        );
    }
    w += &format!("  (func (export \"proxy_abi_version_{abi}\"))\n)\n");
    w
}

fn module(abi: &str) -> Vec<u8> {
    wat::parse_str(filter_wat(abi)).expect("test filter WAT")
}

fn build(
    b: impl FnOnce(proxy_wasm_harness::HarnessBuilder) -> proxy_wasm_harness::HarnessBuilder,
) -> Harness {
    b(Harness::from_bytes(module("0_2_1")).vm_id("vm"))
        .build()
        .expect("builds")
}

/// Scratch addresses in guest memory.
const A: u32 = 1024;
const B: u32 = 2048;
const C: u32 = 3072;
const OUT: u32 = 512;

fn put(vm: &mut Vm, at: u32, bytes: &[u8]) -> (i64, i64) {
    assert!(vm.write_memory(at, bytes));
    (i64::from(at), bytes.len() as i64)
}

fn call(vm: &mut Vm, ctx: u32, name: &str, args: &[i64]) -> i64 {
    vm.call_export(ctx, name, args)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .first()
        .copied()
        .unwrap_or(0)
}

fn st(s: Status) -> i64 {
    i64::from(s.code())
}

fn u32_at(vm: &Vm, at: u32) -> u32 {
    u32::from_le_bytes(vm.read_memory(at, 4).unwrap().try_into().unwrap())
}

/// Reads a (ptr, size) pair the host wrote at `OUT` and returns the bytes it points at.
fn out_bytes(vm: &Vm) -> Vec<u8> {
    let (p, n) = (u32_at(vm, OUT), u32_at(vm, OUT + 4));
    if n == 0 {
        return Vec::new();
    }
    vm.read_memory(p, n).unwrap()
}

const ROOT: u32 = 1;

#[test]
fn logging_and_log_level() {
    let h = build(|b| b.log_level(proxy_wasm_harness::abi::LogLevel::Debug));
    let mut vm = h.new_vm().unwrap();
    let (p, n) = put(&mut vm, A, b"hello log");
    assert_eq!(call(&mut vm, ROOT, "h_log", &[3, p, n]), 0);
    assert_eq!(
        call(&mut vm, ROOT, "h_log", &[0, p, n]),
        0,
        "trace is accepted"
    );
    assert_eq!(
        call(&mut vm, ROOT, "h_log", &[9, p, n]),
        st(Status::BadArgument)
    );
    assert_eq!(
        call(&mut vm, ROOT, "h_log", &[2, 0xFFFF_FFF0, 100]),
        st(Status::InvalidMemoryAccess)
    );
    let logs = h.logs();
    assert_eq!(logs.len(), 1, "below the host level is dropped: {logs:?}");
    assert_eq!(logs[0].message, "hello log");
    assert_eq!(logs[0].level, proxy_wasm_harness::abi::LogLevel::Warn);
    assert_eq!(call(&mut vm, ROOT, "h_get_log_level", &[i64::from(OUT)]), 0);
    assert_eq!(u32_at(&vm, OUT), 1);
    assert_eq!(
        call(&mut vm, ROOT, "h_get_log_level", &[-4]),
        st(Status::InvalidMemoryAccess)
    );
}

#[test]
fn clock_and_ticks() {
    let h = build(|b| b);
    let mut vm = h.new_vm().unwrap();
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_get_current_time_nanoseconds",
            &[i64::from(OUT)]
        ),
        0
    );
    let t0 = u64::from_le_bytes(vm.read_memory(OUT, 8).unwrap().try_into().unwrap());
    assert_eq!(t0, 1_767_225_600 * 1_000_000_000);
    assert_eq!(
        call(&mut vm, ROOT, "h_set_tick_period_milliseconds", &[1000]),
        0
    );
    vm.advance(Duration::from_millis(3500)).unwrap();
    assert_eq!(call(&mut vm, ROOT, "ticks", &[]), 3);
    call(
        &mut vm,
        ROOT,
        "h_get_current_time_nanoseconds",
        &[i64::from(OUT)],
    );
    let t1 = u64::from_le_bytes(vm.read_memory(OUT, 8).unwrap().try_into().unwrap());
    assert_eq!(t1 - t0, 3_500_000_000);
    assert_eq!(
        call(&mut vm, ROOT, "h_set_tick_period_milliseconds", &[0]),
        0
    );
    vm.advance(Duration::from_secs(5)).unwrap();
    assert_eq!(call(&mut vm, ROOT, "ticks", &[]), 3, "period 0 stops ticks");
    // WASI clocks read the same virtual clock.
    assert_eq!(
        call(&mut vm, ROOT, "h_clock_time_get", &[1, 0, i64::from(OUT)]),
        0
    );
    let mono = u64::from_le_bytes(vm.read_memory(OUT, 8).unwrap().try_into().unwrap());
    assert_eq!(mono, 8_500_000_000);
    assert_eq!(
        call(&mut vm, ROOT, "h_clock_time_get", &[2, 0, i64::from(OUT)]),
        58
    );
}

#[test]
fn shared_data_envoy_and_strict_cas() {
    let h = build(|b| b);
    let mut vm = h.new_vm().unwrap();
    let (k, kn) = put(&mut vm, A, b"key");
    let (v, vn) = put(&mut vm, B, b"value-1");
    let get = |vm: &mut Vm| {
        call(
            vm,
            ROOT,
            "h_get_shared_data",
            &[
                k,
                kn,
                i64::from(OUT),
                i64::from(OUT + 4),
                i64::from(OUT + 8),
            ],
        )
    };
    assert_eq!(get(&mut vm), st(Status::NotFound));
    assert_eq!(
        call(&mut vm, ROOT, "h_set_shared_data", &[k, kn, v, vn, 0]),
        0
    );
    assert_eq!(get(&mut vm), 0);
    assert_eq!(out_bytes(&vm), b"value-1");
    let cas = u32_at(&vm, OUT + 8);
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_set_shared_data",
            &[k, kn, v, vn, i64::from(cas + 7)]
        ),
        st(Status::CasMismatch)
    );
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_set_shared_data",
            &[k, kn, v, vn, i64::from(cas)]
        ),
        0
    );
    // Another VM sees the same data.
    let mut vm2 = h.new_vm().unwrap();
    let (k2, kn2) = put(&mut vm2, A, b"key");
    assert_eq!(
        call(
            &mut vm2,
            ROOT,
            "h_get_shared_data",
            &[
                k2,
                kn2,
                i64::from(OUT),
                i64::from(OUT + 4),
                i64::from(OUT + 8)
            ]
        ),
        0
    );
    assert_eq!(out_bytes(&vm2), b"value-1");
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_set_shared_data",
            &[0xFFFF_FF00, 1000, v, vn, 0]
        ),
        st(Status::InvalidMemoryAccess)
    );
    // Kong's rules: cas 0 on an existing key fails; a null value deletes.
    let h = build(|b| b.cas_mode(CasMode::StrictPerKey));
    let mut vm = h.new_vm().unwrap();
    let (k, kn) = put(&mut vm, A, b"key");
    let (v, vn) = put(&mut vm, B, b"v");
    assert_eq!(
        call(&mut vm, ROOT, "h_set_shared_data", &[k, kn, v, vn, 0]),
        0
    );
    assert_eq!(
        call(&mut vm, ROOT, "h_set_shared_data", &[k, kn, v, vn, 0]),
        st(Status::CasMismatch)
    );
    assert_eq!(
        call(&mut vm, ROOT, "h_set_shared_data", &[k, kn, 0, 0, 1]),
        0
    );
    assert!(h.shared_data("key").is_none());
}

/// Opens a stream paused in `on_request_headers` (the filter returns 1).
fn paused_stream(vm: &mut Vm) -> u32 {
    call(vm, ROOT, "set_act", &[1]);
    let id = vm.open_stream().unwrap();
    let a = vm
        .stream(id)
        .request_headers(
            headers(&[
                (":method", "GET"),
                (":path", "/p"),
                (":authority", "h"),
                ("x-a", "1"),
                ("x-a", "2"),
            ]),
            false,
        )
        .unwrap();
    assert_eq!(
        a,
        Action::StopAllIterationAndWatermark,
        "StopIteration becomes StopAll"
    );
    id
}

#[test]
fn header_maps() {
    let h = build(|b| b);
    let mut vm = h.new_vm().unwrap();
    let id = paused_stream(&mut vm);
    let (k, kn) = put(&mut vm, A, b"X-A");
    let get = |vm: &mut Vm, t: i64, k: i64, kn: i64| {
        call(
            vm,
            id,
            "h_get_header_map_value",
            &[t, k, kn, i64::from(OUT), i64::from(OUT + 4)],
        )
    };
    assert_eq!(get(&mut vm, 0, k, kn), 0);
    assert_eq!(out_bytes(&vm), b"1", "first value, case-insensitive name");
    let (m, mn) = put(&mut vm, B, b"missing");
    assert_eq!(get(&mut vm, 0, m, mn), st(Status::NotFound));
    assert_eq!(
        get(&mut vm, 8, k, kn),
        st(Status::BadArgument),
        "no map type 8"
    );
    assert_eq!(
        get(&mut vm, 2, k, kn),
        st(Status::BadArgument),
        "response headers not here yet"
    );
    let (v, vn) = put(&mut vm, C, b"z");
    assert_eq!(
        call(&mut vm, id, "h_add_header_map_value", &[0, m, mn, v, vn]),
        0
    );
    assert_eq!(
        call(
            &mut vm,
            id,
            "h_replace_header_map_value",
            &[0, k, kn, v, vn]
        ),
        0
    );
    assert_eq!(
        call(&mut vm, id, "h_get_header_map_size", &[0, i64::from(OUT)]),
        0
    );
    // Envoy reports the byte size: ":method"+"GET" ... (names and values, no separators).
    let size = u32_at(&vm, OUT);
    assert_eq!(
        size as usize,
        (7 + 3) + (5 + 2) + (10 + 1) + (3 + 1) + (7 + 1)
    );
    assert_eq!(
        call(
            &mut vm,
            id,
            "h_get_header_map_pairs",
            &[0, i64::from(OUT), i64::from(OUT + 4)]
        ),
        0
    );
    let got = pairs::decode(&out_bytes(&vm)).unwrap();
    let names: Vec<&[u8]> = got.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(
        names,
        vec![&b":method"[..], b":path", b":authority", b"x-a", b"missing"]
    );
    assert_eq!(
        call(&mut vm, id, "h_remove_header_map_value", &[0, m, mn]),
        0
    );
    let new = pairs::encode(&[(":path", "/new"), (":method", "POST"), (":authority", "h")]);
    let (p, pn) = put(&mut vm, B, &new);
    assert_eq!(call(&mut vm, id, "h_set_header_map_pairs", &[0, p, pn]), 0);
    // Resume: the upstream gets the rewritten headers; the map is gone afterwards.
    assert_eq!(call(&mut vm, id, "h_continue_stream", &[0]), 0);
    let up = vm.upstream_request(id).unwrap().clone();
    assert_eq!(up.header(":path"), Some("/new"));
    assert_eq!(up.header(":method"), Some("POST"));
    assert!(up.header("x-a").is_none());
    assert_eq!(get(&mut vm, 0, k, kn), st(Status::BadArgument));
    assert_eq!(
        call(&mut vm, id, "h_continue_stream", &[7]),
        st(Status::BadArgument)
    );
    // Empty pairs come back as a null pointer and size 0.
    assert_eq!(
        call(
            &mut vm,
            id,
            "h_get_header_map_pairs",
            &[6, i64::from(OUT), i64::from(OUT + 4)]
        ),
        0
    );
    assert_eq!((u32_at(&vm, OUT), u32_at(&vm, OUT + 4)), (0, 0));
}

#[test]
fn body_buffers_buffered_and_streaming() {
    let h = build(|b| b.plugin_config("cfg").vm_config("vmcfg"));
    let mut vm = h.new_vm().unwrap();
    call(&mut vm, ROOT, "set_act", &[0]);
    let id = vm.open_stream().unwrap();
    let mut s = vm.stream(id);
    s.request_headers(
        headers(&[(":method", "POST"), (":path", "/"), (":authority", "h")]),
        false,
    )
    .unwrap();
    s.vm().call_export(ROOT, "set_act", &[1]).unwrap();
    // StopIterationAndBuffer: the next callback sees everything buffered.
    assert_eq!(
        s.request_body(b"abc", false).unwrap(),
        Action::StopIterationAndBuffer
    );
    assert_eq!(
        s.request_body(b"def", false).unwrap(),
        Action::StopIterationAndBuffer
    );
    assert!(s.upstream_request().body.is_empty());
    let vm = s.vm();
    let get = |vm: &mut Vm, t: i64, start: i64, len: i64| {
        call(
            vm,
            id,
            "h_get_buffer_bytes",
            &[t, start, len, i64::from(OUT), i64::from(OUT + 4)],
        )
    };
    assert_eq!(get(vm, 0, 0, 100), 0);
    assert_eq!(out_bytes(vm), b"abcdef");
    assert_eq!(get(vm, 0, 2, 2), 0);
    assert_eq!(out_bytes(vm), b"cd");
    assert_eq!(get(vm, 0, 10, 5), 0);
    assert_eq!(out_bytes(vm), b"", "past the end reads nothing");
    // Envoy adds start and length as 64-bit words, so no 32-bit start overflows: it
    // clamps to the buffer and reads nothing.
    assert_eq!(get(vm, 0, 0xFFFF_FFFF, 2), 0);
    assert_eq!(out_bytes(vm), b"");
    assert_eq!(get(vm, 9, 0, 1), st(Status::BadArgument));
    assert_eq!(
        call(
            vm,
            id,
            "h_get_buffer_status",
            &[0, i64::from(OUT), i64::from(OUT + 4)]
        ),
        0
    );
    assert_eq!(u32_at(vm, OUT), 6);
    let (d, dn) = put(vm, A, b">");
    assert_eq!(
        call(vm, id, "h_set_buffer_bytes", &[0, 0, 0, d, dn]),
        0,
        "prepend"
    );
    assert_eq!(
        call(vm, id, "h_set_buffer_bytes", &[0, 100, 0, d, dn]),
        0,
        "append"
    );
    assert_eq!(
        call(vm, id, "h_set_buffer_bytes", &[0, 2, 1, d, dn]),
        st(Status::BadArgument),
        "no splicing"
    );
    // Configuration buffers: the plugin's only while configuring, the VM's always.
    assert_eq!(get(vm, 7, 0, 10), st(Status::NotFound));
    assert_eq!(get(vm, 6, 0, 10), 0);
    assert_eq!(out_bytes(vm), b"vmcfg");
    assert_eq!(
        get(vm, 4, 0, 10),
        st(Status::NotFound),
        "no http_call response now"
    );
    vm.call_export(ROOT, "set_act", &[0]).unwrap();
    let mut s = vm.stream(id);
    assert_eq!(s.request_body(b"!", true).unwrap(), Action::Continue);
    assert_eq!(s.upstream_request().body, b">abcdef>!");
    assert!(s.upstream_request().complete);
    // Outside a body callback the body reads empty and cannot be written.
    let vm = s.vm();
    assert_eq!(get(vm, 0, 0, 10), 0);
    assert_eq!(out_bytes(vm), b"");
    assert_eq!(
        call(vm, id, "h_set_buffer_bytes", &[0, 0, 0, d, dn]),
        st(Status::BadArgument)
    );
}

#[test]
fn paused_headers_hold_the_body_until_resumed() {
    let h = build(|b| b);
    let mut vm = h.new_vm().unwrap();
    let id = paused_stream(&mut vm);
    let mut s = vm.stream(id);
    assert_eq!(s.request_body(b"held", true).unwrap(), Action::NotCalled);
    assert!(s.upstream_request().headers.is_none());
    s.vm().call_export(ROOT, "set_act", &[0]).unwrap();
    s.resume_request().unwrap();
    assert_eq!(s.upstream_request().body, b"held");
    assert!(s.upstream_request().complete);
}

#[test]
fn local_response_close_stream_and_properties() {
    let h = build(|b| b.property(&["node", "id"], "n1").plugin_name("p"));
    let mut vm = h.new_vm().unwrap();
    let id = paused_stream(&mut vm);
    let (d, dn) = put(&mut vm, A, b"denied by test");
    let (b, bn) = put(&mut vm, B, b"nope");
    let hdrs = pairs::encode(&[("X-Reason", "test")]);
    let (hp, hn) = put(&mut vm, C, &hdrs);
    assert_eq!(
        call(
            &mut vm,
            id,
            "h_send_local_response",
            &[403, d, dn, b, bn, hp, hn, -1]
        ),
        0
    );
    let r = vm.local_reply_of(id).unwrap().clone();
    assert_eq!((r.status, r.details.as_str()), (403, "denied_by_test"));
    let client = vm.client_response(id).unwrap().clone();
    assert_eq!(client.status(), Some(403));
    assert_eq!(client.header("x-reason"), Some("test"));
    assert_eq!(client.header("content-type"), Some("text/plain"));
    assert_eq!(client.body, b"nope");
    assert!(vm.upstream_request(id).unwrap().headers.is_none());
    // Properties: set in the stream, then read back; host-set ones; NotFound otherwise.
    let (pp, pn) = put(&mut vm, A, b"my\0prop");
    let (v, vn) = put(&mut vm, B, b"val");
    assert_eq!(call(&mut vm, id, "h_set_property", &[pp, pn, v, vn]), 0);
    assert_eq!(
        call(
            &mut vm,
            id,
            "h_get_property",
            &[pp, pn, i64::from(OUT), i64::from(OUT + 4)]
        ),
        0
    );
    assert_eq!(out_bytes(&vm), b"val");
    assert_eq!(
        call(&mut vm, ROOT, "h_set_property", &[pp, pn, v, vn]),
        st(Status::NotFound)
    );
    let (np, nn) = put(&mut vm, A, b"node\0id");
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_get_property",
            &[np, nn, i64::from(OUT), i64::from(OUT + 4)]
        ),
        0
    );
    assert_eq!(out_bytes(&vm), b"n1");
    let (rp, rn) = put(&mut vm, A, b"response\0code");
    assert_eq!(
        call(
            &mut vm,
            id,
            "h_get_property",
            &[rp, rn, i64::from(OUT), i64::from(OUT + 4)]
        ),
        0
    );
    assert_eq!(out_bytes(&vm), 403i64.to_le_bytes());
    let (xp, xn) = put(&mut vm, A, b"no\0such");
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_get_property",
            &[xp, xn, i64::from(OUT), i64::from(OUT + 4)]
        ),
        st(Status::NotFound)
    );
    vm.finish_stream(id).unwrap();
    // close_stream resets.
    let id = paused_stream(&mut vm);
    assert_eq!(call(&mut vm, id, "h_close_stream", &[0]), 0);
    assert_eq!(vm.reset_of(id), Some("wasm_close_stream"));
}

#[test]
fn http_calls_and_grpc() {
    let h = build(|b| {
        b.cluster("svc", |req| {
            let body = String::from_utf8_lossy(&req.body).to_uppercase();
            CallReply::Respond {
                response: HttpCallResponse::new(201, body),
                delay: Duration::from_millis(50),
            }
        })
    });
    let mut vm = h.new_vm().unwrap();
    let (u, un) = put(&mut vm, A, b"svc");
    let hd = pairs::encode(&[(":method", "POST"), (":path", "/x"), (":authority", "svc")]);
    let (hp, hn) = put(&mut vm, B, &hd);
    let (bp, bn) = put(&mut vm, C, b"ping");
    let args = [u, un, hp, hn, bp, bn, 0, 0, 1000, i64::from(OUT)];
    assert_eq!(call(&mut vm, ROOT, "h_http_call", &args), 0);
    let token = u32_at(&vm, OUT);
    assert_eq!(vm.pending_http_calls(), vec![token]);
    vm.advance(Duration::from_millis(49)).unwrap();
    assert_eq!(u32_at(&vm, 104), 0, "not yet due");
    vm.advance(Duration::from_millis(1)).unwrap();
    assert_eq!(u32_at(&vm, 104), token);
    assert_eq!(u32_at(&vm, 108), 1, "one header");
    assert_eq!(u32_at(&vm, 112), 4, "body size");
    assert_eq!(u32_at(&vm, 124), 0, "body readable as buffer type 4");
    let (p, n) = (u32_at(&vm, 116), u32_at(&vm, 120));
    assert_eq!(vm.read_memory(p, n).unwrap(), b"PING");
    let (bad, badn) = put(&mut vm, A, b"nope");
    let mut a2 = args;
    a2[0] = bad;
    a2[1] = badn;
    assert_eq!(
        call(&mut vm, ROOT, "h_http_call", &a2),
        st(Status::BadArgument),
        "unknown cluster"
    );
    let (u, un) = put(&mut vm, A, b"svc");
    let nopath = pairs::encode(&[(":method", "GET"), (":authority", "svc")]);
    let (np, nn) = put(&mut vm, B, &nopath);
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_http_call",
            &[u, un, np, nn, 0, 0, 0, 0, 0, i64::from(OUT)]
        ),
        st(Status::BadArgument)
    );
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_http_call",
            &[u, un, hp, hn, 0, 0, 0, 0, -1, i64::from(OUT)]
        ),
        st(Status::BadArgument),
        "negative timeout"
    );
    assert_eq!(h.shared().calls().len(), 1);
    // gRPC is not implemented: a clear status the test can assert.
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_grpc_call",
            &[u, un, u, un, u, un, 0, 0, 0, 0, 100, i64::from(OUT)]
        ),
        st(Status::Unimplemented)
    );
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_grpc_stream",
            &[u, un, u, un, u, un, 0, 0, i64::from(OUT)]
        ),
        st(Status::Unimplemented)
    );
    assert_eq!(
        call(&mut vm, ROOT, "h_grpc_send", &[1, 0, 0, 0]),
        st(Status::Unimplemented)
    );
    assert_eq!(
        call(&mut vm, ROOT, "h_grpc_cancel", &[1]),
        st(Status::Unimplemented)
    );
    assert_eq!(
        call(&mut vm, ROOT, "h_grpc_close", &[1]),
        st(Status::Unimplemented)
    );
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_get_status",
            &[i64::from(OUT + 8), i64::from(OUT), i64::from(OUT + 4)]
        ),
        0
    );
}

#[test]
fn queues_notify_the_owner_vm() {
    let h = build(|b| b);
    let mut owner = h.new_vm().unwrap();
    let mut other = h.new_vm().unwrap();
    let (q, qn) = put(&mut owner, A, b"jobs");
    assert_eq!(
        call(
            &mut owner,
            ROOT,
            "h_register_shared_queue",
            &[q, qn, i64::from(OUT)]
        ),
        0
    );
    let token = u32_at(&owner, OUT);
    let (q2, qn2) = put(&mut other, A, b"jobs");
    assert_eq!(
        call(
            &mut other,
            ROOT,
            "h_resolve_shared_queue",
            &[0, 0, q2, qn2, i64::from(OUT)]
        ),
        0
    );
    assert_eq!(u32_at(&other, OUT), token);
    let (vm_id, vn) = put(&mut other, B, b"elsewhere");
    assert_eq!(
        call(
            &mut other,
            ROOT,
            "h_resolve_shared_queue",
            &[vm_id, vn, q2, qn2, i64::from(OUT)]
        ),
        st(Status::NotFound)
    );
    let (d, dn) = put(&mut other, C, b"job-1");
    assert_eq!(
        call(
            &mut other,
            ROOT,
            "h_enqueue_shared_queue",
            &[i64::from(token), d, dn]
        ),
        0
    );
    assert_eq!(
        call(&mut other, ROOT, "h_enqueue_shared_queue", &[999, d, dn]),
        st(Status::NotFound)
    );
    assert_eq!(u32_at(&owner, 100), 0, "delivered only when the owner runs");
    owner.poll();
    assert_eq!(u32_at(&owner, 100), token, "on_queue_ready in the owner");
    assert_eq!(
        call(
            &mut owner,
            ROOT,
            "h_dequeue_shared_queue",
            &[i64::from(token), i64::from(OUT), i64::from(OUT + 4)]
        ),
        0
    );
    assert_eq!(out_bytes(&owner), b"job-1");
    assert_eq!(
        call(
            &mut owner,
            ROOT,
            "h_dequeue_shared_queue",
            &[i64::from(token), i64::from(OUT), i64::from(OUT + 4)]
        ),
        st(Status::Empty)
    );
}

#[test]
fn metrics_follow_envoy() {
    let h = build(|b| b);
    let mut vm = h.new_vm().unwrap();
    let (n, nn) = put(&mut vm, A, b"reqs");
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_define_metric",
            &[0, n, nn, i64::from(OUT)]
        ),
        0
    );
    let c = i64::from(u32_at(&vm, OUT));
    let (g, gn) = put(&mut vm, B, b"level");
    call(
        &mut vm,
        ROOT,
        "h_define_metric",
        &[1, g, gn, i64::from(OUT)],
    );
    let gauge = i64::from(u32_at(&vm, OUT));
    let (hh, hn) = put(&mut vm, C, b"lat");
    call(
        &mut vm,
        ROOT,
        "h_define_metric",
        &[2, hh, hn, i64::from(OUT)],
    );
    let hist = i64::from(u32_at(&vm, OUT));
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_define_metric",
            &[3, n, nn, i64::from(OUT)]
        ),
        st(Status::BadArgument)
    );
    assert_eq!(call(&mut vm, ROOT, "h_increment_metric", &[c, 5]), 0);
    assert_eq!(
        call(&mut vm, ROOT, "h_increment_metric", &[c, -1]),
        st(Status::BadArgument)
    );
    assert_eq!(call(&mut vm, ROOT, "h_record_metric", &[gauge, 10]), 0);
    assert_eq!(call(&mut vm, ROOT, "h_increment_metric", &[gauge, -4]), 0);
    assert_eq!(call(&mut vm, ROOT, "h_record_metric", &[hist, 42]), 0);
    assert_eq!(
        call(&mut vm, ROOT, "h_get_metric", &[hist, i64::from(OUT)]),
        st(Status::BadArgument)
    );
    assert_eq!(call(&mut vm, ROOT, "h_get_metric", &[c, i64::from(OUT)]), 0);
    assert_eq!(u32_at(&vm, OUT), 5);
    assert_eq!(
        call(&mut vm, ROOT, "h_get_metric", &[1000, i64::from(OUT)]),
        st(Status::NotFound)
    );
    assert_eq!(h.metric("level"), Some(6));
    assert_eq!(h.shared().metrics.metric("lat").unwrap().samples, vec![42]);
}

#[test]
fn foreign_functions_contexts_and_done() {
    let h =
        build(|b| b.foreign_function("reverse", |args| Ok(args.iter().rev().copied().collect())));
    let mut vm = h.new_vm().unwrap();
    let (n, nn) = put(&mut vm, A, b"reverse");
    let (a, an) = put(&mut vm, B, b"abc");
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_call_foreign_function",
            &[n, nn, a, an, i64::from(OUT), i64::from(OUT + 4)]
        ),
        0
    );
    assert_eq!(out_bytes(&vm), b"cba");
    let (x, xn) = put(&mut vm, A, b"missing");
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_call_foreign_function",
            &[x, xn, a, an, i64::from(OUT), i64::from(OUT + 4)]
        ),
        st(Status::NotFound)
    );
    assert_eq!(
        call(&mut vm, ROOT, "h_set_effective_context", &[77]),
        st(Status::BadArgument)
    );
    let id = paused_stream(&mut vm);
    // From the root context, act on the stream after switching to it.
    let (k, kn) = put(&mut vm, A, b":path");
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_get_header_map_value",
            &[0, k, kn, i64::from(OUT), i64::from(OUT + 4)]
        ),
        st(Status::BadArgument)
    );
    assert_eq!(
        call(&mut vm, ROOT, "h_set_effective_context", &[i64::from(id)]),
        0
    );
    assert_eq!(
        call(&mut vm, ROOT, "h_done", &[]),
        st(Status::NotFound),
        "nothing pending"
    );
    // on_done returns true: the root context is deleted at once.
    assert!(vm.shutdown().unwrap());
}

#[test]
fn wasi_calls() {
    let h = build(|b| b.env("MODE", "test").seed(7));
    let mut vm = h.new_vm().unwrap();
    // fd_write to stdout: one iovec pointing at "out\n"; the newline is dropped.
    let (s, sn) = put(&mut vm, A, b"out\n");
    let mut iov = Vec::new();
    iov.extend_from_slice(&(s as u32).to_le_bytes());
    iov.extend_from_slice(&(sn as u32).to_le_bytes());
    let (io, _) = put(&mut vm, B, &iov);
    assert_eq!(
        call(&mut vm, ROOT, "h_fd_write", &[1, io, 1, i64::from(OUT)]),
        0
    );
    assert_eq!(u32_at(&vm, OUT), 4);
    assert_eq!(
        call(&mut vm, ROOT, "h_fd_write", &[5, io, 1, i64::from(OUT)]),
        8,
        "EBADF"
    );
    assert_eq!(h.logs().last().unwrap().message, "out");
    assert_eq!(call(&mut vm, ROOT, "h_random_get", &[i64::from(C), 16]), 0);
    let r1 = vm.read_memory(C, 16).unwrap();
    assert_ne!(r1, vec![0; 16]);
    assert_eq!(
        call(&mut vm, ROOT, "h_random_get", &[i64::from(C), 1 << 20]),
        28,
        "EINVAL"
    );
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_environ_sizes_get",
            &[i64::from(OUT), i64::from(OUT + 4)]
        ),
        0
    );
    assert_eq!((u32_at(&vm, OUT), u32_at(&vm, OUT + 4)), (1, 10));
    assert_eq!(
        call(
            &mut vm,
            ROOT,
            "h_environ_get",
            &[i64::from(OUT), i64::from(A)]
        ),
        0
    );
    assert_eq!(vm.read_memory(A, 10).unwrap(), b"MODE=test\0");
    let e = vm
        .call_export(ROOT, "h_fd_write", &[1, 0xFFFF_FFF0, 1, i64::from(OUT)])
        .unwrap();
    assert_eq!(e[0], 21, "EFAULT");
    let err = vm.call_export(ROOT, "h_proc_exit", &[3]).unwrap_err();
    assert_eq!(err.trap().unwrap().kind, TrapKind::Exit(3));
}

#[test]
fn traps_fail_closed_with_a_backtrace() {
    let h = build(|b| b);
    let mut vm = h.new_vm().unwrap();
    let id = paused_stream(&mut vm);
    let err = vm.call_export(id, "do_unreachable", &[]).unwrap_err();
    let t = err.trap().unwrap().clone();
    assert_eq!(t.kind, TrapKind::Unreachable);
    assert_eq!(t.backtrace[0].func_name.as_deref(), Some("do_unreachable"));
    assert_eq!(t.callback, "do_unreachable");
    assert!(t.to_string().contains("do_unreachable"), "{t}");
    assert!(vm.failure().is_some());
    // Fail closed: every stream now gets 503 wasm_fail_stream without calling the filter.
    let ex = vm
        .exchange(&Request::get("/"), &mut |_| Some(Response::ok("up")), false)
        .unwrap();
    assert_eq!(ex.status(), Some(503));
    assert_eq!(ex.local_reply.unwrap().details, "wasm_fail_stream");
    assert_eq!(ex.actions[0].1, Action::NotCalled);
    assert!(matches!(
        vm.call_export(ROOT, "ticks", &[]),
        Err(Error::VmFailed(_))
    ));
}

#[test]
fn traps_fail_open_skip_the_filter() {
    let h = build(|b| b.failure_policy(FailurePolicy::FailOpen));
    let mut vm = h.new_vm().unwrap();
    let err = vm.call_export(ROOT, "do_oob", &[]).unwrap_err();
    assert_eq!(err.trap().unwrap().kind, TrapKind::OutOfBounds);
    let ex = vm
        .exchange(
            &Request::get("/x"),
            &mut |_| Some(Response::ok("up")),
            false,
        )
        .unwrap();
    assert_eq!(ex.status(), Some(200));
    assert_eq!(ex.text(), "up");
}

#[test]
fn fuel_timeouts_and_memory_limits_stop_runaway_guests() {
    let h = build(|b| b.fuel(100_000));
    let mut vm = h.new_vm().unwrap();
    let before = vm.fuel_consumed();
    vm.exchange(&Request::get("/"), &mut |_| Some(Response::ok("")), false)
        .unwrap();
    assert!(vm.fuel_consumed() > before, "guest work is measured");
    let e = vm.call_export(ROOT, "do_loop", &[]).unwrap_err();
    assert_eq!(e.trap().unwrap().kind, TrapKind::FuelExhausted);
    let h = build(|b| b.call_timeout(Duration::from_millis(200)));
    let mut vm = h.new_vm().unwrap();
    let t = std::time::Instant::now();
    let e = vm.call_export(ROOT, "do_loop", &[]).unwrap_err();
    assert_eq!(e.trap().unwrap().kind, TrapKind::Timeout);
    assert!(t.elapsed() < Duration::from_secs(5));
    let h = build(|b| b.memory_limit(4 * 65536));
    let mut vm = h.new_vm().unwrap();
    assert_eq!(call(&mut vm, ROOT, "grow", &[2]), 2, "2 -> 4 pages fits");
    assert_eq!(
        call(&mut vm, ROOT, "grow", &[1]),
        -1,
        "over the limit: memory.grow fails"
    );
    let h = build(|b| b.memory_limit(65536));
    assert!(
        matches!(h.new_vm(), Err(Error::Instantiate(_))),
        "initial memory over the limit"
    );
}

#[test]
fn bad_modules_give_clear_errors() {
    let e = Harness::from_bytes(b"\0asm garbage".to_vec())
        .build()
        .err()
        .unwrap();
    assert!(matches!(e, Error::Compile(_)), "{e}");
    let e = Harness::from_file("/nonexistent.wasm")
        .build()
        .err()
        .unwrap();
    assert!(matches!(e, Error::Read { .. }), "{e}");
    let no_abi = wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap();
    let e = Harness::from_bytes(no_abi).build().err().unwrap();
    assert!(matches!(e, Error::UnknownAbi), "{e}");
    let no_mem = wat::parse_str(r#"(module (func (export "proxy_abi_version_0_2_1")))"#).unwrap();
    let e = Harness::from_bytes(no_mem)
        .build()
        .unwrap()
        .new_vm()
        .err()
        .unwrap();
    assert!(matches!(e, Error::MissingExport("memory")), "{e}");
    let no_alloc = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1")))"#,
    )
    .unwrap();
    let e = Harness::from_bytes(no_alloc)
        .build()
        .unwrap()
        .new_vm()
        .err()
        .unwrap();
    assert!(matches!(e, Error::MissingExport(_)), "{e}");
    let unknown = wat::parse_str(
        r#"(module (import "env" "proxy_teleport" (func)) (memory (export "memory") 1)
           (func (export "malloc") (param i32) (result i32) i32.const 0)
           (func (export "proxy_abi_version_0_2_1")))"#,
    )
    .unwrap();
    let e = Harness::from_bytes(unknown)
        .build()
        .unwrap()
        .new_vm()
        .err()
        .unwrap();
    assert!(matches!(e, Error::Instantiate(_)), "{e}");
    assert!(e.to_string().contains("proxy_teleport"), "{e}");
    // A 0.2.1 call in a 0.1.0 module does not link, as in Envoy.
    let old = wat::parse_str(
        r#"(module (import "env" "proxy_get_log_level" (func (param i32) (result i32)))
           (memory (export "memory") 1)
           (func (export "malloc") (param i32) (result i32) i32.const 0)
           (func (export "proxy_abi_version_0_1_0")))"#,
    )
    .unwrap();
    assert!(Harness::from_bytes(old).build().unwrap().new_vm().is_err());
    let bad_sig = wat::parse_str(
        r#"(module (memory (export "memory") 1)
           (func (export "malloc") (param i32) (result i32) i32.const 0)
           (func (export "proxy_on_vm_start"))
           (func (export "proxy_abi_version_0_2_1")))"#,
    )
    .unwrap();
    let e = Harness::from_bytes(bad_sig)
        .build()
        .unwrap()
        .new_vm()
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            Error::BadExport {
                name: "proxy_on_vm_start",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn abi_0_1_0_modules_run() {
    let h = Harness::from_bytes(module("0_1_0")).build().unwrap();
    assert_eq!(h.abi_version().as_str(), "0.1.0");
    let mut vm = h.new_vm().unwrap();
    call(&mut vm, ROOT, "set_act", &[1]);
    let id = vm.open_stream().unwrap();
    vm.stream(id)
        .request_headers(headers(&[(":path", "/")]), true)
        .unwrap();
    assert!(vm.is_paused(id));
    assert_eq!(call(&mut vm, id, "h_continue_request", &[]), 0);
    assert!(vm.upstream_request(id).unwrap().complete);
    let h = Harness::from_bytes(module("0_2_0")).build().unwrap();
    assert_eq!(h.abi_version().as_str(), "0.2.0");
}

#[test]
fn parallel_harnesses_share_nothing() {
    let threads: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let h = build(|b| b);
                let mut vm = h.new_vm().unwrap();
                let (k, kn) = put(&mut vm, A, b"k");
                let (n, nn) = put(&mut vm, B, b"count");
                call(
                    &mut vm,
                    ROOT,
                    "h_define_metric",
                    &[0, n, nn, i64::from(OUT)],
                );
                let c = i64::from(u32_at(&vm, OUT));
                for _ in 0..=i {
                    call(&mut vm, ROOT, "h_increment_metric", &[c, 1]);
                }
                let v = format!("v{i}");
                let (vp, vn) = put(&mut vm, C, v.as_bytes());
                call(&mut vm, ROOT, "h_set_shared_data", &[k, kn, vp, vn, 0]);
                std::thread::sleep(Duration::from_millis(20));
                assert_eq!(h.metric("count"), Some(i as u64 + 1));
                assert_eq!(h.shared_data("k").unwrap().0, v.as_bytes());
                // Each harness's CAS counter is its own.
                assert_eq!(h.shared_data("k").unwrap().1, 1);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
