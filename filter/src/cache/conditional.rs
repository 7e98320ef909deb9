//! Conditional requests (RFC 9110 §13) as a cache evaluates them against a stored response
//! (RFC 9111 §4.3.2), and the validators a cache sends when it revalidates (§4.3.1).

use super::freshness::parse_http_date;
use crate::field::{first, values, Field};

/// What a cache does with a request's preconditions, given a stored response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evaluation {
    /// No precondition applies: answer with the stored response.
    Serve,
    /// The condition is false for a GET or HEAD: answer 304 (RFC 9110 §13.1.2, §13.1.3).
    NotModified,
    /// Preconditions meant for the origin (`If-Match`, `If-Unmodified-Since`, RFC 9111
    /// §4.3.2): forward the request instead of answering it.
    Forward,
}

/// One entity-tag (RFC 9110 §8.8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntityTag<'a> {
    /// `W/` prefix.
    pub weak: bool,
    /// The opaque tag, quotes included; bytes, since etagc includes obs-text and two tags
    /// are equal only byte for byte (§8.8.3.2).
    pub opaque: &'a [u8],
}

impl<'a> EntityTag<'a> {
    /// Parses one entity-tag; `None` when malformed.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(s: &'a T) -> Option<EntityTag<'a>> {
        let s = s.as_ref().trim_ascii();
        let (weak, rest) = match s.strip_prefix(b"W/") {
            Some(r) => (true, r),
            None => (false, s),
        };
        let inner = rest.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
        (!inner.contains(&b'"')).then_some(EntityTag { weak, opaque: rest })
    }

    /// Weak comparison (RFC 9110 §8.8.3.2): the opaque tags match, either may be weak.
    pub fn weak_eq(&self, other: &EntityTag<'_>) -> bool {
        self.opaque == other.opaque
    }

    /// Strong comparison: both strong and the same.
    pub fn strong_eq(&self, other: &EntityTag<'_>) -> bool {
        !self.weak && !other.weak && self.opaque == other.opaque
    }
}

/// An `If-None-Match` / `If-Match` value: `*` or a list of entity-tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagList<'a> {
    /// `*`
    Any,
    /// The listed tags (malformed members are skipped).
    Tags(Vec<EntityTag<'a>>),
}

impl<'a> TagList<'a> {
    /// Parses every line of the field (RFC 9110 §5.3 list combination).
    pub fn parse<T: AsRef<[u8]> + ?Sized>(lines: &[&'a T]) -> TagList<'a> {
        let mut tags = Vec::new();
        for line in lines {
            let line: &'a [u8] = (*line).as_ref();
            if line.trim_ascii() == b"*" {
                return TagList::Any;
            }
            // Entity-tags cannot contain quotes inside; each pair of quotes is one tag.
            let mut rest = line;
            while let Some(start) = rest.iter().position(|&b| b == b'"') {
                let (prefix, quoted) = rest.split_at(start);
                let weak = prefix.trim_ascii_end().ends_with(b"W/");
                let Some(end) = quoted.iter().skip(1).position(|&b| b == b'"') else {
                    break;
                };
                let (opaque, after) = quoted.split_at(end + 2);
                tags.push(EntityTag { weak, opaque });
                rest = after;
            }
        }
        TagList::Tags(tags)
    }

    /// Weak-matches `tag` (RFC 9110 §13.1.2: If-None-Match uses weak comparison).
    pub fn weak_matches(&self, tag: Option<&EntityTag<'_>>) -> bool {
        match self {
            TagList::Any => true,
            TagList::Tags(tags) => tag.is_some_and(|t| tags.iter().any(|x| x.weak_eq(t))),
        }
    }
}

/// Whether the request carries any precondition.
pub fn is_conditional<F: Field>(req: &[F]) -> bool {
    [
        "if-none-match",
        "if-modified-since",
        "if-match",
        "if-unmodified-since",
        "if-range",
    ]
    .iter()
    .any(|n| crate::field::has(req, n))
}

/// RFC 9110 §13.2.2 precedence, as RFC 9111 §4.3.2 has a cache apply it to a GET or HEAD
/// answered from `stored` (its header fields), received at `response_time` (Unix seconds).
pub fn evaluate<R: Field, S: Field>(req: &[R], stored: &[S], response_time: u64) -> Evaluation {
    // Steps 1-2: origin-only preconditions.
    if !values(req, "if-match").is_empty() || !values(req, "if-unmodified-since").is_empty() {
        return Evaluation::Forward;
    }
    let stored_value = |name: &str| first(stored, name);
    // Step 3: If-None-Match, weak comparison.
    let inm = values(req, "if-none-match");
    if !inm.is_empty() {
        let etag = stored_value("etag").and_then(EntityTag::parse);
        return if TagList::parse(&inm).weak_matches(etag.as_ref()) {
            Evaluation::NotModified
        } else {
            Evaluation::Serve
        };
    }
    // Step 4: If-Modified-Since, only when If-None-Match is absent; an invalid date is
    // ignored (§13.1.3). The stored Last-Modified, else Date, else receipt time (RFC 9111
    // §4.3.2).
    if let [ims] = values(req, "if-modified-since").as_slice() {
        if let Some(ims) = parse_http_date(ims) {
            let modified = stored_value("last-modified")
                .and_then(parse_http_date)
                .or_else(|| stored_value("date").and_then(parse_http_date))
                .unwrap_or(response_time);
            if modified <= ims {
                return Evaluation::NotModified;
            }
        }
    }
    Evaluation::Serve
}

/// Fields a 304 carries (RFC 9110 §15.4.5): those a 200 would have had among
/// `Cache-Control`, `Content-Location`, `Date`, `ETag`, `Expires` and `Vary`.
pub fn not_modified_headers<'a>(stored: &[(&'a [u8], &'a [u8])]) -> Vec<(&'a [u8], &'a [u8])> {
    stored
        .iter()
        .filter(|(n, _)| {
            matches!(
                *n,
                b"cache-control" | b"content-location" | b"date" | b"etag" | b"expires" | b"vary"
            )
        })
        .copied()
        .collect()
}

/// The validators for revalidating `stored` (RFC 9111 §4.3.1): `If-None-Match` with its
/// entity-tag and `If-Modified-Since` with its `Last-Modified`, whichever exist.
pub fn validators<'a>(stored: &[(&'a [u8], &'a [u8])]) -> Vec<(&'static str, &'a [u8])> {
    let mut out = Vec::new();
    for (n, v) in stored {
        match *n {
            b"etag" if EntityTag::parse(v).is_some() => out.push(("if-none-match", *v)),
            b"last-modified" if parse_http_date(v).is_some() => out.push(("if-modified-since", *v)),
            _ => {}
        }
    }
    out
}

/// RFC 9111 §4.3.4: does a 304 select this stored response? A validator in the 304 must
/// match the stored one; a 304 with none selects a stored response that has none either.
pub fn selects<N: Field, S: Field>(not_modified: &[N], stored: &[S]) -> bool {
    let stored_value = |name: &str| first(stored, name);
    let new_etag = values(not_modified, "etag")
        .first()
        .and_then(|v| EntityTag::parse(*v));
    let old_etag = stored_value("etag").and_then(EntityTag::parse);
    if let Some(new) = new_etag {
        return old_etag.is_some_and(|old| old.weak_eq(&new));
    }
    let new_lm = values(not_modified, "last-modified")
        .first()
        .and_then(parse_http_date);
    let old_lm = stored_value("last-modified").and_then(parse_http_date);
    match (new_lm, old_lm) {
        (Some(n), Some(o)) => n == o,
        (Some(_), None) => false,
        // No validator in the 304: it can only be about the response we asked about.
        (None, _) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::byte_pairs;

    fn h(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    const STORED: &[(&str, &str)] = &[
        ("etag", "\"v1\""),
        ("last-modified", "Sat, 28 Nov 2026 10:00:00 GMT"),
        ("cache-control", "max-age=60"),
        ("content-type", "text/plain"),
    ];

    #[test]
    fn entity_tag_comparison() {
        // RFC 9110 §8.8.3.2 table.
        let w1 = EntityTag::parse("W/\"1\"").unwrap();
        let w2 = EntityTag::parse("W/\"2\"").unwrap();
        let s1 = EntityTag::parse("\"1\"").unwrap();
        assert!(!w1.strong_eq(&w1) && w1.weak_eq(&w1));
        assert!(!w1.weak_eq(&w2));
        assert!(!w1.strong_eq(&s1) && w1.weak_eq(&s1));
        assert!(s1.strong_eq(&s1));
        assert_eq!(EntityTag::parse("1"), None);
        assert_eq!(EntityTag::parse("\"a\"b\""), None);
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        // RFC 9110 §13.1.2
        let r = |v: &str| evaluate(&h(&[("if-none-match", v)]), STORED, 0);
        assert_eq!(r("\"v1\""), Evaluation::NotModified);
        assert_eq!(r("W/\"v1\""), Evaluation::NotModified);
        assert_eq!(r("\"x\", \"v1\""), Evaluation::NotModified);
        assert_eq!(r("\"x\""), Evaluation::Serve);
        assert_eq!(r("*"), Evaluation::NotModified);
    }

    #[test]
    fn if_none_match_takes_precedence_over_if_modified_since() {
        // RFC 9110 §13.2.2 step 3 before step 4.
        let req = h(&[
            ("if-none-match", "\"other\""),
            ("if-modified-since", "Sat, 28 Nov 2026 11:00:00 GMT"),
        ]);
        assert_eq!(evaluate(&req, STORED, 0), Evaluation::Serve);
    }

    #[test]
    fn if_modified_since() {
        // RFC 9110 §13.1.3; RFC 9111 §4.3.2 fallbacks.
        let r = |v: &str, stored: &[(&str, &str)]| {
            evaluate(&h(&[("if-modified-since", v)]), stored, 1_764_324_000)
        };
        assert_eq!(
            r("Sat, 28 Nov 2026 10:00:00 GMT", STORED),
            Evaluation::NotModified
        );
        assert_eq!(
            r("Sat, 28 Nov 2026 09:59:59 GMT", STORED),
            Evaluation::Serve
        );
        assert_eq!(r("not a date", STORED), Evaluation::Serve);
        // No Last-Modified: the Date, then the receipt time.
        let dated: &[(&str, &str)] = &[("date", "Sat, 28 Nov 2026 10:00:00 GMT")];
        assert_eq!(
            r("Sat, 28 Nov 2026 10:00:00 GMT", dated),
            Evaluation::NotModified
        );
        assert_eq!(r("Thu, 01 Jan 1970 00:00:00 GMT", &[]), Evaluation::Serve);
    }

    #[test]
    fn origin_preconditions_are_forwarded() {
        // RFC 9111 §4.3.2: If-Match and If-Unmodified-Since are not for caches.
        assert_eq!(
            evaluate(&h(&[("if-match", "\"v1\"")]), STORED, 0),
            Evaluation::Forward
        );
        let ius = h(&[("if-unmodified-since", "Sat, 28 Nov 2026 10:00:00 GMT")]);
        assert_eq!(evaluate(&ius, STORED, 0), Evaluation::Forward);
        assert!(is_conditional(&ius));
        assert!(!is_conditional(&h(&[("accept", "*/*")])));
    }

    #[test]
    fn not_modified_keeps_the_listed_fields() {
        // RFC 9110 §15.4.5
        let names: Vec<&[u8]> = not_modified_headers(&byte_pairs(STORED))
            .iter()
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(names, [&b"etag"[..], b"cache-control"]);
    }

    #[test]
    fn revalidation_sends_both_validators() {
        // RFC 9111 §4.3.1
        let stored = byte_pairs(STORED);
        let v = validators(&stored);
        assert_eq!(
            v,
            [
                ("if-none-match", &b"\"v1\""[..]),
                ("if-modified-since", b"Sat, 28 Nov 2026 10:00:00 GMT")
            ]
        );
        assert!(validators(&byte_pairs(&[("etag", "bad")])).is_empty());
    }

    #[test]
    fn a_304_selects_the_matching_stored_response() {
        // RFC 9111 §4.3.4
        assert!(selects(&h(&[("etag", "\"v1\"")]), STORED));
        assert!(selects(&h(&[("etag", "W/\"v1\"")]), STORED));
        assert!(!selects(&h(&[("etag", "\"v2\"")]), STORED));
        assert!(selects(&h(&[]), STORED));
        assert!(selects(
            &h(&[("last-modified", "Sat, 28 Nov 2026 10:00:00 GMT")]),
            STORED
        ));
        assert!(!selects(
            &h(&[("last-modified", "Sat, 28 Nov 2026 10:00:01 GMT")]),
            STORED
        ));
    }
}
