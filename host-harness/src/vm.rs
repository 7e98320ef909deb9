//! One VM (Envoy: one worker thread's instance of the module): its store, the host-state
//! trait implementations, callbacks into the guest, and the HTTP stream driver.

use crate::abi::buffers::{envoy_copy_from, BufferHost};
use crate::abi::clock::ClockHost;
use crate::abi::context::ContextHost;
use crate::abi::foreign::ForeignHost;
use crate::abi::grpc::GrpcHost;
use crate::abi::headers::HeaderHost;
use crate::abi::http_call::{HttpCallHost, HttpCallRequest};
use crate::abi::logging::LoggingHost;
use crate::abi::metrics::{MetricHost, MetricIds};
use crate::abi::properties::PropertyHost;
use crate::abi::queues::{QueueHost, QueueOwner};
use crate::abi::shared_data::SharedDataHost;
use crate::abi::stream::{LocalResponse, StreamHost};
use crate::abi::wasi::WasiHost;
use crate::abi::{
    AbiState, AbiVersion, AbiView, BufferType, HostResult, LogLevel, MapType, MetricType, Pairs,
    Status, StreamType,
};
use crate::error::{Error, Trap};
use crate::harness::{
    CallReply, FailurePolicy, Harness, Headers, HttpCallResponse, LogEntry, RecordedCall, Settings,
    Shared, EPOCH_SLICES,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder, TypedFunc};

/// What a filter callback asked of the host, as Envoy acts on it (a headers
/// `StopIteration` becomes `StopAllIterationAndWatermark`; a local reply stops iteration
/// whatever the callback returned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Go on.
    Continue,
    /// Headers: stop everything (body and trailers wait in the host) until resumed.
    StopAllIterationAndBuffer,
    /// Headers: as above, with watermarks.
    StopAllIterationAndWatermark,
    /// Body: keep the data buffered; the next body callback sees all of it.
    StopIterationAndBuffer,
    /// Body: as above, with watermarks.
    StopIterationAndWatermark,
    /// Body: stop without buffering (this chunk is not forwarded).
    StopIterationNoBuffer,
    /// Trailers: stop until resumed.
    StopIteration,
    /// The filter was not called: it is paused (the host held the data), the stream has
    /// ended, or the VM failed open.
    NotCalled,
}

impl Action {
    /// Whether the stream is held at this filter.
    pub fn is_pause(self) -> bool {
        !matches!(self, Action::Continue | Action::NotCalled)
    }
}

/// A message as it passed the filter: what reached the upstream (requests) or the client
/// (responses).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    /// Headers, once forwarded.
    pub headers: Option<Headers>,
    /// Body bytes forwarded so far.
    #[serde(with = "crate::scenario::lossy")]
    pub body: Vec<u8>,
    /// Trailers, if forwarded.
    pub trailers: Option<Headers>,
    /// Whether the end of the message was forwarded.
    pub complete: bool,
}

impl Message {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .as_ref()?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `:status` as a number.
    pub fn status(&self) -> Option<u16> {
        self.header(":status")?.parse().ok()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    None,
    Headers,
    Body,
    Trailers,
}

struct Dir {
    headers: Pairs,
    headers_live: bool,
    trailers: Option<Pairs>,
    trailers_live: bool,
    body: Vec<u8>,
    body_live: bool,
    stop: Stop,
    pending: Vec<u8>,
    pending_end: bool,
    pending_trailers: Option<Pairs>,
    got_end: bool,
    out: Message,
    // `out.headers` as bytes: `Headers` are strings, so obs-text would be lost there.
    out_raw: Option<Pairs>,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            headers: Vec::new(),
            headers_live: false,
            trailers: None,
            trailers_live: false,
            body: Vec::new(),
            body_live: false,
            stop: Stop::None,
            pending: Vec::new(),
            pending_end: false,
            pending_trailers: None,
            got_end: false,
            out: Message::default(),
            out_raw: None,
        }
    }
}

/// A local reply the filter (or the host, for failures) sent.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LocalReply {
    /// Status code.
    pub status: u32,
    /// Response code details.
    pub details: String,
    /// Body as the filter gave it.
    #[serde(with = "crate::scenario::lossy")]
    pub body: Vec<u8>,
    /// Headers the filter added.
    pub headers: Headers,
}

struct StreamState {
    req: Dir,
    resp: Dir,
    local_reply: Option<LocalReply>,
    reset: Option<String>,
    fail_sent: bool,
    finished: bool,
    log_phase: bool,
    head: bool,
    properties: HashMap<Vec<u8>, Vec<u8>>,
}

impl StreamState {
    fn dir(&mut self, s: Side) -> &mut Dir {
        match s {
            Side::Req => &mut self.req,
            Side::Resp => &mut self.resp,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Req,
    Resp,
}

enum After {
    Continue(u32, StreamType),
    Close(u32),
    Reply(u32, LocalResponse),
}

#[derive(Clone, Debug)]
enum Outcome {
    Respond(HttpCallResponse),
    Fail,
    Timeout,
}

struct PendingCall {
    token: u32,
    due: Option<Duration>,
    outcome: Outcome,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    VmStart,
    Configure,
    CallResponse,
}

/// The store data of one VM: the ABI core's state and this harness's host state.
pub struct VmData {
    abi: AbiState,
    number: u64,
    settings: Arc<Settings>,
    shared: Arc<Shared>,
    metric_ids: MetricIds,
    limits: StoreLimits,
    rng: u64,
    current: u32,
    effective: u32,
    root: u32,
    streams: HashMap<u32, StreamState>,
    phase: Phase,
    call_response: Option<HttpCallResponse>,
    status: (u32, Vec<u8>),
    call_data: Vec<u8>,
    tick_period: Option<Duration>,
    next_tick: Option<Duration>,
    pending_calls: BTreeMap<u32, PendingCall>,
    next_token: u32,
    after: Vec<After>,
    stop_next: bool,
    done_pending: bool,
    done_called: bool,
}

impl AbiView for VmData {
    fn abi(&self) -> &AbiState {
        &self.abi
    }
}

fn to_pairs(h: &Headers) -> Pairs {
    h.iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

fn to_headers(p: &Pairs) -> Headers {
    p.iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}

fn lower(k: &[u8]) -> Vec<u8> {
    k.to_ascii_lowercase()
}

/// Envoy's `HeaderMap::byteSize`: names and values, no separators.
fn byte_size(p: &Pairs) -> u32 {
    p.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() as u32
}

impl VmData {
    /// The context host calls act on: the effective one if it still exists.
    fn ctx(&self) -> u32 {
        if self.effective != 0
            && (self.effective == self.root
                || self
                    .streams
                    .get(&self.effective)
                    .is_some_and(|s| !s.finished))
        {
            self.effective
        } else {
            self.current
        }
    }

    fn stream(&mut self) -> Option<&mut StreamState> {
        let c = self.ctx();
        self.streams
            .get_mut(&c)
            .filter(|s| !s.finished || s.log_phase)
    }

    /// The map for a mutation (Envoy's `getMap`): only while its callback owns it.
    fn map_mut(&mut self, t: MapType) -> HostResult<&mut Pairs> {
        let s = self.stream().ok_or(Status::BadArgument)?;
        if s.log_phase {
            return Err(Status::BadArgument);
        }
        let (dir, trailers) = match t {
            MapType::HttpRequestHeaders => (&mut s.req, false),
            MapType::HttpRequestTrailers => (&mut s.req, true),
            MapType::HttpResponseHeaders => (&mut s.resp, false),
            MapType::HttpResponseTrailers => (&mut s.resp, true),
            _ => return Err(Status::BadArgument),
        };
        if trailers {
            match (&mut dir.trailers, dir.trailers_live) {
                (Some(t), true) => Ok(t),
                _ => Err(Status::BadArgument),
            }
        } else if dir.headers_live {
            Ok(&mut dir.headers)
        } else {
            Err(Status::BadArgument)
        }
    }

    /// The map for a read (Envoy's `getConstMap`): also the final maps during `on_log`,
    /// and the `http_call` response during its callback.
    fn map_ref(&mut self, t: MapType) -> Option<Pairs> {
        match t {
            MapType::HttpCallResponseHeaders => {
                return self.call_response.as_ref().map(|r| to_pairs(&r.headers))
            }
            MapType::HttpCallResponseTrailers => {
                return self.call_response.as_ref().map(|r| to_pairs(&r.trailers))
            }
            MapType::GrpcReceiveInitialMetadata | MapType::GrpcReceiveTrailingMetadata => {
                return None
            }
            _ => {}
        }
        let s = self.stream()?;
        if s.log_phase {
            return match t {
                MapType::HttpRequestHeaders => Some(s.req.headers.clone()),
                MapType::HttpResponseHeaders => s.resp.out_raw.clone(),
                MapType::HttpResponseTrailers => s.resp.out.trailers.as_ref().map(to_pairs),
                _ => None,
            };
        }
        let dir = match t {
            MapType::HttpRequestHeaders | MapType::HttpRequestTrailers => &s.req,
            _ => &s.resp,
        };
        match t {
            MapType::HttpRequestHeaders | MapType::HttpResponseHeaders => {
                dir.headers_live.then(|| dir.headers.clone())
            }
            _ => dir.trailers.clone().filter(|_| dir.trailers_live),
        }
    }

    fn body_mut(&mut self, t: BufferType) -> Option<&mut Vec<u8>> {
        let s = self.stream()?;
        let d = match t {
            BufferType::HttpRequestBody => &mut s.req,
            _ => &mut s.resp,
        };
        d.body_live.then_some(&mut d.body)
    }

    fn buffer(&mut self, t: BufferType) -> HostResult<Vec<u8>> {
        match t {
            BufferType::HttpRequestBody | BufferType::HttpResponseBody => {
                // Outside its callback Envoy hands out an empty buffer, not NotFound.
                Ok(self.body_mut(t).map(|b| b.clone()).unwrap_or_default())
            }
            BufferType::HttpCallResponseBody => self
                .call_response
                .as_ref()
                .map(|r| r.body.clone())
                .ok_or(Status::NotFound),
            BufferType::VmConfiguration => Ok(self.settings.vm_config.clone()),
            BufferType::PluginConfiguration => {
                if self.phase == Phase::Configure {
                    Ok(self.settings.plugin_config.clone())
                } else {
                    Err(Status::NotFound)
                }
            }
            BufferType::CallData => Ok(self.call_data.clone()),
            BufferType::DownstreamData | BufferType::UpstreamData => Ok(Vec::new()),
            BufferType::GrpcReceiveBuffer => Ok(Vec::new()),
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic for reproducible tests.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

impl LoggingHost for VmData {
    fn log(&mut self, level: LogLevel, message: &str) -> HostResult<()> {
        if level >= self.settings.log_level {
            self.shared.push_log(LogEntry {
                vm: self.number,
                context_id: self.ctx(),
                level,
                message: message.to_string(),
            });
        }
        Ok(())
    }

    fn log_level(&mut self) -> HostResult<LogLevel> {
        Ok(self.settings.log_level)
    }
}

impl ClockHost for VmData {
    fn now_nanos(&mut self) -> u64 {
        self.shared.clock.now_nanos()
    }

    fn monotonic_nanos(&mut self) -> u64 {
        self.shared.clock.elapsed().as_nanos() as u64
    }

    fn set_tick_period(&mut self, period: Duration) -> HostResult<()> {
        if period.is_zero() {
            self.tick_period = None;
            self.next_tick = None;
        } else {
            self.tick_period = Some(period);
            self.next_tick = Some(self.shared.clock.elapsed() + period);
        }
        Ok(())
    }
}

impl BufferHost for VmData {
    fn buffer_len(&mut self, t: BufferType) -> HostResult<usize> {
        match t {
            BufferType::HttpRequestBody | BufferType::HttpResponseBody => {
                Ok(self.body_mut(t).map_or(0, |b| b.len()))
            }
            _ => self.buffer(t).map(|b| b.len()),
        }
    }

    fn buffer_read(&mut self, t: BufferType, start: usize, len: usize) -> HostResult<Vec<u8>> {
        if let BufferType::HttpRequestBody | BufferType::HttpResponseBody = t {
            let b = self.body_mut(t).map(|b| b.as_slice()).unwrap_or_default();
            return Ok(b.get(start..start + len).unwrap_or_default().to_vec());
        }
        let b = self.buffer(t)?;
        Ok(b.get(start..start + len).unwrap_or_default().to_vec())
    }

    fn buffer_write(
        &mut self,
        t: BufferType,
        start: usize,
        len: usize,
        data: &[u8],
    ) -> HostResult<()> {
        match t {
            BufferType::HttpRequestBody | BufferType::HttpResponseBody => {
                let b = self.body_mut(t).ok_or(Status::BadArgument)?;
                envoy_copy_from(b, start, len, data)
            }
            // Every other buffer is read-only in Envoy.
            _ => Err(Status::BadArgument),
        }
    }
}

impl HeaderHost for VmData {
    fn map_pairs(&mut self, t: MapType) -> HostResult<Pairs> {
        Ok(self.map_ref(t).unwrap_or_default())
    }

    fn set_map_pairs(&mut self, t: MapType, pairs: Pairs) -> HostResult<()> {
        let m = self.map_mut(t)?;
        *m = pairs.into_iter().map(|(k, v)| (lower(&k), v)).collect();
        Ok(())
    }

    fn map_value(&mut self, t: MapType, key: &[u8]) -> HostResult<Vec<u8>> {
        let key = lower(key);
        // Fast path, without copying the map: a live request or response header map.
        if let MapType::HttpRequestHeaders | MapType::HttpResponseHeaders = t {
            if let Some(s) = self.stream().filter(|s| !s.log_phase) {
                let d = if t == MapType::HttpRequestHeaders {
                    &s.req
                } else {
                    &s.resp
                };
                if d.headers_live {
                    return d
                        .headers
                        .iter()
                        .find(|(k, _)| *k == key)
                        .map(|(_, v)| v.clone())
                        .ok_or(Status::NotFound);
                }
            }
        }
        let in_log = self.stream().is_some_and(|s| s.log_phase);
        let Some(m) = self.map_ref(t) else {
            // Envoy: a missing map is NotFound while logging, BadArgument otherwise.
            return Err(if in_log {
                Status::NotFound
            } else {
                Status::BadArgument
            });
        };
        m.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .ok_or(Status::NotFound)
    }

    fn add_map_value(&mut self, t: MapType, key: &[u8], value: &[u8]) -> HostResult<()> {
        self.map_mut(t)?.push((lower(key), value.to_vec()));
        Ok(())
    }

    fn replace_map_value(&mut self, t: MapType, key: &[u8], value: &[u8]) -> HostResult<()> {
        let key = lower(key);
        let m = self.map_mut(t)?;
        // Envoy's setCopy: the first entry takes the value, later duplicates go.
        match m.iter().position(|(k, _)| *k == key) {
            Some(i) => {
                m[i].1 = value.to_vec();
                let mut n = 0;
                m.retain(|(k, _)| {
                    if *k == key {
                        n += 1;
                        n == 1
                    } else {
                        true
                    }
                });
            }
            None => m.push((key, value.to_vec())),
        }
        Ok(())
    }

    fn remove_map_value(&mut self, t: MapType, key: &[u8]) -> HostResult<()> {
        let key = lower(key);
        self.map_mut(t)?.retain(|(k, _)| *k != key);
        Ok(())
    }

    fn map_size(&mut self, t: MapType) -> HostResult<u32> {
        Ok(byte_size(self.map_mut(t)?))
    }
}

impl PropertyHost for VmData {
    fn property(&mut self, path: &[u8]) -> HostResult<Vec<u8>> {
        if let Some(s) = self.stream() {
            if let Some(v) = s.properties.get(path) {
                return Ok(v.clone());
            }
        }
        if let Some(v) = self.settings.properties.get(path) {
            return Ok(v.clone());
        }
        let settings = self.settings.clone();
        let parts: Vec<&[u8]> = path.split(|b| *b == 0).collect();
        let s = self.stream();
        let header = |s: &StreamState, name: &str| -> Option<Vec<u8>> {
            s.req
                .headers
                .iter()
                .find(|(k, _)| k == name.as_bytes())
                .map(|(_, v)| v.clone())
        };
        let v = match parts.as_slice() {
            [b"plugin_name"] => Some(settings.plugin_name.clone().into_bytes()),
            [b"plugin_root_id"] => Some(settings.root_id.clone().into_bytes()),
            [b"plugin_vm_id"] => Some(settings.vm_id.clone().into_bytes()),
            [b"request", b"path"] => s.and_then(|s| header(s, ":path")),
            [b"request", b"method"] => s.and_then(|s| header(s, ":method")),
            [b"request", b"host"] => s.and_then(|s| header(s, ":authority")),
            [b"request", b"scheme"] => s.and_then(|s| header(s, ":scheme")),
            [b"response", b"code"] => s
                .and_then(|s| s.resp.out.status())
                .map(|c| i64::from(c).to_le_bytes().to_vec()),
            [b"response", b"code_details"] => s.and_then(|s| {
                if let Some(r) = &s.local_reply {
                    Some(r.details.clone().into_bytes())
                } else if s.resp.out.headers.is_some() {
                    Some(b"via_upstream".to_vec())
                } else {
                    None
                }
            }),
            _ => None,
        };
        v.ok_or(Status::NotFound)
    }

    fn set_property(&mut self, path: &[u8], value: &[u8]) -> HostResult<()> {
        // Envoy keeps set properties in the stream's filter state: none without a stream.
        let s = self.stream().ok_or(Status::NotFound)?;
        s.properties.insert(path.to_vec(), value.to_vec());
        Ok(())
    }
}

impl StreamHost for VmData {
    fn continue_stream(&mut self, s: StreamType) -> HostResult<()> {
        match s {
            StreamType::Request | StreamType::Response => {
                let c = self.ctx();
                if self.streams.contains_key(&c) {
                    self.after.push(After::Continue(c, s));
                }
                Ok(())
            }
            StreamType::Downstream => Ok(()),
            StreamType::Upstream => Err(Status::Unimplemented),
        }
    }

    fn close_stream(&mut self, s: StreamType) -> HostResult<()> {
        let c = self.ctx();
        if self.streams.contains_key(&c) {
            let _ = s;
            self.after.push(After::Close(c));
        }
        Ok(())
    }

    fn send_local_response(&mut self, r: LocalResponse) -> HostResult<()> {
        let c = self.ctx();
        if self.streams.contains_key(&c) {
            self.after.push(After::Reply(c, r));
        }
        // Envoy stops iteration after a local reply whatever the callback returns.
        self.stop_next = true;
        Ok(())
    }
}

impl HttpCallHost for VmData {
    fn http_call(&mut self, call: HttpCallRequest) -> HostResult<u32> {
        let Some(handler) = self.settings.clusters.get(&call.upstream).cloned() else {
            return Err(Status::BadArgument);
        };
        let has = |n: &str| call.headers.iter().any(|(k, _)| k == n.as_bytes());
        if !has(":path") || !has(":method") || !(has(":authority") || has("host")) {
            return Err(Status::BadArgument);
        }
        self.next_token = self.next_token.wrapping_add(1).max(1);
        let token = self.next_token;
        self.shared.record_call(RecordedCall {
            vm: self.number,
            token,
            request: call.clone(),
        });
        let now = self.shared.clock.elapsed();
        let timeout = (!call.timeout.is_zero()).then_some(call.timeout);
        let (due, outcome) = match handler(&call) {
            CallReply::Respond { response, delay } => match timeout {
                Some(t) if delay > t => (Some(now + t), Outcome::Timeout),
                _ => (Some(now + delay), Outcome::Respond(response)),
            },
            CallReply::Fail { delay } => match timeout {
                Some(t) if delay > t => (Some(now + t), Outcome::Timeout),
                _ => (Some(now + delay), Outcome::Fail),
            },
            CallReply::Never => (timeout.map(|t| now + t), Outcome::Timeout),
        };
        self.pending_calls.insert(
            token,
            PendingCall {
                token,
                due,
                outcome,
            },
        );
        Ok(token)
    }
}

// gRPC answers Unimplemented (the trait's defaults); only the status is this host's.
impl GrpcHost for VmData {
    fn status(&mut self) -> (u32, Vec<u8>) {
        self.status.clone()
    }
}

impl SharedDataHost for VmData {
    fn get_shared_data(&mut self, key: &str) -> HostResult<(Vec<u8>, u32)> {
        self.shared.shared_data.get(&self.settings.vm_id, key)
    }

    fn set_shared_data(&mut self, key: &str, value: Option<&[u8]>, cas: u32) -> HostResult<()> {
        self.shared
            .shared_data
            .set(&self.settings.vm_id, key, value, cas)
    }
}

impl QueueHost for VmData {
    fn register_queue(&mut self, name: &str) -> HostResult<u32> {
        let owner = QueueOwner {
            vm: self.number,
            root_context: self.root,
        };
        Ok(self
            .shared
            .queues
            .register(&self.settings.vm_id, name, owner))
    }

    fn resolve_queue(&mut self, vm_id: &str, name: &str) -> HostResult<u32> {
        let vm_id = if vm_id.is_empty() {
            self.settings.vm_id.as_str()
        } else {
            vm_id
        };
        self.shared.queues.resolve(vm_id, name)
    }

    fn enqueue(&mut self, token: u32, data: &[u8]) -> HostResult<()> {
        let owner = self.shared.queues.enqueue(token, data)?;
        self.shared.notify(owner, token);
        Ok(())
    }

    fn dequeue(&mut self, token: u32) -> HostResult<Vec<u8>> {
        self.shared.queues.dequeue(token)
    }
}

impl MetricHost for VmData {
    fn define_metric(&mut self, t: MetricType, name: &str) -> HostResult<u32> {
        Ok(self.shared.metrics.define(&mut self.metric_ids, t, name))
    }
    fn increment_metric(&mut self, id: u32, offset: i64) -> HostResult<()> {
        self.shared.metrics.increment(&self.metric_ids, id, offset)
    }
    fn record_metric(&mut self, id: u32, value: u64) -> HostResult<()> {
        self.shared.metrics.record(&self.metric_ids, id, value)
    }
    fn get_metric(&mut self, id: u32) -> HostResult<u64> {
        self.shared.metrics.get(&self.metric_ids, id)
    }
}

impl ForeignHost for VmData {
    fn call_foreign_function(&mut self, name: &str, args: &[u8]) -> HostResult<Vec<u8>> {
        let f = self.settings.foreign(name).ok_or(Status::NotFound)?;
        f(args)
    }
}

impl ContextHost for VmData {
    fn set_effective_context(&mut self, id: u32) -> HostResult<()> {
        let exists = id == self.root || self.streams.get(&id).is_some_and(|s| !s.finished);
        if !exists {
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
        self.done_called = true;
        Ok(())
    }
}

impl WasiHost for VmData {
    fn random_bytes(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_random().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }

    fn environ(&self) -> Vec<(String, String)> {
        self.settings.environ.clone()
    }
}

/// Header callbacks differ between ABI 0.1.0 (no end-of-stream flag) and 0.2.x.
#[derive(Clone)]
enum HeadersFn {
    V1(TypedFunc<(i32, i32), i32>),
    V2(TypedFunc<(i32, i32, i32), i32>),
}

/// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
type CallResponseFn = TypedFunc<(i32, i32, i32, i32, i32), ()>;

#[derive(Clone, Default)]
struct Exports {
    on_context_create: Option<TypedFunc<(i32, i32), ()>>,
    on_vm_start: Option<TypedFunc<(i32, i32), i32>>,
    on_configure: Option<TypedFunc<(i32, i32), i32>>,
    on_request_headers: Option<HeadersFn>,
    on_request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_request_trailers: Option<TypedFunc<(i32, i32), i32>>,
    on_response_headers: Option<HeadersFn>,
    on_response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_response_trailers: Option<TypedFunc<(i32, i32), i32>>,
    on_done: Option<TypedFunc<i32, i32>>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_delete: Option<TypedFunc<i32, ()>>,
    on_tick: Option<TypedFunc<i32, ()>>,
    on_queue_ready: Option<TypedFunc<(i32, i32), ()>>,
    on_http_call_response: Option<CallResponseFn>,
    on_foreign_function: Option<TypedFunc<(i32, i32, i32), ()>>,
}

fn typed<P, R>(
    instance: &wasmtime::Instance,
    store: &mut Store<VmData>,
    name: &'static str,
) -> Result<Option<TypedFunc<P, R>>, Error>
where
    P: wasmtime::WasmParams,
    R: wasmtime::WasmResults,
{
    crate::abi::typed_export(instance, store, name).map_err(|e| Error::BadExport {
        name,
        message: format!("{e:#}"),
    })
}

fn headers_fn(
    instance: &wasmtime::Instance,
    store: &mut Store<VmData>,
    name: &'static str,
    abi: AbiVersion,
) -> Result<Option<HeadersFn>, Error> {
    Ok(if abi == AbiVersion::V0_1_0 {
        typed(instance, store, name)?.map(HeadersFn::V1)
    } else {
        typed(instance, store, name)?.map(HeadersFn::V2)
    })
}

/// A running VM. Streams are numbered by their context id.
pub struct Vm {
    store: Store<VmData>,
    instance: wasmtime::Instance,
    exports: Exports,
    fuel: Option<u64>,
    timeout: bool,
    failure_policy: FailurePolicy,
    failed: Option<Box<Trap>>,
    next_context: u32,
    pumping: bool,
    fuel_used: u64,
}

/// Identifies an HTTP stream in a VM (its context id).
pub type StreamId = u32;

fn raw_action_headers(r: i32, stopped: bool) -> Action {
    if stopped {
        return Action::StopAllIterationAndWatermark;
    }
    match r {
        0 => Action::Continue,
        // proxy-wasm-cpp-host turns StopIteration into StopAllIterationAndWatermark.
        1 => Action::StopAllIterationAndWatermark,
        3 => Action::StopAllIterationAndBuffer,
        _ => Action::StopAllIterationAndWatermark,
    }
}

fn raw_action_body(r: i32, stopped: bool) -> Action {
    if stopped {
        return Action::StopIterationNoBuffer;
    }
    match r {
        0 => Action::Continue,
        1 => Action::StopIterationAndBuffer,
        2 => Action::StopIterationAndWatermark,
        _ => Action::StopIterationNoBuffer,
    }
}

fn raw_action_trailers(r: i32, stopped: bool) -> Action {
    if stopped || r != 0 {
        Action::StopIteration
    } else {
        Action::Continue
    }
}

impl Vm {
    pub(crate) fn start(h: &Harness, number: u64) -> Result<Vm, Error> {
        let settings = h.settings.clone();
        let limits = StoreLimitsBuilder::new()
            .memory_size(settings.memory_limit)
            .build();
        let data = VmData {
            abi: AbiState::default(),
            number,
            settings: settings.clone(),
            shared: h.shared.clone(),
            metric_ids: MetricIds::default(),
            limits,
            rng: settings.seed ^ number.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            current: 0,
            effective: 0,
            root: 1,
            streams: HashMap::new(),
            phase: Phase::Idle,
            call_response: None,
            status: (0, Vec::new()),
            call_data: Vec::new(),
            tick_period: None,
            next_tick: None,
            pending_calls: BTreeMap::new(),
            next_token: 0,
            after: Vec::new(),
            stop_next: false,
            done_pending: false,
            done_called: false,
        };
        let mut store = Store::new(&h.engine, data);
        store.limiter(|d| &mut d.limits);
        if let Some(f) = settings.fuel {
            store.set_fuel(f).map_err(Error::Engine)?;
        }
        if settings.call_timeout.is_some() {
            store.set_epoch_deadline(EPOCH_SLICES);
        }
        let instance = h
            .linker
            .instantiate(&mut store, &h.module)
            .map_err(|e| match e.downcast_ref::<wasmtime::Trap>() {
                Some(_) => Error::Trap(Box::new(Trap::from_error("start", 0, &e))),
                None => Error::Instantiate(e),
            })?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or(Error::MissingExport("memory"))?;
        let alloc = match typed::<i32, i32>(&instance, &mut store, "malloc")? {
            Some(f) => f,
            None => typed::<i32, i32>(&instance, &mut store, "proxy_on_memory_allocate")?
                .ok_or(Error::MissingExport("proxy_on_memory_allocate"))?,
        };
        store.data_mut().abi.bind(memory, alloc);
        let abi = settings.abi;
        let exports = Exports {
            on_context_create: typed(&instance, &mut store, "proxy_on_context_create")?,
            on_vm_start: typed(&instance, &mut store, "proxy_on_vm_start")?,
            on_configure: typed(&instance, &mut store, "proxy_on_configure")?,
            on_request_headers: headers_fn(&instance, &mut store, "proxy_on_request_headers", abi)?,
            on_request_body: typed(&instance, &mut store, "proxy_on_request_body")?,
            on_request_trailers: typed(&instance, &mut store, "proxy_on_request_trailers")?,
            on_response_headers: headers_fn(
                &instance,
                &mut store,
                "proxy_on_response_headers",
                abi,
            )?,
            on_response_body: typed(&instance, &mut store, "proxy_on_response_body")?,
            on_response_trailers: typed(&instance, &mut store, "proxy_on_response_trailers")?,
            on_done: typed(&instance, &mut store, "proxy_on_done")?,
            on_log: typed(&instance, &mut store, "proxy_on_log")?,
            on_delete: typed(&instance, &mut store, "proxy_on_delete")?,
            on_tick: typed(&instance, &mut store, "proxy_on_tick")?,
            on_queue_ready: typed(&instance, &mut store, "proxy_on_queue_ready")?,
            on_http_call_response: typed(&instance, &mut store, "proxy_on_http_call_response")?,
            on_foreign_function: typed(&instance, &mut store, "proxy_on_foreign_function")?,
        };
        let initialize = typed::<(), ()>(&instance, &mut store, "_initialize")?;
        let start = typed::<(), ()>(&instance, &mut store, "_start")?;
        let mut vm = Vm {
            store,
            instance,
            exports,
            fuel: settings.fuel,
            timeout: settings.call_timeout.is_some(),
            failure_policy: settings.failure_policy,
            failed: None,
            next_context: 2,
            pumping: false,
            fuel_used: 0,
        };
        // A WASI reactor is initialised with `_initialize`, a command with `_start`.
        if let Some(f) = initialize.or(start) {
            vm.guest("_initialize", 0, &f, ()).map_err(Error::Trap)?;
        }
        let root = 1;
        if let Some(f) = vm.exports.on_context_create.clone() {
            vm.guest("proxy_on_context_create", root, &f, (root as i32, 0))
                .map_err(Error::Trap)?;
        }
        if let Some(f) = vm.exports.on_vm_start.clone() {
            vm.store.data_mut().phase = Phase::VmStart;
            let len = settings.vm_config.len() as i32;
            let ok = vm.guest("proxy_on_vm_start", root, &f, (root as i32, len));
            vm.store.data_mut().phase = Phase::Idle;
            if ok.map_err(Error::Trap)? == 0 {
                return Err(Error::VmStartFailed);
            }
        }
        vm.run_after();
        vm.configure()?;
        Ok(vm)
    }

    /// Runs `on_configure` with the harness's plugin configuration (again).
    pub fn configure(&mut self) -> Result<(), Error> {
        let Some(f) = self.exports.on_configure.clone() else {
            return Ok(());
        };
        let len = self.store.data().settings.plugin_config.len() as i32;
        self.store.data_mut().phase = Phase::Configure;
        let ok = self.guest("proxy_on_configure", 1, &f, (1, len));
        self.store.data_mut().phase = Phase::Idle;
        if ok.map_err(Error::Trap)? == 0 {
            return Err(Error::ConfigureFailed);
        }
        self.run_after();
        self.pump();
        Ok(())
    }

    fn guest<P, R>(
        &mut self,
        name: &'static str,
        ctx: u32,
        f: &TypedFunc<P, R>,
        params: P,
    ) -> Result<R, Box<Trap>>
    where
        P: wasmtime::WasmParams,
        R: wasmtime::WasmResults,
    {
        if let Some(t) = &self.failed {
            return Err(t.clone());
        }
        {
            let d = self.store.data_mut();
            d.current = ctx;
            d.effective = 0;
        }
        if let Some(fuel) = self.fuel {
            let _ = self.store.set_fuel(fuel);
        }
        if self.timeout {
            self.store.set_epoch_deadline(EPOCH_SLICES);
        }
        let r = f.call(&mut self.store, params);
        if let Some(budget) = self.fuel {
            self.fuel_used += budget.saturating_sub(self.store.get_fuel().unwrap_or(budget));
        }
        match r {
            Ok(r) => Ok(r),
            Err(e) => {
                let t = Box::new(Trap::from_error(name, ctx, &e));
                self.failed = Some(t.clone());
                Err(t)
            }
        }
    }

    /// The trap that failed this VM, if any.
    pub fn failure(&self) -> Option<&Trap> {
        self.failed.as_deref()
    }

    /// Fuel the guest has used in callbacks so far (about one unit per Wasm instruction),
    /// when the harness sets a fuel budget: a deterministic measure of guest work.
    pub fn fuel_consumed(&self) -> u64 {
        self.fuel_used
    }

    /// This VM's number in its harness (1, 2, ...).
    pub fn number(&self) -> u64 {
        self.store.data().number
    }

    /// The harness state shared with other VMs.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.store.data().shared
    }

    /// The tick period the root context set, if any.
    pub fn tick_period(&self) -> Option<Duration> {
        self.store.data().tick_period
    }

    /// Tokens of `http_call`s not answered yet.
    pub fn pending_http_calls(&self) -> Vec<u32> {
        self.store.data().pending_calls.keys().copied().collect()
    }

    /// Answers a pending `http_call` now (for calls whose cluster said [`CallReply::Never`]).
    pub fn answer_http_call(
        &mut self,
        token: u32,
        reply: Option<HttpCallResponse>,
    ) -> Result<(), Error> {
        let Some(mut call) = self.store.data_mut().pending_calls.remove(&token) else {
            return Err(Error::Usage(format!(
                "no pending http_call with token {token}"
            )));
        };
        call.outcome = match reply {
            Some(r) => Outcome::Respond(r),
            None => Outcome::Fail,
        };
        let r = self.deliver_call(call);
        self.pump();
        r
    }

    /// Calls `proxy_on_foreign_function` on the root context with `args` as call data.
    pub fn call_foreign_callback(&mut self, function_id: u32, args: &[u8]) -> Result<(), Error> {
        let Some(f) = self.exports.on_foreign_function.clone() else {
            return Ok(());
        };
        self.store.data_mut().call_data = args.to_vec();
        let r = self.guest(
            "proxy_on_foreign_function",
            1,
            &f,
            (1, function_id as i32, args.len() as i32),
        );
        self.store.data_mut().call_data.clear();
        r.map_err(Error::Trap)?;
        self.run_after();
        self.pump();
        Ok(())
    }

    /// Moves the virtual clock forward by `d`, firing this VM's ticks and delivering its
    /// `http_call` answers as they fall due, in time order.
    pub fn advance(&mut self, d: Duration) -> Result<(), Error> {
        let clock_target = self.store.data().shared.clock.elapsed() + d;
        let mut result = Ok(());
        loop {
            let data = self.store.data();
            let next_call = data
                .pending_calls
                .values()
                .filter_map(|c| c.due.map(|d| (d, c.token)))
                .min();
            let next_tick = data.next_tick;
            let (at, call) = match (next_call, next_tick) {
                (Some((cd, t)), Some(td)) if cd <= td => (cd, Some(t)),
                (_, Some(td)) => (td, None),
                (Some((cd, t)), None) => (cd, Some(t)),
                (None, None) => break,
            };
            if at > clock_target {
                break;
            }
            self.store.data().shared.clock.set_elapsed(at);
            let r = match call {
                Some(token) => match self.store.data_mut().pending_calls.remove(&token) {
                    Some(c) => self.deliver_call(c),
                    None => Ok(()),
                },
                None => self.tick(),
            };
            if result.is_ok() {
                result = r;
            }
            self.pump();
            if self.failed.is_some() && self.store.data().next_tick.is_some() {
                // A failed VM gets no more ticks.
                self.store.data_mut().next_tick = None;
            }
        }
        self.store.data().shared.clock.set_elapsed(clock_target);
        self.pump();
        result
    }

    fn tick(&mut self) -> Result<(), Error> {
        let period = self.store.data().tick_period;
        {
            let d = self.store.data_mut();
            d.next_tick = period.map(|p| d.shared.clock.elapsed() + p);
        }
        let Some(f) = self.exports.on_tick.clone() else {
            return Ok(());
        };
        if self.failed.is_some() {
            return Ok(());
        }
        self.guest("proxy_on_tick", 1, &f, 1).map_err(Error::Trap)?;
        self.run_after();
        Ok(())
    }

    fn deliver_call(&mut self, call: PendingCall) -> Result<(), Error> {
        let Some(f) = self.exports.on_http_call_response.clone() else {
            return Ok(());
        };
        if self.failed.is_some() {
            return Ok(());
        }
        let (resp, status) = match call.outcome {
            Outcome::Respond(r) => (Some(r), (0, Vec::new())),
            Outcome::Fail => (None, (Status::BrokenConnection as u32, b"reset".to_vec())),
            // Envoy's async client answers a timeout with its own 504.
            Outcome::Timeout => (
                Some(HttpCallResponse {
                    headers: vec![
                        (":status".into(), "504".into()),
                        ("content-length".into(), "24".into()),
                        ("content-type".into(), "text/plain".into()),
                    ],
                    body: b"upstream request timeout".to_vec(),
                    trailers: Vec::new(),
                }),
                (0, Vec::new()),
            ),
        };
        let (nh, nb, nt) = resp.as_ref().map_or((0, 0, 0), |r| {
            (r.headers.len(), r.body.len(), r.trailers.len())
        });
        {
            let d = self.store.data_mut();
            d.call_response = resp;
            d.status = status;
            d.phase = Phase::CallResponse;
        }
        let r = self.guest(
            "proxy_on_http_call_response",
            1,
            &f,
            (1, call.token as i32, nh as i32, nb as i32, nt as i32),
        );
        {
            let d = self.store.data_mut();
            d.call_response = None;
            d.status = (0, Vec::new());
            d.phase = Phase::Idle;
        }
        if let Err(t) = r {
            self.fail_all_streams();
            return Err(Error::Trap(t));
        }
        self.run_after();
        Ok(())
    }

    /// Delivers what is due now: `http_call` answers with no delay and `on_queue_ready`
    /// for this VM's queues. Runs after every driver step, never inside a callback.
    fn pump(&mut self) {
        if self.pumping {
            return;
        }
        self.pumping = true;
        for _ in 0..10_000 {
            let now = self.store.data().shared.clock.elapsed();
            let due = self
                .store
                .data()
                .pending_calls
                .values()
                .find(|c| c.due.is_some_and(|d| d <= now))
                .map(|c| c.token);
            if let Some(token) = due {
                if let Some(c) = self.store.data_mut().pending_calls.remove(&token) {
                    let _ = self.deliver_call(c);
                }
                continue;
            }
            let number = self.store.data().number;
            let notes = self.store.data().shared.take_notifications(number);
            if notes.is_empty() {
                break;
            }
            for (owner, token) in notes {
                if let Some(f) = self.exports.on_queue_ready.clone() {
                    if self.failed.is_none() {
                        let r = self.guest(
                            "proxy_on_queue_ready",
                            owner.root_context,
                            &f,
                            (owner.root_context as i32, token as i32),
                        );
                        if r.is_err() {
                            self.fail_all_streams();
                        }
                        self.run_after();
                    }
                }
            }
        }
        self.pumping = false;
    }

    /// Delivers pending `on_queue_ready` notifications and due `http_call` answers (e.g.
    /// after another VM enqueued into this VM's queue).
    pub fn poll(&mut self) {
        self.pump();
    }

    /// Shuts the root context down: `on_done`, and `on_delete` once done (immediately if
    /// `on_done` returned true, else after the guest calls `proxy_done`). Returns whether
    /// the root context was deleted.
    pub fn shutdown(&mut self) -> Result<bool, Error> {
        let mut done = true;
        if let Some(f) = self.exports.on_done.clone() {
            done = self.guest("proxy_on_done", 1, &f, 1).map_err(Error::Trap)? != 0;
        }
        self.run_after();
        if !done {
            self.store.data_mut().done_pending = true;
            self.pump();
            if !self.store.data().done_called {
                return Ok(false);
            }
        }
        if let Some(f) = self.exports.on_delete.clone() {
            self.guest("proxy_on_delete", 1, &f, 1)
                .map_err(Error::Trap)?;
        }
        Ok(true)
    }

    /// Whether a root context that was shutting down has called `proxy_done`.
    pub fn done_called(&self) -> bool {
        self.store.data().done_called
    }

    fn run_after(&mut self) {
        loop {
            let actions: Vec<After> = std::mem::take(&mut self.store.data_mut().after);
            if actions.is_empty() {
                return;
            }
            for a in actions {
                match a {
                    After::Reply(id, r) => self.local_reply(id, r),
                    After::Continue(id, StreamType::Request) => self.resume(id, Side::Req),
                    After::Continue(id, _) => self.resume(id, Side::Resp),
                    After::Close(id) => {
                        if let Some(s) = self.store.data_mut().streams.get_mut(&id) {
                            s.reset = Some("wasm_close_stream".into());
                            s.req.stop = Stop::None;
                            s.resp.stop = Stop::None;
                        }
                    }
                }
            }
        }
    }

    // ---- HTTP streams -------------------------------------------------------------

    /// Opens an HTTP stream (a new context under the root; `on_context_create` runs).
    pub fn open_stream(&mut self) -> Result<StreamId, Error> {
        let id = self.next_context;
        self.next_context += 1;
        self.store.data_mut().streams.insert(
            id,
            StreamState {
                req: Dir::new(),
                resp: Dir::new(),
                local_reply: None,
                reset: None,
                fail_sent: false,
                finished: false,
                log_phase: false,
                head: false,
                properties: HashMap::new(),
            },
        );
        if self.failed.is_none() {
            if let Some(f) = self.exports.on_context_create.clone() {
                if let Err(t) = self.guest("proxy_on_context_create", id, &f, (id as i32, 1)) {
                    self.on_trap(id);
                    return Err(Error::Trap(t));
                }
            }
        }
        Ok(id)
    }

    /// A driver for stream `id`.
    pub fn stream(&mut self, id: StreamId) -> HttpStream<'_> {
        HttpStream { vm: self, id }
    }

    /// Opens a stream and returns its driver.
    pub fn http_stream(&mut self) -> Result<HttpStream<'_>, Error> {
        let id = self.open_stream()?;
        Ok(HttpStream { vm: self, id })
    }

    fn st(&mut self, id: StreamId) -> Result<&mut StreamState, Error> {
        self.store
            .data_mut()
            .streams
            .get_mut(&id)
            .ok_or(Error::NoSuchStream(id))
    }

    fn is_over(&mut self, id: StreamId) -> Result<bool, Error> {
        let s = self.st(id)?;
        Ok(s.finished || s.local_reply.is_some() || s.reset.is_some())
    }

    /// Applies the failure policy to a stream whose VM has failed (Envoy's `CHECK_FAIL`):
    /// `Some(action)` if the filter must not be called.
    fn check_fail(&mut self, id: StreamId, side: Side) -> Option<Action> {
        self.failed.as_ref()?;
        match self.failure_policy {
            FailurePolicy::FailOpen => None,
            FailurePolicy::FailClosed => {
                self.fail_stream(id);
                Some(match side {
                    Side::Req | Side::Resp => Action::NotCalled,
                })
            }
        }
    }

    fn fail_stream(&mut self, id: StreamId) {
        let Ok(s) = self.st(id) else { return };
        if s.fail_sent || s.finished {
            return;
        }
        s.fail_sent = true;
        s.req.stop = Stop::None;
        s.resp.stop = Stop::None;
        if s.resp.out.headers.is_some() {
            // Too late for a reply: the client sees a reset.
            s.reset = Some("wasm_fail_stream".into());
            return;
        }
        let reply = LocalReply {
            status: 503,
            details: "wasm_fail_stream".into(),
            body: Vec::new(),
            headers: Vec::new(),
        };
        s.resp.out = Message {
            headers: Some(vec![
                (":status".into(), "503".into()),
                ("content-length".into(), "0".into()),
            ]),
            body: Vec::new(),
            trailers: None,
            complete: true,
        };
        s.resp.out_raw = s.resp.out.headers.as_ref().map(to_pairs);
        s.local_reply = Some(reply);
    }

    fn fail_all_streams(&mut self) {
        if self.failure_policy == FailurePolicy::FailClosed {
            let ids: Vec<u32> = self.store.data().streams.keys().copied().collect();
            for id in ids {
                let active = self.store.data().streams.get(&id).is_some_and(|s| {
                    !s.finished && (s.req.stop != Stop::None || s.resp.stop != Stop::None)
                });
                if active {
                    self.fail_stream(id);
                }
            }
        }
    }

    fn on_trap(&mut self, id: StreamId) {
        match self.failure_policy {
            FailurePolicy::FailClosed => self.fail_stream(id),
            FailurePolicy::FailOpen => {}
        }
        self.fail_all_streams();
    }

    fn forward_headers(&mut self, id: StreamId, side: Side) {
        let Ok(s) = self.st(id) else { return };
        let d = s.dir(side);
        d.headers_live = false;
        d.stop = Stop::None;
        d.out.headers = Some(to_headers(&d.headers));
        d.out_raw = Some(d.headers.clone());
        if d.got_end && d.pending.is_empty() && d.pending_trailers.is_none() && d.body.is_empty() {
            d.out.complete = true;
        }
    }

    fn forward_body(&mut self, id: StreamId, side: Side, end: bool) {
        let Ok(s) = self.st(id) else { return };
        let d = s.dir(side);
        d.body_live = false;
        d.stop = Stop::None;
        let b = std::mem::take(&mut d.body);
        d.out.body.extend_from_slice(&b);
        if end && d.trailers.is_none() {
            d.out.complete = true;
        }
    }

    fn headers_callback(
        &mut self,
        id: StreamId,
        side: Side,
        headers: Pairs,
        end: bool,
    ) -> Result<Action, Error> {
        if self.is_over(id)? {
            return Ok(Action::NotCalled);
        }
        let n = headers.len();
        {
            let s = self.st(id)?;
            if side == Side::Req {
                s.head = headers
                    .iter()
                    .any(|(k, v)| k == b":method" && v.eq_ignore_ascii_case(b"HEAD"));
            }
            let d = s.dir(side);
            d.headers = headers;
            d.headers_live = true;
            d.got_end = end;
        }
        if let Some(a) = self.check_fail(id, side) {
            return Ok(a);
        }
        let f = match side {
            Side::Req => self.exports.on_request_headers.clone(),
            Side::Resp => self.exports.on_response_headers.clone(),
        };
        let name = match side {
            Side::Req => "proxy_on_request_headers",
            Side::Resp => "proxy_on_response_headers",
        };
        let n = n as i32;
        self.store.data_mut().stop_next = false;
        let r = match f {
            None => Ok(0),
            Some(HeadersFn::V1(f)) => self.guest(name, id, &f, (id as i32, n)),
            Some(HeadersFn::V2(f)) => self.guest(name, id, &f, (id as i32, n, end as i32)),
        };
        let raw = match r {
            Ok(r) => r,
            Err(t) => {
                self.on_trap(id);
                if self.failure_policy == FailurePolicy::FailOpen {
                    self.forward_headers(id, side);
                }
                return Err(Error::Trap(t));
            }
        };
        let stopped = std::mem::take(&mut self.store.data_mut().stop_next);
        let action = raw_action_headers(raw, stopped);
        if action == Action::Continue {
            self.forward_headers(id, side);
        } else {
            self.st(id)?.dir(side).stop = Stop::Headers;
        }
        self.run_after();
        Ok(action)
    }

    fn body_callback(
        &mut self,
        id: StreamId,
        side: Side,
        chunk: &[u8],
        end: bool,
    ) -> Result<Action, Error> {
        if self.is_over(id)? {
            return Ok(Action::NotCalled);
        }
        let limit = self.store.data().settings.buffer_limit;
        {
            let s = self.st(id)?;
            let d = s.dir(side);
            if d.stop == Stop::Headers || d.stop == Stop::Trailers {
                // The filter is paused: the host holds the data (Envoy buffers it).
                d.pending.extend_from_slice(chunk);
                d.pending_end |= end;
                if d.pending.len() > limit {
                    self.buffer_overflow(id, side);
                }
                return Ok(Action::NotCalled);
            }
            d.body.extend_from_slice(chunk);
            d.got_end |= end;
        }
        self.call_body(id, side, end)
    }

    fn call_body(&mut self, id: StreamId, side: Side, end: bool) -> Result<Action, Error> {
        if let Some(a) = self.check_fail(id, side) {
            return Ok(a);
        }
        let len = {
            let d = self.st(id)?.dir(side);
            d.body_live = true;
            d.body.len()
        };
        let (f, name) = match side {
            Side::Req => (
                self.exports.on_request_body.clone(),
                "proxy_on_request_body",
            ),
            Side::Resp => (
                self.exports.on_response_body.clone(),
                "proxy_on_response_body",
            ),
        };
        self.store.data_mut().stop_next = false;
        let r = match f {
            None => Ok(0),
            Some(f) => self.guest(name, id, &f, (id as i32, len as i32, end as i32)),
        };
        let raw = match r {
            Ok(r) => r,
            Err(t) => {
                self.on_trap(id);
                if self.failure_policy == FailurePolicy::FailOpen {
                    self.forward_body(id, side, end);
                }
                return Err(Error::Trap(t));
            }
        };
        let stopped = std::mem::take(&mut self.store.data_mut().stop_next);
        let action = raw_action_body(raw, stopped);
        match action {
            Action::Continue => self.forward_body(id, side, end),
            Action::StopIterationNoBuffer => {
                let d = self.st(id)?.dir(side);
                d.body.clear();
                d.body_live = false;
                d.stop = Stop::Body;
            }
            _ => {
                let limit = self.store.data().settings.buffer_limit;
                let d = self.st(id)?.dir(side);
                d.stop = Stop::Body;
                if d.body.len() > limit {
                    self.buffer_overflow(id, side);
                }
            }
        }
        self.run_after();
        Ok(action)
    }

    fn trailers_callback(
        &mut self,
        id: StreamId,
        side: Side,
        trailers: Headers,
    ) -> Result<Action, Error> {
        if self.is_over(id)? {
            return Ok(Action::NotCalled);
        }
        {
            let d = self.st(id)?.dir(side);
            d.got_end = true;
            if d.stop == Stop::Headers {
                d.pending_trailers = Some(to_pairs(&trailers));
                return Ok(Action::NotCalled);
            }
            d.trailers = Some(to_pairs(&trailers));
            d.trailers_live = true;
        }
        if let Some(a) = self.check_fail(id, side) {
            return Ok(a);
        }
        let (f, name) = match side {
            Side::Req => (
                self.exports.on_request_trailers.clone(),
                "proxy_on_request_trailers",
            ),
            Side::Resp => (
                self.exports.on_response_trailers.clone(),
                "proxy_on_response_trailers",
            ),
        };
        self.store.data_mut().stop_next = false;
        let r = match f {
            None => Ok(0),
            Some(f) => self.guest(name, id, &f, (id as i32, trailers.len() as i32)),
        };
        let raw = match r {
            Ok(r) => r,
            Err(t) => {
                self.on_trap(id);
                if self.failure_policy == FailurePolicy::FailOpen {
                    self.forward_trailers(id, side);
                }
                return Err(Error::Trap(t));
            }
        };
        let stopped = std::mem::take(&mut self.store.data_mut().stop_next);
        let action = raw_action_trailers(raw, stopped);
        if action == Action::Continue {
            self.forward_trailers(id, side);
        } else {
            self.st(id)?.dir(side).stop = Stop::Trailers;
        }
        self.run_after();
        Ok(action)
    }

    fn forward_trailers(&mut self, id: StreamId, side: Side) {
        let Ok(s) = self.st(id) else { return };
        let d = s.dir(side);
        let b = std::mem::take(&mut d.body);
        d.out.body.extend_from_slice(&b);
        d.body_live = false;
        d.trailers_live = false;
        d.stop = Stop::None;
        d.out.trailers = d.trailers.as_ref().map(to_headers);
        d.out.complete = true;
    }

    /// Envoy answers a buffer over its limit with 413 (request) or 500 (response).
    fn buffer_overflow(&mut self, id: StreamId, side: Side) {
        let (status, body, details) = match side {
            Side::Req => (413, "Payload Too Large", "request_payload_too_large"),
            Side::Resp => (500, "Internal Server Error", "response_payload_too_large"),
        };
        self.host_reply(id, status, body, details);
    }

    fn host_reply(&mut self, id: StreamId, status: u32, body: &str, details: &str) {
        let Ok(s) = self.st(id) else { return };
        s.req.stop = Stop::None;
        s.resp.stop = Stop::None;
        if s.resp.out.headers.is_some() {
            s.reset = Some(details.into());
            return;
        }
        s.local_reply = Some(LocalReply {
            status,
            details: details.into(),
            body: body.as_bytes().to_vec(),
            headers: Vec::new(),
        });
        s.resp.out = Message {
            headers: Some(vec![
                (":status".into(), status.to_string()),
                ("content-length".into(), body.len().to_string()),
                ("content-type".into(), "text/plain".into()),
            ]),
            body: body.as_bytes().to_vec(),
            trailers: None,
            complete: true,
        };
        s.resp.out_raw = s.resp.out.headers.as_ref().map(to_pairs);
    }

    /// Resumes a direction (Envoy's `continueDecoding`/`continueEncoding`).
    fn resume(&mut self, id: StreamId, side: Side) {
        let Ok(stop) = self.st(id).map(|s| s.dir(side).stop) else {
            return;
        };
        match stop {
            Stop::None => {}
            Stop::Headers => {
                self.forward_headers(id, side);
                let (pending, end, trailers) = {
                    let Ok(s) = self.st(id) else { return };
                    let d = s.dir(side);
                    (
                        std::mem::take(&mut d.pending),
                        std::mem::replace(&mut d.pending_end, false),
                        d.pending_trailers.take(),
                    )
                };
                if !pending.is_empty() || (end && trailers.is_none()) {
                    if let Ok(s) = self.st(id) {
                        let d = s.dir(side);
                        d.body.extend_from_slice(&pending);
                        d.got_end |= end;
                    }
                    // Envoy hands the held data to this filter first.
                    let _ = self.call_body(id, side, end && trailers.is_none());
                }
                if let Some(t) = trailers {
                    let _ = self.trailers_callback(id, side, to_headers(&t));
                }
            }
            Stop::Body => {
                let end = self.st(id).map(|s| s.dir(side).got_end).unwrap_or(false);
                let has_trailers = self
                    .st(id)
                    .map(|s| s.dir(side).trailers.is_some())
                    .unwrap_or(false);
                if has_trailers {
                    self.forward_trailers(id, side);
                } else {
                    self.forward_body(id, side, end);
                }
            }
            Stop::Trailers => self.forward_trailers(id, side),
        }
    }

    fn local_reply(&mut self, id: StreamId, r: LocalResponse) {
        let Ok(s) = self.st(id) else { return };
        if s.local_reply.is_some() || s.finished {
            return;
        }
        let head = s.head;
        // Bytes throughout: the filter's header values may hold obs-text.
        let mut headers: Pairs = vec![(b":status".to_vec(), r.status.to_string().into_bytes())];
        let extra = r.headers.to_pairs();
        let has_ct = extra
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(b"content-type"));
        // As observed from Envoy 1.40 (tests/differential.rs): a local reply always has
        // content-length, text/plain unless the filter set a type, and a 204 or 304 has
        // neither length nor type, whatever the filter added.
        let bodiless = r.status == 204 || r.status == 304;
        if !bodiless {
            headers.push((
                b"content-length".to_vec(),
                r.body.len().to_string().into_bytes(),
            ));
            if !r.body.is_empty() && !has_ct {
                headers.push((b"content-type".to_vec(), b"text/plain".to_vec()));
            }
        }
        headers.extend(
            extra
                .iter()
                .map(|(k, v)| (lower(k), v.clone()))
                .filter(|(k, _)| !(bodiless && (k == b"content-type" || k == b"content-length"))),
        );
        s.local_reply = Some(LocalReply {
            status: r.status,
            details: r.details.replace(' ', "_"),
            body: r.body.clone(),
            headers: to_headers(&extra),
        });
        s.req.stop = Stop::None;
        s.req.headers_live = false;
        s.req.body_live = false;
        let response_started = s.resp.out.headers.is_some() || s.resp.headers_live;
        if response_started {
            // From the response path: the reply replaces what the upstream sent.
            s.resp = Dir::new();
            s.resp.out = Message {
                headers: Some(to_headers(&headers)),
                body: if head { Vec::new() } else { r.body },
                trailers: None,
                complete: true,
            };
            s.resp.out_raw = Some(headers);
            return;
        }
        // From the request path: the reply passes this filter's response callbacks.
        s.resp = Dir::new();
        let body = if head { Vec::new() } else { r.body };
        let end = body.is_empty();
        let saved = s.local_reply.take();
        let _ = self.headers_callback(id, Side::Resp, headers, end);
        if !end {
            let _ = self.body_callback(id, Side::Resp, &body, true);
        }
        if let Ok(s) = self.st(id) {
            s.local_reply = saved;
            // The reply is sent whatever the response callbacks returned.
            let d = &mut s.resp;
            if d.out.headers.is_none() {
                d.out.headers = Some(to_headers(&d.headers));
                d.out_raw = Some(d.headers.clone());
            }
            if !d.out.complete {
                let b = std::mem::take(&mut d.body);
                d.out.body.extend_from_slice(&b);
                d.out.complete = true;
            }
            d.stop = Stop::None;
            d.headers_live = false;
            d.body_live = false;
        }
    }

    /// Ends the stream: `on_log` (with the final maps readable), `on_done`, `on_delete`.
    pub fn finish_stream(&mut self, id: StreamId) -> Result<(), Error> {
        {
            let s = self.st(id)?;
            if s.finished {
                return Ok(());
            }
            s.finished = true;
            s.log_phase = true;
            for d in [&mut s.req, &mut s.resp] {
                d.headers_live = false;
                d.body_live = false;
                d.trailers_live = false;
            }
        }
        let mut result = Ok(());
        if self.failed.is_none() {
            if let Some(f) = self.exports.on_log.clone() {
                if let Err(t) = self.guest("proxy_on_log", id, &f, id as i32) {
                    result = Err(Error::Trap(t));
                }
            }
        }
        if let Ok(s) = self.st(id) {
            s.log_phase = false;
        }
        if self.failed.is_none() {
            if let Some(f) = self.exports.on_done.clone() {
                if let Err(t) = self.guest("proxy_on_done", id, &f, id as i32) {
                    result = Err(Error::Trap(t));
                }
            }
        }
        if self.failed.is_none() {
            if let Some(f) = self.exports.on_delete.clone() {
                if let Err(t) = self.guest("proxy_on_delete", id, &f, id as i32) {
                    result = Err(Error::Trap(t));
                }
            }
        }
        self.store.data_mut().after.clear();
        self.pump();
        result
    }

    /// What reached the upstream on stream `id`.
    pub fn upstream_request(&self, id: StreamId) -> Option<&Message> {
        self.store.data().streams.get(&id).map(|s| &s.req.out)
    }

    /// What reached the client on stream `id`.
    pub fn client_response(&self, id: StreamId) -> Option<&Message> {
        self.store.data().streams.get(&id).map(|s| &s.resp.out)
    }

    /// The headers that reached the upstream on stream `id`, as bytes.
    pub fn upstream_request_header_bytes(&self, id: StreamId) -> Option<&Pairs> {
        self.store.data().streams.get(&id)?.req.out_raw.as_ref()
    }

    /// The headers that reached the client on stream `id`, as bytes (obs-text intact).
    pub fn client_response_header_bytes(&self, id: StreamId) -> Option<&Pairs> {
        self.store.data().streams.get(&id)?.resp.out_raw.as_ref()
    }

    /// The local reply on stream `id`, if one was sent.
    pub fn local_reply_of(&self, id: StreamId) -> Option<&LocalReply> {
        self.store.data().streams.get(&id)?.local_reply.as_ref()
    }

    /// Why stream `id` was reset, if it was (`wasm_close_stream`, `wasm_fail_stream`, ...).
    pub fn reset_of(&self, id: StreamId) -> Option<&str> {
        self.store.data().streams.get(&id)?.reset.as_deref()
    }

    /// Whether the request or response of stream `id` is held at the filter.
    pub fn is_paused(&self, id: StreamId) -> bool {
        self.store
            .data()
            .streams
            .get(&id)
            .is_some_and(|s| s.req.stop != Stop::None || s.resp.stop != Stop::None)
    }

    /// Drops finished streams' records (long benchmarks).
    pub fn forget_finished(&mut self) {
        self.store.data_mut().streams.retain(|_, s| !s.finished);
    }

    /// Calls any guest export with integer arguments in context `ctx` (a stream id, or 1
    /// for the root), then applies the host calls it made (local reply, continue, ...).
    /// Lets tests run host calls at a chosen moment through a guest trampoline.
    pub fn call_export(&mut self, ctx: u32, name: &str, args: &[i64]) -> Result<Vec<i64>, Error> {
        use wasmtime::{Val, ValType};
        let f = self
            .store
            .data()
            .abi
            .memory()
            .and(self.instance_func(name))
            .ok_or_else(|| Error::Usage(format!("no exported function `{name}`")))?;
        let ty = f.ty(&self.store);
        let params: Vec<Val> = ty
            .params()
            .zip(args.iter().chain(std::iter::repeat(&0)))
            .map(|(t, a)| match t {
                ValType::I64 => Val::I64(*a),
                _ => Val::I32(*a as i32),
            })
            .collect();
        let mut results: Vec<Val> = ty.results().map(|_| Val::I32(0)).collect();
        if let Some(t) = &self.failed {
            return Err(Error::VmFailed(t.clone()));
        }
        {
            let d = self.store.data_mut();
            d.current = ctx;
            d.effective = 0;
        }
        if let Some(fuel) = self.fuel {
            let _ = self.store.set_fuel(fuel);
        }
        if self.timeout {
            self.store.set_epoch_deadline(EPOCH_SLICES);
        }
        if let Err(e) = f.call(&mut self.store, &params, &mut results) {
            let t = Box::new(Trap::from_error(name, ctx, &e));
            self.failed = Some(t.clone());
            return Err(Error::Trap(t));
        }
        self.run_after();
        self.pump();
        Ok(results
            .iter()
            .map(|v| match v {
                Val::I64(x) => *x,
                Val::I32(x) => i64::from(*x),
                _ => 0,
            })
            .collect())
    }

    fn instance_func(&mut self, name: &str) -> Option<wasmtime::Func> {
        self.instance.get_func(&mut self.store, name)
    }

    /// Copies `len` bytes of guest memory at `ptr` (None if out of bounds).
    pub fn read_memory(&self, ptr: u32, len: u32) -> Option<Vec<u8>> {
        let m = self.store.data().abi.memory()?;
        let data = m.data(&self.store);
        data.get(ptr as usize..ptr as usize + len as usize)
            .map(<[u8]>::to_vec)
    }

    /// Writes `bytes` into guest memory at `ptr` (false if out of bounds).
    pub fn write_memory(&mut self, ptr: u32, bytes: &[u8]) -> bool {
        let Some(m) = self.store.data().abi.memory() else {
            return false;
        };
        match m
            .data_mut(&mut self.store)
            .get_mut(ptr as usize..ptr as usize + bytes.len())
        {
            Some(d) => {
                d.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    }

    /// Bytes of linear memory the guest has now.
    pub fn memory_size(&self) -> usize {
        self.store
            .data()
            .abi
            .memory()
            .map_or(0, |m| m.data_size(&self.store))
    }
}

/// Drives one HTTP stream through the filter the way Envoy does: each step calls the
/// filter's callback, applies its action (forward, hold, buffer), then the host calls it
/// made (local reply, continue, close) and returns the action.
pub struct HttpStream<'a> {
    vm: &'a mut Vm,
    id: StreamId,
}

impl HttpStream<'_> {
    /// The stream's id (its context id).
    pub fn id(&self) -> StreamId {
        self.id
    }

    fn step<T>(
        &mut self,
        f: impl FnOnce(&mut Vm, StreamId) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let r = f(self.vm, self.id);
        self.vm.pump();
        r
    }

    /// Request headers arrive from the client.
    pub fn request_headers(
        &mut self,
        headers: Headers,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let headers = to_pairs(&headers);
        self.step(|vm, id| vm.headers_callback(id, Side::Req, headers, end_of_stream))
    }

    /// Request headers as raw bytes (names and values passed as given, any byte).
    pub fn request_header_bytes(
        &mut self,
        headers: Pairs,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        self.step(|vm, id| vm.headers_callback(id, Side::Req, headers, end_of_stream))
    }

    /// A request body chunk arrives.
    pub fn request_body(&mut self, chunk: &[u8], end_of_stream: bool) -> Result<Action, Error> {
        self.step(|vm, id| vm.body_callback(id, Side::Req, chunk, end_of_stream))
    }

    /// Request trailers arrive (ending the request).
    pub fn request_trailers(&mut self, trailers: Headers) -> Result<Action, Error> {
        self.step(|vm, id| vm.trailers_callback(id, Side::Req, trailers))
    }

    /// Response headers arrive from the upstream.
    pub fn response_headers(
        &mut self,
        headers: Headers,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let headers = to_pairs(&headers);
        self.step(|vm, id| vm.headers_callback(id, Side::Resp, headers, end_of_stream))
    }

    /// Response headers as raw bytes (names and values passed as given, any byte).
    pub fn response_header_bytes(
        &mut self,
        headers: Pairs,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        self.step(|vm, id| vm.headers_callback(id, Side::Resp, headers, end_of_stream))
    }

    /// A response body chunk arrives.
    pub fn response_body(&mut self, chunk: &[u8], end_of_stream: bool) -> Result<Action, Error> {
        self.step(|vm, id| vm.body_callback(id, Side::Resp, chunk, end_of_stream))
    }

    /// Response trailers arrive.
    pub fn response_trailers(&mut self, trailers: Headers) -> Result<Action, Error> {
        self.step(|vm, id| vm.trailers_callback(id, Side::Resp, trailers))
    }

    /// Resumes the request as Envoy's `continueDecoding` would.
    pub fn resume_request(&mut self) -> Result<(), Error> {
        self.step(|vm, id| {
            vm.resume(id, Side::Req);
            vm.run_after();
            Ok(())
        })
    }

    /// Resumes the response as Envoy's `continueEncoding` would.
    pub fn resume_response(&mut self) -> Result<(), Error> {
        self.step(|vm, id| {
            vm.resume(id, Side::Resp);
            vm.run_after();
            Ok(())
        })
    }

    /// Ends the stream (`on_log`, `on_done`, `on_delete`).
    pub fn finish(&mut self) -> Result<(), Error> {
        let id = self.id;
        self.vm.finish_stream(id)
    }

    /// What reached the upstream so far.
    pub fn upstream_request(&self) -> &Message {
        self.vm.upstream_request(self.id).expect("stream exists")
    }

    /// What reached the client so far.
    pub fn client_response(&self) -> &Message {
        self.vm.client_response(self.id).expect("stream exists")
    }

    /// The local reply, if one was sent.
    pub fn local_reply(&self) -> Option<&LocalReply> {
        self.vm.local_reply_of(self.id)
    }

    /// Why the stream was reset, if it was.
    pub fn reset(&self) -> Option<&str> {
        self.vm.reset_of(self.id)
    }

    /// Whether the stream is held at the filter.
    pub fn is_paused(&self) -> bool {
        self.vm.is_paused(self.id)
    }

    /// The VM.
    pub fn vm(&mut self) -> &mut Vm {
        self.vm
    }
}
