//! The host state of one Proxy-Wasm VM inside an nginx worker: what the harness's ABI
//! core ([`proxy_wasm_harness::abi`]) calls into. Only nginx-specific state lives here;
//! reading and writing guest memory, statuses and limits are the core's.

use proxy_wasm_harness::abi::{
    buffers::{envoy_copy_from, BufferHost},
    clock::ClockHost,
    context::ContextHost,
    foreign::ForeignHost,
    grpc::GrpcHost,
    headers::HeaderHost,
    http_call::{HttpCallHost, HttpCallRequest},
    logging::LoggingHost,
    metrics::{MetricHost, MetricIds, MetricStore},
    properties::PropertyHost,
    queues::{QueueHost, QueueOwner, QueueStore},
    shared_data::{CasMode, SharedDataHost, SharedDataStore},
    stream::{LocalResponse, StreamHost},
    wasi::WasiHost,
    AbiState, AbiView, BufferType, HostResult, LogLevel, MapType, MetricType, Pairs, Status,
    StreamType,
};
use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Stores of this process. In workers, shared data and metrics live in the shared-memory
/// zones ([`crate::shm`]), seen by all workers; these stores hold them only where no zone
/// is in use (the VM that checks a configuration in the master or in `nginx -t`), and
/// metrics the zone refused. Shared queues stay per worker.
pub struct ProcessStores {
    /// Shared data, Envoy's CAS rules.
    pub shared_data: SharedDataStore,
    /// Shared queues.
    pub queues: QueueStore,
    /// Metric values by name.
    pub metrics: MetricStore,
}

/// The process-wide stores (one nginx worker is one process).
pub fn stores() -> &'static ProcessStores {
    static S: OnceLock<ProcessStores> = OnceLock::new();
    S.get_or_init(|| ProcessStores {
        shared_data: SharedDataStore::new(CasMode::Envoy),
        queues: QueueStore::default(),
        metrics: MetricStore::default(),
    })
}

fn monotonic_base() -> Instant {
    static B: OnceLock<Instant> = OnceLock::new();
    *B.get_or_init(Instant::now)
}

/// A guest log line, handed to nginx's error log by the embedder.
pub type LogSink = fn(LogLevel, &str);

/// The per-VM host state (a Wasmtime store's data).
pub struct HostState {
    abi: AbiState,
    /// The vm_id shared data and queues are keyed by (the module's name).
    pub vm_id: String,
    /// The plugin configuration, readable only while `on_configure` runs.
    pub plugin_config: Option<Vec<u8>>,
    /// The root context id.
    pub root: u32,
    /// Live stream contexts (for `set_effective_context`).
    pub streams: HashSet<u32>,
    /// The context host calls act on.
    pub effective: u32,
    /// Request headers, available while their callback runs.
    pub request_headers: Option<Pairs>,
    /// Set when the filter changed the request headers.
    pub request_headers_dirty: bool,
    /// Response headers, available while their callback runs.
    pub response_headers: Option<Pairs>,
    /// The current body chunk, while a body callback runs.
    pub body: Option<(BufferType, Vec<u8>)>,
    /// A local response the filter asked for during the current callback.
    pub local_response: Option<LocalResponse>,
    /// Properties set by the filter for the current stream.
    pub properties: Vec<(Vec<u8>, Vec<u8>)>,
    /// The tick period the root context asked for.
    pub tick_period: Option<Duration>,
    metric_ids: MetricIds,
    log: LogSink,
    log_level: LogLevel,
    rng: u64,
    done_pending: bool,
}

impl HostState {
    /// A fresh state for a VM with this `vm_id`.
    pub fn new(vm_id: &str, log: LogSink, log_level: LogLevel) -> HostState {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        HostState {
            abi: AbiState::default(),
            vm_id: vm_id.to_string(),
            plugin_config: None,
            root: 1,
            streams: HashSet::new(),
            effective: 1,
            request_headers: None,
            request_headers_dirty: false,
            response_headers: None,
            body: None,
            local_response: None,
            properties: Vec::new(),
            tick_period: None,
            metric_ids: MetricIds::default(),
            log,
            log_level,
            rng: seed | 1,
            done_pending: false,
        }
    }

    /// The core's state, to bind memory and allocator after instantiation.
    pub fn abi_mut(&mut self) -> &mut AbiState {
        &mut self.abi
    }

    fn map(&mut self, t: MapType) -> HostResult<&mut Pairs> {
        match t {
            MapType::HttpRequestHeaders => self.request_headers.as_mut(),
            MapType::HttpResponseHeaders => self.response_headers.as_mut(),
            _ => None,
        }
        .ok_or(Status::BadArgument)
    }

    fn touched(&mut self, t: MapType) {
        if t == MapType::HttpRequestHeaders {
            self.request_headers_dirty = true;
        }
    }

    fn header_value(&self, name: &str) -> Option<Vec<u8>> {
        self.request_headers
            .as_ref()?
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.clone())
    }
}

impl AbiView for HostState {
    fn abi(&self) -> &AbiState {
        &self.abi
    }
}

impl LoggingHost for HostState {
    fn log(&mut self, level: LogLevel, message: &str) -> HostResult<()> {
        if level >= self.log_level {
            (self.log)(level, message);
        }
        Ok(())
    }
    fn log_level(&mut self) -> HostResult<LogLevel> {
        Ok(self.log_level)
    }
}

impl ClockHost for HostState {
    fn now_nanos(&mut self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }
    fn monotonic_nanos(&mut self) -> u64 {
        monotonic_base().elapsed().as_nanos() as u64
    }
    fn set_tick_period(&mut self, period: Duration) -> HostResult<()> {
        // TODO(issue 5): drive on_tick from an nginx timer.
        self.tick_period = (!period.is_zero()).then_some(period);
        Ok(())
    }
}

impl BufferHost for HostState {
    fn buffer_len(&mut self, t: BufferType) -> HostResult<usize> {
        match t {
            BufferType::PluginConfiguration => self
                .plugin_config
                .as_ref()
                .map(Vec::len)
                .ok_or(Status::NotFound),
            BufferType::VmConfiguration => Ok(0),
            BufferType::HttpRequestBody | BufferType::HttpResponseBody => Ok(self
                .body
                .as_ref()
                .filter(|(bt, _)| *bt == t)
                .map_or(0, |(_, b)| b.len())),
            _ => Err(Status::NotFound),
        }
    }

    fn buffer_read(&mut self, t: BufferType, start: usize, len: usize) -> HostResult<Vec<u8>> {
        let b: &[u8] = match t {
            BufferType::PluginConfiguration => {
                self.plugin_config.as_deref().ok_or(Status::NotFound)?
            }
            BufferType::VmConfiguration => &[],
            BufferType::HttpRequestBody | BufferType::HttpResponseBody => self
                .body
                .as_ref()
                .filter(|(bt, _)| *bt == t)
                .map_or(&[][..], |(_, b)| b.as_slice()),
            _ => return Err(Status::NotFound),
        };
        Ok(b.get(start..start + len).unwrap_or_default().to_vec())
    }

    fn buffer_write(
        &mut self,
        t: BufferType,
        start: usize,
        len: usize,
        data: &[u8],
    ) -> HostResult<()> {
        match &mut self.body {
            Some((bt, b)) if *bt == t => envoy_copy_from(b, start, len, data),
            _ => Err(Status::BadArgument),
        }
    }
}

impl HeaderHost for HostState {
    fn map_pairs(&mut self, t: MapType) -> HostResult<Pairs> {
        Ok(self.map(t)?.clone())
    }
    fn set_map_pairs(&mut self, t: MapType, pairs: Pairs) -> HostResult<()> {
        *self.map(t)? = pairs;
        self.touched(t);
        Ok(())
    }
    fn map_value(&mut self, t: MapType, key: &[u8]) -> HostResult<Vec<u8>> {
        let key = key.to_ascii_lowercase();
        self.map(t)?
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .ok_or(Status::NotFound)
    }
    fn add_map_value(&mut self, t: MapType, key: &[u8], value: &[u8]) -> HostResult<()> {
        let key = key.to_ascii_lowercase();
        self.map(t)?.push((key, value.to_vec()));
        self.touched(t);
        Ok(())
    }
    fn replace_map_value(&mut self, t: MapType, key: &[u8], value: &[u8]) -> HostResult<()> {
        let key = key.to_ascii_lowercase();
        let m = self.map(t)?;
        match m.iter().position(|(k, _)| *k == key) {
            Some(i) => {
                m[i].1 = value.to_vec();
                let mut n = 0;
                m.retain(|(k, _)| {
                    n += usize::from(*k == key);
                    *k != key || n == 1
                });
            }
            None => m.push((key, value.to_vec())),
        }
        self.touched(t);
        Ok(())
    }
    fn remove_map_value(&mut self, t: MapType, key: &[u8]) -> HostResult<()> {
        let key = key.to_ascii_lowercase();
        self.map(t)?.retain(|(k, _)| *k != key);
        self.touched(t);
        Ok(())
    }
    fn map_size(&mut self, t: MapType) -> HostResult<u32> {
        Ok(self
            .map(t)?
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>() as u32)
    }
}

impl PropertyHost for HostState {
    fn property(&mut self, path: &[u8]) -> HostResult<Vec<u8>> {
        if let Some((_, v)) = self.properties.iter().find(|(k, _)| k == path) {
            return Ok(v.clone());
        }
        let parts: Vec<&[u8]> = path.split(|b| *b == 0).collect();
        let v = match parts.as_slice() {
            [b"plugin_vm_id"] | [b"plugin_name"] => Some(self.vm_id.clone().into_bytes()),
            [b"request", b"path"] => self.header_value(":path"),
            [b"request", b"method"] => self.header_value(":method"),
            [b"request", b"host"] => self.header_value(":authority"),
            [b"request", b"scheme"] => self.header_value(":scheme"),
            _ => None,
        };
        v.ok_or(Status::NotFound)
    }
    fn set_property(&mut self, path: &[u8], value: &[u8]) -> HostResult<()> {
        if self.effective == self.root {
            return Err(Status::NotFound);
        }
        self.properties.retain(|(k, _)| k != path);
        self.properties.push((path.to_vec(), value.to_vec()));
        Ok(())
    }
}

impl StreamHost for HostState {
    fn continue_stream(&mut self, _s: StreamType) -> HostResult<()> {
        // TODO(issue 5): resume a paused request (needs pause support in the phase handler).
        Ok(())
    }
    fn close_stream(&mut self, _s: StreamType) -> HostResult<()> {
        Ok(())
    }
    fn send_local_response(&mut self, r: LocalResponse) -> HostResult<()> {
        if self.effective != self.root {
            self.local_response = Some(r);
        }
        Ok(())
    }
}

impl HttpCallHost for HostState {
    fn http_call(&mut self, _call: HttpCallRequest) -> HostResult<u32> {
        // TODO(issue 5): named upstreams. An unknown cluster is BadArgument, as in Envoy.
        Err(Status::BadArgument)
    }
}

// No gRPC in nginx: the trait's defaults answer Unimplemented.
impl GrpcHost for HostState {}

impl SharedDataHost for HostState {
    fn get_shared_data(&mut self, key: &str) -> HostResult<(Vec<u8>, u32)> {
        crate::shm::kv_get(&self.vm_id, key)
            .unwrap_or_else(|| stores().shared_data.get(&self.vm_id, key))
    }
    fn set_shared_data(&mut self, key: &str, value: Option<&[u8]>, cas: u32) -> HostResult<()> {
        crate::shm::kv_set(&self.vm_id, key, value, cas)
            .unwrap_or_else(|| stores().shared_data.set(&self.vm_id, key, value, cas))
    }
}

impl QueueHost for HostState {
    fn register_queue(&mut self, name: &str) -> HostResult<u32> {
        let owner = QueueOwner {
            vm: 0,
            root_context: self.root,
        };
        Ok(stores().queues.register(&self.vm_id, name, owner))
    }
    fn resolve_queue(&mut self, vm_id: &str, name: &str) -> HostResult<u32> {
        stores().queues.resolve(vm_id, name)
    }
    fn enqueue(&mut self, token: u32, data: &[u8]) -> HostResult<()> {
        stores().queues.enqueue(token, data).map(|_| ())
    }
    fn dequeue(&mut self, token: u32) -> HostResult<Vec<u8>> {
        stores().queues.dequeue(token)
    }
}

impl MetricHost for HostState {
    // Envoy's rules are the ABI core's (`MetricIds`); the zone stores the outcome. A
    // metric outside a zone (none in use, or refused) lives in this process's store.
    fn define_metric(&mut self, t: MetricType, name: &str) -> HostResult<u32> {
        let id = stores().metrics.define(&mut self.metric_ids, t, name);
        crate::shm::metric_define(&(t, name.to_string()));
        Ok(id)
    }
    fn increment_metric(&mut self, id: u32, offset: i64) -> HostResult<()> {
        let (key, update) = self.metric_ids.increment(id, offset)?;
        crate::shm::metric_update(key, update)
            .unwrap_or_else(|| stores().metrics.increment(&self.metric_ids, id, offset))
    }
    fn record_metric(&mut self, id: u32, value: u64) -> HostResult<()> {
        let (key, update) = self.metric_ids.record(id, value)?;
        crate::shm::metric_update(key, update)
            .unwrap_or_else(|| stores().metrics.record(&self.metric_ids, id, value))
    }
    fn get_metric(&mut self, id: u32) -> HostResult<u64> {
        let key = self.metric_ids.get(id)?;
        crate::shm::metric_value(key).unwrap_or_else(|| stores().metrics.get(&self.metric_ids, id))
    }
}

impl ForeignHost for HostState {
    fn call_foreign_function(&mut self, _name: &str, _args: &[u8]) -> HostResult<Vec<u8>> {
        Err(Status::NotFound)
    }
}

impl ContextHost for HostState {
    fn set_effective_context(&mut self, id: u32) -> HostResult<()> {
        if id != self.root && !self.streams.contains(&id) {
            return Err(Status::BadArgument);
        }
        self.effective = id;
        Ok(())
    }
    fn done(&mut self) -> HostResult<()> {
        if !self.done_pending {
            return Err(Status::NotFound);
        }
        self.done_pending = false;
        Ok(())
    }
}

impl WasiHost for HostState {
    fn random_bytes(&mut self, buf: &mut [u8]) {
        // xorshift64*: not cryptographic; Proxy-Wasm filters use it for ids and jitter.
        for chunk in buf.chunks_mut(8) {
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}
