//! The root context: configuration, the tick (LRU flush, gauges, readiness checks) and the
//! readiness check's HTTP call.

use super::abi::{self, Buffer, Map};
use super::host::{now_ms, HostShared, Metrics};
use super::http::Http;
use crate::cache::conditional;
use crate::cache::entry::{self, EntryView};
use crate::cache::key::CacheKey;
use crate::cache::lookup::{self, Found};
use crate::cache::policy::{self, Forward, RequestPolicy, Reuse, StoreContext};
use crate::cache::status::CacheStatus;
use crate::cache::store::{Limits, Store};
use crate::config::Config;
use crate::field::{first, text, OwnedFields};
use crate::health::UpstreamCheck;
use hashbrown::{HashMap, HashSet};
use log::{debug, error, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// Shared-data namespace; the `2` is the layout version of the store (sharded indexes and a
/// ledger, `cache/store.rs`). A new layout takes a new namespace: a host's shared data can
/// outlive the `.wasm` that wrote it (an nginx zone across a reload, an Envoy process).
pub const NAMESPACE: &str = "ef2";
/// The namespace of the previous layout (one index of every slot), retired at start.
pub const RETIRED_NAMESPACE: &str = "ef1";
/// Shared-data key of the latest readiness check, so every worker answers the same.
pub const READY_KEY: &str = "ef2/ready";
/// Prefix of the in-flight markers that let workers coalesce with each other: a miss whose
/// URL another worker is already fetching waits for that worker's response. Bounded like
/// the refresh locks.
pub const FLIGHT_PREFIX: &str = "ef2/fl/";
/// How often the root context polls for remote leaders' responses.
pub const REMOTE_POLL_MS: u64 = 20;

/// Prefix of the refresh locks: one background refresh per key across workers. The lock is
/// chosen by key hash among 1024, so the set of keys stays bounded.
pub const REFRESH_LOCK_PREFIX: &str = "ef2/lk/";

/// A background refresh of a stale entry (RFC 5861 §3), queued by an HTTP context and sent
/// by the root context, whose HTTP calls outlive the request that asked for them.
pub struct RefreshJob {
    pub key: CacheKey,
    /// The Vary names the entry was found under.
    pub names: Option<Vec<String>>,
    /// Request headers to send, validators included.
    pub request: Vec<(String, String)>,
    pub cluster: String,
    pub lock: String,
}

/// A request waiting for another request's response (coalescing).
pub struct Waiter {
    pub id: u32,
    pub since_ms: u64,
    pub head: bool,
    pub headers: OwnedFields,
}

/// The requests waiting on one leader, by URL.
pub struct Pending {
    pub key: CacheKey,
    /// The leader is in another worker: every request here waits, and the root context
    /// polls the store until the entry appears or the leader's marker goes.
    pub remote: bool,
    /// The leader's upstream status, once known.
    pub leader_status: u16,
    pub waiters: Vec<Waiter>,
}

/// What the root context and its HTTP contexts share in one VM.
pub struct State {
    pub config: Config,
    pub store: Store<HostShared>,
    pub metrics: Rc<Metrics>,
    pub started_ms: u64,
    /// Refreshes waiting for the root context to send them.
    pub refresh: Vec<RefreshJob>,
    /// Coalesced misses, by primary key text.
    pub pending: HashMap<String, Pending>,
    /// Waiters answered from the cache whose own callbacks have not run yet.
    pub collapsed: HashSet<u32>,
}

impl State {
    /// Publishes the store's usage as gauges.
    pub fn publish_usage(&self) {
        let u = self.store.usage();
        self.metrics
            .record(self.metrics.entries, u64::from(u.entries));
        self.metrics.record(self.metrics.bytes, u.bytes);
    }
}

pub struct Root {
    id: u32,
    state: Rc<RefCell<Option<State>>>,
    metrics: Option<Rc<Metrics>>,
    started_ms: u64,
    /// Token and send time of the readiness check in flight.
    in_flight: Option<(u32, u64)>,
    next_check_ms: u64,
    /// Background refreshes in flight, by call token.
    refreshing: HashMap<u32, (RefreshJob, u64)>,
    tick_ms: u64,
}

impl Root {
    pub fn new(id: u32) -> Root {
        Root {
            id,
            state: Rc::new(RefCell::new(None)),
            metrics: None,
            started_ms: 0,
            in_flight: None,
            next_check_ms: 0,
            refreshing: HashMap::new(),
            tick_ms: 1000,
        }
    }

    /// Requests waiting on another worker's leader: answered once the entry is stored, or
    /// let go when the leader's marker disappears without one.
    fn poll_remote(&mut self, now: u64) -> bool {
        let mut guard = self.state.borrow_mut();
        let Some(s) = guard.as_mut() else {
            return false;
        };
        let keys: Vec<String> = s
            .pending
            .iter()
            .filter(|(_, p)| p.remote)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &keys {
            let Some(p) = s.pending.get(k) else { continue };
            let Some(first) = p.waiters.first() else {
                s.pending.remove(k);
                continue;
            };
            let stored = match lookup::lookup(&mut s.store, &p.key, &first.headers) {
                Found::Response(hit) => matches!(
                    entry::decode(&hit.value),
                    Ok(EntryView::Response(r))
                        if matches!(policy::reuse(&r.meta, &RequestPolicy::from_request(&first.headers), now / 1000), Reuse::Fresh { .. })
                ),
                _ => false,
            };
            if stored || !flight_held(p.key.hash64(), now) {
                if let Some(p) = s.pending.remove(k) {
                    answer_waiters(s, p, now);
                }
            }
        }
        let remaining = s.pending.values().any(|p| p.remote);
        drop(guard);
        if !keys.is_empty() {
            let _ = abi::set_effective_context(self.id);
        }
        remaining
    }

    /// Waiters past the coalescing bound stop waiting and go upstream themselves.
    fn expire_waiters(&mut self, now: u64) {
        let expired: Vec<u32> = {
            let mut guard = self.state.borrow_mut();
            let Some(s) = guard.as_mut() else { return };
            let bound = s.config.cache.coalesce_timeout_ms;
            let mut out = Vec::new();
            for p in s.pending.values_mut() {
                // The first waiter of a remote entry waits exactly as long as the others.
                p.waiters.retain(|w| {
                    let keep = now.saturating_sub(w.since_ms) < bound;
                    if !keep {
                        out.push(w.id);
                    }
                    keep
                });
            }
            out
        };
        for id in &expired {
            if abi::set_effective_context(*id).is_ok() {
                let _ = abi::resume_request();
            }
        }
        if !expired.is_empty() {
            let _ = abi::set_effective_context(self.id);
        }
    }

    /// Sends the queued refreshes.
    fn dispatch_refreshes(&mut self, now: u64) {
        let (jobs, timeout) = {
            let mut guard = self.state.borrow_mut();
            let Some(s) = guard.as_mut() else { return };
            (
                std::mem::take(&mut s.refresh),
                s.config.cache.refresh_timeout_ms,
            )
        };
        for job in jobs {
            let headers: Vec<(&str, &str)> = job
                .request
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let timeout = Duration::from_millis(timeout);
            match self.dispatch_http_call(&job.cluster, headers, None, vec![], timeout) {
                Ok(token) => {
                    self.refreshing.insert(token, (job, now));
                }
                Err(e) => {
                    debug!("edge-filter: refresh of {} not sent: {e:?}", job.key);
                    release_lock(&job.lock);
                }
            }
        }
    }

    /// A background refresh answered: store a new response, or freshen on 304.
    fn refreshed(&mut self, job: RefreshJob, sent: u64, body_size: usize) {
        release_lock(&job.lock);
        let headers = abi::header_map(Map::CallResponse);
        let status: u16 = first(&headers, ":status")
            .and_then(|s| text(s).parse().ok())
            .unwrap_or(0);
        let now = now_ms();
        let mut guard = self.state.borrow_mut();
        let Some(state) = guard.as_mut() else { return };
        let c = &state.config.cache;
        let request = RequestPolicy::from_request(&job.request);
        let ctx = StoreContext {
            head: false,
            request: &request,
            statuses: &c.statuses,
            max_entry_bytes: c.max_entry_bytes,
            request_time: sent / 1000,
            response_time: now / 1000,
            heuristic_fraction: c.heuristic_fraction,
            heuristic_max_secs: c.heuristic_max_secs,
            targets: &c.targeted_cache_control,
            implicit_vary: &c.implicit_vary,
        };
        let stored = if status == 304 {
            let Found::Response(hit) = lookup::lookup(&mut state.store, &job.key, &job.request)
            else {
                return;
            };
            lookup::freshen(&mut state.store, &job.key, &hit, &headers, &ctx)
                .map(|_| ())
                .ok_or(crate::cache::store::StoreError::Contention)
        } else {
            let Ok(s) = policy::storable(status, &headers, &ctx) else {
                return;
            };
            if body_size as u64 > c.max_entry_bytes {
                return;
            }
            let body = abi::buffer(Buffer::CallResponseBody, 0, body_size).unwrap_or_default();
            if policy::content_length(&headers).is_some_and(|l| l != body.len() as u64) {
                return;
            }
            let names = job.names.as_deref();
            lookup::insert_response(&mut state.store, &job.key, &job.request, names, &s, &body).map(
                |out| {
                    state
                        .metrics
                        .add(state.metrics.evictions, u64::from(out.evicted))
                },
            )
        };
        match stored {
            Ok(()) => {
                state.metrics.add(state.metrics.stores, 1);
                state.publish_usage();
            }
            Err(e) => debug!("edge-filter: refresh of {} not stored: {e}", job.key),
        }
    }

    fn metrics(&mut self) -> Rc<Metrics> {
        self.metrics
            .get_or_insert_with(|| Rc::new(Metrics::define()))
            .clone()
    }

    fn check_upstream(&mut self, now: u64) {
        let state = self.state.borrow();
        let Some(s) = state.as_ref() else { return };
        let h = &s.config.health;
        let headers = vec![
            (":method", "GET"),
            (":path", h.check_path.as_str()),
            (":authority", h.authority()),
            (":scheme", "http"),
            ("user-agent", "edge-filter-readiness"),
        ];
        let timeout = Duration::from_millis(h.check_timeout_ms);
        match self.dispatch_http_call(&h.upstream_cluster, headers, None, vec![], timeout) {
            Ok(token) => {
                drop(state);
                self.in_flight = Some((token, now));
            }
            Err(status) => {
                let output = format!(
                    "cannot call cluster `{}` ({status:?}): is it defined?",
                    h.upstream_cluster
                );
                drop(state);
                self.publish_check(UpstreamCheck {
                    ok: false,
                    at_ms: now,
                    response_time_ms: 0,
                    output,
                });
            }
        }
    }

    fn publish_check(&self, check: UpstreamCheck) {
        if let Some(m) = &self.metrics {
            m.record(m.upstream_ready, u64::from(check.ok));
        }
        let _ = abi::shared_set(READY_KEY, &check.encode(), 0);
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _: usize, body_size: usize, _: usize) {
        if let Some((job, sent)) = self.refreshing.remove(&token) {
            self.refreshed(job, sent, body_size);
            return;
        }
        let Some((expected, sent)) = self.in_flight else {
            return;
        };
        if token != expected {
            return;
        }
        self.in_flight = None;
        let now = now_ms();
        let status = abi::header(Map::CallResponse, ":status").map(|s| text(&s).into_owned());
        let ok = status
            .as_deref()
            .and_then(|s| s.parse::<u16>().ok())
            .is_some_and(|s| (200..300).contains(&s));
        let output = match status {
            Some(s) => format!("upstream answered {s}"),
            None => "no response: timeout, reset or connection failure".to_string(),
        };
        self.publish_check(UpstreamCheck {
            ok,
            at_ms: now,
            response_time_ms: now.saturating_sub(sent),
            output,
        });
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        self.started_ms = now_ms();
        self.metrics();
        true
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let metrics = self.metrics();
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let config = match Config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                // One line that names the field: Envoy shows it when it refuses the filter.
                error!("edge-filter: {e}");
                metrics.add(metrics.config_failures, 1);
                return false;
            }
        };
        let limits = Limits {
            max_entries: config.cache.max_entries,
            max_total_bytes: config.cache.max_total_bytes,
            max_entry_bytes: config.cache.max_entry_bytes,
            // More variants than slots cannot be stored anyway.
            max_variants: config.cache.max_variants.min(config.cache.max_entries),
            policy: config.cache.eviction,
        };
        let mut store = Store::new(HostShared, NAMESPACE, limits);
        if let Err(e) = store.init() {
            warn!("edge-filter: cache index not initialised ({e}); will retry on first store");
        }
        // Values of the old layout are never read; free their memory once.
        crate::cache::store::retire_layout(&HostShared, RETIRED_NAMESPACE);
        metrics.record(metrics.capacity_bytes, limits.max_total_bytes);
        metrics.record(metrics.capacity_entries, u64::from(limits.max_entries));
        let tick = config.health.check_period_ms.min(1000);
        let state = State {
            config,
            store,
            metrics,
            started_ms: if self.started_ms == 0 {
                now_ms()
            } else {
                self.started_ms
            },
            refresh: Vec::new(),
            pending: HashMap::new(),
            collapsed: HashSet::new(),
        };
        state.publish_usage();
        *self.state.borrow_mut() = Some(state);
        self.next_check_ms = 0;
        self.tick_ms = tick;
        abi::set_tick_period_ms(tick);
        true
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        // An HTTP context may have shortened the period to wake us for a refresh or for
        // requests waiting on another worker.
        self.dispatch_refreshes(now);
        let polling = self.poll_remote(now);
        let period = if polling {
            REMOTE_POLL_MS
        } else {
            self.tick_ms
        };
        abi::set_tick_period_ms(period);
        let (period, timeout) = {
            let mut guard = self.state.borrow_mut();
            let Some(s) = guard.as_mut() else { return };
            s.store.flush_touches();
            let _ = s.store.refresh();
            s.publish_usage();
            (
                s.config.health.check_period_ms,
                s.config.health.check_timeout_ms,
            )
        };
        // A check the host never answered is abandoned after its timeout and a period.
        if let Some((_, sent)) = self.in_flight {
            if now.saturating_sub(sent) > timeout + period {
                self.in_flight = None;
            }
        }
        self.expire_waiters(now);
        // Refreshes the host never answered are dropped (their lock expires by itself).
        let refresh_timeout = self
            .state
            .borrow()
            .as_ref()
            .map_or(0, |s| s.config.cache.refresh_timeout_ms);
        self.refreshing
            .retain(|_, (_, sent)| now.saturating_sub(*sent) <= refresh_timeout + period);
        if self.in_flight.is_none() && now >= self.next_check_ms {
            self.next_check_ms = now + period;
            // Every worker has a timer, but one check per period is enough for all of them:
            // skip when another worker's result is recent.
            let recent = abi::shared_get(READY_KEY)
                .and_then(|(v, _)| UpstreamCheck::decode(&v))
                .is_some_and(|c| now.saturating_sub(c.at_ms) < period / 2);
            if !recent {
                self.check_upstream(now);
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http::new(context_id, self.state.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn release_lock(lock: &str) {
    let _ = abi::shared_set(lock, b"0", 0);
}

/// Answers each waiter of a settled leader: from the cache when the stored response fits
/// its request, else it resumes and goes upstream. Leaves the effective context on the last
/// waiter: the caller restores its own.
pub fn answer_waiters(state: &mut State, p: Pending, now: u64) {
    for w in &p.waiters {
        if abi::set_effective_context(w.id).is_err() {
            continue;
        }
        if serve_waiter(state, &p, w, now) {
            state.collapsed.insert(w.id);
            state.metrics.add(state.metrics.coalesced, 1);
        } else {
            let _ = abi::resume_request();
        }
    }
}

fn serve_waiter(state: &mut State, p: &Pending, w: &Waiter, now: u64) -> bool {
    let Found::Response(hit) = lookup::lookup(&mut state.store, &p.key, &w.headers) else {
        return false;
    };
    let Ok(EntryView::Response(r)) = entry::decode(&hit.value) else {
        return false;
    };
    let request = RequestPolicy::from_request(&w.headers);
    let Reuse::Fresh { age, ttl } = policy::reuse(&r.meta, &request, now / 1000) else {
        return false;
    };
    let eval = conditional::evaluate(&w.headers, &r.headers, r.meta.response_time);
    if eval == conditional::Evaluation::Forward {
        return false;
    }
    let cs = CacheStatus::Forward {
        fwd: Forward::UriMiss,
        fwd_status: (p.leader_status != 0).then_some(p.leader_status),
        stored: false,
        collapsed: true,
        ttl: Some(ttl),
        detail: None,
    };
    let not_modified = eval == conditional::Evaluation::NotModified;
    let form = super::http::Form::of(w.head, not_modified, &w.headers, &r);
    super::http::send_stored(state, Some(&p.key), &r, age, &cs, form);
    true
}

/// The in-flight marker of a primary key hash: `<until_ms>:<hash>`.
pub fn flight_key(hash: u64) -> String {
    format!("{FLIGHT_PREFIX}{}", hash % 1024)
}

/// Whether another request (in any worker) is fetching `hash` now.
pub fn flight_held(hash: u64, now: u64) -> bool {
    abi::shared_get(&flight_key(hash))
        .and_then(|(v, _)| parse_flight(&v))
        .is_some_and(|(until, h)| h == hash && until > now)
}

fn parse_flight(v: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(v).ok()?;
    let (until, h) = s.split_once(':')?;
    Some((until.parse().ok()?, h.parse().ok()?))
}

/// Marks `hash` as being fetched until `until`; false when another request holds it.
pub fn flight_acquire(hash: u64, now: u64, until: u64) -> bool {
    let held = |v: &[u8]| parse_flight(v).is_some_and(|(u, h)| h == hash && u > now);
    try_lock(
        &flight_key(hash),
        held,
        format!("{until}:{hash}").as_bytes(),
    )
}

/// Takes a lock in shared data: writes `value` at `key` unless `held` says the current
/// value is a live lock. A missing key is created first, because Envoy checks a CAS only on
/// keys that exist: without that, two workers could both take a new lock.
pub fn try_lock(key: &str, held: impl Fn(&[u8]) -> bool, value: &[u8]) -> bool {
    for _ in 0..2 {
        match abi::shared_get(key) {
            // A CAS of 0 would write unconditionally: only a real token guards the lock.
            Some((v, cas)) if cas != 0 => {
                if held(&v) {
                    return false;
                }
                return abi::shared_set(key, value, cas).is_ok();
            }
            Some(_) => return false,
            None => {
                let _ = abi::shared_set(key, b"0", 0);
            }
        }
    }
    false
}

/// Clears the marker of `hash` if it is still ours.
pub fn flight_release(hash: u64) {
    let key = flight_key(hash);
    if let Some((v, cas)) = abi::shared_get(&key) {
        if cas != 0 && parse_flight(&v).is_some_and(|(_, h)| h == hash) {
            let _ = abi::shared_set(&key, b"0:0", cas);
        }
    }
}
