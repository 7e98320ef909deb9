//! Proxy-Wasm metrics in the Prometheus text exposition format 0.0.4, the way Envoy's
//! `/stats/prometheus` shows the same metrics with `envoy/envoy.yaml`, so one set of
//! monitoring rules and dashboards serves both proxies.
//!
//! Proxy-Wasm metrics have no labels; edge-filter encodes them in the name
//! (`filter/src/metrics.rs`): `<base>.<label>.<value>[.<label>.<value>…]`. Envoy turns
//! those into labels with one `stats_tags` rule per metric; here every name of that shape
//! gets them: `edge_filter_requests_total.cache_result.hit.status_class.2xx` is
//! `edge_filter_requests_total{cache_result="hit",status_class="2xx"}`. Any other name is
//! sanitised as Envoy does (bytes outside `[a-zA-Z0-9_]` become `_`), and a name that
//! would start with a digit is left out, as Envoy leaves it out. As in Envoy's output,
//! counters come first, then gauges, then histograms, each sorted by name; histograms have
//! Envoy's buckets (`histogram_bucket_settings` in envoy.yaml for the two edge-filter
//! histograms, Envoy's defaults otherwise). Pure: no nginx here.

use proxy_wasm_harness::abi::MetricType;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Envoy's default histogram bucket bounds (made for milliseconds).
pub const DEFAULT_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Most bucket bounds a histogram has (the longest list above).
pub const MAX_HISTOGRAM_BUCKETS: usize = DEFAULT_BUCKETS.len();

/// Bucket bounds by exact metric name: envoy.yaml's `histogram_bucket_settings` (a unit
/// test checks the two agree).
const BUCKET_SETTINGS: [(&str, &[f64]); 2] = [
    (
        "edge_filter_upstream_response_time_milliseconds",
        &[
            1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
            30000.0,
        ],
    ),
    (
        "edge_filter_request_cpu_time_microseconds",
        &[
            5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0,
            250000.0,
        ],
    ),
];

/// The bucket bounds of the histogram called `name` (its Proxy-Wasm name).
pub fn buckets_for(name: &str) -> &'static [f64] {
    BUCKET_SETTINGS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(&DEFAULT_BUCKETS[..], |(_, b)| *b)
}

/// The bucket a histogram sample falls in (the first bound it does not exceed), or `None`
/// above the last bound (it counts only towards `+Inf`).
pub fn bucket_index(bounds: &[f64], sample: u64) -> Option<usize> {
    bounds.iter().position(|b| sample as f64 <= *b)
}

/// The module's own counters of VM reloads for the plugin `plugin` (a
/// `proxy_wasm_module` name): `(success, failure)`. Envoy's names for the same event
/// under `failure_policy: FAIL_RELOAD` (`wasm.<plugin>.vm_reload_success` on its
/// `/stats/prometheus`, the plugin name sanitised), so `monitoring/` alerts on both
/// proxies alike.
pub fn vm_reload_metric_names(plugin: &str) -> (String, String) {
    let p = sanitize(plugin);
    (
        format!("envoy_wasm_{p}_vm_reload_success"),
        format!("envoy_wasm_{p}_vm_reload_failure"),
    )
}

/// One metric's values, copied out of the shared-memory zone.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSnapshot {
    /// Counter, gauge or histogram.
    pub kind: MetricType,
    /// The Proxy-Wasm name.
    pub name: String,
    /// Counter or gauge value; a histogram's sample count.
    pub value: u64,
    /// A histogram's sum of samples.
    pub sum: u64,
    /// A histogram's samples per bucket of [`buckets_for`] (not cumulative).
    pub buckets: Vec<u64>,
}

/// A metric family name and the labels of one series.
#[derive(Debug, PartialEq, Eq)]
struct Series {
    family: String,
    labels: Vec<(String, String)>,
}

fn sanitize(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' {
                b as char
            } else {
                '_'
            }
        })
        .collect()
}

fn valid_label_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.starts_with("__")
}

/// The series a Proxy-Wasm metric name stands for, or `None` if it cannot be exported.
fn series(name: &str, kind: MetricType) -> Option<Series> {
    let parts: Vec<&str> = name.split('.').collect();
    let labelled = parts.len() >= 3 && parts.len() % 2 == 1 && {
        let names: Vec<&str> = parts[1..].iter().step_by(2).copied().collect();
        names.iter().all(|n| valid_label_name(n))
            && names
                .iter()
                .enumerate()
                .all(|(i, n)| !names[..i].contains(n))
            && !(kind == MetricType::Histogram && names.contains(&"le"))
    };
    let (family, labels) = if labelled {
        let labels = parts[1..]
            .chunks(2)
            .map(|p| (p[0].to_string(), p[1].to_string()))
            .collect();
        (sanitize(parts[0]), labels)
    } else {
        (sanitize(name), Vec::new())
    };
    match family.bytes().next() {
        Some(b) if !b.is_ascii_digit() => Some(Series { family, labels }),
        _ => None,
    }
}

fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn label_string(labels: &[(String, String)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape_label_value(v, &mut out);
        out.push('"');
    }
    out
}

fn kind_name(kind: MetricType) -> &'static str {
    match kind {
        MetricType::Counter => "counter",
        MetricType::Gauge => "gauge",
        MetricType::Histogram => "histogram",
    }
}

/// `name{labels}` (no braces without labels).
fn sample_name(out: &mut String, name: &str, suffix: &str, labels: &str) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() {
        out.push('{');
        out.push_str(labels);
        out.push('}');
    }
}

/// The `# HELP` text of a family: the module's reload counters say what they count.
fn help(family: &str, kind: &str) -> String {
    let module_own = |suffix| family.starts_with("envoy_wasm_") && family.ends_with(suffix);
    if module_own("_vm_reload_success") {
        "VMs made again after one failed (trap), all nginx workers.".to_string()
    } else if module_own("_vm_reload_failure") {
        "VMs that could not be made again after one failed, all nginx workers.".to_string()
    } else {
        format!("Proxy-Wasm {kind}, all nginx workers.")
    }
}

/// Renders `metrics` in the text format. A metric that cannot be exported (a name that
/// starts with a digit, a family already used by another type, a series seen before) is
/// left out rather than make the whole page invalid.
pub fn render(metrics: &[MetricSnapshot]) -> String {
    // (type order, family) -> (label string -> metric); BTreeMaps give Envoy's order.
    let mut families: BTreeMap<(u8, String), BTreeMap<String, &MetricSnapshot>> = BTreeMap::new();
    let mut family_kind: HashMap<String, MetricType> = HashMap::new();
    for m in metrics {
        let Some(s) = series(&m.name, m.kind) else {
            continue;
        };
        if *family_kind.entry(s.family.clone()).or_insert(m.kind) != m.kind {
            continue;
        }
        families
            .entry((m.kind as u8, s.family))
            .or_default()
            .entry(label_string(&s.labels))
            .or_insert(m);
    }
    let mut out = String::new();
    for ((_, family), series) in &families {
        let Some(first) = series.values().next() else {
            continue;
        };
        let kind = kind_name(first.kind);
        let _ = writeln!(out, "# HELP {family} {}", help(family, kind));
        let _ = writeln!(out, "# TYPE {family} {kind}");
        for (labels, m) in series {
            if m.kind != MetricType::Histogram {
                sample_name(&mut out, family, "", labels);
                let _ = writeln!(out, " {}", m.value);
                continue;
            }
            let bounds = buckets_for(&m.name);
            let sep = if labels.is_empty() { "" } else { "," };
            let mut cumulative = 0u64;
            for (i, bound) in bounds.iter().enumerate() {
                cumulative = cumulative.saturating_add(m.buckets.get(i).copied().unwrap_or(0));
                let le = format!("{labels}{sep}le=\"{bound}\"");
                sample_name(&mut out, family, "_bucket", &le);
                let _ = writeln!(out, " {cumulative}");
            }
            // Buckets and count are updated together; max() keeps +Inf monotonic anyway.
            let count = m.value.max(cumulative);
            sample_name(
                &mut out,
                family,
                "_bucket",
                &format!("{labels}{sep}le=\"+Inf\""),
            );
            let _ = writeln!(out, " {count}");
            sample_name(&mut out, family, "_sum", labels);
            let _ = writeln!(out, " {}", m.sum);
            sample_name(&mut out, family, "_count", labels);
            let _ = writeln!(out, " {count}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kind: MetricType, name: &str, value: u64) -> MetricSnapshot {
        MetricSnapshot {
            kind,
            name: name.to_string(),
            value,
            sum: 0,
            buckets: Vec::new(),
        }
    }

    #[test]
    fn labels_come_from_the_name() {
        let s = series(
            "edge_filter_requests_total.cache_result.hit.status_class.2xx",
            MetricType::Counter,
        )
        .unwrap();
        assert_eq!(s.family, "edge_filter_requests_total");
        assert_eq!(
            label_string(&s.labels),
            r#"cache_result="hit",status_class="2xx""#
        );
        // Not that shape: the whole name, sanitised as Envoy does.
        for (name, family) in [
            ("a.b", "a_b"),
            ("a.b.c.d", "a_b_c_d"),
            ("a.9x.c", "a_9x_c"),
            ("a.__x.c", "a___x_c"),
            ("a.x.1.x.2", "a_x_1_x_2"),
            ("foo-bar", "foo_bar"),
            ("caf\u{e9}", "caf__"),
        ] {
            let s = series(name, MetricType::Gauge).unwrap();
            assert_eq!((s.family.as_str(), s.labels.len()), (family, 0), "{name}");
        }
        // `le` is the bucket label: a histogram cannot use it.
        assert!(series("h.le.5", MetricType::Histogram)
            .unwrap()
            .labels
            .is_empty());
        assert_eq!(
            series("c.le.5", MetricType::Counter).unwrap().labels.len(),
            1
        );
        // Envoy leaves out names that would start with a digit.
        assert_eq!(series("9lives", MetricType::Counter), None);
        assert_eq!(series("", MetricType::Counter), None);
    }

    #[test]
    fn label_values_are_escaped() {
        let s = series("m.path.a\"b\\c\nd", MetricType::Counter).unwrap();
        assert_eq!(label_string(&s.labels), r#"path="a\"b\\c\nd""#);
    }

    #[test]
    fn renders_like_envoy() {
        let mut hist = m(
            MetricType::Histogram,
            "edge_filter_upstream_response_time_milliseconds",
            4,
        );
        hist.sum = 1_000_123;
        // Samples 2, 2, 700 and 1,000,000 (above the last bound).
        hist.buckets = vec![0, 2, 0, 0, 0, 0, 0, 0, 0, 1];
        let text = render(&[
            hist,
            m(MetricType::Gauge, "edge_filter_cache_entries", 3),
            m(
                MetricType::Counter,
                "edge_filter_requests_total.cache_result.miss.status_class.2xx",
                1,
            ),
            m(
                MetricType::Counter,
                "edge_filter_requests_total.cache_result.hit.status_class.2xx",
                7,
            ),
            m(MetricType::Counter, "edge_filter_cache_stores_total", 2),
        ]);
        let expected = "\
# HELP edge_filter_cache_stores_total Proxy-Wasm counter, all nginx workers.
# TYPE edge_filter_cache_stores_total counter
edge_filter_cache_stores_total 2
# HELP edge_filter_requests_total Proxy-Wasm counter, all nginx workers.
# TYPE edge_filter_requests_total counter
edge_filter_requests_total{cache_result=\"hit\",status_class=\"2xx\"} 7
edge_filter_requests_total{cache_result=\"miss\",status_class=\"2xx\"} 1
# HELP edge_filter_cache_entries Proxy-Wasm gauge, all nginx workers.
# TYPE edge_filter_cache_entries gauge
edge_filter_cache_entries 3
# HELP edge_filter_upstream_response_time_milliseconds Proxy-Wasm histogram, all nginx workers.
# TYPE edge_filter_upstream_response_time_milliseconds histogram
edge_filter_upstream_response_time_milliseconds_bucket{le=\"1\"} 0
edge_filter_upstream_response_time_milliseconds_bucket{le=\"2.5\"} 2
edge_filter_upstream_response_time_milliseconds_bucket{le=\"5\"} 2
edge_filter_upstream_response_time_milliseconds_bucket{le=\"10\"} 2
edge_filter_upstream_response_time_milliseconds_bucket{le=\"25\"} 2
edge_filter_upstream_response_time_milliseconds_bucket{le=\"50\"} 2
edge_filter_upstream_response_time_milliseconds_bucket{le=\"100\"} 2
edge_filter_upstream_response_time_milliseconds_bucket{le=\"250\"} 2
edge_filter_upstream_response_time_milliseconds_bucket{le=\"500\"} 2
edge_filter_upstream_response_time_milliseconds_bucket{le=\"1000\"} 3
edge_filter_upstream_response_time_milliseconds_bucket{le=\"2500\"} 3
edge_filter_upstream_response_time_milliseconds_bucket{le=\"5000\"} 3
edge_filter_upstream_response_time_milliseconds_bucket{le=\"10000\"} 3
edge_filter_upstream_response_time_milliseconds_bucket{le=\"30000\"} 3
edge_filter_upstream_response_time_milliseconds_bucket{le=\"+Inf\"} 4
edge_filter_upstream_response_time_milliseconds_sum 1000123
edge_filter_upstream_response_time_milliseconds_count 4
";
        assert_eq!(text, expected);
    }

    #[test]
    fn labelled_histograms_and_default_buckets() {
        let mut h = m(MetricType::Histogram, "lat.route.a", 1);
        h.sum = 7;
        h.buckets = vec![0, 0, 1];
        let text = render(&[h]);
        assert!(
            text.contains("lat_bucket{route=\"a\",le=\"0.5\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_bucket{route=\"a\",le=\"5\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_bucket{route=\"a\",le=\"3600000\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_bucket{route=\"a\",le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_sum{route=\"a\"} 7\nlat_count{route=\"a\"} 1\n"),
            "{text}"
        );
        assert_eq!(text.matches("_bucket").count(), DEFAULT_BUCKETS.len() + 1);
    }

    #[test]
    fn conflicts_are_left_out_not_rendered_twice() {
        let text = render(&[
            m(MetricType::Counter, "x.l.a", 1),
            m(MetricType::Gauge, "x.l.b", 2),
            m(MetricType::Counter, "9bad", 3),
            m(MetricType::Counter, "y.z", 4),
            m(MetricType::Counter, "y_z", 5),
        ]);
        assert_eq!(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>(),
            vec!["x{l=\"a\"} 1", "y_z 4"]
        );
        assert_eq!(text.matches("# TYPE").count(), 2);
    }

    #[test]
    fn buckets() {
        let b = buckets_for("edge_filter_request_cpu_time_microseconds");
        assert_eq!(bucket_index(b, 0), Some(0));
        assert_eq!(bucket_index(b, 5), Some(0), "a bound is inclusive (le)");
        assert_eq!(bucket_index(b, 6), Some(1));
        assert_eq!(bucket_index(b, 250_000), Some(b.len() - 1));
        assert_eq!(bucket_index(b, 250_001), None);
        assert_eq!(buckets_for("other"), &DEFAULT_BUCKETS[..]);
        for (_, b) in BUCKET_SETTINGS {
            assert!(b.len() <= MAX_HISTOGRAM_BUCKETS);
            assert!(b.windows(2).all(|w| w[0] < w[1]));
        }
    }

    /// The bucket bounds here are envoy.yaml's, so both proxies export the same buckets.
    #[test]
    fn buckets_match_envoy_yaml() {
        let yaml = include_str!("../../envoy/envoy.yaml");
        let mut found = 0;
        let lines: Vec<&str> = yaml.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(rest) = line.split("exact: wasmcustom.").nth(1) else {
                continue;
            };
            let name = rest.trim_end_matches(|c: char| c == '}' || c.is_whitespace());
            let list = lines[i + 1]
                .split_once('[')
                .and_then(|(_, r)| r.split_once(']'))
                .map(|(l, _)| l)
                .expect("a buckets: [...] line after the match");
            let bounds: Vec<f64> = list.split(',').map(|v| v.trim().parse().unwrap()).collect();
            assert_eq!(buckets_for(name), bounds.as_slice(), "{name}");
            found += 1;
        }
        assert_eq!(
            found,
            BUCKET_SETTINGS.len(),
            "every setting in envoy.yaml is here"
        );
    }

    #[test]
    fn reload_counters_have_envoys_names() {
        // envoy.yaml's plugin `edge-filter` and nginx.conf's module `edge_filter` give one
        // name, which monitoring/'s alerts read.
        let want = (
            "envoy_wasm_edge_filter_vm_reload_success".to_string(),
            "envoy_wasm_edge_filter_vm_reload_failure".to_string(),
        );
        assert_eq!(vm_reload_metric_names("edge_filter"), want);
        assert_eq!(vm_reload_metric_names("edge-filter"), want);
        // A dotted name must not turn into labels.
        let (ok, _) = vm_reload_metric_names("a.b.c");
        assert_eq!(ok, "envoy_wasm_a_b_c_vm_reload_success");
        let page = render(&[m(MetricType::Counter, &ok, 2)]);
        assert!(page.contains("# HELP envoy_wasm_a_b_c_vm_reload_success VMs made again"));
        assert!(page.contains("\nenvoy_wasm_a_b_c_vm_reload_success 2\n"));
    }
}
