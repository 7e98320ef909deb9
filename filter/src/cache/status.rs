//! The RFC 9211 `Cache-Status` header field.

use super::policy::Forward;
use std::fmt::Write;

/// This cache's identifier in `Cache-Status` (RFC 9211 §2: a token naming the cache).
pub const CACHE_NAME: &str = "edge-filter";

/// One `Cache-Status` member for this cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from the cache (RFC 9211 §2.1), `ttl` seconds of freshness left (§2.7; negative
    /// when a stale response was served).
    Hit {
        /// Freshness left.
        ttl: i64,
        /// Why a stale response was served (§2.8), e.g. `stale-while-revalidate`.
        detail: Option<&'static str>,
    },
    /// Forwarded upstream (§2.2).
    Forward {
        /// Why (§2.2).
        fwd: Forward,
        /// The upstream's status (§2.3), once known.
        fwd_status: Option<u16>,
        /// The response was accepted for storage (§2.5).
        stored: bool,
        /// The request waited for another request's response and was answered from it
        /// (§2.6).
        collapsed: bool,
        /// Freshness left of the response sent, when it came from the cache after all
        /// (revalidated, or stale on error).
        ttl: Option<i64>,
        /// Why it was not stored, or other detail (§2.8).
        detail: Option<&'static str>,
    },
}

impl CacheStatus {
    /// The member, e.g. `edge-filter; fwd=uri-miss; fwd-status=200; stored`.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(64);
        s.push_str(CACHE_NAME);
        match self {
            CacheStatus::Hit { ttl, detail } => {
                let _ = write!(s, "; hit; ttl={ttl}");
                if let Some(d) = detail {
                    let _ = write!(s, "; detail={d}");
                }
            }
            CacheStatus::Forward {
                fwd,
                fwd_status,
                stored,
                collapsed,
                ttl,
                detail,
            } => {
                let _ = write!(s, "; fwd={}", fwd.as_str());
                if let Some(st) = fwd_status {
                    let _ = write!(s, "; fwd-status={st}");
                }
                if let Some(t) = ttl {
                    let _ = write!(s, "; ttl={t}");
                }
                if *stored {
                    s.push_str("; stored");
                }
                if *collapsed {
                    s.push_str("; collapsed");
                }
                if let Some(d) = detail {
                    let _ = write!(s, "; detail={d}");
                }
            }
        }
        s
    }
}

/// Adds the RFC 9211 §2.7 `key` parameter, an sf-string (RFC 8941 §3.3.3): `"` and `\`
/// are escaped, and bytes outside printable ASCII are percent-encoded so that any key can
/// be carried. Meant for debugging: a key can reveal more than an operator wants to show.
pub fn with_key(mut member: String, key: &str) -> String {
    member.push_str("; key=\"");
    for b in key.bytes() {
        match b {
            b'"' | b'\\' => {
                member.push('\\');
                member.push(b as char);
            }
            0x20..=0x7e => member.push(b as char),
            _ => {
                let _ = write!(member, "%{b:02X}");
            }
        }
    }
    member.push('"');
    member
}

/// RFC 9211 §2: members are listed from the origin towards the user, so this cache's member
/// goes after any the upstream sent.
/// The upstream's members are kept byte for byte.
pub fn append<E: AsRef<[u8]>>(existing: &[E], ours: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for e in existing.iter().map(|e| e.as_ref().trim_ascii()) {
        if !e.is_empty() {
            out.extend_from_slice(e);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(ours.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_member() {
        // RFC 9211 §2.1, §2.7
        assert_eq!(
            CacheStatus::Hit {
                ttl: 42,
                detail: None
            }
            .render(),
            "edge-filter; hit; ttl=42"
        );
        let stale = CacheStatus::Hit {
            ttl: -3,
            detail: Some("stale-while-revalidate"),
        };
        assert_eq!(
            stale.render(),
            "edge-filter; hit; ttl=-3; detail=stale-while-revalidate"
        );
    }

    #[test]
    fn forward_members() {
        // RFC 9211 §2.2, §2.3, §2.5, §2.8
        let s = CacheStatus::Forward {
            fwd: Forward::UriMiss,
            fwd_status: Some(200),
            stored: true,
            collapsed: false,
            ttl: None,
            detail: None,
        };
        assert_eq!(
            s.render(),
            "edge-filter; fwd=uri-miss; fwd-status=200; stored"
        );
        let s = CacheStatus::Forward {
            fwd: Forward::Method,
            fwd_status: None,
            stored: false,
            collapsed: false,
            ttl: None,
            detail: Some("no-store"),
        };
        assert_eq!(s.render(), "edge-filter; fwd=method; detail=no-store");
        let s = CacheStatus::Forward {
            fwd: Forward::Stale,
            fwd_status: Some(503),
            stored: false,
            collapsed: false,
            ttl: Some(-4),
            detail: Some("stale-if-error"),
        };
        assert_eq!(
            s.render(),
            "edge-filter; fwd=stale; fwd-status=503; ttl=-4; detail=stale-if-error"
        );
        let s = CacheStatus::Forward {
            fwd: Forward::UriMiss,
            fwd_status: Some(200),
            stored: false,
            collapsed: true,
            ttl: Some(60),
            detail: None,
        };
        assert_eq!(
            s.render(),
            "edge-filter; fwd=uri-miss; fwd-status=200; ttl=60; collapsed"
        );
    }

    #[test]
    fn key_is_an_sf_string() {
        // RFC 9211 §2.7, RFC 8941 §3.3.3
        let m = with_key(
            "edge-filter; hit; ttl=1".into(),
            "http://h/a?q=\"x\"\\\u{e9}",
        );
        assert_eq!(
            m,
            r#"edge-filter; hit; ttl=1; key="http://h/a?q=\"x\"\\%C3%A9""#
        );
    }

    #[test]
    fn appended_after_upstream_members() {
        // RFC 9211 §2: the member closest to the user comes last.
        assert_eq!(
            append(&["origin; hit"], "edge-filter; hit; ttl=1"),
            b"origin; hit, edge-filter; hit; ttl=1"
        );
        assert_eq!(append(&[] as &[&str], "x"), b"x");
        assert_eq!(append(&[" "], "x"), b"x");
        // The upstream's members pass byte for byte, obs-text included.
        assert_eq!(append(&[&b"o; detail=\xff"[..]], "x"), b"o; detail=\xff, x");
    }
}
