//! Guest memory access for host calls: bounds-checked reads and writes, and copies into
//! memory the guest allocates (with `malloc` or `proxy_on_memory_allocate`).
//!
//! Every function returns `wasmtime::Result<HostResult<_>>`: the outer error is a trap
//! (the guest's allocator trapped), the inner one the status to hand back to the guest.

use super::{AbiView, HostResult, Status};
use wasmtime::{Caller, ValRaw};

fn span(ptr: i32, len: usize, mem_len: usize) -> HostResult<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start.checked_add(len).ok_or(Status::InvalidMemoryAccess)?;
    if end > mem_len {
        return Err(Status::InvalidMemoryAccess);
    }
    Ok(start..end)
}

/// Copies `len` bytes at `ptr` out of guest memory. `InvalidMemoryAccess` when out of
/// bounds (or no memory is bound), `BadArgument` when `len` exceeds `max`.
pub fn read<T: AbiView>(
    caller: &mut Caller<'_, T>,
    ptr: i32,
    len: i32,
    max: usize,
) -> HostResult<Vec<u8>> {
    let len = len as u32 as usize;
    if len > max {
        return Err(Status::BadArgument);
    }
    let memory = caller
        .data()
        .abi()
        .memory()
        .ok_or(Status::InvalidMemoryAccess)?;
    let data = memory.data(&*caller);
    let r = span(ptr, len, data.len())?;
    Ok(data[r].to_vec())
}

/// Writes `bytes` at `ptr`. `InvalidMemoryAccess` when out of bounds.
pub fn write<T: AbiView>(caller: &mut Caller<'_, T>, ptr: i32, bytes: &[u8]) -> HostResult<()> {
    let memory = caller
        .data()
        .abi()
        .memory()
        .ok_or(Status::InvalidMemoryAccess)?;
    let data = memory.data_mut(&mut *caller);
    let r = span(ptr, bytes.len(), data.len())?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

/// Writes a little-endian u32 at `ptr`.
pub fn write_u32<T: AbiView>(caller: &mut Caller<'_, T>, ptr: i32, v: u32) -> HostResult<()> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Writes a little-endian u64 at `ptr`.
pub fn write_u64<T: AbiView>(caller: &mut Caller<'_, T>, ptr: i32, v: u64) -> HostResult<()> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Reads a little-endian u32 at `ptr`.
pub fn read_u32<T: AbiView>(caller: &mut Caller<'_, T>, ptr: i32) -> HostResult<u32> {
    let b = read(caller, ptr, 4, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Allocates `len` bytes in the guest with its allocator and returns the address.
/// `Ok(Err(InvalidMemoryAccess))` when the guest has no allocator or returns a pointer
/// outside memory; `Err` when the allocator traps.
pub fn alloc<T: AbiView>(
    caller: &mut Caller<'_, T>,
    len: usize,
) -> wasmtime::Result<HostResult<i32>> {
    let Some(f) = caller.data().abi().allocator_func() else {
        return Ok(Err(Status::InvalidMemoryAccess));
    };
    let Ok(len32) = i32::try_from(len) else {
        return Ok(Err(Status::InvalidMemoryAccess));
    };
    // A typed call would clone the function's type (a type-registry round trip) on every
    // allocation; the signature was checked once, when `bind` took a TypedFunc.
    let mut slot = [ValRaw::i32(len32)];
    // SAFETY: `f` is `(i32) -> i32` (bound from a TypedFunc of that type) and `slot` holds
    // one parameter and has room for one result.
    unsafe { f.call_unchecked(&mut *caller, &mut slot as *mut [ValRaw])? };
    let ptr = slot[0].get_i32();
    let Some(memory) = caller.data().abi().memory() else {
        return Ok(Err(Status::InvalidMemoryAccess));
    };
    if ptr == 0 || span(ptr, len, memory.data_size(&*caller)).is_err() {
        return Ok(Err(Status::InvalidMemoryAccess));
    }
    Ok(Ok(ptr))
}

/// Copies `bytes` into fresh guest memory and stores its address at `ptr_ptr` and its
/// length at `size_ptr` (proxy-wasm-cpp-host's `copyToPointerSize`: nothing is
/// allocated for an empty value, whose address is 0).
pub fn copy_out<T: AbiView>(
    caller: &mut Caller<'_, T>,
    bytes: &[u8],
    ptr_ptr: i32,
    size_ptr: i32,
) -> wasmtime::Result<HostResult<()>> {
    let mut addr = 0;
    if !bytes.is_empty() {
        addr = match alloc(caller, bytes.len())? {
            Ok(a) => a,
            Err(s) => return Ok(Err(s)),
        };
        if let Err(s) = write(caller, addr, bytes) {
            return Ok(Err(s));
        }
    }
    if let Err(s) = write_u32(caller, ptr_ptr, addr as u32) {
        return Ok(Err(s));
    }
    Ok(write_u32(caller, size_ptr, bytes.len() as u32))
}

/// Reads a UTF-8 string (lossily: Envoy takes bytes) of at most `max` bytes.
pub fn read_string<T: AbiView>(
    caller: &mut Caller<'_, T>,
    ptr: i32,
    len: i32,
    max: usize,
) -> HostResult<String> {
    read(caller, ptr, len, max).map(|b| match String::from_utf8(b) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}
