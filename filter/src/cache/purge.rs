//! Purge by tag and soft purge: which stored entries a purge selects, and what a soft
//! purge leaves of them.
//!
//! A response lists its tags in `purge.tag_header` (`Surrogate-Key: product-1 home`,
//! space-separated); a PURGE carrying that header with tags removes every entry tagged with
//! one of them. A soft purge marks entries stale instead of removing them, so
//! `stale-while-revalidate` and `stale-if-error` still apply (RFC 5861) while the next
//! request revalidates.

use super::entry::{self, EntryView};
use super::freshness::current_age;
use crate::field::values;

/// Most tags one purge may name.
pub const MAX_TAGS: usize = 64;

/// The tags listed in a header value (space or tab separated; empty items skipped), at
/// most [`MAX_TAGS`].
pub fn tags(value: &[u8]) -> Vec<&[u8]> {
    value
        .split(|b| b.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
        .take(MAX_TAGS)
        .collect()
}

/// Whether the stored `value` is a response whose `tag_header` lists one of `wanted`.
pub fn has_tag(value: &[u8], tag_header: &str, wanted: &[&[u8]]) -> bool {
    let Ok(EntryView::Response(r)) = entry::decode(value) else {
        return false;
    };
    values(&r.headers, tag_header)
        .iter()
        .flat_map(|v| tags(v))
        .any(|t| wanted.contains(&t))
}

/// The stored `value` made stale as of `now` (Unix seconds): its lifetime becomes its
/// current age, so it is due for revalidation now and its stale-while-revalidate and
/// stale-if-error windows start now. `None` when it is not a response or already stale.
pub fn soft_purged(value: &[u8], now: u64) -> Option<Vec<u8>> {
    let Ok(EntryView::Response(r)) = entry::decode(value) else {
        return None;
    };
    let mut meta = r.meta;
    let age = current_age(u64::from(meta.initial_age), meta.response_time, now);
    let age = u32::try_from(age).unwrap_or(u32::MAX);
    if age >= meta.lifetime {
        return None;
    }
    meta.lifetime = age;
    entry::with_meta(value, &meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::entry::{encode_response, ResponseMeta};

    fn stored(tags: &str) -> Vec<u8> {
        let meta = ResponseMeta {
            status: 200,
            flags: 0,
            response_time: 1000,
            initial_age: 2,
            lifetime: 600,
        };
        let headers = vec![(b"surrogate-key".to_vec(), tags.as_bytes().to_vec())];
        encode_response(5, "http://h/a", "", &meta, &headers, b"body")
    }

    #[test]
    fn tags_are_space_separated() {
        assert_eq!(tags(b" a  b\tc "), vec![&b"a"[..], b"b", b"c"]);
        assert!(tags(b"   ").is_empty());
        let many = vec!["t"; MAX_TAGS + 5].join(" ");
        assert_eq!(tags(many.as_bytes()).len(), MAX_TAGS);
    }

    #[test]
    fn entries_are_selected_by_any_listed_tag() {
        let v = stored("product-1 home");
        assert!(has_tag(&v, "surrogate-key", &[b"home"]));
        assert!(has_tag(&v, "surrogate-key", &[b"x", b"product-1"]));
        assert!(
            !has_tag(&v, "surrogate-key", &[b"product"]),
            "whole tags only"
        );
        assert!(!has_tag(&v, "other", &[b"home"]));
        assert!(!has_tag(b"junk", "surrogate-key", &[b"home"]));
    }

    #[test]
    fn a_soft_purge_makes_the_entry_stale_now() {
        let v = stored("a");
        let soft = soft_purged(&v, 1010).expect("fresh entry");
        assert_eq!(soft.len(), v.len());
        let Ok(EntryView::Response(r)) = entry::decode(&soft) else {
            panic!()
        };
        // Age 12 at 1010: lifetime 12, so ttl 0 (stale) and no staleness yet.
        assert_eq!(
            (r.meta.lifetime, r.generation, r.body),
            (12, 5, &b"body"[..])
        );
        assert_eq!(soft_purged(&soft, 1011), None, "already stale");
        assert_eq!(soft_purged(b"junk", 1010), None);
    }
}
