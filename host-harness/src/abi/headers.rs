//! Header and trailer maps: get, set, add, replace and remove values, the whole map, and
//! its size.

use super::limits::{MAX_GUEST_BYTES, MAX_PAIRS_BYTES};
use super::{code, memory, pairs, AbiView, HostResult, MapType, Pairs, Status};
use wasmtime::{Caller, Linker};

/// The host side of header maps. `BadArgument` means the map is not available now
/// (Envoy's answer outside the callback that owns the map).
pub trait HeaderHost {
    /// Every entry, in order.
    fn map_pairs(&mut self, t: MapType) -> HostResult<Pairs>;
    /// Every entry, in the wire format (empty for an empty map). Override it to encode
    /// from borrowed entries: the default copies the map first.
    fn map_pairs_encoded(&mut self, t: MapType) -> HostResult<Vec<u8>> {
        self.map_pairs(t).map(|p| encode_map(&p))
    }
    /// Replaces the whole map.
    fn set_map_pairs(&mut self, t: MapType, pairs: Pairs) -> HostResult<()>;
    /// The first value of `key` (`NotFound` if absent).
    fn map_value(&mut self, t: MapType, key: &[u8]) -> HostResult<Vec<u8>>;
    /// Appends a value.
    fn add_map_value(&mut self, t: MapType, key: &[u8], value: &[u8]) -> HostResult<()>;
    /// Sets `key` to exactly `value`.
    fn replace_map_value(&mut self, t: MapType, key: &[u8], value: &[u8]) -> HostResult<()>;
    /// Removes every value of `key`.
    fn remove_map_value(&mut self, t: MapType, key: &[u8]) -> HostResult<()>;
    /// The map's size as Envoy reports it (its byte size, not the entry count).
    fn map_size(&mut self, t: MapType) -> HostResult<u32>;
}

/// `pairs` in the wire format; nothing at all for an empty map (what the guest gets for
/// an empty map is a null pointer and size 0, as from proxy-wasm-cpp-host).
pub fn encode_map<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    if pairs.is_empty() {
        Vec::new()
    } else {
        pairs::encode(pairs)
    }
}

fn map_type(t: i32) -> HostResult<MapType> {
    MapType::from_raw(t as u32).ok_or(Status::BadArgument)
}

/// Links the header-map host calls.
pub fn add_to_linker<T: AbiView + HeaderHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, T>, t: i32, ptr_ptr: i32, size_ptr: i32| -> wasmtime::Result<i32> {
            let r = map_type(t).and_then(|t| c.data_mut().map_pairs_encoded(t));
            match r {
                Ok(bytes) => Ok(code(memory::copy_out(&mut c, &bytes, ptr_ptr, size_ptr)?)),
                Err(s) => Ok(s.code()),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: Caller<'_, T>, t: i32, ptr: i32, size: i32| -> i32 {
            let r = (|| {
                let t = map_type(t)?;
                // Oversized maps read as empty, as in proxy-wasm-cpp-host.
                let raw = memory::read(&mut c, ptr, size, MAX_GUEST_BYTES)?;
                let p = if raw.len() > MAX_PAIRS_BYTES {
                    Vec::new()
                } else {
                    pairs::decode(&raw).unwrap_or_default()
                };
                c.data_mut().set_map_pairs(t, p)
            })();
            code(r)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Caller<'_, T>,
         t: i32,
         kp: i32,
         ks: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> wasmtime::Result<i32> {
            let r = (|| {
                let t = map_type(t)?;
                let key = memory::read(&mut c, kp, ks, MAX_GUEST_BYTES)?;
                c.data_mut().map_value(t, &key)
            })();
            match r {
                Ok(v) => Ok(code(memory::copy_out(&mut c, &v, ptr_ptr, size_ptr)?)),
                Err(s) => Ok(s.code()),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: Caller<'_, T>, t: i32, kp: i32, ks: i32, vp: i32, vs: i32| -> i32 {
            let r = (|| {
                let t = map_type(t)?;
                let key = memory::read(&mut c, kp, ks, MAX_GUEST_BYTES)?;
                let value = memory::read(&mut c, vp, vs, MAX_GUEST_BYTES)?;
                c.data_mut().add_map_value(t, &key, &value)
            })();
            code(r)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: Caller<'_, T>, t: i32, kp: i32, ks: i32, vp: i32, vs: i32| -> i32 {
            let r = (|| {
                let t = map_type(t)?;
                let key = memory::read(&mut c, kp, ks, MAX_GUEST_BYTES)?;
                let value = memory::read(&mut c, vp, vs, MAX_GUEST_BYTES)?;
                c.data_mut().replace_map_value(t, &key, &value)
            })();
            code(r)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, T>, t: i32, kp: i32, ks: i32| -> i32 {
            let r = (|| {
                let t = map_type(t)?;
                let key = memory::read(&mut c, kp, ks, MAX_GUEST_BYTES)?;
                c.data_mut().remove_map_value(t, &key)
            })();
            code(r)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: Caller<'_, T>, t: i32, ptr: i32| -> i32 {
            let r = (|| {
                let t = map_type(t)?;
                let n = c.data_mut().map_size(t)?;
                memory::write_u32(&mut c, ptr, n)
            })();
            code(r)
        },
    )?;
    Ok(())
}
