//! The edge-filter `.wasm` (built by `tests/run` before `cargo test`) driven through the
//! harness: miss, hit, Vary, health, metrics, and several VMs sharing one cache.

use proxy_wasm_harness::{CallReply, Harness, HttpCallResponse, Request, Response};
use std::path::PathBuf;
use std::time::Duration;

/// The filter under test: `EDGE_FILTER_WASM`, else the workspace's release build.
fn wasm() -> PathBuf {
    edge_filter_e2e::envoy::wasm_path().unwrap_or_else(|e| panic!("{e}"))
}

fn harness(config: &str) -> Harness {
    Harness::from_file(wasm())
        .vm_id("edge-filter")
        .plugin_config(config)
        .cluster("upstream", |_| {
            CallReply::now(HttpCallResponse::new(200, "ok"))
        })
        .build()
        .expect("edge filter loads")
}

fn origin(body: &str) -> impl FnMut(&proxy_wasm_harness::Message) -> Option<Response> + '_ {
    move |_| Some(Response::ok(body).header("cache-control", "max-age=60"))
}

#[test]
fn miss_then_hit() {
    let h = harness("{}");
    assert_eq!(h.abi_version().as_str(), "0.2.1");
    let mut vm = h.new_vm().unwrap();
    let miss = vm
        .exchange(&Request::get("/page"), &mut origin("hello"), false)
        .unwrap();
    assert!(miss.trap.is_none(), "{:?}", miss.trap);
    assert_eq!(miss.status(), Some(200));
    assert_eq!(miss.text(), "hello");
    assert_eq!(
        miss.header("cache-status"),
        Some("edge-filter; fwd=uri-miss; fwd-status=200; stored")
    );
    assert!(miss.upstream_request.complete);

    let mut called = false;
    let hit = vm
        .exchange(
            &Request::get("/page"),
            &mut |_| {
                called = true;
                None
            },
            false,
        )
        .unwrap();
    assert!(!called, "a hit never reaches the upstream");
    assert!(hit.upstream_request.headers.is_none());
    assert_eq!(hit.status(), Some(200));
    assert_eq!(hit.text(), "hello");
    assert_eq!(hit.header("cache-status"), Some("edge-filter; hit; ttl=60"));
    assert_eq!(hit.header("age"), Some("0"));
    assert!(
        hit.actions[0].1.is_pause(),
        "a hit is a local reply: {:?}",
        hit.actions
    );
    // Metrics reach the shared store, labelled in the name.
    assert_eq!(
        h.metric("edge_filter_requests_total.cache_result.hit.status_class.2xx"),
        Some(1)
    );
    assert_eq!(
        h.metric("edge_filter_requests_total.cache_result.miss.status_class.2xx"),
        Some(1)
    );
    assert_eq!(h.metric("edge_filter_cache_stores_total"), Some(1));
    assert_eq!(h.metric("edge_filter_cache_entries"), Some(1));
    assert_eq!(h.metric("edge_filter_cache_served_bytes_total"), Some(5));
}

#[test]
fn age_follows_the_virtual_clock() {
    let h = harness("{}");
    let mut vm = h.new_vm().unwrap();
    vm.exchange(&Request::get("/a"), &mut origin("x"), false)
        .unwrap();
    vm.advance(Duration::from_secs(25)).unwrap();
    let hit = vm
        .exchange(&Request::get("/a"), &mut |_| None, false)
        .unwrap();
    assert_eq!(hit.header("age"), Some("25"));
    assert_eq!(hit.header("cache-status"), Some("edge-filter; hit; ttl=35"));
    vm.advance(Duration::from_secs(40)).unwrap();
    let stale = vm
        .exchange(&Request::get("/a"), &mut origin("y"), false)
        .unwrap();
    assert_eq!(stale.text(), "y");
    assert!(stale.header("cache-status").unwrap().contains("fwd=stale"));
}

#[test]
fn vary_variants_are_separate() {
    let h = harness("{}");
    let mut vm = h.new_vm().unwrap();
    let mut up = |m: &proxy_wasm_harness::Message| {
        let lang = m.header("accept-language").unwrap_or("none").to_string();
        Some(
            Response::ok(&format!("in {lang}"))
                .header("cache-control", "max-age=60")
                .header("vary", "accept-language"),
        )
    };
    let en = Request::get("/v").header("accept-language", "en");
    let de = Request::get("/v").header("accept-language", "de");
    assert_eq!(vm.exchange(&en, &mut up, false).unwrap().text(), "in en");
    let de1 = vm.exchange(&de, &mut up, false).unwrap();
    assert_eq!(de1.text(), "in de");
    assert!(de1
        .header("cache-status")
        .unwrap()
        .contains("fwd=vary-miss"));
    let en2 = vm.exchange(&en, &mut |_| None, false).unwrap();
    assert_eq!(en2.text(), "in en");
    assert!(en2.header("cache-status").unwrap().contains("hit"));
    let de2 = vm.exchange(&de, &mut |_| None, false).unwrap();
    assert_eq!(de2.text(), "in de");
}

#[test]
fn health_endpoints_and_readiness_follow_the_upstream_check() {
    let h = Harness::from_file(wasm())
        .vm_id("edge-filter")
        .plugin_config(r#"{"health":{"check_period_ms":1000,"upstream_failure":"fail"}}"#)
        .cluster("upstream", |req| {
            assert!(req.headers.iter().any(|(k, v)| k == b":path" && v == b"/"));
            CallReply::Respond {
                response: HttpCallResponse::new(200, "ok"),
                delay: Duration::from_millis(3),
            }
        })
        .build()
        .unwrap();
    let mut vm = h.new_vm().unwrap();
    assert_eq!(vm.tick_period(), Some(Duration::from_secs(1)));
    let live = vm
        .exchange(&Request::get("/healthz"), &mut |_| None, false)
        .unwrap();
    assert_eq!(live.status(), Some(200));
    assert_eq!(live.header("content-type"), Some("application/health+json"));
    assert!(
        live.text().contains("\"status\":\"pass\""),
        "{}",
        live.text()
    );
    // No check has run yet: not ready.
    let ready = vm
        .exchange(&Request::get("/readyz"), &mut |_| None, false)
        .unwrap();
    assert_eq!(ready.status(), Some(503), "{}", ready.text());
    // The first tick sends the check; its answer arrives 3 ms later.
    vm.advance(Duration::from_millis(1010)).unwrap();
    assert_eq!(h.shared().calls().len(), 1);
    let ready = vm
        .exchange(&Request::get("/readyz"), &mut |_| None, false)
        .unwrap();
    assert_eq!(ready.status(), Some(200), "{}", ready.text());
    assert!(ready.text().contains("upstream answered 200"));
    assert!(
        ready.text().contains("\"observedValue\":3"),
        "{}",
        ready.text()
    );
    assert_eq!(h.metric("edge_filter_upstream_ready"), Some(1));
    assert_eq!(
        h.metric("edge_filter_health_requests_total.probe.readiness.status.pass"),
        Some(1)
    );
}

#[test]
fn two_vms_share_the_cache_like_envoy_workers() {
    let h = harness("{}");
    let mut w1 = h.new_vm().unwrap();
    let mut w2 = h.new_vm().unwrap();
    w1.exchange(&Request::get("/shared"), &mut origin("one"), false)
        .unwrap();
    let hit = w2
        .exchange(&Request::get("/shared"), &mut |_| None, false)
        .unwrap();
    assert_eq!(hit.text(), "one");
    assert_eq!(h.metric("edge_filter_cache_stores_total"), Some(1));
    assert_eq!(
        h.metric("edge_filter_requests_total.cache_result.hit.status_class.2xx"),
        Some(1)
    );
    // Interleaved streams in both VMs.
    let a = w1.open_stream().unwrap();
    let b = w2.open_stream().unwrap();
    let req = Request::get("/inter").header("x", "1").header_list();
    w1.stream(a).request_headers(req.clone(), true).unwrap();
    w2.stream(b).request_headers(req, true).unwrap();
    let resp = vec![
        (":status".to_string(), "200".to_string()),
        ("cache-control".to_string(), "max-age=9".to_string()),
        ("content-length".to_string(), "2".to_string()),
    ];
    w2.stream(b).response_headers(resp.clone(), false).unwrap();
    w1.stream(a).response_headers(resp, false).unwrap();
    w1.stream(a).response_body(b"w1", true).unwrap();
    w2.stream(b).response_body(b"w2", true).unwrap();
    w1.finish_stream(a).unwrap();
    w2.finish_stream(b).unwrap();
    // The later store replaces the earlier one.
    let mut w3 = h.new_vm().unwrap();
    let hit = w3
        .exchange(&Request::get("/inter"), &mut |_| None, false)
        .unwrap();
    assert_eq!(hit.text(), "w2");
}

#[test]
fn bad_configuration_is_refused() {
    let err = Harness::from_file(wasm())
        .plugin_config(r#"{"cache":{"max_entries":"lots"}}"#)
        .build()
        .unwrap()
        .new_vm()
        .err()
        .expect("on_configure returns false");
    assert!(
        matches!(err, proxy_wasm_harness::Error::ConfigureFailed),
        "{err}"
    );
}

#[test]
fn streaming_body_is_not_delayed() {
    let h = harness("{}");
    let mut vm = h.new_vm().unwrap();
    let mut s = vm.http_stream().unwrap();
    s.request_headers(Request::get("/big").header_list(), true)
        .unwrap();
    s.response_headers(
        vec![
            (":status".into(), "200".into()),
            ("cache-control".into(), "max-age=60".into()),
        ],
        false,
    )
    .unwrap();
    for i in 0..4 {
        let a = s.response_body(&[b'a' + i; 1000], i == 3).unwrap();
        assert_eq!(a, proxy_wasm_harness::Action::Continue);
        // Each chunk reaches the client as it passes.
        assert_eq!(s.client_response().body.len(), 1000 * (i as usize + 1));
    }
    s.finish().unwrap();
    let hit = vm
        .exchange(&Request::get("/big"), &mut |_| None, false)
        .unwrap();
    assert_eq!(hit.client.body.len(), 4000);
}

/// Guest work (fuel, about one unit per Wasm instruction) of a stored miss and of a hit:
/// the store is sharded, so neither may grow with `max_entries`.
#[test]
fn guest_work_does_not_grow_with_max_entries() {
    let body = "x".repeat(1024);
    let mut figures = Vec::new();
    for entries in [4096u32, 1_000_000] {
        let config = format!(
            r#"{{"cache": {{"max_entries": {entries}, "max_total_bytes": {}}}}}"#,
            u64::from(entries) * 2048
        );
        let h = Harness::from_file(wasm())
            .vm_id("edge-filter")
            .plugin_config(config.as_str())
            .fuel(u64::MAX / 2)
            .build()
            .unwrap();
        let mut vm = h.new_vm().unwrap();
        let mut origin = origin(&body);
        // Warm up: the first requests pay for one-time work.
        for i in 0..20 {
            let r = Request::get(&format!("/warm/{i}"));
            vm.exchange(&r, &mut origin, false).unwrap();
            vm.forget_finished();
        }
        let before = vm.fuel_consumed();
        for i in 0..200 {
            let r = Request::get(&format!("/miss/{i}"));
            let ex = vm.exchange(&r, &mut origin, false).unwrap();
            assert!(ex.client.header("cache-status").unwrap().contains("stored"));
            vm.forget_finished();
        }
        let miss = (vm.fuel_consumed() - before) / 200;
        let before = vm.fuel_consumed();
        for i in 0..200 {
            let r = Request::get(&format!("/miss/{i}"));
            let ex = vm.exchange(&r, &mut |_| None, false).unwrap();
            assert_eq!(ex.client.body.len(), 1024);
            vm.forget_finished();
        }
        let hit = (vm.fuel_consumed() - before) / 200;
        eprintln!("max_entries {entries}: stored miss {miss} fuel, hit {hit} fuel");
        figures.push((miss, hit));
    }
    let ((m1, h1), (m2, h2)) = (figures[0], figures[1]);
    assert!(
        m2 < m1 + m1 / 4,
        "stored miss: {m1} at 4096, {m2} at 1,000,000"
    );
    assert!(h2 < h1 + h1 / 4, "hit: {h1} at 4096, {h2} at 1,000,000");
}
