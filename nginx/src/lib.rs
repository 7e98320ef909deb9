//! `ngx_http_proxy_wasm_module`: an nginx dynamic module that runs Proxy-Wasm filters in
//! Wasmtime, built against Debian's nginx so the stock `/usr/sbin/nginx` loads it with
//! `load_module`. The Proxy-Wasm ABI itself is the harness's embeddable core
//! ([`proxy_wasm_harness::abi`]); this crate is its nginx embedder.
//!
//! Directives (see README.md):
//! - `proxy_wasm_module NAME PATH;` (http): compiles PATH once, in the master.
//! - `proxy_wasm NAME [CONFIG];` (server, location): adds a filter to the chain.
//! - `proxy_wasm_shm_kv SIZE;`, `proxy_wasm_shm_metrics SIZE;` (http): the shared-memory
//!   zones for shared data and metrics ([`shm`]).
//! - `proxy_wasm_metrics;` (location): serves the metrics in Prometheus' text format.
//!
//! The request headers reach each filter in the rewrite phase; a local response ends the
//! request there.

#![deny(missing_docs)]

pub mod blocks;
pub mod host;
pub mod kv;
pub mod metric_table;
pub mod prometheus;
pub mod shm;
pub mod vm;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use ngx::core::{Status, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_array_push, ngx_chain_t, ngx_command_t, ngx_conf_t, ngx_create_temp_buf, ngx_cycle,
    ngx_http_discard_request_body, ngx_http_handler_pt, ngx_http_module_t, ngx_http_output_filter,
    ngx_http_phases_NGX_HTTP_REWRITE_PHASE, ngx_http_request_t, ngx_http_send_header, ngx_int_t,
    ngx_list_part_t, ngx_module_t, ngx_str_t, ngx_table_elt_t, ngx_uint_t, NGX_CONF_NOARGS,
    NGX_CONF_TAKE1, NGX_CONF_TAKE12, NGX_CONF_TAKE2, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET,
    NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_MODULE, NGX_HTTP_SRV_CONF,
    NGX_LOG_EMERG, NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN,
};
use ngx::http::{
    HttpModule, HttpModuleLocationConf, HttpModuleMainConf, Merge, MergeConfigError,
    NgxHttpCoreModule, Request,
};
use ngx::{ngx_conf_log_error, ngx_log_error, ngx_string};
use proxy_wasm_harness::abi::{stream::LocalResponse, LogLevel, Pairs};
use wasmtime::Engine;

use ngx::ffi::{
    ngx_http_output_body_filter_pt, ngx_http_output_header_filter_pt, ngx_http_top_body_filter,
    ngx_http_top_header_filter,
};

static mut NEXT_HEADER_FILTER: ngx_http_output_header_filter_pt = None;
static mut NEXT_BODY_FILTER: ngx_http_output_body_filter_pt = None;

use vm::{Plugin, PluginVm, VmError};

/// The Wasmtime engine, made once in the master (before fork) and inherited by workers.
fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let mut c = wasmtime::Config::new();
        c.cranelift_opt_level(wasmtime::OptLevel::Speed);
        // No parallel compilation (not compiled in): its threads would not survive fork.
        Engine::new(&c).unwrap_or_else(|_| Engine::default())
    })
}

/// The http-level configuration: the modules loaded by name.
#[derive(Default)]
pub struct MainConf {
    plugins: Vec<Plugin>,
    /// The shared-memory zones.
    shm: shm::ShmConf,
}

/// One `proxy_wasm` directive: a filter in a chain.
#[derive(Clone)]
pub struct FilterRef {
    /// Identifies this filter's VM in each worker.
    id: usize,
    plugin: Plugin,
    config: Vec<u8>,
}

/// The server/location configuration: the filter chain.
#[derive(Default, Clone)]
pub struct LocConf {
    filters: Vec<FilterRef>,
}

impl Merge for LocConf {
    fn merge(&mut self, prev: &LocConf) -> Result<(), MergeConfigError> {
        // A level with no `proxy_wasm` of its own inherits the chain, as nginx arrays do.
        if self.filters.is_empty() {
            self.filters = prev.filters.clone();
        }
        Ok(())
    }
}

struct Module;

impl HttpModule for Module {
    fn module() -> &'static ngx_module_t {
        unsafe { &*std::ptr::addr_of!(ngx_http_proxy_wasm_module) }
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        let cf = &mut *cf;
        let Some(cmcf) = NgxHttpCoreModule::main_conf_mut(cf) else {
            return Status::NGX_ERROR.0;
        };
        // The rewrite phase: its handler's result is finalized like a content handler's,
        // so a local response ends the request there (the access phase would go on to the
        // content handler on NGX_OK).
        let h = ngx_array_push(
            &mut cmcf.phases[ngx_http_phases_NGX_HTTP_REWRITE_PHASE as usize].handlers,
        ) as *mut ngx_http_handler_pt;
        if h.is_null() {
            return Status::NGX_ERROR.0;
        }
        *h = Some(request_headers_handler);
        if let Err(e) = shm::add_zones(cf) {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "proxy_wasm: {}", e);
            return Status::NGX_ERROR.0;
        }
        // Response filters at the top of the chain: without its own ngx_module_order a
        // dynamic module's filters run first (before gzip, range, copy filter), so the
        // filter sees the upstream's bytes as they stream.
        NEXT_HEADER_FILTER = ngx_http_top_header_filter;
        ngx_http_top_header_filter = Some(response_header_filter);
        NEXT_BODY_FILTER = ngx_http_top_body_filter;
        ngx_http_top_body_filter = Some(response_body_filter);
        Status::NGX_OK.into()
    }
}

unsafe impl HttpModuleMainConf for Module {
    type MainConf = MainConf;
}

unsafe impl HttpModuleLocationConf for Module {
    type LocationConf = LocConf;
}

static mut COMMANDS: [ngx_command_t; 6] = [
    ngx_command_t {
        name: ngx_string!("proxy_wasm_module"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE2) as ngx_uint_t,
        set: Some(set_proxy_wasm_module),
        conf: NGX_HTTP_MAIN_CONF_OFFSET,
        offset: 0,
        post: std::ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("proxy_wasm"),
        type_: (NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE12) as ngx_uint_t,
        set: Some(set_proxy_wasm),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: std::ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("proxy_wasm_shm_kv"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(shm::set_shm_kv),
        conf: NGX_HTTP_MAIN_CONF_OFFSET,
        offset: 0,
        post: std::ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("proxy_wasm_shm_metrics"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(shm::set_shm_metrics),
        conf: NGX_HTTP_MAIN_CONF_OFFSET,
        offset: 0,
        post: std::ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("proxy_wasm_metrics"),
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS) as ngx_uint_t,
        set: Some(shm::set_metrics_handler),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: std::ptr::null_mut(),
    },
    ngx_command_t::empty(),
];

static MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None,
    postconfiguration: Some(Module::postconfiguration),
    create_main_conf: Some(Module::create_main_conf),
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(Module::create_loc_conf),
    merge_loc_conf: Some(Module::merge_loc_conf),
};

/// The `ngx_modules` tables `load_module` reads (a macro of the `ngx` crate, undocumented).
#[allow(missing_docs)]
#[cfg(not(test))]
mod exported {
    use super::ngx_http_proxy_wasm_module;
    ngx::ngx_modules!(ngx_http_proxy_wasm_module);
}

/// The module, as nginx sees it.
#[cfg_attr(not(test), used)]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_proxy_wasm_module: ngx_module_t = ngx_module_t {
    ctx: std::ptr::addr_of!(MODULE_CTX) as _,
    commands: std::ptr::addr_of_mut!(COMMANDS) as *mut ngx_command_t,
    type_: NGX_HTTP_MODULE as _,
    ..ngx_module_t::default()
};

fn conf_args(cf: *mut ngx_conf_t) -> Vec<String> {
    unsafe {
        let args: &[ngx_str_t] = (*(*cf).args).as_slice();
        args.iter()
            .map(|a| String::from_utf8_lossy(a.as_bytes()).into_owned())
            .collect()
    }
}

/// A guest log line goes to nginx's error log.
fn log_to_nginx(level: LogLevel, msg: &str) {
    let lvl = match level {
        LogLevel::Trace | LogLevel::Debug | LogLevel::Info => NGX_LOG_INFO,
        LogLevel::Warn => NGX_LOG_WARN,
        LogLevel::Error => NGX_LOG_ERR,
        LogLevel::Critical => NGX_LOG_EMERG,
    };
    unsafe {
        let log = (*ngx_cycle).log;
        if !log.is_null() {
            ngx_log_error!(lvl, log, "proxy_wasm: {}", msg);
        }
    }
}

extern "C" fn set_proxy_wasm_module(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let conf = unsafe { &mut *(conf as *mut MainConf) };
        let args = conf_args(cf);
        let (name, path) = (&args[1], &args[2]);
        if conf.plugins.iter().any(|p| &p.name == name) {
            return Err(format!("proxy_wasm_module \"{name}\" is already defined"));
        }
        let p = Plugin::load(engine(), name, path).map_err(|e| e.to_string())?;
        conf.plugins.push(p);
        Ok(())
    }));
    conf_result(cf, r)
}

fn conf_result(cf: *mut ngx_conf_t, r: std::thread::Result<Result<(), String>>) -> *mut c_char {
    let msg = match r {
        Ok(Ok(())) => return NGX_CONF_OK,
        Ok(Err(m)) => m,
        Err(_) => "internal error (panic)".to_string(),
    };
    // One line: Wasmtime's parse errors span several.
    let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
    ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", msg);
    NGX_CONF_ERROR
}

static NEXT_FILTER_ID: AtomicUsize = AtomicUsize::new(1);

extern "C" fn set_proxy_wasm(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let lc = unsafe { &mut *(conf as *mut LocConf) };
        let args = conf_args(cf);
        let name = &args[1];
        let config = args.get(2).cloned().unwrap_or_default().into_bytes();
        let main = Module::main_conf(unsafe { &*cf })
            .ok_or_else(|| "no http configuration".to_string())?;
        let plugin = main
            .plugins
            .iter()
            .find(|p| &p.name == name)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "proxy_wasm: no module \"{name}\" (declare it with proxy_wasm_module first)"
                )
            })?;
        // Configure a throwaway VM now, so `nginx -t` refuses a configuration the filter
        // refuses (or a module that cannot be instantiated).
        PluginVm::new(engine(), &plugin, &config, log_to_nginx, LogLevel::Warn)
            .map_err(|e| format!("proxy_wasm \"{name}\": {e}"))?;
        lc.filters.push(FilterRef {
            id: NEXT_FILTER_ID.fetch_add(1, Ordering::Relaxed),
            plugin,
            config,
        });
        Ok(())
    }));
    conf_result(cf, r)
}

thread_local! {
    /// This worker's VMs, one per `proxy_wasm` directive, made on first use.
    static VMS: RefCell<HashMap<usize, PluginVm>> = RefCell::new(HashMap::new());
}

/// Runs `f` on the worker's VM for `filter`, making the VM if needed. A VM that trapped
/// or failed is dropped, so the next request gets a fresh one (no leak, no broken state).
fn with_vm<R>(
    filter: &FilterRef,
    f: impl FnOnce(&mut PluginVm) -> Result<R, VmError>,
) -> Result<R, VmError> {
    VMS.with(|vms| {
        let mut vms = vms.borrow_mut();
        let vm = match vms.entry(filter.id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(PluginVm::new(
                engine(),
                &filter.plugin,
                &filter.config,
                log_to_nginx,
                LogLevel::Info,
            )?),
        };
        let r = f(vm);
        if r.is_err() {
            vms.remove(&filter.id);
        }
        r
    })
}

/// Per-request state: which stream context each filter of the chain opened. Dropped
/// with the request's pool, which ends the streams (`on_log`, `on_done`, `on_delete`).
struct RequestCtx {
    streams: Vec<(FilterRef, u32)>,
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        for (filter, id) in self.streams.drain(..) {
            let _ = catch_unwind(AssertUnwindSafe(|| {
                if let Err(e) = with_vm(&filter, |vm| vm.finish(id)) {
                    log_to_nginx(LogLevel::Error, &e.to_string());
                }
            }));
        }
    }
}

unsafe fn list_pairs(part: *const ngx_list_part_t, out: &mut Pairs) {
    let mut part = part;
    while !part.is_null() {
        let p = &*part;
        let elts = p.elts as *const ngx_table_elt_t;
        for i in 0..p.nelts {
            let h = &*elts.add(i);
            // Deleted entries have hash 0.
            if h.hash == 0 {
                continue;
            }
            let key = std::slice::from_raw_parts(h.key.data, h.key.len).to_ascii_lowercase();
            out.push((key, h.value.as_bytes().to_vec()));
        }
        part = p.next;
    }
}

/// The request headers as Envoy gives them to a filter: pseudo-headers first.
unsafe fn request_pairs(r: &ngx_http_request_t) -> Pairs {
    let mut out: Pairs = Vec::new();
    let host = if r.headers_in.server.len > 0 {
        r.headers_in.server.as_bytes().to_vec()
    } else {
        Vec::new()
    };
    out.push((b":authority".to_vec(), host));
    out.push((b":path".to_vec(), r.unparsed_uri.as_bytes().to_vec()));
    out.push((b":method".to_vec(), r.method_name.as_bytes().to_vec()));
    out.push((b":scheme".to_vec(), b"http".to_vec()));
    list_pairs(&r.headers_in.headers.part, &mut out);
    out
}

unsafe fn ngx_str_in(r: *mut ngx_http_request_t, s: &[u8]) -> Option<ngx_str_t> {
    let p = ngx::ffi::ngx_pnalloc((*r).pool, s.len().max(1)) as *mut u8;
    if p.is_null() {
        return None;
    }
    std::ptr::copy_nonoverlapping(s.as_ptr(), p, s.len());
    Some(ngx_str_t {
        len: s.len(),
        data: p,
    })
}

/// Sends the filter's local response and returns what the rewrite phase should finalize
/// the request with.
unsafe fn send_local_response(r: *mut ngx_http_request_t, lr: &LocalResponse) -> ngx_int_t {
    if ngx_http_discard_request_body(r) != Status::NGX_OK.0 {
        return Status::NGX_ERROR.0;
    }
    let req = Request::from_ngx_http_request(r);
    (*r).headers_out.status = lr.status as ngx_uint_t;
    let no_body = lr.status == 204 || lr.status == 304;
    let mut content_type = None;
    for (k, v) in &lr.headers {
        let key = k.to_ascii_lowercase();
        match key.as_slice() {
            b"content-type" => content_type = Some(v.clone()),
            // nginx computes these itself.
            b"content-length" | b"transfer-encoding" | b"connection" => {}
            _ => {
                let (Ok(k), Ok(v)) = (std::str::from_utf8(k), std::str::from_utf8(v)) else {
                    continue;
                };
                if req.add_header_out(k, v).is_none() {
                    return Status::NGX_ERROR.0;
                }
            }
        }
    }
    if !no_body {
        let ct = content_type.unwrap_or_else(|| {
            if lr.body.is_empty() {
                Vec::new()
            } else {
                b"text/plain".to_vec()
            }
        });
        if !ct.is_empty() {
            let Some(s) = ngx_str_in(r, &ct) else {
                return Status::NGX_ERROR.0;
            };
            (*r).headers_out.content_type = s;
            (*r).headers_out.content_type_len = s.len;
        }
        (*r).headers_out.content_length_n = lr.body.len() as i64;
    }
    if no_body || lr.body.is_empty() {
        (*r).set_header_only(1);
    }
    let rc = ngx_http_send_header(r);
    if rc == Status::NGX_ERROR.0 || rc > Status::NGX_OK.0 || (*r).header_only() != 0 {
        return rc;
    }
    let b = ngx_create_temp_buf((*r).pool, lr.body.len());
    if b.is_null() {
        return Status::NGX_ERROR.0;
    }
    std::ptr::copy_nonoverlapping(lr.body.as_ptr(), (*b).last, lr.body.len());
    (*b).last = (*b).last.add(lr.body.len());
    (*b).set_last_buf(if r == (*r).main { 1 } else { 0 });
    (*b).set_last_in_chain(1);
    let mut out = ngx_chain_t {
        buf: b,
        next: std::ptr::null_mut(),
    };
    ngx_http_output_filter(r, &mut out)
}

extern "C" fn request_headers_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    match catch_unwind(AssertUnwindSafe(|| unsafe { request_headers(r) })) {
        Ok(rc) => rc,
        Err(_) => {
            log_to_nginx(
                LogLevel::Error,
                "internal error (panic) in the request phase",
            );
            ngx::http::HTTPStatus::INTERNAL_SERVER_ERROR.0 as ngx_int_t
        }
    }
}

unsafe fn request_headers(r: *mut ngx_http_request_t) -> ngx_int_t {
    let declined: ngx_int_t = Status::NGX_DECLINED.0;
    // Subrequests (ours later, SSI, auth_request) do not run the chain again.
    if r != (*r).main {
        return declined;
    }
    let req = Request::from_ngx_http_request(r);
    let Some(lc) = Module::location_conf(&*r) else {
        return declined;
    };
    if lc.filters.is_empty() {
        return declined;
    }
    let module = Module::module();
    // The rewrite phase can run again (after `rewrite ... last`); the chain runs once.
    if req.get_module_ctx::<RequestCtx>(module).is_some() {
        return declined;
    }
    let pool = req.pool();
    let ctx = pool.allocate(RequestCtx {
        streams: Vec::new(),
    });
    if ctx.is_null() {
        return Status::NGX_ERROR.0;
    }
    req.set_module_ctx(ctx as *mut c_void, module);
    let ctx = &mut *ctx;
    let headers = request_pairs(&*r);
    // A request without a body ends with its headers.
    let end_of_stream = (*r).headers_in.content_length_n <= 0 && (*r).headers_in.chunked() == 0;
    for filter in &lc.filters {
        let outcome = with_vm(filter, |vm| {
            let id = vm.create_stream()?;
            ctx.streams.push((filter.clone(), id));
            vm.request_headers(id, headers.clone(), end_of_stream)
        });
        match outcome {
            Err(e) => {
                // A failed or trapping filter: fail closed, as Envoy's default does.
                // TODO(issue 5): a directive to choose fail-open.
                log_to_nginx(LogLevel::Error, &e.to_string());
                // The VM is gone; its stream must not be finished on it.
                ctx.streams.retain(|(f, _)| f.id != filter.id);
                return ngx::http::HTTPStatus::INTERNAL_SERVER_ERROR.0 as ngx_int_t;
            }
            Ok(o) => {
                if let Some(lr) = o.local_response {
                    return send_local_response(r, &lr);
                }
                if o.paused {
                    // TODO(issue 5): pause until continue_stream (needs timers/subrequests).
                    log_to_nginx(
                        LogLevel::Warn,
                        "filter paused the request; pausing is not supported yet, continuing",
                    );
                }
                if o.changed_headers.is_some() {
                    // TODO(issue 5): write changed request headers back to nginx.
                    ngx_log_error!(
                        NGX_LOG_NOTICE,
                        req.log(),
                        "proxy_wasm: request header changes are not applied yet"
                    );
                }
            }
        }
    }
    declined
}

/// This request's filter streams, if the chain ran for it.
unsafe fn request_ctx<'a>(r: *mut ngx_http_request_t) -> Option<&'a mut RequestCtx> {
    if r != (*r).main {
        return None;
    }
    let p = *(*r).ctx.add(Module::module().ctx_index) as *mut RequestCtx;
    p.as_mut().filter(|c| !c.streams.is_empty())
}

/// The response headers as Envoy gives them: `:status` first.
unsafe fn response_pairs(r: &ngx_http_request_t) -> Pairs {
    let mut out: Pairs = vec![(
        b":status".to_vec(),
        r.headers_out.status.to_string().into_bytes(),
    )];
    if r.headers_out.content_type.len > 0 {
        out.push((
            b"content-type".to_vec(),
            r.headers_out.content_type.as_bytes().to_vec(),
        ));
    }
    if r.headers_out.content_length_n >= 0 {
        out.push((
            b"content-length".to_vec(),
            r.headers_out.content_length_n.to_string().into_bytes(),
        ));
    }
    list_pairs(&r.headers_out.headers.part, &mut out);
    out
}

/// Applies a filter's header changes to `headers_out`: every header whose values changed
/// is removed (hash 0) and added again with its new values. `:status`, `content-type` and
/// `content-length` live in nginx's own fields and are not changed (yet).
unsafe fn apply_response_headers(r: *mut ngx_http_request_t, old: &Pairs, new: &Pairs) -> bool {
    let values = |p: &Pairs, k: &[u8]| -> Vec<Vec<u8>> {
        p.iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let mut keys: Vec<&Vec<u8>> = old.iter().chain(new.iter()).map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    let req = Request::from_ngx_http_request(r);
    for k in keys {
        if k.starts_with(b":") || k == b"content-type" || k == b"content-length" {
            continue;
        }
        let new_values = values(new, k);
        if values(old, k) == new_values {
            continue;
        }
        let mut part: *mut ngx_list_part_t = &mut (*r).headers_out.headers.part;
        while !part.is_null() {
            let elts = (*part).elts as *mut ngx_table_elt_t;
            for i in 0..(*part).nelts {
                let h = &mut *elts.add(i);
                let key = std::slice::from_raw_parts(h.key.data, h.key.len);
                if h.hash != 0 && key.eq_ignore_ascii_case(k) {
                    h.hash = 0;
                }
            }
            part = (*part).next;
        }
        let Ok(k) = std::str::from_utf8(k) else {
            continue;
        };
        for v in new_values {
            let Ok(v) = std::str::from_utf8(&v) else {
                continue;
            };
            if req.add_header_out(k, v).is_none() {
                return false;
            }
        }
    }
    true
}

extern "C" fn response_header_filter(r: *mut ngx_http_request_t) -> ngx_int_t {
    let r2 = catch_unwind(AssertUnwindSafe(|| unsafe {
        let Some(ctx) = request_ctx(r) else {
            return Ok(());
        };
        let pairs = response_pairs(&*r);
        let eos = (*r).header_only() != 0;
        for (filter, id) in ctx.streams.clone() {
            let changed = with_vm(&filter, |vm| vm.response_headers(id, pairs.clone(), eos))
                .map_err(|e| e.to_string())?;
            if let Some(new) = changed {
                if !apply_response_headers(r, &pairs, &new) {
                    return Err("cannot add a response header".to_string());
                }
            }
        }
        Ok(())
    }));
    match r2 {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            // The response has not started: fail closed.
            log_to_nginx(LogLevel::Error, String::as_str(&e));
            return Status::NGX_ERROR.0;
        }
        Err(_) => return Status::NGX_ERROR.0,
    }
    unsafe {
        match NEXT_HEADER_FILTER {
            Some(next) => next(r),
            None => Status::NGX_ERROR.0,
        }
    }
}

extern "C" fn response_body_filter(
    r: *mut ngx_http_request_t,
    input: *mut ngx_chain_t,
) -> ngx_int_t {
    let r2 = catch_unwind(AssertUnwindSafe(|| unsafe {
        let Some(ctx) = request_ctx(r) else {
            return Ok(());
        };
        let mut cl = input;
        while !cl.is_null() {
            let b = (*cl).buf;
            cl = (*cl).next;
            if b.is_null() {
                continue;
            }
            let in_memory = (*b).temporary() != 0 || (*b).memory() != 0 || (*b).mmap() != 0;
            let eos = (*b).last_buf() != 0;
            let chunk: &[u8] = if in_memory && (*b).last > (*b).pos {
                std::slice::from_raw_parts((*b).pos, (*b).last.offset_from((*b).pos) as usize)
            } else {
                if !in_memory && (*b).in_file() != 0 {
                    // TODO(issue 5): read file buffers (proxy temp files) for capture.
                    log_to_nginx(
                        LogLevel::Warn,
                        "response body in a file buffer: not shown to the filter",
                    );
                }
                &[]
            };
            if chunk.is_empty() && !eos {
                continue;
            }
            for (filter, id) in ctx.streams.clone() {
                with_vm(&filter, |vm| vm.response_body(id, chunk, eos))
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }));
    match r2 {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            // Headers are sent: the stream can only be cut.
            log_to_nginx(LogLevel::Error, String::as_str(&e));
            return Status::NGX_ERROR.0;
        }
        Err(_) => return Status::NGX_ERROR.0,
    }
    unsafe {
        match NEXT_BODY_FILTER {
            Some(next) => next(r, input),
            None => Status::NGX_ERROR.0,
        }
    }
}
