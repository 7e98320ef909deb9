//! Stream control: local responses, `proxy_continue_stream`, `proxy_close_stream`, and
//! ABI 0.1.0's `proxy_continue_request`, `proxy_continue_response` and
//! `proxy_clear_route_cache`.

use super::limits::MAX_GUEST_BYTES;
use super::pairs::PairsBuf;
use super::{code, memory, AbiVersion, AbiView, HostResult, Status, StreamType};
use wasmtime::{Caller, Linker};

/// A local response as the guest asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status code.
    pub status: u32,
    /// Response code details (Envoy's `%RESPONSE_CODE_DETAILS%`).
    pub details: String,
    /// Body.
    pub body: Vec<u8>,
    /// Headers to add, as the guest sent them (checked; read without allocating).
    pub headers: PairsBuf,
    /// gRPC status, or -1 for none.
    pub grpc_status: i32,
}

/// The host side of stream control.
pub trait StreamHost {
    /// Resumes a paused stream (after the current callback returns, as Envoy defers it).
    fn continue_stream(&mut self, s: StreamType) -> HostResult<()>;
    /// Resets a stream.
    fn close_stream(&mut self, s: StreamType) -> HostResult<()>;
    /// Sends a local response instead of the upstream's.
    fn send_local_response(&mut self, r: LocalResponse) -> HostResult<()>;
    /// Clears the route cache (ABI 0.1.0).
    fn clear_route_cache(&mut self) -> HostResult<()> {
        Ok(())
    }
}

fn stream_type(t: i32) -> HostResult<StreamType> {
    StreamType::from_raw(t as u32).ok_or(Status::BadArgument)
}

/// Links the stream-control host calls of `version`.
pub fn add_to_linker<T: AbiView + StreamHost>(
    linker: &mut Linker<T>,
    version: AbiVersion,
) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Caller<'_, T>,
         status: i32,
         dp: i32,
         ds: i32,
         bp: i32,
         bs: i32,
         hp: i32,
         hs: i32,
         grpc: i32|
         -> i32 {
            let r = (|| {
                let details = memory::read_string(&mut c, dp, ds, MAX_GUEST_BYTES)?;
                let body = memory::read(&mut c, bp, bs, MAX_GUEST_BYTES)?;
                let raw = memory::read(&mut c, hp, hs, MAX_GUEST_BYTES)?;
                let headers = PairsBuf::from_wire(raw).unwrap_or_default();
                c.data_mut().send_local_response(LocalResponse {
                    status: status as u32,
                    details,
                    body,
                    headers,
                    grpc_status: grpc,
                })
            })();
            code(r)
        },
    )?;
    if version == AbiVersion::V0_1_0 {
        linker.func_wrap(
            "env",
            "proxy_continue_request",
            |mut c: Caller<'_, T>| -> i32 {
                code(c.data_mut().continue_stream(StreamType::Request))
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_continue_response",
            |mut c: Caller<'_, T>| -> i32 {
                code(c.data_mut().continue_stream(StreamType::Response))
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_clear_route_cache",
            |mut c: Caller<'_, T>| -> i32 { code(c.data_mut().clear_route_cache()) },
        )?;
    } else {
        linker.func_wrap(
            "env",
            "proxy_continue_stream",
            |mut c: Caller<'_, T>, t: i32| -> i32 {
                code(stream_type(t).and_then(|t| c.data_mut().continue_stream(t)))
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_close_stream",
            |mut c: Caller<'_, T>, t: i32| -> i32 {
                code(stream_type(t).and_then(|t| c.data_mut().close_stream(t)))
            },
        )?;
    }
    Ok(())
}
