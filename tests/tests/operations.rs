//! Health endpoints, Prometheus metrics and configuration checking of the filter,
//! end to end in a real Envoy. Each test has its own Envoy and origin.

use std::time::Duration;

use edge_filter_e2e::{poll, Envoy, Exposition, Reply, Response, Upstream};
use serde_json::Value;

/// Health checks every 200 ms so readiness changes show within a second.
const FAST_HEALTH: &str = r#"{"health": {"check_period_ms": 200, "check_timeout_ms": 500}}"#;

fn health_json(r: &Response) -> Value {
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/health+json"),
        "content-type {ct:?} for a health response"
    );
    serde_json::from_str(&r.text()).unwrap_or_else(|e| panic!("{e} in health body {:?}", r.text()))
}

fn status_of(doc: &Value) -> &str {
    doc.get("status")
        .and_then(Value::as_str)
        .unwrap_or("<missing>")
}

/// Polls `/readyz` until it answers `want` (bounded); returns the last response.
fn wait_readyz(envoy: &Envoy, want: u16, timeout: Duration) -> Response {
    let mut last = None;
    poll(timeout, Duration::from_millis(100), || {
        let r = envoy.get("/readyz");
        let done = r.status == want;
        last = Some(r);
        done.then_some(())
    })
    .unwrap_or_else(|| {
        let r = last.as_ref().unwrap();
        panic!(
            "/readyz never answered {want} within {timeout:?}; last: {} {}",
            r.status,
            r.text()
        )
    });
    last.unwrap()
}

#[test]
fn healthz_is_answered_by_the_filter() {
    let up = Upstream::origin(|_| Reply::new(404));
    let envoy = Envoy::start(up.port(), "{}");
    let r = envoy.get("/healthz");
    assert_eq!(r.status, 200);
    let doc = health_json(&r);
    assert_eq!(status_of(&doc), "pass");
    assert_eq!(doc.get("version").and_then(Value::as_str), Some("0.1.0"));
    assert!(doc.get("releaseId").and_then(Value::as_str).is_some());
    let uptime = doc
        .pointer("/checks/uptime/0")
        .unwrap_or_else(|| panic!("no checks.uptime[0] in {doc:?}"));
    assert_eq!(
        uptime.get("componentType").and_then(Value::as_str),
        Some("system")
    );
    assert_eq!(
        uptime.get("observedUnit").and_then(Value::as_str),
        Some("s")
    );
    assert_eq!(uptime.get("status").and_then(Value::as_str), Some("pass"));
    let secs = uptime.get("observedValue").and_then(Value::as_f64);
    assert!(
        matches!(secs, Some(s) if (0.0..600.0).contains(&s)),
        "uptime {secs:?}"
    );
    assert_eq!(
        up.count("/healthz"),
        0,
        "/healthz must not reach the origin"
    );
}

#[test]
fn readyz_follows_the_upstream() {
    let mut up = Upstream::origin(|_| Reply::new(404));
    let envoy = Envoy::start(up.port(), FAST_HEALTH);

    let r = wait_readyz(&envoy, 200, Duration::from_secs(10));
    let doc = health_json(&r);
    assert!(
        matches!(status_of(&doc), "pass" | "warn"),
        "200 with status {}",
        status_of(&doc)
    );
    let checks = doc.get("checks").expect("checks");
    for key in [
        "upstream:responseTime",
        "cache:entries",
        "cache:bytes",
        "uptime",
    ] {
        assert!(
            checks.get(key).is_some(),
            "readyz lacks check {key}: {doc:?}"
        );
    }

    up.stop();
    let r = wait_readyz(&envoy, 503, Duration::from_secs(5));
    assert_eq!(status_of(&health_json(&r)), "fail");

    up.restart();
    let r = wait_readyz(&envoy, 200, Duration::from_secs(10));
    assert_eq!(status_of(&health_json(&r)), "pass");

    assert_eq!(up.count("/readyz"), 0, "/readyz must not reach the origin");
    assert!(up.count("/") >= 2, "the filter's health checks reach GET /");
}

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
            "health": {"check_period_ms": 200, "check_timeout_ms": 500}}"#,
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

#[test]
fn bad_config_is_refused_and_names_the_field() {
    let up = Upstream::origin(|_| Reply::new(404));
    for (config, field) in [
        (r#"{"cache": {"max_entries": "lots"}}"#, "max_entries"),
        (r#"{"nope": 1}"#, "nope"),
    ] {
        let failed = Envoy::expect_start_failure(up.port(), config, Duration::from_secs(30));
        assert!(!failed.became_ready, "Envoy started with {config}");
        let status = failed
            .status
            .unwrap_or_else(|| panic!("Envoy neither started nor exited with {config}"));
        assert!(!status.success(), "exit status {status} with {config}");
        let error_lines: Vec<&str> = failed
            .log
            .lines()
            .filter(|l| l.contains("[error]") || l.contains("[critical]"))
            .collect();
        assert!(
            error_lines.iter().any(|l| l.contains(field)),
            "no error line names `{field}` for {config}; errors:\n{}",
            error_lines.join("\n")
        );
    }
}
