//! The filter's whole metrics contract as Envoy exposes it (envoy.yaml's stats tags and
//! histogram buckets) and readiness under a full cache, end to end in a real Envoy. Each
//! test has its own Envoy and origin. /healthz, /readyz following the upstream, hit/miss
//! counts and a refused configuration are shared scenarios that nginx runs too
//! (src/scenarios.rs, tests/scenarios_*.rs).

use std::time::Duration;

use edge_filter_e2e::scenarios::{health_json, status_of, wait_readyz};
use edge_filter_e2e::{poll, Envoy, Exposition, Reply, Upstream};

/// Every metric of the contract, as named on /stats/prometheus (histograms by family).
const CONTRACT_METRICS: [(&str, &str); 14] = [
    ("edge_filter_requests_total", "counter"),
    ("edge_filter_cache_served_bytes_total", "counter"),
    ("edge_filter_upstream_received_bytes_total", "counter"),
    ("edge_filter_cache_stores_total", "counter"),
    ("edge_filter_cache_evictions_total", "counter"),
    ("edge_filter_config_failures_total", "counter"),
    ("edge_filter_health_requests_total", "counter"),
    ("edge_filter_cache_entries", "gauge"),
    ("edge_filter_cache_bytes", "gauge"),
    ("edge_filter_cache_capacity_bytes", "gauge"),
    ("edge_filter_cache_capacity_entries", "gauge"),
    ("edge_filter_upstream_ready", "gauge"),
    (
        "edge_filter_upstream_response_time_milliseconds",
        "histogram",
    ),
    ("edge_filter_request_cpu_time_microseconds", "histogram"),
];

#[test]
fn metrics_are_exposed_with_labels_and_exact_counts() {
    const BODY: &str = "metric body";
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/m" => Reply::text(BODY).header("Cache-Control", "max-age=60"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(
        up.port(),
        r#"{"cache": {"max_entries": 100, "max_total_bytes": 1000000, "max_entry_bytes": 100000},
            "health": {"check_period_ms": 200, "check_timeout_ms": 500, "upstream_failure": "fail"}}"#,
    );

    // Readiness: count what we saw, then compare with the counters.
    let (mut ready_pass, mut ready_fail) = (0, 0);
    poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let r = envoy.get("/readyz");
        match status_of(&health_json(&r)) {
            "pass" => ready_pass += 1,
            "fail" => ready_fail += 1,
            other => panic!("unexpected readiness status {other}"),
        }
        (r.status == 200).then_some(())
    })
    .expect("/readyz never passed");
    for _ in 0..2 {
        assert_eq!(envoy.get("/healthz").status, 200);
    }
    assert_eq!(envoy.get("/m").text(), BODY); // miss, stored
    for _ in 0..3 {
        assert_eq!(envoy.get("/m").text(), BODY); // hits
    }
    assert_eq!(up.count("/m"), 1);

    let m = envoy.metrics();
    let value = |name: &str, labels: &[(&str, &str)]| {
        m.value(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} on /stats/prometheus"))
    };

    for (name, kind) in CONTRACT_METRICS {
        assert_eq!(m.type_of(name), Some(kind), "# TYPE of {name}");
    }
    // Labels come from envoy.yaml's stats_tags: no dotted remains in any name.
    for s in &m.samples {
        if s.name.starts_with("edge_filter_") {
            for raw in ["_cache_result_", "_status_class_", "_probe_", "_status_"] {
                assert!(!s.name.contains(raw), "label left in the name: {s:?}");
            }
        }
    }
    for s in m.named("edge_filter_requests_total") {
        let result = s.label("cache_result").unwrap_or("");
        let class = s.label("status_class").unwrap_or("");
        assert!(
            ["hit", "miss", "stale", "bypass", "uncacheable"].contains(&result),
            "{s:?}"
        );
        assert!(
            ["1xx", "2xx", "3xx", "4xx", "5xx", "other"].contains(&class),
            "{s:?}"
        );
        assert_eq!(s.labels.len(), 2, "{s:?}");
    }
    let requests = |result| {
        value(
            "edge_filter_requests_total",
            &[("cache_result", result), ("status_class", "2xx")],
        )
    };
    assert_eq!(requests("hit"), 3.0);
    assert_eq!(requests("miss"), 1.0);

    let health = |probe, status| {
        m.value(
            "edge_filter_health_requests_total",
            &[("probe", probe), ("status", status)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(health("liveness", "pass"), 2.0);
    assert_eq!(health("readiness", "pass"), f64::from(ready_pass));
    assert_eq!(health("readiness", "fail"), f64::from(ready_fail));

    assert_eq!(value("edge_filter_cache_stores_total", &[]), 1.0);
    assert_eq!(value("edge_filter_cache_evictions_total", &[]), 0.0);
    assert_eq!(value("edge_filter_config_failures_total", &[]), 0.0);
    assert_eq!(value("edge_filter_cache_entries", &[]), 1.0);
    assert!(value("edge_filter_cache_bytes", &[]) >= BODY.len() as f64);
    assert_eq!(value("edge_filter_cache_capacity_bytes", &[]), 1_000_000.0);
    assert_eq!(value("edge_filter_cache_capacity_entries", &[]), 100.0);
    assert_eq!(value("edge_filter_upstream_ready", &[]), 1.0);
    assert!(value("edge_filter_cache_served_bytes_total", &[]) >= 3.0 * BODY.len() as f64);
    assert!(value("edge_filter_upstream_received_bytes_total", &[]) >= BODY.len() as f64);

    // Histograms are published at the stats flush (1 s in tests): poll a little.
    let flushed: Exposition = poll(Duration::from_secs(5), Duration::from_millis(250), || {
        let m = envoy.metrics();
        let ms = m.value("edge_filter_upstream_response_time_milliseconds_count", &[])?;
        let us = m.value("edge_filter_request_cpu_time_microseconds_count", &[])?;
        (ms >= 1.0 && us >= 4.0).then_some(m)
    })
    .expect("histograms never showed the requests");
    // The bucket layouts are the ones envoy.yaml sets: ms for latency, µs for CPU time.
    for (family, le) in [
        ("edge_filter_upstream_response_time_milliseconds", "2.5"),
        ("edge_filter_request_cpu_time_microseconds", "25"),
        ("edge_filter_request_cpu_time_microseconds", "250000"),
    ] {
        assert!(
            flushed
                .value(&format!("{family}_bucket"), &[("le", le)])
                .is_some(),
            "{family} has no le={le} bucket"
        );
    }
    for family in [
        "edge_filter_upstream_response_time_milliseconds",
        "edge_filter_request_cpu_time_microseconds",
    ] {
        let count = flushed.value(&format!("{family}_count"), &[]).unwrap();
        let inf = flushed.value(&format!("{family}_bucket"), &[("le", "+Inf")]);
        assert_eq!(inf, Some(count), "{family}: +Inf bucket != count");
    }
}

#[test]
fn a_full_cache_evicts_and_readiness_warns() {
    let up = Upstream::origin(|req| {
        Reply::text(format!("entry {}", req.path)).header("Cache-Control", "max-age=60")
    });
    let envoy = Envoy::start(
        up.port(),
        r#"{"cache": {"max_entries": 2},
            "health": {"check_period_ms": 200, "check_timeout_ms": 500}}"#,
    );
    wait_readyz(&envoy, 200, Duration::from_secs(10));
    for path in ["/e1", "/e2", "/e3"] {
        assert_eq!(envoy.get(path).text(), format!("entry {path}"));
    }
    let m = envoy.metrics();
    let value = |name: &str| m.value(name, &[]).unwrap_or_else(|| panic!("no {name}"));
    assert_eq!(value("edge_filter_cache_stores_total"), 3.0);
    assert!(
        value("edge_filter_cache_evictions_total") >= 1.0,
        "no eviction counted"
    );
    assert!(
        value("edge_filter_cache_entries") <= 2.0,
        "max_entries exceeded"
    );

    // Two entries of two is over the 0.9 warn ratio: ready, but warning.
    let r = envoy.get("/readyz");
    assert_eq!(r.status, 200);
    assert_eq!(status_of(&health_json(&r)), "warn");
    let warned = envoy.metrics().value(
        "edge_filter_health_requests_total",
        &[("probe", "readiness"), ("status", "warn")],
    );
    assert!(
        matches!(warned, Some(n) if n >= 1.0),
        "warn not counted: {warned:?}"
    );
}

/// Envoy 1.40 gives a Wasm filter no per-route configuration (it refuses a `Wasm` config in
/// `typed_per_filter_config`), but any filter can be disabled per route with the generic
/// `FilterConfig`. A route so marked bypasses the filter entirely; others keep the cache.
#[test]
fn a_route_can_disable_the_filter() {
    let up = Upstream::origin(|req| {
        Reply::text(format!("entry {}", req.path)).header("Cache-Control", "max-age=60")
    });
    let catch_all = "              - match: { prefix: \"/\" }\n";
    let disabled_route = r#"              - match: { prefix: "/uncached/" }
                route: { cluster: upstream, timeout: 15s }
                typed_per_filter_config:
                  envoy.filters.http.wasm:
                    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
                    disabled: true
"#;
    let edit = |yaml: &str| -> Result<String, String> {
        yaml.contains(catch_all)
            .then(|| yaml.replacen(catch_all, &format!("{disabled_route}{catch_all}"), 1))
            .ok_or_else(|| "no catch-all route in the shipped envoy.yaml".to_string())
    };
    let envoy = Envoy::try_start_edited(up.port(), "{}", &edit).unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..2 {
        let r = envoy.get("/uncached/a");
        assert_eq!(r.text(), "entry /uncached/a");
        assert_eq!(
            r.header("cache-status"),
            None,
            "the filter must not run here"
        );
    }
    assert_eq!(up.count("/uncached/a"), 2);
    for _ in 0..2 {
        assert!(envoy.get("/cached/a").header("cache-status").is_some());
    }
    assert_eq!(up.count("/cached/a"), 1, "other routes keep the cache");
}
