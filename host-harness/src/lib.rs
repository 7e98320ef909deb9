//! A Proxy-Wasm host on Wasmtime, for testing and benchmarking filters without a proxy.
//!
//! - [`abi`]: the embeddable ABI core. One module per ABI area, each with a trait the
//!   embedder implements and a free `add_to_linker`. This crate's [`Vm`] is one embedder.
//! - [`Harness`]: loads a module (file or bytes), detects its ABI (0.1.0, 0.2.0, 0.2.1),
//!   and holds the host state its VMs share: shared data (Envoy's CAS rules, or Kong's),
//!   queues, metrics, logs, a virtual clock, scripted clusters for `http_call`.
//! - [`Vm`]: one instance (Envoy: one worker's VM); [`HttpStream`] drives a request
//!   through it the way Envoy does, so pauses, buffering and local replies are visible.
//! - [`scenario`]: the JSON scenario format the `proxy-wasm-harness` CLI runs.
//!
//! Where the harness and Envoy differ is listed in the crate's README.

#![deny(missing_docs)]

pub mod abi;
mod error;
pub mod exchange;
mod harness;
pub mod scenario;
mod vm;

pub use error::{Error, Frame, Trap, TrapKind};
pub use exchange::{Exchange, Request, Response};
pub use harness::{
    detect_abi, headers, CallReply, Clock, ClusterHandler, FailurePolicy, ForeignFunction, Harness,
    HarnessBuilder, Headers, HttpCallResponse, LogEntry, RecordedCall, Shared,
    DEFAULT_BUFFER_LIMIT,
};
pub use vm::{Action, HttpStream, LocalReply, Message, StreamId, Vm, VmData};
