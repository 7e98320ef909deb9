//! One list of end-to-end scenarios that both proxies must pass: the same `.wasm`, the
//! same plugin JSON (the shipped one unless a scenario needs another), the same requests
//! and the same assertions, in a real Envoy (`envoy/envoy.yaml`) and in the stock Debian
//! nginx with the module (`nginx/conf/nginx.conf`).
//!
//! [`run`] runs the list in order on one proxy instance and one origin, restarting the
//! proxy only when a scenario asks for another plugin JSON; each scenario uses its own
//! paths, so scenarios sharing an instance do not see each other's entries. A failure
//! names the proxy and the scenario; the remaining scenarios still run.

use std::io;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::envoy::{self, repo_root, Envoy};
use crate::hostile;
use crate::http::{self, Response};
use crate::nginx::{self, Nginx, NginxConf};
use crate::prometheus::Exposition;
use crate::upstream::{BodyMode, Reply, Upstream};
use crate::{poll, CacheStatus, CACHE};

/// A running proxy with the filter, as the scenarios see it.
pub trait Proxy {
    /// `envoy` or `nginx`, for messages.
    fn name(&self) -> &'static str;

    /// Where the filter runs.
    fn listener(&self) -> SocketAddr;

    /// The filter's metrics (Envoy's `/stats/prometheus`, nginx's `proxy_wasm_metrics`
    /// location), parsed: the same names and labels in both.
    fn metrics(&self) -> Exposition;

    /// The JSON access log so far; both proxies' lines have `path` and `cache_status`.
    fn access_log(&self) -> String;

    /// Ok unless the proxy logged a problem (a crash, a trap, a critical error).
    fn check_logs(&self) -> Result<(), String>;

    /// Every log line [`Proxy::check_logs`] objects to, in order (the log only grows, so
    /// a later call's extra lines are what happened in between).
    fn problem_lines(&self) -> Vec<String>;

    /// The proxy's logs worth showing when a scenario failed.
    fn diagnostics(&self) -> String;

    /// Sends one request on a new connection; an error on any I/O failure, including
    /// a body cut short.
    fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        http::send(self.listener(), method, path, headers, body)
    }

    /// Like [`Proxy::try_request`]; panics on an I/O error.
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        self.try_request(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path} via {} failed: {e}", self.name()))
    }

    /// `GET path`.
    fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    /// `GET path` with extra request headers.
    fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.request("GET", path, headers, b"")
    }

    /// Sends raw bytes and returns all bytes until the proxy closes the connection.
    fn raw(&self, request: &[u8]) -> Vec<u8> {
        http::exchange_raw(self.listener(), request)
            .unwrap_or_else(|e| panic!("raw exchange via {} failed: {e}", self.name()))
    }
}

/// Starts a proxy of one kind.
pub trait Launcher {
    /// `envoy` or `nginx`.
    fn name(&self) -> &'static str;

    /// Ok when everything the proxy needs is there (binary, module, .wasm); else how to
    /// get it.
    fn preflight(&self) -> Result<(), String>;

    /// Starts the proxy with `plugin_config` in front of `127.0.0.1:<upstream_port>`.
    fn start(&self, upstream_port: u16, plugin_config: &str) -> Result<Box<dyn Proxy>, String>;

    /// Tries to start the proxy with a plugin JSON the filter must refuse. Ok with what
    /// the proxy printed when it refused to start; Err when it started (or hung).
    fn refuses(&self, upstream_port: u16, plugin_config: &str) -> Result<String, String>;
}

impl Proxy for Envoy {
    fn name(&self) -> &'static str {
        "envoy"
    }
    fn listener(&self) -> SocketAddr {
        self.listener_addr()
    }
    fn metrics(&self) -> Exposition {
        Envoy::metrics(self)
    }
    fn access_log(&self) -> String {
        Envoy::access_log(self)
    }
    fn check_logs(&self) -> Result<(), String> {
        let bad = self.problem_lines();
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!("envoy logged problems:\n{}", bad.join("\n")))
        }
    }
    fn problem_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| {
                l.contains("][critical][") || l.contains("Uncaught") || l.contains("panicked at")
            })
            .map(str::to_string)
            .collect()
    }
    fn diagnostics(&self) -> String {
        let log = self.log();
        let notable: Vec<&str> = log
            .lines()
            .filter(|l| {
                ["][warning][", "][error][", "][critical][", "][wasm]"]
                    .iter()
                    .any(|t| l.contains(t))
            })
            .collect();
        let from = notable.len().saturating_sub(20);
        notable[from..].join("\n")
    }
}

impl Proxy for Nginx {
    fn name(&self) -> &'static str {
        "nginx"
    }
    fn listener(&self) -> SocketAddr {
        self.listener_addr()
    }
    fn metrics(&self) -> Exposition {
        Nginx::metrics(self)
    }
    fn access_log(&self) -> String {
        Nginx::access_log(self)
    }
    fn check_logs(&self) -> Result<(), String> {
        Nginx::check_logs(self, &[])
    }
    fn problem_lines(&self) -> Vec<String> {
        nginx::unexpected_problems(&self.logs(), &[])
            .into_iter()
            .map(str::to_string)
            .collect()
    }
    fn diagnostics(&self) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// Envoy 1.40 with `envoy/envoy.yaml` (2 worker threads).
pub struct EnvoyLauncher;

impl Launcher for EnvoyLauncher {
    fn name(&self) -> &'static str {
        "envoy"
    }
    fn preflight(&self) -> Result<(), String> {
        envoy::envoy_bin()?;
        envoy::wasm_path()?;
        Ok(())
    }
    fn start(&self, upstream_port: u16, plugin_config: &str) -> Result<Box<dyn Proxy>, String> {
        Ok(Box::new(Envoy::try_start(upstream_port, plugin_config)?))
    }
    fn refuses(&self, upstream_port: u16, plugin_config: &str) -> Result<String, String> {
        let failed =
            Envoy::expect_start_failure(upstream_port, plugin_config, Duration::from_secs(30));
        if failed.became_ready {
            return Err("Envoy started".into());
        }
        match failed.status {
            None => Err("Envoy neither started nor exited".into()),
            Some(s) if s.success() => Err(format!("Envoy exited with {s}")),
            Some(_) => Ok(failed
                .log
                .lines()
                .filter(|l| l.contains("[error]") || l.contains("[critical]"))
                .collect::<Vec<_>>()
                .join("\n")),
        }
    }
}

/// The stock nginx with the module and `nginx/conf/nginx.conf`.
pub struct NginxLauncher {
    /// `worker_processes`.
    pub workers: usize,
}

impl NginxLauncher {
    /// 2 workers (as Envoy's 2 worker threads), or `$EDGE_FILTER_NGINX_WORKERS`.
    pub fn from_env() -> NginxLauncher {
        let workers = std::env::var("EDGE_FILTER_NGINX_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(2);
        NginxLauncher { workers }
    }
}

impl Launcher for NginxLauncher {
    fn name(&self) -> &'static str {
        "nginx"
    }
    fn preflight(&self) -> Result<(), String> {
        nginx::nginx_bin()?;
        nginx::module_path()?;
        envoy::wasm_path()?;
        Ok(())
    }
    fn start(&self, upstream_port: u16, plugin_config: &str) -> Result<Box<dyn Proxy>, String> {
        let conf = NginxConf::new(self.workers, plugin_config);
        Ok(Box::new(Nginx::try_start(upstream_port, &conf)?))
    }
    fn refuses(&self, upstream_port: u16, plugin_config: &str) -> Result<String, String> {
        let conf = NginxConf::new(self.workers, plugin_config);
        let t = Nginx::test_config(upstream_port, &conf)?;
        if t.accepted {
            return Err(format!("nginx -t accepted it:\n{}", t.output));
        }
        // Starting must fail the same way.
        match Nginx::try_start(upstream_port, &conf) {
            Ok(_) => Err("nginx -t refused it, but nginx started".into()),
            Err(start) => Ok(format!("nginx -t:\n{}\nnginx:\n{start}", t.output)),
        }
    }
}

/// The plugin JSON both shipped configurations carry (tests check they are equal).
pub fn shipped_plugin_config() -> String {
    let yaml = std::fs::read_to_string(repo_root().join("envoy/envoy.yaml"))
        .expect("reading envoy/envoy.yaml");
    envoy::shipped_plugin_config(&yaml).unwrap_or_else(|e| panic!("{e}"))
}

/// Health checks every 200 ms so readiness changes show within a second.
pub const FAST_HEALTH: &str = r#"{"health": {"check_period_ms": 200, "check_timeout_ms": 500}}"#;

/// [`FAST_HEALTH`] with readiness failing (503) while the upstream does.
pub const FAST_HEALTH_STRICT: &str =
    r#"{"health": {"check_period_ms": 200, "check_timeout_ms": 500, "upstream_failure": "fail"}}"#;

/// What a scenario works with: the proxy (restarted on demand with another plugin JSON)
/// and the origin, which answers every scenario's paths (see [`origin_reply`]).
pub struct Ctx<'a> {
    launcher: &'a dyn Launcher,
    /// The origin every scenario's requests reach. A scenario that stops it must restart
    /// it (the runner does, too, after a failure).
    pub origin: Upstream,
    proxy: Option<(String, Rc<dyn Proxy>)>,
}

impl<'a> Ctx<'a> {
    /// A context with a fresh origin and no proxy yet.
    pub fn new(launcher: &'a dyn Launcher) -> Ctx<'a> {
        let state = Arc::new(OriginState::default());
        Ctx {
            launcher,
            origin: Upstream::origin(move |req| origin_reply(&state, req)),
            proxy: None,
        }
    }

    /// The launcher, for scenarios that start proxies of their own.
    pub fn launcher(&self) -> &dyn Launcher {
        self.launcher
    }

    /// The proxy running `plugin_config`: the current one if it runs that JSON already,
    /// else a new one (the old one is stopped first).
    pub fn proxy(&mut self, plugin_config: &str) -> Rc<dyn Proxy> {
        if let Some((config, p)) = &self.proxy {
            if config == plugin_config {
                return Rc::clone(p);
            }
        }
        self.proxy = None;
        let p: Rc<dyn Proxy> = Rc::from(
            self.launcher
                .start(self.origin.port(), plugin_config)
                .unwrap_or_else(|e| panic!("{}: {e}", self.launcher.name())),
        );
        self.proxy = Some((plugin_config.to_string(), Rc::clone(&p)));
        p
    }

    /// The proxy with the shipped plugin JSON.
    pub fn shipped(&mut self) -> Rc<dyn Proxy> {
        self.proxy(&shipped_plugin_config())
    }
}

/// A named scenario.
pub struct Scenario {
    /// Its name, as failures report it.
    pub name: &'static str,
    /// The scenario; it panics on failure.
    pub run: fn(&mut Ctx<'_>),
}

/// Every scenario, in the order [`run`] runs them (grouped by plugin JSON, so the proxy
/// restarts rarely).
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "healthz",
        run: healthz,
    },
    Scenario {
        name: "miss_then_hit",
        run: miss_then_hit,
    },
    Scenario {
        name: "head_from_get_entry",
        run: head_from_get_entry,
    },
    Scenario {
        name: "vary",
        run: vary,
    },
    Scenario {
        name: "no_store",
        run: no_store,
    },
    Scenario {
        name: "over_limit_body",
        run: over_limit_body,
    },
    Scenario {
        name: "truncated_body",
        run: truncated_body,
    },
    Scenario {
        name: "cache_status_on_every_response",
        run: cache_status_on_every_response,
    },
    Scenario {
        name: "coalesced_misses",
        run: coalesced_misses,
    },
    Scenario {
        name: "revalidated_by_304",
        run: revalidated_by_304,
    },
    Scenario {
        name: "http_date_formats",
        run: http_date_formats,
    },
    Scenario {
        name: "variant_normalisation",
        run: variant_normalisation,
    },
    Scenario {
        name: "range_from_cache",
        run: range_from_cache,
    },
    Scenario {
        name: "bypass_rules",
        run: bypass_rules,
    },
    Scenario {
        name: "query_key_policy",
        run: query_key_policy,
    },
    Scenario {
        name: "key_headers_and_cookies",
        run: key_headers_and_cookies,
    },
    Scenario {
        name: "tag_and_soft_purge",
        run: tag_and_soft_purge,
    },
    Scenario {
        name: "targeted_cache_control",
        run: targeted_cache_control,
    },
    Scenario {
        name: "metrics_requests_by_cache_result",
        run: metrics_requests_by_cache_result,
    },
    // Hostile input (crate::hostile): the shipped JSON plus purge, one proxy for all four.
    Scenario {
        name: "hostile_obs_text_request_headers",
        run: hostile::obs_text_request_headers,
    },
    Scenario {
        name: "hostile_obs_text_response_headers",
        run: hostile::obs_text_response_headers,
    },
    Scenario {
        name: "hostile_poisoning",
        run: hostile::poisoning,
    },
    Scenario {
        name: "hostile_filter_conditional_never_leaks",
        run: hostile::filter_conditional_never_leaks,
    },
    Scenario {
        name: "readyz_follows_upstream",
        run: readyz_follows_upstream,
    },
    Scenario {
        name: "bad_config_refused",
        run: bad_config_refused,
    },
];

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".to_string()
    }
}

/// Runs every scenario (or those named in `$E2E_SCENARIOS`, comma-separated) against
/// `launcher`'s proxy; panics at the end naming the proxy and every failed scenario.
pub fn run(launcher: &dyn Launcher) {
    if let Err(e) = launcher.preflight() {
        panic!("{}: {e}", launcher.name());
    }
    let only: Option<Vec<String>> = std::env::var("E2E_SCENARIOS")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    if let Some(only) = &only {
        for name in only {
            assert!(
                SCENARIOS.iter().any(|s| s.name == name),
                "E2E_SCENARIOS names an unknown scenario {name:?}"
            );
        }
    }
    let mut ctx = Ctx::new(launcher);
    let mut failures = Vec::new();
    let mut ran = 0;
    for s in SCENARIOS {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == s.name))
        {
            continue;
        }
        ran += 1;
        let t0 = Instant::now();
        let mut outcome = catch_unwind(AssertUnwindSafe(|| (s.run)(&mut ctx)))
            .map_err(|p| panic_message(p.as_ref()));
        if outcome.is_ok() {
            if let Some((_, p)) = &ctx.proxy {
                outcome = p.check_logs();
            }
        }
        match outcome {
            Ok(()) => eprintln!(
                "{}: scenario {} ok ({:.1} s)",
                launcher.name(),
                s.name,
                t0.elapsed().as_secs_f64()
            ),
            Err(msg) => {
                eprintln!("{}: scenario {} FAILED: {msg}", launcher.name(), s.name);
                if let Some((_, p)) = ctx.proxy.take() {
                    eprintln!("--- {} logs (tail) ---\n{}", p.name(), p.diagnostics());
                }
                // A clean state for the next scenario.
                ctx.origin.restart();
                failures.push(format!("{}: {msg}", s.name));
            }
        }
    }
    assert!(ran > 0, "no scenario ran");
    assert!(
        failures.is_empty(),
        "{}: {} of {ran} scenarios failed:\n{}",
        launcher.name(),
        failures.len(),
        failures.join("\n")
    );
}

/// State the origin keeps across requests: which truncated paths were already cut.
#[derive(Default)]
pub struct OriginState {
    cut_length: AtomicUsize,
    cut_chunked: AtomicUsize,
    slow: AtomicUsize,
}

/// How long the origin takes to answer `/co/slow`.
const COALESCE_ORIGIN_DELAY: Duration = Duration::from_millis(800);

/// Clients sent at once in [`coalesced_misses`].
const COALESCE_CLIENTS: usize = 8;

/// Above the shipped `cache.max_entry_bytes` (1 MiB).
const OVER_LIMIT: usize = (1 << 20) + 4096;

/// Size of the truncated scenario's bodies.
const CUT_BODY: usize = 20_000;

/// The origin's reply to every scenario's paths (`/` is the health check, answered by
/// [`Upstream::origin`]).
pub fn origin_reply(state: &OriginState, req: &crate::upstream::RecordedRequest) -> Reply {
    let max_age = |r: Reply| r.header("Cache-Control", "max-age=60");
    match req.path.as_str() {
        "/mh/page" => max_age(Reply::text("hello from origin"))
            .header("X-Origin", "one")
            .header("ETag", "\"v1\""),
        "/head/doc" => max_age(Reply::text("a document body")),
        "/vary/v" => {
            let enc = req.headers.get("accept-encoding").unwrap_or("none");
            max_age(Reply::text(format!("variant for {enc}"))).header("Vary", "Accept-Encoding")
        }
        "/ns/secret" => Reply::text("secret").header("Cache-Control", "no-store, max-age=60"),
        "/big/chunked" => max_age(Reply::new(200))
            .header("Content-Type", "application/octet-stream")
            .body(patterned(OVER_LIMIT))
            .mode(BodyMode::Chunked {
                sizes: vec![1000, 3000, 8192, 16384],
                pause: Duration::from_millis(5),
            }),
        "/big/length" => max_age(Reply::new(200))
            .header("Content-Type", "application/octet-stream")
            .body(patterned(OVER_LIMIT)),
        "/cut/length" => {
            let full = max_age(Reply::new(200)).body(patterned(CUT_BODY));
            if state.cut_length.fetch_add(1, Ordering::SeqCst) == 0 {
                full.mode(BodyMode::TruncatedLength { sent: 7_000 })
            } else {
                full
            }
        }
        "/cut/chunked" => {
            let full = max_age(Reply::new(200)).body(patterned(CUT_BODY));
            if state.cut_chunked.fetch_add(1, Ordering::SeqCst) == 0 {
                full.mode(BodyMode::TruncatedChunked {
                    sizes: vec![4_000, 4_000, 4_000],
                })
            } else {
                full.mode(BodyMode::Chunked {
                    sizes: vec![4_000],
                    pause: Duration::ZERO,
                })
            }
        }
        "/cs/layered" => {
            max_age(Reply::text("layered")).header("Cache-Status", "origin-cache; hit")
        }
        "/cs/form" => max_age(Reply::text(format!(
            "{} {}",
            req.method,
            String::from_utf8_lossy(&req.body)
        ))),
        "/metrics/m" => max_age(Reply::text("metric body")),
        // Slow enough that concurrent misses overlap; numbered so a second fetch shows.
        "/co/slow" => {
            let n = state.slow.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(COALESCE_ORIGIN_DELAY);
            max_age(Reply::text(format!("slow response #{n}")))
        }
        // Fresh for 1 s; then a request carrying the validator gets a 304 with new fields.
        // RFC 9110 §5.6.7: the obsolete date formats, which recipients must accept.
        "/dt/rfc850" | "/dt/asctime" => {
            let fmt = if req.path == "/dt/rfc850" {
                rfc850
            } else {
                asctime
            };
            let now = std::time::SystemTime::now();
            Reply::text("dated")
                .header("Date", &fmt(now))
                .header("Expires", &fmt(now + Duration::from_secs(600)))
        }
        "/dt/last-modified" => max_age(Reply::text("modified")).header(
            "Last-Modified",
            &asctime(std::time::SystemTime::now() - Duration::from_secs(3600)),
        ),
        // Variants by Accept-Encoding / Accept-Language, naming the value the origin saw.
        "/vn/ae" | "/vn/al" => {
            let name = if req.path == "/vn/ae" {
                "Accept-Encoding"
            } else {
                "Accept-Language"
            };
            let seen = req.headers.get(name).unwrap_or("(none)").to_string();
            max_age(Reply::text(format!("{name}: {seen}"))).header("Vary", name)
        }
        // A 1000-byte object for Range requests; the origin ignores Range (a 200 always).
        "/rg/obj" | "/rg/other" => Reply::new(200)
            .header("Cache-Control", "max-age=600")
            .header("Content-Type", "application/octet-stream")
            .header("ETag", "\"rg1\"")
            .body(patterned(1000)),
        // Tagged responses for purge by tag; /tp/s numbers its fetches (soft purge).
        "/tp/a" | "/tp/b" => Reply::text(format!("tagged {}", req.path))
            .header("Cache-Control", "max-age=600")
            .header("Surrogate-Key", "group-1 a-or-b"),
        "/tp/c" => Reply::text("tagged /tp/c")
            .header("Cache-Control", "max-age=600")
            .header("Surrogate-Key", "group-2"),
        "/tp/s" => {
            let n = state.slow.fetch_add(1, Ordering::SeqCst);
            Reply::text(format!("soft #{n}"))
                .header("Cache-Control", "max-age=600, stale-while-revalidate=600")
                .header("Surrogate-Key", "soft-group")
        }
        p if p.starts_with("/kp/") => max_age(Reply::text(format!(
            "device={} cookie={}",
            req.headers.get("x-device").unwrap_or("-"),
            req.headers.get("cookie").unwrap_or("-")
        ))),
        p if p.starts_with("/qk/") => max_age(Reply::text(format!("origin saw {p}"))),
        p if p.starts_with("/bp/") => max_age(Reply::text(format!("bypass test {p}"))),
        // RFC 9213: targeted fields against Cache-Control (see `targeted_cache_control`).
        "/tcc/cdn" => Reply::text("cdn decides")
            .header("Cache-Control", "no-store")
            .header("CDN-Cache-Control", "max-age=600"),
        "/tcc/cdn-no-store" => Reply::text("cdn refuses")
            .header("Cache-Control", "max-age=600")
            .header("CDN-Cache-Control", "no-store"),
        "/tcc/cdn-invalid" => Reply::text("invalid cdn field")
            .header("Cache-Control", "max-age=600")
            .header("CDN-Cache-Control", "max-age=600,"),
        "/tcc/edge" | "/tcc/edge-2" => Reply::text("edge decides")
            .header("Cache-Control", "no-store")
            .header("Edge-Cache-Control", "max-age=600"),
        "/tcc/both" => Reply::text("first target wins")
            .header("Edge-Cache-Control", "no-store")
            .header("CDN-Cache-Control", "max-age=600"),
        "/rv/etag" if req.headers.get("if-none-match") == Some("\"rv1\"") => Reply::new(304)
            .header("ETag", "\"rv1\"")
            .header("Cache-Control", "max-age=60")
            .header("X-Version", "2"),
        "/rv/etag" => Reply::text("revalidated body")
            .header("ETag", "\"rv1\"")
            .header("Cache-Control", "max-age=1")
            .header("X-Version", "1"),
        _ => hostile::origin_reply(req).unwrap_or_else(|| Reply::new(404)),
    }
}

/// A body whose bytes depend on their position, so reordering or loss shows.
pub fn patterned(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// `ttl` of a hit, checking the exact `edge-filter; hit; ttl=<n>` shape.
pub fn hit_ttl(r: &Response) -> u64 {
    let cs = CacheStatus::of(r);
    let ttl: u64 = cs
        .param("ttl")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("hit without a numeric ttl: {cs:?}"));
    assert_eq!(
        r.header("cache-status"),
        Some(format!("{CACHE}; hit; ttl={ttl}").as_str()),
        "hit Cache-Status shape"
    );
    ttl
}

/// The `Age` header's value; panics without one.
pub fn age(r: &Response) -> u64 {
    r.header("age")
        .unwrap_or_else(|| panic!("no Age header in {:?}", r.headers))
        .parse()
        .expect("numeric Age")
}

/// Asserts a forwarded response (a `fwd=` reason, no `hit`).
pub fn assert_not_hit(r: &Response) {
    let cs = CacheStatus::of(r);
    assert!(!cs.has("hit"), "unexpected hit: {cs:?}");
    assert!(
        cs.param("fwd").is_some(),
        "a forwarded response says fwd=: {cs:?}"
    );
}

/// The health document of a `/healthz` or `/readyz` response (checks its content type).
pub fn health_json(r: &Response) -> Value {
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/health+json"),
        "content-type {ct:?} for a health response"
    );
    serde_json::from_str(&r.text()).unwrap_or_else(|e| panic!("{e} in health body {:?}", r.text()))
}

/// The `status` of a health document.
pub fn status_of(doc: &Value) -> &str {
    doc.get("status")
        .and_then(Value::as_str)
        .unwrap_or("<missing>")
}

/// Polls `/readyz` until it answers `want` (bounded); returns the last response.
pub fn wait_readyz(proxy: &dyn Proxy, want: u16, timeout: Duration) -> Response {
    let mut last = None;
    poll(timeout, Duration::from_millis(100), || {
        let r = proxy.get("/readyz");
        let done = r.status == want;
        last = Some(r);
        done.then_some(())
    })
    .unwrap_or_else(|| {
        let r = last.as_ref().expect("at least one /readyz");
        panic!(
            "/readyz never answered {want} within {timeout:?}; last: {} {}",
            r.status,
            r.text()
        )
    });
    last.expect("at least one /readyz")
}

/// `/healthz` is the filter's own answer, never the origin's.
pub fn healthz(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    let before = ctx.origin.count("/healthz");
    let r = proxy.get("/healthz");
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
    // HEAD gets the same status without a body.
    let head = proxy.request("HEAD", "/healthz", &[], b"");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        ctx.origin.count("/healthz"),
        before,
        "/healthz must not reach the origin"
    );
}

/// A miss is stored; the next requests (on new connections, so possibly other workers)
/// are hits with the stored headers, and the access log records each decision.
pub fn miss_then_hit(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    let miss = proxy.get("/mh/page");
    assert_eq!(miss.status, 200);
    assert_eq!(miss.text(), "hello from origin");
    assert_eq!(
        miss.header("cache-status"),
        Some("edge-filter; fwd=uri-miss; fwd-status=200; stored")
    );

    let hit = proxy.get("/mh/page");
    assert_eq!(hit.status, 200);
    assert_eq!(hit.body, miss.body);
    let ttl = hit_ttl(&hit);
    assert!((55..=60).contains(&ttl), "ttl {ttl} for max-age=60");
    for name in ["x-origin", "etag", "content-type", "cache-control"] {
        assert_eq!(hit.header(name), miss.header(name), "stored header {name}");
    }
    assert!(age(&hit) <= 2);
    assert_eq!(
        ctx.origin.count("/mh/page"),
        1,
        "the hit must not reach the origin"
    );

    // More requests, each on a new connection: hits whichever worker answers.
    for _ in 0..4 {
        let again = proxy.get("/mh/page");
        assert_eq!(again.body, miss.body);
        hit_ttl(&again);
    }
    assert_eq!(ctx.origin.count("/mh/page"), 1);

    // The shipped JSON access log records each request with its Cache-Status
    // (Envoy flushes it about every 200 ms in tests).
    let lines = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        let lines: Vec<Value> = proxy
            .access_log()
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: access log line {l:?}"))
            })
            .filter(|j: &Value| j.get("path").and_then(Value::as_str) == Some("/mh/page"))
            .collect();
        (lines.len() == 6).then_some(lines)
    })
    .expect("six /mh/page lines in the access log");
    let statuses: Vec<&str> = lines
        .iter()
        .map(|j| j.get("cache_status").and_then(Value::as_str).unwrap_or(""))
        .collect();
    assert_eq!(
        statuses[0],
        "edge-filter; fwd=uri-miss; fwd-status=200; stored"
    );
    assert!(
        statuses[1..]
            .iter()
            .all(|s| s.starts_with("edge-filter; hit")),
        "{statuses:?}"
    );
}

/// HEAD is answered from the GET entry, without a body on the wire, never forwarded.
pub fn head_from_get_entry(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    let get = proxy.get("/head/doc");
    assert_eq!(get.status, 200);

    let head = proxy.request("HEAD", "/head/doc", &[], b"");
    assert_eq!(head.status, 200);
    hit_ttl(&head);
    if let Some(len) = head.header("content-length") {
        assert_eq!(len, get.body.len().to_string(), "HEAD Content-Length");
    }
    // On the wire: nothing may follow the head of a HEAD response.
    let raw = proxy.raw(b"HEAD /head/doc HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n");
    let text = String::from_utf8_lossy(&raw);
    let end = text.find("\r\n\r\n").expect("complete response head") + 4;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(&text[end..], "", "HEAD response carried a body");

    assert_eq!(ctx.origin.count("/head/doc"), 1);
    assert!(
        ctx.origin
            .requests()
            .iter()
            .all(|r| !(r.path == "/head/doc" && r.method == "HEAD")),
        "HEAD reached the origin"
    );
}

/// Each `Vary` variant is stored and served separately.
pub fn vary(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    let gzip = [("Accept-Encoding", "gzip")];
    let br = [("Accept-Encoding", "br")];

    let a = proxy.get_with("/vary/v", &gzip);
    assert_eq!(a.text(), "variant for gzip");
    assert_eq!(
        a.header("cache-status"),
        Some("edge-filter; fwd=uri-miss; fwd-status=200; stored")
    );
    let b = proxy.get_with("/vary/v", &br);
    assert_eq!(b.text(), "variant for br");
    assert_eq!(
        b.header("cache-status"),
        Some("edge-filter; fwd=vary-miss; fwd-status=200; stored")
    );
    assert_eq!(ctx.origin.count("/vary/v"), 2);

    for _ in 0..2 {
        let a = proxy.get_with("/vary/v", &gzip);
        assert_eq!(a.text(), "variant for gzip");
        hit_ttl(&a);
        let b = proxy.get_with("/vary/v", &br);
        assert_eq!(b.text(), "variant for br");
        hit_ttl(&b);
    }
    assert_eq!(
        ctx.origin.count("/vary/v"),
        2,
        "each variant reaches the origin once"
    );
    let seen: Vec<_> = ctx
        .origin
        .requests()
        .into_iter()
        .filter(|r| r.path == "/vary/v")
        .map(|r| r.headers.get("accept-encoding").map(str::to_string))
        .collect();
    assert_eq!(seen, [Some("gzip".to_string()), Some("br".to_string())]);
}

/// `no-store` responses are forwarded every time.
pub fn no_store(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    for n in 1..=2 {
        let r = proxy.get("/ns/secret");
        assert_eq!(r.text(), "secret");
        assert_eq!(
            r.header("cache-status"),
            Some("edge-filter; fwd=uri-miss; fwd-status=200; detail=no-store")
        );
        assert_eq!(ctx.origin.count("/ns/secret"), n);
    }
}

/// `cache.normalize_accept_encoding` and `_accept_language` reduce a browser population's
/// values to what the origin uses: requests that differ only in codings or languages the
/// origin does not use share a variant, and the upstream receives the reduced value.
pub fn variant_normalisation(ctx: &mut Ctx<'_>) {
    let mut v: Value = serde_json::from_str(&shipped_plugin_config()).expect("shipped JSON");
    v["cache"]["normalize_accept_encoding"] = serde_json::json!(["br", "gzip"]);
    v["cache"]["normalize_accept_language"] = serde_json::json!(["en", "fr"]);
    let proxy = ctx.proxy(&v.to_string());
    let ask = |path: &str, name: &str, value: &str| {
        let r = proxy.get_with(path, &[(name, value)]);
        assert_eq!(r.status, 200, "{path} {name}: {value}");
        (r.text(), CacheStatus::of(&r).has("hit"))
    };
    let ae = "Accept-Encoding";
    for (value, seen, hit, fetches) in [
        ("gzip, deflate", "gzip", false, 1),
        ("deflate, GZIP;q=0.5", "gzip", true, 1),
        ("gzip", "gzip", true, 1),
        ("br, gzip, zstd", "br, gzip", false, 2),
        ("deflate", "identity", false, 3),
        ("gzip;q=0", "identity", true, 3),
    ] {
        let (text, was_hit) = ask("/vn/ae", ae, value);
        assert_eq!(text, format!("{ae}: {seen}"), "{value}");
        assert_eq!(was_hit, hit, "{value}");
        assert_eq!(ctx.origin.count("/vn/ae"), fetches, "{value}");
    }
    let al = "Accept-Language";
    for (value, seen, hit, fetches) in [
        ("en-US,en;q=0.9", "en", false, 1),
        ("en", "en", true, 1),
        ("fr-CA, en;q=0.5", "fr", false, 2),
        ("ja", "en", true, 2),
    ] {
        let (text, was_hit) = ask("/vn/al", al, value);
        assert_eq!(text, format!("{al}: {seen}"), "{value}");
        assert_eq!(was_hit, hit, "{value}");
        assert_eq!(ctx.origin.count("/vn/al"), fetches, "{value}");
    }
}

/// RFC 9110 §14: a stored 200 answers single ranges with 206 and `Content-Range`, all
/// unsatisfiable ranges with 416 `bytes */len`, several ranges and a failed `If-Range`
/// with the whole 200. A miss for `bytes=0-` is fetched without Range and fills the
/// cache; other ranges on a miss reach the origin as sent.
pub fn range_from_cache(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    let body = patterned(1000);
    let get = |path: &str, headers: &[(&str, &str)]| proxy.get_with(path, headers);
    let r = get("/rg/obj", &[("Range", "bytes=0-")]);
    assert_eq!((r.status, r.body.len()), (200, 1000));
    let seen = ctx.origin.requests();
    let fetched = seen
        .iter()
        .find(|q| q.path == "/rg/obj")
        .expect("origin request");
    assert_eq!(
        fetched.headers.get("range"),
        None,
        "bytes=0- is fetched whole"
    );
    for (range, first, last) in [
        ("bytes=10-19", 10, 19),
        ("bytes=-5", 995, 999),
        ("bytes=990-2000", 990, 999),
        ("bytes=0-0", 0, 0),
    ] {
        let r = get("/rg/obj", &[("Range", range)]);
        assert_eq!(r.status, 206, "{range}");
        assert!(CacheStatus::of(&r).has("hit"), "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {first}-{last}/1000").as_str()),
            "{range}"
        );
        assert_eq!(r.body, &body[first..=last], "{range}");
        assert_eq!(r.header("etag"), Some("\"rg1\""));
    }
    let r = get("/rg/obj", &[("Range", "bytes=1000-")]);
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */1000"));
    for headers in [
        &[("Range", "bytes=0-1, 5-6")][..],
        &[("Range", "bytes=0-0"), ("If-Range", "\"other\"")][..],
        &[("Range", "items=0-1")][..],
    ] {
        let r = get("/rg/obj", headers);
        assert_eq!((r.status, r.body.len()), (200, 1000), "{headers:?}");
    }
    let r = get(
        "/rg/obj",
        &[("Range", "bytes=0-0"), ("If-Range", "\"rg1\"")],
    );
    assert_eq!((r.status, r.body.as_slice()), (206, &body[..1]));
    let r = proxy.request("HEAD", "/rg/obj", &[("Range", "bytes=0-0")], b"");
    assert_eq!(r.status, 200, "Range applies to GET only");
    assert_eq!(
        ctx.origin.count("/rg/obj"),
        1,
        "every range came from the cache"
    );

    // Another range on a miss reaches the origin as sent.
    get("/rg/other", &[("Range", "bytes=5-9")]);
    let seen = ctx.origin.requests();
    let fetched = seen
        .iter()
        .find(|q| q.path == "/rg/other")
        .expect("origin request");
    assert_eq!(fetched.headers.get("range"), Some("bytes=5-9"));
}

/// `cache.bypass`: a path prefix, a request header or a cookie keeps a request away from
/// the cache (`fwd=bypass; detail=bypass-rule`, nothing stored or served); others still hit.
pub fn bypass_rules(ctx: &mut Ctx<'_>) {
    let mut v: Value = serde_json::from_str(&shipped_plugin_config()).expect("shipped JSON");
    v["cache"]["bypass"] = serde_json::json!({
        "path_prefixes": ["/bp/admin"],
        "headers": ["x-debug"],
        "cookies": ["session"]
    });
    let proxy = ctx.proxy(&v.to_string());
    let bypassed = |path: &str, headers: &[(&str, &str)]| {
        for _ in 0..2 {
            let r = proxy.get_with(path, headers);
            assert_eq!(r.status, 200);
            let cs = CacheStatus::of(&r);
            assert_eq!(cs.param("fwd"), Some("bypass"), "{path} {headers:?}");
            assert_eq!(
                cs.param("detail"),
                Some("bypass-rule"),
                "{path} {headers:?}"
            );
        }
    };
    bypassed("/bp/admin/users", &[]);
    assert_eq!(ctx.origin.count("/bp/admin/users"), 2);
    // Stored by a plain request, the entry is still not served to a bypassing one.
    assert!(!CacheStatus::of(&proxy.get("/bp/page")).has("hit"));
    assert!(CacheStatus::of(&proxy.get("/bp/page")).has("hit"));
    bypassed("/bp/page", &[("X-Debug", "1")]);
    bypassed("/bp/page", &[("Cookie", "theme=dark; session=abc")]);
    assert_eq!(ctx.origin.count("/bp/page"), 5);
    let r = proxy.get_with("/bp/page", &[("Cookie", "sessionid=1")]);
    assert!(
        CacheStatus::of(&r).has("hit"),
        "only the exact cookie name bypasses"
    );
}

/// `cache.query`: dropped parameters (`utm_*`, `fbclid`) and parameter order neither split
/// entries nor reach the origin, which sees the target that was keyed; a name spelt
/// differently (`utm%5Fsource`) is another parameter, kept and forwarded.
pub fn query_key_policy(ctx: &mut Ctx<'_>) {
    let mut v: Value = serde_json::from_str(&shipped_plugin_config()).expect("shipped JSON");
    v["cache"]["query"] = serde_json::json!({"drop": ["utm_*", "fbclid"], "sort": true});
    let proxy = ctx.proxy(&v.to_string());
    for (target, saw, hit) in [
        ("/qk/page?utm_source=a&id=1", "/qk/page?id=1", false),
        ("/qk/page?id=1&utm_medium=b&fbclid=z", "/qk/page?id=1", true),
        ("/qk/page?id=1", "/qk/page?id=1", true),
        ("/qk/page?z=1&id=1", "/qk/page?id=1&z=1", false),
        ("/qk/page?id=1&z=1", "/qk/page?id=1&z=1", true),
        ("/qk/page?utm_x=1", "/qk/page", false),
        ("/qk/page?utm%5Fsource=1", "/qk/page?utm%5Fsource=1", false),
    ] {
        let r = proxy.get(target);
        assert_eq!(r.text(), format!("origin saw {saw}"), "{target}");
        assert_eq!(CacheStatus::of(&r).has("hit"), hit, "{target}");
    }
    let fetched: Vec<String> = ctx
        .origin
        .requests()
        .into_iter()
        .filter(|q| q.path.starts_with("/qk/"))
        .map(|q| q.path)
        .collect();
    assert_eq!(
        fetched,
        [
            "/qk/page?id=1",
            "/qk/page?id=1&z=1",
            "/qk/page",
            "/qk/page?utm%5Fsource=1"
        ],
        "the origin receives exactly what is keyed"
    );
    // RFC 9111 §4.4: an unsafe method invalidates the entry its target is keyed under.
    let r = proxy.request("POST", "/qk/page?utm_source=z&id=1", &[], b"x");
    assert_eq!(r.status, 200);
    assert!(!CacheStatus::of(&proxy.get("/qk/page?id=1")).has("hit"));
}

/// `cache.key_headers` and `cache.key_cookies`: each value of a named header or cookie is
/// its own entry (the origin never said `Vary`), other cookies do not split entries, and a
/// PURGE of the URL removes them all.
pub fn key_headers_and_cookies(ctx: &mut Ctx<'_>) {
    let mut v: Value = serde_json::from_str(&hostile::hostile_config()).expect("JSON");
    v["cache"]["key_headers"] = serde_json::json!(["x-device"]);
    v["cache"]["key_cookies"] = serde_json::json!(["lang"]);
    let proxy = ctx.proxy(&v.to_string());
    let ask = |headers: &[(&str, &str)]| {
        let r = proxy.get_with("/kp/page", headers);
        assert_eq!(r.status, 200);
        (r.text(), CacheStatus::of(&r).has("hit"))
    };
    for (headers, body, hit, fetches) in [
        (
            &[("X-Device", "mobile")][..],
            "device=mobile cookie=-",
            false,
            1,
        ),
        (
            &[("X-Device", "desktop")][..],
            "device=desktop cookie=-",
            false,
            2,
        ),
        (
            &[("X-Device", "mobile")][..],
            "device=mobile cookie=-",
            true,
            2,
        ),
        (
            &[("Cookie", "lang=fr; theme=dark")][..],
            "device=- cookie=lang=fr; theme=dark",
            false,
            3,
        ),
        (
            &[("Cookie", "theme=light; lang=fr")][..],
            "device=- cookie=lang=fr; theme=dark",
            true,
            3,
        ),
        (
            &[("Cookie", "lang=de")][..],
            "device=- cookie=lang=de",
            false,
            4,
        ),
        (&[][..], "device=- cookie=-", false, 5),
    ] {
        let (text, was_hit) = ask(headers);
        assert_eq!((text.as_str(), was_hit), (body, hit), "{headers:?}");
        assert_eq!(ctx.origin.count("/kp/page"), fetches, "{headers:?}");
    }
    let purge = proxy.request(
        "PURGE",
        "/kp/page",
        &[("x-purge-token", hostile::PURGE_TOKEN)],
        b"",
    );
    assert_eq!(purge.status, 200, "{}", purge.text());
    let (_, was_hit) = ask(&[("X-Device", "mobile")]);
    assert!(
        !was_hit,
        "a purge of the URL removes every key part's entry"
    );
}

/// Purge by tag (`Surrogate-Key` on the PURGE removes every entry whose response listed
/// one of the tags) and soft purge (`X-Purge-Soft: 1` marks entries stale instead: a
/// `stale-while-revalidate` entry is still served while it refreshes in the background).
pub fn tag_and_soft_purge(ctx: &mut Ctx<'_>) {
    let proxy = ctx.proxy(&hostile::hostile_config());
    let token = ("x-purge-token", hostile::PURGE_TOKEN);
    let hit = |path: &str| CacheStatus::of(&proxy.get(path)).has("hit");
    for path in ["/tp/a", "/tp/b", "/tp/c"] {
        proxy.get(path);
        assert!(hit(path), "{path}");
    }
    let r = proxy.request(
        "PURGE",
        "/",
        &[token, ("Surrogate-Key", "nothing group-1")],
        b"",
    );
    assert_eq!((r.status, r.text().trim()), (200, r#"{"purged":2}"#));
    assert!(!hit("/tp/a") && !hit("/tp/b"), "tagged group-1: removed");
    assert!(hit("/tp/c"), "group-2 stays");
    let r = proxy.request("PURGE", "/", &[("Surrogate-Key", "group-2")], b"");
    assert_eq!(r.status, 403, "the token is required for tags too");

    let before = ctx.origin.count("/tp/s");
    let first = proxy.get("/tp/s").text();
    assert!(hit("/tp/s"));
    let soft = [
        token,
        ("Surrogate-Key", "soft-group"),
        ("X-Purge-Soft", "1"),
    ];
    let r = proxy.request("PURGE", "/", &soft, b"");
    assert_eq!((r.status, r.text().trim()), (200, r#"{"purged":1}"#));
    // Stale now, but within stale-while-revalidate: served at once, refreshed behind.
    let r = proxy.get("/tp/s");
    assert_eq!(r.text(), first, "the stale entry is still served");
    let cs = CacheStatus::of(&r);
    assert_eq!(cs.param("detail"), Some("stale-while-revalidate"), "{cs:?}");
    poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let r = proxy.get("/tp/s");
        (r.text() != first && CacheStatus::of(&r).has("hit")).then_some(())
    })
    .expect("the background refresh stored a new response");
    assert_eq!(ctx.origin.count("/tp/s"), before + 2);

    // A soft purge by URL: the next request revalidates instead of hitting.
    let r = proxy.request("PURGE", "/tp/c", &[token, ("X-Purge-Soft", "true")], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = proxy.get("/tp/c");
    assert_eq!(CacheStatus::of(&r).param("fwd"), Some("stale"));
    assert_eq!(ctx.origin.count("/tp/c"), 2);
}

/// `t` as an RFC 850 date (`Sunday, 06-Nov-94 08:49:37 GMT`), from its IMF-fixdate.
pub fn rfc850(t: std::time::SystemTime) -> String {
    let imf = httpdate::fmt_http_date(t);
    let p: Vec<&str> = imf.split([' ', ',']).filter(|s| !s.is_empty()).collect();
    let day = match p[0] {
        "Mon" => "Monday",
        "Tue" => "Tuesday",
        "Wed" => "Wednesday",
        "Thu" => "Thursday",
        "Fri" => "Friday",
        "Sat" => "Saturday",
        _ => "Sunday",
    };
    format!("{day}, {}-{}-{} {} GMT", p[1], p[2], &p[3][2..], p[4])
}

/// `t` as an asctime date (`Sun Nov  6 08:49:37 1994`), from its IMF-fixdate.
pub fn asctime(t: std::time::SystemTime) -> String {
    let imf = httpdate::fmt_http_date(t);
    let p: Vec<&str> = imf.split([' ', ',']).filter(|s| !s.is_empty()).collect();
    let day: u32 = p[1].parse().expect("day");
    format!("{} {} {day:>2} {} {}", p[0], p[2], p[4], p[3])
}

/// RFC 9110 §5.6.7: every date the cache reads is accepted in all three formats: `Expires`
/// and `Date` in RFC 850 and asctime form give the entry its lifetime, and an asctime
/// `Last-Modified` answers an RFC 850 `If-Modified-Since` with a 304 from the cache.
pub fn http_date_formats(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    for path in ["/dt/rfc850", "/dt/asctime"] {
        assert_eq!(proxy.get(path).status, 200);
        let r = proxy.get(path);
        let ttl = hit_ttl(&r);
        assert!(
            (590..=600).contains(&ttl),
            "{path}: ttl {ttl} from Expires - Date"
        );
        assert_eq!(ctx.origin.count(path), 1, "{path}");
    }
    let r = proxy.get("/dt/last-modified");
    let lm = r
        .header("last-modified")
        .expect("Last-Modified")
        .to_string();
    assert_eq!(
        lm.split_whitespace().count(),
        5,
        "asctime passed through: {lm}"
    );
    let since = rfc850(httpdate::parse_http_date(&lm).expect("asctime parses"));
    let r = proxy.get_with(
        "/dt/last-modified",
        &[("If-Modified-Since", since.as_str())],
    );
    assert_eq!(
        r.status, 304,
        "If-Modified-Since {since} against Last-Modified {lm}"
    );
    assert!(CacheStatus::of(&r).has("hit"));
    assert_eq!(ctx.origin.count("/dt/last-modified"), 1);
}

/// RFC 9213: a valid `CDN-Cache-Control` decides over `Cache-Control` (its `max-age` stores a
/// `no-store` response, its `no-store` refuses a `max-age` one), an invalid one is ignored,
/// a field not on the target list has no effect, and `cache.targeted_cache_control` names
/// the operator's own fields, the first listed valid one winning. The fields pass through.
pub fn targeted_cache_control(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    let twice = |proxy: &dyn Proxy, path: &str| -> Response {
        let first = proxy.get(path);
        assert_eq!(first.status, 200, "{path}");
        proxy.get(path)
    };
    let r = twice(proxy.as_ref(), "/tcc/cdn");
    assert!(
        CacheStatus::of(&r).has("hit"),
        "{:?}",
        r.header("cache-status")
    );
    assert_eq!(r.text(), "cdn decides");
    assert_eq!(r.header("cdn-cache-control"), Some("max-age=600"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(ctx.origin.count("/tcc/cdn"), 1);
    for path in ["/tcc/cdn-no-store", "/tcc/edge"] {
        let r = twice(proxy.as_ref(), path);
        assert_not_hit(&r);
        assert_eq!(ctx.origin.count(path), 2, "{path}");
    }
    let r = twice(proxy.as_ref(), "/tcc/cdn-invalid");
    assert!(
        CacheStatus::of(&r).has("hit"),
        "an invalid CDN-Cache-Control is ignored"
    );
    assert_eq!(ctx.origin.count("/tcc/cdn-invalid"), 1);

    let mut v: Value = serde_json::from_str(&shipped_plugin_config()).expect("shipped JSON");
    v["cache"]["targeted_cache_control"] =
        serde_json::json!(["edge-cache-control", "cdn-cache-control"]);
    let proxy = ctx.proxy(&v.to_string());
    let r = twice(proxy.as_ref(), "/tcc/edge-2");
    assert!(
        CacheStatus::of(&r).has("hit"),
        "{:?}",
        r.header("cache-status")
    );
    assert_eq!(r.header("edge-cache-control"), Some("max-age=600"));
    assert_eq!(ctx.origin.count("/tcc/edge-2"), 1);
    let r = twice(proxy.as_ref(), "/tcc/both");
    assert_not_hit(&r);
    assert_eq!(
        ctx.origin.count("/tcc/both"),
        2,
        "Edge-Cache-Control: no-store comes first"
    );
}

/// Bodies over `max_entry_bytes` pass intact and are not stored, whether the length is
/// declared (refused at the headers) or the chunks overflow.
pub fn over_limit_body(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    let want = patterned(OVER_LIMIT);
    for n in 1..=2 {
        let r = proxy.get("/big/length");
        assert_eq!(r.status, 200);
        assert!(r.body == want, "/big/length: body corrupted on request {n}");
        assert_eq!(
            r.header("content-length"),
            Some(OVER_LIMIT.to_string().as_str())
        );
        assert_eq!(
            r.header("cache-status"),
            Some("edge-filter; fwd=uri-miss; fwd-status=200; detail=too-large")
        );
        assert_eq!(ctx.origin.count("/big/length"), n);

        let r = proxy.get("/big/chunked");
        assert_eq!(r.status, 200);
        assert!(
            r.body == want,
            "/big/chunked: body corrupted on request {n}"
        );
        assert_not_hit(&r);
        assert_eq!(
            ctx.origin.count("/big/chunked"),
            n,
            "an over-limit body must not be stored"
        );
    }
}

/// A body the origin cuts off reaches the client as an error and is not stored; the
/// complete response that follows is.
pub fn truncated_body(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    for path in ["/cut/length", "/cut/chunked"] {
        let first = proxy.try_request("GET", path, &[], b"");
        assert!(
            first.is_err(),
            "{path}: the client must see the truncation, got a complete {:?}",
            first.map(|r| (r.status, r.body.len()))
        );
        let second = proxy.get(path);
        assert_eq!(second.status, 200);
        assert!(second.body == patterned(CUT_BODY), "{path}: body corrupted");
        assert_not_hit(&second);
        assert_eq!(
            ctx.origin.count(path),
            2,
            "{path}: the cut-off response was stored"
        );
        let third = proxy.get(path);
        assert!(third.body == patterned(CUT_BODY));
        hit_ttl(&third);
        assert_eq!(ctx.origin.count(path), 2);
    }
}

/// Every response that is not a health probe carries the filter's Cache-Status member,
/// after the upstream's own (RFC 9211).
pub fn cache_status_on_every_response(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    let r = proxy.get("/cs/layered");
    assert_eq!(
        r.headers.get_all("cache-status").join(", "),
        "origin-cache; hit, edge-filter; fwd=uri-miss; fwd-status=200; stored",
        "RFC 9211: each cache appends its member after the upstream's"
    );
    hit_ttl(&proxy.get("/cs/layered"));

    let post = proxy.request(
        "POST",
        "/cs/form",
        &[("Content-Type", "text/plain")],
        b"data",
    );
    assert_eq!(post.text(), "POST data");
    assert_eq!(
        post.header("cache-status"),
        Some("edge-filter; fwd=method; fwd-status=200")
    );
    let get = proxy.get("/cs/form");
    assert_eq!(get.text(), "GET ");
    assert_not_hit(&get);
    assert_eq!(
        ctx.origin.count("/cs/form"),
        2,
        "POST is never answered from the cache"
    );
    let head = proxy.request("HEAD", "/cs/form", &[], b"");
    hit_ttl(&head);

    let missing = proxy.get("/cs/missing");
    assert_eq!(missing.status, 404);
    let cs = CacheStatus::of(&missing);
    assert_eq!(cs.param("fwd-status"), Some("404"), "{cs:?}");
    let no_cache = proxy.get_with("/cs/layered", &[("Cache-Control", "no-cache")]);
    assert_eq!(CacheStatus::of(&no_cache).param("fwd"), Some("request"));
}

/// `edge_filter_requests_total` counts hits and misses by `cache_result`, with the same
/// names and labels in both proxies.
pub fn metrics_requests_by_cache_result(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    let requests = |m: &Exposition, result: &str| {
        m.value(
            "edge_filter_requests_total",
            &[("cache_result", result), ("status_class", "2xx")],
        )
        .unwrap_or(0.0)
    };
    let stores = |m: &Exposition| {
        m.value("edge_filter_cache_stores_total", &[])
            .unwrap_or(0.0)
    };
    let before = proxy.metrics();
    assert_eq!(proxy.get("/metrics/m").text(), "metric body"); // miss, stored
    for _ in 0..3 {
        assert_eq!(proxy.get("/metrics/m").text(), "metric body"); // hits
    }
    assert_eq!(ctx.origin.count("/metrics/m"), 1);

    // Counted when each request ends, which may be just after the client has the reply.
    let want = |m: &Exposition| {
        (
            requests(m, "hit") - requests(&before, "hit"),
            requests(m, "miss") - requests(&before, "miss"),
        )
    };
    let after = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        let m = proxy.metrics();
        (want(&m) == (3.0, 1.0)).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "requests_total moved by (hit, miss) = {:?}, want (3, 1)",
            want(&proxy.metrics())
        )
    });
    assert_eq!(stores(&after) - stores(&before), 1.0);
    assert_eq!(after.type_of("edge_filter_requests_total"), Some("counter"));
    for s in after.named("edge_filter_requests_total") {
        assert_eq!(s.labels.len(), 2, "{s:?}");
        assert!(
            ["hit", "miss", "stale", "bypass", "uncacheable"]
                .contains(&s.label("cache_result").unwrap_or("")),
            "{s:?}"
        );
        assert!(
            ["1xx", "2xx", "3xx", "4xx", "5xx", "other"]
                .contains(&s.label("status_class").unwrap_or("")),
            "{s:?}"
        );
    }
}

/// Concurrent misses for one URL (spread over the workers by the kernel) send one request
/// upstream; the others are held (the filter pauses them) and answered from the stored
/// response when it lands (resumed through another context's callback, a tick across
/// workers), reported as RFC 9211 `collapsed`.
pub fn coalesced_misses(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    let addr = proxy.listener();
    let barrier = Arc::new(std::sync::Barrier::new(COALESCE_CLIENTS));
    let clients: Vec<_> = (0..COALESCE_CLIENTS)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                http::send(addr, "GET", "/co/slow", &[], b"")
                    .unwrap_or_else(|e| panic!("client {i}: {e}"))
            })
        })
        .collect();
    let results: Vec<Response> = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect();
    let statuses: Vec<_> = results.iter().map(|r| r.header("cache-status")).collect();
    assert_eq!(
        ctx.origin.count("/co/slow"),
        1,
        "one request upstream; Cache-Status seen: {statuses:?}"
    );
    let mut leaders = 0;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.status, 200, "client {i}");
        assert_eq!(
            r.text(),
            "slow response #0",
            "client {i}: the leader's body"
        );
        let cs = CacheStatus::of(r);
        if cs.has("collapsed") {
            assert!(!cs.has("stored"), "client {i}: {cs:?}");
        } else {
            assert!(cs.has("stored"), "client {i} (leader): {cs:?}");
            leaders += 1;
        }
    }
    assert_eq!(leaders, 1, "one leader, the others collapsed: {statuses:?}");
}

/// RFC 9111 §4.3: a stale entry with an ETag is forwarded with `If-None-Match` (a request
/// header the filter adds), and the origin's 304 freshens it: the client gets the stored
/// body with the 304's fields (the filter replaces the response while its headers are
/// being filtered), and the next request is a hit.
pub fn revalidated_by_304(ctx: &mut Ctx<'_>) {
    let proxy = ctx.shipped();
    let r = proxy.get("/rv/etag");
    assert_eq!(r.status, 200);
    assert!(
        CacheStatus::of(&r).has("stored"),
        "{:?}",
        r.header("cache-status")
    );
    std::thread::sleep(Duration::from_millis(2100));

    let r = proxy.get("/rv/etag");
    assert_eq!(r.status, 200, "the client asked unconditionally");
    assert_eq!(r.text(), "revalidated body", "the stored body");
    assert_eq!(r.header("x-version"), Some("2"), "the 304's field");
    let cs = CacheStatus::of(&r);
    assert_eq!(cs.param("fwd"), Some("stale"), "{cs:?}");
    assert_eq!(cs.param("fwd-status"), Some("304"), "{cs:?}");
    let seen = ctx.origin.requests();
    let last = seen
        .iter()
        .rev()
        .find(|q| q.path == "/rv/etag")
        .expect("the origin saw the revalidation");
    assert_eq!(
        last.headers.get("if-none-match"),
        Some("\"rv1\""),
        "the filter's validator reached the origin"
    );

    let r = proxy.get("/rv/etag");
    assert!(
        CacheStatus::of(&r).has("hit"),
        "{:?}",
        r.header("cache-status")
    );
    assert_eq!(r.text(), "revalidated body");
    assert_eq!(r.header("x-version"), Some("2"));
}

/// `/readyz` follows the upstream: pass, fail within a bounded wait after the origin
/// stops, pass again after it restarts; never forwarded.
pub fn readyz_follows_upstream(ctx: &mut Ctx<'_>) {
    let proxy = ctx.proxy(FAST_HEALTH);
    let checks_before = ctx.origin.count("/");

    let r = wait_readyz(proxy.as_ref(), 200, Duration::from_secs(10));
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

    // By default an upstream that fails its check is a warning: readiness stays 200, so
    // the fleet is not drained while the cache can still answer.
    ctx.origin.stop();
    let upstream_status = |doc: &Value| doc["checks"]["upstream:responseTime"][0]["status"].clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    let doc = loop {
        let r = proxy.get("/readyz");
        assert_eq!(
            r.status, 200,
            "readiness must not fail on the origin by default"
        );
        let doc = health_json(&r);
        if upstream_status(&doc) == "fail" || Instant::now() > deadline {
            break doc;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(upstream_status(&doc), "fail", "{doc}");
    assert_eq!(status_of(&doc), "warn");
    ctx.origin.restart();
    wait_readyz(proxy.as_ref(), 200, Duration::from_secs(10));

    // `upstream_failure: fail` is the old, strict behaviour.
    let proxy = ctx.proxy(FAST_HEALTH_STRICT);
    wait_readyz(proxy.as_ref(), 200, Duration::from_secs(10));
    ctx.origin.stop();
    let r = wait_readyz(proxy.as_ref(), 503, Duration::from_secs(5));
    assert_eq!(status_of(&health_json(&r)), "fail");

    ctx.origin.restart();
    let r = wait_readyz(proxy.as_ref(), 200, Duration::from_secs(10));
    assert_eq!(status_of(&health_json(&r)), "pass");

    assert_eq!(
        ctx.origin.count("/readyz"),
        0,
        "/readyz must not reach the origin"
    );
    // Passing again took at least one check that reached the restarted origin.
    assert!(
        ctx.origin.count("/") > checks_before,
        "the filter's health checks reach GET /"
    );
}

/// A plugin JSON the filter refuses stops the proxy from starting, with a message that
/// names the field.
pub fn bad_config_refused(ctx: &mut Ctx<'_>) {
    for (config, field) in [
        (r#"{"cache": {"max_entries": "lots"}}"#, "max_entries"),
        (r#"{"nope": 1}"#, "nope"),
    ] {
        let text = ctx
            .launcher()
            .refuses(ctx.origin.port(), config)
            .unwrap_or_else(|e| panic!("{config}: {e}"));
        assert!(
            text.contains(field),
            "nothing names `{field}` for {config}:\n{text}"
        );
    }
}
