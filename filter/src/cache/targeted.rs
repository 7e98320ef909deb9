//! Targeted cache control (RFC 9213): `CDN-Cache-Control` and an operator's own fields.
//!
//! A targeted field is a Structured Field Dictionary (RFC 8941 §3.2) of cache directives.
//! When a response has a field on the cache's target list with a valid, non-empty value,
//! the first such field (in target-list order) decides the response's caching policy and
//! `Cache-Control` and `Expires` are ignored (RFC 9213 §2.2). An invalid value is ignored as
//! a whole: a Structured Field that fails to parse must not be half-used (RFC 8941 §4.2).

use super::cache_control::CacheControl;
use crate::field::{values, Field};

/// Most members one targeted field may have before it is treated as invalid.
const MAX_MEMBERS: usize = 64;

/// A dictionary member's value, as far as cache directives need it (RFC 9213 §2.1 maps
/// directives without a value to Boolean true, quoted-strings to String, tokens to Token,
/// Integer or Decimal). Parameters are parsed and dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Member {
    Bool(bool),
    Int(i64),
    Text(String),
    Other,
}

/// The directives of the first valid, non-empty field of `targets` in `resp`, or `None`
/// when there is none and `Cache-Control` applies.
pub fn directives<F: Field>(resp: &[F], targets: &[String]) -> Option<CacheControl> {
    targets.iter().find_map(|name| {
        let lines = values(resp, name);
        if lines.is_empty() {
            return None;
        }
        // RFC 8941 §4.2: field lines are combined with commas before parsing.
        let joined = lines.join(&b", "[..]);
        let members = parse_dictionary(&joined)?;
        (!members.is_empty()).then(|| to_cache_control(&members))
    })
}

/// Applies the members as `Cache-Control` directives with the same semantics (RFC 9213
/// §2.2). A Boolean false means the directive is absent.
fn to_cache_control(members: &[(String, Member)]) -> CacheControl {
    let line = members
        .iter()
        .filter_map(|(k, v)| match v {
            Member::Bool(true) => Some(k.clone()),
            Member::Bool(false) => None,
            Member::Int(n) => Some(format!("{k}={n}")),
            Member::Text(s) => Some(format!("{k}=\"{}\"", s.replace(['"', '\\'], ""))),
            // A value no directive takes: the directive is present but unusable.
            Member::Other => Some(format!("{k}=\"\"")),
        })
        .collect::<Vec<_>>()
        .join(", ");
    CacheControl::parse([line.as_bytes()])
}

/// RFC 8941 §4.2.2: a dictionary; duplicate keys keep the last value. `None` when invalid.
fn parse_dictionary(input: &[u8]) -> Option<Vec<(String, Member)>> {
    let mut p = Parser { s: input, i: 0 };
    p.skip_sp();
    let mut out: Vec<(String, Member)> = Vec::new();
    while !p.done() {
        let key = p.key()?;
        let value = if p.eat(b'=') {
            p.member_value()?
        } else {
            p.parameters()?;
            Member::Bool(true)
        };
        out.retain(|(k, _)| *k != key);
        out.push((key, value));
        if out.len() > MAX_MEMBERS {
            return None;
        }
        p.skip_ows();
        if p.done() {
            break;
        }
        if !p.eat(b',') {
            return None;
        }
        p.skip_ows();
        if p.done() {
            // A trailing comma is invalid.
            return None;
        }
    }
    Some(out)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn done(&self) -> bool {
        self.i >= self.s.len()
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        if hit {
            self.i += 1;
        }
        hit
    }

    fn skip_sp(&mut self) {
        while self.peek() == Some(b' ') {
            self.i += 1;
        }
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    /// `key = ( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`
    fn key(&mut self) -> Option<String> {
        let first = self.peek()?;
        if !(first.is_ascii_lowercase() || first == b'*') {
            return None;
        }
        let start = self.i;
        while let Some(b) = self.peek() {
            if b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b) {
                self.i += 1;
            } else {
                break;
            }
        }
        let k = self.s.get(start..self.i)?;
        Some(String::from_utf8_lossy(k).into_owned())
    }

    fn member_value(&mut self) -> Option<Member> {
        if self.peek() == Some(b'(') {
            self.inner_list()?;
            self.parameters()?;
            return Some(Member::Other);
        }
        let v = self.bare_item()?;
        self.parameters()?;
        Some(v)
    }

    fn inner_list(&mut self) -> Option<()> {
        self.eat(b'(');
        loop {
            self.skip_sp();
            if self.eat(b')') {
                return Some(());
            }
            self.bare_item()?;
            self.parameters()?;
            if !matches!(self.peek(), Some(b' ' | b')')) {
                return None;
            }
        }
    }

    /// `parameters = *( ";" *SP param-key [ "=" param-value ] )`
    fn parameters(&mut self) -> Option<()> {
        while self.eat(b';') {
            self.skip_sp();
            self.key()?;
            if self.eat(b'=') {
                self.bare_item()?;
            }
        }
        Some(())
    }

    fn bare_item(&mut self) -> Option<Member> {
        match self.peek()? {
            b'-' | b'0'..=b'9' => self.number(),
            b'"' => self.string().map(Member::Text),
            b'?' => {
                self.i += 1;
                match self.peek()? {
                    b'0' => {
                        self.i += 1;
                        Some(Member::Bool(false))
                    }
                    b'1' => {
                        self.i += 1;
                        Some(Member::Bool(true))
                    }
                    _ => None,
                }
            }
            b':' => {
                self.i += 1;
                while let Some(b) = self.peek() {
                    if b.is_ascii_alphanumeric() || b"+/=".contains(&b) {
                        self.i += 1;
                    } else {
                        break;
                    }
                }
                self.eat(b':').then_some(Member::Other)
            }
            b if b.is_ascii_alphabetic() || b == b'*' => {
                let start = self.i;
                while let Some(b) = self.peek() {
                    if b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b) {
                        self.i += 1;
                    } else {
                        break;
                    }
                }
                let t = self.s.get(start..self.i)?;
                Some(Member::Text(String::from_utf8_lossy(t).into_owned()))
            }
            _ => None,
        }
    }

    /// RFC 8941 §4.2.4: at most 15 integer digits; a decimal has at most 12 before and 3
    /// after the point.
    fn number(&mut self) -> Option<Member> {
        let negative = self.eat(b'-');
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        let int_digits = self.i - start;
        if int_digits == 0 {
            return None;
        }
        if self.eat(b'.') {
            let frac = self.i;
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.i += 1;
            }
            let frac_digits = self.i - frac;
            return (int_digits <= 12 && (1..=3).contains(&frac_digits)).then_some(Member::Other);
        }
        if int_digits > 15 {
            return None;
        }
        let digits = std::str::from_utf8(self.s.get(start..self.i)?).ok()?;
        let n: i64 = digits.parse().ok()?;
        Some(Member::Int(if negative { -n } else { n }))
    }

    /// `sf-string`: printable ASCII, `\"` and `\\` the only escapes.
    fn string(&mut self) -> Option<String> {
        self.eat(b'"');
        let mut out = String::new();
        loop {
            let b = self.peek()?;
            self.i += 1;
            match b {
                b'"' => return Some(out),
                b'\\' => {
                    let e = self.peek()?;
                    if e != b'"' && e != b'\\' {
                        return None;
                    }
                    self.i += 1;
                    out.push(char::from(e));
                }
                0x20..=0x7e => out.push(char::from(b)),
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::cache_control::Delta;

    fn cdn() -> Vec<String> {
        vec!["cdn-cache-control".to_string()]
    }

    fn d(list: &[(&str, &str)]) -> Option<CacheControl> {
        directives(list, &cdn())
    }

    #[test]
    fn a_valid_targeted_field_decides() {
        let cc = d(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=60, stale-while-revalidate=5"),
        ])
        .unwrap();
        assert_eq!(cc.max_age, Delta::Seconds(60));
        assert_eq!(cc.stale_while_revalidate, Delta::Seconds(5));
        assert!(!cc.no_store, "Cache-Control is ignored (RFC 9213 §2.2)");
    }

    #[test]
    fn booleans_strings_and_parameters() {
        let cc = d(&[(
            "cdn-cache-control",
            "no-store=?0, must-revalidate, private=\"set-cookie\";x=1, max-age=10;a",
        )])
        .unwrap();
        assert!(!cc.no_store, "?0 means absent");
        assert!(cc.must_revalidate);
        assert_eq!(cc.private, Some(vec!["set-cookie".to_string()]));
        assert_eq!(cc.max_age, Delta::Seconds(10));
        // Lines combine; the last duplicate wins (RFC 8941 §4.2.2).
        let cc = d(&[
            ("cdn-cache-control", "max-age=1"),
            ("cdn-cache-control", "max-age=2"),
        ])
        .unwrap();
        assert_eq!(cc.max_age, Delta::Seconds(2));
    }

    #[test]
    fn invalid_or_empty_fields_are_ignored() {
        for bad in [
            "",
            "   ",
            "Max-Age=60",
            "max-age=60,",
            "max-age=60 no-store",
            "max-age=1234567890123456",
            "max-age=\"\\x\"",
            "max-age=60, x=\"\u{e9}\"",
            "max-age=(1 2",
            "=5",
        ] {
            assert_eq!(d(&[("cdn-cache-control", bad)]), None, "{bad:?}");
        }
        let obs: [(&[u8], &[u8]); 1] = [(b"cdn-cache-control", b"max-age=60, x=\"\xff\"")];
        assert_eq!(directives(&obs, &cdn()), None);
    }

    #[test]
    fn unusable_values_are_present_but_invalid() {
        let cc = d(&[("cdn-cache-control", "max-age=1.5, s-maxage=(1 2), no-cache")]).unwrap();
        assert_eq!(cc.max_age, Delta::Invalid);
        assert_eq!(cc.s_maxage, Delta::Invalid);
        assert!(cc.requires_validation());
        assert_eq!(
            d(&[("cdn-cache-control", "max-age=-5")]).unwrap().max_age,
            Delta::Invalid
        );
    }

    #[test]
    fn the_first_listed_target_wins_and_others_pass() {
        let targets = vec![
            "edge-cache-control".to_string(),
            "cdn-cache-control".to_string(),
        ];
        let resp = [
            ("cdn-cache-control", "max-age=5"),
            ("edge-cache-control", "max-age=7"),
        ];
        assert_eq!(
            directives(&resp, &targets).unwrap().max_age,
            Delta::Seconds(7)
        );
        // An invalid first target falls through to the next.
        let resp = [
            ("cdn-cache-control", "max-age=5"),
            ("edge-cache-control", "max-age=7,"),
        ];
        assert_eq!(
            directives(&resp, &targets).unwrap().max_age,
            Delta::Seconds(5)
        );
        // Not on the list: no effect.
        assert_eq!(directives(&resp, &[]), None);
    }
}
