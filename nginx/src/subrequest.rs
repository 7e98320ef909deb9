//! `dispatch_http_call` from inside a request, as an nginx subrequest of that request, so
//! the call gets nginx's upstream machinery (keep-alive, `proxy_*` settings, TLS, upstream
//! health state). nginx routes subrequests by URI and no location can be added after
//! the configuration is read, so the operator declares one internal location
//! (`proxy_wasm_call_location`) whose `proxy_pass` reads the call from this module's
//! variables (`$proxy_wasm_call_cluster`, `$proxy_wasm_call_path`, ...).
//!
//! A call is a background, in-memory subrequest of the main request. In the background,
//! so it neither takes the client connection's place (`c->data`) nor holds the main
//! request's output back. Its output is taken by the module's body filter (at the top of
//! nginx's chain) into the call's answer, bounded by the call location's
//! `subrequest_output_buffer_size`, and never goes further: nginx's own in-memory buffer
//! would fail the client's connection for an answer that does not fit; here only the
//! call fails (in-memory stays set, so nothing could reach the client anyway). Its
//! `post_subrequest` handler (or the call's timeout, whichever comes first) hands the
//! answer to the calling stream through [`crate::worker::deliver`], as the module's
//! client does.
//!
//! The pure parts (the answer built from what the subrequest received) are unit-tested;
//! the rest needs a running nginx (`tests/tests/nginx_ops.rs`).

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::time::Duration;

use nginx_sys::{ngx_add_timer, ngx_del_timer};
use ngx::core::Pool;
use ngx::ffi::{
    ngx_alloc_chain_link, ngx_buf_t, ngx_chain_t, ngx_conf_t, ngx_event_t, ngx_http_add_variable,
    ngx_http_headers_in_t, ngx_http_post_subrequest_t, ngx_http_request_body_t, ngx_http_request_t,
    ngx_http_subrequest, ngx_http_variable_value_t, ngx_int_t, ngx_list_create, ngx_str_t,
    ngx_table_elt_t, ngx_uint_t, NGX_ERROR, NGX_HTTP_CLIENT_CLOSED_REQUEST, NGX_HTTP_CLOSE,
    NGX_HTTP_DELETE, NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_OPTIONS, NGX_HTTP_PATCH, NGX_HTTP_POST,
    NGX_HTTP_PUT, NGX_HTTP_REQUEST_TIME_OUT, NGX_HTTP_SUBREQUEST_BACKGROUND,
    NGX_HTTP_SUBREQUEST_IN_MEMORY, NGX_HTTP_TRACE, NGX_HTTP_UNKNOWN, NGX_HTTP_VAR_NOCACHEABLE,
    NGX_LOG_ERR, NGX_OK,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, NgxHttpCoreModule};
use proxy_wasm_harness::abi::{LogLevel, Pairs};

use crate::client::{Outcome, Owner};
use crate::headers::{list_pairs, pool_str, push_header};
use crate::http1::{self, CallHead, Response, DROPPED_RESPONSE_HEADERS};
use crate::Module;

/// Most calls one stream (one filter in one request) may have in flight as subrequests;
/// over it `dispatch_http_call` answers `InternalFailure`.
pub const MAX_CALLS_IN_FLIGHT_PER_STREAM: usize = 8;

/// Most calls one stream may make as subrequests over its life: a subrequest, its request
/// body and its answer buffer live in the request's memory pool until the request ends.
pub const MAX_CALLS_PER_STREAM: usize = 32;

/// The module's variables, in the order of [`Field`], for the call location's
/// `proxy_pass`, `proxy_set_header` and logs. Empty (not found) outside a call.
pub const VARIABLES: [&str; 4] = [
    "proxy_wasm_call_cluster",
    "proxy_wasm_call_path",
    "proxy_wasm_call_method",
    "proxy_wasm_call_authority",
];

/// A call to send as a subrequest.
#[derive(Debug)]
pub struct SubrequestCall {
    /// The cluster the guest named: an `upstream` block's name or `IP:port`.
    pub cluster: String,
    /// The call's timeout (bounded by [`crate::client::MAX_CALL_TIMEOUT`]).
    pub timeout: Duration,
    /// The checked request head.
    pub head: CallHead,
    /// The request body.
    pub body: Vec<u8>,
}

/// The answer to a call whose subrequest nginx ended with a status of its own, before
/// any response (502 when the upstream cannot be reached, 504 when it times out, or
/// what the call location returns): that status and no body.
pub fn status_only(status: u16) -> Response {
    Response {
        status,
        headers: vec![
            (b":status".to_vec(), status.to_string().into_bytes()),
            (b"content-length".to_vec(), b"0".to_vec()),
        ],
        body: Vec::new(),
        trailers: Vec::new(),
    }
}

/// The answer built from a subrequest's response as nginx keeps it: `:status`, then
/// `content-type` and `content-length` (nginx's own fields; the length as the upstream
/// sent it, also for HEAD), then the header list (names lower-cased) without
/// connection-specific headers, and the body nginx buffered.
pub fn response_from_subrequest(
    status: u16,
    content_type: &[u8],
    content_length: Option<i64>,
    list: Pairs,
    body: Vec<u8>,
) -> Response {
    let mut headers = vec![(b":status".to_vec(), status.to_string().into_bytes())];
    if !content_type.is_empty() {
        headers.push((b"content-type".to_vec(), content_type.to_vec()));
    }
    if let Some(n) = content_length.filter(|n| *n >= 0) {
        headers.push((b"content-length".to_vec(), n.to_string().into_bytes()));
    }
    for (k, v) in list {
        let k = k.to_ascii_lowercase();
        if k.starts_with(b":")
            || k == b"content-type"
            || k == b"content-length"
            || DROPPED_RESPONSE_HEADERS.contains(&k.as_slice())
        {
            continue;
        }
        headers.push((k, v));
    }
    Response {
        status,
        headers,
        body,
        trailers: Vec::new(),
    }
}

/// nginx's method number for a method name (`NGX_HTTP_UNKNOWN` for the others): the
/// proxy module sends the name, and uses the number for HEAD (no body in the answer).
pub fn method_code(name: &[u8]) -> u32 {
    match name {
        b"GET" => NGX_HTTP_GET,
        b"HEAD" => NGX_HTTP_HEAD,
        b"POST" => NGX_HTTP_POST,
        b"PUT" => NGX_HTTP_PUT,
        b"DELETE" => NGX_HTTP_DELETE,
        b"OPTIONS" => NGX_HTTP_OPTIONS,
        b"PATCH" => NGX_HTTP_PATCH,
        b"TRACE" => NGX_HTTP_TRACE,
        _ => NGX_HTTP_UNKNOWN,
    }
}

/// One call in flight: lives in the main request's pool (dropped with it), pointed at by
/// the subrequest's module context (for the variables) and by its `post_subrequest`.
struct SubCall {
    owner: Owner,
    /// The main request that made the call.
    main: *mut ngx_http_request_t,
    /// The variables' values, in the order of [`VARIABLES`].
    fields: [Vec<u8>; 4],
    /// The request body the subrequest's buffer points into.
    body: Vec<u8>,
    timeout_ms: u64,
    /// The answer's body as it arrives (see [`take_output`]).
    answer: Vec<u8>,
    /// The answer's body went over its bound: the call fails.
    answer_too_large: bool,
    /// The answer's end came through the body filter (nginx ends a cut-short answer
    /// with a flush and a success status, so this is how one is told from a whole one).
    answer_complete: bool,
    /// The call's own timeout.
    timer: ngx_event_t,
    /// Answered (or given up): later events for this call do nothing.
    done: bool,
}

impl Drop for SubCall {
    fn drop(&mut self) {
        if self.timer.timer_set() != 0 {
            // SAFETY: armed by `start` in this worker's timer tree; removed before the
            // memory goes with the pool.
            unsafe { ngx_del_timer(&mut self.timer) };
        }
    }
}

impl SubCall {
    fn cluster(&self) -> String {
        String::from_utf8_lossy(&self.fields[0]).into_owned()
    }

    fn stop_timer(&mut self) {
        if self.timer.timer_set() != 0 {
            // SAFETY: as in Drop.
            unsafe { ngx_del_timer(&mut self.timer) };
        }
    }

    /// Whether the calling request still takes answers: not finished, its client not gone.
    unsafe fn main_alive(&self) -> bool {
        let c = (*self.main).connection;
        (*self.main).done() == 0 && !c.is_null() && (*c).error() == 0
    }
}

/// Registers the module's variables (`preconfiguration`, so that `proxy_pass` and the
/// other directives of the configuration can name them).
///
/// # Safety
///
/// nginx calls it with the configuration being read.
pub(crate) unsafe fn add_variables(cf: *mut ngx_conf_t) -> Result<(), ()> {
    for (i, name) in VARIABLES.iter().enumerate() {
        // nginx copies the name; it is never written through this pointer.
        let mut n = ngx_str_t {
            len: name.len(),
            data: name.as_ptr().cast_mut(),
        };
        // Not cacheable: the subrequest shares the main request's variable cache, and
        // each call has its own values.
        let v = ngx_http_add_variable(cf, &mut n, NGX_HTTP_VAR_NOCACHEABLE as ngx_uint_t);
        if v.is_null() {
            return Err(());
        }
        (*v).get_handler = Some(variable);
        (*v).data = i;
    }
    Ok(())
}

unsafe extern "C" fn variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_http_variable_value_t,
    data: usize,
) -> ngx_int_t {
    let v = &mut *v;
    // A main request's context slot holds its filter state, not a call.
    let call = if r.is_null() || r == (*r).main {
        ptr::null()
    } else {
        *(*r).ctx.add(Module::module().ctx_index) as *const SubCall
    };
    match call.as_ref().and_then(|c| c.fields.get(data)) {
        Some(value) => {
            v.data = value.as_ptr().cast_mut();
            v.set_len(value.len() as _);
            v.set_valid(1);
            v.set_no_cacheable(1);
            v.set_not_found(0);
        }
        None => v.set_not_found(1),
    }
    NGX_OK as ngx_int_t
}

/// Starts `call` as a subrequest of the main request `r` to the URI `location`.
/// Nothing runs yet: nginx runs posted subrequests after the current event (the caller
/// makes sure they run, see `crate::stream::start_subrequest`).
///
/// # Safety
///
/// `r` is a live main request of this worker.
pub(crate) unsafe fn start(
    r: *mut ngx_http_request_t,
    location: &[u8],
    owner: Owner,
    call: SubrequestCall,
) -> Result<(), String> {
    let what = format!("an http_call to cluster \"{}\"", call.cluster);
    let oom = || format!("out of memory starting {what}");
    let pool = Pool::from_ngx_pool((*r).pool);
    let SubrequestCall {
        cluster,
        timeout,
        head,
        body,
    } = call;
    let sc = pool.allocate(SubCall {
        owner,
        main: r,
        fields: [
            cluster.into_bytes(),
            head.path.clone(),
            head.method.clone(),
            head.authority.clone(),
        ],
        body,
        timeout_ms: timeout.as_millis().clamp(1, u128::from(u32::MAX)) as u64,
        answer: Vec::new(),
        answer_too_large: false,
        answer_complete: false,
        // SAFETY: all-zero is a fresh event, as ngx_pcalloc gives one.
        timer: std::mem::zeroed(),
        done: false,
    });
    let ps = pool.calloc_type::<ngx_http_post_subrequest_t>();
    if sc.is_null() || ps.is_null() {
        return Err(oom());
    }
    (*ps).handler = Some(finished);
    (*ps).data = sc.cast();
    let mut uri = pool_str(r, location).ok_or_else(oom)?;
    // Everything the subrequest needs is made first: once it exists, it runs.
    let parts = request_parts(r, &head, &mut (*sc).body).ok_or_else(oom)?;
    let mut sr: *mut ngx_http_request_t = ptr::null_mut();
    let flags = NGX_HTTP_SUBREQUEST_IN_MEMORY | NGX_HTTP_SUBREQUEST_BACKGROUND;
    let rc = ngx_http_subrequest(
        r,
        &mut uri,
        ptr::null_mut(),
        &mut sr,
        ps,
        flags as ngx_uint_t,
    );
    if rc != NGX_OK as ngx_int_t || sr.is_null() {
        (*sc).done = true;
        return Err(format!("cannot start a subrequest for {what}"));
    }
    *(*sr).ctx.add(Module::module().ctx_index) = sc.cast::<c_void>();
    // The call's method, headers and body, not the parent's (ngx_http_subrequest copies
    // the parent's headers and body, and makes a GET).
    (*sr).method = method_code(&head.method) as ngx_uint_t;
    (*sr).method_name = parts.method_name;
    (*sr).headers_in = parts.headers_in;
    (*sr).request_body = parts.body;
    let sc = &mut *sc;
    sc.timer.data = (sc as *mut SubCall).cast();
    sc.timer.handler = Some(timed_out);
    sc.timer.log = (*(*r).connection).log;
    // Graceful shutdown waits for the request (its pause timer), not for this timer.
    sc.timer.set_cancelable(1);
    ngx_add_timer(&mut sc.timer, sc.timeout_ms as _);
    Ok(())
}

/// What a subrequest carries of the call, made in the main request's pool.
struct RequestParts {
    method_name: ngx_str_t,
    headers_in: ngx_http_headers_in_t,
    body: *mut ngx_http_request_body_t,
}

/// The call's method name, headers (the call's only) and body (a buffer over `body`,
/// which outlives the subrequest), ready to put in the subrequest.
unsafe fn request_parts(
    r: *mut ngx_http_request_t,
    head: &CallHead,
    body: &mut [u8],
) -> Option<RequestParts> {
    let method_name = pool_str(r, &head.method)?;
    // SAFETY: all-zero headers_in is "no headers", as ngx_pcalloc gives a request.
    let mut hi: ngx_http_headers_in_t = std::mem::zeroed();
    let list = ngx_list_create(
        (*r).pool,
        head.headers.len().max(1) as ngx_uint_t,
        std::mem::size_of::<ngx_table_elt_t>(),
    );
    if list.is_null() {
        return None;
    }
    for (k, v) in &head.headers {
        if !push_header(r, list, k, v) {
            return None;
        }
    }
    hi.headers = *list;
    hi.server = pool_str(r, &head.authority)?;
    hi.keep_alive_n = -1;
    // The proxy module writes Content-Length from this: a body always has one, and so do
    // the methods whose servers expect one.
    let with_length =
        !body.is_empty() || matches!(head.method.as_slice(), b"POST" | b"PUT" | b"PATCH");
    hi.content_length_n = if with_length { body.len() as i64 } else { -1 };
    // Always a body of our own (possibly empty): never the parent's.
    let pool = Pool::from_ngx_pool((*r).pool);
    let rb = pool.calloc_type::<ngx_http_request_body_t>();
    if rb.is_null() {
        return None;
    }
    if !body.is_empty() {
        let b = pool.calloc_type::<ngx_buf_t>();
        let cl = ngx_alloc_chain_link((*r).pool);
        if b.is_null() || cl.is_null() {
            return None;
        }
        let start = body.as_mut_ptr();
        (*b).start = start;
        (*b).pos = start;
        (*b).last = start.add(body.len());
        (*b).end = (*b).last;
        (*b).set_memory(1);
        (*b).set_last_buf(1);
        (*cl).buf = b;
        (*cl).next = ptr::null_mut();
        (*rb).bufs = cl;
    }
    Some(RequestParts {
        method_name,
        headers_in: hi,
        body: rb,
    })
}

/// The subrequest's `post_subrequest` handler: nginx calls it as it finalizes the
/// subrequest, possibly more than once (a status of its own, then its error page).
unsafe extern "C" fn finished(
    sr: *mut ngx_http_request_t,
    data: *mut c_void,
    rc: ngx_int_t,
) -> ngx_int_t {
    catch_unwind(AssertUnwindSafe(|| finish(sr, data.cast(), rc))).unwrap_or_else(|_| {
        crate::log_to_nginx(
            LogLevel::Error,
            "internal error (panic) in the http_call subrequest handler",
        );
        rc
    })
}

unsafe fn finish(sr: *mut ngx_http_request_t, sc: *mut SubCall, rc: ngx_int_t) -> ngx_int_t {
    let Some(sc) = sc.as_mut() else { return rc };
    let c = (*sr).connection;
    let client_gone = rc == NGX_HTTP_CLIENT_CLOSED_REQUEST as ngx_int_t
        || rc == NGX_HTTP_REQUEST_TIME_OUT as ngx_int_t
        || (*c).error() != 0;
    let failed = rc == NGX_ERROR as ngx_int_t || rc == NGX_HTTP_CLOSE as ngx_int_t || rc < 0;
    // nginx ends the whole (main) request when a subrequest ends with an error. That is
    // right when its client left; when the call failed on its own and nothing of it is
    // left running, the filter gets the failure and the request goes on.
    let u = (*sr).upstream;
    let nothing_running = u.is_null() || (*u).cleanup.is_null();
    let rc_out = if failed && !client_gone && nothing_running {
        NGX_OK as ngx_int_t
    } else {
        rc
    };
    if sc.done {
        return rc_out;
    }
    sc.done = true;
    sc.stop_timer();
    if nothing_running {
        // Sent (or never to be sent): its memory can go before the request's.
        sc.body = Vec::new();
    }
    if client_gone || !sc.main_alive() {
        // The calling stream ends with its request: Envoy, too, cancels its calls.
        return rc_out;
    }
    let outcome = if failed {
        log_error(
            sr,
            &format!(
                "proxy_wasm: the subrequest of an http_call to cluster \"{}\" failed ({rc})",
                sc.cluster()
            ),
        );
        Outcome::Reset
    } else if rc >= 300 {
        Outcome::Response(status_only(rc as u16))
    } else if sc.answer_too_large {
        log_error(
            sr,
            &format!(
                "proxy_wasm: the answer to an http_call to cluster \"{}\" is over {} bytes \
                 (subrequest_output_buffer_size, at most {})",
                sc.cluster(),
                answer_limit(sr),
                http1::MAX_RESPONSE_BODY_BYTES
            ),
        );
        Outcome::Reset
    } else if !sc.answer_complete && (*sr).header_only() == 0 {
        log_error(
            sr,
            &format!(
                "proxy_wasm: the answer to an http_call to cluster \"{}\" was cut short",
                sc.cluster()
            ),
        );
        Outcome::Reset
    } else {
        match answer(sr, std::mem::take(&mut sc.answer)) {
            Some(r) => Outcome::Response(r),
            None => {
                log_error(
                    sr,
                    &format!(
                        "proxy_wasm: the subrequest of an http_call to cluster \"{}\" ended \
                         without a status",
                        sc.cluster()
                    ),
                );
                Outcome::Reset
            }
        }
    };
    crate::worker::deliver(sc.owner.clone(), outcome);
    rc_out
}

/// The answer a finished subrequest holds: its status and headers, and `body`.
unsafe fn answer(sr: *mut ngx_http_request_t, body: Vec<u8>) -> Option<Response> {
    let o = &(*sr).headers_out;
    let status = u16::try_from(o.status).ok().filter(|s| *s >= 100)?;
    let mut list = Vec::new();
    list_pairs(&o.headers.part, &mut list);
    let content_type = if o.content_type.len > 0 {
        o.content_type.as_bytes()
    } else {
        &[]
    };
    Some(response_from_subrequest(
        status,
        content_type,
        Some(o.content_length_n),
        list,
        body,
    ))
}

/// The largest answer body a call keeps: the call location's
/// `subrequest_output_buffer_size`, at most [`http1::MAX_RESPONSE_BODY_BYTES`].
unsafe fn answer_limit(sr: *mut ngx_http_request_t) -> usize {
    NgxHttpCoreModule::location_conf(&*sr)
        .map_or(0, |clcf| clcf.subrequest_output_buffer_size)
        .min(http1::MAX_RESPONSE_BODY_BYTES)
}

/// The body filter's part for subrequests: the output of one of this module's calls is
/// taken here, at the top of the filter chain, into the call's answer (nginx's own
/// in-memory buffer fails the whole client connection when an answer is too large; here
/// only the call fails). Returns false for other requests.
///
/// # Safety
///
/// `r` is a live subrequest and `input` its output chain.
pub(crate) unsafe fn take_output(r: *mut ngx_http_request_t, input: *mut ngx_chain_t) -> bool {
    let sc = *(*r).ctx.add(Module::module().ctx_index) as *mut SubCall;
    let Some(sc) = sc.as_mut() else {
        return false;
    };
    let limit = answer_limit(r);
    for b in crate::stream::bufs(input) {
        // A subrequest's last buffer says last_in_chain (last_buf is the main's).
        if (*b).last_buf() != 0 || (*b).last_in_chain() != 0 {
            sc.answer_complete = true;
        }
        if !sc.answer_too_large && !sc.done {
            match crate::stream::link_pieces(b) {
                Ok(pieces) => {
                    for p in pieces {
                        if sc.answer.len() + p.len() > limit {
                            sc.answer_too_large = true;
                            sc.answer = Vec::new();
                            break;
                        }
                        sc.answer.extend_from_slice(&p);
                    }
                }
                Err(e) => {
                    log_error(r, &format!("proxy_wasm: {e}"));
                    sc.answer_too_large = true;
                    sc.answer = Vec::new();
                }
            }
        }
        crate::stream::consume(b);
    }
    true
}

fn log_error(sr: *mut ngx_http_request_t, msg: &str) {
    // SAFETY: the subrequest shares its live connection's log.
    unsafe {
        let log = (*(*sr).connection).log;
        ngx::ngx_log_error!(NGX_LOG_ERR, log, "{}", msg);
    }
}

/// The call's own timeout: the filter gets Envoy's 504 now; the subrequest runs on until
/// nginx ends it (its `proxy_*_timeout`s), and its answer is dropped.
unsafe extern "C" fn timed_out(ev: *mut ngx_event_t) {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let Some(sc) = ((*ev).data as *mut SubCall).as_mut() else {
            return;
        };
        if sc.done {
            return;
        }
        sc.done = true;
        let msg = format!(
            "proxy_wasm: http_call to cluster \"{}\" timed out after {} ms",
            sc.cluster(),
            sc.timeout_ms
        );
        ngx::ngx_log_error!(NGX_LOG_ERR, (*ev).log, "{}", msg);
        if sc.main_alive() {
            crate::worker::deliver(
                sc.owner.clone(),
                Outcome::Response(http1::gateway_timeout()),
            );
        }
    }));
    if r.is_err() {
        crate::log_to_nginx(
            LogLevel::Error,
            "internal error (panic) in the http_call timeout handler",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::http1::tests::pairs;

    #[test]
    fn the_answer_is_status_then_nginx_fields_then_the_list() {
        let list = pairs(&[
            ("X-Answer", "42"),
            ("Connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/html"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ]);
        let r = response_from_subrequest(
            201,
            b"application/json",
            Some(7),
            list,
            b"{\"a\":1}".to_vec(),
        );
        assert_eq!(r.status, 201);
        assert_eq!(
            r.headers,
            pairs(&[
                (":status", "201"),
                ("content-type", "application/json"),
                ("content-length", "7"),
                ("x-answer", "42"),
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2"),
            ])
        );
        assert_eq!(r.body, b"{\"a\":1}");
        assert!(r.trailers.is_empty());
    }

    #[test]
    fn an_answer_without_type_or_length_has_neither() {
        let r = response_from_subrequest(200, b"", Some(-1), Vec::new(), b"streamed".to_vec());
        assert_eq!(r.headers, pairs(&[(":status", "200")]));
        assert_eq!(r.body, b"streamed");
        // HEAD: the upstream's length, no body.
        let r = response_from_subrequest(200, b"", Some(1234), Vec::new(), Vec::new());
        assert_eq!(
            r.headers,
            pairs(&[(":status", "200"), ("content-length", "1234")])
        );
    }

    #[test]
    fn nginx_statuses_have_no_body() {
        let r = status_only(502);
        assert_eq!(r.status, 502);
        assert_eq!(
            r.headers,
            pairs(&[(":status", "502"), ("content-length", "0")])
        );
        assert!(r.body.is_empty());
    }

    #[test]
    fn the_subrequest_head_is_the_calls_not_the_parents() {
        let h = http1::call_head(&pairs(&[
            (":method", "POST"),
            (":path", "/v1/check?x=1"),
            (":authority", "auth.internal"),
            ("host", "ignored"),
            ("x-call", "yes"),
            ("content-length", "999"),
            ("connection", "close"),
            ("te", "trailers"),
        ]))
        .unwrap();
        assert_eq!(h.method, b"POST");
        assert_eq!(h.path, b"/v1/check?x=1");
        assert_eq!(h.authority, b"auth.internal");
        // Host and Content-Length are written by the proxy module from the variables and
        // the body; connection-specific headers never go on.
        assert_eq!(h.headers, pairs(&[("x-call", "yes")]));
        // The host header stands in for a missing :authority, as for the own client.
        let h = http1::call_head(&pairs(&[
            (":method", "GET"),
            (":path", "/"),
            ("host", "h.example"),
        ]))
        .unwrap();
        assert_eq!(h.authority, b"h.example");
    }

    #[test]
    fn methods_map_to_nginx_numbers() {
        assert_eq!(method_code(b"GET"), NGX_HTTP_GET);
        assert_eq!(method_code(b"HEAD"), NGX_HTTP_HEAD);
        assert_eq!(method_code(b"PATCH"), NGX_HTTP_PATCH);
        // Case matters (methods are case-sensitive tokens).
        assert_eq!(method_code(b"get"), NGX_HTTP_UNKNOWN);
        assert_eq!(method_code(b"PURGE"), NGX_HTTP_UNKNOWN);
    }
}
