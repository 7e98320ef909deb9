//! The client behind `dispatch_http_call`: HTTP/1.1, one connection per call
//! (`Connection: close`), non-blocking on nginx's own event loop. A call connects with
//! `ngx_event_connect_peer`, writes its request, feeds what it reads to
//! [`crate::http1::ResponseParser`], and ends in exactly one of three ways: a response,
//! a timeout (its deadline timer), or a failure (connect error, reset, malformed or
//! over-limit response). It then closes its connection, frees everything, and hands the
//! outcome to [`crate::worker::deliver`], always from an event handler, never inside a
//! guest callback.
//!
//! It serves the calls made outside a request (the root context: ticks, answers), which
//! have no request to hang an nginx subrequest on, and those made inside a request whose
//! location has no `proxy_wasm_call_location`; the others are subrequests
//! ([`crate::subrequest`]). Why: see README.md ("dispatch_http_call").

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::time::Duration;

use nginx_sys::{ngx_add_timer, ngx_del_timer, ngx_delete_posted_event, ngx_post_event};
use ngx::ffi::{
    ngx_close_connection, ngx_connection_log_error_e_NGX_ERROR_ERR, ngx_connection_t, ngx_cycle,
    ngx_event_connect_peer, ngx_event_get_peer, ngx_event_t, ngx_handle_read_event,
    ngx_handle_write_event, ngx_log_t, ngx_peer_connection_t, ngx_posted_events, ngx_str_t,
    socklen_t, u_char, NGX_AGAIN, NGX_LOG_ERR, NGX_OK, SOL_SOCKET, SO_ERROR,
};

use crate::http1::{self, Response, ResponseError, ResponseParser};
use crate::upstream::Peer;
use crate::FilterRef;

/// Most calls in flight in one worker; a call over it is refused at once
/// (`InternalFailure`, which the Rust SDK returns as an error).
pub const MAX_CALLS_IN_FLIGHT: usize = 32;
/// The longest a call may take; a call without a timeout (0) gets this one.
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Envoy's reset reasons, in its 503 body.
const CONNECT_FAILURE: &str = "remote connection failure";
const TERMINATION: &str = "connection termination";
const PROTOCOL_ERROR: &str = "protocol error";

/// Who gets a call's outcome: the VM (by filter and generation) and the context in it.
#[derive(Clone)]
pub struct Owner {
    /// The filter whose VM made the call.
    pub filter: FilterRef,
    /// That VM's generation: a VM made again after a trap never sees this call.
    pub generation: u64,
    /// The context that made the call.
    pub context: u32,
    /// The call's token.
    pub token: u32,
}

/// How a call ended, as Envoy's async client reports it.
pub enum Outcome {
    /// A complete response, or the reply Envoy's router makes itself when there is no
    /// usable response head: 503 for a connect failure, a close or reset, or a malformed
    /// head ([`crate::http1::upstream_reset`]); 504 for a timeout
    /// ([`crate::http1::gateway_timeout`]).
    Response(Response),
    /// A failure after the response head (reset, truncated or malformed body, body over
    /// the limit): the guest gets zero headers and `BrokenConnection`/`reset`.
    Reset,
}

struct Call {
    owner: Owner,
    cluster: String,
    timeout_ms: u64,
    peer: ngx_peer_connection_t,
    /// What `peer.sockaddr` and `peer.name` point to (heap memory that does not move).
    sockaddr: Vec<u8>,
    name_bytes: Vec<u8>,
    name: ngx_str_t,
    /// The cycle's log with a handler that names the call, for nginx's own messages.
    log: ngx_log_t,
    log_context: Vec<u8>,
    request: Vec<u8>,
    sent: usize,
    parser: ResponseParser,
    connecting: bool,
    /// The call's timeout.
    deadline: ngx_event_t,
    /// Posted to start writing (connected at once) or to report a failed start, so that
    /// nothing happens inside the guest callback that made the call.
    kick: ngx_event_t,
    failed_at_start: bool,
}

thread_local! {
    /// This worker's calls in flight, by id (the id is what nginx's events carry, so a
    /// late event for a freed call finds nothing).
    static CALLS: RefCell<HashMap<usize, Box<Call>>> = RefCell::new(HashMap::new());
    static NEXT_ID: Cell<usize> = const { Cell::new(1) };
}

/// Calls in flight in this worker.
pub fn live_calls() -> usize {
    // Never borrowed while a guest runs; if it were, refusing is the safe answer.
    CALLS.with(|c| c.try_borrow().map_or(MAX_CALLS_IN_FLIGHT, |c| c.len()))
}

/// `" while <action>"`, nginx's convention for the context of a log line.
unsafe extern "C" fn log_context(log: *mut ngx_log_t, buf: *mut u_char, len: usize) -> *mut u_char {
    let ctx = (*log).data as *const Vec<u8>;
    if ctx.is_null() || buf.is_null() {
        return buf;
    }
    let n = (*ctx).len().min(len);
    ptr::copy_nonoverlapping((*ctx).as_ptr(), buf, n);
    buf.add(n)
}

unsafe fn init_event(
    ev: &mut ngx_event_t,
    id: usize,
    handler: unsafe extern "C" fn(*mut ngx_event_t),
    log: *mut ngx_log_t,
) {
    ev.data = id as *mut c_void;
    ev.handler = Some(handler);
    ev.log = log;
    // Graceful shutdown and reload do not wait for calls; the worker's exit_process
    // closes what is left.
    ev.set_cancelable(1);
}

/// What the client needs of a call.
pub struct ClientCall {
    /// The cluster name the guest gave (for logs).
    pub cluster: String,
    /// The call's timeout.
    pub timeout: Duration,
    /// Where to connect.
    pub peer: Peer,
    /// The request on the wire.
    pub request: http1::Request,
}

/// Starts `out` for `owner`. Never calls back into the guest: a call that cannot even
/// start is reported from a posted event.
pub fn start(owner: Owner, out: ClientCall) {
    let id = NEXT_ID.with(|n| {
        let id = n.get();
        n.set(id.wrapping_add(1).max(1));
        id
    });
    let peer_name = out.peer.name.clone();
    // SAFETY: all-zero is the initial state nginx gives these structs (ngx_pcalloc).
    let mut call = Box::new(unsafe {
        Call {
            owner,
            cluster: out.cluster,
            timeout_ms: out.timeout.as_millis().clamp(1, u128::from(u32::MAX)) as u64,
            peer: std::mem::zeroed(),
            sockaddr: out.peer.sockaddr,
            name_bytes: out.peer.name.into_bytes(),
            name: std::mem::zeroed(),
            log: *(*ngx_cycle).log,
            log_context: Vec::new(),
            request: out.request.bytes,
            sent: 0,
            parser: ResponseParser::new(out.request.head),
            connecting: false,
            deadline: std::mem::zeroed(),
            kick: std::mem::zeroed(),
            failed_at_start: false,
        }
    });
    call.log_context = format!(
        " while running a proxy_wasm http_call to cluster \"{}\", peer {}",
        call.cluster, peer_name
    )
    .into_bytes();
    // SAFETY: the Box does not move; every pointer set here points into it.
    unsafe {
        let c = &mut *call;
        c.log.handler = Some(log_context);
        c.log.data = ptr::addr_of!(c.log_context) as *mut c_void;
        c.log.action = ptr::null_mut();
        c.name = ngx_str_t {
            len: c.name_bytes.len(),
            data: c.name_bytes.as_mut_ptr(),
        };
        let log: *mut ngx_log_t = &mut c.log;
        init_event(&mut c.deadline, id, deadline_handler, log);
        init_event(&mut c.kick, id, kick_handler, log);
        c.peer.sockaddr = c.sockaddr.as_mut_ptr().cast();
        c.peer.socklen = c.sockaddr.len() as socklen_t;
        c.peer.name = &mut c.name;
        c.peer.get = Some(ngx_event_get_peer);
        c.peer.log = log;
        c.peer
            .set_log_error(ngx_connection_log_error_e_NGX_ERROR_ERR);
        c.peer.tries = 1;
        let rc = ngx_event_connect_peer(&mut c.peer);
        if (rc == NGX_OK as isize || rc == NGX_AGAIN as isize) && !c.peer.connection.is_null() {
            let conn = c.peer.connection;
            (*conn).data = id as *mut c_void;
            (*(*conn).read).handler = Some(read_handler);
            (*(*conn).write).handler = Some(write_handler);
            c.log.connection = (*conn).number;
            c.connecting = rc == NGX_AGAIN as isize;
            ngx_add_timer(&mut c.deadline, c.timeout_ms as _);
            if rc == NGX_OK as isize {
                ngx_post_event(&mut c.kick, ptr::addr_of_mut!(ngx_posted_events));
            }
        } else {
            // nginx has closed the socket and logged why (or had no free connection).
            c.peer.connection = ptr::null_mut();
            c.failed_at_start = true;
            ngx_post_event(&mut c.kick, ptr::addr_of_mut!(ngx_posted_events));
        }
    }
    CALLS.with(|calls| calls.borrow_mut().insert(id, call));
}

impl Call {
    fn log_error(&mut self, msg: &str) {
        let log: *mut ngx_log_t = &mut self.log;
        ngx::ngx_log_error!(NGX_LOG_ERR, log, "proxy_wasm: {}", msg);
    }

    /// Closes the connection and stops the events. Idempotent.
    unsafe fn release(&mut self) {
        if self.deadline.timer_set() != 0 {
            ngx_del_timer(&mut self.deadline);
        }
        if self.kick.posted() != 0 {
            ngx_delete_posted_event(&mut self.kick);
        }
        if !self.peer.connection.is_null() {
            ngx_close_connection(self.peer.connection);
            self.peer.connection = ptr::null_mut();
        }
    }

    /// Moves the call on as far as the socket allows; `Some` once it has ended.
    unsafe fn progress(&mut self) -> Option<Outcome> {
        let c = self.peer.connection;
        if c.is_null() {
            return Some(self.broken(CONNECT_FAILURE));
        }
        let (rev, wev) = ((*c).read, (*c).write);
        if self.connecting {
            if let Some(err) = socket_error(c) {
                self.log_error(&format!("connect() to {} failed ({err})", self.peer_name()));
                return Some(self.broken(CONNECT_FAILURE));
            }
            if (*wev).ready() == 0 {
                return None;
            }
            self.connecting = false;
        }
        let send = (*c).send?;
        while self.sent < self.request.len() {
            let rest = &self.request[self.sent..];
            let n = send(c, rest.as_ptr().cast_mut(), rest.len());
            if n > 0 {
                self.sent += n as usize;
            } else if n == NGX_AGAIN as isize {
                if ngx_handle_write_event(wev, 0) != NGX_OK as isize {
                    return Some(self.broken(TERMINATION));
                }
                break;
            } else {
                // send() logged the error (or returned 0, which nginx logs as an alert).
                return Some(self.broken(TERMINATION));
            }
        }
        // Read even before the request is all out: a server may answer early.
        let recv = (*c).recv?;
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        // Each round consumes bytes and the parser refuses more than its bounds, so
        // this loop ends.
        loop {
            let n = recv(c, buf.as_mut_ptr(), buf.len());
            if n > 0 {
                match self.parser.feed(&buf[..n as usize]) {
                    Ok(true) => return Some(self.response()),
                    Ok(false) => continue,
                    Err(e) => {
                        self.log_error(&format!("{e} from {}", self.peer_name()));
                        // Over the body limit: Envoy's async client fails the call.
                        return Some(if e == ResponseError::BodyTooLarge {
                            Outcome::Reset
                        } else {
                            self.broken(PROTOCOL_ERROR)
                        });
                    }
                }
            } else if n == 0 {
                return match self.parser.close() {
                    Ok(()) => Some(self.response()),
                    Err(e) => {
                        let what = if self.parser.is_empty() {
                            "connection closed without a response".to_string()
                        } else {
                            e.to_string()
                        };
                        self.log_error(&format!("{what} from {}", self.peer_name()));
                        Some(self.broken(TERMINATION))
                    }
                };
            } else if n == NGX_AGAIN as isize {
                if ngx_handle_read_event(rev, 0) != NGX_OK as isize {
                    return Some(self.broken(TERMINATION));
                }
                return None;
            } else {
                // recv() logged the error (a reset, say).
                return Some(self.broken(TERMINATION));
            }
        }
    }

    fn response(&mut self) -> Outcome {
        let parser = std::mem::replace(&mut self.parser, ResponseParser::new(false));
        parser
            .into_response()
            .map_or(Outcome::Reset, Outcome::Response)
    }

    /// A failure: Envoy's router answers 503 itself before the response head; after it,
    /// the call is reset.
    fn broken(&self, reason: &str) -> Outcome {
        if self.parser.has_head() {
            Outcome::Reset
        } else {
            Outcome::Response(http1::upstream_reset(reason))
        }
    }

    fn peer_name(&self) -> String {
        String::from_utf8_lossy(&self.name_bytes).into_owned()
    }
}

/// The pending error of a connecting socket (`SO_ERROR`), as nginx's upstream tests it.
unsafe fn socket_error(c: *mut ngx_connection_t) -> Option<std::io::Error> {
    let mut err: i32 = 0;
    let mut len = size_of::<i32>() as socklen_t;
    let rc = nginx_sys::getsockopt(
        (*c).fd,
        SOL_SOCKET as i32,
        SO_ERROR as i32,
        ptr::addr_of_mut!(err).cast(),
        &mut len,
    );
    if rc == -1 {
        return Some(std::io::Error::last_os_error());
    }
    (err != 0).then(|| std::io::Error::from_raw_os_error(err))
}

/// Removes call `id`, frees it and hands its outcome to its VM.
fn finish(id: usize, outcome: Outcome) {
    let Some(mut call) = CALLS.with(|calls| calls.borrow_mut().remove(&id)) else {
        return;
    };
    // SAFETY: the call's events and connection are live until released here.
    unsafe { call.release() };
    let owner = call.owner.clone();
    drop(call);
    crate::worker::deliver(owner, outcome);
}

/// Runs `f` on call `id` if it still exists; the outcome, if it ended.
fn with_call(id: usize, f: impl FnOnce(&mut Call) -> Option<Outcome>) {
    let outcome = CALLS.with(|calls| {
        let mut calls = calls.try_borrow_mut().ok()?;
        let call = calls.get_mut(&id)?;
        f(call)
    });
    if let Some(o) = outcome {
        finish(id, o);
    }
}

fn guarded(what: &str, f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        crate::log_to_nginx(
            proxy_wasm_harness::abi::LogLevel::Error,
            &format!("internal error (panic) in the http_call {what} handler"),
        );
    }
}

unsafe extern "C" fn read_handler(ev: *mut ngx_event_t) {
    guarded("read", || {
        let c = (*ev).data as *mut ngx_connection_t;
        with_call((*c).data as usize, |call| call.progress());
    });
}

unsafe extern "C" fn write_handler(ev: *mut ngx_event_t) {
    guarded("write", || {
        let c = (*ev).data as *mut ngx_connection_t;
        with_call((*c).data as usize, |call| call.progress());
    });
}

unsafe extern "C" fn kick_handler(ev: *mut ngx_event_t) {
    guarded("start", || {
        with_call((*ev).data as usize, |call| {
            if call.failed_at_start {
                Some(call.broken(CONNECT_FAILURE))
            } else {
                call.progress()
            }
        });
    });
}

unsafe extern "C" fn deadline_handler(ev: *mut ngx_event_t) {
    guarded("timeout", || {
        with_call((*ev).data as usize, |call| {
            let msg = format!("http_call timed out after {} ms", call.timeout_ms);
            call.log_error(&msg);
            // Before the response head Envoy's router answers 504; after it, a reset.
            Some(if call.parser.has_head() {
                Outcome::Reset
            } else {
                Outcome::Response(http1::gateway_timeout())
            })
        });
    });
}

/// Ends, without an answer, the calls of one VM (it trapped and is gone).
pub fn cancel_for(filter_id: usize, generation: u64) {
    cancel(|o| o.filter.id == filter_id && o.generation == generation);
}

/// Ends every call, without an answer (the worker is exiting).
pub fn cancel_all() {
    cancel(|_| true);
}

fn cancel(which: impl Fn(&Owner) -> bool) {
    let gone: Vec<Box<Call>> = CALLS.with(|calls| {
        let Ok(mut calls) = calls.try_borrow_mut() else {
            return Vec::new();
        };
        let ids: Vec<usize> = calls
            .iter()
            .filter(|(_, c)| which(&c.owner))
            .map(|(id, _)| *id)
            .collect();
        ids.iter().filter_map(|id| calls.remove(id)).collect()
    });
    for mut call in gone {
        // SAFETY: as in `finish`.
        unsafe { call.release() };
    }
}
