//! The Proxy-Wasm shared-data table that lives in the `proxy_wasm_shm_kv` zone, so every
//! nginx worker sees one map per `vm_id` (one cache). Host-independent: memory comes from a
//! [`BlockAlloc`] (the zone's slab pool in nginx, a bounded heap in tests), and the caller
//! gives exclusive access (holds the zone's mutex) for as long as a [`Kv`] lives.
//!
//! Semantics are Envoy's (proxy-wasm-cpp-host `SharedData`), as the harness's
//! `SharedDataStore` implements them in `CasMode::Envoy`: one CAS counter for the whole
//! table, moved only by a successful write and never 0; `cas == 0` writes unconditionally;
//! a non-zero `cas` is checked only when the key exists; a null value is stored empty.
//! Unlike Envoy, the zone has a size: a write that does not fit fails and changes nothing.
//!
//! Layout: a header, a fixed array of bucket heads (chained hashing, never resized), one
//! block per entry (its `vm_id` and key), and the value in a chain of chunks of at most one
//! page ([`CHUNK_BLOCK_BYTES`]), so a 1 MiB value needs no contiguous megabyte in a
//! fragmented zone.

use crate::blocks::BlockAlloc;
use std::ptr::{self, NonNull};

/// Longest `vm_id` (the module's name, from the configuration).
pub const MAX_VM_ID_BYTES: usize = 1024;
/// Longest key.
pub const MAX_KEY_BYTES: usize = 16 * 1024;
/// Largest value: edge-filter's largest `cache.max_entry_bytes` (64 MiB), also the ABI
/// core's bound on a byte string read from the guest.
pub const MAX_VALUE_BYTES: usize = 64 * 1024 * 1024;
/// Size of a full value chunk's block: one page of nginx's slab allocator, which always
/// finds a free page when there is one.
pub const CHUNK_BLOCK_BYTES: usize = 4096;
/// Zone bytes per hash bucket when sizing the bucket array ([`bucket_count_for`]).
pub const BYTES_PER_BUCKET: usize = 4096;
/// Fewest buckets.
pub const MIN_BUCKETS: usize = 64;
/// Most buckets (8 MiB of bucket heads).
pub const MAX_BUCKETS: usize = 1 << 20;

const MAGIC: u64 = u64::from_le_bytes(*b"pwkv-shm");
/// Bumped whenever the layout below changes: a zone with another version is started afresh.
const VERSION: u32 = 1;
const CHUNK_PAYLOAD: usize = CHUNK_BLOCK_BYTES - std::mem::size_of::<Chunk>();

/// Why a table operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// No such key.
    #[error("no such key")]
    NotFound,
    /// The key exists and its CAS token is not the one given.
    #[error("compare-and-swap mismatch")]
    CasMismatch,
    /// A `vm_id`, key or value beyond its bound.
    #[error("the {what} is {len} bytes, more than the {max} allowed")]
    TooLarge {
        /// `vm_id`, `key` or `value`.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The zone has no room for the write; nothing changed.
    #[error("no room for a value of {bytes} bytes")]
    Full {
        /// Size of the value that did not fit.
        bytes: usize,
    },
    /// Table creation could not get its header and buckets.
    #[error("no room for the table's header and {buckets} buckets")]
    NoRoomForTable {
        /// Buckets asked for.
        buckets: usize,
    },
}

#[repr(C)]
struct Header {
    magic: u64,
    version: u32,
    next_cas: u32,
    bucket_count: u64,
    buckets: *mut *mut Entry,
    entries: u64,
    value_bytes: u64,
    /// When the last "zone full" warning was logged (seconds; see [`Kv::warning_due`]).
    last_warning: u64,
}

#[repr(C)]
struct Entry {
    next: *mut Entry,
    hash: u64,
    chunks: *mut Chunk,
    value_len: u32,
    cas: u32,
    ns_len: u32,
    key_len: u32,
    // Followed by the vm_id's bytes, then the key's.
}

#[repr(C)]
struct Chunk {
    next: *mut Chunk,
    /// Payload bytes the block holds.
    cap: u32,
    /// Payload bytes in use.
    len: u32,
    // Followed by the payload.
}

const MAX_CHAIN_CHUNKS: usize = MAX_VALUE_BYTES / CHUNK_PAYLOAD + 2;

/// Counts, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvStats {
    /// Keys stored.
    pub entries: u64,
    /// Bytes of values stored.
    pub value_bytes: u64,
    /// Hash buckets.
    pub buckets: u64,
}

/// The number of buckets for a zone of `zone_bytes`: a power of two, one per
/// [`BYTES_PER_BUCKET`], within [`MIN_BUCKETS`]..=[`MAX_BUCKETS`].
pub fn bucket_count_for(zone_bytes: usize) -> usize {
    (zone_bytes / BYTES_PER_BUCKET)
        .next_power_of_two()
        .clamp(MIN_BUCKETS, MAX_BUCKETS)
}

/// FNV-1a over the `vm_id`'s length, the `vm_id` and the key: stable across processes
/// (unlike std's randomly keyed hasher), which a table shared by workers needs.
fn hash(ns: &[u8], key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in (ns.len() as u32).to_le_bytes().iter().chain(ns).chain(key) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn check(what: &'static str, len: usize, max: usize) -> Result<(), KvError> {
    if len > max {
        return Err(KvError::TooLarge { what, len, max });
    }
    Ok(())
}

/// The table, with exclusive access to it and its allocator for as long as it lives.
pub struct Kv<'a, A: BlockAlloc> {
    alloc: &'a mut A,
    hdr: NonNull<Header>,
}

impl<'a, A: BlockAlloc> Kv<'a, A> {
    /// Lays out an empty table with `buckets` buckets (rounded and clamped as
    /// [`bucket_count_for`] does) in memory from `alloc`. Keep [`Kv::root`] to attach again.
    pub fn create(alloc: &'a mut A, buckets: usize) -> Result<Kv<'a, A>, KvError> {
        let n = buckets.next_power_of_two().clamp(MIN_BUCKETS, MAX_BUCKETS);
        let no_room = KvError::NoRoomForTable { buckets: n };
        let hdr = alloc
            .alloc(std::mem::size_of::<Header>())
            .ok_or(no_room.clone())?
            .cast::<Header>();
        let bytes = n * std::mem::size_of::<*mut Entry>();
        let Some(array) = alloc.alloc(bytes) else {
            // SAFETY: allocated just above with this size.
            unsafe { alloc.free(hdr.cast(), std::mem::size_of::<Header>()) };
            return Err(no_room);
        };
        // SAFETY: both blocks are fresh, aligned and large enough.
        unsafe {
            ptr::write_bytes(array.as_ptr(), 0, bytes);
            hdr.as_ptr().write(Header {
                magic: MAGIC,
                version: VERSION,
                next_cas: 1,
                bucket_count: n as u64,
                buckets: array.as_ptr().cast(),
                entries: 0,
                value_bytes: 0,
                last_warning: 0,
            });
        }
        Ok(Kv { alloc, hdr })
    }

    /// The table whose root is `root`, if it carries this layout's magic and version.
    ///
    /// # Safety
    ///
    /// `root` is null or points to at least a header's worth of memory that `alloc`
    /// manages; if it is a table, it was made by [`Kv::create`] with memory from the same
    /// allocator, and nothing else uses the table while the returned value lives (in
    /// nginx: the zone's mutex is held).
    pub unsafe fn attach(alloc: &'a mut A, root: *mut u8) -> Option<Kv<'a, A>> {
        let hdr = NonNull::new(root)?.cast::<Header>();
        let h = hdr.as_ref();
        let sane = h.magic == MAGIC
            && h.version == VERSION
            && h.bucket_count.is_power_of_two()
            && (MIN_BUCKETS as u64..=MAX_BUCKETS as u64).contains(&h.bucket_count)
            && !h.buckets.is_null()
            && h.next_cas != 0;
        sane.then_some(Kv { alloc, hdr })
    }

    /// Where the table starts (what [`Kv::attach`] takes).
    pub fn root(&self) -> *mut u8 {
        self.hdr.as_ptr().cast()
    }

    fn header(&self) -> &Header {
        // SAFETY: `hdr` is a valid header for the table's lifetime (create/attach).
        unsafe { self.hdr.as_ref() }
    }

    fn header_mut(&mut self) -> &mut Header {
        // SAFETY: as above, and `self` has exclusive access.
        unsafe { self.hdr.as_mut() }
    }

    /// Counts.
    pub fn stats(&self) -> KvStats {
        let h = self.header();
        KvStats {
            entries: h.entries,
            value_bytes: h.value_bytes,
            buckets: h.bucket_count,
        }
    }

    /// Whether a "zone full" warning is due at `now` (seconds): at most one per `interval`
    /// for the whole zone, whichever worker hits it.
    pub fn warning_due(&mut self, now: u64, interval: u64) -> bool {
        let h = self.header_mut();
        if h.last_warning != 0 && now.saturating_sub(h.last_warning) < interval {
            return false;
        }
        h.last_warning = now.max(1);
        true
    }

    /// The link that points at the entry for (`ns`, `key`), and the entry, if present.
    fn find(&self, hash: u64, ns: &[u8], key: &[u8]) -> Option<(*mut *mut Entry, *mut Entry)> {
        let h = self.header();
        // SAFETY: the bucket index is masked to the array's length; entries in the chains
        // were written by `set` and stay valid until unlinked.
        unsafe {
            let mut link = h.buckets.add((hash & (h.bucket_count - 1)) as usize);
            // A chain cannot be longer than the table (a guard against a corrupt zone).
            for _ in 0..=h.entries {
                let e = *link;
                if e.is_null() {
                    return None;
                }
                if (*e).hash == hash && entry_ns(e) == ns && entry_key(e) == key {
                    return Some((link, e));
                }
                link = ptr::addr_of_mut!((*e).next);
            }
        }
        None
    }

    /// The value of `key` in `ns`'s map, and its CAS token.
    pub fn get(&self, ns: &[u8], key: &[u8]) -> Result<(Vec<u8>, u32), KvError> {
        check("vm_id", ns.len(), MAX_VM_ID_BYTES)?;
        check("key", key.len(), MAX_KEY_BYTES)?;
        let (_, e) = self.find(hash(ns, key), ns, key).ok_or(KvError::NotFound)?;
        // SAFETY: `e` is a live entry; its chain holds `value_len` bytes.
        unsafe {
            let len = (*e).value_len as usize;
            let mut out = Vec::with_capacity(len);
            let mut c = (*e).chunks;
            for _ in 0..MAX_CHAIN_CHUNKS {
                if c.is_null() || out.len() >= len {
                    break;
                }
                let n = ((*c).len as usize).min(len - out.len());
                out.extend_from_slice(std::slice::from_raw_parts(payload(c), n));
                c = (*c).next;
            }
            Ok((out, (*e).cas))
        }
    }

    /// Sets `key` in `ns`'s map to `value` by Envoy's CAS rules (see the module's doc).
    /// On any error nothing changed.
    pub fn set(&mut self, ns: &[u8], key: &[u8], value: &[u8], cas: u32) -> Result<(), KvError> {
        check("vm_id", ns.len(), MAX_VM_ID_BYTES)?;
        check("key", key.len(), MAX_KEY_BYTES)?;
        check("value", value.len(), MAX_VALUE_BYTES)?;
        let hash = hash(ns, key);
        match self.find(hash, ns, key) {
            Some((_, e)) => {
                // SAFETY: `e` is a live entry of this table.
                unsafe {
                    if cas != 0 && cas != (*e).cas {
                        return Err(KvError::CasMismatch);
                    }
                    let old_len = u64::from((*e).value_len);
                    if !self.rewrite_in_place(e, value) {
                        let fresh = self.alloc_chain(value)?;
                        let old = std::mem::replace(&mut (*e).chunks, fresh);
                        self.free_chain(old);
                    }
                    (*e).value_len = value.len() as u32;
                    (*e).cas = self.next_cas();
                    let h = self.header_mut();
                    h.value_bytes = h.value_bytes - old_len + value.len() as u64;
                }
            }
            None => {
                let chain = self.alloc_chain(value)?;
                let size = std::mem::size_of::<Entry>() + ns.len() + key.len();
                let Some(block) = self.alloc.alloc(size) else {
                    // SAFETY: the chain was just allocated and is not linked anywhere.
                    unsafe { self.free_chain(chain) };
                    return Err(KvError::Full { bytes: value.len() });
                };
                let cas = self.next_cas();
                let h = self.header_mut();
                // SAFETY: `block` is fresh and `size` bytes long; the bucket index is masked.
                unsafe {
                    let e = block.as_ptr().cast::<Entry>();
                    let slot = h.buckets.add((hash & (h.bucket_count - 1)) as usize);
                    e.write(Entry {
                        next: *slot,
                        hash,
                        chunks: chain,
                        value_len: value.len() as u32,
                        cas,
                        ns_len: ns.len() as u32,
                        key_len: key.len() as u32,
                    });
                    let bytes = e.cast::<u8>().add(std::mem::size_of::<Entry>());
                    ptr::copy_nonoverlapping(ns.as_ptr(), bytes, ns.len());
                    ptr::copy_nonoverlapping(key.as_ptr(), bytes.add(ns.len()), key.len());
                    *slot = e;
                }
                h.entries += 1;
                h.value_bytes += value.len() as u64;
            }
        }
        Ok(())
    }

    /// Removes `key` from `ns`'s map and returns its memory; whether it was there.
    /// (Envoy's ABI has no delete: the module never calls this for a filter; it exists so
    /// the table is complete and its unlinking is tested.)
    pub fn remove(&mut self, ns: &[u8], key: &[u8]) -> bool {
        if ns.len() > MAX_VM_ID_BYTES || key.len() > MAX_KEY_BYTES {
            return false;
        }
        let Some((link, e)) = self.find(hash(ns, key), ns, key) else {
            return false;
        };
        // SAFETY: `link` points at `e`, a live entry; after unlinking nothing refers to it.
        unsafe {
            *link = (*e).next;
            let len = u64::from((*e).value_len);
            let size = std::mem::size_of::<Entry>() + (*e).ns_len as usize + (*e).key_len as usize;
            self.free_chain((*e).chunks);
            self.alloc.free(NonNull::new_unchecked(e.cast()), size);
            let h = self.header_mut();
            h.entries -= 1;
            h.value_bytes -= len;
        }
        true
    }

    /// Envoy's counter: the current value, then move on, skipping 0.
    fn next_cas(&mut self) -> u32 {
        let h = self.header_mut();
        let v = h.next_cas;
        h.next_cas = h.next_cas.wrapping_add(1);
        if h.next_cas == 0 {
            h.next_cas = 1;
        }
        v
    }

    /// Allocates a chain holding `value` (all or nothing): full pages, then one block of
    /// the exact size for the rest. An empty value is an empty chain.
    fn alloc_chain(&mut self, value: &[u8]) -> Result<*mut Chunk, KvError> {
        let mut head: *mut Chunk = ptr::null_mut();
        let mut tail: *mut *mut Chunk = &mut head;
        for part in value.chunks(CHUNK_PAYLOAD) {
            let Some(block) = self.alloc.alloc(std::mem::size_of::<Chunk>() + part.len()) else {
                // SAFETY: the chain so far was allocated here and is not linked anywhere.
                unsafe { self.free_chain(head) };
                return Err(KvError::Full { bytes: value.len() });
            };
            // SAFETY: `block` is fresh and large enough; `tail` points into `head` or the
            // previous chunk.
            unsafe {
                let c = block.as_ptr().cast::<Chunk>();
                c.write(Chunk {
                    next: ptr::null_mut(),
                    cap: part.len() as u32,
                    len: part.len() as u32,
                });
                ptr::copy_nonoverlapping(part.as_ptr(), payload(c), part.len());
                *tail = c;
                tail = ptr::addr_of_mut!((*c).next);
            }
        }
        Ok(head)
    }

    /// Writes `value` over the entry's own chunks when it fits them and uses at least
    /// half of their room (so a shrunk value does not pin a large block), freeing chunks
    /// left over. No allocation, so it cannot fail; returns whether it did it.
    ///
    /// # Safety
    ///
    /// `e` is a live entry of this table.
    unsafe fn rewrite_in_place(&mut self, e: *mut Entry, value: &[u8]) -> bool {
        let mut room = 0usize;
        let mut c = (*e).chunks;
        for _ in 0..MAX_CHAIN_CHUNKS {
            if c.is_null() {
                break;
            }
            room += (*c).cap as usize;
            c = (*c).next;
        }
        if value.is_empty() || value.len() > room || value.len() * 2 < room {
            return false;
        }
        let mut rest = value;
        let mut link: *mut *mut Chunk = ptr::addr_of_mut!((*e).chunks);
        for _ in 0..MAX_CHAIN_CHUNKS {
            let c = *link;
            if c.is_null() || rest.is_empty() {
                break;
            }
            let n = ((*c).cap as usize).min(rest.len());
            ptr::copy_nonoverlapping(rest.as_ptr(), payload(c), n);
            (*c).len = n as u32;
            rest = &rest[n..];
            link = ptr::addr_of_mut!((*c).next);
        }
        let spare = std::mem::replace(&mut *link, ptr::null_mut());
        self.free_chain(spare);
        true
    }

    /// Frees a chain.
    ///
    /// # Safety
    ///
    /// The chain's chunks came from `alloc_chain` and nothing refers to them any more.
    unsafe fn free_chain(&mut self, mut c: *mut Chunk) {
        for _ in 0..MAX_CHAIN_CHUNKS {
            if c.is_null() {
                return;
            }
            let next = (*c).next;
            let size = std::mem::size_of::<Chunk>() + (*c).cap as usize;
            self.alloc.free(NonNull::new_unchecked(c.cast()), size);
            c = next;
        }
    }
}

unsafe fn payload(c: *mut Chunk) -> *mut u8 {
    c.cast::<u8>().add(std::mem::size_of::<Chunk>())
}

unsafe fn entry_ns<'e>(e: *const Entry) -> &'e [u8] {
    let p = e.cast::<u8>().add(std::mem::size_of::<Entry>());
    std::slice::from_raw_parts(p, (*e).ns_len as usize)
}

unsafe fn entry_key<'e>(e: *const Entry) -> &'e [u8] {
    let p = e
        .cast::<u8>()
        .add(std::mem::size_of::<Entry>() + (*e).ns_len as usize);
    std::slice::from_raw_parts(p, (*e).key_len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::testing::HeapAlloc;

    fn get(kv: &Kv<'_, HeapAlloc>, key: &str) -> Result<(Vec<u8>, u32), KvError> {
        kv.get(b"vm", key.as_bytes())
    }

    fn set(kv: &mut Kv<'_, HeapAlloc>, key: &str, v: &[u8], cas: u32) -> Result<(), KvError> {
        kv.set(b"vm", key.as_bytes(), v, cas)
    }

    /// The harness's `envoy_cas_is_global_and_zero_writes_unconditionally`, on the table.
    #[test]
    fn envoy_cas_rules() {
        let mut heap = HeapAlloc::new(1 << 20);
        let mut kv = Kv::create(&mut heap, 64).unwrap();
        assert_eq!(get(&kv, "a"), Err(KvError::NotFound));
        // A non-zero CAS on a missing key is not checked.
        set(&mut kv, "a", b"1", 77).unwrap();
        let (v, cas_a) = get(&kv, "a").unwrap();
        assert_eq!((v.as_slice(), cas_a), (&b"1"[..], 1));
        set(&mut kv, "b", b"x", 0).unwrap();
        assert_eq!(get(&kv, "b").unwrap().1, 2, "one counter for all keys");
        assert_eq!(set(&mut kv, "a", b"2", 2), Err(KvError::CasMismatch));
        assert_eq!(
            get(&kv, "a").unwrap(),
            (b"1".to_vec(), 1),
            "a refused write changes nothing"
        );
        set(&mut kv, "a", b"2", cas_a).unwrap();
        set(&mut kv, "a", b"3", 0).unwrap();
        assert_eq!(get(&kv, "a").unwrap(), (b"3".to_vec(), 4));
        // An empty value is stored (the ABI's null value); vm ids are separate maps.
        set(&mut kv, "a", b"", 0).unwrap();
        assert_eq!(get(&kv, "a").unwrap(), (Vec::new(), 5));
        assert_eq!(kv.get(b"other", b"a"), Err(KvError::NotFound));
        kv.set(b"other", b"a", b"o", 0).unwrap();
        assert_eq!(kv.get(b"other", b"a").unwrap(), (b"o".to_vec(), 6));
        assert_eq!(get(&kv, "a").unwrap().0, b"");
        // The namespace is length-prefixed: ("vm", "xa") is not ("vmx", "a").
        kv.set(b"vmx", b"a", b"1", 0).unwrap();
        assert_eq!(get(&kv, "xa"), Err(KvError::NotFound));
        assert_eq!(kv.stats().entries, 4);
    }

    #[test]
    fn cas_counter_skips_zero() {
        let mut heap = HeapAlloc::new(1 << 20);
        let mut kv = Kv::create(&mut heap, 64).unwrap();
        kv.header_mut().next_cas = u32::MAX;
        set(&mut kv, "a", b"1", 0).unwrap();
        set(&mut kv, "b", b"1", 0).unwrap();
        assert_eq!(get(&kv, "a").unwrap().1, u32::MAX);
        assert_eq!(get(&kv, "b").unwrap().1, 1, "0 is never a token");
    }

    #[test]
    fn chains_collide_and_unlink() {
        let mut heap = HeapAlloc::new(4 << 20);
        let mut kv = Kv::create(&mut heap, MIN_BUCKETS).unwrap();
        // Far more keys than buckets: long chains.
        for i in 0..2000 {
            set(&mut kv, &format!("k{i}"), format!("v{i}").as_bytes(), 0).unwrap();
        }
        for i in (0..2000).step_by(3) {
            assert!(kv.remove(b"vm", format!("k{i}").as_bytes()));
        }
        assert!(!kv.remove(b"vm", b"k0"), "already gone");
        for i in 0..2000 {
            let r = get(&kv, &format!("k{i}"));
            if i % 3 == 0 {
                assert_eq!(r, Err(KvError::NotFound), "k{i}");
            } else {
                assert_eq!(r.unwrap().0, format!("v{i}").into_bytes(), "k{i}");
            }
        }
        assert_eq!(kv.stats().entries, 2000 - 667);
        for i in 0..2000 {
            kv.remove(b"vm", format!("k{i}").as_bytes());
        }
        let root = kv.root();
        assert_eq!(
            kv.stats(),
            KvStats {
                entries: 0,
                value_bytes: 0,
                buckets: 64
            }
        );
        // Only the header and the bucket array are left.
        assert_eq!(heap.blocks(), 2, "every entry and chunk was freed");
        let kv = unsafe { Kv::attach(&mut heap, root) }.unwrap();
        assert_eq!(kv.stats().entries, 0);
    }

    #[test]
    fn large_values_span_chunks_and_are_reused_in_place() {
        let mut heap = HeapAlloc::new(16 << 20);
        let mut kv = Kv::create(&mut heap, 64).unwrap();
        let root = kv.root();
        let big: Vec<u8> = (0..(1 << 20) + 123).map(|i| (i % 251) as u8).collect();
        set(&mut kv, "big", &big, 0).unwrap();
        assert_eq!(get(&kv, "big").unwrap().0, big);
        let (blocks, used) = (heap.blocks(), heap.used());
        assert!(
            blocks > 256,
            "a 1 MiB value is a chain of pages, not one block"
        );
        assert!(used < (1 << 20) + 20_000, "little overhead: {used}");
        // A value of similar size reuses the chunks: no new block, spare chunks freed.
        let mut kv = unsafe { Kv::attach(&mut heap, root) }.unwrap();
        let other: Vec<u8> = big
            .iter()
            .map(|b| b.wrapping_add(1))
            .take(900_000)
            .collect();
        set(&mut kv, "big", &other, 0).unwrap();
        assert_eq!(get(&kv, "big").unwrap().0, other);
        assert_eq!(kv.stats().value_bytes, 900_000);
        assert!(heap.blocks() < blocks && heap.used() < used);
        // A much smaller value gets its own block instead of pinning the big chain.
        let mut kv = unsafe { Kv::attach(&mut heap, root) }.unwrap();
        set(&mut kv, "big", b"tiny", 0).unwrap();
        assert_eq!(get(&kv, "big").unwrap().0, b"tiny");
        assert_eq!(heap.blocks(), 4, "header, buckets, entry, one chunk");
        // Emptying releases everything but the entry.
        let mut kv = unsafe { Kv::attach(&mut heap, root) }.unwrap();
        set(&mut kv, "big", b"", 0).unwrap();
        assert_eq!(get(&kv, "big").unwrap().0, b"");
        assert_eq!(heap.blocks(), 3, "header, buckets, entry");
    }

    #[test]
    fn full_zone_fails_the_write_and_changes_nothing() {
        let mut heap = HeapAlloc::new(64 * 1024);
        let mut kv = Kv::create(&mut heap, 64).unwrap();
        set(&mut kv, "a", &[1; 1000], 0).unwrap();
        let (_, cas) = get(&kv, "a").unwrap();
        // A new key that does not fit: refused, nothing allocated stays behind.
        let before = kv.stats();
        assert_eq!(
            set(&mut kv, "b", &[2; 100_000], 0),
            Err(KvError::Full { bytes: 100_000 })
        );
        assert_eq!(kv.stats(), before);
        assert_eq!(get(&kv, "b"), Err(KvError::NotFound));
        // Replacing with a value that does not fit keeps the old value and token.
        assert_eq!(
            set(&mut kv, "a", &[3; 100_000], 0),
            Err(KvError::Full { bytes: 100_000 })
        );
        assert_eq!(get(&kv, "a").unwrap(), (vec![1; 1000], cas));
        // The CAS counter did not move on the failures.
        set(&mut kv, "c", b"x", 0).unwrap();
        assert_eq!(get(&kv, "c").unwrap().1, cas + 1);
        // Emptying a key always works (no allocation), and frees room for others.
        set(&mut kv, "a", b"", 0).unwrap();
        set(&mut kv, "b", &[2; 40_000], 0).unwrap();
        assert_eq!(get(&kv, "b").unwrap().0, vec![2; 40_000]);
        // Fill up with small keys until refused: a bounded number of successes.
        let mut stored = 0;
        for i in 0..10_000 {
            match set(&mut kv, &format!("f{i}"), &[0; 100], 0) {
                Ok(()) => stored += 1,
                Err(e) => {
                    assert_eq!(e, KvError::Full { bytes: 100 });
                    break;
                }
            }
        }
        assert!(stored > 10 && stored < 10_000, "stored {stored}");
        assert!(heap.used() <= heap.budget);
    }

    #[test]
    fn bounds_are_enforced() {
        let mut heap = HeapAlloc::new(1 << 20);
        let mut kv = Kv::create(&mut heap, 64).unwrap();
        let long_key = vec![b'k'; MAX_KEY_BYTES + 1];
        assert_eq!(
            kv.set(b"vm", &long_key, b"v", 0),
            Err(KvError::TooLarge {
                what: "key",
                len: MAX_KEY_BYTES + 1,
                max: MAX_KEY_BYTES
            })
        );
        assert!(matches!(
            kv.get(b"vm", &long_key),
            Err(KvError::TooLarge { .. })
        ));
        let long_ns = vec![b'n'; MAX_VM_ID_BYTES + 1];
        assert!(matches!(
            kv.set(&long_ns, b"k", b"v", 0),
            Err(KvError::TooLarge { what: "vm_id", .. })
        ));
        let huge = vec![0u8; MAX_VALUE_BYTES + 1];
        assert!(matches!(
            kv.set(b"vm", b"k", &huge, 0),
            Err(KvError::TooLarge { what: "value", .. })
        ));
        assert_eq!(kv.stats().entries, 0);
    }

    #[test]
    fn attach_checks_the_header() {
        let mut heap = HeapAlloc::new(1 << 20);
        let kv = Kv::create(&mut heap, 100).unwrap();
        assert_eq!(kv.stats().buckets, 128, "rounded to a power of two");
        let root = kv.root();
        assert!(unsafe { Kv::attach(&mut heap, ptr::null_mut()) }.is_none());
        let mut kv = unsafe { Kv::attach(&mut heap, root) }.unwrap();
        set(&mut kv, "a", b"1", 0).unwrap();
        // Another layout version is not attached (the zone is started afresh instead).
        unsafe { (*root.cast::<Header>()).version = VERSION + 1 };
        assert!(unsafe { Kv::attach(&mut heap, root) }.is_none());
        unsafe { (*root.cast::<Header>()).version = VERSION };
        unsafe { (*root.cast::<Header>()).magic = 0 };
        assert!(unsafe { Kv::attach(&mut heap, root) }.is_none());
    }

    #[test]
    fn table_creation_needs_room() {
        let mut heap = HeapAlloc::new(1024);
        assert!(matches!(
            Kv::create(&mut heap, 1 << 16),
            Err(KvError::NoRoomForTable { buckets: 65536 })
        ));
        assert_eq!(heap.blocks(), 0, "the header was given back");
    }

    #[test]
    fn bucket_counts() {
        assert_eq!(bucket_count_for(0), MIN_BUCKETS);
        assert_eq!(bucket_count_for(128 << 20), 32768);
        assert_eq!(bucket_count_for(100 << 20), 32768);
        assert_eq!(bucket_count_for(usize::MAX / 2), MAX_BUCKETS);
    }

    #[test]
    fn warnings_are_rate_limited() {
        let mut heap = HeapAlloc::new(1 << 20);
        let mut kv = Kv::create(&mut heap, 64).unwrap();
        assert!(kv.warning_due(1000, 60));
        assert!(!kv.warning_due(1059, 60));
        assert!(kv.warning_due(1060, 60));
    }
}
