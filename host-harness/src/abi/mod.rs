//! The embeddable Proxy-Wasm ABI core.
//!
//! Each ABI area has its own module with a trait the embedder implements (the host state)
//! and a free `add_to_linker` function that links that area's host calls into a
//! [`wasmtime::Linker`]. The core only moves bytes between guest memory and the trait:
//! it checks every guest pointer and bounds every guest-controlled size by a named
//! constant in [`limits`], and returns the statuses Envoy returns.
//!
//! An embedder's store data implements [`AbiView`] (where the core keeps the guest's memory
//! and allocator) and the area traits; [`add_to_linker`] links every area for one ABI
//! version. The harness ([`crate::Harness`]) is one embedder; an nginx module is another.

pub mod buffers;
pub mod clock;
pub mod context;
pub mod foreign;
pub mod grpc;
pub mod headers;
pub mod http_call;
pub mod limits;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod pairs;
pub mod properties;
pub mod queues;
pub mod shared_data;
pub mod stream;
pub mod wasi;

use wasmtime::{Func, Linker, Memory, TypedFunc};

/// The Proxy-Wasm ABI versions a module can declare by exporting
/// `proxy_abi_version_X_Y_Z`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AbiVersion {
    /// 0.1.0: `proxy_continue_request`/`_response`, `proxy_get_configuration`, no
    /// end-of-stream flag on the header callbacks.
    V0_1_0,
    /// 0.2.0: `proxy_continue_stream`, `proxy_close_stream`.
    V0_2_0,
    /// 0.2.1: adds `proxy_get_log_level`.
    V0_2_1,
}

impl AbiVersion {
    /// The version a module declares by this export name, if it is one.
    pub fn from_export(name: &str) -> Option<AbiVersion> {
        match name {
            "proxy_abi_version_0_1_0" => Some(AbiVersion::V0_1_0),
            "proxy_abi_version_0_2_0" => Some(AbiVersion::V0_2_0),
            "proxy_abi_version_0_2_1" => Some(AbiVersion::V0_2_1),
            _ => None,
        }
    }

    /// `0.2.1` etc.
    pub fn as_str(self) -> &'static str {
        match self {
            AbiVersion::V0_1_0 => "0.1.0",
            AbiVersion::V0_2_0 => "0.2.0",
            AbiVersion::V0_2_1 => "0.2.1",
        }
    }
}

/// A host call's result code (`WasmResult` in the hosts, `Status` in the Rust SDK).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// The key, map, buffer or callback does not exist.
    NotFound = 1,
    /// An argument is invalid or the object is not available now.
    BadArgument = 2,
    /// A value could not be serialised.
    SerializationFailure = 3,
    /// A value could not be parsed.
    ParseFailure = 4,
    /// A property expression is invalid.
    BadExpression = 5,
    /// A guest pointer or length is outside linear memory.
    InvalidMemoryAccess = 6,
    /// A queue is empty.
    Empty = 7,
    /// A compare-and-swap found another version.
    CasMismatch = 8,
    /// Unused by Envoy; kept for completeness.
    ResultMismatch = 9,
    /// The host failed.
    InternalFailure = 10,
    /// The connection broke.
    BrokenConnection = 11,
    /// The host does not implement this call.
    Unimplemented = 12,
}

impl Status {
    /// The code as the guest sees it.
    pub fn code(self) -> i32 {
        self as u32 as i32
    }

    /// The status for a raw code, if it is one.
    pub fn from_code(code: u32) -> Option<Status> {
        use Status::*;
        Some(match code {
            0 => Ok,
            1 => NotFound,
            2 => BadArgument,
            3 => SerializationFailure,
            4 => ParseFailure,
            5 => BadExpression,
            6 => InvalidMemoryAccess,
            7 => Empty,
            8 => CasMismatch,
            9 => ResultMismatch,
            10 => InternalFailure,
            11 => BrokenConnection,
            12 => Unimplemented,
            _ => return None,
        })
    }
}

/// What a host call returns to its wrapper: a value, or the status to give the guest.
pub type HostResult<T> = Result<T, Status>;

/// Buffers the guest can read and write (`proxy_get_buffer_bytes` and friends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BufferType {
    /// The request body (the current chunk, or everything buffered).
    HttpRequestBody = 0,
    /// The response body.
    HttpResponseBody = 1,
    /// Network filter: data from downstream.
    DownstreamData = 2,
    /// Network filter: data from upstream.
    UpstreamData = 3,
    /// The body of an `http_call` response.
    HttpCallResponseBody = 4,
    /// A received gRPC message.
    GrpcReceiveBuffer = 5,
    /// The VM configuration (during `on_vm_start`).
    VmConfiguration = 6,
    /// The plugin configuration (during `on_configure`).
    PluginConfiguration = 7,
    /// Arguments of a foreign-function call.
    CallData = 8,
}

impl BufferType {
    /// The buffer type for a raw value, if it is one.
    pub fn from_raw(v: u32) -> Option<BufferType> {
        use BufferType::*;
        Some(match v {
            0 => HttpRequestBody,
            1 => HttpResponseBody,
            2 => DownstreamData,
            3 => UpstreamData,
            4 => HttpCallResponseBody,
            5 => GrpcReceiveBuffer,
            6 => VmConfiguration,
            7 => PluginConfiguration,
            8 => CallData,
            _ => return None,
        })
    }
}

/// Header maps (`proxy_get_header_map_pairs` and friends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapType {
    /// Request headers.
    HttpRequestHeaders = 0,
    /// Request trailers.
    HttpRequestTrailers = 1,
    /// Response headers.
    HttpResponseHeaders = 2,
    /// Response trailers.
    HttpResponseTrailers = 3,
    /// gRPC initial metadata received.
    GrpcReceiveInitialMetadata = 4,
    /// gRPC trailing metadata received.
    GrpcReceiveTrailingMetadata = 5,
    /// Headers of an `http_call` response.
    HttpCallResponseHeaders = 6,
    /// Trailers of an `http_call` response.
    HttpCallResponseTrailers = 7,
}

impl MapType {
    /// The map type for a raw value, if it is one.
    pub fn from_raw(v: u32) -> Option<MapType> {
        use MapType::*;
        Some(match v {
            0 => HttpRequestHeaders,
            1 => HttpRequestTrailers,
            2 => HttpResponseHeaders,
            3 => HttpResponseTrailers,
            4 => GrpcReceiveInitialMetadata,
            5 => GrpcReceiveTrailingMetadata,
            6 => HttpCallResponseHeaders,
            7 => HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// Streams for `proxy_continue_stream` and `proxy_close_stream`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamType {
    /// The HTTP request (decoding) direction.
    Request = 0,
    /// The HTTP response (encoding) direction.
    Response = 1,
    /// Network filter: downstream.
    Downstream = 2,
    /// Network filter: upstream.
    Upstream = 3,
}

impl StreamType {
    /// The stream type for a raw value, if it is one.
    pub fn from_raw(v: u32) -> Option<StreamType> {
        Some(match v {
            0 => StreamType::Request,
            1 => StreamType::Response,
            2 => StreamType::Downstream,
            3 => StreamType::Upstream,
            _ => return None,
        })
    }
}

/// Metric kinds (`proxy_define_metric`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricType {
    /// Only goes up.
    Counter = 0,
    /// Set, added to and subtracted from.
    Gauge = 1,
    /// Records samples.
    Histogram = 2,
}

impl MetricType {
    /// The metric type for a raw value, if it is one.
    pub fn from_raw(v: u32) -> Option<MetricType> {
        Some(match v {
            0 => MetricType::Counter,
            1 => MetricType::Gauge,
            2 => MetricType::Histogram,
            _ => return None,
        })
    }
}

/// Log levels (`proxy_log`), as Envoy numbers them.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Trace.
    Trace = 0,
    /// Debug.
    Debug = 1,
    /// Info.
    Info = 2,
    /// Warning.
    Warn = 3,
    /// Error.
    Error = 4,
    /// Critical.
    Critical = 5,
}

impl LogLevel {
    /// The level for a raw value, if it is one.
    pub fn from_raw(v: u32) -> Option<LogLevel> {
        Some(match v {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }
}

/// A header map as it crosses the ABI: ordered `(name, value)` byte pairs.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// What the core keeps per instance: the guest's memory and allocator.
#[derive(Default)]
pub struct AbiState {
    memory: Option<Memory>,
    alloc: Option<TypedFunc<i32, i32>>,
    /// The same function untyped: calling it needs no type-registry clone per call.
    alloc_func: Option<Func>,
}

impl AbiState {
    /// Records the instance's `memory` export and its allocator (`malloc` first, as
    /// Envoy looks for it, then `proxy_on_memory_allocate`). Call after instantiation
    /// and before any callback.
    pub fn bind(&mut self, memory: Memory, alloc: TypedFunc<i32, i32>) {
        self.memory = Some(memory);
        self.alloc_func = Some(*alloc.func());
        self.alloc = Some(alloc);
    }

    /// The guest's linear memory, once bound.
    pub fn memory(&self) -> Option<Memory> {
        self.memory
    }

    /// The guest's allocator, once bound.
    pub fn allocator(&self) -> Option<TypedFunc<i32, i32>> {
        self.alloc.clone()
    }

    /// The allocator as a plain [`Func`] (checked as `(i32) -> i32` when bound).
    pub(crate) fn allocator_func(&self) -> Option<Func> {
        self.alloc_func
    }
}

/// Gives the core access to its per-instance state inside the embedder's store data.
pub trait AbiView: 'static {
    /// The core's state.
    fn abi(&self) -> &AbiState;
}

/// Everything a full Proxy-Wasm host implements: every area's trait.
pub trait Host:
    AbiView
    + logging::LoggingHost
    + clock::ClockHost
    + buffers::BufferHost
    + headers::HeaderHost
    + properties::PropertyHost
    + stream::StreamHost
    + http_call::HttpCallHost
    + grpc::GrpcHost
    + shared_data::SharedDataHost
    + queues::QueueHost
    + metrics::MetricHost
    + foreign::ForeignHost
    + context::ContextHost
    + wasi::WasiHost
{
}

impl<T> Host for T where
    T: AbiView
        + logging::LoggingHost
        + clock::ClockHost
        + buffers::BufferHost
        + headers::HeaderHost
        + properties::PropertyHost
        + stream::StreamHost
        + http_call::HttpCallHost
        + grpc::GrpcHost
        + shared_data::SharedDataHost
        + queues::QueueHost
        + metrics::MetricHost
        + foreign::ForeignHost
        + context::ContextHost
        + wasi::WasiHost
{
}

/// Links every host call of `version` (and WASI) into `linker`, as Envoy does: calls
/// A module export as a typed function, for every embedder: `Ok(None)` when the module does
/// not export `name` (optional callbacks), an error when it does with another signature.
pub fn typed_export<T, P, R>(
    instance: &wasmtime::Instance,
    store: &mut wasmtime::Store<T>,
    name: &str,
) -> wasmtime::Result<Option<wasmtime::TypedFunc<P, R>>>
where
    P: wasmtime::WasmParams,
    R: wasmtime::WasmResults,
{
    match instance.get_func(&mut *store, name) {
        None => Ok(None),
        Some(f) => f.typed::<P, R>(&*store).map(Some),
    }
}

/// that belong to other versions are left out, so a module importing them fails to link.
pub fn add_to_linker<T: Host>(linker: &mut Linker<T>, version: AbiVersion) -> wasmtime::Result<()> {
    logging::add_to_linker(linker, version)?;
    clock::add_to_linker(linker)?;
    buffers::add_to_linker(linker, version)?;
    headers::add_to_linker(linker)?;
    properties::add_to_linker(linker)?;
    stream::add_to_linker(linker, version)?;
    http_call::add_to_linker(linker)?;
    grpc::add_to_linker(linker)?;
    shared_data::add_to_linker(linker)?;
    queues::add_to_linker(linker)?;
    metrics::add_to_linker(linker)?;
    foreign::add_to_linker(linker)?;
    context::add_to_linker(linker)?;
    wasi::add_to_linker(linker)?;
    Ok(())
}

/// Turns a host result into the status code the guest sees.
pub(crate) fn code<T>(r: HostResult<T>) -> i32 {
    match r {
        Ok(_) => Status::Ok.code(),
        Err(s) => s.code(),
    }
}
