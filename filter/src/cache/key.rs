//! Cache keys (RFC 9111 §2: the primary key is the request method and target URI; only GET is
//! stored, so the key is the URI).
//!
//! The key is what the proxy forwards, not what the URI means: a stored answer may only be
//! reused for a request the upstream would have received with the same target and Host.
//! So the path and query are kept byte for byte (no percent-decoding, no dot-segment
//! removal: an origin may treat `/%68ello` and `/hello` differently). Only what no origin
//! can tell apart is normalised (RFC 9110 §4.2.3): scheme and host case, and the scheme's
//! default port. Anything odd in the authority (userinfo, an empty or non-numeric port,
//! bytes a host cannot have) or a target that is not origin-form is refused: the request
//! is forwarded uncached.

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
    /// Builds the key from the request pseudo-headers, as bytes from the wire.
    pub fn new(
        scheme: impl AsRef<[u8]>,
        authority: impl AsRef<[u8]>,
        path: impl AsRef<[u8]>,
    ) -> Result<CacheKey, KeyError> {
        let (scheme, authority, path) = (scheme.as_ref(), authority.as_ref(), path.as_ref());
        if scheme.len() + authority.len() + path.len() + 3 > MAX_KEY_BYTES {
            return Err(KeyError::TooLong);
        }
        if scheme.is_empty()
            || !scheme
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.')
        {
            return Err(KeyError::Malformed);
        }
        let scheme = scheme.to_ascii_lowercase();
        // Origin-form only (RFC 9112 §3.2.1): absolute-form, authority-form and asterisk-form
        // targets are never cacheable GETs here, and the host they name may not be the Host
        // the upstream gets. Visible ASCII only: a proxy that forwards other bytes is
        // forwarding something no URI grammar describes.
        if !path.starts_with(b"/") || !path.iter().all(|&b| (0x21..0x7f).contains(&b)) {
            return Err(KeyError::Malformed);
        }
        let mut out = Vec::with_capacity(scheme.len() + authority.len() + path.len() + 3);
        out.extend_from_slice(&scheme);
        out.extend_from_slice(b"://");
        push_authority(&mut out, &scheme, authority)?;
        out.extend_from_slice(path);
        // Every byte pushed is visible ASCII, checked above.
        String::from_utf8(out)
            .map(CacheKey)
            .map_err(|_| KeyError::Malformed)
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

/// RFC 3986 §3.2.2 host characters (reg-name, IP literals and their brackets); `@`
/// (userinfo, deprecated by RFC 9110 §4.2.4) is not one: `a@b` must not key as `b`.
fn is_host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%[]:".contains(&b)
}

/// Lower-cased host, then `:port` unless it is the scheme's default.
fn push_authority(out: &mut Vec<u8>, scheme: &[u8], authority: &[u8]) -> Result<(), KeyError> {
    if authority.is_empty() || !authority.iter().all(|&b| is_host_byte(b)) {
        return Err(KeyError::Malformed);
    }
    // A port follows the last colon, unless that colon is inside an IPv6 literal.
    let colon = authority.iter().rposition(|&b| b == b':');
    let (host, port) = match colon.map(|c| authority.split_at(c)) {
        Some((h, p)) if !p.contains(&b']') => (h, p.strip_prefix(b":")),
        _ => (authority, None),
    };
    // RFC 9110 §4.2.1: an http(s) URI with an empty host is invalid; a colon or bracket in
    // a host that is not one bracketed IP literal is not a host either.
    let bad = match host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) {
        Some(literal) => literal.iter().any(|&b| matches!(b, b'[' | b']')),
        None => host.is_empty() || host.iter().any(|&b| matches!(b, b':' | b'[' | b']')),
    };
    if bad {
        return Err(KeyError::Malformed);
    }
    out.extend(host.iter().map(u8::to_ascii_lowercase));
    if let Some(port) = port {
        // An empty port is legal but odd (RFC 3986 §3.2.3); the Host the upstream gets
        // still has the colon, so it is refused rather than folded into the default.
        if port.is_empty() || port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
            return Err(KeyError::Malformed);
        }
        let default = matches!((scheme, port), (b"http", b"80") | (b"https", b"443"));
        if !default {
            out.push(b':');
            out.extend_from_slice(port);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(scheme: &str, auth: &str, path: &str) -> String {
        CacheKey::new(scheme, auth, path).unwrap().0
    }

    #[test]
    fn scheme_and_host_are_case_normalised_and_default_port_dropped() {
        // RFC 3986 §6.2.2.1, RFC 9110 §4.2.3: no origin can tell these apart.
        assert_eq!(k("HTTP", "Example.COM:80", "/a"), "http://example.com/a");
        assert_eq!(k("https", "example.com:443", "/a"), "https://example.com/a");
        assert_eq!(
            k("https", "example.com:80", "/a"),
            "https://example.com:80/a"
        );
        assert_eq!(
            k("http", "example.com:8080", "/a"),
            "http://example.com:8080/a"
        );
        assert_eq!(k("http", "[::1]:80", "/"), "http://[::1]/");
        assert_eq!(k("http", "[::1]", "/"), "http://[::1]/");
        assert_eq!(k("http", "[::1]:8080", "/"), "http://[::1]:8080/");
    }

    #[test]
    fn path_and_query_are_kept_byte_for_byte() {
        // The key is what the upstream receives: an origin may answer each differently.
        let distinct = [
            "/hello",
            "/%68ello",
            "/%68%65llo",
            "/a%2fb",
            "/a%2Fb",
            "/a/b",
            "/x/../hello",
            "/./hello",
            "//hello",
            "/hello/",
            "/hello?",
            "/hello?a=1&b=2",
            "/hello?b=2&a=1",
            "/Hello",
            "/hello#f",
        ];
        let keys: Vec<String> = distinct.iter().map(|p| k("http", "h", p)).collect();
        for (i, a) in keys.iter().enumerate() {
            assert_eq!(a, &format!("http://h{}", distinct[i]));
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn host_variants_the_upstream_sees_differently_are_refused_or_distinct() {
        // A trailing dot is another Host to a virtual-hosting origin.
        assert_ne!(k("http", "h.test.", "/"), k("http", "h.test", "/"));
        for bad in [
            "u@h.test",
            "u:p@h.test",
            "h.test:",
            "h.test:x",
            "h.test:80x",
            "h.test:123456",
            "h.test:80:80",
            "h test",
            "h.test/x",
            "h.test?",
            "[::1",
            "::1",
            "[::1]x",
            "",
            ":80",
        ] {
            assert_eq!(
                CacheKey::new("http", bad, "/"),
                Err(KeyError::Malformed),
                "{bad}"
            );
        }
        assert_eq!(
            CacheKey::new("http", b"h\xff.test", "/"),
            Err(KeyError::Malformed)
        );
    }

    #[test]
    fn only_origin_form_targets_are_keyed() {
        for bad in ["", "?a", "*", "http://h/a", "h:80", "a/b"] {
            assert_eq!(
                CacheKey::new("http", "h", bad),
                Err(KeyError::Malformed),
                "{bad}"
            );
        }
        for bad in [&b"/a b"[..], b"/\xe9", b"/a\x00", b"/a\x7f", b"/a\tb"] {
            assert_eq!(CacheKey::new("http", "h", bad), Err(KeyError::Malformed));
        }
    }

    #[test]
    fn hostile_targets_are_rejected_not_panicking() {
        assert_eq!(CacheKey::new("http", "h:8x", "/"), Err(KeyError::Malformed));
        // Found by the fuzzer: a port without a host.
        assert_eq!(CacheKey::new("a", ":", "/"), Err(KeyError::Malformed));
        assert_eq!(CacheKey::new("+", "a::", "/"), Err(KeyError::Malformed));
        assert_eq!(CacheKey::new("", "h", "/"), Err(KeyError::Malformed));
        assert_eq!(CacheKey::new("ht tp", "h", "/"), Err(KeyError::Malformed));
        let long = format!("/{}", "a".repeat(MAX_KEY_BYTES));
        assert_eq!(CacheKey::new("http", "h", &long), Err(KeyError::TooLong));
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
