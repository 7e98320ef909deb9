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

impl Vary {
    /// Parses every `Vary` field line.
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vary {
        let mut names: Vec<String> = Vec::new();
        for line in lines {
            for name in line.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if name == "*" {
                    return Vary::Star;
                }
                if !name.bytes().all(is_tchar) {
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

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The secondary key: the normalised values of the `names` in the request, in order.
///
/// §4.1 allows normalising values "in a way that is known to have identical semantics": lines
/// of one field are joined with `,` and whitespace around list commas is removed. An absent
/// field only matches an absent field, so it is encoded differently from an empty one.
pub fn secondary_key<'a, F>(names: &[String], mut request_header: F) -> String
where
    F: FnMut(&str) -> Vec<&'a str>,
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
        for v in values {
            for item in v.split(',') {
                if !first {
                    out.push(',');
                }
                first = false;
                out.push_str(item.trim_matches([' ', '\t']));
            }
        }
        out.push('\n');
    }
    out
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
    fn absent_differs_from_empty() {
        // RFC 9111 §4.1: an absent field only matches an absent field.
        let names = vec!["x".to_string()];
        assert_ne!(
            secondary_key(&names, |_| vec![]),
            secondary_key(&names, |_| vec![""])
        );
    }
}
