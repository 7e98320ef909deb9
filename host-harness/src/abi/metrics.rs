//! Metrics: define, increment, record and get, with Envoy's rules (`context.cc`): ids
//! carry their type in the low two bits; counters only go up (an increment that is not
//! positive is `BadArgument`); a histogram cannot be read (`BadArgument`) or incremented
//! (`BadArgument`); an unknown id is `NotFound`. [`MetricIds`] decides these rules and
//! [`MetricUpdate`] applies them to a value, apart from where values live; [`MetricStore`]
//! is a thread-safe store over them that embedders can use as it is.

use super::limits::MAX_GUEST_BYTES;
use super::{code, memory, AbiView, HostResult, MetricType, Status};
use rustc_hash::FxHashMap;
use std::collections::HashMap;
use std::sync::Mutex;
use wasmtime::{Caller, Linker};

/// The host side of metrics.
pub trait MetricHost {
    /// Defines (or finds) a metric; returns its id.
    fn define_metric(&mut self, t: MetricType, name: &str) -> HostResult<u32>;
    /// Adds `offset` (counters: positive only; gauges: either sign).
    fn increment_metric(&mut self, id: u32, offset: i64) -> HostResult<()>;
    /// Counters: adds; gauges: sets; histograms: records a sample.
    fn record_metric(&mut self, id: u32, value: u64) -> HostResult<()>;
    /// A counter's or gauge's value.
    fn get_metric(&mut self, id: u32) -> HostResult<u64>;
}

/// Most samples a histogram keeps for inspection; later ones only update count and sum.
pub const MAX_HISTOGRAM_SAMPLES: usize = 100_000;

/// One metric's value.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetricValue {
    /// Its kind.
    #[serde(rename = "type")]
    pub kind: Option<MetricType>,
    /// Counter or gauge value; for histograms, the number of samples.
    pub value: u64,
    /// Histogram: sum of samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sum: Option<u64>,
    /// Histogram: the samples (at most [`MAX_HISTOGRAM_SAMPLES`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<u64>,
}

/// Metric values shared by every VM, by name (as Envoy's stats store), and the ids each
/// VM defined (ids are per VM, as in Envoy).
#[derive(Default)]
pub struct MetricStore {
    inner: Mutex<HashMap<MetricKey, MetricValue>>,
}

/// A metric's identity: values are shared by type and name.
pub type MetricKey = (MetricType, String);

/// One VM's metric ids. It also decides, by Envoy's rules, what each operation on an id
/// does ([`MetricIds::increment`], [`MetricIds::record`], [`MetricIds::get`]), so that
/// every store of values (this module's [`MetricStore`], an embedder's shared memory)
/// applies the same rules.
#[derive(Default)]
pub struct MetricIds {
    next: [u32; 3],
    by_id: FxHashMap<u32, MetricKey>,
    by_name: FxHashMap<MetricKey, u32>,
}

const TYPE_MASK: u32 = 0x3;
const ID_INCREMENT: u32 = 0x4;

/// What an operation does to a metric's value, as [`MetricIds`] decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricUpdate {
    /// A counter grows (saturating).
    Add(u64),
    /// A gauge moves; Envoy's gauges are u64 and wrap below zero.
    Shift(i64),
    /// A gauge is set.
    Set(u64),
    /// A histogram sample: the sample count grows by one, the sum by the sample.
    Sample(u64),
}

impl MetricUpdate {
    /// Applies the update to `value` (a counter's or gauge's value, a histogram's sample
    /// count) and `sum` (a histogram's sum of samples; untouched otherwise).
    pub fn apply(self, value: &mut u64, sum: &mut u64) {
        match self {
            MetricUpdate::Add(n) => *value = value.saturating_add(n),
            MetricUpdate::Shift(n) => *value = value.wrapping_add(n as u64),
            MetricUpdate::Set(n) => *value = n,
            MetricUpdate::Sample(n) => {
                *value = value.saturating_add(1);
                *sum = sum.saturating_add(n);
            }
        }
    }
}

impl MetricIds {
    /// The id of `name` in this VM, made on first use: the same name and type give the
    /// same id, and ids carry their type in the low two bits, as in Envoy.
    pub fn define(&mut self, t: MetricType, name: &str) -> u32 {
        let key = (t, name.to_string());
        if let Some(id) = self.by_name.get(&key) {
            return *id;
        }
        let slot = &mut self.next[t as usize];
        if *slot == 0 {
            *slot = t as u32;
        }
        *slot += ID_INCREMENT;
        let id = *slot;
        self.by_id.insert(id, key.clone());
        self.by_name.insert(key, id);
        id
    }

    fn resolve(&self, id: u32) -> HostResult<(MetricType, &MetricKey)> {
        let t = MetricType::from_raw(id & TYPE_MASK).ok_or(Status::BadArgument)?;
        let key = self.by_id.get(&id).ok_or(Status::NotFound)?;
        Ok((t, key))
    }

    /// `proxy_increment_metric`: counters take only a positive offset, histograms none.
    pub fn increment(&self, id: u32, offset: i64) -> HostResult<(&MetricKey, MetricUpdate)> {
        if MetricType::from_raw(id & TYPE_MASK) == Some(MetricType::Histogram) {
            return Err(Status::BadArgument);
        }
        let (t, key) = self.resolve(id)?;
        let update = match t {
            MetricType::Counter if offset > 0 => MetricUpdate::Add(offset as u64),
            MetricType::Gauge => MetricUpdate::Shift(offset),
            MetricType::Counter | MetricType::Histogram => return Err(Status::BadArgument),
        };
        Ok((key, update))
    }

    /// `proxy_record_metric`: counters add, gauges are set, histograms take a sample.
    pub fn record(&self, id: u32, value: u64) -> HostResult<(&MetricKey, MetricUpdate)> {
        let (t, key) = self.resolve(id).map_err(|s| {
            // Envoy answers NotFound for any id it cannot find, whatever its type bits.
            if s == Status::BadArgument {
                Status::NotFound
            } else {
                s
            }
        })?;
        let update = match t {
            MetricType::Counter => MetricUpdate::Add(value),
            MetricType::Gauge => MetricUpdate::Set(value),
            MetricType::Histogram => MetricUpdate::Sample(value),
        };
        Ok((key, update))
    }

    /// `proxy_get_metric`: which metric to read; a histogram cannot be read.
    pub fn get(&self, id: u32) -> HostResult<&MetricKey> {
        match MetricType::from_raw(id & TYPE_MASK) {
            Some(MetricType::Histogram) | None => return Err(Status::BadArgument),
            _ => {}
        }
        self.resolve(id).map(|(_, key)| key)
    }
}

impl MetricStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MetricKey, MetricValue>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Defines `name` in `ids`; the same name and type give the same id.
    pub fn define(&self, ids: &mut MetricIds, t: MetricType, name: &str) -> u32 {
        let id = ids.define(t, name);
        self.lock()
            .entry((t, name.to_string()))
            .or_insert_with(|| MetricValue {
                kind: Some(t),
                sum: (t == MetricType::Histogram).then_some(0),
                ..MetricValue::default()
            });
        id
    }

    fn apply(&self, key: &MetricKey, update: MetricUpdate) -> HostResult<()> {
        let mut values = self.lock();
        let v = values.get_mut(key).ok_or(Status::NotFound)?;
        let mut sum = v.sum.unwrap_or(0);
        update.apply(&mut v.value, &mut sum);
        if let MetricUpdate::Sample(sample) = update {
            v.sum = Some(sum);
            if v.samples.len() < MAX_HISTOGRAM_SAMPLES {
                v.samples.push(sample);
            }
        }
        Ok(())
    }

    /// `proxy_increment_metric`.
    pub fn increment(&self, ids: &MetricIds, id: u32, offset: i64) -> HostResult<()> {
        let (key, update) = ids.increment(id, offset)?;
        self.apply(key, update)
    }

    /// `proxy_record_metric`.
    pub fn record(&self, ids: &MetricIds, id: u32, value: u64) -> HostResult<()> {
        let (key, update) = ids.record(id, value)?;
        self.apply(key, update)
    }

    /// `proxy_get_metric`.
    pub fn get(&self, ids: &MetricIds, id: u32) -> HostResult<u64> {
        let key = ids.get(id)?;
        self.lock()
            .get(key)
            .map(|v| v.value)
            .ok_or(Status::NotFound)
    }

    /// Every metric by name, sorted (for inspection).
    pub fn snapshot(&self) -> Vec<(String, MetricValue)> {
        let mut out: Vec<(String, MetricValue)> = self
            .lock()
            .iter()
            .map(|((_, n), v)| (n.clone(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The value of the metric called `name` (counter, gauge, or histogram sample count).
    pub fn value(&self, name: &str) -> Option<u64> {
        self.lock()
            .iter()
            .find(|((_, n), _)| n == name)
            .map(|(_, v)| v.value)
    }

    /// The full value (with histogram samples) of `name`.
    pub fn metric(&self, name: &str) -> Option<MetricValue> {
        self.lock()
            .iter()
            .find(|((_, n), _)| n == name)
            .map(|(_, v)| v.clone())
    }
}

/// Links the metric host calls.
pub fn add_to_linker<T: AbiView + MetricHost>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Caller<'_, T>, t: i32, np: i32, ns: i32, id_ptr: i32| -> i32 {
            let r = (|| {
                let t = MetricType::from_raw(t as u32).ok_or(Status::BadArgument)?;
                let name = memory::read_string(&mut c, np, ns, MAX_GUEST_BYTES)?;
                let id = c.data_mut().define_metric(t, &name)?;
                memory::write_u32(&mut c, id_ptr, id)
            })();
            code(r)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: Caller<'_, T>, id: i32, offset: i64| -> i32 {
            code(c.data_mut().increment_metric(id as u32, offset))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |mut c: Caller<'_, T>, id: i32, value: i64| -> i32 {
            code(c.data_mut().record_metric(id as u32, value as u64))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: Caller<'_, T>, id: i32, ptr: i32| -> i32 {
            let r = c
                .data_mut()
                .get_metric(id as u32)
                .and_then(|v| memory::write_u64(&mut c, ptr, v));
            code(r)
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_rules() {
        let s = MetricStore::default();
        let mut ids = MetricIds::default();
        let c = s.define(&mut ids, MetricType::Counter, "c");
        let g = s.define(&mut ids, MetricType::Gauge, "g");
        let h = s.define(&mut ids, MetricType::Histogram, "h");
        assert_eq!((c, g, h), (4, 5, 6));
        assert_eq!(s.define(&mut ids, MetricType::Counter, "c"), c);
        assert_eq!(s.define(&mut ids, MetricType::Counter, "d"), 8);
        s.increment(&ids, c, 2).unwrap();
        assert_eq!(s.increment(&ids, c, -1), Err(Status::BadArgument));
        assert_eq!(s.increment(&ids, c, 0), Err(Status::BadArgument));
        s.record(&ids, c, 3).unwrap();
        assert_eq!(s.get(&ids, c), Ok(5));
        s.record(&ids, g, 10).unwrap();
        s.increment(&ids, g, -3).unwrap();
        assert_eq!(s.get(&ids, g), Ok(7));
        s.record(&ids, h, 9).unwrap();
        assert_eq!(s.get(&ids, h), Err(Status::BadArgument));
        assert_eq!(s.increment(&ids, h, 1), Err(Status::BadArgument));
        assert_eq!(s.get(&ids, 100), Err(Status::NotFound));
        assert_eq!(s.record(&ids, 101, 1), Err(Status::NotFound));
        assert_eq!(s.get(&ids, 3), Err(Status::BadArgument));
        // Another VM shares values by name but has its own ids.
        let mut ids2 = MetricIds::default();
        let c2 = s.define(&mut ids2, MetricType::Counter, "c");
        assert_eq!(s.get(&ids2, c2), Ok(5));
        assert_eq!(s.metric("h").unwrap().samples, vec![9]);
    }

    #[test]
    fn rules_without_a_store() {
        let mut ids = MetricIds::default();
        let c = ids.define(MetricType::Counter, "c");
        let g = ids.define(MetricType::Gauge, "g");
        let h = ids.define(MetricType::Histogram, "h");
        let key = |t: MetricType, n: &str| (t, n.to_string());
        assert_eq!(
            ids.increment(c, 3),
            Ok((&key(MetricType::Counter, "c"), MetricUpdate::Add(3)))
        );
        assert_eq!(ids.increment(c, 0), Err(Status::BadArgument));
        assert_eq!(ids.increment(h, 1), Err(Status::BadArgument));
        assert_eq!(ids.increment(g, -2).unwrap().1, MetricUpdate::Shift(-2));
        assert_eq!(ids.record(g, 7).unwrap().1, MetricUpdate::Set(7));
        assert_eq!(ids.record(h, 7).unwrap().1, MetricUpdate::Sample(7));
        assert_eq!(ids.record(3, 1), Err(Status::NotFound));
        assert_eq!(ids.get(h), Err(Status::BadArgument));
        assert_eq!(ids.get(c + 4), Err(Status::NotFound));
        // Applying: a gauge wraps below zero, a sample moves count and sum.
        let (mut v, mut sum) = (1u64, 0u64);
        MetricUpdate::Shift(-2).apply(&mut v, &mut sum);
        assert_eq!((v, sum), (u64::MAX, 0));
        MetricUpdate::Add(5).apply(&mut v, &mut sum);
        assert_eq!(v, u64::MAX, "counters saturate");
        let (mut n, mut sum) = (0u64, 0u64);
        MetricUpdate::Sample(9).apply(&mut n, &mut sum);
        MetricUpdate::Sample(4).apply(&mut n, &mut sum);
        assert_eq!((n, sum), (2, 13));
    }
}
