//! Shared queues: register, resolve, enqueue and dequeue, and [`QueueStore`], a
//! thread-safe queue registry with proxy-wasm-cpp-host's semantics.

use super::limits::{MAX_GUEST_BYTES, MAX_QUEUE_ITEMS};
use super::{code, memory, AbiView, HostResult, Status};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use wasmtime::{Caller, Linker};

/// The host side of shared queues.
pub trait QueueHost {
    /// Registers (or re-registers) `name` for the calling VM's root context; returns its token.
    fn register_queue(&mut self, name: &str) -> HostResult<u32>;
    /// The token of `name` registered by `vm_id` (empty: the caller's own `vm_id`).
    fn resolve_queue(&mut self, vm_id: &str, name: &str) -> HostResult<u32>;
    /// Appends an item and notifies the owner (`on_queue_ready`).
    fn enqueue(&mut self, token: u32, data: &[u8]) -> HostResult<()>;
    /// Takes the oldest item (`Empty` if none).
    fn dequeue(&mut self, token: u32) -> HostResult<Vec<u8>>;
}

/// Who gets `on_queue_ready` for a queue: a VM (embedder-defined number) and its root
/// context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueueOwner {
    /// The embedder's VM number.
    pub vm: u64,
    /// The root context id in that VM.
    pub root_context: u32,
}

struct Queue {
    owner: QueueOwner,
    items: VecDeque<Vec<u8>>,
}

#[derive(Default)]
struct Inner {
    next_token: u32,
    tokens: HashMap<(String, String), u32>,
    queues: HashMap<u32, Queue>,
}

/// Shared queues for any number of VMs.
#[derive(Default)]
pub struct QueueStore {
    inner: Mutex<Inner>,
}

impl QueueStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `(vm_id, name)` for `owner`, keeping the queue's items if it existed.
    pub fn register(&self, vm_id: &str, name: &str, owner: QueueOwner) -> u32 {
        let mut inner = self.lock();
        let key = (vm_id.to_string(), name.to_string());
        let token = match inner.tokens.get(&key) {
            Some(t) => *t,
            None => {
                let mut t = inner.next_token.wrapping_add(1);
                while t == 0 || inner.queues.contains_key(&t) {
                    t = t.wrapping_add(1);
                }
                inner.next_token = t;
                inner.tokens.insert(key, t);
                t
            }
        };
        inner
            .queues
            .entry(token)
            .and_modify(|q| q.owner = owner)
            .or_insert(Queue {
                owner,
                items: VecDeque::new(),
            });
        token
    }

    /// The token of `(vm_id, name)`.
    pub fn resolve(&self, vm_id: &str, name: &str) -> HostResult<u32> {
        self.lock()
            .tokens
            .get(&(vm_id.to_string(), name.to_string()))
            .copied()
            .ok_or(Status::NotFound)
    }

    /// Appends `data`; returns the owner to notify.
    pub fn enqueue(&self, token: u32, data: &[u8]) -> HostResult<QueueOwner> {
        let mut inner = self.lock();
        let q = inner.queues.get_mut(&token).ok_or(Status::NotFound)?;
        if q.items.len() >= MAX_QUEUE_ITEMS {
            return Err(Status::InternalFailure);
        }
        q.items.push_back(data.to_vec());
        Ok(q.owner)
    }

    /// Takes the oldest item.
    pub fn dequeue(&self, token: u32) -> HostResult<Vec<u8>> {
        let mut inner = self.lock();
        let q = inner.queues.get_mut(&token).ok_or(Status::NotFound)?;
        q.items.pop_front().ok_or(Status::Empty)
    }

    /// Items waiting in `token`'s queue.
    pub fn len(&self, token: u32) -> usize {
        self.lock().queues.get(&token).map_or(0, |q| q.items.len())
    }
}

/// Links the shared-queue host calls.
pub fn add_to_linker<T: AbiView + QueueHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: Caller<'_, T>, np: i32, ns: i32, token_ptr: i32| -> i32 {
            let r = (|| {
                let name = memory::read_string(&mut c, np, ns, MAX_GUEST_BYTES)?;
                let t = c.data_mut().register_queue(&name)?;
                memory::write_u32(&mut c, token_ptr, t)
            })();
            code(r)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: Caller<'_, T>, vp: i32, vs: i32, np: i32, ns: i32, token_ptr: i32| -> i32 {
            let r = (|| {
                let vm_id = memory::read_string(&mut c, vp, vs, MAX_GUEST_BYTES)?;
                let name = memory::read_string(&mut c, np, ns, MAX_GUEST_BYTES)?;
                let t = c.data_mut().resolve_queue(&vm_id, &name)?;
                memory::write_u32(&mut c, token_ptr, t)
            })();
            code(r)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: Caller<'_, T>, token: i32, dp: i32, ds: i32| -> i32 {
            let r = memory::read(&mut c, dp, ds, MAX_GUEST_BYTES)
                .and_then(|d| c.data_mut().enqueue(token as u32, &d));
            code(r)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: Caller<'_, T>, token: i32, ptr_ptr: i32, size_ptr: i32| -> wasmtime::Result<i32> {
            match c.data_mut().dequeue(token as u32) {
                Ok(d) => Ok(code(memory::copy_out(&mut c, &d, ptr_ptr, size_ptr)?)),
                Err(s) => Ok(s.code()),
            }
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_follow_cpp_host() {
        let s = QueueStore::default();
        let owner = QueueOwner {
            vm: 1,
            root_context: 1,
        };
        let t = s.register("vm", "q", owner);
        assert_ne!(t, 0);
        assert_eq!(s.resolve("vm", "q"), Ok(t));
        assert_eq!(s.resolve("vm", "other"), Err(Status::NotFound));
        assert_eq!(s.dequeue(t), Err(Status::Empty));
        assert_eq!(s.enqueue(t, b"a"), Ok(owner));
        s.enqueue(t, b"b").unwrap();
        // Re-registering keeps items and moves the owner.
        let owner2 = QueueOwner {
            vm: 2,
            root_context: 1,
        };
        assert_eq!(s.register("vm", "q", owner2), t);
        assert_eq!(s.enqueue(t, b"c"), Ok(owner2));
        assert_eq!(s.dequeue(t).unwrap(), b"a");
        assert_eq!(s.len(t), 2);
        assert_eq!(s.enqueue(999, b"x"), Err(Status::NotFound));
        assert_eq!(s.dequeue(999), Err(Status::NotFound));
    }
}
