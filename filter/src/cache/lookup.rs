//! Finding and filling entries: the primary key, the Vary marker and the variant, as one
//! host-independent step each, so the glue and the tests share them.

use super::conditional;
use super::entry::{self, EntryView, Peek};
use super::key::{hash64, CacheKey};
use super::policy::{self, Storable, StoreContext};
use super::store::{Insert, InsertOutcome, Kind, SharedData, Store, StoreError};
use super::vary::{self, Vary};
use crate::field::{values, Field};

/// Hash under which a variant is stored: the primary key and the secondary key together.
pub fn variant_hash(key: &CacheKey, secondary: &str) -> u64 {
    let mut b = Vec::with_capacity(key.as_str().len() + 1 + secondary.len());
    b.extend_from_slice(key.as_str().as_bytes());
    b.push(0);
    b.extend_from_slice(secondary.as_bytes());
    hash64(&b)
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Nothing for this URI.
    Miss,
    /// The URI has variants, but none for this request's values of `names`.
    VaryMiss {
        /// The marker's header names.
        names: Vec<String>,
    },
    /// A stored response.
    Response(Hit),
}

/// A stored response and where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// The encoded value (decode with [`entry::decode`]).
    pub value: Vec<u8>,
    /// The hash it is stored under.
    pub hash: u64,
    /// Its secondary key (empty without Vary).
    pub secondary: String,
    /// The marker's names when the response is a variant.
    pub names: Option<Vec<String>>,
}

/// Looks `key` up for a request with `req` headers: one read for a plain entry, two for a
/// variant (marker, then variant).
pub fn lookup<S: SharedData, F: Field>(store: &mut Store<S>, key: &CacheKey, req: &[F]) -> Found {
    let primary = key.hash64();
    let Some(value) = store.get(primary, key.as_str()) else {
        return Found::Miss;
    };
    // Only the kind here: the caller decodes the response it uses, once.
    match entry::peek(&value) {
        Ok(Peek::Response { secondary: "" }) => Found::Response(Hit {
            value,
            hash: primary,
            secondary: String::new(),
            names: None,
        }),
        Ok(Peek::Vary) => {
            let Ok(EntryView::Vary(m)) = entry::decode(&value) else {
                return Found::Miss;
            };
            let names: Vec<String> = m.names.iter().map(|n| n.to_string()).collect();
            let secondary = vary::secondary_key(&names, |n| vary::request_values(req, n));
            let vh = variant_hash(key, &secondary);
            match store.get(vh, key.as_str()) {
                Some(v) if is_variant(&v, &secondary) => Found::Response(Hit {
                    value: v,
                    hash: vh,
                    secondary,
                    names: Some(names),
                }),
                _ => Found::VaryMiss { names },
            }
        }
        _ => Found::Miss,
    }
}

fn is_variant(value: &[u8], secondary: &str) -> bool {
    matches!(entry::peek(value), Ok(Peek::Response { secondary: s }) if s == secondary)
}

/// Stores a response for `key`, requested with `req` headers. `known_names` are the Vary
/// names of the marker the lookup saw, if any: other variants survive only when the new
/// response varies on the same names.
pub fn insert_response<S: SharedData, F: Field>(
    store: &mut Store<S>,
    key: &CacheKey,
    req: &[F],
    known_names: Option<&[String]>,
    s: &Storable,
    body: &[u8],
) -> Result<InsertOutcome, StoreError> {
    let primary = key.hash64();
    match &s.vary {
        Vary::Names(names) => {
            let secondary = vary::secondary_key(names, |n| vary::request_values(req, n));
            let marker = entry::encode_vary(0, key.as_str(), names);
            let value =
                entry::encode_response(0, key.as_str(), &secondary, &s.meta, &s.headers, body);
            let items = vec![
                Insert {
                    hash: primary,
                    primary,
                    kind: Kind::Vary,
                    value: marker,
                },
                Insert {
                    hash: variant_hash(key, &secondary),
                    primary,
                    kind: Kind::Variant,
                    value,
                },
            ];
            store.insert(items, known_names != Some(names.as_slice()))
        }
        _ => {
            let value = entry::encode_response(0, key.as_str(), "", &s.meta, &s.headers, body);
            let items = vec![Insert {
                hash: primary,
                primary,
                kind: Kind::Response,
                value,
            }];
            store.insert(items, true)
        }
    }
}

/// RFC 9111 §4.3.4: a 304 that selects the stored response `hit` freshens it: its fields
/// are updated from the 304 (§3.2, all but `Content-Length`), its age and lifetime are
/// recomputed from the 304's `Date` and `Age` (§4.2.3), and the body stays. Returns the new
/// value, or `None` when the 304 does not select it or the result may not be stored.
pub fn freshen<S: SharedData, N: Field>(
    store: &mut Store<S>,
    key: &CacheKey,
    hit: &Hit,
    not_modified: &[N],
    ctx: &StoreContext<'_>,
) -> Option<Vec<u8>> {
    let Ok(EntryView::Response(old)) = entry::decode(&hit.value) else {
        return None;
    };
    if !conditional::selects(not_modified, &old.headers) {
        return None;
    }
    let mut merged = policy::freshen(&old.headers, not_modified);
    // The 304's Age counts towards the freshened response's age.
    merged.extend(
        values(not_modified, "age")
            .into_iter()
            .map(|a| (b"age".to_vec(), a.to_vec())),
    );
    let s = policy::storable(old.meta.status, &merged, ctx).ok()?;
    let value = entry::encode_response(
        0,
        key.as_str(),
        &hit.secondary,
        &s.meta,
        &s.headers,
        old.body,
    );
    let kind = if hit.secondary.is_empty() {
        Kind::Response
    } else {
        Kind::Variant
    };
    let item = Insert {
        hash: hit.hash,
        primary: key.hash64(),
        kind,
        value,
    };
    store.insert(vec![item], false).ok()?;
    // Read back: the store stamped the generation into its copy.
    store.get(hit.hash, key.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_HEADERS: &[(&str, &str)] = &[];
    use crate::cache::policy::{RequestPolicy, StoreContext};
    use crate::cache::store::{Limits, MemoryShared};

    fn h(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn ctx(req: &RequestPolicy) -> StoreContext<'_> {
        StoreContext {
            head: false,
            request: req,
            statuses: &[200],
            max_entry_bytes: 1 << 20,
            request_time: 0,
            response_time: 0,
            heuristic_fraction: 0.1,
            heuristic_max_secs: 86_400,
            targets: &[],
            implicit_vary: &[],
        }
    }

    fn storable(resp: &[(&str, &str)]) -> Storable {
        let req = RequestPolicy::default();
        policy::storable(200, &h(resp), &ctx(&req)).unwrap()
    }

    fn store(mem: &MemoryShared) -> Store<&MemoryShared> {
        let mut s = Store::new(
            mem,
            "t",
            Limits {
                max_entries: 16,
                max_total_bytes: 1 << 20,
                max_entry_bytes: 1 << 20,
                max_variants: 8,
                policy: crate::cache::store::Policy::S3Fifo,
            },
        );
        s.init().unwrap();
        s
    }

    fn body_of(f: &Found) -> Vec<u8> {
        match f {
            Found::Response(hit) => match entry::decode(&hit.value) {
                Ok(EntryView::Response(r)) => r.body.to_vec(),
                _ => panic!("not a response"),
            },
            other => panic!("expected a response, got {other:?}"),
        }
    }

    #[test]
    fn plain_round_trip() {
        let mem = MemoryShared::default();
        let mut s = store(&mem);
        let key = CacheKey::new("http", "h", "/a").unwrap();
        assert_eq!(lookup(&mut s, &key, NO_HEADERS), Found::Miss);
        let st = storable(&[("cache-control", "max-age=5")]);
        insert_response(&mut s, &key, NO_HEADERS, None, &st, b"body").unwrap();
        assert_eq!(body_of(&lookup(&mut s, &key, NO_HEADERS)), b"body");
    }

    #[test]
    fn variants_are_selected_by_request_values() {
        // RFC 9111 §4.1
        let mem = MemoryShared::default();
        let mut s = store(&mem);
        let key = CacheKey::new("http", "h", "/v").unwrap();
        let st = storable(&[("cache-control", "max-age=5"), ("vary", "Accept-Encoding")]);
        let gz = h(&[("accept-encoding", "gzip")]);
        let br = h(&[("accept-encoding", "br")]);
        insert_response(&mut s, &key, &gz, None, &st, b"gz").unwrap();
        let names = vec!["accept-encoding".to_string()];
        assert_eq!(
            lookup(&mut s, &key, &br),
            Found::VaryMiss {
                names: names.clone()
            }
        );
        insert_response(&mut s, &key, &br, Some(&names), &st, b"br").unwrap();
        assert_eq!(
            body_of(&lookup(&mut s, &key, &gz)),
            b"gz",
            "first variant kept"
        );
        assert_eq!(body_of(&lookup(&mut s, &key, &br)), b"br");
        // A response varying on other names drops the old variants.
        let st2 = storable(&[("cache-control", "max-age=5"), ("vary", "Accept-Language")]);
        insert_response(&mut s, &key, &gz, Some(&names), &st2, b"lang").unwrap();
        assert_eq!(s.usage().entries, 2, "marker + one variant");
    }

    #[test]
    fn a_selecting_304_freshens_headers_and_keeps_the_body() {
        // RFC 9111 §4.3.4, §3.2
        let mem = MemoryShared::default();
        let mut s = store(&mem);
        let key = CacheKey::new("http", "h", "/r").unwrap();
        let st = storable(&[
            ("cache-control", "max-age=5"),
            ("etag", "\"v1\""),
            ("x", "old"),
        ]);
        insert_response(&mut s, &key, NO_HEADERS, None, &st, b"same").unwrap();
        let Found::Response(hit) = lookup(&mut s, &key, NO_HEADERS) else {
            panic!()
        };
        let req = RequestPolicy::default();
        let ctx = ctx(&req);
        let other = h(&[("etag", "\"v2\"")]);
        assert_eq!(
            freshen(&mut s, &key, &hit, &other, &ctx),
            None,
            "does not select"
        );
        let nm = h(&[
            ("etag", "\"v1\""),
            ("cache-control", "max-age=99"),
            ("x", "new"),
        ]);
        let value = freshen(&mut s, &key, &hit, &nm, &ctx).unwrap();
        let Ok(EntryView::Response(r)) = entry::decode(&value) else {
            panic!()
        };
        assert_eq!((r.body, r.meta.lifetime), (&b"same"[..], 99));
        let x = (&b"x"[..], &b"new"[..]);
        assert!(r.headers.contains(&x) && !r.headers.contains(&(b"x", b"old")));
        assert_eq!(body_of(&lookup(&mut s, &key, NO_HEADERS)), b"same");
        assert_eq!(s.usage().entries, 1);
    }
}
