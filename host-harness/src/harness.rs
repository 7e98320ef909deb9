//! The harness: a compiled module, the host state its VMs share (shared data, queues,
//! metrics, logs, the virtual clock, scripted upstreams), and the builder that sets it up.

use crate::abi::http_call::HttpCallRequest;
use crate::abi::metrics::{MetricStore, MetricValue};
use crate::abi::queues::{QueueOwner, QueueStore};
use crate::abi::shared_data::{CasMode, SharedDataStore};
use crate::abi::{self, AbiVersion, HostResult, LogLevel};
use crate::error::Error;
use crate::vm::{Vm, VmData};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wasmtime::{Config, Engine, Linker, Module};

/// Header lists as tests write them: ordered `(name, value)` pairs.
pub type Headers = Vec<(String, String)>;

/// Builds `Headers` from string pairs.
pub fn headers(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Envoy's `failure_policy`: what a stream gets once its VM has trapped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailurePolicy {
    /// The stream fails with a 503 local reply (details `wasm_fail_stream`); Envoy's default.
    #[default]
    FailClosed,
    /// The filter is skipped; traffic passes as if it were not there.
    FailOpen,
}

/// The response to an `http_call`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpCallResponse {
    /// Headers, `:status` included.
    pub headers: Headers,
    /// Body (buffer type 4).
    pub body: Vec<u8>,
    /// Trailers.
    pub trailers: Headers,
}

impl HttpCallResponse {
    /// A response with `status` and `body`.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> HttpCallResponse {
        HttpCallResponse {
            headers: vec![(":status".into(), status.to_string())],
            body: body.into(),
            trailers: Vec::new(),
        }
    }
}

/// How a scripted cluster answers one `http_call`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallReply {
    /// Answer with `response` after `delay` of virtual time.
    Respond {
        /// The response.
        response: HttpCallResponse,
        /// Virtual time until it arrives.
        delay: Duration,
    },
    /// The connection fails after `delay` (`on_http_call_response` with no headers; the
    /// status reads `BrokenConnection`, message `reset`).
    Fail {
        /// Virtual time until the failure.
        delay: Duration,
    },
    /// Never answer (the call's timeout, if any, still fires).
    Never,
}

impl CallReply {
    /// An immediate (next dispatch) response.
    pub fn now(response: HttpCallResponse) -> CallReply {
        CallReply::Respond {
            response,
            delay: Duration::ZERO,
        }
    }
}

/// A scripted cluster: decides every `http_call` to it.
pub type ClusterHandler = Arc<dyn Fn(&HttpCallRequest) -> CallReply + Send + Sync>;

/// A foreign function the guest can call by name.
pub type ForeignFunction = Arc<dyn Fn(&[u8]) -> HostResult<Vec<u8>> + Send + Sync>;

/// One log line from a guest.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LogEntry {
    /// The VM that logged it.
    pub vm: u64,
    /// The context it was logged for.
    pub context_id: u32,
    /// Level.
    pub level: LogLevel,
    /// The message.
    pub message: String,
}

/// An `http_call` as the scripted cluster saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedCall {
    /// The VM that made it.
    pub vm: u64,
    /// Its token.
    pub token: u32,
    /// The call.
    pub request: HttpCallRequest,
}

/// The virtual clock every VM of a harness reads. Time moves only when a test moves it.
pub struct Clock {
    start: SystemTime,
    elapsed: Mutex<Duration>,
}

impl Clock {
    fn new(start: SystemTime) -> Clock {
        Clock {
            start,
            elapsed: Mutex::new(Duration::ZERO),
        }
    }

    /// Virtual time since the harness was built.
    pub fn elapsed(&self) -> Duration {
        *self.elapsed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The virtual wall-clock time.
    pub fn now(&self) -> SystemTime {
        self.start + self.elapsed()
    }

    pub(crate) fn set_elapsed(&self, d: Duration) {
        let mut e = self.elapsed.lock().unwrap_or_else(|e| e.into_inner());
        if d > *e {
            *e = d;
        }
    }

    pub(crate) fn now_nanos(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }
}

/// Host state shared by every VM of a harness (Envoy: by every worker's VM of one `vm_id`).
pub struct Shared {
    /// Shared data.
    pub shared_data: SharedDataStore,
    /// Shared queues.
    pub queues: QueueStore,
    /// Metric values.
    pub metrics: MetricStore,
    /// The virtual clock.
    pub clock: Clock,
    logs: Mutex<Vec<LogEntry>>,
    calls: Mutex<Vec<RecordedCall>>,
    notifications: Mutex<Vec<(QueueOwner, u32)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn push_log(&self, e: LogEntry) {
        lock(&self.logs).push(e);
    }

    pub(crate) fn record_call(&self, c: RecordedCall) {
        lock(&self.calls).push(c);
    }

    pub(crate) fn notify(&self, owner: QueueOwner, token: u32) {
        lock(&self.notifications).push((owner, token));
    }

    pub(crate) fn take_notifications(&self, vm: u64) -> Vec<(QueueOwner, u32)> {
        let mut all = lock(&self.notifications);
        let (mine, rest): (Vec<_>, Vec<_>) = all.drain(..).partition(|(o, _)| o.vm == vm);
        *all = rest;
        mine
    }

    /// Every log line so far, from every VM.
    pub fn logs(&self) -> Vec<LogEntry> {
        lock(&self.logs).clone()
    }

    /// Every `http_call` made so far, from every VM.
    pub fn calls(&self) -> Vec<RecordedCall> {
        lock(&self.calls).clone()
    }
}

/// Settings every VM of a harness uses.
pub(crate) struct Settings {
    pub abi: AbiVersion,
    pub vm_id: String,
    pub root_id: String,
    pub plugin_name: String,
    pub plugin_config: Vec<u8>,
    pub vm_config: Vec<u8>,
    pub failure_policy: FailurePolicy,
    pub fuel: Option<u64>,
    pub call_timeout: Option<Duration>,
    pub memory_limit: usize,
    pub log_level: LogLevel,
    pub properties: HashMap<Vec<u8>, Vec<u8>>,
    pub foreign: HashMap<String, ForeignFunction>,
    pub clusters: HashMap<String, ClusterHandler>,
    pub environ: Vec<(String, String)>,
    pub buffer_limit: usize,
    pub seed: u64,
}

/// Sets up a [`Harness`].
pub struct HarnessBuilder {
    wasm: Result<Vec<u8>, Error>,
    settings: Settings,
    cas_mode: CasMode,
    start_time: SystemTime,
}

/// Envoy's default per-stream buffer limit (`per_connection_buffer_limit_bytes`, 1 MiB).
pub const DEFAULT_BUFFER_LIMIT: usize = 1024 * 1024;

impl HarnessBuilder {
    fn new(wasm: Result<Vec<u8>, Error>) -> HarnessBuilder {
        HarnessBuilder {
            wasm,
            settings: Settings {
                abi: AbiVersion::V0_2_1,
                vm_id: String::new(),
                root_id: String::new(),
                plugin_name: String::new(),
                plugin_config: Vec::new(),
                vm_config: Vec::new(),
                failure_policy: FailurePolicy::FailClosed,
                fuel: None,
                call_timeout: None,
                memory_limit: abi::limits::MAX_MEMORY_BYTES,
                log_level: LogLevel::Info,
                properties: HashMap::new(),
                foreign: HashMap::new(),
                clusters: HashMap::new(),
                environ: Vec::new(),
                buffer_limit: DEFAULT_BUFFER_LIMIT,
                seed: 0x5eed,
            },
            cas_mode: CasMode::Envoy,
            // A fixed start makes runs reproducible: 2026-01-01T00:00:00Z.
            start_time: UNIX_EPOCH + Duration::from_secs(1_767_225_600),
        }
    }

    /// The plugin configuration (`on_configure` reads it as buffer type 7).
    pub fn plugin_config(mut self, config: impl Into<Vec<u8>>) -> Self {
        self.settings.plugin_config = config.into();
        self
    }

    /// The VM configuration (`on_vm_start` reads it as buffer type 6).
    pub fn vm_config(mut self, config: impl Into<Vec<u8>>) -> Self {
        self.settings.vm_config = config.into();
        self
    }

    /// The `vm_id` (shared data and queues are per `vm_id`).
    pub fn vm_id(mut self, id: &str) -> Self {
        self.settings.vm_id = id.to_string();
        self
    }

    /// The root id (property `plugin_root_id`).
    pub fn root_id(mut self, id: &str) -> Self {
        self.settings.root_id = id.to_string();
        self
    }

    /// The plugin name (property `plugin_name`).
    pub fn plugin_name(mut self, name: &str) -> Self {
        self.settings.plugin_name = name.to_string();
        self
    }

    /// What streams get after a trap.
    pub fn failure_policy(mut self, p: FailurePolicy) -> Self {
        self.settings.failure_policy = p;
        self
    }

    /// Fuel for each guest call (each callback starts with this much); runaway guests trap
    /// with [`crate::TrapKind::FuelExhausted`].
    pub fn fuel(mut self, fuel: u64) -> Self {
        self.settings.fuel = Some(fuel);
        self
    }

    /// Wall-clock budget for each guest call (epoch interruption); runaway guests trap with
    /// [`crate::TrapKind::Timeout`].
    pub fn call_timeout(mut self, t: Duration) -> Self {
        self.settings.call_timeout = Some(t);
        self
    }

    /// Largest linear memory a VM may have (default and maximum 1 GiB, as Envoy).
    pub fn memory_limit(mut self, bytes: usize) -> Self {
        self.settings.memory_limit = bytes.min(abi::limits::MAX_MEMORY_BYTES);
        self
    }

    /// Shared-data CAS rules (default Envoy's).
    pub fn cas_mode(mut self, mode: CasMode) -> Self {
        self.cas_mode = mode;
        self
    }

    /// The host log level (default info, as Envoy's default); lower lines are dropped.
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.settings.log_level = level;
        self
    }

    /// Sets a property; `path` segments as in `proxy_get_property` (e.g. `["node", "id"]`).
    pub fn property(mut self, path: &[&str], value: impl Into<Vec<u8>>) -> Self {
        self.settings
            .properties
            .insert(path.join("\0").into_bytes(), value.into());
        self
    }

    /// Registers a foreign function.
    pub fn foreign_function(
        mut self,
        name: &str,
        f: impl Fn(&[u8]) -> HostResult<Vec<u8>> + Send + Sync + 'static,
    ) -> Self {
        self.settings.foreign.insert(name.to_string(), Arc::new(f));
        self
    }

    /// Registers a cluster that `http_call` can reach, answered by `handler`. Calls to
    /// clusters that are not registered fail with `BadArgument`, as in Envoy.
    pub fn cluster(
        mut self,
        name: &str,
        handler: impl Fn(&HttpCallRequest) -> CallReply + Send + Sync + 'static,
    ) -> Self {
        self.settings
            .clusters
            .insert(name.to_string(), Arc::new(handler));
        self
    }

    /// Environment variables for WASI `environ_get`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.settings.environ.push((key.into(), value.into()));
        self
    }

    /// Per-stream body buffer limit (default 1 MiB, Envoy's).
    pub fn buffer_limit(mut self, bytes: usize) -> Self {
        self.settings.buffer_limit = bytes;
        self
    }

    /// Seed of the deterministic `random_get`.
    pub fn seed(mut self, seed: u64) -> Self {
        self.settings.seed = seed;
        self
    }

    /// Wall-clock time at virtual time zero.
    pub fn start_time(mut self, t: SystemTime) -> Self {
        self.start_time = t;
        self
    }

    /// Compiles the module, checks its ABI and exports, and links the host calls.
    pub fn build(mut self) -> Result<Harness, Error> {
        let wasm = self.wasm?;
        let (engine, module) = compile(
            &wasm,
            self.settings.fuel.is_some(),
            self.settings.call_timeout.is_some(),
            self.settings.memory_limit,
        )?;
        self.settings.abi = detect_abi(&module)?;
        Harness::assemble(
            engine,
            module,
            self.settings,
            self.cas_mode,
            self.start_time,
        )
    }
}

fn engine_config(fuel: bool, epoch: bool, memory_limit: usize) -> Config {
    let mut config = Config::new();
    config.wasm_backtrace_max_frames(std::num::NonZeroUsize::new(
        abi::limits::MAX_BACKTRACE_FRAMES,
    ));
    config.consume_fuel(fuel);
    config.epoch_interruption(epoch);
    // Reserve only what the limit allows, so many VMs fit in a test process.
    config.memory_reservation(memory_limit as u64);
    config
}

type CacheKey = (u64, usize, bool, usize);

/// Compiled modules by content and engine settings. Compiled code is immutable, so
/// sharing it between harnesses shares no host state; it saves recompiling the same
/// module in every test (Cranelift in a debug build takes seconds for a 400 KB filter).
/// Harnesses with a call timeout get their own engine: its epoch ticker is theirs.
fn compile(
    wasm: &[u8],
    fuel: bool,
    epoch: bool,
    memory_limit: usize,
) -> Result<(Engine, Module), Error> {
    use std::hash::{Hash, Hasher};
    static CACHE: std::sync::OnceLock<Mutex<HashMap<CacheKey, (Engine, Module)>>> =
        std::sync::OnceLock::new();
    let fresh = || -> Result<(Engine, Module), Error> {
        let engine =
            Engine::new(&engine_config(fuel, epoch, memory_limit)).map_err(Error::Engine)?;
        let module = Module::new(&engine, wasm).map_err(Error::Compile)?;
        Ok((engine, module))
    };
    if epoch {
        return fresh();
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    wasm.hash(&mut h);
    let key = (h.finish(), wasm.len(), fuel, memory_limit);
    // Held while compiling, so parallel tests wait for one compilation instead of
    // running the same one side by side.
    let mut cache = lock(CACHE.get_or_init(|| Mutex::new(HashMap::new())));
    if let Some(hit) = cache.get(&key) {
        return Ok(hit.clone());
    }
    let built = fresh()?;
    cache.insert(key, built.clone());
    Ok(built)
}

/// The ABI a module declares (`proxy_abi_version_*` exports; the newest wins).
pub fn detect_abi(module: &Module) -> Result<AbiVersion, Error> {
    module
        .exports()
        .filter_map(|e| AbiVersion::from_export(e.name()))
        .max()
        .ok_or(Error::UnknownAbi)
}

/// A loaded module and the host state of its VMs. Cheap to share: VMs hold an `Arc` of it.
pub struct Harness {
    pub(crate) engine: Engine,
    pub(crate) module: Module,
    pub(crate) linker: Linker<VmData>,
    pub(crate) settings: Arc<Settings>,
    pub(crate) shared: Arc<Shared>,
    next_vm: AtomicU64,
    ticker: Option<Arc<AtomicBool>>,
}

impl Harness {
    /// A builder for the module in file `path`.
    pub fn from_file(path: impl AsRef<Path>) -> HarnessBuilder {
        let p = path.as_ref();
        HarnessBuilder::new(std::fs::read(p).map_err(|e| Error::Read {
            path: p.display().to_string(),
            source: e,
        }))
    }

    /// A builder for a module given as bytes (binary; with the `wat` crate tests can
    /// write text).
    pub fn from_bytes(wasm: impl Into<Vec<u8>>) -> HarnessBuilder {
        HarnessBuilder::new(Ok(wasm.into()))
    }

    fn assemble(
        engine: Engine,
        module: Module,
        settings: Settings,
        cas_mode: CasMode,
        start: SystemTime,
    ) -> Result<Harness, Error> {
        let mut linker = Linker::new(&engine);
        abi::add_to_linker(&mut linker, settings.abi).map_err(Error::Engine)?;
        let ticker = settings.call_timeout.map(|t| start_ticker(&engine, t));
        Ok(Harness {
            engine,
            module,
            linker,
            settings: Arc::new(settings),
            shared: Arc::new(Shared {
                shared_data: SharedDataStore::new(cas_mode),
                queues: QueueStore::default(),
                metrics: MetricStore::default(),
                clock: Clock::new(start),
                logs: Mutex::new(Vec::new()),
                calls: Mutex::new(Vec::new()),
                notifications: Mutex::new(Vec::new()),
            }),
            next_vm: AtomicU64::new(1),
            ticker,
        })
    }

    /// The ABI version the module declares.
    pub fn abi_version(&self) -> AbiVersion {
        self.settings.abi
    }

    /// Starts a new VM (Envoy: one per worker thread): instantiates the module, runs
    /// `_initialize` or `_start`, creates the root context, then `on_vm_start` and
    /// `on_configure`.
    pub fn new_vm(&self) -> Result<Vm, Error> {
        let n = self.next_vm.fetch_add(1, Ordering::SeqCst);
        Vm::start(self, n)
    }

    /// The host state all VMs share.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Every log line so far, from every VM.
    pub fn logs(&self) -> Vec<LogEntry> {
        self.shared.logs()
    }

    /// Every metric by name.
    pub fn metrics(&self) -> Vec<(String, MetricValue)> {
        self.shared.metrics.snapshot()
    }

    /// The value of metric `name` (counter, gauge, or a histogram's sample count).
    pub fn metric(&self, name: &str) -> Option<u64> {
        self.shared.metrics.value(name)
    }

    /// The value of shared-data `key` in this harness's `vm_id`.
    pub fn shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared.shared_data.get(&self.settings.vm_id, key).ok()
    }

    /// Virtual time since the harness was built.
    pub fn elapsed(&self) -> Duration {
        self.shared.clock.elapsed()
    }

    /// The engine (e.g. to precompile modules).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(alive) = &self.ticker {
            alive.store(false, Ordering::SeqCst);
        }
    }
}

/// Epoch ticks for call timeouts: a guest call may run for `EPOCH_SLICES` ticks of
/// `timeout / EPOCH_SLICES`, so it is stopped between 3/4 of its budget and the budget.
pub(crate) const EPOCH_SLICES: u64 = 4;

fn start_ticker(engine: &Engine, timeout: Duration) -> Arc<AtomicBool> {
    let alive = Arc::new(AtomicBool::new(true));
    let (engine, flag) = (engine.clone(), alive.clone());
    let slice = (timeout / EPOCH_SLICES as u32).max(Duration::from_millis(1));
    std::thread::spawn(move || {
        while flag.load(Ordering::SeqCst) {
            std::thread::sleep(slice);
            engine.increment_epoch();
        }
    });
    alive
}

// Foreign functions are looked up by the VM through the settings.
impl Settings {
    pub(crate) fn foreign(&self, name: &str) -> Option<ForeignFunction> {
        self.foreign.get(name).cloned()
    }
}
