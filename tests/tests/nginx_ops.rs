//! nginx-only end-to-end tests of the module in the stock Debian nginx, with the shipped
//! `nginx/conf/nginx.conf`: a trapping filter under both failure policies (the worker
//! survives, nothing leaks, each VM made again is counted), reloads under load with a
//! changed filter configuration and a changed .wasm (no failed request), 4 workers
//! sharing one cache, and a key whose host is the forwarded Host.
//! A missing module fails with how to build it; `EDGE_FILTER_SKIP_NGINX=1` skips.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use edge_filter_e2e::envoy::wasm_path;
use edge_filter_e2e::http::{self, KeepAliveClient};
use edge_filter_e2e::nginx;
use edge_filter_e2e::scenarios::{hit_ttl, shipped_plugin_config};
use edge_filter_e2e::{CacheStatus, Nginx, NginxConf, Reply, ScratchDir, Upstream};

/// The header that makes the test filter trap in `proxy_on_request_headers`.
const TRAP_HEADER: &str = "x-trap";

/// A Proxy-Wasm filter that traps (`unreachable`) when the request has an `x-trap`
/// header, or in the response phase when the response has one, and otherwise passes
/// everything, adding `x-filter: trap-filter` to responses so a test sees that it ran.
const TRAP_FILTER_WAT: &str = r#"
(module
  (import "env" "proxy_get_header_map_value"
    (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 16) "x-trap")
  (data (i32.const 32) "x-filter")
  (data (i32.const 48) "trap-filter")
  ;; A bump allocator for values the host returns, reset at each request.
  (global $heap (mut i32) (i32.const 65536))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (global.set $heap (i32.const 65536))
    ;; map 0 = request headers; result 0 = Ok, the header is there.
    (if (i32.eqz (call $get_header (i32.const 0) (i32.const 16) (i32.const 6)
                                   (i32.const 8) (i32.const 12)))
      (then unreachable))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    ;; map 2 = response headers.
    (if (i32.eqz (call $get_header (i32.const 2) (i32.const 16) (i32.const 6)
                                   (i32.const 8) (i32.const 12)))
      (then unreachable))
    (drop (call $add_header (i32.const 2) (i32.const 32) (i32.const 8)
                            (i32.const 48) (i32.const 11)))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_abi_version_0_2_1")))
"#;

fn trap_filter_bytes() -> Vec<u8> {
    wat::parse_str(TRAP_FILTER_WAT).expect("the test filter's WAT")
}

/// Writes `bytes` to `path` atomically (a reload must never read half a file).
fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

/// An origin answering `origin <path>` to everything; `/cached` may be stored;
/// `/trap-response` carries the header that makes the test filter trap on the response.
fn origin() -> Upstream {
    Upstream::origin(|req| {
        let r = Reply::text(format!("origin {}", req.path));
        if req.path == "/trap-response" {
            return r
                .header(TRAP_HEADER, "1")
                .header("Cache-Control", "no-store");
        }
        if req.path.starts_with("/cached") {
            r.header("Cache-Control", "max-age=60")
        } else {
            r.header("Cache-Control", "no-store")
        }
    })
}

/// An origin that answers `path` with `slow`, cacheable, after `delay` (so that requests
/// for it overlap); 404 elsewhere.
fn slow_origin(path: &'static str, delay: Duration) -> Upstream {
    Upstream::origin(move |req| {
        if req.path != path {
            return Reply::new(404);
        }
        thread::sleep(delay);
        Reply::text("slow").header("Cache-Control", "max-age=60")
    })
}

/// Starts nginx with `conf`, or says why the nginx tests cannot run.
fn start(up: &Upstream, conf: &NginxConf) -> Nginx {
    nginx::module_path().unwrap_or_else(|e| panic!("{e}"));
    Nginx::try_start(up.port(), conf).unwrap_or_else(|e| panic!("{e}"))
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// One worker, the trap filter, `policy`: a trapping request gets `trapped`'s answer,
/// the worker survives, the next request runs the filter again, and hundreds of traps
/// leak nothing.
fn trap_case(policy: &str, trapped: impl Fn(&http::Response, &Upstream)) {
    let up = origin();
    let dir = ScratchDir::new().expect("scratch dir");
    let wasm = dir.0.join("trap-filter.wasm");
    write_atomically(&wasm, &trap_filter_bytes());
    let nginx = start(
        &up,
        &NginxConf::new(1, "{}").wasm(&wasm).failure_policy(policy),
    );
    let workers = nginx.worker_pids().to_vec();

    let ok = nginx.get("/before");
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.header("x-filter"),
        Some("trap-filter"),
        "the filter runs"
    );

    // The module's reload counters, under Envoy's names (monitoring/ alerts on them): at 0
    // from the start.
    assert_eq!(reloads(&nginx), (0.0, 0.0), "before any trap");

    let r = nginx.request("GET", "/trap", &[(TRAP_HEADER, "1")], b"");
    trapped(&r, &up);

    // The worker survived (a crash makes the master start a new one) and the filter
    // runs again on the next request, with a fresh VM: one reload, counted.
    let next = nginx.get("/after");
    assert_eq!(next.status, 200);
    assert_eq!(next.text(), "origin /after");
    assert_eq!(next.header("x-filter"), Some("trap-filter"));
    assert_eq!(reloads(&nginx), (1.0, 0.0), "after one trap");
    assert_eq!(nginx.running_workers(), workers, "the worker was replaced");
    assert!(
        nginx.error_log().contains("trapped"),
        "the trap is not in the error log"
    );

    // A trap drops the VM; hundreds of them must not grow the worker.
    let worker = workers[0];
    for _ in 0..30 {
        nginx.request("GET", "/trap", &[(TRAP_HEADER, "1")], b"");
    }
    let rss_before = rss_kib(worker);
    for _ in 0..300 {
        nginx.request("GET", "/trap", &[(TRAP_HEADER, "1")], b"");
    }
    let rss_after = rss_kib(worker);
    assert!(
        rss_after < rss_before + 16 * 1024,
        "worker RSS grew from {rss_before} to {rss_after} KiB over 300 traps"
    );
    assert_eq!(nginx.running_workers(), workers, "the worker was replaced");
    // Each trap but the first dropped a VM made again for that very request.
    let last = nginx.get("/last");
    assert_eq!(last.header("x-filter"), Some("trap-filter"));
    assert_eq!(reloads(&nginx), (331.0, 0.0), "after 331 traps");
    nginx
        .check_logs(&["trapped"])
        .unwrap_or_else(|e| panic!("{e}"));
}

/// `(envoy_wasm_edge_filter_vm_reload_success, .._failure)` on the metrics page (the
/// shipped configuration names the module `edge_filter`).
fn reloads(nginx: &Nginx) -> (f64, f64) {
    let m = nginx.metrics();
    let value = |name: &str| {
        assert_eq!(m.type_of(name), Some("counter"), "{name}");
        m.value(name, &[])
            .unwrap_or_else(|| panic!("no {name} on the metrics page"))
    };
    (
        value("envoy_wasm_edge_filter_vm_reload_success"),
        value("envoy_wasm_edge_filter_vm_reload_failure"),
    )
}

#[test]
fn trap_fails_open_the_request_reaches_the_upstream_unfiltered() {
    if nginx::skipped() {
        return;
    }
    trap_case("open", |r, up| {
        assert_eq!(r.status, 200, "fail-open: {}", r.text());
        assert_eq!(r.text(), "origin /trap");
        assert_eq!(up.count("/trap"), 1, "the request reached the upstream");
        let seen = up
            .requests()
            .into_iter()
            .find(|q| q.path == "/trap")
            .unwrap();
        assert_eq!(seen.headers.get(TRAP_HEADER), Some("1"));
        // As if there were no filter: the trapped filter does not see the response.
        assert_eq!(r.header("x-filter"), None);
    });
}

#[test]
fn trap_fails_closed_with_500() {
    if nginx::skipped() {
        return;
    }
    trap_case("closed", |r, up| {
        assert_eq!(r.status, 500, "fail-closed: {}", r.text());
        assert_eq!(
            up.count("/trap"),
            0,
            "a failed-closed request went upstream"
        );
    });
}

/// A trap while the response headers are filtered: fail-closed replaces the response
/// with a 500 (nothing was sent yet); fail-open sends the upstream's response as it is,
/// without the trapped filter. Either way the worker survives.
#[test]
fn a_trap_in_the_response_phase_follows_the_policy() {
    if nginx::skipped() {
        return;
    }
    let up = origin();
    let dir = ScratchDir::new().expect("scratch dir");
    let wasm = dir.0.join("trap-filter.wasm");
    write_atomically(&wasm, &trap_filter_bytes());
    for (policy, want) in [("closed", 500), ("open", 200)] {
        let nginx = start(
            &up,
            &NginxConf::new(1, "{}").wasm(&wasm).failure_policy(policy),
        );
        let workers = nginx.worker_pids().to_vec();
        let r = nginx.get("/trap-response");
        assert_eq!(r.status, want, "{policy}: {}", r.text());
        if policy == "open" {
            assert_eq!(r.text(), "origin /trap-response", "{policy}");
            assert_eq!(r.header(TRAP_HEADER), Some("1"), "{policy}");
            assert_eq!(
                r.header("x-filter"),
                None,
                "{policy}: the filter was skipped"
            );
        }
        let next = nginx.get("/after");
        assert_eq!(next.status, 200, "{policy}");
        assert_eq!(next.header("x-filter"), Some("trap-filter"), "{policy}");
        assert_eq!(
            nginx.running_workers(),
            workers,
            "{policy}: the worker was replaced"
        );
        nginx
            .check_logs(&["trapped"])
            .unwrap_or_else(|e| panic!("{policy}: {e}"));
    }
    assert_eq!(up.count("/trap-response"), 2, "both went upstream");
}

/// A request the filter holds (a coalesced waiter) whose client goes away: nginx ends the
/// request and its stream, the leader's response still lands, and the other waiters are
/// answered from it.
#[test]
fn a_waiter_whose_client_leaves_ends_cleanly() {
    if nginx::skipped() {
        return;
    }
    let up = slow_origin("/slow-shared", Duration::from_millis(1200));
    let nginx = start(&up, &NginxConf::new(1, &shipped_plugin_config()));
    let addr = nginx.listener_addr();
    let leader = thread::spawn(move || http::send(addr, "GET", "/slow-shared", &[], b""));
    thread::sleep(Duration::from_millis(200));
    // A waiter that leaves: it sends its request and closes the connection.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET /slow-shared HTTP/1.1\r\nHost: edge.test\r\n\r\n")
            .unwrap();
        thread::sleep(Duration::from_millis(200));
    }
    let waiter = thread::spawn(move || http::send(addr, "GET", "/slow-shared", &[], b""));
    let leader = leader.join().unwrap().expect("the leader's response");
    let waiter = waiter.join().unwrap().expect("the waiter's response");
    assert_eq!(leader.text(), "slow");
    assert_eq!(waiter.text(), "slow");
    assert!(
        CacheStatus::of(&waiter).has("collapsed"),
        "{:?}",
        waiter.header("cache-status")
    );
    assert_eq!(up.count("/slow-shared"), 1, "one request upstream");
    // The next request is a plain hit, and the worker never crashed.
    let hit = nginx.get("/slow-shared");
    assert!(CacheStatus::of(&hit).has("hit"));
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}

/// A request the filter holds keeps its worker alive through a graceful reload: a
/// coalesced waiter on one worker, waiting for a fetch another worker makes, is still
/// answered after `nginx -s reload` told its worker to go. (The waiter has no timer of
/// nginx's own; nginx exits a shutting-down worker once no non-cancelable timer is left,
/// which once cut such requests off: "open socket left in connection".)
#[test]
fn a_held_request_survives_a_reload_of_its_worker() {
    if nginx::skipped() {
        return;
    }
    // Longer than a reload takes to reach the old workers (the master compiles the .wasm
    // again first), so the waiter is still held when its worker is told to go.
    let up = slow_origin("/slow-reload", Duration::from_millis(4000));
    let conf = NginxConf::new(2, &shipped_plugin_config())
        .listener_line("add_header X-Worker $pid always;");
    let mut nginx = start(&up, &conf);
    let addr = nginx.listener_addr();
    // Two keep-alive connections served by different workers.
    let worker_of = |c: &mut KeepAliveClient| -> String {
        let r = c.get("/healthz").expect("GET /healthz");
        r.header("x-worker").expect("X-Worker").to_string()
    };
    let mut leader = KeepAliveClient::new(addr);
    let leader_worker = worker_of(&mut leader);
    let mut waiter = None;
    for _ in 0..200 {
        let mut c = KeepAliveClient::new(addr);
        if worker_of(&mut c) != leader_worker {
            waiter = Some(c);
            break;
        }
    }
    let mut waiter = waiter.expect("200 connections, all on one worker");

    let leader = thread::spawn(move || leader.get("/slow-reload"));
    thread::sleep(Duration::from_millis(300));
    let waiter = thread::spawn(move || waiter.get("/slow-reload"));
    thread::sleep(Duration::from_millis(300));
    nginx.reload().unwrap_or_else(|e| panic!("{e}"));

    let leader = leader.join().unwrap().expect("the leader's response");
    let waiter = waiter.join().unwrap().expect("the held request's response");
    assert_eq!(leader.text(), "slow");
    assert_eq!(waiter.status, 200);
    assert_eq!(waiter.text(), "slow");
    assert!(
        CacheStatus::of(&waiter).has("collapsed"),
        "the waiter was held and answered from the stored response: {:?}",
        waiter.header("cache-status")
    );
    assert_eq!(up.count("/slow-reload"), 1, "one request upstream");
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}

/// A filter that rewrites the response: `:status` becomes 203, `content-length` goes
/// (the body changes length), `x-rewritten: yes` is added, and the body is held back with
/// `StopIterationAndBuffer` until its end, where the filter sees all of it at once and
/// replaces it: `ALL 20000 BYTES` when the buffered body was whole, else `PARTIAL`.
const REWRITE_FILTER_WAT: &str = r#"
(module
  (import "env" "proxy_replace_header_map_value"
    (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value"
    (func $remove (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes"
    (func $set_body (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 16) ":status")
  (data (i32.const 32) "203")
  (data (i32.const 48) "content-length")
  (data (i32.const 64) "x-rewritten")
  (data (i32.const 80) "yes")
  (data (i32.const 96) "ALL 20000 BYTES")
  (data (i32.const 128) "PARTIAL")
  (global $heap (mut i32) (i32.const 65536))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $replace (i32.const 2) (i32.const 16) (i32.const 7) (i32.const 32) (i32.const 3)))
    (drop (call $remove (i32.const 2) (i32.const 48) (i32.const 14)))
    (drop (call $add (i32.const 2) (i32.const 64) (i32.const 11) (i32.const 80) (i32.const 3)))
    (i32.const 0))
  ;; Buffer type 1 = the response body; action 1 = StopIterationAndBuffer.
  (func (export "proxy_on_response_body") (param $ctx i32) (param $size i32) (param $eos i32)
    (result i32)
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
    (if (i32.eq (local.get $size) (i32.const 20000))
      (then (drop (call $set_body (i32.const 1) (i32.const 0) (local.get $size)
                                  (i32.const 96) (i32.const 15))))
      (else (drop (call $set_body (i32.const 1) (i32.const 0) (local.get $size)
                                  (i32.const 128) (i32.const 7)))))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_abi_version_0_2_1")))
"#;

/// Response rewriting in nginx: `:status` and header changes are applied, a body held
/// back with `StopIterationAndBuffer` over several upstream chunks reaches the filter
/// whole at its end, and the filter's replacement is what the client gets.
#[test]
fn a_filter_rewrites_status_headers_and_a_buffered_body() {
    if nginx::skipped() {
        return;
    }
    let up = Upstream::origin(|req| {
        if req.path != "/rewrite" {
            return Reply::new(404);
        }
        Reply::new(200).body(vec![b'o'; 20_000]).mode(
            edge_filter_e2e::upstream::BodyMode::Chunked {
                sizes: vec![4000, 4000, 4000, 4000],
                pause: Duration::from_millis(20),
            },
        )
    });
    let dir = ScratchDir::new().expect("scratch dir");
    let wasm = dir.0.join("rewrite-filter.wasm");
    write_atomically(
        &wasm,
        &wat::parse_str(REWRITE_FILTER_WAT).expect("the test filter's WAT"),
    );
    let nginx = start(&up, &NginxConf::new(1, "{}").wasm(&wasm));
    let r = nginx.get("/rewrite");
    assert_eq!(r.status, 203, "{:?}", r.headers);
    assert_eq!(r.header("x-rewritten"), Some("yes"));
    assert_eq!(
        r.text(),
        "ALL 20000 BYTES",
        "the filter saw the whole body at its end and replaced it"
    );
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}

/// A filter that logs, at info level, how each response body ends for it: `body end with
/// data` when `end_of_stream` comes with bytes, `body end empty` when it comes alone.
const BODY_END_FILTER_WAT: &str = r#"
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "body end with data")
  (data (i32.const 48) "body end empty")
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_response_body") (param $ctx i32) (param $size i32) (param $eos i32)
    (result i32)
    (if (local.get $eos)
      (then (if (local.get $size)
        (then (drop (call $log (i32.const 2) (i32.const 16) (i32.const 18))))
        (else (drop (call $log (i32.const 2) (i32.const 48) (i32.const 14)))))))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_abi_version_0_2_1")))
"#;

/// A body with a Content-Length ends, for the filter, with its last bytes: nginx sends
/// the end as an empty buffer afterwards, when the client may already have read the whole
/// response, and a cache that stored only then would miss the client's next request. A
/// chunked body still ends exactly once.
#[test]
fn a_content_length_body_ends_with_its_last_bytes() {
    if nginx::skipped() {
        return;
    }
    let up = Upstream::origin(|req| {
        let body = vec![b'b'; 5000];
        match req.path.as_str() {
            "/length" => Reply::new(200).body(body),
            "/chunked" => {
                Reply::new(200)
                    .body(body)
                    .mode(edge_filter_e2e::upstream::BodyMode::Chunked {
                        sizes: vec![2000, 2000],
                        pause: Duration::from_millis(10),
                    })
            }
            _ => Reply::new(404),
        }
    });
    let dir = ScratchDir::new().expect("scratch dir");
    let wasm = dir.0.join("body-end-filter.wasm");
    write_atomically(
        &wasm,
        &wat::parse_str(BODY_END_FILTER_WAT).expect("the test filter's WAT"),
    );
    let nginx = start(&up, &NginxConf::new(1, "{}").wasm(&wasm));
    let ends = |log: &str| {
        (
            log.matches("body end with data").count(),
            log.matches("body end empty").count(),
        )
    };
    let r = nginx.get("/length");
    assert_eq!(r.body.len(), 5000);
    assert_eq!(
        ends(&nginx.error_log()),
        (1, 0),
        "one end, with the last bytes"
    );
    let r = nginx.get("/chunked");
    assert_eq!(r.body.len(), 5000);
    let (with_data, empty) = ends(&nginx.error_log());
    assert_eq!(with_data + empty, 2, "the chunked body ended once");
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}

/// What the load clients saw.
#[derive(Default, Debug)]
struct LoadStats {
    ok: usize,
    failures: Vec<String>,
    stale_retries: usize,
    keepalive_connections: usize,
}

/// Clients requesting in a loop until stopped: one on keep-alive connections, one on a
/// new connection per request. Every response must be 2xx.
struct Load {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<LoadStats>>,
    threads: Vec<JoinHandle<()>>,
}

/// The paths the load requests: hits, forwarded requests and the filter's own answer.
const LOAD_PATHS: [&str; 3] = ["/cached/a", "/pass/b", "/healthz"];

/// Upper bound for a load run, whatever happens to the test.
const LOAD_MAX: Duration = Duration::from_secs(120);

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let record = |stats: &Mutex<LoadStats>, path: &str, r: std::io::Result<http::Response>| {
            let mut s = stats.lock().unwrap();
            match r {
                Ok(r) if (200..300).contains(&r.status) => s.ok += 1,
                Ok(r) => s
                    .failures
                    .push(format!("GET {path}: {} {}", r.status, r.text())),
                Err(e) => s.failures.push(format!("GET {path}: {e}")),
            }
        };
        let mut threads = Vec::new();
        {
            let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
            threads.push(thread::spawn(move || {
                let mut client = KeepAliveClient::new(addr);
                let t0 = Instant::now();
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) || t0.elapsed() > LOAD_MAX {
                        break;
                    }
                    let path = LOAD_PATHS[i % LOAD_PATHS.len()];
                    record(&stats, path, client.get(path));
                    thread::sleep(Duration::from_millis(1));
                }
                let mut s = stats.lock().unwrap();
                s.stale_retries = client.stale_retries;
                s.keepalive_connections = client.connections;
            }));
        }
        {
            let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
            threads.push(thread::spawn(move || {
                let t0 = Instant::now();
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) || t0.elapsed() > LOAD_MAX {
                        break;
                    }
                    let path = LOAD_PATHS[i % LOAD_PATHS.len()];
                    record(&stats, path, http::send(addr, "GET", path, &[], b""));
                    thread::sleep(Duration::from_millis(1));
                }
            }));
        }
        Load {
            stop,
            stats,
            threads,
        }
    }

    fn ok(&self) -> usize {
        self.stats.lock().unwrap().ok
    }

    /// Waits (bounded) until `n` more requests succeeded.
    fn wait_for(&self, n: usize) {
        let target = self.ok() + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ok() < target {
            assert!(
                Instant::now() < deadline,
                "the load stalled at {}",
                self.ok()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(self) -> LoadStats {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("load thread panicked");
        }
        Arc::try_unwrap(self.stats)
            .expect("load threads joined")
            .into_inner()
            .unwrap()
    }
}

#[test]
fn reload_under_load_fails_no_request() {
    if nginx::skipped() {
        return;
    }
    let up = origin();
    let dir = ScratchDir::new().expect("scratch dir");
    // The .wasm nginx loads; the test replaces its contents between reloads.
    let wasm = dir.0.join("filter.wasm");
    let edge_filter = fs::read(wasm_path().unwrap_or_else(|e| panic!("{e}"))).unwrap();
    write_atomically(&wasm, &edge_filter);
    let shipped = NginxConf::new(2, &shipped_plugin_config()).wasm(&wasm);
    let mut nginx = start(&up, &shipped);
    let probe = |nginx: &Nginx| nginx.get("/pass/probe");
    assert!(probe(&nginx).header("cache-status").is_some());

    let load = Load::start(nginx.listener_addr());
    load.wait_for(50);

    // 1. A changed filter configuration: Cache-Status turned off.
    let quiet = NginxConf::new(2, r#"{"cache": {"cache_status": false}}"#).wasm(&wasm);
    nginx.reconfigure(&quiet).unwrap_or_else(|e| panic!("{e}"));
    let r = probe(&nginx);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("cache-status"),
        None,
        "the new config is not in effect"
    );
    load.wait_for(50);

    // 2. A changed .wasm at the same path: the trap filter (which passes everything).
    write_atomically(&wasm, &trap_filter_bytes());
    nginx.reload().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(probe(&nginx).header("x-filter"), Some("trap-filter"));
    load.wait_for(50);

    // 3. Back to edge-filter with the shipped configuration.
    write_atomically(&wasm, &edge_filter);
    nginx
        .reconfigure(&shipped)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(probe(&nginx).header("cache-status").is_some());
    load.wait_for(50);

    let stats = load.finish();
    eprintln!("reload under load: {stats:?}");
    assert!(
        stats.failures.is_empty(),
        "{} of {} requests failed across 3 reloads:\n{}",
        stats.failures.len(),
        stats.ok + stats.failures.len(),
        stats.failures[..stats.failures.len().min(10)].join("\n")
    );
    assert!(stats.ok >= 200, "only {} requests", stats.ok);
    // Each reload moved the keep-alive client off its old worker onto a new connection.
    assert!(
        stats.keepalive_connections >= 4,
        "the keep-alive client used {} connection(s) across 3 reloads",
        stats.keepalive_connections
    );
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}

/// An origin whose cacheable answer names the Host it received.
fn host_echo_origin() -> Upstream {
    Upstream::origin(|req| {
        let host = String::from_utf8_lossy(req.headers.get_bytes("host").unwrap_or(b"-"));
        Reply::text(format!("host {host}")).header("Cache-Control", "max-age=60")
    })
}

/// The cache key's host is the Host the upstream receives (the shipped configuration
/// forwards `$http_host`), not nginx's host from an absolute-form target: no request
/// gets an answer stored for another Host, in either direction.
#[test]
fn the_keyed_host_is_the_forwarded_host() {
    if nginx::skipped() {
        return;
    }
    let up = host_echo_origin();
    let nginx = start(&up, &NginxConf::new(1, &shipped_plugin_config()));
    let get = |target: &str, host: &str| {
        let r = http::RawRequest::new("GET", target)
            .header("Host", host)
            .send(nginx.listener_addr())
            .unwrap_or_else(|e| panic!("GET {target} Host: {host}: {e}"));
        assert_eq!(r.status, 200, "GET {target} Host: {host}: {}", r.text());
        r
    };

    // Stored for a.test, and a hit for it.
    assert_eq!(get("/k", "a.test").text(), "host a.test");
    let hit = get("/k", "a.test");
    assert_eq!(hit.text(), "host a.test");
    assert!(CacheStatus::of(&hit).has("hit"), "{:?}", hit.headers);

    // Absolute-form naming a.test, Host b.test: nginx forwards Host b.test, so a.test's
    // entry must not answer it.
    let abs = get("http://a.test/k", "b.test");
    assert_eq!(
        abs.text(),
        "host b.test",
        "answered with another Host's entry"
    );
    assert!(!CacheStatus::of(&abs).has("hit"));

    // Origin-form with Host b.test: its own miss.
    let other = get("/k", "b.test");
    assert_eq!(other.text(), "host b.test", "answered with a.test's entry");
    assert!(!CacheStatus::of(&other).has("hit"));

    // The other direction: an absolute-form request fetched for b.test must not store
    // under a.test.
    assert_eq!(get("http://a.test/p", "b.test").text(), "host b.test");
    assert_eq!(
        get("/p", "a.test").text(),
        "host a.test",
        "poisoned by absolute-form"
    );
    // Absolute-form is never stored: a.test's /p came from the origin.
    assert_eq!(up.count("/p"), 2);

    // The cache still works.
    let again = get("/k", "a.test");
    assert_eq!(again.text(), "host a.test");
    assert!(CacheStatus::of(&again).has("hit"));
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn four_workers_share_one_cache() {
    if nginx::skipped() {
        return;
    }
    let up = origin();
    let conf = NginxConf::new(4, &shipped_plugin_config())
        .listener_line("add_header X-Worker $pid always;");
    let nginx = start(&up, &conf);
    let worker = |r: &http::Response| -> String {
        r.header("x-worker")
            .unwrap_or_else(|| panic!("no X-Worker in {:?}", r.headers))
            .to_string()
    };

    let miss = nginx.get("/cached/shared");
    assert_eq!(
        miss.header("cache-status"),
        Some("edge-filter; fwd=uri-miss; fwd-status=200; stored")
    );
    let first = worker(&miss);
    assert!(
        nginx.worker_pids().iter().any(|p| p.to_string() == first),
        "X-Worker {first} is not one of {:?}",
        nginx.worker_pids()
    );

    // New connections until another worker answers (the kernel picks the worker).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tries = 0;
    let other = loop {
        tries += 1;
        let r = nginx.get("/cached/shared");
        assert_eq!(r.text(), "origin /cached/shared");
        if worker(&r) != first {
            break r;
        }
        assert!(
            Instant::now() < deadline && tries < 2000,
            "{tries} connections, all answered by worker {first}"
        );
    };
    hit_ttl(&other);
    assert!(CacheStatus::of(&other).has("hit"));
    assert_eq!(
        up.count("/cached/shared"),
        1,
        "the other worker went to the origin"
    );
    eprintln!(
        "worker {first} stored, worker {} hit after {tries} connection(s)",
        worker(&other)
    );
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}

/// A response larger than nginx's proxy buffers, to a client that is not reading yet, is
/// spooled by nginx to a proxy temp file; the module reads those bytes back for the
/// filter, so the response is still stored, byte for byte, and the next request is a hit.
#[test]
fn a_body_spooled_to_a_temp_file_is_stored() {
    if nginx::skipped() {
        return;
    }
    const LEN: usize = 900_000;
    let up = Upstream::origin(|req| {
        if req.path != "/spooled" {
            return Reply::new(404);
        }
        Reply::new(200)
            .header("Cache-Control", "max-age=60")
            .header("Content-Type", "application/octet-stream")
            .body(edge_filter_e2e::scenarios::patterned(LEN))
    });
    // A second listener with a tiny send buffer and small proxy buffers: what the slow
    // client does not take fills them at once, and nginx spools the rest to a file.
    let slow_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let conf = NginxConf::new(1, &shipped_plugin_config())
        .listener_line(&format!("listen 127.0.0.1:{slow_port} sndbuf=4k;"))
        .listener_line("proxy_buffers 4 4k;")
        .listener_line("proxy_busy_buffers_size 4k;");
    let nginx = start(&up, &conf);

    let mut s = std::net::TcpStream::connect(("127.0.0.1", slow_port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    use std::io::{Read, Write};
    // The Host the http client sends, so both requests have one cache key.
    write!(
        s,
        "GET /spooled HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    // Not reading for a while: nginx's buffers fill up and it spools to a temp file.
    thread::sleep(Duration::from_millis(1500));
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("the whole response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("stored"), "Cache-Status says stored: {head}");
    assert_eq!(
        raw.len() - split - 4,
        LEN,
        "the whole body reached the client"
    );
    assert!(
        nginx
            .error_log()
            .contains("an upstream response is buffered to a temporary file"),
        "nginx did not spool the response, so the test did not test file buffers"
    );

    let hit = nginx.get("/spooled");
    assert!(
        CacheStatus::of(&hit).has("hit"),
        "{:?}",
        hit.header("cache-status")
    );
    assert_eq!(
        hit.body,
        edge_filter_e2e::scenarios::patterned(LEN),
        "the stored bytes"
    );
    assert_eq!(up.count("/spooled"), 1);
    nginx
        .check_logs(&["buffered to a temporary file"])
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A filter that calls cluster `upstream` from `proxy_on_request_headers` and waits
/// (StopIteration):
/// - normally `POST /call/check?x=1` with `x-call: from-filter`, `:authority call.test`,
///   the body `call body` and a 5 s timeout; with an `x-timeout` request header
///   `GET /call/slow` with a 300 ms timeout;
/// - from `proxy_on_http_call_response`, with an `x-reply` request header, a local reply
///   200 carrying what it got: `x-call-status` (the answer's `:status`, `reset` without
///   headers), `x-call-header` (its `x-answer`) and its body; without, it adds
///   `x-call-status` to the request headers and resumes the request.
///
/// `{CALL}` and `{SLOW}` are the two calls' header maps (Proxy-Wasm's serialization),
/// filled in by [`call_filter_bytes`].
const CALL_FILTER_WAT: &str = r#"
(module
  (import "env" "proxy_get_header_map_value"
    (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes"
    (func $get_body (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $local_response (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (memory (export "memory") 2)
  ;; 0/4: body ptr/len, 8/12: status ptr/len, 20/24: x-answer ptr/len, 1024: token,
  ;; 2048: reply mode per context, 4096: the local reply's header map.
  (data (i32.const 32) "x-reply")
  (data (i32.const 48) "x-timeout")
  (data (i32.const 64) "upstream")
  (data (i32.const 80) ":status")
  (data (i32.const 96) "x-answer")
  (data (i32.const 112) "x-call-status")
  (data (i32.const 128) "x-call-header")
  (data (i32.const 144) "call body")
  (data (i32.const 160) "reset")
  (data (i32.const 256) "{CALL}")
  (data (i32.const 512) "{SLOW}")
  (global $heap (mut i32) (i32.const 65536))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func $slot (param $ctx i32) (result i32)
    (i32.add (i32.const 2048) (i32.shl (i32.and (local.get $ctx) (i32.const 255)) (i32.const 2))))
  ;; Copies len bytes from src to p, then a NUL; returns the end.
  (func $put (param $p i32) (param $src i32) (param $len i32) (result i32)
    (memory.copy (local.get $p) (local.get $src) (local.get $len))
    (i32.store8 (i32.add (local.get $p) (local.get $len)) (i32.const 0))
    (i32.add (i32.add (local.get $p) (local.get $len)) (i32.const 1)))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (local $rc i32)
    (global.set $heap (i32.const 65536))
    (i32.store (call $slot (local.get $ctx))
      (i32.eqz (call $get_header (i32.const 0) (i32.const 32) (i32.const 7)
                                 (i32.const 0) (i32.const 4))))
    (if (i32.eqz (call $get_header (i32.const 0) (i32.const 48) (i32.const 9)
                                   (i32.const 0) (i32.const 4)))
      (then (local.set $rc (call $http_call (i32.const 64) (i32.const 8)
              (i32.const 512) (i32.const {SLOW_LEN}) (i32.const 0) (i32.const 0)
              (i32.const 0) (i32.const 0) (i32.const 300) (i32.const 1024))))
      (else (local.set $rc (call $http_call (i32.const 64) (i32.const 8)
              (i32.const 256) (i32.const {CALL_LEN}) (i32.const 144) (i32.const 9)
              (i32.const 0) (i32.const 0) (i32.const 5000) (i32.const 1024)))))
    ;; A refused call: go on without waiting.
    (if (local.get $rc) (then (return (i32.const 0))))
    (i32.const 1))
  (func (export "proxy_on_http_call_response")
    (param $ctx i32) (param $token i32) (param $nh i32) (param $size i32) (param $nt i32)
    (local $end i32)
    (global.set $heap (i32.const 65536))
    (if (i32.eqz (local.get $nh))
      (then (i32.store (i32.const 8) (i32.const 160)) (i32.store (i32.const 12) (i32.const 5)))
      ;; map 6 = the call's response headers.
      (else (drop (call $get_header (i32.const 6) (i32.const 80) (i32.const 7)
                                    (i32.const 8) (i32.const 12)))))
    (if (i32.load (call $slot (local.get $ctx)))
      (then
        (i32.store (i32.const 20) (i32.const 0))
        (i32.store (i32.const 24) (i32.const 0))
        (drop (call $get_header (i32.const 6) (i32.const 96) (i32.const 8)
                                (i32.const 20) (i32.const 24)))
        (i32.store (i32.const 0) (i32.const 0))
        (i32.store (i32.const 4) (i32.const 0))
        ;; buffer 4 = the call's response body.
        (drop (call $get_body (i32.const 4) (i32.const 0) (local.get $size)
                              (i32.const 0) (i32.const 4)))
        (i32.store (i32.const 4096) (i32.const 2))
        (i32.store (i32.const 4100) (i32.const 13))
        (i32.store (i32.const 4104) (i32.load (i32.const 12)))
        (i32.store (i32.const 4108) (i32.const 13))
        (i32.store (i32.const 4112) (i32.load (i32.const 24)))
        (local.set $end (call $put (i32.const 4116) (i32.const 112) (i32.const 13)))
        (local.set $end (call $put (local.get $end) (i32.load (i32.const 8)) (i32.load (i32.const 12))))
        (local.set $end (call $put (local.get $end) (i32.const 128) (i32.const 13)))
        (local.set $end (call $put (local.get $end) (i32.load (i32.const 20)) (i32.load (i32.const 24))))
        (drop (call $local_response (i32.const 200) (i32.const 0) (i32.const 0)
                (i32.load (i32.const 0)) (i32.load (i32.const 4))
                (i32.const 4096) (i32.sub (local.get $end) (i32.const 4096)) (i32.const -1))))
      (else
        ;; map 0 = the (paused) request's headers; stream 0 = the request.
        (drop (call $add_header (i32.const 0) (i32.const 112) (i32.const 13)
                                (i32.load (i32.const 8)) (i32.load (i32.const 12))))
        (drop (call $continue (i32.const 0))))))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_abi_version_0_2_1")))
"#;

/// A header map in Proxy-Wasm's serialization: the count, each name and value length
/// (u32 little-endian), then each name and value followed by a NUL.
fn header_map(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        for s in [k, v] {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
    }
    out
}

/// Bytes as a WAT string literal's contents.
fn wat_bytes(b: &[u8]) -> String {
    b.iter().map(|c| format!("\\{c:02x}")).collect()
}

fn call_filter_bytes() -> Vec<u8> {
    let call = header_map(&[
        (":method", "POST"),
        (":path", "/call/check?x=1"),
        (":authority", "call.test"),
        ("x-call", "from-filter"),
    ]);
    let slow = header_map(&[
        (":method", "GET"),
        (":path", "/call/slow"),
        (":authority", "call.test"),
    ]);
    assert!(call.len() <= 256 && slow.len() <= 256, "the maps overlap");
    let text = CALL_FILTER_WAT
        .replace("{CALL}", &wat_bytes(&call))
        .replace("{CALL_LEN}", &call.len().to_string())
        .replace("{SLOW}", &wat_bytes(&slow))
        .replace("{SLOW_LEN}", &slow.len().to_string());
    wat::parse_str(text).expect("the call filter's WAT")
}

/// The listener lines that send the filter's in-request calls through nginx: the
/// directive and the internal location, as README.md shows them.
const CALL_LOCATION_LINES: [&str; 2] = [
    "proxy_wasm_call_location /_proxy_wasm_call;",
    "location /_proxy_wasm_call { internal; \
     proxy_pass http://$proxy_wasm_call_cluster$proxy_wasm_call_path; \
     proxy_set_header Host $proxy_wasm_call_authority; \
     proxy_http_version 1.1; proxy_set_header Connection \"\"; \
     proxy_connect_timeout 1s; proxy_read_timeout 10s; \
     subrequest_output_buffer_size 64k; }",
];

/// nginx with the call filter and the call location, in front of `up`.
fn start_call_filter(up: &Upstream, dir: &ScratchDir) -> Nginx {
    let wasm = dir.0.join("call-filter.wasm");
    write_atomically(&wasm, &call_filter_bytes());
    let mut conf = NginxConf::new(1, "{}").wasm(&wasm);
    for l in CALL_LOCATION_LINES {
        conf = conf.listener_line(l);
    }
    start(up, &conf)
}

/// A call that failed: twice, the client still gets the filter's reply, which says what
/// the filter got (`call_status`, and no body); the same workers serve it; nginx's error
/// log says `logged`, and nothing worse.
fn assert_failed_call(nginx: &Nginx, call_status: &str, logged: &str) {
    let workers = nginx.worker_pids().to_vec();
    for _ in 0..2 {
        let r = nginx.request("GET", "/main", &[("x-reply", "1")], b"");
        assert_eq!(r.status, 200, "{:?} {}", r.headers, r.text());
        assert_eq!(r.header("x-call-status"), Some(call_status));
        assert_eq!(r.text(), "", "no body in the answer the filter got");
    }
    assert_eq!(nginx.running_workers(), workers);
    assert!(
        nginx.error_log().contains(logged),
        "the error log says {logged:?}"
    );
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}

/// An origin for the call tests: `/call/check` answers 202 with `x-answer: 42` and
/// `checked: <the request body>`; `/call/slow` the same after `slow`; anything else
/// `origin <path>`.
fn call_origin(slow: Duration) -> Upstream {
    Upstream::origin(move |req| {
        if req.path.starts_with("/call/") {
            if req.path == "/call/slow" {
                thread::sleep(slow);
            }
            let mut body = b"checked: ".to_vec();
            body.extend_from_slice(&req.body);
            return Reply::new(202)
                .header("Content-Type", "text/plain")
                .header("X-Answer", "42")
                .body(body);
        }
        Reply::text(format!("origin {}", req.path)).header("Cache-Control", "no-store")
    })
}

/// The call reaches the named upstream through the declared location, with the method,
/// path, headers and body the filter set (not the client request's), and its answer
/// (status, a header, the body) reaches the filter, which answers the client with it.
/// The subrequest's own output never reaches the client.
#[test]
fn an_in_request_call_goes_through_the_call_location() {
    if nginx::skipped() {
        return;
    }
    let up = call_origin(Duration::ZERO);
    let dir = ScratchDir::new().expect("scratch dir");
    let nginx = start_call_filter(&up, &dir);
    let r = nginx.request(
        "GET",
        "/main?q=1",
        &[("x-reply", "1"), ("x-parent", "client")],
        b"",
    );
    assert_eq!(r.status, 200, "{:?} {}", r.headers, r.text());
    assert_eq!(r.header("x-call-status"), Some("202"));
    assert_eq!(r.header("x-call-header"), Some("42"));
    assert_eq!(r.text(), "checked: call body");
    let seen = up.requests();
    assert_eq!(seen.len(), 1, "only the call reached the origin: {seen:?}");
    let call = &seen[0];
    assert_eq!(call.method, "POST");
    assert_eq!(call.path, "/call/check?x=1");
    assert_eq!(call.headers.get("x-call"), Some("from-filter"));
    assert_eq!(call.headers.get("host"), Some("call.test"));
    assert_eq!(call.headers.get("content-length"), Some("9"));
    assert_eq!(call.body, b"call body");
    assert_eq!(
        call.headers.get("x-parent"),
        None,
        "the client's headers are not the call's"
    );
    // Keep-alive to the upstream (the location's proxy_http_version 1.1).
    assert_eq!(call.headers.get("connection"), None);
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}

/// The filter resumes the request from the call's answer, with a request header added
/// from it: the upstream gets the request with that header, the client the upstream's
/// response only.
#[test]
fn an_in_request_call_answer_resumes_the_request_with_a_header_added() {
    if nginx::skipped() {
        return;
    }
    let up = call_origin(Duration::ZERO);
    let dir = ScratchDir::new().expect("scratch dir");
    let nginx = start_call_filter(&up, &dir);
    for i in 0..3 {
        let r = nginx.get(&format!("/resumed/{i}"));
        assert_eq!(r.status, 200, "{:?} {}", r.headers, r.text());
        assert_eq!(r.text(), format!("origin /resumed/{i}"));
        let main = up
            .requests()
            .into_iter()
            .find(|q| q.path == format!("/resumed/{i}"))
            .expect("the resumed request reached the origin");
        assert_eq!(main.headers.get("x-call-status"), Some("202"));
    }
    assert_eq!(up.count("/call/check?x=1"), 3);
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}

/// The called upstream is down: nginx ends the subrequest with 502, the filter gets that
/// status, and the client still gets the filter's answer. The worker carries on.
#[test]
fn an_in_request_call_to_a_down_upstream_answers_502() {
    if nginx::skipped() {
        return;
    }
    let mut up = call_origin(Duration::ZERO);
    let dir = ScratchDir::new().expect("scratch dir");
    let nginx = start_call_filter(&up, &dir);
    up.stop();
    // nginx's own status, without a body.
    assert_failed_call(&nginx, "502", "connect() failed");
}

/// A call that takes longer than its timeout: the filter gets Envoy's 504 at the
/// timeout, long before the upstream answers; the worker carries on, and the late answer
/// goes nowhere.
#[test]
fn an_in_request_call_that_times_out_answers_504() {
    if nginx::skipped() {
        return;
    }
    let up = call_origin(Duration::from_millis(1500));
    let dir = ScratchDir::new().expect("scratch dir");
    let nginx = start_call_filter(&up, &dir);
    let t0 = Instant::now();
    let r = nginx.request("GET", "/main", &[("x-reply", "1"), ("x-timeout", "1")], b"");
    let took = t0.elapsed();
    assert_eq!(r.status, 200, "{:?} {}", r.headers, r.text());
    assert_eq!(r.header("x-call-status"), Some("504"));
    assert_eq!(r.text(), "upstream request timeout");
    assert!(
        took < Duration::from_millis(1200),
        "answered at the call's timeout, not the upstream's answer: {took:?}"
    );
    assert!(nginx.error_log().contains("timed out after 300 ms"));
    // After the late answer has come (and gone nowhere), the worker still answers.
    thread::sleep(Duration::from_millis(1600));
    let next = nginx.request("GET", "/main", &[("x-reply", "1")], b"");
    assert_eq!(next.header("x-call-status"), Some("202"));
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}

/// A client that leaves while its request waits for a call: nginx ends the request and
/// its subrequest; nothing is delivered to the gone stream, the worker does not crash,
/// and the next request is answered.
#[test]
fn a_client_that_leaves_mid_call_does_not_hurt_the_worker() {
    if nginx::skipped() {
        return;
    }
    let up = call_origin(Duration::from_millis(1000));
    let dir = ScratchDir::new().expect("scratch dir");
    let nginx = start_call_filter(&up, &dir);
    let workers = nginx.worker_pids().to_vec();
    let addr = nginx.listener_addr();
    for _ in 0..3 {
        use std::io::Write;
        // Gone 100 ms into a call the upstream answers after 1 s (its timeout: 300 ms).
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(
            b"GET /leaving HTTP/1.1\r\nHost: edge.test\r\nx-reply: 1\r\nx-timeout: 1\r\n\r\n",
        )
        .unwrap();
        thread::sleep(Duration::from_millis(100));
        drop(s);
    }
    // Longer than the call's timeout and the upstream's delay: every late event has run.
    thread::sleep(Duration::from_millis(1500));
    let r = nginx.request("GET", "/main", &[("x-reply", "1")], b"");
    assert_eq!(r.header("x-call-status"), Some("202"));
    assert_eq!(nginx.running_workers(), workers, "the worker was replaced");
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}

/// An answer larger than the call location's `subrequest_output_buffer_size` (64k): the
/// call fails; the filter gets the failure (no headers, as Envoy's reset), the client
/// still gets the filter's answer (nginx's own in-memory buffer would have cut the
/// client's connection), and the worker carries on.
#[test]
fn an_in_request_call_answer_over_the_buffer_is_a_reset() {
    if nginx::skipped() {
        return;
    }
    let up = Upstream::origin(|req| {
        if req.path.starts_with("/call/") {
            return Reply::new(200)
                .header("X-Answer", "big")
                .body(vec![b'x'; 100_000]);
        }
        Reply::text("origin").header("Cache-Control", "no-store")
    });
    let dir = ScratchDir::new().expect("scratch dir");
    let nginx = start_call_filter(&up, &dir);
    assert_failed_call(&nginx, "reset", "is over 65536 bytes");
}

/// An answer the upstream cuts short (it promised 1000 bytes, sent 10, closed): nginx
/// ends the subrequest as if it were whole; the filter gets a reset, not the 10 bytes.
#[test]
fn an_in_request_call_answer_cut_short_is_a_reset() {
    if nginx::skipped() {
        return;
    }
    let up = Upstream::origin(|req| {
        if req.path.starts_with("/call/") {
            return Reply::new(200)
                .body(vec![b'x'; 1000])
                .mode(edge_filter_e2e::upstream::BodyMode::TruncatedLength { sent: 10 });
        }
        Reply::text("origin").header("Cache-Control", "no-store")
    });
    let dir = ScratchDir::new().expect("scratch dir");
    let nginx = start_call_filter(&up, &dir);
    assert_failed_call(&nginx, "reset", "was cut short");
}

/// Without `proxy_wasm_call_location`, a call made inside a request keeps the module's
/// own client (one connection per call, `Connection: close`), and its answer reaches the
/// filter the same way.
#[test]
fn without_a_call_location_in_request_calls_use_the_modules_client() {
    if nginx::skipped() {
        return;
    }
    let up = call_origin(Duration::ZERO);
    let dir = ScratchDir::new().expect("scratch dir");
    let wasm = dir.0.join("call-filter.wasm");
    write_atomically(&wasm, &call_filter_bytes());
    let nginx = start(&up, &NginxConf::new(1, "{}").wasm(&wasm));
    let r = nginx.request("GET", "/main", &[("x-reply", "1")], b"");
    assert_eq!(r.status, 200, "{:?} {}", r.headers, r.text());
    assert_eq!(r.header("x-call-status"), Some("202"));
    assert_eq!(r.text(), "checked: call body");
    let call = up
        .requests()
        .into_iter()
        .find(|q| q.path == "/call/check?x=1")
        .expect("the call reached the origin");
    assert_eq!(call.headers.get("connection"), Some("close"));
    assert_eq!(call.headers.get("x-call"), Some("from-filter"));
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}

/// Many requests at once, each waiting for its own call, on 2 workers: every one is
/// resumed with its call's answer, none is lost or answered twice.
#[test]
fn concurrent_in_request_calls_each_resume_their_own_request() {
    if nginx::skipped() {
        return;
    }
    let up = call_origin(Duration::ZERO);
    let dir = ScratchDir::new().expect("scratch dir");
    let wasm = dir.0.join("call-filter.wasm");
    write_atomically(&wasm, &call_filter_bytes());
    let mut conf = NginxConf::new(2, "{}").wasm(&wasm);
    for l in CALL_LOCATION_LINES {
        conf = conf.listener_line(l);
    }
    let nginx = start(&up, &conf);
    let addr = nginx.listener_addr();
    let threads: Vec<_> = (0..16)
        .map(|t| {
            thread::spawn(move || {
                for i in 0..5 {
                    let path = format!("/many/{t}/{i}");
                    let r = http::send(addr, "GET", &path, &[], b"").expect("a response");
                    assert_eq!(r.status, 200, "{path}: {}", r.text());
                    assert_eq!(r.text(), format!("origin {path}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread panicked");
    }
    let seen = up.requests();
    let mains: Vec<_> = seen
        .iter()
        .filter(|q| q.path.starts_with("/many/"))
        .collect();
    assert_eq!(mains.len(), 80);
    assert!(mains
        .iter()
        .all(|q| q.headers.get_all("x-call-status") == vec!["202"]));
    assert_eq!(up.count("/call/check?x=1"), 80);
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
}
