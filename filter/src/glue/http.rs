//! The HTTP context: health replies, purge, invalidation, cache lookups answered as local
//! replies, revalidation and stale serving, and capture of forwarded responses while they
//! stream to the client.

use super::abi::{self, Buffer, Map};
use super::host::{now_ms, now_us};
use super::root::{self, Pending, RefreshJob, State, Waiter, READY_KEY};
use crate::cache::bypass;
use crate::cache::conditional::{self, Evaluation};
use crate::cache::entry::{self, EntryView, ResponseView};
use crate::cache::freshness;
use crate::cache::key::CacheKey;
use crate::cache::lookup::{self, Found, Hit};
use crate::cache::normalize;
use crate::cache::policy::{
    self, Forward, NotStored, RequestPolicy, Reuse, StaleReason, Storable, StoreContext,
};
use crate::cache::purge;
use crate::cache::query;
use crate::cache::range;
use crate::cache::status::{self, CacheStatus};
use crate::config::CacheConfig;
use crate::field::{first, text, values, OwnedFields};
use crate::health::{self, Probe, UpstreamCheck};
use crate::metrics::CacheResult;
use log::debug;
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
    headers: OwnedFields,
    /// The Vary names of the marker found at lookup time, if any.
    names: Option<Vec<String>>,
    sent_ms: u64,
    /// A stored response that could not be served as it was: revalidated by the upstream's
    /// 304, or served stale if the upstream fails.
    stale: Option<Hit>,
    /// The filter added its own validators to the upstream request.
    validated: bool,
}

/// A response being captured for storage while it streams.
struct Capture {
    storable: Storable,
    body: Vec<u8>,
    declared: Option<u64>,
}

/// This request's part in coalescing (one worker's concurrent misses for one URL).
enum Role {
    None,
    /// Went upstream; others wait for its response.
    Leader(CacheKey),
    /// Paused, waiting for the leader of this key.
    Waiter(CacheKey),
}

/// `Cache-Status` detail of a request a `cache.bypass` rule kept away from the cache.
const BYPASS_RULE: &str = "bypass-rule";

/// Most requests that wait for one leader; later ones go upstream themselves.
const MAX_WAITERS: usize = 256;

pub struct Http {
    id: u32,
    state: Rc<RefCell<Option<State>>>,
    role: Role,
    /// Answered by the filter (hit, health, purge): response callbacks leave it alone.
    local_reply: bool,
    /// Health probes are counted in their own metric, not as requests.
    probe: bool,
    result: CacheResult,
    fwd: Forward,
    lookup: Option<Lookup>,
    capture: Option<Capture>,
    stored: bool,
    detail: Option<&'static str>,
    /// An unsafe method's target, invalidated after a non-error response (RFC 9111 §4.4).
    invalidate: Option<(String, CacheKey)>,
    status: u32,
    cpu_us: u64,
    /// When the current callback started (Unix µs); see [`Http::timed`].
    started_us: u64,
}

impl Http {
    pub fn new(id: u32, state: Rc<RefCell<Option<State>>>) -> Http {
        Http {
            id,
            state,
            role: Role::None,
            local_reply: false,
            probe: false,
            result: CacheResult::Bypass,
            fwd: Forward::Bypass,
            lookup: None,
            capture: None,
            stored: false,
            detail: None,
            invalidate: None,
            status: 0,
            cpu_us: 0,
            started_us: 0,
        }
    }

    /// Runs `f` and adds its duration to the request's filter time.
    /// `started_us` is the callback's start: callbacks use it as "now" instead of
    /// reading the clock again.
    fn timed<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let t0 = now_us();
        self.started_us = t0;
        let r = f(self);
        self.cpu_us += now_us().saturating_sub(t0);
        r
    }

    /// Now, in Unix milliseconds, as of the start of the current callback.
    fn now_ms(&self) -> u64 {
        self.started_us / 1000
    }

    fn request_key(
        headers: &OwnedFields,
        path: &[u8],
    ) -> Result<CacheKey, crate::cache::key::KeyError> {
        let scheme = first(headers, ":scheme").unwrap_or(b"http");
        let authority = first(headers, ":authority").unwrap_or_default();
        CacheKey::new(scheme, authority, path)
    }

    fn reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) -> Action {
        self.local_reply = true;
        self.status = status;
        // The host only refuses when the stream is already gone: nothing left to answer.
        let _ = abi::send_response(status, headers, body);
        Action::Pause
    }

    fn request_headers(&mut self) -> Action {
        let state_rc = self.state.clone();
        let mut guard = state_rc.borrow_mut();
        let Some(state) = guard.as_mut() else {
            return Action::Continue;
        };
        // One host call for the whole map: the pseudo-headers are in it, and a lookup
        // needs the rest anyway (a hit's largest fixed cost is host calls).
        // Bytes from here on: a header may carry any byte a proxy passes (RFC 9110 §5.5).
        let headers = abi::header_map(Map::Request);
        // A method is a token; a non-UTF-8 one is just an unknown method.
        let method = text(first(&headers, ":method").unwrap_or_default()).into_owned();
        let path = first(&headers, ":path").unwrap_or_default().to_vec();
        let path_only = path.split(|&b| b == b'?').next().unwrap_or_default();
        let is_read = method == "GET" || method == "HEAD";
        let h = &state.config.health;
        let is = |p: &str| path_only == p.as_bytes();
        if is_read && (is(&h.liveness_path) || is(&h.readiness_path)) {
            let probe = if is(&h.liveness_path) {
                Probe::Liveness
            } else {
                Probe::Readiness
            };
            return self.health(state, probe);
        }
        if state.config.purge.enabled && method == state.config.purge.method {
            return self.purge(state, &path, &headers);
        }
        if !state.config.cache.enabled {
            return Action::Continue;
        }
        if !state.config.serves_method(&method) {
            self.fwd = Forward::Method;
            // Unknown methods pass through untouched; only their outcome is looked at.
            if !policy::is_safe_method(&method) {
                // Stored entries are keyed after the query policy: invalidate that key.
                let rules = &state.config.cache.query;
                let target = query::apply(&path, rules).unwrap_or_else(|| path.clone());
                if let Ok(key) = Self::request_key(&headers, &target) {
                    self.invalidate = Some((method, key));
                }
            }
            return Action::Continue;
        }
        // The operator's bypass rules: forwarded untouched, never stored.
        if bypass::matches(&state.config.cache.bypass, &path, &headers) {
            self.detail = Some(BYPASS_RULE);
            return Action::Continue;
        }
        // The query policy rewrites what is forwarded, and only then is it keyed: if the
        // host refuses the new target, the original one is keyed.
        let (mut path, mut headers) = (path, headers);
        if let Some(target) = query::apply(&path, &state.config.cache.query) {
            if abi::set_header(Map::Request, ":path", &target).is_ok() {
                // Background refreshes send these headers: the new target too.
                for (n, v) in headers.iter_mut() {
                    if n.as_slice() == b":path" {
                        v.clone_from(&target);
                    }
                }
                path = target;
            }
        }
        let key = match Self::request_key(&headers, &path) {
            Ok(k) => k,
            Err(e) => {
                self.detail = Some(e.as_str());
                return Action::Continue;
            }
        };
        normalize_request(&state.config.cache, &mut headers);
        let now = self.now_ms();
        let mut lookup = Lookup {
            key,
            head: method == "HEAD",
            policy: RequestPolicy::from_request(&headers),
            headers,
            names: None,
            sent_ms: now,
            stale: None,
            validated: false,
        };
        self.fwd = Forward::UriMiss;
        self.result = CacheResult::Miss;
        match lookup::lookup(&mut state.store, &lookup.key, &lookup.headers) {
            Found::Miss => {}
            Found::VaryMiss { names } => {
                self.fwd = Forward::VaryMiss;
                lookup.names = Some(names);
            }
            Found::Response(hit) => {
                lookup.names = hit.names.clone();
                if let Some(action) = self.use_stored(state, &mut lookup, hit, now) {
                    return action;
                }
            }
        }
        // A miss for `Range: bytes=0-` (the whole body, as a player's first request asks):
        // fetched without Range, a 200 answers it and fills the cache; later ranges are
        // then answered from the entry. Other ranges go upstream as they are.
        let miss = matches!(self.fwd, Forward::UriMiss | Forward::VaryMiss);
        if miss && range::is_whole_from_start(&lookup.headers) {
            for name in ["range", "if-range"] {
                if abi::remove_header(Map::Request, name).is_ok() {
                    let n = name.as_bytes();
                    lookup.headers.retain(|(h, _)| !h.eq_ignore_ascii_case(n));
                }
            }
        }
        // RFC 9111 §5.2.1.7: only-if-cached with nothing usable is a 504.
        if lookup.policy.cc.only_if_cached {
            let cs = member(state, &self.forward_status(None), Some(&lookup.key));
            return self.reply(504, &[("cache-status", &cs)], b"");
        }
        let action = self.coalesce(state, &lookup, now);
        self.lookup = Some(lookup);
        action
    }

    /// The first miss for a URL in this worker leads; later ones wait, paused, for its
    /// response (bounded in number here and in time by the root's tick).
    fn coalesce(&mut self, state: &mut State, lookup: &Lookup, now: u64) -> Action {
        let eligible = state.config.cache.coalesce
            && matches!(
                self.fwd,
                Forward::UriMiss | Forward::VaryMiss | Forward::Stale
            )
            && !lookup.policy.cc.no_store;
        if !eligible {
            return Action::Continue;
        }
        let key = lookup.key.as_str();
        match state.pending.get_mut(key) {
            Some(p) if p.waiters.len() < MAX_WAITERS => {
                p.waiters.push(Waiter {
                    id: self.id,
                    since_ms: now,
                    head: lookup.head,
                    headers: lookup.headers.clone(),
                });
                self.role = Role::Waiter(lookup.key.clone());
                Action::Pause
            }
            Some(_) => Action::Continue,
            None => {
                let hash = lookup.key.hash64();
                let until = now + state.config.cache.coalesce_timeout_ms;
                let remote =
                    root::flight_held(hash, now) || !root::flight_acquire(hash, now, until);
                let mut p = Pending {
                    key: lookup.key.clone(),
                    remote,
                    leader_status: 0,
                    waiters: Vec::new(),
                };
                if remote && root::flight_held(hash, now) {
                    // Another worker is fetching it: wait for its response too.
                    p.waiters.push(Waiter {
                        id: self.id,
                        since_ms: now,
                        head: lookup.head,
                        headers: lookup.headers.clone(),
                    });
                    state.pending.insert(key.to_string(), p);
                    self.role = Role::Waiter(lookup.key.clone());
                    abi::set_tick_period_ms(root::REMOTE_POLL_MS);
                    return Action::Pause;
                }
                p.remote = false;
                state.pending.insert(key.to_string(), p);
                self.role = Role::Leader(lookup.key.clone());
                Action::Continue
            }
        }
    }

    /// The leader's response is settled (stored or not): answer each waiter from the cache
    /// when the stored response fits its request, else let it go upstream.
    fn release(&mut self, state: &mut State) {
        let Role::Leader(key) = std::mem::replace(&mut self.role, Role::None) else {
            return;
        };
        root::flight_release(key.hash64());
        let Some(mut p) = state.pending.remove(key.as_str()) else {
            return;
        };
        p.leader_status = self.status as u16;
        super::root::answer_waiters(state, p, now_ms());
        // Host calls after this must act on this stream again.
        let _ = abi::set_effective_context(self.id);
    }

    /// Serves `hit` when the request may reuse it (fresh, or stale-while-revalidate);
    /// otherwise prepares its revalidation and keeps it for stale-if-error.
    fn use_stored(
        &mut self,
        state: &mut State,
        lookup: &mut Lookup,
        hit: Hit,
        now: u64,
    ) -> Option<Action> {
        let Ok(EntryView::Response(r)) = entry::decode(&hit.value) else {
            return None;
        };
        let now_s = now / 1000;
        match policy::reuse(&r.meta, &lookup.policy, now_s) {
            Reuse::Fresh { age, ttl } => {
                match conditional::evaluate(&lookup.headers, &r.headers, r.meta.response_time) {
                    Evaluation::Forward => self.fwd = Forward::Request,
                    eval => {
                        self.result = CacheResult::Hit;
                        let cs = CacheStatus::Hit { ttl, detail: None };
                        let nm = eval == Evaluation::NotModified;
                        return Some(self.serve(state, lookup, &r, age, cs, nm));
                    }
                }
            }
            Reuse::Forward(f) => {
                self.fwd = f;
                if f == Forward::Stale {
                    self.result = CacheResult::Stale;
                    let targets = &state.config.cache.targeted_cache_control;
                    let (cc, _) = policy::response_cache_control(&r.headers, targets);
                    let swr = StaleReason::WhileRevalidate;
                    if let Some(ttl) =
                        policy::stale_allowed(&r.meta, &cc, &lookup.policy, now_s, swr, 0)
                    {
                        self.schedule_refresh(state, lookup, &hit, &r, now);
                        let age = entry_age(&r, now_s);
                        let cs = CacheStatus::Hit {
                            ttl,
                            detail: Some(swr.as_str()),
                        };
                        return Some(self.serve(state, lookup, &r, age, cs, false));
                    }
                }
            }
        }
        // RFC 9111 §4.3.1: revalidate with the stored validators, unless the client sent
        // preconditions of its own (its 304 then goes back to it).
        let may_validate = !lookup.policy.authorization || r.meta.has(entry::flags::AUTH_OK);
        if may_validate && !conditional::is_conditional(&lookup.headers) {
            for (name, value) in conditional::validators(&r.headers) {
                if abi::set_header(Map::Request, name, value).is_ok() {
                    lookup.validated = true;
                }
            }
        }
        lookup.stale = Some(hit.clone());
        None
    }

    /// Answers from a stored response: 200 (or its stored status), or 304 when the client's
    /// precondition failed. Works in the request and in the response phase.
    fn serve(
        &mut self,
        state: &State,
        lookup: &Lookup,
        r: &ResponseView<'_>,
        age: u64,
        cs: CacheStatus,
        not_modified: bool,
    ) -> Action {
        self.local_reply = true;
        let key = Some(&lookup.key);
        let form = Form::of(lookup.head, not_modified, &lookup.headers, r);
        self.status = send_stored(state, key, r, age, &cs, form);
        Action::Pause
    }

    /// Queues a background refresh of `hit` (stale-while-revalidate), one per key at a time
    /// across workers: a lock in shared data, on a bounded set of keys.
    fn schedule_refresh(
        &mut self,
        state: &mut State,
        lookup: &Lookup,
        hit: &Hit,
        r: &ResponseView<'_>,
        now: u64,
    ) {
        let lock = format!("{}{}", super::root::REFRESH_LOCK_PREFIX, hit.hash % 1024);
        let until = now + state.config.cache.refresh_timeout_ms;
        let held = |v: &[u8]| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|t| t > now)
        };
        if !root::try_lock(&lock, held, until.to_string().as_bytes()) {
            return;
        }
        let cluster = abi::property(&["cluster_name"])
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| state.config.health.upstream_cluster.clone());
        // The SDK's call takes text: a header that is not UTF-8 is left out, and the
        // answer is stored under the variant of the headers actually sent.
        let as_text = |(n, v): (&[u8], &[u8])| {
            Some((
                std::str::from_utf8(n).ok()?.to_string(),
                std::str::from_utf8(v).ok()?.to_string(),
            ))
        };
        let mut headers: Vec<(String, String)> = lookup
            .headers
            .iter()
            .filter(|(n, _)| {
                !matches!(
                    n.as_slice(),
                    b":method" | b"content-length" | b"transfer-encoding" | b"connection"
                ) && !n.starts_with(b"if-")
            })
            .filter_map(|(n, v)| as_text((n, v)))
            .collect();
        headers.push((":method".into(), "GET".into()));
        headers.extend(
            conditional::validators(&r.headers)
                .into_iter()
                .filter_map(|(n, v)| as_text((n.as_bytes(), v))),
        );
        state.refresh.push(RefreshJob {
            key: lookup.key.clone(),
            names: hit.names.clone(),
            request: headers,
            cluster,
            lock,
        });
        // Wake the root context now instead of at its next regular tick.
        abi::set_tick_period_ms(1);
    }

    fn forward_status(&self, fwd_status: Option<u16>) -> CacheStatus {
        CacheStatus::Forward {
            fwd: self.fwd,
            fwd_status,
            stored: self.stored,
            collapsed: false,
            ttl: None,
            detail: self.detail,
        }
    }

    fn health(&mut self, state: &mut State, probe: Probe) -> Action {
        self.probe = true;
        let now = self.now_ms();
        let _ = state.store.refresh();
        let check = abi::shared_get(READY_KEY).and_then(|(v, _)| UpstreamCheck::decode(&v));
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
            upstream_failure: c.health.upstream_failure,
        };
        let doc = match probe {
            Probe::Liveness => health::liveness(&inputs),
            Probe::Readiness => health::readiness(&inputs),
        };
        state.metrics.health(probe as usize, doc.status);
        let headers = [
            ("content-type", health::CONTENT_TYPE),
            ("cache-control", "no-store"),
        ];
        self.reply(doc.status.http_status(), &headers, doc.body.as_bytes())
    }

    /// A purge: the target URL and all its variants, or every URL under a prefix when the
    /// path ends with `*`. Only with the configured token; anyone else gets 403 and nothing
    /// is touched.
    fn purge(&mut self, state: &mut State, path: &[u8], headers: &OwnedFields) -> Action {
        let p = &state.config.purge;
        let token = abi::header(Map::Request, &p.token_header).unwrap_or_default();
        let json = [
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ];
        if !p.token_matches(&token) {
            state.metrics.purge("denied");
            return self.reply(403, &json, b"{\"purged\":0,\"error\":\"forbidden\"}\n");
        }
        let soft = first(headers, &p.soft_header)
            .is_some_and(|v| v == b"1" || v.eq_ignore_ascii_case(b"true"));
        let now_s = self.now_ms() / 1000;
        let tag_header = p.tag_header.clone();
        // By tag: every entry whose response listed one of the tags (the path is ignored).
        let removed = if let Some(listed) = first(headers, &tag_header) {
            let wanted = purge::tags(listed);
            if wanted.is_empty() {
                state.metrics.purge("error");
                return self.reply(400, &json, b"{\"purged\":0,\"error\":\"no tags\"}\n");
            }
            let tagged = |v: &[u8]| purge::has_tag(v, &tag_header, &wanted);
            if soft {
                let edit = |v: &[u8]| tagged(v).then(|| purge::soft_purged(v, now_s)).flatten();
                Ok(state.store.rewrite_where(edit))
            } else {
                state.store.remove_where_value(|_, v| tagged(v))
            }
        } else {
            let (target, prefix) = match path.strip_suffix(b"*") {
                Some(t) => (t, true),
                None => (path, false),
            };
            let Ok(key) = Self::request_key(headers, target) else {
                state.metrics.purge("error");
                return self.reply(400, &json, b"{\"purged\":0,\"error\":\"bad target\"}\n");
            };
            // The key of `/a*` minus the `*` is `.../a`: everything whose key starts there.
            let k = key.as_str();
            let selects = |stored: &str| {
                if prefix {
                    stored.starts_with(k)
                } else {
                    stored == k
                }
            };
            if soft {
                let edit = |v: &[u8]| {
                    let ours = entry::peek_key(v).is_ok_and(|(_, stored)| selects(stored));
                    ours.then(|| purge::soft_purged(v, now_s)).flatten()
                };
                Ok(state.store.rewrite_where(edit))
            } else if prefix {
                state.store.remove_where(selects)
            } else {
                state.store.remove(key.hash64())
            }
        };
        state.publish_usage();
        match removed {
            Ok(n) => {
                state
                    .metrics
                    .purge(if n > 0 { "purged" } else { "not_found" });
                let body = format!("{{\"purged\":{n}}}\n");
                self.reply(if n > 0 { 200 } else { 404 }, &json, body.as_bytes())
            }
            Err(e) => {
                state.metrics.purge("error");
                let body = format!("{{\"purged\":0,\"error\":\"{e}\"}}\n");
                self.reply(503, &json, body.as_bytes())
            }
        }
    }

    fn response_headers(&mut self, end_of_stream: bool) -> Action {
        if self.local_reply {
            return Action::Continue;
        }
        let state_rc = self.state.clone();
        let mut guard = state_rc.borrow_mut();
        let Some(state) = guard.as_mut() else {
            return Action::Continue;
        };
        if let Role::Waiter(_) = self.role {
            self.role = Role::None;
            if state.collapsed.remove(&self.id) {
                // Answered from the leader's response by a local reply.
                self.local_reply = true;
                self.result = CacheResult::Hit;
                self.lookup = None;
                return Action::Continue;
            }
        }
        let headers = abi::header_map(Map::Response);
        self.status = first(&headers, ":status")
            .and_then(|s| text(s).parse().ok())
            .unwrap_or(0);
        let status = self.status as u16;
        let now = self.now_ms();
        if let Some((method, key)) = self.invalidate.take() {
            for k in policy::invalidation_targets(&method, status, &key, &headers) {
                let _ = state.store.remove(k.hash64());
            }
            state.publish_usage();
        }
        if let Some(mut l) = self.lookup.take() {
            state.metrics.record(
                state.metrics.upstream_response_ms,
                now.saturating_sub(l.sent_ms),
            );
            if let Some(action) = self.after_forward(state, &mut l, &headers, now) {
                self.release(state);
                return action;
            }
            self.lookup = Some(l);
        }
        if state.config.cache.cache_status {
            let key = self.lookup.as_ref().map(|l| &l.key);
            let ours = member(state, &self.forward_status(Some(status)), key);
            let existing = values(&headers, "cache-status");
            let value = status::append(&existing, &ours);
            let _ = abi::set_header(Map::Response, "cache-status", &value);
        }
        if self.capture.is_none() {
            // Nothing will be stored: waiters need not wait for the body.
            self.release(state);
        }
        drop(guard);
        if end_of_stream {
            self.finish_capture();
        }
        Action::Continue
    }

    fn store_context<'a>(c: &'a CacheConfig, l: &'a Lookup, now: u64) -> StoreContext<'a> {
        StoreContext {
            head: l.head,
            request: &l.policy,
            statuses: &c.statuses,
            max_entry_bytes: c.max_entry_bytes,
            request_time: l.sent_ms / 1000,
            response_time: now / 1000,
            heuristic_fraction: c.heuristic_fraction,
            heuristic_max_secs: c.heuristic_max_secs,
            targets: &c.targeted_cache_control,
            implicit_vary: &c.implicit_vary,
        }
    }

    /// The upstream answered a looked-up request: freshen on 304, serve stale on error, or
    /// start capturing a storable response.
    fn after_forward(
        &mut self,
        state: &mut State,
        l: &mut Lookup,
        headers: &OwnedFields,
        now: u64,
    ) -> Option<Action> {
        let status = self.status as u16;
        if status == 304 {
            // Never stored as such: either it freshens what is stored, or it answers the
            // client's own precondition.
            let hit = l.stale.clone()?;
            return self.revalidated(state, l, &hit, headers, now);
        }
        if let Some(hit) = l.stale.clone() {
            if status >= 500 {
                if let Ok(EntryView::Response(r)) = entry::decode(&hit.value) {
                    let targets = &state.config.cache.targeted_cache_control;
                    let (cc, _) = policy::response_cache_control(&r.headers, targets);
                    let grace = state.config.cache.stale_if_error_grace_secs;
                    let sie = StaleReason::IfError;
                    if let Some(ttl) =
                        policy::stale_allowed(&r.meta, &cc, &l.policy, now / 1000, sie, grace)
                    {
                        self.result = CacheResult::Stale;
                        // fwd keeps the reason the request went upstream (RFC 9211 §2.2).
                        let cs = CacheStatus::Forward {
                            fwd: self.fwd,
                            fwd_status: Some(status),
                            stored: false,
                            collapsed: false,
                            ttl: Some(ttl),
                            detail: Some(sie.as_str()),
                        };
                        let age = entry_age(&r, now / 1000);
                        return Some(self.serve(state, l, &r, age, cs, false));
                    }
                }
            }
        }
        let ctx = Self::store_context(&state.config.cache, l, now);
        match policy::storable(status, headers, &ctx) {
            Ok(s) => {
                let declared = policy::content_length(headers);
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
        None
    }

    /// RFC 9111 §4.3.3-4: a 304 for the stored response freshens it; the client then gets
    /// the stored response (it asked unconditionally) or the 304 (it asked conditionally).
    ///
    /// A 304 to validators the filter added is never the client's answer, even when the
    /// freshened response cannot be stored (HEAD, request `no-store`, a full store, a 304
    /// that does not select the entry): the client gets the stored response, its headers
    /// updated in memory when the 304 selects it.
    fn revalidated(
        &mut self,
        state: &mut State,
        l: &Lookup,
        hit: &Hit,
        not_modified: &OwnedFields,
        now: u64,
    ) -> Option<Action> {
        let ctx = Self::store_context(&state.config.cache, l, now);
        let stored = lookup::freshen(&mut state.store, &l.key, hit, not_modified, &ctx);
        self.result = CacheResult::Stale;
        if stored.is_some() {
            state.metrics.add(state.metrics.stores, 1);
            state.publish_usage();
            self.stored = true;
        }
        if !l.validated {
            // The client's own precondition: its 304 passes through.
            return None;
        }
        let value = stored.as_ref().unwrap_or(&hit.value);
        let Ok(EntryView::Response(mut r)) = entry::decode(value) else {
            return None;
        };
        let now_s = now / 1000;
        let merged;
        let age = if stored.is_some() {
            entry_age(&r, now_s)
        } else {
            if conditional::selects(not_modified, &r.headers) {
                merged = policy::freshen(&r.headers, not_modified);
                r.headers = merged.iter().map(|(n, v)| (&n[..], &v[..])).collect();
            }
            // §4.2.3 for the response just validated: its age as of now.
            let date = freshness::single_date(&values(not_modified, "date"));
            let age_value = freshness::age_value(&values(not_modified, "age"));
            freshness::corrected_initial_age(date, age_value, l.sent_ms / 1000, now_s)
        };
        let ttl = stored
            .is_some()
            .then(|| i64::from(r.meta.lifetime) - age as i64);
        let cs = CacheStatus::Forward {
            fwd: self.fwd,
            fwd_status: Some(304),
            stored: stored.is_some(),
            collapsed: false,
            ttl,
            detail: None,
        };
        Some(self.serve(state, l, &r, age, cs, false))
    }

    fn response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.local_reply {
            return Action::Continue;
        }
        let limit = {
            let guard = self.state.borrow();
            let Some(s) = guard.as_ref() else {
                return Action::Continue;
            };
            s.metrics.add(s.metrics.upstream_bytes, body_size as u64);
            s.config.cache.max_entry_bytes
        };
        if let Some(captured) = self.capture.as_ref().map(|c| c.body.len()) {
            if (captured + body_size) as u64 > limit {
                // Capture stops at the limit; the client's stream is untouched.
                self.capture = None;
                self.detail = Some(NotStored::TooLarge.as_str());
                self.result = CacheResult::Uncacheable;
            } else if body_size > 0 {
                let chunk = abi::buffer(Buffer::ResponseBody, 0, body_size).unwrap_or_default();
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
        let state_rc = self.state.clone();
        let mut guard = state_rc.borrow_mut();
        let Some(state) = guard.as_mut() else { return };
        if c.declared.is_some_and(|d| d != c.body.len() as u64) {
            self.result = CacheResult::Uncacheable;
            self.release(state);
            return;
        }
        let names = l.names.as_deref();
        let res = lookup::insert_response(
            &mut state.store,
            &l.key,
            &l.headers,
            names,
            &c.storable,
            &c.body,
        );
        match res {
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

impl Http {
    /// A waiter whose stream ends leaves its leader's list, so nobody acts on a dead stream.
    fn leave(&mut self, state: &mut State) {
        if let Role::Waiter(key) = std::mem::replace(&mut self.role, Role::None) {
            if let Some(p) = state.pending.get_mut(key.as_str()) {
                p.waiters.retain(|w| w.id != self.id);
            }
        }
        state.collapsed.remove(&self.id);
    }
}

impl Drop for Http {
    fn drop(&mut self) {
        // Normally done in on_log; a stream the host deletes without logging ends here.
        let state_rc = self.state.clone();
        let Ok(mut guard) = state_rc.try_borrow_mut() else {
            return;
        };
        if let Some(state) = guard.as_mut() {
            if let Role::Leader(key) = std::mem::replace(&mut self.role, Role::None) {
                root::flight_release(key.hash64());
                if let Some(p) = state.pending.remove(key.as_str()) {
                    super::root::answer_waiters(state, p, now_ms());
                }
            } else {
                self.leave(state);
            }
        }
    }
}

/// What a stored response answers one request with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// 304: the client's precondition failed.
    NotModified,
    /// The stored response without its body.
    Head,
    /// A GET: the whole response, a 206 range of it or a 416 (RFC 9110 §14).
    Get(range::Answer),
}

impl Form {
    /// The form for a request with `req` headers.
    pub fn of(head: bool, not_modified: bool, req: &OwnedFields, r: &ResponseView<'_>) -> Form {
        if not_modified {
            Form::NotModified
        } else if head {
            Form::Head
        } else {
            let len = r.body.len() as u64;
            Form::Get(range::evaluate(req, &r.headers, r.meta.status, len))
        }
    }
}

/// Answers the effective stream from a stored response in `form`: its status (or 304, 206,
/// 416), headers plus `Age`, `Cache-Status` and `Content-Range` where it applies, and body
/// (Envoy drops it for HEAD but keeps its length). Returns the status sent.
pub fn send_stored(
    state: &State,
    key: Option<&CacheKey>,
    r: &ResponseView<'_>,
    age: u64,
    cs: &CacheStatus,
    form: Form,
) -> u32 {
    let age = age.to_string();
    let len = r.body.len() as u64;
    let content_range = match form {
        Form::Get(answer) => answer.content_range(len),
        _ => None,
    };
    let mut headers = match form {
        Form::NotModified => conditional::not_modified_headers(&r.headers),
        // §15.5.17: a 416 describes the range, not the representation.
        Form::Get(range::Answer::Unsatisfiable) => Vec::new(),
        _ => r.headers.clone(),
    };
    if let Some(cr) = &content_range {
        headers.push((b"content-range", cr.as_bytes()));
    }
    headers.push((b"age", age.as_bytes()));
    let cs = member(state, cs, key);
    if state.config.cache.cache_status {
        headers.push((b"cache-status", cs.as_bytes()));
    }
    let (status, body) = match form {
        Form::NotModified => (304, &b""[..]),
        Form::Get(range::Answer::Unsatisfiable) => (416, &b""[..]),
        Form::Get(range::Answer::Partial { first, last }) => {
            let part = usize::try_from(first)
                .ok()
                .zip(usize::try_from(last).ok())
                .and_then(|(f, l)| r.body.get(f..=l));
            (206, part.unwrap_or_default())
        }
        Form::Get(range::Answer::Full) | Form::Head => (u32::from(r.meta.status), r.body),
    };
    if form != Form::Head {
        state
            .metrics
            .add(state.metrics.served_bytes, body.len() as u64);
    }
    // The host refuses only when the stream is already gone: nothing left to answer.
    let _ = abi::send_response(status, &headers, body);
    status
}

/// Reduces `Accept-Encoding` and `Accept-Language` to what the origin uses (RFC 9111 §4.1),
/// in the headers the lookup reads and in the request the upstream gets: the variant is
/// chosen by what is forwarded.
fn normalize_request(c: &CacheConfig, headers: &mut OwnedFields) {
    type Rule = fn(&str, &[String]) -> String;
    let rules: [(&str, &[String], Rule); 2] = [
        (
            "accept-encoding",
            &c.normalize_accept_encoding,
            normalize::accept_encoding,
        ),
        (
            "accept-language",
            &c.normalize_accept_language,
            normalize::accept_language,
        ),
    ];
    for (name, list, rule) in rules {
        if list.is_empty() {
            continue;
        }
        let lines = values(headers, name);
        if lines.is_empty() {
            continue;
        }
        let joined: Vec<_> = lines.iter().map(|v| text(v)).collect();
        let value = rule(&joined.join(", "), list);
        if abi::set_header(Map::Request, name, value.as_bytes()).is_ok() {
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name.as_bytes()));
            headers.push((name.as_bytes().to_vec(), value.into_bytes()));
        }
    }
}

/// This cache's `Cache-Status` member, with the key when debugging is configured.
fn member(state: &State, cs: &CacheStatus, key: Option<&CacheKey>) -> String {
    match key {
        Some(k) if state.config.cache.cache_status_key => status::with_key(cs.render(), k.as_str()),
        _ => cs.render(),
    }
}

/// Current age of a stored response (RFC 9111 §4.2.3).
pub fn entry_age(r: &ResponseView<'_>, now_s: u64) -> u64 {
    crate::cache::freshness::current_age(u64::from(r.meta.initial_age), r.meta.response_time, now_s)
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.timed(|s| s.request_headers())
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        // The filter's own reply (a hit): nothing to do, and not worth two clock reads.
        if self.local_reply {
            return Action::Continue;
        }
        self.timed(|s| s.response_headers(end_of_stream))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.local_reply {
            return Action::Continue;
        }
        self.timed(|s| s.response_body(body_size, end_of_stream))
    }

    fn on_http_response_trailers(&mut self, _: usize) -> Action {
        // Trailers end the body.
        self.timed(|s| s.finish_capture());
        Action::Continue
    }

    fn on_log(&mut self) {
        let state_rc = self.state.clone();
        let mut guard = state_rc.borrow_mut();
        let Some(state) = guard.as_mut() else { return };
        // A leader cut off before its response settled: its waiters go upstream.
        self.release(state);
        self.leave(state);
        if self.probe {
            return;
        }
        if self.status == 0 {
            // Reset before a response: ask the host what the client got.
            self.status = abi::property(&["response", "code"])
                .and_then(|b| {
                    b.get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_le_bytes)
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
