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
    if buf.len() > MAX_PAIRS_BYTES || buf.len() < 4 {
        return None;
    }
    let word = |at: usize| -> Option<usize> {
        let b = buf.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let n = word(0)?;
    if n > MAX_PAIRS_COUNT || 4 + n * 8 > buf.len() {
        return None;
    }
    let mut pos = 4 + n * 8;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (kl, vl) = (word(4 + i * 8)?, word(8 + i * 8)?);
        let k = buf.get(pos..pos.checked_add(kl)?)?;
        pos += kl;
        if buf.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        let v = buf.get(pos..pos.checked_add(vl)?)?;
        pos += vl;
        if buf.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        out.push((k.to_vec(), v.to_vec()));
    }
    (pos == buf.len()).then_some(out)
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
    }
}
