//! The HTTP context: health replies, purge, cache lookups answered as local replies, and
//! capture of forwarded responses while they stream to the client.

use super::host::{now_ms, now_us};
use super::root::{State, READY_KEY};
use crate::cache::entry::{self, EntryView, ResponseView};
use crate::cache::key::{hash64, CacheKey};
use crate::cache::policy::{
    self, Forward, NotStored, RequestPolicy, Reuse, Storable, StoreContext,
};
use crate::cache::status::{self, CacheStatus};
use crate::cache::store::{Insert, Kind};
use crate::cache::vary::{self, Vary};
use crate::health::{self, Probe, UpstreamCheck};
use crate::metrics::CacheResult;
use log::debug;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::cell::RefCell;
use std::rc::Rc;

/// A request the cache looked up, kept for the response phase.
struct Lookup {
    key: CacheKey,
    head: bool,
    policy: RequestPolicy,
    /// Request headers, for the secondary key of a response that has `Vary`.
    headers: Vec<(String, String)>,
    /// The Vary names of the marker found at lookup time, if any.
    marker: Option<Vec<String>>,
    sent_ms: u64,
}

/// A response being captured for storage while it streams.
struct Capture {
    storable: Storable,
    body: Vec<u8>,
    declared: Option<u64>,
}

/// How this stream ended up being handled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing decided yet, or passed through.
    Forwarded,
    /// Answered by the filter (hit, health, purge): the response callbacks must leave it alone.
    LocalReply,
}

pub struct Http {
    state: Rc<RefCell<Option<State>>>,
    phase: Phase,
    /// Health probes are counted in their own metric, not as requests.
    probe: bool,
    result: CacheResult,
    fwd: Forward,
    lookup: Option<Lookup>,
    capture: Option<Capture>,
    stored: bool,
    detail: Option<&'static str>,
    status: u32,
    cpu_us: u64,
}

impl Http {
    pub fn new(state: Rc<RefCell<Option<State>>>) -> Http {
        Http {
            state,
            phase: Phase::Forwarded,
            probe: false,
            result: CacheResult::Bypass,
            fwd: Forward::Bypass,
            lookup: None,
            capture: None,
            stored: false,
            detail: None,
            status: 0,
            cpu_us: 0,
        }
    }

    /// Runs `f` and adds its duration to the request's filter time.
    fn timed<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let t0 = now_us();
        let r = f(self);
        self.cpu_us += now_us().saturating_sub(t0);
        r
    }

    fn header(&self, name: &str) -> Option<String> {
        self.get_http_request_header(name)
    }

    fn reply(&mut self, status: u32, headers: Vec<(&str, &str)>, body: &[u8]) -> Action {
        self.phase = Phase::LocalReply;
        self.status = status;
        // The SDK panics on a status it does not expect; the host only refuses when the
        // stream is already gone, so there is nothing left to answer.
        let _ = hostcalls::send_http_response(status, headers, Some(body));
        Action::Pause
    }

    fn request_headers(&mut self) -> Action {
        let state_rc = self.state.clone();
        let mut guard = state_rc.borrow_mut();
        let Some(state) = guard.as_mut() else {
            return Action::Continue;
        };
        let method = self.header(":method").unwrap_or_default();
        let path = self.header(":path").unwrap_or_default();
        let path_only = path.split('?').next().unwrap_or("");
        let is_read = method == "GET" || method == "HEAD";
        let h = &state.config.health;
        if is_read && (path_only == h.liveness_path || path_only == h.readiness_path) {
            let probe = if path_only == h.liveness_path {
                Probe::Liveness
            } else {
                Probe::Readiness
            };
            return self.health(state, probe);
        }
        if state.config.purge.enabled && method == state.config.purge.method {
            return self.purge(state, &path);
        }
        if !state.config.cache.enabled {
            return Action::Continue;
        }
        if !state.config.serves_method(&method) {
            self.fwd = Forward::Method;
            return Action::Continue;
        }
        let scheme = self.header(":scheme").unwrap_or_else(|| "http".into());
        let authority = self.header(":authority").unwrap_or_default();
        let key = match CacheKey::new(&scheme, &authority, &path) {
            Ok(k) => k,
            Err(e) => {
                self.detail = Some(e.as_str());
                return Action::Continue;
            }
        };
        let headers = self.get_http_request_headers();
        let policy = RequestPolicy::from_request(&headers);
        let now = now_ms();
        let mut lookup = Lookup {
            key,
            head: method == "HEAD",
            policy,
            headers,
            marker: None,
            sent_ms: now,
        };
        self.fwd = Forward::UriMiss;
        self.result = CacheResult::Miss;
        let primary = lookup.key.hash64();
        if let Some(value) = state.store.get(primary, lookup.key.as_str(), now) {
            let found = match entry::decode(&value) {
                Ok(EntryView::Response(r)) => Some(r),
                Ok(EntryView::Vary(m)) => {
                    let names: Vec<String> = m.names.iter().map(|n| n.to_string()).collect();
                    let secondary =
                        vary::secondary_key(&names, |n| policy::values(&lookup.headers, n));
                    lookup.marker = Some(names);
                    self.fwd = Forward::VaryMiss;
                    let vh = variant_hash(&lookup.key, &secondary);
                    match state.store.get(vh, lookup.key.as_str(), now) {
                        Some(v) => {
                            // Decoded below from its own buffer; keep it alive here.
                            return self.serve_variant(state, lookup, v, &secondary, now);
                        }
                        None => None,
                    }
                }
                Err(e) => {
                    debug!("edge-filter: undecodable entry for {}: {e}", lookup.key);
                    None
                }
            };
            if let Some(r) = found {
                if r.secondary.is_empty() {
                    if let Some(action) = self.try_serve(state, &lookup, &r, now) {
                        return action;
                    }
                }
            }
        }
        self.miss(lookup)
    }

    fn serve_variant(
        &mut self,
        state: &mut State,
        lookup: Lookup,
        value: Vec<u8>,
        secondary: &str,
        now: u64,
    ) -> Action {
        if let Ok(EntryView::Response(r)) = entry::decode(&value) {
            if r.secondary == secondary {
                if let Some(action) = self.try_serve(state, &lookup, &r, now) {
                    return action;
                }
            }
        }
        self.miss(lookup)
    }

    /// Answers from `r` if the request may reuse it; otherwise records why not.
    fn try_serve(
        &mut self,
        state: &mut State,
        lookup: &Lookup,
        r: &ResponseView<'_>,
        now: u64,
    ) -> Option<Action> {
        match policy::reuse(&r.meta, &lookup.policy, now / 1000) {
            Reuse::Fresh { age, ttl } => {
                let age = age.to_string();
                let mut headers = policy::hit_headers(r, &age);
                let cs = CacheStatus::Hit { ttl }.render();
                if state.config.cache.cache_status {
                    headers.push(("cache-status", &cs));
                }
                self.result = CacheResult::Hit;
                if !lookup.head {
                    state
                        .metrics
                        .add(state.metrics.served_bytes, r.body.len() as u64);
                }
                // HEAD gets the body too: Envoy sends only the headers, with its length.
                Some(self.reply(u32::from(r.meta.status), headers, r.body))
            }
            Reuse::Forward(f) => {
                self.fwd = f;
                if f == Forward::Stale {
                    self.result = CacheResult::Stale;
                }
                None
            }
        }
    }

    fn miss(&mut self, lookup: Lookup) -> Action {
        // RFC 9111 §5.2.1.7: only-if-cached with nothing usable is a 504.
        if lookup.policy.cc.only_if_cached {
            self.lookup = None;
            let cs = CacheStatus::Forward {
                fwd: self.fwd,
                fwd_status: None,
                stored: false,
                detail: Some("only-if-cached"),
            }
            .render();
            return self.reply(504, vec![("cache-status", &cs)], b"");
        }
        self.lookup = Some(lookup);
        Action::Continue
    }

    fn health(&mut self, state: &mut State, probe: Probe) -> Action {
        self.probe = true;
        let now = now_ms();
        let _ = state.store.refresh();
        let check = hostcalls::get_shared_data(READY_KEY)
            .ok()
            .and_then(|(v, _)| v)
            .and_then(|v| UpstreamCheck::decode(&v));
        let release = crate::release_id();
        let c = &state.config;
        let inputs = health::Inputs {
            now_ms: now,
            started_ms: state.started_ms,
            version: crate::VERSION,
            release_id: &release,
            upstream: check.as_ref(),
            cluster: &c.health.upstream_cluster,
            max_check_age_ms: 3 * c.health.check_period_ms + c.health.check_timeout_ms,
            usage: state.store.usage(),
            max_entries: c.cache.max_entries,
            max_bytes: c.cache.max_total_bytes,
            warn_ratio: c.health.cache_warn_ratio,
        };
        let doc = match probe {
            Probe::Liveness => health::liveness(&inputs),
            Probe::Readiness => health::readiness(&inputs),
        };
        state.metrics.health(probe as usize, doc.status);
        let headers = vec![
            ("content-type", health::CONTENT_TYPE),
            ("cache-control", "no-store"),
        ];
        self.reply(doc.status.http_status(), headers, doc.body.as_bytes())
    }

    fn purge(&mut self, state: &mut State, path: &str) -> Action {
        let p = &state.config.purge;
        let token = self
            .get_http_request_header_bytes(&p.token_header)
            .unwrap_or_default();
        let json = [
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ];
        if !p.token_matches(&token) {
            return self.reply(
                403,
                json.to_vec(),
                b"{\"purged\":0,\"error\":\"forbidden\"}\n",
            );
        }
        let scheme = self.header(":scheme").unwrap_or_else(|| "http".into());
        let authority = self.header(":authority").unwrap_or_default();
        let Ok(key) = CacheKey::new(&scheme, &authority, path) else {
            return self.reply(
                400,
                json.to_vec(),
                b"{\"purged\":0,\"error\":\"bad target\"}\n",
            );
        };
        let removed = state.store.remove(key.hash64());
        state.publish_usage();
        match removed {
            Ok(n) => {
                let body = format!("{{\"purged\":{n}}}\n");
                self.reply(
                    if n > 0 { 200 } else { 404 },
                    json.to_vec(),
                    body.as_bytes(),
                )
            }
            Err(e) => {
                let body = format!("{{\"purged\":0,\"error\":\"{e}\"}}\n");
                self.reply(503, json.to_vec(), body.as_bytes())
            }
        }
    }

    fn response_headers(&mut self, end_of_stream: bool) -> Action {
        if self.phase == Phase::LocalReply {
            return Action::Continue;
        }
        let state_rc = self.state.clone();
        let guard = state_rc.borrow();
        let Some(state) = guard.as_ref() else {
            return Action::Continue;
        };
        let headers = self.get_http_response_headers();
        self.status = policy::values(&headers, ":status")
            .first()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let now = now_ms();
        if let Some(l) = &self.lookup {
            state.metrics.record(
                state.metrics.upstream_response_ms,
                now.saturating_sub(l.sent_ms),
            );
            let ctx = StoreContext {
                head: l.head,
                request: &l.policy,
                statuses: &state.config.cache.statuses,
                max_entry_bytes: state.config.cache.max_entry_bytes,
                request_time: l.sent_ms / 1000,
                response_time: now / 1000,
            };
            match policy::storable(self.status as u16, &headers, &ctx) {
                Ok(s) => {
                    let declared = policy::content_length(&headers);
                    self.capture = Some(Capture {
                        storable: s,
                        body: Vec::with_capacity(declared.unwrap_or(0).min(64 * 1024) as usize),
                        declared,
                    });
                    self.stored = true;
                }
                Err(reason) => {
                    self.detail = Some(reason.as_str());
                    self.result = CacheResult::Uncacheable;
                }
            }
        }
        if state.config.cache.cache_status {
            let ours = CacheStatus::Forward {
                fwd: self.fwd,
                fwd_status: Some(self.status as u16),
                stored: self.stored,
                detail: self.detail,
            }
            .render();
            let existing = policy::values(&headers, "cache-status");
            let value = status::append(&existing, &ours);
            self.set_http_response_header("cache-status", Some(&value));
        }
        drop(guard);
        if end_of_stream {
            self.finish_capture();
        }
        Action::Continue
    }

    fn response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.phase == Phase::LocalReply {
            return Action::Continue;
        }
        if let Some(s) = self.state.borrow().as_ref() {
            s.metrics.add(s.metrics.upstream_bytes, body_size as u64);
        }
        let limit = self
            .state
            .borrow()
            .as_ref()
            .map_or(0, |s| s.config.cache.max_entry_bytes);
        if let Some(captured) = self.capture.as_ref().map(|c| c.body.len()) {
            if (captured + body_size) as u64 > limit {
                // Capture stops at the limit; the client's stream is untouched.
                self.capture = None;
                self.detail = Some(NotStored::TooLarge.as_str());
                self.result = CacheResult::Uncacheable;
            } else if body_size > 0 {
                let chunk = self
                    .get_http_response_body(0, body_size)
                    .unwrap_or_default();
                if let Some(c) = &mut self.capture {
                    c.body.extend_from_slice(&chunk);
                }
            }
        }
        if end_of_stream {
            self.finish_capture();
        }
        Action::Continue
    }

    /// The upstream's body is complete: store it, unless it was cut short.
    fn finish_capture(&mut self) {
        let (Some(c), Some(l)) = (self.capture.take(), self.lookup.as_ref()) else {
            return;
        };
        if c.declared.is_some_and(|d| d != c.body.len() as u64) {
            self.result = CacheResult::Uncacheable;
            return;
        }
        let state_rc = self.state.clone();
        let mut guard = state_rc.borrow_mut();
        let Some(state) = guard.as_mut() else { return };
        let primary = l.key.hash64();
        let s = &c.storable;
        let (items, replace_variants) = match &s.vary {
            Vary::Names(names) => {
                let secondary = vary::secondary_key(names, |n| policy::values(&l.headers, n));
                let marker = entry::encode_vary(0, l.key.as_str(), names);
                let value = entry::encode_response(
                    0,
                    l.key.as_str(),
                    &secondary,
                    &s.meta,
                    &s.headers,
                    &c.body,
                );
                let items = vec![
                    Insert {
                        hash: primary,
                        primary,
                        kind: Kind::Vary,
                        value: marker,
                    },
                    Insert {
                        hash: variant_hash(&l.key, &secondary),
                        primary,
                        kind: Kind::Variant,
                        value,
                    },
                ];
                // Other variants stay only if they were selected by the same names.
                (items, l.marker.as_ref() != Some(names))
            }
            _ => {
                let value =
                    entry::encode_response(0, l.key.as_str(), "", &s.meta, &s.headers, &c.body);
                (
                    vec![Insert {
                        hash: primary,
                        primary,
                        kind: Kind::Response,
                        value,
                    }],
                    true,
                )
            }
        };
        match state.store.insert(items, replace_variants, now_ms()) {
            Ok(out) => {
                state.metrics.add(state.metrics.stores, 1);
                state
                    .metrics
                    .add(state.metrics.evictions, u64::from(out.evicted));
                state.publish_usage();
            }
            Err(e) => {
                debug!("edge-filter: not stored {}: {e}", l.key);
                self.result = CacheResult::Uncacheable;
            }
        }
    }
}

/// Hash of a variant's key: the primary key and the secondary key together.
fn variant_hash(key: &CacheKey, secondary: &str) -> u64 {
    let mut b = Vec::with_capacity(key.as_str().len() + 1 + secondary.len());
    b.extend_from_slice(key.as_str().as_bytes());
    b.push(0);
    b.extend_from_slice(secondary.as_bytes());
    hash64(&b)
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.timed(|s| s.request_headers())
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        self.timed(|s| s.response_headers(end_of_stream))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.timed(|s| s.response_body(body_size, end_of_stream))
    }

    fn on_http_response_trailers(&mut self, _: usize) -> Action {
        // Trailers end the body.
        self.timed(|s| s.finish_capture());
        Action::Continue
    }

    fn on_log(&mut self) {
        let guard = self.state.borrow();
        let Some(state) = guard.as_ref() else { return };
        if self.probe {
            return;
        }
        if self.status == 0 {
            // Reset before a response: ask the host what the client got.
            self.status = self
                .get_property(vec!["response", "code"])
                .and_then(|b| {
                    b.get(..8)
                        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                })
                .unwrap_or(0) as u32;
        }
        // A capture still open here was cut off by the upstream or the client.
        let result = if self.capture.is_some() {
            CacheResult::Uncacheable
        } else {
            self.result
        };
        state.metrics.request(result, self.status);
        state.metrics.record(state.metrics.cpu_us, self.cpu_us);
    }
}
