//! The bounded store over Proxy-Wasm shared data, sharded so that every operation reads and
//! writes a few small values whatever the number of entries.
//!
//! Shared data has no delete, no size bound, and Envoy never forgets a key, so the store
//! writes a fixed set of keys, created by [`Store::init`]:
//!
//! - `<ns>/a`, the ledger (64 bytes): layout (shard count, `max_entries`), bytes and entries
//!   in use, and the shards last given large entries. It is the one value every insert that grows the store writes: bytes are
//!   *reserved* in it by compare-and-swap before a shard commits them, and released after a
//!   shard has dropped them, so the ledger never counts less than what is stored and workers
//!   cannot overrun `max_total_bytes`.
//! - `<ns>/h/<shard>`, one index per shard ([`Index`]: 40 bytes per slot, about 2.6 KiB for
//!   [`SHARD_SLOTS`] slots), each with its own CAS: records, S3-FIFO or LRU queues, ghosts.
//! - `<ns>/s/<shard>/<slot>`, the values; each carries its full key and the generation its
//!   index record gave it, both checked on every read. Slots a change frees or fills are
//!   emptied *before* its commit, and a new value is written after it by CAS against the
//!   token of the emptied slot: a worker that reused the slot meanwhile wins, and the ledger
//!   never counts less than what is stored.
//!
//! The high bits of a URL's primary-key hash pick its shard, so its Vary marker and all its
//! variants share one. The entry limit is structural: the shards' slots add up to
//! `max_entries`, and a full shard evicts within itself. The byte limit is global (the ledger):
//! a shard first evicts its own entries by its policy; only when it holds too little to make
//! room (a large entry in a shard of small ones) does it evict from other shards, those the
//! ledger names as holding large entries first, each under its own CAS. Each fruitful visit
//! evicts what earlier inserts paid for (amortised O(1)); fruitless ones are bounded.
//!
//! A lookup of an unknown key reads one shard index; a hit reads the value directly when this
//! worker already knows its slot (a bounded local hint map), else the index and the value.
//! Hits never write shared data: accesses are buffered per worker (bounded; dropped when
//! full) and folded into each shard's index on this worker's next insert there or on a tick.
//!
//! The namespace names the layout version: `ef1` was a single index of every slot; a store
//! under `ef2` never reads `ef1` keys, and [`retire_layout`] frees them once, so an nginx zone
//! or an Envoy process that outlives a `.wasm` upgrade does not keep both.

use super::entry;
use super::key::hash64;
use hashbrown::HashMap;
use std::fmt;

/// Proxy-Wasm shared data, as the store needs it.
pub trait SharedData {
    /// The value and its CAS token, or `None` when the key was never written.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value`; `cas == 0` writes unconditionally, otherwise only if the key's token
    /// still equals `cas` (Envoy also accepts a write when the key does not exist).
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError>;
}

/// Why a shared-data write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// Another writer changed the key since it was read.
    CasMismatch,
    /// The host refused the write for another reason.
    Host,
}

/// Why an insert did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// The entry alone exceeds a limit.
    TooLarge,
    /// Other workers kept changing the shard or the ledger, or no room could be made; given
    /// up after a bounded number of tries.
    Contention,
    /// The host refused a write.
    Host,
}

impl StoreError {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreError::TooLarge => "too-large",
            StoreError::Contention => "contention",
            StoreError::Host => "host",
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The store's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Number of slots over all shards (most entries, Vary markers included).
    pub max_entries: u32,
    /// Most bytes of stored values together.
    pub max_total_bytes: u64,
    /// Most bytes of one stored value.
    pub max_entry_bytes: u64,
    /// Most variants of one URL (RFC 9111 §4.1 leaves the number to the cache); the oldest
    /// goes first.
    pub max_variants: u32,
    /// Which entry goes when a limit is reached.
    pub policy: Policy,
}

use super::eviction::Index;
pub use super::eviction::{Kind, Policy, Usage};

/// Most slots per shard: the size of the index a lookup reads (40 bytes per slot).
pub const SHARD_SLOTS: u32 = 64;
/// Compare-and-swap attempts (shard or ledger) before an insert gives up.
const MAX_CAS_ATTEMPTS: usize = 8;
/// Fruitless visits (an empty shard, a lost race) an insert may make to other shards when its
/// own cannot make room for its bytes.
const MAX_DONORS: usize = 8;
/// Buffered accesses; more are dropped until a tick or an insert writes them.
const MAX_PENDING_TOUCHES: usize = 4096;
/// Shards one flush writes (each a read and a write of one small index).
const MAX_FLUSH_SHARDS: usize = 256;
/// Copies of one access kept: S3-FIFO's counter stops at 3.
const MAX_FREQ_TOUCHES: usize = 3;
/// Slots this worker remembers for direct hits; the map is cleared when it fills.
const MAX_HINTS: usize = 1 << 16;

const LEDGER_MAGIC: &[u8; 4] = b"EFa2";
const LEDGER_BYTES: usize = 64;
/// Shards the ledger remembers as holding large entries: where an insert that needs room
/// for its bytes looks first, when most shards are empty.
const HEAVY: usize = 8;
const NO_SHARD: u32 = u32::MAX;
/// Most entries a ledger may describe (above the configuration's limit, far below overflow).
const MAX_LEDGER_ENTRIES: u32 = 1 << 24;

/// The ledger's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ledger {
    shards: u32,
    max_entries: u32,
    bytes: u64,
    entries: u64,
    heavy: [u32; HEAVY],
    heavy_next: u32,
}

impl Ledger {
    fn encode(&self) -> [u8; LEDGER_BYTES] {
        let mut b = [0u8; LEDGER_BYTES];
        b[..4].copy_from_slice(LEDGER_MAGIC);
        b[4..8].copy_from_slice(&self.shards.to_le_bytes());
        b[8..12].copy_from_slice(&self.max_entries.to_le_bytes());
        b[16..24].copy_from_slice(&self.bytes.to_le_bytes());
        b[24..32].copy_from_slice(&self.entries.to_le_bytes());
        b[12..16].copy_from_slice(&self.heavy_next.to_le_bytes());
        for (i, h) in self.heavy.iter().enumerate() {
            b[32 + i * 4..36 + i * 4].copy_from_slice(&h.to_le_bytes());
        }
        b
    }

    fn fresh(shards: u32, max_entries: u32) -> Ledger {
        Ledger {
            shards,
            max_entries,
            bytes: 0,
            entries: 0,
            heavy: [NO_SHARD; HEAVY],
            heavy_next: 0,
        }
    }

    /// Remembers that `shard` took a large entry.
    fn note_heavy(&mut self, shard: u32) {
        if !self.heavy.contains(&shard) {
            if let Some(h) = self.heavy.get_mut(self.heavy_next as usize % HEAVY) {
                *h = shard;
            }
            self.heavy_next = (self.heavy_next + 1) % HEAVY as u32;
        }
    }

    /// `None` for anything but a ledger of this layout version (an old or corrupt value).
    fn decode(b: &[u8]) -> Option<Ledger> {
        if b.len() != LEDGER_BYTES || b.get(..4)? != LEDGER_MAGIC {
            return None;
        }
        let w = |at: usize| Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?));
        let d = |at: usize| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));
        let (shards, max_entries) = (w(4)?, w(8)?);
        // Only a layout this code could have written: that also bounds how many shards a
        // reset walks.
        if max_entries > MAX_LEDGER_ENTRIES || shards != max_entries.max(1).div_ceil(SHARD_SLOTS) {
            return None;
        }
        let mut heavy = [NO_SHARD; HEAVY];
        for (i, h) in heavy.iter_mut().enumerate() {
            *h = w(32 + i * 4)?;
        }
        Some(Ledger {
            shards,
            max_entries,
            bytes: d(16)?,
            entries: d(24)?,
            heavy,
            heavy_next: w(12)?,
        })
    }

    fn usage(&self) -> Usage {
        Usage {
            entries: u32::try_from(self.entries).unwrap_or(u32::MAX),
            bytes: self.bytes,
        }
    }

    /// Applies signed changes, never below zero.
    fn adjusted(mut self, bytes: i64, entries: i64) -> Ledger {
        self.bytes = self.bytes.saturating_add_signed(bytes);
        self.entries = self.entries.saturating_add_signed(entries);
        self
    }
}

/// One value to insert.
#[derive(Debug, Clone)]
pub struct Insert {
    /// Hash of the key it is found under (primary, or primary + secondary for variants).
    pub hash: u64,
    /// Hash of the primary key: `hash64` of the key text the value carries (it picks the
    /// shard, for inserts and lookups alike).
    pub primary: u64,
    /// What it is.
    pub kind: Kind,
    /// The encoded value; its generation field is filled in by the store.
    pub value: Vec<u8>,
}

/// What an insert changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InsertOutcome {
    /// Entries evicted to make room (by the eviction policy, or oldest variants first).
    pub evicted: u32,
    /// Usage after the insert.
    pub usage: Usage,
}

/// Slots freed while planning one shard's change.
#[derive(Default)]
struct Plan {
    freed: Vec<u32>,
    bytes: u64,
    evicted: u32,
}

impl Plan {
    fn take(&mut self, index: &mut Index, slot: u32) {
        if let Some(r) = index.record(slot).filter(|r| r.kind != Kind::Free) {
            self.bytes += u64::from(r.size);
            index.remove(slot);
            self.freed.push(slot);
        }
    }

    /// Evicts the policy's victim, and with a Vary marker its variants (they cannot be found
    /// without it). False when the shard is empty.
    fn evict_one(&mut self, index: &mut Index, policy: Policy, share: u64) -> bool {
        let Some(slot) = index.victim(policy, share) else {
            return false;
        };
        let victim = index.record(slot);
        self.take(index, slot);
        self.evicted += 1;
        if let Some(v) = victim.filter(|v| v.kind == Kind::Vary) {
            let orphans: Vec<u32> = index
                .occupied()
                .filter(|(_, r)| r.kind == Kind::Variant && r.primary == v.primary)
                .map(|(s, _)| s)
                .collect();
            for s in orphans {
                self.take(index, s);
                self.evicted += 1;
            }
        }
        true
    }
}

/// The store as one worker sees it.
pub struct Store<S: SharedData> {
    shared: S,
    limits: Limits,
    prefix: String,
    shards: u32,
    /// Key hash -> (shard, slot, generation), learnt from lookups and inserts.
    hints: HashMap<u64, (u32, u32, u32)>,
    usage: Usage,
    ledger_cas: Option<u32>,
    /// Buffered accesses by shard: (slot, generation), each at most [`MAX_FREQ_TOUCHES`]
    /// times; `pending` counts them all.
    touches: HashMap<u32, Vec<(u32, u32)>>,
    pending: usize,
    /// Ledger changes not yet written (a release that lost its CAS races).
    owed: (i64, i64),
    /// Where the next search for a donor shard starts (unset: `NO_SHARD`).
    donor_hand: u32,
    /// Large-entry shards, as of the last ledger read.
    heavy: [u32; HEAVY],
}

impl<S: SharedData> Store<S> {
    /// A store under the key namespace `ns`. Call [`Store::init`] once per VM.
    pub fn new(shared: S, ns: &str, mut limits: Limits) -> Store<S> {
        limits.max_entries = limits.max_entries.min(MAX_LEDGER_ENTRIES);
        let shards = limits.max_entries.max(1).div_ceil(SHARD_SLOTS);
        Store {
            shared,
            limits,
            prefix: format!("{ns}/"),
            shards,
            hints: HashMap::new(),
            usage: Usage::default(),
            ledger_cas: None,
            touches: HashMap::new(),
            pending: 0,
            owed: (0, 0),
            donor_hand: NO_SHARD,
            heavy: [NO_SHARD; HEAVY],
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Number of shards: the store writes at most `1 + shards + max_entries` keys.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard of a primary-key hash (its high bits; the index uses all of them).
    fn shard_of(&self, primary: u64) -> u32 {
        (((primary >> 32) * u64::from(self.shards)) >> 32) as u32
    }

    /// Slots of `shard`: the shards' slots add up to `max_entries` exactly.
    fn shard_slots(&self, shard: u32) -> u32 {
        let n = self.limits.max_entries.max(1);
        n / self.shards + u32::from(shard < n % self.shards)
    }

    /// The bytes a shard would hold if bytes were spread evenly: sizes S3-FIFO's small queue.
    fn shard_share(&self) -> u64 {
        (self.limits.max_total_bytes / u64::from(self.shards)).max(1)
    }

    fn ledger_key(&self) -> String {
        format!("{}a", self.prefix)
    }

    fn index_key(&self, shard: u32) -> String {
        format!("{}h/{shard}", self.prefix)
    }

    fn slot_key(&self, shard: u32, slot: u32) -> String {
        format!("{}s/{shard}/{slot}", self.prefix)
    }

    fn ledger(&self) -> Option<(Ledger, u32)> {
        let (b, cas) = self.shared.get(&self.ledger_key())?;
        Some((Ledger::decode(&b)?, cas))
    }

    fn ledger_matches(&self, l: &Ledger) -> bool {
        l.shards == self.shards && l.max_entries == self.limits.max_entries
    }

    /// Creates the ledger and every shard index if absent, or rebuilds them when the layout
    /// changed (a new `max_entries`) or the ledger is not valid, freeing the slots of the old
    /// shards. Every shard index exists afterwards, so every later write to one is a CAS
    /// (Envoy checks a CAS only on a key that exists).
    pub fn init(&mut self) -> Result<(), StoreError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let raw = self.shared.get(&self.ledger_key());
            let (old, cas) = match &raw {
                Some((b, cas)) => (Ledger::decode(b), *cas),
                None => (None, 0),
            };
            if let Some(l) = old.filter(|l| self.ledger_matches(l)) {
                self.usage = l.usage();
                self.ledger_cas = Some(cas);
                return Ok(());
            }
            // No ledger: a first start, where valid shards can only come from another worker
            // initialising at the same time, and are kept. A ledger of another layout (or a
            // corrupt one): every old shard is emptied.
            let reset = raw.is_some();
            let old_shards = old.map_or(self.shards, |l| l.shards);
            for shard in 0..old_shards.max(self.shards) {
                self.init_shard(shard, reset);
            }
            // Another worker may have finished first: keep its ledger.
            if raw.is_none() && self.ledger().is_some_and(|(l, _)| self.ledger_matches(&l)) {
                continue;
            }
            let fresh = Ledger::fresh(self.shards, self.limits.max_entries);
            match self.shared.set(&self.ledger_key(), &fresh.encode(), cas) {
                Ok(()) => {
                    self.hints.clear();
                    self.touches.clear();
                    self.pending = 0;
                    self.owed = (0, 0);
                    return self.refresh().map(|_| ());
                }
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host) => return Err(StoreError::Host),
            }
        }
        Err(StoreError::Contention)
    }

    fn init_shard(&self, shard: u32, reset: bool) {
        let key = self.index_key(shard);
        let current = self.shared.get(&key);
        let (old, cas) = match &current {
            Some((b, cas)) => (Index::decode(b), *cas),
            None => (None, 0),
        };
        let wanted = (shard < self.shards).then(|| self.shard_slots(shard) as usize);
        if !reset && old.as_ref().map(Index::slots) == wanted && wanted.is_some() {
            return;
        }
        if let Some(old) = &old {
            for (slot, _) in old.occupied() {
                self.clear_slot(shard, slot);
            }
        }
        let value = match wanted {
            Some(n) => Index::empty(n as u32).encode(),
            // Beyond the new layout: released (an empty value is the only way).
            None => Vec::new(),
        };
        if current.is_some() || !value.is_empty() {
            let _ = self.shared.set(&key, &value, cas);
        }
    }

    /// Re-reads the ledger when it changed; returns whether the usage was updated.
    pub fn refresh(&mut self) -> Result<bool, StoreError> {
        let Some((l, cas)) = self.ledger() else {
            return Ok(false);
        };
        if self.ledger_cas == Some(cas) {
            return Ok(false);
        }
        self.usage = l.usage();
        self.ledger_cas = Some(cas);
        Ok(true)
    }

    /// Usage as of this worker's last look at the ledger.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// Finds the value stored under `hash` whose key is `key`: directly from the slot this
    /// worker last saw it in, else through its shard's index (one small value). The value's
    /// key and generation are checked, so a stale hint or a reused slot is a miss, never a
    /// wrong answer. The access is remembered for the eviction policy.
    pub fn get(&mut self, hash: u64, key: &str) -> Option<Vec<u8>> {
        let shard = self.shard_of(hash64(key.as_bytes()));
        if let Some(&(s, slot, generation)) = self.hints.get(&hash) {
            if s == shard {
                if let Some(v) = self.read_slot(shard, slot, generation, key) {
                    self.touch(shard, slot, generation);
                    return Some(v);
                }
            }
        }
        let found = self
            .shared
            .get(&self.index_key(shard))
            .and_then(|(b, _)| Index::find_encoded(&b, hash));
        let Some((slot, generation)) = found else {
            self.hints.remove(&hash);
            return None;
        };
        let Some(v) = self.read_slot(shard, slot, generation, key) else {
            self.hints.remove(&hash);
            return None;
        };
        self.hint(hash, shard, slot, generation);
        self.touch(shard, slot, generation);
        Some(v)
    }

    fn read_slot(&self, shard: u32, slot: u32, generation: u32, key: &str) -> Option<Vec<u8>> {
        let (v, _) = self.shared.get(&self.slot_key(shard, slot))?;
        matches!(entry::peek_key(&v), Ok((g, k)) if g == generation && k == key).then_some(v)
    }

    fn hint(&mut self, hash: u64, shard: u32, slot: u32, generation: u32) {
        if self.hints.len() >= MAX_HINTS && !self.hints.contains_key(&hash) {
            self.hints.clear();
        }
        self.hints.insert(hash, (shard, slot, generation));
    }

    fn touch(&mut self, shard: u32, slot: u32, generation: u32) {
        // The hit path never writes shared data: when the buffer is full, the access is
        // dropped (it only informs eviction) until the next tick or insert drains it.
        if self.pending >= MAX_PENDING_TOUCHES {
            return;
        }
        let list = self.touches.entry(shard).or_default();
        if list.iter().filter(|t| **t == (slot, generation)).count() < MAX_FREQ_TOUCHES {
            list.push((slot, generation));
            self.pending += 1;
        }
    }

    fn apply_touches(&self, shard: u32, index: &mut Index) {
        for &(slot, generation) in self.touches.get(&shard).into_iter().flatten() {
            index.touch(slot, generation, self.limits.policy);
        }
    }

    /// Forgets the accesses of `shard` once its index holds them.
    fn drop_touches(&mut self, shard: u32) {
        if let Some(list) = self.touches.remove(&shard) {
            self.pending -= list.len();
        }
    }

    /// Writes buffered accesses into their shards' indexes (on a tick), one CAS per shard,
    /// at most [`MAX_FLUSH_SHARDS`] shards per call, those with the most accesses first, so a
    /// tick never holds the worker for long. Those that lose a race are kept for the next try.
    pub fn flush_touches(&mut self) {
        let mut shards: Vec<(usize, u32)> =
            self.touches.iter().map(|(s, l)| (l.len(), *s)).collect();
        shards.sort_unstable_by(|a, b| b.cmp(a));
        shards.truncate(MAX_FLUSH_SHARDS);
        for (_, shard) in shards {
            let key = self.index_key(shard);
            let lost = match self.shared.get(&key) {
                Some((bytes, cas)) => match Index::decode(&bytes) {
                    Some(mut index) => {
                        self.apply_touches(shard, &mut index);
                        self.shared.set(&key, &index.encode(), cas) == Err(SetError::CasMismatch)
                    }
                    None => false,
                },
                None => false,
            };
            if !lost {
                self.drop_touches(shard);
            }
        }
    }

    /// Reads a shard's index for a change: a missing, corrupt or foreign value (an older
    /// layout, another slot count) is replaced by an empty index under the same CAS.
    fn read_shard(&self, shard: u32) -> (Index, u32) {
        let slots = self.shard_slots(shard);
        match self.shared.get(&self.index_key(shard)) {
            Some((b, cas)) => (
                Index::decode(&b)
                    .filter(|i| i.slots() == slots as usize)
                    .unwrap_or_else(|| Index::empty(slots)),
                cas,
            ),
            None => (Index::empty(slots), 0),
        }
    }

    /// Changes the ledger by `bytes` and `entries` (plus anything owed), by CAS. What cannot
    /// be written is owed to the next ledger write; only releases are ever owed, so a lost
    /// release wastes room for a while but never lets the store overrun.
    fn adjust_ledger(&mut self, bytes: i64, entries: i64) {
        self.owed.0 += bytes;
        self.owed.1 += entries;
        if self.owed == (0, 0) {
            return;
        }
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Some((l, cas)) = self.ledger() else {
                return;
            };
            let new = l.adjusted(self.owed.0, self.owed.1);
            match self.shared.set(&self.ledger_key(), &new.encode(), cas) {
                Ok(()) => {
                    self.owed = (0, 0);
                    self.learn_ledger(new);
                    return;
                }
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host) => return,
            }
        }
    }

    fn learn_ledger(&mut self, l: Ledger) {
        self.usage = l.usage();
        // The token is not known without another read: the next refresh re-reads.
        self.ledger_cas = None;
    }

    /// Reserves `bytes` (> 0) and `entries` in the ledger if they fit the byte limit.
    /// `Ok(false)`: they do not fit now.
    /// `heavy`: the shard taking a large entry, to remember.
    fn reserve(
        &mut self,
        bytes: u64,
        entries: i64,
        heavy: Option<u32>,
    ) -> Result<bool, StoreError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Some((l, cas)) = self.ledger().filter(|(l, _)| self.ledger_matches(l)) else {
                return Err(StoreError::Host);
            };
            self.heavy = l.heavy;
            let after = l.adjusted(self.owed.0, self.owed.1);
            if after.bytes.saturating_add(bytes) > self.limits.max_total_bytes {
                self.usage = after.usage();
                return Ok(false);
            }
            let mut new = after.adjusted(bytes as i64, entries);
            if let Some(shard) = heavy {
                new.note_heavy(shard);
            }
            match self.shared.set(&self.ledger_key(), &new.encode(), cas) {
                Ok(()) => {
                    self.owed = (0, 0);
                    self.learn_ledger(new);
                    return Ok(true);
                }
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host) => return Err(StoreError::Host),
            }
        }
        Err(StoreError::Contention)
    }

    /// Inserts values of one URL (one primary hash) atomically in its shard: each replaces
    /// what is stored under its hash, and entries are evicted until every limit holds. With
    /// `replace_variants`, variants of the same primary key that are not being inserted are
    /// removed too (a new plain response or a new Vary list makes them unreachable).
    pub fn insert(
        &mut self,
        mut items: Vec<Insert>,
        replace_variants: bool,
    ) -> Result<InsertOutcome, StoreError> {
        let Some(primary) = items.first().map(|i| i.primary) else {
            return Ok(InsertOutcome {
                evicted: 0,
                usage: self.usage,
            });
        };
        let shard = self.shard_of(primary);
        let slots = self.shard_slots(shard);
        let need: u64 = items.iter().map(|i| i.value.len() as u64).sum();
        if items.iter().any(|i| i.primary != primary)
            || items.len() > slots as usize
            || items
                .iter()
                .any(|i| i.value.len() as u64 > self.limits.max_entry_bytes)
            || need > self.limits.max_total_bytes
        {
            return Err(StoreError::TooLarge);
        }
        match self.ledger() {
            Some((l, _)) if self.ledger_matches(&l) => {}
            // Workers with another `max_entries` took over (a configuration change): never
            // write shards laid out for another slot count.
            Some(_) => return Err(StoreError::Host),
            None => self.init()?,
        }
        let policy = self.limits.policy;
        let share = self.shard_share();
        let mut fruitless = 0;
        // Entries evicted from other shards to make room for this insert's bytes.
        let mut elsewhere = 0;
        let mut tried: Vec<u32> = Vec::new();
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut index, cas) = self.read_shard(shard);
            self.apply_touches(shard, &mut index);
            let mut plan = Plan::default();
            // Drop what the new values replace.
            let doomed: Vec<u32> = index
                .occupied()
                .filter(|(_, r)| {
                    items.iter().any(|i| i.hash == r.hash)
                        || (replace_variants
                            && r.kind == Kind::Variant
                            && r.primary == primary as u32)
                })
                .map(|(s, _)| s)
                .collect();
            for slot in doomed {
                plan.take(&mut index, slot);
            }
            // Bound the variants of one URL, oldest first.
            let incoming = items.iter().filter(|i| i.kind == Kind::Variant).count();
            if incoming > 0 {
                loop {
                    let count = index
                        .occupied()
                        .filter(|(_, r)| r.kind == Kind::Variant && r.primary == primary as u32)
                        .count();
                    // A URL's marker and variants share one shard: leave it room for others.
                    let most = self.limits.max_variants.min(slots.saturating_sub(1)).max(1);
                    if count + incoming <= most as usize {
                        break;
                    }
                    let Some(slot) = index.oldest_variant(primary as u32) else {
                        break;
                    };
                    plan.take(&mut index, slot);
                    plan.evicted += 1;
                }
            }
            // The shard's slots: evict within it.
            while index.usage().entries as usize + items.len() > slots as usize {
                if !plan.evict_one(&mut index, policy, share) {
                    return Err(StoreError::TooLarge);
                }
            }
            // The global byte budget: reserve what the change adds before committing it.
            let reserved = loop {
                let entries = items.len() as i64 - plan.freed.len() as i64;
                if need <= plan.bytes {
                    break None;
                }
                let heavy = (need > self.shard_share()).then_some(shard);
                if self.reserve(need - plan.bytes, entries, heavy)? {
                    break Some((need - plan.bytes, entries));
                }
                if plan.evict_one(&mut index, policy, share) {
                    continue;
                }
                // This shard is empty and the budget still full: take room from others. Each
                // fruitful visit evicts entries earlier inserts paid for (amortised O(1));
                // fruitless ones (empty shards, lost races) are bounded.
                if fruitless >= MAX_DONORS || tried.len() > self.shards as usize + MAX_DONORS {
                    return Err(StoreError::Contention);
                }
                let over = self.usage.bytes + need - plan.bytes;
                let want = over.saturating_sub(self.limits.max_total_bytes);
                match self.evict_elsewhere(shard, want, &mut tried) {
                    0 => fruitless += 1,
                    n => {
                        fruitless = 0;
                        elsewhere += n;
                    }
                }
            };
            let mut placed: Vec<(u32, u32)> = Vec::with_capacity(items.len());
            for item in &items {
                let taken: Vec<u32> = placed.iter().map(|(s, _)| *s).collect();
                let Some(slot) = index.free_slot(&taken, &plan.freed) else {
                    if let Some((b, e)) = reserved {
                        self.adjust_ledger(-(b as i64), -e);
                    }
                    return Err(StoreError::TooLarge);
                };
                let generation = index.place(
                    slot,
                    item.hash,
                    item.primary as u32,
                    item.value.len() as u32,
                    item.kind,
                    policy,
                );
                placed.push((slot, generation));
            }
            // Claim the slots before the commit: empty them (a victim's value) and learn their
            // tokens, so that the value is written by CAS after it. Another worker that reuses
            // a slot in between (it evicted our record) changes the token, and our late write
            // fails instead of overwriting its value: the ledger never counts less than what
            // is stored. (A slot written for the first time has no token to check.)
            let tokens: Vec<u32> = placed
                .iter()
                .map(|&(slot, _)| self.claim_slot(shard, slot, plan.freed.contains(&slot)))
                .collect();
            // The other freed slots are emptied before the commit too: after it, another
            // worker may already have put a value there. (If the commit loses its race, their
            // records stay counted, without values, until evicted: never the other way.)
            for &slot in plan
                .freed
                .iter()
                .filter(|s| !placed.iter().any(|(p, _)| p == *s))
            {
                self.clear_slot(shard, slot);
            }
            let committed = self
                .shared
                .set(&self.index_key(shard), &index.encode(), cas);
            if let Err(e) = committed {
                if let Some((b, en)) = reserved {
                    self.adjust_ledger(-(b as i64), -en);
                }
                match e {
                    SetError::CasMismatch => continue,
                    SetError::Host => return Err(StoreError::Host),
                }
            }
            self.drop_touches(shard);
            let entries = items.len() as i64 - plan.freed.len() as i64;
            for ((item, &(slot, generation)), &token) in items.iter_mut().zip(&placed).zip(&tokens)
            {
                entry::set_generation(&mut item.value, generation);
                let written = self
                    .shared
                    .set(&self.slot_key(shard, slot), &item.value, token);
                if let Err(e) = written {
                    // A full host store, or a slot another worker took: the index and the
                    // ledger must not keep records (and bytes) for values that are not there.
                    if reserved.is_none() {
                        self.adjust_ledger(need as i64 - plan.bytes as i64, entries);
                    }
                    self.forget(shard, &placed);
                    return Err(match e {
                        SetError::CasMismatch => StoreError::Contention,
                        SetError::Host => StoreError::Host,
                    });
                }
            }
            if reserved.is_none() {
                // No larger than what it replaced: release the difference now it is gone.
                self.adjust_ledger(need as i64 - plan.bytes as i64, entries);
            }
            for (item, &(slot, generation)) in items.iter().zip(&placed) {
                self.hint(item.hash, shard, slot, generation);
            }
            return Ok(InsertOutcome {
                evicted: plan.evicted + elsewhere,
                usage: self.usage,
            });
        }
        Err(StoreError::Contention)
    }

    /// Empties `slot` if it may hold a value (`freed`: a victim's) and returns its CAS token
    /// (0 for a key never written). An empty value is read without copying anything large.
    fn claim_slot(&self, shard: u32, slot: u32, freed: bool) -> u32 {
        let key = self.slot_key(shard, slot);
        if !freed {
            match self.shared.get(&key) {
                Some((v, token)) if v.is_empty() => return token,
                None => return 0,
                Some(_) => {}
            }
        }
        let _ = self.shared.set(&key, &[], 0);
        self.shared.get(&key).map_or(0, |(_, token)| token)
    }

    /// Evicts from one other shard until `want` bytes are free, and releases them in the
    /// ledger: a shard the ledger names as holding large entries first, else the next one
    /// round the hand. Returns the entries evicted (0 on a lost race or an empty shard: the
    /// caller tries the next). `tried`: shards visited by this insert.
    fn evict_elsewhere(&mut self, exclude: u32, want: u64, tried: &mut Vec<u32>) -> u32 {
        if self.shards < 2 {
            return 0;
        }
        let heavy = self
            .heavy
            .iter()
            .copied()
            .find(|&h| h < self.shards && h != exclude && !tried.contains(&h));
        let donor = match heavy {
            Some(h) => h,
            None => {
                // Each worker starts where its first donor search did, so they spread.
                if self.donor_hand >= self.shards {
                    self.donor_hand = exclude;
                }
                self.donor_hand = (self.donor_hand + 1) % self.shards;
                if self.donor_hand == exclude {
                    self.donor_hand = (self.donor_hand + 1) % self.shards;
                }
                self.donor_hand
            }
        };
        tried.push(donor);
        let Some((b, cas)) = self.shared.get(&self.index_key(donor)) else {
            return 0;
        };
        let Some(mut index) = Index::decode(&b) else {
            return 0;
        };
        self.apply_touches(donor, &mut index);
        let mut plan = Plan::default();
        while plan.bytes < want.max(1)
            && plan.evict_one(&mut index, self.limits.policy, self.shard_share())
        {}
        if plan.freed.is_empty() {
            return 0;
        }
        // Emptied before the commit, as in an insert: after it, the slots may be reused.
        for &slot in &plan.freed {
            self.clear_slot(donor, slot);
        }
        if self
            .shared
            .set(&self.index_key(donor), &index.encode(), cas)
            .is_err()
        {
            return 0;
        }
        self.drop_touches(donor);
        self.adjust_ledger(-(plan.bytes as i64), -(plan.freed.len() as i64));
        plan.evicted
    }

    /// Takes back the index records of an insert whose values could not all be written:
    /// each slot that still holds the generation the insert gave it is freed, and its bytes
    /// released. Best effort (reads check the key and generation of what they find).
    fn forget(&mut self, shard: u32, placed: &[(u32, u32)]) {
        let _ = self.remove_matching(shard, |_, index| {
            placed
                .iter()
                .filter(|&&(slot, g)| index.record(slot).is_some_and(|r| r.generation == g))
                .map(|&(slot, _)| (slot, true))
                .collect()
        });
    }

    /// Removes what is stored under `primary_hash` and every variant of it. Returns how many
    /// entries were removed.
    pub fn remove(&mut self, primary_hash: u64) -> Result<u32, StoreError> {
        let shard = self.shard_of(primary_hash);
        self.remove_matching(shard, |_, index| {
            index
                .occupied()
                .filter(|(_, r)| {
                    r.hash == primary_hash
                        || (r.kind == Kind::Variant && r.primary == primary_hash as u32)
                })
                .map(|(s, _)| (s, true))
                .collect()
        })
    }

    /// Removes every entry whose key satisfies `matches` (a purge by prefix): O(entries), one
    /// shard at a time, each under its own CAS, so hits elsewhere never wait for it. Returns
    /// how many entries were removed.
    pub fn remove_where(&mut self, matches: impl Fn(&str) -> bool) -> Result<u32, StoreError> {
        self.remove_where_value(|key, _| matches(key))
    }

    /// Like [`Store::remove_where`], deciding on the key and the whole stored value (a
    /// purge by tag reads the entry's headers).
    pub fn remove_where_value(
        &mut self,
        matches: impl Fn(&str, &[u8]) -> bool,
    ) -> Result<u32, StoreError> {
        let mut removed = 0;
        let mut failed = None;
        for shard in 0..self.shards {
            let r = self.remove_matching(shard, |store, index| {
                index
                    .occupied()
                    .filter_map(|(slot, r)| {
                        let value = store.shared.get(&store.slot_key(shard, slot));
                        match value.as_ref().map(|(v, _)| (entry::peek_key(v), v)) {
                            Some((Ok((g, k)), v)) if g == r.generation => {
                                matches(k, v).then_some((slot, true))
                            }
                            // A record without its value (emptied before a commit that lost
                            // its race, say) goes too, uncounted: it only held bytes.
                            _ => Some((slot, false)),
                        }
                    })
                    .collect()
            });
            match r {
                Ok(n) => removed += n,
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) if removed == 0 => Err(e),
            _ => Ok(removed),
        }
    }

    /// Rewrites in place every stored value `edit` returns a same-sized replacement for (a
    /// soft purge changes only the metadata). Each write is a CAS on the value, so a slot
    /// another worker reused meanwhile is left alone; sizes do not change, so neither does
    /// the accounting. O(entries), one value at a time: hits never wait. Returns how many
    /// values were rewritten.
    pub fn rewrite_where(&mut self, edit: impl Fn(&[u8]) -> Option<Vec<u8>>) -> u32 {
        let mut rewritten = 0;
        for shard in 0..self.shards {
            let Some(index) = self
                .shared
                .get(&self.index_key(shard))
                .and_then(|(b, _)| Index::decode(&b))
            else {
                continue;
            };
            for (slot, r) in index.occupied() {
                let key = self.slot_key(shard, slot);
                let Some((value, cas)) = self.shared.get(&key) else {
                    continue;
                };
                let current = matches!(entry::peek_key(&value), Ok((g, _)) if g == r.generation);
                let Some(new) = edit(&value).filter(|n| current && n.len() == value.len()) else {
                    continue;
                };
                if cas != 0 && self.shared.set(&key, &new, cas).is_ok() {
                    rewritten += 1;
                }
            }
        }
        rewritten
    }

    /// Removes the slots `select` picks from one shard, in one index update, and releases
    /// their bytes. Returns how many of them `select` marked to be counted.
    fn remove_matching(
        &mut self,
        shard: u32,
        select: impl Fn(&Self, &Index) -> Vec<(u32, bool)>,
    ) -> Result<u32, StoreError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Some((b, cas)) = self.shared.get(&self.index_key(shard)) else {
                return Ok(0);
            };
            let Some(mut index) = Index::decode(&b) else {
                return Ok(0);
            };
            let doomed = select(self, &index);
            if doomed.is_empty() {
                return Ok(0);
            }
            let mut plan = Plan::default();
            for &(slot, _) in &doomed {
                plan.take(&mut index, slot);
            }
            // Emptied before the commit: after it, another worker may reuse the slots. A lost
            // race is retried, and removes them from the index then.
            for &slot in &plan.freed {
                self.clear_slot(shard, slot);
            }
            match self
                .shared
                .set(&self.index_key(shard), &index.encode(), cas)
            {
                Ok(()) => {}
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host) => return Err(StoreError::Host),
            }
            self.adjust_ledger(-(plan.bytes as i64), -(plan.freed.len() as i64));
            return Ok(doomed.iter().filter(|(_, counted)| *counted).count() as u32);
        }
        Err(StoreError::Contention)
    }

    fn clear_slot(&self, shard: u32, slot: u32) {
        // An empty value is the ABI's only way to release a key's memory.
        let _ = self.shared.set(&self.slot_key(shard, slot), &[], 0);
    }
}

/// Frees what an older layout left in shared data under namespace `old_ns` (layout `ef1`:
/// `<old_ns>/idx`, 40 bytes per slot after a 40-byte header, and slots `<old_ns>/s/<n>`).
/// The index is emptied first, by CAS, so one worker does it; its slots are then written
/// empty. Nothing of the old values is read. Returns how many slot keys were released.
pub fn retire_layout<S: SharedData>(shared: &S, old_ns: &str) -> u32 {
    let key = format!("{old_ns}/idx");
    let Some((old, cas)) = shared.get(&key) else {
        return 0;
    };
    if old.is_empty() || shared.set(&key, &[], cas).is_err() {
        return 0;
    }
    // The slot count is only inferred from the size: a count, never trusted as data.
    let slots = (old.len().saturating_sub(40) / 40).min(1 << 16) as u32;
    for slot in 0..slots {
        let k = format!("{old_ns}/s/{slot}");
        if shared.get(&k).is_some_and(|(v, _)| !v.is_empty()) {
            let _ = shared.set(&k, &[], 0);
        }
    }
    slots
}

/// An in-memory [`SharedData`] with Envoy's semantics (one global CAS counter; `cas = 0`
/// always writes; a non-zero CAS is checked only when the key exists), for tests and benches.
#[derive(Debug, Default)]
pub struct MemoryShared {
    inner: std::cell::RefCell<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    map: std::collections::HashMap<String, (Vec<u8>, u32)>,
    counter: u32,
    /// Non-empty writes to keys starting with this fail (a full host store).
    refuse_prefix: Option<String>,
}

impl MemoryShared {
    /// From now on, refuses non-empty writes to keys that start with `prefix`, as a host
    /// whose store is full does (`None` accepts them again).
    pub fn refuse_writes(&self, prefix: Option<&str>) {
        self.inner.borrow_mut().refuse_prefix = prefix.map(str::to_string);
    }

    /// Total bytes of all values, as the host would hold them.
    pub fn value_bytes(&self) -> usize {
        self.inner.borrow().map.values().map(|(v, _)| v.len()).sum()
    }

    /// Number of keys ever written.
    pub fn key_count(&self) -> usize {
        self.inner.borrow().map.len()
    }
}

impl SharedData for &MemoryShared {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.inner.borrow().map.get(key).cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        let mut inner = self.inner.borrow_mut();
        let refused = inner.refuse_prefix.as_ref();
        if !value.is_empty() && refused.is_some_and(|p| key.starts_with(p.as_str())) {
            return Err(SetError::Host);
        }
        if cas != 0 {
            if let Some((_, current)) = inner.map.get(key) {
                if *current != cas {
                    return Err(SetError::CasMismatch);
                }
            }
        }
        inner.counter = inner.counter.wrapping_add(1).max(1);
        let token = inner.counter;
        inner.map.insert(key.to_string(), (value.to_vec(), token));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::entry::{decode, encode_response, EntryView, ResponseMeta};

    fn limits(entries: u32, total: u64) -> Limits {
        Limits {
            max_entries: entries,
            max_total_bytes: total,
            max_entry_bytes: total,
            max_variants: 8,
            policy: Policy::Lru,
        }
    }

    fn value(key: &str, body_len: usize) -> Vec<u8> {
        encode_response(
            0,
            key,
            "",
            &ResponseMeta::default(),
            &[],
            &vec![b'x'; body_len],
        )
    }

    fn put(store: &mut Store<&MemoryShared>, key: &str, len: usize) -> InsertOutcome {
        let h = crate::cache::key::hash64(key.as_bytes());
        store
            .insert(
                vec![Insert {
                    hash: h,
                    primary: h,
                    kind: Kind::Response,
                    value: value(key, len),
                }],
                true,
            )
            .unwrap()
    }

    fn get(store: &mut Store<&MemoryShared>, key: &str) -> bool {
        let h = crate::cache::key::hash64(key.as_bytes());
        store.get(h, key).is_some()
    }

    #[test]
    fn insert_then_get_across_workers() {
        let mem = MemoryShared::default();
        let mut a = Store::new(&mem, "t", limits(8, 10_000));
        let mut b = Store::new(&mem, "t", limits(8, 10_000));
        a.init().unwrap();
        b.init().unwrap();
        put(&mut a, "k1", 10);
        assert!(get(&mut a, "k1"));
        // Worker b never saw the insert: it re-reads the index on the unknown hash.
        assert!(get(&mut b, "k1"));
        assert!(!get(&mut b, "k2"));
        let v = b.get(crate::cache::key::hash64(b"k1"), "k1").unwrap();
        let EntryView::Response(r) = decode(&v).unwrap() else {
            panic!()
        };
        assert_eq!(r.body.len(), 10);
        assert!(r.generation > 0, "the store stamps the generation");
    }

    #[test]
    fn an_insert_whose_value_cannot_be_written_leaves_no_record() {
        let mem = MemoryShared::default();
        let mut s = Store::new(&mem, "t", limits(8, 10_000));
        s.init().unwrap();
        put(&mut s, "a", 10);
        let before = s.usage();
        mem.refuse_writes(Some("t/s/"));
        let h = crate::cache::key::hash64(b"b");
        let item = Insert {
            hash: h,
            primary: h,
            kind: Kind::Response,
            value: value("b", 100),
        };
        assert_eq!(s.insert(vec![item], true), Err(StoreError::Host));
        assert_eq!(
            s.usage(),
            before,
            "no bytes or entries for the unwritten value"
        );
        // Another worker reads the shared index: the record is gone there too.
        let mut other = Store::new(&mem, "t", limits(8, 10_000));
        other.refresh().unwrap();
        assert_eq!(other.usage(), before);
        assert!(!get(&mut other, "b") && get(&mut other, "a"));
        mem.refuse_writes(None);
        put(&mut s, "b", 100);
        assert!(get(&mut other, "b"));
    }

    #[test]
    fn entry_limit_evicts_least_recently_used() {
        let mem = MemoryShared::default();
        let mut s = Store::new(&mem, "t", limits(3, 100_000));
        s.init().unwrap();
        put(&mut s, "a", 1);
        put(&mut s, "b", 1);
        put(&mut s, "c", 1);
        assert!(get(&mut s, "a")); // a is now the most recent
        let out = put(&mut s, "d", 1);
        assert_eq!(out.evicted, 1);
        assert_eq!(out.usage.entries, 3);
        assert!(!get(&mut s, "b"), "b was least recently used");
        assert!(get(&mut s, "a") && get(&mut s, "c") && get(&mut s, "d"));
    }

    #[test]
    fn byte_limit_is_never_exceeded() {
        let mem = MemoryShared::default();
        let total = 5_000;
        let mut s = Store::new(&mem, "t", limits(64, total));
        s.init().unwrap();
        for i in 0..200u64 {
            let out = put(&mut s, &format!("k{i}"), 300 + (i as usize * 37) % 700);
            assert!(out.usage.bytes <= total, "{} > {total}", out.usage.bytes);
            // What the host holds in slots is exactly what the ledger counts.
            assert_eq!(mem.slot_bytes("t"), out.usage.bytes);
        }
    }

    #[test]
    fn unique_url_flood_keeps_key_count_bounded() {
        let mem = MemoryShared::default();
        let mut s = Store::new(&mem, "t", limits(16, 1 << 20));
        s.init().unwrap();
        for i in 0..5_000u64 {
            put(&mut s, &format!("http://h/{i}"), 10);
        }
        // 16 slots + one shard index + the ledger, whatever the number of URLs.
        assert!(mem.key_count() <= 18, "{} keys", mem.key_count());
    }

    #[test]
    fn replacing_a_key_reuses_its_accounting() {
        let mem = MemoryShared::default();
        let mut s = Store::new(&mem, "t", limits(4, 10_000));
        s.init().unwrap();
        let first = put(&mut s, "a", 100).usage;
        let second = put(&mut s, "a", 50).usage;
        assert_eq!(first.entries, 1);
        assert_eq!(second.entries, 1);
        assert_eq!(first.bytes - second.bytes, 50);
    }

    #[test]
    fn oversized_values_are_refused() {
        let mem = MemoryShared::default();
        let mut s = Store::new(
            &mem,
            "t",
            Limits {
                max_entries: 4,
                max_total_bytes: 1000,
                max_entry_bytes: 200,
                max_variants: 8,
                policy: Policy::Lru,
            },
        );
        s.init().unwrap();
        let h = 1;
        let r = s.insert(
            vec![Insert {
                hash: h,
                primary: h,
                kind: Kind::Response,
                value: value("a", 300),
            }],
            true,
        );
        assert_eq!(r, Err(StoreError::TooLarge));
    }

    #[test]
    fn remove_takes_variants_along() {
        let mem = MemoryShared::default();
        let mut s = Store::new(&mem, "t", limits(8, 10_000));
        s.init().unwrap();
        let p = crate::cache::key::hash64(b"u");
        let marker = entry::encode_vary(0, "u", &["accept".into()]);
        s.insert(
            vec![
                Insert {
                    hash: p,
                    primary: p,
                    kind: Kind::Vary,
                    value: marker,
                },
                Insert {
                    hash: 77,
                    primary: p,
                    kind: Kind::Variant,
                    value: value("u", 5),
                },
            ],
            false,
        )
        .unwrap();
        assert!(s.get(77, "u").is_some());
        assert_eq!(s.remove(p).unwrap(), 2);
        assert!(s.get(77, "u").is_none());
        assert_eq!(s.usage().entries, 0);
        assert_eq!(mem.slot_bytes("t"), 0);
    }

    #[test]
    fn variants_of_one_url_are_bounded_oldest_first() {
        // RFC 9111 §4.1 leaves the number of variants to the cache; the issue asks for the
        // oldest to go.
        let mem = MemoryShared::default();
        let mut l = limits(64, 1 << 20);
        l.max_variants = 3;
        let mut s = Store::new(&mem, "t", l);
        s.init().unwrap();
        let p = crate::cache::key::hash64(b"u");
        let variant = |h: u64| Insert {
            hash: h,
            primary: p,
            kind: Kind::Variant,
            value: value("u", 1),
        };
        for h in [100u64, 101, 102] {
            s.insert(vec![variant(h)], false).unwrap();
        }
        let out = s.insert(vec![variant(103)], false).unwrap();
        assert_eq!(out.evicted, 1);
        assert!(s.get(100, "u").is_none(), "the oldest variant went");
        assert!(s.get(101, "u").is_some() && s.get(103, "u").is_some());
        // Another URL's variants are not counted.
        let other = Insert {
            primary: crate::cache::key::hash64(b"w"),
            value: value("w", 1),
            ..variant(200)
        };
        assert_eq!(s.insert(vec![other], false).unwrap().evicted, 0);
    }

    #[test]
    fn a_flush_writes_a_bounded_number_of_shards() {
        let mem = MemoryShared::default();
        let l = limits(64 * 300, 1 << 24);
        let mut a = Store::new(&mem, "t", l);
        a.init().unwrap();
        for i in 0..3000 {
            put(&mut a, &format!("k{i}"), 1);
        }
        let mut b = Store::new(&mem, "t", l);
        for i in 0..3000 {
            assert!(get(&mut b, &format!("k{i}")));
        }
        let touched = b.touches.len();
        assert!(touched > MAX_FLUSH_SHARDS, "{touched} shards touched");
        b.flush_touches();
        assert_eq!(b.touches.len(), touched - MAX_FLUSH_SHARDS);
        b.flush_touches();
        assert_eq!((b.touches.len(), b.pending), (0, 0));
    }

    #[test]
    fn a_stale_slot_hint_never_serves_an_old_value() {
        let mem = MemoryShared::default();
        let l = limits(8, 10_000);
        let mut a = Store::new(&mem, "t", l);
        let mut b = Store::new(&mem, "t", l);
        a.init().unwrap();
        put(&mut a, "k", 10);
        assert!(get(&mut a, "k"), "a now knows k's slot");
        // b replaces k (its old slot is freed, then reused by another key).
        put(&mut b, "k", 20);
        put(&mut b, "other", 30);
        let h = crate::cache::key::hash64(b"k");
        let v = a.get(h, "k").unwrap();
        let EntryView::Response(r) = decode(&v).unwrap() else {
            panic!()
        };
        assert_eq!(r.body.len(), 20, "the new value, found through the index");
        b.remove(h).unwrap();
        assert!(!get(&mut a, "k"), "removed: the hint's slot is empty");
    }

    #[test]
    fn one_urls_variants_cannot_fill_its_shard() {
        let mem = MemoryShared::default();
        let mut l = limits(8, 1 << 20);
        l.max_variants = 16;
        let mut s = Store::new(&mem, "t", l);
        s.init().unwrap();
        put(&mut s, "other", 1);
        let p = crate::cache::key::hash64(b"u");
        for h in 100..120u64 {
            let v = Insert {
                hash: h,
                primary: p,
                kind: Kind::Variant,
                value: value("u", 1),
            };
            s.insert(vec![v], false).unwrap();
        }
        // 8 slots: at most 7 variants, so the URL never holds the whole shard.
        assert_eq!(s.usage().entries, 8);
        assert!(get(&mut s, "other"));
    }

    #[test]
    fn s3fifo_keeps_reused_entries_through_a_scan_where_lru_does_not() {
        let run = |policy: Policy| {
            let mem = MemoryShared::default();
            let mut s = Store::new(
                &mem,
                "t",
                Limits {
                    policy,
                    ..limits(10, 1 << 20)
                },
            );
            s.init().unwrap();
            let hot: Vec<String> = (0..4).map(|i| format!("hot{i}")).collect();
            for k in &hot {
                put(&mut s, k, 10);
            }
            for _ in 0..2 {
                for k in &hot {
                    assert!(get(&mut s, k));
                }
            }
            // A scan of one-hit wonders, three times the cache.
            for i in 0..30 {
                put(&mut s, &format!("scan{i}"), 10);
            }
            hot.iter().filter(|k| get(&mut s, k)).count()
        };
        assert_eq!(run(Policy::S3Fifo), 4, "S3-FIFO keeps the reused entries");
        assert_eq!(run(Policy::Lru), 0, "LRU lets the scan flush them");
    }

    #[test]
    fn values_are_removed_or_rewritten_in_place_by_content() {
        let mem = MemoryShared::default();
        let mut a = Store::new(&mem, "t", limits(16, 100_000));
        let mut b = Store::new(&mem, "t", limits(16, 100_000));
        a.init().unwrap();
        b.init().unwrap();
        put(&mut a, "k-short", 10);
        put(&mut a, "k-long", 20);
        put(&mut a, "k-other", 30);
        // In place, same size: the 20-byte body becomes ys; other sizes are refused.
        let edit = |v: &[u8]| {
            let mut n = v.to_vec();
            let at = n.len() - 20;
            (v.len() == value("k-long", 20).len()).then(|| {
                n[at..].fill(b'y');
                n
            })
        };
        assert_eq!(b.rewrite_where(edit), 1);
        assert_eq!(
            b.rewrite_where(|v| Some(v[1..].to_vec())),
            0,
            "sizes never change"
        );
        let h = crate::cache::key::hash64(b"k-long");
        assert!(a.get(h, "k-long").unwrap().ends_with(&[b'y'; 20]));
        let bytes = a.usage().bytes;
        assert_eq!(
            a.remove_where_value(|_, v| v.len() > value("k", 25).len())
                .unwrap(),
            1
        );
        assert!(!get(&mut a, "k-other") && get(&mut a, "k-short"));
        assert!(a.usage().bytes < bytes);
        assert_eq!(mem.slot_bytes("t"), a.usage().bytes);
    }

    #[test]
    fn remove_where_purges_by_key_prefix() {
        let mem = MemoryShared::default();
        let mut s = Store::new(&mem, "t", limits(16, 100_000));
        s.init().unwrap();
        for k in ["http://h/a/1", "http://h/a/2", "http://h/b/1"] {
            put(&mut s, k, 10);
        }
        assert_eq!(s.remove_where(|k| k.starts_with("http://h/a/")).unwrap(), 2);
        assert!(!get(&mut s, "http://h/a/1") && !get(&mut s, "http://h/a/2"));
        assert!(get(&mut s, "http://h/b/1"));
        assert_eq!(s.usage().entries, 1);
        assert_eq!(mem.slot_bytes("t"), s.usage().bytes);
    }

    #[test]
    fn evicting_a_vary_marker_evicts_its_variants() {
        let mem = MemoryShared::default();
        let mut s = Store::new(&mem, "t", limits(3, 100_000));
        s.init().unwrap();
        let p = 5u64;
        s.insert(
            vec![
                Insert {
                    hash: p,
                    primary: p,
                    kind: Kind::Vary,
                    value: entry::encode_vary(0, "u", &["a".into()]),
                },
                Insert {
                    hash: 6,
                    primary: p,
                    kind: Kind::Variant,
                    value: value("u", 1),
                },
            ],
            false,
        )
        .unwrap();
        put(&mut s, "x", 1);
        // Full (3/3): the next insert evicts the marker (oldest) and its variant with it.
        let out = put(&mut s, "y", 1);
        assert_eq!(out.evicted, 2);
        assert_eq!(out.usage.entries, 2);
    }

    #[test]
    fn a_new_plain_response_orphans_no_variants() {
        let mem = MemoryShared::default();
        let mut s = Store::new(&mem, "t", limits(8, 100_000));
        s.init().unwrap();
        let p = crate::cache::key::hash64(b"u");
        s.insert(
            vec![
                Insert {
                    hash: p,
                    primary: p,
                    kind: Kind::Vary,
                    value: entry::encode_vary(0, "u", &["a".into()]),
                },
                Insert {
                    hash: 6,
                    primary: p,
                    kind: Kind::Variant,
                    value: value("u", 1),
                },
            ],
            false,
        )
        .unwrap();
        let out = put(&mut s, "u", 1);
        assert_eq!(out.usage.entries, 1, "marker replaced, variant removed");
    }

    #[test]
    fn lost_cas_race_retries_and_both_inserts_land() {
        // Simulates another worker writing the index between our read and write.
        struct Racy<'a> {
            mem: &'a MemoryShared,
            other: std::cell::Cell<bool>,
        }
        impl SharedData for &Racy<'_> {
            fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
                SharedData::get(&self.mem, key)
            }
            fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
                if key.contains("/h/") && cas != 0 && !self.other.replace(true) {
                    let mut other = Store::new(self.mem, "t", limits(8, 10_000));
                    put(&mut other, "theirs", 10);
                }
                SharedData::set(&self.mem, key, value, cas)
            }
        }
        let mem = MemoryShared::default();
        Store::new(&mem, "t", limits(8, 10_000)).init().unwrap();
        let racy = Racy {
            mem: &mem,
            other: std::cell::Cell::new(false),
        };
        let mut s = Store::new(&racy, "t", limits(8, 10_000));
        let h = crate::cache::key::hash64(b"mine");
        let out = s
            .insert(
                vec![Insert {
                    hash: h,
                    primary: h,
                    kind: Kind::Response,
                    value: value("mine", 10),
                }],
                true,
            )
            .unwrap();
        assert_eq!(out.usage.entries, 2, "the other worker's insert survived");
    }

    #[test]
    fn another_workers_write_right_after_ours_is_not_missed() {
        // Another worker writes the index between our write and our reading of its token:
        // the token must not be taken as ours, or its entry would be missed for good.
        struct Sneaky<'a> {
            mem: &'a MemoryShared,
            armed: std::cell::Cell<bool>,
        }
        impl SharedData for &Sneaky<'_> {
            fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
                if key.contains("/h/") && self.armed.replace(false) {
                    let mut other = Store::new(self.mem, "t", limits(8, 10_000));
                    put(&mut other, "theirs", 10);
                }
                SharedData::get(&self.mem, key)
            }
            fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
                let r = SharedData::set(&self.mem, key, value, cas);
                if key.contains("/h/") && r.is_ok() {
                    self.armed.set(true);
                }
                r
            }
        }
        let mem = MemoryShared::default();
        Store::new(&mem, "t", limits(8, 10_000)).init().unwrap();
        let sneaky = Sneaky {
            mem: &mem,
            armed: std::cell::Cell::new(false),
        };
        let mut s = Store::new(&sneaky, "t", limits(8, 10_000));
        s.refresh().unwrap();
        let h = crate::cache::key::hash64(b"mine");
        let item = Insert {
            hash: h,
            primary: h,
            kind: Kind::Response,
            value: value("mine", 10),
        };
        s.insert(vec![item], true).unwrap();
        let theirs = crate::cache::key::hash64(b"theirs");
        assert!(s.get(theirs, "theirs").is_some(), "their entry is found");
        assert!(s.get(h, "mine").is_some());
    }

    #[test]
    fn changed_slot_count_rebuilds_and_frees_old_slots() {
        let mem = MemoryShared::default();
        let mut s = Store::new(&mem, "t", limits(8, 10_000));
        s.init().unwrap();
        put(&mut s, "a", 100);
        let mut s2 = Store::new(&mem, "t", limits(4, 10_000));
        s2.init().unwrap();
        assert_eq!(s2.usage().entries, 0);
        assert_eq!(mem.slot_bytes("t"), 0);
        // A worker still on the old configuration may not write the new layout's shards.
        let h = crate::cache::key::hash64(b"b");
        let item = Insert {
            hash: h,
            primary: h,
            kind: Kind::Response,
            value: value("b", 10),
        };
        assert_eq!(s.insert(vec![item], true), Err(StoreError::Host));
        put(&mut s2, "c", 10);
        assert!(get(&mut s2, "c"));
    }

    #[test]
    fn touches_reach_the_index_on_flush() {
        let mem = MemoryShared::default();
        let mut a = Store::new(&mem, "t", limits(2, 10_000));
        let mut b = Store::new(&mem, "t", limits(2, 10_000));
        a.init().unwrap();
        b.init().unwrap();
        put(&mut a, "old", 1);
        put(&mut a, "new", 1);
        assert!(get(&mut b, "old"));
        b.flush_touches();
        // a evicts by the shared recency: "new" is now the least recently used.
        put(&mut a, "third", 1);
        assert!(get(&mut a, "old"));
        assert!(!get(&mut a, "new"));
    }

    /// xorshift64*: a deterministic schedule, the same on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            (self.next() >> 11) % n
        }
    }

    /// Shared data where, before a CAS write to a shard index or the ledger, another worker
    /// may run one whole operation: how Envoy's workers, running in parallel, interleave
    /// between a read and the write that depends on it.
    struct Interleaved<'a> {
        mem: &'a MemoryShared,
        rng: std::cell::RefCell<Rng>,
        /// Chance, in 256ths, that a CAS write lets the other worker run first.
        chance: std::cell::Cell<u64>,
        other: std::cell::RefCell<Box<dyn FnMut() + 'a>>,
    }

    impl SharedData for &Interleaved<'_> {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            SharedData::get(&self.mem, key)
        }

        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
            // Every CAS write: shard indexes, the ledger, and values written after a commit.
            let hooked = cas != 0;
            if hooked && self.rng.borrow_mut().below(256) < self.chance.get() {
                if let Ok(mut other) = self.other.try_borrow_mut() {
                    other();
                }
            }
            SharedData::set(&self.mem, key, value, cas)
        }
    }

    fn nonempty_slots(mem: &MemoryShared, ns: &str) -> u64 {
        let prefix = format!("{ns}/s/");
        mem.inner
            .borrow()
            .map
            .iter()
            .filter(|(k, (v, _))| k.starts_with(&prefix) && !v.is_empty())
            .count() as u64
    }

    fn put_any<S: SharedData>(s: &mut Store<S>, key: &str, len: usize) -> Result<(), StoreError> {
        let h = crate::cache::key::hash64(key.as_bytes());
        let item = Insert {
            hash: h,
            primary: h,
            kind: Kind::Response,
            value: value(key, len),
        };
        s.insert(vec![item], true).map(|_| ())
    }

    #[test]
    fn many_shards_find_entries_and_keep_variants_together() {
        let mem = MemoryShared::default();
        let l = limits(1000, 1 << 24);
        let mut a = Store::new(&mem, "t", l);
        let mut b = Store::new(&mem, "t", l);
        a.init().unwrap();
        b.init().unwrap();
        assert_eq!(a.shards(), 16);
        for i in 0..500 {
            put(&mut a, &format!("http://h/{i}"), 10);
        }
        // Worker b knows no slot: every hit goes through the shard's index.
        assert!((0..500).all(|i| get(&mut b, &format!("http://h/{i}"))));
        assert!(!get(&mut b, "http://h/none"));
        assert_eq!(b.usage().entries, 0, "b has not looked at the ledger yet");
        b.refresh().unwrap();
        assert_eq!(b.usage().entries, 500);
        // A URL's marker and variants live in one shard: removing the URL takes them all.
        let p = crate::cache::key::hash64(b"u");
        let mut items = vec![Insert {
            hash: p,
            primary: p,
            kind: Kind::Vary,
            value: entry::encode_vary(0, "u", &["a".into()]),
        }];
        items.extend((0..3).map(|i| Insert {
            hash: 1000 + i,
            primary: p,
            kind: Kind::Variant,
            value: value("u", 5),
        }));
        a.insert(items, false).unwrap();
        assert!(b.get(1002, "u").is_some());
        assert_eq!(b.remove(p).unwrap(), 4);
        assert!(
            a.get(1001, "u").is_none(),
            "a's slot hint is checked, not trusted"
        );
        assert_eq!(mem.ledger_of("t").entries, 500);
    }

    #[test]
    fn entry_limit_is_exact_across_shards() {
        let mem = MemoryShared::default();
        // 100 entries: two shards of 50, whose slots add up to the limit.
        let mut s = Store::new(&mem, "t", limits(100, 1 << 24));
        s.init().unwrap();
        for i in 0..1000 {
            let out = put(&mut s, &format!("k{i}"), 1);
            assert!(out.usage.entries <= 100);
        }
        assert_eq!(nonempty_slots(&mem, "t"), 100);
        assert_eq!(mem.ledger_of("t").entries, 100);
    }

    #[test]
    fn interleaved_workers_keep_the_ledger_exact() {
        let mem = MemoryShared::default();
        let total = 40_000;
        let l = Limits {
            max_variants: 3,
            ..limits(256, total)
        };
        Store::new(&mem, "t", l).init().unwrap();
        // Worker b runs whole operations inside a's, between a's reads and CAS writes.
        let mut b = Store::new(&mem, "t", l);
        let mut brng = Rng(7);
        let inter = Interleaved {
            mem: &mem,
            rng: std::cell::RefCell::new(Rng(11)),
            chance: std::cell::Cell::new(96),
            other: std::cell::RefCell::new(Box::new(move || {
                let k = format!("k{}", brng.below(300));
                match brng.below(6) {
                    0 => {
                        let _ = b.remove(crate::cache::key::hash64(k.as_bytes()));
                    }
                    1 => {
                        let _ = b.get(crate::cache::key::hash64(k.as_bytes()), &k);
                        b.flush_touches();
                    }
                    _ => {
                        let _ = put_any(&mut b, &k, 50 + brng.below(1500) as usize);
                    }
                }
            })),
        };
        let mut a = Store::new(&inter, "t", l);
        let mut rng = Rng(3);
        let (mut ok, mut lost) = (0, 0);
        for step in 0..3000 {
            let k = format!("k{}", rng.below(300));
            let h = crate::cache::key::hash64(k.as_bytes());
            match rng.below(10) {
                0 => {
                    let _ = a.remove(h);
                }
                1 => {
                    let _ = a.remove_where(|key| key.starts_with("k29"));
                }
                2 => {
                    // A URL with two variants, replacing the others.
                    let items = vec![
                        Insert {
                            hash: h,
                            primary: h,
                            kind: Kind::Vary,
                            value: entry::encode_vary(0, &k, &["a".into()]),
                        },
                        Insert {
                            hash: h ^ 1,
                            primary: h,
                            kind: Kind::Variant,
                            value: value(&k, 300),
                        },
                    ];
                    let _ = a.insert(items, step % 2 == 0);
                }
                3 | 4 => {
                    let _ = a.get(h, &k);
                }
                _ => match put_any(&mut a, &k, 50 + rng.below(3000) as usize) {
                    Ok(()) => ok += 1,
                    Err(_) => lost += 1,
                },
            }
            a.flush_touches();
            // The ledger never counts less than what is stored (it may count more: a victim
            // emptied before a commit that lost its race stays counted until evicted).
            let ledger = mem.ledger_of("t");
            let stored = mem.slot_bytes("t");
            assert!(ledger.bytes >= stored, "step {step}: {ledger:?} < {stored}");
            assert!(ledger.entries >= nonempty_slots(&mem, "t"), "step {step}");
            assert!(ledger.bytes <= total, "step {step}: {ledger:?} > {total}");
        }
        assert!(lost * 100 <= ok, "{lost} inserts lost of {}", ok + lost);
        // Removing everything releases every byte the ledger counted, zombies included.
        inter.chance.set(0);
        a.remove_where(|_| true).unwrap();
        let ledger = mem.ledger_of("t");
        assert_eq!((ledger.bytes, ledger.entries), (0, 0));
        assert_eq!(mem.slot_bytes("t"), 0);
    }

    #[test]
    fn a_slot_taken_before_our_value_lands_is_not_overwritten() {
        // Worker b evicts a's new record and reuses its slot between a's commit and a's
        // write of the value: a's late write must fail, or the slot would hold a's large
        // value while the index and the ledger count b's small one.
        struct OnValueWrite<'a> {
            mem: &'a MemoryShared,
            other: std::cell::RefCell<Option<Box<dyn FnOnce() + 'a>>>,
        }
        impl SharedData for &OnValueWrite<'_> {
            fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
                SharedData::get(&self.mem, key)
            }
            fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
                if key.contains("/s/") && !value.is_empty() {
                    if let Some(other) = self.other.borrow_mut().take() {
                        other();
                    }
                }
                SharedData::set(&self.mem, key, value, cas)
            }
        }
        let mem = MemoryShared::default();
        let l = limits(2, 100_000);
        let mut b = Store::new(&mem, "t", l);
        b.init().unwrap();
        put(&mut b, "x", 10);
        put(&mut b, "y", 10);
        let hook = OnValueWrite {
            mem: &mem,
            other: std::cell::RefCell::new(Some(Box::new(move || {
                // LRU: y goes, then a's "big", whose slot is reused.
                put(&mut b, "small1", 10);
                put(&mut b, "small2", 10);
            }))),
        };
        let mut a = Store::new(&hook, "t", l);
        let h = crate::cache::key::hash64(b"big");
        let item = Insert {
            hash: h,
            primary: h,
            kind: Kind::Response,
            value: value("big", 5000),
        };
        assert_eq!(a.insert(vec![item], true), Err(StoreError::Contention));
        assert_eq!(mem.slot_bytes("t"), mem.ledger_of("t").bytes);
        let mut c = Store::new(&mem, "t", l);
        assert!(get(&mut c, "small1") && get(&mut c, "small2"));
        assert!(!get(&mut c, "big"));
    }

    #[test]
    fn unique_url_flood_stays_bounded_in_keys_and_bytes() {
        let mem = MemoryShared::default();
        let total: u64 = 4 << 20;
        let l = limits(4096, total);
        let mut workers = [Store::new(&mem, "t", l), Store::new(&mem, "t", l)];
        workers[0].init().unwrap();
        workers[1].init().unwrap();
        let shards = u64::from(workers[0].shards());
        let mut rng = Rng(5);
        for i in 0..20_000u64 {
            let w = &mut workers[(i % 2) as usize];
            let k = format!("http://h/?r={}", rng.next());
            assert!(!get(w, &k));
            // 200 B .. 2 KiB bodies: both limits bind in turn.
            put(w, &k, 200 + rng.below(1800) as usize);
            if i % 1000 == 0 {
                w.flush_touches();
            }
        }
        let keys = mem.key_count() as u64;
        assert!(keys <= 1 + shards + 4096, "{keys} keys");
        // Everything the host holds (values, indexes, the ledger) within the limit + 10 %.
        let held = mem.value_bytes() as u64;
        assert!(held <= total + total / 10, "{held} bytes held");
        assert_eq!(mem.slot_bytes("t"), mem.ledger_of("t").bytes);
        assert!(mem.slot_bytes("t") <= total);
    }

    #[test]
    fn large_entries_take_room_from_other_shards() {
        let mem = MemoryShared::default();
        let total = 64 * 1024;
        let mut s = Store::new(&mem, "t", limits(4096, total));
        s.init().unwrap();
        assert_eq!(s.shards(), 64);
        // 60 small entries spread over the shards fill the byte budget...
        let mut i = 0;
        while mem.slot_bytes("t") + 1200 <= total {
            put(&mut s, &format!("small{i}"), 1000);
            i += 1;
        }
        // ...then one entry of half the budget: its shard alone cannot make room.
        let out = put(&mut s, "large", 32 * 1024);
        assert!(out.evicted >= 25, "evicted {}", out.evicted);
        assert!(get(&mut s, "large"));
        assert!(mem.slot_bytes("t") <= total);
        assert_eq!(mem.slot_bytes("t"), mem.ledger_of("t").bytes);
    }

    #[test]
    fn contention_in_a_four_worker_miss_flood_is_rare() {
        // Each worker's CAS writes are preceded, by the given chance, by another worker's
        // whole insert: far more overlap than Envoy's workers have, whose read-to-write
        // window is a microsecond or so against tens of microseconds between misses.
        for chance in [64u64, 128] {
            let mem = MemoryShared::default();
            let l = Limits {
                policy: Policy::S3Fifo,
                ..limits(4096, 4 << 20)
            };
            Store::new(&mem, "t", l).init().unwrap();
            let mut others: Vec<Store<&MemoryShared>> =
                (0..3).map(|_| Store::new(&mem, "t", l)).collect();
            let mut orng = Rng(9);
            let inter = Interleaved {
                mem: &mem,
                rng: std::cell::RefCell::new(Rng(chance)),
                chance: std::cell::Cell::new(chance),
                other: std::cell::RefCell::new(Box::new(move || {
                    let w = orng.below(3) as usize;
                    let k = format!("http://o/{}", orng.next());
                    let _ = put_any(&mut others[w], &k, 1024);
                })),
            };
            let mut workers: Vec<Store<&Interleaved>> =
                (0..4).map(|_| Store::new(&inter, "t", l)).collect();
            let (mut stored, mut lost) = (0u32, 0u32);
            for i in 0..20_000u32 {
                let w = &mut workers[(i % 4) as usize];
                let k = format!("http://w/{i}");
                let h = crate::cache::key::hash64(k.as_bytes());
                assert!(w.get(h, &k).is_none());
                match put_any(w, &k, 1024) {
                    Ok(()) => stored += 1,
                    Err(StoreError::Contention) => lost += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            let rate = f64::from(lost) / f64::from(stored + lost);
            println!("chance {chance}/256 per CAS write: {lost} of 20000 inserts lost ({rate:.5})");
            assert!(rate < 0.001, "{lost} lost");
            assert!(mem.slot_bytes("t") <= mem.ledger_of("t").bytes);
        }
    }

    #[test]
    fn an_old_layout_is_ignored_and_retired() {
        let mem = MemoryShared::default();
        let m = &mem;
        // What the previous layout (namespace `t1`, one `EFi2` index) left behind.
        let mut old_index = b"EFi2".to_vec();
        old_index.resize(40 + 8 * 40, 0);
        m.set("t1/idx", &old_index, 0).unwrap();
        for slot in 0..8 {
            m.set(&format!("t1/s/{slot}"), &value("http://h/a", 100), 0)
                .unwrap();
        }
        // And, under the new namespace, values of other versions where a shard index and
        // the ledger go: they must be refused, never read as the current format.
        m.set("t/h/0", &old_index, 0).unwrap();
        m.set("t/a", b"EFa1 and something else entirely", 0)
            .unwrap();
        let mut s = Store::new(&mem, "t", limits(8, 10_000));
        s.init().unwrap();
        assert_eq!(s.usage(), Usage::default());
        assert!(!get(&mut s, "http://h/a"));
        put(&mut s, "http://h/a", 10);
        assert!(get(&mut s, "http://h/a"));
        assert_eq!(mem.ledger_of("t").entries, 1);
        // The old layout's memory is released once, and only once.
        assert_eq!(retire_layout(&m, "t1"), 8);
        assert_eq!(mem.slot_bytes("t1"), 0);
        assert_eq!(retire_layout(&m, "t1"), 0);
        assert!(get(&mut s, "http://h/a"), "the new layout is untouched");
    }

    #[test]
    fn a_corrupt_shard_index_is_a_miss_and_is_rebuilt() {
        let mem = MemoryShared::default();
        let mut s = Store::new(&mem, "t", limits(8, 10_000));
        s.init().unwrap();
        put(&mut s, "a", 10);
        let mut other = Store::new(&mem, "t", limits(8, 10_000));
        let cas = SharedData::get(&&mem, "t/h/0").unwrap().1;
        (&mem).set("t/h/0", b"EFi3 truncated", cas).unwrap();
        assert!(!get(&mut other, "a"));
        put(&mut other, "b", 10);
        assert!(get(&mut other, "b"));
    }

    impl MemoryShared {
        /// Bytes of the values in slots, what the ledger must count.
        fn slot_bytes(&self, ns: &str) -> u64 {
            let prefix = format!("{ns}/s/");
            self.inner
                .borrow()
                .map
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(_, (v, _))| v.len() as u64)
                .sum()
        }

        fn ledger_of(&self, ns: &str) -> Ledger {
            let b = self.inner.borrow().map[&format!("{ns}/a")].0.clone();
            Ledger::decode(&b).unwrap()
        }
    }
}
