//! Bypass rules: requests the operator keeps away from the cache (`cache.bypass`).
//!
//! A matching request is neither answered from nor stored in the cache; it goes upstream
//! untouched (`Cache-Status: ...; fwd=bypass; detail=bypass-rule`). Matching only ever takes
//! requests out of the cache, so a rule cannot make two requests share an entry.

use crate::config::BypassConfig;
use crate::field::{values, Field};

/// Whether a request for `path` (with query) and `req` headers matches a rule: a path
/// prefix, a header that is present, or a cookie that is present (RFC 6265 §4.2.1).
pub fn matches<F: Field>(rules: &BypassConfig, path: &[u8], req: &[F]) -> bool {
    if rules
        .path_prefixes
        .iter()
        .any(|p| path.starts_with(p.as_bytes()))
    {
        return true;
    }
    if rules.headers.iter().any(|h| !values(req, h).is_empty()) {
        return true;
    }
    !rules.cookies.is_empty()
        && values(req, "cookie")
            .iter()
            .flat_map(|line| line.split(|&b| b == b';'))
            .filter_map(|pair| pair.trim_ascii().split(|&b| b == b'=').next())
            .any(|name| rules.cookies.iter().any(|c| c.as_bytes() == name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> BypassConfig {
        BypassConfig {
            path_prefixes: vec!["/admin".into(), "/api/private/".into()],
            headers: vec!["x-no-cache".into()],
            cookies: vec!["session".into()],
        }
    }

    #[test]
    fn each_rule_kind_matches() {
        let r = rules();
        let none: &[(&str, &str)] = &[];
        assert!(matches(&r, b"/admin", none));
        assert!(matches(&r, b"/admin/users?x", none));
        assert!(matches(&r, b"/api/private/1", none));
        assert!(!matches(&r, b"/api/public", none));
        assert!(!matches(&r, b"/", none));
        assert!(matches(&r, b"/", &[("X-No-Cache", "")]));
        assert!(matches(&r, b"/", &[("cookie", "a=1; session=abc")]));
        assert!(matches(
            &r,
            b"/",
            &[("cookie", "a=1"), ("cookie", "session=")]
        ));
        assert!(!matches(&r, b"/", &[("cookie", "a=session; sessionid=1")]));
        let obs: [(&[u8], &[u8]); 1] = [(b"cookie", b"\xff\xfe=1; s\xe9ssion=2")];
        assert!(!matches(&r, b"/", &obs));
        assert!(!matches(
            &BypassConfig::default(),
            b"/admin",
            &[("cookie", "session=1")]
        ));
    }
}
