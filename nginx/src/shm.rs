//! nginx's side of the shared-memory zones: the `proxy_wasm_shm_kv`,
//! `proxy_wasm_shm_metrics` and `proxy_wasm_metrics` directives, the zones' init callbacks
//! (reusing a zone across `nginx -s reload`), locked access for the host calls, and the
//! Prometheus content handler. The tables themselves are [`crate::kv`] and
//! [`crate::metric_table`]; the text format is [`crate::prometheus`].
//!
//! Zones are used in worker processes (and with `master_process off`). The throwaway VM
//! that checks a `proxy_wasm` configuration runs in the master, or in `nginx -t`, while
//! the configuration is being read: its shared data and metrics go to a store of that
//! process (see `host.rs`), so checking a new configuration cannot change the live cache.

use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::time::{SystemTime, UNIX_EPOCH};

use ngx::allocator::Allocator;
use ngx::core::slab::LockedSlabPool;
use ngx::core::{SlabPool, Status as NgxStatus, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_chain_t, ngx_command_t, ngx_conf_t, ngx_create_temp_buf, ngx_cycle,
    ngx_http_discard_request_body, ngx_http_output_filter, ngx_http_request_t,
    ngx_http_send_header, ngx_int_t, ngx_log_t, ngx_parse_size, ngx_process, ngx_shared_memory_add,
    ngx_shm_zone_t, ngx_slab_init, ngx_slab_pool_t, ngx_str_t, NGX_HTTP_GET, NGX_HTTP_HEAD,
    NGX_LOG_EMERG, NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_PROCESS_MASTER,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};
use ngx::{ngx_log_error, ngx_string};
use proxy_wasm_harness::abi::metrics::{MetricKey, MetricUpdate};
use proxy_wasm_harness::abi::{HostResult, Status};

use crate::blocks::{BlockAlloc, BLOCK_ALIGN};
use crate::kv::{bucket_count_for, Kv, KvError};
use crate::metric_table::{DefineError, MetricTable};
use crate::prometheus::{self, MetricSnapshot};
use crate::{MainConf, Module};

/// `proxy_wasm_shm_kv`'s default: edge-filter's default cache (`cache.max_total_bytes`,
/// 64 MiB of values) plus its keys, its index, chunk headers and slab rounding.
pub const DEFAULT_KV_ZONE_BYTES: usize = 128 * 1024 * 1024;
/// `proxy_wasm_shm_metrics`' default: about 2,000 metrics (edge-filter defines 56).
pub const DEFAULT_METRICS_ZONE_BYTES: usize = 1024 * 1024;
/// Smallest `proxy_wasm_shm_kv`.
pub const MIN_KV_ZONE_BYTES: usize = 256 * 1024;
/// Smallest `proxy_wasm_shm_metrics`.
pub const MIN_METRICS_ZONE_BYTES: usize = 64 * 1024;
/// At most one "zone full" warning per this many seconds, for all workers together.
pub const FULL_WARNING_INTERVAL_SECS: u64 = 60;

/// The zone names (also the directives that size them).
const KV_ZONE: &str = "proxy_wasm_shm_kv";
const METRICS_ZONE: &str = "proxy_wasm_shm_metrics";

/// The http-level shared-memory settings and, once declared, the zones.
#[derive(Default)]
pub struct ShmConf {
    kv_size: Option<usize>,
    metrics_size: Option<usize>,
    metrics_handler: bool,
    kv_zone: Option<NonNull<ngx_shm_zone_t>>,
    metrics_zone: Option<NonNull<ngx_shm_zone_t>>,
}

/// `128m`, `512k` or bytes, as an operator writes sizes in nginx.conf.
pub fn format_size(bytes: usize) -> String {
    const M: usize = 1024 * 1024;
    if bytes >= M && bytes % M == 0 {
        format!("{}m", bytes / M)
    } else if bytes >= 1024 && bytes % 1024 == 0 {
        format!("{}k", bytes / 1024)
    } else {
        bytes.to_string()
    }
}

fn parse_size_arg(cf: *mut ngx_conf_t, directive: &str, min: usize) -> Result<usize, String> {
    let args = super::conf_args(cf);
    let mut s = args[1].clone().into_bytes();
    let mut raw = ngx_str_t {
        len: s.len(),
        data: s.as_mut_ptr(),
    };
    // SAFETY: `raw` points into `s`, alive for the call.
    let n = unsafe { ngx_parse_size(&mut raw) };
    if n < 0 {
        return Err(format!("{directive}: invalid size \"{}\"", args[1]));
    }
    let n = n as usize;
    if n < min {
        return Err(format!(
            "{directive}: size \"{}\" is too small, the least is {}",
            args[1],
            format_size(min)
        ));
    }
    Ok(n)
}

/// `proxy_wasm_shm_kv SIZE;`
pub extern "C" fn set_shm_kv(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    super::directive(cf, conf, |conf: &mut MainConf, _| {
        if conf.shm.kv_size.is_some() {
            return Err("\"proxy_wasm_shm_kv\" directive is duplicate".to_string());
        }
        conf.shm.kv_size = Some(parse_size_arg(cf, KV_ZONE, MIN_KV_ZONE_BYTES)?);
        Ok(())
    })
}

/// `proxy_wasm_shm_metrics SIZE;`
pub extern "C" fn set_shm_metrics(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    super::directive(cf, conf, |conf: &mut MainConf, _| {
        if conf.shm.metrics_size.is_some() {
            return Err("\"proxy_wasm_shm_metrics\" directive is duplicate".to_string());
        }
        conf.shm.metrics_size = Some(parse_size_arg(cf, METRICS_ZONE, MIN_METRICS_ZONE_BYTES)?);
        Ok(())
    })
}

/// `proxy_wasm_metrics;`: this location serves the metrics.
///
/// # Safety
///
/// Called by nginx with the configuration being parsed, inside a location.
pub unsafe extern "C" fn set_metrics_handler(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    let cf_ref = &*cf;
    let Some(clcf) = NgxHttpCoreModule::location_conf_mut(cf_ref) else {
        return NGX_CONF_ERROR;
    };
    clcf.handler = Some(metrics_handler);
    let Some(main) = Module::main_conf_mut(cf_ref) else {
        return NGX_CONF_ERROR;
    };
    main.shm.metrics_handler = true;
    NGX_CONF_OK
}

/// Declares the zones this configuration needs (from postconfiguration): the shared-data
/// zone when a module is loaded, the metrics zone also when `proxy_wasm_metrics` is used.
///
/// # Safety
///
/// `cf` is the configuration being parsed, at the http block's end.
pub unsafe fn add_zones(cf: *mut ngx_conf_t) -> Result<(), String> {
    let main = Module::main_conf_mut(&*cf).ok_or("no http configuration")?;
    let modules = !main.plugins.is_empty();
    let marker = main as *mut MainConf as *mut c_void;
    let shm = &mut main.shm;
    if modules || shm.kv_size.is_some() {
        let size = shm.kv_size.unwrap_or(DEFAULT_KV_ZONE_BYTES);
        shm.kv_zone = Some(add_zone(
            cf,
            ngx_string!("proxy_wasm_shm_kv"),
            size,
            init_kv_zone,
            marker,
        )?);
    }
    if modules || shm.metrics_size.is_some() || shm.metrics_handler {
        let size = shm.metrics_size.unwrap_or(DEFAULT_METRICS_ZONE_BYTES);
        shm.metrics_zone = Some(add_zone(
            cf,
            ngx_string!("proxy_wasm_shm_metrics"),
            size,
            init_metrics_zone,
            marker,
        )?);
    }
    Ok(())
}

type ZoneInit = unsafe extern "C" fn(*mut ngx_shm_zone_t, *mut c_void) -> ngx_int_t;

unsafe fn add_zone(
    cf: *mut ngx_conf_t,
    mut name: ngx_str_t,
    size: usize,
    init: ZoneInit,
    marker: *mut c_void,
) -> Result<NonNull<ngx_shm_zone_t>, String> {
    let tag = Module::module() as *const _ as *mut c_void;
    let zone = NonNull::new(ngx_shared_memory_add(cf, &mut name, size, tag))
        .ok_or("cannot add a shared memory zone")?;
    let z = &mut *zone.as_ptr();
    if !z.data.is_null() {
        return Err(format!(
            "shared memory zone \"{}\" is already declared",
            name
        ));
    }
    z.init = Some(init);
    // Non-null, so that a reload hands it back to `init` as "the old zone's data".
    z.data = marker;
    Ok(zone)
}

fn zone_name(zone: &ngx_shm_zone_t) -> String {
    zone.shm.name.to_string()
}

/// The slab pool as a [`BlockAlloc`], valid while its mutex is held.
struct SlabBlocks<'a>(&'a LockedSlabPool);

// SAFETY: slab blocks are at least 8-byte aligned, in the zone's mapping, which has the
// same address in every worker (mapped in the master before fork).
unsafe impl BlockAlloc for SlabBlocks<'_> {
    fn alloc(&mut self, size: usize) -> Option<NonNull<u8>> {
        let layout = std::alloc::Layout::from_size_align(size, BLOCK_ALIGN).ok()?;
        self.0.allocate(layout).ok().map(|p| p.cast())
    }

    unsafe fn free(&mut self, block: NonNull<u8>, size: usize) {
        let layout = std::alloc::Layout::from_size_align_unchecked(size, BLOCK_ALIGN);
        self.0.deallocate(block, layout);
    }
}

fn pool_of(zone: &ngx_shm_zone_t) -> *mut ngx_slab_pool_t {
    zone.shm.addr as *mut ngx_slab_pool_t
}

/// After the pool is (re)initialised: no nginx "no memory" crit line per failed write
/// (the module logs its own, rate-limited), and slab errors name the zone.
unsafe fn quiet_pool(pool: &LockedSlabPool, sp: *mut ngx_slab_pool_t, zone: &ngx_shm_zone_t) {
    (*sp).set_log_nomem(0);
    let ctx = format!(" in proxy_wasm zone \"{}\"\0", zone_name(zone));
    if let Some(p) = SlabBlocks(pool).alloc(ctx.len()) {
        std::ptr::copy_nonoverlapping(ctx.as_ptr(), p.as_ptr(), ctx.len());
        (*sp).log_ctx = p.as_ptr();
    }
}

/// Lays out (or, after a reload with the same size, keeps) the shared-data table.
unsafe extern "C" fn init_kv_zone(zone: *mut ngx_shm_zone_t, old: *mut c_void) -> ngx_int_t {
    init_zone(
        zone,
        old,
        |blocks, zone| {
            let buckets = bucket_count_for(zone.shm.size);
            Kv::create(blocks, buckets)
                .map(|kv| kv.root())
                .map_err(|e| e.to_string())
        },
        |blocks, root| {
            Kv::attach(blocks, root).map(|kv| {
                let s = kv.stats();
                format!(
                    "{} keys, {} bytes of values, {} buckets",
                    s.entries, s.value_bytes, s.buckets
                )
            })
        },
    )
}

/// Lays out (or keeps) the metric records.
unsafe extern "C" fn init_metrics_zone(zone: *mut ngx_shm_zone_t, old: *mut c_void) -> ngx_int_t {
    init_zone(
        zone,
        old,
        |blocks, zone| {
            let sp = pool_of(zone);
            // The pool's free pages, less one each for the header and the log context.
            let room = (*sp).pfree.saturating_sub(2) * ngx::ffi::ngx_pagesize;
            MetricTable::create(blocks, room)
                .map(|p| p.as_ptr())
                .ok_or_else(|| "no room for metric records".to_string())
        },
        |_, root| {
            MetricTable::attach(root).map(|t| {
                format!(
                    "{} of {} metric records used",
                    t.snapshot().len(),
                    t.capacity()
                )
            })
        },
    )
}

unsafe fn init_zone(
    zone: *mut ngx_shm_zone_t,
    old: *mut c_void,
    create: impl FnOnce(&mut SlabBlocks<'_>, &ngx_shm_zone_t) -> Result<*mut u8, String>,
    attach: impl Fn(&mut SlabBlocks<'_>, *mut u8) -> Option<String>,
) -> ngx_int_t {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let zone = &*zone;
        let log = zone.shm.log;
        let pool = SlabPool::from_shm_zone(zone).ok_or("zone not mapped")?;
        let sp = pool_of(zone);
        let locked = pool.lock();
        let mut blocks = SlabBlocks(&locked);
        if !old.is_null() {
            // A reload kept the zone (same name and size): keep what it holds if it is a
            // table of this layout; else start it afresh.
            if let Some(kept) = attach(&mut blocks, (*sp).data as *mut u8) {
                log_line(
                    log,
                    NGX_LOG_NOTICE,
                    &format!("proxy_wasm: zone \"{}\" reused: {kept}", zone_name(zone)),
                );
                return Ok(());
            }
            log_line(
                log,
                NGX_LOG_WARN,
                &format!(
                    "proxy_wasm: zone \"{}\" holds no table of this version; starting it afresh",
                    zone_name(zone)
                ),
            );
            ngx_slab_init(sp);
        }
        let root = create(&mut blocks, zone)?;
        (*sp).data = root as *mut c_void;
        quiet_pool(&locked, sp, zone);
        if let Some(made) = attach(&mut blocks, root) {
            let size = format_size(zone.shm.size);
            let msg = format!(
                "proxy_wasm: zone \"{}\" ({size}) ready: {made}",
                zone_name(zone)
            );
            log_line(log, NGX_LOG_INFO, &msg);
        }
        Ok::<(), String>(())
    }));
    let msg = match r {
        Ok(Ok(())) => return NgxStatus::NGX_OK.0,
        Ok(Err(m)) => m,
        Err(_) => "internal error (panic)".to_string(),
    };
    log_line(
        (*zone).shm.log,
        NGX_LOG_EMERG,
        &format!("proxy_wasm: zone \"{}\": {msg}", zone_name(&*zone)),
    );
    NgxStatus::NGX_ERROR.0
}

fn log_line(log: *mut ngx_log_t, level: u32, msg: &str) {
    let log = if log.is_null() {
        // SAFETY: nginx's current cycle, read in its own process.
        unsafe { (*ngx_cycle).log }
    } else {
        log
    };
    if !log.is_null() {
        ngx_log_error!(level, log, "{}", msg);
    }
}

fn cycle_log(level: u32, msg: &str) {
    log_line(std::ptr::null_mut(), level, msg);
}

/// The zone in use by this process, if any: its current cycle's, outside the master.
fn live_zone(
    pick: fn(&ShmConf) -> Option<NonNull<ngx_shm_zone_t>>,
) -> Option<&'static ngx_shm_zone_t> {
    // SAFETY: plain reads of nginx's process globals, in its only thread.
    unsafe {
        // While nginx reads its first configuration, `ngx_cycle` is a bare cycle with no
        // configuration contexts at all.
        if ngx_process == NGX_PROCESS_MASTER as usize
            || ngx_cycle.is_null()
            || (*ngx_cycle).conf_ctx.is_null()
        {
            return None;
        }
        let main = Module::main_conf(&*ngx_cycle)?;
        pick(&main.shm).map(|z| &*z.as_ptr())
    }
}

/// Runs `f` on the shared-data table under the zone's mutex. `None`: no zone in use.
fn with_kv<R>(
    f: impl FnOnce(Option<&mut Kv<'_, SlabBlocks<'_>>>, &ngx_shm_zone_t) -> R,
) -> Option<R> {
    let zone = live_zone(|s| s.kv_zone)?;
    // SAFETY: the zone was initialised by `init_kv_zone` in this cycle.
    let pool = unsafe { SlabPool::from_shm_zone(zone) }?;
    let locked = pool.lock();
    let mut blocks = SlabBlocks(&locked);
    // SAFETY: the root was set by `init_kv_zone`; the mutex is held.
    let root = unsafe { (*pool_of(zone)).data as *mut u8 };
    let mut kv = unsafe { Kv::attach(&mut blocks, root) };
    Some(f(kv.as_mut(), zone))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn broken(zone: &ngx_shm_zone_t) {
    cycle_log(
        NGX_LOG_ERR,
        &format!(
            "proxy_wasm: zone \"{}\" holds no valid table",
            zone_name(zone)
        ),
    );
}

/// `proxy_get_shared_data` from the zone; `None` when no zone is in use.
pub fn kv_get(vm_id: &str, key: &str) -> Option<HostResult<(Vec<u8>, u32)>> {
    with_kv(|kv, zone| match kv {
        None => {
            broken(zone);
            Err(Status::NotFound)
        }
        Some(kv) => kv
            .get(vm_id.as_bytes(), key.as_bytes())
            .map_err(|e| match e {
                KvError::NotFound | KvError::TooLarge { .. } => Status::NotFound,
                _ => Status::InternalFailure,
            }),
    })
}

/// What a refused write is reported as. The SDKs treat anything but `Ok` and `CasMismatch`
/// from `proxy_set_shared_data` as a bug and trap (the Rust SDK panics), and edge-filter
/// treats `CasMismatch` as a failed write (retried a bounded number of times, then the
/// entry is not stored): so a full zone or an oversized key is a `CasMismatch`.
pub fn status_for_set_error(e: &KvError) -> Status {
    match e {
        KvError::NotFound => Status::NotFound,
        _ => Status::CasMismatch,
    }
}

/// `proxy_set_shared_data` into the zone; `None` when no zone is in use.
pub fn kv_set(vm_id: &str, key: &str, value: Option<&[u8]>, cas: u32) -> Option<HostResult<()>> {
    let value = value.unwrap_or_default();
    let (r, warn) = with_kv(|kv, zone| match kv {
        None => {
            broken(zone);
            (Err(KvError::NotFound), None)
        }
        Some(kv) => match kv.set(vm_id.as_bytes(), key.as_bytes(), value, cas) {
            Err(e @ (KvError::Full { .. } | KvError::TooLarge { .. })) => {
                let due = kv.warning_due(now_secs(), FULL_WARNING_INTERVAL_SECS);
                let s = kv.stats();
                (Err(e), due.then(|| (zone_name(zone), zone.shm.size, s)))
            }
            r => (r, None),
        },
    })?;
    // Logged outside the lock.
    if let Some((name, size, s)) = warn {
        match &r {
            Err(KvError::Full { bytes }) => cycle_log(NGX_LOG_WARN, &format!(
                "proxy_wasm: shared-memory zone \"{name}\" ({}) is full: a shared-data write of {bytes} bytes for \"{vm_id}\" failed ({} keys, {} bytes of values stored); raise proxy_wasm_shm_kv (this warning is repeated at most every {FULL_WARNING_INTERVAL_SECS} s)",
                format_size(size), s.entries, s.value_bytes
            )),
            Err(e) => cycle_log(NGX_LOG_WARN, &format!(
                "proxy_wasm: a shared-data write for \"{vm_id}\" was refused: {e} (this warning is repeated at most every {FULL_WARNING_INTERVAL_SECS} s)"
            )),
            Ok(()) => {}
        }
    }
    Some(r.map_err(|e| {
        if e == KvError::NotFound {
            // The table is not valid (logged by `broken`).
            Status::CasMismatch
        } else {
            status_for_set_error(&e)
        }
    }))
}

thread_local! {
    /// This worker's map from a metric to its record in the zone (`None`: refused, kept
    /// in the worker's own store), and the zone it was made for.
    static METRIC_RECORDS: RefCell<(usize, FxHashMap<MetricKey, Option<u32>>)> =
        RefCell::default();
}

/// Runs `f` on the metric records under the zone's mutex. `None`: no zone in use.
fn with_metrics<R>(
    f: impl FnOnce(Option<&mut MetricTable<'_>>, &ngx_shm_zone_t) -> R,
) -> Option<R> {
    let zone = live_zone(|s| s.metrics_zone)?;
    // SAFETY: the zone was initialised by `init_metrics_zone` in this cycle.
    let pool = unsafe { SlabPool::from_shm_zone(zone) }?;
    let _locked = pool.lock();
    // SAFETY: the root was set by `init_metrics_zone`; the mutex is held.
    let mut t = unsafe { MetricTable::attach((*pool_of(zone)).data as *mut u8) };
    Some(f(t.as_mut(), zone))
}

/// The record for `key` in the zone: found once per worker, then remembered. `None`:
/// no zone in use, or the metric has no record (refused, logged once per zone).
fn metric_record(key: &MetricKey) -> Option<u32> {
    let zone = live_zone(|s| s.metrics_zone)? as *const ngx_shm_zone_t as usize;
    let known = METRIC_RECORDS.with(|m| {
        let mut m = m.borrow_mut();
        if m.0 != zone {
            *m = (zone, FxHashMap::default());
        }
        m.1.get(key).copied()
    });
    if let Some(r) = known {
        return r;
    }
    let (record, warn) = with_metrics(|t, zone| match t {
        None => (
            None,
            Some(format!("zone \"{}\" holds no valid table", zone_name(zone))),
        ),
        Some(t) => match t.define(key.0, &key.1) {
            Ok(i) => (Some(i), None),
            Err(e) => {
                let hint = match e {
                    DefineError::Full { .. } => format!(
                        "; raise proxy_wasm_shm_metrics (now {})",
                        format_size(zone.shm.size)
                    ),
                    DefineError::NameTooLong { .. } => String::new(),
                };
                let msg = format!(
                    "metric \"{}\" is not exported, {e}{hint}; it counts in each worker only (logged once)",
                    key.1
                );
                (None, t.first_warning().then_some(msg))
            }
        },
    })?;
    if let Some(msg) = warn {
        cycle_log(NGX_LOG_WARN, &format!("proxy_wasm: {msg}"));
    }
    METRIC_RECORDS.with(|m| m.borrow_mut().1.insert(key.clone(), record));
    record
}

/// Gives `key` a record in the zone, if one is in use.
pub fn metric_define(key: &MetricKey) {
    metric_record(key);
}

/// Applies an update to `key`'s record; `None` when the metric is not in a zone.
pub fn metric_update(key: &MetricKey, update: MetricUpdate) -> Option<HostResult<()>> {
    let record = metric_record(key)?;
    with_metrics(|t, _| {
        if t.is_some_and(|t| t.apply(record, update)) {
            Ok(())
        } else {
            Err(Status::NotFound)
        }
    })
}

/// `key`'s value from its record; `None` when the metric is not in a zone.
pub fn metric_value(key: &MetricKey) -> Option<HostResult<u64>> {
    let record = metric_record(key)?;
    with_metrics(|t, _| t.and_then(|t| t.value(record)).ok_or(Status::NotFound))
}

/// Every metric in the zone (empty without one).
fn metrics_snapshot() -> Vec<MetricSnapshot> {
    with_metrics(|t, _| t.map(|t| t.snapshot()).unwrap_or_default()).unwrap_or_default()
}

extern "C" fn metrics_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    match catch_unwind(AssertUnwindSafe(|| unsafe { serve_metrics(r) })) {
        Ok(rc) => rc,
        Err(_) => {
            cycle_log(
                NGX_LOG_ERR,
                "proxy_wasm: internal error (panic) serving metrics",
            );
            ngx::http::HTTPStatus::INTERNAL_SERVER_ERROR.0 as ngx_int_t
        }
    }
}

unsafe fn serve_metrics(r: *mut ngx_http_request_t) -> ngx_int_t {
    if (*r).method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as usize == 0 {
        return ngx::http::HTTPStatus::NOT_ALLOWED.0 as ngx_int_t;
    }
    if ngx_http_discard_request_body(r) != NgxStatus::NGX_OK.0 {
        return NgxStatus::NGX_ERROR.0;
    }
    // Copied out under the lock, rendered after.
    let body = prometheus::render(&metrics_snapshot());
    (*r).headers_out.status = 200;
    (*r).headers_out.content_length_n = body.len() as i64;
    let ct = prometheus::CONTENT_TYPE;
    (*r).headers_out.content_type = ngx_str_t {
        len: ct.len(),
        data: ct.as_ptr() as *mut u8,
    };
    (*r).headers_out.content_type_len = ct.len();
    if body.is_empty() {
        (*r).set_header_only(1);
    }
    let rc = ngx_http_send_header(r);
    if rc == NgxStatus::NGX_ERROR.0 || rc > NgxStatus::NGX_OK.0 || (*r).header_only() != 0 {
        return rc;
    }
    let b = ngx_create_temp_buf((*r).pool, body.len());
    if b.is_null() {
        return NgxStatus::NGX_ERROR.0;
    }
    std::ptr::copy_nonoverlapping(body.as_ptr(), (*b).last, body.len());
    (*b).last = (*b).last.add(body.len());
    (*b).set_last_buf(if r == (*r).main { 1 } else { 0 });
    (*b).set_last_in_chain(1);
    let mut out = ngx_chain_t {
        buf: b,
        next: std::ptr::null_mut(),
    };
    ngx_http_output_filter(r, &mut out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_nginx_conf() {
        assert_eq!(format_size(128 << 20), "128m");
        assert_eq!(format_size(512 << 10), "512k");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size((1 << 20) + 1024), "1025k");
    }

    #[test]
    fn refused_writes_are_cas_mismatches() {
        // The only failure the SDKs do not trap on, and edge-filter's "failed write".
        assert_eq!(
            status_for_set_error(&KvError::Full { bytes: 1 }),
            Status::CasMismatch
        );
        assert_eq!(
            status_for_set_error(&KvError::TooLarge {
                what: "key",
                len: 2,
                max: 1
            }),
            Status::CasMismatch
        );
        assert_eq!(
            status_for_set_error(&KvError::CasMismatch),
            Status::CasMismatch
        );
    }
}
