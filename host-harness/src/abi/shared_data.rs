//! Shared data: `proxy_get_shared_data` and `proxy_set_shared_data`, and
//! [`SharedDataStore`], a thread-safe store with Envoy's compare-and-swap semantics (or
//! Kong's stricter ones) that embedders can use as it is.

use super::limits::MAX_GUEST_BYTES;
use super::{code, memory, AbiView, HostResult, Status};
use std::collections::HashMap;
use std::sync::Mutex;
use wasmtime::{Caller, Linker};

/// The host side of shared data.
pub trait SharedDataHost {
    /// The value of `key` and its CAS token (`NotFound` if absent).
    fn get_shared_data(&mut self, key: &str) -> HostResult<(Vec<u8>, u32)>;
    /// Sets `key`. `value` is `None` when the guest passed a null pointer; `cas` 0 means
    /// "no compare".
    fn set_shared_data(&mut self, key: &str, value: Option<&[u8]>, cas: u32) -> HostResult<()>;
}

/// Which compare-and-swap rules the store follows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CasMode {
    /// Envoy (proxy-wasm-cpp-host `SharedData::set`): one global CAS counter; `cas == 0`
    /// writes unconditionally; a non-zero `cas` is checked only when the key exists; a
    /// null value is stored as empty (there is no delete).
    #[default]
    Envoy,
    /// Kong's ngx_wasm_module: a CAS counter per key; writing an existing key needs its
    /// current CAS (`cas == 0` fails with `CasMismatch`), a non-zero `cas` on a missing key
    /// fails too, and a null value deletes the key.
    StrictPerKey,
}

#[derive(Default)]
struct Inner {
    next_cas: u32,
    maps: HashMap<String, HashMap<String, (Vec<u8>, u32)>>,
}

/// Shared data for any number of VMs, one map per `vm_id`.
pub struct SharedDataStore {
    mode: CasMode,
    inner: Mutex<Inner>,
}

impl Default for SharedDataStore {
    /// An empty store with Envoy's CAS rules (tokens from 1: 0 means "no CAS").
    fn default() -> SharedDataStore {
        SharedDataStore::new(CasMode::default())
    }
}

impl SharedDataStore {
    /// An empty store with `mode`'s CAS rules.
    pub fn new(mode: CasMode) -> SharedDataStore {
        SharedDataStore {
            mode,
            inner: Mutex::new(Inner {
                next_cas: 1,
                maps: HashMap::new(),
            }),
        }
    }

    /// The CAS rules in force.
    pub fn mode(&self) -> CasMode {
        self.mode
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value and CAS of `key` in `vm_id`'s map.
    pub fn get(&self, vm_id: &str, key: &str) -> HostResult<(Vec<u8>, u32)> {
        self.lock()
            .maps
            .get(vm_id)
            .and_then(|m| m.get(key))
            .cloned()
            .ok_or(Status::NotFound)
    }

    /// Sets `key` in `vm_id`'s map following the store's [`CasMode`].
    pub fn set(&self, vm_id: &str, key: &str, value: Option<&[u8]>, cas: u32) -> HostResult<()> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let map = inner.maps.entry(vm_id.to_string()).or_default();
        match self.mode {
            CasMode::Envoy => {
                let value = value.unwrap_or_default().to_vec();
                // The counter moves only on a successful write, as in proxy-wasm-cpp-host.
                match map.get_mut(key) {
                    Some(e) => {
                        if cas != 0 && cas != e.1 {
                            return Err(Status::CasMismatch);
                        }
                        *e = (value, next_cas(&mut inner.next_cas));
                    }
                    None => {
                        map.insert(key.to_string(), (value, next_cas(&mut inner.next_cas)));
                    }
                }
                Ok(())
            }
            CasMode::StrictPerKey => {
                let current = map.get(key).map(|e| e.1);
                match (current, cas) {
                    (Some(c), cas) if cas != c => return Err(Status::CasMismatch),
                    (None, cas) if cas != 0 => return Err(Status::CasMismatch),
                    _ => {}
                }
                match value {
                    None => {
                        map.remove(key);
                    }
                    Some(v) => {
                        let mut next = current.unwrap_or(0).wrapping_add(1);
                        if next == 0 {
                            next = 1;
                        }
                        map.insert(key.to_string(), (v.to_vec(), next));
                    }
                }
                Ok(())
            }
        }
    }

    /// Every key of `vm_id`'s map, sorted (for inspection).
    pub fn keys(&self, vm_id: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .lock()
            .maps
            .get(vm_id)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }
}

fn next_cas(counter: &mut u32) -> u32 {
    let v = *counter;
    *counter = counter.wrapping_add(1);
    if *counter == 0 {
        // 0 is not a valid CAS value.
        *counter = 1;
    }
    v
}

/// Links the shared-data host calls.
pub fn add_to_linker<T: AbiView + SharedDataHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Caller<'_, T>,
         kp: i32,
         ks: i32,
         ptr_ptr: i32,
         size_ptr: i32,
         cas_ptr: i32|
         -> wasmtime::Result<i32> {
            let r = memory::read_string(&mut c, kp, ks, MAX_GUEST_BYTES)
                .and_then(|k| c.data_mut().get_shared_data(&k));
            let (value, cas) = match r {
                Ok(v) => v,
                Err(s) => return Ok(s.code()),
            };
            if let Err(s) = memory::copy_out(&mut c, &value, ptr_ptr, size_ptr)? {
                return Ok(s.code());
            }
            Ok(code(memory::write_u32(&mut c, cas_ptr, cas)))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Caller<'_, T>, kp: i32, ks: i32, vp: i32, vs: i32, cas: i32| -> i32 {
            let r = (|| {
                let key = memory::read_string(&mut c, kp, ks, MAX_GUEST_BYTES)?;
                let value = if vp == 0 && vs == 0 {
                    None
                } else {
                    Some(memory::read(&mut c, vp, vs, MAX_GUEST_BYTES)?)
                };
                c.data_mut()
                    .set_shared_data(&key, value.as_deref(), cas as u32)
            })();
            code(r)
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_store_never_hands_out_cas_zero() {
        let s = SharedDataStore::default();
        assert_eq!(s.mode(), CasMode::Envoy);
        s.set("vm", "a", Some(b"1"), 0).unwrap();
        // Token 0 would read as "write unconditionally" in the guest's next set.
        assert_eq!(s.get("vm", "a").unwrap().1, 1);
    }

    #[test]
    fn envoy_cas_is_global_and_zero_writes_unconditionally() {
        let s = SharedDataStore::new(CasMode::Envoy);
        assert_eq!(s.get("vm", "a"), Err(Status::NotFound));
        // A non-zero CAS on a missing key is not checked.
        s.set("vm", "a", Some(b"1"), 77).unwrap();
        let (v, cas_a) = s.get("vm", "a").unwrap();
        assert_eq!((v.as_slice(), cas_a), (&b"1"[..], 1));
        s.set("vm", "b", Some(b"x"), 0).unwrap();
        assert_eq!(s.get("vm", "b").unwrap().1, 2, "one counter for all keys");
        assert_eq!(s.set("vm", "a", Some(b"2"), 2), Err(Status::CasMismatch));
        s.set("vm", "a", Some(b"2"), cas_a).unwrap();
        s.set("vm", "a", Some(b"3"), 0).unwrap();
        assert_eq!(s.get("vm", "a").unwrap(), (b"3".to_vec(), 4));
        // A null value is stored empty; vm ids are separate maps.
        s.set("vm", "a", None, 0).unwrap();
        assert_eq!(s.get("vm", "a").unwrap().0, b"");
        assert_eq!(s.get("other", "a"), Err(Status::NotFound));
    }

    #[test]
    fn strict_cas_is_per_key() {
        let s = SharedDataStore::new(CasMode::StrictPerKey);
        assert_eq!(s.set("vm", "a", Some(b"1"), 5), Err(Status::CasMismatch));
        s.set("vm", "a", Some(b"1"), 0).unwrap();
        s.set("vm", "b", Some(b"1"), 0).unwrap();
        assert_eq!(s.get("vm", "a").unwrap().1, 1);
        assert_eq!(s.get("vm", "b").unwrap().1, 1);
        assert_eq!(s.set("vm", "a", Some(b"2"), 0), Err(Status::CasMismatch));
        s.set("vm", "a", Some(b"2"), 1).unwrap();
        assert_eq!(s.get("vm", "a").unwrap(), (b"2".to_vec(), 2));
        s.set("vm", "a", None, 2).unwrap();
        assert_eq!(s.get("vm", "a"), Err(Status::NotFound));
    }
}
