//! The stored-entry codec: what one shared-data slot holds.
//!
//! Layout (little-endian): magic `EFc1`, kind u8, 3 reserved bytes, generation u32, then the
//! key, then the kind's payload. Every length is checked against the buffer before use, so a
//! corrupt or foreign value decodes to an error, never a panic. Decoding borrows from the
//! buffer: a hit copies the body once, into the local reply.

use std::fmt;

const MAGIC: &[u8; 4] = b"EFc1";
const KIND_RESPONSE: u8 = 1;
const KIND_VARY: u8 = 2;

/// Flags of a stored response.
pub mod flags {
    /// Unqualified `no-cache`: never served without validation (RFC 9111 §5.2.2.4).
    pub const REQUIRES_VALIDATION: u16 = 1;
    /// `must-revalidate`, `proxy-revalidate` or `s-maxage`: never served stale (§5.2.2.2).
    pub const FORBIDS_STALE: u16 = 1 << 1;
    /// `public`, `s-maxage` or `must-revalidate`: may answer requests with `Authorization`
    /// (§3.5).
    pub const AUTH_OK: u16 = 1 << 2;
}

/// Why a stored value could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Empty value: a freed slot.
    Empty,
    /// Not written by this codec version.
    BadMagic,
    /// A length points past the end of the value.
    Truncated,
    /// A text field is not UTF-8.
    NotUtf8,
    /// Unknown entry kind.
    BadKind,
}

impl DecodeError {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::BadMagic => "bad-magic",
            DecodeError::Truncated => "truncated",
            DecodeError::NotUtf8 => "not-utf8",
            DecodeError::BadKind => "bad-kind",
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for DecodeError {}

/// Metadata of a stored response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResponseMeta {
    /// Response status.
    pub status: u16,
    /// [`flags`] bits.
    pub flags: u16,
    /// When the response was received (Unix seconds), RFC 9111 §4.2.3 `response_time`.
    pub response_time: u64,
    /// RFC 9111 §4.2.3 `corrected_initial_age`, seconds.
    pub initial_age: u32,
    /// Freshness lifetime, seconds.
    pub lifetime: u32,
}

impl ResponseMeta {
    /// Whether `flag` is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A decoded value, borrowing from the stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryView<'a> {
    /// A stored response.
    Response(ResponseView<'a>),
    /// The list of request headers that select variants of this URI.
    Vary(VaryView<'a>),
}

impl<'a> EntryView<'a> {
    /// The primary key the value was stored under.
    pub fn key(&self) -> &'a str {
        match self {
            EntryView::Response(r) => r.key,
            EntryView::Vary(v) => v.key,
        }
    }
}

/// A stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseView<'a> {
    /// Generation written with it.
    pub generation: u32,
    /// Primary key.
    pub key: &'a str,
    /// Secondary (Vary) key; empty when the response has no `Vary`.
    pub secondary: &'a str,
    /// Status, times and flags.
    pub meta: ResponseMeta,
    /// Stored header fields, lower-case names, byte for byte as received.
    pub headers: Vec<(&'a [u8], &'a [u8])>,
    /// The body.
    pub body: &'a [u8],
}

/// A Vary marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaryView<'a> {
    /// Generation written with it.
    pub generation: u32,
    /// Primary key.
    pub key: &'a str,
    /// Lower-case, sorted request header names.
    pub names: Vec<&'a str>,
}

/// Encodes a response. `headers` must already exclude what is not stored.
pub fn encode_response(
    generation: u32,
    key: &str,
    secondary: &str,
    meta: &ResponseMeta,
    headers: &[(Vec<u8>, Vec<u8>)],
    body: &[u8],
) -> Vec<u8> {
    let hdr_len: usize = headers.iter().map(|(n, v)| 8 + n.len() + v.len()).sum();
    let mut out = Vec::with_capacity(
        16 + key.len() + 24 + 4 + secondary.len() + 4 + hdr_len + 4 + body.len(),
    );
    prefix(&mut out, KIND_RESPONSE, generation, key);
    put_meta(&mut out, meta);
    put_bytes(&mut out, secondary.as_bytes());
    put_u32(&mut out, headers.len());
    for (n, v) in headers {
        put_u32(&mut out, n.len());
        put_u32(&mut out, v.len());
        out.extend_from_slice(n);
        out.extend_from_slice(v);
    }
    put_bytes(&mut out, body);
    out
}

/// Encodes a Vary marker.
pub fn encode_vary(generation: u32, key: &str, names: &[String]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(16 + key.len() + 4 + names.iter().map(|n| 4 + n.len()).sum::<usize>());
    prefix(&mut out, KIND_VARY, generation, key);
    put_u32(&mut out, names.len());
    for n in names {
        put_bytes(&mut out, n.as_bytes());
    }
    out
}

/// Decodes a stored value.
pub fn decode(buf: &[u8]) -> Result<EntryView<'_>, DecodeError> {
    let (mut r, kind, generation) = Reader::prefix(buf)?;
    let key = r.str()?;
    match kind {
        KIND_RESPONSE => {
            let meta = ResponseMeta {
                status: r.u16()?,
                flags: r.u16()?,
                response_time: r.u64()?,
                initial_age: r.u32()?,
                lifetime: r.u32()?,
            };
            let secondary = r.str()?;
            let count = r.u32()? as usize;
            // Each header needs at least 8 bytes: bounds the allocation by the buffer.
            if count > r.remaining() / 8 {
                return Err(DecodeError::Truncated);
            }
            let mut headers = Vec::with_capacity(count);
            for _ in 0..count {
                let nl = r.u32()? as usize;
                let vl = r.u32()? as usize;
                headers.push((r.take(nl)?, r.take(vl)?));
            }
            let body = r.bytes()?;
            Ok(EntryView::Response(ResponseView {
                generation,
                key,
                secondary,
                meta,
                headers,
                body,
            }))
        }
        KIND_VARY => {
            let count = r.u32()? as usize;
            if count > r.remaining() / 4 {
                return Err(DecodeError::Truncated);
            }
            let names = (0..count).map(|_| r.str()).collect::<Result<_, _>>()?;
            Ok(EntryView::Vary(VaryView {
                generation,
                key,
                names,
            }))
        }
        _ => Err(DecodeError::BadKind),
    }
}

/// A response value with its metadata replaced, same size and generation; `None` when
/// `buf` is not a response.
pub fn with_meta(buf: &[u8], meta: &ResponseMeta) -> Option<Vec<u8>> {
    let (mut r, kind, _) = Reader::prefix(buf).ok()?;
    if kind != KIND_RESPONSE {
        return None;
    }
    r.bytes().ok()?;
    let at = r.pos;
    let mut out = buf.to_vec();
    let mut m = Vec::with_capacity(META_BYTES);
    put_meta(&mut m, meta);
    out.get_mut(at..at + META_BYTES)?.copy_from_slice(&m);
    Some(out)
}

fn put_meta(out: &mut Vec<u8>, meta: &ResponseMeta) {
    out.extend_from_slice(&meta.status.to_le_bytes());
    out.extend_from_slice(&meta.flags.to_le_bytes());
    out.extend_from_slice(&meta.response_time.to_le_bytes());
    out.extend_from_slice(&meta.initial_age.to_le_bytes());
    out.extend_from_slice(&meta.lifetime.to_le_bytes());
}

/// Stamps the generation the store assigned into an encoded value (bytes 8..12).
pub fn set_generation(buf: &mut [u8], generation: u32) {
    if let Some(g) = buf.get_mut(8..12) {
        g.copy_from_slice(&generation.to_le_bytes());
    }
}

/// The kind of a stored value and, for a response, its secondary key: what a lookup
/// needs to route, without decoding (and validating) every header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek<'a> {
    /// A response stored under `secondary` (empty without `Vary`).
    Response {
        /// Its secondary key.
        secondary: &'a str,
    },
    /// A Vary marker.
    Vary,
}

/// Reads the kind and, for a response, the secondary key.
pub fn peek(buf: &[u8]) -> Result<Peek<'_>, DecodeError> {
    let (mut r, kind, _) = Reader::prefix(buf)?;
    r.bytes()?;
    match kind {
        KIND_RESPONSE => {
            r.take(META_BYTES)?;
            Ok(Peek::Response {
                secondary: r.str()?,
            })
        }
        KIND_VARY => Ok(Peek::Vary),
        _ => Err(DecodeError::BadKind),
    }
}

/// The encoded size of [`ResponseMeta`]: status, flags, response time, initial age,
/// lifetime.
const META_BYTES: usize = 2 + 2 + 8 + 4 + 4;

/// Reads only the generation and key, for cheap verification.
pub fn peek_key(buf: &[u8]) -> Result<(u32, &str), DecodeError> {
    let (mut r, _, generation) = Reader::prefix(buf)?;
    Ok((generation, r.str()?))
}

fn prefix(out: &mut Vec<u8>, kind: u8, generation: u32, key: &str) {
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[kind, 0, 0, 0]);
    out.extend_from_slice(&generation.to_le_bytes());
    put_bytes(out, key.as_bytes());
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    // Callers bound sizes far below 4 GiB (entry limit); saturate rather than wrap.
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

fn as_str(b: &[u8]) -> Result<&str, DecodeError> {
    std::str::from_utf8(b).map_err(|_| DecodeError::NotUtf8)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Checks the magic and reads the kind and generation; the reader is then at the key.
    fn prefix(buf: &'a [u8]) -> Result<(Reader<'a>, u8, u32), DecodeError> {
        if buf.is_empty() {
            return Err(DecodeError::Empty);
        }
        let mut r = Reader { buf, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let kind = r.take(4)?.first().copied().unwrap_or_default();
        let generation = r.u32()?;
        Ok((r, kind, generation))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        let s = self
            .buf
            .get(self.pos..self.pos + n)
            .ok_or(DecodeError::Truncated)?;
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or([0; 2]),
        ))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        as_str(self.bytes()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(body: &[u8]) -> Vec<u8> {
        let meta = ResponseMeta {
            status: 200,
            flags: flags::FORBIDS_STALE,
            response_time: 1_700_000_000,
            initial_age: 3,
            lifetime: 60,
        };
        let headers = vec![
            (b"content-type".to_vec(), b"text/plain".to_vec()),
            (b"etag".to_vec(), b"\"v1\"".to_vec()),
        ];
        encode_response(7, "http://h/a", "accept:gzip\n", &meta, &headers, body)
    }

    #[test]
    fn response_round_trip() {
        let buf = sample(b"hello");
        let EntryView::Response(r) = decode(&buf).unwrap() else {
            panic!("not a response")
        };
        assert_eq!(r.generation, 7);
        assert_eq!(r.key, "http://h/a");
        assert_eq!(r.secondary, "accept:gzip\n");
        assert_eq!(r.meta.status, 200);
        assert!(r.meta.has(flags::FORBIDS_STALE));
        assert!(!r.meta.has(flags::AUTH_OK));
        assert_eq!(r.meta.lifetime, 60);
        assert_eq!(
            r.headers,
            crate::field::byte_pairs(&[("content-type", "text/plain"), ("etag", "\"v1\"")])
        );
        assert_eq!(r.body, b"hello");
        assert_eq!(peek_key(&buf).unwrap(), (7, "http://h/a"));
    }

    #[test]
    fn peek_reads_kind_and_secondary_key_only() {
        let buf = sample(b"hello");
        assert_eq!(
            peek(&buf),
            Ok(Peek::Response {
                secondary: "accept:gzip\n"
            })
        );
        let marker = encode_vary(9, "http://h/v", &["accept".into()]);
        assert_eq!(peek(&marker), Ok(Peek::Vary));
        // Cut inside the secondary key.
        let at = 16 + "http://h/a".len() + META_BYTES + 2;
        assert_eq!(peek(&buf[..at]), Err(DecodeError::Truncated));
        assert_eq!(peek(b""), Err(DecodeError::Empty));
        let mut bad = buf.clone();
        bad[4] = 0xee;
        assert_eq!(peek(&bad), Err(DecodeError::BadKind));
    }

    #[test]
    fn vary_round_trip() {
        let buf = encode_vary(9, "http://h/v", &["accept".into(), "x-a".into()]);
        let EntryView::Vary(v) = decode(&buf).unwrap() else {
            panic!("not a vary marker")
        };
        assert_eq!((v.generation, v.key), (9, "http://h/v"));
        assert_eq!(v.names, vec!["accept", "x-a"]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let buf = sample(&[7u8; 100]);
        for n in 0..buf.len() {
            assert!(decode(&buf[..n]).is_err(), "prefix of {n} bytes decoded");
        }
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn corrupt_values_are_errors() {
        let mut buf = sample(b"x");
        buf[0] = b'X';
        assert_eq!(decode(&buf), Err(DecodeError::BadMagic));
        let mut buf = sample(b"x");
        buf[4] = 99;
        assert_eq!(decode(&buf), Err(DecodeError::BadKind));
        // A header count claiming billions of headers must not allocate them.
        let mut buf = sample(b"x");
        let count_at = 16 + "http://h/a".len() + 20 + 4 + "accept:gzip\n".len();
        buf[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&buf), Err(DecodeError::Truncated));
        // Invalid UTF-8 in the key.
        let mut buf = sample(b"x");
        buf[16] = 0xff;
        assert_eq!(decode(&buf), Err(DecodeError::NotUtf8));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x1234_5678;
        for len in 0..512 {
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            if len > 4 {
                v[..4].copy_from_slice(MAGIC);
            }
            let _ = decode(&v);
        }
    }
}
