//! Metrics: define, increment, record and get, and [`MetricStore`], a thread-safe store
//! with Envoy's rules (`context.cc`): ids carry their type in the low two bits; counters
//! only go up (an increment that is not positive is `BadArgument`); a histogram cannot
//! be read (`BadArgument`) or incremented (`BadArgument`); an unknown id is `NotFound`.

use super::limits::MAX_GUEST_BYTES;
use super::{code, memory, AbiView, HostResult, MetricType, Status};
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
    inner: Mutex<HashMap<(MetricType, String), MetricValue>>,
}

/// One VM's metric ids.
#[derive(Default)]
pub struct MetricIds {
    next: [u32; 3],
    by_id: HashMap<u32, (MetricType, String)>,
    by_name: HashMap<(MetricType, String), u32>,
}

const TYPE_MASK: u32 = 0x3;
const ID_INCREMENT: u32 = 0x4;

impl MetricStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(MetricType, String), MetricValue>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Defines `name` in `ids`; the same name and type give the same id.
    pub fn define(&self, ids: &mut MetricIds, t: MetricType, name: &str) -> u32 {
        let key = (t, name.to_string());
        if let Some(id) = ids.by_name.get(&key) {
            return *id;
        }
        let slot = &mut ids.next[t as usize];
        if *slot == 0 {
            *slot = t as u32;
        }
        *slot += ID_INCREMENT;
        let id = *slot;
        ids.by_id.insert(id, key.clone());
        ids.by_name.insert(key.clone(), id);
        self.lock().entry(key).or_insert_with(|| MetricValue {
            kind: Some(t),
            sum: (t == MetricType::Histogram).then_some(0),
            ..MetricValue::default()
        });
        id
    }

    fn with<R>(
        &self,
        ids: &MetricIds,
        id: u32,
        f: impl FnOnce(MetricType, &mut MetricValue) -> HostResult<R>,
    ) -> HostResult<R> {
        let t = MetricType::from_raw(id & TYPE_MASK).ok_or(Status::BadArgument)?;
        let key = ids.by_id.get(&id).ok_or(Status::NotFound)?;
        let mut values = self.lock();
        let v = values.get_mut(key).ok_or(Status::NotFound)?;
        f(t, v)
    }

    /// `proxy_increment_metric`.
    pub fn increment(&self, ids: &MetricIds, id: u32, offset: i64) -> HostResult<()> {
        if MetricType::from_raw(id & TYPE_MASK) == Some(MetricType::Histogram) {
            return Err(Status::BadArgument);
        }
        self.with(ids, id, |t, v| match t {
            MetricType::Counter if offset > 0 => {
                v.value = v.value.saturating_add(offset as u64);
                Ok(())
            }
            MetricType::Counter => Err(Status::BadArgument),
            MetricType::Gauge => {
                // Envoy's gauges are u64 and wrap below zero.
                v.value = v.value.wrapping_add(offset as u64);
                Ok(())
            }
            MetricType::Histogram => Err(Status::BadArgument),
        })
    }

    /// `proxy_record_metric`.
    pub fn record(&self, ids: &MetricIds, id: u32, value: u64) -> HostResult<()> {
        self.with(ids, id, |t, v| {
            match t {
                MetricType::Counter => v.value = v.value.saturating_add(value),
                MetricType::Gauge => v.value = value,
                MetricType::Histogram => {
                    v.value += 1;
                    v.sum = Some(v.sum.unwrap_or(0).saturating_add(value));
                    if v.samples.len() < MAX_HISTOGRAM_SAMPLES {
                        v.samples.push(value);
                    }
                }
            }
            Ok(())
        })
        .map_err(|s| {
            // Envoy answers NotFound for any id it cannot find, whatever its type bits.
            if s == Status::BadArgument {
                Status::NotFound
            } else {
                s
            }
        })
    }

    /// `proxy_get_metric`.
    pub fn get(&self, ids: &MetricIds, id: u32) -> HostResult<u64> {
        match MetricType::from_raw(id & TYPE_MASK) {
            Some(MetricType::Histogram) | None => return Err(Status::BadArgument),
            _ => {}
        }
        self.with(ids, id, |_, v| Ok(v.value))
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
}
