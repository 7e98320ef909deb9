//! Metric names. Proxy-Wasm metrics have no labels, so labels are encoded in the name as
//! `<base>.<label>.<value>`; `envoy/envoy.yaml` turns them back into Prometheus labels with
//! `stats_config.stats_tags`. Names follow Prometheus conventions: unit suffix, `_total` on
//! counters. Histograms are integer-valued in Proxy-Wasm, hence milliseconds and microseconds.

/// Requests by cache result and status class (counter).
pub const REQUESTS_TOTAL: &str = "edge_filter_requests_total";
/// Body bytes answered from the cache (counter).
pub const CACHE_SERVED_BYTES_TOTAL: &str = "edge_filter_cache_served_bytes_total";
/// Body bytes received from the upstream (counter).
pub const UPSTREAM_RECEIVED_BYTES_TOTAL: &str = "edge_filter_upstream_received_bytes_total";
/// Responses stored (counter).
pub const CACHE_STORES_TOTAL: &str = "edge_filter_cache_stores_total";
/// Requests that waited for another request's response and were answered from it (counter).
pub const REQUESTS_COALESCED_TOTAL: &str = "edge_filter_requests_coalesced_total";
/// Purge requests by result (counter): `edge_filter_purges_total.result.<r>`.
pub const PURGES_TOTAL: &str = "edge_filter_purges_total";
/// The `result` label values of [`PURGES_TOTAL`].
pub const PURGE_RESULTS: [&str; 4] = ["purged", "not_found", "denied", "error"];
/// Entries evicted to make room (counter).
pub const CACHE_EVICTIONS_TOTAL: &str = "edge_filter_cache_evictions_total";
/// Plugin configurations rejected (counter).
pub const CONFIG_FAILURES_TOTAL: &str = "edge_filter_config_failures_total";
/// Health probe requests by probe and status (counter).
pub const HEALTH_REQUESTS_TOTAL: &str = "edge_filter_health_requests_total";
/// Stored entries (gauge).
pub const CACHE_ENTRIES: &str = "edge_filter_cache_entries";
/// Stored bytes (gauge).
pub const CACHE_BYTES: &str = "edge_filter_cache_bytes";
/// Byte limit (gauge), so that alerts can compare usage with it.
pub const CACHE_CAPACITY_BYTES: &str = "edge_filter_cache_capacity_bytes";
/// Entry limit (gauge).
pub const CACHE_CAPACITY_ENTRIES: &str = "edge_filter_cache_capacity_entries";
/// 1 while the upstream passes its health check, else 0 (gauge).
pub const UPSTREAM_READY: &str = "edge_filter_upstream_ready";
/// Upstream response time, headers received minus request sent (histogram, ms).
pub const UPSTREAM_RESPONSE_TIME_MS: &str = "edge_filter_upstream_response_time_milliseconds";
/// Time spent in the filter's callbacks for one request (histogram, µs).
pub const REQUEST_CPU_TIME_US: &str = "edge_filter_request_cpu_time_microseconds";

/// How the cache dealt with a request; the `cache_result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Answered from the cache.
    Hit,
    /// Not found; forwarded, and the response could be stored.
    Miss,
    /// Found but stale (or needing validation); forwarded.
    Stale,
    /// The cache was not consulted (method, request directives, disabled, purge).
    Bypass,
    /// Looked up and forwarded, but the response could not be stored.
    Uncacheable,
}

impl CacheResult {
    /// All values, for defining every labelled counter up front.
    pub const ALL: [CacheResult; 5] = [
        CacheResult::Hit,
        CacheResult::Miss,
        CacheResult::Stale,
        CacheResult::Bypass,
        CacheResult::Uncacheable,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
            CacheResult::Bypass => "bypass",
            CacheResult::Uncacheable => "uncacheable",
        }
    }
}

/// The `status_class` label values.
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// Index into [`STATUS_CLASSES`] for an HTTP status (0 or out of range is `other`).
pub fn status_class(status: u32) -> usize {
    match status {
        100..=599 => (status / 100 - 1) as usize,
        _ => 5,
    }
}

/// `edge_filter_requests_total.cache_result.<r>.status_class.<c>`.
pub fn requests_name(result: CacheResult, class: &str) -> String {
    format!(
        "{REQUESTS_TOTAL}.cache_result.{}.status_class.{class}",
        result.as_str()
    )
}

/// `edge_filter_purges_total.result.<r>`.
pub fn purges_name(result: &str) -> String {
    format!("{PURGES_TOTAL}.result.{result}")
}

/// `edge_filter_health_requests_total.probe.<p>.status.<s>`.
pub fn health_name(probe: &str, status: &str) -> String {
    format!("{HEALTH_REQUESTS_TOTAL}.probe.{probe}.status.{status}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(STATUS_CLASSES[status_class(200)], "2xx");
        assert_eq!(STATUS_CLASSES[status_class(101)], "1xx");
        assert_eq!(STATUS_CLASSES[status_class(599)], "5xx");
        assert_eq!(STATUS_CLASSES[status_class(0)], "other");
        assert_eq!(STATUS_CLASSES[status_class(600)], "other");
    }

    #[test]
    fn encoded_names_are_sanitiser_safe() {
        // Envoy keeps [a-zA-Z0-9_.]; labels must survive as written.
        let n = requests_name(CacheResult::Uncacheable, "5xx");
        assert_eq!(
            n,
            "edge_filter_requests_total.cache_result.uncacheable.status_class.5xx"
        );
        assert!(n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.'));
        assert_eq!(
            health_name("readiness", "warn"),
            "edge_filter_health_requests_total.probe.readiness.status.warn"
        );
    }
}
