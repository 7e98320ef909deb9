//! The host state of one Proxy-Wasm VM inside an nginx worker: what the harness's ABI
//! core ([`proxy_wasm_harness::abi`]) calls into. Only nginx-specific state lives here;
//! reading and writing guest memory, statuses and limits are the core's.

use crate::http1::{self, Response};
use crate::upstream::{self, Peer};
use proxy_wasm_harness::abi::{
    buffers::{envoy_copy_from, BufferHost},
    clock::ClockHost,
    context::ContextHost,
    foreign::ForeignHost,
    grpc::GrpcHost,
    headers::{encode_map, HeaderHost},
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
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::HashSet;
use std::ffi::c_void;
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

/// What a filter asked of a stream besides its callback's return value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamAction {
    /// `proxy_continue_stream`: resume a paused request (or response).
    Resume,
    /// `proxy_send_local_response`: answer the client with this instead.
    LocalResponse(LocalResponse),
    /// `proxy_close_stream`: reset the stream.
    Reset,
}

/// A guest log line, handed to nginx's error log by the embedder.
pub type LogSink = fn(LogLevel, &str);

/// An `http_call` the guest made during a callback. The embedder starts it on nginx's
/// event loop once the callback has returned (Envoy, too, answers only later).
#[derive(Debug)]
pub struct OutgoingCall {
    /// The call's token, as the guest got it.
    pub token: u32,
    /// The context that made the call; its answer goes back to it.
    pub context: u32,
    /// The cluster name the guest gave (for logs).
    pub cluster: String,
    /// The call's timeout, bounded by [`crate::client::MAX_CALL_TIMEOUT`].
    pub timeout: Duration,
    /// How the call goes out.
    pub route: CallRoute,
}

/// How a call goes out: see README.md, "dispatch_http_call".
#[derive(Debug)]
pub enum CallRoute {
    /// The module's own HTTP/1.1 client ([`crate::client`]): calls from the root
    /// context, and from requests whose location has no `proxy_wasm_call_location`.
    Client {
        /// Where to connect.
        peer: Peer,
        /// The request on the wire.
        request: http1::Request,
    },
    /// An nginx subrequest of the calling request, to its `proxy_wasm_call_location`.
    Subrequest {
        /// The checked request head.
        head: http1::CallHead,
        /// The request body.
        body: Vec<u8>,
    },
}

/// What one stream whose calls go out as subrequests has used: subrequests live in the
/// request's memory pool, which is freed only with the request, so their number is
/// bounded over the stream's life as well as in flight.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SubrequestBudget {
    /// Calls made and not answered yet.
    pub in_flight: usize,
    /// Calls made since the stream started.
    pub made: usize,
}

/// Headers still in nginx's own lists, copied out only when a filter first reads or
/// changes them: most response callbacks never do (a cache hit's own reply, say), and
/// copying every header costs two allocations each.
#[derive(Clone, Copy)]
pub struct HeadersSource {
    read: unsafe fn(*const c_void) -> Pairs,
    from: *const c_void,
}

impl HeadersSource {
    /// # Safety
    /// `from` must be what `read` expects, and stay valid, unchanged, until the callback
    /// the source is handed to has returned.
    pub unsafe fn new(read: unsafe fn(*const c_void) -> Pairs, from: *const c_void) -> Self {
        HeadersSource { read, from }
    }

    fn read(self) -> Pairs {
        // SAFETY: `new`'s contract; sources live only for the callback they are made for.
        unsafe { (self.read)(self.from) }
    }
}

/// Most unknown cluster names a VM warns about (each once), so a misconfigured filter
/// calling every tick does not flood the error log.
pub const MAX_WARNED_CLUSTERS: usize = 64;

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
    pub streams: FxHashSet<u32>,
    /// The context host calls act on.
    pub effective: u32,
    /// Request headers, available while their callback runs.
    pub request_headers: Option<Pairs>,
    /// Set when the filter changed the request headers.
    pub request_headers_dirty: bool,
    /// Set when the filter changed the response headers.
    pub response_headers_dirty: bool,
    /// Response headers, available while their callback runs.
    pub response_headers: Option<Pairs>,
    /// Where `response_headers` are read from when the filter first touches them.
    pub response_headers_source: Option<HeadersSource>,
    /// The current body chunk, while a body callback runs.
    pub body: Option<(BufferType, Vec<u8>)>,
    /// What the filter asked of streams (its own or, through `set_effective_context`,
    /// another paused one) during the current callback; the module applies them after it.
    pub actions: Vec<(u32, StreamAction)>,
    /// The response status, once the response headers were seen (`response.code`).
    pub response_code: Option<u32>,
    /// Set when the filter changed the body chunk of the current body callback.
    pub body_dirty: bool,
    /// Properties set by the filter for the current stream.
    pub properties: Vec<(Vec<u8>, Vec<u8>)>,
    /// The tick period the root context asked for.
    pub tick_period: Option<Duration>,
    /// Set when the filter called `set_tick_period` (from any context): the embedder
    /// re-arms the tick timer after the callback.
    pub tick_changed: bool,
    /// Calls made during the current callback, not started yet.
    pub outgoing: Vec<OutgoingCall>,
    /// Streams whose calls go out as nginx subrequests (their request's location has a
    /// `proxy_wasm_call_location`), with what they used.
    pub subrequest_streams: FxHashMap<u32, SubrequestBudget>,
    /// The `http_call` answer, readable only during `on_http_call_response`.
    pub call_response: Option<Response>,
    /// What `proxy_get_status` reads: a failed call's `BrokenConnection`/`reset`.
    pub status: (u32, Vec<u8>),
    next_token: u32,
    warned_clusters: HashSet<String>,
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
            streams: FxHashSet::default(),
            effective: 1,
            request_headers: None,
            request_headers_dirty: false,
            response_headers_dirty: false,
            response_headers: None,
            response_headers_source: None,
            body: None,
            actions: Vec::new(),
            response_code: None,
            body_dirty: false,
            properties: Vec::new(),
            tick_period: None,
            tick_changed: false,
            outgoing: Vec::new(),
            subrequest_streams: FxHashMap::default(),
            call_response: None,
            status: (0, Vec::new()),
            next_token: 0,
            warned_clusters: HashSet::new(),
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
            MapType::HttpResponseHeaders => {
                if self.response_headers.is_none() {
                    self.response_headers = self.response_headers_source.take().map(|s| s.read());
                }
                self.response_headers.as_mut()
            }
            MapType::HttpCallResponseHeaders => self.call_response.as_mut().map(|r| &mut r.headers),
            MapType::HttpCallResponseTrailers => {
                self.call_response.as_mut().map(|r| &mut r.trailers)
            }
            _ => None,
        }
        .ok_or(Status::BadArgument)
    }

    fn touched(&mut self, t: MapType) {
        match t {
            MapType::HttpRequestHeaders => self.request_headers_dirty = true,
            MapType::HttpResponseHeaders => self.response_headers_dirty = true,
            _ => {}
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
        // Applied to the root context's nginx timer when the callback returns (any
        // context may call it: edge-filter wakes its root from a request this way).
        self.tick_period = (!period.is_zero()).then_some(period);
        self.tick_changed = true;
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
            BufferType::HttpCallResponseBody => self
                .call_response
                .as_ref()
                .map(|r| r.body.len())
                .ok_or(Status::NotFound),
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
            BufferType::HttpCallResponseBody => self
                .call_response
                .as_ref()
                .map(|r| r.body.as_slice())
                .ok_or(Status::NotFound)?,
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
            Some((bt, b)) if *bt == t => {
                envoy_copy_from(b, start, len, data)?;
                self.body_dirty = true;
                Ok(())
            }
            _ => Err(Status::BadArgument),
        }
    }
}

impl HeaderHost for HostState {
    fn map_pairs(&mut self, t: MapType) -> HostResult<Pairs> {
        Ok(self.map(t)?.clone())
    }
    fn map_pairs_encoded(&mut self, t: MapType) -> HostResult<Vec<u8>> {
        Ok(encode_map(self.map(t)?))
    }
    fn set_map_pairs(&mut self, t: MapType, pairs: Pairs) -> HostResult<()> {
        *self.map(t)? = pairs;
        self.touched(t);
        Ok(())
    }
    fn map_value(&mut self, t: MapType, key: &[u8]) -> HostResult<Vec<u8>> {
        // Names in the maps are lower-case already.
        self.map(t)?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
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
            // Envoy encodes integer properties as 8 little-endian bytes.
            [b"response", b"code"] => self
                .response_code
                .map(|c| u64::from(c).to_le_bytes().to_vec()),
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

impl HostState {
    fn stream_action(&mut self, a: StreamAction) -> HostResult<()> {
        // As in Envoy, stream calls from the root context (no stream selected) fail.
        if self.effective == self.root {
            return Err(Status::NotFound);
        }
        // Applied after the callback returns, as Envoy defers them.
        self.actions.push((self.effective, a));
        Ok(())
    }
}

impl StreamHost for HostState {
    fn continue_stream(&mut self, _s: StreamType) -> HostResult<()> {
        self.stream_action(StreamAction::Resume)
    }
    fn close_stream(&mut self, _s: StreamType) -> HostResult<()> {
        self.stream_action(StreamAction::Reset)
    }
    fn send_local_response(&mut self, r: LocalResponse) -> HostResult<()> {
        self.stream_action(StreamAction::LocalResponse(r))
    }
}

impl HttpCallHost for HostState {
    fn http_call(&mut self, call: HttpCallRequest) -> HostResult<u32> {
        // As Envoy: an unknown cluster, then missing pseudo-headers, are BadArgument.
        let Some(peer) = upstream::resolve(&call.upstream) else {
            if self.warned_clusters.len() < MAX_WARNED_CLUSTERS
                && self.warned_clusters.insert(call.upstream.clone())
            {
                (self.log)(
                    LogLevel::Warn,
                    &format!(
                        "http_call to unknown cluster \"{}\": no `upstream` block of that \
                         name, and not an IP:port (answered BadArgument)",
                        call.upstream
                    ),
                );
            }
            return Err(Status::BadArgument);
        };
        let warn = |log: LogSink, e: http1::RequestError| {
            log(LogLevel::Warn, &e.to_string());
            Status::BadArgument
        };
        let route = if let Some(budget) = self.subrequest_streams.get(&self.effective) {
            let head = http1::call_head(&call.headers).map_err(|e| warn(self.log, e))?;
            if call.body.len() > http1::MAX_REQUEST_BYTES {
                return Err(warn(self.log, http1::RequestError::TooLarge));
            }
            if budget.in_flight >= crate::subrequest::MAX_CALLS_IN_FLIGHT_PER_STREAM
                || budget.made >= crate::subrequest::MAX_CALLS_PER_STREAM
            {
                (self.log)(
                    LogLevel::Warn,
                    &format!(
                        "http_call to \"{}\" refused: a request may have {} calls in flight \
                         and make {} in all",
                        call.upstream,
                        crate::subrequest::MAX_CALLS_IN_FLIGHT_PER_STREAM,
                        crate::subrequest::MAX_CALLS_PER_STREAM
                    ),
                );
                return Err(Status::InternalFailure);
            }
            CallRoute::Subrequest {
                head,
                body: call.body,
            }
        } else {
            let request = http1::serialize_request(&call.headers, &call.body)
                .map_err(|e| warn(self.log, e))?;
            if crate::client::live_calls() + self.outgoing.len()
                >= crate::client::MAX_CALLS_IN_FLIGHT
            {
                (self.log)(
                    LogLevel::Warn,
                    &format!(
                        "http_call to \"{}\" refused: {} calls in flight in this worker",
                        call.upstream,
                        crate::client::MAX_CALLS_IN_FLIGHT
                    ),
                );
                return Err(Status::InternalFailure);
            }
            CallRoute::Client { peer, request }
        };
        if let Some(b) = self.subrequest_streams.get_mut(&self.effective) {
            b.in_flight += 1;
            b.made += 1;
        }
        // No timeout (0) would wait for ever: every call gets the bound.
        let timeout = if call.timeout.is_zero() {
            crate::client::MAX_CALL_TIMEOUT
        } else {
            call.timeout.min(crate::client::MAX_CALL_TIMEOUT)
        };
        self.next_token = self.next_token.wrapping_add(1).max(1);
        self.outgoing.push(OutgoingCall {
            token: self.next_token,
            context: self.effective,
            cluster: call.upstream,
            timeout,
            route,
        });
        Ok(self.next_token)
    }
}

// No gRPC in nginx: the trait's defaults answer Unimplemented. The status is that of a
// failed http_call.
impl GrpcHost for HostState {
    fn status(&mut self) -> (u32, Vec<u8>) {
        self.status.clone()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{MAX_CALLS_IN_FLIGHT, MAX_CALL_TIMEOUT};
    use crate::upstream::{Cluster, Clusters};

    fn quiet(_: LogLevel, _: &str) {}

    fn call(upstream: &str, headers: &[(&str, &str)], timeout_ms: u64) -> HttpCallRequest {
        HttpCallRequest {
            upstream: upstream.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
            body: Vec::new(),
            trailers: Vec::new(),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    const GET: &[(&str, &str)] = &[(":method", "GET"), (":path", "/"), (":authority", "a")];

    thread_local! {
        static READS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    unsafe fn two_headers(from: *const c_void) -> Pairs {
        READS.with(|r| r.set(r.get() + 1));
        let status = *(from as *const u32);
        vec![
            (b":status".to_vec(), status.to_string().into_bytes()),
            (b"etag".to_vec(), b"\"v1\"".to_vec()),
        ]
    }

    #[test]
    fn response_headers_are_read_once_and_only_when_touched() {
        let status = 200u32;
        let mut h = HostState::new("vm", quiet, LogLevel::Info);
        // SAFETY: `two_headers` reads a u32 at `from`, which outlives the source.
        let source = unsafe { HeadersSource::new(two_headers, &status as *const u32 as _) };
        h.response_headers_source = Some(source);
        assert_eq!(
            READS.with(|r| r.get()),
            0,
            "nothing read before a host call"
        );
        let t = MapType::HttpResponseHeaders;
        assert_eq!(h.map_value(t, b"ETag").unwrap(), b"\"v1\"");
        let encoded = h.map_pairs_encoded(t).unwrap();
        assert_eq!(encoded, encode_map(&h.map_pairs(t).unwrap()));
        h.add_map_value(t, b"x-a", b"1").unwrap();
        assert_eq!(h.map_size(t).unwrap(), (7 + 3 + 4 + 4 + 3 + 1) as u32);
        assert_eq!(READS.with(|r| r.get()), 1, "read once, then kept");
        assert!(h.response_headers_dirty);
    }

    #[test]
    fn http_call_queues_a_call_for_a_known_cluster() {
        upstream::install(Clusters::new(vec![Cluster::new(
            "upstream",
            vec![upstream::literal("127.0.0.1:9").unwrap()],
        )]));
        let mut h = HostState::new("vm", quiet, LogLevel::Info);
        h.effective = 7;
        let t1 = h.http_call(call("upstream", GET, 250)).unwrap();
        let t2 = h.http_call(call("127.0.0.1:10", GET, 0)).unwrap();
        assert_ne!(t1, t2);
        assert_eq!(h.outgoing.len(), 2);
        let (a, b) = (&h.outgoing[0], &h.outgoing[1]);
        let CallRoute::Client { peer, request } = &a.route else {
            panic!("not the client: {:?}", a.route)
        };
        assert_eq!(
            (a.token, a.context, peer.name.as_str()),
            (t1, 7, "127.0.0.1:9")
        );
        assert_eq!(a.timeout, Duration::from_millis(250));
        assert!(request.bytes.starts_with(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        let CallRoute::Client { peer, .. } = &b.route else {
            panic!("not the client: {:?}", b.route)
        };
        assert_eq!(peer.name, "127.0.0.1:10");
        // No timeout means the bound, never "for ever".
        assert_eq!(b.timeout, MAX_CALL_TIMEOUT);
    }

    #[test]
    fn http_call_refusals_are_envoys() {
        upstream::install(Clusters::default());
        let mut h = HostState::new("vm", quiet, LogLevel::Info);
        assert_eq!(h.http_call(call("nope", GET, 1)), Err(Status::BadArgument));
        let no_path = &[(":method", "GET"), (":authority", "a")];
        assert_eq!(
            h.http_call(call("127.0.0.1:9", no_path, 1)),
            Err(Status::BadArgument)
        );
        assert!(h.outgoing.is_empty());
        for _ in 0..MAX_CALLS_IN_FLIGHT {
            h.http_call(call("127.0.0.1:9", GET, 1)).unwrap();
        }
        assert_eq!(
            h.http_call(call("127.0.0.1:9", GET, 1)),
            Err(Status::InternalFailure)
        );
    }

    #[test]
    fn calls_of_a_subrequest_stream_become_subrequests_with_their_own_bounds() {
        upstream::install(Clusters::new(vec![Cluster::new(
            "auth",
            vec![upstream::literal("127.0.0.1:9").unwrap()],
        )]));
        let mut h = HostState::new("vm", quiet, LogLevel::Info);
        h.streams.insert(3);
        h.subrequest_streams.insert(3, SubrequestBudget::default());
        h.effective = 3;
        let mut c = call(
            "auth",
            &[
                (":method", "POST"),
                (":path", "/check"),
                (":authority", "auth.test"),
                ("x-call", "1"),
            ],
            0,
        );
        c.body = b"hello".to_vec();
        h.http_call(c).unwrap();
        let CallRoute::Subrequest { head, body } = &h.outgoing[0].route else {
            panic!("not a subrequest: {:?}", h.outgoing[0].route)
        };
        assert_eq!(
            (head.method.as_slice(), head.path.as_slice()),
            (&b"POST"[..], &b"/check"[..])
        );
        assert_eq!(head.headers, vec![(b"x-call".to_vec(), b"1".to_vec())]);
        assert_eq!(body, b"hello");
        assert_eq!(h.outgoing[0].timeout, MAX_CALL_TIMEOUT);
        // The worker-wide bound of the own client does not apply; the stream's does.
        for _ in 1..crate::subrequest::MAX_CALLS_IN_FLIGHT_PER_STREAM {
            h.http_call(call("auth", GET, 1)).unwrap();
        }
        assert_eq!(
            h.http_call(call("auth", GET, 1)),
            Err(Status::InternalFailure)
        );
        // Unknown clusters are refused as before: nginx would only find out later.
        assert_eq!(h.http_call(call("nope", GET, 1)), Err(Status::BadArgument));
        // The root context still uses the own client.
        h.effective = h.root;
        h.http_call(call("auth", GET, 1)).unwrap();
        assert!(matches!(
            h.outgoing.last().unwrap().route,
            CallRoute::Client { .. }
        ));
    }

    #[test]
    fn a_stream_makes_a_bounded_number_of_subrequest_calls_in_all() {
        upstream::install(Clusters::default());
        let mut h = HostState::new("vm", quiet, LogLevel::Info);
        h.subrequest_streams.insert(4, SubrequestBudget::default());
        h.effective = 4;
        for _ in 0..crate::subrequest::MAX_CALLS_PER_STREAM {
            h.http_call(call("127.0.0.1:9", GET, 1)).unwrap();
            // Answered: no longer in flight, still counted.
            h.subrequest_streams.get_mut(&4).unwrap().in_flight -= 1;
        }
        assert_eq!(
            h.http_call(call("127.0.0.1:9", GET, 1)),
            Err(Status::InternalFailure)
        );
    }

    #[test]
    fn tick_period_changes_are_flagged_from_any_context() {
        let mut h = HostState::new("vm", quiet, LogLevel::Info);
        h.effective = 5;
        h.set_tick_period(Duration::from_millis(1)).unwrap();
        assert!(h.tick_changed);
        assert_eq!(h.tick_period, Some(Duration::from_millis(1)));
        h.tick_changed = false;
        h.set_tick_period(Duration::ZERO).unwrap();
        assert!(h.tick_changed);
        assert_eq!(h.tick_period, None);
    }

    #[test]
    fn the_call_response_is_readable_only_while_delivered() {
        let mut h = HostState::new("vm", quiet, LogLevel::Info);
        let t = MapType::HttpCallResponseHeaders;
        assert_eq!(h.map_value(t, b":status"), Err(Status::BadArgument));
        assert_eq!(
            h.buffer_len(BufferType::HttpCallResponseBody),
            Err(Status::NotFound)
        );
        h.call_response = Some(http1::gateway_timeout());
        assert_eq!(h.map_value(t, b":status"), Ok(b"504".to_vec()));
        assert_eq!(h.buffer_len(BufferType::HttpCallResponseBody), Ok(24));
        assert_eq!(
            h.buffer_read(BufferType::HttpCallResponseBody, 0, 8),
            Ok(b"upstream".to_vec())
        );
        assert_eq!(
            h.map_pairs(MapType::HttpCallResponseTrailers),
            Ok(Vec::new())
        );
    }
}
