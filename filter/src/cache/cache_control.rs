//! `Cache-Control` parsing (RFC 9111 §5.2), for requests and responses.
//!
//! The grammar is `#cache-directive` with `token [ "=" ( token / quoted-string ) ]`. Directive
//! names are case-insensitive (§5.2). Unknown directives are ignored (§5.2.3). Values that
//! cannot be parsed, or a directive repeated with different values, mark the value
//! [`Delta::Invalid`], which the freshness code treats as stale (§4.2.1).

/// A delta-seconds directive value (RFC 9111 §1.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delta {
    /// The directive is absent.
    #[default]
    Absent,
    /// A valid value, in seconds (saturated at 2^31, §1.2.2).
    Seconds(u32),
    /// Present but unusable: no value, not digits, or conflicting repeats.
    Invalid,
}

impl Delta {
    /// The value when valid.
    pub fn seconds(self) -> Option<u32> {
        match self {
            Delta::Seconds(s) => Some(s),
            _ => None,
        }
    }

    /// Whether the directive appeared at all.
    pub fn is_present(self) -> bool {
        self != Delta::Absent
    }

    fn merge(self, new: Delta) -> Delta {
        match (self, new) {
            (Delta::Absent, n) => n,
            (a, n) if a == n => a,
            _ => Delta::Invalid,
        }
    }
}

/// RFC 9111 §1.2.2: values too large to represent are 2^31.
pub const DELTA_MAX: u32 = 1 << 31;

/// Parsed directives; one struct serves requests and responses (each side reads its own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `max-age` (§5.2.1.1, §5.2.2.1).
    pub max_age: Delta,
    /// `s-maxage` (§5.2.2.10).
    pub s_maxage: Delta,
    /// `max-stale`; `Some(None)` when given without a value (any staleness, §5.2.1.2).
    pub max_stale: Option<Option<u32>>,
    /// `min-fresh` (§5.2.1.3).
    pub min_fresh: Delta,
    /// `no-cache`; the field names of its qualified form (§5.2.2.4), empty when unqualified.
    pub no_cache: Option<Vec<String>>,
    /// `no-store` (§5.2.1.5, §5.2.2.5).
    pub no_store: bool,
    /// `private`; the field names of its qualified form (§5.2.2.7), empty when unqualified.
    pub private: Option<Vec<String>>,
    /// `public` (§5.2.2.9).
    pub public: bool,
    /// `must-revalidate` (§5.2.2.2).
    pub must_revalidate: bool,
    /// `proxy-revalidate` (§5.2.2.8).
    pub proxy_revalidate: bool,
    /// `only-if-cached` (§5.2.1.7).
    pub only_if_cached: bool,
    /// `must-understand` (§5.2.2.3).
    pub must_understand: bool,
    /// `stale-while-revalidate` (RFC 5861 §3).
    pub stale_while_revalidate: Delta,
    /// `stale-if-error` (RFC 5861 §4).
    pub stale_if_error: Delta,
}

impl CacheControl {
    /// Parses every field line of the header (they combine as one list, RFC 9110 §5.3).
    /// Lines are bytes: a non-UTF-8 byte can only sit in a quoted string or spoil the one
    /// directive it is in.
    pub fn parse<L: AsRef<[u8]>>(lines: impl IntoIterator<Item = L>) -> CacheControl {
        let mut cc = CacheControl::default();
        for line in lines {
            let line = crate::field::text(line.as_ref());
            for (name, value) in Directives::new(&line) {
                cc.apply(name, value);
            }
        }
        cc
    }

    fn apply(&mut self, name: &str, value: Option<Value<'_>>) {
        let lname = name.to_ascii_lowercase();
        match lname.as_str() {
            "max-age" => self.max_age = self.max_age.merge(delta(value)),
            "s-maxage" => self.s_maxage = self.s_maxage.merge(delta(value)),
            "min-fresh" => self.min_fresh = self.min_fresh.merge(delta(value)),
            "stale-while-revalidate" => {
                self.stale_while_revalidate = self.stale_while_revalidate.merge(delta(value))
            }
            "stale-if-error" => self.stale_if_error = self.stale_if_error.merge(delta(value)),
            "max-stale" => {
                // An unparsable limit allows no staleness at all: the safe reading.
                self.max_stale = Some(value.map(|v| delta(Some(v)).seconds().unwrap_or(0)))
            }
            "no-cache" => merge_fields(&mut self.no_cache, value),
            "private" => merge_fields(&mut self.private, value),
            "no-store" => self.no_store = true,
            "public" => self.public = true,
            "must-revalidate" => self.must_revalidate = true,
            "proxy-revalidate" => self.proxy_revalidate = true,
            "only-if-cached" => self.only_if_cached = true,
            "must-understand" => self.must_understand = true,
            _ => {} // §5.2.3: unrecognised directives are ignored.
        }
    }

    /// Whether a stored response must be validated before any reuse (§5.2.2.4 unqualified
    /// `no-cache`).
    pub fn requires_validation(&self) -> bool {
        matches!(&self.no_cache, Some(f) if f.is_empty())
    }

    /// Whether the shared cache must not serve the response stale (§5.2.2.2, §5.2.2.8,
    /// §5.2.2.10: `s-maxage` implies `proxy-revalidate`).
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_present()
    }

    /// Header fields a shared cache must not store or send: the qualified forms of `private`
    /// and `no-cache` (§5.2.2.4, §5.2.2.7). Lower-case names.
    pub fn withheld_fields(&self) -> impl Iterator<Item = &str> {
        self.private
            .iter()
            .chain(self.no_cache.iter())
            .flatten()
            .map(String::as_str)
    }
}

fn merge_fields(slot: &mut Option<Vec<String>>, value: Option<Value<'_>>) {
    let names: Vec<String> = match value {
        None => Vec::new(),
        Some(v) => v
            .as_str()
            .split(',')
            .map(|f| f.trim().to_ascii_lowercase())
            .filter(|f| !f.is_empty())
            .collect(),
    };
    match slot {
        // The unqualified form wins: it already covers every field.
        Some(existing) if existing.is_empty() => {}
        Some(_) if names.is_empty() => *slot = Some(Vec::new()),
        Some(existing) => existing.extend(names),
        None => *slot = Some(names),
    }
}

/// RFC 9111 §1.2.2 delta-seconds: 1*DIGIT; larger than representable becomes 2^31.
fn delta(value: Option<Value<'_>>) -> Delta {
    let Some(v) = value else {
        return Delta::Invalid;
    };
    let s = v.as_str();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Delta::Invalid;
    }
    let mut n: u64 = 0;
    for b in s.bytes() {
        n = n * 10 + u64::from(b - b'0');
        if n >= u64::from(DELTA_MAX) {
            return Delta::Seconds(DELTA_MAX);
        }
    }
    Delta::Seconds(n as u32)
}

/// A directive value: a token, or a quoted-string with escapes still in place.
#[derive(Debug, Clone, Copy)]
struct Value<'a> {
    raw: &'a str,
}

impl<'a> Value<'a> {
    /// The value with quotes removed; `\x` escapes are rare here and kept as the bare char.
    fn as_str(&self) -> &'a str {
        let r = self.raw;
        r.strip_prefix('"')
            .and_then(|q| q.strip_suffix('"'))
            .unwrap_or(r)
    }
}

/// Iterates `name[=value]` items of one header line, honouring quoted strings.
struct Directives<'a> {
    rest: &'a str,
}

impl<'a> Directives<'a> {
    fn new(line: &'a str) -> Self {
        Directives { rest: line }
    }
}

impl<'a> Iterator for Directives<'a> {
    type Item = (&'a str, Option<Value<'a>>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let s = self.rest.trim_start_matches([' ', '\t', ',']);
            if s.is_empty() {
                self.rest = s;
                return None;
            }
            // Find the end of this item: a comma outside quotes.
            let mut end = s.len();
            let mut in_quotes = false;
            let mut escaped = false;
            for (i, c) in s.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if in_quotes => escaped = true,
                    '"' => in_quotes = !in_quotes,
                    ',' if !in_quotes => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            // `end` is a char boundary: a comma's index, or the length.
            let (item, rest) = s.split_at(end);
            self.rest = rest;
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n.trim(), Some(Value { raw: v.trim() })),
                None => (item.trim(), None),
            };
            if name.is_empty() {
                continue;
            }
            return Some((name, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(s: &str) -> CacheControl {
        CacheControl::parse([s])
    }

    #[test]
    fn basic_response_directives() {
        // RFC 9111 §5.2.2
        let c = cc("public, max-age=60, s-maxage=30, must-revalidate");
        assert!(c.public && c.must_revalidate);
        assert_eq!(c.max_age, Delta::Seconds(60));
        assert_eq!(c.s_maxage, Delta::Seconds(30));
        assert!(c.forbids_stale());
    }

    #[test]
    fn names_are_case_insensitive_and_whitespace_tolerant() {
        // RFC 9111 §5.2: directive names are case-insensitive.
        let c = cc("  MAX-AGE=5 ,No-Store,, PRIVATE ");
        assert_eq!(c.max_age, Delta::Seconds(5));
        assert!(c.no_store);
        assert_eq!(c.private, Some(vec![]));
    }

    #[test]
    fn quoted_values_are_accepted_and_commas_inside_quotes_do_not_split() {
        // RFC 9111 §5.2: senders SHOULD use the token form, recipients accept both.
        let c = cc(r#"max-age="10", private="set-cookie, x-user", no-cache="a""#);
        assert_eq!(c.max_age, Delta::Seconds(10));
        assert_eq!(
            c.private,
            Some(vec!["set-cookie".to_string(), "x-user".to_string()])
        );
        assert_eq!(c.no_cache, Some(vec!["a".to_string()]));
        assert!(!c.requires_validation());
        let withheld: Vec<&str> = c.withheld_fields().collect();
        assert_eq!(withheld, ["set-cookie", "x-user", "a"]);
    }

    #[test]
    fn invalid_or_conflicting_delta_is_invalid() {
        // RFC 9111 §4.2.1: conflicting repeats may be treated as stale.
        assert_eq!(cc("max-age=abc").max_age, Delta::Invalid);
        assert_eq!(cc("max-age=").max_age, Delta::Invalid);
        assert_eq!(cc("max-age").max_age, Delta::Invalid);
        assert_eq!(cc("max-age=-1").max_age, Delta::Invalid);
        assert_eq!(cc("max-age=1, max-age=2").max_age, Delta::Invalid);
        assert_eq!(cc("max-age=2, max-age=2").max_age, Delta::Seconds(2));
    }

    #[test]
    fn huge_delta_saturates_at_2_pow_31() {
        // RFC 9111 §1.2.2
        assert_eq!(
            cc("max-age=99999999999999999999999").max_age,
            Delta::Seconds(DELTA_MAX)
        );
    }

    #[test]
    fn several_field_lines_combine() {
        // RFC 9110 §5.3: multiple lines are one comma-separated list.
        let c = CacheControl::parse(["max-age=5", "no-cache"]);
        assert_eq!(c.max_age, Delta::Seconds(5));
        assert!(c.requires_validation());
    }

    #[test]
    fn unqualified_no_cache_wins_over_qualified() {
        let c = cc(r#"no-cache="x", no-cache"#);
        assert!(c.requires_validation());
        let c = cc(r#"no-cache, no-cache="x""#);
        assert!(c.requires_validation());
    }

    #[test]
    fn request_directives() {
        // RFC 9111 §5.2.1
        let c = cc("max-stale, min-fresh=3, only-if-cached");
        assert_eq!(c.max_stale, Some(None));
        assert_eq!(c.min_fresh, Delta::Seconds(3));
        assert!(c.only_if_cached);
        assert_eq!(cc("max-stale=7").max_stale, Some(Some(7)));
        assert_eq!(cc("max-stale=x").max_stale, Some(Some(0)));
    }

    #[test]
    fn unknown_directives_are_ignored() {
        // RFC 9111 §5.2.3
        let c = cc("community=\"UCI\", foo, max-age=1");
        assert_eq!(c.max_age, Delta::Seconds(1));
        assert_eq!(
            c,
            CacheControl {
                max_age: Delta::Seconds(1),
                ..Default::default()
            }
        );
    }

    #[test]
    fn hostile_input_does_not_panic() {
        for s in [
            "\"",
            "=",
            "==,,",
            "max-age=\"",
            "private=\"unterminated, max-age=5",
            "\\",
            ",\"\\",
            "max-age=\u{1F600}",
        ] {
            let _ = cc(s);
        }
    }

    #[test]
    fn s_maxage_forbids_stale_for_shared_cache() {
        // RFC 9111 §5.2.2.10: s-maxage incorporates proxy-revalidate.
        assert!(cc("s-maxage=1").forbids_stale());
        assert!(cc("proxy-revalidate").forbids_stale());
        assert!(!cc("max-age=1").forbids_stale());
    }
}
