//! Plugin configuration: JSON, strict (`deny_unknown_fields`), with defaults so that `{}` works.
//!
//! Parsing never panics: every problem becomes a [`ConfigError`] that names the field, so the
//! one log line Envoy shows is enough to fix the config.

use serde::Deserialize;
use std::fmt;

/// The whole plugin configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Response cache settings.
    pub cache: CacheConfig,
    /// `/healthz` and `/readyz` settings.
    pub health: HealthConfig,
    /// Purge (explicit invalidation) settings.
    pub purge: PurgeConfig,
}

/// Response cache settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Turns the cache off entirely (requests pass through, marked `fwd=bypass`).
    pub enabled: bool,
    /// Upper bound on the bytes of all stored entries together.
    pub max_total_bytes: u64,
    /// Upper bound on one stored entry (headers and body); larger responses stream through.
    pub max_entry_bytes: u64,
    /// Upper bound on the number of stored entries; also the number of shared-data slots.
    pub max_entries: u32,
    /// Response statuses that may be stored.
    pub statuses: Vec<u16>,
    /// Request methods answered from the cache: `GET` (stored) and `HEAD` (served from GET entries).
    pub methods: Vec<String>,
    /// Adds the RFC 9211 `Cache-Status` header to responses.
    pub cache_status: bool,
    /// Debugging: adds the cache key to `Cache-Status` (RFC 9211 §2.7 `key`).
    pub cache_status_key: bool,
    /// Fraction of `Date - Last-Modified` used as heuristic freshness (RFC 9111 §4.2.2).
    pub heuristic_fraction: f64,
    /// Cap on heuristic freshness, seconds.
    pub heuristic_max_secs: u64,
    /// Operator's grace: serve a stale entry this many seconds past expiry when the upstream
    /// fails, even without `stale-if-error` (never past `must-revalidate`). 0 is off.
    pub stale_if_error_grace_secs: u64,
    /// How long a background refresh (stale-while-revalidate) may take.
    pub refresh_timeout_ms: u64,
    /// Most stored variants of one URL (RFC 9111 §4.1); the oldest goes first.
    pub max_variants: u32,
    /// Eviction policy: `"s3fifo"` (keeps more hits on skewed traffic) or `"lru"`.
    pub eviction: crate::cache::eviction::Policy,
    /// Concurrent misses for one URL wait for the first one's response.
    pub coalesce: bool,
    /// How long a waiting request waits before it goes upstream itself.
    pub coalesce_timeout_ms: u64,
    /// Targeted cache-control fields this cache obeys, first valid one wins (RFC 9213):
    /// e.g. `["edge-cache-control", "cdn-cache-control"]`. Empty: `Cache-Control` only.
    pub targeted_cache_control: Vec<String>,
    /// Content codings the origin uses, in its preference order: a request's
    /// `Accept-Encoding` is reduced to those it accepts before the lookup and upstream
    /// (`identity` when none). Empty: left alone.
    pub normalize_accept_encoding: Vec<String>,
    /// Languages the origin serves, its default first: a request's `Accept-Language` is
    /// reduced to the one it prefers (else the default). Empty: left alone.
    pub normalize_accept_language: Vec<String>,
    /// Requests kept away from the cache (forwarded untouched).
    pub bypass: BypassConfig,
    /// Query parameters dropped, kept or sorted, in the key and in what is forwarded.
    pub query: QueryConfig,
    /// Request headers whose values are part of the key (each value its own variant), e.g.
    /// a device class header set by an earlier filter.
    pub key_headers: Vec<String>,
    /// Cookies whose values are part of the key (exact names), e.g. a language cookie.
    pub key_cookies: Vec<String>,
    /// `key_headers` and `key_cookies` as the Vary names they act as (derived).
    #[serde(skip)]
    pub implicit_vary: Vec<String>,
}

/// The query policy of the cache key. The rewritten target is also what the upstream
/// receives: the key stays what is forwarded.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// Parameter names dropped (a trailing `*` matches a prefix: `utm_*`).
    pub drop: Vec<String>,
    /// Only these parameters are kept (same patterns); exclusive with `drop`.
    pub keep_only: Vec<String>,
    /// Parameters sorted by name (stable: repeated names keep their order).
    pub sort: bool,
}

impl QueryConfig {
    /// Whether any rule changes targets.
    pub fn is_active(&self) -> bool {
        self.sort || !self.drop.is_empty() || !self.keep_only.is_empty()
    }
}

/// Requests that bypass the cache: any rule that matches is enough.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BypassConfig {
    /// Paths (with their query) that start with one of these, e.g. `/admin`.
    pub path_prefixes: Vec<String>,
    /// Request headers whose presence bypasses, e.g. `x-debug`.
    pub headers: Vec<String>,
    /// Cookie names whose presence bypasses, e.g. a session cookie.
    pub cookies: Vec<String>,
}

/// Limits that keep the shared index and the per-request work bounded.
pub mod limits {
    /// Most slots (entries) the store may have. Each costs 40 bytes of its shard's index
    /// (`cache/store.rs`), and every operation's cost is independent of the number.
    pub const MAX_ENTRIES: u32 = 1 << 20;
    /// Largest single entry: Proxy-Wasm buffers and shared-data values are u32-sized.
    pub const MAX_ENTRY_BYTES: u64 = 64 << 20;
    /// Most values in a normalisation list (each subset of codings can be a variant).
    pub const MAX_NORMALIZED_VALUES: usize = 8;
    /// Most entries in each bypass list (each request checks them all).
    pub const MAX_BYPASS_RULES: usize = 32;
    /// Most targeted cache-control field names.
    pub const MAX_TARGETED_FIELDS: usize = 8;
    /// Shortest readiness check period.
    pub const MIN_CHECK_PERIOD_MS: u64 = 100;
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            max_total_bytes: 64 << 20,
            max_entry_bytes: 1 << 20,
            max_entries: 4096,
            // RFC 9110 §15.1 heuristically cacheable statuses, less 206 (no range assembly).
            statuses: vec![200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501],
            methods: vec!["GET".into(), "HEAD".into()],
            cache_status: true,
            cache_status_key: false,
            heuristic_fraction: 0.1,
            heuristic_max_secs: 86_400,
            stale_if_error_grace_secs: 0,
            refresh_timeout_ms: 5_000,
            max_variants: 16,
            eviction: crate::cache::eviction::Policy::S3Fifo,
            coalesce: true,
            coalesce_timeout_ms: 5_000,
            targeted_cache_control: vec!["cdn-cache-control".into()],
            normalize_accept_encoding: Vec::new(),
            normalize_accept_language: Vec::new(),
            bypass: BypassConfig::default(),
            query: QueryConfig::default(),
            key_headers: Vec::new(),
            key_cookies: Vec::new(),
            implicit_vary: Vec::new(),
        }
    }
}

/// Health endpoint settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Liveness path, answered `pass` while the VM runs.
    pub liveness_path: String,
    /// Readiness path: `pass`, or `warn`/`fail` when the upstream check fails (see
    /// `upstream_failure`) or the cache is nearly full.
    pub readiness_path: String,
    /// Envoy cluster that the readiness check calls.
    pub upstream_cluster: String,
    /// `:authority` of the check request; the cluster name when absent.
    pub upstream_authority: Option<String>,
    /// Path requested from the upstream by the readiness check.
    pub check_path: String,
    /// How often the upstream is checked.
    pub check_period_ms: u64,
    /// How long one check may take before it counts as failed.
    pub check_timeout_ms: u64,
    /// Cache fill ratio (bytes or entries) above which readiness reports `warn`.
    pub cache_warn_ratio: f64,
    /// What a failing upstream check makes readiness: `warn` (200, the default: the proxy
    /// itself can still serve, stale-if-error included) or `fail` (503).
    pub upstream_failure: crate::health::UpstreamFailure,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            liveness_path: "/healthz".into(),
            readiness_path: "/readyz".into(),
            upstream_cluster: "upstream".into(),
            upstream_authority: None,
            check_path: "/".into(),
            check_period_ms: 2000,
            check_timeout_ms: 1000,
            cache_warn_ratio: 0.9,
            upstream_failure: crate::health::UpstreamFailure::Warn,
        }
    }
}

impl HealthConfig {
    /// The `:authority` sent with the readiness check.
    pub fn authority(&self) -> &str {
        self.upstream_authority
            .as_deref()
            .unwrap_or(&self.upstream_cluster)
    }
}

/// Purge settings: a request with `method` and a matching token removes one URL.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PurgeConfig {
    /// Purge requests are recognised only when enabled.
    pub enabled: bool,
    /// Method that marks a purge request.
    pub method: String,
    /// Request header that carries the token.
    pub token_header: String,
    /// The secret; required when enabled, unless `token_env` names where to find it.
    pub token: Option<String>,
    /// Environment variable of the Wasm VM (Envoy `vm_config.environment_variables`) that
    /// holds the token, so that it can come from a Kubernetes Secret instead of the config.
    pub token_env: Option<String>,
    /// Response header listing an entry's tags, and the purge request header naming the
    /// tags to purge (space-separated, as `Surrogate-Key`).
    pub tag_header: String,
    /// Purge request header that, set to `1` or `true`, makes the purge soft: entries are
    /// marked stale instead of removed.
    pub soft_header: String,
}

impl Default for PurgeConfig {
    fn default() -> Self {
        PurgeConfig {
            enabled: false,
            method: "PURGE".into(),
            token_header: "x-purge-token".into(),
            token: None,
            token_env: None,
            tag_header: "surrogate-key".into(),
            soft_header: "x-purge-soft".into(),
        }
    }
}

impl PurgeConfig {
    /// Whether `presented` equals the configured token, compared in constant time so that
    /// response timing does not reveal how much of a guess was right.
    pub fn token_matches(&self, presented: &[u8]) -> bool {
        let Some(token) = self.token.as_deref().map(str::as_bytes) else {
            return false;
        };
        if token.is_empty() {
            return false;
        }
        // Length differences are folded into the accumulator instead of returning early.
        let mut diff = (token.len() ^ presented.len()) as u64;
        for (i, &t) in token.iter().enumerate() {
            diff |= u64::from(t ^ presented.get(i).copied().unwrap_or(!t));
        }
        diff == 0
    }
}

/// A configuration problem, naming the field it concerns.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    field: String,
    problem: String,
}

impl ConfigError {
    fn new(field: &str, problem: impl Into<String>) -> Self {
        ConfigError {
            field: field.to_string(),
            problem: problem.into(),
        }
    }

    /// Dotted path of the offending field (`cache.max_entries`), or `.` for the document.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: field `{}`: {}",
            self.field, self.problem
        )
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses and validates plugin configuration bytes. Empty input means all defaults.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        Config::parse_with_env(bytes, |name| std::env::var(name).ok())
    }

    /// [`Config::parse`] with the environment given by `env` (tests pass their own).
    pub fn parse_with_env(
        bytes: &[u8],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Config::default());
        }
        // serde would also accept a JSON array for a struct; the config is an object.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ConfigError::new(".", "must be a JSON object"));
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let mut config: Config = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // serde's unknown-field message names the field; the path is its parent.
            ConfigError::new(&path, strip_position(&inner.to_string()))
        })?;
        de.end()
            .map_err(|e| ConfigError::new(".", strip_position(&e.to_string())))?;
        if let Some(name) = config.purge.token_env.clone() {
            if config.purge.token.is_some() {
                return Err(ConfigError::new(
                    "purge.token_env",
                    "cannot be used together with purge.token",
                ));
            }
            match env(&name).filter(|t| !t.is_empty()) {
                Some(t) => config.purge.token = Some(t),
                None => {
                    return Err(ConfigError::new(
                        "purge.token_env",
                        format!("environment variable `{name}` is not set in the Wasm VM"),
                    ))
                }
            }
        }
        config.validate()?;
        let c = &mut config.cache;
        let cookies = c
            .key_cookies
            .iter()
            .map(|n| format!("{}{n}", crate::cache::vary::COOKIE_PREFIX));
        let mut implicit: Vec<String> = c
            .key_headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .chain(cookies)
            .collect();
        implicit.sort();
        implicit.dedup();
        c.implicit_vary = implicit;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.cache;
        if c.max_entries == 0 || c.max_entries > limits::MAX_ENTRIES {
            return Err(ConfigError::new(
                "cache.max_entries",
                format!("must be between 1 and {}", limits::MAX_ENTRIES),
            ));
        }
        if c.max_entry_bytes == 0 || c.max_entry_bytes > limits::MAX_ENTRY_BYTES {
            return Err(ConfigError::new(
                "cache.max_entry_bytes",
                format!("must be between 1 and {}", limits::MAX_ENTRY_BYTES),
            ));
        }
        if c.max_total_bytes < c.max_entry_bytes {
            return Err(ConfigError::new(
                "cache.max_total_bytes",
                "must be at least cache.max_entry_bytes",
            ));
        }
        if c.targeted_cache_control.len() > limits::MAX_TARGETED_FIELDS {
            return Err(ConfigError::new(
                "cache.targeted_cache_control",
                format!("at most {} field names", limits::MAX_TARGETED_FIELDS),
            ));
        }
        for name in &c.targeted_cache_control {
            let token = !name.is_empty() && name.bytes().all(crate::field::is_tchar);
            if !token || name.eq_ignore_ascii_case("cache-control") {
                return Err(ConfigError::new(
                    "cache.targeted_cache_control",
                    format!("{name:?} is not a response field name for targeted cache control"),
                ));
            }
        }
        for (field, list, ok) in [
            (
                "cache.normalize_accept_encoding",
                &c.normalize_accept_encoding,
                (|n: &str| n.bytes().all(crate::field::is_tchar) && n != "*") as fn(&str) -> bool,
            ),
            (
                "cache.normalize_accept_language",
                &c.normalize_accept_language,
                |n: &str| {
                    // RFC 5646 tags: alphanumeric subtags joined by hyphens.
                    n.split('-')
                        .all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric()))
                },
            ),
        ] {
            if list.len() > limits::MAX_NORMALIZED_VALUES {
                return Err(ConfigError::new(
                    field,
                    format!("at most {} values", limits::MAX_NORMALIZED_VALUES),
                ));
            }
            if let Some(bad) = list.iter().find(|n| n.is_empty() || !ok(n)) {
                return Err(ConfigError::new(
                    field,
                    format!("{bad:?} is not a valid value"),
                ));
            }
        }
        let b = &c.bypass;
        let token = |n: &String| !n.is_empty() && n.bytes().all(crate::field::is_tchar);
        for (field, list, ok) in [
            (
                "cache.bypass.path_prefixes",
                &b.path_prefixes,
                (|p: &String| p.starts_with('/') && p.bytes().all(|c| (0x21..0x7f).contains(&c)))
                    as fn(&String) -> bool,
            ),
            ("cache.bypass.headers", &b.headers, token),
            ("cache.bypass.cookies", &b.cookies, token),
        ] {
            if list.len() > limits::MAX_BYPASS_RULES {
                return Err(ConfigError::new(
                    field,
                    format!("at most {} entries", limits::MAX_BYPASS_RULES),
                ));
            }
            if let Some(bad) = list.iter().find(|v| !ok(v)) {
                return Err(ConfigError::new(
                    field,
                    format!("{bad:?} is not valid here"),
                ));
            }
        }
        for (field, list) in [
            ("cache.key_headers", &c.key_headers),
            ("cache.key_cookies", &c.key_cookies),
        ] {
            if let Some(bad) = list
                .iter()
                .find(|n| n.is_empty() || !n.bytes().all(crate::field::is_tchar))
            {
                return Err(ConfigError::new(field, format!("{bad:?} is not a token")));
            }
        }
        if c.key_headers.len() + c.key_cookies.len() > crate::cache::vary::MAX_VARY_NAMES {
            return Err(ConfigError::new(
                "cache.key_headers",
                format!(
                    "key_headers and key_cookies together: at most {}",
                    crate::cache::vary::MAX_VARY_NAMES
                ),
            ));
        }
        let q = &c.query;
        if !q.drop.is_empty() && !q.keep_only.is_empty() {
            return Err(ConfigError::new(
                "cache.query",
                "drop and keep_only exclude each other",
            ));
        }
        for (field, list) in [
            ("cache.query.drop", &q.drop),
            ("cache.query.keep_only", &q.keep_only),
        ] {
            let ok = |p: &String| {
                let name = p.strip_suffix('*').unwrap_or(p);
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| (0x21..0x7f).contains(&b) && !b"&=#?*".contains(&b))
            };
            if list.len() > limits::MAX_BYPASS_RULES {
                return Err(ConfigError::new(
                    field,
                    format!("at most {} names", limits::MAX_BYPASS_RULES),
                ));
            }
            if let Some(bad) = list.iter().find(|p| !ok(p)) {
                return Err(ConfigError::new(
                    field,
                    format!("{bad:?} is not a parameter name or prefix*"),
                ));
            }
        }
        for &s in &c.statuses {
            // 206 needs range assembly and 304 is not a complete response (RFC 9111 §3.3, §4.3.4).
            if !(200..=599).contains(&s) || s == 206 || s == 304 {
                return Err(ConfigError::new(
                    "cache.statuses",
                    format!("{s} cannot be stored (final statuses 200-599, except 206 and 304)"),
                ));
            }
        }
        for m in &c.methods {
            if m != "GET" && m != "HEAD" {
                return Err(ConfigError::new(
                    "cache.methods",
                    format!("`{m}` cannot be answered from the cache (only GET and HEAD)"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&c.heuristic_fraction) {
            return Err(ConfigError::new(
                "cache.heuristic_fraction",
                "must be in [0, 1]",
            ));
        }
        if c.max_variants == 0 {
            return Err(ConfigError::new("cache.max_variants", "must be at least 1"));
        }
        if c.coalesce_timeout_ms == 0 {
            return Err(ConfigError::new(
                "cache.coalesce_timeout_ms",
                "must be positive",
            ));
        }
        if c.refresh_timeout_ms == 0 {
            return Err(ConfigError::new(
                "cache.refresh_timeout_ms",
                "must be positive",
            ));
        }
        let h = &self.health;
        for (field, path) in [
            ("health.liveness_path", &h.liveness_path),
            ("health.readiness_path", &h.readiness_path),
            ("health.check_path", &h.check_path),
        ] {
            if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(ConfigError::new(
                    field,
                    "must start with `/` and contain no spaces or control characters",
                ));
            }
        }
        if h.liveness_path == h.readiness_path {
            return Err(ConfigError::new(
                "health.readiness_path",
                "must differ from health.liveness_path",
            ));
        }
        if h.upstream_cluster.is_empty() {
            return Err(ConfigError::new(
                "health.upstream_cluster",
                "must not be empty",
            ));
        }
        if h.check_period_ms < limits::MIN_CHECK_PERIOD_MS {
            return Err(ConfigError::new(
                "health.check_period_ms",
                format!("must be at least {}", limits::MIN_CHECK_PERIOD_MS),
            ));
        }
        if h.check_timeout_ms == 0 {
            return Err(ConfigError::new(
                "health.check_timeout_ms",
                "must be positive",
            ));
        }
        if !(h.cache_warn_ratio > 0.0 && h.cache_warn_ratio <= 1.0) {
            return Err(ConfigError::new(
                "health.cache_warn_ratio",
                "must be in (0, 1]",
            ));
        }
        let p = &self.purge;
        if p.method.is_empty() || !p.method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ConfigError::new(
                "purge.method",
                "must be an upper-case method name",
            ));
        }
        if p.token_header.is_empty() {
            return Err(ConfigError::new("purge.token_header", "must not be empty"));
        }
        for (field, name) in [
            ("purge.tag_header", &p.tag_header),
            ("purge.soft_header", &p.soft_header),
        ] {
            if name.is_empty() || !name.bytes().all(crate::field::is_tchar) {
                return Err(ConfigError::new(
                    field,
                    format!("{name:?} is not a header name"),
                ));
            }
        }
        if p.enabled && p.token.as_deref().unwrap_or("").is_empty() {
            return Err(ConfigError::new(
                "purge.token",
                "is required when purge.enabled is true",
            ));
        }
        Ok(())
    }

    /// Whether `method` is answered from the cache.
    pub fn serves_method(&self, method: &str) -> bool {
        self.cache.methods.iter().any(|m| m == method)
    }
}

/// serde_json appends " at line L column C"; the field path says more for a one-line config.
fn strip_position(msg: &str) -> String {
    match msg.rsplit_once(" at line ") {
        Some((before, _)) => before.to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_lists_are_checked() {
        let c = Config::parse(
            br#"{"cache":{"normalize_accept_encoding":["br","gzip"],"normalize_accept_language":["en","de-CH"]}}"#,
        )
        .unwrap();
        assert_eq!(c.cache.normalize_accept_encoding, ["br", "gzip"]);
        for (field, bad) in [
            ("normalize_accept_encoding", r#"["g zip"]"#),
            ("normalize_accept_encoding", r#"["*"]"#),
            ("normalize_accept_language", r#"["en_US"]"#),
            ("normalize_accept_language", r#"["en-"]"#),
            (
                "normalize_accept_language",
                r#"["a","b","c","d","e","f","g","h","i"]"#,
            ),
        ] {
            let json = format!(r#"{{"cache":{{"{field}":{bad}}}}}"#);
            let e = Config::parse(json.as_bytes()).unwrap_err();
            assert_eq!(e.field(), format!("cache.{field}"), "{bad}");
        }
    }

    #[test]
    fn bypass_rules_are_checked() {
        let c = Config::parse(
            br#"{"cache":{"bypass":{"path_prefixes":["/admin"],"headers":["x-debug"],"cookies":["session"]}}}"#,
        )
        .unwrap();
        assert_eq!(c.cache.bypass.cookies, ["session"]);
        for (field, bad) in [
            ("path_prefixes", r#"["admin"]"#),
            ("path_prefixes", r#"["/a b"]"#),
            ("headers", r#"["x y"]"#),
            ("cookies", r#"[""]"#),
        ] {
            let json = format!(r#"{{"cache":{{"bypass":{{"{field}":{bad}}}}}}}"#);
            let e = Config::parse(json.as_bytes()).unwrap_err();
            assert_eq!(e.field(), format!("cache.bypass.{field}"), "{bad}");
        }
        let e = Config::parse(br#"{"cache":{"bypass":{"paths":["/a"]}}}"#).unwrap_err();
        assert_eq!(e.field(), "cache.bypass.paths");
    }

    #[test]
    fn query_rules_are_checked() {
        let c = Config::parse(br#"{"cache":{"query":{"drop":["utm_*","fbclid"],"sort":true}}}"#)
            .unwrap();
        assert!(c.cache.query.is_active());
        assert!(!Config::parse(b"{}").unwrap().cache.query.is_active());
        let e =
            Config::parse(br#"{"cache":{"query":{"drop":["a"],"keep_only":["b"]}}}"#).unwrap_err();
        assert_eq!(e.field(), "cache.query");
        for bad in [
            r#"["*"]"#,
            r#"["a=b"]"#,
            r#"["a&b"]"#,
            r#"["a*b"]"#,
            r#"[""]"#,
        ] {
            let json = format!(r#"{{"cache":{{"query":{{"drop":{bad}}}}}}}"#);
            let e = Config::parse(json.as_bytes()).unwrap_err();
            assert_eq!(e.field(), "cache.query.drop", "{bad}");
        }
    }

    #[test]
    fn key_parts_become_implicit_vary_names() {
        let c = Config::parse(br#"{"cache":{"key_headers":["X-Device"],"key_cookies":["lang"]}}"#)
            .unwrap();
        assert_eq!(c.cache.implicit_vary, ["cookie:lang", "x-device"]);
        assert!(Config::parse(b"{}").unwrap().cache.implicit_vary.is_empty());
        let e = Config::parse(br#"{"cache":{"key_cookies":["a b"]}}"#).unwrap_err();
        assert_eq!(e.field(), "cache.key_cookies");
        let many: Vec<String> = (0..17).map(|i| format!("\"h{i}\"")).collect();
        let json = format!(r#"{{"cache":{{"key_headers":[{}]}}}}"#, many.join(","));
        assert_eq!(
            Config::parse(json.as_bytes()).unwrap_err().field(),
            "cache.key_headers"
        );
    }

    #[test]
    fn upstream_failure_is_warn_or_fail() {
        use crate::health::UpstreamFailure;
        let c = Config::parse(b"{}").unwrap();
        assert_eq!(c.health.upstream_failure, UpstreamFailure::Warn);
        let c = Config::parse(br#"{"health":{"upstream_failure":"fail"}}"#).unwrap();
        assert_eq!(c.health.upstream_failure, UpstreamFailure::Fail);
        let e = Config::parse(br#"{"health":{"upstream_failure":"drain"}}"#).unwrap_err();
        assert_eq!(e.field(), "health.upstream_failure");
    }

    #[test]
    fn targeted_cache_control_names_are_checked() {
        let c = Config::parse(b"{}").unwrap();
        assert_eq!(c.cache.targeted_cache_control, ["cdn-cache-control"]);
        let c = Config::parse(br#"{"cache":{"targeted_cache_control":[]}}"#).unwrap();
        assert!(c.cache.targeted_cache_control.is_empty());
        for bad in [
            r#"["a b"]"#,
            r#"[""]"#,
            r#"["Cache-Control"]"#,
            r#"["a","b","c","d","e","f","g","h","i"]"#,
        ] {
            let json = format!(r#"{{"cache":{{"targeted_cache_control":{bad}}}}}"#);
            let e = Config::parse(json.as_bytes()).unwrap_err();
            assert_eq!(e.field(), "cache.targeted_cache_control", "{bad}");
        }
    }

    #[test]
    fn empty_object_and_empty_input_give_defaults() {
        assert_eq!(Config::parse(b"{}").unwrap(), Config::default());
        assert_eq!(Config::parse(b"").unwrap(), Config::default());
        let d = Config::default();
        assert_eq!(d.cache.max_entries, 4096);
        assert_eq!(d.health.readiness_path, "/readyz");
        assert!(!d.purge.enabled);
    }

    #[test]
    fn partial_sections_keep_other_defaults() {
        let c = Config::parse(br#"{"cache":{"max_entry_bytes":1024}}"#).unwrap();
        assert_eq!(c.cache.max_entry_bytes, 1024);
        assert_eq!(c.cache.max_entries, 4096);
        assert_eq!(c.health, HealthConfig::default());
    }

    #[test]
    fn unknown_field_is_named() {
        let e = Config::parse(br#"{"cache":{"max_entires":3}}"#).unwrap_err();
        assert!(e.problem().contains("max_entires"), "{e}");
        assert_eq!(e.field(), "cache.max_entires");
        let e = Config::parse(br#"{"nope":1}"#).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_field_path() {
        let e = Config::parse(br#"{"cache":{"max_entries":"lots"}}"#).unwrap_err();
        assert_eq!(e.field(), "cache.max_entries");
        assert!(e.problem().contains("invalid type"), "{e}");
        let e = Config::parse(br#"{"cache":{"statuses":[200,"x"]}}"#).unwrap_err();
        assert_eq!(e.field(), "cache.statuses[1]");
    }

    #[test]
    fn a_million_entries_are_accepted() {
        let c = Config::parse(br#"{"cache":{"max_entries":1000000}}"#).unwrap();
        assert_eq!(c.cache.max_entries, 1_000_000);
    }

    #[test]
    fn semantic_checks_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"cache":{"max_entries":0}}"#, "cache.max_entries"),
            (br#"{"cache":{"max_entries":1048577}}"#, "cache.max_entries"),
            (
                br#"{"cache":{"max_total_bytes":10,"max_entry_bytes":20}}"#,
                "cache.max_total_bytes",
            ),
            (br#"{"cache":{"statuses":[206]}}"#, "cache.statuses"),
            (br#"{"cache":{"methods":["POST"]}}"#, "cache.methods"),
            (
                br#"{"cache":{"heuristic_fraction":2}}"#,
                "cache.heuristic_fraction",
            ),
            (
                br#"{"cache":{"refresh_timeout_ms":0}}"#,
                "cache.refresh_timeout_ms",
            ),
            (
                br#"{"health":{"liveness_path":"x"}}"#,
                "health.liveness_path",
            ),
            (
                br#"{"health":{"check_period_ms":5}}"#,
                "health.check_period_ms",
            ),
            (
                br#"{"health":{"cache_warn_ratio":1.5}}"#,
                "health.cache_warn_ratio",
            ),
            (br#"{"purge":{"enabled":true}}"#, "purge.token"),
            (br#"{"purge":{"method":"purge"}}"#, "purge.method"),
        ];
        for (json, field) in cases {
            let e = Config::parse(json).unwrap_err();
            assert_eq!(e.field(), *field, "{}", String::from_utf8_lossy(json));
        }
    }

    #[test]
    fn malformed_json_and_trailing_garbage_are_errors() {
        assert!(Config::parse(b"{").is_err());
        assert!(Config::parse(b"{} x").is_err());
        assert!(Config::parse(b"[]").is_err());
    }

    #[test]
    fn purge_token_from_the_vm_environment() {
        let env = |n: &str| (n == "PURGE_TOKEN").then(|| "from-secret".to_string());
        let json = br#"{"purge":{"enabled":true,"token_env":"PURGE_TOKEN"}}"#;
        let c = Config::parse_with_env(json, env).unwrap();
        assert!(c.purge.token_matches(b"from-secret"));
        let missing = br#"{"purge":{"enabled":true,"token_env":"NOPE"}}"#;
        let e = Config::parse_with_env(missing, env).unwrap_err();
        assert_eq!(e.field(), "purge.token_env");
        assert!(e.problem().contains("NOPE"), "{e}");
        let both = br#"{"purge":{"token":"x","token_env":"PURGE_TOKEN"}}"#;
        assert_eq!(
            Config::parse_with_env(both, env).unwrap_err().field(),
            "purge.token_env"
        );
    }

    #[test]
    fn purge_token_comparison() {
        let p = PurgeConfig {
            token: Some("s3cret".into()),
            ..Default::default()
        };
        assert!(p.token_matches(b"s3cret"));
        assert!(!p.token_matches(b"s3cre"));
        assert!(!p.token_matches(b"s3cretx"));
        assert!(!p.token_matches(b"S3cret"));
        assert!(!p.token_matches(b""));
        assert!(!PurgeConfig::default().token_matches(b""));
    }

    #[test]
    fn authority_defaults_to_cluster() {
        let c = Config::default();
        assert_eq!(c.health.authority(), "upstream");
        let c = Config::parse(br#"{"health":{"upstream_authority":"origin.local"}}"#).unwrap();
        assert_eq!(c.health.authority(), "origin.local");
    }
}
