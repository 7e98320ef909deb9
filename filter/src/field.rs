//! Header fields as bytes (RFC 9110 §5.5: a field value may carry obs-text, bytes 0x80-0xff,
//! and a proxy passes them on), and the Proxy-Wasm header-map wire format.
//!
//! Nothing here assumes UTF-8: names and values are compared, stored and served byte for
//! byte. Grammars that are ASCII by definition (Cache-Control, dates, Vary, numbers) read a
//! value through [`text`], where a non-UTF-8 byte can only make an element invalid.

use std::borrow::Cow;

/// One header field, borrowed or owned: `(name, value)` pairs of anything that is bytes.
/// Names are compared ASCII case-insensitively; hosts give them lower-case.
pub trait Field {
    /// The field name.
    fn name(&self) -> &[u8];
    /// The field value, as received.
    fn value(&self) -> &[u8];
}

impl<N: AsRef<[u8]>, V: AsRef<[u8]>> Field for (N, V) {
    fn name(&self) -> &[u8] {
        self.0.as_ref()
    }
    fn value(&self) -> &[u8] {
        self.1.as_ref()
    }
}

/// An owned header list, as the glue reads it from the host.
pub type OwnedFields = Vec<(Vec<u8>, Vec<u8>)>;

/// Every value of `name` in `h`, in order.
pub fn values<'a, F: Field>(h: &'a [F], name: &str) -> Vec<&'a [u8]> {
    h.iter()
        .filter(|f| f.name().eq_ignore_ascii_case(name.as_bytes()))
        .map(|f| f.value())
        .collect()
}

/// The first value of `name` in `h`.
pub fn first<'a, F: Field>(h: &'a [F], name: &str) -> Option<&'a [u8]> {
    h.iter()
        .find(|f| f.name().eq_ignore_ascii_case(name.as_bytes()))
        .map(|f| f.value())
}

/// Whether `h` has a field `name`.
pub fn has<F: Field>(h: &[F], name: &str) -> bool {
    h.iter()
        .any(|f| f.name().eq_ignore_ascii_case(name.as_bytes()))
}

/// RFC 9110 §5.6.2 token characters (field names, methods, directive names).
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A value as text for an ASCII grammar: borrowed when it is UTF-8 (nearly always), else
/// with each invalid byte replaced by U+FFFD, which no token or number accepts.
pub fn text(v: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(v)
}

/// Text pairs as byte pairs (tests and fixed header lists).
pub fn byte_pairs<'a>(list: &[(&'a str, &'a str)]) -> Vec<(&'a [u8], &'a [u8])> {
    list.iter()
        .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
        .collect()
}

/// Most fields one header map may hold; a larger count is a corrupt map, not a request.
pub const MAX_PAIRS: usize = 64 * 1024;

/// Decodes a Proxy-Wasm header map (little-endian u32 count, a (name length, value length)
/// pair per field, then each name and value followed by a NUL). Every length is checked
/// against the buffer: a malformed map gives `None`, never a panic.
pub fn decode_pairs(b: &[u8]) -> Option<OwnedFields> {
    if b.is_empty() {
        return Some(Vec::new());
    }
    let count = read_u32(b, 0)? as usize;
    // Each field needs 8 bytes of sizes and two NULs.
    if count > MAX_PAIRS || count > b.len() / 10 {
        return None;
    }
    let mut sizes = 4usize;
    let mut data = 4 + count * 8;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let nl = read_u32(b, sizes)? as usize;
        let vl = read_u32(b, sizes + 4)? as usize;
        sizes += 8;
        let name = b.get(data..data.checked_add(nl)?)?;
        data = data.checked_add(nl + 1)?;
        let value = b.get(data..data.checked_add(vl)?)?;
        data = data.checked_add(vl + 1)?;
        if data > b.len() {
            return None;
        }
        out.push((name.to_vec(), value.to_vec()));
    }
    Some(out)
}

/// Encodes fields as a Proxy-Wasm header map.
pub fn encode_pairs<F: Field>(fields: &[F]) -> Vec<u8> {
    let size = 4 + fields
        .iter()
        .map(|f| 10 + f.name().len() + f.value().len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    put_u32(&mut out, fields.len());
    for f in fields {
        put_u32(&mut out, f.name().len());
        put_u32(&mut out, f.value().len());
    }
    for f in fields {
        out.extend_from_slice(f.name());
        out.push(0);
        out.extend_from_slice(f.value());
        out.push(0);
    }
    out
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let s: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(s))
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_bytes_and_names_case_insensitive() {
        let h: &[(&[u8], &[u8])] = &[
            (
                b"content-disposition",
                b"attachment; filename=\"r\xe9sum\xe9.pdf\"",
            ),
            (b"Vary", b"a"),
            (b"vary", b"\xff"),
        ];
        assert_eq!(values(h, "vary"), vec![&b"a"[..], &b"\xff"[..]]);
        assert_eq!(
            first(h, "content-disposition"),
            Some(&b"attachment; filename=\"r\xe9sum\xe9.pdf\""[..])
        );
        assert!(has(h, "VARY"));
        assert!(!has(h, "etag"));
    }

    #[test]
    fn text_never_fails() {
        assert_eq!(text(b"max-age=5"), "max-age=5");
        assert!(matches!(text(b"max-age=5"), Cow::Borrowed(_)));
        assert_eq!(text(b"x=\"\xff\""), "x=\"\u{fffd}\"");
    }

    #[test]
    fn pairs_round_trip_every_byte() {
        let all: Vec<u8> = (0..=255u8).collect();
        let fields = vec![
            (b":path".to_vec(), b"/%68ello".to_vec()),
            (all.clone(), all.clone()),
            (Vec::new(), Vec::new()),
        ];
        assert_eq!(decode_pairs(&encode_pairs(&fields)), Some(fields));
        assert_eq!(decode_pairs(b""), Some(Vec::new()));
    }

    #[test]
    fn malformed_maps_are_refused() {
        let good = encode_pairs(&[("a", "b"), ("cc", "dd")]);
        for cut in 1..good.len() {
            assert_eq!(decode_pairs(&good[..cut]), None, "cut at {cut}");
        }
        // A count far larger than the buffer, and lengths that overflow.
        assert_eq!(decode_pairs(&u32::MAX.to_le_bytes()), None);
        let mut huge = 1u32.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 8]);
        assert_eq!(decode_pairs(&huge), None);
    }
}
