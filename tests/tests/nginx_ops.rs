//! nginx-only end-to-end tests of the module in the stock Debian nginx, with the shipped
//! `nginx/conf/nginx.conf`: a trapping filter under both failure policies (the worker
//! survives, nothing leaks), reloads under load with a changed filter configuration and
//! a changed .wasm (no failed request), and 4 workers sharing one cache.
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

    let r = nginx.request("GET", "/trap", &[(TRAP_HEADER, "1")], b"");
    trapped(&r, &up);

    // The worker survived (a crash makes the master start a new one) and the filter
    // runs again on the next request, with a fresh VM.
    let next = nginx.get("/after");
    assert_eq!(next.status, 200);
    assert_eq!(next.text(), "origin /after");
    assert_eq!(next.header("x-filter"), Some("trap-filter"));
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
    nginx
        .check_logs(&["trapped"])
        .unwrap_or_else(|e| panic!("{e}"));
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
