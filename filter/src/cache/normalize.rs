//! Request header normalisation before a variant is chosen (RFC 9111 §4.1 lets a cache
//! normalise values "in a way that is known to have identical semantics").
//!
//! A browser population sends thousands of distinct `Accept-Encoding` and
//! `Accept-Language` values, and each would be its own variant of a `Vary` response. The
//! operator lists what the origin actually uses; the request is reduced to that before the
//! lookup, and the reduced value is what the upstream receives, so the cache key stays what
//! is forwarded.

/// `Accept-Encoding` reduced to the `codings` the origin uses (in that order) that the
/// request accepts (RFC 9110 §12.5.3: q > 0, `*` covering codings not named), joined by
/// `", "`; `identity` when it accepts none of them.
pub fn accept_encoding(value: &str, codings: &[String]) -> String {
    let prefs = weighted(value);
    let q_of = |coding: &str| {
        prefs
            .iter()
            .find(|(c, _)| c.eq_ignore_ascii_case(coding))
            .or_else(|| prefs.iter().find(|(c, _)| c == "*"))
            .map_or(0, |(_, q)| *q)
    };
    let accepted: Vec<&str> = codings
        .iter()
        .filter(|c| q_of(c) > 0)
        .map(String::as_str)
        .collect();
    if accepted.is_empty() {
        "identity".to_string()
    } else {
        accepted.join(", ")
    }
}

/// `Accept-Language` reduced to the one of `languages` the request prefers (RFC 4647 §3.4
/// lookup, by q-value then order: a range matches a tag equal to it, one it is a prefix of
/// at a `-`, or one that is a prefix of it; `*` matches the first), else the first of
/// `languages`, the origin's default.
pub fn accept_language(value: &str, languages: &[String]) -> String {
    let mut prefs = weighted(value);
    // Stable: equal weights keep the client's order.
    prefs.sort_by_key(|p| std::cmp::Reverse(p.1));
    let matches = |range: &str, tag: &str| {
        let (r, t) = (range.to_ascii_lowercase(), tag.to_ascii_lowercase());
        r == "*"
            || r == t
            || t.strip_prefix(&r).is_some_and(|rest| rest.starts_with('-'))
            || r.strip_prefix(&t).is_some_and(|rest| rest.starts_with('-'))
    };
    prefs
        .iter()
        .filter(|(_, q)| *q > 0)
        .find_map(|(range, _)| languages.iter().find(|l| matches(range, l)))
        .or_else(|| languages.first())
        .cloned()
        .unwrap_or_default()
}

/// The members of a `#( token [ weight ] )` list with their q-values in thousandths
/// (RFC 9110 §12.4.2); a malformed weight counts as 0 (not acceptable).
fn weighted(value: &str) -> Vec<(String, u16)> {
    value
        .split(',')
        .filter_map(|item| {
            let mut parts = item.split(';').map(str::trim);
            let name = parts.next().filter(|n| !n.is_empty())?;
            let mut q = 1000;
            for p in parts {
                if let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                    q = qvalue(v).unwrap_or(0);
                }
            }
            Some((name.to_string(), q))
        })
        .collect()
}

/// `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`, in thousandths.
fn qvalue(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac_value = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    match int {
        "0" => Some(frac_value),
        "1" if frac_value == 0 => Some(1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn accept_encoding_keeps_the_origins_codings_the_client_accepts() {
        let origin = list(&["br", "gzip"]);
        let ae = |v: &str| accept_encoding(v, &origin);
        assert_eq!(ae("gzip, deflate"), "gzip");
        assert_eq!(ae("deflate, GZIP;q=0.5"), "gzip");
        assert_eq!(ae("gzip, deflate, br, zstd"), "br, gzip");
        assert_eq!(ae("br;q=1.0, gzip;q=0.8, *;q=0.1"), "br, gzip");
        assert_eq!(ae("*"), "br, gzip");
        assert_eq!(ae("*, br;q=0"), "gzip", "an explicit q=0 excludes");
        assert_eq!(ae("gzip;q=0, deflate"), "identity");
        assert_eq!(ae(""), "identity");
        assert_eq!(
            ae("gzip;q=2"),
            "identity",
            "an invalid weight is not acceptable"
        );
        assert_eq!(ae("gzip;q=0.001"), "gzip");
    }

    #[test]
    fn accept_language_picks_one_supported_language() {
        let origin = list(&["en", "fr", "de-CH"]);
        let al = |v: &str| accept_language(v, &origin);
        assert_eq!(al("en-US,en;q=0.9"), "en");
        assert_eq!(al("fr-CA, en;q=0.5"), "fr");
        assert_eq!(al("en;q=0.5, fr;q=0.8"), "fr", "by weight, not order");
        assert_eq!(al("de"), "de-CH", "a range matches the tags it prefixes");
        assert_eq!(
            al("it, ja"),
            "en",
            "nothing supported: the origin's default"
        );
        assert_eq!(al("fr;q=0, *"), "en");
        assert_eq!(al("\u{fffd}"), "en");
    }

    #[test]
    fn qvalues() {
        assert_eq!(qvalue("1"), Some(1000));
        assert_eq!(qvalue("1.000"), Some(1000));
        assert_eq!(qvalue("0.5"), Some(500));
        assert_eq!(qvalue("0.05"), Some(50));
        assert_eq!(qvalue("0"), Some(0));
        for bad in ["1.5", "2", "0.0001", "-1", "", "0.x"] {
            assert_eq!(qvalue(bad), None, "{bad}");
        }
    }
}
