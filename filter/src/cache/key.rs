//! Cache keys (RFC 9111 §2: the primary key is the request method and target URI; only GET is
//! stored, so the key is the normalised URI).
//!
//! Normalisation follows RFC 3986 §6.2.2 and RFC 9110 §4.2.3: scheme and host are lower-cased,
//! the scheme's default port is dropped, percent-encodings of unreserved characters are decoded
//! and the rest upper-cased, dot-segments are removed, and an empty path becomes `/`. The query
//! is kept in order (reordering parameters can change meaning); the fragment never reaches a
//! proxy but is dropped if present.

use std::borrow::Cow;
use std::fmt;

/// Longest key accepted; longer targets bypass the cache rather than grow the store.
pub const MAX_KEY_BYTES: usize = 8 * 1024;

/// Why a request target cannot be keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// Longer than [`MAX_KEY_BYTES`].
    TooLong,
    /// Missing or malformed `:scheme`, `:authority` or `:path`.
    Malformed,
}

impl KeyError {
    /// Label for logs and `Cache-Status` details.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyError::TooLong => "key-too-long",
            KeyError::Malformed => "bad-target",
        }
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A normalised primary cache key, `scheme://authority/path?query`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    /// Builds the key from the request pseudo-headers.
    pub fn new(scheme: &str, authority: &str, path: &str) -> Result<CacheKey, KeyError> {
        if scheme.len() + authority.len() + path.len() + 3 > MAX_KEY_BYTES {
            return Err(KeyError::TooLong);
        }
        let scheme = scheme.to_ascii_lowercase();
        if scheme.is_empty()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.')
        {
            return Err(KeyError::Malformed);
        }
        let authority = normalize_authority(&scheme, authority)?;
        let path = path.split('#').next().unwrap_or("");
        let (p, q) = match path.find('?') {
            Some(i) => (&path[..i], Some(&path[i + 1..])),
            None => (path, None),
        };
        // Asterisk-form and authority-form targets are never cacheable GETs.
        if !p.is_empty() && !p.starts_with('/') {
            return Err(KeyError::Malformed);
        }
        let mut out = String::with_capacity(scheme.len() + authority.len() + path.len() + 3);
        out.push_str(&scheme);
        out.push_str("://");
        out.push_str(&authority);
        let p = normalize_pct(p)?;
        let p = remove_dot_segments(&p);
        out.push_str(if p.is_empty() { "/" } else { &p });
        if let Some(q) = q {
            out.push('?');
            out.push_str(&normalize_pct(q)?);
        }
        Ok(CacheKey(out))
    }

    /// Wraps an already normalised key (read back from the store).
    pub fn from_normalized(s: String) -> CacheKey {
        CacheKey(s)
    }

    /// The key text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Stable 64-bit hash, the same in every worker's VM.
    pub fn hash64(&self) -> u64 {
        hash64(self.0.as_bytes())
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// FNV-1a, 64-bit, with a final avalanche so that low bits are usable. Not keyed: the store
/// verifies the full key on every read, so a collision costs a miss, never a wrong answer.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64 finaliser
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn normalize_authority(scheme: &str, authority: &str) -> Result<String, KeyError> {
    // userinfo is deprecated in http(s) URIs (RFC 9110 §4.2.4) and never part of a key.
    let host_port = authority.rsplit('@').next().unwrap_or("");
    if host_port.is_empty()
        || host_port
            .bytes()
            .any(|b| b <= b' ' || b == 0x7f || b == b'/' || b == b'?' || b == b'#')
    {
        return Err(KeyError::Malformed);
    }
    let a = host_port.to_ascii_lowercase();
    // Split a port that follows the host (an IPv6 literal ends with ']').
    let (mut host, port) = match a.rfind(':') {
        Some(colon) if !a[colon..].contains(']') => (a[..colon].to_string(), &a[colon + 1..]),
        _ => (a.clone(), ""),
    };
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(KeyError::Malformed);
    }
    // A trailing dot names the same host (RFC 1034 §3.1).
    if host.ends_with('.') && host.len() > 1 {
        host.pop();
    }
    // RFC 9110 §4.2.1: an http(s) URI with an empty host is invalid; a colon in a host
    // that is not a bracketed IPv6 literal is not a host either.
    if host.is_empty() || (!host.starts_with('[') && host.contains(':')) {
        return Err(KeyError::Malformed);
    }
    let default = matches!((scheme, port), ("http", "80") | ("https", "443"));
    if !port.is_empty() && !default {
        host.push(':');
        host.push_str(port);
    }
    Ok(host)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §6.2.2.1-2: decode %XX of unreserved characters, upper-case the other hex digits.
/// Most targets have no `%` at all: those are returned as they are, without a copy.
fn normalize_pct(s: &str) -> Result<Cow<'_, str>, KeyError> {
    if !s.contains('%') {
        return Ok(Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(KeyError::Malformed)?;
            let v = hex_val(hex[0])
                .zip(hex_val(hex[1]))
                .map(|(h, l)| h << 4 | l)
                .ok_or(KeyError::Malformed)?;
            if is_unreserved(v) {
                out.push(v);
            } else {
                out.push(b'%');
                out.push(hex[0].to_ascii_uppercase());
                out.push(hex[1].to_ascii_uppercase());
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    // Only ASCII was pushed or copied from a &str, so this is valid UTF-8.
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| KeyError::Malformed)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §5.2.4, on an absolute path.
fn remove_dot_segments(path: &str) -> Cow<'_, str> {
    if !path.contains("/.") {
        return Cow::Borrowed(path);
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut r = String::with_capacity(path.len());
    for s in &out {
        r.push('/');
        r.push_str(s);
    }
    if trailing_slash || r.is_empty() {
        r.push('/');
    }
    Cow::Owned(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(scheme: &str, auth: &str, path: &str) -> String {
        CacheKey::new(scheme, auth, path).unwrap().0
    }

    #[test]
    fn scheme_and_host_are_case_normalised_and_default_port_dropped() {
        // RFC 3986 §6.2.2.1, RFC 9110 §4.2.3
        assert_eq!(k("HTTP", "Example.COM:80", "/a"), "http://example.com/a");
        assert_eq!(k("https", "example.com:443", "/a"), "https://example.com/a");
        assert_eq!(
            k("http", "example.com:8080", "/a"),
            "http://example.com:8080/a"
        );
        assert_eq!(k("http", "example.com:", "/a"), "http://example.com/a");
        assert_eq!(k("http", "example.com.", "/a"), "http://example.com/a");
        assert_eq!(k("http", "[::1]:80", "/"), "http://[::1]/");
        assert_eq!(k("http", "[::1]", "/"), "http://[::1]/");
    }

    #[test]
    fn path_case_is_preserved() {
        assert_ne!(k("http", "h", "/A"), k("http", "h", "/a"));
    }

    #[test]
    fn percent_encoding_is_normalised() {
        // RFC 3986 §6.2.2.2
        assert_eq!(k("http", "h", "/%7euser/%41"), "http://h/~user/A");
        assert_eq!(k("http", "h", "/a%2fb"), "http://h/a%2Fb");
        assert_eq!(k("http", "h", "/?q=%2a"), "http://h/?q=%2A");
        assert_eq!(CacheKey::new("http", "h", "/%zz"), Err(KeyError::Malformed));
        assert_eq!(CacheKey::new("http", "h", "/%4"), Err(KeyError::Malformed));
    }

    #[test]
    fn dot_segments_are_removed() {
        // RFC 3986 §5.2.4, §6.2.2.3
        assert_eq!(k("http", "h", "/a/./b/../c"), "http://h/a/c");
        assert_eq!(k("http", "h", "/a/.."), "http://h/");
        assert_eq!(k("http", "h", "/../../x"), "http://h/x");
        assert_eq!(k("http", "h", "/a/b/."), "http://h/a/b/");
        assert_eq!(k("http", "h", "/a/%2E%2E/b"), "http://h/b");
    }

    #[test]
    fn empty_path_is_slash_and_query_order_kept() {
        assert_eq!(k("http", "h", ""), "http://h/");
        assert_eq!(k("http", "h", "?b=1&a=2"), "http://h/?b=1&a=2");
        assert_ne!(k("http", "h", "/?a=1&b=2"), k("http", "h", "/?b=2&a=1"));
        // An empty query is distinct from none (RFC 3986 §6.2.3 allows either; be exact).
        assert_ne!(k("http", "h", "/?"), k("http", "h", "/"));
    }

    #[test]
    fn fragment_and_userinfo_are_dropped() {
        assert_eq!(k("http", "u:p@h", "/a#frag"), "http://h/a");
    }

    #[test]
    fn hostile_targets_are_rejected_not_panicking() {
        assert_eq!(CacheKey::new("http", "", "/"), Err(KeyError::Malformed));
        assert_eq!(CacheKey::new("http", "h h", "/"), Err(KeyError::Malformed));
        assert_eq!(CacheKey::new("http", "h:8x", "/"), Err(KeyError::Malformed));
        // Found by the fuzzer: a port without a host.
        assert_eq!(CacheKey::new("a", ":", ""), Err(KeyError::Malformed));
        assert_eq!(CacheKey::new("http", ":80", "/"), Err(KeyError::Malformed));
        assert_eq!(CacheKey::new("+", "a::", "?"), Err(KeyError::Malformed));
        assert_eq!(CacheKey::new("", "h", "/"), Err(KeyError::Malformed));
        assert_eq!(CacheKey::new("http", "h", "*"), Err(KeyError::Malformed));
        let long = format!("/{}", "a".repeat(MAX_KEY_BYTES));
        assert_eq!(CacheKey::new("http", "h", &long), Err(KeyError::TooLong));
        assert!(CacheKey::new("http", "h", "/\u{e9}t\u{e9}").is_ok());
    }

    #[test]
    fn hash_is_stable_and_spreads() {
        assert_eq!(hash64(b"abc"), hash64(b"abc"));
        assert_ne!(hash64(b"abc"), hash64(b"abd"));
        // Low bits spread: 4096 keys fill all 64 buckets of the low 6 bits.
        let mut seen = [false; 64];
        for i in 0..4096 {
            seen[(hash64(format!("http://h/{i}").as_bytes()) & 63) as usize] = true;
        }
        assert!(seen.iter().all(|&b| b));
    }
}
