//! The header-map wire format: little-endian u32 count, a (u32 name length, u32 value
//! length) pair per entry, then each name and value followed by a NUL byte.

use super::limits::{MAX_PAIRS_BYTES, MAX_PAIRS_COUNT};
use super::Pairs;

/// Serialises `pairs`.
pub fn encode<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let size = 4 + pairs
        .iter()
        .map(|(k, v)| 8 + k.as_ref().len() + v.as_ref().len() + 2)
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// Parses a serialised map. Like proxy-wasm-cpp-host's `toPairs`, anything malformed,
/// over [`MAX_PAIRS_BYTES`] or [`MAX_PAIRS_COUNT`], or with trailing bytes gives `None`
/// (the hosts then use an empty map).
pub fn decode(buf: &[u8]) -> Option<Pairs> {
    let n = check(buf)?;
    let mut out = Vec::with_capacity(n);
    out.extend(entries(buf, n).map(|(k, v)| (k.to_vec(), v.to_vec())));
    Some(out)
}

/// Checks a serialised map (the rules of [`decode`]) and returns its entry count.
fn check(buf: &[u8]) -> Option<usize> {
    if buf.len() > MAX_PAIRS_BYTES || buf.len() < 4 {
        return None;
    }
    let n = word(buf, 0)?;
    if n > MAX_PAIRS_COUNT || 4 + n * 8 > buf.len() {
        return None;
    }
    let mut pos = 4 + n * 8;
    for i in 0..n {
        let (kl, vl) = (word(buf, 4 + i * 8)?, word(buf, 8 + i * 8)?);
        for len in [kl, vl] {
            pos = pos.checked_add(len)?;
            if buf.get(pos) != Some(&0) {
                return None;
            }
            pos += 1;
        }
    }
    (pos == buf.len()).then_some(n)
}

fn word(buf: &[u8], at: usize) -> Option<usize> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// The `n` entries of a map [`check`] accepted.
fn entries(buf: &[u8], n: usize) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut pos = 4 + n * 8;
    (0..n).map(move |i| {
        // In bounds: `check` walked the same offsets.
        let kl = word(buf, 4 + i * 8).unwrap_or(0);
        let vl = word(buf, 8 + i * 8).unwrap_or(0);
        let k = &buf[pos..pos + kl];
        pos += kl + 1;
        let v = &buf[pos..pos + vl];
        pos += vl + 1;
        (k, v)
    })
}

/// A map kept in the wire format, checked once: reading it allocates nothing, where
/// [`Pairs`] costs two allocations per entry (a local reply's headers, say, which the
/// embedder only copies into its own structures).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PairsBuf {
    raw: Vec<u8>,
    len: usize,
}

impl PairsBuf {
    /// Takes a serialised map; `None` where [`decode`] gives `None`.
    pub fn from_wire(raw: Vec<u8>) -> Option<PairsBuf> {
        let len = check(&raw)?;
        Some(PairsBuf { raw, len })
    }

    /// Serialises `pairs`.
    pub fn from_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> PairsBuf {
        PairsBuf {
            raw: encode(pairs),
            len: pairs.len(),
        }
    }

    /// The entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        entries(&self.raw, self.len)
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries as owned pairs.
    pub fn to_pairs(&self) -> Pairs {
        self.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_matches_the_documented_layout() {
        let enc = encode(&[("a", "12"), ("bc", "")]);
        let mut want = vec![2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(b"a\x0012\x00bc\x00\x00");
        assert_eq!(enc, want);
        let dec = decode(&enc).unwrap();
        assert_eq!(
            dec,
            vec![(b"a".to_vec(), b"12".to_vec()), (b"bc".to_vec(), vec![])]
        );
    }

    #[test]
    fn malformed_maps_are_refused() {
        let good = encode(&[("k", "v")]);
        assert!(decode(&good[..good.len() - 1]).is_none());
        let mut extra = good.clone();
        extra.push(0);
        assert!(decode(&extra).is_none());
        let mut no_nul = good.clone();
        let i = no_nul.len() - 1;
        no_nul[i] = b'x';
        assert!(decode(&no_nul).is_none());
        assert!(decode(&[]).is_none());
        // A count that claims more than the limit, or more than the buffer holds.
        assert!(decode(&(MAX_PAIRS_COUNT as u32 + 1).to_le_bytes()).is_none());
        assert!(decode(&u32::MAX.to_le_bytes()).is_none());
        assert_eq!(decode(&encode::<&str, &str>(&[])), Some(vec![]));
        for bad in [&good[..good.len() - 1], &extra[..], &no_nul[..], &[][..]] {
            assert_eq!(PairsBuf::from_wire(bad.to_vec()), None);
        }
    }

    #[test]
    fn a_pairs_buf_reads_what_decode_reads() {
        let p = [
            ("content-type", "text/plain"),
            ("x-empty", ""),
            ("etag", "\"v1\""),
        ];
        let enc = encode(&p);
        let buf = PairsBuf::from_wire(enc.clone()).unwrap();
        assert_eq!(buf.len(), 3);
        assert_eq!(buf.to_pairs(), decode(&enc).unwrap());
        let read: Vec<(&[u8], &[u8])> = buf.iter().collect();
        assert_eq!(read[2], (&b"etag"[..], &b"\"v1\""[..]));
        assert_eq!(PairsBuf::from_pairs(&p), buf);
        assert!(PairsBuf::default().is_empty() && PairsBuf::default().iter().next().is_none());
    }
}
