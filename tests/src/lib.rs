//! Support library for the edge-filter end-to-end tests.
//!
//! The tests run the real thing: the release `.wasm` of the filter inside a real Envoy
//! 1.40 ([`Envoy`], configured from the shipped `envoy/envoy.yaml`) and inside the stock
//! Debian nginx with the ngx-proxy-wasm module ([`Nginx`], configured from the shipped
//! `nginx/conf/nginx.conf`), in front of an origin the test controls ([`Upstream`]). The
//! scenarios both proxies must pass are one list ([`scenarios`]). Everything listens on
//! 127.0.0.1 only, every wait is bounded, and every process and thread is stopped when
//! its handle is dropped.
//!
//! The HTTP/1.1 client and server ([`http`]) and the Prometheus text parser
//! ([`prometheus`]) are small, std only, and live here; JSON is `serde_json`. A real
//! Prometheus server for the monitoring tests is [`PrometheusServer`].

#![deny(missing_docs)]

pub mod envoy;
pub mod hostile;
pub mod http;
pub mod nginx;
pub mod prometheus;
pub mod prometheus_server;
pub mod scenarios;
pub mod upstream;

pub use envoy::{Envoy, FailedStart, ScratchDir};
pub use http::{Headers, Response};
pub use nginx::{Nginx, NginxConf};
pub use prometheus::Exposition;
pub use prometheus_server::PrometheusServer;
pub use upstream::{BodyMode, RecordedRequest, Reply, Upstream};

use std::time::{Duration, Instant};

/// Calls `probe` every `every` until it returns `Some`, for at most `timeout`.
/// Returns the last `Some` value, or `None` when time ran out.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// The parts of an RFC 9211 Cache-Status member written by one cache, e.g.
/// `edge-filter; hit; ttl=59` → name `edge-filter`, params `[("hit", None), ("ttl", Some("59"))]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheStatus {
    /// The cache's name (first token).
    pub cache: String,
    /// The parameters in order, with their values if any.
    pub params: Vec<(String, Option<String>)>,
}

/// The filter's name in `Cache-Status`.
pub const CACHE: &str = "edge-filter";

impl CacheStatus {
    /// The filter's member of `r`'s `Cache-Status`; panics, showing the headers, when there
    /// is none.
    pub fn of(r: &Response) -> CacheStatus {
        let value = r
            .header("cache-status")
            .unwrap_or_else(|| panic!("no Cache-Status header in {:?}", r.headers));
        CacheStatus::find(value, CACHE)
            .unwrap_or_else(|| panic!("no `{CACHE}` member in Cache-Status {value:?}"))
    }

    /// Parses the member named `cache` out of a (possibly multi-member) Cache-Status value.
    pub fn find(header: &str, cache: &str) -> Option<CacheStatus> {
        header
            .split(',')
            .map(|member| {
                let mut parts = member.split(';').map(str::trim);
                let name = parts.next().unwrap_or("").to_string();
                let params = parts
                    .filter(|p| !p.is_empty())
                    .map(|p| match p.split_once('=') {
                        Some((k, v)) => (k.trim().to_string(), Some(v.trim().to_string())),
                        None => (p.to_string(), None),
                    })
                    .collect();
                CacheStatus {
                    cache: name,
                    params,
                }
            })
            .find(|m| m.cache == cache)
    }

    /// Whether bare parameter `name` (like `hit` or `stored`) is present.
    pub fn has(&self, name: &str) -> bool {
        self.params.iter().any(|(k, _)| k == name)
    }

    /// The value of parameter `name` (like `fwd` or `ttl`).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_status_members_are_found_by_cache_name() {
        let v = "origin; fwd=uri-miss, edge-filter; hit; ttl=42";
        let m = CacheStatus::find(v, "edge-filter").unwrap();
        assert!(m.has("hit"));
        assert_eq!(m.param("ttl"), Some("42"));
        assert!(!m.has("stored"));
        assert_eq!(
            CacheStatus::find(v, "origin").unwrap().param("fwd"),
            Some("uri-miss")
        );
        assert!(CacheStatus::find(v, "other").is_none());
    }

    #[test]
    fn poll_is_bounded() {
        let start = Instant::now();
        let r: Option<()> = poll(
            Duration::from_millis(100),
            Duration::from_millis(10),
            || None,
        );
        assert!(r.is_none());
        assert!(start.elapsed() < Duration::from_secs(2));
        let mut n = 0;
        assert_eq!(
            poll(Duration::from_secs(1), Duration::from_millis(1), || {
                n += 1;
                (n == 3).then_some(n)
            }),
            Some(3)
        );
    }
}
