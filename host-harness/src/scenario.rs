//! Scenario files: requests, upstream replies, clock steps and expectations, run through
//! the harness by the `proxy-wasm-harness run` command (and by tests).
//!
//! ```json
//! {
//!   "vm_id": "edge-filter",
//!   "vms": 2,
//!   "clusters": {"upstream": {"status": 200, "body": "ok", "delay_ms": 3}},
//!   "steps": [
//!     {"request": {"path": "/page"},
//!      "upstream": {"status": 200, "headers": [["cache-control", "max-age=60"]], "body": "hi"},
//!      "expect": {"status": 200, "body": "hi", "upstream_called": true,
//!                 "headers": {"cache-status": "edge-filter; fwd=uri-miss; fwd-status=200; stored"}}},
//!     {"advance_ms": 1000},
//!     {"vm": 1, "request": {"path": "/page"},
//!      "expect": {"status": 200, "upstream_called": false, "headers": {"age": "1"}}},
//!     {"expect_metrics": {"edge_filter_cache_stores_total": 1}}
//!   ]
//! }
//! ```

use crate::abi::shared_data::CasMode;
use crate::exchange::{Exchange, Request, Response};
use crate::harness::{CallReply, FailurePolicy, HarnessBuilder, HttpCallResponse};
use crate::{Error, Vm};
use std::collections::BTreeMap;
use std::time::Duration;

/// Serialises bytes as text (lossy UTF-8).
pub mod lossy {
    /// Serialises `b` as a (lossy) UTF-8 string.
    pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from_utf8_lossy(b))
    }
}

/// A scripted cluster for `http_call`: always the same answer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    /// Status of the answer (0: the connection fails instead).
    pub status: u16,
    /// Headers besides `:status`.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
    /// Virtual time until the answer.
    pub delay_ms: u64,
}

impl Default for Cluster {
    fn default() -> Cluster {
        Cluster {
            status: 200,
            headers: Vec::new(),
            body: String::new(),
            delay_ms: 0,
        }
    }
}

/// What a step expects of the client's response. Every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Expect {
    /// Status code.
    pub status: Option<u16>,
    /// Header values (first value, name case-insensitive); `null` means absent.
    pub headers: BTreeMap<String, Option<String>>,
    /// Headers whose value must contain the given text.
    pub headers_contain: BTreeMap<String, String>,
    /// Exact body.
    pub body: Option<String>,
    /// Text the body contains.
    pub body_contains: Option<String>,
    /// Whether the request reached the upstream.
    pub upstream_called: Option<bool>,
    /// Whether the filter answered with a local reply.
    pub local_reply: Option<bool>,
    /// Whether the guest trapped.
    pub trap: Option<bool>,
}

/// One step of a scenario.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Step {
    /// Free text shown in the report.
    pub name: String,
    /// Which VM (0-based) runs the request.
    pub vm: usize,
    /// Send this request.
    pub request: Option<Request>,
    /// The upstream's answer to it (none: the upstream is never asked; a request that
    /// reaches it then gets no response).
    pub upstream: Option<Response>,
    /// Expectations on the client's response.
    pub expect: Option<Expect>,
    /// Move the virtual clock (firing ticks and http_call answers in every VM).
    pub advance_ms: Option<u64>,
    /// Expected metric values by name (counter, gauge, or a histogram's sample count).
    pub expect_metrics: BTreeMap<String, u64>,
}

/// A scenario file.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Free text.
    pub description: String,
    /// The `vm_id` (default empty).
    pub vm_id: String,
    /// How many VMs (Envoy workers) share the host state (default 1).
    pub vms: usize,
    /// Clusters `http_call` can reach.
    pub clusters: BTreeMap<String, Cluster>,
    /// `FAIL_CLOSED` (default) or `FAIL_OPEN`.
    pub failure_policy: FailurePolicy,
    /// `envoy` (default) or `strict_per_key`.
    pub cas_mode: CasMode,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// What one step observed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepReport {
    /// The step's index.
    pub step: usize,
    /// The step's name.
    pub name: String,
    /// The exchange, for request steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exchange: Option<Exchange>,
    /// Metric values checked by this step.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, Option<u64>>,
    /// Expectations that failed.
    pub failures: Vec<String>,
}

/// The result of a scenario run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Per-step observations.
    pub steps: Vec<StepReport>,
    /// How many expectations failed.
    pub failed: usize,
    /// Every log line.
    pub logs: Vec<crate::LogEntry>,
}

impl Scenario {
    /// Applies the scenario's host settings (vm_id, clusters, policies) to `builder`.
    pub fn configure(&self, mut b: HarnessBuilder) -> HarnessBuilder {
        b = b
            .vm_id(&self.vm_id)
            .failure_policy(self.failure_policy)
            .cas_mode(self.cas_mode);
        for (name, c) in &self.clusters {
            let c = c.clone();
            b = b.cluster(name, move |_| {
                let delay = Duration::from_millis(c.delay_ms);
                if c.status == 0 {
                    return CallReply::Fail { delay };
                }
                let mut response = HttpCallResponse::new(c.status, c.body.clone());
                response.headers.extend(c.headers.iter().cloned());
                CallReply::Respond { response, delay }
            });
        }
        b
    }

    /// Runs the scenario on a harness built from `builder`.
    pub fn run(&self, builder: HarnessBuilder) -> Result<Report, Error> {
        let h = self.configure(builder).build()?;
        let mut vms: Vec<Vm> = (0..self.vms.max(1))
            .map(|_| h.new_vm())
            .collect::<Result<_, _>>()?;
        let mut steps = Vec::new();
        let mut failed = 0;
        for (i, step) in self.steps.iter().enumerate() {
            let mut rep = StepReport {
                step: i,
                name: step.name.clone(),
                exchange: None,
                metrics: BTreeMap::new(),
                failures: Vec::new(),
            };
            if let Some(ms) = step.advance_ms {
                // Advance every VM over the same span of virtual time, in small steps
                // so that ticks and answers interleave across VMs as with real workers.
                let target = h.elapsed() + Duration::from_millis(ms);
                while h.elapsed() < target {
                    let slice = (target - h.elapsed()).min(Duration::from_millis(10));
                    let start = h.elapsed();
                    for vm in vms.iter_mut() {
                        let left = (start + slice).saturating_sub(h.elapsed());
                        vm.advance(left)?;
                    }
                }
            }
            if let Some(req) = &step.request {
                let vm = vms
                    .get_mut(step.vm)
                    .ok_or_else(|| Error::Usage(format!("step {i}: no VM {}", step.vm)))?;
                let up = step.upstream.clone();
                let ex = vm.exchange(req, &mut |_| up.clone(), false)?;
                vm.forget_finished();
                if let Some(e) = &step.expect {
                    rep.failures = check(e, &ex);
                }
                rep.exchange = Some(ex);
            }
            for (name, want) in &step.expect_metrics {
                let got = h.metric(name);
                if got != Some(*want) {
                    rep.failures
                        .push(format!("metric {name}: expected {want}, got {got:?}"));
                }
                rep.metrics.insert(name.clone(), got);
            }
            failed += rep.failures.len();
            steps.push(rep);
        }
        Ok(Report {
            steps,
            failed,
            logs: h.logs(),
        })
    }
}

/// The expectations of `e` that `ex` does not meet.
pub fn check(e: &Expect, ex: &Exchange) -> Vec<String> {
    let mut f = Vec::new();
    if let Some(s) = e.status {
        if ex.status() != Some(s) {
            f.push(format!("status: expected {s}, got {:?}", ex.status()));
        }
    }
    for (name, want) in &e.headers {
        let got = ex.header(name);
        if got != want.as_deref() {
            f.push(format!("header {name}: expected {want:?}, got {got:?}"));
        }
    }
    for (name, part) in &e.headers_contain {
        match ex.header(name) {
            Some(v) if v.contains(part.as_str()) => {}
            got => f.push(format!(
                "header {name}: expected to contain {part:?}, got {got:?}"
            )),
        }
    }
    if let Some(b) = &e.body {
        if ex.text() != *b {
            f.push(format!("body: expected {b:?}, got {:?}", ex.text()));
        }
    }
    if let Some(b) = &e.body_contains {
        if !ex.text().contains(b.as_str()) {
            f.push(format!(
                "body: expected to contain {b:?}, got {:?}",
                ex.text()
            ));
        }
    }
    if let Some(u) = e.upstream_called {
        let called = ex.upstream_request.headers.is_some();
        if called != u {
            f.push(format!("upstream_called: expected {u}, got {called}"));
        }
    }
    if let Some(l) = e.local_reply {
        if ex.local_reply.is_some() != l {
            f.push(format!(
                "local_reply: expected {l}, got {:?}",
                ex.local_reply
            ));
        }
    }
    if let Some(t) = e.trap {
        if ex.trap.is_some() != t {
            f.push(format!("trap: expected {t}, got {:?}", ex.trap));
        }
    }
    f
}
