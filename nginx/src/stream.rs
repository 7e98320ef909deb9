//! One request through the filter chain: request headers in the rewrite phase (with pause
//! and resume), local responses, and the response header and body filters.
//!
//! Pause: a filter that returns `StopIteration` from its request headers leaves the request
//! in the rewrite phase (the handler returns `NGX_DONE`; nothing finalizes it). When the
//! filter later resumes it or answers it (from a timer, another request or an HTTP call,
//! through `set_effective_context`), the action is stored on the request and its write
//! event is posted: nginx then runs the phases again from this handler, outside any VM
//! callback. A client that goes away meanwhile ends the request (`ngx_http_test_reading`),
//! which ends its streams.

use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use nginx_sys::ngx_delete_posted_event;
use ngx::core::Status;
use ngx::ffi::{
    ngx_add_timer, ngx_buf_t, ngx_chain_t, ngx_create_temp_buf, ngx_del_timer, ngx_event_t,
    ngx_http_block_reading, ngx_http_discard_request_body, ngx_http_filter_finalize_request,
    ngx_http_output_filter, ngx_http_request_t, ngx_http_run_posted_requests, ngx_http_send_header,
    ngx_http_test_reading, ngx_int_t, ngx_post_event, ngx_posted_events, NGX_LOG_NOTICE,
};
use ngx::http::{HTTPStatus, HttpModule, HttpModuleLocationConf, Request};
use ngx::ngx_log_error;
use proxy_wasm_harness::abi::{stream::LocalResponse, LogLevel, Pairs};

use crate::client::Owner;
use crate::headers::{
    apply_request_headers, apply_response_headers, clear_response_headers, push_header,
    read_response_pairs, request_pairs, response_pair_count, response_pairs, set_content_length,
    set_content_type, set_status,
};
use crate::host::{HeadersSource, StreamAction};
use crate::subrequest::{self, SubrequestCall};
use crate::{log_to_nginx, with_vm, FilterRef, LocConf, Module};

/// The most response body a filter may hold back with `StopIterationAndBuffer` (Envoy's
/// default buffer limit is 1 MiB per stream; a cache entry may be larger).
pub const MAX_BUFFERED_BODY: usize = 16 << 20;

/// The longest a filter may hold a request (its own timeouts, such as edge-filter's
/// coalescing timeout, are far shorter). The timer also keeps a worker that shuts down
/// gracefully (`nginx -s reload`, `quit`) alive until the request is answered: nginx
/// exits a worker once no non-cancelable timer is left, and a held request has no other.
pub const MAX_PAUSE_MS: usize = 60_000;

/// nginx's "close the connection without a response" status (`proxy_close_stream`).
const NGX_HTTP_CLOSE: ngx_int_t = 444;

/// A filter's stream context in one request, tied to the VM (generation) that made it.
#[derive(Clone)]
pub(crate) struct FilterStream {
    filter: FilterRef,
    gen: u64,
    id: u32,
    /// The filter failed on this stream and the policy is fail-open: skip it.
    failed: bool,
    /// Body held back by `StopIterationAndBuffer`, shown again with the next chunk.
    buffered: Vec<u8>,
}

/// What woke a paused request.
#[derive(Debug)]
pub(crate) enum Wake {
    /// The filter acted on the stream.
    Action(StreamAction),
    /// The filter's VM failed (trapped) while the request waited.
    VmFailed,
}

#[derive(Debug)]
enum Phase {
    /// Running the request-headers chain.
    Running,
    /// Waiting in the rewrite phase for the filter at `next - 1`.
    Paused,
    /// Woken, to be handled when the phases run again.
    Woken(Wake),
    /// The chain is done (passed, answered or failed).
    Done,
}

/// Per-request state; dropped with the request's pool, which ends the streams.
pub(crate) struct RequestCtx {
    r: *mut ngx_http_request_t,
    chain: Vec<FilterRef>,
    fail_open: bool,
    streams: Vec<FilterStream>,
    /// The next filter of the chain to get the request headers.
    next: usize,
    /// The request headers as the chain has made them so far.
    headers: Pairs,
    /// Some filter changed them: they are written back when the chain passes.
    headers_changed: bool,
    phase: Phase,
    /// A local response sent from the response phase: its body replaces the upstream's.
    replacement: Option<Vec<u8>>,
    replacement_sent: bool,
    /// `proxy_wasm_call_location`: the URI the streams' calls go to as subrequests.
    call_location: Option<Vec<u8>>,
    /// Posted after subrequests are made, to run them (nginx runs posted subrequests
    /// only after the events of the request's own connection).
    kick: Option<Box<ngx_event_t>>,
    /// Upstream body bytes still to come by the response's Content-Length.
    body_left: Option<u64>,
    /// The streams have seen the body's end: later buffers pass untouched.
    body_ended: bool,
}

thread_local! {
    /// Paused requests of this worker by (filter id, VM generation, stream id).
    static PAUSED: RefCell<FxHashMap<(usize, u64, u32), *mut ngx_http_request_t>> =
        RefCell::default();
    /// The request of every stream whose calls go out as subrequests, by (filter id, VM
    /// generation, stream id); removed with the request.
    static CALLERS: RefCell<FxHashMap<(usize, u64, u32), *mut ngx_http_request_t>> =
        RefCell::default();
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        // By this request's stream keys: a scan of the maps would cost every request
        // ending time in proportion to all requests held or calling in the worker.
        for s in &self.streams {
            let key = (s.filter.id, s.gen, s.id);
            for map in [&PAUSED, &CALLERS] {
                map.with(|m| {
                    let mut m = m.borrow_mut();
                    if m.get(&key) == Some(&self.r) {
                        m.remove(&key);
                    }
                });
            }
        }
        if let Some(kick) = self.kick.as_mut() {
            if kick.posted() != 0 {
                // SAFETY: posted by `start_subrequest`; its memory goes with this context.
                unsafe { ngx_delete_posted_event(&mut **kick) };
            }
        }
        for s in self.streams.drain(..) {
            if s.failed {
                continue;
            }
            let _ = catch_unwind(AssertUnwindSafe(|| {
                if let Err(e) = with_vm(&s.filter, |vm, gen| {
                    if gen == s.gen {
                        vm.finish(s.id)
                    } else {
                        Ok(())
                    }
                }) {
                    log_to_nginx(LogLevel::Error, &e.to_string());
                }
            }));
        }
    }
}

/// Applies the stream actions a VM queued for streams other than the one whose callback
/// ran: a paused request gets woken; the others are returned to the caller.
pub(crate) fn route_actions(
    filter_id: usize,
    gen: u64,
    actions: Vec<(u32, StreamAction)>,
) -> Vec<(u32, StreamAction)> {
    let mut rest = Vec::new();
    for (id, a) in actions {
        let r = PAUSED.with(|p| p.borrow_mut().remove(&(filter_id, gen, id)));
        match r {
            Some(r) => unsafe { wake(r, Wake::Action(a)) },
            None => rest.push((id, a)),
        }
    }
    rest
}

/// A request paused on a stream, whose headers a filter may change from another callback.
pub(crate) struct HeldRequest(*mut ngx_http_request_t);

/// The request paused on stream `key` (filter id, VM generation, stream id), with its
/// request headers as the chain has made them so far; `None` if no request waits there.
pub(crate) fn held_request(key: (usize, u64, u32)) -> Option<(HeldRequest, Pairs)> {
    let r = PAUSED.with(|p| p.borrow().get(&key).copied())?;
    // SAFETY: PAUSED holds live main requests only (removed as their context drops).
    let headers = unsafe { ctx_of(r) }?.headers.clone();
    Some((HeldRequest(r), headers))
}

impl HeldRequest {
    /// The filter changed the request headers in a callback other than its request
    /// headers' (an HTTP call's answer): they are written back when the chain passes, as
    /// changes made in the request-headers callback are. Call it before the event loop
    /// runs again (the request may have been woken, not ended).
    pub(crate) fn set_headers(self, headers: Pairs) {
        // SAFETY: a waking request is only posted, never freed, before the event loop
        // runs again.
        if let Some(ctx) = unsafe { ctx_of(self.0) } {
            if matches!(ctx.phase, Phase::Paused | Phase::Woken(_)) {
                ctx.headers = headers;
                ctx.headers_changed = true;
            }
        }
    }
}

/// The VM (filter, generation) failed: every request paused on it is woken to apply the
/// failure policy.
pub(crate) fn vm_failed(filter_id: usize, gen: u64) {
    let woken: Vec<*mut ngx_http_request_t> = PAUSED.with(|p| {
        let mut p = p.borrow_mut();
        let keys: Vec<_> = p
            .keys()
            .filter(|(f, g, _)| *f == filter_id && *g == gen)
            .copied()
            .collect();
        keys.into_iter().filter_map(|k| p.remove(&k)).collect()
    });
    for r in woken {
        unsafe { wake(r, Wake::VmFailed) };
    }
}

/// Stores why `r` wakes and posts its write event: nginx runs its phases again from the
/// rewrite handler at the next turn of the event loop.
unsafe fn wake(r: *mut ngx_http_request_t, why: Wake) {
    let Some(ctx) = ctx_of(r) else { return };
    if !matches!(ctx.phase, Phase::Paused) {
        return;
    }
    ctx.phase = Phase::Woken(why);
    (*r).read_event_handler = Some(ngx_http_block_reading);
    let c = (*r).connection;
    if !c.is_null() && !(*c).write.is_null() {
        let w = (*c).write;
        if (*w).timer_set() != 0 {
            ngx_del_timer(w);
        }
        ngx_post_event(w, std::ptr::addr_of_mut!(ngx_posted_events));
    }
}

unsafe fn ctx_of<'a>(r: *mut ngx_http_request_t) -> Option<&'a mut RequestCtx> {
    // A subrequest's slot is not a RequestCtx (the module's calls keep theirs there).
    if r.is_null() || r != (*r).main {
        return None;
    }
    let p = *(*r).ctx.add(Module::module().ctx_index) as *mut RequestCtx;
    p.as_mut()
}

/// Starts a call of a stream as a subrequest of the stream's request, and makes sure
/// nginx runs it soon: a call made from another connection's event (a tick, an answer
/// of the module's client) would otherwise wait for the next event of its request.
pub(crate) fn start_subrequest(owner: Owner, call: SubrequestCall) -> Result<(), String> {
    let key = (owner.filter.id, owner.generation, owner.context);
    let Some(r) = CALLERS.with(|c| c.borrow().get(&key).copied()) else {
        return Err(format!(
            "http_call to cluster \"{}\" dropped: its request has ended",
            call.cluster
        ));
    };
    // SAFETY: CALLERS holds live main requests only (removed as their context drops).
    unsafe {
        let ctx = ctx_of(r).ok_or("http_call from a request without filter state")?;
        let location = ctx
            .call_location
            .clone()
            .ok_or("http_call routed to a subrequest without a call location")?;
        subrequest::start(r, &location, owner, call)?;
        let c = (*r).connection;
        let kick = ctx.kick.get_or_insert_with(|| {
            // SAFETY: all-zero is a fresh event, as ngx_pcalloc gives one.
            let mut ev: Box<ngx_event_t> = Box::new(std::mem::zeroed());
            ev.data = r.cast();
            ev.handler = Some(run_subrequests);
            ev.log = (*c).log;
            ev
        });
        if kick.posted() == 0 {
            ngx_post_event(&mut **kick, std::ptr::addr_of_mut!(ngx_posted_events));
        }
    }
    Ok(())
}

unsafe extern "C" fn run_subrequests(ev: *mut ngx_event_t) {
    let r = (*ev).data as *mut ngx_http_request_t;
    // The event is deleted before the request goes, so `r` is live.
    ngx_http_run_posted_requests((*r).connection);
}

/// The rewrite-phase handler: the request headers go through the chain.
pub(crate) extern "C" fn request_headers_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    match catch_unwind(AssertUnwindSafe(|| unsafe { request_headers(r) })) {
        Ok(rc) => rc,
        Err(_) => {
            log_to_nginx(
                LogLevel::Error,
                "internal error (panic) in the request phase",
            );
            HTTPStatus::INTERNAL_SERVER_ERROR.0 as ngx_int_t
        }
    }
}

/// What the chain decided for the request.
enum Verdict {
    /// Go on to the next phase (the upstream).
    Pass,
    /// Wait in the rewrite phase.
    Pause,
    /// Answer with this local response.
    Local(LocalResponse),
    /// Finalize with this status (500 on a failure, 444 on a reset).
    Finalize(ngx_int_t),
}

unsafe fn request_headers(r: *mut ngx_http_request_t) -> ngx_int_t {
    let declined: ngx_int_t = Status::NGX_DECLINED.0;
    // Subrequests (SSI, auth_request) do not run the chain again.
    if r != (*r).main {
        return declined;
    }
    let verdict = match ctx_of(r) {
        Some(ctx) => match std::mem::replace(&mut ctx.phase, Phase::Running) {
            // `rewrite ... last` runs the phase again: the chain runs once.
            Phase::Done => {
                ctx.phase = Phase::Done;
                return declined;
            }
            Phase::Paused => {
                let w = (*(*r).connection).write;
                if (*w).timedout() == 0 {
                    // A spurious run while paused: keep waiting.
                    ctx.phase = Phase::Paused;
                    return Status::NGX_DONE.0;
                }
                (*w).set_timedout(0);
                PAUSED.with(|p| p.borrow_mut().retain(|_, q| *q != r));
                let filter = ctx.chain[ctx.next - 1].name();
                log_to_nginx(
                    LogLevel::Error,
                    &format!(
                        "filter \"{filter}\" held the request for more than {MAX_PAUSE_MS} ms; \
                         answering 504"
                    ),
                );
                Verdict::Finalize(HTTPStatus::GATEWAY_TIME_OUT.0 as ngx_int_t)
            }
            Phase::Woken(Wake::Action(StreamAction::Resume)) => run_chain(ctx),
            Phase::Woken(Wake::Action(StreamAction::LocalResponse(lr))) => Verdict::Local(lr),
            Phase::Woken(Wake::Action(StreamAction::Reset)) => Verdict::Finalize(NGX_HTTP_CLOSE),
            Phase::Woken(Wake::VmFailed) => {
                let filter = ctx.chain[ctx.next - 1].name();
                log_to_nginx(
                    LogLevel::Error,
                    &format!("filter \"{filter}\" failed while the request waited for it"),
                );
                if ctx.fail_open {
                    mark_failed(ctx, ctx.next - 1);
                    run_chain(ctx)
                } else {
                    Verdict::Finalize(HTTPStatus::INTERNAL_SERVER_ERROR.0 as ngx_int_t)
                }
            }
            Phase::Running => run_chain(ctx),
        },
        None => {
            let Some(lc) = Module::location_conf(&*r) else {
                return declined;
            };
            if lc.filters.is_empty() {
                return declined;
            }
            let Some(ctx) = new_ctx(r, lc) else {
                return Status::NGX_ERROR.0;
            };
            run_chain(ctx)
        }
    };
    let Some(ctx) = ctx_of(r) else {
        return Status::NGX_ERROR.0;
    };
    match verdict {
        Verdict::Pause => {
            ctx.phase = Phase::Paused;
            let s = &ctx.streams[ctx.streams.len() - 1];
            PAUSED.with(|p| p.borrow_mut().insert((s.filter.id, s.gen, s.id), r));
            // Notice a client that goes away while it waits.
            (*r).read_event_handler = Some(ngx_http_test_reading);
            let w = (*(*r).connection).write;
            ngx_add_timer(w, MAX_PAUSE_MS as _);
            Status::NGX_DONE.0
        }
        Verdict::Pass => {
            ctx.phase = Phase::Done;
            if ctx.headers_changed {
                let original = request_pairs(&*r);
                match apply_request_headers(r, &original, &ctx.headers) {
                    Ok(ignored) if !ignored.is_empty() => {
                        ngx_log_error!(
                            NGX_LOG_NOTICE,
                            (*(*r).connection).log,
                            "proxy_wasm: request header changes not applied to {}",
                            ignored.join(", ")
                        );
                    }
                    Ok(_) => {}
                    Err(()) => return Status::NGX_ERROR.0,
                }
            }
            declined
        }
        Verdict::Local(lr) => {
            ctx.phase = Phase::Done;
            send_local_response(r, &lr)
        }
        Verdict::Finalize(rc) => {
            ctx.phase = Phase::Done;
            rc
        }
    }
}

impl FilterRef {
    fn name(&self) -> &str {
        &self.plugin.name
    }
}

unsafe fn new_ctx<'a>(r: *mut ngx_http_request_t, lc: &LocConf) -> Option<&'a mut RequestCtx> {
    let req = Request::from_ngx_http_request(r);
    let headers = request_pairs(&*r);
    let ctx = req.pool().allocate(RequestCtx {
        r,
        chain: lc.filters.clone(),
        fail_open: lc.fail_open(),
        streams: Vec::new(),
        next: 0,
        headers,
        headers_changed: false,
        phase: Phase::Running,
        replacement: None,
        replacement_sent: false,
        body_left: None,
        body_ended: false,
        call_location: lc.call_location.clone().map(String::into_bytes),
        kick: None,
    });
    if ctx.is_null() {
        return None;
    }
    req.set_module_ctx(ctx as *mut c_void, Module::module());
    Some(&mut *ctx)
}

fn mark_failed(ctx: &mut RequestCtx, chain_index: usize) {
    let id = ctx.chain[chain_index].id;
    for s in ctx.streams.iter_mut().filter(|s| s.filter.id == id) {
        s.failed = true;
    }
}

/// Runs the request headers through the filters from `ctx.next` on.
unsafe fn run_chain(ctx: &mut RequestCtx) -> Verdict {
    let r = ctx.r;
    // A request without a body ends with its headers.
    let end_of_stream = (*r).headers_in.content_length_n <= 0 && (*r).headers_in.chunked() == 0;
    while ctx.next < ctx.chain.len() {
        let filter = ctx.chain[ctx.next].clone();
        ctx.next += 1;
        let headers = std::mem::take(&mut ctx.headers);
        // Fail-open goes on with the headers as they were before this filter.
        let backup = (ctx.fail_open && ctx.headers_changed).then(|| headers.clone());
        let streams = &mut ctx.streams;
        let via_subrequests = ctx.call_location.is_some();
        let run = with_vm(&filter, |vm, gen| {
            let id = vm.create_stream()?;
            if via_subrequests {
                vm.route_calls_through_subrequests(id);
                CALLERS.with(|c| c.borrow_mut().insert((filter.id, gen, id), r));
            }
            streams.push(FilterStream {
                filter: filter.clone(),
                gen,
                id,
                failed: false,
                buffered: Vec::new(),
            });
            let o = vm.request_headers(id, headers, end_of_stream)?;
            Ok((id, o))
        });
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                log_to_nginx(LogLevel::Error, &e.to_string());
                // The VM is gone: its stream must not be finished on another one.
                mark_failed(ctx, ctx.next - 1);
                if ctx.fail_open {
                    ctx.headers = backup.unwrap_or_else(|| request_pairs(&*r));
                    continue;
                }
                return Verdict::Finalize(HTTPStatus::INTERNAL_SERVER_ERROR.0 as ngx_int_t);
            }
        };
        let (id, o) = run.value;
        ctx.headers = o.headers;
        ctx.headers_changed |= o.changed;
        let mut resumed = false;
        for (sid, a) in run.actions {
            if sid != id {
                continue;
            }
            match a {
                StreamAction::LocalResponse(lr) => return Verdict::Local(lr),
                StreamAction::Reset => return Verdict::Finalize(NGX_HTTP_CLOSE),
                // Resumed within its own callback: it does not wait.
                StreamAction::Resume => resumed = true,
            }
        }
        if o.paused && !resumed {
            return Verdict::Pause;
        }
    }
    Verdict::Pass
}

/// Sends the filter's local response and returns what the rewrite phase should finalize
/// the request with.
unsafe fn send_local_response(r: *mut ngx_http_request_t, lr: &LocalResponse) -> ngx_int_t {
    if ngx_http_discard_request_body(r) != Status::NGX_OK.0 {
        return Status::NGX_ERROR.0;
    }
    if !set_local_headers(r, lr) {
        return Status::NGX_ERROR.0;
    }
    let rc = ngx_http_send_header(r);
    if rc == Status::NGX_ERROR.0 || rc > Status::NGX_OK.0 || (*r).header_only() != 0 {
        return rc;
    }
    let Some(b) = memory_buf(r, &lr.body) else {
        return Status::NGX_ERROR.0;
    };
    (*b).set_last_buf(1);
    (*b).set_last_in_chain(1);
    let mut out = ngx_chain_t {
        buf: b,
        next: std::ptr::null_mut(),
    };
    ngx_http_output_filter(r, &mut out)
}

/// Status, headers, `Content-Type` (the filter's, else `text/plain` for a non-empty body)
/// and `Content-Length` of a local response; no body for 204 and 304.
unsafe fn set_local_headers(r: *mut ngx_http_request_t, lr: &LocalResponse) -> bool {
    set_status(r, lr.status);
    let no_body = lr.status == 204 || lr.status == 304;
    let mut content_type = None;
    for (k, v) in lr.headers.iter() {
        let is = |name: &[u8]| k.eq_ignore_ascii_case(name);
        match () {
            _ if is(b"content-type") => content_type = Some(v.to_vec()),
            // nginx computes these itself.
            _ if is(b"content-length") || is(b"transfer-encoding") || is(b"connection") => {}
            // Bytes as the filter gave them: a stored header may hold obs-text.
            _ => {
                if !push_header(r, &mut (*r).headers_out.headers, k, v) {
                    return false;
                }
            }
        }
    }
    if no_body {
        set_content_type(r, None);
        set_content_length(r, None);
    } else {
        let ct = content_type.or_else(|| (!lr.body.is_empty()).then(|| b"text/plain".to_vec()));
        if !set_content_type(r, ct.as_deref()) {
            return false;
        }
        set_content_length(r, Some(lr.body.len() as i64));
    }
    if no_body || lr.body.is_empty() {
        (*r).set_header_only(1);
    }
    true
}

/// A buffer in the request's pool holding `data` (an empty one is a `sync` buffer, which
/// nginx accepts without "zero size buf" alerts).
unsafe fn memory_buf(r: *mut ngx_http_request_t, data: &[u8]) -> Option<*mut ngx_buf_t> {
    if data.is_empty() {
        let b =
            ngx::ffi::ngx_pcalloc((*r).pool, std::mem::size_of::<ngx_buf_t>()) as *mut ngx_buf_t;
        if b.is_null() {
            return None;
        }
        (*b).set_sync(1);
        return Some(b);
    }
    let b = ngx_create_temp_buf((*r).pool, data.len());
    if b.is_null() {
        return None;
    }
    std::ptr::copy_nonoverlapping(data.as_ptr(), (*b).last, data.len());
    (*b).last = (*b).last.add(data.len());
    Some(b)
}

/// This request's state, if the chain ran for it and has live streams.
unsafe fn response_ctx<'a>(r: *mut ngx_http_request_t) -> Option<&'a mut RequestCtx> {
    if r != (*r).main {
        return None;
    }
    ctx_of(r).filter(|c| c.streams.iter().any(|s| !s.failed))
}

/// Runs the response headers through the streams; `Err` is a failure under fail-closed.
unsafe fn response_headers(r: *mut ngx_http_request_t) -> Result<(), ngx_int_t> {
    let Some(ctx) = response_ctx(r) else {
        return Ok(());
    };
    let eos = (*r).header_only() != 0;
    ctx.body_left = if eos {
        None
    } else {
        u64::try_from((*r).headers_out.content_length_n).ok()
    };
    let mut local = None;
    for i in 0..ctx.streams.len() {
        if ctx.streams[i].failed {
            continue;
        }
        let s = ctx.streams[i].clone();
        // Read from nginx's lists only if the filter asks: r lives, and its headers stay
        // as they are, until the callback returns.
        let source = HeadersSource::new(read_response_pairs, r as *const c_void);
        let count = response_pair_count(&*r);
        let status = (*r).headers_out.status as u32;
        let run = with_vm(&s.filter, |vm, gen| {
            if gen != s.gen {
                return Ok(None);
            }
            vm.response_headers(s.id, source, count, status, eos)
                .map(Some)
        });
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                log_to_nginx(LogLevel::Error, &e.to_string());
                ctx.streams[i].failed = true;
                if ctx.fail_open {
                    continue;
                }
                return Err(HTTPStatus::INTERNAL_SERVER_ERROR.0 as ngx_int_t);
            }
        };
        let Some(o) = run.value else { continue };
        for (sid, a) in run.actions {
            if sid == s.id {
                if let StreamAction::LocalResponse(lr) = a {
                    local = Some(lr);
                }
            }
        }
        if local.is_some() {
            break;
        }
        if o.changed && !apply_response_headers(r, &response_pairs(&*r), &o.headers) {
            return Err(Status::NGX_ERROR.0);
        }
        if o.paused {
            // Holding response headers back needs the whole response buffered; nginx
            // sends them now (documented).
            log_to_nginx(
                LogLevel::Warn,
                "a filter paused the response headers: not supported, continuing",
            );
        }
    }
    if let Some(lr) = local {
        // A local response from the response phase (a revalidated entry's stored body,
        // say): it replaces the upstream's status, headers and body.
        clear_response_headers(r);
        if !set_local_headers(r, &lr) {
            return Err(Status::NGX_ERROR.0);
        }
        let head = (*r).method == ngx::ffi::NGX_HTTP_HEAD as usize;
        ctx.replacement = Some(if head { Vec::new() } else { lr.body });
    }
    Ok(())
}

/// The response header filter.
pub(crate) extern "C" fn response_header_filter(r: *mut ngx_http_request_t) -> ngx_int_t {
    let rc = catch_unwind(AssertUnwindSafe(|| unsafe { response_headers(r) }))
        .unwrap_or(Err(Status::NGX_ERROR.0));
    unsafe {
        if let Err(status) = rc {
            if status == Status::NGX_ERROR.0 {
                return status;
            }
            // Fail closed: an error page instead of this response (its header filters
            // skip our state: nginx clears it).
            let m = std::ptr::addr_of_mut!(crate::ngx_http_proxy_wasm_module);
            return ngx_http_filter_finalize_request(r, m, status);
        }
        match crate::NEXT_HEADER_FILTER {
            Some(next) => next(r),
            None => Status::NGX_ERROR.0,
        }
    }
}

/// The most bytes of a file buffer read at once: a body spooled to a proxy temp file
/// reaches the filter in pieces of this size, as it would stream.
pub const FILE_PIECE: usize = 256 << 10;

/// One input link's bytes, in pieces: a memory buffer as one piece, a file buffer (a body
/// spooled to a proxy temp file) read back from its file in pieces of [`FILE_PIECE`].
pub(crate) unsafe fn link_pieces(b: *mut ngx_buf_t) -> Result<Vec<Vec<u8>>, String> {
    if (*b).in_file() != 0 && (*b).temporary() == 0 && (*b).memory() == 0 && (*b).mmap() == 0 {
        let f = (*b).file;
        let (start, end) = ((*b).file_pos, (*b).file_last);
        if f.is_null() || end <= start {
            return Ok(Vec::new());
        }
        let mut pieces = Vec::new();
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(FILE_PIECE);
            let mut piece = vec![0u8; n];
            read_at((*f).fd, &mut piece, at as u64).map_err(|e| {
                let name = String::from_utf8_lossy((*f).name.as_bytes()).into_owned();
                format!("cannot read the response body from {name}: {e}")
            })?;
            pieces.push(piece);
            at += n as i64;
        }
        return Ok(pieces);
    }
    if (*b).last > (*b).pos {
        let len = (*b).last.offset_from((*b).pos) as usize;
        return Ok(vec![std::slice::from_raw_parts((*b).pos, len).to_vec()]);
    }
    Ok(Vec::new())
}

/// `pread` on nginx's descriptor without taking ownership of it.
fn read_at(fd: i32, out: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::FromRawFd;
    // SAFETY: nginx owns `fd` for the request's lifetime; ManuallyDrop keeps it open.
    let f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    f.read_exact_at(out, offset)
}

/// The buffers of a chain, in order (links without one skipped).
///
/// # Safety
/// `cl` is a valid chain whose links and buffers outlive the iteration; the iteration
/// reads each link's `next` before yielding its buffer, so buffers may be consumed.
pub(crate) unsafe fn bufs(mut cl: *mut ngx_chain_t) -> impl Iterator<Item = *mut ngx_buf_t> {
    std::iter::from_fn(move || {
        while !cl.is_null() {
            // SAFETY: the caller's contract.
            let (b, next) = unsafe { ((*cl).buf, (*cl).next) };
            cl = next;
            if !b.is_null() {
                return Some(b);
            }
        }
        None
    })
}

/// Marks a buffer consumed (its bytes were replaced or held back).
pub(crate) unsafe fn consume(b: *mut ngx_buf_t) {
    (*b).pos = (*b).last;
    if (*b).in_file() != 0 {
        (*b).file_pos = (*b).file_last;
    }
}

/// What the body filter passes on for one input link.
enum Out {
    /// The link unchanged.
    Same,
    /// New bytes (possibly none) in place of the link's.
    Replaced(Vec<u8>),
}

/// Runs one body chunk through the streams, honouring body changes and
/// `StopIterationAndBuffer`. `Err` is a failure under fail-closed.
unsafe fn body_chunk(ctx: &mut RequestCtx, data: Vec<u8>, eos: bool) -> Result<Out, String> {
    let mut data = data;
    let mut changed = false;
    for i in 0..ctx.streams.len() {
        if ctx.streams[i].failed {
            continue;
        }
        let (filter, gen, id) = {
            let s = &ctx.streams[i];
            (s.filter.clone(), s.gen, s.id)
        };
        let held = !ctx.streams[i].buffered.is_empty();
        if held {
            let mut all = std::mem::take(&mut ctx.streams[i].buffered);
            all.extend_from_slice(&data);
            data = all;
            changed = true;
        }
        let chunk = std::mem::take(&mut data);
        // Fail-open must pass the bytes on even if the VM dies holding them.
        let backup = ctx.fail_open.then(|| chunk.clone());
        let mut spare = None;
        let run = with_vm(&filter, |vm, g| {
            if g != gen {
                spare = Some(chunk);
                return Ok(None);
            }
            vm.response_body(id, chunk, eos).map(Some)
        });
        let o = match run {
            Ok(run) => match run.value {
                Some(o) => o,
                None => {
                    data = spare.unwrap_or_default();
                    continue;
                }
            },
            Err(e) => {
                ctx.streams[i].failed = true;
                if let Some(b) = backup {
                    log_to_nginx(LogLevel::Error, &e.to_string());
                    data = b;
                    continue;
                }
                return Err(e.to_string());
            }
        };
        data = o.body;
        changed |= o.changed;
        if o.paused {
            if data.len() > MAX_BUFFERED_BODY {
                log_to_nginx(
                    LogLevel::Warn,
                    &format!(
                        "filter \"{}\" held back more than {MAX_BUFFERED_BODY} body bytes; \
                         passing them on",
                        filter.name()
                    ),
                );
            } else {
                ctx.streams[i].buffered = std::mem::take(&mut data);
                return Ok(Out::Replaced(Vec::new()));
            }
        }
    }
    Ok(if changed {
        Out::Replaced(data)
    } else {
        Out::Same
    })
}

unsafe fn response_body(
    r: *mut ngx_http_request_t,
    input: *mut ngx_chain_t,
) -> Result<*mut ngx_chain_t, String> {
    let Some(ctx) = ctx_of(r) else {
        return Ok(input);
    };
    if let Some(body) = ctx.replacement.clone() {
        // The response was replaced by a local response: the upstream's bytes are
        // dropped, ours go once.
        for b in bufs(input) {
            consume(b);
        }
        if ctx.replacement_sent {
            return Ok(std::ptr::null_mut());
        }
        ctx.replacement_sent = true;
        let b = memory_buf(r, &body).ok_or("out of memory")?;
        (*b).set_last_buf(1);
        (*b).set_last_in_chain(1);
        return chain_of(r, vec![b]);
    }
    if !ctx.streams.iter().any(|s| !s.failed) {
        return Ok(input);
    }
    let mut out = Vec::new();
    let mut touched = false;
    for b in bufs(input) {
        if ctx.body_ended {
            out.push(b);
            continue;
        }
        let eos = (*b).last_buf() != 0;
        let pieces = link_pieces(b)?;
        if pieces.is_empty() && !eos {
            out.push(b);
            continue;
        }
        let n = pieces.len().max(1);
        let mut outs = Vec::with_capacity(n);
        let mut same = true;
        for (k, piece) in pieces
            .into_iter()
            .chain(std::iter::once(Vec::new()))
            .take(n)
            .enumerate()
        {
            if ctx.body_ended {
                outs.push(piece);
                continue;
            }
            // The end of stream is the link's last piece, or the piece that completes the
            // Content-Length (RFC 9112 §6.3): nginx sends the end as an empty buffer after
            // it, when the client may already have every byte; a filter that stores the
            // response must have done so by then.
            let completes = match ctx.body_left.as_mut() {
                Some(left) if !piece.is_empty() => {
                    *left = left.saturating_sub(piece.len() as u64);
                    *left == 0
                }
                _ => false,
            };
            let end = (eos && k + 1 == n) || completes;
            ctx.body_ended = end;
            // A link of one piece that stays the same is passed on as it is: no copy.
            let copy = (n > 1).then(|| piece.clone());
            let o = body_chunk(ctx, piece, end)?;
            same &= matches!(o, Out::Same);
            outs.push(match o {
                Out::Same => copy.unwrap_or_default(),
                Out::Replaced(bytes) => bytes,
            });
        }
        if same {
            out.push(b);
            continue;
        }
        touched = true;
        consume(b);
        let bytes = outs.concat();
        if bytes.is_empty() && !eos && (*b).flush() == 0 {
            continue;
        }
        let nb = memory_buf(r, &bytes).ok_or("out of memory")?;
        (*nb).set_last_buf((*b).last_buf());
        (*nb).set_last_in_chain((*b).last_in_chain());
        (*nb).set_flush((*b).flush());
        out.push(nb);
    }
    if !touched {
        return Ok(input);
    }
    chain_of(r, out)
}

/// A chain in the request's pool linking `bufs`.
unsafe fn chain_of(
    r: *mut ngx_http_request_t,
    bufs: Vec<*mut ngx_buf_t>,
) -> Result<*mut ngx_chain_t, String> {
    let mut head: *mut ngx_chain_t = std::ptr::null_mut();
    for b in bufs.into_iter().rev() {
        let cl = ngx::ffi::ngx_alloc_chain_link((*r).pool);
        if cl.is_null() {
            return Err("out of memory".into());
        }
        (*cl).buf = b;
        (*cl).next = head;
        head = cl;
    }
    Ok(head)
}

/// The response body filter.
pub(crate) extern "C" fn response_body_filter(
    r: *mut ngx_http_request_t,
    input: *mut ngx_chain_t,
) -> ngx_int_t {
    // A call's subrequest: its output is the call's answer, taken here; nothing of it
    // goes down the chain (not even an empty flush, which nginx's in-memory buffer
    // could refuse).
    let taken = catch_unwind(AssertUnwindSafe(|| unsafe {
        r != (*r).main && subrequest::take_output(r, input)
    }));
    match taken {
        Ok(true) => return Status::NGX_OK.0,
        Ok(false) => {}
        Err(_) => {
            log_to_nginx(LogLevel::Error, "internal error (panic) in the body filter");
            return Status::NGX_ERROR.0;
        }
    }
    let out = catch_unwind(AssertUnwindSafe(|| unsafe { response_body(r, input) }))
        .unwrap_or_else(|_| Err("internal error (panic) in the body filter".into()));
    match out {
        Ok(out) => unsafe {
            if out.is_null() && !input.is_null() {
                // Everything held back or dropped: nothing to send now.
                return Status::NGX_OK.0;
            }
            match crate::NEXT_BODY_FILTER {
                Some(next) => next(r, out),
                None => Status::NGX_ERROR.0,
            }
        },
        Err(e) => {
            // Fail closed after the headers went out: the response can only be cut.
            log_to_nginx(LogLevel::Error, &e);
            Status::NGX_ERROR.0
        }
    }
}
