//! Properties: `proxy_get_property` and `proxy_set_property`. Paths are segments joined
//! by NUL bytes (`request\0path`).

use super::limits::{MAX_GUEST_BYTES, MAX_PROPERTY_PATH_BYTES};
use super::{code, memory, AbiView, HostResult};
use wasmtime::{Caller, Linker};

/// The host side of properties.
pub trait PropertyHost {
    /// The value at `path` (`NotFound` if there is none).
    fn property(&mut self, path: &[u8]) -> HostResult<Vec<u8>>;
    /// Sets the value at `path`.
    fn set_property(&mut self, path: &[u8], value: &[u8]) -> HostResult<()>;
}

/// Links the property host calls.
pub fn add_to_linker<T: AbiView + PropertyHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Caller<'_, T>,
         pp: i32,
         ps: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> wasmtime::Result<i32> {
            let r = memory::read(&mut c, pp, ps, MAX_PROPERTY_PATH_BYTES)
                .and_then(|path| c.data_mut().property(&path));
            match r {
                Ok(v) => Ok(code(memory::copy_out(&mut c, &v, ptr_ptr, size_ptr)?)),
                Err(s) => Ok(s.code()),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: Caller<'_, T>, pp: i32, ps: i32, vp: i32, vs: i32| -> i32 {
            let r = (|| {
                let path = memory::read(&mut c, pp, ps, MAX_PROPERTY_PATH_BYTES)?;
                let value = memory::read(&mut c, vp, vs, MAX_GUEST_BYTES)?;
                c.data_mut().set_property(&path, &value)
            })();
            code(r)
        },
    )?;
    Ok(())
}
