//! Generates the Kubernetes variant of `envoy/envoy.yaml` (the file the demo and every Envoy
//! end-to-end test run) so that the two cannot drift: `k8s/base/envoy.yaml` is this file with
//! a short, fixed list of edits, each of which must match exactly once. If `envoy.yaml`
//! changes shape, generation fails loudly instead of silently producing a stale config.
//!
//! Also generates `k8s/istio/custom_bootstrap.json`: the same `stats_tags` and histogram
//! buckets, for Istio proxies (through the `sidecar.istio.io/bootstrapOverride` annotation).

use std::fs;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::Error;

const SOURCE: &str = "envoy/envoy.yaml";
const PLUGIN_JSON: &str = "k8s/base/edge-filter.json";
const K8S_ENVOY: &str = "k8s/base/envoy.yaml";
const ISTIO_BOOTSTRAP: &str = "k8s/istio/custom_bootstrap.json";

/// Where the pod finds the module: the image volume or the init container's emptyDir.
pub const WASM_PATH: &str = "/var/lib/edge-filter/plugin.wasm";
/// Port of the read-only metrics listener Prometheus scrapes (the admin API stays on loopback).
pub const METRICS_PORT: u16 = 9902;

/// `k8s-envoy`: write both files, or with `check` compare them and fail on any difference.
pub fn run(root: &Path, check: bool) -> Result<(), Error> {
    let source = read(root, SOURCE)?;
    let plugin = read(root, PLUGIN_JSON)?;
    let outputs = [
        (K8S_ENVOY, k8s_envoy_yaml(&source, &plugin)?),
        (ISTIO_BOOTSTRAP, istio_bootstrap(&source)?),
    ];
    let mut drifted = Vec::new();
    for (rel, content) in &outputs {
        let path = root.join(rel);
        if check {
            let current = fs::read_to_string(&path).unwrap_or_default();
            if &current != content {
                drifted.push(rel.to_string());
            } else {
                println!("up to date: {rel}");
            }
        } else {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            fs::write(&path, content).map_err(|e| Error::io(&path, e))?;
            println!("wrote {rel}");
        }
    }
    if drifted.is_empty() {
        Ok(())
    } else {
        Err(Error::Drift(drifted))
    }
}

fn read(root: &Path, rel: &str) -> Result<String, Error> {
    let p = root.join(rel);
    fs::read_to_string(&p).map_err(|e| Error::io(&p, e))
}

/// Replaces the one occurrence of `from` with `to`; zero or several occurrences are an error.
fn replace_once(text: &str, from: &str, to: &str, why: &str) -> Result<String, Error> {
    match text.matches(from).count() {
        1 => Ok(text.replacen(from, to, 1)),
        n => Err(Error::Invalid(format!(
            "{SOURCE}: expected exactly one `{}` ({why}), found {n}",
            from.trim()
        ))),
    }
}

/// The plugin JSON as it must appear in the pod: parsed (so it is valid JSON and a valid
/// configuration), pretty-printed.
fn plugin_json(plugin: &str) -> Result<String, Error> {
    edge_filter::config::Config::parse(plugin.as_bytes())
        .map_err(|e| Error::Invalid(format!("{PLUGIN_JSON}: {e}")))?;
    let v: Value =
        serde_json::from_str(plugin).map_err(|e| Error::Invalid(format!("{PLUGIN_JSON}: {e}")))?;
    Ok(serde_json::to_string_pretty(&v).expect("a parsed value serialises"))
}

/// Replaces the indented block under the single `value: |` line with `json`, re-indented.
fn replace_plugin_block(text: &str, json: &str) -> Result<String, Error> {
    let lines: Vec<&str> = text.lines().collect();
    let starts: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim_end().ends_with("value: |"))
        .map(|(i, _)| i)
        .collect();
    let [start] = starts[..] else {
        return Err(Error::Invalid(format!(
            "{SOURCE}: expected exactly one `value: |` block (the plugin JSON), found {}",
            starts.len()
        )));
    };
    let indent_of = |l: &str| l.len() - l.trim_start().len();
    let outer = indent_of(lines[start]);
    let mut end = start + 1;
    while end < lines.len() && (lines[end].trim().is_empty() || indent_of(lines[end]) > outer) {
        end += 1;
    }
    if end == start + 1 {
        return Err(Error::Invalid(format!(
            "{SOURCE}: the `value: |` block is empty"
        )));
    }
    let inner = " ".repeat(indent_of(lines[start + 1]));
    let mut out: Vec<String> = lines[..=start].iter().map(|l| l.to_string()).collect();
    out.extend(json.lines().map(|l| format!("{inner}{l}")));
    out.extend(lines[end..].iter().map(|l| l.to_string()));
    Ok(out.join("\n") + "\n")
}

/// `envoy/envoy.yaml` turned into the pod's config.
pub fn k8s_envoy_yaml(source: &str, plugin: &str) -> Result<String, Error> {
    let mut t = source.to_string();
    // Traffic listener: every interface of the pod (the demo keeps to loopback).
    t = replace_once(
        &t,
        "socket_address: { address: 127.0.0.1, port_value: 10000 }",
        "socket_address: { address: 0.0.0.0, port_value: 10000 }",
        "the traffic listener",
    )?;
    // The module comes from the image volume (or the init container's copy).
    t = replace_once(
        &t,
        "filename: target/wasm32-wasip1/release/edge_filter.wasm",
        &format!("filename: {WASM_PATH}"),
        "the .wasm path",
    )?;
    // The origin: a Service named `origin` in the pod's namespace (an ExternalName Service
    // pointing at the real origin), resolved by DNS.
    t = replace_once(
        &t,
        "    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: upstream\n",
        "    type: STRICT_DNS\n    dns_lookup_family: V4_PREFERRED\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: upstream\n",
        "the upstream cluster type",
    )?;
    t = replace_once(
        &t,
        "socket_address: { address: 127.0.0.1, port_value: 8080 }",
        "socket_address: { address: origin, port_value: 80 }",
        "the upstream address",
    )?;
    // The admin API stays on 127.0.0.1 (it can stop the server and dumps the config, purge
    // token included); Prometheus gets this read-only listener instead.
    t = replace_once(
        &t,
        "static_resources:\n  listeners:\n",
        &format!("static_resources:\n  listeners:\n{}", metrics_listener()),
        "the listeners list",
    )?;
    t = replace_once(
        &t,
        "\n  clusters:\n",
        &format!("\n  clusters:\n{}", admin_cluster()),
        "the clusters list",
    )?;
    t = replace_plugin_block(&t, &plugin_json(plugin)?)?;
    let header = format!(
        "# GENERATED by `cargo run -p xtask -- k8s-envoy` from {SOURCE} and {PLUGIN_JSON}.\n\
         # Do not edit: change those files and regenerate (tests/run fails on any drift).\n\
         # Differences from {SOURCE}: the traffic listener binds 0.0.0.0; the module is\n\
         # {WASM_PATH}; the upstream is the `origin` Service (DNS); a read-only metrics\n\
         # listener on :{METRICS_PORT} serves only GET /stats/prometheus from the loopback admin;\n\
         # the plugin JSON is {PLUGIN_JSON}, whose purge token placeholder the pod's\n\
         # render-config init container replaces with the Secret's value.\n#\n"
    );
    Ok(header + &t)
}

fn metrics_listener() -> String {
    format!(
        r#"  # k8s only: Prometheus scrapes this listener; it proxies GET /stats/prometheus (and
  # nothing else) to the admin API, which stays on loopback.
  - name: metrics
    address:
      socket_address: {{ address: 0.0.0.0, port_value: {METRICS_PORT} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: metrics
          codec_type: AUTO
          route_config:
            name: metrics
            virtual_hosts:
            - name: metrics
              domains: ["*"]
              routes:
              - match:
                  path: /stats/prometheus
                  headers:
                  - name: ":method"
                    string_match: {{ exact: GET }}
                route: {{ cluster: admin, timeout: 5s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
    )
}

fn admin_cluster() -> String {
    r#"  # k8s only: the loopback admin API, for the metrics listener.
  - name: admin
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: admin
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: 9901 }
"#
    .to_string()
}

/// Reads the `stats_tags` (tag_name, regex) and `histogram_bucket_settings` (exact, buckets)
/// entries of `envoy.yaml`. The file keeps each entry on two lines; anything else is an error.
/// `(name, value)` pairs read from envoy.yaml: (tag_name, regex) or (histogram, buckets).
type Pairs = Vec<(String, String)>;

fn stats_config(source: &str) -> Result<(Pairs, Pairs), Error> {
    let lines: Vec<&str> = source.lines().map(str::trim).collect();
    let mut tags = Vec::new();
    let mut buckets = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let next = lines.get(i + 1).copied().unwrap_or("");
        if let Some(name) = line.strip_prefix("- tag_name: ") {
            let regex = next
                .strip_prefix("regex: '")
                .and_then(|r| r.strip_suffix('\''))
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "{SOURCE}: stats tag `{name}` has no single-quoted regex on the next line"
                    ))
                })?;
            tags.push((name.to_string(), regex.replace("''", "'")));
        } else if let Some(m) = line.strip_prefix("- match: { exact: ") {
            let name = m.trim_end_matches('}').trim();
            let list = next.strip_prefix("buckets: ").ok_or_else(|| {
                Error::Invalid(format!(
                    "{SOURCE}: histogram `{name}` has no buckets on the next line"
                ))
            })?;
            buckets.push((name.to_string(), list.to_string()));
        }
    }
    if tags.is_empty() {
        return Err(Error::Invalid(format!("{SOURCE}: no stats_tags found")));
    }
    Ok((tags, buckets))
}

/// The bootstrap fragment Istio merges into its own (repeated fields are appended).
pub fn istio_bootstrap(source: &str) -> Result<String, Error> {
    let (tags, buckets) = stats_config(source)?;
    let stats_tags: Vec<Value> = tags
        .iter()
        .map(|(name, regex)| json!({ "tag_name": name, "regex": regex }))
        .collect();
    let mut settings = Vec::new();
    for (name, list) in &buckets {
        let values: Value = serde_json::from_str(list).map_err(|e| {
            Error::Invalid(format!(
                "{SOURCE}: buckets of `{name}` are not a flow list of numbers: {e}"
            ))
        })?;
        settings.push(json!({ "match": { "exact": name }, "buckets": values }));
    }
    let doc = json!({
        "stats_config": {
            "stats_tags": stats_tags,
            "histogram_bucket_settings": settings,
        }
    });
    Ok(serde_json::to_string_pretty(&doc).expect("serialises") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> std::path::PathBuf {
        crate::workspace_root()
    }

    #[test]
    fn the_real_envoy_yaml_converts() {
        let source = read(&root(), SOURCE).unwrap();
        let plugin = read(&root(), PLUGIN_JSON).unwrap();
        let out = k8s_envoy_yaml(&source, &plugin).unwrap();
        assert!(out.contains("address: 0.0.0.0, port_value: 10000"));
        assert!(out.contains(WASM_PATH));
        assert!(out.contains("address: origin, port_value: 80"));
        // The admin API itself never leaves loopback.
        assert!(out.contains("socket_address: { address: 127.0.0.1, port_value: 9901 }"));
        assert!(!out.contains("address: 0.0.0.0, port_value: 9901"));
        assert!(out.contains("__EDGE_FILTER_PURGE_TOKEN__"));
    }

    #[test]
    fn a_missing_anchor_is_an_error_not_a_silent_skip() {
        let source = read(&root(), SOURCE).unwrap();
        let broken = source.replace("port_value: 10000", "port_value: 10001");
        let plugin = read(&root(), PLUGIN_JSON).unwrap();
        assert!(matches!(
            k8s_envoy_yaml(&broken, &plugin),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn an_invalid_plugin_config_is_refused() {
        let source = read(&root(), SOURCE).unwrap();
        let err = k8s_envoy_yaml(&source, r#"{"cache":{"max_entries":"lots"}}"#).unwrap_err();
        assert!(err.to_string().contains("cache.max_entries"), "{err}");
    }

    #[test]
    fn istio_bootstrap_carries_every_stats_tag() {
        let source = read(&root(), SOURCE).unwrap();
        let v: Value = serde_json::from_str(&istio_bootstrap(&source).unwrap()).unwrap();
        let tags = v["stats_config"]["stats_tags"].as_array().unwrap();
        assert_eq!(tags.len(), source.matches("- tag_name:").count());
        assert!(tags.iter().any(|t| t["tag_name"] == "cache_result"));
    }
}
