//! The metric records that live in the `proxy_wasm_shm_metrics` zone, so every nginx worker
//! adds to one value per metric. Host-independent, like [`crate::kv`]: memory from a
//! [`BlockAlloc`], and the caller gives exclusive access (holds the zone's mutex) for as
//! long as a [`MetricTable`] lives.
//!
//! A metric is found by type and name, as in the harness's `MetricStore`; each worker keeps
//! its own ids (Envoy's id rules, the ABI core's `MetricIds`) and maps them to a record's
//! index once, at define time. The rules for what an operation does are the ABI core's
//! ([`MetricUpdate`]); this table only stores the outcome, plus per-bucket counts for
//! histograms (bounds from [`prometheus::buckets_for`]).

use crate::blocks::BlockAlloc;
use crate::prometheus::{self, MetricSnapshot, MAX_HISTOGRAM_BUCKETS};
use proxy_wasm_harness::abi::{metrics::MetricUpdate, MetricType};
use std::ptr::NonNull;

/// Most metrics a zone holds, whatever its size.
pub const MAX_METRICS: usize = 10_000;
/// Longest metric name.
pub const MAX_METRIC_NAME_BYTES: usize = 200;

const MAGIC: u64 = u64::from_le_bytes(*b"pwmetric");
/// Bumped whenever the record layout changes: a zone with another version starts afresh.
const VERSION: u32 = 1;

/// Why a metric could not get a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefineError {
    /// The name is longer than [`MAX_METRIC_NAME_BYTES`].
    #[error("the name is {len} bytes, more than the {max} allowed")]
    NameTooLong {
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// Every record is taken.
    #[error("all {capacity} metric records are taken")]
    Full {
        /// Records in the zone.
        capacity: usize,
    },
}

#[repr(C)]
struct Header {
    magic: u64,
    version: u32,
    capacity: u32,
    len: u32,
    /// Set once a define was refused and logged, so the zone logs it once.
    warned: u32,
    records: *mut Record,
}

#[repr(C)]
struct Record {
    value: u64,
    sum: u64,
    buckets: [u64; MAX_HISTOGRAM_BUCKETS],
    kind: u32,
    name_len: u32,
    name: [u8; MAX_METRIC_NAME_BYTES],
}

/// Bytes one metric takes in the zone.
pub const RECORD_BYTES: usize = std::mem::size_of::<Record>();

impl Record {
    fn name(&self) -> &[u8] {
        &self.name[..(self.name_len as usize).min(MAX_METRIC_NAME_BYTES)]
    }

    fn kind(&self) -> Option<MetricType> {
        MetricType::from_raw(self.kind)
    }
}

/// The records, with exclusive access for as long as this lives.
pub struct MetricTable<'a> {
    hdr: &'a mut Header,
    records: &'a mut [Record],
}

impl<'a> MetricTable<'a> {
    /// Lays out an empty table in memory from `alloc`, with as many records as fit in
    /// `room` bytes (at most [`MAX_METRICS`]); if the allocator cannot give that much in
    /// one block, fewer. Returns the root to keep, or `None` if not even one record fits.
    pub fn create<A: BlockAlloc>(alloc: &mut A, room: usize) -> Option<NonNull<u8>> {
        let hdr = alloc.alloc(std::mem::size_of::<Header>())?;
        let mut capacity =
            (room.saturating_sub(std::mem::size_of::<Header>()) / RECORD_BYTES).min(MAX_METRICS);
        // Halve until the allocator can give the block: at most log2(MAX_METRICS) tries.
        let records = loop {
            if capacity == 0 {
                // SAFETY: allocated above with this size.
                unsafe { alloc.free(hdr, std::mem::size_of::<Header>()) };
                return None;
            }
            if let Some(r) = alloc.alloc(capacity * RECORD_BYTES) {
                break r;
            }
            capacity /= 2;
        };
        // SAFETY: both blocks are fresh, aligned and large enough; records start zeroed.
        unsafe {
            std::ptr::write_bytes(records.as_ptr(), 0, capacity * RECORD_BYTES);
            hdr.as_ptr().cast::<Header>().write(Header {
                magic: MAGIC,
                version: VERSION,
                capacity: capacity as u32,
                len: 0,
                warned: 0,
                records: records.as_ptr().cast(),
            });
        }
        Some(hdr)
    }

    /// The table whose root is `root`, if it carries this layout's magic and version.
    ///
    /// # Safety
    ///
    /// `root` is null or points to at least a header's worth of zone memory; if it is a
    /// table, [`MetricTable::create`] made it, and nothing else uses it while the returned
    /// value lives (in nginx: the zone's mutex is held).
    pub unsafe fn attach(root: *mut u8) -> Option<MetricTable<'a>> {
        let hdr = root.cast::<Header>().as_mut()?;
        if hdr.magic != MAGIC
            || hdr.version != VERSION
            || hdr.records.is_null()
            || hdr.capacity as usize > MAX_METRICS
            || hdr.len > hdr.capacity
        {
            return None;
        }
        let records = std::slice::from_raw_parts_mut(hdr.records, hdr.capacity as usize);
        Some(MetricTable { hdr, records })
    }

    /// Records in the zone.
    pub fn capacity(&self) -> usize {
        self.records.len()
    }

    /// The index of the record for (`kind`, `name`), made if new.
    pub fn define(&mut self, kind: MetricType, name: &str) -> Result<u32, DefineError> {
        if name.len() > MAX_METRIC_NAME_BYTES {
            return Err(DefineError::NameTooLong {
                len: name.len(),
                max: MAX_METRIC_NAME_BYTES,
            });
        }
        let len = self.hdr.len as usize;
        if let Some(i) = self.records[..len]
            .iter()
            .position(|r| r.kind == kind as u32 && r.name() == name.as_bytes())
        {
            return Ok(i as u32);
        }
        if len == self.records.len() {
            return Err(DefineError::Full {
                capacity: self.records.len(),
            });
        }
        let r = &mut self.records[len];
        r.kind = kind as u32;
        r.name_len = name.len() as u32;
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        self.hdr.len += 1;
        Ok(len as u32)
    }

    fn record(&mut self, index: u32) -> Option<&mut Record> {
        let len = self.hdr.len as usize;
        self.records[..len].get_mut(index as usize)
    }

    /// Applies an update the ABI core's rules decided; `false` if there is no such record.
    pub fn apply(&mut self, index: u32, update: MetricUpdate) -> bool {
        let Some(r) = self.record(index) else {
            return false;
        };
        update.apply(&mut r.value, &mut r.sum);
        if let MetricUpdate::Sample(sample) = update {
            let name = std::str::from_utf8(r.name()).unwrap_or_default();
            if let Some(i) = prometheus::bucket_index(prometheus::buckets_for(name), sample) {
                r.buckets[i] = r.buckets[i].saturating_add(1);
            }
        }
        true
    }

    /// A record's value (counter, gauge; a histogram's sample count).
    pub fn value(&mut self, index: u32) -> Option<u64> {
        self.record(index).map(|r| r.value)
    }

    /// Every metric's values, copied out (for rendering outside the lock).
    pub fn snapshot(&self) -> Vec<MetricSnapshot> {
        self.records[..self.hdr.len as usize]
            .iter()
            .filter_map(|r| {
                let kind = r.kind()?;
                let n = if kind == MetricType::Histogram {
                    MAX_HISTOGRAM_BUCKETS
                } else {
                    0
                };
                Some(MetricSnapshot {
                    kind,
                    name: String::from_utf8_lossy(r.name()).into_owned(),
                    value: r.value,
                    sum: r.sum,
                    buckets: r.buckets[..n].to_vec(),
                })
            })
            .collect()
    }

    /// `true` the first time it is called for this zone: a refused define is logged once.
    pub fn first_warning(&mut self) -> bool {
        std::mem::replace(&mut self.hdr.warned, 1) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::testing::HeapAlloc;
    use crate::prometheus::render;
    use proxy_wasm_harness::abi::metrics::MetricIds;
    use proxy_wasm_harness::abi::Status;

    /// Two workers: their own ids, one record per metric, values added up.
    #[test]
    fn workers_share_values_by_name() {
        let mut heap = HeapAlloc::new(1 << 20);
        let root = MetricTable::create(&mut heap, 64 * 1024).unwrap().as_ptr();
        let mut t = unsafe { MetricTable::attach(root) }.unwrap();
        let mut w1 = MetricIds::default();
        let mut w2 = MetricIds::default();
        let name = "edge_filter_requests_total.cache_result.hit.status_class.2xx";
        // Worker 2 defines another metric first: its ids differ, its records are shared.
        let g2 = w2.define(MetricType::Gauge, "g");
        let c1 = w1.define(MetricType::Counter, name);
        let c2 = w2.define(MetricType::Counter, name);
        let rec = t.define(MetricType::Counter, name).unwrap();
        assert_eq!(t.define(MetricType::Counter, name), Ok(rec));
        let g = t.define(MetricType::Gauge, "g").unwrap();
        assert_ne!(rec, g);
        let (_, u) = w1.increment(c1, 3).unwrap();
        assert!(t.apply(rec, u));
        let (_, u) = w2.increment(c2, 4).unwrap();
        assert!(t.apply(rec, u));
        let (_, u) = w2.record(c2, 1).unwrap();
        assert!(t.apply(rec, u));
        assert_eq!(t.value(rec), Some(8));
        // The core's rules refuse before the table is touched.
        assert_eq!(w1.increment(c1, -1), Err(Status::BadArgument));
        let (_, u) = w2.increment(g2, -1).unwrap();
        assert!(t.apply(g, u));
        assert_eq!(t.value(g), Some(u64::MAX), "Envoy's gauges wrap");
        assert!(!t.apply(99, MetricUpdate::Add(1)));
        assert_eq!(t.value(99), None);
        let text = render(&t.snapshot());
        assert!(text
            .contains("edge_filter_requests_total{cache_result=\"hit\",status_class=\"2xx\"} 8\n"));
    }

    #[test]
    fn histograms_count_per_bucket() {
        let mut heap = HeapAlloc::new(1 << 20);
        let root = MetricTable::create(&mut heap, 64 * 1024).unwrap().as_ptr();
        let mut t = unsafe { MetricTable::attach(root) }.unwrap();
        let h = t
            .define(
                MetricType::Histogram,
                "edge_filter_request_cpu_time_microseconds",
            )
            .unwrap();
        for v in [3, 5, 6, 300, 1_000_000] {
            assert!(t.apply(h, MetricUpdate::Sample(v)));
        }
        let s = &t.snapshot()[0];
        assert_eq!((s.value, s.sum), (5, 1_000_314));
        assert_eq!(&s.buckets[..7], &[2, 1, 0, 0, 0, 0, 1]);
        assert_eq!(
            s.buckets.iter().sum::<u64>(),
            4,
            "1,000,000 is only in +Inf"
        );
        let text = render(&t.snapshot());
        assert!(text.contains("_bucket{le=\"250000\"} 4\n"), "{text}");
        assert!(text.contains("_bucket{le=\"+Inf\"} 5\n"), "{text}");
        assert!(text.contains("_count 5\n"), "{text}");
    }

    #[test]
    fn bounded_and_refusals_are_warned_once() {
        let mut heap = HeapAlloc::new(1 << 20);
        let room = std::mem::size_of::<Header>() + 3 * RECORD_BYTES;
        let root = MetricTable::create(&mut heap, room).unwrap().as_ptr();
        let mut t = unsafe { MetricTable::attach(root) }.unwrap();
        assert_eq!(t.capacity(), 3);
        let long = "x".repeat(MAX_METRIC_NAME_BYTES + 1);
        assert_eq!(
            t.define(MetricType::Counter, &long),
            Err(DefineError::NameTooLong {
                len: MAX_METRIC_NAME_BYTES + 1,
                max: MAX_METRIC_NAME_BYTES
            })
        );
        let longest = "y".repeat(MAX_METRIC_NAME_BYTES);
        t.define(MetricType::Counter, &longest).unwrap();
        // The same name with another type is another metric, as in the harness.
        t.define(MetricType::Counter, "a").unwrap();
        t.define(MetricType::Gauge, "a").unwrap();
        assert_eq!(
            t.define(MetricType::Counter, "b"),
            Err(DefineError::Full { capacity: 3 })
        );
        assert_eq!(
            t.define(MetricType::Gauge, "a"),
            Ok(2),
            "existing ones still resolve"
        );
        assert!(t.first_warning());
        assert!(!t.first_warning());
        assert_eq!(t.snapshot()[0].name, longest);
    }

    #[test]
    fn create_fits_what_the_allocator_gives() {
        // Room claimed is larger than the allocator has: capacity halves until it fits.
        let mut heap = HeapAlloc::new(100 * RECORD_BYTES);
        let root = MetricTable::create(&mut heap, 1 << 30).unwrap().as_ptr();
        let t = unsafe { MetricTable::attach(root) }.unwrap();
        assert!(t.capacity() >= 50 && t.capacity() < 100, "{}", t.capacity());
        let mut tiny = HeapAlloc::new(RECORD_BYTES / 2);
        assert!(MetricTable::create(&mut tiny, 1 << 20).is_none());
        assert_eq!(tiny.blocks(), 0);
        assert!(unsafe { MetricTable::attach(std::ptr::null_mut()) }.is_none());
        // Another layout version is not attached.
        let mut heap = HeapAlloc::new(1 << 20);
        let root = MetricTable::create(&mut heap, 8192).unwrap().as_ptr();
        unsafe { (*root.cast::<Header>()).version = VERSION + 1 };
        assert!(unsafe { MetricTable::attach(root) }.is_none());
    }
}
