//! Runs a real Prometheus server (Debian's `prometheus`, installed by `envoy/setup.sh`) on
//! 127.0.0.1 for the monitoring tests, and reads its HTTP API: instant queries, alerts,
//! rules and targets.
//!
//! The caller writes the configuration (and the rule files it names) into the server's
//! scratch directory; the server listens on a port the kernel picked for a moment before,
//! and the start is retried if another process took that port in between.

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::envoy::{die_with_parent, ScratchDir};
use crate::http;

/// How long Prometheus may take to answer `/-/ready` (it loads rules and opens its TSDB).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The Prometheus binary: `$PROMETHEUS_BIN`, else `prometheus` on the `PATH`.
pub fn prometheus_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("PROMETHEUS_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("PROMETHEUS_BIN={} is not a file", p.display()))
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("prometheus"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "prometheus not found on PATH: install it with `envoy/setup.sh` (Debian package \
             `prometheus`) or point PROMETHEUS_BIN at a Prometheus 2.x binary"
                .to_string()
        })
}

/// One sample of an instant query's vector result.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The series' labels (with `__name__` when the expression kept it).
    pub labels: serde_json::Map<String, Value>,
    /// The value (`NaN` and infinities included).
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).and_then(Value::as_str)
    }
}

/// An active alert.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    /// Its labels: `alertname`, the rule's labels and the series' labels.
    pub labels: serde_json::Map<String, Value>,
    /// `pending` or `firing`.
    pub state: String,
}

impl Alert {
    /// The value of label `name`, or "" when it has none.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).and_then(Value::as_str).unwrap_or("")
    }
}

/// A running Prometheus on 127.0.0.1. Killed, and its directory removed unless the test
/// panicked, on drop.
pub struct PrometheusServer {
    child: Child,
    addr: SocketAddr,
    dir: ScratchDir,
}

/// Polls `/-/ready` until it answers 200, the process exits, or [`START_TIMEOUT`] passes.
fn wait_ready(child: &mut Child, addr: SocketAddr, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let log = || fs::read_to_string(log).unwrap_or_default();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "prometheus exited with {status} before becoming ready:\n{}",
                log()
            ));
        }
        if matches!(http::send(addr, "GET", "/-/ready", &[], b""), Ok(r) if r.status == 200) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "prometheus not ready after {START_TIMEOUT:?}:\n{}",
                log()
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A free port on 127.0.0.1 at the time of asking.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl PrometheusServer {
    /// A scratch directory for the configuration and rule files, before the server starts.
    pub fn prepare() -> Result<PreparedDir, String> {
        let dir = ScratchDir::new().map_err(|e| format!("creating a temp dir: {e}"))?;
        Ok(PreparedDir { dir })
    }

    /// Starts Prometheus with `<dir>/prometheus.yml` and waits until it is ready.
    pub fn start(prepared: PreparedDir) -> Result<PrometheusServer, String> {
        let bin = prometheus_bin()?;
        let dir = prepared.dir;
        let config = dir.0.join("prometheus.yml");
        if !config.is_file() {
            return Err(format!("{} does not exist", config.display()));
        }
        let mut last_error = String::new();
        for attempt in 1..=3 {
            let port = free_port().map_err(|e| format!("finding a free port: {e}"))?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let log_path = dir.0.join(format!("prometheus-{attempt}.log"));
            let log = fs::File::create(&log_path).map_err(|e| format!("creating the log: {e}"))?;
            let mut cmd = Command::new(&bin);
            cmd.arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.0.join("data").display()
                ))
                // Loopback only: nothing outside this machine may reach it.
                .arg(format!("--web.listen-address={addr}"))
                .arg("--storage.tsdb.retention.time=1d")
                .current_dir(&dir.0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            die_with_parent(&mut cmd);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("starting {}: {e}", bin.display()))?;
            match wait_ready(&mut child, addr, &log_path) {
                Ok(()) => return Ok(PrometheusServer { child, addr, dir }),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = e;
                    // Someone took the port between our look and Prometheus's bind: again.
                    if !last_error.contains("address already in use") {
                        break;
                    }
                }
            }
        }
        Err(last_error)
    }

    fn log_of(&self, attempt: u32) -> String {
        fs::read_to_string(self.dir.0.join(format!("prometheus-{attempt}.log"))).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Where Prometheus listens (127.0.0.1).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything Prometheus logged so far.
    pub fn log(&self) -> String {
        (1..=3).map(|a| self.log_of(a)).collect()
    }

    /// `GET path` on the HTTP API; the `data` member of a `success` answer.
    pub fn api(&self, path: &str) -> Result<Value, String> {
        let r =
            http::send(self.addr, "GET", path, &[], b"").map_err(|e| format!("GET {path}: {e}"))?;
        let doc: Value = serde_json::from_str(&r.text())
            .map_err(|e| format!("GET {path}: {e} in {:?}", r.text()))?;
        if r.status != 200 || doc.get("status").and_then(Value::as_str) != Some("success") {
            return Err(format!("GET {path}: {} {}", r.status, r.text()));
        }
        doc.get("data")
            .cloned()
            .ok_or_else(|| format!("GET {path}: no data in {doc}"))
    }

    /// Evaluates `expr` now (`/api/v1/query`) and returns the samples of its vector (or
    /// the single value of a scalar). A PromQL error is an `Err` with Prometheus's message.
    pub fn query(&self, expr: &str) -> Result<Vec<Sample>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", encode_query_value(expr)))?;
        let result = data.get("result");
        let parse = |v: Option<&Value>| -> Result<f64, String> {
            v.and_then(|v| v.get(1))
                .and_then(Value::as_str)
                .ok_or_else(|| format!("no value in {data}"))?
                .parse::<f64>()
                .map_err(|e| format!("bad value in {data}: {e}"))
        };
        match data.get("resultType").and_then(Value::as_str) {
            Some("vector") => result
                .and_then(Value::as_array)
                .ok_or_else(|| format!("no result in {data}"))?
                .iter()
                .map(|s| {
                    Ok(Sample {
                        labels: s
                            .get("metric")
                            .and_then(Value::as_object)
                            .cloned()
                            .unwrap_or_default(),
                        value: parse(s.get("value"))?,
                    })
                })
                .collect(),
            Some("scalar") => Ok(vec![Sample {
                labels: serde_json::Map::new(),
                value: parse(result)?,
            }]),
            other => Err(format!("unexpected result type {other:?} for {expr}")),
        }
    }

    /// The active alerts (`/api/v1/alerts`), pending and firing.
    pub fn alerts(&self) -> Result<Vec<Alert>, String> {
        let data = self.api("/api/v1/alerts")?;
        Ok(data
            .get("alerts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|a| Alert {
                labels: a
                    .get("labels")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default(),
                state: a
                    .get("state")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            })
            .collect())
    }

    /// Every loaded rule (`/api/v1/rules`), as Prometheus reports it: `name`, `query`,
    /// `type` (`alerting` or `recording`), `health`, `lastError`, ...
    pub fn rules(&self) -> Result<Vec<Value>, String> {
        let data = self.api("/api/v1/rules")?;
        Ok(data
            .get("groups")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|g| {
                g.get("rules")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            })
            .collect())
    }

    /// The scrape targets (`/api/v1/targets`): the `activeTargets` and `droppedTargets`.
    pub fn targets(&self) -> Result<(Vec<Value>, Vec<Value>), String> {
        let data = self.api("/api/v1/targets")?;
        let list = |key| {
            data.get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        Ok((list("activeTargets"), list("droppedTargets")))
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- prometheus log (tail) ---\n{}",
                lines[lines.len().saturating_sub(20)..].join("\n")
            );
        }
    }
}

/// The scratch directory of a Prometheus that has not started yet: write `prometheus.yml`
/// and the files it names here.
pub struct PreparedDir {
    dir: ScratchDir,
}

impl PreparedDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir.0
    }

    /// Writes `contents` to `name` (relative to the directory), creating parent directories.
    pub fn write(&self, name: &str, contents: &str) -> Result<PathBuf, String> {
        let path = self.dir.0.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        fs::write(&path, contents).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    }
}

/// Percent-encodes a query-string value (RFC 3986: everything but unreserved characters).
pub fn encode_query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            encode_query_value(r#"sum(x{a=~"b.*"}[1m]) > 0"#),
            "sum%28x%7Ba%3D~%22b.%2A%22%7D%5B1m%5D%29%20%3E%200"
        );
        assert_eq!(encode_query_value("é+&"), "%C3%A9%2B%26");
    }
}
