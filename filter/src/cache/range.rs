//! Range requests answered from a stored response (RFC 9110 §14).
//!
//! A stored complete 200 answers one satisfiable `bytes` range with a 206 and
//! `Content-Range`, and a request whose ranges are all unsatisfiable with a 416 and
//! `Content-Range: bytes */<length>`. Several satisfiable ranges get the whole 200: a server
//! may ignore `Range` (§14.2), and that keeps multipart/byteranges out of the filter.
//! `If-Range` (§13.1.5) must match the stored strong validator, or the whole 200 is sent.

use super::conditional::EntityTag;
use super::freshness::parse_http_date;
use crate::field::{first, values, Field};

/// Most ranges one `Range` header may list before it is ignored (§14.2 lets a server ignore
/// many small or overlapping ranges, a denial-of-service pattern).
const MAX_RANGES: usize = 32;

/// How to answer a GET from a stored response of `len` body bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The whole response, as stored.
    Full,
    /// 206 with bytes `first..=last`.
    Partial {
        /// First byte.
        first: u64,
        /// Last byte, inclusive.
        last: u64,
    },
    /// 416: no range overlaps the body.
    Unsatisfiable,
}

impl Answer {
    /// The `Content-Range` value for a 206 or 416 (RFC 9110 §14.4).
    pub fn content_range(self, len: u64) -> Option<String> {
        match self {
            Answer::Full => None,
            Answer::Partial { first, last } => Some(format!("bytes {first}-{last}/{len}")),
            Answer::Unsatisfiable => Some(format!("bytes */{len}")),
        }
    }
}

/// One `range-spec` of a `bytes` range (§14.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spec {
    /// `first-` or `first-last`.
    From { first: u64, last: Option<u64> },
    /// `-suffix`: the last `suffix` bytes.
    Suffix(u64),
}

/// The request's byte ranges; `None` when there is no usable `Range` (absent, another
/// unit, invalid syntax, too many ranges: all mean "ignore it", §14.2).
fn parse(value: &[u8]) -> Option<Vec<Spec>> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (unit, set) = value.split_once('=')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = Vec::new();
    for item in set.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (a, b) = item.split_once('-')?;
        let num = |s: &str| -> Option<u64> {
            (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        let spec = if a.is_empty() {
            Spec::Suffix(num(b)?)
        } else {
            let first = num(a)?;
            let last = if b.is_empty() { None } else { Some(num(b)?) };
            if last.is_some_and(|l| l < first) {
                return None;
            }
            Spec::From { first, last }
        };
        specs.push(spec);
        if specs.len() > MAX_RANGES {
            return None;
        }
    }
    (!specs.is_empty()).then_some(specs)
}

/// The bytes `spec` selects from a body of `len`, if any (§14.1.2).
fn resolve(spec: Spec, len: u64) -> Option<(u64, u64)> {
    match spec {
        Spec::From { first, last } if first < len => {
            Some((first, last.map_or(len - 1, |l| l.min(len - 1))))
        }
        Spec::Suffix(n) if n > 0 && len > 0 => Some((len - n.min(len), len - 1)),
        _ => None,
    }
}

/// §13.1.5: `If-Range` holds when its entity-tag strongly matches the stored one, or its
/// date equals a strong stored `Last-Modified` (at least a second before the stored `Date`).
fn if_range_holds<S: Field>(value: &[u8], stored: &[S]) -> bool {
    if let Some(tag) = EntityTag::parse(value) {
        let etag = first(stored, "etag").and_then(EntityTag::parse);
        return etag.is_some_and(|e| tag.strong_eq(&e));
    }
    let Some(date) = parse_http_date(value) else {
        return false;
    };
    let lm = first(stored, "last-modified").and_then(parse_http_date);
    let sent = first(stored, "date").and_then(parse_http_date);
    matches!((lm, sent), (Some(lm), Some(sent)) if lm == date && sent >= lm.saturating_add(1))
}

/// How a GET with `req` headers is answered from a stored response with `status`, `stored`
/// header fields and a body of `len` bytes.
pub fn evaluate<R: Field, S: Field>(req: &[R], stored: &[S], status: u16, len: u64) -> Answer {
    // §14.2: Range applies to a 200 (the stored one is complete); one Range field only.
    let [range] = values(req, "range")[..] else {
        return Answer::Full;
    };
    if status != 200 {
        return Answer::Full;
    }
    let Some(specs) = parse(range) else {
        return Answer::Full;
    };
    if let Some(v) = first(req, "if-range") {
        if !if_range_holds(v, stored) {
            return Answer::Full;
        }
    }
    let mut hits = specs.iter().filter_map(|s| resolve(*s, len));
    match (hits.next(), hits.next()) {
        (None, _) => Answer::Unsatisfiable,
        (Some((first, last)), None) => Answer::Partial { first, last },
        // Several ranges: the whole representation (documented choice).
        (Some(_), Some(_)) => Answer::Full,
    }
}

/// Whether a miss's `Range` asks for the whole body from its start (`bytes=0-`): then the
/// request is forwarded without it, the 200 answers the client, and the cache fills.
pub fn is_whole_from_start<R: Field>(req: &[R]) -> bool {
    match values(req, "range")[..] {
        [range] => {
            parse(range)
                == Some(vec![Spec::From {
                    first: 0,
                    last: None,
                }])
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORED: &[(&str, &str)] = &[
        ("etag", "\"v1\""),
        ("last-modified", "Sat, 28 Nov 2026 10:00:00 GMT"),
        ("date", "Sat, 28 Nov 2026 12:00:00 GMT"),
    ];

    fn eval(range: &str) -> Answer {
        evaluate(&[("range", range)], STORED, 200, 100)
    }

    #[test]
    fn single_ranges() {
        // RFC 9110 §14.1.2 examples.
        assert_eq!(eval("bytes=0-9"), Answer::Partial { first: 0, last: 9 });
        assert_eq!(
            eval("bytes=90-"),
            Answer::Partial {
                first: 90,
                last: 99
            }
        );
        assert_eq!(
            eval("bytes=-10"),
            Answer::Partial {
                first: 90,
                last: 99
            }
        );
        assert_eq!(eval("bytes=-500"), Answer::Partial { first: 0, last: 99 });
        assert_eq!(
            eval("bytes=50-500"),
            Answer::Partial {
                first: 50,
                last: 99
            }
        );
        assert_eq!(
            eval("Bytes = 1-1"),
            Answer::Full,
            "spaces around = are not allowed"
        );
        assert_eq!(eval("BYTES=1-1"), Answer::Partial { first: 1, last: 1 });
        assert_eq!(
            eval("bytes=0-9").content_range(100).as_deref(),
            Some("bytes 0-9/100")
        );
    }

    #[test]
    fn unsatisfiable_and_ignored_ranges() {
        assert_eq!(eval("bytes=100-"), Answer::Unsatisfiable);
        assert_eq!(eval("bytes=-0"), Answer::Unsatisfiable);
        assert_eq!(eval("bytes=200-300, 150-"), Answer::Unsatisfiable);
        assert_eq!(
            Answer::Unsatisfiable.content_range(100).as_deref(),
            Some("bytes */100")
        );
        // Ignored: invalid syntax, another unit, reversed, several ranges, other statuses.
        for r in [
            "bytes=9-1",
            "items=0-1",
            "bytes=",
            "bytes=a-b",
            "bytes=0-1, 5-6",
            "0-1",
        ] {
            assert_eq!(eval(r), Answer::Full, "{r}");
        }
        assert_eq!(
            evaluate(&[("range", "bytes=0-1")], STORED, 404, 100),
            Answer::Full
        );
        let many = format!("bytes={}", vec!["0-0"; MAX_RANGES + 1].join(","));
        assert_eq!(eval(&many), Answer::Full);
        assert_eq!(
            evaluate(&[("range", "bytes=0-")], STORED, 200, 0),
            Answer::Unsatisfiable
        );
    }

    #[test]
    fn if_range_needs_a_strong_match() {
        let with = |if_range: &str| {
            evaluate(
                &[("range", "bytes=0-0"), ("if-range", if_range)],
                STORED,
                200,
                100,
            )
        };
        let partial = Answer::Partial { first: 0, last: 0 };
        assert_eq!(with("\"v1\""), partial);
        assert_eq!(with("\"v2\""), Answer::Full);
        assert_eq!(
            with("W/\"v1\""),
            Answer::Full,
            "weak tags never match (§13.1.5)"
        );
        assert_eq!(with("Sat, 28 Nov 2026 10:00:00 GMT"), partial);
        assert_eq!(with("Sat, 28 Nov 2026 10:00:01 GMT"), Answer::Full);
        assert_eq!(with("junk"), Answer::Full);
        // A Last-Modified as recent as Date is weak.
        let weak = [
            ("last-modified", "Sat, 28 Nov 2026 12:00:00 GMT"),
            ("date", "Sat, 28 Nov 2026 12:00:00 GMT"),
        ];
        let r = [
            ("range", "bytes=0-0"),
            ("if-range", "Sat, 28 Nov 2026 12:00:00 GMT"),
        ];
        assert_eq!(evaluate(&r, &weak, 200, 100), Answer::Full);
    }

    #[test]
    fn whole_from_start() {
        assert!(is_whole_from_start(&[("range", "bytes=0-")]));
        assert!(!is_whole_from_start(&[("range", "bytes=0-10")]));
        assert!(!is_whole_from_start(&[("range", "bytes=1-")]));
        assert!(!is_whole_from_start(&[("x", "y")]));
    }
}
