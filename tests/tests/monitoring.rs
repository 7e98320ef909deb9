//! monitoring/ against the real thing: a real Prometheus (Debian's package) on 127.0.0.1
//! scrapes a real Envoy running the filter, with the shipped scrape configuration and rules,
//! while this test drives hits, misses, uncacheable responses, errors and then a readiness
//! failure. Every rule expression and every query of the Grafana dashboard must then return
//! data through Prometheus's HTTP API, and the readiness alert must fire.
//!
//! What the test changes in the shipped files, and why (everything else is used as is):
//! - prometheus.yml: 1 s scrape and evaluation intervals; the static job's target becomes
//!   this Envoy's admin address; each `kubernetes_sd_configs` becomes `file_sd_configs` with
//!   pods described by the same `__meta_kubernetes_*` labels Kubernetes discovery would set
//!   (Debian's Prometheus has no Kubernetes discovery, and there is no cluster here), so the
//!   Kubernetes jobs' relabelling runs for real on them: the gateway pod and the Istio pod
//!   that should be scraped point at this Envoy, the others must be dropped;
//! - rules: every `for:` becomes 2 s, so alerts fire within the test. The real durations are
//!   covered by `promtool test rules` (monitoring/tests/);
//! - dashboard: the variables take the values in monitoring/dashboard-check/variables.json.

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use edge_filter_e2e::envoy::repo_root;
use edge_filter_e2e::{
    http, nginx, poll, Envoy, Nginx, NginxConf, PrometheusServer, Reply, Upstream,
};
use serde_json::Value;

/// A small cache, so that it fills up and evicts within seconds; fast readiness checks.
const PLUGIN_CONFIG: &str = r#"{
  "cache": {"max_entries": 16, "max_total_bytes": 65536, "max_entry_bytes": 16384},
  "health": {"check_period_ms": 200, "check_timeout_ms": 500}
}"#;

/// The simulated Kubernetes pods that are scraped; the relabelling must carry these through.
const GATEWAY_NAMESPACE: &str = "edge-test";
const GATEWAY_POD: &str = "edge-0";
const ISTIO_NAMESPACE: &str = "shop";
const ISTIO_POD: &str = "shop-0";

/// The scrape jobs of monitoring/prometheus.yml.
const JOBS: [&str; 4] = [
    "edge-filter",
    "edge-filter-istio",
    "edge-filter-local",
    "edge-filter-nginx",
];

/// The jobs that scrape Envoy (the rest scrape nginx, which has no listener counters of
/// Envoy's kind for the "requests the filter did not see" rule).
const ENVOY_JOBS: usize = 3;

/// The whole test is bounded by this, whatever Prometheus or Envoy do.
const TEST_BUDGET: Duration = Duration::from_secs(120);

fn monitoring_dir() -> PathBuf {
    repo_root().join("monitoring")
}

/// Replaces the one occurrence of `from` (anything else means the shipped file changed
/// shape and this test would no longer exercise it).
fn replace_once(text: &str, from: &str, to: &str, what: &str) -> String {
    let n = text.matches(from).count();
    assert_eq!(n, 1, "{what}: expected exactly one {from:?}, found {n}");
    text.replacen(from, to, 1)
}

/// The shipped monitoring/prometheus.yml, for a 1 s scrape of `admin` (Envoy) and
/// `nginx_metrics` (nginx's `proxy_wasm_metrics` server), with Kubernetes discovery
/// replaced by file discovery of `pods.json`.
fn render_prometheus_config(shipped: &str, admin: SocketAddr, nginx_metrics: SocketAddr) -> String {
    let what = "monitoring/prometheus.yml";
    let text = replace_once(shipped, "scrape_interval: 15s", "scrape_interval: 1s", what);
    let text = replace_once(
        &text,
        "evaluation_interval: 15s",
        "evaluation_interval: 1s",
        what,
    );
    let text = replace_once(
        &text,
        "targets: [\"127.0.0.1:9901\"]",
        &format!("targets: [\"{admin}\"]"),
        what,
    );
    let text = replace_once(
        &text,
        "targets: [\"127.0.0.1:9145\"]",
        &format!("targets: [\"{nginx_metrics}\"]"),
        what,
    );
    let k8s = "    kubernetes_sd_configs:\n      - role: pod\n";
    assert_eq!(text.matches(k8s).count(), 2, "{what}: two Kubernetes jobs");
    let text = text.replace(k8s, "    file_sd_configs:\n      - files: [pods.json]\n");
    assert!(
        !text.contains("kubernetes_sd"),
        "{what}: other Kubernetes discovery"
    );
    text
}

/// Pods as Kubernetes pod discovery describes them, one target per declared container port.
/// Two are to be scraped and point at this Envoy's admin: the gateway's `metrics` port and
/// an Istio proxy's `http-envoy-prom` port. The rest must be dropped.
fn pods_json(admin: SocketAddr) -> String {
    fn target(
        address: String,
        namespace: &str,
        pod: &str,
        phase: &str,
        port_name: &str,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
    ) -> Value {
        let port = address.rsplit_once(':').map_or("", |(_, p)| p).to_string();
        let mut meta = serde_json::Map::new();
        let mut put = |k: String, v: &str| meta.insert(k, Value::from(v));
        put("__meta_kubernetes_namespace".into(), namespace);
        put("__meta_kubernetes_pod_name".into(), pod);
        put("__meta_kubernetes_pod_ip".into(), "127.0.0.1");
        put("__meta_kubernetes_pod_phase".into(), phase);
        put(
            "__meta_kubernetes_pod_container_port_name".into(),
            port_name,
        );
        put("__meta_kubernetes_pod_container_port_number".into(), &port);
        for (k, v) in labels {
            put(format!("__meta_kubernetes_pod_label_{k}"), v);
        }
        for (k, v) in annotations {
            put(format!("__meta_kubernetes_pod_annotation_{k}"), v);
        }
        serde_json::json!({"targets": [address], "labels": meta})
    }
    let admin = admin.to_string();
    let gateway = [("app_kubernetes_io_name", "edge-filter")];
    let scrape = [("prometheus_io_scrape", "true")];
    let istio = [("edge_filter_io_cache", "enabled"), ("app", "shop")];
    let (ns, pod) = (GATEWAY_NAMESPACE, GATEWAY_POD);
    serde_json::to_string_pretty(&serde_json::json!([
        // Scraped by job edge-filter.
        target(
            admin.clone(),
            ns,
            pod,
            "Running",
            "metrics",
            &gateway,
            &scrape
        ),
        // The gateway's traffic port, a pending gateway pod, another application's metrics.
        target(
            "127.0.0.1:1".into(),
            ns,
            pod,
            "Running",
            "http",
            &gateway,
            &scrape
        ),
        target(
            "127.0.0.1:2".into(),
            ns,
            "edge-1",
            "Pending",
            "metrics",
            &gateway,
            &scrape
        ),
        target(
            "127.0.0.1:3".into(),
            ns,
            "other-0",
            "Running",
            "metrics",
            &[("app_kubernetes_io_name", "other")],
            &scrape
        ),
        // Scraped by job edge-filter-istio.
        target(
            admin,
            ISTIO_NAMESPACE,
            ISTIO_POD,
            "Running",
            "http-envoy-prom",
            &istio,
            &[]
        ),
        // A proxy of a workload that does not run the filter.
        target(
            "127.0.0.1:4".into(),
            ISTIO_NAMESPACE,
            "cart-0",
            "Running",
            "http-envoy-prom",
            &[("app", "cart")],
            &[]
        ),
    ]))
    .unwrap()
}

/// A shipped rule file with every `for:` set to `for`; returns the text and how many
/// alerts it has.
fn shorten_for(text: &str, to: &str) -> (String, usize) {
    let alerts = text
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    let mut fors = 0;
    let out: Vec<String> = text
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for:") {
            Some(_) => {
                fors += 1;
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}for: {to}")
            }
            None => l.to_string(),
        })
        .collect();
    assert_eq!(fors, alerts, "every alert must have a `for:`");
    (out.join("\n") + "\n", alerts)
}

/// `expr` with `bool` after every comparison operator, so that it returns 0 or 1 for every
/// series it compares instead of dropping the series where the condition does not hold. An
/// alert expression that is quiet returns nothing, exactly like one that names a metric that
/// does not exist; in `bool` form only the second returns nothing. Label matchers (inside
/// braces) and strings are left alone.
fn bool_form(expr: &str) -> String {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::with_capacity(expr.len() + 32);
    let mut braces = 0usize;
    let mut quote: Option<char> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if let Some(q) = quote {
            out.push(c);
            if c == '\\' {
                if let Some(n) = next {
                    out.push(n);
                    i += 1;
                }
            } else if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' => braces += 1,
            '}' => braces = braces.saturating_sub(1),
            _ => {}
        }
        let op = if braces > 0 {
            None
        } else {
            match (c, next) {
                ('=', Some('=')) | ('!', Some('=')) | ('>', Some('=')) | ('<', Some('=')) => {
                    Some(2)
                }
                ('>', _) | ('<', _) => Some(1),
                _ => None,
            }
        };
        match op {
            Some(len) => {
                out.extend(&chars[i..i + len]);
                i += len;
                let rest: String = chars[i..].iter().collect();
                if !rest.trim_start().starts_with("bool") {
                    out.push_str(" bool");
                }
            }
            None => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Every query of the dashboard: `(where, expr)` for panel targets (rows included),
/// annotations, and the selectors of `label_values(...)` variables.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            walk(
                p.get("panels").and_then(Value::as_array).map_or(&[], |v| v),
                out,
            );
            for t in p
                .get("targets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let title = p.get("title").and_then(Value::as_str).unwrap_or("?");
                let refid = t.get("refId").and_then(Value::as_str).unwrap_or("?");
                let expr = t.get("expr").and_then(Value::as_str);
                let expr = expr.unwrap_or_else(|| panic!("panel {title:?} {refid}: no expr"));
                out.push((format!("panel {title:?} query {refid}"), expr.to_string()));
            }
        }
    }
    let mut out = Vec::new();
    walk(
        dashboard
            .get("panels")
            .and_then(Value::as_array)
            .map_or(&[], |v| v),
        &mut out,
    );
    for a in dashboard
        .pointer("/annotations/list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(expr) = a.pointer("/target/expr").and_then(Value::as_str) {
            let name = a.get("name").and_then(Value::as_str).unwrap_or("?");
            out.push((format!("annotation {name:?}"), expr.to_string()));
        }
    }
    for v in dashboard
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v.get("type").and_then(Value::as_str) == Some("query"))
    {
        let name = v.get("name").and_then(Value::as_str).unwrap_or("?");
        let q = v
            .pointer("/query/query")
            .or_else(|| v.get("query"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let selector = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(','))
            .map(|(sel, _label)| sel.trim().to_string())
            .unwrap_or_else(|| panic!("variable {name}: expected label_values(<sel>, <label>)"));
        out.push((format!("variable {name:?}"), selector));
    }
    out
}

/// Replaces `$name` and `${name}` by the test values of the dashboard's variables.
fn substitute(expr: &str, vars: &serde_json::Map<String, Value>) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(inner) => {
                let end = inner.find('}').expect("unclosed ${");
                (&inner[..end], end + 2)
            }
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        let value = vars
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no test value for ${name} in {expr}"));
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Background requests through Envoy until stopped (or the budget runs out): hits on a hot
/// set, misses that fill and evict the small cache, uncacheable responses, 5xx, probes.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(listener: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), sent.clone());
        let handle = thread::spawn(move || {
            let started = Instant::now();
            let mut i: u64 = 0;
            while !s.load(Ordering::SeqCst) && started.elapsed() < TEST_BUDGET {
                let mut paths = vec![
                    format!("/hot/{}", i % 4),
                    format!("/cold/{i}"),
                    "/nostore".to_string(),
                ];
                if i % 4 == 0 {
                    paths.push("/err".to_string());
                }
                if i % 10 == 0 {
                    paths.push("/healthz".to_string());
                    paths.push("/readyz".to_string());
                }
                for p in &paths {
                    // Failures are part of the scenario (the upstream goes away).
                    let _ = http::send(
                        listener,
                        "GET",
                        p,
                        &[("user-agent", "monitoring-test")],
                        b"",
                    );
                    n.fetch_add(1, Ordering::SeqCst);
                }
                i += 1;
                thread::sleep(Duration::from_millis(40));
            }
        });
        Traffic {
            stop,
            sent,
            handle: Some(handle),
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// `(job, state)` of each active alert called `name`.
fn active_alerts(prom: &PrometheusServer, name: &str) -> Vec<(String, String)> {
    prom.alerts()
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter(|a| a.label("alertname") == name)
        .map(|a| (a.label("job").to_string(), a.state))
        .collect()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn prometheus_scrapes_envoy_and_every_rule_and_panel_has_data() {
    let started = Instant::now();
    let mon = monitoring_dir();
    let body = "x".repeat(4000);
    let mut up = Upstream::origin(move |req| match req.path.as_str() {
        p if p.starts_with("/hot/") || p.starts_with("/cold/") => {
            Reply::text(body.clone()).header("Cache-Control", "max-age=300")
        }
        "/nostore" => Reply::text("fresh every time").header("Cache-Control", "no-store"),
        "/err" => Reply::new(500).body("upstream failure"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), PLUGIN_CONFIG);
    let traffic = Traffic::start(envoy.listener_addr());
    // The same filter in the stock nginx (the shipped nginx.conf), scraped by the
    // edge-filter-nginx job: the rules and the dashboard must work for it too.
    nginx::module_path().unwrap_or_else(|e| panic!("{e}"));
    let nginx = Nginx::try_start(up.port(), &NginxConf::new(2, PLUGIN_CONFIG))
        .unwrap_or_else(|e| panic!("{e}"));
    let nginx_traffic = Traffic::start(nginx.listener_addr());

    // --- Prometheus with the shipped configuration and rules ------------------------------
    let prepared = PrometheusServer::prepare().unwrap_or_else(|e| panic!("{e}"));
    let shipped = read(&mon.join("prometheus.yml"));
    prepared
        .write(
            "prometheus.yml",
            &render_prometheus_config(&shipped, envoy.admin_addr(), nginx.metrics_addr()),
        )
        .unwrap();
    prepared
        .write("pods.json", &pods_json(envoy.admin_addr()))
        .unwrap();
    let mut rule_count = 0;
    let mut alert_count = 0;
    for entry in fs::read_dir(mon.join("rules")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yml") {
            continue;
        }
        let text = read(&path);
        rule_count += text
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                t.starts_with("- alert:") || t.starts_with("- record:")
            })
            .count();
        let (short, alerts) = shorten_for(&text, "2s");
        alert_count += alerts;
        let name = path.file_name().unwrap().to_str().unwrap();
        prepared.write(&format!("rules/{name}"), &short).unwrap();
    }
    assert!(
        rule_count > 20 && alert_count >= 10,
        "rules: {rule_count}, alerts: {alert_count}"
    );
    let prom = PrometheusServer::start(prepared).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "monitoring: Envoy, nginx and Prometheus ({}) up after {:?}",
        prom.addr(),
        started.elapsed()
    );

    // --- three jobs scrape this Envoy, the Kubernetes ones through their relabelling; ----
    // --- one scrapes nginx -----------------------------------------------------------------
    let (active, dropped) = poll(Duration::from_secs(20), Duration::from_millis(250), || {
        let (active, dropped) = prom.targets().ok()?;
        let up = active
            .iter()
            .filter(|t| t.get("health").and_then(Value::as_str) == Some("up"))
            .count();
        (up == JOBS.len()).then_some((active, dropped))
    })
    .unwrap_or_else(|| panic!("four healthy targets never showed: {:?}", prom.targets()));
    assert_eq!(active.len(), JOBS.len(), "active targets: {active:?}");
    let target_of = |job: &str| {
        active
            .iter()
            .find(|t| t.pointer("/labels/job").and_then(Value::as_str) == Some(job))
            .unwrap_or_else(|| panic!("no target of job {job}: {active:?}"))
    };
    let admin = envoy.admin_addr();
    for (job, namespace, pod, app) in [
        ("edge-filter", GATEWAY_NAMESPACE, GATEWAY_POD, "edge-filter"),
        ("edge-filter-istio", ISTIO_NAMESPACE, ISTIO_POD, "shop"),
    ] {
        let t = target_of(job);
        let label = |name: &str| {
            t.pointer(&format!("/labels/{name}"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(label("namespace"), namespace, "{t}");
        assert_eq!(label("pod"), pod, "{t}");
        assert_eq!(label("instance"), format!("{pod}:{}", admin.port()), "{t}");
        assert_eq!(label("app"), app, "{t}");
        assert_eq!(
            t.get("scrapeUrl").and_then(Value::as_str),
            Some(format!("http://{admin}/stats/prometheus").as_str()),
            "{t}"
        );
    }
    target_of("edge-filter-local");
    assert_eq!(
        target_of("edge-filter-nginx")
            .get("scrapeUrl")
            .and_then(Value::as_str),
        Some(format!("http://{}/metrics", nginx.metrics_addr()).as_str())
    );
    // Each Kubernetes job sees all six pod targets and keeps one.
    assert_eq!(dropped.len(), 2 * 5, "dropped targets: {dropped:?}");

    // --- wait for enough samples: rates need two, histograms need Envoy's stats flush ----
    poll(Duration::from_secs(30), Duration::from_millis(500), || {
        let ok = |q: &str| {
            prom.query(q)
                .map(|v| v.len() == JOBS.len())
                .unwrap_or(false)
        };
        (ok("count_over_time(edge_filter_cache_stores_total[1m]) >= 4")
            && ok("edge_filter_request_cpu_time_microseconds_count > 0")
            && ok("edge_filter_upstream_response_time_milliseconds_count > 0")
            && ok("instance:edge_filter_requests:rate5m > 0"))
        .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "Prometheus never had the filter's samples; log:\n{}",
            prom.log()
        )
    });
    assert!(
        active_alerts(&prom, "EdgeFilterUpstreamNotReady").is_empty(),
        "readiness alert active while the upstream is up"
    );

    // --- a readiness failure: the upstream goes away -------------------------------------
    up.stop();
    let stopped_at = Instant::now();
    let fired = poll(Duration::from_secs(30), Duration::from_millis(250), || {
        let alerts = active_alerts(&prom, "EdgeFilterUpstreamNotReady");
        let firing: BTreeSet<String> = alerts
            .into_iter()
            .filter(|(_, state)| state == "firing")
            .map(|(job, _)| job)
            .collect();
        (firing.len() == JOBS.len()).then_some(firing)
    })
    .unwrap_or_else(|| {
        panic!(
            "EdgeFilterUpstreamNotReady did not fire for every job within 30 s: {:?}",
            prom.alerts()
        )
    });
    eprintln!(
        "monitoring: EdgeFilterUpstreamNotReady firing for {fired:?} {:?} after the upstream stopped",
        stopped_at.elapsed()
    );

    // --- every rule: healthy, and its expression returns data ----------------------------
    let rules = prom.rules().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rules.len(), rule_count, "rules loaded by Prometheus");
    let mut failures = Vec::new();
    for rule in &rules {
        let name = rule.get("name").and_then(Value::as_str).unwrap_or("?");
        let kind = rule.get("type").and_then(Value::as_str).unwrap_or("?");
        let query = rule.get("query").and_then(Value::as_str).unwrap_or("");
        if rule.get("health").and_then(Value::as_str) != Some("ok") {
            failures.push(format!("{kind} rule {name}: health {rule}"));
            continue;
        }
        let expr = if kind == "alerting" {
            bool_form(query)
        } else {
            query.to_string()
        };
        match prom.query(&expr) {
            Ok(samples) if samples.iter().any(|s| s.value.is_finite()) => {
                eprintln!(
                    "  {kind:9} {name}: {} series, e.g. {}",
                    samples.len(),
                    samples[0].value
                )
            }
            Ok(samples) => failures.push(format!(
                "{kind} rule {name}: no finite sample ({samples:?}) for {expr}"
            )),
            Err(e) => failures.push(format!("{kind} rule {name}: {e}")),
        }
    }

    // --- every dashboard query returns data ------------------------------------------------
    let dashboard: Value =
        serde_json::from_str(&read(&mon.join("grafana/dashboards/edge-filter.json"))).unwrap();
    let vars: Value =
        serde_json::from_str(&read(&mon.join("dashboard-check/variables.json"))).unwrap();
    let vars = vars.as_object().unwrap();
    let queries = dashboard_queries(&dashboard);
    assert!(
        queries.len() >= 30,
        "only {} dashboard queries",
        queries.len()
    );
    for (place, expr) in &queries {
        let expr = substitute(expr, vars);
        match prom.query(&expr) {
            Ok(samples) if samples.iter().any(|s| s.value.is_finite()) => {
                eprintln!("  dashboard {place}: {} series", samples.len())
            }
            Ok(samples) => failures.push(format!(
                "dashboard {place}: no finite sample ({samples:?}) for {expr}"
            )),
            Err(e) => failures.push(format!("dashboard {place}: {e}")),
        }
    }
    // The namespace variable lists the namespaces the Kubernetes jobs' relabelling set.
    let namespaces = prom
        .api("/api/v1/label/namespace/values?match[]=edge_filter_requests_total")
        .unwrap_or_else(|e| panic!("{e}"));
    // (sorted, as Prometheus returns label values)
    assert_eq!(
        namespaces,
        serde_json::json!([GATEWAY_NAMESPACE, ISTIO_NAMESPACE])
    );
    assert!(
        failures.is_empty(),
        "{} of {} rule expressions and dashboard queries failed:\n{}",
        failures.len(),
        rules.len() + queries.len(),
        failures.join("\n")
    );

    // --- what the filter's own premises say about this run -------------------------------
    // The filter saw every request Envoy completed on the edge listener (nginx has no
    // such counter: the rule has no series for it).
    let unseen = prom
        .query("instance:edge_filter_unseen_requests:ratio_rate5m")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        unseen.len() == ENVOY_JOBS && unseen.iter().all(|s| s.value.abs() < 0.05),
        "requests the filter did not see: {unseen:?}"
    );
    for quiet in [
        "EdgeFilterBypassed",
        "EdgeFilterTargetDown",
        "EdgeFilterWasmVmCrashed",
        "EdgeFilterConfigRejected",
    ] {
        assert!(
            active_alerts(&prom, quiet).is_empty(),
            "{quiet} is active: {:?}",
            prom.alerts()
        );
    }
    let active: BTreeSet<String> = prom
        .alerts()
        .unwrap()
        .into_iter()
        .map(|a| format!("{} ({})", a.label("alertname"), a.state))
        .collect();
    eprintln!("monitoring: alerts active at the end: {active:?}");

    traffic_stop(traffic);
    traffic_stop(nginx_traffic);
    nginx.check_logs(&[]).unwrap_or_else(|e| panic!("{e}"));
    check_access_log(&envoy.access_log());
    eprintln!("monitoring: done in {:?}", started.elapsed());
    assert!(
        started.elapsed() < TEST_BUDGET,
        "took {:?}",
        started.elapsed()
    );
}

/// Stops the traffic and says how much was sent.
fn traffic_stop(traffic: Traffic) {
    let sent = traffic.sent();
    drop(traffic);
    eprintln!("monitoring: {sent} requests sent");
    assert!(sent > 100, "only {sent} requests sent");
}

/// The access log fields, as documented in monitoring/README.md ("Access log"): name and
/// which JSON types it may have.
const ACCESS_LOG_FIELDS: [(&str, &[&str]); 16] = [
    ("time", &["string"]),
    ("method", &["string"]),
    ("authority", &["string"]),
    ("path", &["string"]),
    ("protocol", &["string"]),
    ("status", &["number"]),
    ("cache_status", &["string", "null"]),
    ("upstream_time_ms", &["number", "null"]),
    ("duration_ms", &["number"]),
    ("bytes_received", &["number"]),
    ("bytes_sent", &["number"]),
    ("upstream_host", &["string", "null"]),
    ("flags", &["string"]),
    ("details", &["string"]),
    ("request_id", &["string", "null"]),
    ("user_agent", &["string", "null"]),
];

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every line is one JSON object with exactly the documented fields and types; hits carry
/// no upstream time, forwarded responses do.
fn check_access_log(log: &str) {
    let (mut hits, mut forwarded) = (0, 0);
    for line in log.lines() {
        let doc: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: access log line {line}"));
        let obj = doc
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {line}"));
        let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
        let documented: BTreeSet<&str> = ACCESS_LOG_FIELDS.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, documented, "fields of {line}");
        for (key, types) in ACCESS_LOG_FIELDS {
            let t = json_type(&obj[key]);
            assert!(types.contains(&t), "{key} is {t} in {line}");
        }
        // RFC 3339 UTC with milliseconds, e.g. 2026-11-29T00:12:50.201Z.
        let time = obj["time"].as_str().unwrap();
        assert!(
            time.len() == 24
                && time.as_bytes()[10] == b'T'
                && time.ends_with('Z')
                && time.as_bytes()[19] == b'.',
            "time {time}"
        );
        let cache_status = obj["cache_status"].as_str().unwrap_or("");
        if cache_status.starts_with("edge-filter; hit") {
            hits += 1;
            assert!(
                obj["upstream_time_ms"].is_null(),
                "a hit with an upstream time: {line}"
            );
            assert!(
                obj["upstream_host"].is_null(),
                "a hit with an upstream host: {line}"
            );
        } else if obj["details"] == "via_upstream" {
            forwarded += 1;
            assert!(
                obj["upstream_time_ms"].is_number(),
                "forwarded without an upstream time: {line}"
            );
            assert!(
                cache_status.starts_with("edge-filter; fwd="),
                "forwarded without the filter's decision: {line}"
            );
        }
    }
    assert!(
        hits > 10 && forwarded > 10,
        "hits {hits}, forwarded {forwarded}"
    );
}

#[test]
fn bool_form_turns_filters_into_comparisons() {
    assert_eq!(bool_form("up == 0"), "up == bool 0");
    assert_eq!(
        bool_form(r#"x{a!="b", c=~"d>e"} > 0.5 and y < bool 2"#),
        r#"x{a!="b", c=~"d>e"} > bool 0.5 and y < bool 2"#
    );
    assert_eq!(
        bool_form("rate(a[5m]) * 300 >= on (i) group_left b"),
        "rate(a[5m]) * 300 >= bool on (i) group_left b"
    );
    assert_eq!(bool_form("a <= 1 or b != 2"), "a <= bool 1 or b != bool 2");
    assert_eq!(bool_form("sum(x) / (y > 0)"), "sum(x) / (y > bool 0)");
}

#[test]
fn dashboard_variables_are_substituted() {
    let vars = serde_json::json!({"namespace": ".*", "__rate_interval": "1m"});
    let vars = vars.as_object().unwrap();
    assert_eq!(
        substitute(
            r#"rate(x{namespace=~"$namespace"}[${__rate_interval}])"#,
            vars
        ),
        r#"rate(x{namespace=~".*"}[1m])"#
    );
}

#[test]
fn shipped_prometheus_config_renders_for_the_test() {
    let shipped = read(&monitoring_dir().join("prometheus.yml"));
    let admin: SocketAddr = "127.0.0.1:4321".parse().unwrap();
    let nginx: SocketAddr = "127.0.0.1:4322".parse().unwrap();
    let out = render_prometheus_config(&shipped, admin, nginx);
    assert!(out.contains("scrape_interval: 1s"));
    assert!(out.contains("targets: [\"127.0.0.1:4321\"]"));
    assert!(out.contains("targets: [\"127.0.0.1:4322\"]"));
    assert!(out.contains("file_sd_configs:"));
    assert!(!out.contains("kubernetes_sd_configs"));
    let (short, alerts) = shorten_for(
        "  - alert: A\n    for: 5m\n  - alert: B\n    expr: x\n    for: 1h\n",
        "2s",
    );
    assert_eq!(alerts, 2);
    assert_eq!(
        short,
        "  - alert: A\n    for: 2s\n  - alert: B\n    expr: x\n    for: 2s\n"
    );
}

#[test]
fn grafana_provisioning_matches_the_dashboard() {
    let mon = monitoring_dir();
    let dashboard: Value =
        serde_json::from_str(&read(&mon.join("grafana/dashboards/edge-filter.json"))).unwrap();
    // The dashboard's data source variable defaults to the provisioned data source.
    let ds = dashboard
        .pointer("/templating/list/0")
        .filter(|v| v.get("type").and_then(Value::as_str) == Some("datasource"))
        .and_then(|v| v.pointer("/current/value"))
        .and_then(Value::as_str)
        .expect("the first variable is the data source");
    let datasources = read(&mon.join("grafana/provisioning/datasources/edge-filter.yml"));
    assert!(
        datasources.contains(&format!("uid: {ds}")),
        "provisioned data source uid is not {ds}"
    );
    // Every panel and query uses the variable, never a fixed data source.
    let text = serde_json::to_string(&dashboard).unwrap();
    assert!(!text.contains("\"uid\":\"prometheus\""));
    let dashboards = read(&mon.join("grafana/provisioning/dashboards/edge-filter.yml"));
    assert!(dashboards.contains("path: /var/lib/grafana/dashboards/edge-filter"));
}
