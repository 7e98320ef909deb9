//! RFC 9111 cache behaviour of the filter, end to end: real Envoy, the release .wasm,
//! and an origin that counts what reaches it. Each test has its own Envoy and origin.
//! Miss then hit, HEAD, Vary, no-store, over-limit and truncated bodies and Cache-Status
//! are shared scenarios that nginx runs too (src/scenarios.rs, tests/scenarios_*.rs).

use std::thread;
use std::time::Duration;

use edge_filter_e2e::scenarios::{age, assert_not_hit, hit_ttl};
use edge_filter_e2e::{CacheStatus, Envoy, Reply, Upstream};

#[test]
fn age_grows_while_an_entry_is_served() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/fresh" => Reply::text("fresh").header("Cache-Control", "max-age=60"),
        "/aged" => Reply::text("aged")
            .header("Cache-Control", "max-age=60")
            .header("Age", "10"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");

    envoy.get("/fresh");
    let first = envoy.get("/fresh");
    let (age1, ttl1) = (age(&first), hit_ttl(&first));
    thread::sleep(Duration::from_millis(2100));
    let second = envoy.get("/fresh");
    let (age2, ttl2) = (age(&second), hit_ttl(&second));
    assert!(age2 > age1, "Age did not grow: {age1} then {age2}");
    assert!(age2 <= age1 + 4, "Age jumped: {age1} then {age2}");
    assert!(ttl2 < ttl1, "ttl did not shrink: {ttl1} then {ttl2}");
    assert_eq!(up.count("/fresh"), 1);

    // The origin's own Age counts (RFC 9111 §4.2.3): the entry was already 10 s old.
    let miss = envoy.get("/aged");
    assert_eq!(miss.text(), "aged");
    let hit = envoy.get("/aged");
    let age = age(&hit);
    assert!((10..=13).contains(&age), "Age {age} with upstream Age: 10");
    let ttl = hit_ttl(&hit);
    assert!(ttl <= 50, "ttl {ttl} ignores the upstream Age");
    assert_eq!(up.count("/aged"), 1);
}

#[test]
fn private_is_not_stored() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/pv" => Reply::text("mine").header("Cache-Control", "private, max-age=60"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    for n in 1..=2 {
        let r = envoy.get("/pv");
        assert_eq!(r.text(), "mine");
        assert_eq!(CacheStatus::of(&r).param("detail"), Some("private"));
        assert_not_hit(&r);
        assert_eq!(up.count("/pv"), n);
    }
}

#[test]
fn vary_star_is_never_served_from_cache() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/vs" => Reply::text("anything")
            .header("Cache-Control", "max-age=60")
            .header("Vary", "*"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    for n in 1..=3 {
        let r = envoy.get("/vs");
        assert_eq!(r.text(), "anything");
        assert_not_hit(&r);
        assert_eq!(CacheStatus::of(&r).param("detail"), Some("vary-star"));
        assert_eq!(up.count("/vs"), n);
    }
}

#[test]
fn request_no_cache_goes_to_the_origin() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/page" => Reply::text("page").header("Cache-Control", "max-age=60"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    envoy.get("/page");
    hit_ttl(&envoy.get("/page"));
    assert_eq!(up.count("/page"), 1);

    let r = envoy.get_with("/page", &[("Cache-Control", "no-cache")]);
    assert_eq!(r.text(), "page");
    let cs = CacheStatus::of(&r);
    assert_eq!(cs.param("fwd"), Some("request"), "{cs:?}");
    assert_eq!(cs.param("fwd-status"), Some("200"), "{cs:?}");
    assert_eq!(up.count("/page"), 2, "no-cache must reach the origin");
}

#[test]
fn authorization_needs_an_explicit_shared_cache_permission() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/plain" => Reply::text("plain").header("Cache-Control", "max-age=60"),
        "/public" => Reply::text("public").header("Cache-Control", "public, max-age=60"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    let auth = [("Authorization", "Bearer token-1")];

    for n in 1..=2 {
        let r = envoy.get_with("/plain", &auth);
        assert_eq!(r.text(), "plain");
        assert_eq!(
            r.header("cache-status"),
            Some("edge-filter; fwd=uri-miss; fwd-status=200; detail=authorization")
        );
        assert_eq!(up.count("/plain"), n);
    }

    let first = envoy.get_with("/public", &auth);
    assert_eq!(
        first.header("cache-status"),
        Some("edge-filter; fwd=uri-miss; fwd-status=200; stored")
    );
    let second = envoy.get_with("/public", &auth);
    assert_eq!(second.text(), "public");
    hit_ttl(&second);
    assert_eq!(up.count("/public"), 1);
}

#[test]
fn stale_entry_is_forwarded_and_replaced() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        // Two seconds, not one: the immediate re-requests below must be fresh even when a
        // second boundary falls between store and hit (ages are whole seconds, so at most
        // one), and the sleep makes it stale whatever the phase.
        "/short" => Reply::text("short-lived").header("Cache-Control", "max-age=2"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    envoy.get("/short");
    hit_ttl(&envoy.get("/short"));
    assert_eq!(up.count("/short"), 1);

    thread::sleep(Duration::from_millis(3200));
    let stale = envoy.get("/short");
    assert_eq!(stale.text(), "short-lived");
    let cs = CacheStatus::of(&stale);
    assert_eq!(cs.param("fwd"), Some("stale"), "{cs:?}");
    assert_eq!(cs.param("fwd-status"), Some("200"), "{cs:?}");
    assert_eq!(up.count("/short"), 2, "a stale entry must not be served");

    // The fresh response replaced the entry.
    hit_ttl(&envoy.get("/short"));
    assert_eq!(up.count("/short"), 2);
}

/// The sharded store at the largest `max_entries`, in a real Envoy with 2 workers: it starts
/// (creating every shard index), stores, and serves hits stored by either worker.
#[test]
fn a_million_entries_start_store_and_hit() {
    let up = Upstream::origin(|_| Reply::text("body").header("Cache-Control", "max-age=60"));
    let envoy = Envoy::start(
        up.port(),
        r#"{"cache": {"max_entries": 1000000, "max_total_bytes": 1073741824}}"#,
    );
    for i in 0..100 {
        let r = envoy.get(&format!("/m/{i}"));
        assert!(CacheStatus::of(&r).has("stored"), "{i}");
    }
    for i in 0..100 {
        let r = envoy.get(&format!("/m/{i}"));
        assert!(CacheStatus::of(&r).has("hit"), "{i}");
        assert_eq!(r.text(), "body");
    }
    for i in 0..100 {
        assert_eq!(up.count(&format!("/m/{i}")), 1);
    }
}
