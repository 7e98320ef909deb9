//! Differential tests: each scenario is written once and run both through the harness
//! and through a real Envoy 1.40 loading the same edge-filter `.wasm`, in front of the
//! same origin logic. Status, headers (less those Envoy adds itself and date-like ones),
//! body and metric values must agree. Known, documented deviations are asserted as such.
//!
//! Scenarios that share a plugin configuration run against one Envoy (and one harness),
//! each on its own paths, so the whole file starts four Envoys.

use edge_filter_e2e::{BodyMode, Envoy, RecordedRequest, Reply, Upstream};
use proxy_wasm_harness::{CallReply, Harness, HttpCallResponse, Message, Request, Response, Vm};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// What the origin answers, from the request alone (both sides use this).
struct OriginReply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    chunks: Option<Vec<usize>>,
}

fn query(path: &str, key: &str) -> Option<String> {
    let q = path.split_once('?')?.1;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%20", " ").replace("%2C", ","))
    })
}

/// The origin: its answer is driven by the query (`cc`, `status`, `vary`, `cookie`,
/// `len`, `chunked`, `expires_in`, `cs`, `conn`, `etag`), so every scenario uses its own
/// URL and no origin state is needed.
fn origin(method: &str, path: &str, req_headers: &[(String, String)]) -> OriginReply {
    let status = query(path, "status")
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut headers = vec![("content-type".to_string(), "text/plain".to_string())];
    let mut add = |k: &str, v: String| headers.push((k.to_string(), v));
    if let Some(cc) = query(path, "cc") {
        add("cache-control", cc);
    }
    if let Some(v) = query(path, "vary") {
        add("vary", v);
    }
    if query(path, "cookie").is_some() {
        add("set-cookie", "session=1".into());
    }
    if let Some(cs) = query(path, "cs") {
        add("cache-status", cs);
    }
    if let Some(e) = query(path, "etag") {
        add("etag", format!("\"{e}\""));
    }
    if let Some(secs) = query(path, "expires_in").and_then(|s| s.parse::<u64>().ok()) {
        add(
            "expires",
            httpdate(SystemTime::now() + Duration::from_secs(secs)),
        );
    }
    if query(path, "conn").is_some() {
        add("connection", "x-hop".into());
        add("x-hop", "secret".into());
    }
    add("x-origin", "yes".into());
    let lang = req_headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("accept-language"))
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "none".into());
    let mut body = match query(path, "len").and_then(|s| s.parse::<usize>().ok()) {
        Some(n) => (0..n).map(|i| b'a' + (i % 26) as u8).collect(),
        None => format!(
            "{} {} lang={lang}",
            method_word(method),
            path.split('?').next().unwrap_or("")
        )
        .into_bytes(),
    };
    if status == 204 || status == 304 {
        body.clear();
    }
    let chunks = query(path, "chunked").map(|c| {
        c.split(',')
            .filter_map(|n| n.parse().ok())
            .collect::<Vec<usize>>()
    });
    OriginReply {
        status,
        headers,
        body,
        chunks,
    }
}

fn method_word(m: &str) -> &str {
    if m == "HEAD" {
        "GET"
    } else {
        m
    }
}

/// RFC 9110 IMF-fixdate.
fn httpdate(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

/// One request of a scenario.
struct Step {
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
    /// Wait this long first (real time in Envoy, virtual in the harness).
    wait_ms: u64,
}

fn get(path: impl Into<String>) -> Step {
    Step {
        method: "GET",
        path: path.into(),
        headers: Vec::new(),
        wait_ms: 0,
    }
}

impl Step {
    fn method(mut self, m: &'static str) -> Step {
        self.method = m;
        self
    }
    fn header(mut self, k: &'static str, v: &'static str) -> Step {
        self.headers.push((k, v));
        self
    }
    fn wait(mut self, ms: u64) -> Step {
        self.wait_ms = ms;
        self
    }
}

struct Scenario {
    name: &'static str,
    steps: Vec<Step>,
}

fn sc(name: &'static str, steps: Vec<Step>) -> Scenario {
    Scenario { name, steps }
}

/// A response reduced to what both sides must agree on.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    age: Option<u64>,
    ttl: Option<u64>,
}

/// Headers Envoy's connection manager adds or rewrites itself, outside the filter.
const ENVOY_OWN: &[&str] = &[
    "date",
    "server",
    "x-envoy-upstream-service-time",
    "transfer-encoding",
    "connection",
    "keep-alive",
];

fn seen(status: u16, headers: Vec<(String, String)>, body: &[u8], health: bool) -> Seen {
    let mut age = None;
    let mut ttl = None;
    let mut hs: Vec<(String, String)> = headers
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .filter(|(k, _)| !k.starts_with(':') && !ENVOY_OWN.contains(&k.as_str()))
        .filter_map(|(k, v)| {
            if k == "age" {
                // Whole seconds of real time in Envoy, virtual in the harness: compared
                // with a tolerance of one second below.
                age = v.parse().ok();
                return None;
            }
            if k == "cache-status" {
                if let Some(i) = v.find("ttl=") {
                    let rest = &v[i + 4..];
                    let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    ttl = n.parse().ok();
                    return Some((k, format!("{}ttl=*{}", &v[..i], &rest[n.len()..])));
                }
            }
            Some((k, v))
        })
        .collect();
    hs.sort();
    let mut body = String::from_utf8_lossy(body).into_owned();
    if health {
        hs.retain(|(k, _)| k != "content-length");
        // Health documents carry times and durations; their verdict must agree.
        body = body
            .split("\"status\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?")
            .to_string();
    }
    Seen {
        status,
        headers: hs,
        body,
        age,
        ttl,
    }
}

fn wasm() -> PathBuf {
    edge_filter_e2e::envoy::wasm_path().unwrap_or_else(|e| panic!("{e}"))
}

fn via_harness(vm: &mut Vm, step: &Step) -> Seen {
    let req = Request {
        method: step.method.into(),
        path: step.path.clone(),
        headers: step
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        // The e2e client's default Host, so cache keys (and entry sizes) match.
        authority: "edge.test".into(),
        ..Request::default()
    };
    let method = step.method;
    let mut upstream = |m: &Message| {
        let path = m.header(":path").unwrap_or("/").to_string();
        let headers = m.headers.clone().unwrap_or_default();
        let o = origin(method, &path, &headers);
        let mut headers = o.headers;
        let head = method == "HEAD";
        if o.chunks.is_none() && o.status != 204 && o.status != 304 {
            headers.push(("content-length".into(), o.body.len().to_string()));
        }
        Some(Response {
            status: o.status,
            headers,
            body: if head {
                String::new()
            } else {
                String::from_utf8_lossy(&o.body).into_owned()
            },
            chunks: o.chunks.unwrap_or_default(),
            trailers: Vec::new(),
        })
    };
    let ex = vm.exchange(&req, &mut upstream, false).expect("exchange");
    assert!(ex.trap.is_none(), "trap: {:?}", ex.trap);
    seen(
        ex.status().unwrap_or(0),
        ex.client.headers.clone().unwrap_or_default(),
        &ex.client.body,
        step.path.starts_with("/healthz") || step.path.starts_with("/readyz"),
    )
}

fn via_envoy(envoy: &Envoy, step: &Step) -> Seen {
    let r = envoy.request(step.method, &step.path, &step.headers, b"");
    seen(
        r.status,
        r.headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        &r.body,
        step.path.starts_with("/healthz") || step.path.starts_with("/readyz"),
    )
}

fn start_origin() -> Upstream {
    Upstream::origin(|req: &RecordedRequest| {
        let headers: Vec<(String, String)> = req
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let o = origin(&req.method, &req.path, &headers);
        let mut reply = Reply::new(o.status).body(o.body);
        for (k, v) in &o.headers {
            reply = reply.header(k, v);
        }
        if let Some(sizes) = o.chunks {
            reply = reply.mode(BodyMode::Chunked {
                sizes,
                pause: Duration::from_millis(5),
            });
        }
        reply
    })
}

/// Metrics compared after each group: Envoy's tagged name and labels, and the
/// harness's name.
/// Envoy's metric name, its labels, and the harness's name.
type MetricPair = (String, Vec<(&'static str, &'static str)>, String);

fn metric_pairs() -> Vec<MetricPair> {
    let mut v = Vec::new();
    for r in ["hit", "miss", "stale", "bypass", "uncacheable"] {
        for c in ["2xx", "3xx", "4xx", "5xx"] {
            v.push((
                "edge_filter_requests_total".to_string(),
                vec![("cache_result", r), ("status_class", c)],
                format!("edge_filter_requests_total.cache_result.{r}.status_class.{c}"),
            ));
        }
    }
    for n in [
        "edge_filter_cache_stores_total",
        "edge_filter_cache_served_bytes_total",
        "edge_filter_upstream_received_bytes_total",
        "edge_filter_cache_evictions_total",
        "edge_filter_cache_entries",
        "edge_filter_cache_bytes",
    ] {
        v.push((n.to_string(), vec![], n.to_string()));
    }
    v
}

/// Runs every scenario of a group on one Envoy and one harness and returns the
/// disagreements, each as text.
fn run_group(config: &str, scenarios: &[Scenario]) -> Vec<String> {
    let up = start_origin();
    let envoy = Envoy::start(up.port(), config);
    let started = SystemTime::now();
    let h = Harness::from_file(wasm())
        .vm_id("edge-filter")
        .plugin_config(config)
        .start_time(started)
        .cluster("upstream", |_| {
            CallReply::now(HttpCallResponse::new(200, "ok"))
        })
        .build()
        .expect("harness");
    let mut vm = h.new_vm().unwrap();
    let mut diffs = Vec::new();
    for s in scenarios {
        for (i, step) in s.steps.iter().enumerate() {
            if step.wait_ms > 0 {
                std::thread::sleep(Duration::from_millis(step.wait_ms));
            }
            // Keep the virtual clock on real time, which Envoy and the origin use.
            let real = started.elapsed().unwrap_or_default();
            vm.advance(real.saturating_sub(h.elapsed())).unwrap();
            let e = via_envoy(&envoy, step);
            let mut hs = via_harness(&mut vm, step);
            // Whole seconds may tick over between two real requests: allow one.
            if let (Some(a), Some(b)) = (e.age, hs.age) {
                if a.abs_diff(b) <= 1 {
                    hs.age = e.age;
                }
            }
            if let (Some(a), Some(b)) = (e.ttl, hs.ttl) {
                if a.abs_diff(b) <= 1 {
                    hs.ttl = e.ttl;
                }
            }
            if e != hs {
                diffs.push(format!(
                    "{} step {i} ({} {}):\n  envoy:   {e:?}\n  harness: {hs:?}",
                    s.name, step.method, step.path
                ));
            }
        }
    }
    // Counters are live in Envoy; give its workers a tick to publish gauges.
    std::thread::sleep(Duration::from_millis(1200));
    let real = started.elapsed().unwrap_or_default();
    vm.advance(real.saturating_sub(h.elapsed())).unwrap();
    let m = envoy.metrics();
    for (name, labels, hname) in metric_pairs() {
        let ev = m.value(&name, &labels).map(|v| v as u64);
        let hv = h.metric(&hname);
        if ev.unwrap_or(0) != hv.unwrap_or(0) {
            diffs.push(format!("metric {hname}: envoy {ev:?}, harness {hv:?}"));
        }
    }
    diffs
}

fn cache_scenarios() -> Vec<Scenario> {
    vec![
        sc(
            "miss-then-hit",
            vec![get("/s1?cc=max-age=60"), get("/s1?cc=max-age=60")],
        ),
        sc(
            "no-store",
            vec![get("/s2?cc=no-store"), get("/s2?cc=no-store")],
        ),
        sc(
            "private",
            vec![get("/s3?cc=private"), get("/s3?cc=private")],
        ),
        sc(
            "s-maxage",
            vec![get("/s4?cc=s-maxage=30"), get("/s4?cc=s-maxage=30")],
        ),
        sc(
            "expires",
            vec![get("/s5?expires_in=120"), get("/s5?expires_in=120")],
        ),
        sc(
            "404-is-cacheable",
            vec![
                get("/s6?status=404&cc=max-age=60"),
                get("/s6?status=404&cc=max-age=60"),
            ],
        ),
        sc(
            "500-is-not",
            vec![
                get("/s7?status=500&cc=max-age=60"),
                get("/s7?status=500&cc=max-age=60"),
            ],
        ),
        sc(
            "post-is-forwarded",
            vec![
                get("/s8?cc=max-age=60").method("POST"),
                get("/s8?cc=max-age=60").method("POST"),
            ],
        ),
        sc(
            "head-after-get",
            vec![
                get("/s9?cc=max-age=60"),
                get("/s9?cc=max-age=60").method("HEAD"),
            ],
        ),
        sc(
            "head-miss",
            vec![
                get("/s10?cc=max-age=60").method("HEAD"),
                get("/s10?cc=max-age=60"),
            ],
        ),
        sc(
            "vary-variants",
            vec![
                get("/s11?cc=max-age=60&vary=accept-language").header("accept-language", "en"),
                get("/s11?cc=max-age=60&vary=accept-language").header("accept-language", "de"),
                get("/s11?cc=max-age=60&vary=accept-language").header("accept-language", "en"),
                get("/s11?cc=max-age=60&vary=accept-language").header("accept-language", "de"),
            ],
        ),
        sc(
            "vary-star",
            vec![
                get("/s12?cc=max-age=60&vary=*"),
                get("/s12?cc=max-age=60&vary=*"),
            ],
        ),
        sc(
            "set-cookie",
            vec![
                get("/s13?cc=max-age=60&cookie=1"),
                get("/s13?cc=max-age=60&cookie=1"),
            ],
        ),
        sc(
            "authorization-private",
            vec![
                get("/s14?cc=max-age=60").header("authorization", "Bearer x"),
                get("/s14?cc=max-age=60"),
            ],
        ),
        sc(
            "authorization-public",
            vec![
                get("/s15?cc=public,%20max-age=60").header("authorization", "Bearer x"),
                get("/s15?cc=public,%20max-age=60"),
            ],
        ),
        sc(
            "request-no-cache",
            vec![
                get("/s16?cc=max-age=60"),
                get("/s16?cc=max-age=60").header("cache-control", "no-cache"),
            ],
        ),
        sc(
            "request-no-store",
            vec![
                get("/s17?cc=max-age=60").header("cache-control", "no-store"),
                get("/s17?cc=max-age=60"),
            ],
        ),
        sc(
            "only-if-cached-miss",
            vec![get("/s18?cc=max-age=60").header("cache-control", "only-if-cached")],
        ),
        sc(
            "only-if-cached-hit",
            vec![
                get("/s19?cc=max-age=60"),
                get("/s19?cc=max-age=60").header("cache-control", "only-if-cached"),
            ],
        ),
        sc(
            "request-max-age-0",
            vec![
                get("/s20?cc=max-age=60"),
                get("/s20?cc=max-age=60").header("cache-control", "max-age=0"),
            ],
        ),
        sc(
            "pragma-no-cache",
            vec![
                get("/s21?cc=max-age=60"),
                get("/s21?cc=max-age=60").header("pragma", "no-cache"),
            ],
        ),
        sc(
            "chunked-body",
            vec![
                get("/s22?cc=max-age=60&len=3000&chunked=1000,1000"),
                get("/s22?cc=max-age=60&len=3000&chunked=1000,1000"),
            ],
        ),
        sc(
            "queries-are-keys",
            vec![
                get("/s23?cc=max-age=60&a=1"),
                get("/s23?cc=max-age=60&a=2"),
                get("/s23?cc=max-age=60&a=1"),
            ],
        ),
        sc(
            "301-is-cacheable",
            vec![
                get("/s24?status=301&cc=max-age=60"),
                get("/s24?status=301&cc=max-age=60"),
            ],
        ),
        sc(
            "no-cache-with-validator",
            vec![
                get("/s25?cc=no-cache&etag=v1"),
                get("/s25?cc=no-cache&etag=v1"),
            ],
        ),
        sc(
            "upstream-cache-status",
            vec![
                get("/s26?cc=max-age=60&cs=origin;%20fwd=miss"),
                get("/s26?cc=max-age=60&cs=origin;%20fwd=miss"),
            ],
        ),
        sc(
            "hop-by-hop-not-stored",
            vec![
                get("/s27?cc=max-age=60&conn=1"),
                get("/s27?cc=max-age=60&conn=1"),
            ],
        ),
        sc(
            "204-no-body",
            vec![
                get("/s28?status=204&cc=max-age=60"),
                get("/s28?status=204&cc=max-age=60"),
            ],
        ),
        sc(
            "stale-after-max-age",
            vec![
                get("/s29?cc=max-age=1"),
                get("/s29?cc=max-age=1").wait(2100),
            ],
        ),
        sc(
            "healthz",
            vec![get("/healthz"), get("/healthz").method("HEAD")],
        ),
    ]
}

fn small_scenarios() -> Vec<Scenario> {
    vec![
        sc(
            "too-large-streams-through",
            vec![
                get("/t1?cc=max-age=60&len=5000"),
                get("/t1?cc=max-age=60&len=5000"),
            ],
        ),
        sc(
            "fits",
            vec![
                get("/t2?cc=max-age=60&len=500"),
                get("/t2?cc=max-age=60&len=500"),
            ],
        ),
        sc("no-cache-status-header", vec![get("/t3?cc=max-age=60")]),
    ]
}

fn purge_scenarios() -> Vec<Scenario> {
    vec![
        sc(
            "purge-removes",
            vec![
                get("/p1?cc=max-age=60"),
                get("/p1?cc=max-age=60")
                    .method("PURGE")
                    .header("x-purge-token", "s3cret"),
                get("/p1?cc=max-age=60"),
            ],
        ),
        sc(
            "purge-wrong-token",
            vec![get("/p2?cc=max-age=60")
                .method("PURGE")
                .header("x-purge-token", "nope")],
        ),
        sc(
            "purge-nothing",
            vec![get("/p3?cc=max-age=60")
                .method("PURGE")
                .header("x-purge-token", "s3cret")],
        ),
    ]
}

fn disabled_scenarios() -> Vec<Scenario> {
    vec![sc(
        "disabled-bypasses",
        vec![get("/d1?cc=max-age=60"), get("/d1?cc=max-age=60")],
    )]
}

#[test]
fn scenarios_agree_with_envoy() {
    let groups: Vec<(&str, Vec<Scenario>)> = vec![
        ("{}", cache_scenarios()),
        (
            r#"{"cache":{"max_entry_bytes":1024,"cache_status":false}}"#,
            small_scenarios(),
        ),
        (
            r#"{"purge":{"enabled":true,"token":"s3cret"}}"#,
            purge_scenarios(),
        ),
        (r#"{"cache":{"enabled":false}}"#, disabled_scenarios()),
    ];
    let total: usize = groups.iter().map(|(_, s)| s.len()).sum();
    assert!(total >= 30, "at least 30 scenarios, have {total}");
    // One group at a time: each Envoy runs two workers, and the machine has two cores.
    let diffs: Vec<String> = groups
        .iter()
        .flat_map(|(config, scenarios)| run_group(config, scenarios))
        .collect();
    assert!(
        diffs.is_empty(),
        "{} disagreements:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// Documented deviation: Envoy's connection manager adds request headers of its own
/// (`x-request-id`, `x-forwarded-proto`, `x-envoy-expected-rq-timeout-ms`) before the
/// filter sees the request; the harness passes exactly what the test sent.
#[test]
fn deviation_envoy_adds_request_headers_the_harness_does_not() {
    let up = start_origin();
    let envoy = Envoy::start(up.port(), "{}");
    let r = envoy.request("GET", "/dev1?cc=no-store", &[], b"");
    assert_eq!(r.status, 200);
    let seen = up.requests();
    let at_origin = seen
        .iter()
        .find(|q| q.path.starts_with("/dev1"))
        .expect("request reached the origin");
    assert!(at_origin.headers.contains("x-request-id"));
    assert!(at_origin.headers.contains("x-forwarded-proto"));
    let h = Harness::from_file(wasm())
        .vm_id("edge-filter")
        .build()
        .unwrap();
    let mut vm = h.new_vm().unwrap();
    let ex = vm
        .exchange(
            &Request::get("/dev1?cc=no-store"),
            &mut |_| Some(Response::ok("x")),
            false,
        )
        .unwrap();
    let sent: Vec<&str> = ex
        .upstream_request
        .headers
        .as_ref()
        .unwrap()
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(sent, vec![":authority", ":path", ":method", ":scheme"]);
}
