//! Runs the stock Debian `/usr/sbin/nginx` with the ngx-proxy-wasm module and the shipped
//! `nginx/conf/nginx.conf`, rendered for one test: a private prefix (pid, logs, temp
//! paths), free ports, the built module and filter, the test's plugin JSON and worker count.
//!
//! nginx runs in the foreground (`daemon off`) as a child of the test, in its own process
//! group, so stopping it (QUIT, then KILL of the whole group) never leaves a worker behind.
//! Every wait is bounded.

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::envoy::{die_with_parent, repo_root, wasm_path, ScratchDir};
use crate::http::{self, Response};
use crate::prometheus::Exposition;

/// How long nginx may take to start its workers (the master compiles the .wasm first:
/// about a second on an idle machine, more while cargo builds alongside).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a reload may take until every new worker runs.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a graceful stop (QUIT) may take before the process group is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often starts are retried when a port picked as free was taken meanwhile.
const PORT_RETRIES: usize = 3;

/// Error-log markers of a problem: any of them fails a test that did not expect it.
pub const LOG_PROBLEMS: [&str; 5] = ["[alert]", "[emerg]", "[crit]", "trapped", "panic"];

/// The environment variable that skips every nginx test (explicitly, never by default).
/// The live monitoring test scrapes nginx as well and is not skipped by it.
pub const SKIP_ENV: &str = "EDGE_FILTER_SKIP_NGINX";

/// Whether the nginx tests are skipped because `EDGE_FILTER_SKIP_NGINX=1` says so.
/// Prints why, so a skip is never silent.
pub fn skipped() -> bool {
    let skip = std::env::var(SKIP_ENV).is_ok_and(|v| v == "1");
    if skip {
        eprintln!("nginx tests skipped: {SKIP_ENV}=1");
    }
    skip
}

/// The nginx binary: `$NGINX_BIN`, else the stock `/usr/sbin/nginx`.
pub fn nginx_bin() -> Result<PathBuf, String> {
    let path = std::env::var_os("NGINX_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "nginx not found at {}: install Debian's nginx with `nginx/prepare.sh` \
             (apt-get install nginx nginx-dev libclang-dev), or set NGINX_BIN; \
             {SKIP_ENV}=1 skips the nginx tests",
            path.display()
        ))
    }
}

/// The module: `$NGX_PROXY_WASM_MODULE`, else `nginx/target/release/libngx_proxy_wasm.so`.
pub fn module_path() -> Result<PathBuf, String> {
    let path = match std::env::var_os("NGX_PROXY_WASM_MODULE") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("nginx/target/release/libngx_proxy_wasm.so"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "nginx module not found at {}: build it with \
             `(cd nginx && NGINX_BUILD_DIR=\"$(./prepare.sh)\" cargo build --release)` \
             (or set NGX_PROXY_WASM_MODULE); {SKIP_ENV}=1 skips the nginx tests",
            path.display()
        ))
    }
}

/// The shipped configuration, `nginx/conf/nginx.conf`.
pub fn shipped_config_path() -> PathBuf {
    repo_root().join("nginx/conf/nginx.conf")
}

/// What a test chooses in the shipped configuration.
#[derive(Clone, Debug)]
pub struct NginxConf {
    /// `worker_processes`.
    pub workers: usize,
    /// The plugin JSON for `proxy_wasm edge_filter '...'`.
    pub plugin_config: String,
    /// The .wasm `proxy_wasm_module` loads (default: the built edge_filter.wasm).
    pub wasm: Option<PathBuf>,
    /// `proxy_wasm_failure_policy` (`open` or `closed`); `None` keeps the shipped value.
    pub failure_policy: Option<String>,
    /// Extra directives for the listener's `server` block (test-only, e.g. `add_header`).
    pub listener_lines: Vec<String>,
}

impl NginxConf {
    /// The shipped configuration with `plugin_config` and `workers` workers.
    pub fn new(workers: usize, plugin_config: &str) -> NginxConf {
        NginxConf {
            workers,
            plugin_config: plugin_config.to_string(),
            wasm: None,
            failure_policy: None,
            listener_lines: Vec::new(),
        }
    }

    /// Loads `wasm` instead of edge_filter.wasm.
    pub fn wasm(mut self, wasm: impl Into<PathBuf>) -> Self {
        self.wasm = Some(wasm.into());
        self
    }

    /// Sets `proxy_wasm_failure_policy`.
    pub fn failure_policy(mut self, policy: &str) -> Self {
        self.failure_policy = Some(policy.to_string());
        self
    }

    /// Adds a directive to the listener's `server` block.
    pub fn listener_line(mut self, line: &str) -> Self {
        self.listener_lines.push(line.to_string());
        self
    }
}

/// Where the rendered configuration points nginx.
#[derive(Clone, Debug)]
pub struct RenderParams<'a> {
    /// Absolute path of the module .so.
    pub module: &'a Path,
    /// Absolute path of the .wasm.
    pub wasm: &'a Path,
    /// Directory for pid, logs and temp paths (replaces `nginx/.run/`).
    pub run_dir: &'a Path,
    /// The listener port (replaces 10000).
    pub listener_port: u16,
    /// The metrics port (replaces 9145).
    pub metrics_port: u16,
    /// The upstream's port (replaces 8080).
    pub upstream_port: u16,
    /// The test's choices.
    pub conf: &'a NginxConf,
}

/// Replaces the one occurrence of `from`; anything else means the shipped file changed
/// shape and the tests would no longer exercise it, so that is an error.
fn replace_once(text: &str, from: &str, to: &str) -> Result<String, String> {
    match text.matches(from).count() {
        1 => Ok(text.replacen(from, to, 1)),
        n => Err(format!(
            "nginx.conf: expected exactly one `{from}`, found {n}; \
             keep the shipped config in the shape tests/src/nginx.rs renders"
        )),
    }
}

/// `s` as the body of an nginx single-quoted string: `\` and `'` are escaped with `\`.
pub fn nginx_quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\'', "\\'")
}

/// The lines of the `proxy_wasm edge_filter '...';` directive: its first and last index.
fn plugin_block(lines: &[&str]) -> Result<(usize, usize), String> {
    let starts: Vec<usize> = (0..lines.len())
        .filter(|&i| {
            lines[i]
                .trim_start()
                .starts_with("proxy_wasm edge_filter '")
        })
        .collect();
    let [start] = starts[..] else {
        return Err(format!(
            "nginx.conf: expected exactly one `proxy_wasm edge_filter '...'` directive, found {}",
            starts.len()
        ));
    };
    let end = (start..lines.len())
        .find(|&i| lines[i].trim_end().ends_with("';"))
        .ok_or("nginx.conf: the `proxy_wasm edge_filter '...` directive never ends with `';`")?;
    Ok((start, end))
}

/// The plugin JSON of the shipped `proxy_wasm edge_filter '...';` directive.
pub fn shipped_plugin_config(template: &str) -> Result<String, String> {
    let lines: Vec<&str> = template.lines().collect();
    let (start, end) = plugin_block(&lines)?;
    let text = lines[start..=end].join("\n");
    let open = text.find('\'').expect("the start line has a quote") + 1;
    let close = text.rfind("';").expect("the end line has `';`");
    let quoted = &text[open..close];
    if quoted.contains('\\') {
        return Err("nginx.conf: escapes in the shipped plugin JSON are not supported".into());
    }
    Ok(quoted.to_string())
}

/// Renders the shipped `nginx/conf/nginx.conf` text for a test run.
pub fn render_config(template: &str, p: &RenderParams<'_>) -> Result<String, String> {
    let path = |what: &str, p: &Path| -> Result<String, String> {
        let s = p.to_str().ok_or(format!("{what} path is not UTF-8"))?;
        if !p.is_absolute() {
            return Err(format!("{what} path must be absolute, got {s}"));
        }
        // nginx would split a path with blanks or `;` into several tokens.
        if s.contains(|c: char| c.is_whitespace() || c == ';' || c == '\'' || c == '"') {
            return Err(format!(
                "{what} path has characters nginx.conf cannot hold: {s}"
            ));
        }
        Ok(s.to_string())
    };
    let module = path("module", p.module)?;
    let wasm = path("wasm", p.wasm)?;
    let run = path("run directory", p.run_dir)?;
    let t = replace_once(
        template,
        "load_module nginx/target/release/libngx_proxy_wasm.so;",
        &format!("load_module {module};"),
    )?;
    let t = replace_once(
        &t,
        "worker_processes auto;",
        &format!("worker_processes {};", p.conf.workers),
    )?;
    // Checked, not changed: the pid file must be under nginx/.run/ (replaced below).
    replace_once(&t, "pid nginx/.run/nginx.pid;", "")?;
    // Tests log at info: the filter's own lines help when something fails.
    let t = replace_once(
        &t,
        "error_log nginx/.run/error.log notice;",
        "error_log nginx/.run/error.log info;",
    )?;
    let t = t.replace("nginx/.run/", &format!("{run}/"));
    let t = replace_once(
        &t,
        "listen 127.0.0.1:10000;",
        &format!(
            "listen 127.0.0.1:{};{}",
            p.listener_port,
            p.conf
                .listener_lines
                .iter()
                .map(|l| format!("\n        {l}"))
                .collect::<String>()
        ),
    )?;
    let t = replace_once(
        &t,
        "listen 127.0.0.1:9145;",
        &format!("listen 127.0.0.1:{};", p.metrics_port),
    )?;
    let t = replace_once(
        &t,
        "server 127.0.0.1:8080;",
        &format!("server 127.0.0.1:{};", p.upstream_port),
    )?;
    let t = replace_once(
        &t,
        "proxy_wasm_module edge_filter target/wasm32-wasip1/release/edge_filter.wasm;",
        &format!("proxy_wasm_module edge_filter {wasm};"),
    )?;
    let t = match &p.conf.failure_policy {
        None => t,
        Some(policy) => replace_once(
            &t,
            "proxy_wasm_failure_policy open;",
            &format!("proxy_wasm_failure_policy {policy};"),
        )?,
    };
    let lines: Vec<&str> = t.lines().collect();
    let (start, end) = plugin_block(&lines)?;
    let indent = &lines[start][..lines[start].len() - lines[start].trim_start().len()];
    let mut out: Vec<String> = lines[..start].iter().map(|l| l.to_string()).collect();
    out.push(format!(
        "{indent}proxy_wasm edge_filter '{}';",
        nginx_quote(&p.conf.plugin_config)
    ));
    out.extend(lines[end + 1..].iter().map(|l| l.to_string()));
    Ok(out.join("\n") + "\n")
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
const SIGQUIT: i32 = 3;
const SIGKILL: i32 = 9;

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) touches no memory; a stale pid gets ESRCH, which we ignore.
    unsafe {
        kill(pid, sig);
    }
}

/// A kernel-chosen free port on 127.0.0.1 (free when this returns; a start that loses
/// the race is retried with new ports).
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The pids of `master`'s children whose title is exactly nginx's worker title (workers
/// that are shutting down after a reload say so in their title and are left out).
fn running_workers(master: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // `pid (comm) state ppid ...`: comm may hold anything, so parse after the last `)`.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid != Some(master) {
                return false;
            }
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let title = String::from_utf8_lossy(&cmdline);
            let title = title.trim_end_matches(['\0', ' ']);
            title == "nginx: worker process"
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Tail of a log: the last `n` lines.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Lines of `log` with a problem marker that none of `expected` accounts for.
pub fn unexpected_problems<'a>(log: &'a str, expected: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| LOG_PROBLEMS.iter().any(|p| l.contains(p)))
        .filter(|l| !expected.iter().any(|e| l.contains(e)))
        .collect()
}

/// The result of `nginx -t` on a rendered configuration.
#[derive(Debug)]
pub struct ConfigTest {
    /// Whether nginx accepted it (exit status 0).
    pub accepted: bool,
    /// Everything `nginx -t` printed.
    pub output: String,
}

/// A running nginx with the module; stopped (QUIT, then KILL) on drop. Its directory is
/// removed unless the test panicked.
pub struct Nginx {
    child: Child,
    master: u32,
    dir: ScratchDir,
    conf: NginxConf,
    listener: SocketAddr,
    metrics: SocketAddr,
    upstream_port: u16,
    workers: Vec<u32>,
}

impl Nginx {
    /// Starts nginx with the shipped configuration, `workers` workers and `plugin_config`,
    /// in front of `127.0.0.1:<upstream_port>`. Panics with the logs if it does not start.
    pub fn start(upstream_port: u16, workers: usize, plugin_config: &str) -> Nginx {
        Self::try_start(upstream_port, &NginxConf::new(workers, plugin_config))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts nginx with `conf`; the reason if it does not start.
    pub fn try_start(upstream_port: u16, conf: &NginxConf) -> Result<Nginx, String> {
        let mut last = String::new();
        for _ in 0..PORT_RETRIES {
            match Self::start_once(upstream_port, conf) {
                Ok(n) => return Ok(n),
                Err((e, port_taken)) if port_taken => last = e,
                Err((e, _)) => return Err(e),
            }
        }
        Err(last)
    }

    fn start_once(upstream_port: u16, conf: &NginxConf) -> Result<Nginx, (String, bool)> {
        let fatal = |e: String| (e, false);
        let bin = nginx_bin().map_err(fatal)?;
        let dir = ScratchDir::new().map_err(|e| fatal(format!("creating a temp dir: {e}")))?;
        let (listener_port, metrics_port) = (
            free_port().map_err(|e| fatal(e.to_string()))?,
            free_port().map_err(|e| fatal(e.to_string()))?,
        );
        let conf_path = write_config(&dir.0, listener_port, metrics_port, upstream_port, conf)
            .map_err(fatal)?;
        let stderr = fs::File::create(dir.0.join("stderr.log"))
            .map_err(|e| fatal(format!("creating stderr.log: {e}")))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .current_dir(&dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // Its own process group, so stopping can take every worker with the master.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| fatal(format!("starting {}: {e}", bin.display())))?;
        let master = child.id();
        let mut nginx = Nginx {
            child,
            master,
            dir,
            conf: conf.clone(),
            listener: SocketAddr::from(([127, 0, 0, 1], listener_port)),
            metrics: SocketAddr::from(([127, 0, 0, 1], metrics_port)),
            upstream_port,
            workers: Vec::new(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let logs = nginx.logs();
                let port_taken = logs.contains("Address already in use");
                return Err((
                    format!(
                        "nginx exited with {status} before its workers ran; log:\n{}",
                        tail(&logs, 30)
                    ),
                    port_taken,
                ));
            }
            let workers = running_workers(master);
            if workers.len() == conf.workers {
                nginx.workers = workers;
                return Ok(nginx);
            }
            if Instant::now() >= deadline {
                let logs = nginx.logs();
                return Err(fatal(format!(
                    "nginx: {} of {} workers after {START_TIMEOUT:?}; log:\n{}",
                    workers.len(),
                    conf.workers,
                    tail(&logs, 30)
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `nginx -t` on the shipped configuration rendered with `conf`.
    pub fn test_config(upstream_port: u16, conf: &NginxConf) -> Result<ConfigTest, String> {
        let bin = nginx_bin()?;
        let dir = ScratchDir::new().map_err(|e| format!("creating a temp dir: {e}"))?;
        // `nginx -t` binds nothing, so the shipped ports do.
        let conf_path = write_config(&dir.0, 10000, 9145, upstream_port, conf)?;
        let out = Command::new(&bin)
            .arg("-t")
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&conf_path)
            .current_dir(&dir.0)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {} -t: {e}", bin.display()))?;
        Ok(ConfigTest {
            accepted: out.status.success(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }

    /// The listener (where the filter runs).
    pub fn listener_addr(&self) -> SocketAddr {
        self.listener
    }

    /// The metrics server (`/metrics`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    /// The master's pid.
    pub fn master_pid(&self) -> u32 {
        self.master
    }

    /// The current workers' pids (as of the start or the last reload).
    pub fn worker_pids(&self) -> &[u32] {
        &self.workers
    }

    /// The workers running now (a fresh look at the process table): after a crash the
    /// master starts a new worker, so a changed list means a worker died.
    pub fn running_workers(&self) -> Vec<u32> {
        running_workers(self.master)
    }

    /// The configuration nginx runs with.
    pub fn conf(&self) -> &NginxConf {
        &self.conf
    }

    /// The scratch directory (prefix, logs, temp paths).
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Rewrites the configuration with `conf` (same ports and directory) and reloads.
    pub fn reconfigure(&mut self, conf: &NginxConf) -> Result<(), String> {
        write_config(
            &self.dir.0,
            self.listener.port(),
            self.metrics.port(),
            self.upstream_port,
            conf,
        )?;
        self.conf = conf.clone();
        self.reload()
    }

    /// `nginx -s reload`, as an operator runs it, then waits until all new workers run
    /// (the old ones may still be finishing their requests). An `[emerg]` logged by the
    /// reload (a refused configuration) is an error.
    pub fn reload(&mut self) -> Result<(), String> {
        let bin = nginx_bin()?;
        let log_before = self.error_log().len();
        let out = Command::new(&bin)
            .arg("-p")
            .arg(&self.dir.0)
            .arg("-c")
            .arg(self.dir.0.join("nginx.conf"))
            .args(["-s", "reload"])
            .current_dir(&self.dir.0)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running nginx -s reload: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "nginx -s reload failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let old = self.workers.clone();
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        loop {
            let log = self.error_log();
            let new_lines = log.get(log_before..).unwrap_or("");
            if let Some(l) = new_lines.lines().find(|l| l.contains("[emerg]")) {
                return Err(format!("reload refused: {l}"));
            }
            // Done when the new workers run and no old one still takes connections (an
            // old worker retitles itself "is shutting down" as it stops listening).
            let running = running_workers(self.master);
            let fresh: Vec<u32> = running
                .iter()
                .copied()
                .filter(|p| !old.contains(p))
                .collect();
            if fresh.len() == self.conf.workers && running.len() == fresh.len() {
                self.workers = fresh;
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("nginx exited with {status} during a reload"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "reload: {} new workers of {} after {RELOAD_TIMEOUT:?}; log:\n{}",
                    fresh.len(),
                    self.conf.workers,
                    tail(new_lines, 20)
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.0.join("error.log")).unwrap_or_default()
    }

    /// The JSON access log so far (one line per request).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.0.join("access.log")).unwrap_or_default()
    }

    /// Both logs nginx writes (stderr before the error log opens, then the error log).
    pub fn logs(&self) -> String {
        let stderr = fs::read_to_string(self.dir.0.join("stderr.log")).unwrap_or_default();
        format!("{stderr}{}", self.error_log())
    }

    /// Ok if the logs hold no `[alert]`, `[emerg]`, `[crit]`, trap or panic, except lines
    /// containing one of `expected`; else the offending lines.
    pub fn check_logs(&self, expected: &[&str]) -> Result<(), String> {
        let logs = self.logs();
        let bad = unexpected_problems(&logs, expected);
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "nginx logged {} problem line(s):\n{}",
                bad.len(),
                tail(&bad.join("\n"), 10)
            ))
        }
    }

    /// Sends a request through the listener; an error on any I/O failure.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        http::send(self.listener, method, path, headers, body)
    }

    /// Sends a request through the listener; panics (with the error log) on an I/O error.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.try_request(method, path, headers, body)
            .unwrap_or_else(|e| {
                panic!(
                    "{method} {path} via nginx failed: {e}\nerror log:\n{}",
                    tail(&self.error_log(), 10)
                )
            })
    }

    /// `GET path` through the listener.
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    /// The metrics location's text, parsed.
    pub fn metrics(&self) -> Exposition {
        let r = http::send(self.metrics, "GET", "/metrics", &[], b"")
            .unwrap_or_else(|e| panic!("GET /metrics failed: {e}"));
        assert_eq!(r.status, 200, "/metrics: {}", r.text());
        Exposition::parse(&r.text()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Stops nginx: QUIT (graceful: the master waits for its workers), then, if it is
    /// still running after a bounded wait, KILL to the whole process group.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.master as i32, SIGQUIT);
            let deadline = Instant::now() + QUIT_TIMEOUT;
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            eprintln!("nginx: no exit {QUIT_TIMEOUT:?} after QUIT, killing its process group");
            // The master is not reaped yet, so its pid (the group id) cannot be reused.
            signal(-(self.master as i32), SIGKILL);
            let _ = self.child.wait();
        } else {
            // The master is gone (crashed or killed): kill any worker it left.
            signal(-(self.master as i32), SIGKILL);
        }
    }
}

/// Renders the shipped configuration into `dir/nginx.conf`; returns its path.
fn write_config(
    dir: &Path,
    listener_port: u16,
    metrics_port: u16,
    upstream_port: u16,
    conf: &NginxConf,
) -> Result<PathBuf, String> {
    let module = module_path()?;
    let module = module
        .canonicalize()
        .map_err(|e| format!("{}: {e}", module.display()))?;
    let wasm = match &conf.wasm {
        Some(w) => w.clone(),
        None => wasm_path()?,
    };
    let wasm = wasm
        .canonicalize()
        .map_err(|e| format!("{}: {e}", wasm.display()))?;
    let template_path = shipped_config_path();
    let template = fs::read_to_string(&template_path)
        .map_err(|e| format!("reading {}: {e}", template_path.display()))?;
    let text = render_config(
        &template,
        &RenderParams {
            module: &module,
            wasm: &wasm,
            run_dir: dir,
            listener_port,
            metrics_port,
            upstream_port,
            conf,
        },
    )?;
    let path = dir.join("nginx.conf");
    // Written then renamed: a reload never reads a half-written file.
    let tmp = dir.join("nginx.conf.tmp");
    fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    fs::rename(&tmp, &path).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    Ok(path)
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!(
                "--- nginx logs (tail) ---\n{}\n--- access log (tail) ---\n{}",
                tail(&self.logs(), 20),
                tail(&self.access_log(), 8)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> String {
        fs::read_to_string(shipped_config_path()).expect("nginx/conf/nginx.conf")
    }

    fn render(conf: &NginxConf) -> Result<String, String> {
        render_with(&shipped(), conf)
    }

    fn render_with(template: &str, conf: &NginxConf) -> Result<String, String> {
        render_config(
            template,
            &RenderParams {
                module: Path::new("/abs/mod.so"),
                wasm: Path::new("/abs/f.wasm"),
                run_dir: Path::new("/tmp/run"),
                listener_port: 1111,
                metrics_port: 2222,
                upstream_port: 3333,
                conf,
            },
        )
    }

    #[test]
    fn renders_the_shipped_config() {
        let conf = NginxConf::new(3, r#"{"health": {"check_path": "/it's\\"}}"#)
            .failure_policy("closed")
            .listener_line("add_header X-Worker $pid always;");
        let out = render(&conf).unwrap();
        for needle in [
            "load_module /abs/mod.so;",
            "worker_processes 3;",
            "pid /tmp/run/nginx.pid;",
            "error_log /tmp/run/error.log info;",
            "access_log /tmp/run/access.log edge_json;",
            "proxy_temp_path /tmp/run/proxy;",
            "listen 127.0.0.1:1111;\n        add_header X-Worker $pid always;",
            "listen 127.0.0.1:2222;",
            "server 127.0.0.1:3333;",
            "proxy_wasm_module edge_filter /abs/f.wasm;",
            "proxy_wasm_failure_policy closed;",
            r#"proxy_wasm edge_filter '{"health": {"check_path": "/it\'s\\\\"}}';"#,
        ] {
            assert!(
                out.contains(needle),
                "rendered config lacks {needle:?}:\n{out}"
            );
        }
        for gone in [
            "nginx/.run/",
            "127.0.0.1:10000;",
            "127.0.0.1:9145;",
            "127.0.0.1:8080;",
            "67108864",
        ] {
            assert!(!out.contains(gone), "rendered config still has {gone:?}");
        }
        // What followed the plugin JSON survives.
        assert!(out.contains("proxy_pass http://upstream;"));
        // Without a policy the shipped one stays.
        let out = render(&NginxConf::new(1, "{}")).unwrap();
        assert!(out.contains("proxy_wasm_failure_policy open;"));
    }

    #[test]
    fn shipped_config_has_the_contract_settings() {
        let c = shipped();
        for needle in [
            "worker_processes auto;",
            "proxy_wasm_shm_kv ",
            "proxy_wasm_shm_metrics ",
            "proxy_wasm_failure_policy open;",
            "upstream upstream {",
            "proxy_pass http://upstream;",
            "location = /metrics {",
            "proxy_wasm_metrics;",
        ] {
            assert!(c.contains(needle), "nginx.conf lacks {needle:?}");
        }
        // Loopback only, as Envoy's listener and admin.
        for l in c.lines().filter(|l| l.trim_start().starts_with("listen ")) {
            assert!(l.contains("127.0.0.1:"), "listen not on loopback: {l}");
        }
    }

    #[test]
    fn shipped_plugin_json_equals_envoys() {
        let nginx: serde_json::Value =
            serde_json::from_str(&shipped_plugin_config(&shipped()).unwrap()).unwrap();
        let yaml = fs::read_to_string(repo_root().join("envoy/envoy.yaml")).unwrap();
        let envoy: serde_json::Value =
            serde_json::from_str(&crate::envoy::shipped_plugin_config(&yaml).unwrap()).unwrap();
        assert_eq!(
            nginx, envoy,
            "nginx.conf and envoy.yaml run different filter configs"
        );
    }

    #[test]
    fn shm_zone_holds_the_configured_cache() {
        let c = shipped();
        let json: serde_json::Value =
            serde_json::from_str(&shipped_plugin_config(&c).unwrap()).unwrap();
        let max_total = json
            .pointer("/cache/max_total_bytes")
            .and_then(serde_json::Value::as_u64)
            .expect("max_total_bytes in the shipped JSON");
        let line = c
            .lines()
            .find(|l| l.trim_start().starts_with("proxy_wasm_shm_kv "))
            .unwrap();
        let size = line
            .trim()
            .trim_start_matches("proxy_wasm_shm_kv ")
            .trim_end_matches(';');
        let bytes = match size.strip_suffix('m') {
            Some(m) => m.parse::<u64>().unwrap() << 20,
            None => panic!("proxy_wasm_shm_kv size {size:?}: expected megabytes"),
        };
        assert!(
            bytes >= 2 * max_total,
            "{bytes} bytes cannot hold 2 x {max_total}"
        );
    }

    #[test]
    fn rendering_refuses_a_changed_template() {
        let err = render_with("events {}\n", &NginxConf::new(1, "{}")).unwrap_err();
        assert!(err.contains("load_module"), "{err}");
        let no_json = shipped().replace("proxy_wasm edge_filter '", "proxy_wasm other '");
        let err = render_with(&no_json, &NginxConf::new(1, "{}")).unwrap_err();
        assert!(err.contains("proxy_wasm edge_filter"), "{err}");
    }

    #[test]
    fn quoting_escapes_backslash_and_quote() {
        assert_eq!(nginx_quote(r#"{"a":"b'c\"d"}"#), r#"{"a":"b\'c\\"d"}"#);
    }

    #[test]
    fn problems_are_found_unless_expected() {
        let log = "2026/01/01 [notice] 1#1: start\n\
                   2026/01/01 [error] 2#2: proxy_wasm: filter trapped in on_request_headers\n\
                   2026/01/01 [alert] 1#1: worker process 2 exited on signal 11\n";
        assert_eq!(unexpected_problems(log, &[]).len(), 2);
        assert_eq!(
            unexpected_problems(log, &["filter trapped"]),
            vec!["2026/01/01 [alert] 1#1: worker process 2 exited on signal 11"]
        );
    }
}
