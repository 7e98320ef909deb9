//! `Vary` handling (RFC 9111 §4.1): which request headers select a variant, and the secondary
//! key built from their values.

/// Most header names one `Vary` may list before the response is treated as uncacheable.
pub const MAX_VARY_NAMES: usize = 16;

/// A response's `Vary`, as the cache uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vary {
    /// No `Vary`: one representation per URI.
    None,
    /// `*` anywhere in the list: never reused (§4.1).
    Star,
    /// The listed request header names, lower-case, sorted and deduplicated so that
    /// `Vary: A, B` and `Vary: b, a` select variants the same way.
    Names(Vec<String>),
    /// More names than [`MAX_VARY_NAMES`], or names that are not tokens.
    Unusable,
}

/// Prefix of the implicit Vary names that select a variant by one cookie's value
/// (`cookie:lang`); not a token, so no response `Vary` can name it.
pub const COOKIE_PREFIX: &str = "cookie:";

impl Vary {
    /// Adds the operator's key parts (`cache.key_headers`, `cache.key_cookies`) as implicit
    /// names: the response varies on them whatever its own `Vary` says. Too many names
    /// together make it unusable, as for a long `Vary`.
    pub fn with_implicit(self, implicit: &[String]) -> Vary {
        if implicit.is_empty() {
            return self;
        }
        let mut names = match self {
            Vary::None => Vec::new(),
            Vary::Names(n) => n,
            other => return other,
        };
        names.extend(implicit.iter().cloned());
        names.sort();
        names.dedup();
        if names.len() > MAX_VARY_NAMES {
            Vary::Unusable
        } else {
            Vary::Names(names)
        }
    }

    /// Parses every `Vary` field line.
    pub fn parse<L: AsRef<[u8]>>(lines: impl IntoIterator<Item = L>) -> Vary {
        let mut names: Vec<String> = Vec::new();
        for line in lines {
            // Names are tokens: a non-UTF-8 byte becomes U+FFFD, which is not one.
            let line = crate::field::text(line.as_ref());
            for name in line.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if name == "*" {
                    return Vary::Star;
                }
                if !name.bytes().all(crate::field::is_tchar) {
                    return Vary::Unusable;
                }
                names.push(name.to_ascii_lowercase());
            }
        }
        names.sort();
        names.dedup();
        match names.len() {
            0 => Vary::None,
            n if n > MAX_VARY_NAMES => Vary::Unusable,
            _ => Vary::Names(names),
        }
    }
}

/// The values a Vary name selects in a request: the header's lines, or for an implicit
/// `cookie:<name>` the values of that cookie (RFC 6265 §4.2.1 `name=value` pairs).
pub fn request_values<'a, F: crate::field::Field>(req: &'a [F], name: &str) -> Vec<&'a [u8]> {
    let Some(cookie) = name.strip_prefix(COOKIE_PREFIX) else {
        return crate::field::values(req, name);
    };
    crate::field::values(req, "cookie")
        .into_iter()
        .flat_map(|line| line.split(|&b| b == b';'))
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (n, v) = pair.split_at(eq);
            (n == cookie.as_bytes()).then(|| v.get(1..).unwrap_or_default())
        })
        .collect()
}

/// The secondary key: the normalised values of the `names` in the request, in order.
///
/// §4.1 allows normalising values "in a way that is known to have identical semantics": lines
/// of one field are joined with `,` and whitespace around list commas is removed. An absent
/// field only matches an absent field, so it is encoded differently from an empty one.
/// Values are bytes: anything outside printable ASCII (and `%`) is written as `%XX`, so two
/// requests whose values differ in any byte never share a variant.
pub fn secondary_key<F, V>(names: &[String], mut request_header: F) -> String
where
    F: FnMut(&str) -> Vec<V>,
    V: AsRef<[u8]>,
{
    let mut out = String::new();
    for name in names {
        out.push_str(name);
        let values = request_header(name);
        if values.is_empty() {
            out.push('\n');
            continue;
        }
        out.push(':');
        let mut first = true;
        for v in &values {
            for item in v.as_ref().split(|&b| b == b',') {
                if !first {
                    out.push(',');
                }
                first = false;
                push_escaped(&mut out, trim_ows(item));
            }
        }
        out.push('\n');
    }
    out
}

/// Optional whitespace (RFC 9110 §5.6.3) off both ends.
fn trim_ows(b: &[u8]) -> &[u8] {
    let ows = |c: &u8| *c == b' ' || *c == b'\t';
    let start = b.iter().position(|c| !ows(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !ows(c)).map_or(start, |i| i + 1);
    b.get(start..end).unwrap_or_default()
}

fn push_escaped(out: &mut String, b: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &c in b {
        if (0x20..0x7f).contains(&c) && c != b'%' {
            out.push(char::from(c));
        } else {
            out.push('%');
            for nibble in [c >> 4, c & 0xf] {
                out.push(char::from(
                    HEX.get(usize::from(nibble)).copied().unwrap_or(b'0'),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_anywhere_wins() {
        // RFC 9111 §4.1: a Vary containing "*" always fails to match.
        assert_eq!(Vary::parse(["accept, *"]), Vary::Star);
        assert_eq!(Vary::parse(["accept", "*"]), Vary::Star);
    }

    #[test]
    fn names_are_case_insensitive_sorted_and_deduplicated() {
        assert_eq!(
            Vary::parse(["Accept-Encoding, accept", "ACCEPT"]),
            Vary::Names(vec!["accept".into(), "accept-encoding".into()])
        );
        assert_eq!(Vary::parse([" , "]), Vary::None);
        assert_eq!(Vary::parse(Vec::<&str>::new()), Vary::None);
    }

    #[test]
    fn hostile_vary_is_unusable() {
        assert_eq!(Vary::parse(["a b"]), Vary::Unusable);
        let many: Vec<String> = (0..=MAX_VARY_NAMES).map(|i| format!("h{i}")).collect();
        assert_eq!(Vary::parse([many.join(",").as_str()]), Vary::Unusable);
    }

    #[test]
    fn secondary_key_normalises_whitespace_and_lines() {
        // RFC 9111 §4.1: combining lines and removing optional whitespace is allowed.
        let names = vec!["accept-encoding".to_string()];
        let a = secondary_key(&names, |_| vec!["gzip,  br"]);
        let b = secondary_key(&names, |_| vec!["gzip", "br"]);
        assert_eq!(a, b);
        let c = secondary_key(&names, |_| vec!["br, gzip"]);
        assert_ne!(a, c, "order is significant in general");
    }

    #[test]
    fn values_differing_in_any_byte_select_different_variants() {
        let names = vec!["accept-language".to_string()];
        let key = |v: &'static [u8]| secondary_key(&names, |_| vec![v]);
        assert_ne!(key(b"\xfe"), key(b"\xff"));
        assert_ne!(key(b"%FF"), key(b"\xff"));
        // A value cannot forge the next name's line.
        let two = vec!["a".to_string(), "b".to_string()];
        let forged = secondary_key(&two, |n| {
            if n == "a" {
                vec![&b"x\nb:y"[..]]
            } else {
                vec![]
            }
        });
        let real = secondary_key(&two, |n| vec![if n == "a" { &b"x"[..] } else { &b"y"[..] }]);
        assert_ne!(forged, real);
        assert_eq!(key(b" \xe9 "), "accept-language:%E9\n");
    }

    #[test]
    fn implicit_names_join_the_responses_own() {
        let implicit = vec!["cookie:lang".to_string(), "x-device".to_string()];
        assert_eq!(
            Vary::None.with_implicit(&implicit),
            Vary::Names(implicit.clone())
        );
        assert_eq!(
            Vary::parse(["Accept, X-Device"]).with_implicit(&implicit),
            Vary::Names(vec![
                "accept".into(),
                "cookie:lang".into(),
                "x-device".into()
            ])
        );
        assert_eq!(Vary::Star.with_implicit(&implicit), Vary::Star);
        let many: Vec<String> = (0..MAX_VARY_NAMES).map(|i| format!("h{i}")).collect();
        assert_eq!(
            Vary::None.with_implicit(&many),
            Vary::Names({
                let mut m = many.clone();
                m.sort();
                m
            })
        );
        assert_eq!(Vary::parse(["a"]).with_implicit(&many), Vary::Unusable);
    }

    #[test]
    fn cookie_values_select_variants() {
        let req = [("cookie", "theme=dark; lang=fr"), ("cookie", "lang=de")];
        assert_eq!(request_values(&req, "cookie:lang"), vec![&b"fr"[..], b"de"]);
        assert!(request_values(&req, "cookie:missing").is_empty());
        assert!(request_values(&[("cookie", "language=fr; xlang=1")], "cookie:lang").is_empty());
        assert_eq!(request_values(&[("x", "1")], "x"), vec![&b"1"[..]]);
    }

    #[test]
    fn absent_differs_from_empty() {
        // RFC 9111 §4.1: an absent field only matches an absent field.
        let names = vec!["x".to_string()];
        assert_ne!(
            secondary_key(&names, |_| Vec::<&str>::new()),
            secondary_key(&names, |_| vec![""])
        );
    }
}
