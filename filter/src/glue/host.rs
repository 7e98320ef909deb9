//! Host services: shared data, time and metrics, over the SDK's host calls.

use super::abi::{self, HostError, MetricKind};
use crate::cache::store::{SetError, SharedData};
use crate::metrics::{self as names, CacheResult, STATUS_CLASSES};

/// Proxy-Wasm shared data (one map per `vm_id`, shared by all workers).
pub struct HostShared;

impl SharedData for HostShared {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        abi::shared_get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        match abi::shared_set(key, value, cas) {
            Ok(()) => Ok(()),
            Err(HostError::CAS_MISMATCH) => Err(SetError::CasMismatch),
            Err(_) => Err(SetError::Host),
        }
    }
}

/// Wall-clock time in Unix milliseconds, from the host.
pub fn now_ms() -> u64 {
    abi::now_ns() / 1_000_000
}

/// Wall-clock time in Unix microseconds, for timing the filter's own callbacks.
pub fn now_us() -> u64 {
    abi::now_ns() / 1_000
}

/// Metric ids, defined once per VM. Id 0 means "not defined" and is skipped.
pub struct Metrics {
    requests: [[u32; STATUS_CLASSES.len()]; CacheResult::ALL.len()],
    health: [[u32; 3]; 2],
    purges: [u32; names::PURGE_RESULTS.len()],
    pub served_bytes: u32,
    pub upstream_bytes: u32,
    pub stores: u32,
    pub evictions: u32,
    pub coalesced: u32,
    pub config_failures: u32,
    pub entries: u32,
    pub bytes: u32,
    pub capacity_bytes: u32,
    pub capacity_entries: u32,
    pub upstream_ready: u32,
    pub upstream_response_ms: u32,
    pub cpu_us: u32,
}

fn define(t: MetricKind, name: &str) -> u32 {
    abi::define_metric(t, name).unwrap_or(0)
}

impl Metrics {
    /// Defines every metric, labelled ones for every label value, so that dashboards see
    /// zeros instead of missing series.
    pub fn define() -> Metrics {
        let requests = CacheResult::ALL.map(|r| {
            STATUS_CLASSES.map(|c| define(MetricKind::Counter, &names::requests_name(r, c)))
        });
        let health = ["liveness", "readiness"].map(|p| {
            ["pass", "warn", "fail"].map(|s| define(MetricKind::Counter, &names::health_name(p, s)))
        });
        let purges =
            names::PURGE_RESULTS.map(|r| define(MetricKind::Counter, &names::purges_name(r)));
        use MetricKind::{Counter, Gauge, Histogram};
        Metrics {
            requests,
            health,
            purges,
            served_bytes: define(Counter, names::CACHE_SERVED_BYTES_TOTAL),
            upstream_bytes: define(Counter, names::UPSTREAM_RECEIVED_BYTES_TOTAL),
            stores: define(Counter, names::CACHE_STORES_TOTAL),
            evictions: define(Counter, names::CACHE_EVICTIONS_TOTAL),
            coalesced: define(Counter, names::REQUESTS_COALESCED_TOTAL),
            config_failures: define(Counter, names::CONFIG_FAILURES_TOTAL),
            entries: define(Gauge, names::CACHE_ENTRIES),
            bytes: define(Gauge, names::CACHE_BYTES),
            capacity_bytes: define(Gauge, names::CACHE_CAPACITY_BYTES),
            capacity_entries: define(Gauge, names::CACHE_CAPACITY_ENTRIES),
            upstream_ready: define(Gauge, names::UPSTREAM_READY),
            upstream_response_ms: define(Histogram, names::UPSTREAM_RESPONSE_TIME_MS),
            cpu_us: define(Histogram, names::REQUEST_CPU_TIME_US),
        }
    }

    /// Adds `n` to a counter.
    pub fn add(&self, id: u32, n: u64) {
        if id != 0 && n > 0 {
            abi::increment_metric(id, n.min(i64::MAX as u64) as i64);
        }
    }

    /// Sets a gauge or records a histogram sample.
    pub fn record(&self, id: u32, v: u64) {
        if id != 0 {
            abi::record_metric(id, v);
        }
    }

    /// Counts one request.
    pub fn request(&self, result: CacheResult, status: u32) {
        let id = CacheResult::ALL
            .iter()
            .position(|r| *r == result)
            .and_then(|i| self.requests.get(i))
            .and_then(|row| row.get(names::status_class(status)));
        if let Some(&id) = id {
            self.add(id, 1);
        }
    }

    /// Counts one purge request by its result label.
    pub fn purge(&self, result: &str) {
        let i = names::PURGE_RESULTS.iter().position(|r| *r == result);
        if let Some(&id) = i.and_then(|i| self.purges.get(i)) {
            self.add(id, 1);
        }
    }

    /// Counts one health probe; `probe` 0 is liveness, 1 readiness.
    pub fn health(&self, probe: usize, status: crate::health::Status) {
        let j = status as usize;
        if let Some(id) = self.health.get(probe).and_then(|p| p.get(j)) {
            self.add(*id, 1);
        }
    }
}
