//! The store's index and its eviction policies.
//!
//! One index describes one shard of the store (`store.rs`) and lives in one shared-data
//! value: per slot a 32-byte record, two intrusive queues threaded through the records, and a
//! ring of "ghost" key hashes. Two policies run on it:
//!
//! - [`Policy::Lru`]: one queue; an access moves the entry to the head; the tail goes.
//! - [`Policy::S3Fifo`] (Yang et al., SOSP '23): new entries enter a small FIFO queue (5 %
//!   of a shard's bytes); at its tail, an entry accessed since it came in moves to the main queue,
//!   an entry that was not is evicted and its hash remembered in the ghost ring. A miss on
//!   a ghost hash enters the main queue directly. The main queue is a FIFO with reinsertion
//!   (a 2-bit access counter). One-hit wonders leave quickly; entries that are reused stay,
//!   which keeps more hits than LRU on skewed traffic (`benches/eviction.rs`).
//!
//! Accesses only bump a counter (S3-FIFO) or relink (LRU) when the index is next written:
//! the store buffers them, so a hit never writes shared data.

use hashbrown::HashSet;
use serde::Deserialize;

/// Which entry goes when a limit is reached; the `cache.eviction` config value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Least recently used.
    Lru,
    /// S3-FIFO: small and main FIFO queues with a ghost queue.
    #[default]
    S3Fifo,
}

impl Policy {
    /// Config value and log label.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Lru => "lru",
            Policy::S3Fifo => "s3fifo",
        }
    }
}

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Kind {
    /// Nothing.
    #[default]
    Free = 0,
    /// A response under its primary key.
    Response = 1,
    /// A Vary marker under its primary key.
    Vary = 2,
    /// A response under its secondary (Vary) key.
    Variant = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Kind {
        match b {
            1 => Kind::Response,
            2 => Kind::Vary,
            3 => Kind::Variant,
            _ => Kind::Free,
        }
    }
}

/// End of a queue.
const NIL: u32 = u32::MAX;
/// The small queue (S3-FIFO) and the only queue (LRU).
const SMALL: usize = 0;
/// The main queue (S3-FIFO).
const MAIN: usize = 1;
/// Largest access counter (2 bits, as in the paper).
const MAX_FREQ: u8 = 3;
/// Share of the bytes the small queue aims for. The paper's 10 % lost about 0.1 point of hit
/// ratio once the store split its entries into shards of 64 (`benches/eviction.rs`, Zipf
/// 0.7-1.1); 5 % keeps the sharded store above the single index at 10 % on every row.
const SMALL_SHARE: f64 = 0.05;

/// One slot's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Record {
    /// Hash of the key the entry is found under.
    pub hash: u64,
    /// Low 32 bits of the primary key's hash: ties variants to their URI.
    pub primary: u32,
    /// Bytes of the stored value.
    pub size: u32,
    /// Stamped into the stored value; tells a slot's successive owners apart.
    pub generation: u32,
    prev: u32,
    next: u32,
    /// What the slot holds.
    pub kind: Kind,
    queue: u8,
    freq: u8,
}

const FREE: Record = Record {
    hash: 0,
    primary: 0,
    size: 0,
    generation: 0,
    prev: NIL,
    next: NIL,
    kind: Kind::Free,
    queue: 0,
    freq: 0,
};

/// `EFi2` was the single index of layout `ef1`; `EFi3` is one shard's index (layout `ef2`).
/// The header is unchanged, but a value of the other version is refused, never misread.
const MAGIC: &[u8; 4] = b"EFi3";
const HEADER_BYTES: usize = 40;
/// Bytes per slot in the index: the record.
pub const RECORD_BYTES: usize = 32;
/// Bytes per slot in the index: the ghost ring (one hash per slot).
pub const GHOST_BYTES: usize = 8;

/// Entries and bytes in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Occupied slots.
    pub entries: u32,
    /// Bytes of their values.
    pub bytes: u64,
}

/// The index, kept in its encoded form: a write changes a few bytes in place and the
/// shared-data value is the buffer itself, so reading and writing the index does not cost a
/// pass over every slot. Records are read and written at their offsets on demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// Header, records, then the ghost ring, exactly as stored.
    buf: Vec<u8>,
    slots: usize,
    next_generation: u32,
    head: [u32; 2],
    tail: [u32; 2],
    ghost_next: u32,
    /// Built on demand: the store checks one hash per insert, where a scan of the ring is
    /// cheaper than hashing it; a long simulation builds it once.
    ghost_set: Option<HashSet<u64>>,
    usage: Usage,
    queue_bytes: [u64; 2],
    queue_len: [u32; 2],
}

impl Index {
    /// An index of `slots` free slots.
    pub fn empty(slots: u32) -> Index {
        let slots = slots as usize;
        let mut index = Index {
            buf: vec![0; HEADER_BYTES + slots * (RECORD_BYTES + GHOST_BYTES)],
            slots,
            next_generation: 1,
            head: [NIL; 2],
            tail: [NIL; 2],
            ghost_next: 0,
            ghost_set: None,
            usage: Usage::default(),
            queue_bytes: [0; 2],
            queue_len: [0; 2],
        };
        for slot in 0..slots as u32 {
            index.put(slot, &FREE);
        }
        index
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Entries and bytes in use.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    fn offset(slot: u32) -> usize {
        HEADER_BYTES + slot as usize * RECORD_BYTES
    }

    fn word(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.buf[at],
            self.buf[at + 1],
            self.buf[at + 2],
            self.buf[at + 3],
        ])
    }

    fn kind_at(&self, slot: u32) -> Kind {
        Kind::from_u8(self.buf[Self::offset(slot) + 28])
    }

    fn rec(&self, slot: u32) -> Record {
        let o = Self::offset(slot);
        let b = &self.buf[o..o + RECORD_BYTES];
        Record {
            hash: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            primary: self.word(o + 8),
            size: self.word(o + 12),
            generation: self.word(o + 16),
            prev: self.word(o + 20),
            next: self.word(o + 24),
            kind: Kind::from_u8(b[28]),
            queue: b[29].min(1),
            freq: b[30].min(MAX_FREQ),
        }
    }

    fn put(&mut self, slot: u32, r: &Record) {
        let o = Self::offset(slot);
        let b = &mut self.buf[o..o + RECORD_BYTES];
        b[0..8].copy_from_slice(&r.hash.to_le_bytes());
        b[8..12].copy_from_slice(&r.primary.to_le_bytes());
        b[12..16].copy_from_slice(&r.size.to_le_bytes());
        b[16..20].copy_from_slice(&r.generation.to_le_bytes());
        b[20..24].copy_from_slice(&r.prev.to_le_bytes());
        b[24..28].copy_from_slice(&r.next.to_le_bytes());
        b[28..32].copy_from_slice(&[r.kind as u8, r.queue, r.freq, 0]);
    }

    fn update(&mut self, slot: u32, f: impl FnOnce(&mut Record)) {
        let mut r = self.rec(slot);
        f(&mut r);
        self.put(slot, &r);
    }

    /// The record of `slot`.
    pub fn record(&self, slot: u32) -> Option<Record> {
        ((slot as usize) < self.slots).then(|| self.rec(slot))
    }

    /// Occupied slots and their records.
    pub fn occupied(&self) -> impl Iterator<Item = (u32, Record)> + '_ {
        (0..self.slots as u32)
            .filter(|&s| self.kind_at(s) != Kind::Free)
            .map(|s| (s, self.rec(s)))
    }

    /// The slot holding `hash`, by a scan (the store keeps a map for lookups).
    pub fn find(&self, hash: u64) -> Option<u32> {
        self.occupied()
            .find(|(_, r)| r.hash == hash)
            .map(|(s, _)| s)
    }

    /// A free slot not in `exclude`, preferring those in `prefer` (just freed: their values
    /// will be overwritten anyway).
    pub fn free_slot(&self, exclude: &[u32], prefer: &[u32]) -> Option<u32> {
        let ok = |s: &u32| {
            (*s as usize) < self.slots && self.kind_at(*s) == Kind::Free && !exclude.contains(s)
        };
        prefer
            .iter()
            .copied()
            .find(ok)
            .or_else(|| (0..self.slots as u32).find(ok))
    }

    /// Records an access to `slot` if it still holds `generation`.
    pub fn touch(&mut self, slot: u32, generation: u32, policy: Policy) {
        let Some(r) = self.record(slot) else {
            return;
        };
        if r.kind == Kind::Free || r.generation != generation {
            return;
        }
        match policy {
            Policy::S3Fifo => self.update(slot, |r| r.freq = (r.freq + 1).min(MAX_FREQ)),
            Policy::Lru => {
                let q = r.queue as usize;
                self.unlink(slot);
                self.push_head(q, slot);
            }
        }
    }

    /// Puts an entry into free `slot` and returns the generation stamped on it.
    pub fn place(
        &mut self,
        slot: u32,
        hash: u64,
        primary: u32,
        size: u32,
        kind: Kind,
        policy: Policy,
    ) -> u32 {
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        // S3-FIFO: a key evicted recently from the small queue was reused: straight to main.
        let queue = match policy {
            Policy::S3Fifo if self.is_ghost(hash) => MAIN,
            _ => SMALL,
        };
        let r = Record {
            hash,
            primary,
            size,
            generation,
            kind,
            ..FREE
        };
        self.put(slot, &r);
        self.usage.entries += 1;
        self.usage.bytes += u64::from(size);
        self.push_head(queue, slot);
        generation
    }

    /// Frees `slot`.
    pub fn remove(&mut self, slot: u32) {
        let Some(r) = self.record(slot) else {
            return;
        };
        if r.kind == Kind::Free {
            return;
        }
        self.unlink(slot);
        self.usage.entries -= 1;
        self.usage.bytes -= u64::from(r.size);
        self.put(slot, &FREE);
    }

    /// The slot to evict next, applying the policy's promotions on the way; `None` when
    /// nothing is stored. `total_bytes` is the byte limit (it sizes the small queue).
    pub fn victim(&mut self, policy: Policy, total_bytes: u64) -> Option<u32> {
        if self.usage.entries == 0 {
            return None;
        }
        if policy == Policy::Lru {
            return self.tail_of(SMALL).or_else(|| self.tail_of(MAIN));
        }
        // The small queue's share counts in bytes and in entries: whichever limit binds.
        let small_bytes = (total_bytes as f64 * SMALL_SHARE) as u64;
        let small_len = ((self.slots as f64 * SMALL_SHARE) as u32).max(1);
        // Every step either evicts or moves an entry while lowering its counter, so this ends
        // within a few passes over the entries; the bound guards against a corrupt index.
        for _ in 0..(4 * self.slots + 4) {
            let from_small = self.queue_bytes[SMALL] > small_bytes
                || self.queue_len[SMALL] > small_len
                || self.head[MAIN] == NIL;
            if from_small {
                let t = self.tail_of(SMALL)?;
                let r = self.rec(t);
                if r.freq > 0 {
                    // Reused while in the small queue: keep it, in the main queue.
                    self.unlink(t);
                    self.update(t, |r| r.freq = 0);
                    self.push_head(MAIN, t);
                    continue;
                }
                self.remember(r.hash);
                return Some(t);
            }
            let t = self.tail_of(MAIN)?;
            let r = self.rec(t);
            if r.freq > 0 {
                self.update(t, |r| r.freq -= 1);
                self.unlink(t);
                self.push_head(MAIN, t);
                continue;
            }
            return Some(t);
        }
        self.tail_of(SMALL).or_else(|| self.tail_of(MAIN))
    }

    /// The oldest-inserted variant of the URI whose primary hash is `primary`.
    pub fn oldest_variant(&self, primary: u32) -> Option<u32> {
        self.occupied()
            .filter(|(_, r)| r.kind == Kind::Variant && r.primary == primary)
            .min_by_key(|(_, r)| r.generation)
            .map(|(s, _)| s)
    }

    /// Keeps a hash set of the ghost ring from now on, for callers that insert many times
    /// into one index (simulations); the store, which decodes the index per insert, does not.
    pub fn index_ghosts(&mut self) {
        let set = (0..self.slots)
            .map(|i| self.ghost(i))
            .filter(|&h| h != 0)
            .collect();
        self.ghost_set = Some(set);
    }

    fn ghost_offset(i: usize, slots: usize) -> usize {
        HEADER_BYTES + slots * RECORD_BYTES + i * GHOST_BYTES
    }

    fn ghost(&self, i: usize) -> u64 {
        let o = Self::ghost_offset(i, self.slots);
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.buf[o..o + GHOST_BYTES]);
        u64::from_le_bytes(a)
    }

    fn is_ghost(&self, hash: u64) -> bool {
        match &self.ghost_set {
            Some(set) => set.contains(&hash),
            None => hash != 0 && (0..self.slots).any(|i| self.ghost(i) == hash),
        }
    }

    fn tail_of(&self, q: usize) -> Option<u32> {
        (self.tail[q] != NIL).then_some(self.tail[q])
    }

    fn remember(&mut self, hash: u64) {
        if self.slots == 0 {
            return;
        }
        let i = self.ghost_next as usize % self.slots;
        let old = self.ghost(i);
        let o = Self::ghost_offset(i, self.slots);
        self.buf[o..o + GHOST_BYTES].copy_from_slice(&hash.to_le_bytes());
        if let Some(set) = &mut self.ghost_set {
            if old != 0 {
                set.remove(&old);
            }
            set.insert(hash);
        }
        self.ghost_next = ((i + 1) % self.slots) as u32;
    }

    fn push_head(&mut self, q: usize, slot: u32) {
        let old = self.head[q];
        let size = self.rec(slot).size;
        self.update(slot, |r| {
            r.queue = q as u8;
            r.prev = NIL;
            r.next = old;
        });
        if old != NIL {
            self.update(old, |r| r.prev = slot);
        } else {
            self.tail[q] = slot;
        }
        self.head[q] = slot;
        self.queue_bytes[q] += u64::from(size);
        self.queue_len[q] += 1;
    }

    fn unlink(&mut self, slot: u32) {
        let r = self.rec(slot);
        let q = r.queue as usize;
        match r.prev {
            NIL => self.head[q] = r.next,
            p => self.update(p, |x| x.next = r.next),
        }
        match r.next {
            NIL => self.tail[q] = r.prev,
            n => self.update(n, |x| x.prev = r.prev),
        }
        self.update(slot, |x| {
            x.prev = NIL;
            x.next = NIL;
        });
        self.queue_bytes[q] -= u64::from(r.size);
        self.queue_len[q] -= 1;
    }

    /// The occupied slots' key hashes and the usage, read straight from encoded bytes: all a
    /// lookup needs, without checking the queues.
    pub fn scan(b: &[u8]) -> Option<(Vec<(u64, u32)>, Usage)> {
        let slots = Self::check_size(b)?;
        let mut usage = Usage::default();
        let mut found = Vec::new();
        let records = &b[HEADER_BYTES..HEADER_BYTES + slots * RECORD_BYTES];
        for (slot, r) in records.chunks_exact(RECORD_BYTES).enumerate() {
            if Kind::from_u8(r[28]) == Kind::Free {
                continue;
            }
            let hash = u64::from_le_bytes(r[0..8].try_into().ok()?);
            usage.entries += 1;
            usage.bytes += u64::from(u32::from_le_bytes(r[12..16].try_into().ok()?));
            found.push((hash, slot as u32));
        }
        Some((found, usage))
    }

    /// The slot and generation of the occupied record for `hash`, read straight from the
    /// encoded bytes without copying or checking the queues: a lookup's whole cost.
    pub fn find_encoded(b: &[u8], hash: u64) -> Option<(u32, u32)> {
        let slots = Self::check_size(b)?;
        let records = b.get(HEADER_BYTES..HEADER_BYTES + slots * RECORD_BYTES)?;
        let want = hash.to_le_bytes();
        records
            .chunks_exact(RECORD_BYTES)
            .enumerate()
            .find(|(_, r)| {
                r.get(0..8) == Some(&want[..]) && r.get(28).is_some_and(|&k| (1..=3).contains(&k))
            })
            .and_then(|(slot, r)| {
                let g = r.get(16..20)?;
                Some((slot as u32, u32::from_le_bytes([g[0], g[1], g[2], g[3]])))
            })
    }

    fn check_size(b: &[u8]) -> Option<usize> {
        if b.len() < HEADER_BYTES || &b[..4] != MAGIC {
            return None;
        }
        let slots = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        (b.len() == HEADER_BYTES + slots * (RECORD_BYTES + GHOST_BYTES)).then_some(slots)
    }

    /// Takes an encoded index; `None` when the bytes are not a consistent index (the store
    /// then starts afresh rather than trusting corrupt links). The queues are walked once to
    /// check them, which also yields the usage; free records are not read.
    pub fn decode(b: &[u8]) -> Option<Index> {
        let slots = Self::check_size(b)?;
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut index = Index {
            buf: b.to_vec(),
            slots,
            next_generation: word(8),
            head: [word(12), word(16)],
            tail: [word(20), word(24)],
            ghost_next: word(28),
            ghost_set: None,
            usage: Usage::default(),
            queue_bytes: [0; 2],
            queue_len: [0; 2],
        };
        // Walk each queue: every record on it must be occupied, name this queue and link
        // back; the walk counts and sizes the queues. Then no occupied record may be off
        // the queues.
        for q in [SMALL, MAIN] {
            let mut prev = NIL;
            let mut cur = index.head[q];
            while cur != NIL {
                if cur as usize >= slots {
                    return None;
                }
                let r = index.rec(cur);
                if r.kind == Kind::Free || r.queue as usize != q || r.prev != prev {
                    return None;
                }
                index.queue_len[q] += 1;
                index.queue_bytes[q] += u64::from(r.size);
                if index.queue_len[SMALL] + index.queue_len[MAIN] > slots as u32 {
                    return None;
                }
                prev = cur;
                cur = r.next;
            }
            if index.tail[q] != prev {
                return None;
            }
        }
        index.usage = Usage {
            entries: index.queue_len[SMALL] + index.queue_len[MAIN],
            bytes: index.queue_bytes[SMALL] + index.queue_bytes[MAIN],
        };
        let occupied = (0..slots as u32)
            .filter(|&s| index.kind_at(s) != Kind::Free)
            .count() as u32;
        (occupied == index.usage.entries).then_some(index)
    }

    /// The encoded index: the buffer, with the header brought up to date.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.buf.clone();
        b[..4].copy_from_slice(MAGIC);
        let header = [
            self.slots as u32,
            self.next_generation,
            self.head[0],
            self.head[1],
            self.tail[0],
            self.tail[1],
            self.ghost_next,
        ];
        for (i, v) in header.iter().enumerate() {
            b[4 + i * 4..8 + i * 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    #[cfg(test)]
    fn links_are_sound(&self) -> bool {
        Index::decode(&self.encode()).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(index: &mut Index, hashes: &[u64], policy: Policy) -> Vec<u32> {
        hashes
            .iter()
            .map(|&h| {
                let s = index.free_slot(&[], &[]).unwrap();
                index.place(s, h, 0, 10, Kind::Response, policy);
                s
            })
            .collect()
    }

    #[test]
    fn round_trip_keeps_queues_and_ghosts() {
        let mut i = Index::empty(8);
        let slots = fill(&mut i, &[1, 2, 3], Policy::S3Fifo);
        i.touch(
            slots[0],
            i.record(slots[0]).unwrap().generation,
            Policy::S3Fifo,
        );
        i.remember(99);
        let back = Index::decode(&i.encode()).unwrap();
        assert_eq!(back.encode(), i.encode());
        assert_eq!(back.usage(), i.usage());
        let (found, usage) = Index::scan(&i.encode()).unwrap();
        assert_eq!(usage, i.usage());
        let expected: Vec<(u64, u32)> = i.occupied().map(|(s, r)| (r.hash, s)).collect();
        assert_eq!(found, expected);
        assert_eq!(
            back.usage(),
            Usage {
                entries: 3,
                bytes: 30
            }
        );
        assert_eq!(
            i.encode().len(),
            HEADER_BYTES + 8 * (RECORD_BYTES + GHOST_BYTES)
        );
    }

    #[test]
    fn corrupt_links_are_refused() {
        let mut i = Index::empty(4);
        fill(&mut i, &[1, 2], Policy::Lru);
        let mut b = i.encode();
        // Point the first record's `next` at itself: a cycle.
        let at = HEADER_BYTES + 24;
        b[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(Index::decode(&b), None);
        assert_eq!(Index::decode(&b[..10]), None);
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut i = Index::empty(3);
        let s = fill(&mut i, &[1, 2, 3], Policy::Lru);
        let g = i.record(s[0]).unwrap().generation;
        i.touch(s[0], g, Policy::Lru);
        assert_eq!(i.victim(Policy::Lru, 1000), Some(s[1]));
    }

    #[test]
    fn s3fifo_evicts_one_hit_wonders_and_promotes_reused_entries() {
        let mut i = Index::empty(4);
        let s = fill(&mut i, &[1, 2, 3, 4], Policy::S3Fifo);
        // Entry 1 was reused while in the small queue: it moves to main, 2 goes.
        let g = i.record(s[0]).unwrap().generation;
        i.touch(s[0], g, Policy::S3Fifo);
        let v = i.victim(Policy::S3Fifo, 40).unwrap();
        assert_eq!(v, s[1]);
        i.remove(v);
        // 2 is remembered: when it comes back it goes straight to the main queue.
        let slot = i.free_slot(&[], &[]).unwrap();
        i.place(slot, 2, 0, 10, Kind::Response, Policy::S3Fifo);
        assert_eq!(i.record(slot).unwrap().queue as usize, MAIN);
    }

    #[test]
    fn touches_of_a_reused_slot_are_ignored() {
        let mut i = Index::empty(2);
        let s = fill(&mut i, &[1], Policy::S3Fifo);
        i.touch(s[0], 12345, Policy::S3Fifo);
        assert_eq!(i.record(s[0]).unwrap().freq, 0);
    }

    #[test]
    fn remove_keeps_the_queues_consistent() {
        let mut i = Index::empty(5);
        let s = fill(&mut i, &[1, 2, 3, 4, 5], Policy::Lru);
        i.remove(s[2]);
        i.remove(s[0]);
        assert!(i.links_are_sound());
        assert_eq!(
            i.usage(),
            Usage {
                entries: 3,
                bytes: 30
            }
        );
        assert_eq!(i.victim(Policy::Lru, 1000), Some(s[1]));
    }

    #[test]
    fn oldest_variant_is_the_first_inserted() {
        let mut i = Index::empty(4);
        let a = i.free_slot(&[], &[]).unwrap();
        i.place(a, 10, 7, 1, Kind::Variant, Policy::Lru);
        let b = i.free_slot(&[], &[]).unwrap();
        i.place(b, 11, 7, 1, Kind::Variant, Policy::Lru);
        assert_eq!(i.oldest_variant(7), Some(a));
        assert_eq!(i.oldest_variant(8), None);
    }
}
