//! gRPC: `proxy_grpc_call`, `proxy_grpc_stream`, `proxy_grpc_send`, `proxy_grpc_cancel`,
//! `proxy_grpc_close` and `proxy_get_status` (the status of the last gRPC close or failed
//! HTTP call, read inside the callback that reports it).

use super::limits::MAX_GUEST_BYTES;
use super::{code, memory, pairs, AbiView, HostResult, Pairs, Status};
use std::time::Duration;
use wasmtime::{Caller, Linker};

/// A gRPC call or stream as the guest asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcRequest {
    /// The service (Envoy: a serialised `GrpcService` or a cluster name).
    pub service: Vec<u8>,
    /// `package.Service`.
    pub service_name: String,
    /// Method name.
    pub method: String,
    /// Initial metadata.
    pub metadata: Pairs,
    /// The request message (calls only; empty for streams).
    pub message: Vec<u8>,
    /// Timeout (calls only).
    pub timeout: Duration,
}

/// The host side of gRPC. An embedder without gRPC returns `Unimplemented`.
pub trait GrpcHost {
    /// Starts a unary call; returns its token. Hosts without gRPC keep the default.
    fn grpc_call(&mut self, _r: GrpcRequest) -> HostResult<u32> {
        Err(Status::Unimplemented)
    }
    /// Opens a stream; returns its token.
    fn grpc_stream(&mut self, _r: GrpcRequest) -> HostResult<u32> {
        Err(Status::Unimplemented)
    }
    /// Sends a message on a stream.
    fn grpc_send(&mut self, _token: u32, _message: &[u8], _end_stream: bool) -> HostResult<()> {
        Err(Status::Unimplemented)
    }
    /// Cancels a call or resets a stream.
    fn grpc_cancel(&mut self, _token: u32) -> HostResult<()> {
        Err(Status::Unimplemented)
    }
    /// Closes a call or the local half of a stream.
    fn grpc_close(&mut self, _token: u32) -> HostResult<()> {
        Err(Status::Unimplemented)
    }
    /// The current status code and message (`proxy_get_status`).
    fn status(&mut self) -> (u32, Vec<u8>) {
        (0, Vec::new())
    }
}

/// Links the gRPC host calls.
pub fn add_to_linker<T: AbiView + GrpcHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut c: Caller<'_, T>,
         sp: i32,
         ss: i32,
         np: i32,
         ns: i32,
         mp: i32,
         ms: i32,
         hp: i32,
         hs: i32,
         rp: i32,
         rs: i32,
         timeout: i32,
         token_ptr: i32|
         -> i32 {
            let r = (|| {
                let req = GrpcRequest {
                    service: memory::read(&mut c, sp, ss, MAX_GUEST_BYTES)?,
                    service_name: memory::read_string(&mut c, np, ns, MAX_GUEST_BYTES)?,
                    method: memory::read_string(&mut c, mp, ms, MAX_GUEST_BYTES)?,
                    metadata: pairs::decode(&memory::read(&mut c, hp, hs, MAX_GUEST_BYTES)?)
                        .unwrap_or_default(),
                    message: memory::read(&mut c, rp, rs, MAX_GUEST_BYTES)?,
                    timeout: Duration::from_millis(u64::from(timeout as u32)),
                };
                let token = c.data_mut().grpc_call(req)?;
                memory::write_u32(&mut c, token_ptr, token)
            })();
            code(r)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |mut c: Caller<'_, T>,
         sp: i32,
         ss: i32,
         np: i32,
         ns: i32,
         mp: i32,
         ms: i32,
         hp: i32,
         hs: i32,
         token_ptr: i32|
         -> i32 {
            let r = (|| {
                let req = GrpcRequest {
                    service: memory::read(&mut c, sp, ss, MAX_GUEST_BYTES)?,
                    service_name: memory::read_string(&mut c, np, ns, MAX_GUEST_BYTES)?,
                    method: memory::read_string(&mut c, mp, ms, MAX_GUEST_BYTES)?,
                    metadata: pairs::decode(&memory::read(&mut c, hp, hs, MAX_GUEST_BYTES)?)
                        .unwrap_or_default(),
                    message: Vec::new(),
                    timeout: Duration::ZERO,
                };
                let token = c.data_mut().grpc_stream(req)?;
                memory::write_u32(&mut c, token_ptr, token)
            })();
            code(r)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |mut c: Caller<'_, T>, token: i32, mp: i32, ms: i32, end: i32| -> i32 {
            let r = memory::read(&mut c, mp, ms, MAX_GUEST_BYTES)
                .and_then(|m| c.data_mut().grpc_send(token as u32, &m, end != 0));
            code(r)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_cancel",
        |mut c: Caller<'_, T>, token: i32| -> i32 { code(c.data_mut().grpc_cancel(token as u32)) },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_close",
        |mut c: Caller<'_, T>, token: i32| -> i32 { code(c.data_mut().grpc_close(token as u32)) },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: Caller<'_, T>,
         code_ptr: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> wasmtime::Result<i32> {
            let (status, message) = c.data_mut().status();
            if let Err(s) = memory::write_u32(&mut c, code_ptr, status) {
                return Ok(s.code());
            }
            Ok(code(memory::copy_out(&mut c, &message, ptr_ptr, size_ptr)?))
        },
    )?;
    Ok(())
}
