//! Outgoing HTTP calls: `proxy_http_call`. The answer comes back later through
//! `proxy_on_http_call_response`; its headers are map type 6, its body buffer type 4.

use super::limits::MAX_GUEST_BYTES;
use super::{code, memory, pairs, AbiView, HostResult, Pairs};
use std::time::Duration;
use wasmtime::{Caller, Linker};

/// An HTTP call as the guest asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCallRequest {
    /// The upstream (Envoy: a cluster name).
    pub upstream: String,
    /// Request headers (`:method`, `:path` and `:authority` are required by Envoy).
    pub headers: Pairs,
    /// Request body.
    pub body: Vec<u8>,
    /// Request trailers.
    pub trailers: Pairs,
    /// Timeout (zero: none).
    pub timeout: Duration,
}

/// The host side of HTTP calls.
pub trait HttpCallHost {
    /// Starts a call and returns its token.
    fn http_call(&mut self, call: HttpCallRequest) -> HostResult<u32>;
}

/// Links `proxy_http_call`.
pub fn add_to_linker<T: AbiView + HttpCallHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: Caller<'_, T>,
         up: i32,
         us: i32,
         hp: i32,
         hs: i32,
         bp: i32,
         bs: i32,
         tp: i32,
         ts: i32,
         timeout: i32,
         token_ptr: i32|
         -> i32 {
            let r = (|| {
                // Envoy takes the timeout as a signed int and refuses negative ones.
                if timeout < 0 {
                    return Err(super::Status::BadArgument);
                }
                let upstream = memory::read_string(&mut c, up, us, MAX_GUEST_BYTES)?;
                let headers = memory::read(&mut c, hp, hs, MAX_GUEST_BYTES)?;
                let body = memory::read(&mut c, bp, bs, MAX_GUEST_BYTES)?;
                let trailers = memory::read(&mut c, tp, ts, MAX_GUEST_BYTES)?;
                // Check the token pointer before starting anything, as Envoy does.
                memory::write_u32(&mut c, token_ptr, 0)?;
                let token = c.data_mut().http_call(HttpCallRequest {
                    upstream,
                    headers: pairs::decode(&headers).unwrap_or_default(),
                    body,
                    trailers: pairs::decode(&trailers).unwrap_or_default(),
                    timeout: Duration::from_millis(u64::from(timeout as u32)),
                })?;
                memory::write_u32(&mut c, token_ptr, token)
            })();
            code(r)
        },
    )?;
    Ok(())
}
