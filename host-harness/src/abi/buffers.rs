//! Buffers: `proxy_get_buffer_bytes`, `proxy_get_buffer_status`, `proxy_set_buffer_bytes`
//! and (ABI 0.1.0) `proxy_get_configuration`.

use super::limits::MAX_GUEST_BYTES;
use super::{code, memory, AbiVersion, AbiView, BufferType, HostResult, Status};
use wasmtime::{Caller, Linker};

/// The host side of buffers. `NotFound` means the buffer does not exist now.
pub trait BufferHost {
    /// The buffer's length.
    fn buffer_len(&mut self, t: BufferType) -> HostResult<usize>;
    /// A copy of `buffer[start..start + len]`; the core has already clamped the range.
    fn buffer_read(&mut self, t: BufferType, start: usize, len: usize) -> HostResult<Vec<u8>>;
    /// Replaces, prepends or appends `data` (see [`envoy_copy_from`] for Envoy's rules).
    fn buffer_write(
        &mut self,
        t: BufferType,
        start: usize,
        len: usize,
        data: &[u8],
    ) -> HostResult<()>;
    /// What ABI 0.1.0's `proxy_get_configuration` returns: the plugin configuration
    /// while configuring, else the VM configuration.
    fn configuration(&mut self) -> HostResult<Vec<u8>> {
        let t = if self.buffer_len(BufferType::PluginConfiguration).is_ok() {
            BufferType::PluginConfiguration
        } else {
            BufferType::VmConfiguration
        };
        let len = self.buffer_len(t)?;
        self.buffer_read(t, 0, len)
    }
}

/// Envoy's rules for writing into a body buffer (`Buffer::copyFrom` in Envoy's
/// `context.cc`): `start == 0, len == 0` prepends; `start == 0, len >= size` replaces
/// everything; `start >= size` appends; anything else is `BadArgument` (no splicing).
pub fn envoy_copy_from(buf: &mut Vec<u8>, start: usize, len: usize, data: &[u8]) -> HostResult<()> {
    if start == 0 {
        if len == 0 {
            buf.splice(0..0, data.iter().copied());
            Ok(())
        } else if len >= buf.len() {
            buf.clear();
            buf.extend_from_slice(data);
            Ok(())
        } else {
            Err(Status::BadArgument)
        }
    } else if start >= buf.len() {
        buf.extend_from_slice(data);
        Ok(())
    } else {
        Err(Status::BadArgument)
    }
}

fn buffer_type(t: i32) -> HostResult<BufferType> {
    BufferType::from_raw(t as u32).ok_or(Status::BadArgument)
}

/// Links the buffer host calls.
pub fn add_to_linker<T: AbiView + BufferHost>(
    linker: &mut Linker<T>,
    version: AbiVersion,
) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, T>, t: i32, start: i32, len: i32, ptr_ptr: i32, size_ptr: i32| {
            let bytes = (|| {
                let t = buffer_type(t)?;
                let size = c.data_mut().buffer_len(t)?;
                let (start, len) = (start as u32 as usize, len as u32 as usize);
                if start.checked_add(len).is_none() {
                    return Err(Status::BadArgument);
                }
                // Don't over-read: clamp to the buffer, as Envoy does.
                let len = if start > size {
                    0
                } else {
                    len.min(size - start)
                };
                if len == 0 {
                    return Ok(Vec::new());
                }
                c.data_mut().buffer_read(t, start, len)
            })();
            match bytes {
                Ok(b) => Ok(code(memory::copy_out(&mut c, &b, ptr_ptr, size_ptr)?)),
                Err(s) => Ok(s.code()),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: Caller<'_, T>, t: i32, len_ptr: i32, flags_ptr: i32| -> i32 {
            let r = (|| {
                let t = buffer_type(t)?;
                let size = c.data_mut().buffer_len(t)?;
                memory::write_u32(&mut c, len_ptr, size as u32)?;
                memory::write_u32(&mut c, flags_ptr, 0)
            })();
            code(r)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_, T>, t: i32, start: i32, len: i32, ptr: i32, size: i32| -> i32 {
            let r = (|| {
                let t = buffer_type(t)?;
                c.data_mut().buffer_len(t)?;
                let data = memory::read(&mut c, ptr, size, MAX_GUEST_BYTES)?;
                c.data_mut()
                    .buffer_write(t, start as u32 as usize, len as u32 as usize, &data)
            })();
            code(r)
        },
    )?;
    if version == AbiVersion::V0_1_0 {
        linker.func_wrap(
            "env",
            "proxy_get_configuration",
            |mut c: Caller<'_, T>, ptr_ptr: i32, size_ptr: i32| match c.data_mut().configuration() {
                Ok(b) => Ok(code(memory::copy_out(&mut c, &b, ptr_ptr, size_ptr)?)),
                Err(s) => Ok(s.code()),
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_from_follows_envoy() {
        let mut b = b"body".to_vec();
        envoy_copy_from(&mut b, 0, 0, b">").unwrap();
        assert_eq!(b, b">body");
        envoy_copy_from(&mut b, 5, 0, b"<").unwrap();
        assert_eq!(b, b">body<");
        envoy_copy_from(&mut b, 0, 6, b"new").unwrap();
        assert_eq!(b, b"new");
        assert_eq!(
            envoy_copy_from(&mut b, 1, 1, b"x"),
            Err(Status::BadArgument)
        );
        assert_eq!(
            envoy_copy_from(&mut b, 0, 2, b"x"),
            Err(Status::BadArgument)
        );
        envoy_copy_from(&mut b, usize::MAX, 0, b"!").unwrap();
        assert_eq!(b, b"new!");
    }
}
