//! The cache-key query policy (`cache.query`): marketing and tracking parameters dropped,
//! only named parameters kept, parameters sorted.
//!
//! The rewritten target is what the upstream receives as well as what is keyed: a
//! parameter left out of the key but forwarded could change the answer (an origin that
//! reflects it), and another request would be served that answer. So the policy trades
//! what the origin sees for hits, and says so.

use crate::config::QueryConfig;

/// The target with `rules` applied to its query, or `None` when nothing changes (no
/// rules, no query, or already in that form). Only origin-form targets are rewritten.
pub fn apply(target: &[u8], rules: &QueryConfig) -> Option<Vec<u8>> {
    if !rules.is_active() || !target.starts_with(b"/") {
        return None;
    }
    let q = target.iter().position(|&b| b == b'?')?;
    let (path, query) = (target.get(..q)?, target.get(q + 1..)?);
    let name =
        |p: &[u8]| -> Vec<u8> { p.split(|&b| b == b'=').next().unwrap_or_default().to_vec() };
    let mut params: Vec<&[u8]> = query
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let n = name(p);
            let listed = |list: &[String]| list.iter().any(|pat| matches(pat, &n));
            if rules.keep_only.is_empty() {
                !listed(&rules.drop)
            } else {
                listed(&rules.keep_only)
            }
        })
        .collect();
    if rules.sort {
        // Stable: repeated names keep their order, which can carry meaning.
        params.sort_by_key(|p| name(p));
    }
    let mut out = path.to_vec();
    if !params.is_empty() {
        out.push(b'?');
        out.extend_from_slice(&params.join(&b'&'));
    }
    (out != target).then_some(out)
}

/// A parameter name against a pattern: exact, or a prefix ending in `*` (`utm_*`). Names
/// are compared as sent (no percent-decoding: `utm%5Fsource` is another name, kept and
/// forwarded as it is).
fn matches(pattern: &str, name: &[u8]) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix.as_bytes()),
        None => name == pattern.as_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(drop: &[&str], keep_only: &[&str], sort: bool) -> QueryConfig {
        QueryConfig {
            drop: drop.iter().map(|s| s.to_string()).collect(),
            keep_only: keep_only.iter().map(|s| s.to_string()).collect(),
            sort,
        }
    }

    fn apply_str(t: &str, r: &QueryConfig) -> Option<String> {
        apply(t.as_bytes(), r).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn drop_keep_only_and_sort() {
        let drop = rules(&["utm_*", "fbclid"], &[], false);
        assert_eq!(
            apply_str("/p?utm_source=x&id=1&fbclid=2&utm_medium=y", &drop).as_deref(),
            Some("/p?id=1")
        );
        assert_eq!(apply_str("/p?utm_source=x", &drop).as_deref(), Some("/p"));
        assert_eq!(apply_str("/p?id=1", &drop), None, "unchanged");
        assert_eq!(apply_str("/p", &drop), None);
        assert_eq!(apply_str("/p?utm%5Fsource=x", &drop), None, "no decoding");
        assert_eq!(
            apply_str("/p?fbclid2=1", &drop),
            None,
            "exact names are exact"
        );
        let keep = rules(&[], &["id", "page"], false);
        assert_eq!(
            apply_str("/p?x=1&page=2&id=3&y", &keep).as_deref(),
            Some("/p?page=2&id=3")
        );
        let sort = rules(&[], &[], true);
        assert_eq!(
            apply_str("/p?b=2&a=1&b=1&&c", &sort).as_deref(),
            Some("/p?a=1&b=2&b=1&c")
        );
        assert_eq!(apply_str("/p?a=1&b=2", &sort), None);
        assert_eq!(
            apply_str("/p?b=1", &QueryConfig::default()),
            None,
            "no rules"
        );
        assert_eq!(
            apply_str("http://h/p?utm_a=1", &drop),
            None,
            "origin-form only"
        );
    }

    #[test]
    fn any_bytes_are_safe() {
        let drop = rules(&["utm_*"], &[], true);
        assert_eq!(
            apply(b"/p?\xff=1&utm_x=\xfe&a", &drop),
            Some(b"/p?a&\xff=1".to_vec())
        );
    }
}
