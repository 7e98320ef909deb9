//! What a trapping filter costs in the real Envoy with the shipped `failure_policy`
//! (read from `envoy/envoy.yaml`, so changing it there changes what runs here): the
//! trapping request fails, the next ones are served by a new VM, shared data (the cache)
//! survives, the reload is counted on `/stats/prometheus` under the names the alerts in
//! `monitoring/rules/` use, and Envoy stays up. The filter that traps on demand is a few
//! lines of WAT; the real edge-filter runs next to it where its cache is what matters.

use std::fs;
use std::path::Path;
use std::time::Duration;

use edge_filter_e2e::envoy::repo_root;
use edge_filter_e2e::{poll, CacheStatus, Envoy, Reply, ScratchDir, Upstream};

/// A Proxy-Wasm filter for these tests:
/// - `x-trap` on a request: traps (`unreachable`) in `proxy_on_request_headers`;
/// - `x-remember: V`: stores V in shared data under `trap-filter.remembered`; every
///   response then carries `x-remembered: V`, read back from shared data;
/// - `x-poison`: stores `trap-filter.poison` in shared data, then traps; from then on a
///   new VM refuses its configuration (`proxy_on_configure` returns false), so a reload fails;
/// - every response gets `x-filter: trap-filter`, so a test sees that the filter ran.
const TRAP_FILTER_WAT: &str = r#"
(module
  (import "env" "proxy_get_header_map_value"
    (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data"
    (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data"
    (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  ;; 0: returned data pointer, 4: returned size, 8: returned CAS.
  (data (i32.const 16) "x-trap")
  (data (i32.const 32) "x-filter")
  (data (i32.const 48) "trap-filter")
  (data (i32.const 64) "x-remember")
  (data (i32.const 80) "x-remembered")
  (data (i32.const 96) "trap-filter.remembered")
  (data (i32.const 128) "x-poison")
  (data (i32.const 144) "trap-filter.poison")
  (data (i32.const 176) "1")
  ;; A bump allocator for values the host returns, reset at each request.
  (global $heap (mut i32) (i32.const 65536))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  ;; Whether the request has the header named by (ptr, len); its value lands at 0/4.
  (func $has (param $k i32) (param $n i32) (result i32)
    (i32.eqz (call $get_header (i32.const 0) (local.get $k) (local.get $n)
                               (i32.const 0) (i32.const 4))))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  ;; Fails once a poisoned request has run (status 0 = the key exists).
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (i32.ne (call $get_shared (i32.const 144) (i32.const 18)
                              (i32.const 0) (i32.const 4) (i32.const 8))
            (i32.const 0)))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (global.set $heap (i32.const 65536))
    (if (call $has (i32.const 128) (i32.const 8))
      (then
        (drop (call $set_shared (i32.const 144) (i32.const 18)
                                (i32.const 176) (i32.const 1) (i32.const 0)))
        unreachable))
    (if (call $has (i32.const 16) (i32.const 6))
      (then unreachable))
    (if (call $has (i32.const 64) (i32.const 10))
      (then
        (drop (call $set_shared (i32.const 96) (i32.const 22)
                                (i32.load (i32.const 0)) (i32.load (i32.const 4))
                                (i32.const 0)))))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    ;; map 2 = response headers.
    (drop (call $add_header (i32.const 2) (i32.const 32) (i32.const 8)
                            (i32.const 48) (i32.const 11)))
    (if (i32.eqz (call $get_shared (i32.const 96) (i32.const 22)
                                   (i32.const 0) (i32.const 4) (i32.const 8)))
      (then
        (drop (call $add_header (i32.const 2) (i32.const 80) (i32.const 12)
                                (i32.load (i32.const 0)) (i32.load (i32.const 4))))))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_abi_version_0_2_1")))
"#;

/// Longer than Envoy's reload backoff (`reload_config` unset: 1 s after the last reload).
const BACKOFF: Duration = Duration::from_millis(1500);

/// The shipped `failure_policy` (the value on the `failure_policy:` line of envoy.yaml).
fn shipped_failure_policy() -> String {
    let text = fs::read_to_string(repo_root().join("envoy/envoy.yaml")).expect("envoy/envoy.yaml");
    let values: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("failure_policy:"))
        .map(str::trim)
        .collect();
    match values[..] {
        [one] => one.to_string(),
        _ => panic!("envoy.yaml: expected one `failure_policy:` line, found {values:?}"),
    }
}

/// Writes the test filter's .wasm into `dir`.
fn trap_filter(dir: &ScratchDir) -> std::path::PathBuf {
    let path = dir.0.join("trap-filter.wasm");
    let bytes = wat::parse_str(TRAP_FILTER_WAT).expect("the test filter's WAT");
    fs::write(&path, bytes).expect("writing trap-filter.wasm");
    path
}

/// Replaces the one `filename:` line's module path with `wasm` (the rest of the shipped
/// filter block, policy included, stays).
fn with_module(config: &str, wasm: &Path) -> Result<String, String> {
    let lines: Vec<&str> = config.lines().collect();
    let at: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].trim_start().starts_with("filename: "))
        .collect();
    let [at] = at[..] else {
        return Err(format!("expected one `filename:` line, found {}", at.len()));
    };
    let indent = &lines[at][..lines[at].len() - lines[at].trim_start().len()];
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    out[at] = format!("{indent}filename: {}", wasm.display());
    Ok(out.join("\n") + "\n")
}

/// Puts a copy of the shipped Wasm filter block, named `trap-filter` and running `wasm`,
/// in front of the shipped one: same `failure_policy`, same `vm_id` (so the same shared
/// data, the cache's), its own VM (other code).
fn with_trap_filter_in_front(config: &str, wasm: &Path) -> Result<String, String> {
    let lines: Vec<&str> = config.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == "- name: envoy.filters.http.wasm")
        .ok_or("no `- name: envoy.filters.http.wasm` line")?;
    let end = lines
        .iter()
        .position(|l| l.trim() == "- name: envoy.filters.http.router")
        .filter(|&e| e > start)
        .ok_or("no router after the Wasm filter")?;
    let block = lines[start..end].join("\n");
    let block = with_module(&block, wasm)?;
    if block.matches("name: edge-filter\n").count() != 1 {
        return Err("expected one `name: edge-filter` in the Wasm filter block".into());
    }
    let block = block.replacen("name: edge-filter\n", "name: trap-filter\n", 1);
    let mut out: Vec<String> = lines[..start].iter().map(|l| l.to_string()).collect();
    out.extend(block.lines().map(str::to_string));
    out.extend(lines[start..].iter().map(|l| l.to_string()));
    Ok(out.join("\n") + "\n")
}

/// An origin answering `origin <path>`; `/cached*` may be stored for a minute.
fn origin() -> Upstream {
    Upstream::origin(|req| {
        let cc = if req.path.starts_with("/cached") {
            "max-age=60"
        } else {
            "no-store"
        };
        Reply::text(format!("origin {}", req.path)).header("Cache-Control", cc)
    })
}

/// `envoy_wasm_<plugin>_<stat>` on /stats/prometheus (0 when absent).
fn wasm_stat(envoy: &Envoy, plugin: &str, stat: &str) -> f64 {
    let name = format!("envoy_wasm_{}_{stat}", plugin.replace('-', "_"));
    envoy.metrics().value(&name, &[]).unwrap_or(0.0)
}

/// Sends plain requests until `plugin` has reloaded `reloads` VMs in all (the trapped
/// worker gets one of them: each connection goes to either of the 2 workers). Every one
/// must be served by the filter, with `x-remembered: <remembered>` when given: the one
/// that made the reload was served by the new VM, so that VM read the old one's shared
/// data. Waits past the reload backoff (1 s after a worker's last reload) first, so that
/// none can land in it.
fn serve_until_reloaded(envoy: &Envoy, plugin: &str, reloads: f64, remembered: Option<&str>) {
    std::thread::sleep(BACKOFF);
    let reloaded = poll(Duration::from_secs(20), Duration::from_millis(20), || {
        let r = envoy.get("/next");
        assert_eq!(r.status, 200, "after a trap: {} {}", r.status, r.text());
        assert_eq!(r.header("x-filter"), Some("trap-filter"), "the filter ran");
        if remembered.is_some() {
            assert_eq!(r.header("x-remembered"), remembered, "shared data lost");
        }
        (wasm_stat(envoy, plugin, "vm_reload_success") >= reloads).then_some(())
    });
    assert!(
        reloaded.is_some(),
        "no VM reload counted after a trap\n{}",
        envoy.stats_prometheus()
    );
}

#[test]
fn the_shipped_policy_is_fail_reload() {
    assert_eq!(
        shipped_failure_policy(),
        "FAIL_RELOAD",
        "a trap must cost the requests in flight, not the cache for the life of the process \
         (monitoring/README.md, EdgeFilterWasmVmCrashed)"
    );
}

/// The trapping request gets 503, the next ones get a new VM with the shared data of the
/// old one, `vm_reload_success` counts it, and a second crash right after the reload
/// meets the backoff (503s, `vm_reload_backoff`) and then recovers.
#[test]
fn a_trap_costs_the_request_not_the_filter() {
    let up = origin();
    let dir = ScratchDir::new().expect("scratch dir");
    let wasm = trap_filter(&dir);
    let envoy = Envoy::try_start_edited(up.port(), "{}", &|c| with_module(c, &wasm))
        .unwrap_or_else(|e| panic!("{e}"));
    let policy = shipped_failure_policy();

    let r = envoy.get_with("/remember", &[("x-remember", "before-the-trap")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-remembered"), Some("before-the-trap"));
    assert_eq!(wasm_stat(&envoy, "edge-filter", "vm_reload_success"), 0.0);
    let created = envoy
        .metrics()
        .value("envoy_wasm_envoy_wasm_runtime_v8_created", &[])
        .expect("envoy_wasm_envoy_wasm_runtime_v8_created");

    let trapped = envoy.get_with("/trap", &[("x-trap", "1")]);
    assert_eq!(trapped.status, 503, "the trapping request ({policy})");
    assert_eq!(
        up.count("/trap"),
        0,
        "a trapped request must not reach the origin"
    );
    let logged = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        envoy
            .access_log()
            .contains(r#""details":"wasm_fail_stream""#)
            .then_some(())
    });
    assert!(logged.is_some(), "the 503 is Envoy's wasm_fail_stream");

    // The new VM sees what the old one stored: shared data outlives a VM.
    serve_until_reloaded(&envoy, "edge-filter", 1.0, Some("before-the-trap"));
    let m = envoy.metrics();
    assert_eq!(
        m.type_of("envoy_wasm_edge_filter_vm_reload_success"),
        Some("counter")
    );
    assert_eq!(
        m.value("envoy_wasm_edge_filter_vm_reload_failure", &[]),
        Some(0.0)
    );
    assert!(
        m.value("envoy_wasm_envoy_wasm_runtime_v8_created", &[]) > Some(created),
        "a new VM was created"
    );

    // A crash right after a reload: that worker's requests get 503 during the backoff
    // (counted), then a new VM. Which worker a connection lands on is the kernel's choice,
    // so trap until one trap lands within the backoff of a worker's last reload.
    let backoff = poll(Duration::from_secs(20), Duration::from_millis(0), || {
        let r = envoy.get_with("/trap", &[("x-trap", "1")]);
        assert_eq!(r.status, 503);
        (wasm_stat(&envoy, "edge-filter", "vm_reload_backoff") > 0.0).then_some(())
    });
    assert!(
        backoff.is_some(),
        "no request met the reload backoff\n{}",
        envoy.stats_prometheus()
    );
    let before = wasm_stat(&envoy, "edge-filter", "vm_reload_success");
    serve_until_reloaded(&envoy, "edge-filter", before + 1.0, Some("before-the-trap"));
    assert_eq!(wasm_stat(&envoy, "edge-filter", "vm_reload_failure"), 0.0);
    assert_eq!(envoy.admin("/ready").status, 200, "Envoy is still up");
}

/// A reload whose new VM refuses its configuration counts `vm_reload_failure`, the
/// worker answers 503, and Envoy itself stays up.
#[test]
fn a_failed_reload_is_counted_and_envoy_stays_up() {
    let up = origin();
    let dir = ScratchDir::new().expect("scratch dir");
    let wasm = trap_filter(&dir);
    let envoy = Envoy::try_start_edited(up.port(), "{}", &|c| with_module(c, &wasm))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(envoy.get("/before").status, 200);

    let r = envoy.get_with("/poison", &[("x-poison", "1")]);
    assert_eq!(r.status, 503);
    std::thread::sleep(BACKOFF);
    let failed = poll(Duration::from_secs(20), Duration::from_millis(20), || {
        let r = envoy.get("/next");
        assert!(
            r.status == 200 || r.status == 503,
            "{} {}",
            r.status,
            r.text()
        );
        (wasm_stat(&envoy, "edge-filter", "vm_reload_failure") > 0.0).then_some(())
    });
    assert!(
        failed.is_some(),
        "no failed reload counted\n{}",
        envoy.stats_prometheus()
    );
    assert_eq!(envoy.admin("/ready").status, 200, "Envoy is still up");
}

/// The real edge-filter behind a trapping filter that shares its `vm_id` (so its shared
/// data is the cache): after that filter's VM traps and is replaced, the cache still
/// answers hits for what it stored before, and `/healthz` is still the filter's.
#[test]
fn the_cache_survives_a_reload_in_its_vm_id() {
    let up = origin();
    let dir = ScratchDir::new().expect("scratch dir");
    let wasm = trap_filter(&dir);
    let envoy = Envoy::try_start_edited(up.port(), "{}", &|c| with_trap_filter_in_front(c, &wasm))
        .unwrap_or_else(|e| panic!("{e}"));

    let miss = envoy.get("/cached");
    assert_eq!(miss.status, 200);
    assert!(!CacheStatus::of(&miss).has("hit"), "first GET is a miss");
    let hit = envoy.get("/cached");
    assert!(CacheStatus::of(&hit).has("hit"), "second GET is a hit");

    assert_eq!(envoy.get_with("/trap", &[("x-trap", "1")]).status, 503);
    serve_until_reloaded(&envoy, "trap-filter", 1.0, None);

    for _ in 0..4 {
        let r = envoy.get("/cached");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-filter"), Some("trap-filter"));
        assert!(
            CacheStatus::of(&r).has("hit"),
            "the cache lost its entry in a reload: {:?}",
            r.header("cache-status")
        );
    }
    assert_eq!(
        up.count("/cached"),
        1,
        "only the first GET reached the origin"
    );
    let health = envoy.get("/healthz");
    assert_eq!(health.status, 200);
    assert_eq!(
        health.header("content-type"),
        Some("application/health+json")
    );
    assert_eq!(wasm_stat(&envoy, "edge-filter", "vm_reload_success"), 0.0);
    assert!(wasm_stat(&envoy, "trap-filter", "vm_reload_success") >= 1.0);
}
