//! A worker's root-context work, with no request needed: every configured filter's VM is
//! made when the worker starts (`init_process`), each VM's root context ticks on an
//! nginx timer, and `http_call` answers are delivered to the VM that made the call. The
//! VMs are dropped in `exit_process`.
//!
//! A VM dropped after a trap takes its timer and its calls with it; each VM has a
//! generation number, so a timer or call of the old VM never reaches the one made again.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use nginx_sys::{ngx_add_timer, ngx_del_timer};
use ngx::ffi::{
    ngx_cycle, ngx_cycle_t, ngx_event_t, ngx_http_upstream_server_t, ngx_http_upstream_srv_conf_t,
    ngx_int_t, ngx_process, NGX_HTTP_UPSTREAM_CREATE, NGX_OK, NGX_PROCESS_SINGLE,
    NGX_PROCESS_WORKER,
};
use ngx::http::{HttpModuleMainConf, NgxHttpUpstreamModule};
use proxy_wasm_harness::abi::metrics::{MetricKey, MetricUpdate};
use proxy_wasm_harness::abi::{LogLevel, MetricType};

use crate::client::{self, ClientCall, Outcome, Owner};
use crate::host::CallRoute;
use crate::subrequest::SubrequestCall;
use crate::upstream::{self, Cluster, Clusters, Peer};
use crate::vm::{PluginVm, VmError};
use crate::{log_to_nginx, FilterRef, Module, VMS};
use crate::{prometheus, shm};

/// The longest tick period nginx's timer takes (its `ngx_msec_t` delay is 32-bit here).
const MAX_TICK_MS: u64 = u32::MAX as u64 / 2;

/// One VM's tick timer. It lives as long as the worker (one per filter), and remembers
/// which VM generation armed it.
struct Tick {
    ev: ngx_event_t,
    filter: FilterRef,
    generation: u64,
}

thread_local! {
    static TICKS: RefCell<HashMap<usize, Box<Tick>>> = RefCell::new(HashMap::new());
    /// Filters (by id) whose VM failed in this worker and has not been made again yet:
    /// the next VM made for one is a reload.
    static FAILED: RefCell<HashSet<usize>> = RefCell::new(HashSet::new());
}

/// Envoy's reload counters of `filter`'s plugin, in the metrics zone.
fn reload_keys(filter: &FilterRef) -> [MetricKey; 2] {
    let (success, failure) = prometheus::vm_reload_metric_names(&filter.plugin.name);
    [
        (MetricType::Counter, success),
        (MetricType::Counter, failure),
    ]
}

/// A VM was made for `filter` (`ok`) or could not be: after a failure that is a reload,
/// counted as Envoy counts `FAIL_RELOAD`'s (one per VM made again, one per failed try),
/// so a trap shows on the metrics page, not only in the error log.
pub(crate) fn vm_made(filter: &FilterRef, ok: bool) {
    let reload = FAILED.with(|f| {
        let mut f = f.borrow_mut();
        // A failed reload leaves the filter failed: its next try is a reload too.
        if ok {
            f.remove(&filter.id)
        } else {
            f.contains(&filter.id)
        }
    });
    if reload {
        let [success, failure] = reload_keys(filter);
        shm::metric_update(if ok { &success } else { &failure }, MetricUpdate::Add(1));
    }
}

/// `init_process`: in a worker (not the cache manager or loader, which run it too), reads
/// the `upstream` blocks and makes every filter's VM, so ticks and readiness checks run
/// before the first request. A VM that cannot be made here is logged and made again on
/// the first request that needs it; the worker starts either way.
///
/// # Safety
///
/// nginx calls it with the worker's cycle, on the worker's thread.
pub unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    let process = ngx_process as u32;
    if process != NGX_PROCESS_WORKER && process != NGX_PROCESS_SINGLE {
        return NGX_OK as ngx_int_t;
    }
    let r = catch_unwind(AssertUnwindSafe(|| {
        upstream::install(read_upstreams(&*cycle));
        let Some(main) = Module::main_conf(&*cycle) else {
            return;
        };
        for filter in &main.filters {
            // At 0 from the start, so that `increase()` sees the first reload.
            for key in reload_keys(filter) {
                shm::metric_define(&key);
            }
            if let Err(e) = crate::with_vm(filter, |_, _| Ok(())) {
                log_to_nginx(
                    LogLevel::Error,
                    &format!(
                        "filter \"{}\" could not start in this worker: {e}",
                        filter.plugin.name
                    ),
                );
            }
        }
    }));
    if r.is_err() {
        log_to_nginx(LogLevel::Error, "internal error (panic) at worker start");
    }
    NGX_OK as ngx_int_t
}

/// `exit_process`: ends the calls in flight (nginx then finds no socket of ours left
/// open), stops the timers and drops the VMs.
///
/// # Safety
///
/// nginx calls it once, on the worker's thread, as the worker exits.
pub unsafe extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        client::cancel_all();
        TICKS.with(|t| {
            if let Ok(mut t) = t.try_borrow_mut() {
                for tick in t.values_mut() {
                    if tick.ev.timer_set() != 0 {
                        ngx_del_timer(&mut tick.ev);
                    }
                }
                t.clear();
            }
        });
        VMS.with(|v| {
            if let Ok(mut v) = v.try_borrow_mut() {
                v.clear();
            }
        });
    }));
}

/// The explicit `upstream NAME { server ...; }` blocks (not the implicit ones `proxy_pass`
/// makes), with the addresses nginx resolved: servers marked `down` are left out, and
/// `backup` servers are used only when a block has no other.
unsafe fn read_upstreams(cycle: &ngx_cycle_t) -> Clusters {
    let Some(umcf) = NgxHttpUpstreamModule::main_conf(cycle) else {
        return Clusters::default();
    };
    let mut out = Vec::new();
    let uscfs: &[*mut ngx_http_upstream_srv_conf_t] = umcf.upstreams.as_slice();
    for &uscf in uscfs.iter().take(upstream::MAX_CLUSTERS) {
        let Some(u) = uscf.as_ref() else { continue };
        if u.flags & NGX_HTTP_UPSTREAM_CREATE as usize == 0 || u.servers.is_null() {
            continue;
        }
        let servers: &[ngx_http_upstream_server_t] = (*u.servers).as_slice();
        let (mut primary, mut backup) = (Vec::new(), Vec::new());
        for s in servers.iter().filter(|s| s.down == 0) {
            let list = if s.backup() != 0 {
                &mut backup
            } else {
                &mut primary
            };
            for i in 0..s.naddrs {
                let a = &*s.addrs.add(i);
                if a.sockaddr.is_null() {
                    continue;
                }
                list.push(Peer {
                    sockaddr: std::slice::from_raw_parts(
                        a.sockaddr.cast::<u8>(),
                        a.socklen as usize,
                    )
                    .to_vec(),
                    name: String::from_utf8_lossy(a.name.as_bytes()).into_owned(),
                });
            }
        }
        let peers = if primary.is_empty() { backup } else { primary };
        out.push(Cluster::new(
            &String::from_utf8_lossy(u.host.as_bytes()),
            peers,
        ));
    }
    Clusters::new(out)
}

/// After every successful callback into `vm` (see `crate::with_vm`): applies a tick
/// period the filter set (from any context), or after a tick re-arms the timer with the
/// current period; then starts the calls the filter made. Nothing here calls the guest.
pub(crate) fn after_callback(filter: &FilterRef, vm: &mut PluginVm, ticked: bool) {
    let generation = vm.generation();
    match vm.take_tick_change() {
        Some(period) => arm(filter, generation, period),
        None if ticked => arm(filter, generation, vm.tick_period()),
        None => {}
    }
    for call in vm.take_calls() {
        let owner = Owner {
            filter: filter.clone(),
            generation,
            context: call.context,
            token: call.token,
        };
        match call.route {
            CallRoute::Client { peer, request } => client::start(
                owner,
                ClientCall {
                    cluster: call.cluster,
                    timeout: call.timeout,
                    peer,
                    request,
                },
            ),
            CallRoute::Subrequest { head, body } => {
                let sub = SubrequestCall {
                    cluster: call.cluster,
                    timeout: call.timeout,
                    head,
                    body,
                };
                if let Err(e) = crate::stream::start_subrequest(owner, sub) {
                    // Never answered: the request's own pause timer is the backstop.
                    log_to_nginx(LogLevel::Error, &e);
                    vm.subrequest_call_ended(call.context);
                }
            }
        }
    }
}

/// A VM was dropped (it trapped or failed): its timer stops and its calls end unanswered.
pub(crate) fn vm_dropped(filter: &FilterRef, generation: u64) {
    FAILED.with(|f| f.borrow_mut().insert(filter.id));
    TICKS.with(|t| {
        if let Ok(mut t) = t.try_borrow_mut() {
            if let Some(tick) = t.get_mut(&filter.id) {
                if tick.generation == generation && tick.ev.timer_set() != 0 {
                    // SAFETY: armed by `arm`, in this worker's timer tree.
                    unsafe { ngx_del_timer(&mut tick.ev) };
                }
            }
        }
    });
    client::cancel_for(filter.id, generation);
}

/// (Re-)arms `filter`'s tick timer for VM `generation`: `period` from now, or stops it.
fn arm(filter: &FilterRef, generation: u64, period: Option<Duration>) {
    TICKS.with(|t| {
        let Ok(mut t) = t.try_borrow_mut() else {
            return;
        };
        let tick = t.entry(filter.id).or_insert_with(|| {
            // SAFETY: all-zero is a fresh event, as ngx_pcalloc gives one.
            let mut tick = Box::new(Tick {
                ev: unsafe { std::mem::zeroed() },
                filter: filter.clone(),
                generation,
            });
            tick.ev.data = filter.id as *mut c_void;
            tick.ev.handler = Some(tick_handler);
            // SAFETY: the cycle's log lives as long as the worker.
            tick.ev.log = unsafe { (*ngx_cycle).log };
            // Graceful shutdown and reload do not wait for a tick.
            tick.ev.set_cancelable(1);
            tick
        });
        tick.generation = generation;
        // SAFETY: the event lives in a Box that stays in TICKS until exit_process.
        unsafe {
            // Deleted first: ngx_add_timer keeps a timer that is within 300 ms of the
            // new deadline, which would delay a 1 ms wake-up.
            if tick.ev.timer_set() != 0 {
                ngx_del_timer(&mut tick.ev);
            }
            if let Some(p) = period {
                let ms = (p.as_millis() as u64).clamp(1, MAX_TICK_MS);
                ngx_add_timer(&mut tick.ev, ms as _);
            }
        }
    });
}

unsafe extern "C" fn tick_handler(ev: *mut ngx_event_t) {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let id = (*ev).data as usize;
        let Some((filter, generation)) = TICKS.with(|t| {
            t.borrow()
                .get(&id)
                .map(|tick| (tick.filter.clone(), tick.generation))
        }) else {
            return;
        };
        with_live_vm(&filter, generation, true, |vm| vm.tick());
    }));
    if r.is_err() {
        log_to_nginx(
            LogLevel::Error,
            "internal error (panic) in the tick handler",
        );
    }
}

/// Hands a call's outcome to the context that made it, if its VM is still the one that
/// made it: a response (or Envoy's own 503/504), or for a reset no headers at all.
pub(crate) fn deliver(owner: Owner, outcome: Outcome) {
    let response = match outcome {
        Outcome::Response(r) => Some(r),
        Outcome::Reset => None,
    };
    // A request waiting for this stream: the filter may change its headers now.
    let (held, headers) =
        crate::stream::held_request((owner.filter.id, owner.generation, owner.context)).unzip();
    let back = with_live_vm(&owner.filter, owner.generation, false, |vm| {
        vm.http_call_response(owner.context, owner.token, response, headers)
    });
    if let (Some(held), Some(Some((headers, true)))) = (held, back) {
        held.set_headers(headers);
    }
}

/// Runs `f` on `filter`'s VM if it exists and is `generation` (never makes one); a
/// callback that fails drops the VM, as `crate::with_vm` does. `None` when it did not run
/// or failed.
fn with_live_vm<R>(
    filter: &FilterRef,
    generation: u64,
    ticked: bool,
    f: impl FnOnce(&mut PluginVm) -> Result<R, VmError>,
) -> Option<R> {
    let run = VMS.with(|vms| {
        let Ok(mut vms) = vms.try_borrow_mut() else {
            log_to_nginx(LogLevel::Error, "VM busy: root callback skipped");
            return None;
        };
        let vm = vms.get_mut(&filter.id)?;
        if vm.generation() != generation {
            return None;
        }
        match f(vm) {
            Ok(r) => {
                after_callback(filter, vm, ticked);
                Some(Ok((r, vm.take_actions())))
            }
            Err(e) => {
                log_to_nginx(LogLevel::Error, &e.to_string());
                vms.remove(&filter.id);
                Some(Err(()))
            }
        }
    });
    // Outside the VM: what the root context did to paused requests (coalesced waiters
    // answered or resumed from a tick or a call's response) is applied now.
    match run? {
        Ok((r, actions)) => {
            crate::stream::route_actions(filter.id, generation, actions);
            Some(r)
        }
        Err(()) => {
            vm_dropped(filter, generation);
            crate::stream::vm_failed(filter.id, generation);
            None
        }
    }
}
