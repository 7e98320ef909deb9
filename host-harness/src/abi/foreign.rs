//! Foreign functions: `proxy_call_foreign_function`, host functions called by name.

use super::limits::MAX_GUEST_BYTES;
use super::{memory, AbiView, HostResult, Status};
use wasmtime::{Caller, Linker};

/// The host side of foreign functions.
pub trait ForeignHost {
    /// Calls the function `name` with `args` (`NotFound` if there is none).
    fn call_foreign_function(&mut self, name: &str, args: &[u8]) -> HostResult<Vec<u8>>;
}

/// Links `proxy_call_foreign_function`.
pub fn add_to_linker<T: AbiView + ForeignHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: Caller<'_, T>,
         np: i32,
         ns: i32,
         ap: i32,
         asz: i32,
         rp: i32,
         rs: i32|
         -> wasmtime::Result<i32> {
            let r = (|| {
                let name = memory::read_string(&mut c, np, ns, MAX_GUEST_BYTES)?;
                let args = memory::read(&mut c, ap, asz, MAX_GUEST_BYTES)?;
                c.data_mut().call_foreign_function(&name, &args)
            })();
            let result = match r {
                Ok(b) => b,
                Err(s) => return Ok(s.code()),
            };
            // As in proxy-wasm-cpp-host: the result is only copied when asked for.
            let mut addr = 0;
            if rp != 0 && !result.is_empty() {
                addr = match memory::alloc(&mut c, result.len())? {
                    Ok(a) => a,
                    Err(s) => return Ok(s.code()),
                };
                if let Err(s) = memory::write(&mut c, addr, &result) {
                    return Ok(s.code());
                }
            }
            if rp != 0 {
                if let Err(s) = memory::write_u32(&mut c, rp, addr as u32) {
                    return Ok(s.code());
                }
            }
            if rs != 0 {
                if let Err(s) = memory::write_u32(&mut c, rs, result.len() as u32) {
                    return Ok(s.code());
                }
            }
            Ok(Status::Ok.code())
        },
    )?;
    Ok(())
}
