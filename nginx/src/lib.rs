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
//! - `proxy_wasm_call_location URI;` (http, server, location): in-request
//!   `dispatch_http_call`s go out as nginx subrequests to that location ([`subrequest`]).
//!
//! The request headers reach each filter in the rewrite phase; a local response ends the
//! request there. Each worker makes the filters' VMs when it starts; their root contexts
//! tick on nginx timers and call upstreams with the module's own client ([`worker`],
//! [`client`]); calls made inside a request use an nginx subrequest when the location
//! says where ([`subrequest`]).

#![deny(missing_docs)]

pub mod blocks;
pub mod client;
mod headers;
pub mod host;
pub mod http1;
pub mod kv;
pub mod metric_table;
pub mod prometheus;
pub mod shm;
mod stream;
pub mod subrequest;
pub mod upstream;
pub mod vm;
pub mod worker;

use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use host::StreamAction;
use ngx::core::{Status, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_array_push, ngx_command_t, ngx_conf_t, ngx_cycle, ngx_http_handler_pt, ngx_http_module_t,
    ngx_http_phases_NGX_HTTP_REWRITE_PHASE, ngx_int_t, ngx_module_t, ngx_str_t, ngx_uint_t,
    NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_CONF_TAKE12, NGX_CONF_TAKE2, NGX_HTTP_LOC_CONF,
    NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_MODULE,
    NGX_HTTP_SRV_CONF, NGX_LOG_EMERG, NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_WARN,
};
use ngx::http::{
    HttpModule, HttpModuleLocationConf, HttpModuleMainConf, Merge, MergeConfigError,
    NgxHttpCoreModule,
};
use ngx::{ngx_conf_log_error, ngx_log_error, ngx_string};
use proxy_wasm_harness::abi::LogLevel;
use wasmtime::Engine;

use ngx::ffi::{
    ngx_http_output_body_filter_pt, ngx_http_output_header_filter_pt, ngx_http_top_body_filter,
    ngx_http_top_header_filter,
};

pub(crate) static mut NEXT_HEADER_FILTER: ngx_http_output_header_filter_pt = None;
pub(crate) static mut NEXT_BODY_FILTER: ngx_http_output_body_filter_pt = None;

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
    /// Every `proxy_wasm` directive, so each worker makes their VMs when it starts.
    filters: Vec<FilterRef>,
    /// The shared-memory zones.
    shm: shm::ShmConf,
}

/// One `proxy_wasm` directive: a filter in a chain. Cheap to clone (requests, streams,
/// timers and calls all hold one).
#[derive(Clone)]
pub struct FilterRef(std::sync::Arc<FilterDef>);

/// What a `proxy_wasm` directive declares.
pub struct FilterDef {
    /// Identifies this filter's VM in each worker.
    id: usize,
    plugin: Plugin,
    config: Vec<u8>,
}

impl std::ops::Deref for FilterRef {
    type Target = FilterDef;
    fn deref(&self) -> &FilterDef {
        &self.0
    }
}

/// The server/location configuration: the filter chain and its failure policy.
#[derive(Default, Clone)]
pub struct LocConf {
    filters: Vec<FilterRef>,
    /// `proxy_wasm_failure_policy`: `Some(true)` for open; unset inherits, default closed.
    failure_open: Option<bool>,
    /// `proxy_wasm_call_location`: the URI prefix of the location in-request calls go to
    /// as subrequests; unset inherits, default none (the module's own client).
    call_location: Option<String>,
}

impl LocConf {
    /// Whether a failing filter is skipped (open) rather than failing the request (closed).
    pub fn fail_open(&self) -> bool {
        self.failure_open.unwrap_or(false)
    }
}

impl Merge for LocConf {
    fn merge(&mut self, prev: &LocConf) -> Result<(), MergeConfigError> {
        // A level with no `proxy_wasm` of its own inherits the chain, as nginx arrays do.
        if self.filters.is_empty() {
            self.filters = prev.filters.clone();
        }
        if self.failure_open.is_none() {
            self.failure_open = prev.failure_open;
        }
        if self.call_location.is_none() {
            self.call_location = prev.call_location.clone();
        }
        Ok(())
    }
}

struct Module;

impl HttpModule for Module {
    fn module() -> &'static ngx_module_t {
        unsafe { &*std::ptr::addr_of!(ngx_http_proxy_wasm_module) }
    }

    unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        // Before the configuration is read: `proxy_pass` and the others name them.
        match subrequest::add_variables(cf) {
            Ok(()) => Status::NGX_OK.0,
            Err(()) => Status::NGX_ERROR.0,
        }
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
        *h = Some(stream::request_headers_handler);
        if let Err(e) = shm::add_zones(cf) {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "proxy_wasm: {}", e);
            return Status::NGX_ERROR.0;
        }
        // Response filters at the top of the chain: without its own ngx_module_order a
        // dynamic module's filters run first (before gzip, range, copy filter), so the
        // filter sees the upstream's bytes as they stream.
        NEXT_HEADER_FILTER = ngx_http_top_header_filter;
        ngx_http_top_header_filter = Some(stream::response_header_filter);
        NEXT_BODY_FILTER = ngx_http_top_body_filter;
        ngx_http_top_body_filter = Some(stream::response_body_filter);
        Status::NGX_OK.into()
    }
}

unsafe impl HttpModuleMainConf for Module {
    type MainConf = MainConf;
}

unsafe impl HttpModuleLocationConf for Module {
    type LocationConf = LocConf;
}

static mut COMMANDS: [ngx_command_t; 8] = [
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
        name: ngx_string!("proxy_wasm_failure_policy"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1)
            as ngx_uint_t,
        set: Some(set_failure_policy),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: std::ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("proxy_wasm_call_location"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1)
            as ngx_uint_t,
        set: Some(set_call_location),
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
    preconfiguration: Some(Module::preconfiguration),
    postconfiguration: Some(Module::postconfiguration),
    create_main_conf: Some(Module::create_main_conf),
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(Module::create_loc_conf),
    merge_loc_conf: Some(Module::merge_loc_conf),
};

/// The `ngx_modules` tables `load_module` reads (a macro of the `ngx` crate, undocumented).
/// Left out of unit-test builds: the test executable cannot link nginx's symbols, and
/// without these roots the linker drops everything that needs them.
#[cfg(not(test))]
#[allow(missing_docs)]
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
    init_process: Some(worker::init_process),
    exit_process: Some(worker::exit_process),
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
    directive(cf, conf, |conf: &mut MainConf, args| {
        let (name, path) = (&args[1], &args[2]);
        if conf.plugins.iter().any(|p| &p.name == name) {
            return Err(format!("proxy_wasm_module \"{name}\" is already defined"));
        }
        // Relative to nginx's prefix (-p), as load_module and include are.
        let path = if path.starts_with('/') {
            path.clone()
        } else {
            let prefix = unsafe { (*(*cf).cycle).prefix.as_bytes() };
            format!("{}{}", String::from_utf8_lossy(prefix), path)
        };
        let p = Plugin::load(engine(), name, &path).map_err(|e| e.to_string())?;
        conf.plugins.push(p);
        Ok(())
    })
}

/// What every directive handler does around its own part: `set` gets this module's
/// configuration of type `C` (the one nginx passes for the directive's context) and the
/// directive's arguments; its error (or a panic) becomes one `[emerg]` line naming the
/// file and line, and fails `nginx -t`.
pub(crate) fn directive<C>(
    cf: *mut ngx_conf_t,
    conf: *mut c_void,
    set: impl FnOnce(&mut C, &[String]) -> Result<(), String>,
) -> *mut c_char {
    let r = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: nginx passes the configuration the command's `conf` offset selects,
        // which the command table pairs with `C`.
        let conf = unsafe { &mut *(conf as *mut C) };
        set(conf, &conf_args(cf))
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

extern "C" fn set_failure_policy(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |lc: &mut LocConf, args| {
        if lc.failure_open.is_some() {
            return Err("\"proxy_wasm_failure_policy\" directive is duplicate".to_string());
        }
        lc.failure_open = Some(match args[1].as_str() {
            "open" => true,
            "closed" => false,
            other => {
                return Err(format!(
                    "invalid proxy_wasm_failure_policy \"{other}\": expected open or closed"
                ))
            }
        });
        Ok(())
    })
}

extern "C" fn set_call_location(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |lc: &mut LocConf, args| {
        if lc.call_location.is_some() {
            return Err("\"proxy_wasm_call_location\" directive is duplicate".to_string());
        }
        let uri = &args[1];
        // A URI nginx can route a subrequest by: absolute, no query, no blanks.
        if !uri.starts_with('/') || uri.contains(['?', '#']) || uri.contains(char::is_whitespace) {
            return Err(format!(
                "invalid proxy_wasm_call_location \"{uri}\": expected a URI path such as \
                 /_proxy_wasm_call"
            ));
        }
        lc.call_location = Some(uri.clone());
        Ok(())
    })
}

static NEXT_FILTER_ID: AtomicUsize = AtomicUsize::new(1);

extern "C" fn set_proxy_wasm(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    directive(cf, conf, |lc: &mut LocConf, args| {
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
        let filter = FilterRef(std::sync::Arc::new(FilterDef {
            id: NEXT_FILTER_ID.fetch_add(1, Ordering::Relaxed),
            plugin,
            config,
        }));
        if let Some(main) = Module::main_conf_mut(unsafe { &*cf }) {
            main.filters.push(filter.clone());
        }
        lc.filters.push(filter);
        Ok(())
    })
}

thread_local! {
    /// This worker's VMs, one per `proxy_wasm` directive, made at worker start or on first
    /// use. Each knows its generation: a replaced VM's streams, timers and calls never
    /// reach its successor.
    pub(crate) static VMS: RefCell<FxHashMap<usize, PluginVm>> = RefCell::default();
}

/// What a callback run on a VM returned, with the stream actions it queued for streams
/// that are not paused (a paused one has been woken already).
pub(crate) struct VmRun<R> {
    /// The callback's result.
    pub value: R,
    /// Stream actions left for the caller (its own stream's, mostly).
    pub actions: Vec<(u32, StreamAction)>,
}

/// Runs `f` on the worker's VM for `filter` (with the VM's generation), making the VM if
/// needed. A VM that trapped or failed is dropped, so the next request gets a fresh one
/// (no leak, no broken state): its timer stops, its calls end, and requests paused on it
/// are woken to get the failure policy. After `f`, ticks and calls the filter asked for
/// start, and actions it queued for paused requests are applied (outside the VM).
pub(crate) fn with_vm<R>(
    filter: &FilterRef,
    f: impl FnOnce(&mut PluginVm, u64) -> Result<R, VmError>,
) -> Result<VmRun<R>, VmError> {
    let r = VMS.with(|vms| {
        let mut vms = vms.borrow_mut();
        let vm = match vms.entry(filter.id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let made = PluginVm::new(
                    engine(),
                    &filter.plugin,
                    &filter.config,
                    log_to_nginx,
                    LogLevel::Info,
                );
                worker::vm_made(filter, made.is_ok());
                e.insert(made.map_err(|e| (e, 0))?)
            }
        };
        let gen = vm.generation();
        match f(vm, gen) {
            Ok(value) => {
                worker::after_callback(filter, vm, false);
                Ok((value, gen, vm.take_actions()))
            }
            Err(e) => {
                vms.remove(&filter.id);
                Err((e, gen))
            }
        }
    });
    match r {
        Ok((value, gen, actions)) => Ok(VmRun {
            value,
            actions: stream::route_actions(filter.id, gen, actions),
        }),
        Err((e, gen)) => {
            if gen != 0 {
                worker::vm_dropped(filter, gen);
                stream::vm_failed(filter.id, gen);
            }
            Err(e)
        }
    }
}
