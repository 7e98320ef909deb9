//! One Proxy-Wasm VM (a Wasmtime instance with its root context) and the callbacks an
//! nginx request drives through it. Host calls are linked by the harness's ABI core.

use crate::host::{HeadersSource, HostState, LogSink, OutgoingCall, StreamAction};
use crate::http1::Response;
use proxy_wasm_harness::abi::{self, AbiVersion, LogLevel, Pairs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use wasmtime::{Engine, Instance, Linker, Module, Store, TypedFunc};

/// Why a module could not be loaded or a VM could not be made or driven.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The .wasm file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Wasmtime refused the module (not Wasm, or invalid).
    #[error("invalid Wasm module {path}: {source:#}")]
    Compile {
        /// The file.
        path: String,
        /// Wasmtime's error.
        source: wasmtime::Error,
    },
    /// The module exports no `proxy_abi_version_*`.
    #[error("{0} is not a Proxy-Wasm module (no proxy_abi_version_* export)")]
    UnknownAbi(String),
    /// Linking or instantiation failed (a missing or mistyped import, say).
    #[error("cannot instantiate: {0:#}")]
    Instantiate(wasmtime::Error),
    /// An export the host needs is missing or has the wrong type.
    #[error("missing or mistyped export {0}")]
    Export(&'static str),
    /// The guest trapped.
    #[error("filter trapped in {callback}: {message}")]
    Trap {
        /// The callback that trapped.
        callback: &'static str,
        /// Wasmtime's description, with the guest backtrace.
        message: String,
    },
    /// `proxy_on_vm_start` returned false.
    #[error("proxy_on_vm_start returned false")]
    VmStartFailed,
    /// `proxy_on_configure` returned false: the filter refused its configuration.
    #[error("the filter refused its configuration (proxy_on_configure returned false)")]
    ConfigureFailed,
}

/// A compiled Proxy-Wasm module, loaded under a name.
#[derive(Clone)]
pub struct Plugin {
    /// The name `proxy_wasm` refers to it by (also its vm_id).
    pub name: String,
    /// The compiled code (cheap to clone).
    pub module: Module,
    /// The ABI version it declares.
    pub abi: AbiVersion,
}

impl Plugin {
    /// Reads and compiles `path` (done once, in the master, at configuration time).
    pub fn load(engine: &Engine, name: &str, path: &str) -> Result<Plugin, VmError> {
        let bytes = std::fs::read(path).map_err(|source| VmError::Read {
            path: path.to_string(),
            source,
        })?;
        let module = Module::new(engine, &bytes).map_err(|source| VmError::Compile {
            path: path.to_string(),
            source,
        })?;
        let abi = module
            .exports()
            .filter_map(|e| AbiVersion::from_export(e.name()))
            .max()
            .ok_or_else(|| VmError::UnknownAbi(path.to_string()))?;
        Ok(Plugin {
            name: name.to_string(),
            module,
            abi,
        })
    }
}

#[derive(Clone)]
enum HeadersFn {
    V1(TypedFunc<(i32, i32), i32>),
    V2(TypedFunc<(i32, i32, i32), i32>),
}

/// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
type CallResponseFn = TypedFunc<(i32, i32, i32, i32, i32), ()>;

struct Exports {
    on_context_create: Option<TypedFunc<(i32, i32), ()>>,
    on_request_headers: Option<HeadersFn>,
    on_response_headers: Option<HeadersFn>,
    on_response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_done: Option<TypedFunc<i32, i32>>,
    on_delete: Option<TypedFunc<i32, ()>>,
    on_tick: Option<TypedFunc<i32, ()>>,
    on_http_call_response: Option<CallResponseFn>,
}

/// Numbers the VMs of a process, so that a timer or a call made for one VM never reaches
/// the VM that replaced it after a trap.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

fn typed<P, R>(
    instance: &Instance,
    store: &mut Store<HostState>,
    name: &'static str,
) -> Result<Option<TypedFunc<P, R>>, VmError>
where
    P: wasmtime::WasmParams,
    R: wasmtime::WasmResults,
{
    abi::typed_export(instance, store, name).map_err(|_| VmError::Export(name))
}

/// What a headers callback decided. Local responses and resumes are stream actions,
/// taken with [`PluginVm::take_actions`].
pub struct HeadersOutcome {
    /// The filter returned `Pause` (StopIteration).
    pub paused: bool,
    /// The headers, given back (changed or not).
    pub headers: Pairs,
    /// Whether the filter changed them.
    pub changed: bool,
}

/// What a body callback decided.
pub struct BodyOutcome {
    /// The filter returned `Pause` (StopIterationAndBuffer): the host keeps the chunk.
    pub paused: bool,
    /// The chunk, given back (changed or not).
    pub body: Vec<u8>,
    /// Whether the filter changed it.
    pub changed: bool,
}

/// Calls `f`; a trap becomes [`VmError::Trap`]. A free function over the store, so that
/// callers can pass a function borrowed from the exports (cloning a TypedFunc clones its
/// type through Wasmtime's type registry, on every call).
fn call<P, R>(
    store: &mut Store<HostState>,
    callback: &'static str,
    f: &TypedFunc<P, R>,
    params: P,
) -> Result<R, VmError>
where
    P: wasmtime::WasmParams,
    R: wasmtime::WasmResults,
{
    f.call(store, params).map_err(|e| VmError::Trap {
        callback,
        message: format!("{e:?}"),
    })
}

/// One VM with its root context configured.
pub struct PluginVm {
    store: Store<HostState>,
    exports: Exports,
    next_context: u32,
    generation: u64,
}

impl PluginVm {
    /// Instantiates `plugin`, runs `_initialize`, creates the root context and runs
    /// `on_vm_start` and `on_configure` with `config`.
    pub fn new(
        engine: &Engine,
        plugin: &Plugin,
        config: &[u8],
        log: LogSink,
        log_level: LogLevel,
    ) -> Result<PluginVm, VmError> {
        let mut linker = Linker::new(engine);
        abi::add_to_linker(&mut linker, plugin.abi).map_err(VmError::Instantiate)?;
        let mut store = Store::new(engine, HostState::new(&plugin.name, log, log_level));
        let instance = linker
            .instantiate(&mut store, &plugin.module)
            .map_err(VmError::Instantiate)?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or(VmError::Export("memory"))?;
        let alloc = match typed::<i32, i32>(&instance, &mut store, "malloc")? {
            Some(f) => f,
            None => typed::<i32, i32>(&instance, &mut store, "proxy_on_memory_allocate")?
                .ok_or(VmError::Export("proxy_on_memory_allocate"))?,
        };
        store.data_mut().abi_mut().bind(memory, alloc);
        let on_request_headers = if plugin.abi == AbiVersion::V0_1_0 {
            typed(&instance, &mut store, "proxy_on_request_headers")?.map(HeadersFn::V1)
        } else {
            typed(&instance, &mut store, "proxy_on_request_headers")?.map(HeadersFn::V2)
        };
        let on_response_headers = if plugin.abi == AbiVersion::V0_1_0 {
            typed(&instance, &mut store, "proxy_on_response_headers")?.map(HeadersFn::V1)
        } else {
            typed(&instance, &mut store, "proxy_on_response_headers")?.map(HeadersFn::V2)
        };
        let exports = Exports {
            on_context_create: typed(&instance, &mut store, "proxy_on_context_create")?,
            on_request_headers,
            on_response_headers,
            on_response_body: typed(&instance, &mut store, "proxy_on_response_body")?,
            on_log: typed(&instance, &mut store, "proxy_on_log")?,
            on_done: typed(&instance, &mut store, "proxy_on_done")?,
            on_delete: typed(&instance, &mut store, "proxy_on_delete")?,
            on_tick: typed(&instance, &mut store, "proxy_on_tick")?,
            on_http_call_response: typed(&instance, &mut store, "proxy_on_http_call_response")?,
        };
        let init = match typed::<(), ()>(&instance, &mut store, "_initialize")? {
            Some(f) => Some(f),
            None => typed::<(), ()>(&instance, &mut store, "_start")?,
        };
        let on_vm_start = typed::<(i32, i32), i32>(&instance, &mut store, "proxy_on_vm_start")?;
        let on_configure = typed::<(i32, i32), i32>(&instance, &mut store, "proxy_on_configure")?;
        let mut vm = PluginVm {
            store,
            exports,
            next_context: 2,
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
        };
        if let Some(f) = init {
            call(&mut vm.store, "_initialize", &f, ())?;
        }
        if let Some(f) = vm.exports.on_context_create.clone() {
            call(&mut vm.store, "proxy_on_context_create", &f, (1, 0))?;
        }
        if let Some(f) = on_vm_start {
            if call(&mut vm.store, "proxy_on_vm_start", &f, (1, 0))? == 0 {
                return Err(VmError::VmStartFailed);
            }
        }
        if let Some(f) = on_configure {
            vm.store.data_mut().plugin_config = Some(config.to_vec());
            let r = call(
                &mut vm.store,
                "proxy_on_configure",
                &f,
                (1, config.len() as i32),
            );
            vm.store.data_mut().plugin_config = None;
            if r? == 0 {
                return Err(VmError::ConfigureFailed);
            }
        }
        Ok(vm)
    }

    /// Creates an HTTP stream context under the root context.
    pub fn create_stream(&mut self) -> Result<u32, VmError> {
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(2);
        let data = self.store.data_mut();
        data.streams.insert(id);
        data.effective = id;
        if let Some(f) = &self.exports.on_context_create {
            call(
                &mut self.store,
                "proxy_on_context_create",
                f,
                (id as i32, 1),
            )?;
        }
        Ok(id)
    }

    /// Runs `on_request_headers` for stream `id` with `headers` (pseudo-headers first).
    pub fn request_headers(
        &mut self,
        id: u32,
        headers: Pairs,
        end_of_stream: bool,
    ) -> Result<HeadersOutcome, VmError> {
        let n = headers.len() as i32;
        {
            let d = self.store.data_mut();
            d.effective = id;
            d.request_headers = Some(headers);
            d.request_headers_dirty = false;
        }
        let cb = "proxy_on_request_headers";
        let action = match &self.exports.on_request_headers {
            None => Ok(0),
            Some(HeadersFn::V1(f)) => call(&mut self.store, cb, f, (id as i32, n)),
            Some(HeadersFn::V2(f)) => call(
                &mut self.store,
                cb,
                f,
                (id as i32, n, i32::from(end_of_stream)),
            ),
        };
        let d = self.store.data_mut();
        let headers = d.request_headers.take();
        let changed = std::mem::take(&mut d.request_headers_dirty);
        let action = action?;
        Ok(HeadersOutcome {
            paused: action != 0,
            headers: headers.unwrap_or_default(),
            changed,
        })
    }

    /// Runs `on_response_headers` for stream `id` with the response's `count` headers
    /// (`:status` first) and `status`; `headers` are read only if the filter touches
    /// them. The outcome's headers are the filter's (empty when it changed nothing).
    pub fn response_headers(
        &mut self,
        id: u32,
        headers: HeadersSource,
        count: usize,
        status: u32,
        end_of_stream: bool,
    ) -> Result<HeadersOutcome, VmError> {
        if !self.store.data().streams.contains(&id) {
            return Ok(HeadersOutcome {
                paused: false,
                headers: Pairs::new(),
                changed: false,
            });
        }
        let n = count as i32;
        {
            let d = self.store.data_mut();
            d.effective = id;
            d.response_headers = None;
            d.response_headers_source = Some(headers);
            d.response_headers_dirty = false;
            d.response_code = Some(status);
        }
        let cb = "proxy_on_response_headers";
        let r = match &self.exports.on_response_headers {
            None => Ok(0),
            Some(HeadersFn::V1(f)) => call(&mut self.store, cb, f, (id as i32, n)),
            Some(HeadersFn::V2(f)) => call(
                &mut self.store,
                cb,
                f,
                (id as i32, n, i32::from(end_of_stream)),
            ),
        };
        let d = self.store.data_mut();
        // The source is only valid during the callback.
        d.response_headers_source = None;
        let headers = d.response_headers.take().unwrap_or_default();
        let changed = std::mem::take(&mut d.response_headers_dirty);
        let action = r?;
        Ok(HeadersOutcome {
            paused: action != 0,
            headers,
            changed,
        })
    }

    /// The stream actions the filter queued during the last callback(s).
    pub fn take_actions(&mut self) -> Vec<(u32, StreamAction)> {
        std::mem::take(&mut self.store.data_mut().actions)
    }

    /// Runs `on_response_body` for stream `id` with `body`: the chunk as it streams, or
    /// everything buffered since the filter last paused (Envoy's buffering rule).
    pub fn response_body(
        &mut self,
        id: u32,
        body: Vec<u8>,
        end_of_stream: bool,
    ) -> Result<BodyOutcome, VmError> {
        let len = body.len();
        if !self.store.data().streams.contains(&id) || self.exports.on_response_body.is_none() {
            return Ok(BodyOutcome {
                paused: false,
                body,
                changed: false,
            });
        }
        {
            let d = self.store.data_mut();
            d.effective = id;
            d.body_dirty = false;
            d.body = Some((proxy_wasm_harness::abi::BufferType::HttpResponseBody, body));
        }
        let f = self
            .exports
            .on_response_body
            .as_ref()
            .expect("checked above");
        let r = call(
            &mut self.store,
            "proxy_on_response_body",
            f,
            (id as i32, len as i32, i32::from(end_of_stream)),
        );
        let d = self.store.data_mut();
        let body = d.body.take().map(|(_, b)| b).unwrap_or_default();
        let changed = std::mem::take(&mut d.body_dirty);
        let action = r?;
        Ok(BodyOutcome {
            paused: action != 0 && !end_of_stream,
            body,
            changed,
        })
    }

    /// Ends stream `id`: `on_log`, `on_done`, `on_delete`.
    pub fn finish(&mut self, id: u32) -> Result<(), VmError> {
        if !self.store.data().streams.contains(&id) {
            return Ok(());
        }
        self.store.data_mut().effective = id;
        let r = (|| {
            if let Some(f) = &self.exports.on_log {
                call(&mut self.store, "proxy_on_log", f, id as i32)?;
            }
            if let Some(f) = &self.exports.on_done {
                call(&mut self.store, "proxy_on_done", f, id as i32)?;
            }
            if let Some(f) = &self.exports.on_delete {
                call(&mut self.store, "proxy_on_delete", f, id as i32)?;
            }
            Ok(())
        })();
        let d = self.store.data_mut();
        d.streams.remove(&id);
        d.subrequest_streams.remove(&id);
        d.properties.clear();
        d.effective = d.root;
        r
    }
}

/// The root context's side: ticks and `http_call` answers, and what the embedder applies
/// after each callback (the tick period, the calls to start).
impl PluginVm {
    /// This VM's number in the process (see [`NEXT_GENERATION`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The tick period, if the filter changed it since the last call (`Some(None)`: ticks
    /// stopped).
    pub fn take_tick_change(&mut self) -> Option<Option<Duration>> {
        let d = self.store.data_mut();
        std::mem::take(&mut d.tick_changed).then_some(d.tick_period)
    }

    /// The current tick period.
    pub fn tick_period(&self) -> Option<Duration> {
        self.store.data().tick_period
    }

    /// The calls the filter made since the last call, to start now.
    pub fn take_calls(&mut self) -> Vec<OutgoingCall> {
        std::mem::take(&mut self.store.data_mut().outgoing)
    }

    /// Sends the in-request calls of stream `id` as nginx subrequests from now on (its
    /// request's location has a `proxy_wasm_call_location`).
    pub fn route_calls_through_subrequests(&mut self, id: u32) {
        self.store
            .data_mut()
            .subrequest_streams
            .insert(id, Default::default());
    }

    /// A subrequest call of `context` ended without reaching the guest (it could not
    /// start, or its request ended): it no longer counts as in flight.
    pub fn subrequest_call_ended(&mut self, context: u32) {
        if let Some(b) = self.store.data_mut().subrequest_streams.get_mut(&context) {
            b.in_flight = b.in_flight.saturating_sub(1);
        }
    }

    /// Runs `proxy_on_tick` on the root context.
    pub fn tick(&mut self) -> Result<(), VmError> {
        let Some(f) = self.exports.on_tick.clone() else {
            return Ok(());
        };
        let root = {
            let d = self.store.data_mut();
            d.effective = d.root;
            d.root
        };
        call(&mut self.store, "proxy_on_tick", &f, root as i32)
    }

    /// Runs `proxy_on_http_call_response` for call `token` of `context`, with the
    /// response (headers map 6, body buffer 4, trailers map 7) or, for a failed call, none:
    /// zero headers and `BrokenConnection`/`reset` from `proxy_get_status`, as Envoy does.
    /// `request_headers` are those of the stream's request while it waits for the filter
    /// (paused in its request headers): readable and changeable during the callback, as
    /// in Envoy, and given back with whether they changed. No callback when `context` is
    /// gone (a stream that ended: Envoy cancels its calls).
    pub fn http_call_response(
        &mut self,
        context: u32,
        token: u32,
        response: Option<Response>,
        request_headers: Option<Pairs>,
    ) -> Result<Option<(Pairs, bool)>, VmError> {
        self.subrequest_call_ended(context);
        let Some(f) = self.exports.on_http_call_response.clone() else {
            return Ok(None);
        };
        let (nh, nb, nt) = response.as_ref().map_or((0, 0, 0), |r| {
            (r.headers.len(), r.body.len(), r.trailers.len())
        });
        {
            let d = self.store.data_mut();
            if context != d.root && !d.streams.contains(&context) {
                return Ok(None);
            }
            d.effective = context;
            d.request_headers = request_headers;
            d.request_headers_dirty = false;
            d.status = if response.is_some() {
                (0, Vec::new())
            } else {
                (
                    proxy_wasm_harness::abi::Status::BrokenConnection as u32,
                    b"reset".to_vec(),
                )
            };
            d.call_response = response;
        }
        let r = call(
            &mut self.store,
            "proxy_on_http_call_response",
            &f,
            (
                context as i32,
                token as i32,
                nh as i32,
                nb as i32,
                nt as i32,
            ),
        );
        let d = self.store.data_mut();
        d.call_response = None;
        d.status = (0, Vec::new());
        d.effective = d.root;
        let headers = d.request_headers.take();
        let changed = std::mem::take(&mut d.request_headers_dirty);
        r.map(|()| headers.map(|h| (h, changed)))
    }
}
