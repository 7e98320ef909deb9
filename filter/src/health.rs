//! `/healthz` and `/readyz` documents in the `application/health+json` format of
//! draft-inadarei-api-health-check: `status`, `version`, `releaseId`, `checks`.

use crate::cache::store::Usage;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The media type of health documents.
pub const CONTENT_TYPE: &str = "application/health+json";

/// Health status (draft §3.1); also a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Healthy.
    Pass,
    /// Healthy, with a concern (answered 200).
    Warn,
    /// Unhealthy (answered 503).
    Fail,
}

impl Status {
    /// The draft's status string and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }

    /// The HTTP status to answer with (draft §3.1: 2xx-3xx for pass and warn, 4xx-5xx for fail).
    pub fn http_status(self) -> u32 {
        match self {
            Status::Pass | Status::Warn => 200,
            Status::Fail => 503,
        }
    }
}

/// The probe being answered; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`.
    Liveness,
    /// `/readyz`.
    Readiness,
}

impl Probe {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Probe::Liveness => "liveness",
            Probe::Readiness => "readiness",
        }
    }
}

/// The latest upstream health check, shared by all workers through shared data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamCheck {
    /// The upstream answered 2xx in time.
    pub ok: bool,
    /// When the check finished (Unix ms).
    pub at_ms: u64,
    /// How long it took.
    pub response_time_ms: u64,
    /// What happened, for people: `200`, `timeout or reset`, `unknown cluster`...
    pub output: String,
}

impl UpstreamCheck {
    /// Serialised for shared data.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Read back; `None` for anything malformed.
    pub fn decode(b: &[u8]) -> Option<UpstreamCheck> {
        serde_json::from_slice(b).ok()
    }
}

/// Everything a health document is built from.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// Now (Unix ms).
    pub now_ms: u64,
    /// When this VM started (Unix ms).
    pub started_ms: u64,
    /// Build identifiers.
    pub version: &'a str,
    /// Build identifiers.
    pub release_id: &'a str,
    /// Latest check, if any.
    pub upstream: Option<&'a UpstreamCheck>,
    /// Cluster checked.
    pub cluster: &'a str,
    /// A result older than this is not trusted.
    pub max_check_age_ms: u64,
    /// Cache usage and limits.
    pub usage: Usage,
    /// Limit on entries.
    pub max_entries: u32,
    /// Limit on bytes.
    pub max_bytes: u64,
    /// Fill ratio that makes readiness `warn`.
    pub warn_ratio: f64,
    /// What a failing upstream check makes readiness.
    pub upstream_failure: UpstreamFailure,
}

/// What a failing upstream check does to readiness; the `health.upstream_failure` value.
///
/// Every replica checks the same origin, so `fail` takes the whole fleet out of its
/// Service at the moment the cache (stale-if-error) could still answer: readiness is
/// about the proxy, and an unhealthy origin is a warning by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamFailure {
    /// Readiness reports `warn` (HTTP 200); the upstream check says `fail`.
    #[default]
    Warn,
    /// Readiness reports `fail` (HTTP 503).
    Fail,
}

/// A document and the status it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Overall status.
    pub status: Status,
    /// The JSON body.
    pub body: String,
}

fn check(component_type: &str, value: Value, unit: &str, status: Status, time: &str) -> Value {
    json!([{
        "componentType": component_type,
        "observedValue": value,
        "observedUnit": unit,
        "status": status.as_str(),
        "time": time,
    }])
}

fn document(status: Status, inputs: &Inputs<'_>, checks: Map<String, Value>) -> Document {
    let body = json!({
        "status": status.as_str(),
        "version": inputs.version,
        "releaseId": inputs.release_id,
        "serviceId": "edge-filter",
        "checks": checks,
    });
    Document {
        status,
        body: body.to_string(),
    }
}

fn uptime(inputs: &Inputs<'_>, time: &str) -> Value {
    let secs = inputs.now_ms.saturating_sub(inputs.started_ms) / 1000;
    check("system", json!(secs), "s", Status::Pass, time)
}

/// Liveness: `pass` whenever the filter can answer at all.
pub fn liveness(inputs: &Inputs<'_>) -> Document {
    let time = rfc3339(inputs.now_ms / 1000);
    let mut checks = Map::new();
    checks.insert("uptime".into(), uptime(inputs, &time));
    document(Status::Pass, inputs, checks)
}

/// Readiness: when the upstream's latest check did not pass recently, `warn` or `fail` as
/// `upstream_failure` says (the upstream check itself says `fail`); `warn` when the cache
/// is fuller than the warn ratio (bytes or entries).
pub fn readiness(inputs: &Inputs<'_>) -> Document {
    let time = rfc3339(inputs.now_ms / 1000);
    let (up_status, up_value, output, up_time) = match inputs.upstream {
        None => (
            Status::Fail,
            Value::Null,
            "no check has completed yet".to_string(),
            time.clone(),
        ),
        Some(c) => {
            let age = inputs.now_ms.saturating_sub(c.at_ms);
            let status = if !c.ok || age > inputs.max_check_age_ms {
                Status::Fail
            } else {
                Status::Pass
            };
            let output = if c.ok && age > inputs.max_check_age_ms {
                format!("last check is {age} ms old")
            } else {
                c.output.clone()
            };
            (
                status,
                json!(c.response_time_ms),
                output,
                rfc3339(c.at_ms / 1000),
            )
        }
    };
    let ratio = |used: f64, max: f64| if max > 0.0 { used / max } else { 0.0 };
    let bytes_ratio = ratio(inputs.usage.bytes as f64, inputs.max_bytes as f64);
    let entries_ratio = ratio(
        f64::from(inputs.usage.entries),
        f64::from(inputs.max_entries),
    );
    let level = |r: f64| {
        if r > inputs.warn_ratio {
            Status::Warn
        } else {
            Status::Pass
        }
    };
    let mut checks = Map::new();
    checks.insert(
        "upstream:responseTime".into(),
        json!([{
            "componentId": inputs.cluster,
            "componentType": "component",
            "observedValue": up_value,
            "observedUnit": "ms",
            "status": up_status.as_str(),
            "time": up_time,
            "output": output,
        }]),
    );
    checks.insert(
        "cache:entries".into(),
        check(
            "datastore",
            json!(inputs.usage.entries),
            "entries",
            level(entries_ratio),
            &time,
        ),
    );
    checks.insert(
        "cache:bytes".into(),
        check(
            "datastore",
            json!(inputs.usage.bytes),
            "bytes",
            level(bytes_ratio),
            &time,
        ),
    );
    checks.insert("uptime".into(), uptime(inputs, &time));
    let upstream_down = up_status == Status::Fail;
    let status = if upstream_down && inputs.upstream_failure == UpstreamFailure::Fail {
        Status::Fail
    } else if upstream_down || bytes_ratio > inputs.warn_ratio || entries_ratio > inputs.warn_ratio
    {
        Status::Warn
    } else {
        Status::Pass
    };
    document(status, inputs, checks)
}

/// Unix seconds as RFC 3339 UTC (`2026-11-28T23:38:21Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date (H. Hinnant's algorithm, proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_373_101_000;

    fn inputs<'a>(up: Option<&'a UpstreamCheck>, usage: Usage) -> Inputs<'a> {
        Inputs {
            now_ms: NOW,
            started_ms: NOW - 5_000,
            version: "0.1.0",
            release_id: "0.1.0+abc",
            upstream: up,
            cluster: "upstream",
            max_check_age_ms: 3_000,
            usage,
            max_entries: 100,
            max_bytes: 1000,
            warn_ratio: 0.9,
            upstream_failure: UpstreamFailure::Fail,
        }
    }

    fn ok(at_ms: u64) -> UpstreamCheck {
        UpstreamCheck {
            ok: true,
            at_ms,
            response_time_ms: 4,
            output: "200".into(),
        }
    }

    fn parse(d: &Document) -> Value {
        serde_json::from_str(&d.body).unwrap()
    }

    #[test]
    fn liveness_passes_with_uptime() {
        let d = liveness(&inputs(None, Usage::default()));
        assert_eq!(d.status, Status::Pass);
        let v = parse(&d);
        assert_eq!(v["status"], "pass");
        assert_eq!(v["version"], "0.1.0");
        assert_eq!(v["releaseId"], "0.1.0+abc");
        assert_eq!(v["checks"]["uptime"][0]["observedValue"], 5);
    }

    #[test]
    fn readiness_follows_the_upstream_check() {
        let up = ok(NOW - 100);
        let d = readiness(&inputs(Some(&up), Usage::default()));
        assert_eq!((d.status, d.status.http_status()), (Status::Pass, 200));
        let v = parse(&d);
        assert_eq!(v["checks"]["upstream:responseTime"][0]["observedValue"], 4);
        assert_eq!(v["checks"]["upstream:responseTime"][0]["status"], "pass");

        let down = UpstreamCheck {
            ok: false,
            output: "503".into(),
            ..ok(NOW - 100)
        };
        let d = readiness(&inputs(Some(&down), Usage::default()));
        assert_eq!((d.status, d.status.http_status()), (Status::Fail, 503));
        assert_eq!(
            parse(&d)["checks"]["upstream:responseTime"][0]["output"],
            "503"
        );

        assert_eq!(
            readiness(&inputs(None, Usage::default())).status,
            Status::Fail
        );
    }

    #[test]
    fn by_default_a_failing_upstream_is_a_warning() {
        // The default: readiness stays 200 (warn) so the fleet keeps serving from cache;
        // the upstream check itself still says fail.
        let down = UpstreamCheck {
            ok: false,
            output: "503".into(),
            ..ok(NOW - 100)
        };
        let warn = |up: Option<&UpstreamCheck>| {
            readiness(&Inputs {
                upstream_failure: UpstreamFailure::default(),
                ..inputs(up, Usage::default())
            })
        };
        let d = warn(Some(&down));
        assert_eq!((d.status, d.status.http_status()), (Status::Warn, 200));
        assert_eq!(
            parse(&d)["checks"]["upstream:responseTime"][0]["status"],
            "fail"
        );
        assert_eq!(warn(None).status, Status::Warn);
        assert_eq!(warn(Some(&ok(NOW - 10_000))).status, Status::Warn);
        assert_eq!(warn(Some(&ok(NOW))).status, Status::Pass);
    }

    #[test]
    fn an_old_check_is_not_trusted() {
        let up = ok(NOW - 10_000);
        let d = readiness(&inputs(Some(&up), Usage::default()));
        assert_eq!(d.status, Status::Fail);
        assert!(parse(&d)["checks"]["upstream:responseTime"][0]["output"]
            .as_str()
            .unwrap()
            .contains("old"));
    }

    #[test]
    fn a_nearly_full_cache_warns() {
        let up = ok(NOW);
        let d = readiness(&inputs(
            Some(&up),
            Usage {
                entries: 10,
                bytes: 950,
            },
        ));
        assert_eq!((d.status, d.status.http_status()), (Status::Warn, 200));
        assert_eq!(parse(&d)["checks"]["cache:bytes"][0]["status"], "warn");
        let d = readiness(&inputs(
            Some(&up),
            Usage {
                entries: 91,
                bytes: 0,
            },
        ));
        assert_eq!(d.status, Status::Warn);
        let d = readiness(&inputs(
            Some(&up),
            Usage {
                entries: 90,
                bytes: 900,
            },
        ));
        assert_eq!(d.status, Status::Pass);
    }

    #[test]
    fn check_round_trips_through_shared_data() {
        let c = ok(7);
        assert_eq!(UpstreamCheck::decode(&c.encode()), Some(c));
        assert_eq!(UpstreamCheck::decode(b"junk"), None);
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_764_373_101), "2025-11-28T23:38:21Z");
    }
}
