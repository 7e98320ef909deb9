//! Parses the Prometheus text exposition format that Envoy's `/stats/prometheus` serves,
//! so tests can look samples up by name and labels.

/// One sample line: `name{label="value",...} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name (for histograms including `_bucket`, `_sum`, `_count`).
    pub name: String,
    /// Labels in the order they were written.
    pub labels: Vec<(String, String)>,
    /// Sample value.
    pub value: f64,
}

impl Sample {
    /// The value of label `name`.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed exposition: every sample plus the `# TYPE` declarations.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    /// All samples in document order.
    pub samples: Vec<Sample>,
    /// `(metric family, type)` from `# TYPE` lines.
    pub types: Vec<(String, String)>,
}

impl Exposition {
    /// Parses the text format; malformed lines are an error naming the line.
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut out = Exposition::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    out.types.push((name.to_string(), kind.to_string()));
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            out.samples
                .push(parse_sample(line).ok_or_else(|| format!("bad sample line {line:?}"))?);
        }
        Ok(out)
    }

    /// The value of the sample `name` whose labels are exactly `labels` (any order).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.label(k) == Some(v))
            })
            .map(|s| s.value)
    }

    /// All samples called `name`, whatever their labels.
    pub fn named(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The declared type (`counter`, `gauge`, `histogram`, ...) of family `name`.
    pub fn type_of(&self, name: &str) -> Option<&str> {
        self.types
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        None => (series.to_string(), Vec::new()),
        Some((name, rest)) => (name.to_string(), parse_labels(rest.strip_suffix('}')?)?),
    };
    if name.is_empty() {
        return None;
    }
    Some(Sample {
        name,
        labels,
        value,
    })
}

fn parse_labels(mut s: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches(',').trim_start();
        if s.is_empty() {
            return Some(labels);
        }
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        s = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_empty_braces_and_histograms() {
        let text = "# TYPE edge_filter_requests_total counter\n\
            edge_filter_requests_total{cache_result=\"hit\",status_class=\"2xx\"} 3\n\
            edge_filter_cache_stores_total{} 1\n\
            plain 2.5\n\
            h_bucket{le=\"+Inf\"} 4\n\
            esc{a=\"x\\\"y,z\"} 1\n";
        let e = Exposition::parse(text).unwrap();
        assert_eq!(
            e.value(
                "edge_filter_requests_total",
                &[("status_class", "2xx"), ("cache_result", "hit")]
            ),
            Some(3.0)
        );
        assert_eq!(
            e.value("edge_filter_requests_total", &[("cache_result", "hit")]),
            None
        );
        assert_eq!(e.value("edge_filter_cache_stores_total", &[]), Some(1.0));
        assert_eq!(e.value("plain", &[]), Some(2.5));
        assert_eq!(e.value("h_bucket", &[("le", "+Inf")]), Some(4.0));
        assert_eq!(e.value("esc", &[("a", "x\"y,z")]), Some(1.0));
        assert_eq!(e.type_of("edge_filter_requests_total"), Some("counter"));
        assert_eq!(e.named("edge_filter_requests_total").len(), 1);
    }

    #[test]
    fn rejects_garbage() {
        assert!(Exposition::parse("name{a=\"1\" 2\n").is_err());
        assert!(Exposition::parse("justaname\n").is_err());
    }
}
