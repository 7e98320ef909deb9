//! Property-based fuzzing of everything that parses input from the network or the store:
//! `Cache-Control`, HTTP dates, `Vary`, entity-tags and conditionals, cache keys, the stored
//! entry codec and the store's index. Properties: never panic, and round trips hold.
//!
//! `PROPTEST_CASES=20000 cargo test -p edge-filter --release --test fuzz` runs a long
//! campaign; CI runs the default number of cases.

use edge_filter::cache::cache_control::CacheControl;
use edge_filter::cache::conditional::{self, EntityTag, TagList};
use edge_filter::cache::entry::{self, EntryView, ResponseMeta};
use edge_filter::cache::freshness;
use edge_filter::cache::key::CacheKey;
use edge_filter::cache::policy::{self, RequestPolicy, StoreContext};
use edge_filter::cache::store::{Insert, Kind, Limits, MemoryShared, Policy, SharedData, Store};
use edge_filter::cache::vary::{self, Vary};
use edge_filter::config::Config;
use edge_filter::field::{self, values};
use proptest::prelude::*;

/// Header-ish text: the characters that make parsers work hardest, plus anything.
fn header_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9=,;\" \\t\\\\/*-]{0,64}",
        any::<String>(),
        "(max-age|s-maxage|no-cache|private|stale-if-error|max-stale)(=\"?[0-9a-z, ]{0,12}\"?)?(, ?[a-z-]{1,16}(=[0-9]{0,25})?){0,4}",
    ]
}

/// Any bytes a proxy may pass in a value: header-ish text, or raw bytes with obs-text.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        header_text().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let names = prop_oneof![
        Just("cache-control".to_string()),
        Just("expires".to_string()),
        Just("date".to_string()),
        Just("age".to_string()),
        Just("vary".to_string()),
        Just("etag".to_string()),
        Just("last-modified".to_string()),
        Just("content-length".to_string()),
        Just("set-cookie".to_string()),
        Just("connection".to_string()),
        Just("pragma".to_string()),
        Just("authorization".to_string()),
        Just("if-none-match".to_string()),
        Just("if-modified-since".to_string()),
        "[a-z-]{1,12}",
    ];
    prop::collection::vec((names, header_value()), 0..12)
}

/// 64 cases per property in CI (a few seconds in debug); `PROPTEST_CASES` raises it.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(64);
    ProptestConfig::with_cases(cases)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn cache_control_never_panics(lines in prop::collection::vec(header_value(), 0..4)) {
        let cc = CacheControl::parse(&lines);
        // Whatever was parsed, its derived views are consistent.
        let _ = cc.requires_validation();
        let _ = cc.withheld_fields().count();
    }

    #[test]
    fn dates_never_panic_and_round_trip(s in any::<String>(), secs in 0u64..253_402_300_799) {
        let _ = freshness::parse_http_date(&s);
        let formatted = freshness::format_http_date(secs);
        prop_assert_eq!(freshness::parse_http_date(&formatted), Some(secs));
    }

    #[test]
    fn vary_and_secondary_keys_never_panic(lines in prop::collection::vec(header_value(), 0..4), req in headers()) {
        if let Vary::Names(names) = Vary::parse(&lines) {
            let a = vary::secondary_key(&names, |n| values(&req, n));
            let b = vary::secondary_key(&names, |n| values(&req, n));
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn secondary_keys_differ_when_any_value_byte_differs(a in header_value(), b in header_value()) {
        let names = vec!["x".to_string()];
        let ka = vary::secondary_key(&names, |_| vec![a.as_slice()]);
        let kb = vary::secondary_key(&names, |_| vec![b.as_slice()]);
        // Only the normalisations §4.1 allows: whitespace around list commas.
        let norm = |v: &[u8]| -> Vec<Vec<u8>> {
            v.split(|&c| c == b',').map(|i| i.iter().copied().skip_while(|c| *c == b' ' || *c == b'\t').collect::<Vec<u8>>()).map(|mut i| { while matches!(i.last(), Some(b' ' | b'\t')) { i.pop(); } i }).collect()
        };
        prop_assert_eq!(ka == kb, norm(&a) == norm(&b));
    }

    #[test]
    fn targeted_fields_never_panic(resp in headers(), v in header_value()) {
        let targets = vec!["cdn-cache-control".to_string(), "x".to_string()];
        let mut resp = resp;
        resp.push(("cdn-cache-control".to_string(), v));
        let _ = policy::response_cache_control(&resp, &targets);
    }

    #[test]
    fn header_maps_never_panic_and_round_trip(bytes in prop::collection::vec(any::<u8>(), 0..256), fields in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..16), prop::collection::vec(any::<u8>(), 0..32)), 0..8)) {
        let _ = field::decode_pairs(&bytes);
        prop_assert_eq!(field::decode_pairs(&field::encode_pairs(&fields)), Some(fields));
    }

    #[test]
    fn conditionals_never_panic(req in headers(), stored in headers(), t in any::<u64>()) {
        let stored: Vec<(&[u8], &[u8])> = stored.iter().map(|(n, v)| (n.as_bytes(), v.as_slice())).collect();
        let _ = conditional::evaluate(&req, &stored, t);
        let _ = conditional::selects(&req, &stored);
        let _ = conditional::validators(&stored);
        for (_, v) in &req {
            let _ = EntityTag::parse(v.as_slice());
            let _ = TagList::parse(&[v.as_slice()]);
        }
    }

    #[test]
    fn keys_never_panic_and_keep_the_target(scheme in "[a-zA-Z+.-]{0,8}", authority in prop::collection::vec(any::<u8>(), 0..24), path in prop::collection::vec(any::<u8>(), 0..48)) {
        if let Ok(k) = CacheKey::new(&scheme, &authority, &path) {
            // The forwarded target is in the key byte for byte.
            prop_assert!(k.as_str().as_bytes().ends_with(&path));
            // Normalisation is idempotent.
            let rest = &k.as_str()[k.as_str().find("://").unwrap() + 3..];
            let slash = rest.find('/').unwrap();
            let again = CacheKey::new(&scheme, &rest[..slash], &rest[slash..]).unwrap();
            prop_assert_eq!(again, k);
        }
    }

    #[test]
    fn distinct_targets_never_share_a_key(a in "/[a-z%2.F/]{0,10}", b in "/[a-z%2.F/]{0,10}") {
        let ka = CacheKey::new("http", "h", &a).unwrap();
        let kb = CacheKey::new("http", "h", &b).unwrap();
        prop_assert_eq!(ka == kb, a == b);
    }

    #[test]
    fn storability_never_panics(status in 100u16..600, resp in headers(), req in headers(), now in 0u64..4_000_000_000) {
        let request = RequestPolicy::from_request(&req);
        let ctx = StoreContext {
            head: false,
            request: &request,
            statuses: &[200, 203, 204, 300, 301, 404, 410],
            max_entry_bytes: 1 << 20,
            request_time: now.saturating_sub(1),
            response_time: now,
            heuristic_fraction: 0.1,
            heuristic_max_secs: 86_400,
            targets: &[],
            implicit_vary: &[],
        };
        if let Ok(s) = policy::storable(status, &resp, &ctx) {
            let _ = policy::reuse(&s.meta, &request, now.saturating_add(s.meta.lifetime as u64));
        }
    }

    #[test]
    fn entry_codec_round_trips(
        status in 100u16..600,
        key in any::<String>(),
        secondary in any::<String>(),
        hdrs in headers(),
        body in prop::collection::vec(any::<u8>(), 0..2048),
        meta_bits in any::<(u16, u64, u32, u32)>(),
    ) {
        let meta = ResponseMeta { status, flags: meta_bits.0, response_time: meta_bits.1, initial_age: meta_bits.2, lifetime: meta_bits.3 };
        let hdrs: Vec<(Vec<u8>, Vec<u8>)> = hdrs.into_iter().map(|(n, v)| (n.into_bytes(), v)).collect();
        let buf = entry::encode_response(9, &key, &secondary, &meta, &hdrs, &body);
        let Ok(EntryView::Response(r)) = entry::decode(&buf) else {
            return Err(TestCaseError::fail("round trip failed"));
        };
        prop_assert_eq!(r.key, key.as_str());
        prop_assert_eq!(r.secondary, secondary.as_str());
        prop_assert_eq!(r.meta, meta);
        prop_assert_eq!(r.body, &body[..]);
        let back: Vec<(Vec<u8>, Vec<u8>)> = r.headers.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        prop_assert_eq!(back, hdrs);
    }

    #[test]
    fn entry_decoder_never_panics(mut bytes in prop::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        if magic && bytes.len() >= 4 {
            bytes[..4].copy_from_slice(b"EFc1");
        }
        let _ = entry::decode(&bytes);
        let _ = entry::peek_key(&bytes);
    }

    #[test]
    fn config_parser_never_panics(s in any::<String>()) {
        let _ = Config::parse(s.as_bytes());
    }

    #[test]
    fn store_survives_a_corrupt_index(garbage in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mem = MemoryShared::default();
        // A corrupt shard index and ledger before init, and a corrupt shard index after it.
        (&mem).set("f/a", &garbage, 0).unwrap();
        (&mem).set("f/h/0", &garbage, 0).unwrap();
        let mut s = Store::new(&mem, "f", Limits { max_entries: 8, max_total_bytes: 1 << 16, max_entry_bytes: 1 << 12, max_variants: 4, policy: Policy::S3Fifo });
        let _ = s.init();
        (&mem).set("f/h/0", &garbage, 0).unwrap();
        let _ = s.get(1, "k");
        let v = entry::encode_response(0, "k", "", &ResponseMeta::default(), &[], b"x");
        let item = Insert { hash: 1, primary: 1, kind: Kind::Response, value: v };
        let inserted = s.insert(vec![item], true);
        prop_assert!(inserted.is_ok());
        prop_assert!(s.get(1, "k").is_some());
    }

    #[test]
    fn two_workers_never_exceed_the_limits(
        ops in prop::collection::vec((any::<bool>(), 0u8..6, 0u16..400, 1usize..3000), 1..300)
    ) {
        let mem = MemoryShared::default();
        let l = Limits { max_entries: 200, max_total_bytes: 60_000, max_entry_bytes: 8_000, max_variants: 4, policy: Policy::S3Fifo };
        let mut w = [Store::new(&mem, "f", l), Store::new(&mem, "f", l)];
        w[0].init().unwrap();
        let shards = u64::from(w[0].shards());
        // Every index and the ledger at their fixed sizes: what the host holds beyond values.
        let overhead = shards * (40 + 40 * 64) + 64;
        for (which, op, k, len) in ops {
            let s = &mut w[usize::from(which)];
            let key = format!("http://h/{k}");
            let h = edge_filter::cache::key::hash64(key.as_bytes());
            match op {
                0 => { let _ = s.remove(h); }
                1 => { let _ = s.remove_where(|x| x.ends_with('7')); }
                2 => { let _ = s.get(h, &key); s.flush_touches(); }
                _ => {
                    let v = entry::encode_response(0, &key, "", &ResponseMeta::default(), &[], &vec![b'x'; len]);
                    let _ = s.insert(vec![Insert { hash: h, primary: h, kind: Kind::Response, value: v }], true);
                }
            }
            prop_assert!(mem.key_count() as u64 <= 1 + shards + 200);
            prop_assert!(mem.value_bytes() as u64 <= 60_000 + overhead);
            s.refresh().unwrap();
            prop_assert!(s.usage().entries <= 200 && s.usage().bytes <= 60_000);
        }
    }
}
